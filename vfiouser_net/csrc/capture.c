#include "capture.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "device.h"

int vn_capture_init(struct vn_capture *c)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv) < 0)
        return -errno;
    /* Workers must never block on a slow reader. */
    fcntl(sv[0], F_SETFL, fcntl(sv[0], F_GETFL) | O_NONBLOCK);
    int buf = 4 << 20;
    setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &buf, sizeof(buf));
    setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &buf, sizeof(buf));
    c->send_fd = sv[0];
    c->recv_fd = sv[1];
    atomic_store(&c->queue, -2);
    atomic_store(&c->left, 0);
    return 0;
}

void vn_capture_fini(struct vn_capture *c)
{
    close(c->send_fd);
    close(c->recv_fd);
}

int vn_capture_start(struct vn_dev *dev, int queue, int64_t count)
{
    if (queue < -1 || (queue >= 0 && (unsigned)queue >= dev->max_qps) || count <= 0)
        return -EINVAL;
    atomic_store(&dev->capture.left, count);
    atomic_store(&dev->capture.queue, queue);
    return 0;
}

void vn_capture_stop(struct vn_dev *dev)
{
    atomic_store(&dev->capture.queue, -2);
}

int vn_capture_recv_fd(struct vn_dev *dev)
{
    return dev->capture.recv_fd;
}

void vn_capture_counts(struct vn_dev *dev, uint64_t *captured, uint64_t *missed)
{
    *captured = atomic_load(&dev->capture.captured);
    *missed = atomic_load(&dev->capture.missed);
}

void vn_capture_frame(struct vn_capture *c, unsigned qp, unsigned direction,
                      const struct iovec *iov, unsigned niov, size_t off, size_t len)
{
    if (atomic_fetch_sub(&c->left, 1) <= 0) {
        atomic_store(&c->queue, -2);
        return;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct vn_capture_hdr h = {
        .queue_pair = qp,
        .direction = direction,
        .timestamp_ns = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec,
        .orig_len = (uint32_t)len,
    };
    /* Header, then the frame's pieces straight from guest memory. */
    struct iovec out[1 + 64];
    unsigned n = 0;
    out[n++] = (struct iovec){ &h, sizeof(h) };
    size_t want = len < VN_CAPTURE_SNAPLEN ? len : VN_CAPTURE_SNAPLEN;
    for (unsigned i = 0; i < niov && want > 0 && n < 1 + 64; i++) {
        if (off >= iov[i].iov_len) {
            off -= iov[i].iov_len;
            continue;
        }
        size_t piece = iov[i].iov_len - off;
        if (piece > want)
            piece = want;
        out[n++] = (struct iovec){ (uint8_t *)iov[i].iov_base + off, piece };
        want -= piece;
        off = 0;
    }
    struct msghdr msg = { .msg_iov = out, .msg_iovlen = n };
    if (sendmsg(c->send_fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
        atomic_fetch_add(&c->missed, 1);
    else
        atomic_fetch_add(&c->captured, 1);
}
