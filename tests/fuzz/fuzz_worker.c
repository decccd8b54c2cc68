/* libFuzzer target: the queue pair worker's receive path (mergeable
 * buffers, num_buffers, hash reports, steering between pairs, the bounce
 * path) and transmit path (worker.c) against hostile rings.
 *
 * worker.c is included here so its static process_rx()/process_tx() run on
 * this thread, deterministically, with readv()/writev()/read() on the TAP
 * replaced by an emulation (frames from the input; what the device hands
 * over is checked to lie in guest memory). No worker thread is started.
 *
 * Input:
 *   u8 features  bit 0 MRG_RXBUF, 1 EVENT_IDX, 2 INDIRECT_DESC, 3 HASH_REPORT,
 *                4 GUEST_CSUM, 5 GUEST_TSO4, 6 MQ + RSS with 2 pairs,
 *                7 link down
 *   u8 options   bit 0 rx filter on (not promiscuous), 1 allmulti, 2 one
 *                unicast table entry, 3 policy rx-follows-tx (else RSS with
 *                2 pairs), bits 4-6 MTU (68 128 256 576 1000 1500 2000
 *                9000), 7 pair 1 left unconfigured
 *   u8 log2 of the ring size (% 6: 1..32)
 *   u8 rounds    bits 0-1 rounds - 1; bit 2 interrupt coalescing on; bit 3
 *                packet capture on (frames copied from guest memory to a
 *                socket: a copy the kernel refuses with EFAULT is counted as
 *                missed, and none may be); bit 4 TAP writes fail with EIO,
 *                bit 5 with EBADFD (the interface was deleted); bit 6 the
 *                transmit ring is served as an inline doorbell would serve it
 *                (vn_qp_tx_inline: the context thread, the worker asleep,
 *                then the replies read in the same pass), the worker's own
 *                pass only for what it leaves
 *   le16 n, then n bytes of guest image (fuzz_common.h); queue k (rx0, tx0,
 *        rx1, tx1) has its descriptor table at A + 0x400 k, its available
 *        ring right after it, and its used ring at B + 0x1000 + 0x200 k
 *   frames from the host, to the end: le16 length, then the frame with its
 *        virtio-net header (at most 32); a length of 0xffff is a read that
 *        fails with EBADFD instead, 0xfffe one that fails with EIO */
#include <errno.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "device.h"
#include "fuzz_common.h"
#include "le.h"
#include "net_hdr.h"

static ssize_t fz_tap_readv(int fd, const struct iovec *iov, int n);
static ssize_t fz_tap_writev(int fd, const struct iovec *iov, int n);
static ssize_t fz_tap_read(int fd, void *buf, size_t len);
static int fz_vq_pop(struct vn_vq *vq, struct iovec *iov, unsigned iov_max, struct vn_chain *c,
                     int *err_reason);
#define readv fz_tap_readv
#define writev fz_tap_writev
#define read fz_tap_read
#define vn_vq_pop fz_vq_pop
#include "worker.c"
#include "worker.h"
#undef readv
#undef writev
#undef read
#undef vn_vq_pop

#define TAP_FD 1000 /* never a real descriptor: the calls above take it */
#define MAX_FRAMES 32

static struct {
    const uint8_t *frame[MAX_FRAMES];
    size_t len[MAX_FRAMES];
    int err[MAX_FRAMES];
    unsigned n, next;
    uint32_t hdr_len;
    int write_err;
} tap;

/* The next read fails (and is consumed) if the input says so. */
static bool read_fails(void)
{
    if (tap.err[tap.next] == 0)
        return false;
    errno = tap.err[tap.next++];
    return true;
}

static size_t take_frame(void *dst, size_t room)
{
    const uint8_t *f = tap.frame[tap.next];
    size_t len = tap.len[tap.next++];
    size_t n = len < room ? len : room;
    memcpy(dst, f, n);
    return n;
}

static ssize_t fz_tap_readv(int fd, const struct iovec *iov, int n)
{
    FZ_CHECK(fd == TAP_FD && n >= 1 && n <= 1024, "readv fd %d niov %d", fd, n);
    size_t room = 0;
    for (int i = 0; i < n; i++) {
        FZ_CHECK(iov[i].iov_len == 0 ||
                     fd_host_range_in_guest(fz_guest(), iov[i].iov_base, iov[i].iov_len, true),
                 "rx iov[%d] %p+%zu is not writable guest memory", i, iov[i].iov_base,
                 iov[i].iov_len);
        room += iov[i].iov_len;
    }
    if (tap.next == tap.n) {
        errno = EAGAIN;
        return -1;
    }
    if (room < tap.hdr_len) {
        errno = EINVAL; /* as a TAP with IFF_VNET_HDR */
        return -1;
    }
    if (read_fails())
        return -1;
    /* Truncated to the room given, as a datagram is. */
    const uint8_t *f = tap.frame[tap.next];
    size_t left = tap.len[tap.next++], done = 0;
    for (int i = 0; i < n && left > 0; i++) {
        size_t k = iov[i].iov_len < left ? iov[i].iov_len : left;
        memcpy(iov[i].iov_base, f + done, k);
        done += k;
        left -= k;
    }
    return (ssize_t)done;
}

static ssize_t fz_tap_read(int fd, void *buf, size_t len)
{
    FZ_CHECK(fd == TAP_FD, "read fd %d", fd);
    if (tap.next == tap.n) {
        errno = EAGAIN;
        return -1;
    }
    if (read_fails())
        return -1;
    return (ssize_t)take_frame(buf, len);
}

static ssize_t fz_tap_writev(int fd, const struct iovec *iov, int n)
{
    FZ_CHECK(fd == TAP_FD && n >= 1 && n <= 1024, "writev fd %d niov %d", fd, n);
    fz_check_iov(iov, (unsigned)n, (unsigned)n);
    size_t total = 0;
    for (int i = 0; i < n; i++)
        total += iov[i].iov_len;
    FZ_CHECK(total >= tap.hdr_len + 14 && total <= tap.hdr_len + VN_MAX_FRAME,
             "tx frame of %zu bytes", total);
    if (tap.write_err != 0) {
        errno = tap.write_err;
        return -1;
    }
    return (ssize_t)total;
}

static struct vn_dev *cur_dev;
/* Receive chains really longer than VN_RX_IOV_MAX, per pair. */
static uint64_t too_long[VN_MAX_QUEUE_PAIRS];

/* vn_vq_pop() for worker.c. When a receive chain is refused as too long for
 * the iovecs left, it is popped again into a whole VN_RX_IOV_MAX array
 * (counters restored) to learn whether it is within the device's limits.
 * Only those that are not may end up counted against the guest (see
 * check_rx_state): for the others the worker must make room or take them
 * later, or a valid guest loses buffers with an "rx error". */
static int fz_vq_pop(struct vn_vq *vq, struct iovec *iov, unsigned iov_max, struct vn_chain *c,
                     int *err_reason)
{
    int r = vn_vq_pop(vq, iov, iov_max, c, err_reason);
    if (r != VN_POP_BAD || *err_reason != VN_ERR_CHAIN_TOO_LONG || iov_max >= VN_RX_IOV_MAX)
        return r;
    struct vn_qp *qp = NULL;
    for (unsigned i = 0; i < cur_dev->max_qps; i++)
        if (vq == &cur_dev->qp[i].rx)
            qp = &cur_dev->qp[i];
    if (qp == NULL)
        return r;
    uint64_t saved[VN_ERR__COUNT];
    memcpy(saved, vq->st->errors, sizeof(saved));
    static struct iovec whole[VN_RX_IOV_MAX];
    struct vn_chain c2;
    int e2;
    vn_vq_unpop(vq, 1);
    int r2 = vn_vq_pop(vq, whole, VN_RX_IOV_MAX, &c2, &e2);
    bool fits = !(r2 == VN_POP_BAD && e2 == VN_ERR_CHAIN_TOO_LONG);
    vn_vq_unpop(vq, 1);
    int r3 = vn_vq_pop(vq, iov, iov_max, c, err_reason);
    FZ_CHECK(r3 == r && *err_reason == VN_ERR_CHAIN_TOO_LONG, "pop again: %d", r3);
    memcpy(vq->st->errors, saved, sizeof(saved));
    if (!fits)
        too_long[qp->index]++;
    return r;
}

/* What tells whether the worker moved since the last look. */
struct progress {
    uint16_t last_avail, used_idx;
    unsigned rx_count, inbox, frames;
};

static struct progress progress_of(const struct vn_qp *qp)
{
    struct progress p = { qp->rx.last_avail, qp->rx.used_idx, qp->rx_count, qp->inbox.count,
                          tap.next };
    return p;
}

static void check_rx_state(struct vn_qp *qp)
{
    FZ_CHECK(qp->rx_first + qp->rx_count <= VN_RX_BUF_MAX && qp->rx_iov_end <= VN_RX_IOV_MAX,
             "rx_first %u rx_count %u rx_iov_end %u", qp->rx_first, qp->rx_count, qp->rx_iov_end);
    uint64_t bytes = 0;
    for (unsigned i = 0; i < qp->rx_count; i++) {
        const struct vn_rx_buf *b = &qp->rx_buf[qp->rx_first + i];
        FZ_CHECK(b->head < qp->rx.size, "prefetched head %u", b->head);
        if (b->bad) {
            FZ_CHECK(b->niov == 0 && b->len == 0, "bad buffer with %u iovs", b->niov);
            continue;
        }
        FZ_CHECK(b->iov_start + b->niov <= qp->rx_iov_end, "buffer iovs %u+%u past %u",
                 b->iov_start, b->niov, qp->rx_iov_end);
        FZ_CHECK(b->len >= qp->dev->hdr_len, "buffer of %u bytes", b->len);
        fz_check_iov(&qp->rx_iov[b->iov_start], b->niov, 0);
        bytes += b->len;
    }
    FZ_CHECK(bytes == qp->rx_prefetched_bytes, "prefetched %llu, buffers hold %llu",
             (unsigned long long)qp->rx_prefetched_bytes, (unsigned long long)bytes);
    FZ_CHECK(qp->inbox.count <= VN_INBOX_MAX, "inbox %u", qp->inbox.count);
    uint64_t held = 0;
    for (const struct vn_pkt *p = qp->inbox.head; p != NULL; p = p->next)
        held += sizeof(*p) + p->len;
    FZ_CHECK(held == qp->inbox.bytes && held <= VN_INBOX_MAX_BYTES,
             "inbox holds %llu bytes, counted %zu", (unsigned long long)held, qp->inbox.bytes);
    /* Frames for a pair without receive ring are dropped, never held. */
    FZ_CHECK(qp->inbox.count == 0 || atomic_load(&qp->rx_ready),
             "pair %u without receive ring holds %u frames", qp->index, qp->inbox.count);
    FZ_CHECK(qp->st.rx.errors[VN_ERR_CHAIN_TOO_LONG] <= too_long[qp->index],
             "%llu rx chains counted as too long, %llu are: a chain within the limits was "
             "refused for want of iovecs the worker had used before (rx_first %u, rx_count %u, "
             "rx_iov_end %u)",
             (unsigned long long)qp->st.rx.errors[VN_ERR_CHAIN_TOO_LONG],
             (unsigned long long)too_long[qp->index], qp->rx_first, qp->rx_count, qp->rx_iov_end);
}

static const uint32_t mtus[8] = { 68, 128, 256, 576, 1000, 1500, 2000, 9000 };

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fz_in in = { data, size };
    uint8_t fb = fz_u8(&in), opt = fz_u8(&in);
    uint16_t qsize = (uint16_t)(1u << (fz_u8(&in) % 6));
    uint8_t rb = fz_u8(&in);
    unsigned rounds = 1u + (rb & 3);
    bool coal = rb & 4, capture = rb & 8, inline_tx = rb & 0x40;
    size_t image_len;
    const uint8_t *image = fz_bytes(&in, fz_u16(&in), &image_len);
    memset(&tap, 0, sizeof(tap));
    tap.write_err = (rb & 0x20) ? EBADFD : (rb & 0x10) ? EIO : 0;
    while (in.n > 0 && tap.n < MAX_FRAMES) {
        uint16_t want = fz_u16(&in);
        if (want >= 0xfffe) {
            tap.err[tap.n++] = want == 0xffff ? EBADFD : EIO;
            continue;
        }
        size_t len;
        const uint8_t *f = fz_bytes(&in, want, &len);
        tap.frame[tap.n] = f;
        tap.len[tap.n++] = len;
    }

    bool mq = fb & 0x40;
    unsigned pairs = mq ? 2 : 1;
    struct vn_dev *dev = fz_dev_new(pairs, mtus[(opt >> 4) & 7]);
    cur_dev = dev;
    memset(too_long, 0, sizeof(too_long));
    fz_guest_load(&dev->mem, image, image_len);
    for (unsigned k = 0; k < 2 * pairs; k++) {
        if (k >= 2 && (opt & 0x80))
            break;
        uint64_t desc = FZ_GPA_A + 0x400 * k;
        FZ_CHECK(vn_dev_config_queue(dev, k, qsize, desc, desc + 16u * qsize,
                                     FZ_GPA_B + 0x1000 + 0x200 * k, (uint16_t)(k + 1)) == 0,
                 "config queue %u", k);
    }
    uint64_t features = 1ull << VN_F_VERSION_1;
    static const int bits[6] = { VN_F_MRG_RXBUF,  VN_F_RING_EVENT_IDX, VN_F_RING_INDIRECT_DESC,
                                 VN_F_HASH_REPORT, VN_F_GUEST_CSUM,     VN_F_GUEST_TSO4 };
    for (int i = 0; i < 6; i++)
        if (fb & (1u << i))
            features |= 1ull << bits[i];
    if (mq)
        features |= 1ull << VN_F_MQ | 1ull << VN_F_RSS;

    struct vn_rx_filter *flt = &dev->filter;
    flt->promisc = !(opt & 1);
    flt->allmulti = opt & 2;
    if (opt & 4) {
        static const uint8_t uc[6] = { 0x02, 0, 0, 0, 0, 0x01 };
        memcpy(flt->uc[0], uc, 6);
        flt->n_uc = 1;
    }
    struct vn_rss_config *rss = &dev->steer.rss;
    static const uint8_t key[VN_RSS_MAX_KEY_SIZE] = {
        0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3,
        0x8f, 0xb0, 0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3,
        0x80, 0x30, 0xf2, 0x0c, 0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
    };
    dev->steer.policy = (opt & 8) ? VN_POLICY_RX_FOLLOWS_TX : VN_POLICY_AUTO;
    if (mq || (fb & 8)) {
        /* What RSS_CONFIG (or HASH_CONFIG, for reports only) sets. */
        rss->configured = mq && !(opt & 8);
        rss->hash_types = VN_HASH_TYPES_SUPPORTED;
        rss->table_len = mq ? 2 : 1;
        rss->table[0] = 0;
        rss->table[1] = 1;
        rss->key_len = sizeof(key);
        memcpy(rss->key, key, sizeof(key));
    }
    if (!fz_dev_start(dev, features)) {
        fz_dev_free(dev);
        return 0;
    }
    dev->active_qps = pairs;
    vn_dev_set_link(dev, !(fb & 0x80));
    tap.hdr_len = dev->hdr_len;
    for (unsigned i = 0; i < pairs; i++) {
        struct vn_qp *qp = &dev->qp[i];
        qp->tap_fd = TAP_FD;
        if (coal) {
            struct vn_coal_params p = { 2, 1000000 };
            vn_coal_set(&qp->rx_coal, p);
            vn_coal_set(&qp->tx_coal, p);
        }
    }

    if (capture)
        FZ_CHECK(vn_capture_start(dev, -1, 1000) == 0, "capture");
    for (unsigned r = 0; r < rounds; r++) {
        for (unsigned i = 0; i < pairs; i++) {
            struct vn_qp *qp = &dev->qp[i];
            if (!vn_vq_ready(&qp->tx))
                continue;
            if (inline_tx) {
                /* A doorbell while the worker sleeps polling its TAP; what
                 * the inline pass does not finish, the woken worker does. */
                atomic_store(&qp->sleep_reads_tap, true);
                atomic_store(&qp->sleeping, true);
                bool done = vn_qp_tx_inline(qp);
                atomic_store(&qp->sleeping, false);
                check_rx_state(qp);
                if (done)
                    continue;
            }
            process_tx(qp, TX_BUDGET);
        }
        for (unsigned i = 0; i < pairs; i++) {
            struct vn_qp *qp = &dev->qp[i];
            bool starved;
            process_rx(qp, &starved);
            check_rx_state(qp);
            if (starved && vn_vq_ready(&qp->rx) && vn_vq_avail_count(&qp->rx) > 0) {
                /* The worker does not sleep while buffers are available
                 * (vn_vq_enable_notify() says so): it runs again at once,
                 * and that run must get somewhere. */
                struct progress before = progress_of(qp);
                process_rx(qp, &starved);
                check_rx_state(qp);
                struct progress after = progress_of(qp);
                FZ_CHECK(!starved || !vn_vq_ready(&qp->rx) || vn_vq_avail_count(&qp->rx) == 0 ||
                             memcmp(&before, &after, sizeof(before)) != 0,
                         "pair %u spins: starved with %u buffers available, nothing moves "
                         "(rx_count %u, rx_iov_end %u, inbox %u)",
                         i, vn_vq_avail_count(&qp->rx), qp->rx_count, qp->rx_iov_end,
                         qp->inbox.count);
            }
            (void)coal_flush_due(qp);
        }
    }
    if (getenv("FZ_VERBOSE") != NULL) {
        for (unsigned i = 0; i < pairs; i++) {
            const struct vn_qp_stats *st = &dev->qp[i].st;
            fprintf(stderr, "pair %u: rx %llu pkts %llu bytes, tx %llu pkts; rx drops", i,
                    (unsigned long long)st->rx.packets, (unsigned long long)st->rx.bytes,
                    (unsigned long long)st->tx.packets);
            for (int d = 0; d < VN_DROP__COUNT; d++)
                if (st->rx.drops[d] + st->tx.drops[d])
                    fprintf(stderr, " %s %llu/%llu", vn_drop_reason_name(d),
                            (unsigned long long)st->rx.drops[d], (unsigned long long)st->tx.drops[d]);
            fprintf(stderr, "; errors");
            for (int e = 0; e < VN_ERR__COUNT; e++)
                if (st->rx.errors[e] + st->tx.errors[e])
                    fprintf(stderr, " %s %llu/%llu", vn_error_reason_name(e),
                            (unsigned long long)st->rx.errors[e], (unsigned long long)st->tx.errors[e]);
            fprintf(stderr, "\n");
        }
    }
    if (capture) {
        uint64_t captured, missed, packets = 0;
        vn_capture_counts(dev, &captured, &missed);
        for (unsigned i = 0; i < pairs; i++)
            packets += dev->qp[i].st.rx.packets + dev->qp[i].st.tx.packets;
        FZ_CHECK(missed == 0 && captured == packets, "captured %llu, missed %llu, packets %llu",
                 (unsigned long long)captured, (unsigned long long)missed,
                 (unsigned long long)packets);
    }
    /* What a pause does: prefetched buffers go back to the ring. */
    for (unsigned i = 0; i < pairs; i++) {
        struct vn_qp *qp = &dev->qp[i];
        uint16_t before = qp->rx.last_avail;
        unsigned n = qp->rx_count;
        rx_unprefetch(qp);
        if (vn_vq_ready(&qp->rx))
            FZ_CHECK(qp->rx.last_avail == (uint16_t)(before - n), "unprefetch of %u", n);
        check_rx_state(qp);
    }
    fz_dev_free(dev);
    return 0;
}
