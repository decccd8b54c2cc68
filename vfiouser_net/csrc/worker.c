/* The per-queue-pair worker: moves frames between the guest's rx/tx rings and
 * one TAP queue, with no Python on the packet path.
 *
 * The guest's buffers are handed to readv()/writev() directly where possible:
 * tx chains go to the TAP as they are (the TAP's vnet header has the guest's
 * header length), rx frames are read into guest buffers popped ahead of time.
 * A frame the steering engine sends to another pair is copied into that
 * pair's inbox; a frame read while the guest's posted room is short goes
 * through a buffer of our own (and the inbox) instead of being cut. */
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "device.h"
#include "irq.h"
#include "le.h"
#include "log.h"
#include "net_hdr.h"
#include "worker.h"

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

/* A TAP read or write failed for another reason than a full or empty
 * queue. EBADFD means the interface was deleted under us: stop reading it
 * (it would poll as readable forever) until the control plane hands a new
 * one, which it does when the interface exists again. */
static void tap_error(struct vn_qp *qp, struct vn_dir_stats *st, int err)
{
    VN_STAT_INC(st->drops[VN_DROP_TAP_ERROR]);
    if (err != EBADFD || atomic_exchange(&qp->tap_failed, true))
        return;
    VN_STAT_INC(qp->dev->st.tap_failures);
    vn_log(qp->dev, LOG_WARNING, "queue pair %u: TAP queue gone (%s): not read until replaced",
           qp->index, strerror(err));
}

/* Interrupt for what was used since the last one, unless the driver
 * suppresses it (EVENT_IDX or flags). */
static void signal_used(struct vn_qp *qp, struct vn_vq *vq, struct vn_dir_stats *st)
{
    if (vn_vq_should_notify(vq)) {
        if (vn_irq_notify_queue(qp->dev, vq->msix_vector))
            VN_STAT_INC(st->interrupts);
    } else {
        VN_STAT_INC(st->interrupts_suppressed);
    }
}

/* `n` packets were used: publish them, and signal now or when the driver's
 * coalescing parameters say. */
static void notify_guest(struct vn_qp *qp, struct vn_vq *vq, struct vn_coal *coal,
                         struct vn_dir_stats *st, unsigned n)
{
    vn_vq_publish(vq);
    if (vn_coal_account(coal, n, now_ns()))
        signal_used(qp, vq, st);
    else
        VN_STAT_INC(st->interrupts_coalesced);
}

/* Send interrupts held back by coalescing that are due by now; returns the
 * nanoseconds until the next one is (UINT64_MAX: none held). */
static uint64_t coal_flush_due(struct vn_qp *qp)
{
    if (qp->rx_coal.pending == 0 && qp->tx_coal.pending == 0)
        return UINT64_MAX;
    uint64_t now = now_ns();
    if (vn_coal_due(&qp->rx_coal, now))
        signal_used(qp, &qp->rx, &qp->st.rx);
    if (vn_coal_due(&qp->tx_coal, now))
        signal_used(qp, &qp->tx, &qp->st.tx);
    uint64_t a = vn_coal_wait_ns(&qp->rx_coal, now), b = vn_coal_wait_ns(&qp->tx_coal, now);
    return a < b ? a : b;
}

static void queue_broken(struct vn_qp *qp, const char *dir, int reason)
{
    guest_error(qp, dir, reason);
    char why[96];
    snprintf(why, sizeof(why), "queue pair %u %s ring corrupt (%s)", qp->index, dir,
             vn_error_reason_name(reason));
    vn_dev_fatal(qp->dev, why);
}

/* The guest's frame (after the header) in a chain, copied out for parsing:
 * enough for Ethernet, two VLAN tags, IPv6 and the ports. */
#define PARSE_LEN 96

static size_t iov_copy_out(const struct iovec *iov, unsigned niov, size_t off, void *dst, size_t len)
{
    uint8_t *d = dst;
    size_t done = 0;
    for (unsigned i = 0; i < niov && done < len; i++) {
        if (off >= iov[i].iov_len) {
            off -= iov[i].iov_len;
            continue;
        }
        size_t n = iov[i].iov_len - off;
        if (n > len - done)
            n = len - done;
        memcpy(d + done, (uint8_t *)iov[i].iov_base + off, n);
        done += n;
        off = 0;
    }
    return done;
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

static bool tap_readable(const struct vn_qp *qp)
{
    return qp->tap_fd >= 0 && !atomic_load_explicit(&qp->tap_failed, memory_order_relaxed);
}

/* A chain popped off the transmit ring: true when its frame is to be
 * written to the TAP, else it was counted as a drop. */
static bool tx_accept(struct vn_qp *qp, int r, const struct vn_chain *c, int err)
{
    struct vn_dir_stats *st = &qp->st.tx;
    struct vn_dev *dev = qp->dev;
    uint32_t hdr = dev->hdr_len;
    if (r == VN_POP_BAD) {
        guest_error(qp, "tx", err);
        VN_STAT_INC(st->drops[VN_DROP_BAD_CHAIN]);
    } else if (c->nout != c->niov) {
        guest_error(qp, "tx", VN_ERR_DESC_ORDER);
        VN_STAT_INC(st->errors[VN_ERR_DESC_ORDER]);
        VN_STAT_INC(st->drops[VN_DROP_BAD_CHAIN]);
    } else if (c->out_len < hdr + 14) {
        VN_STAT_INC(st->drops[VN_DROP_HEADER_TOO_SHORT]);
    } else if (c->out_len > hdr + VN_MAX_FRAME) {
        VN_STAT_INC(st->drops[VN_DROP_FRAME_TOO_BIG]);
    } else if (!atomic_load_explicit(&dev->link_up, memory_order_relaxed)) {
        VN_STAT_INC(st->drops[VN_DROP_LINK_DOWN]);
    } else {
        return true;
    }
    return false;
}

/* Before the write: the rx-follows-tx table learns the flow's pair. */
static void tx_learn(struct vn_qp *qp, const struct iovec *iov, unsigned niov)
{
    struct vn_dev *dev = qp->dev;
    if (!dev->learn_tx)
        return;
    uint8_t f[PARSE_LEN];
    size_t n = iov_copy_out(iov, niov, dev->hdr_len, f, sizeof(f));
    vn_steer_learn_tx(&dev->steer, f, n, qp->index);
}

/* After the write: its result (bytes, or -errno) counted. */
static void tx_written(struct vn_qp *qp, const struct iovec *iov, unsigned niov, uint32_t out_len,
                       ssize_t res)
{
    struct vn_dir_stats *st = &qp->st.tx;
    struct vn_dev *dev = qp->dev;
    uint32_t hdr = dev->hdr_len;
    if (res < 0) {
        tap_error(qp, st, (int)-res);
        return;
    }
    if (vn_capture_wanted(&dev->capture, qp->index))
        vn_capture_frame(&dev->capture, qp->index, 1, iov, niov, hdr, out_len - hdr);
    VN_STAT_INC(st->packets);
    VN_STAT_ADD(st->bytes, out_len - hdr);
    VN_STAT_INC(st->size_hist[vn_size_bucket(out_len - hdr)]);
}

static void tx_batch_done(struct vn_qp *qp, unsigned done)
{
    struct vn_dir_stats *st = &qp->st.tx;
    if (done > 0) {
        VN_STAT_INC(st->batches);
        VN_STAT_INC(st->batch_hist[vn_batch_bucket(done)]);
        notify_guest(qp, &qp->tx, &qp->tx_coal, st, done);
    }
}

/* One writev a frame, up to `budget` chains. Returns how many it took. */
static unsigned process_tx(struct vn_qp *qp, unsigned budget)
{
    struct vn_vq *vq = &qp->tx;
    unsigned done = 0;
    while (done < budget) {
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
        if (tx_accept(qp, r, &c, err)) {
            tx_learn(qp, qp->tx_iov, c.niov);
            ssize_t n = writev(qp->tap_fd, qp->tx_iov, (int)c.niov);
            tx_written(qp, qp->tx_iov, c.niov, c.out_len, n < 0 ? -errno : n);
        }
        vn_vq_push(vq, c.head, 0);
    }
    tx_batch_done(qp, done);
    return done;
}

/* Up to VN_TAP_BATCH_MAX frames a system call (tap_batch.h). The used ring
 * gets the chains in the order they were popped, after their writes. */
static unsigned process_tx_batched(struct vn_qp *qp, unsigned budget)
{
    struct vn_vq *vq = &qp->tx;
    struct vn_tap_batch *b = qp->txb;
    struct {
        uint16_t head;
        bool write;
        unsigned iov, niov;
        uint32_t len;
    } slot[VN_TAP_BATCH_MAX];
    int32_t res[VN_TAP_BATCH_MAX];
    unsigned done = 0;
    bool more = true;
    while (more && done < budget) {
        unsigned n = 0, iov_used = 0;
        uint64_t bytes = 0;
        while (n < VN_TAP_BATCH_MAX && done + n < budget && bytes < VN_TAP_BATCH_BYTES &&
               VN_TAP_BATCH_IOVS - iov_used >= VN_TX_IOV_MAX) {
            struct vn_chain c;
            int err;
            int r = vn_vq_pop(vq, b->iov + iov_used, VN_TX_IOV_MAX, &c, &err);
            if (r == VN_POP_EMPTY) {
                more = false;
                break;
            }
            if (r == VN_POP_FATAL) {
                queue_broken(qp, "tx", err);
                more = false;
                break;
            }
            slot[n].head = c.head;
            slot[n].write = tx_accept(qp, r, &c, err);
            if (slot[n].write) {
                slot[n].iov = iov_used;
                slot[n].niov = c.niov;
                slot[n].len = c.out_len;
                tx_learn(qp, b->iov + iov_used, c.niov);
                vn_tap_batch_writev(b, b->iov + iov_used, c.niov, n);
                iov_used += c.niov;
                bytes += c.out_len;
            }
            n++;
        }
        if (n == 0)
            break;
        if (iov_used > 0 && vn_tap_batch_flush(b, res) < 0)
            vn_log(qp->dev, LOG_WARNING, "queue pair %u: io_uring_enter failed: writing frame by "
                   "frame from now on", qp->index);
        for (unsigned i = 0; i < n; i++) {
            if (slot[i].write)
                tx_written(qp, b->iov + slot[i].iov, slot[i].niov, slot[i].len, res[i]);
            vn_vq_push(vq, slot[i].head, 0);
        }
        done += n;
        if (!vn_tap_batch_usable(b))
            break;
    }
    tx_batch_done(qp, done);
    return done;
}

static unsigned transmit_up_to(struct vn_qp *qp, unsigned budget)
{
    if (qp->txb != NULL && vn_tap_batch_usable(qp->txb))
        return process_tx_batched(qp, budget);
    return process_tx(qp, budget);
}

/* Returns true when it did any work. */
static bool transmit(struct vn_qp *qp)
{
    return transmit_up_to(qp, TX_BUDGET) > 0;
}

static bool process_rx(struct vn_qp *qp, bool *starved);

static bool ring_current(const struct vn_vq *vq)
{
    return vn_vq_ready(vq) &&
           __atomic_load_n(&vq->mem_generation, __ATOMIC_ACQUIRE) == vq->mem->generation;
}

/* The receive half of an inline pass: a reply to what was just written is
 * often in the TAP already (the host's kernel answers inside the writev), so
 * placing it here saves the worker's wake-up on the way back too. Only when
 * the sleeping worker would itself read the TAP (not starved, no steering
 * switch holding reads) and without receive coalescing (its timer is the
 * worker's). The TAP's readiness still wakes the worker; it then finds
 * nothing to do. */
static void rx_inline(struct vn_qp *qp)
{
    struct vn_dev *dev = qp->dev;
    if (!atomic_load_explicit(&qp->sleep_reads_tap, memory_order_relaxed) ||
        atomic_load(&qp->rx_coal.max_packets) != 0 || atomic_load(&qp->rx_coal.max_usecs) != 0 ||
        !tap_readable(qp) || !ring_current(&qp->rx) || vn_dev_steering_hold(dev))
        return;
    bool starved;
    if (process_rx(qp, &starved))
        VN_STAT_INC(dev->st.rx_inline);
}

/* A transmit doorbell handled on the thread that received it (the context
 * thread) while the pair's worker sleeps: the frames leave without waking
 * the worker, one thread hop less for request/response traffic. Only small
 * passes: more than VN_TX_INLINE_MAX frames, or more arriving meanwhile,
 * and the worker is woken as usual (the context thread must not become
 * every pair's transmit worker under load). Not with transmit interrupt
 * coalescing (its timer is the worker's).
 *
 * Ownership of the transmit ring: the worker sets `sleeping` after its last
 * access to the ring and, once awake, clears it and waits for tx_busy to be
 * free before touching the ring again; the context thread takes tx_busy and
 * then checks `sleeping`. Both sequentially consistent, so either the
 * context thread sees the worker still asleep and the worker waits for it,
 * or it sees it awake and leaves the ring alone. */
bool vn_qp_tx_inline(struct vn_qp *qp)
{
    if (!atomic_load(&qp->sleeping) || atomic_load(&qp->tx_coal.max_packets) != 0 ||
        atomic_load(&qp->tx_coal.max_usecs) != 0)
        return false;
    if (atomic_exchange(&qp->tx_busy, true))
        return false;
    bool done = false;
    struct vn_vq *vq = &qp->tx;
    if (atomic_load(&qp->sleeping) && ring_current(vq)) {
        unsigned n = transmit_up_to(qp, VN_TX_INLINE_MAX);
        /* Doorbells on again for what comes next (EVENT_IDX: avail_event
         * moves to where we are); anything already there goes to the worker. */
        done = n < VN_TX_INLINE_MAX && !vn_vq_enable_notify(vq) && !vq->broken;
        if (done && n > 0)
            rx_inline(qp);
    }
    atomic_store(&qp->tx_busy, false);
    return done;
}

/* The worker, just woken: wait for an inline pass in progress to end. */
static void tx_ring_back(struct vn_qp *qp)
{
    atomic_store(&qp->sleeping, false);
    while (atomic_load(&qp->tx_busy))
        sched_yield();
}

static size_t rx_need(const struct vn_dev *dev)
{
    if (VN_HAS(dev->features, VN_F_GUEST_TSO4) || VN_HAS(dev->features, VN_F_GUEST_TSO6) ||
        VN_HAS(dev->features, VN_F_GUEST_UFO) || VN_HAS(dev->features, VN_F_GUEST_USO4) ||
        VN_HAS(dev->features, VN_F_GUEST_USO6))
        return dev->hdr_len + VN_MAX_FRAME;
    return dev->hdr_len + dev->mtu + 14 + 4;
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

/* Pop rx buffers until `need` bytes are ready. Returns false if the queue
 * broke; *stuck when the next chain cannot join the buffers already popped
 * (they and it do not fit in our iovec array together). */
static bool rx_prefetch(struct vn_qp *qp, size_t need, bool mergeable, bool *stuck)
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
        if (r == VN_POP_BAD && err == VN_ERR_CHAIN_TOO_LONG && qp->rx_iov_end > 0) {
            /* Our iovec array is partly taken by earlier buffers: not the
             * guest's fault. Make room and try again; with popped buffers
             * in the way, take the chain again once they are used. */
            vn_vq_unpop(vq, 1);
            VN_STAT_ADD(qp->st.rx.errors[VN_ERR_CHAIN_TOO_LONG], (uint64_t)-1);
            if (qp->rx_first > 0) {
                rx_compact(qp);
                continue;
            }
            *stuck = true;
            break;
        }
        struct vn_rx_buf *b = &qp->rx_buf[qp->rx_first + qp->rx_count];
        b->head = c.head;
        b->iov_start = (uint16_t)qp->rx_iov_end;
        if (r == VN_POP_OK && c.nout != 0) {
            r = VN_POP_BAD;
            err = VN_ERR_DESC_ORDER;
            VN_STAT_INC(qp->st.rx.errors[VN_ERR_DESC_ORDER]);
        } else if (r == VN_POP_OK && c.in_len < qp->dev->hdr_len) {
            /* Every receive buffer must hold at least the header (5.1.6.3). */
            r = VN_POP_BAD;
            err = VN_ERR_ZERO_LENGTH;
            VN_STAT_INC(qp->st.rx.errors[VN_ERR_ZERO_LENGTH]);
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

/* Capacity of the leading good buffers (a bad one ends what a frame can use). */
static uint64_t rx_room(const struct vn_qp *qp)
{
    uint64_t cap = 0;
    for (unsigned i = 0; i < qp->rx_count && !qp->rx_buf[qp->rx_first + i].bad; i++)
        cap += qp->rx_buf[qp->rx_first + i].len;
    return cap;
}

/* Give the leading prefetched buffers holding an n-byte frame (header
 * included) to the guest: used entries, num_buffers, hash, checksum flags. */
static unsigned rx_publish(struct vn_qp *qp, uint64_t n, uint32_t hash, uint8_t report)
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
    if (dev->hdr_len == VN_NET_HDR_HASH_LEN) {
        uint8_t h[8] = { 0 };
        vn_le32_put(h, report == VN_HASH_REPORT_NONE ? 0 : hash);
        vn_le16_put(h + 4, report);
        iov_copy_in(iov, niov, VN_NET_HDR_HASH_VALUE_OFF, h, sizeof(h));
    }
    for (unsigned i = 0; i < used; i++)
        qp->rx_prefetched_bytes -= qp->rx_buf[qp->rx_first + i].len;
    qp->rx_first += used;
    qp->rx_count -= used;
    if (vn_capture_wanted(&dev->capture, qp->index))
        vn_capture_frame(&dev->capture, qp->index, 0, iov, niov, dev->hdr_len, n - dev->hdr_len);
    VN_STAT_INC(qp->st.rx.packets);
    VN_STAT_ADD(qp->st.rx.bytes, n - dev->hdr_len);
    VN_STAT_INC(qp->st.rx.size_hist[vn_size_bucket(n - dev->hdr_len)]);
    return used;
}

/* Why a frame read from the TAP must not reach the guest, or -1. */
static int rx_reject_reason(struct vn_qp *qp, uint8_t gso_type, const uint8_t *frame, size_t len)
{
    if (!atomic_load_explicit(&qp->dev->link_up, memory_order_relaxed))
        return VN_DROP_LINK_DOWN;
    /* Not past the MTU unless segmented (5.1.4.1): a TAP made with a larger
     * MTU than the device's can hand such frames. ECN is a flag, not GSO. */
    if ((gso_type & 0x7f) == 0 && len > (size_t)qp->dev->mtu + 14 + 4)
        return VN_DROP_FRAME_TOO_BIG;
    if (!vn_rx_filter_accepts(&qp->dev->filter, frame))
        return VN_DROP_MAC_FILTER;
    if (!vn_rx_filter_vlan_accepts(&qp->dev->filter, frame, len))
        return VN_DROP_VLAN_FILTER;
    return -1;
}

void vn_pkt_place_done(struct vn_dev *dev, struct vn_pkt *pkt)
{
    if (pkt->epoch != atomic_load(&dev->epoch) && atomic_fetch_sub(&dev->old_inflight, 1) == 1) {
        /* The last frame steered under the old rule is placed: TAP reads
         * may resume on every pair. */
        for (unsigned i = 0; i < dev->max_qps; i++)
            if (dev->qp[i].thread_started)
                eventfd_write(dev->qp[i].kick_fd, 1);
    }
    free(pkt);
}

static struct vn_pkt *inbox_pop(struct vn_qp *qp, bool peek)
{
    pthread_mutex_lock(&qp->inbox.lock);
    struct vn_pkt *p = qp->inbox.head;
    if (p != NULL && !peek) {
        qp->inbox.head = p->next;
        if (qp->inbox.head == NULL)
            qp->inbox.tail = NULL;
        qp->inbox.count--;
        qp->inbox.bytes -= sizeof(*p) + p->len;
    }
    pthread_mutex_unlock(&qp->inbox.lock);
    return p;
}

void vn_inbox_drain(struct vn_dev *dev, struct vn_qp *qp, int drop_reason)
{
    struct vn_pkt *p;
    while ((p = inbox_pop(qp, false)) != NULL) {
        VN_STAT_INC(qp->st.rx.drops[drop_reason]);
        vn_pkt_place_done(dev, p);
    }
}

static bool takes_frames(struct vn_qp *qp)
{
    return atomic_load_explicit(&qp->rx_ready, memory_order_relaxed) &&
           !__atomic_load_n(&qp->rx.broken, __ATOMIC_RELAXED);
}

/* Another active pair for a frame whose receive queue the driver is
 * resetting (5.1.6.5.6): the next one after it that takes frames, so that
 * the frames of one flow keep going to one queue; -1 if there is none
 * ("If all receive queues are being reset, the device MUST drop"). The
 * active pairs change only while workers are parked. */
static int reselect(struct vn_dev *dev, unsigned to)
{
    unsigned n = dev->active_qps;
    for (unsigned k = 1; k < n; k++) {
        unsigned q = (to + k) % n;
        if (takes_frames(&dev->qp[q]))
            return (int)q;
    }
    return -1;
}

/* Queue a frame for pair `to` (possibly ourselves). Takes ownership. */
static void steer_to(struct vn_qp *from, unsigned to, struct vn_pkt *pkt)
{
    struct vn_dev *dev = from->dev;
    struct vn_qp *t = &dev->qp[to];
    if (atomic_load_explicit(&t->rx_resetting, memory_order_relaxed)) {
        int q = reselect(dev, to);
        if (q < 0) {
            VN_STAT_INC(from->st.rx.drops[VN_DROP_QUEUE_DISABLED]);
            free(pkt);
            return;
        }
        VN_STAT_INC(dev->st.rx_reselected);
        t = &dev->qp[q];
    }
    if (__atomic_load_n(&t->rx.broken, __ATOMIC_RELAXED)) {
        /* Its ring is unusable until the driver resets the device. */
        VN_STAT_INC(from->st.rx.drops[VN_DROP_QUEUE_BROKEN]);
        free(pkt);
        return;
    }
    if (!atomic_load_explicit(&t->rx_ready, memory_order_relaxed)) {
        /* No worker or no receive ring (a pair the driver did not set up,
         * steered to anyway): held, it would never be placed nor freed. */
        VN_STAT_INC(from->st.rx.drops[VN_DROP_PAIR_NOT_READY]);
        free(pkt);
        return;
    }
    pkt->next = NULL;
    pkt->epoch = atomic_load(&dev->epoch);
    size_t size = sizeof(*pkt) + pkt->len;
    pthread_mutex_lock(&t->inbox.lock);
    bool full = t->inbox.count >= VN_INBOX_MAX || t->inbox.bytes + size > VN_INBOX_MAX_BYTES;
    if (!full) {
        if (t->inbox.tail != NULL)
            t->inbox.tail->next = pkt;
        else
            t->inbox.head = pkt;
        t->inbox.tail = pkt;
        t->inbox.count++;
        t->inbox.bytes += size;
    }
    pthread_mutex_unlock(&t->inbox.lock);
    if (full) {
        VN_STAT_INC(from->st.rx.drops[VN_DROP_STEER_BACKLOG]);
        free(pkt);
        return;
    }
    if (t != from) {
        VN_STAT_INC(from->st.rx.steered_out);
        eventfd_write(t->kick_fd, 1);
    }
}

static struct vn_pkt *pkt_alloc(struct vn_qp *qp)
{
    if (qp->spare == NULL)
        qp->spare = malloc(sizeof(struct vn_pkt) + VN_NET_HDR_MAX_LEN + VN_MAX_FRAME);
    return qp->spare;
}

/* Place frames from our inbox. Returns false when the guest's ring lacks room
 * for the next one (we are starved). */
static bool rx_place_inbox(struct vn_qp *qp, bool mergeable, unsigned *pushed, unsigned *packets)
{
    struct vn_vq *vq = &qp->rx;
    for (;;) {
        struct vn_pkt *p = inbox_pop(qp, true);
        if (p == NULL)
            return true;
        bool stuck = false;
        if (!rx_prefetch(qp, p->len, mergeable, &stuck))
            return false;
        *pushed += rx_return_bad_head(qp);
        uint64_t cap = rx_room(qp);
        bool can_grow = !stuck && qp->rx_count < (mergeable ? VN_RX_BUF_MAX : 1u) &&
                        qp->rx_count < vq->size && qp->rx_iov_end < VN_RX_IOV_MAX;
        if (cap < p->len && can_grow && cap == qp->rx_prefetched_bytes)
            return false;
        inbox_pop(qp, false);
        if (cap < p->len) {
            /* No more room can join these buffers (the ring is used up, or a
             * malformed buffer is in the way): it cannot be delivered. */
            VN_STAT_INC(qp->st.rx.drops[VN_DROP_BUFFER_TOO_SMALL]);
        } else {
            const struct vn_rx_buf *b0 = &qp->rx_buf[qp->rx_first];
            iov_copy_in(&qp->rx_iov[b0->iov_start], qp->rx_iov_end - b0->iov_start, 0, p->data,
                        p->len);
            *pushed += rx_publish(qp, p->len, p->hash, p->report);
            (*packets)++;
        }
        /* A frame steered before the last switch: the driver must see it
         * before it stops counting as in flight, or a worker could find
         * the driver caught up (used_event) without it and let frames of
         * the new rule overtake it. */
        if (p->epoch != atomic_load(&qp->dev->epoch))
            vn_vq_publish(vq);
        vn_pkt_place_done(qp->dev, p);
    }
}

/* The steering decision for a frame; with one pair in use and no hash for
 * the guest's header there is nothing to decide, so no parsing per frame. */
static unsigned steer(struct vn_qp *qp, const uint8_t *frame, size_t len, uint32_t *hash,
                      uint8_t *report)
{
    struct vn_dev *dev = qp->dev;
    if (dev->active_qps <= 1 && dev->hdr_len != VN_NET_HDR_HASH_LEN) {
        *hash = 0;
        *report = VN_HASH_REPORT_NONE;
        return 0;
    }
    return vn_steer_rx_read(&dev->steer, frame, len, dev->active_qps, qp->index, hash, report);
}

/* Out of guest buffers, keep reading the TAP? With one pair in use its TAP
 * queue holds only our frames: they wait there. With several it also holds
 * other pairs' flows (the kernel picks TAP queues by its own hash), which
 * must not wait behind ours: read on, ours queue in our inbox (in order,
 * bounded: beyond, dropped and counted as steer_backlog). */
static bool rx_read_starved(const struct vn_dev *dev)
{
    return dev->active_qps > 1;
}

/* Returns true when it did any work; *starved when it ran out of guest
 * buffers (and stopped reading, with one pair in use). */
static bool process_rx(struct vn_qp *qp, bool *starved)
{
    struct vn_dev *dev = qp->dev;
    struct vn_vq *vq = &qp->rx;
    struct vn_dir_stats *st = &qp->st.rx;
    bool mergeable = VN_HAS(dev->features, VN_F_MRG_RXBUF);
    bool own_active = qp->index < dev->active_qps && vn_vq_ready(vq);
    uint32_t hdr = dev->hdr_len;
    size_t need = rx_need(dev);
    unsigned pushed = 0, packets = 0, reads = 0;
    bool progress = false;
    *starved = false;

    while (packets < RX_BUDGET && reads < RX_BUDGET) {
        /* Frames already steered here go first: they are older than
         * anything still in the TAP. */
        bool room = own_active;
        if (own_active && !rx_place_inbox(qp, mergeable, &pushed, &packets)) {
            *starved = true;
            if (!rx_read_starved(dev))
                break;
            room = false;
        }
        if (!tap_readable(qp) || vn_dev_steering_hold(dev))
            break;
        if (room) {
            bool stuck = false;
            if (!rx_prefetch(qp, need, mergeable, &stuck))
                break;
            pushed += rx_return_bad_head(qp);
            if (qp->rx_count == 0) {
                *starved = true;
                if (!rx_read_starved(dev))
                    break;
                room = false;
            }
        }
        reads++;
        uint64_t cap = room ? rx_room(qp) : 0;
        if (cap >= need) {
            /* Fast path: straight into our guest buffers. */
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
                    tap_error(qp, st, errno);
                break;
            }
            progress = true;
            uint8_t f[PARSE_LEN];
            size_t flen = iov_copy_out(iov, niov, hdr, f, sizeof(f));
            if ((size_t)n < hdr + 14 || flen < 14) {
                VN_STAT_INC(st->drops[VN_DROP_BUFFER_TOO_SMALL]);
                continue;
            }
            uint8_t h[2] = { 0, 0 };
            iov_copy_out(iov, niov, 0, h, sizeof(h));
            int why = rx_reject_reason(qp, h[1], f, (size_t)n - hdr);
            if (why >= 0) {
                VN_STAT_INC(st->drops[why]);
                continue;
            }
            uint32_t hash;
            uint8_t report;
            unsigned target = steer(qp, f, flen, &hash, &report);
            if (target == qp->index) {
                pushed += rx_publish(qp, (uint64_t)n, hash, report);
                packets++;
                continue;
            }
            struct vn_pkt *p = malloc(sizeof(*p) + (size_t)n);
            if (p == NULL) {
                VN_STAT_INC(st->drops[VN_DROP_STEER_BACKLOG]);
                continue;
            }
            p->len = (uint32_t)n;
            p->hash = hash;
            p->report = report;
            iov_copy_out(iov, niov, 0, p->data, (size_t)n);
            steer_to(qp, target, p);
            continue;
        }
        /* Our own buffer: short of guest room, or this pair is not in use. */
        struct vn_pkt *p = pkt_alloc(qp);
        if (p == NULL)
            break;
        ssize_t n = read(qp->tap_fd, p->data, hdr + VN_MAX_FRAME);
        if (n < 0) {
            if (errno != EAGAIN && errno != EINTR)
                tap_error(qp, st, errno);
            break;
        }
        progress = true;
        if ((size_t)n < hdr + 14) {
            VN_STAT_INC(st->drops[VN_DROP_BUFFER_TOO_SMALL]);
            continue;
        }
        int why = rx_reject_reason(qp, p->data[1], p->data + hdr, (size_t)n - hdr);
        if (why >= 0) {
            VN_STAT_INC(st->drops[why]);
            continue;
        }
        p->len = (uint32_t)n;
        unsigned target = steer(qp, p->data + hdr, (size_t)n - hdr, &p->hash, &p->report);
        qp->spare = NULL;
        struct vn_pkt *shrunk = realloc(p, sizeof(*p) + (size_t)n);
        if (target == qp->index)
            VN_STAT_INC(st->bounced);
        steer_to(qp, target, shrunk != NULL ? shrunk : p);
    }
    if (*starved)
        VN_STAT_INC(st->ring_full);
    if (pushed > 0) {
        VN_STAT_INC(st->batches);
        VN_STAT_INC(st->batch_hist[vn_batch_bucket(packets)]);
        notify_guest(qp, vq, &qp->rx_coal, st, packets > 0 ? packets : 1);
    }
    return packets > 0 || progress;
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
    /* Before a steering change: what the guest queued for transmit under
     * the old configuration leaves first. Bounded, in case the guest keeps
     * adding. */
    for (int i = 0; i < 64 && qp->dev->flush_tx_on_pause && vn_vq_ready(&qp->tx) && transmit(qp); i++)
        ;
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

/* Polling mode: the doorbells the driver wrote to the shared page are
 * counted (the rings themselves are polled), and pair 0's worker hands the
 * control queue's to the context thread. */
static void poll_doorbells(struct vn_qp *qp)
{
    struct vn_dev *dev = qp->dev;
    if (vn_notify_page_take(&dev->notify, 2 * qp->index))
        VN_STAT_INC(qp->st.rx.doorbells);
    if (vn_notify_page_take(&dev->notify, 2 * qp->index + 1))
        VN_STAT_INC(qp->st.tx.doorbells);
    if (qp->index == 0 && VN_HAS(dev->features, VN_F_CTRL_VQ) &&
        vn_notify_page_take(&dev->notify, 2 * vn_dev_driver_pairs(dev, dev->features))) {
        atomic_store(&dev->ctrl_kicked, true);
        eventfd_write(dev->cmd_fd, 1);
    }
}

static void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Bounded busy-poll: look for work for up to busy_poll_ns without asking
 * for doorbells. True when something turned up (or a request came). */
static bool busy_poll(struct vn_qp *qp, bool tx_ok, bool rx_vq_ok, bool rx_starved, bool read_tap)
{
    uint64_t end = now_ns() + qp->dev->busy_poll_ns;
    struct pollfd pfd[2] = {
        { .fd = qp->kick_fd, .events = POLLIN },
        { .fd = read_tap ? qp->tap_fd : -1, .events = POLLIN },
    };
    do {
        if (atomic_load_explicit(&qp->req, memory_order_relaxed) != VN_QP_RUN)
            return true;
        if (tx_ok && vn_vq_avail_count(&qp->tx) > 0)
            return true;
        if (rx_vq_ok && rx_starved && vn_vq_avail_count(&qp->rx) > 0)
            return true;
        /* Frames steered to us (they kick us) or waiting in the TAP. The
         * kick is consumed here: left set it would end every later spin at
         * once, and the worker would never sleep. */
        if (poll(pfd, 2, 0) > 0) {
            if (pfd[0].revents & POLLIN) {
                eventfd_t v;
                eventfd_read(qp->kick_fd, &v);
            }
            return true;
        }
        cpu_relax();
    } while (now_ns() < end);
    return false;
}

/* Frames steered before a switch hold back every pair's TAP reads until
 * they are placed. A pair whose driver stopped refilling its receive ring
 * would hold the others for ever: past VN_STEER_OLD_MAX_NS its own worker
 * (the only one that may pop its inbox) drops them, counted steer_backlog. */
static void drop_stale_inbox(struct vn_qp *qp)
{
    struct vn_dev *dev = qp->dev;
    if (atomic_load(&dev->old_inflight) <= 0 || now_ns() < dev->old_deadline_ns)
        return;
    vn_inbox_drain(dev, qp, VN_DROP_STEER_BACKLOG);
}

void *vn_qp_worker(void *arg)
{
    struct vn_qp *qp = arg;
    struct vn_dev *dev = qp->dev;
    bool rx_starved = false;
    /* "vn-qp3" is pair 3 of a device, as top -H, perf and /proc show it (a
     * daemon with isolate = false serves several devices in one process:
     * their workers share the names). */
    char name[16];
    snprintf(name, sizeof(name), "vn-qp%u", qp->index);
    prctl(PR_SET_NAME, name, 0, 0, 0);

    for (;;) {
        if (!handle_requests(qp))
            break;
        drop_stale_inbox(qp);
        bool tx_ok = vn_vq_ready(&qp->tx);
        bool rx_vq_ok = vn_vq_ready(&qp->rx);
        bool rx_ok = qp->tap_fd >= 0;
        bool work = false;
        if (tx_ok)
            work |= transmit(qp);
        if (rx_ok)
            work |= process_rx(qp, &rx_starved);
        uint64_t coal_wait_ns = coal_flush_due(qp);
        if (work)
            continue;

        if (dev->notify.map != NULL) {
            /* Polling mode: doorbells stay off and nothing sleeps. */
            if (tx_ok)
                vn_vq_disable_notify(&qp->tx);
            if (rx_vq_ok)
                vn_vq_disable_notify(&qp->rx);
            poll_doorbells(qp);
            eventfd_t v;
            eventfd_read(qp->kick_fd, &v);
            rx_starved = false;
            cpu_relax();
            continue;
        }
        bool hold = vn_dev_steering_hold(dev);
        bool read_tap = tap_readable(qp) && (!rx_starved || rx_read_starved(dev)) && !hold;
        if (dev->busy_poll_ns != 0 && qp->last_sleep_ns < dev->busy_poll_ns &&
            busy_poll(qp, tx_ok, rx_vq_ok, rx_starved, read_tap)) {
            rx_starved = false;
            continue;
        }

        /* Idle: ask for doorbells, then re-check before sleeping so a buffer
         * made available in between is not missed. */
        bool again = false;
        if (tx_ok)
            again |= vn_vq_enable_notify(&qp->tx);
        if (rx_vq_ok && rx_starved)
            again |= vn_vq_enable_notify(&qp->rx);
        if (again) {
            if (tx_ok)
                vn_vq_disable_notify(&qp->tx);
            if (rx_vq_ok)
                vn_vq_disable_notify(&qp->rx);
            rx_starved = false;
            continue;
        }
        /* The TAP is only worth waking for while we may read it; while a
         * switch waits for the guest to drain its rings nothing signals us,
         * so look again every millisecond. */
        hold = vn_dev_steering_hold(dev);
        read_tap = tap_readable(qp) && (!rx_starved || rx_read_starved(dev)) && !hold;
        /* fd -1, not events 0: a deleted TAP reports POLLERR whatever we ask. */
        struct pollfd pfd[2] = {
            { .fd = qp->kick_fd, .events = POLLIN },
            { .fd = read_tap ? qp->tap_fd : -1, .events = POLLIN },
        };
        uint64_t wait_ns = UINT64_MAX;
        if (hold) {
            /* Waiting for the guest to drain its rings: look again every
             * millisecond; for old frames to be placed: until the deadline
             * (drop_stale_inbox), or their placing wakes us first. */
            uint64_t now = now_ns();
            wait_ns = 1000000u;
            if (atomic_load(&dev->old_inflight) > 0 && dev->old_deadline_ns > now + wait_ns)
                wait_ns = dev->old_deadline_ns - now;
        }
        if (coal_wait_ns < wait_ns)
            wait_ns = coal_wait_ns;
        struct timespec ts = { (time_t)(wait_ns / 1000000000u), (long)(wait_ns % 1000000000u) };
        uint64_t slept = now_ns();
        atomic_store_explicit(&qp->sleep_reads_tap, read_tap, memory_order_relaxed);
        atomic_store(&qp->sleeping, dev->tx_inline);
        int r = ppoll(pfd, 2, wait_ns == UINT64_MAX ? NULL : &ts, NULL);
        if (dev->tx_inline)
            tx_ring_back(qp);
        qp->last_sleep_ns = now_ns() - slept;
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
        if (rx_vq_ok)
            vn_vq_disable_notify(&qp->rx);
    }
    return NULL;
}
