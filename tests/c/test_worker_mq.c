/* Multiqueue receive through real worker threads (worker.c, device.c): one
 * AF_UNIX datagram socket pair per queue pair stands in for its TAP queue,
 * the synthetic driver posts mergeable rx buffers on every pair's ring and
 * reads frames back (num_buffers, hash reports).
 *
 * Covered: a frame read by one pair and steered to another is delivered on
 * the target's ring and counted as steered_out by the reader; hash reports in
 * both paths; frames waiting for a pair the driver disables (VQ_PAIRS_SET)
 * are dropped and counted, never placed there; and the rule that no flow
 * overtakes itself on a steering switch: frames steered under the old rule
 * are published before any under the new rule, and the new ones are held
 * until the driver's used_event shows it consumed the old ones, or 200 ms
 * passed (then counted as a drain timeout). A pair without receive buffers
 * does not hold up the other pairs' frames on its TAP queue; frames for a
 * broken ring are dropped (queue_broken). Every test checks that each frame
 * sent was delivered or counted as dropped. */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "ctrl.h"
#include "device.h"
#include "fake_driver.h"
#include "le.h"
#include "net_hdr.h"

#define F(bit) (1ull << (bit))
#define MAXP 4
#define QSIZE 256
#define BUFLEN 512
#define TIMEOUT_MS 10000
#define BUF_REGION_GPA 0x1000000ull
#define BUF_REGION_LEN (MAXP * QSIZE * BUFLEN)
#define MAX_FRAME_BYTES 2048

static const uint8_t MAC[6] = { 0x52, 0x54, 0x00, 0x00, 0x00, 0x01 };
static const uint8_t PEER[6] = { 0x52, 0x54, 0x00, 0x00, 0x00, 0x09 };
static const uint8_t KEY[40] = {
    0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3,
    0x8f, 0xb0, 0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3,
    0x80, 0x30, 0xf2, 0x0c, 0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
};

static const uint64_t BASE_FEATURES = F(VN_F_VERSION_1) | F(VN_F_CTRL_VQ) | F(VN_F_MQ) |
                                      F(VN_F_RSS) | F(VN_F_MRG_RXBUF) | F(VN_F_RING_EVENT_IDX);

struct mq {
    struct vn_dev *dev;
    struct fd_guest g;
    unsigned pairs;
    bool event_idx;
    uint32_t hdr;                     /* virtio-net header length in use */
    struct fd_vq rxq[MAXP];
    uint64_t buf[MAXP][QSIZE];        /* the buffer of descriptor i */
    uint16_t free_ids[MAXP][QSIZE];   /* descriptors not posted */
    unsigned n_free[MAXP];
    int sock[MAXP][2];                /* [0]: the pair's "TAP", [1]: the host side */
    size_t fixed_size;                /* frame size for every seq, or 0: frame_size() */
    uint64_t sent;
    uint64_t delivered;
};

static void quiet_log(void *py, int level, const char *msg)
{
    (void)py;
    (void)level;
    (void)msg;
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void sleep_ms(unsigned ms)
{
    struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000 };
    nanosleep(&ts, NULL);
}

#define WAIT_FOR(cond)                                                         \
    do {                                                                       \
        uint64_t end_ = now_ms() + TIMEOUT_MS;                                 \
        while (!(cond)) {                                                      \
            if (now_ms() > end_)                                               \
                fail_msg("timeout waiting for %s", #cond);                     \
            usleep(500);                                                       \
        }                                                                      \
    } while (0)

/* A device with `pairs` queue pairs, the first `configured` rx rings set up
 * by the driver (no buffers posted yet), no tx ring, not started. */
static struct mq *mq_new_partial(unsigned pairs, unsigned configured)
{
    struct mq *m = calloc(1, sizeof(*m));
    assert_non_null(m);
    m->pairs = pairs;
    m->dev = vn_dev_new(pairs, MAC, 1500);
    assert_non_null(m->dev);
    /* The drivers here hand nothing to a network stack after writing
     * used_event: no grace period (test_drain_grace covers it). */
    m->dev->drain_grace_ns = 0;
    struct vn_hooks h = { .log = quiet_log };
    vn_dev_set_hooks(m->dev, &h);
    m->dev->vfu = &fd_fake_vfu_ctx;
    fd_irq_reset();
    fd_guest_init(&m->g, &m->dev->mem);
    assert_int_equal(fd_guest_add(&m->g, BUF_REGION_GPA, BUF_REGION_LEN, true), 3);
    for (unsigned q = 0; q < pairs; q++) {
        fd_vq_init(&m->rxq[q], &m->g, 0, QSIZE);
        for (unsigned i = 0; i < QSIZE; i++) {
            m->buf[q][i] = fd_alloc(&m->g, 3, BUFLEN, 64);
            m->free_ids[q][i] = (uint16_t)i;
        }
        m->n_free[q] = QSIZE;
        assert_int_equal(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0,
                                    m->sock[q]),
                         0);
        int sz = 1 << 20;
        setsockopt(m->sock[q][0], SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
        setsockopt(m->sock[q][1], SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
        vn_dev_set_tap(m->dev, q, m->sock[q][0]);
        if (q < configured)
            assert_int_equal(vn_dev_config_queue(m->dev, 2 * q, QSIZE, m->rxq[q].desc,
                                                 m->rxq[q].avail, m->rxq[q].used,
                                                 (uint16_t)(1 + q)),
                             0);
    }
    vn_dev_set_config_vector(m->dev, 0);
    return m;
}

static struct mq *mq_new(unsigned pairs)
{
    return mq_new_partial(pairs, pairs);
}

static void mq_start(struct mq *m, uint64_t features)
{
    m->event_idx = VN_HAS(features, VN_F_RING_EVENT_IDX);
    assert_int_equal(vn_dev_start(m->dev, features), 0);
    m->hdr = m->dev->hdr_len;
}

static void mq_free(struct mq *m)
{
    vn_dev_reset(m->dev); /* joins the workers before guest memory goes */
    fd_guest_destroy(&m->g);
    m->dev->vfu = NULL;
    vn_dev_free(m->dev);
    for (unsigned q = 0; q < m->pairs; q++) {
        close(m->sock[q][0]);
        close(m->sock[q][1]);
    }
    free(m);
}

static int teardown(void **state)
{
    if (*state != NULL)
        mq_free(*state);
    return 0;
}

/* ---- driver side ------------------------------------------------------------ */

/* Make n more buffers available on ring q (kicking when the device asks). */
static void post(struct mq *m, unsigned q, unsigned n)
{
    struct fd_vq *vq = &m->rxq[q];
    uint16_t old = vq->avail_idx;
    assert_true(n <= m->n_free[q]);
    for (unsigned i = 0; i < n; i++) {
        uint16_t id = m->free_ids[q][--m->n_free[q]];
        fd_vq_desc(vq, id, m->buf[q][id], BUFLEN, VRING_DESC_F_WRITE, 0);
        fd_vq_make_avail(vq, id);
    }
    if (n > 0 && m->dev->started && fd_vq_kick_needed(vq, m->event_idx, old))
        vn_dev_doorbell(m->dev, 2 * q);
}

struct rx_frame {
    unsigned ring;
    uint16_t nbufs;
    uint32_t len;
    uint8_t data[MAX_FRAME_BYTES];
};

/* The next frame published on ring q (all its buffers), or false. The
 * buffers go back to the free list (not reposted). */
static bool get_frame(struct mq *m, unsigned q, struct rx_frame *f)
{
    struct fd_vq *vq = &m->rxq[q];
    uint32_t id, len;
    if (!fd_vq_get_used(vq, &id, &len))
        return false;
    assert_true(id < QSIZE);
    assert_true(len >= m->hdr && len <= BUFLEN);
    fd_read(&m->g, m->buf[q][id], f->data, len);
    m->free_ids[q][m->n_free[q]++] = (uint16_t)id;
    f->ring = q;
    f->len = len;
    f->nbufs = vn_le16_get(f->data + VN_NET_HDR_NUM_BUFFERS_OFF);
    assert_true(f->nbufs >= 1);
    for (unsigned k = 1; k < f->nbufs; k++) {
        /* The rest of a frame is published with its first buffer. */
        if (!fd_vq_get_used(vq, &id, &len))
            fail_msg("ring %u: frame of %u buffers published without buffer %u", q, f->nbufs, k);
        assert_true(id < QSIZE && len <= BUFLEN && f->len + len <= MAX_FRAME_BYTES);
        fd_read(&m->g, m->buf[q][id], f->data + f->len, len);
        m->free_ids[q][m->n_free[q]++] = (uint16_t)id;
        f->len += len;
    }
    m->delivered++;
    return true;
}

/* Like Linux NAPI after a full drain: used_event = what was consumed. */
static void ack_ring(struct mq *m, unsigned q)
{
    fd_vq_set_used_event(&m->rxq[q], m->rxq[q].last_used);
}

/* ---- host side ---------------------------------------------------------------- */

#define PAYLOAD_OFF (14 + 20 + 8)

/* A UDP/IPv4 frame of flow `flow` carrying (flow, seq), with the virtio-net
 * header, as the TAP hands it over. */
static size_t build(const struct mq *m, uint8_t *out, uint32_t flow, uint32_t seq, size_t size)
{
    size_t hdr = m->hdr;
    assert_true(size >= PAYLOAD_OFF + 8 && hdr + size <= MAX_FRAME_BYTES);
    memset(out, 0, hdr + size);
    vn_le16_put(out + VN_NET_HDR_NUM_BUFFERS_OFF, 0xbeef); /* overwritten */
    uint8_t *f = out + hdr;
    memcpy(f, MAC, 6);
    memcpy(f + 6, PEER, 6);
    f[12] = 0x08;
    f[13] = 0x00;
    uint8_t *ip = f + 14;
    ip[0] = 0x45;
    ip[2] = (uint8_t)((size - 14) >> 8);
    ip[3] = (uint8_t)(size - 14);
    ip[8] = 64;
    ip[9] = 17;
    memcpy(ip + 12, (uint8_t[4]){ 10, 0, (uint8_t)(flow >> 8), (uint8_t)flow }, 4);
    memcpy(ip + 16, (uint8_t[4]){ 10, 1, 0, 1 }, 4);
    uint8_t *udp = ip + 20;
    udp[0] = (uint8_t)((1000 + flow) >> 8);
    udp[1] = (uint8_t)(1000 + flow);
    udp[2] = 0x07;
    udp[3] = 0xd0;
    vn_le32_put(f + PAYLOAD_OFF, flow);
    vn_le32_put(f + PAYLOAD_OFF + 4, seq);
    for (size_t i = PAYLOAD_OFF + 8; i < size; i++)
        f[i] = (uint8_t)(seq + i);
    return hdr + size;
}

static size_t frame_size(const struct mq *m, uint32_t seq)
{
    /* From minimum-size frames to ones over three 512-byte buffers. */
    return m->fixed_size != 0 ? m->fixed_size : 60 + (seq * 97u) % 1380u;
}

/* Send one datagram into pair q's "TAP", waiting for room if need be. */
static bool try_send(struct mq *m, unsigned q, const uint8_t *buf, size_t len, int wait_ms)
{
    for (;;) {
        ssize_t n = send(m->sock[q][1], buf, len, 0);
        if (n == (ssize_t)len)
            return true;
        if (n >= 0 || (errno != EAGAIN && errno != EINTR))
            return false;
        struct pollfd p = { .fd = m->sock[q][1], .events = POLLOUT };
        if (poll(&p, 1, wait_ms) == 0)
            return false;
    }
}

static void host_send(struct mq *m, unsigned q, uint32_t flow, uint32_t seq)
{
    uint8_t buf[MAX_FRAME_BYTES];
    size_t len = build(m, buf, flow, seq, frame_size(m, seq));
    if (!try_send(m, q, buf, len, TIMEOUT_MS))
        fail_msg("cannot send into pair %u's TAP", q);
    m->sent++;
}

/* Check a delivered frame against what was sent; returns its (flow, seq). */
static void check_frame(const struct mq *m, const struct rx_frame *f, uint32_t *flow, uint32_t *seq)
{
    assert_true(f->len >= m->hdr + PAYLOAD_OFF + 8);
    const uint8_t *p = f->data + m->hdr;
    *flow = vn_le32_get(p + PAYLOAD_OFF);
    *seq = vn_le32_get(p + PAYLOAD_OFF + 4);
    uint8_t want[MAX_FRAME_BYTES];
    size_t len = build(m, want, *flow, *seq, frame_size(m, *seq));
    if (f->len != len)
        fail_msg("ring %u flow %u seq %u: %u bytes, sent %zu", f->ring, *flow, *seq, f->len, len);
    assert_memory_equal(f->data + m->hdr, want + m->hdr, len - m->hdr);
    uint16_t want_bufs = (uint16_t)((len + BUFLEN - 1) / BUFLEN);
    assert_int_equal(f->nbufs, want_bufs);
}

/* ---- device state ------------------------------------------------------------- */

static struct vn_qp_stats qstats(struct mq *m, unsigned q)
{
    struct vn_qp_stats s;
    vn_dev_get_qp_stats(m->dev, q, &s);
    return s;
}

static uint64_t total_drops(struct mq *m)
{
    uint64_t n = 0;
    for (unsigned q = 0; q < m->pairs; q++) {
        struct vn_qp_stats s = qstats(m, q);
        for (int r = 0; r < VN_DROP__COUNT; r++)
            n += s.rx.drops[r];
    }
    return n;
}

static uint64_t total_placed(struct mq *m)
{
    uint64_t n = 0;
    for (unsigned q = 0; q < m->pairs; q++)
        n += qstats(m, q).rx.packets;
    return n;
}

static unsigned inbox_count(struct mq *m, unsigned q)
{
    pthread_mutex_lock(&m->dev->qp[q].inbox.lock);
    unsigned n = m->dev->qp[q].inbox.count;
    pthread_mutex_unlock(&m->dev->qp[q].inbox.lock);
    return n;
}

/* Bytes waiting in pair q's "TAP" (the next datagram's size; 0 if none). */
static int tap_pending(struct mq *m, unsigned q)
{
    int n = 0;
    assert_int_equal(ioctl(m->sock[q][0], FIONREAD, &n), 0);
    return n;
}

/* Every frame sent was placed in a ring or counted as dropped, and the
 * driver read every placed one. */
static void assert_accounted(struct mq *m, uint64_t drops_expected)
{
    WAIT_FOR(total_placed(m) + total_drops(m) == m->sent);
    assert_int_equal(total_drops(m), drops_expected);
    for (unsigned q = 0; q < m->pairs; q++)
        assert_int_equal(inbox_count(m, q), 0);
    assert_int_equal(total_placed(m), m->delivered);
}

/* RSS_CONFIG: a table of `len` entries, max_tx_vq pairs, all hash types. */
static uint8_t rss_config(struct mq *m, const uint16_t *table, unsigned len, uint16_t max_tx)
{
    uint8_t r[2 + 8 + 2 * VN_RSS_MAX_TABLE + 3 + 40];
    r[0] = VN_CTRL_MQ;
    r[1] = VN_CTRL_MQ_RSS_CONFIG;
    uint8_t *d = r + 2;
    vn_le32_put(d, VN_HASH_TYPES_SUPPORTED);
    vn_le16_put(d + 4, (uint16_t)(len - 1));
    vn_le16_put(d + 6, 0);
    size_t off = 8;
    for (unsigned i = 0; i < len; i++, off += 2)
        vn_le16_put(d + off, table[i]);
    vn_le16_put(d + off, max_tx);
    d[off + 2] = 40;
    memcpy(d + off + 3, KEY, 40);
    return vn_ctrl_handle(m->dev, r, (uint32_t)(2 + off + 3 + 40));
}

/* All flows to queue q. */
static uint8_t steer_all_to(struct mq *m, uint16_t q, uint16_t max_tx)
{
    uint16_t t[4] = { q, q, q, q };
    return rss_config(m, t, 4, max_tx);
}

static uint8_t pairs_set(struct mq *m, uint16_t pairs)
{
    uint8_t r[4] = { VN_CTRL_MQ, VN_CTRL_MQ_VQ_PAIRS_SET };
    vn_le16_put(r + 2, pairs);
    return vn_ctrl_handle(m->dev, r, 4);
}

/* Wait for n frames on ring q and check they are flow's seq first..first+n-1. */
static void expect_frames(struct mq *m, unsigned q, uint32_t flow, uint32_t first, unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        struct rx_frame f;
        uint64_t end = now_ms() + TIMEOUT_MS;
        while (!get_frame(m, q, &f)) {
            if (now_ms() > end)
                fail_msg("ring %u: timeout waiting for flow %u seq %u", q, flow, first + i);
            usleep(200);
        }
        uint32_t fl, seq;
        check_frame(m, &f, &fl, &seq);
        if (fl != flow || seq != first + i)
            fail_msg("ring %u: got flow %u seq %u, expected flow %u seq %u", q, fl, seq, flow,
                     first + i);
    }
}

static void expect_ring_empty(struct mq *m, unsigned q)
{
    assert_int_equal(fd_vq_used_idx(&m->rxq[q]), m->rxq[q].last_used);
}

/* ---- tests ---------------------------------------------------------------------- */

/* Frames read by pair 1 that RSS sends to queue 0 are delivered on rx queue 0,
 * counted as steered out by pair 1; and the other way round. */
static void test_steered_to_other_pair(void **state)
{
    struct mq *m = *state = mq_new(2);
    post(m, 0, QSIZE);
    post(m, 1, QSIZE);
    mq_start(m, BASE_FEATURES);
    assert_int_equal(steer_all_to(m, 0, 2), VN_CTRL_OK);
    assert_int_equal(m->dev->active_qps, 2);
    for (uint32_t i = 0; i < 40; i++)
        host_send(m, 1, 7, i);
    expect_frames(m, 0, 7, 0, 40);
    expect_ring_empty(m, 1);
    assert_int_equal(qstats(m, 1).rx.steered_out, 40);
    assert_int_equal(qstats(m, 0).rx.steered_out, 0);
    assert_int_equal(qstats(m, 0).rx.packets, 40);
    assert_int_equal(qstats(m, 1).rx.packets, 0);
    ack_ring(m, 0);

    assert_int_equal(steer_all_to(m, 1, 2), VN_CTRL_OK);
    for (uint32_t i = 0; i < 40; i++)
        host_send(m, 0, 8, i);
    expect_frames(m, 1, 8, 0, 40);
    expect_ring_empty(m, 0);
    assert_int_equal(qstats(m, 0).rx.steered_out, 40);
    assert_int_equal(qstats(m, 1).rx.packets, 40);
    /* Frames read by the pair they are steered to are not steered out. */
    for (uint32_t i = 40; i < 50; i++)
        host_send(m, 1, 8, i);
    expect_frames(m, 1, 8, 40, 10);
    assert_int_equal(qstats(m, 1).rx.steered_out, 40);
    assert_accounted(m, 0);
    for (unsigned q = 0; q < 2; q++) {
        struct vn_qp_stats st = qstats(m, q);
        fd_assert_no_errors(&st.rx);
    }
}

/* A mixed table: each flow lands where vn_steer_rx says, from whichever pair
 * read it, with its hash in the header (HASH_REPORT), in both the direct path
 * and the steered one. */
static void test_rss_spread_with_hash_reports(void **state)
{
    struct mq *m = *state = mq_new(4);
    for (unsigned q = 0; q < 4; q++)
        post(m, q, QSIZE);
    mq_start(m, BASE_FEATURES | F(VN_F_HASH_REPORT));
    assert_int_equal(m->hdr, VN_NET_HDR_HASH_LEN);
    const uint16_t table[8] = { 0, 1, 2, 3, 3, 2, 1, 0 };
    assert_int_equal(rss_config(m, table, 8, 4), VN_CTRL_OK);
    /* A private copy of the rule to predict the queue and hash. */
    struct vn_steering *ref = calloc(1, sizeof(*ref));
    assert_non_null(ref);
    ref->policy = VN_POLICY_RSS;
    vn_steering_reset(ref);
    ref->rss = m->dev->steer.rss;

    enum { FLOWS = 32, PER_FLOW = 6 };
    /* Flow numbers (in the source address and port) with many bits set. */
    uint32_t ids[FLOWS];
    for (uint32_t i = 0; i < FLOWS; i++)
        ids[i] = (i * 40503u + 17u) & 0xffff;
    unsigned want_q[FLOWS];
    uint32_t want_hash[FLOWS];
    unsigned per_ring[4] = { 0 };
    for (uint32_t fl = 0; fl < FLOWS; fl++) {
        uint8_t buf[MAX_FRAME_BYTES];
        size_t len = build(m, buf, ids[fl], 0, 100);
        uint8_t report;
        want_q[fl] = vn_steer_rx(ref, buf + m->hdr, len - m->hdr, 4, &want_hash[fl], &report);
        assert_int_equal(report, VN_HASH_REPORT_UDPV4);
        per_ring[want_q[fl]] += PER_FLOW;
    }
    for (unsigned q = 0; q < 4; q++)
        assert_true(per_ring[q] > 0);
    /* Each flow enters through pair (flow % 4). */
    for (uint32_t seq = 0; seq < PER_FLOW; seq++)
        for (uint32_t fl = 0; fl < FLOWS; fl++)
            host_send(m, fl % 4, ids[fl], seq);
    uint32_t next_seq[FLOWS] = { 0 };
    for (unsigned q = 0; q < 4; q++) {
        for (unsigned i = 0; i < per_ring[q]; i++) {
            struct rx_frame f;
            WAIT_FOR(get_frame(m, q, &f));
            uint32_t id, seq, fl = 0;
            check_frame(m, &f, &id, &seq);
            while (fl < FLOWS && ids[fl] != id)
                fl++;
            assert_true(fl < FLOWS);
            assert_int_equal(want_q[fl], q);
            assert_int_equal(seq, next_seq[fl]++);
            assert_int_equal(vn_le32_get(f.data + VN_NET_HDR_HASH_VALUE_OFF), want_hash[fl]);
            assert_int_equal(vn_le16_get(f.data + VN_NET_HDR_HASH_REPORT_OFF), VN_HASH_REPORT_UDPV4);
        }
        expect_ring_empty(m, q);
    }
    uint64_t steered = 0;
    for (unsigned q = 0; q < 4; q++)
        steered += qstats(m, q).rx.steered_out;
    unsigned want_steered = 0;
    for (uint32_t fl = 0; fl < FLOWS; fl++)
        want_steered += want_q[fl] != fl % 4 ? PER_FLOW : 0;
    assert_int_equal(steered, want_steered);
    assert_accounted(m, 0);
    free(ref);
}

/* Frames waiting for a pair the driver then disables are dropped (counted),
 * never placed there; later frames for its table entries wrap to the active
 * pairs, including those the disabled pair's own TAP queue still reads. */
static void test_disabled_pair(void **state)
{
    struct mq *m = *state = mq_new(4);
    post(m, 0, QSIZE);
    post(m, 1, QSIZE);
    post(m, 2, QSIZE);
    mq_start(m, BASE_FEATURES);
    assert_int_equal(steer_all_to(m, 3, 4), VN_CTRL_OK);
    /* Ring 3 has no buffers: the frames wait in its inbox. */
    for (uint32_t i = 0; i < 5; i++)
        host_send(m, 0, 1, i);
    WAIT_FOR(inbox_count(m, 3) == 5);
    assert_int_equal(qstats(m, 0).rx.steered_out, 5);
    assert_int_equal(pairs_set(m, 2), VN_CTRL_OK);
    assert_int_equal(m->dev->active_qps, 2);
    assert_int_equal(inbox_count(m, 3), 0);
    assert_int_equal(qstats(m, 3).rx.drops[VN_DROP_QUEUE_DISABLED], 5);
    /* Table entries 3 now mean pair 3 % 2 = 1; pair 3 still reads its
     * TAP queue (its ring, without buffers, is no reason to stop). */
    for (uint32_t i = 5; i < 15; i++)
        host_send(m, 0, 1, i);
    expect_frames(m, 1, 1, 5, 10);
    for (uint32_t i = 0; i < 10; i++)
        host_send(m, 3, 2, i);
    expect_frames(m, 1, 2, 0, 10);
    assert_int_equal(qstats(m, 3).rx.steered_out, 10);
    /* Buffers on the disabled ring and a doorbell: nothing lands there. */
    post(m, 3, QSIZE);
    vn_dev_doorbell(m->dev, 6);
    for (uint32_t i = 10; i < 20; i++)
        host_send(m, 3, 2, i);
    expect_frames(m, 1, 2, 10, 10);
    assert_int_equal(qstats(m, 3).rx.steered_out, 20);
    sleep_ms(20);
    assert_int_equal(fd_vq_used_idx(&m->rxq[3]), 0);
    assert_int_equal(qstats(m, 3).rx.packets, 0);
    expect_ring_empty(m, 0);
    expect_ring_empty(m, 2);
    assert_accounted(m, 5);
}

/* After a switch, frames of a flow that moved wait until the driver has
 * consumed what the old rule placed (used_event), then go to the new queue. */
static void test_switch_waits_for_driver(void **state)
{
    struct mq *m = *state = mq_new(2);
    post(m, 0, QSIZE);
    post(m, 1, QSIZE);
    mq_start(m, BASE_FEATURES);
    assert_int_equal(steer_all_to(m, 0, 2), VN_CTRL_OK);
    for (uint32_t i = 0; i < 8; i++)
        host_send(m, 1, 3, i);
    WAIT_FOR(fd_vq_used_idx(&m->rxq[0]) >= 8 && qstats(m, 0).rx.packets == 8);
    /* The driver has not consumed them (used_event still 0). */
    uint64_t t_switch = now_ms();
    struct vn_dev_stats ds0;
    vn_dev_get_dev_stats(m->dev, &ds0);
    assert_int_equal(steer_all_to(m, 1, 2), VN_CTRL_OK);
    for (uint32_t i = 8; i < 16; i++)
        host_send(m, 1, 3, i);
    sleep_ms(30);
    /* Held: nothing on the new queue, the frames not even read; unless the
     * 200 ms bound passed meanwhile (a stalled test thread). */
    int pending = tap_pending(m, 1);
    uint16_t on_new = fd_vq_used_idx(&m->rxq[1]);
    uint64_t t_obs = now_ms();
    if (t_obs - t_switch < 200) {
        if (on_new != 0)
            fail_msg("new frames published %llu ms after the switch, the old ones unconsumed",
                     (unsigned long long)(t_obs - t_switch));
        assert_true(pending > 0);
    }
    /* The driver consumes queue 0 and says so. */
    expect_frames(m, 0, 3, 0, 8);
    ack_ring(m, 0);
    uint64_t t_release = now_ms();
    expect_frames(m, 1, 3, 8, 8);
    struct vn_dev_stats ds;
    vn_dev_get_dev_stats(m->dev, &ds);
    if (t_release - t_switch < 200)
        assert_int_equal(ds.steering_drain_timeouts, ds0.steering_drain_timeouts);
    assert_int_equal(ds.steering_switches, ds0.steering_switches + 1);
    assert_false(atomic_load(&m->dev->drain_pending));
    assert_accounted(m, 0);
}

/* A driver that never consumes the old queue: the new frames go after 200 ms,
 * counted as a drain timeout. */
static void test_switch_drain_timeout(void **state)
{
    struct mq *m = *state = mq_new(2);
    post(m, 0, QSIZE);
    post(m, 1, QSIZE);
    mq_start(m, BASE_FEATURES);
    assert_int_equal(steer_all_to(m, 0, 2), VN_CTRL_OK);
    for (uint32_t i = 0; i < 4; i++)
        host_send(m, 1, 5, i);
    WAIT_FOR(qstats(m, 0).rx.packets == 4);
    uint64_t t_switch = now_ms();
    assert_int_equal(steer_all_to(m, 1, 2), VN_CTRL_OK);
    for (uint32_t i = 4; i < 8; i++)
        host_send(m, 1, 5, i);
    WAIT_FOR(fd_vq_used_idx(&m->rxq[1]) > 0);
    uint64_t waited = now_ms() - t_switch;
    if (waited < 200)
        fail_msg("new frames published after %llu ms, the old ones unconsumed",
                 (unsigned long long)waited);
    expect_frames(m, 1, 5, 4, 4);
    struct vn_dev_stats ds;
    vn_dev_get_dev_stats(m->dev, &ds);
    assert_int_equal(ds.steering_drain_timeouts, 1);
    /* The old frames are still there for the driver, in order. */
    expect_frames(m, 0, 5, 0, 4);
    assert_accounted(m, 0);
}

/* Two pairs, everything steered to pair 0 whose ring has room for two small
 * frames: of six, two are placed and four wait in pair 0's inbox; then a
 * switch to pair 1 and four more frames, which must wait behind those four. */
static struct mq *old_frames_held(void)
{
    struct mq *m = mq_new(2);
    m->fixed_size = 100;
    post(m, 0, 2);
    post(m, 1, QSIZE);
    mq_start(m, BASE_FEATURES);
    assert_int_equal(steer_all_to(m, 0, 2), VN_CTRL_OK);
    for (uint32_t i = 0; i < 6; i++)
        host_send(m, 1, 9, i);
    WAIT_FOR(qstats(m, 1).rx.steered_out == 6 && inbox_count(m, 0) == 4);
    WAIT_FOR(qstats(m, 0).rx.ring_full > 0);
    assert_int_equal(fd_vq_used_idx(&m->rxq[0]), 2);
    assert_int_equal(steer_all_to(m, 1, 2), VN_CTRL_OK);
    assert_int_equal(atomic_load(&m->dev->old_inflight), 4);
    for (uint32_t i = 6; i < 10; i++)
        host_send(m, 1, 9, i);
    return m;
}

/* A pair whose driver never gives room again must not hold back the others
 * for ever: past VN_STEER_OLD_MAX_NS its worker drops the old frames
 * (steer_backlog) and every pair reads the TAP again. */
static void test_switch_drops_old_frames_past_the_bound(void **state)
{
    struct mq *m = *state = old_frames_held();
    uint64_t t0 = now_ms();
    WAIT_FOR(fd_vq_used_idx(&m->rxq[1]) == 4);
    uint64_t waited = now_ms() - t0;
    if (waited < VN_STEER_OLD_MAX_NS / 1000000u - 50)
        fail_msg("new frames after %llu ms, before the bound", (unsigned long long)waited);
    assert_int_equal(inbox_count(m, 0), 0);
    assert_int_equal(qstats(m, 0).rx.drops[VN_DROP_STEER_BACKLOG], 4);
    assert_int_equal(atomic_load(&m->dev->old_inflight), 0);
    m->sent -= 4; /* dropped, and counted */
}

/* Frames steered under the old rule that could not be placed yet (their ring
 * had no room) are placed before any frame is read under the new rule, for
 * up to VN_STEER_OLD_MAX_NS: the TAP is not read meanwhile. */
static void test_switch_places_old_frames_first(void **state)
{
    struct mq *m = *state = old_frames_held();
    /* Well past the 200 ms bound, which does not apply to these. */
    sleep_ms(250);
    assert_int_equal(fd_vq_used_idx(&m->rxq[1]), 0);
    assert_true(tap_pending(m, 1) > 0);
    assert_int_equal(inbox_count(m, 0), 4);
    /* The driver reads the two, and gives room for the rest. */
    struct rx_frame f;
    uint32_t fl, seq;
    for (uint32_t i = 0; i < 2; i++) {
        assert_true(get_frame(m, 0, &f));
        check_frame(m, &f, &fl, &seq);
        assert_int_equal(seq, i);
    }
    ack_ring(m, 0);
    post(m, 0, 16);
    for (uint32_t i = 2; i < 6; i++) {
        WAIT_FOR(get_frame(m, 0, &f));
        check_frame(m, &f, &fl, &seq);
        assert_int_equal(seq, i);
    }
    assert_int_equal(atomic_load(&m->dev->old_inflight), 0);
    /* 200 ms have passed since the switch: the new frames need not wait
     * for used_event now. */
    for (uint32_t i = 6; i < 10; i++) {
        WAIT_FOR(get_frame(m, 1, &f));
        check_frame(m, &f, &fl, &seq);
        assert_int_equal(seq, i);
    }
    expect_ring_empty(m, 0);
    assert_accounted(m, 0);
}

/* Without EVENT_IDX the device cannot see what the driver consumed: only
 * the frames already steered are waited for. */
static void test_switch_without_event_idx(void **state)
{
    struct mq *m = *state = mq_new(2);
    post(m, 0, QSIZE);
    post(m, 1, QSIZE);
    mq_start(m, BASE_FEATURES & ~F(VN_F_RING_EVENT_IDX));
    assert_int_equal(steer_all_to(m, 0, 2), VN_CTRL_OK);
    for (uint32_t i = 0; i < 8; i++)
        host_send(m, 1, 4, i);
    WAIT_FOR(qstats(m, 0).rx.packets == 8);
    assert_int_equal(steer_all_to(m, 1, 2), VN_CTRL_OK);
    for (uint32_t i = 8; i < 16; i++)
        host_send(m, 1, 4, i);
    expect_frames(m, 1, 4, 8, 8);
    expect_frames(m, 0, 4, 0, 8);
    struct vn_dev_stats ds;
    vn_dev_get_dev_stats(m->dev, &ds);
    assert_int_equal(ds.steering_drain_timeouts, 0);
    assert_accounted(m, 0);
}

/* A target pair whose ring stays full: its inbox holds VN_INBOX_MAX frames,
 * the reader drops the rest and counts them (steer_backlog); the held ones
 * are placed in order once the driver gives room. */
static void test_inbox_backlog_full(void **state)
{
    struct mq *m = *state = mq_new(2);
    m->fixed_size = 80;
    post(m, 1, QSIZE);
    mq_start(m, BASE_FEATURES);
    assert_int_equal(steer_all_to(m, 0, 2), VN_CTRL_OK);
    const unsigned n = VN_INBOX_MAX + 40;
    for (uint32_t i = 0; i < n; i++)
        host_send(m, 1, 6, i);
    WAIT_FOR(qstats(m, 1).rx.steered_out + qstats(m, 1).rx.drops[VN_DROP_STEER_BACKLOG] == n);
    assert_int_equal(inbox_count(m, 0), VN_INBOX_MAX);
    assert_int_equal(qstats(m, 1).rx.drops[VN_DROP_STEER_BACKLOG], 40);
    assert_int_equal(qstats(m, 1).rx.steered_out, VN_INBOX_MAX);
    /* The driver keeps reposting: the first VN_INBOX_MAX, in order. */
    uint32_t next = 0;
    uint64_t end = now_ms() + TIMEOUT_MS;
    while (next < VN_INBOX_MAX) {
        post(m, 0, m->n_free[0]);
        struct rx_frame f;
        while (get_frame(m, 0, &f)) {
            uint32_t fl, seq;
            check_frame(m, &f, &fl, &seq);
            assert_int_equal(seq, next++);
        }
        ack_ring(m, 0);
        if (now_ms() > end)
            fail_msg("timeout: %u of %u frames read", next, VN_INBOX_MAX);
        usleep(200);
    }
    expect_ring_empty(m, 1);
    assert_accounted(m, 40);
}

/* Without mergeable buffers, a steered frame larger than the target's one
 * buffer is dropped there and counted; the buffer takes the next frame. */
static void test_inbox_frame_too_big(void **state)
{
    struct mq *m = *state = mq_new(2);
    post(m, 0, 4);
    post(m, 1, QSIZE);
    mq_start(m, BASE_FEATURES & ~F(VN_F_MRG_RXBUF));
    assert_int_equal(steer_all_to(m, 0, 2), VN_CTRL_OK);
    m->fixed_size = 1000;
    host_send(m, 1, 2, 0);
    WAIT_FOR(qstats(m, 0).rx.drops[VN_DROP_BUFFER_TOO_SMALL] == 1);
    m->fixed_size = 300;
    host_send(m, 1, 2, 1);
    expect_frames(m, 0, 2, 1, 1);
    assert_int_equal(qstats(m, 1).rx.steered_out, 2);
    assert_accounted(m, 1);
}

/* A malformed buffer at the head of the target's ring is returned with
 * length 0 (counted), and the steered frame goes in the next ones. */
static void test_inbox_skips_bad_buffer(void **state)
{
    struct mq *m = *state = mq_new(2);
    struct fd_vq *vq = &m->rxq[0];
    uint16_t bad = m->free_ids[0][--m->n_free[0]];
    fd_vq_desc(vq, bad, m->buf[0][bad], BUFLEN, 0 /* device-readable */, 0);
    fd_vq_make_avail(vq, bad);
    post(m, 0, 8);
    post(m, 1, QSIZE);
    mq_start(m, BASE_FEATURES);
    assert_int_equal(steer_all_to(m, 0, 2), VN_CTRL_OK);
    m->fixed_size = 700; /* two buffers */
    host_send(m, 1, 4, 0);
    WAIT_FOR(fd_vq_used_idx(vq) == 3);
    uint32_t id, len;
    assert_true(fd_vq_get_used(vq, &id, &len));
    assert_int_equal(id, bad);
    assert_int_equal(len, 0);
    m->free_ids[0][m->n_free[0]++] = (uint16_t)id;
    expect_frames(m, 0, 4, 0, 1);
    struct vn_qp_stats st = qstats(m, 0);
    fd_assert_errors(&st.rx, VN_ERR_DESC_ORDER, 1);
    assert_false(vn_dev_get_needs_reset(m->dev));
    assert_accounted(m, 0);
}

/* ---- the no-reordering rule under load --------------------------------------------- */

#define STREAM_PER_FLOW 2500
#define STREAM_MIN_SWITCHES 40

struct stream {
    struct mq *m;
    unsigned flows;                 /* one per pair, entering through it */
    _Atomic bool stop;
    _Atomic bool sender_done;
    _Atomic uint64_t sent;
    _Atomic unsigned switches;
    _Atomic int thread_error;       /* cmocka asserts only on the main thread */
};

/* Flow f enters through pair f % pairs; frames alternate between flows. */
static void *sender_main(void *arg)
{
    struct stream *s = arg;
    struct mq *m = s->m;
    uint8_t buf[MAX_FRAME_BYTES];
    /* At least STREAM_PER_FLOW frames per flow, and on until the switcher
     * did its minimum (a slow machine). */
    for (uint32_t seq = 0; (seq < STREAM_PER_FLOW || atomic_load(&s->switches) < STREAM_MIN_SWITCHES) &&
                           seq < 50 * STREAM_PER_FLOW && !atomic_load(&s->stop);
         seq++) {
        for (uint32_t fl = 0; fl < s->flows; fl++) {
            size_t len = build(m, buf, fl, seq, frame_size(m, seq));
            bool ok = false;
            while (!ok && !atomic_load(&s->stop))
                ok = try_send(m, fl % m->pairs, buf, len, 100);
            if (!ok)
                break;
            atomic_fetch_add(&s->sent, 1);
        }
        /* Bursts of 16 per flow, about a millisecond apart: long enough a
         * run for many switches. */
        if (seq % 16 == 15)
            usleep(1000);
    }
    atomic_store(&s->sender_done, true);
    return NULL;
}

/* The context thread: a new RSS table every few milliseconds, moving every
 * flow to the next queue. */
static void *switcher_main(void *arg)
{
    struct stream *s = arg;
    struct mq *m = s->m;
    for (unsigned i = 1; !atomic_load(&s->stop); i++) {
        sleep_ms(1 + i % 4);
        if (steer_all_to(m, (uint16_t)(i % m->pairs), (uint16_t)m->pairs) != VN_CTRL_OK) {
            atomic_store(&s->thread_error, 1);
            break;
        }
        atomic_fetch_add(&s->switches, 1);
    }
    return NULL;
}

/* While flows stream in (one per pair, each entering through its own pair's
 * TAP queue), the table moves them all to the next queue over and over.
 * The driver consumes like Linux NAPI, one queue at a time: it drains queue
 * 0 fully, then queue 1, ..., setting used_event after each full drain and
 * reposting the buffers. What the device guarantees then shows as: per flow,
 * sequence numbers strictly increasing in the order the driver reads them
 * (new-rule frames are published only once the driver consumed the old-rule
 * ones; the 200 ms bound can only matter for a stalled driver, and then
 * the weaker guarantee, order within each queue, is what is checked), and
 * every frame either delivered or counted as dropped. */
static void run_stream(struct mq *m)
{
    for (unsigned q = 0; q < m->pairs; q++)
        post(m, q, QSIZE);
    mq_start(m, BASE_FEATURES);
    assert_int_equal(steer_all_to(m, 0, (uint16_t)m->pairs), VN_CTRL_OK);

    const unsigned flows = m->pairs;
    struct stream s = { .m = m, .flows = flows };
    pthread_t sender, switcher;
    assert_int_equal(pthread_create(&sender, NULL, sender_main, &s), 0);
    assert_int_equal(pthread_create(&switcher, NULL, switcher_main, &s), 0);

    int64_t last_seq[MAXP], last_on_ring[MAXP][MAXP];
    uint64_t per_ring[MAXP] = { 0 };
    unsigned moves = 0, last_ring[MAXP];
    for (unsigned fl = 0; fl < flows; fl++) {
        last_seq[fl] = -1;
        last_ring[fl] = 0;
        for (unsigned q = 0; q < MAXP; q++)
            last_on_ring[fl][q] = -1;
    }
    unsigned out_of_order = 0;
    char first_bad[160] = "";
    uint64_t end = now_ms() + 4 * TIMEOUT_MS;
    for (;;) {
        bool any = false;
        for (unsigned q = 0; q < m->pairs; q++) {
            struct rx_frame f;
            unsigned n = 0;
            while (get_frame(m, q, &f)) {
                uint32_t fl, seq;
                check_frame(m, &f, &fl, &seq);
                assert_true(fl < flows);
                /* Within one queue, always in order. */
                if ((int64_t)seq <= last_on_ring[fl][q])
                    fail_msg("flow %u: seq %u after %lld on queue %u", fl, seq,
                             (long long)last_on_ring[fl][q], q);
                last_on_ring[fl][q] = seq;
                if ((int64_t)seq <= last_seq[fl] && out_of_order++ == 0)
                    snprintf(first_bad, sizeof(first_bad),
                             "flow %u: seq %u on queue %u read after seq %lld", fl, seq, q,
                             (long long)last_seq[fl]);
                if ((int64_t)seq > last_seq[fl])
                    last_seq[fl] = seq;
                if (q != last_ring[fl])
                    moves++;
                last_ring[fl] = q;
                per_ring[q]++;
                n++;
            }
            if (n > 0) {
                ack_ring(m, q); /* drained: used_event = consumed */
                post(m, q, m->n_free[q]);
                any = true;
            }
        }
        if (atomic_load(&s.sender_done)) {
            atomic_store(&s.stop, true);
            if (total_placed(m) + total_drops(m) == atomic_load(&s.sent) &&
                m->delivered == total_placed(m))
                break;
        }
        if (now_ms() > end) {
            atomic_store(&s.stop, true);
            pthread_join(sender, NULL);
            pthread_join(switcher, NULL);
            fail_msg("timeout: sent %llu, placed %llu, dropped %llu, read %llu",
                     (unsigned long long)atomic_load(&s.sent),
                     (unsigned long long)total_placed(m), (unsigned long long)total_drops(m),
                     (unsigned long long)m->delivered);
        }
        if (!any)
            usleep(50);
    }
    pthread_join(sender, NULL);
    pthread_join(switcher, NULL);
    assert_int_equal(atomic_load(&s.thread_error), 0);
    m->sent = atomic_load(&s.sent);
    assert_true(m->sent >= flows * STREAM_PER_FLOW);

    struct vn_dev_stats ds;
    vn_dev_get_dev_stats(m->dev, &ds);
    uint64_t drops = total_drops(m);
    uint64_t steered = 0;
    for (unsigned q = 0; q < m->pairs; q++)
        steered += qstats(m, q).rx.steered_out;
    print_message("%u pairs: %u switches, %u queue changes seen, %llu drops, %llu drain "
                  "timeouts, %llu steered out\n",
                  m->pairs, atomic_load(&s.switches), moves, (unsigned long long)drops,
                  (unsigned long long)ds.steering_drain_timeouts, (unsigned long long)steered);
    /* The test did what it means to: many switches with the flows moving. */
    assert_true(atomic_load(&s.switches) >= STREAM_MIN_SWITCHES);
    assert_true(moves >= 10);
    for (unsigned q = 0; q < m->pairs; q++)
        assert_true(per_ring[q] > 0);
    if (ds.steering_drain_timeouts == 0) {
        if (out_of_order != 0)
            fail_msg("%u frames read out of order: %s", out_of_order, first_bad);
    } else {
        print_message("drain timeouts (a stalled driver thread): %u frames read out of order\n",
                      out_of_order);
    }
    /* Drops, if any, were counted (an inbox backlog while the driver lagged). */
    assert_int_equal(total_placed(m) + drops, m->sent);
    assert_int_equal(m->delivered, total_placed(m));
    for (unsigned q = 0; q < m->pairs; q++) {
        struct vn_qp_stats st = qstats(m, q);
        for (int r = 0; r < VN_DROP__COUNT; r++)
            if (r != VN_DROP_STEER_BACKLOG && st.rx.drops[r] != 0)
                fail_msg("queue %u: %llu drops for %s", q, (unsigned long long)st.rx.drops[r],
                         vn_drop_reason_name(r));
        fd_assert_no_errors(&st.rx);
    }
}

/* The queue RSS sends flow `flow` to (of `active` pairs). */
static unsigned target_of(struct mq *m, uint32_t flow, unsigned active)
{
    uint8_t buf[MAX_FRAME_BYTES];
    size_t len = build(m, buf, flow, 0, frame_size(m, 0));
    uint32_t hash;
    uint8_t report;
    return vn_steer_rx(&m->dev->steer, buf + m->hdr, len - m->hdr, active, &hash, &report);
}

/* Two flows, the first for queue 0, the second for queue 1. */
static void flows_for_0_and_1(struct mq *m, uint32_t *to0, uint32_t *to1)
{
    uint16_t table[4] = { 0, 1, 0, 1 };
    assert_int_equal(rss_config(m, table, 4, 2), VN_CTRL_OK);
    *to0 = *to1 = UINT32_MAX;
    for (uint32_t flow = 1; flow < 200 && (*to0 == UINT32_MAX || *to1 == UINT32_MAX); flow++) {
        if (target_of(m, flow, 2) == 0 && *to0 == UINT32_MAX)
            *to0 = flow;
        else if (target_of(m, flow, 2) == 1 && *to1 == UINT32_MAX)
            *to1 = flow;
    }
    assert_true(*to0 != UINT32_MAX && *to1 != UINT32_MAX);
}

/* A pair whose driver posts no receive buffers does not hold up the frames
 * of other pairs that arrive on its TAP queue (the kernel picks TAP queues
 * by its own hash): its worker reads on, its own frames wait in its inbox
 * and reach its ring, in order, once the driver posts buffers. */
static void test_starved_pair_does_not_block_others(void **state)
{
    struct mq *m = *state = mq_new(2);
    m->fixed_size = 100;
    post(m, 1, QSIZE); /* pair 0: none */
    mq_start(m, BASE_FEATURES);
    uint32_t to0, to1;
    flows_for_0_and_1(m, &to0, &to1);
    for (uint32_t i = 0; i < 4; i++)
        host_send(m, 0, to0, i);
    for (uint32_t i = 0; i < 4; i++)
        host_send(m, 0, to1, i);
    expect_frames(m, 1, to1, 0, 4);
    WAIT_FOR(inbox_count(m, 0) == 4);
    /* Counted at the end of the worker's pass, after the frames are queued. */
    WAIT_FOR(qstats(m, 0).rx.ring_full > 0);
    post(m, 0, 8);
    expect_frames(m, 0, to0, 0, 4);
    assert_accounted(m, 0);
}

/* Frames for a pair whose receive ring is broken (DEVICE_NEEDS_RESET) are
 * dropped and counted as queue_broken by the reader, not held until reset. */
static void test_frames_for_broken_pair_dropped(void **state)
{
    struct mq *m = *state = mq_new(2);
    m->fixed_size = 100;
    post(m, 1, QSIZE);
    mq_start(m, BASE_FEATURES);
    uint32_t to0, to1;
    flows_for_0_and_1(m, &to0, &to1);
    /* The avail index jumps past the ring size: ring 0 is corrupt. */
    fd_vq_set_avail_idx(&m->rxq[0], QSIZE + 7);
    vn_dev_doorbell(m->dev, 0);
    WAIT_FOR(vn_dev_get_needs_reset(m->dev));
    for (uint32_t i = 0; i < 5; i++)
        host_send(m, 1, to0, i);
    host_send(m, 1, to1, 0);
    expect_frames(m, 1, to1, 0, 1);
    WAIT_FOR(qstats(m, 1).rx.drops[VN_DROP_QUEUE_BROKEN] == 5);
    assert_int_equal(inbox_count(m, 0), 0);
    assert_accounted(m, 5);
}

static uint64_t inbox_bytes(struct mq *m, unsigned q)
{
    pthread_mutex_lock(&m->dev->qp[q].inbox.lock);
    uint64_t n = m->dev->qp[q].inbox.bytes;
    pthread_mutex_unlock(&m->dev->qp[q].inbox.lock);
    return n;
}

/* RSS over `pairs` pairs with this table, whatever the control queue would
 * say (it refuses tables naming pairs without rings): what the datapath
 * does if steering ever names such a pair anyway. */
static void force_rss(struct mq *m, const uint16_t *table, unsigned len, uint16_t pairs)
{
    uint8_t d[8 + 2 * VN_RSS_MAX_TABLE + 3 + 40];
    vn_le32_put(d, VN_HASH_TYPES_SUPPORTED);
    vn_le16_put(d + 4, (uint16_t)(len - 1));
    vn_le16_put(d + 6, 0);
    size_t off = 8;
    for (unsigned i = 0; i < len; i++, off += 2)
        vn_le16_put(d + off, table[i]);
    vn_le16_put(d + off, pairs);
    d[off + 2] = 40;
    memcpy(d + off + 3, KEY, 40);
    struct vn_rss_config cfg;
    uint16_t tx;
    assert_int_equal(vn_rss_config_parse(d, (uint32_t)(off + 3 + 40), m->pairs, &cfg, &tx), 0);
    vn_dev_steering_begin(m->dev);
    m->dev->steer.rss = cfg;
    vn_dev_steering_commit(m->dev, tx);
}

/* MQ negotiated, only pair 0's rings set up (issue #11, finding 6): the
 * control queue refuses to steer to the other pairs; and were the steering
 * to name them anyway, their frames are dropped (pair_not_ready), never
 * held in an inbox no worker reads; a later switch does not wait for them,
 * and pair 0 keeps receiving, with 4 pairs in use and after going back to
 * one. */
static void test_pairs_not_set_up(void **state)
{
    struct mq *m = *state = mq_new_partial(4, 1);
    m->fixed_size = 100;
    post(m, 0, QSIZE);
    mq_start(m, BASE_FEATURES);
    for (unsigned q = 1; q < 4; q++)
        assert_false(m->dev->qp[q].thread_started);
    assert_int_equal(pairs_set(m, 4), VN_CTRL_ERR);
    assert_int_equal(steer_all_to(m, 2, 4), VN_CTRL_ERR);
    uint16_t t01[4] = { 0, 1, 0, 1 };
    assert_int_equal(rss_config(m, t01, 4, 1), VN_CTRL_ERR);
    assert_int_equal(m->dev->active_qps, 1);

    uint16_t t0123[4] = { 0, 1, 2, 3 };
    force_rss(m, t0123, 4, 4);
    assert_int_equal(m->dev->active_qps, 4);
    uint32_t to0 = UINT32_MAX;
    unsigned sent_to[4] = { 0 };
    for (uint32_t flow = 1; flow <= 32; flow++) {
        unsigned q = target_of(m, flow, 4);
        if (q == 0 && to0 == UINT32_MAX)
            to0 = flow;
        for (uint32_t i = 0; i < 4; i++)
            host_send(m, 0, flow, i);
        sent_to[q] += 4;
    }
    assert_true(to0 != UINT32_MAX && sent_to[1] + sent_to[2] + sent_to[3] > 0);
    uint64_t not_ready = sent_to[1] + sent_to[2] + sent_to[3];
    WAIT_FOR(qstats(m, 0).rx.packets + qstats(m, 0).rx.drops[VN_DROP_PAIR_NOT_READY] ==
             m->sent);
    assert_int_equal(qstats(m, 0).rx.packets, sent_to[0]);
    assert_int_equal(qstats(m, 0).rx.drops[VN_DROP_PAIR_NOT_READY], not_ready);
    for (unsigned q = 1; q < 4; q++) {
        assert_int_equal(inbox_count(m, q), 0);
        assert_int_equal(inbox_bytes(m, q), 0);
    }
    for (uint32_t n = sent_to[0]; n > 0; n--) {
        struct rx_frame f;
        WAIT_FOR(get_frame(m, 0, &f));
    }
    ack_ring(m, 0);

    /* Another switch with the same pairs: nothing old to wait for. */
    force_rss(m, t0123, 4, 4);
    assert_int_equal(atomic_load(&m->dev->old_inflight), 0);
    for (uint32_t i = 4; i < 12; i++)
        host_send(m, 0, to0, i);
    expect_frames(m, 0, to0, 4, 8);
    ack_ring(m, 0);
    /* Back to one pair (the control queue takes that): every frame. */
    assert_int_equal(pairs_set(m, 1), VN_CTRL_OK);
    for (uint32_t i = 0; i < 8; i++)
        host_send(m, 0, 1000, i);
    expect_frames(m, 0, 1000, 0, 8);
    assert_accounted(m, not_ready);
}

/* RING_RESET (5.1.6.5.6): frames steered to a receive queue the driver is
 * resetting go to another active pair (the next one that takes frames), in
 * order; once every receive queue is being reset they are dropped and
 * counted (queue_disabled). */
static void test_frames_for_a_queue_being_reset_go_elsewhere(void **state)
{
    struct mq *m = *state = mq_new(2);
    post(m, 0, QSIZE);
    post(m, 1, QSIZE);
    mq_start(m, BASE_FEATURES);
    assert_int_equal(steer_all_to(m, 1, 2), VN_CTRL_OK);
    assert_int_equal(vn_dev_queue_reset(m->dev, 2), 0); /* rx of pair 1 */
    for (uint32_t i = 0; i < 30; i++)
        host_send(m, 1, 11, i);
    expect_frames(m, 0, 11, 0, 30);
    struct vn_dev_stats ds;
    vn_dev_get_dev_stats(m->dev, &ds);
    assert_int_equal(ds.rx_reselected, 30);
    assert_int_equal(qstats(m, 0).rx.packets, 30);
    ack_ring(m, 0);
    /* Both receive queues being reset: nowhere to go. */
    assert_int_equal(vn_dev_queue_reset(m->dev, 0), 0);
    for (uint32_t i = 0; i < 10; i++)
        host_send(m, i % 2, 12, i); /* from either reader */
    WAIT_FOR(qstats(m, 0).rx.drops[VN_DROP_QUEUE_DISABLED] +
                 qstats(m, 1).rx.drops[VN_DROP_QUEUE_DISABLED] ==
             10);
    vn_dev_get_dev_stats(m->dev, &ds);
    assert_int_equal(ds.rx_reselected, 30);
    assert_accounted(m, 10);
}

/* A frame up to 64 KiB (a TSO burst) for a pair whose ring has no room
 * waits in its inbox: the inbox holds at most VN_INBOX_MAX_BYTES of them,
 * the reader drops the rest (steer_backlog), long before VN_INBOX_MAX. */
static void test_inbox_byte_budget(void **state)
{
    struct mq *m = *state = mq_new(2);
    mq_start(m, BASE_FEATURES); /* no buffers on either ring */
    assert_int_equal(steer_all_to(m, 0, 2), VN_CTRL_OK);
    const size_t size = 60000;
    static uint8_t big[VN_NET_HDR_MAX_LEN + 60000];
    uint8_t first[MAX_FRAME_BYTES];
    size_t flen = build(m, first, 5, 0, 100);
    memset(big, 0x5a, sizeof(big));
    memcpy(big, first, flen);
    big[1] = 1; /* VIRTIO_NET_HDR_GSO_TCPV4: past the MTU only as GSO */
    const unsigned n = 100;
    for (unsigned i = 0; i < n; i++) {
        if (!try_send(m, 1, big, m->hdr + size, TIMEOUT_MS))
            fail_msg("cannot send frame %u", i);
        m->sent++;
    }
    WAIT_FOR(qstats(m, 1).rx.steered_out + qstats(m, 1).rx.drops[VN_DROP_STEER_BACKLOG] == n);
    const size_t each = sizeof(struct vn_pkt) + m->hdr + size;
    const unsigned held = VN_INBOX_MAX_BYTES / each;
    assert_true(held < n && held < VN_INBOX_MAX);
    assert_int_equal(inbox_count(m, 0), held);
    assert_int_equal(inbox_bytes(m, 0), held * each);
    assert_int_equal(qstats(m, 1).rx.drops[VN_DROP_STEER_BACKLOG], n - held);
    /* Bounced frames (pair 0's own, read off its TAP queue while its ring
     * has no room) go to the same inbox, under the same budget. */
    for (unsigned i = 0; i < 10; i++) {
        if (!try_send(m, 0, big, m->hdr + size, TIMEOUT_MS))
            fail_msg("cannot send frame %u", i);
        m->sent++;
    }
    WAIT_FOR(qstats(m, 0).rx.drops[VN_DROP_STEER_BACKLOG] == 10);
    assert_int_equal(qstats(m, 0).rx.bounced, 10);
    assert_int_equal(inbox_count(m, 0), held);
    assert_int_equal(inbox_bytes(m, 0), held * each);
    /* A reset drops every frame held. */
    vn_dev_reset(m->dev);
    assert_int_equal(inbox_count(m, 0), 0);
    assert_int_equal(inbox_bytes(m, 0), 0);
    assert_int_equal(qstats(m, 0).rx.drops[VN_DROP_RESET], held);
}

static void test_switch_under_load_keeps_order(void **state)
{
    struct mq *m = *state = mq_new(2);
    run_stream(m);
}

static void test_switch_under_load_keeps_order_4_pairs(void **state)
{
    struct mq *m = *state = mq_new(4);
    run_stream(m);
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, NULL, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_steered_to_other_pair),
        T(test_rss_spread_with_hash_reports),
        T(test_disabled_pair),
        T(test_switch_waits_for_driver),
        T(test_switch_drain_timeout),
        T(test_switch_places_old_frames_first),
        T(test_switch_drops_old_frames_past_the_bound),
        T(test_switch_without_event_idx),
        T(test_inbox_backlog_full),
        T(test_inbox_frame_too_big),
        T(test_inbox_skips_bad_buffer),
        T(test_starved_pair_does_not_block_others),
        T(test_frames_for_broken_pair_dropped),
        T(test_pairs_not_set_up),
        T(test_frames_for_a_queue_being_reset_go_elsewhere),
        T(test_inbox_byte_budget),
        T(test_switch_under_load_keeps_order),
        T(test_switch_under_load_keeps_order_4_pairs),
    };
    return cmocka_run_group_tests_name("worker_mq", tests, NULL, NULL);
}
