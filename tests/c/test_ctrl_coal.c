/* Interrupt coalescing: the per-queue rule (coalesce.h) with chosen clock
 * values, and VIRTIO_NET_CTRL_NOTF_COAL (ctrl_coal.c) through
 * vn_ctrl_handle_reply(): TX_SET/RX_SET for every queue of a direction,
 * VQ_SET/VQ_GET for one, the spec's example sequence, and every malformed or
 * unnegotiated command refused without a change. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "coalesce.h"
#include "ctrl.h"
#include "ctrl_coal.h"
#include "ctrl_stats.h"
#include "device.h"
#include "le.h"
#include "net_hdr.h"

#define F(bit) (1ull << (bit))
#define US 1000ull

static const uint8_t MAC[6] = { 0x52, 0x54, 0x00, 0x00, 0x00, 0x07 };

/* ---- the rule ------------------------------------------------------------ */

static void test_rule_off_signals_every_time(void **state)
{
    (void)state;
    struct vn_coal c = { 0 };
    for (unsigned usecs = 0; usecs < 2; usecs++) {
        /* Either parameter 0: every packet (spec: conditions met each time). */
        vn_coal_set(&c, (struct vn_coal_params){ usecs ? 0 : 8, usecs ? 50 : 0 });
        assert_true(vn_coal_account(&c, 1, 1000));
        assert_true(vn_coal_account(&c, 3, 1001));
        assert_false(vn_coal_due(&c, 5000));
        assert_int_equal(vn_coal_wait_ns(&c, 5000), UINT64_MAX);
    }
}

static void test_rule_packets_first(void **state)
{
    (void)state;
    struct vn_coal c = { 0 };
    vn_coal_set(&c, (struct vn_coal_params){ 4, 100 });
    uint64_t t = 1000000;
    assert_false(vn_coal_account(&c, 1, t));
    assert_false(vn_coal_account(&c, 2, t + 10 * US));
    assert_int_equal(vn_coal_wait_ns(&c, t + 10 * US), 90 * US);
    assert_false(vn_coal_due(&c, t + 99 * US));
    assert_true(vn_coal_account(&c, 1, t + 20 * US)); /* the 4th packet */
    assert_false(vn_coal_due(&c, t + 200 * US));       /* nothing held any more */
    /* Counting restarts with the next packet. */
    assert_false(vn_coal_account(&c, 3, t + 300 * US));
    assert_true(vn_coal_account(&c, 5, t + 301 * US));
}

static void test_rule_time_first(void **state)
{
    (void)state;
    struct vn_coal c = { 0 };
    vn_coal_set(&c, (struct vn_coal_params){ 64, 50 });
    uint64_t t = 7000000;
    assert_false(vn_coal_account(&c, 1, t));
    assert_false(vn_coal_account(&c, 1, t + 49 * US));
    assert_false(vn_coal_due(&c, t + 49 * US));
    assert_int_equal(vn_coal_wait_ns(&c, t + 49 * US), 1 * US);
    assert_true(vn_coal_due(&c, t + 50 * US)); /* 50 us after the first */
    assert_false(vn_coal_due(&c, t + 60 * US));
    /* A packet that comes after the time is up is signalled at once. */
    assert_false(vn_coal_account(&c, 1, t + 100 * US));
    assert_true(vn_coal_account(&c, 1, t + 150 * US));
}

static void test_rule_new_parameters_apply_at_once(void **state)
{
    (void)state;
    struct vn_coal c = { 0 };
    vn_coal_set(&c, (struct vn_coal_params){ 15, 1000 });
    assert_false(vn_coal_account(&c, 10, 0));
    assert_false(vn_coal_due(&c, 1));
    /* The spec's example: 10 sent, then max_packets 8: due immediately. */
    vn_coal_set(&c, (struct vn_coal_params){ 8, 1000 });
    assert_true(vn_coal_due(&c, 2));
    /* A shorter max_usecs counts from the first held packet. */
    vn_coal_set(&c, (struct vn_coal_params){ 100, 1000 });
    assert_false(vn_coal_account(&c, 1, 10 * US));
    vn_coal_set(&c, (struct vn_coal_params){ 100, 5 });
    assert_true(vn_coal_due(&c, 15 * US));
    /* Switched off while one is held: due at once. */
    vn_coal_set(&c, (struct vn_coal_params){ 100, 1000 });
    assert_false(vn_coal_account(&c, 1, 20 * US));
    vn_coal_set(&c, (struct vn_coal_params){ 0, 0 });
    assert_true(vn_coal_due(&c, 20 * US));
}

static void test_rule_count_saturates(void **state)
{
    (void)state;
    struct vn_coal c = { 0 };
    vn_coal_set(&c, (struct vn_coal_params){ UINT32_MAX, UINT32_MAX });
    assert_false(vn_coal_account(&c, UINT32_MAX - 1, 0));
    /* No wrap to a small count: the limit is reached. */
    assert_true(vn_coal_account(&c, 5, 1));
}

/* ---- the control commands ------------------------------------------------ */

#define PAIRS 2
#define ALL_COAL (F(VN_F_CTRL_VQ) | F(VN_F_MQ) | F(VN_F_NOTF_COAL) | F(VN_F_VQ_NOTF_COAL))

static int dev_setup(void **state)
{
    struct vn_dev *dev = vn_dev_new(PAIRS, MAC, 1500);
    if (dev == NULL)
        return -1;
    /* Rings are only recorded here (no worker is started). */
    for (unsigned q = 0; q < 2 * PAIRS + 1; q++)
        if (vn_dev_config_queue(dev, q, 64, 0x1000 * (q + 1), 0x100000 + 0x1000 * q,
                                0x200000 + 0x1000 * q, VN_VQ_NO_VECTOR) != 0)
            return -1;
    dev->features = ALL_COAL;
    *state = dev;
    return 0;
}

static int dev_teardown(void **state)
{
    vn_dev_free(*state);
    return 0;
}

static uint8_t result[16];
static uint32_t result_len;

static uint8_t cmd(struct vn_dev *dev, uint8_t c, const uint8_t *data, uint32_t len)
{
    uint8_t req[64];
    req[0] = VN_CTRL_NOTF_COAL;
    req[1] = c;
    memcpy(req + 2, data, len);
    memset(result, 0xa5, sizeof(result));
    return vn_ctrl_handle_reply(dev, req, 2 + len, result, sizeof(result), &result_len);
}

static uint8_t set_dir(struct vn_dev *dev, uint8_t c, uint32_t packets, uint32_t usecs)
{
    uint8_t d[8];
    vn_le32_put(d, packets);
    vn_le32_put(d + 4, usecs);
    return cmd(dev, c, d, 8);
}

static uint8_t vq_set(struct vn_dev *dev, uint16_t vq, uint32_t packets, uint32_t usecs)
{
    uint8_t d[12] = { 0 };
    vn_le16_put(d, vq);
    d[2] = 0xff; /* reserved: ignored */
    vn_le32_put(d + 4, packets);
    vn_le32_put(d + 8, usecs);
    return cmd(dev, VN_CTRL_NOTF_COAL_VQ_SET, d, 12);
}

/* VQ_GET through the control path; fails the test unless it answers OK. */
static struct vn_coal_params vq_get(struct vn_dev *dev, uint16_t vq)
{
    uint8_t d[4] = { (uint8_t)vq, (uint8_t)(vq >> 8), 0, 0 };
    assert_int_equal(cmd(dev, VN_CTRL_NOTF_COAL_VQ_GET, d, 4), VN_CTRL_OK);
    assert_int_equal(result_len, 8);
    return (struct vn_coal_params){ vn_le32_get(result), vn_le32_get(result + 4) };
}

#define ASSERT_COAL(p, pk, us)                 \
    do {                                       \
        assert_int_equal((p).max_packets, pk); \
        assert_int_equal((p).max_usecs, us);   \
    } while (0)

/* The spec's example sequence (5.1.6.5.9) with two pairs. */
static void test_ctrl_spec_sequence(void **state)
{
    struct vn_dev *dev = *state;
    for (uint16_t q = 0; q < 2 * PAIRS; q++)
        ASSERT_COAL(vq_get(dev, q), 0, 0);
    assert_int_equal(set_dir(dev, VN_CTRL_NOTF_COAL_RX_SET, 15, 10), VN_CTRL_OK);
    ASSERT_COAL(vq_get(dev, 0), 15, 10);
    ASSERT_COAL(vq_get(dev, 2), 15, 10);
    ASSERT_COAL(vq_get(dev, 1), 0, 0);
    assert_int_equal(vq_set(dev, 0, 7, 3), VN_CTRL_OK);
    ASSERT_COAL(vq_get(dev, 0), 7, 3);
    ASSERT_COAL(vq_get(dev, 2), 15, 10);
    assert_int_equal(vq_set(dev, 1, 5, 5), VN_CTRL_OK);
    ASSERT_COAL(vq_get(dev, 3), 0, 0);
    assert_int_equal(set_dir(dev, VN_CTRL_NOTF_COAL_TX_SET, 32, 100), VN_CTRL_OK);
    ASSERT_COAL(vq_get(dev, 1), 32, 100);
    ASSERT_COAL(vq_get(dev, 3), 32, 100);
    ASSERT_COAL(vq_get(dev, 0), 7, 3);
    ASSERT_COAL(vn_dev_get_coal(dev, 3), 32, 100);
    /* A reset puts every parameter back to 0. */
    vn_dev_reset(dev);
    for (uint16_t q = 0; q < 2 * PAIRS; q++)
        ASSERT_COAL(vn_dev_get_coal(dev, q), 0, 0);
}

static void test_ctrl_refused(void **state)
{
    struct vn_dev *dev = *state;
    assert_int_equal(vq_set(dev, 0, 9, 9), VN_CTRL_OK);
    uint8_t d[16] = { 0 };
    /* Wrong lengths. */
    for (uint32_t len = 0; len <= 13; len++) {
        if (len != 8)
            assert_int_equal(cmd(dev, VN_CTRL_NOTF_COAL_TX_SET, d, len), VN_CTRL_ERR);
        if (len != 8)
            assert_int_equal(cmd(dev, VN_CTRL_NOTF_COAL_RX_SET, d, len), VN_CTRL_ERR);
        if (len != 12)
            assert_int_equal(cmd(dev, VN_CTRL_NOTF_COAL_VQ_SET, d, len), VN_CTRL_ERR);
        if (len != 4)
            assert_int_equal(cmd(dev, VN_CTRL_NOTF_COAL_VQ_GET, d, len), VN_CTRL_ERR);
    }
    /* Not an rx/tx queue the driver can use: the control queue (index 4),
     * past it, and the largest index. */
    const uint16_t bad[] = { 2 * PAIRS, 2 * PAIRS + 1, 2 * VN_MAX_QUEUE_PAIRS, 0xffff };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(vq_set(dev, bad[i], 1, 1), VN_CTRL_ERR);
        uint8_t g[4] = { (uint8_t)bad[i], (uint8_t)(bad[i] >> 8), 0, 0 };
        assert_int_equal(cmd(dev, VN_CTRL_NOTF_COAL_VQ_GET, g, 4), VN_CTRL_ERR);
        assert_int_equal(result_len, 0);
        assert_int_equal(result[0], 0xa5);
    }
    /* Unknown commands. */
    assert_int_equal(cmd(dev, 4, d, 8), VN_CTRL_ERR);
    assert_int_equal(cmd(dev, 0xff, d, 12), VN_CTRL_ERR);
    /* No room for the VQ_GET result. */
    uint8_t req[6] = { VN_CTRL_NOTF_COAL, VN_CTRL_NOTF_COAL_VQ_GET, 0, 0, 0, 0 };
    uint8_t small[7];
    uint32_t rl = 99;
    assert_int_equal(vn_ctrl_handle_reply(dev, req, 6, small, sizeof(small), &rl), VN_CTRL_ERR);
    assert_int_equal(rl, 0);
    /* Without MQ or RSS the driver sees one pair: queue 2 is not its. */
    dev->features = F(VN_F_CTRL_VQ) | F(VN_F_NOTF_COAL) | F(VN_F_VQ_NOTF_COAL);
    assert_int_equal(vq_set(dev, 2, 1, 1), VN_CTRL_ERR);
    /* Unnegotiated: NOTF_COAL alone has no VQ commands, VQ_NOTF_COAL alone
     * no direction-wide ones. */
    dev->features = F(VN_F_CTRL_VQ) | F(VN_F_MQ) | F(VN_F_NOTF_COAL);
    assert_int_equal(vq_set(dev, 0, 1, 1), VN_CTRL_ERR);
    assert_int_equal(set_dir(dev, VN_CTRL_NOTF_COAL_RX_SET, 1, 1), VN_CTRL_OK);
    dev->features = F(VN_F_CTRL_VQ) | F(VN_F_MQ) | F(VN_F_VQ_NOTF_COAL);
    assert_int_equal(set_dir(dev, VN_CTRL_NOTF_COAL_TX_SET, 2, 2), VN_CTRL_ERR);
    ASSERT_COAL(vq_get(dev, 1), 0, 0);
    ASSERT_COAL(vq_get(dev, 0), 1, 1);
    dev->features = F(VN_F_CTRL_VQ);
    assert_int_equal(set_dir(dev, VN_CTRL_NOTF_COAL_RX_SET, 3, 3), VN_CTRL_ERR);
    ASSERT_COAL(vn_dev_get_coal(dev, 0), 1, 1);
}

/* A queue the driver never set up (size 0) is not enabled. */
static void test_ctrl_unconfigured_queue(void **state)
{
    (void)state;
    struct vn_dev *dev = vn_dev_new(PAIRS, MAC, 1500);
    assert_non_null(dev);
    assert_int_equal(vn_dev_config_queue(dev, 0, 64, 0x1000, 0x2000, 0x3000, VN_VQ_NO_VECTOR), 0);
    dev->features = ALL_COAL;
    assert_int_equal(vq_set(dev, 0, 4, 4), VN_CTRL_OK);
    assert_int_equal(vq_set(dev, 1, 4, 4), VN_CTRL_ERR);
    assert_int_equal(vq_set(dev, 3, 4, 4), VN_CTRL_ERR);
    vn_dev_free(dev);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rule_off_signals_every_time),
        cmocka_unit_test(test_rule_packets_first),
        cmocka_unit_test(test_rule_time_first),
        cmocka_unit_test(test_rule_new_parameters_apply_at_once),
        cmocka_unit_test(test_rule_count_saturates),
        cmocka_unit_test_setup_teardown(test_ctrl_spec_sequence, dev_setup, dev_teardown),
        cmocka_unit_test_setup_teardown(test_ctrl_refused, dev_setup, dev_teardown),
        cmocka_unit_test(test_ctrl_unconfigured_queue),
    };
    return cmocka_run_group_tests_name("ctrl_coal", tests, NULL, NULL);
}
