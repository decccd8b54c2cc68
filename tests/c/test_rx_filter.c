/* The receive filter (rx_filter.c): what vn_rx_filter_accepts() lets through
 * for each state the control queue can program. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "rx_filter.h"

static const uint8_t OWN[6] = { 0x52, 0x54, 0x00, 0x12, 0x34, 0x56 };
static const uint8_t OTHER[6] = { 0x52, 0x54, 0x00, 0x12, 0x34, 0x57 };
static const uint8_t BCAST[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
static const uint8_t MCAST4[6] = { 0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb };
static const uint8_t MCAST6[6] = { 0x33, 0x33, 0x00, 0x00, 0x00, 0x01 };
/* Group bit set, locally administered: still multicast. */
static const uint8_t MCAST_LA[6] = { 0x03, 0x00, 0x00, 0x00, 0x00, 0x01 };
/* Locally administered unicast (bit 1 of the first octet, not bit 0). */
static const uint8_t UNI_LA[6] = { 0x02, 0x00, 0x00, 0x00, 0x00, 0x01 };

static void filter_closed(struct vn_rx_filter *f)
{
    vn_rx_filter_reset(f, OWN);
    f->promisc = false;
}

static void test_reset_is_promiscuous(void **state)
{
    (void)state;
    struct vn_rx_filter f;
    memset(&f, 0xaa, sizeof(f));
    vn_rx_filter_reset(&f, OWN);
    assert_memory_equal(f.mac, OWN, 6);
    assert_true(f.promisc);
    assert_false(f.allmulti);
    assert_false(f.uni_overflow);
    assert_false(f.multi_overflow);
    assert_int_equal(f.n_uc, 0);
    assert_int_equal(f.n_mc, 0);
    const uint8_t *all[] = { OWN, OTHER, BCAST, MCAST4, MCAST6, MCAST_LA, UNI_LA };
    for (unsigned i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        assert_true(vn_rx_filter_accepts(&f, all[i]));
}

static void test_closed_filter(void **state)
{
    (void)state;
    struct vn_rx_filter f;
    filter_closed(&f);
    assert_true(vn_rx_filter_accepts(&f, OWN));
    assert_true(vn_rx_filter_accepts(&f, BCAST));
    assert_false(vn_rx_filter_accepts(&f, OTHER));
    assert_false(vn_rx_filter_accepts(&f, UNI_LA));
    assert_false(vn_rx_filter_accepts(&f, MCAST4));
    assert_false(vn_rx_filter_accepts(&f, MCAST6));
    assert_false(vn_rx_filter_accepts(&f, MCAST_LA));
}

static void test_mac_change(void **state)
{
    (void)state;
    struct vn_rx_filter f;
    filter_closed(&f);
    memcpy(f.mac, OTHER, 6);
    assert_true(vn_rx_filter_accepts(&f, OTHER));
    assert_false(vn_rx_filter_accepts(&f, OWN));
}

static void test_allmulti(void **state)
{
    (void)state;
    struct vn_rx_filter f;
    filter_closed(&f);
    f.allmulti = true;
    assert_true(vn_rx_filter_accepts(&f, MCAST4));
    assert_true(vn_rx_filter_accepts(&f, MCAST6));
    assert_true(vn_rx_filter_accepts(&f, MCAST_LA));
    assert_true(vn_rx_filter_accepts(&f, BCAST));
    assert_true(vn_rx_filter_accepts(&f, OWN));
    /* Multicast only: other unicast still dropped. */
    assert_false(vn_rx_filter_accepts(&f, OTHER));
}

static void test_unicast_table(void **state)
{
    (void)state;
    struct vn_rx_filter f;
    filter_closed(&f);
    memcpy(f.uc[0], OTHER, 6);
    memcpy(f.uc[1], UNI_LA, 6);
    f.n_uc = 1;
    assert_true(vn_rx_filter_accepts(&f, OTHER));
    /* Entries past n_uc are not looked at. */
    assert_false(vn_rx_filter_accepts(&f, UNI_LA));
    f.n_uc = 2;
    assert_true(vn_rx_filter_accepts(&f, UNI_LA));
    assert_true(vn_rx_filter_accepts(&f, OWN));
    /* A multicast address in the unicast table does not open it. */
    memcpy(f.uc[2], MCAST4, 6);
    f.n_uc = 3;
    assert_false(vn_rx_filter_accepts(&f, MCAST4));
}

static void test_multicast_table(void **state)
{
    (void)state;
    struct vn_rx_filter f;
    filter_closed(&f);
    memcpy(f.mc[0], MCAST6, 6);
    memcpy(f.mc[1], OTHER, 6); /* a unicast address in the multicast table */
    f.n_mc = 2;
    assert_true(vn_rx_filter_accepts(&f, MCAST6));
    assert_false(vn_rx_filter_accepts(&f, MCAST4));
    assert_false(vn_rx_filter_accepts(&f, OTHER));
    f.n_mc = 0;
    assert_false(vn_rx_filter_accepts(&f, MCAST6));
}

static void test_full_tables(void **state)
{
    (void)state;
    struct vn_rx_filter f;
    filter_closed(&f);
    for (unsigned i = 0; i < VN_MAC_TABLE_ENTRIES; i++) {
        uint8_t u[6] = { 0x02, 0, 0, 0, (uint8_t)(i >> 8), (uint8_t)i };
        uint8_t m[6] = { 0x01, 0, 0, 0, (uint8_t)(i >> 8), (uint8_t)i };
        memcpy(f.uc[i], u, 6);
        memcpy(f.mc[i], m, 6);
    }
    f.n_uc = f.n_mc = VN_MAC_TABLE_ENTRIES;
    for (unsigned i = 0; i < VN_MAC_TABLE_ENTRIES; i++) {
        assert_true(vn_rx_filter_accepts(&f, f.uc[i]));
        assert_true(vn_rx_filter_accepts(&f, f.mc[i]));
    }
    uint8_t u[6] = { 0x02, 0, 0, 0, 0, VN_MAC_TABLE_ENTRIES };
    uint8_t m[6] = { 0x01, 0, 0, 0, 0, VN_MAC_TABLE_ENTRIES };
    assert_false(vn_rx_filter_accepts(&f, u));
    assert_false(vn_rx_filter_accepts(&f, m));
}

static void test_overflow_flags(void **state)
{
    (void)state;
    struct vn_rx_filter f;
    filter_closed(&f);
    f.uni_overflow = true;
    assert_true(vn_rx_filter_accepts(&f, OTHER));
    assert_true(vn_rx_filter_accepts(&f, UNI_LA));
    assert_false(vn_rx_filter_accepts(&f, MCAST4));
    f.uni_overflow = false;
    f.multi_overflow = true;
    assert_true(vn_rx_filter_accepts(&f, MCAST4));
    assert_true(vn_rx_filter_accepts(&f, MCAST6));
    assert_false(vn_rx_filter_accepts(&f, OTHER));
}

static void test_promisc_overrides_everything(void **state)
{
    (void)state;
    struct vn_rx_filter f;
    filter_closed(&f);
    f.promisc = true;
    assert_true(vn_rx_filter_accepts(&f, OTHER));
    assert_true(vn_rx_filter_accepts(&f, MCAST4));
    f.promisc = false;
    assert_false(vn_rx_filter_accepts(&f, OTHER));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reset_is_promiscuous),
        cmocka_unit_test(test_closed_filter),
        cmocka_unit_test(test_mac_change),
        cmocka_unit_test(test_allmulti),
        cmocka_unit_test(test_unicast_table),
        cmocka_unit_test(test_multicast_table),
        cmocka_unit_test(test_full_tables),
        cmocka_unit_test(test_overflow_flags),
        cmocka_unit_test(test_promisc_overrides_everything),
    };
    return cmocka_run_group_tests_name("rx_filter", tests, NULL, NULL);
}
