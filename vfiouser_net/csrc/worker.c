/* The per-queue-pair worker: moves frames between the guest's rx/tx rings and
 * one TAP queue, with no Python and no lock on the packet path.
 *
 * The guest's buffers are handed to readv()/writev() directly (no copy): tx
 * chains go to the TAP as they are (virtio_net_hdr_v1 == TAP vnet header of 12
 * bytes), rx packets are read into guest buffers popped ahead of time. */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "device.h"
#include "le.h"
#include "net_hdr.h"

#define TX_BUDGET 256
#define RX_BUDGET 256

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Guest errors are logged, but at most a few lines per second per queue pair
 * so that a hostile guest cannot flood the host's logs. */
static void guest_error(struct vn_qp *qp, const char *dir, int reason)
{
    uint64_t t = now_ns();
    if (t >= qp->log_budget_refill_ns) {
        qp->log_budget = 10;
        qp->log_budget_refill_ns = t + 1000000000ull;
    }
    if (qp->log_budget == 0)
        return;
    qp->log_budget--;
    vn_log(qp->dev, LOG_WARNING, "queue pair %u %s: guest error %s (counted)", qp->index, dir,
           vn_error_reason_name(reason));
}

static void notify_guest(struct vn_qp *qp, struct vn_vq *vq, struct vn_dir_stats *st)
{
    vn_vq_publish(vq);
    if (vn_vq_should_notify(vq)) {
        if (vq->msix_vector != VN_VQ_NO_VECTOR) {
            vn_irq_raise(qp->dev, vq->msix_vector);
            VN_STAT_INC(st->interrupts);
        }
    } else {
        VN_STAT_INC(st->interrupts_suppressed);
    }
}

static void queue_broken(struct vn_qp *qp, const char *dir, int reason)
{
    guest_error(qp, dir, reason);
    char why[96];
    snprintf(why, sizeof(why), "queue pair %u %s ring corrupt (%s)", qp->index, dir,
             vn_error_reason_name(reason));
    vn_dev_fatal(qp->dev, why);
}

/* Returns true when it did any work. */
static bool process_tx(struct vn_qp *qp)
{
    struct vn_vq *vq = &qp->tx;
    struct vn_dir_stats *st = &qp->st.tx;
    struct vn_dev *dev = qp->dev;
    unsigned done = 0;
    while (done < TX_BUDGET) {
        struct vn_chain c;
        int err;
        int r = vn_vq_pop(vq, qp->tx_iov, VN_TX_IOV_MAX, &c, &err);
        if (r == VN_POP_EMPTY)
            break;
        if (r == VN_POP_FATAL) {
            queue_broken(qp, "tx", err);
            break;
        }
        done++;
        if (r == VN_POP_BAD) {
            guest_error(qp, "tx", err);
            VN_STAT_INC(st->drops[VN_DROP_BAD_CHAIN]);
        } else if (c.nout != c.niov) {
            guest_error(qp, "tx", VN_ERR_DESC_ORDER);
            VN_STAT_INC(st->errors[VN_ERR_DESC_ORDER]);
            VN_STAT_INC(st->drops[VN_DROP_BAD_CHAIN]);
        } else if (c.out_len < VN_NET_HDR_LEN + 14) {
            VN_STAT_INC(st->drops[VN_DROP_HEADER_TOO_SHORT]);
        } else if (c.out_len > VN_NET_HDR_LEN + VN_MAX_FRAME) {
            VN_STAT_INC(st->drops[VN_DROP_FRAME_TOO_BIG]);
        } else if (!atomic_load_explicit(&dev->link_up, memory_order_relaxed)) {
            VN_STAT_INC(st->drops[VN_DROP_LINK_DOWN]);
        } else {
            ssize_t n = writev(qp->tap_fd, qp->tx_iov, (int)c.niov);
            if (n < 0) {
                VN_STAT_INC(st->drops[VN_DROP_TAP_ERROR]);
            } else {
                VN_STAT_INC(st->packets);
                VN_STAT_ADD(st->bytes, c.out_len - VN_NET_HDR_LEN);
            }
        }
        vn_vq_push(vq, c.head, 0);
    }
    if (done > 0) {
        VN_STAT_INC(st->batches);
        notify_guest(qp, vq, st);
    }
    return done > 0;
}

static size_t rx_need(const struct vn_dev *dev)
{
    if (VN_HAS(dev->features, VN_F_GUEST_TSO4) || VN_HAS(dev->features, VN_F_GUEST_TSO6) ||
        VN_HAS(dev->features, VN_F_GUEST_UFO))
        return VN_NET_HDR_LEN + VN_MAX_FRAME;
    return VN_NET_HDR_LEN + dev->mtu + 14 + 4;
}

/* Drop the buffers popped ahead (they go back to the avail ring). Needed
 * before a pause: the host pointers may not survive a DMA unmap. */
static void rx_unprefetch(struct vn_qp *qp)
{
    if (qp->rx_count > 0 && vn_vq_ready(&qp->rx))
        vn_vq_unpop(&qp->rx, (uint16_t)qp->rx_count);
    qp->rx_first = qp->rx_count = qp->rx_iov_end = 0;
    qp->rx_prefetched_bytes = 0;
}

static void rx_compact(struct vn_qp *qp)
{
    if (qp->rx_first == 0)
        return;
    if (qp->rx_count == 0) {
        qp->rx_first = 0;
        qp->rx_iov_end = 0;
        return;
    }
    unsigned iov0 = qp->rx_buf[qp->rx_first].iov_start;
    memmove(&qp->rx_buf[0], &qp->rx_buf[qp->rx_first], qp->rx_count * sizeof(qp->rx_buf[0]));
    memmove(&qp->rx_iov[0], &qp->rx_iov[iov0], (qp->rx_iov_end - iov0) * sizeof(qp->rx_iov[0]));
    for (unsigned i = 0; i < qp->rx_count; i++)
        qp->rx_buf[i].iov_start = (uint16_t)(qp->rx_buf[i].iov_start - iov0);
    qp->rx_iov_end -= iov0;
    qp->rx_first = 0;
}

/* Pop rx buffers until `need` bytes are ready. Returns false if the queue broke. */
static bool rx_prefetch(struct vn_qp *qp, size_t need, bool mergeable)
{
    struct vn_vq *vq = &qp->rx;
    unsigned max_bufs = mergeable ? VN_RX_BUF_MAX : 1;
    while (qp->rx_prefetched_bytes < need && qp->rx_count < max_bufs) {
        if (qp->rx_first + qp->rx_count >= VN_RX_BUF_MAX || qp->rx_iov_end >= VN_RX_IOV_MAX)
            rx_compact(qp);
        if (qp->rx_first + qp->rx_count >= VN_RX_BUF_MAX || qp->rx_iov_end >= VN_RX_IOV_MAX)
            break;
        struct vn_chain c;
        int err;
        int r = vn_vq_pop(vq, &qp->rx_iov[qp->rx_iov_end], VN_RX_IOV_MAX - qp->rx_iov_end, &c, &err);
        if (r == VN_POP_EMPTY)
            break;
        if (r == VN_POP_FATAL) {
            queue_broken(qp, "rx", err);
            return false;
        }
        struct vn_rx_buf *b = &qp->rx_buf[qp->rx_first + qp->rx_count];
        b->head = c.head;
        b->iov_start = (uint16_t)qp->rx_iov_end;
        if (r == VN_POP_OK && c.nout != 0) {
            r = VN_POP_BAD;
            err = VN_ERR_DESC_ORDER;
            VN_STAT_INC(qp->st.rx.errors[VN_ERR_DESC_ORDER]);
        }
        if (r == VN_POP_BAD) {
            guest_error(qp, "rx", err);
            b->bad = true;
            b->niov = 0;
            b->len = 0;
        } else {
            b->bad = false;
            b->niov = c.niov;
            b->len = c.in_len;
            qp->rx_iov_end += c.niov;
            qp->rx_prefetched_bytes += c.in_len;
        }
        qp->rx_count++;
    }
    return true;
}

/* Hand malformed buffers at the head of the prefetch back with length 0 so
 * the driver does not leak them. */
static unsigned rx_return_bad_head(struct vn_qp *qp)
{
    unsigned n = 0;
    while (qp->rx_count > 0 && qp->rx_buf[qp->rx_first].bad) {
        vn_vq_push(&qp->rx, qp->rx_buf[qp->rx_first].head, 0);
        qp->rx_first++;
        qp->rx_count--;
        n++;
    }
    return n;
}

static void iov_copy_out(const struct iovec *iov, unsigned niov, size_t off, void *dst, size_t len)
{
    uint8_t *d = dst;
    for (unsigned i = 0; i < niov && len > 0; i++) {
        if (off >= iov[i].iov_len) {
            off -= iov[i].iov_len;
            continue;
        }
        size_t n = iov[i].iov_len - off;
        if (n > len)
            n = len;
        memcpy(d, (uint8_t *)iov[i].iov_base + off, n);
        d += n;
        len -= n;
        off = 0;
    }
}

static void iov_copy_in(const struct iovec *iov, unsigned niov, size_t off, const void *src, size_t len)
{
    const uint8_t *s = src;
    for (unsigned i = 0; i < niov && len > 0; i++) {
        if (off >= iov[i].iov_len) {
            off -= iov[i].iov_len;
            continue;
        }
        size_t n = iov[i].iov_len - off;
        if (n > len)
            n = len;
        memcpy((uint8_t *)iov[i].iov_base + off, s, n);
        s += n;
        len -= n;
        off = 0;
    }
}

/* Give the leading prefetched buffers holding an n-byte packet (header
 * included) to the guest: used entries, num_buffers, checksum flags. */
static unsigned rx_publish_packet(struct vn_qp *qp, uint64_t n)
{
    struct vn_dev *dev = qp->dev;
    const struct vn_rx_buf *b0 = &qp->rx_buf[qp->rx_first];
    struct iovec *iov = &qp->rx_iov[b0->iov_start];
    unsigned niov = qp->rx_iov_end - b0->iov_start;
    uint64_t left = n;
    unsigned used = 0;
    while (left > 0 && used < qp->rx_count) {
        const struct vn_rx_buf *b = &qp->rx_buf[qp->rx_first + used];
        uint32_t len = left < b->len ? (uint32_t)left : b->len;
        vn_vq_push(&qp->rx, b->head, len);
        left -= len;
        used++;
    }
    uint8_t nbuf[2];
    vn_le16_put(nbuf, (uint16_t)used);
    iov_copy_in(iov, niov, VN_NET_HDR_NUM_BUFFERS_OFF, nbuf, 2);
    if (!VN_HAS(dev->features, VN_F_GUEST_CSUM)) {
        uint8_t zero = 0;
        iov_copy_in(iov, niov, VN_NET_HDR_FLAGS_OFF, &zero, 1);
    }
    for (unsigned i = 0; i < used; i++)
        qp->rx_prefetched_bytes -= qp->rx_buf[qp->rx_first + i].len;
    qp->rx_first += used;
    qp->rx_count -= used;
    VN_STAT_INC(qp->st.rx.packets);
    VN_STAT_ADD(qp->st.rx.bytes, n - VN_NET_HDR_LEN);
    return used;
}

/* Why a frame read from the TAP must not reach the guest, or -1. */
static int rx_reject_reason(struct vn_qp *qp, const uint8_t *dst)
{
    if (!atomic_load_explicit(&qp->dev->link_up, memory_order_relaxed))
        return VN_DROP_LINK_DOWN;
    if (!vn_rx_filter_accepts(&qp->dev->filter, dst))
        return VN_DROP_MAC_FILTER;
    return -1;
}

/* Returns true when it did any work; *starved when it stopped for lack of
 * guest buffers.
 *
 * Fast path: with room for the largest frame the guest accepts already
 * popped, read straight into the guest's buffers. With less room (the guest
 * is slow to refill), read into the bounce buffer and copy once the frame's
 * real size is known, holding it until enough buffers arrive: a frame is
 * never cut, and a large GSO frame never waits behind a small one. */
static bool process_rx(struct vn_qp *qp, bool *starved)
{
    struct vn_dev *dev = qp->dev;
    struct vn_vq *vq = &qp->rx;
    struct vn_dir_stats *st = &qp->st.rx;
    bool mergeable = VN_HAS(dev->features, VN_F_MRG_RXBUF);
    size_t need = rx_need(dev);
    unsigned pushed = 0, packets = 0;
    *starved = false;

    while (packets < RX_BUDGET) {
        size_t want = qp->pending_len ? qp->pending_len : need;
        if (!rx_prefetch(qp, want, mergeable))
            break;
        pushed += rx_return_bad_head(qp);
        bool can_grow = qp->rx_count < (mergeable ? VN_RX_BUF_MAX : 1u) &&
                        qp->rx_count < vq->size && qp->rx_iov_end < VN_RX_IOV_MAX;
        /* Capacity of the leading good buffers (a bad one ends a packet). */
        uint64_t cap = 0;
        for (unsigned i = 0; i < qp->rx_count && !qp->rx_buf[qp->rx_first + i].bad; i++)
            cap += qp->rx_buf[qp->rx_first + i].len;

        if (qp->pending_len > 0) {
            if (cap < qp->pending_len) {
                if (can_grow && cap == qp->rx_prefetched_bytes) {
                    *starved = true;
                    break;
                }
                /* No more room can join these buffers (the ring is used up,
                 * or a malformed buffer is in the way): it cannot be delivered. */
                VN_STAT_INC(st->drops[VN_DROP_BUFFER_TOO_SMALL]);
                qp->pending_len = 0;
                continue;
            }
            const struct vn_rx_buf *b0 = &qp->rx_buf[qp->rx_first];
            iov_copy_in(&qp->rx_iov[b0->iov_start], qp->rx_iov_end - b0->iov_start, 0, qp->bounce,
                        qp->pending_len);
            pushed += rx_publish_packet(qp, qp->pending_len);
            qp->pending_len = 0;
            packets++;
            continue;
        }
        if (qp->rx_count == 0) {
            *starved = true;
            break;
        }
        if (cap >= need) {
            const struct vn_rx_buf *b0 = &qp->rx_buf[qp->rx_first];
            struct iovec *iov = &qp->rx_iov[b0->iov_start];
            unsigned niov = 0;
            uint64_t room = 0;
            for (unsigned i = 0; room < need; i++) {
                const struct vn_rx_buf *b = &qp->rx_buf[qp->rx_first + i];
                niov = b->iov_start + b->niov - b0->iov_start;
                room += b->len;
            }
            ssize_t n = readv(qp->tap_fd, iov, (int)niov);
            if (n < 0) {
                if (errno != EAGAIN && errno != EINTR)
                    VN_STAT_INC(st->drops[VN_DROP_TAP_ERROR]);
                break;
            }
            if ((size_t)n < VN_NET_HDR_LEN + 14) {
                VN_STAT_INC(st->drops[VN_DROP_BUFFER_TOO_SMALL]);
                continue;
            }
            uint8_t dst[6];
            iov_copy_out(iov, niov, VN_NET_HDR_LEN, dst, 6);
            int why = rx_reject_reason(qp, dst);
            if (why >= 0) {
                VN_STAT_INC(st->drops[why]);
                continue;
            }
            pushed += rx_publish_packet(qp, (uint64_t)n);
            packets++;
            continue;
        }
        /* Short of room for the largest frame: go through the bounce buffer. */
        ssize_t n = read(qp->tap_fd, qp->bounce, VN_NET_HDR_LEN + VN_MAX_FRAME);
        if (n < 0) {
            if (errno != EAGAIN && errno != EINTR)
                VN_STAT_INC(st->drops[VN_DROP_TAP_ERROR]);
            break;
        }
        if ((size_t)n < VN_NET_HDR_LEN + 14) {
            VN_STAT_INC(st->drops[VN_DROP_BUFFER_TOO_SMALL]);
            continue;
        }
        int why = rx_reject_reason(qp, qp->bounce + VN_NET_HDR_LEN);
        if (why >= 0) {
            VN_STAT_INC(st->drops[why]);
            continue;
        }
        VN_STAT_INC(st->bounced);
        qp->pending_len = (uint32_t)n;
    }
    if (*starved)
        VN_STAT_INC(st->ring_full);
    if (pushed > 0) {
        VN_STAT_INC(st->batches);
        notify_guest(qp, vq, st);
    }
    return packets > 0;
}

/* Park while paused; returns false when asked to stop. */
static bool handle_requests(struct vn_qp *qp)
{
    int req = atomic_load(&qp->req);
    if (req == VN_QP_RUN)
        return true;
    if (req == VN_QP_STOP) {
        rx_unprefetch(qp);
        return false;
    }
    rx_unprefetch(qp);
    pthread_mutex_lock(&qp->lock);
    qp->parked = true;
    pthread_cond_broadcast(&qp->cond);
    while ((req = atomic_load(&qp->req)) == VN_QP_PAUSE)
        pthread_cond_wait(&qp->cond, &qp->lock);
    qp->parked = false;
    pthread_mutex_unlock(&qp->lock);
    if (req == VN_QP_STOP)
        return false;
    /* Guest memory may have been remapped while we were parked. */
    if (qp->rx.size != 0 && !qp->rx.broken && !vn_vq_map(&qp->rx))
        vn_dev_fatal(qp->dev, "rx ring no longer in guest memory");
    if (qp->tx.size != 0 && !qp->tx.broken && !vn_vq_map(&qp->tx))
        vn_dev_fatal(qp->dev, "tx ring no longer in guest memory");
    return true;
}

void *vn_qp_worker(void *arg)
{
    struct vn_qp *qp = arg;
    struct vn_dev *dev = qp->dev;
    bool rx_starved = false;

    for (;;) {
        if (!handle_requests(qp))
            break;
        bool tx_ok = vn_vq_ready(&qp->tx);
        bool rx_ok = vn_vq_ready(&qp->rx) && qp->tap_fd >= 0;
        bool work = false;
        if (tx_ok)
            work |= process_tx(qp);
        if (rx_ok)
            work |= process_rx(qp, &rx_starved);
        if (work)
            continue;

        /* Idle: ask for doorbells, then re-check before sleeping so a buffer
         * made available in between is not missed. */
        bool again = false;
        if (tx_ok)
            again |= vn_vq_enable_notify(&qp->tx);
        if (rx_ok && rx_starved)
            again |= vn_vq_enable_notify(&qp->rx);
        if (again) {
            if (tx_ok)
                vn_vq_disable_notify(&qp->tx);
            if (rx_ok)
                vn_vq_disable_notify(&qp->rx);
            rx_starved = false;
            continue;
        }
        struct pollfd pfd[2] = {
            { .fd = qp->kick_fd, .events = POLLIN },
            { .fd = qp->tap_fd, .events = (rx_ok && !rx_starved) ? POLLIN : 0 },
        };
        int r = poll(pfd, 2, -1);
        if (r < 0 && errno != EINTR) {
            vn_log(dev, LOG_ERR, "queue pair %u: poll failed: %s", qp->index, strerror(errno));
            break;
        }
        if (pfd[0].revents & POLLIN) {
            eventfd_t v;
            eventfd_read(qp->kick_fd, &v);
            rx_starved = false;
        }
        if (tx_ok)
            vn_vq_disable_notify(&qp->tx);
        if (rx_ok)
            vn_vq_disable_notify(&qp->rx);
    }
    return NULL;
}
