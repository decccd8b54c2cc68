/* The control queue (ctrl.c): vn_ctrl_handle() for every command class, with
 * each request placed flush against a guard page so that reading one byte
 * past it crashes; and vn_ctrl_process() end to end through the synthetic
 * driver (acks, used lengths, counters, interrupts, broken rings, the budget
 * of commands per doorbell). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmocka.h>

#include "ctrl.h"
#include "device.h"
#include "fake_driver.h"
#include "le.h"
#include "net_hdr.h"

#define F(bit) (1ull << (bit))

static const uint8_t MAC[6] = { 0x52, 0x54, 0x00, 0xab, 0xcd, 0xef };
static const uint8_t MAC2[6] = { 0x52, 0x54, 0x00, 0x00, 0x00, 0x02 };

/* ---- request buffer flush against a guard page -------------------------- */

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

/* ---- device with a log hook --------------------------------------------- */

static unsigned n_logs, n_events;
static char last_log[512];

static void log_hook(void *py, int level, const char *msg)
{
    (void)py;
    (void)level;
    n_logs++;
    snprintf(last_log, sizeof(last_log), "%s", msg);
}

/* A guest that re-posts a command every time one is answered (a vCPU
 * racing the device): while flood_left > 0, each answered command makes
 * flood_head available again. */
static struct fd_vq *flood_q;
static uint16_t flood_head;
static unsigned flood_left;

static void event_hook(void *py, int event)
{
    (void)py;
    if (event == VN_EVENT_CTRL)
        n_events++;
    if (flood_q != NULL && flood_left > 0) {
        flood_left--;
        fd_vq_make_avail(flood_q, flood_head);
    }
}

static struct vn_dev *new_dev(uint64_t features)
{
    struct vn_dev *dev = vn_dev_new(1, MAC, 1500);
    assert_non_null(dev);
    struct vn_hooks h = { .log = log_hook, .event = event_hook };
    vn_dev_set_hooks(dev, &h);
    n_logs = n_events = 0;
    dev->features = features;
    return dev;
}

static int setup_dev(void **state)
{
    *state = new_dev(0);
    return 0;
}

static int teardown_dev(void **state)
{
    vn_dev_free(*state);
    return 0;
}

/* The filter must not change on a refused command. */
#define EXPECT_ERR_UNCHANGED(dev, req, len)                                    \
    do {                                                                       \
        struct vn_rx_filter before_;                                           \
        memcpy(&before_, &(dev)->filter, sizeof(before_));                     \
        assert_int_equal(handle((dev), (req), (len)), VN_CTRL_ERR);           \
        assert_memory_equal(&before_, &(dev)->filter, sizeof(before_));        \
    } while (0)

/* ---- vn_ctrl_handle ------------------------------------------------------ */

static void test_short_requests(void **state)
{
    struct vn_dev *dev = *state;
    dev->features = ~0ull;
    uint8_t r[2] = { VN_CTRL_RX, VN_CTRL_RX_PROMISC };
    EXPECT_ERR_UNCHANGED(dev, r, 0);
    EXPECT_ERR_UNCHANGED(dev, r, 1);
    EXPECT_ERR_UNCHANGED(dev, r, 2); /* header only: no on/off byte */
}

static void rx_switch(struct vn_dev *dev, uint8_t cmd, bool *field)
{
    dev->features = F(VN_F_CTRL_VQ) | F(VN_F_CTRL_RX);
    uint8_t off[3] = { VN_CTRL_RX, cmd, 0 };
    uint8_t on[3] = { VN_CTRL_RX, cmd, 1 };
    assert_int_equal(handle(dev, off, 3), VN_CTRL_OK);
    assert_false(*field);
    assert_int_equal(handle(dev, on, 3), VN_CTRL_OK);
    assert_true(*field);
    assert_int_equal(handle(dev, off, 3), VN_CTRL_OK);
    assert_false(*field);
    /* Not 0 or 1; too long. */
    uint8_t two[3] = { VN_CTRL_RX, cmd, 2 };
    uint8_t ff[3] = { VN_CTRL_RX, cmd, 0xff };
    uint8_t longer[4] = { VN_CTRL_RX, cmd, 1, 0 };
    EXPECT_ERR_UNCHANGED(dev, two, 3);
    EXPECT_ERR_UNCHANGED(dev, ff, 3);
    EXPECT_ERR_UNCHANGED(dev, longer, 4);
    EXPECT_ERR_UNCHANGED(dev, on, 2);
    /* CTRL_RX not negotiated. */
    dev->features = F(VN_F_CTRL_VQ);
    EXPECT_ERR_UNCHANGED(dev, on, 3);
    assert_false(*field);
}

static void test_rx_promisc(void **state)
{
    struct vn_dev *dev = *state;
    assert_true(dev->filter.promisc); /* the reset state */
    rx_switch(dev, VN_CTRL_RX_PROMISC, &dev->filter.promisc);
}

static void test_rx_allmulti(void **state)
{
    struct vn_dev *dev = *state;
    rx_switch(dev, VN_CTRL_RX_ALLMULTI, &dev->filter.allmulti);
}

static void test_rx_unknown_commands(void **state)
{
    struct vn_dev *dev = *state;
    dev->features = ~0ull;
    /* ALLUNI, NOMULTI, NOUNI, NOBCAST (CTRL_RX_EXTRA is not offered), junk. */
    const uint8_t cmds[] = { 2, 3, 4, 5, 0x80, 0xff };
    for (unsigned i = 0; i < sizeof(cmds); i++) {
        uint8_t r[3] = { VN_CTRL_RX, cmds[i], 1 };
        EXPECT_ERR_UNCHANGED(dev, r, 3);
    }
}

/* struct virtio_net_ctrl_mac tables: le32 entries, then 6-byte addresses. */
static size_t mac_table_cmd(uint8_t *out, uint32_t n_uc, uint32_t uc_have, uint32_t n_mc,
                            uint32_t mc_have)
{
    size_t at = 0;
    out[at++] = VN_CTRL_MAC;
    out[at++] = VN_CTRL_MAC_TABLE_SET;
    vn_le32_put(out + at, n_uc);
    at += 4;
    for (uint32_t i = 0; i < uc_have; i++) {
        uint8_t a[6] = { 0x02, 0x11, 0, 0, (uint8_t)(i >> 8), (uint8_t)i };
        memcpy(out + at, a, 6);
        at += 6;
    }
    vn_le32_put(out + at, n_mc);
    at += 4;
    for (uint32_t i = 0; i < mc_have; i++) {
        uint8_t a[6] = { 0x01, 0x00, 0x5e, 0, (uint8_t)(i >> 8), (uint8_t)i };
        memcpy(out + at, a, 6);
        at += 6;
    }
    return at;
}

static uint8_t big[2 + 8 + 6 * 1000];

static void test_mac_table_set_valid(void **state)
{
    struct vn_dev *dev = *state;
    dev->features = F(VN_F_CTRL_VQ) | F(VN_F_CTRL_RX);
    dev->filter.promisc = false;
    dev->filter.uni_overflow = dev->filter.multi_overflow = true;
    size_t len = mac_table_cmd(big, 2, 2, 3, 3);
    assert_int_equal(len, 2 + 4 + 12 + 4 + 18);
    assert_int_equal(handle(dev, big, len), VN_CTRL_OK);
    const struct vn_rx_filter *f = &dev->filter;
    assert_false(f->uni_overflow);
    assert_false(f->multi_overflow);
    assert_int_equal(f->n_uc, 2);
    assert_int_equal(f->n_mc, 3);
    assert_memory_equal(f->uc[0], big + 6, 6);
    assert_memory_equal(f->uc[1], big + 12, 6);
    assert_memory_equal(f->mc[0], big + 22, 6);
    assert_memory_equal(f->mc[2], big + 34, 6);
    assert_true(vn_rx_filter_accepts(f, f->uc[1]));
    assert_true(vn_rx_filter_accepts(f, f->mc[2]));
    uint8_t other_mc[6] = { 0x01, 0x00, 0x5e, 0, 0, 9 };
    assert_false(vn_rx_filter_accepts(f, other_mc));
    /* Both tables emptied again. */
    len = mac_table_cmd(big, 0, 0, 0, 0);
    assert_int_equal(len, 10);
    assert_int_equal(handle(dev, big, len), VN_CTRL_OK);
    assert_int_equal(f->n_uc, 0);
    assert_int_equal(f->n_mc, 0);
    assert_false(vn_rx_filter_accepts(f, other_mc));
    assert_true(vn_rx_filter_accepts(f, MAC));
}

static void test_mac_table_set_full(void **state)
{
    struct vn_dev *dev = *state;
    dev->features = F(VN_F_CTRL_VQ) | F(VN_F_CTRL_RX);
    size_t len = mac_table_cmd(big, VN_MAC_TABLE_ENTRIES, VN_MAC_TABLE_ENTRIES,
                               VN_MAC_TABLE_ENTRIES, VN_MAC_TABLE_ENTRIES);
    assert_int_equal(handle(dev, big, len), VN_CTRL_OK);
    assert_int_equal(dev->filter.n_uc, VN_MAC_TABLE_ENTRIES);
    assert_int_equal(dev->filter.n_mc, VN_MAC_TABLE_ENTRIES);
    assert_false(dev->filter.uni_overflow);
    assert_false(dev->filter.multi_overflow);
    assert_memory_equal(dev->filter.mc[VN_MAC_TABLE_ENTRIES - 1], big + len - 6, 6);
}

static void test_mac_table_set_overflow(void **state)
{
    struct vn_dev *dev = *state;
    dev->features = F(VN_F_CTRL_VQ) | F(VN_F_CTRL_RX);
    dev->filter.promisc = false;
    /* More unicast addresses than the table holds: accept all unicast. */
    size_t len = mac_table_cmd(big, VN_MAC_TABLE_ENTRIES + 1, VN_MAC_TABLE_ENTRIES + 1, 1, 1);
    assert_int_equal(handle(dev, big, len), VN_CTRL_OK);
    assert_true(dev->filter.uni_overflow);
    assert_false(dev->filter.multi_overflow);
    assert_int_equal(dev->filter.n_uc, 0);
    assert_int_equal(dev->filter.n_mc, 1);
    assert_true(vn_rx_filter_accepts(&dev->filter, MAC2));
    /* Same for multicast, with 200 of them. */
    len = mac_table_cmd(big, 1, 1, 200, 200);
    assert_int_equal(handle(dev, big, len), VN_CTRL_OK);
    assert_false(dev->filter.uni_overflow);
    assert_true(dev->filter.multi_overflow);
    assert_int_equal(dev->filter.n_uc, 1);
    assert_int_equal(dev->filter.n_mc, 0);
    uint8_t any_mc[6] = { 0x33, 0x33, 1, 2, 3, 4 };
    assert_true(vn_rx_filter_accepts(&dev->filter, any_mc));
    assert_false(vn_rx_filter_accepts(&dev->filter, MAC2));
}

static void test_mac_table_set_truncated(void **state)
{
    struct vn_dev *dev = *state;
    dev->features = F(VN_F_CTRL_VQ) | F(VN_F_CTRL_RX);
    dev->filter.promisc = false;
    size_t len = mac_table_cmd(big, 3, 3, 2, 2);
    /* Every proper prefix is refused, without reading past its end. */
    for (size_t l = 2; l < len; l++)
        EXPECT_ERR_UNCHANGED(dev, big, l);
    /* Counts larger than the addresses present. */
    len = mac_table_cmd(big, 3, 2, 0, 0);
    EXPECT_ERR_UNCHANGED(dev, big, len);
    len = mac_table_cmd(big, 0, 0, 2, 1);
    EXPECT_ERR_UNCHANGED(dev, big, len);
    /* The multicast table missing altogether. */
    len = mac_table_cmd(big, 1, 1, 0, 0) - 4;
    EXPECT_ERR_UNCHANGED(dev, big, len);
}

static void test_mac_table_set_overlong(void **state)
{
    struct vn_dev *dev = *state;
    dev->features = F(VN_F_CTRL_VQ) | F(VN_F_CTRL_RX);
    dev->filter.promisc = false;
    size_t len = mac_table_cmd(big, 1, 1, 1, 1);
    EXPECT_ERR_UNCHANGED(dev, big, len + 1);
    EXPECT_ERR_UNCHANGED(dev, big, len + 6);
    /* Counts smaller than the addresses present. */
    len = mac_table_cmd(big, 1, 2, 1, 1);
    EXPECT_ERR_UNCHANGED(dev, big, len);
    len = mac_table_cmd(big, 1, 1, 0, 1);
    EXPECT_ERR_UNCHANGED(dev, big, len);
}

static void test_mac_table_set_huge_counts(void **state)
{
    struct vn_dev *dev = *state;
    dev->features = F(VN_F_CTRL_VQ) | F(VN_F_CTRL_RX);
    /* Entry counts whose 6 * n wraps 32 bits (0x2aaaaaab * 6 = 2^32 + 2). */
    const uint32_t counts[] = { 0xffffffffu, 0x80000000u, 0x2aaaaaabu, 0x2aaaaaaau,
                                VN_MAC_TABLE_ENTRIES + 1 };
    for (unsigned i = 0; i < sizeof(counts) / sizeof(counts[0]); i++) {
        size_t len = mac_table_cmd(big, counts[i], 1, 1, 1);
        EXPECT_ERR_UNCHANGED(dev, big, len);
        len = mac_table_cmd(big, 1, 1, counts[i], 1);
        EXPECT_ERR_UNCHANGED(dev, big, len);
        len = mac_table_cmd(big, 0, 0, counts[i], 0);
        EXPECT_ERR_UNCHANGED(dev, big, len);
    }
}

static void test_mac_table_set_needs_ctrl_rx(void **state)
{
    struct vn_dev *dev = *state;
    dev->features = F(VN_F_CTRL_VQ) | F(VN_F_CTRL_MAC_ADDR);
    size_t len = mac_table_cmd(big, 1, 1, 1, 1);
    EXPECT_ERR_UNCHANGED(dev, big, len);
}

static void test_mac_addr_set(void **state)
{
    struct vn_dev *dev = *state;
    dev->features = F(VN_F_CTRL_VQ) | F(VN_F_CTRL_MAC_ADDR);
    uint8_t r[9] = { VN_CTRL_MAC, VN_CTRL_MAC_ADDR_SET };
    memcpy(r + 2, MAC2, 6);
    EXPECT_ERR_UNCHANGED(dev, r, 7);
    EXPECT_ERR_UNCHANGED(dev, r, 9);
    EXPECT_ERR_UNCHANGED(dev, r, 2);
    assert_int_equal(handle(dev, r, 8), VN_CTRL_OK);
    uint8_t mac[6];
    vn_dev_get_mac(dev, mac);
    assert_memory_equal(mac, MAC2, 6);
    dev->filter.promisc = false;
    assert_true(vn_rx_filter_accepts(&dev->filter, MAC2));
    assert_false(vn_rx_filter_accepts(&dev->filter, MAC));
    /* Not negotiated. */
    dev->features = F(VN_F_CTRL_VQ) | F(VN_F_CTRL_RX);
    memcpy(r + 2, MAC, 6);
    EXPECT_ERR_UNCHANGED(dev, r, 8);
}

static void test_mac_unknown_command(void **state)
{
    struct vn_dev *dev = *state;
    dev->features = ~0ull;
    uint8_t r[8] = { VN_CTRL_MAC, 2 };
    EXPECT_ERR_UNCHANGED(dev, r, 8);
    r[1] = 0xff;
    EXPECT_ERR_UNCHANGED(dev, r, 8);
}

static void test_announce_ack(void **state)
{
    struct vn_dev *dev = *state;
    dev->features = F(VN_F_CTRL_VQ) | F(VN_F_GUEST_ANNOUNCE);
    uint8_t r[3] = { VN_CTRL_ANNOUNCE, VN_CTRL_ANNOUNCE_ACK, 0 };
    vn_dev_set_announce(dev, true);
    assert_int_equal(handle(dev, r, 3), VN_CTRL_ERR); /* no payload expected */
    assert_true(vn_dev_get_announce(dev));
    r[1] = 1;
    assert_int_equal(handle(dev, r, 2), VN_CTRL_ERR);
    assert_true(vn_dev_get_announce(dev));
    r[1] = VN_CTRL_ANNOUNCE_ACK;
    assert_int_equal(handle(dev, r, 2), VN_CTRL_OK);
    assert_false(vn_dev_get_announce(dev));
    /* A second ack is harmless. */
    assert_int_equal(handle(dev, r, 2), VN_CTRL_OK);
    /* GUEST_ANNOUNCE not negotiated. */
    dev->features = F(VN_F_CTRL_VQ) | F(VN_F_CTRL_RX);
    vn_dev_set_announce(dev, true);
    assert_int_equal(handle(dev, r, 2), VN_CTRL_ERR);
    assert_true(vn_dev_get_announce(dev));
}

static uint8_t offloads(struct vn_dev *dev, uint64_t want, size_t len)
{
    uint8_t r[11] = { VN_CTRL_GUEST_OFFLOADS, VN_CTRL_GUEST_OFFLOADS_SET };
    uint64_t le = htole64(want);
    memcpy(r + 2, &le, 8);
    return handle(dev, r, len);
}

static void test_guest_offloads(void **state)
{
    struct vn_dev *dev = *state;
    dev->features = F(VN_F_CTRL_VQ) | F(VN_F_CTRL_GUEST_OFFLOADS) | F(VN_F_GUEST_CSUM) |
                    F(VN_F_GUEST_TSO4) | F(VN_F_HOST_TSO6) | F(VN_F_CTRL_RX);
    assert_int_equal(offloads(dev, F(VN_F_GUEST_CSUM) | F(VN_F_GUEST_TSO4), 10), VN_CTRL_OK);
    assert_int_equal(offloads(dev, F(VN_F_GUEST_CSUM), 10), VN_CTRL_OK);
    assert_int_equal(offloads(dev, 0, 10), VN_CTRL_OK);
    /* Offloads that were not negotiated, non-offload bits (even negotiated
     * ones), unknown bits. */
    assert_int_equal(offloads(dev, F(VN_F_GUEST_TSO6), 10), VN_CTRL_ERR);
    assert_int_equal(offloads(dev, F(VN_F_GUEST_CSUM) | F(VN_F_GUEST_UFO), 10), VN_CTRL_ERR);
    assert_int_equal(offloads(dev, F(VN_F_GUEST_ECN), 10), VN_CTRL_ERR);
    assert_int_equal(offloads(dev, F(VN_F_CTRL_RX), 10), VN_CTRL_ERR);
    assert_int_equal(offloads(dev, F(VN_F_HOST_TSO6), 10), VN_CTRL_ERR);
    assert_int_equal(offloads(dev, F(63), 10), VN_CTRL_ERR);
    /* Wrong length or command. */
    assert_int_equal(offloads(dev, F(VN_F_GUEST_CSUM), 9), VN_CTRL_ERR);
    assert_int_equal(offloads(dev, F(VN_F_GUEST_CSUM), 11), VN_CTRL_ERR);
    assert_int_equal(offloads(dev, 0, 2), VN_CTRL_ERR);
    uint8_t r[10] = { VN_CTRL_GUEST_OFFLOADS, 1 };
    assert_int_equal(handle(dev, r, 10), VN_CTRL_ERR);
    /* CTRL_GUEST_OFFLOADS not negotiated. */
    dev->features &= ~F(VN_F_CTRL_GUEST_OFFLOADS);
    assert_int_equal(offloads(dev, F(VN_F_GUEST_CSUM), 10), VN_CTRL_ERR);
}

/* The TAP refusing the new offloads is reported to the driver. */
static void test_guest_offloads_tap_refuses(void **state)
{
    struct vn_dev *dev = *state;
    dev->features = F(VN_F_CTRL_VQ) | F(VN_F_CTRL_GUEST_OFFLOADS) | F(VN_F_GUEST_CSUM);
    int not_a_tap = eventfd(0, EFD_CLOEXEC);
    assert_true(not_a_tap >= 0);
    dev->active_qps = 1;
    dev->qp[0].tap_fd = not_a_tap;
    assert_int_equal(offloads(dev, F(VN_F_GUEST_CSUM), 10), VN_CTRL_ERR);
    dev->qp[0].tap_fd = -1;
    dev->active_qps = 0;
    close(not_a_tap);
}

static void test_unknown_class(void **state)
{
    struct vn_dev *dev = *state;
    dev->features = ~0ull;
    /* 6 and up, junk. */
    const uint8_t classes[] = { 6, 7, 0x7f, 0xff };
    for (unsigned i = 0; i < sizeof(classes); i++) {
        for (uint8_t cmd = 0; cmd < 3; cmd++) {
            uint8_t r[4] = { classes[i], cmd, 1, 0 };
            EXPECT_ERR_UNCHANGED(dev, r, 2);
            EXPECT_ERR_UNCHANGED(dev, r, 3);
            EXPECT_ERR_UNCHANGED(dev, r, 4);
        }
    }
}

/* 802.1Q frame to the device's MAC with VLAN ID vid (untagged: vid < 0). */
static size_t vlan_frame(uint8_t *f, int vid)
{
    memset(f, 0, 64);
    memset(f, 0xff, 6);
    if (vid < 0) {
        f[12] = 0x08;
        return 60;
    }
    f[12] = 0x81;
    f[14] = (uint8_t)(vid >> 8);
    f[15] = (uint8_t)vid;
    f[16] = 0x08;
    return 64;
}

static void test_vlan_filter(void **state)
{
    struct vn_dev *dev = *state;
    uint8_t f[64];
    /* Not negotiated: no filter, and the commands are refused. */
    dev->features = ~0ull & ~(1ull << VN_F_CTRL_VLAN);
    uint8_t add100[4] = { VN_CTRL_VLAN, VN_CTRL_VLAN_ADD, 100, 0 };
    EXPECT_ERR_UNCHANGED(dev, add100, 4);
    assert_true(vn_rx_filter_vlan_accepts(&dev->filter, f, vlan_frame(f, 200)));

    dev->features = ~0ull;
    dev->filter.vlan_filter = true; /* as vn_dev_start sets it */
    assert_int_equal(handle(dev, add100, 4), VN_CTRL_OK);
    assert_true(vn_rx_filter_vlan_accepts(&dev->filter, f, vlan_frame(f, 100)));
    assert_false(vn_rx_filter_vlan_accepts(&dev->filter, f, vlan_frame(f, 200)));
    assert_true(vn_rx_filter_vlan_accepts(&dev->filter, f, vlan_frame(f, -1)));
    /* Priority bits are not part of the ID; a frame cut before its tag passes. */
    vlan_frame(f, 100);
    f[14] |= 0xe0;
    assert_true(vn_rx_filter_vlan_accepts(&dev->filter, f, 64));
    assert_true(vn_rx_filter_vlan_accepts(&dev->filter, f, 15));
    /* Malformed: a length other than 2, an ID of 4096 or more, another command. */
    uint8_t bad[][5] = {
        { VN_CTRL_VLAN, VN_CTRL_VLAN_ADD, 0x00, 0x10, 0 },
        { VN_CTRL_VLAN, VN_CTRL_VLAN_ADD, 0xff, 0xff, 0 },
        { VN_CTRL_VLAN, 2, 100, 0, 0 },
    };
    for (unsigned i = 0; i < 3; i++)
        EXPECT_ERR_UNCHANGED(dev, bad[i], 4);
    EXPECT_ERR_UNCHANGED(dev, add100, 3);
    uint8_t five[5] = { VN_CTRL_VLAN, VN_CTRL_VLAN_ADD, 100, 0, 0 };
    EXPECT_ERR_UNCHANGED(dev, five, 5);
    uint8_t del100[4] = { VN_CTRL_VLAN, VN_CTRL_VLAN_DEL, 100, 0 };
    assert_int_equal(handle(dev, del100, 4), VN_CTRL_OK);
    assert_false(vn_rx_filter_vlan_accepts(&dev->filter, f, vlan_frame(f, 100)));
    /* A reset empties the table and turns the filter off. */
    assert_int_equal(handle(dev, add100, 4), VN_CTRL_OK);
    vn_rx_filter_reset(&dev->filter, dev->default_mac);
    assert_true(vn_rx_filter_vlan_accepts(&dev->filter, f, vlan_frame(f, 200)));
    for (unsigned w = 0; w < 64; w++)
        assert_int_equal(dev->filter.vlans[w], 0);
}

/* ---- vn_ctrl_process through the control queue --------------------------- */

#define CTRL_QSIZE 16
#define CTRL_VECTOR 3
#define CONFIG_VECTOR 0

struct cfx {
    struct vn_dev *dev;
    struct fd_guest g;
    struct fd_vq q;
};

static struct cfx *cfx_new(uint64_t features)
{
    struct cfx *x = calloc(1, sizeof(*x));
    assert_non_null(x);
    x->dev = new_dev(0);
    x->dev->vfu = &fd_fake_vfu_ctx;
    fd_irq_reset();
    fd_guest_init(&x->g, &x->dev->mem);
    fd_vq_init(&x->q, &x->g, 0, CTRL_QSIZE);
    assert_int_equal(vn_dev_config_queue(x->dev, 2, CTRL_QSIZE, x->q.desc, x->q.avail, x->q.used,
                                         CTRL_VECTOR),
                     0);
    vn_dev_set_config_vector(x->dev, CONFIG_VECTOR);
    assert_int_equal(vn_dev_start(x->dev, features), 0);
    return x;
}

static const uint64_t CTRL_FEATURES = F(VN_F_VERSION_1) | F(VN_F_CTRL_VQ) | F(VN_F_CTRL_RX) |
                                      F(VN_F_CTRL_MAC_ADDR) | F(VN_F_RING_INDIRECT_DESC);

static int setup_cfx(void **state)
{
    *state = cfx_new(CTRL_FEATURES);
    return 0;
}

static int setup_cfx_event_idx(void **state)
{
    *state = cfx_new(CTRL_FEATURES | F(VN_F_RING_EVENT_IDX));
    return 0;
}

static int teardown_cfx(void **state)
{
    struct cfx *x = *state;
    flood_q = NULL;
    vn_dev_reset(x->dev); /* joins the worker before guest memory goes */
    fd_guest_destroy(&x->g);
    x->dev->vfu = NULL;
    vn_dev_free(x->dev);
    free(x);
    return 0;
}

/* Lay a command out like Linux does (header, payload, ack: separate
 * buffers) and make it available; returns the ack buffer's address. */
static uint64_t queue_cmd(struct cfx *x, const uint8_t *cmd, size_t len, uint32_t ack_len)
{
    struct fd_buf b[3];
    unsigned n = 0;
    uint64_t hdr = fd_alloc(&x->g, 1, 2, 1);
    fd_write(&x->g, hdr, cmd, 2);
    b[n++] = (struct fd_buf){ hdr, 2, false };
    if (len > 2) {
        uint64_t data = fd_alloc(&x->g, 1, len - 2, 1);
        fd_write(&x->g, data, cmd + 2, len - 2);
        b[n++] = (struct fd_buf){ data, (uint32_t)(len - 2), false };
    }
    uint64_t ack = fd_alloc(&x->g, 1, ack_len, 1);
    memset(fd_hva(&x->g, ack, ack_len), 0xee, ack_len);
    b[n++] = (struct fd_buf){ ack, ack_len, true };
    fd_vq_add(&x->q, b, n);
    return ack;
}

static void doorbell(struct cfx *x)
{
    vn_dev_doorbell(x->dev, 2);
}

static void expect_used(struct cfx *x, uint32_t len_expected)
{
    uint32_t id, len;
    assert_true(fd_vq_get_used(&x->q, &id, &len));
    assert_int_equal(len, len_expected);
}

/* The ack is the first device-writable byte (struct virtio_net_ctrl). */
static uint8_t ack_of(struct cfx *x, uint64_t ack, uint32_t ack_len)
{
    (void)ack_len;
    uint8_t v;
    fd_read(&x->g, ack, &v, 1);
    return v;
}

static void test_process_command(void **state)
{
    struct cfx *x = *state;
    uint8_t cmd[3] = { VN_CTRL_RX, VN_CTRL_RX_PROMISC, 0 };
    uint64_t ack = queue_cmd(x, cmd, 3, 1);
    doorbell(x);
    expect_used(x, 1);
    assert_int_equal(ack_of(x, ack, 1), VN_CTRL_OK);
    assert_false(x->dev->filter.promisc);
    assert_int_equal(x->dev->st.ctrl_ok, 1);
    assert_int_equal(x->dev->st.ctrl_err, 0);
    assert_int_equal(x->dev->ctrl_stats.doorbells, 1);
    assert_int_equal(x->dev->ctrl_stats.interrupts, 1);
    assert_int_equal(fd_irq_count(CTRL_VECTOR), 1);
    assert_int_equal(vn_dev_get_irq_count(x->dev, CTRL_VECTOR), 1);
    assert_int_equal(n_events, 1);
    /* A refused command: ERR in the ack, still one byte written. The ack
     * buffer is larger than one byte: the ack is its first byte and the
     * rest stays untouched. */
    uint8_t bad[3] = { VN_CTRL_RX, VN_CTRL_RX_PROMISC, 7 };
    ack = queue_cmd(x, bad, 3, 4);
    doorbell(x);
    expect_used(x, 1);
    assert_int_equal(ack_of(x, ack, 4), VN_CTRL_ERR);
    uint8_t untouched;
    fd_read(&x->g, ack + 3, &untouched, 1);
    assert_int_equal(untouched, 0xee);
    assert_int_equal(x->dev->st.ctrl_err, 1);
    assert_false(x->dev->filter.promisc);
    assert_false(vn_dev_get_needs_reset(x->dev));
    fd_assert_no_errors(&x->dev->ctrl_stats);
}

/* One command spread over many descriptors, through an indirect table. */
static void test_process_split_and_indirect(void **state)
{
    struct cfx *x = *state;
    size_t len = mac_table_cmd(big, 2, 2, 1, 1);
    uint64_t data = fd_alloc(&x->g, 0, len, 1);
    fd_write(&x->g, data, big, len);
    uint64_t ack = fd_alloc(&x->g, 1, 1, 1);
    /* One buffer per byte for the first 7 bytes, then the rest, then a
     * zero-length buffer, then the ack. */
    struct fd_buf b[10];
    unsigned n = 0;
    for (unsigned i = 0; i < 7; i++)
        b[n++] = (struct fd_buf){ data + i, 1, false };
    b[n++] = (struct fd_buf){ data + 7, (uint32_t)(len - 7), false };
    b[n++] = (struct fd_buf){ data, 0, false };
    b[n++] = (struct fd_buf){ ack, 1, true };
    uint64_t t = fd_indirect_table(&x->g, 1, b, n);
    fd_vq_desc(&x->q, 0, t, 16 * n, VRING_DESC_F_INDIRECT, 0);
    fd_vq_make_avail(&x->q, 0);
    doorbell(x);
    expect_used(x, 1);
    assert_int_equal(ack_of(x, ack, 1), VN_CTRL_OK);
    assert_int_equal(x->dev->filter.n_uc, 2);
    assert_int_equal(x->dev->filter.n_mc, 1);
    assert_memory_equal(x->dev->filter.mc[0], big + len - 6, 6);
    fd_assert_errors(&x->dev->ctrl_stats, VN_ERR_ZERO_LENGTH, 1);
}

/* Commands the device cannot answer: returned with length 0. */
static void test_process_malformed_chains(void **state)
{
    struct cfx *x = *state;
    /* No device-writable byte for the ack. */
    uint64_t hdr = fd_alloc(&x->g, 1, 3, 1);
    fd_write(&x->g, hdr, (uint8_t[]){ VN_CTRL_RX, VN_CTRL_RX_PROMISC, 0 }, 3);
    fd_vq_add(&x->q, &(struct fd_buf){ hdr, 3, false }, 1);
    doorbell(x);
    expect_used(x, 0);
    assert_true(x->dev->filter.promisc);
    /* Payload outside guest memory (straddling regions A and B). */
    struct fd_buf b[2] = { { FD_GPA_B - 2, 3, false }, { fd_alloc(&x->g, 1, 1, 1), 1, true } };
    fd_vq_add(&x->q, b, 2);
    doorbell(x);
    expect_used(x, 0);
    assert_int_equal(x->dev->st.ctrl_err, 2);
    assert_int_equal(x->dev->st.ctrl_ok, 0);
    fd_assert_errors(&x->dev->ctrl_stats, VN_ERR_DESC_ADDR, 1);
    assert_true(x->dev->filter.promisc);
    assert_false(vn_dev_get_needs_reset(x->dev));
    /* The queue still works. */
    uint8_t cmd[3] = { VN_CTRL_RX, VN_CTRL_RX_ALLMULTI, 1 };
    uint64_t ack = queue_cmd(x, cmd, 3, 1);
    doorbell(x);
    expect_used(x, 1);
    assert_int_equal(ack_of(x, ack, 1), VN_CTRL_OK);
    assert_true(x->dev->filter.allmulti);
}

/* Linux sends its whole address lists in MAC_TABLE_SET: hundreds of
 * addresses (here 3010 bytes) must overflow to "accept all", not be
 * refused for their size. */
static void test_process_long_mac_table(void **state)
{
    struct cfx *x = *state;
    x->dev->filter.promisc = false;
    size_t len = mac_table_cmd(big, 300, 300, 200, 200);
    assert_true(len > 2048);
    uint64_t data = fd_alloc(&x->g, 0, len, 1);
    fd_write(&x->g, data, big, len);
    uint64_t ack = fd_alloc(&x->g, 1, 1, 1);
    struct fd_buf b[4] = { { data, 2, false },
                           { data + 2, 4 + 300 * 6, false },
                           { data + 2 + 4 + 300 * 6, (uint32_t)(len - 2 - 4 - 300 * 6), false },
                           { ack, 1, true } };
    fd_vq_add(&x->q, b, 4);
    doorbell(x);
    expect_used(x, 1);
    assert_int_equal(ack_of(x, ack, 1), VN_CTRL_OK);
    assert_true(x->dev->filter.uni_overflow);
    assert_true(x->dev->filter.multi_overflow);
    uint8_t mc[6] = { 0x01, 0x00, 0x5e, 0, 0, 199 };
    assert_true(vn_rx_filter_accepts(&x->dev->filter, mc));
}

/* A request longer than the device takes (64 KiB) is refused, not copied,
 * even a well-formed one. */
static void test_process_oversized_request(void **state)
{
    struct cfx *x = *state;
    const uint32_t n_uc = (64 * 1024 - 10) / 6 + 1;
    const uint32_t lens[] = { 2 + 4 + 6 * n_uc + 4, 192 * 1024 };
    assert_true(lens[0] > 64 * 1024);
    for (unsigned i = 0; i < 2; i++) {
        uint64_t data = fd_alloc(&x->g, i, lens[i], 1);
        size_t n = mac_table_cmd(big, n_uc, 0, 0, 0);
        fd_write(&x->g, data, big, n - 4);
        fd_write(&x->g, data + lens[0] - 4, big + n - 4, 4);
        uint64_t ack = fd_alloc(&x->g, 1, 1, 1);
        struct fd_buf b[2] = { { data, lens[i], false }, { ack, 1, true } };
        fd_vq_add(&x->q, b, 2);
        doorbell(x);
        expect_used(x, 1);
        assert_int_equal(ack_of(x, ack, 1), VN_CTRL_ERR);
        assert_int_equal(x->dev->st.ctrl_err, i + 1);
    }
}

/* Several commands per doorbell; with EVENT_IDX the control queue keeps
 * asking for doorbells (avail_event follows), and one interrupt covers all. */
static void test_process_batch_event_idx(void **state)
{
    struct cfx *x = *state;
    uint8_t c1[3] = { VN_CTRL_RX, VN_CTRL_RX_PROMISC, 0 };
    uint8_t c2[3] = { VN_CTRL_RX, VN_CTRL_RX_ALLMULTI, 1 };
    uint8_t c3[8] = { VN_CTRL_MAC, VN_CTRL_MAC_ADDR_SET };
    memcpy(c3 + 2, MAC2, 6);
    uint16_t old = x->q.avail_idx;
    uint64_t a1 = queue_cmd(x, c1, 3, 1);
    assert_true(fd_vq_kick_needed(&x->q, true, old));
    old = x->q.avail_idx;
    uint64_t a2 = queue_cmd(x, c2, 3, 1);
    uint64_t a3 = queue_cmd(x, c3, 8, 1);
    fd_vq_set_used_event(&x->q, 0);
    doorbell(x);
    for (int i = 0; i < 3; i++)
        expect_used(x, 1);
    assert_int_equal(ack_of(x, a1, 1), VN_CTRL_OK);
    assert_int_equal(ack_of(x, a2, 1), VN_CTRL_OK);
    assert_int_equal(ack_of(x, a3, 1), VN_CTRL_OK);
    assert_int_equal(fd_irq_count(CTRL_VECTOR), 1);
    assert_int_equal(fd_vq_avail_event(&x->q), 3);
    /* The next command needs a kick again. */
    old = x->q.avail_idx;
    uint8_t c4[3] = { VN_CTRL_RX, VN_CTRL_RX_PROMISC, 1 };
    uint64_t a4 = queue_cmd(x, c4, 3, 1);
    assert_true(fd_vq_kick_needed(&x->q, true, old));
    /* The driver asked for no interrupt before used idx passes 10. */
    fd_vq_set_used_event(&x->q, 10);
    doorbell(x);
    expect_used(x, 1);
    assert_int_equal(ack_of(x, a4, 1), VN_CTRL_OK);
    assert_int_equal(fd_irq_count(CTRL_VECTOR), 1);
    assert_true(x->dev->filter.promisc);
    assert_true(x->dev->filter.allmulti);
    assert_int_equal(x->dev->st.ctrl_ok, 4);
}

/* A corrupt ring breaks the device (DEVICE_NEEDS_RESET + config interrupt). */
static void test_process_corrupt_ring(void **state)
{
    struct cfx *x = *state;
    fd_vq_make_avail(&x->q, CTRL_QSIZE); /* head out of range */
    doorbell(x);
    assert_true(vn_dev_get_needs_reset(x->dev));
    assert_int_equal(x->dev->st.needs_reset, 1);
    assert_int_equal(fd_irq_count(CONFIG_VECTOR), 1);
    assert_int_equal(fd_vq_used_idx(&x->q), 0);
    fd_assert_errors(&x->dev->ctrl_stats, VN_ERR_HEAD_INDEX, 1);
    /* Later doorbells do nothing (not ready) and do not raise it again. */
    doorbell(x);
    assert_int_equal(fd_irq_count(CONFIG_VECTOR), 1);
    assert_int_equal(x->dev->st.needs_reset, 1);
    /* A reset and a new start bring the queue back. */
    vn_dev_reset(x->dev);
    assert_false(vn_dev_get_needs_reset(x->dev));
    x->q.avail_idx = x->q.last_used = 0;
    memset(fd_hva(&x->g, x->q.avail, 6 + 2 * CTRL_QSIZE), 0, 6 + 2 * CTRL_QSIZE);
    memset(fd_hva(&x->g, x->q.used, 6 + 8 * CTRL_QSIZE), 0, 6 + 8 * CTRL_QSIZE);
    assert_int_equal(vn_dev_config_queue(x->dev, 2, CTRL_QSIZE, x->q.desc, x->q.avail, x->q.used,
                                         CTRL_VECTOR),
                     0);
    assert_int_equal(vn_dev_start(x->dev, CTRL_FEATURES), 0);
    uint8_t cmd[3] = { VN_CTRL_RX, VN_CTRL_RX_PROMISC, 0 };
    uint64_t ack = queue_cmd(x, cmd, 3, 1);
    doorbell(x);
    expect_used(x, 1);
    assert_int_equal(ack_of(x, ack, 1), VN_CTRL_OK);
}

/* A failing interrupt is counted, not fatal. */
static void test_process_irq_failure(void **state)
{
    struct cfx *x = *state;
    fd_irq_fail(true);
    uint8_t cmd[3] = { VN_CTRL_RX, VN_CTRL_RX_PROMISC, 0 };
    uint64_t ack = queue_cmd(x, cmd, 3, 1);
    doorbell(x);
    expect_used(x, 1);
    assert_int_equal(ack_of(x, ack, 1), VN_CTRL_OK);
    assert_int_equal(x->dev->st.irq_errors, 1);
    assert_int_equal(vn_dev_get_irq_count(x->dev, CTRL_VECTOR), 0);
    fd_irq_fail(false);
}

/* Nothing but the command eventfd's count (non-blocking: 0 when unset). */
static uint64_t take_cmd_fd(struct cfx *x)
{
    eventfd_t v = 0;
    if (eventfd_read(x->dev->cmd_fd, &v) < 0)
        return 0;
    return v;
}

/* A guest keeping the control queue busy (re-posting as fast as commands are
 * answered) does not keep the context thread there: one doorbell answers
 * VN_CTRL_BUDGET commands, publishes them with an interrupt, counts the
 * budget hit and wakes the context thread's loop (cmd_fd), which serves its
 * other work (messages, stop) first and then goes on with the queue by
 * itself (vn_dev_ctrl_poll_kick), no new doorbell needed. Once the guest
 * stops, the rest is answered and nothing stays pending. */
static void test_process_budget(void **state)
{
    struct cfx *x = *state;
    take_cmd_fd(x);
    uint8_t cmd[3] = { VN_CTRL_RX, VN_CTRL_RX_PROMISC, 1 };
    flood_head = x->q.next_desc;
    uint64_t ack = queue_cmd(x, cmd, 3, 1);
    flood_q = &x->q;
    /* Bounded only so that a device without a budget comes back at all. */
    flood_left = 100000;
    doorbell(x);
    assert_int_equal(n_events, VN_CTRL_BUDGET);
    assert_int_equal(fd_vq_used_idx(&x->q), VN_CTRL_BUDGET);
    assert_int_equal(fd_irq_count(CTRL_VECTOR), 1);
    assert_int_equal(x->dev->st.ctrl_ok, VN_CTRL_BUDGET);
    assert_int_equal(x->dev->st.ctrl_budget_exhausted, 1);
    assert_true(atomic_load(&x->dev->ctrl_resume));
    assert_int_equal(take_cmd_fd(x), 1);
    assert_int_equal(ack_of(x, ack, 1), VN_CTRL_OK);
    /* The context thread's loop, for cmd_fd: the next budget. */
    vn_dev_ctrl_poll_kick(x->dev);
    assert_int_equal(n_events, 2 * VN_CTRL_BUDGET);
    assert_int_equal(fd_vq_used_idx(&x->q), 2 * VN_CTRL_BUDGET);
    assert_int_equal(fd_irq_count(CTRL_VECTOR), 2);
    assert_int_equal(x->dev->st.ctrl_budget_exhausted, 2);
    assert_int_equal(take_cmd_fd(x), 1);
    assert_int_equal(x->dev->ctrl_stats.doorbells, 1);
    /* The guest stops after 10 more: the one posted last and those. */
    flood_left = 10;
    vn_dev_ctrl_poll_kick(x->dev);
    assert_int_equal(n_events, 2 * VN_CTRL_BUDGET + 11);
    assert_int_equal(fd_vq_used_idx(&x->q), 2 * VN_CTRL_BUDGET + 11);
    assert_int_equal(x->dev->st.ctrl_budget_exhausted, 2);
    assert_false(atomic_load(&x->dev->ctrl_resume));
    assert_int_equal(take_cmd_fd(x), 0);
    /* A stray wake-up finds nothing to do. */
    vn_dev_ctrl_poll_kick(x->dev);
    assert_int_equal(n_events, 2 * VN_CTRL_BUDGET + 11);
    assert_int_equal(x->dev->st.ctrl_ok, 2 * VN_CTRL_BUDGET + 11);
    assert_int_equal(x->dev->st.ctrl_err, 0);
    assert_true(x->dev->filter.promisc);
    assert_false(vn_dev_get_needs_reset(x->dev));
    fd_assert_no_errors(&x->dev->ctrl_stats);
}

/* A device reset forgets a control queue left at its budget. */
static void test_process_budget_then_reset(void **state)
{
    struct cfx *x = *state;
    take_cmd_fd(x);
    uint8_t cmd[3] = { VN_CTRL_RX, VN_CTRL_RX_PROMISC, 1 };
    flood_head = x->q.next_desc;
    queue_cmd(x, cmd, 3, 1);
    flood_q = &x->q;
    flood_left = 1000;
    doorbell(x);
    assert_int_equal(n_events, VN_CTRL_BUDGET);
    assert_int_equal(take_cmd_fd(x), 1);
    vn_dev_reset(x->dev);
    assert_false(atomic_load(&x->dev->ctrl_resume));
    unsigned logs = n_logs;
    vn_dev_ctrl_poll_kick(x->dev);
    assert_int_equal(n_events, VN_CTRL_BUDGET);
    assert_int_equal(n_logs, logs);
}

#define D(fn) cmocka_unit_test_setup_teardown(fn, setup_dev, teardown_dev)
#define Q(fn) cmocka_unit_test_setup_teardown(fn, setup_cfx, teardown_cfx)

int main(void)
{
    const struct CMUnitTest tests[] = {
        D(test_short_requests),
        D(test_rx_promisc),
        D(test_rx_allmulti),
        D(test_rx_unknown_commands),
        D(test_mac_table_set_valid),
        D(test_mac_table_set_full),
        D(test_mac_table_set_overflow),
        D(test_mac_table_set_truncated),
        D(test_mac_table_set_overlong),
        D(test_mac_table_set_huge_counts),
        D(test_mac_table_set_needs_ctrl_rx),
        D(test_mac_addr_set),
        D(test_mac_unknown_command),
        D(test_announce_ack),
        D(test_guest_offloads),
        D(test_guest_offloads_tap_refuses),
        D(test_unknown_class),
        D(test_vlan_filter),
        Q(test_process_command),
        Q(test_process_split_and_indirect),
        Q(test_process_malformed_chains),
        Q(test_process_long_mac_table),
        Q(test_process_oversized_request),
        cmocka_unit_test_setup_teardown(test_process_batch_event_idx, setup_cfx_event_idx,
                                        teardown_cfx),
        Q(test_process_corrupt_ring),
        Q(test_process_irq_failure),
        Q(test_process_budget),
        Q(test_process_budget_then_reset),
    };
    return cmocka_run_group_tests_name("ctrl", tests, group_setup, group_teardown);
}
