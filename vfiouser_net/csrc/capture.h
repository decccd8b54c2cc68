/* Packet capture for operators: frames copied to a datagram socket that the
 * control plane reads and writes to a pcap file.
 *
 * The socket pair lives as long as the device, so a worker never sends to a
 * closed fd; switching capture on and off is an atomic store. While off, the
 * datapath pays one relaxed load per batch of frames. A frame the reader is
 * too slow for is not captured and is counted (capture never slows the
 * datapath down). */
#ifndef VN_CAPTURE_H
#define VN_CAPTURE_H

#include <stdatomic.h>
#include <stdint.h>
#include <sys/uio.h>

struct vn_dev;

/* Record header before each captured frame. */
struct vn_capture_hdr {
    uint32_t queue_pair;
    uint32_t direction;   /* 0 rx (to the guest), 1 tx (from the guest) */
    uint64_t timestamp_ns; /* CLOCK_REALTIME */
    uint32_t orig_len;
    uint32_t reserved;
};

#define VN_CAPTURE_SNAPLEN 65535

struct vn_capture {
    int send_fd;          /* workers send here */
    int recv_fd;          /* the control plane reads here */
    _Atomic int queue;    /* -2 off, -1 every pair, else one pair */
    _Atomic int64_t left; /* frames still to capture */
    _Atomic uint64_t captured;
    _Atomic uint64_t missed;
};

int vn_capture_init(struct vn_capture *c);
void vn_capture_fini(struct vn_capture *c);
/* Capture `count` frames of pair `queue` (-1: all). */
int vn_capture_start(struct vn_dev *dev, int queue, int64_t count);
void vn_capture_stop(struct vn_dev *dev);
int vn_capture_recv_fd(struct vn_dev *dev);
void vn_capture_counts(struct vn_dev *dev, uint64_t *captured, uint64_t *missed);

/* Datapath: is pair qp being captured? */
static inline int vn_capture_wanted(struct vn_capture *c, unsigned qp)
{
    int q = atomic_load_explicit(&c->queue, memory_order_relaxed);
    return q == -1 || (q >= 0 && (unsigned)q == qp);
}

/* Datapath: copy `len` frame bytes found at `off` in iov. */
void vn_capture_frame(struct vn_capture *c, unsigned qp, unsigned direction,
                      const struct iovec *iov, unsigned niov, size_t off, size_t len);

#endif
