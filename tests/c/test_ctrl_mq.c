/* The multiqueue control commands (ctrl.c, class VIRTIO_NET_CTRL_MQ) through
 * vn_ctrl_handle() on a 4-pair device, each request flush against a guard
 * page: VQ_PAIRS_SET, RSS_CONFIG and HASH_CONFIG with and without their
 * features; refused commands change nothing (pairs, RSS state, switch
 * counter, epoch), accepted ones are steering switches. Also the operator's
 * policy switch and the steering state exported to the control plane and
 * the guest-visible state in BAR0. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>

#include <cmocka.h>

#include "ctrl.h"
#include "device.h"
#include "fake_driver.h"
#include "le.h"
#include "net_hdr.h"

#define F(bit) (1ull << (bit))
#define MAX_QPS 4

static const uint8_t MAC[6] = { 0x52, 0x54, 0x00, 0x12, 0x34, 0x56 };

static const uint8_t KEY[40] = {
    0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3,
    0x8f, 0xb0, 0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3,
    0x80, 0x30, 0xf2, 0x0c, 0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
};

static const uint64_t ALL_MQ = F(VN_F_VERSION_1) | F(VN_F_CTRL_VQ) | F(VN_F_MQ) | F(VN_F_RSS) |
                               F(VN_F_HASH_REPORT);

/* ---- requests flush against a guard page ---------------------------------- */

#define REQ_PAGES 2
static uint8_t *req_map;

static int group_setup(void **state)
{
    (void)state;
    req_map = mmap(NULL, (REQ_PAGES + 1) * FD_PAGE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (req_map == MAP_FAILED)
        return -1;
    return mprotect(req_map + REQ_PAGES * FD_PAGE, FD_PAGE, PROT_NONE);
}

static int group_teardown(void **state)
{
    (void)state;
    munmap(req_map, (REQ_PAGES + 1) * FD_PAGE);
    return 0;
}

static uint8_t handle(struct vn_dev *dev, const void *req, size_t len)
{
    assert_true(len <= REQ_PAGES * FD_PAGE);
    uint8_t *p = req_map + REQ_PAGES * FD_PAGE - len;
    memcpy(p, req, len);
    return vn_ctrl_handle(dev, p, (uint32_t)len);
}

/* ---- device ------------------------------------------------------------- */

static unsigned n_logs;

static void log_hook(void *py, int level, const char *msg)
{
    (void)py;
    (void)level;
    (void)msg;
    n_logs++;
}

/* The guest-visible steering state (BAR0 at VN_STEER_STATE_OFF). */
static const uint8_t *steer_state(struct vn_dev *dev)
{
    static uint8_t state[VN_STEER_STATE_LEN];
    vn_dev_steer_state(dev, state);
    return state;
}

/* What vn_dev_start finds when the driver set up every pair's receive ring
 * (these tests have no rings; test_pairs_not_ready covers pairs without). */
static void all_pairs_ready(struct vn_dev *dev)
{
    for (unsigned i = 0; i < dev->max_qps; i++)
        atomic_store(&dev->qp[i].rx_ready, true);
}

static int setup_dev(void **state)
{
    struct vn_dev *dev = vn_dev_new(MAX_QPS, MAC, 1500);
    assert_non_null(dev);
    dev->drain_grace_ns = 0;
    struct vn_hooks h = { .log = log_hook };
    vn_dev_set_hooks(dev, &h);
    n_logs = 0;
    dev->features = ALL_MQ;
    dev->active_qps = 1; /* what vn_dev_start sets */
    all_pairs_ready(dev);
    *state = dev;
    return 0;
}

static int teardown_dev(void **state)
{
    vn_dev_free(*state);
    return 0;
}

/* What a refused command must leave alone. */
struct snap {
    unsigned active_qps;
    uint64_t switches;
    uint32_t epoch;
    int old_inflight;
    bool drain_pending;
    bool learn_tx;
    int policy;
    struct vn_rss_config rss;
};

static struct snap snap_of(struct vn_dev *dev)
{
    struct snap s;
    memset(&s, 0, sizeof(s));
    s.active_qps = dev->active_qps;
    s.switches = dev->st.steering_switches;
    s.epoch = atomic_load(&dev->epoch);
    s.old_inflight = atomic_load(&dev->old_inflight);
    s.drain_pending = atomic_load(&dev->drain_pending);
    s.learn_tx = dev->learn_tx;
    s.policy = dev->steer.policy;
    memcpy(&s.rss, &dev->steer.rss, sizeof(s.rss));
    return s;
}

static void assert_unchanged(struct vn_dev *dev, const struct snap *before)
{
    struct snap now = snap_of(dev);
    assert_int_equal(now.active_qps, before->active_qps);
    assert_int_equal(now.switches, before->switches);
    assert_int_equal(now.epoch, before->epoch);
    assert_int_equal(now.old_inflight, before->old_inflight);
    assert_int_equal(now.drain_pending, before->drain_pending);
    assert_int_equal(now.learn_tx, before->learn_tx);
    assert_int_equal(now.policy, before->policy);
    assert_memory_equal(&now.rss, &before->rss, sizeof(now.rss));
}

#define EXPECT_ERR_UNCHANGED(dev, req, len)                                    \
    do {                                                                       \
        struct snap before_ = snap_of(dev);                                    \
        assert_int_equal(handle((dev), (req), (len)), VN_CTRL_ERR);           \
        assert_unchanged((dev), &before_);                                     \
    } while (0)

/* An accepted command is one steering switch. */
static void assert_switched(struct vn_dev *dev, const struct snap *before)
{
    assert_int_equal(dev->st.steering_switches, before->switches + 1);
    assert_int_equal(atomic_load(&dev->epoch), before->epoch + 1);
    /* Nothing was in flight (no worker), and a stopped device has no ring
     * to wait for. */
    assert_int_equal(atomic_load(&dev->old_inflight), 0);
    assert_false(atomic_load(&dev->drain_pending));
    assert_false(dev->workers_paused);
    /* The guest-visible state follows. */
    const uint8_t *st = steer_state(dev);
    assert_int_equal(vn_le32_get(st), VN_STEER_STATE_MAGIC);
    assert_int_equal(st[4], 1);
    assert_int_equal(st[5], dev->steer.policy);
    assert_int_equal(st[6], vn_steering_effective(&dev->steer));
    assert_int_equal(vn_le16_get(st + 8), dev->active_qps);
    assert_int_equal(vn_le16_get(st + 10), MAX_QPS);
    assert_int_equal(vn_le32_get(st + 12), dev->st.steering_switches);
}

static size_t pairs_req(uint8_t *out, uint16_t pairs)
{
    out[0] = VN_CTRL_MQ;
    out[1] = VN_CTRL_MQ_VQ_PAIRS_SET;
    vn_le16_put(out + 2, pairs);
    return 4;
}

/* RSS_CONFIG: `entries` table entries (table_len = entries, all of them
 * written), then max_tx_vq and a key of key_len bytes, then pad bytes. */
static size_t rss_req(uint8_t *out, uint32_t types, unsigned entries, const uint16_t *table,
                      uint16_t unclassified, uint16_t max_tx, uint8_t key_len, unsigned pad)
{
    out[0] = VN_CTRL_MQ;
    out[1] = VN_CTRL_MQ_RSS_CONFIG;
    uint8_t *d = out + 2;
    vn_le32_put(d, types);
    vn_le16_put(d + 4, (uint16_t)(entries - 1));
    vn_le16_put(d + 6, unclassified);
    size_t off = 8;
    for (unsigned i = 0; i < entries; i++, off += 2)
        vn_le16_put(d + off, table[i]);
    vn_le16_put(d + off, max_tx);
    d[off + 2] = key_len;
    off += 3;
    for (unsigned i = 0; i < key_len; i++)
        d[off++] = i < sizeof(KEY) ? KEY[i] : 0x77;
    memset(d + off, 0, pad);
    off += pad;
    return 2 + off;
}

static size_t hash_req(uint8_t *out, uint32_t types, uint8_t key_len, unsigned pad)
{
    out[0] = VN_CTRL_MQ;
    out[1] = VN_CTRL_MQ_HASH_CONFIG;
    uint8_t *d = out + 2;
    vn_le32_put(d, types);
    memset(d + 4, 0, 8);
    d[12] = key_len;
    size_t off = 13;
    for (unsigned i = 0; i < key_len; i++)
        d[off++] = i < sizeof(KEY) ? KEY[i] : 0x77;
    memset(d + off, 0, pad);
    off += pad;
    return 2 + off;
}

static const uint16_t TABLE[8] = { 0, 1, 2, 3, 3, 2, 1, 0 };

/* ---- VQ_PAIRS_SET ------------------------------------------------------------ */

static void test_vq_pairs_set_valid(void **state)
{
    struct vn_dev *dev = *state;
    const uint16_t seq[] = { 4, 2, 3, 1, 4, 4, 1 };
    for (unsigned i = 0; i < sizeof(seq) / sizeof(seq[0]); i++) {
        uint8_t r[4];
        struct snap before = snap_of(dev);
        unsigned logs = n_logs;
        assert_int_equal(handle(dev, r, pairs_req(r, seq[i])), VN_CTRL_OK);
        assert_int_equal(dev->active_qps, seq[i]);
        assert_switched(dev, &before);
        assert_memory_equal(&dev->steer.rss, &before.rss, sizeof(before.rss));
        assert_true(n_logs > logs);
        /* AUTO without RSS: rx follows tx, so the tx flow table is fed
         * (only while there is more than one pair to choose from). */
        assert_int_equal(dev->learn_tx, seq[i] > 1);
    }
    /* Other policies: learn_tx only for rx-follows-tx. */
    dev->steer.policy = VN_POLICY_SINGLE;
    uint8_t r[4];
    assert_int_equal(handle(dev, r, pairs_req(r, 2)), VN_CTRL_OK);
    assert_false(dev->learn_tx);
    dev->steer.policy = VN_POLICY_RX_FOLLOWS_TX;
    assert_int_equal(handle(dev, r, pairs_req(r, 3)), VN_CTRL_OK);
    assert_true(dev->learn_tx);
}

static void test_vq_pairs_set_invalid(void **state)
{
    struct vn_dev *dev = *state;
    uint8_t r[8];
    assert_int_equal(handle(dev, r, pairs_req(r, 2)), VN_CTRL_OK);
    const uint16_t bad[] = { 0, MAX_QPS + 1, VN_MAX_QUEUE_PAIRS, 0x100, 0x8000, 0xffff };
    for (unsigned i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        pairs_req(r, bad[i]);
        EXPECT_ERR_UNCHANGED(dev, r, 4);
    }
    /* Wrong lengths around a valid count. */
    pairs_req(r, 3);
    r[4] = r[5] = 0;
    EXPECT_ERR_UNCHANGED(dev, r, 2);
    EXPECT_ERR_UNCHANGED(dev, r, 3);
    EXPECT_ERR_UNCHANGED(dev, r, 5);
    EXPECT_ERR_UNCHANGED(dev, r, 6);
    assert_int_equal(dev->active_qps, 2);
}

static void test_vq_pairs_set_needs_mq(void **state)
{
    struct vn_dev *dev = *state;
    uint8_t r[4];
    pairs_req(r, 1);
    dev->features = ALL_MQ & ~F(VN_F_MQ);
    EXPECT_ERR_UNCHANGED(dev, r, 4);
    dev->features = 0;
    EXPECT_ERR_UNCHANGED(dev, r, 4);
    dev->features = ALL_MQ;
    assert_int_equal(handle(dev, r, 4), VN_CTRL_OK);
}

/* Linux sends VQ_PAIRS_SET for `ethtool -L` even after the user set a table:
 * the table stays, its entries past the active pairs wrap. */
static void test_vq_pairs_set_keeps_rss(void **state)
{
    struct vn_dev *dev = *state;
    uint8_t r[512];
    assert_int_equal(handle(dev, r, rss_req(r, VN_HASH_TYPES_SUPPORTED, 8, TABLE, 3, 4, 40, 0)),
                     VN_CTRL_OK);
    struct vn_rss_config rss = dev->steer.rss;
    assert_int_equal(handle(dev, r, pairs_req(r, 2)), VN_CTRL_OK);
    assert_int_equal(dev->active_qps, 2);
    assert_memory_equal(&dev->steer.rss, &rss, sizeof(rss));
    assert_int_equal(vn_steering_effective(&dev->steer), VN_POLICY_RSS);
    assert_false(dev->learn_tx);
}

static void test_mq_unknown_command(void **state)
{
    struct vn_dev *dev = *state;
    for (unsigned cmd = 3; cmd < 256; cmd += 1 + cmd / 8) {
        uint8_t r[4] = { VN_CTRL_MQ, (uint8_t)cmd, 1, 0 };
        EXPECT_ERR_UNCHANGED(dev, r, 4);
        EXPECT_ERR_UNCHANGED(dev, r, 2);
    }
    /* The class header alone, for each known command. */
    for (uint8_t cmd = 0; cmd < 3; cmd++) {
        uint8_t r[2] = { VN_CTRL_MQ, cmd };
        EXPECT_ERR_UNCHANGED(dev, r, 2);
    }
}

/* ---- RSS_CONFIG ------------------------------------------------------------- */

static void test_rss_config_valid(void **state)
{
    struct vn_dev *dev = *state;
    uint8_t r[512];
    struct snap before = snap_of(dev);
    /* Linux 6.12: one byte of padding after a 40-byte key. */
    size_t len = rss_req(r, VN_HASH_TYPES_SUPPORTED, 8, TABLE, 2, 3, 40, 1);
    assert_int_equal(handle(dev, r, len), VN_CTRL_OK);
    assert_switched(dev, &before);
    assert_int_equal(dev->active_qps, 3);
    const struct vn_rss_config *rss = &dev->steer.rss;
    assert_true(rss->configured);
    assert_int_equal(rss->hash_types, VN_HASH_TYPES_SUPPORTED);
    assert_int_equal(rss->table_len, 8);
    assert_memory_equal(rss->table, TABLE, sizeof(TABLE));
    assert_int_equal(rss->unclassified, 2);
    assert_int_equal(rss->key_len, 40);
    assert_memory_equal(rss->key, KEY, 40);
    assert_int_equal(vn_steering_effective(&dev->steer), VN_POLICY_RSS);
    assert_false(dev->learn_tx);
    assert_int_equal(steer_state(dev)[6], VN_POLICY_RSS);

    struct vn_steer_info info;
    vn_dev_get_steering(dev, &info);
    assert_int_equal(info.policy, VN_POLICY_AUTO);
    assert_int_equal(info.effective, VN_POLICY_RSS);
    assert_int_equal(info.active_qps, 3);
    assert_int_equal(info.max_qps, MAX_QPS);
    assert_int_equal(info.epoch, atomic_load(&dev->epoch));
    assert_true(info.rss_configured);
    assert_int_equal(info.hash_types, VN_HASH_TYPES_SUPPORTED);
    assert_int_equal(info.table_len, 8);
    assert_int_equal(info.unclassified, 2);
    assert_memory_equal(info.table, TABLE, sizeof(TABLE));
    assert_int_equal(info.key_len, 40);
    assert_memory_equal(info.key, KEY, 40);

    /* A second configuration replaces the first whole. */
    const uint16_t one[1] = { 1 };
    before = snap_of(dev);
    assert_int_equal(handle(dev, r, rss_req(r, VN_HASH_TYPE_IPV4, 1, one, 0, 2, 16, 0)), VN_CTRL_OK);
    assert_switched(dev, &before);
    assert_int_equal(dev->active_qps, 2);
    assert_int_equal(rss->table_len, 1);
    assert_int_equal(rss->table[0], 1);
    assert_int_equal(rss->table[1], 0);
    assert_int_equal(rss->key_len, 16);
    assert_int_equal(rss->key[16], 0);
    assert_int_equal(rss->hash_types, VN_HASH_TYPE_IPV4);
    /* HASH_REPORT not negotiated: RSS_CONFIG still works. */
    dev->features = ALL_MQ & ~F(VN_F_HASH_REPORT);
    assert_int_equal(handle(dev, r, rss_req(r, VN_HASH_TYPES_SUPPORTED, 8, TABLE, 0, 4, 40, 0)),
                     VN_CTRL_OK);
    assert_int_equal(dev->active_qps, 4);
}

static void test_rss_config_needs_rss(void **state)
{
    struct vn_dev *dev = *state;
    uint8_t r[512];
    size_t len = rss_req(r, VN_HASH_TYPES_SUPPORTED, 8, TABLE, 0, 4, 40, 0);
    dev->features = ALL_MQ & ~F(VN_F_RSS);
    EXPECT_ERR_UNCHANGED(dev, r, len);
    dev->features = F(VN_F_VERSION_1) | F(VN_F_CTRL_VQ) | F(VN_F_MQ);
    EXPECT_ERR_UNCHANGED(dev, r, len);
}

static void test_rss_config_invalid(void **state)
{
    struct vn_dev *dev = *state;
    uint8_t r[1024];
    /* A configuration in force, which the refused ones must not touch. */
    assert_int_equal(handle(dev, r, rss_req(r, VN_HASH_TYPES_SUPPORTED, 8, TABLE, 1, 3, 40, 0)),
                     VN_CTRL_OK);
    uint16_t t[256];
    memcpy(t, TABLE, sizeof(TABLE));
    size_t len;
    /* A table entry == max pairs, then 0xffff. */
    t[5] = MAX_QPS;
    len = rss_req(r, VN_HASH_TYPES_SUPPORTED, 8, t, 0, 4, 40, 0);
    EXPECT_ERR_UNCHANGED(dev, r, len);
    t[5] = 0xffff;
    len = rss_req(r, VN_HASH_TYPES_SUPPORTED, 8, t, 0, 4, 40, 0);
    EXPECT_ERR_UNCHANGED(dev, r, len);
    memcpy(t, TABLE, sizeof(TABLE));
    /* Unclassified queue == max pairs. */
    len = rss_req(r, VN_HASH_TYPES_SUPPORTED, 8, t, MAX_QPS, 4, 40, 0);
    EXPECT_ERR_UNCHANGED(dev, r, len);
    /* 6 entries: not a power of two. */
    len = rss_req(r, VN_HASH_TYPES_SUPPORTED, 6, t, 0, 4, 40, 0);
    EXPECT_ERR_UNCHANGED(dev, r, len);
    /* 256 entries: over 128. */
    for (unsigned i = 0; i < 256; i++)
        t[i] = (uint16_t)(i % 4);
    len = rss_req(r, VN_HASH_TYPES_SUPPORTED, 256, t, 0, 4, 40, 0);
    EXPECT_ERR_UNCHANGED(dev, r, len);
    /* max_tx_vq 0, past the pairs. */
    len = rss_req(r, VN_HASH_TYPES_SUPPORTED, 8, TABLE, 0, 0, 40, 0);
    EXPECT_ERR_UNCHANGED(dev, r, len);
    len = rss_req(r, VN_HASH_TYPES_SUPPORTED, 8, TABLE, 0, MAX_QPS + 1, 40, 0);
    EXPECT_ERR_UNCHANGED(dev, r, len);
    /* A 41-byte key. */
    len = rss_req(r, VN_HASH_TYPES_SUPPORTED, 8, TABLE, 0, 4, 41, 0);
    EXPECT_ERR_UNCHANGED(dev, r, len);
    /* IP_EX and a high type bit. */
    len = rss_req(r, VN_HASH_TYPES_SUPPORTED | (1u << 6), 8, TABLE, 0, 4, 40, 0);
    EXPECT_ERR_UNCHANGED(dev, r, len);
    len = rss_req(r, VN_HASH_TYPE_TCPV4 | (1u << 31), 8, TABLE, 0, 4, 40, 0);
    EXPECT_ERR_UNCHANGED(dev, r, len);
    /* Every truncation of a valid request. */
    len = rss_req(r, VN_HASH_TYPES_SUPPORTED, 8, TABLE, 0, 2, 40, 0);
    for (size_t n = 0; n < len; n++)
        EXPECT_ERR_UNCHANGED(dev, r, n);
    assert_int_equal(handle(dev, r, len), VN_CTRL_OK);
    assert_int_equal(dev->active_qps, 2);
}

/* ---- HASH_CONFIG ------------------------------------------------------------ */

static void test_hash_config(void **state)
{
    struct vn_dev *dev = *state;
    uint8_t r[512];
    uint8_t p[4];
    assert_int_equal(handle(dev, p, pairs_req(p, 3)), VN_CTRL_OK);
    size_t len = hash_req(r, VN_HASH_TYPE_TCPV4 | VN_HASH_TYPE_IPV6, 40, 0);
    dev->features = ALL_MQ & ~F(VN_F_HASH_REPORT);
    EXPECT_ERR_UNCHANGED(dev, r, len);
    dev->features = ALL_MQ;
    struct snap before = snap_of(dev);
    assert_int_equal(handle(dev, r, len), VN_CTRL_OK);
    assert_switched(dev, &before);
    assert_int_equal(dev->active_qps, 3); /* unchanged */
    const struct vn_rss_config *rss = &dev->steer.rss;
    assert_false(rss->configured);
    assert_int_equal(rss->hash_types, VN_HASH_TYPE_TCPV4 | VN_HASH_TYPE_IPV6);
    assert_int_equal(rss->key_len, 40);
    assert_memory_equal(rss->key, KEY, 40);
    /* Hash reports only: still rx follows tx under AUTO. */
    assert_int_equal(vn_steering_effective(&dev->steer), VN_POLICY_RX_FOLLOWS_TX);
    assert_true(dev->learn_tx);
    /* Refused ones change nothing. */
    EXPECT_ERR_UNCHANGED(dev, r, hash_req(r, VN_HASH_TYPES_SUPPORTED, 41, 0));
    EXPECT_ERR_UNCHANGED(dev, r, hash_req(r, 1u << 7, 8, 0));
    len = hash_req(r, VN_HASH_TYPES_SUPPORTED, 20, 0);
    for (size_t n = 0; n < len; n++)
        EXPECT_ERR_UNCHANGED(dev, r, n);
    /* With padding after the key. */
    before = snap_of(dev);
    assert_int_equal(handle(dev, r, hash_req(r, VN_HASH_TYPES_SUPPORTED, 20, 21)), VN_CTRL_OK);
    assert_switched(dev, &before);
    assert_int_equal(rss->key_len, 20);
    assert_int_equal(rss->hash_types, VN_HASH_TYPES_SUPPORTED);
}

/* ---- a started device (no rings): the switch is immediate ---------------------- */

/* Once the guest looks caught up, new frames still wait a short grace
 * period: Linux writes used_event before its last batch reaches the stack. */
static void test_drain_grace(void **state)
{
    struct vn_dev *dev = *state;
    dev->drain_grace_ns = 20ull * 1000 * 1000;
    dev->active_qps = 0;
    assert_int_equal(vn_dev_start(dev, ALL_MQ), 0);
    all_pairs_ready(dev);
    uint8_t r[4];
    assert_int_equal(handle(dev, r, pairs_req(r, 2)), VN_CTRL_OK);
    assert_true(vn_dev_steering_hold(dev));
    assert_true(vn_dev_steering_hold(dev));
    usleep(30 * 1000);
    assert_false(vn_dev_steering_hold(dev));
    assert_false(atomic_load(&dev->drain_pending));
    assert_int_equal(dev->st.steering_drain_timeouts, 0);
    vn_dev_reset(dev);
}

static void test_switch_on_started_device(void **state)
{
    struct vn_dev *dev = *state;
    dev->active_qps = 0;
    assert_int_equal(vn_dev_start(dev, ALL_MQ), 0);
    assert_int_equal(dev->active_qps, 1);
    /* No ring set up: no pair to switch to. */
    uint8_t r[4];
    EXPECT_ERR_UNCHANGED(dev, r, pairs_req(r, 2));
    all_pairs_ready(dev);
    uint64_t switches = dev->st.steering_switches;
    assert_int_equal(handle(dev, r, pairs_req(r, 4)), VN_CTRL_OK);
    assert_int_equal(dev->active_qps, 4);
    assert_int_equal(dev->st.steering_switches, switches + 1);
    /* A started device waits for the guest to drain its rings; with none
     * mapped there is nothing to wait for, and it is no timeout. */
    assert_true(atomic_load(&dev->drain_pending));
    assert_false(vn_dev_steering_hold(dev));
    assert_false(atomic_load(&dev->drain_pending));
    assert_int_equal(dev->st.steering_drain_timeouts, 0);
    /* A reset forgets the guest's configuration and the pairs. */
    uint8_t rr[512];
    assert_int_equal(handle(dev, rr, rss_req(rr, VN_HASH_TYPES_SUPPORTED, 8, TABLE, 0, 4, 40, 0)),
                     VN_CTRL_OK);
    vn_dev_reset(dev);
    assert_int_equal(dev->active_qps, 0);
    assert_false(dev->steer.rss.configured);
    assert_int_equal(dev->steer.rss.key_len, 0);
    assert_int_equal(dev->steer.policy, VN_POLICY_AUTO);
    assert_int_equal(vn_le16_get(steer_state(dev) + 8), 0);
}

/* ---- the operator's policy switch (SIGUSR1 in the daemon) ----------------- */

static void test_requested_policy(void **state)
{
    struct vn_dev *dev = *state;
    uint8_t r[512];
    assert_int_equal(handle(dev, r, rss_req(r, VN_HASH_TYPES_SUPPORTED, 8, TABLE, 0, 4, 40, 0)),
                     VN_CTRL_OK);
    struct snap before = snap_of(dev);
    /* Nothing requested, an unknown policy, the current one: no switch. */
    vn_dev_apply_requested_policy(dev);
    vn_dev_request_policy(dev, -1);
    vn_dev_request_policy(dev, VN_POLICY__COUNT);
    vn_dev_apply_requested_policy(dev);
    vn_dev_request_policy(dev, VN_POLICY_AUTO);
    vn_dev_apply_requested_policy(dev);
    assert_unchanged(dev, &before);
    /* Each real change is a switch; the RSS configuration stays. */
    const int seq[] = { VN_POLICY_SINGLE, VN_POLICY_RX_FOLLOWS_TX, VN_POLICY_RSS, VN_POLICY_AUTO };
    const int eff[] = { VN_POLICY_SINGLE, VN_POLICY_RX_FOLLOWS_TX, VN_POLICY_RSS, VN_POLICY_RSS };
    for (unsigned i = 0; i < 4; i++) {
        before = snap_of(dev);
        vn_dev_request_policy(dev, seq[i]);
        vn_dev_apply_requested_policy(dev);
        assert_int_equal(dev->steer.policy, seq[i]);
        assert_int_equal(vn_steering_effective(&dev->steer), eff[i]);
        /* No pair in use: nothing to learn for, whatever the policy. */
        assert_false(dev->learn_tx);
        assert_memory_equal(&dev->steer.rss, &before.rss, sizeof(before.rss));
        assert_switched(dev, &before);
        /* Not started: the pairs are those the device has (none). */
        assert_int_equal(dev->active_qps, 0);
        /* Applied once. */
        vn_dev_apply_requested_policy(dev);
        assert_int_equal(dev->st.steering_switches, before.switches + 1);
    }
}

/* ---- pairs the driver did not set up ------------------------------------------ */

/* Steering to a pair without receive ring (or a broken one) is refused:
 * VQ_PAIRS_SET naming it, an RSS table, unclassified queue or max_tx_vq
 * naming it. Commands within the ready pairs still work. */
static void test_pairs_not_ready(void **state)
{
    struct vn_dev *dev = *state;
    atomic_store(&dev->qp[2].rx_ready, false);
    uint8_t r[512];
    EXPECT_ERR_UNCHANGED(dev, r, pairs_req(r, 3));
    EXPECT_ERR_UNCHANGED(dev, r, pairs_req(r, 4));
    struct snap before = snap_of(dev);
    assert_int_equal(handle(dev, r, pairs_req(r, 2)), VN_CTRL_OK);
    assert_int_equal(dev->active_qps, 2);
    assert_switched(dev, &before);
    /* TABLE names pair 2. */
    EXPECT_ERR_UNCHANGED(dev, r, rss_req(r, VN_HASH_TYPES_SUPPORTED, 8, TABLE, 0, 4, 40, 0));
    EXPECT_ERR_UNCHANGED(dev, r, rss_req(r, VN_HASH_TYPES_SUPPORTED, 8, TABLE, 0, 2, 40, 0));
    static const uint16_t t01[4] = { 0, 1, 0, 1 };
    static const uint16_t t03[4] = { 0, 3, 0, 3 };
    /* The unclassified queue, max_tx_vq. */
    EXPECT_ERR_UNCHANGED(dev, r, rss_req(r, VN_HASH_TYPES_SUPPORTED, 4, t01, 2, 2, 40, 0));
    EXPECT_ERR_UNCHANGED(dev, r, rss_req(r, VN_HASH_TYPES_SUPPORTED, 4, t01, 0, 3, 40, 0));
    before = snap_of(dev);
    assert_int_equal(handle(dev, r, rss_req(r, VN_HASH_TYPES_SUPPORTED, 4, t03, 1, 2, 40, 0)),
                     VN_CTRL_OK);
    assert_switched(dev, &before);
    assert_true(dev->steer.rss.configured);
    /* HASH_CONFIG steers nothing anew. */
    assert_int_equal(handle(dev, r, hash_req(r, VN_HASH_TYPES_SUPPORTED, 40, 0)), VN_CTRL_OK);
    /* A broken receive ring is no target either. */
    dev->qp[1].rx.broken = true;
    EXPECT_ERR_UNCHANGED(dev, r, pairs_req(r, 2));
    before = snap_of(dev);
    assert_int_equal(handle(dev, r, pairs_req(r, 1)), VN_CTRL_OK);
    assert_switched(dev, &before);
}

#define D(fn) cmocka_unit_test_setup_teardown(fn, setup_dev, teardown_dev)

int main(void)
{
    const struct CMUnitTest tests[] = {
        D(test_vq_pairs_set_valid),
        D(test_vq_pairs_set_invalid),
        D(test_vq_pairs_set_needs_mq),
        D(test_vq_pairs_set_keeps_rss),
        D(test_mq_unknown_command),
        D(test_rss_config_valid),
        D(test_rss_config_needs_rss),
        D(test_rss_config_invalid),
        D(test_hash_config),
        D(test_switch_on_started_device),
        D(test_drain_grace),
        D(test_requested_policy),
        D(test_pairs_not_ready),
    };
    return cmocka_run_group_tests_name("ctrl_mq", tests, group_setup, group_teardown);
}
