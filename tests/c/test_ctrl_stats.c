/* VIRTIO_NET_CTRL_STATS (ctrl_stats.c, virtio 1.3 5.1.6.5.x "Device
 * Statistics"): QUERY and GET through vn_ctrl_handle_reply() with the
 * request and the result buffer each flush against a guard page (a read or
 * write one byte past either crashes), byte-exact replies built by hand from
 * the spec's layouts, every refused request leaving the result buffer
 * untouched; then vn_ctrl_process() end to end through the synthetic driver
 * with Linux's buffer layout (header, data, status, result: the ack comes
 * before the command-specific-result, as struct virtio_net_ctrl has it)
 * and awkward ones (result split over descriptors, sharing one with the
 * ack, indirect). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <cmocka.h>

#include "ctrl.h"
#include "ctrl_stats.h"
#include "device.h"
#include "fake_driver.h"
#include "le.h"
#include "net_hdr.h"

#define F(bit) (1ull << (bit))

static const uint8_t MAC[6] = { 0x52, 0x54, 0x00, 0xab, 0xcd, 0xef };

/* The Linux 6.12 driver's view of the layouts (include/uapi/linux/virtio_net.h). */
#define CAPS_SUPPORTED ((1ull << 32) | (1ull << 16) | (1ull << 0))
#define HDR 8
#define CVQ_LEN 24
#define RX_LEN 56
#define TX_LEN 56

/* ---- request and result buffers flush against guard pages ----------------- */

#define BUF_PAGES 2
#define SENTINEL 0xa5
static uint8_t *req_map, *reply_map;

static uint8_t *map_guarded(void)
{
    uint8_t *m = mmap(NULL, (BUF_PAGES + 1) * FD_PAGE, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return NULL;
    if (mprotect(m + BUF_PAGES * FD_PAGE, FD_PAGE, PROT_NONE) != 0)
        return NULL;
    return m;
}

static int group_setup(void **state)
{
    (void)state;
    req_map = map_guarded();
    reply_map = map_guarded();
    return req_map != NULL && reply_map != NULL ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    munmap(req_map, (BUF_PAGES + 1) * FD_PAGE);
    munmap(reply_map, (BUF_PAGES + 1) * FD_PAGE);
    return 0;
}

/* The last result: its buffer (cap bytes ending at the guard page) and the
 * length the device reported. */
static uint8_t *reply;
static uint32_t reply_cap, reply_len;

/* Runs one command (class, cmd, data) with a result buffer of cap bytes
 * filled with SENTINEL. */
static uint8_t handle(struct vn_dev *dev, const void *req, size_t len, uint32_t cap)
{
    assert_true(len <= BUF_PAGES * FD_PAGE && cap <= BUF_PAGES * FD_PAGE);
    uint8_t *p = req_map + BUF_PAGES * FD_PAGE - len;
    memcpy(p, req, len);
    reply = reply_map + BUF_PAGES * FD_PAGE - cap;
    memset(reply, SENTINEL, cap);
    reply_cap = cap;
    reply_len = 0xdeadbeef;
    return vn_ctrl_handle_reply(dev, p, (uint32_t)len, cap ? reply : NULL, cap, &reply_len);
}

static void assert_untouched(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != SENTINEL)
            fail_msg("byte %zu of the result buffer written (0x%02x)", i, p[i]);
}

/* Refused: ERR, no result length and not one byte written. */
#define EXPECT_ERR(dev, req, len, cap)                                  \
    do {                                                                \
        assert_int_equal(handle((dev), (req), (len), (cap)), VN_CTRL_ERR); \
        assert_int_equal(reply_len, 0);                                 \
        assert_untouched(reply, reply_cap);                             \
    } while (0)

/* ---- building requests and expected replies ------------------------------ */

struct req {
    uint8_t b[2 + 64 * VN_STATS_REQ_ENTRY_LEN];
    size_t len;
};

static void req_init(struct req *r, uint8_t cmd)
{
    memset(r, 0, sizeof(*r));
    r->b[0] = VN_CTRL_STATS;
    r->b[1] = cmd;
    r->len = 2;
}

/* struct virtio_net_ctrl_queue_stats entry: le16 vq_index, le16 reserved[3],
 * le64 types_bitmap[1]. */
static void req_add(struct req *r, uint16_t vq, uint64_t types)
{
    uint8_t *e = r->b + r->len;
    memset(e, 0, 16);
    e[0] = (uint8_t)vq;
    e[1] = (uint8_t)(vq >> 8);
    for (int i = 0; i < 8; i++)
        e[8 + i] = (uint8_t)(types >> (8 * i));
    r->len += 16;
}

/* One reply block as bytes: u8 type, u8 reserved, le16 vq_index,
 * le16 reserved1, le16 size, then n le64 values. Returns its length. */
static size_t block(uint8_t *out, uint8_t type, uint16_t vq, const uint64_t *v, unsigned n)
{
    size_t size = HDR + 8 * (size_t)n;
    uint8_t hdr[HDR] = { type, 0, (uint8_t)vq, (uint8_t)(vq >> 8), 0, 0, (uint8_t)size,
                         (uint8_t)(size >> 8) };
    memcpy(out, hdr, HDR);
    for (unsigned k = 0; k < n; k++)
        for (int i = 0; i < 8; i++)
            out[HDR + 8 * k + i] = (uint8_t)(v[k] >> (8 * i));
    return size;
}

/* ---- devices ---------------------------------------------------------------- */

static unsigned n_logs;

static void log_hook(void *py, int level, const char *msg)
{
    (void)py;
    (void)level;
    (void)msg;
    n_logs++;
}

static const uint64_t STATS_FEATURES =
    F(VN_F_VERSION_1) | F(VN_F_CTRL_VQ) | F(VN_F_MQ) | F(VN_F_DEVICE_STATS);

/* Two pairs, both in use, MQ and DEVICE_STATS negotiated (the control
 * queue is then vq 4), with distinct counters in every field. */
static struct vn_dev *new_dev(void)
{
    struct vn_dev *dev = vn_dev_new(2, MAC, 1500);
    assert_non_null(dev);
    struct vn_hooks h = { .log = log_hook };
    vn_dev_set_hooks(dev, &h);
    dev->features = STATS_FEATURES;
    dev->active_qps = 2;
    for (unsigned q = 0; q < 2; q++) {
        struct vn_dir_stats *rx = &dev->qp[q].st.rx, *tx = &dev->qp[q].st.tx;
        uint64_t base = 1000 * (q + 1);
        rx->doorbells = base + 1;
        rx->packets = base + 2;
        rx->bytes = base * 1500 + 3;
        rx->interrupts = base + 4;
        rx->drops[VN_DROP_MAC_FILTER] = 5;
        rx->drops[VN_DROP_BUFFER_TOO_SMALL] = 6;
        rx->drops[VN_DROP_STEER_BACKLOG] = 7 + q;
        rx->drops[VN_DROP_RESET] = 8;
        tx->doorbells = base + 11;
        tx->packets = base + 12;
        tx->bytes = base * 1400 + 13;
        tx->interrupts = base + 14;
        tx->drops[VN_DROP_BAD_CHAIN] = 15;
        tx->drops[VN_DROP_HEADER_TOO_SHORT] = 16;
        tx->drops[VN_DROP_FRAME_TOO_BIG] = 17 + q;
        tx->drops[VN_DROP_TAP_ERROR] = 18;
        tx->drops[VN_DROP_LINK_DOWN] = 19;
        /* Not part of any block. */
        rx->ring_full = tx->ring_full = 99;
        rx->errors[VN_ERR_DESC_ADDR] = tx->errors[VN_ERR_DESC_ADDR] = 98;
    }
    dev->st.ctrl_ok = 40;
    dev->st.ctrl_err = 2;
    return dev;
}

static int setup_dev(void **state)
{
    n_logs = 0;
    *state = new_dev();
    return 0;
}

static int teardown_dev(void **state)
{
    vn_dev_free(*state);
    return 0;
}

/* The expected blocks for pair q of new_dev(). */
static size_t rx_block(uint8_t *out, unsigned q)
{
    uint64_t base = 1000 * (q + 1);
    uint64_t v[6] = {
        base + 1,                /* rx_notifications */
        base + 2,                /* rx_packets */
        base * 1500 + 3,         /* rx_bytes */
        base + 4,                /* rx_interrupts */
        5 + 6 + (7 + q) + 8,     /* rx_drops: every reason */
        7 + q,                   /* rx_drop_overruns: steer_backlog */
    };
    return block(out, 0, (uint16_t)(2 * q), v, 6);
}

static size_t tx_block(uint8_t *out, unsigned q)
{
    uint64_t base = 1000 * (q + 1);
    uint64_t v[6] = {
        base + 11,                          /* tx_notifications */
        base + 12,                          /* tx_packets */
        base * 1400 + 13,                   /* tx_bytes */
        base + 14,                          /* tx_interrupts */
        15 + 16 + (17 + q) + 18 + 19,       /* tx_drops: every reason */
        15 + 16 + (17 + q),                 /* tx_drop_malformed */
    };
    return block(out, 16, (uint16_t)(2 * q + 1), v, 6);
}

static size_t cvq_block(uint8_t *out, uint16_t vq, uint64_t ok, uint64_t err)
{
    /* Including the current command, which succeeds. */
    uint64_t v[2] = { ok + err + 1, ok + 1 };
    return block(out, 32, vq, v, 2);
}

/* ---- QUERY -------------------------------------------------------------------- */

static void test_query(void **state)
{
    struct vn_dev *dev = *state;
    struct req r;
    req_init(&r, VN_CTRL_STATS_QUERY);
    /* struct virtio_net_stats_capabilities: le64 CVQ | RX_BASIC | TX_BASIC. */
    const uint8_t caps[8] = { 0x01, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00 };
    assert_int_equal(VN_STATS_SUPPORTED, CAPS_SUPPORTED);
    assert_int_equal(handle(dev, r.b, r.len, 8), VN_CTRL_OK);
    assert_int_equal(reply_len, 8);
    assert_memory_equal(reply, caps, 8);
    /* A larger buffer: only the 8 bytes, at its start. */
    assert_int_equal(handle(dev, r.b, r.len, 100), VN_CTRL_OK);
    assert_int_equal(reply_len, 8);
    assert_memory_equal(reply, caps, 8);
    assert_untouched(reply + 8, 92);
    /* It does not depend on the queues in use. */
    dev->active_qps = 0;
    dev->features = F(VN_F_CTRL_VQ) | F(VN_F_DEVICE_STATS);
    assert_int_equal(handle(dev, r.b, r.len, 8), VN_CTRL_OK);
    assert_memory_equal(reply, caps, 8);
}

static void test_query_refused(void **state)
{
    struct vn_dev *dev = *state;
    struct req r;
    req_init(&r, VN_CTRL_STATS_QUERY);
    /* No room, or less than the 8 bytes. */
    for (uint32_t cap = 0; cap < 8; cap++)
        EXPECT_ERR(dev, r.b, 2, cap);
    /* QUERY takes no data. */
    EXPECT_ERR(dev, r.b, 3, 16);
    EXPECT_ERR(dev, r.b, 2 + 16, 16);
    /* Truncated: no command byte. */
    EXPECT_ERR(dev, r.b, 1, 16);
    EXPECT_ERR(dev, r.b, 0, 16);
    /* Unknown commands. */
    const uint8_t cmds[] = { 2, 3, 7, 0x80, 0xff };
    for (unsigned i = 0; i < sizeof(cmds); i++) {
        uint8_t c[2] = { VN_CTRL_STATS, cmds[i] };
        EXPECT_ERR(dev, c, 2, 64);
    }
    /* DEVICE_STATS not negotiated. */
    dev->features = STATS_FEATURES & ~F(VN_F_DEVICE_STATS);
    EXPECT_ERR(dev, r.b, 2, 8);
    /* vn_ctrl_handle() has no room for a result. */
    dev->features = STATS_FEATURES;
    assert_int_equal(vn_ctrl_handle(dev, r.b, 2), VN_CTRL_ERR);
}

/* ---- GET: byte layouts ------------------------------------------------------ */

static void test_get_rx_basic(void **state)
{
    struct vn_dev *dev = *state;
    struct req r;
    uint8_t want[RX_LEN];
    for (unsigned q = 0; q < 2; q++) {
        req_init(&r, VN_CTRL_STATS_GET);
        req_add(&r, (uint16_t)(2 * q), VN_STATS_TYPE_RX_BASIC);
        assert_int_equal(rx_block(want, q), RX_LEN);
        assert_int_equal(handle(dev, r.b, r.len, RX_LEN), VN_CTRL_OK);
        assert_int_equal(reply_len, RX_LEN);
        assert_memory_equal(reply, want, RX_LEN);
    }
    /* The header spelled out once: type 0, vq 2, size 56. */
    const uint8_t hdr[8] = { 0, 0, 2, 0, 0, 0, 56, 0 };
    assert_memory_equal(reply, hdr, 8);
}

static void test_get_tx_basic(void **state)
{
    struct vn_dev *dev = *state;
    struct req r;
    uint8_t want[TX_LEN];
    for (unsigned q = 0; q < 2; q++) {
        req_init(&r, VN_CTRL_STATS_GET);
        req_add(&r, (uint16_t)(2 * q + 1), VN_STATS_TYPE_TX_BASIC);
        assert_int_equal(tx_block(want, q), TX_LEN);
        assert_int_equal(handle(dev, r.b, r.len, TX_LEN), VN_CTRL_OK);
        assert_int_equal(reply_len, TX_LEN);
        assert_memory_equal(reply, want, TX_LEN);
    }
    const uint8_t hdr[8] = { 16, 0, 3, 0, 0, 0, 56, 0 };
    assert_memory_equal(reply, hdr, 8);
}

static void test_get_cvq(void **state)
{
    struct vn_dev *dev = *state;
    struct req r;
    uint8_t want[CVQ_LEN];
    /* With MQ the control queue follows every pair the device offers (here
     * 2 pairs: vq 4), whatever the pairs in use. */
    dev->active_qps = 1;
    req_init(&r, VN_CTRL_STATS_GET);
    req_add(&r, 4, VN_STATS_TYPE_CVQ);
    cvq_block(want, 4, 40, 2);
    assert_int_equal(handle(dev, r.b, r.len, CVQ_LEN), VN_CTRL_OK);
    assert_int_equal(reply_len, CVQ_LEN);
    assert_memory_equal(reply, want, CVQ_LEN);
    const uint8_t bytes[CVQ_LEN] = { 32, 0, 4, 0, 0, 0, 24, 0, /* command_num 43 */ 43, 0, 0, 0, 0,
                                     0, 0, 0, /* ok_num 41 */ 41, 0, 0, 0, 0, 0, 0, 0 };
    assert_memory_equal(reply, bytes, CVQ_LEN);
    /* Without MQ it is vq 2. */
    dev->features = STATS_FEATURES & ~F(VN_F_MQ);
    req_init(&r, VN_CTRL_STATS_GET);
    req_add(&r, 2, VN_STATS_TYPE_CVQ);
    cvq_block(want, 2, 40, 2);
    assert_int_equal(handle(dev, r.b, r.len, CVQ_LEN), VN_CTRL_OK);
    assert_memory_equal(reply, want, CVQ_LEN);
    /* Large counters: all 64 bits, little-endian. */
    dev->st.ctrl_ok = 0x0102030405060708ull;
    dev->st.ctrl_err = 0x1000000000000000ull;
    cvq_block(want, 2, dev->st.ctrl_ok, dev->st.ctrl_err);
    assert_int_equal(handle(dev, r.b, r.len, CVQ_LEN), VN_CTRL_OK);
    assert_memory_equal(reply, want, CVQ_LEN);
}

/* The request Linux 6.12 sends for `ethtool -S` with 2 pairs: every queue
 * in use (rx0 tx0 rx1 tx1), then the control queue at 2 * max pairs, and a
 * result buffer of exactly the blocks' sizes, which it walks by hdr.size. */
static void test_get_linux_request(void **state)
{
    struct vn_dev *dev = *state;
    struct req r;
    req_init(&r, VN_CTRL_STATS_GET);
    for (uint16_t vq = 0; vq < 4; vq++)
        req_add(&r, vq, vq % 2 ? VN_STATS_TYPE_TX_BASIC : VN_STATS_TYPE_RX_BASIC);
    req_add(&r, 4, VN_STATS_TYPE_CVQ);
    const uint32_t res_size = 4 * 56 + 24;
    uint8_t want[4 * 56 + 24];
    size_t at = 0;
    at += rx_block(want + at, 0);
    at += tx_block(want + at, 0);
    at += rx_block(want + at, 1);
    at += tx_block(want + at, 1);
    at += cvq_block(want + at, 4, 40, 2);
    assert_int_equal(at, res_size);
    assert_int_equal(handle(dev, r.b, r.len, res_size), VN_CTRL_OK);
    assert_int_equal(reply_len, res_size);
    assert_memory_equal(reply, want, res_size);
    /* Walked like the driver does. */
    const uint8_t types[5] = { 0, 16, 0, 16, 32 };
    unsigned n = 0;
    for (uint32_t p = 0; p < res_size; p += vn_le16_get(reply + p + 6), n++) {
        assert_true(n < 5);
        assert_int_equal(reply[p], types[n]);
        assert_int_equal(vn_le16_get(reply + p + 2), n == 4 ? 4 : n);
    }
    assert_int_equal(n, 5);
    /* The netlink per-queue statistics ask one queue at a time. */
    req_init(&r, VN_CTRL_STATS_GET);
    req_add(&r, 3, VN_STATS_TYPE_TX_BASIC);
    assert_int_equal(handle(dev, r.b, r.len, TX_LEN), VN_CTRL_OK);
    assert_memory_equal(reply, want + 56 * 3, TX_LEN);
}

/* Entries in any order, repeated; reserved fields ignored; a buffer larger
 * than the reply is filled from its start only. */
static void test_get_order_and_room(void **state)
{
    struct vn_dev *dev = *state;
    struct req r;
    req_init(&r, VN_CTRL_STATS_GET);
    req_add(&r, 4, VN_STATS_TYPE_CVQ);
    req_add(&r, 3, VN_STATS_TYPE_TX_BASIC);
    req_add(&r, 0, VN_STATS_TYPE_RX_BASIC);
    req_add(&r, 3, VN_STATS_TYPE_TX_BASIC);
    r.b[2 + 16 + 2] = 0xff; /* reserved[0] of the second entry */
    r.b[2 + 16 + 7] = 0x80; /* reserved[2] */
    uint8_t want[24 + 3 * 56];
    size_t at = cvq_block(want, 4, 40, 2);
    at += tx_block(want + at, 1);
    at += rx_block(want + at, 0);
    at += tx_block(want + at, 1);
    assert_int_equal(handle(dev, r.b, r.len, (uint32_t)at + 50), VN_CTRL_OK);
    assert_int_equal(reply_len, at);
    assert_memory_equal(reply, want, at);
    assert_untouched(reply + at, 50);
}

/* Counters read when asked: later changes show in the next reply. */
static void test_get_live_counters(void **state)
{
    struct vn_dev *dev = *state;
    struct req r;
    req_init(&r, VN_CTRL_STATS_GET);
    req_add(&r, 0, VN_STATS_TYPE_RX_BASIC);
    assert_int_equal(handle(dev, r.b, r.len, RX_LEN), VN_CTRL_OK);
    assert_int_equal(vn_le64_get(reply + 8 + 8), 1002);
    VN_STAT_ADD(dev->qp[0].st.rx.packets, 5);
    VN_STAT_INC(dev->qp[0].st.rx.drops[VN_DROP_QUEUE_DISABLED]);
    assert_int_equal(handle(dev, r.b, r.len, RX_LEN), VN_CTRL_OK);
    assert_int_equal(vn_le64_get(reply + 8 + 8), 1007);
    assert_int_equal(vn_le64_get(reply + 8 + 32), 5 + 6 + 7 + 8 + 1);
    assert_int_equal(vn_le64_get(reply + 8 + 40), 7);
}

/* ---- GET: refused ------------------------------------------------------------ */

static void test_get_unknown_types(void **state)
{
    struct vn_dev *dev = *state;
    struct req r;
    /* Bits no statistic type uses, alone or next to a valid one. */
    const unsigned bits[] = { 4, 5, 15, 20, 31, 33, 40, 63 };
    for (unsigned i = 0; i < sizeof(bits) / sizeof(bits[0]); i++) {
        for (uint16_t vq = 0; vq < 5; vq++) {
            uint64_t valid = vq == 4 ? VN_STATS_TYPE_CVQ
                             : vq % 2 ? VN_STATS_TYPE_TX_BASIC
                                      : VN_STATS_TYPE_RX_BASIC;
            req_init(&r, VN_CTRL_STATS_GET);
            req_add(&r, vq, F(bits[i]));
            EXPECT_ERR(dev, r.b, r.len, 512);
            req_init(&r, VN_CTRL_STATS_GET);
            req_add(&r, vq, valid | F(bits[i]));
            EXPECT_ERR(dev, r.b, r.len, 512);
        }
    }
    /* No type at all. */
    req_init(&r, VN_CTRL_STATS_GET);
    req_add(&r, 0, 0);
    EXPECT_ERR(dev, r.b, r.len, 512);
}

/* Types the spec defines but this device did not report in QUERY. */
static void test_get_unsupported_types(void **state)
{
    struct vn_dev *dev = *state;
    dev->features |= F(VN_F_GUEST_CSUM) | F(VN_F_CSUM) | F(VN_F_GUEST_TSO4) | F(VN_F_HOST_TSO4) |
                     F(63) /* SPEED_DUPLEX */;
    struct req r;
    const uint64_t rx[] = { VN_STATS_TYPE_RX_CSUM, VN_STATS_TYPE_RX_GSO, VN_STATS_TYPE_RX_SPEED };
    const uint64_t tx[] = { VN_STATS_TYPE_TX_CSUM, VN_STATS_TYPE_TX_GSO, VN_STATS_TYPE_TX_SPEED };
    for (unsigned i = 0; i < 3; i++) {
        req_init(&r, VN_CTRL_STATS_GET);
        req_add(&r, 0, rx[i]);
        EXPECT_ERR(dev, r.b, r.len, 512);
        req_init(&r, VN_CTRL_STATS_GET);
        req_add(&r, 2, VN_STATS_TYPE_RX_BASIC | rx[i]);
        EXPECT_ERR(dev, r.b, r.len, 512);
        req_init(&r, VN_CTRL_STATS_GET);
        req_add(&r, 1, tx[i]);
        EXPECT_ERR(dev, r.b, r.len, 512);
        req_init(&r, VN_CTRL_STATS_GET);
        req_add(&r, 3, VN_STATS_TYPE_TX_BASIC | tx[i]);
        EXPECT_ERR(dev, r.b, r.len, 512);
    }
}

/* A type valid for another kind of queue. */
static void test_get_misplaced_types(void **state)
{
    struct vn_dev *dev = *state;
    struct req r;
    const struct {
        uint16_t vq;
        uint64_t types;
    } bad[] = {
        { 0, VN_STATS_TYPE_TX_BASIC },
        { 0, VN_STATS_TYPE_CVQ },
        { 0, VN_STATS_TYPE_RX_BASIC | VN_STATS_TYPE_TX_BASIC },
        { 1, VN_STATS_TYPE_RX_BASIC },
        { 3, VN_STATS_TYPE_CVQ },
        { 1, VN_STATS_TYPE_TX_BASIC | VN_STATS_TYPE_CVQ },
        { 4, VN_STATS_TYPE_RX_BASIC },
        { 4, VN_STATS_TYPE_TX_BASIC },
        { 4, VN_STATS_TYPE_CVQ | VN_STATS_TYPE_RX_BASIC },
    };
    for (unsigned i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        req_init(&r, VN_CTRL_STATS_GET);
        req_add(&r, bad[i].vq, bad[i].types);
        EXPECT_ERR(dev, r.b, r.len, 512);
    }
}

static void test_get_bad_vq_index(void **state)
{
    struct vn_dev *dev = *state;
    struct req r;
    /* Past every queue: 2 pairs and the control queue are vq 0..4. */
    const uint16_t out[] = { 5, 6, 32, 33, 0x7fff, 0x8000, 0xffff };
    const uint64_t types[] = { VN_STATS_TYPE_RX_BASIC, VN_STATS_TYPE_TX_BASIC, VN_STATS_TYPE_CVQ };
    for (unsigned i = 0; i < sizeof(out) / sizeof(out[0]); i++) {
        for (unsigned t = 0; t < 3; t++) {
            req_init(&r, VN_CTRL_STATS_GET);
            req_add(&r, out[i], types[t]);
            EXPECT_ERR(dev, r.b, r.len, 512);
        }
    }
    /* A pair the driver does not use (only the first enabled). */
    dev->active_qps = 1;
    req_init(&r, VN_CTRL_STATS_GET);
    req_add(&r, 2, VN_STATS_TYPE_RX_BASIC);
    EXPECT_ERR(dev, r.b, r.len, 512);
    req_init(&r, VN_CTRL_STATS_GET);
    req_add(&r, 3, VN_STATS_TYPE_TX_BASIC);
    EXPECT_ERR(dev, r.b, r.len, 512);
    req_init(&r, VN_CTRL_STATS_GET);
    req_add(&r, 1, VN_STATS_TYPE_TX_BASIC);
    assert_int_equal(handle(dev, r.b, r.len, TX_LEN), VN_CTRL_OK);
    /* None in use (before DRIVER_OK or after a reset). */
    dev->active_qps = 0;
    req_init(&r, VN_CTRL_STATS_GET);
    req_add(&r, 0, VN_STATS_TYPE_RX_BASIC);
    EXPECT_ERR(dev, r.b, r.len, 512);
    /* Without MQ only pair 0 exists for the driver and vq 2 is the control
     * queue: vq 3 and 4 are out of range, vq 2 is not a receive queue. */
    dev->active_qps = 2;
    dev->features = STATS_FEATURES & ~F(VN_F_MQ);
    const struct {
        uint16_t vq;
        uint64_t types;
    } no_mq[] = { { 2, VN_STATS_TYPE_RX_BASIC }, { 3, VN_STATS_TYPE_TX_BASIC }, { 4, VN_STATS_TYPE_CVQ } };
    for (unsigned i = 0; i < 3; i++) {
        req_init(&r, VN_CTRL_STATS_GET);
        req_add(&r, no_mq[i].vq, no_mq[i].types);
        EXPECT_ERR(dev, r.b, r.len, 512);
    }
    /* RSS without MQ: the driver sees every pair (virtio 5.1.2), the control
     * queue is vq 4 again and pair 1 counts once RSS_CONFIG enabled it. */
    dev->features = (STATS_FEATURES & ~F(VN_F_MQ)) | F(VN_F_RSS);
    req_init(&r, VN_CTRL_STATS_GET);
    req_add(&r, 3, VN_STATS_TYPE_TX_BASIC);
    req_add(&r, 4, VN_STATS_TYPE_CVQ);
    assert_int_equal(handle(dev, r.b, r.len, TX_LEN + CVQ_LEN), VN_CTRL_OK);
    req_init(&r, VN_CTRL_STATS_GET);
    req_add(&r, 2, VN_STATS_TYPE_CVQ);
    EXPECT_ERR(dev, r.b, r.len, 512);
    /* No control queue negotiated (not a valid driver, but no index names it). */
    dev->features = F(VN_F_DEVICE_STATS);
    req_init(&r, VN_CTRL_STATS_GET);
    req_add(&r, 2, VN_STATS_TYPE_CVQ);
    EXPECT_ERR(dev, r.b, r.len, 512);
}

/* One bad entry fails the whole command: nothing of the good ones before it
 * is written. */
static void test_get_one_bad_entry(void **state)
{
    struct vn_dev *dev = *state;
    struct req r;
    for (unsigned bad_at = 0; bad_at < 5; bad_at++) {
        req_init(&r, VN_CTRL_STATS_GET);
        for (uint16_t vq = 0; vq < 5; vq++) {
            uint64_t t = vq == 4 ? VN_STATS_TYPE_CVQ
                         : vq % 2 ? VN_STATS_TYPE_TX_BASIC
                                  : VN_STATS_TYPE_RX_BASIC;
            if (vq == bad_at)
                req_add(&r, 9, t);
            else
                req_add(&r, vq, t);
        }
        EXPECT_ERR(dev, r.b, r.len, 1024);
    }
}

/* Every length that is not a whole number of 16-byte entries, and no entry
 * at all, read without a byte past the request (guard page). */
static void test_get_truncated(void **state)
{
    struct vn_dev *dev = *state;
    struct req r;
    req_init(&r, VN_CTRL_STATS_GET);
    req_add(&r, 0, VN_STATS_TYPE_RX_BASIC);
    req_add(&r, 1, VN_STATS_TYPE_TX_BASIC);
    req_add(&r, 4, VN_STATS_TYPE_CVQ);
    for (size_t len = 0; len < r.len; len++) {
        if (len > 2 && (len - 2) % 16 == 0)
            continue;
        EXPECT_ERR(dev, r.b, len, 1024);
    }
    /* One byte more than whole entries. */
    EXPECT_ERR(dev, r.b, r.len + 1, 1024);
    /* The whole entries each prefix has are fine. */
    assert_int_equal(handle(dev, r.b, 2 + 16, 1024), VN_CTRL_OK);
    assert_int_equal(reply_len, RX_LEN);
    assert_int_equal(handle(dev, r.b, 2 + 32, 1024), VN_CTRL_OK);
    assert_int_equal(reply_len, RX_LEN + TX_LEN);
}

static void test_get_reply_too_small(void **state)
{
    struct vn_dev *dev = *state;
    struct req r;
    req_init(&r, VN_CTRL_STATS_GET);
    req_add(&r, 0, VN_STATS_TYPE_RX_BASIC);
    req_add(&r, 1, VN_STATS_TYPE_TX_BASIC);
    req_add(&r, 4, VN_STATS_TYPE_CVQ);
    const uint32_t need = RX_LEN + TX_LEN + CVQ_LEN;
    /* Any room short of the whole reply, down to none: no partial reply. */
    for (uint32_t cap = 0; cap < need; cap++)
        EXPECT_ERR(dev, r.b, r.len, cap);
    assert_int_equal(handle(dev, r.b, r.len, need), VN_CTRL_OK);
    assert_int_equal(reply_len, need);
    /* vn_ctrl_handle() has no room. */
    assert_int_equal(vn_ctrl_handle(dev, r.b, r.len), VN_CTRL_ERR);
}

static void test_get_not_negotiated(void **state)
{
    struct vn_dev *dev = *state;
    struct req r;
    req_init(&r, VN_CTRL_STATS_GET);
    req_add(&r, 0, VN_STATS_TYPE_RX_BASIC);
    dev->features = STATS_FEATURES & ~F(VN_F_DEVICE_STATS);
    EXPECT_ERR(dev, r.b, r.len, 512);
    dev->features = 0;
    EXPECT_ERR(dev, r.b, r.len, 512);
}

/* The other classes write no result, even with room for one. */
static void test_other_classes_no_result(void **state)
{
    struct vn_dev *dev = *state;
    dev->features |= F(VN_F_CTRL_RX);
    uint8_t promisc[3] = { VN_CTRL_RX, VN_CTRL_RX_PROMISC, 0 };
    assert_int_equal(handle(dev, promisc, 3, 64), VN_CTRL_OK);
    assert_int_equal(reply_len, 0);
    assert_untouched(reply, 64);
    assert_false(dev->filter.promisc);
    uint8_t pairs[4] = { VN_CTRL_MQ, VN_CTRL_MQ_VQ_PAIRS_SET, 9, 0 };
    EXPECT_ERR(dev, pairs, 4, 64);
    uint8_t unknown[2] = { 9, 0 };
    EXPECT_ERR(dev, unknown, 2, 64);
}

/* ---- vn_ctrl_process through the control queue ----------------------------- */

#define CTRL_QSIZE 16
#define CTRL_VECTOR 5
#define CTRL_VQ 4 /* 2 pairs, MQ */

struct cfx {
    struct vn_dev *dev;
    struct fd_guest g;
    struct fd_vq q;
};

static int setup_cfx(void **state)
{
    struct cfx *x = calloc(1, sizeof(*x));
    assert_non_null(x);
    n_logs = 0;
    x->dev = vn_dev_new(2, MAC, 1500);
    assert_non_null(x->dev);
    struct vn_hooks h = { .log = log_hook };
    vn_dev_set_hooks(x->dev, &h);
    x->dev->vfu = &fd_fake_vfu_ctx;
    fd_irq_reset();
    fd_guest_init(&x->g, &x->dev->mem);
    fd_vq_init(&x->q, &x->g, 0, CTRL_QSIZE);
    assert_int_equal(vn_dev_config_queue(x->dev, CTRL_VQ, CTRL_QSIZE, x->q.desc, x->q.avail,
                                         x->q.used, CTRL_VECTOR),
                     0);
    /* No rx/tx rings configured: no worker runs, the counters stay put. */
    assert_int_equal(vn_dev_start(x->dev, STATS_FEATURES | F(VN_F_RING_INDIRECT_DESC)), 0);
    /* But the control queue may steer to both pairs (VQ_PAIRS_SET 2), as
     * if the driver had set up their receive rings. */
    for (unsigned i = 0; i < 2; i++)
        atomic_store(&x->dev->qp[i].rx_ready, true);
    *state = x;
    return 0;
}

static int teardown_cfx(void **state)
{
    struct cfx *x = *state;
    vn_dev_reset(x->dev);
    fd_guest_destroy(&x->g);
    x->dev->vfu = NULL;
    vn_dev_free(x->dev);
    free(x);
    return 0;
}

static void doorbell(struct cfx *x)
{
    vn_dev_doorbell(x->dev, CTRL_VQ);
}

static void expect_used(struct cfx *x, uint32_t len_expected)
{
    uint32_t id, len;
    assert_true(fd_vq_get_used(&x->q, &id, &len));
    assert_int_equal(len, len_expected);
}

/* Guest memory filled with 0xee, as a driver's result buffer. */
static uint64_t in_buf(struct cfx *x, uint32_t len)
{
    uint64_t a = fd_alloc(&x->g, 1, len, 8);
    memset(fd_hva(&x->g, a, len), 0xee, len);
    return a;
}

static uint64_t out_buf(struct cfx *x, const void *data, uint32_t len)
{
    uint64_t a = fd_alloc(&x->g, 1, len, 1);
    fd_write(&x->g, a, data, len);
    return a;
}

static uint8_t byte_at(struct cfx *x, uint64_t gpa)
{
    uint8_t v;
    fd_read(&x->g, gpa, &v, 1);
    return v;
}

static void assert_guest_untouched(struct cfx *x, uint64_t gpa, uint32_t len)
{
    for (uint32_t i = 0; i < len; i++)
        if (byte_at(x, gpa + i) != 0xee)
            fail_msg("guest byte %u written", i);
}

/* Linux's QUERY at probe (virtnet_send_command_reply): header, then the
 * status byte, then the 8-byte result, each its own descriptor; the ack
 * comes first in the device-writable part (struct virtio_net_ctrl: ack,
 * command-specific-result). Used length 9. */
static void test_process_query(void **state)
{
    struct cfx *x = *state;
    const uint8_t hdr[2] = { VN_CTRL_STATS, VN_CTRL_STATS_QUERY };
    uint64_t h = out_buf(x, hdr, 2), ack = in_buf(x, 1), caps = in_buf(x, 8);
    struct fd_buf b[3] = { { h, 2, false }, { ack, 1, true }, { caps, 8, true } };
    fd_vq_add(&x->q, b, 3);
    doorbell(x);
    expect_used(x, 9);
    assert_int_equal(byte_at(x, ack), VN_CTRL_OK);
    uint8_t got[8];
    fd_read(&x->g, caps, got, 8);
    assert_int_equal(vn_le64_get(got), CAPS_SUPPORTED);
    assert_int_equal(x->dev->st.ctrl_ok, 1);
    assert_int_equal(x->dev->st.ctrl_cmds[VN_CTRL_STATS][VN_CTRL_STATS_QUERY][0], 1);
    assert_int_equal(fd_irq_count(CTRL_VECTOR), 1);
}

/* Linux's GET for `ethtool -S` (one pair in use): header, request entries,
 * status, result. The CVQ block counts this command; afterwards the
 * device's counters agree with it. */
static void test_process_get(void **state)
{
    struct cfx *x = *state;
    struct vn_dev *dev = x->dev;
    dev->qp[0].st.rx.packets = 77;
    dev->qp[0].st.tx.bytes = 1234567;
    dev->st.ctrl_ok = 10;
    dev->st.ctrl_err = 3;
    struct req r;
    req_init(&r, VN_CTRL_STATS_GET);
    req_add(&r, 0, VN_STATS_TYPE_RX_BASIC);
    req_add(&r, 1, VN_STATS_TYPE_TX_BASIC);
    req_add(&r, CTRL_VQ, VN_STATS_TYPE_CVQ);
    const uint32_t res = 56 + 56 + 24;
    uint64_t h = out_buf(x, r.b, 2), data = out_buf(x, r.b + 2, (uint32_t)r.len - 2);
    uint64_t ack = in_buf(x, 1), out = in_buf(x, res);
    struct fd_buf b[4] = {
        { h, 2, false }, { data, (uint32_t)r.len - 2, false }, { ack, 1, true }, { out, res, true }
    };
    fd_vq_add(&x->q, b, 4);
    doorbell(x);
    expect_used(x, 1 + res);
    assert_int_equal(byte_at(x, ack), VN_CTRL_OK);
    uint8_t got[56 + 56 + 24];
    fd_read(&x->g, out, got, res);
    assert_int_equal(got[0], 0);
    assert_int_equal(vn_le16_get(got + 6), 56);
    assert_int_equal(vn_le64_get(got + 8 + 8), 77);
    assert_int_equal(got[56], 16);
    assert_int_equal(vn_le16_get(got + 56 + 2), 1);
    assert_int_equal(vn_le64_get(got + 56 + 8 + 16), 1234567);
    uint8_t want_cvq[24];
    cvq_block(want_cvq, CTRL_VQ, 10, 3);
    assert_memory_equal(got + 112, want_cvq, 24);
    /* command_num and ok_num included this command: they now equal the
     * device's own counters. */
    assert_int_equal(dev->st.ctrl_ok + dev->st.ctrl_err, vn_le64_get(got + 112 + 8));
    assert_int_equal(dev->st.ctrl_ok, vn_le64_get(got + 112 + 16));
    assert_int_equal(dev->st.ctrl_cmds[VN_CTRL_STATS][VN_CTRL_STATS_GET][0], 1);
    /* Pair 1 after VQ_PAIRS_SET 2 through the queue. */
    uint8_t pairs[4] = { VN_CTRL_MQ, VN_CTRL_MQ_VQ_PAIRS_SET, 2, 0 };
    uint64_t ph = out_buf(x, pairs, 2), pd = out_buf(x, pairs + 2, 2), pa = in_buf(x, 1);
    struct fd_buf pb[3] = { { ph, 2, false }, { pd, 2, false }, { pa, 1, true } };
    fd_vq_add(&x->q, pb, 3);
    doorbell(x);
    expect_used(x, 1);
    assert_int_equal(byte_at(x, pa), VN_CTRL_OK);
    dev->qp[1].st.tx.doorbells = 31;
    req_init(&r, VN_CTRL_STATS_GET);
    req_add(&r, 3, VN_STATS_TYPE_TX_BASIC);
    h = out_buf(x, r.b, (uint32_t)r.len); /* header and data in one buffer */
    ack = in_buf(x, 1);
    out = in_buf(x, 56);
    struct fd_buf b2[3] = { { h, (uint32_t)r.len, false }, { ack, 1, true }, { out, 56, true } };
    fd_vq_add(&x->q, b2, 3);
    doorbell(x);
    expect_used(x, 57);
    assert_int_equal(byte_at(x, ack), VN_CTRL_OK);
    fd_read(&x->g, out, got, 56);
    assert_int_equal(vn_le16_get(got + 2), 3);
    assert_int_equal(vn_le64_get(got + 8), 31);
}

/* The ack and the start of the result sharing a descriptor, the result
 * split at odd places, a larger result buffer than needed (filled from its
 * start only), the whole chain through an indirect table. */
static void test_process_split_result(void **state)
{
    struct cfx *x = *state;
    struct req r;
    req_init(&r, VN_CTRL_STATS_GET);
    req_add(&r, 1, VN_STATS_TYPE_TX_BASIC);
    req_add(&r, CTRL_VQ, VN_STATS_TYPE_CVQ);
    uint8_t want[56 + 24];
    x->dev->qp[0].st.tx.packets = 0x1122334455667788ull;
    x->dev->qp[0].st.tx.drops[VN_DROP_BAD_CHAIN] = 4;
    x->dev->qp[0].st.tx.drops[VN_DROP_LINK_DOWN] = 2;
    uint64_t v[6] = { 0, 0x1122334455667788ull, 0, 0, 6, 4 };
    size_t at = block(want, 16, 1, v, 6);
    at += cvq_block(want + at, CTRL_VQ, 0, 0);
    assert_int_equal(at, 80);
    uint64_t req = out_buf(x, r.b, (uint32_t)r.len);
    /* Writable: [ack + 3 result bytes] [1] [50] [26 + 40 spare]. */
    uint64_t p1 = in_buf(x, 4), p2 = in_buf(x, 1), p3 = in_buf(x, 50), tail = in_buf(x, 66);
    struct fd_buf b[6] = { { req, 1, false },   { req + 1, (uint32_t)r.len - 1, false },
                           { p1, 4, true },     { p2, 1, true },
                           { p3, 50, true },    { tail, 66, true } };
    uint64_t t = fd_indirect_table(&x->g, 1, b, 6);
    fd_vq_desc(&x->q, 0, t, 16 * 6, VRING_DESC_F_INDIRECT, 0);
    fd_vq_make_avail(&x->q, 0);
    doorbell(x);
    expect_used(x, 1 + 80);
    assert_int_equal(byte_at(x, p1), VN_CTRL_OK);
    uint8_t got[80];
    fd_read(&x->g, p1 + 1, got, 3);
    fd_read(&x->g, p2, got + 3, 1);
    fd_read(&x->g, p3, got + 4, 50);
    fd_read(&x->g, tail, got + 54, 26);
    assert_memory_equal(got, want, 80);
    assert_guest_untouched(x, tail + 26, 40);
}

/* Refused commands: ERR in the first writable byte, used length 1, the
 * result buffer untouched; an ack-only writable part still works for every
 * class; every class puts the ack in the first writable byte. */
static void test_process_refused(void **state)
{
    struct cfx *x = *state;
    struct req r;
    req_init(&r, VN_CTRL_STATS_GET);
    req_add(&r, 0, VN_STATS_TYPE_RX_BASIC);
    req_add(&r, CTRL_VQ, VN_STATS_TYPE_CVQ);
    struct req bad;
    req_init(&bad, VN_CTRL_STATS_GET);
    req_add(&bad, 2, VN_STATS_TYPE_RX_BASIC); /* pair 1 not in use */
    struct req query;
    req_init(&query, VN_CTRL_STATS_QUERY);
    const struct {
        const uint8_t *req;
        uint32_t len;
        uint32_t room;  /* result bytes after the ack */
    } cases[] = {
        { r.b, (uint32_t)r.len, 56 + 24 - 1 }, /* result buffer one byte short */
        { r.b, (uint32_t)r.len, 0 },           /* ack only */
        { r.b, (uint32_t)r.len - 1, 200 },     /* truncated request */
        { r.b, 2, 200 },                       /* no entry */
        { bad.b, (uint32_t)bad.len, 200 },     /* queue not in use */
        { query.b, 2, 7 },                     /* QUERY, result one byte short */
        { query.b, 2, 0 },                     /* QUERY, ack only */
    };
    const unsigned n = sizeof(cases) / sizeof(cases[0]);
    for (unsigned i = 0; i < n; i++) {
        uint32_t room = cases[i].room;
        uint64_t h = out_buf(x, cases[i].req, cases[i].len);
        uint64_t ack = in_buf(x, 1);
        uint64_t out = room ? in_buf(x, room) : 0;
        struct fd_buf b[3] = { { h, cases[i].len, false }, { ack, 1, true }, { out, room, true } };
        fd_vq_add(&x->q, b, room ? 3 : 2);
        doorbell(x);
        expect_used(x, 1);
        assert_int_equal(byte_at(x, ack), VN_CTRL_ERR);
        if (room)
            assert_guest_untouched(x, out, room);
    }
    assert_int_equal(x->dev->st.ctrl_err, n);
    assert_int_equal(x->dev->st.ctrl_ok, 0);
    /* Ack and result in one writable buffer: ERR in its first byte. */
    uint64_t h = out_buf(x, r.b, (uint32_t)r.len), one = in_buf(x, 1 + 10);
    fd_vq_add(&x->q, (struct fd_buf[]){ { h, (uint32_t)r.len, false }, { one, 11, true } }, 2);
    doorbell(x);
    expect_used(x, 1);
    assert_int_equal(byte_at(x, one), VN_CTRL_ERR);
    assert_guest_untouched(x, one + 1, 10);
    /* Other classes: ack-only, and with a larger writable buffer whose
     * first byte takes the ack and the rest stays untouched. */
    x->dev->features |= F(VN_F_CTRL_RX);
    uint8_t promisc[3] = { VN_CTRL_RX, VN_CTRL_RX_PROMISC, 0 };
    h = out_buf(x, promisc, 3);
    uint64_t ack = in_buf(x, 1);
    fd_vq_add(&x->q, (struct fd_buf[]){ { h, 3, false }, { ack, 1, true } }, 2);
    doorbell(x);
    expect_used(x, 1);
    assert_int_equal(byte_at(x, ack), VN_CTRL_OK);
    uint64_t wide = in_buf(x, 9);
    fd_vq_add(&x->q, (struct fd_buf[]){ { h, 3, false }, { wide, 9, true } }, 2);
    doorbell(x);
    expect_used(x, 1);
    assert_int_equal(byte_at(x, wide), VN_CTRL_OK);
    assert_guest_untouched(x, wide + 1, 8);
    assert_false(vn_dev_get_needs_reset(x->dev));
}

#define D(fn) cmocka_unit_test_setup_teardown(fn, setup_dev, teardown_dev)
#define Q(fn) cmocka_unit_test_setup_teardown(fn, setup_cfx, teardown_cfx)

int main(void)
{
    const struct CMUnitTest tests[] = {
        D(test_query),
        D(test_query_refused),
        D(test_get_rx_basic),
        D(test_get_tx_basic),
        D(test_get_cvq),
        D(test_get_linux_request),
        D(test_get_order_and_room),
        D(test_get_live_counters),
        D(test_get_unknown_types),
        D(test_get_unsupported_types),
        D(test_get_misplaced_types),
        D(test_get_bad_vq_index),
        D(test_get_one_bad_entry),
        D(test_get_truncated),
        D(test_get_reply_too_small),
        D(test_get_not_negotiated),
        D(test_other_classes_no_result),
        Q(test_process_query),
        Q(test_process_get),
        Q(test_process_split_result),
        Q(test_process_refused),
    };
    return cmocka_run_group_tests_name("ctrl_stats", tests, group_setup, group_teardown);
}
