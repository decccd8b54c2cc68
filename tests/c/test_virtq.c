/* Split virtqueue (virtq.c) against the synthetic driver: chains, indirect
 * tables, mergeable-style batches, index wrap-around, EVENT_IDX suppression,
 * and hostile rings and descriptors. Every hostile case checks the
 * vn_pop_result, the error counter, and that nothing outside the mapped
 * regions was touched (guard pages). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <cmocka.h>

#include "fake_driver.h"
#include "le.h"
#include "virtq.h"

#define QSIZE 8
#define IOV_MAX_TEST (VN_VQ_MAX_SIZE + 8)

struct fx {
    struct fd_guest g;
    struct fd_vq q;
    struct vn_vq vq;
    struct vn_dir_stats st;
    struct iovec iov[IOV_MAX_TEST];
    struct vn_chain c;
    int err;
};

static struct fx *fx_new(uint16_t size, bool event_idx, bool indirect)
{
    struct fx *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    fd_guest_init(&f->g, NULL);
    fd_vq_init(&f->q, &f->g, 0, size);
    fd_vq_attach(&f->q, &f->vq, &f->st, event_idx, indirect);
    assert_true(vn_vq_map(&f->vq));
    return f;
}

static int setup_plain(void **state)
{
    *state = fx_new(QSIZE, false, false);
    return 0;
}

static int setup_indirect(void **state)
{
    *state = fx_new(QSIZE, false, true);
    return 0;
}

static int setup_event_idx(void **state)
{
    *state = fx_new(QSIZE, true, true);
    return 0;
}

static int teardown(void **state)
{
    struct fx *f = *state;
    fd_guest_destroy(&f->g);
    free(f);
    return 0;
}

static int pop_n(struct fx *f, unsigned iov_max)
{
    memset(&f->c, 0xa5, sizeof(f->c));
    int r = vn_vq_pop(&f->vq, f->iov, iov_max, &f->c, &f->err);
    if (r == VN_POP_OK)
        fd_check_iov(&f->g, f->iov, f->c.niov, f->c.nout);
    return r;
}

static int pop(struct fx *f)
{
    return pop_n(f, IOV_MAX_TEST);
}

/* Pop a chain that must be rejected as `reason`, give it back with length 0
 * as the datapath does, and check the driver sees that. */
static void expect_bad(struct fx *f, uint16_t head, int reason)
{
    uint16_t last = f->vq.last_avail;
    assert_int_equal(pop(f), VN_POP_BAD);
    assert_int_equal(f->err, reason);
    assert_int_equal(f->c.head, head);
    assert_int_equal(f->vq.last_avail, (uint16_t)(last + 1));
    assert_false(f->vq.broken);
    fd_assert_errors(&f->st, reason, 1);
    vn_vq_push(&f->vq, f->c.head, 0);
    vn_vq_publish(&f->vq);
    uint32_t id, len;
    assert_true(fd_vq_get_used(&f->q, &id, &len));
    assert_int_equal(id, head);
    assert_int_equal(len, 0);
    assert_int_equal(pop(f), VN_POP_EMPTY);
}

/* The ring is still usable after a rejected chain. */
static void expect_still_works(struct fx *f)
{
    uint64_t b = fd_alloc(&f->g, 1, 32, 8);
    fd_fill(&f->g, b, 32, 3);
    f->q.next_desc = 0;
    uint16_t head = fd_vq_add(&f->q, &(struct fd_buf){ b, 32, false }, 1);
    assert_int_equal(pop(f), VN_POP_OK);
    assert_int_equal(f->c.head, head);
    assert_int_equal(f->c.niov, 1);
    assert_memory_equal(f->iov[0].iov_base, fd_hva(&f->g, b, 32), 32);
}

static void expect_fatal(struct fx *f, int reason)
{
    uint16_t last = f->vq.last_avail;
    assert_int_equal(pop(f), VN_POP_FATAL);
    assert_int_equal(f->err, reason);
    assert_true(f->vq.broken);
    assert_false(vn_vq_ready(&f->vq));
    assert_int_equal(f->vq.last_avail, last);
    fd_assert_errors(&f->st, reason, 1);
}

/* ---- mapping the rings -------------------------------------------------- */

static void map_case(uint16_t size, uint64_t desc, uint64_t avail, uint64_t used, bool ok)
{
    struct fd_guest g;
    struct fd_vq q;
    struct vn_vq vq;
    struct vn_dir_stats st = { 0 };
    fd_guest_init(&g, NULL);
    fd_vq_init_at(&q, &g, size, desc, avail, used);
    fd_vq_attach(&q, &vq, &st, true, true);
    assert_int_equal(vn_vq_map(&vq), ok);
    if (ok) {
        fd_assert_no_errors(&st);
        assert_true(vn_vq_ready(&vq));
        assert_ptr_equal(vq.desc, fd_hva(&g, desc, 16 * (uint64_t)size));
        assert_ptr_equal(vq.avail, fd_hva(&g, avail, 6 + 2 * (uint64_t)size));
        assert_ptr_equal(vq.used, fd_hva(&g, used, 6 + 8 * (uint64_t)size));
    } else {
        fd_assert_errors(&st, VN_ERR_RING_ADDR, 1);
        assert_true(vq.broken);
        assert_false(vn_vq_ready(&vq));
        assert_null(vq.desc);
    }
    fd_guest_destroy(&g);
}

static void test_map_valid(void **state)
{
    (void)state;
    map_case(8, FD_GPA_A, FD_GPA_A + 0x1000, FD_GPA_A + 0x2000, true);
    /* Rings in different regions, the smallest alignment the spec allows. */
    map_case(256, FD_GPA_B + 0x10, FD_GPA_A + 0x2, FD_GPA_B + 0x8004, true);
    map_case(1, FD_GPA_A, FD_GPA_A + 16, FD_GPA_A + 24, true);
    map_case(VN_VQ_MAX_SIZE, FD_GPA_A, FD_GPA_B, FD_GPA_B + 0x1000, true);
    /* Readable rings may sit in read-only memory; the used ring may not. */
    map_case(8, FD_GPA_RO, FD_GPA_RO + 0x100, FD_GPA_A, true);
}

static void test_map_bad_size(void **state)
{
    (void)state;
    map_case(0, FD_GPA_A, FD_GPA_A + 0x1000, FD_GPA_A + 0x2000, false);
    map_case(6, FD_GPA_A, FD_GPA_A + 0x1000, FD_GPA_A + 0x2000, false);
    map_case(2 * VN_VQ_MAX_SIZE, FD_GPA_A, FD_GPA_A + 0x10000, FD_GPA_A + 0x20000, false);
    map_case(0xffff, FD_GPA_A, FD_GPA_A + 0x10000, FD_GPA_A + 0x20000, false);
}

static void test_map_misaligned(void **state)
{
    (void)state;
    map_case(8, FD_GPA_A + 8, FD_GPA_A + 0x1000, FD_GPA_A + 0x2000, false);
    map_case(8, FD_GPA_A, FD_GPA_A + 0x1001, FD_GPA_A + 0x2000, false);
    map_case(8, FD_GPA_A, FD_GPA_A + 0x1000, FD_GPA_A + 0x2002, false);
}

static void test_map_outside_memory(void **state)
{
    (void)state;
    /* Each ring in turn: unmapped hole, past the end, straddling regions
     * A and B (adjacent guest physical addresses, separate host mappings),
     * wrapping around the address space. */
    const uint64_t ok_d = FD_GPA_A, ok_a = FD_GPA_A + 0x1000, ok_u = FD_GPA_A + 0x2000;
    const uint64_t bad[] = {
        FD_GPA_HOLE, 0, FD_GPA_B + FD_LEN_B - 0x10, FD_GPA_B - 0x10, UINT64_MAX - 0xf,
        FD_GPA_RO + FD_LEN_RO - 0x10,
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        map_case(8, bad[i], ok_a, ok_u, false);
        map_case(8, ok_d, bad[i], ok_u, false);
        map_case(8, ok_d, ok_a, bad[i], false);
    }
    /* The used ring must be writable. */
    map_case(8, ok_d, ok_a, FD_GPA_RO, false);
    /* avail with its used_event: 6 + 2 * size bytes, one short of room. */
    map_case(8, ok_d, FD_GPA_A + FD_LEN_A - 20, ok_u, false);
    map_case(8, ok_d, FD_GPA_A + FD_LEN_A - 22, ok_u, true);
    /* used with its avail_event: 6 + 8 * size bytes. */
    map_case(8, ok_d, ok_a, FD_GPA_A + FD_LEN_A - 68, false);
    map_case(8, ok_d, ok_a, FD_GPA_A + FD_LEN_A - 72, true);
}

/* Rings flush against the trailing guard pages: every access the device
 * makes (including used_event and avail_event) must stay inside. */
static void test_rings_against_guard_pages(void **state)
{
    (void)state;
    struct fd_guest g;
    struct fd_vq q;
    struct vn_vq vq;
    struct vn_dir_stats st = { 0 };
    struct iovec iov[4];
    struct vn_chain c;
    int err;
    const uint16_t n = 16;
    fd_guest_init_empty(&g, NULL);
    unsigned rd = fd_guest_add(&g, 0x10000, FD_PAGE, true);
    unsigned ra = fd_guest_add(&g, 0x20000, FD_PAGE, true);
    unsigned ru = fd_guest_add(&g, 0x30000, FD_PAGE, true);
    unsigned rb = fd_guest_add(&g, 0x40000, FD_PAGE, true);
    uint64_t desc = fd_alloc_at_end(&g, rd, 16 * n, 16);
    uint64_t avail = fd_alloc_at_end(&g, ra, 6 + 2 * n, 2);
    uint64_t used = fd_alloc_at_end(&g, ru, 6 + 8 * n, 4);
    assert_int_equal(desc + 16 * n, 0x10000 + FD_PAGE);
    assert_int_equal(avail + 6 + 2 * n, 0x20000 + FD_PAGE);
    assert_true(used + 6 + 8 * n >= 0x30000 + FD_PAGE - 2);
    fd_vq_init_at(&q, &g, n, desc, avail, used);
    fd_vq_attach(&q, &vq, &st, true, false);
    assert_true(vn_vq_map(&vq));
    uint64_t buf = fd_alloc_at_end(&g, rb, 64, 1);
    for (unsigned round = 0; round < 3 * n; round++) {
        q.next_desc = (uint16_t)(n - 1); /* the last descriptor of the table */
        fd_vq_add(&q, &(struct fd_buf){ buf, 64, true }, 1);
        assert_true(vn_vq_avail_count(&vq) == 1);
        assert_int_equal(vn_vq_pop(&vq, iov, 4, &c, &err), VN_POP_OK);
        assert_int_equal(c.head, n - 1);
        fd_check_iov(&g, iov, c.niov, c.nout);
        vn_vq_push(&vq, c.head, 64);
        vn_vq_publish(&vq);
        (void)vn_vq_should_notify(&vq);
        assert_false(vn_vq_enable_notify(&vq));
        vn_vq_disable_notify(&vq);
        uint32_t id, len;
        assert_true(fd_vq_get_used(&q, &id, &len));
        assert_int_equal(id, n - 1);
        fd_vq_set_used_event(&q, (uint16_t)(q.last_used + 1));
    }
    assert_int_equal(fd_vq_avail_event(&q), 3 * n);
    fd_assert_no_errors(&st);
    fd_guest_destroy(&g);
}

/* The device only reads the descriptor table and the available ring: they
 * sit in memory mapped read-only on the host while the device works (with
 * and without EVENT_IDX, whose avail_event lives in the used ring). */
static void never_writes_driver_area(bool event_idx)
{
    struct fd_guest g;
    struct fd_vq q;
    struct vn_vq vq;
    struct vn_dir_stats st = { 0 };
    struct iovec iov[4];
    struct vn_chain c;
    int err;
    fd_guest_init_empty(&g, NULL);
    unsigned rdrv = fd_guest_add(&g, 0x10000, FD_PAGE, false);
    unsigned rdev = fd_guest_add(&g, 0x20000, FD_PAGE, true);
    fd_guest_protect(&g, rdrv, PROT_READ | PROT_WRITE);
    uint64_t desc = fd_alloc(&g, rdrv, 16 * 8, 16);
    uint64_t avail = fd_alloc(&g, rdrv, 6 + 2 * 8, 2);
    uint64_t used = fd_alloc(&g, rdev, 6 + 8 * 8, 4);
    uint64_t buf = fd_alloc(&g, rdev, 64, 8);
    uint64_t table = fd_alloc(&g, rdrv, 2 * 16, 16);
    fd_vq_init_at(&q, &g, 8, desc, avail, used);
    fd_vq_attach(&q, &vq, &st, event_idx, true);
    assert_true(vn_vq_map(&vq));
    for (int i = 0; i < 20; i++) {
        fd_guest_protect(&g, rdrv, PROT_READ | PROT_WRITE);
        struct fd_buf b[2] = { { buf, 16, false }, { buf + 16, 48, true } };
        if (i % 2) {
            fd_vq_add(&q, b, 2);
        } else {
            fd_write_desc(&g, table, 0, buf, 16, VRING_DESC_F_NEXT, 1);
            fd_write_desc(&g, table, 1, buf + 16, 48, VRING_DESC_F_WRITE, 0);
            fd_vq_desc(&q, q.next_desc, table, 32, VRING_DESC_F_INDIRECT, 0);
            fd_vq_make_avail(&q, q.next_desc);
            q.next_desc = (uint16_t)((q.next_desc + 1) % 8);
        }
        fd_vq_set_used_event(&q, q.last_used);
        fd_vq_set_avail_flags(&q, 0);
        fd_guest_protect(&g, rdrv, PROT_READ);
        assert_true(vn_vq_enable_notify(&vq));
        vn_vq_disable_notify(&vq);
        assert_int_equal(vn_vq_pop(&vq, iov, 4, &c, &err), VN_POP_OK);
        assert_int_equal(c.niov, 2);
        fd_check_iov(&g, iov, c.niov, c.nout);
        vn_vq_push(&vq, c.head, 48);
        vn_vq_publish(&vq);
        assert_true(vn_vq_should_notify(&vq));
        assert_false(vn_vq_enable_notify(&vq));
        uint32_t id, len;
        assert_true(fd_vq_get_used(&q, &id, &len));
        assert_int_equal(id, c.head);
    }
    fd_assert_no_errors(&st);
    fd_guest_destroy(&g);
}

static void test_device_never_writes_driver_area(void **state)
{
    (void)state;
    never_writes_driver_area(false);
    never_writes_driver_area(true);
}

/* The ring mapping follows guest memory changes (generation). */
static void test_map_follows_memory_changes(void **state)
{
    (void)state;
    struct fd_guest g;
    struct fd_vq q;
    struct vn_vq vq;
    struct vn_dir_stats st = { 0 };
    fd_guest_init_empty(&g, NULL);
    unsigned r0 = fd_guest_add(&g, 0x10000, 4 * FD_PAGE, true);
    fd_vq_init(&q, &g, r0, 8);
    fd_vq_attach(&q, &vq, &st, false, false);
    assert_true(vn_vq_map(&vq));
    uint8_t *old = vq.desc;
    assert_true(vn_vq_map(&vq)); /* unchanged: cheap */
    assert_ptr_equal(vq.desc, old);
    fd_guest_remove(&g, r0);
    assert_false(vn_vq_map(&vq));
    fd_assert_errors(&st, VN_ERR_RING_ADDR, 1);
    /* Mapped again (elsewhere in host memory) after a reset. */
    unsigned r1 = fd_guest_add(&g, 0x10000, 4 * FD_PAGE, true);
    vn_vq_reset_state(&vq);
    assert_true(vn_vq_map(&vq));
    assert_ptr_equal(vq.desc, fd_hva(&g, 0x10000, 1));
    assert_true(fd_host_range_in_guest(&g, vq.used, 6 + 8 * 8, true));
    (void)r1;
    fd_guest_destroy(&g);
}

/* ---- chains ------------------------------------------------------------- */

static void test_empty(void **state)
{
    struct fx *f = *state;
    assert_int_equal(vn_vq_avail_count(&f->vq), 0);
    assert_int_equal(pop(f), VN_POP_EMPTY);
    assert_int_equal(f->err, -1);
    fd_assert_no_errors(&f->st);
}

static void test_single_descriptor(void **state)
{
    struct fx *f = *state;
    uint64_t b = fd_alloc(&f->g, 0, 100, 1);
    fd_fill(&f->g, b, 100, 1);
    f->q.next_desc = 5;
    fd_vq_add(&f->q, &(struct fd_buf){ b, 100, false }, 1);
    assert_int_equal(vn_vq_avail_count(&f->vq), 1);
    assert_int_equal(pop(f), VN_POP_OK);
    assert_int_equal(f->c.head, 5);
    assert_int_equal(f->c.niov, 1);
    assert_int_equal(f->c.nout, 1);
    assert_int_equal(f->c.out_len, 100);
    assert_int_equal(f->c.in_len, 0);
    assert_ptr_equal(f->iov[0].iov_base, fd_hva(&f->g, b, 100));
    assert_int_equal(f->iov[0].iov_len, 100);
    assert_int_equal(vn_vq_avail_count(&f->vq), 0);
    vn_vq_push(&f->vq, 5, 0);
    vn_vq_publish(&f->vq);
    uint32_t id, len;
    assert_true(fd_vq_get_used(&f->q, &id, &len));
    assert_int_equal(id, 5);
    assert_int_equal(len, 0);
    assert_false(fd_vq_get_used(&f->q, &id, &len));
    fd_assert_no_errors(&f->st);
}

static void test_chain_read_then_write(void **state)
{
    struct fx *f = *state;
    /* Buffers in both regions and in read-only memory (readable part). */
    uint64_t b0 = fd_alloc(&f->g, 0, 12, 1);
    uint64_t b1 = fd_alloc(&f->g, 2, 1000, 1);
    uint64_t b2 = fd_alloc(&f->g, 1, 2048, 1);
    uint64_t b3 = fd_alloc(&f->g, 0, 1, 1);
    fd_fill(&f->g, b0, 12, 9);
    struct fd_buf bufs[] = { { b0, 12, false }, { b1, 1000, false }, { b2, 2048, true }, { b3, 1, true } };
    f->q.next_desc = 6; /* the chain wraps from descriptor 7 to 0 */
    uint16_t head = fd_vq_add(&f->q, bufs, 4);
    assert_int_equal(head, 6);
    assert_int_equal(pop(f), VN_POP_OK);
    assert_int_equal(f->c.head, 6);
    assert_int_equal(f->c.niov, 4);
    assert_int_equal(f->c.nout, 2);
    assert_int_equal(f->c.out_len, 1012);
    assert_int_equal(f->c.in_len, 2049);
    for (unsigned i = 0; i < 4; i++) {
        assert_ptr_equal(f->iov[i].iov_base, fd_hva(&f->g, bufs[i].gpa, bufs[i].len));
        assert_int_equal(f->iov[i].iov_len, bufs[i].len);
    }
    assert_memory_equal(f->iov[0].iov_base, fd_hva(&f->g, b0, 12), 12);
    memset(f->iov[3].iov_base, 0x5a, 1);
    vn_vq_push(&f->vq, f->c.head, 2049);
    vn_vq_publish(&f->vq);
    uint32_t id, len;
    assert_true(fd_vq_get_used(&f->q, &id, &len));
    assert_int_equal(id, 6);
    assert_int_equal(len, 2049);
    uint8_t ack;
    fd_read(&f->g, b3, &ack, 1);
    assert_int_equal(ack, 0x5a);
    fd_assert_no_errors(&f->st);
}

static void test_chain_out_of_order_descriptors(void **state)
{
    struct fx *f = *state;
    uint64_t b = fd_alloc(&f->g, 0, 300, 1);
    fd_vq_desc(&f->q, 3, b, 100, VRING_DESC_F_NEXT, 7);
    fd_vq_desc(&f->q, 7, b + 100, 100, VRING_DESC_F_NEXT, 0);
    fd_vq_desc(&f->q, 0, b + 200, 100, VRING_DESC_F_WRITE, 0);
    fd_vq_make_avail(&f->q, 3);
    assert_int_equal(pop(f), VN_POP_OK);
    assert_int_equal(f->c.head, 3);
    assert_int_equal(f->c.niov, 3);
    assert_int_equal(f->c.nout, 2);
    assert_ptr_equal(f->iov[1].iov_base, fd_hva(&f->g, b + 100, 100));
    assert_ptr_equal(f->iov[2].iov_base, fd_hva(&f->g, b + 200, 100));
}

/* A chain as long as the ring, every descriptor used once: legal. */
static void test_chain_full_ring(void **state)
{
    struct fx *f = *state;
    struct fd_buf bufs[QSIZE];
    for (unsigned i = 0; i < QSIZE; i++)
        bufs[i] = (struct fd_buf){ fd_alloc(&f->g, 1, 64, 8), 64, i >= 3 };
    f->q.next_desc = 2;
    fd_vq_add(&f->q, bufs, QSIZE);
    assert_int_equal(pop(f), VN_POP_OK);
    assert_int_equal(f->c.niov, QSIZE);
    assert_int_equal(f->c.nout, 3);
    assert_int_equal(f->c.out_len, 3 * 64);
    assert_int_equal(f->c.in_len, (QSIZE - 3) * 64);
    fd_assert_no_errors(&f->st);
}

/* Several chains in flight, completed out of order; unpop gives back. */
static void test_batch_out_of_order_completion_and_unpop(void **state)
{
    struct fx *f = *state;
    uint16_t heads[4];
    for (unsigned i = 0; i < 4; i++) {
        struct fd_buf b[2] = { { fd_alloc(&f->g, 0, 16, 8), 16, false },
                               { fd_alloc(&f->g, 0, 16, 8), 16, true } };
        heads[i] = fd_vq_add(&f->q, b, 2);
    }
    assert_int_equal(vn_vq_avail_count(&f->vq), 4);
    assert_int_equal(pop(f), VN_POP_OK);
    assert_int_equal(f->c.head, heads[0]);
    assert_int_equal(pop(f), VN_POP_OK);
    assert_int_equal(f->c.head, heads[1]);
    assert_int_equal(vn_vq_avail_count(&f->vq), 2);
    vn_vq_unpop(&f->vq, 2);
    assert_int_equal(vn_vq_avail_count(&f->vq), 4);
    uint16_t got[4];
    for (unsigned i = 0; i < 4; i++) {
        assert_int_equal(pop(f), VN_POP_OK);
        got[i] = f->c.head;
        assert_int_equal(got[i], heads[i]);
    }
    assert_int_equal(pop(f), VN_POP_EMPTY);
    for (int i = 3; i >= 0; i--)
        vn_vq_push(&f->vq, got[i], (uint32_t)(100 + i));
    /* Not visible before publish. */
    assert_int_equal(fd_vq_used_idx(&f->q), 0);
    vn_vq_publish(&f->vq);
    assert_int_equal(fd_vq_used_idx(&f->q), 4);
    for (int i = 3; i >= 0; i--) {
        uint32_t id, len;
        assert_true(fd_vq_get_used(&f->q, &id, &len));
        assert_int_equal(id, heads[i]);
        assert_int_equal(len, 100 + i);
    }
    fd_assert_no_errors(&f->st);
}

/* Mergeable rx buffers: one packet spread over several single-buffer chains,
 * returned as consecutive used entries with their lengths, num_buffers in
 * the first buffer's header, published at once. */
static void test_mergeable_buffers(void **state)
{
    struct fx *f = *state;
    uint64_t bufs[5];
    for (unsigned i = 0; i < 5; i++) {
        bufs[i] = fd_alloc(&f->g, i % 2, 256, 64);
        fd_vq_add(&f->q, &(struct fd_buf){ bufs[i], 256, true }, 1);
    }
    /* The device pops buffers until the packet (12-byte header + 600 bytes)
     * fits, fills them in order, and gives one back it did not need. */
    uint8_t pkt[612];
    for (unsigned i = 0; i < sizeof(pkt); i++)
        pkt[i] = (uint8_t)(i * 13);
    struct iovec iov[4];
    uint16_t heads[4];
    size_t cap = 0;
    unsigned nb = 0;
    while (nb < 4) {
        struct vn_chain c;
        int err;
        assert_int_equal(vn_vq_pop(&f->vq, &iov[nb], 1, &c, &err), VN_POP_OK);
        assert_int_equal(c.niov, 1);
        assert_int_equal(c.nout, 0);
        assert_int_equal(c.in_len, 256);
        heads[nb++] = c.head;
        cap += c.in_len;
    }
    assert_true(cap >= sizeof(pkt));
    size_t off = 0;
    unsigned used = 0;
    while (off < sizeof(pkt)) {
        size_t n = sizeof(pkt) - off < iov[used].iov_len ? sizeof(pkt) - off : iov[used].iov_len;
        memcpy(iov[used].iov_base, pkt + off, n);
        vn_vq_push(&f->vq, heads[used], (uint32_t)n);
        off += n;
        used++;
    }
    assert_int_equal(used, 3);
    vn_le16_put((uint8_t *)iov[0].iov_base + 10, (uint16_t)used);
    vn_vq_unpop(&f->vq, (uint16_t)(nb - used));
    vn_vq_publish(&f->vq);
    assert_int_equal(vn_vq_avail_count(&f->vq), 2);

    /* The driver reassembles. */
    uint8_t got[612];
    uint32_t id, len;
    assert_true(fd_vq_get_used(&f->q, &id, &len));
    assert_int_equal(id, 0);
    assert_int_equal(len, 256);
    fd_read(&f->g, bufs[0], got, 256);
    assert_int_equal(vn_le16_get(got + 10), 3);
    vn_le16_put(got + 10, vn_le16_get(pkt + 10));
    size_t at = 256;
    for (unsigned i = 1; i < 3; i++) {
        assert_true(fd_vq_get_used(&f->q, &id, &len));
        assert_int_equal(id, i);
        fd_read(&f->g, bufs[id], got + at, len);
        at += len;
    }
    assert_int_equal(at, sizeof(pkt));
    assert_int_equal(len, 612 - 512);
    assert_memory_equal(got, pkt, sizeof(pkt));
    assert_false(fd_vq_get_used(&f->q, &id, &len));
    /* The unneeded buffer is popped again next time. */
    assert_int_equal(pop(f), VN_POP_OK);
    assert_int_equal(f->c.head, 3);
    fd_assert_no_errors(&f->st);
}

/* ---- indirect descriptors ---------------------------------------------- */

static void test_indirect_table(void **state)
{
    struct fx *f = *state;
    struct fd_buf bufs[3] = { { fd_alloc(&f->g, 0, 12, 4), 12, false },
                              { fd_alloc(&f->g, 1, 1514, 4), 1514, false },
                              { fd_alloc(&f->g, 0, 4, 4), 4, true } };
    uint64_t t = fd_indirect_table(&f->g, 1, bufs, 3);
    fd_vq_desc(&f->q, 4, t, 3 * 16, VRING_DESC_F_INDIRECT, 0);
    fd_vq_make_avail(&f->q, 4);
    assert_int_equal(pop(f), VN_POP_OK);
    assert_int_equal(f->c.head, 4);
    assert_int_equal(f->c.niov, 3);
    assert_int_equal(f->c.nout, 2);
    assert_int_equal(f->c.out_len, 1526);
    assert_int_equal(f->c.in_len, 4);
    for (unsigned i = 0; i < 3; i++)
        assert_ptr_equal(f->iov[i].iov_base, fd_hva(&f->g, bufs[i].gpa, bufs[i].len));
    fd_assert_no_errors(&f->st);
}

/* Indirect tables need no alignment. */
static void test_indirect_table_unaligned(void **state)
{
    struct fx *f = *state;
    struct fd_buf bufs[2] = { { fd_alloc(&f->g, 0, 10, 1), 10, false },
                              { fd_alloc(&f->g, 0, 20, 1), 20, true } };
    uint64_t t = fd_alloc(&f->g, 1, 2 * 16 + 1, 16) + 1;
    fd_write_desc(&f->g, t, 0, bufs[0].gpa, 10, VRING_DESC_F_NEXT, 1);
    fd_write_desc(&f->g, t, 1, bufs[1].gpa, 20, VRING_DESC_F_WRITE, 0);
    fd_vq_desc(&f->q, 0, t, 32, VRING_DESC_F_INDIRECT, 0);
    fd_vq_make_avail(&f->q, 0);
    assert_int_equal(pop(f), VN_POP_OK);
    assert_int_equal(f->c.niov, 2);
    assert_int_equal(f->c.out_len, 10);
    assert_int_equal(f->c.in_len, 20);
    fd_assert_no_errors(&f->st);
}

/* Direct descriptors followed by an indirect one (as vhost accepts). */
static void test_indirect_after_direct(void **state)
{
    struct fx *f = *state;
    struct fd_buf ib[2] = { { fd_alloc(&f->g, 0, 8, 4), 8, false }, { fd_alloc(&f->g, 0, 8, 4), 8, true } };
    uint64_t t = fd_indirect_table(&f->g, 0, ib, 2);
    uint64_t d = fd_alloc(&f->g, 0, 16, 4);
    fd_vq_desc(&f->q, 1, d, 16, VRING_DESC_F_NEXT, 2);
    fd_vq_desc(&f->q, 2, t, 32, VRING_DESC_F_INDIRECT, 0);
    fd_vq_make_avail(&f->q, 1);
    assert_int_equal(pop(f), VN_POP_OK);
    assert_int_equal(f->c.niov, 3);
    assert_int_equal(f->c.nout, 2);
    assert_int_equal(f->c.out_len, 24);
    assert_int_equal(f->c.in_len, 8);
}

/* The largest table the device takes: 1024 descriptors. */
static void test_indirect_max_table(void **state)
{
    struct fx *f = *state;
    static struct fd_buf bufs[VN_VQ_MAX_SIZE];
    uint64_t b = fd_alloc(&f->g, 1, VN_VQ_MAX_SIZE * 4, 4);
    for (unsigned i = 0; i < VN_VQ_MAX_SIZE; i++)
        bufs[i] = (struct fd_buf){ b + 4 * i, 4, i >= 10 };
    uint64_t t = fd_indirect_table(&f->g, 0, bufs, VN_VQ_MAX_SIZE);
    fd_vq_desc(&f->q, 0, t, VN_VQ_MAX_SIZE * 16, VRING_DESC_F_INDIRECT, 0);
    fd_vq_make_avail(&f->q, 0);
    assert_int_equal(pop(f), VN_POP_OK);
    assert_int_equal(f->c.niov, VN_VQ_MAX_SIZE);
    assert_int_equal(f->c.nout, 10);
    assert_int_equal(f->c.in_len, (VN_VQ_MAX_SIZE - 10) * 4);
    fd_assert_no_errors(&f->st);
}

static void test_indirect_not_negotiated(void **state)
{
    struct fx *f = *state;
    struct fd_buf b = { fd_alloc(&f->g, 0, 8, 4), 8, false };
    uint64_t t = fd_indirect_table(&f->g, 0, &b, 1);
    fd_vq_desc(&f->q, 0, t, 16, VRING_DESC_F_INDIRECT, 0);
    fd_vq_make_avail(&f->q, 0);
    expect_bad(f, 0, VN_ERR_INDIRECT);
    expect_still_works(f);
}

static void test_indirect_inside_indirect(void **state)
{
    struct fx *f = *state;
    struct fd_buf b = { fd_alloc(&f->g, 0, 8, 4), 8, false };
    uint64_t inner = fd_indirect_table(&f->g, 0, &b, 1);
    uint64_t outer = fd_alloc(&f->g, 0, 32, 16);
    fd_write_desc(&f->g, outer, 0, b.gpa, 8, VRING_DESC_F_NEXT, 1);
    fd_write_desc(&f->g, outer, 1, inner, 16, VRING_DESC_F_INDIRECT, 0);
    fd_vq_desc(&f->q, 2, outer, 32, VRING_DESC_F_INDIRECT, 0);
    fd_vq_make_avail(&f->q, 2);
    expect_bad(f, 2, VN_ERR_INDIRECT);
    /* A table pointing at itself is the same thing. */
    fd_write_desc(&f->g, outer, 0, outer, 32, VRING_DESC_F_INDIRECT, 0);
    fd_vq_make_avail(&f->q, 2);
    assert_int_equal(pop(f), VN_POP_BAD);
    assert_int_equal(f->err, VN_ERR_INDIRECT);
    fd_assert_errors(&f->st, VN_ERR_INDIRECT, 2);
}

static void test_indirect_with_next(void **state)
{
    struct fx *f = *state;
    struct fd_buf b = { fd_alloc(&f->g, 0, 8, 4), 8, false };
    uint64_t t = fd_indirect_table(&f->g, 0, &b, 1);
    fd_vq_desc(&f->q, 0, t, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 1);
    fd_vq_desc(&f->q, 1, b.gpa, 8, 0, 0);
    fd_vq_make_avail(&f->q, 0);
    expect_bad(f, 0, VN_ERR_INDIRECT);
    expect_still_works(f);
}

static void test_indirect_bad_length(void **state)
{
    struct fx *f = *state;
    uint64_t t = fd_alloc(&f->g, 0, 17 * 16, 16);
    const uint32_t lens[] = { 0, 8, 17, 16 * (VN_VQ_MAX_SIZE + 1), UINT32_MAX & ~15u };
    for (unsigned i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
        fd_vq_desc(&f->q, 3, t, lens[i], VRING_DESC_F_INDIRECT, 0);
        fd_vq_make_avail(&f->q, 3);
        assert_int_equal(pop(f), VN_POP_BAD);
        assert_int_equal(f->err, VN_ERR_INDIRECT);
        fd_assert_errors(&f->st, VN_ERR_INDIRECT, i + 1);
    }
}

static void test_indirect_table_outside_memory(void **state)
{
    struct fx *f = *state;
    const uint64_t addrs[] = {
        FD_GPA_HOLE,
        FD_GPA_B - 16,              /* straddles regions A and B */
        FD_GPA_RO + FD_LEN_RO - 16, /* runs past the end */
        UINT64_MAX - 15,            /* wraps */
    };
    for (unsigned i = 0; i < sizeof(addrs) / sizeof(addrs[0]); i++) {
        fd_vq_desc(&f->q, 1, addrs[i], 32, VRING_DESC_F_INDIRECT, 0);
        fd_vq_make_avail(&f->q, 1);
        assert_int_equal(pop(f), VN_POP_BAD);
        assert_int_equal(f->err, VN_ERR_DESC_ADDR);
        fd_assert_errors(&f->st, VN_ERR_DESC_ADDR, i + 1);
    }
    /* A table in read-only memory is fine (the device only reads it). */
    uint64_t ro = FD_GPA_RO + 0x100; /* zeroed: one empty descriptor */
    fd_vq_desc(&f->q, 1, ro, 16, VRING_DESC_F_INDIRECT, 0);
    fd_vq_make_avail(&f->q, 1);
    assert_int_equal(pop(f), VN_POP_OK);
    assert_int_equal(f->c.niov, 0);
    assert_int_equal(f->st.errors[VN_ERR_ZERO_LENGTH], 1);
    f->st.errors[VN_ERR_ZERO_LENGTH] = 0;
    fd_assert_errors(&f->st, VN_ERR_DESC_ADDR, 4);
}

static void test_indirect_loop(void **state)
{
    struct fx *f = *state;
    uint64_t b = fd_alloc(&f->g, 0, 8, 4);
    uint64_t t = fd_alloc(&f->g, 0, 4 * 16, 16);
    for (uint16_t i = 0; i < 4; i++)
        fd_write_desc(&f->g, t, i, b, 8, VRING_DESC_F_NEXT, (uint16_t)((i + 1) % 4));
    fd_vq_desc(&f->q, 0, t, 64, VRING_DESC_F_INDIRECT, 0);
    fd_vq_make_avail(&f->q, 0);
    expect_bad(f, 0, VN_ERR_DESC_LOOP);
}

static void test_indirect_next_out_of_range(void **state)
{
    struct fx *f = *state;
    uint64_t b = fd_alloc(&f->g, 0, 8, 4);
    uint64_t t = fd_alloc(&f->g, 0, 2 * 16, 16);
    /* next == 2 is inside the ring (size 8) but past this 2-entry table. */
    fd_write_desc(&f->g, t, 0, b, 8, VRING_DESC_F_NEXT, 1);
    fd_write_desc(&f->g, t, 1, b, 8, VRING_DESC_F_NEXT, 2);
    fd_vq_desc(&f->q, 0, t, 32, VRING_DESC_F_INDIRECT, 0);
    fd_vq_make_avail(&f->q, 0);
    expect_bad(f, 0, VN_ERR_DESC_NEXT);
}

static void test_indirect_chain_too_long(void **state)
{
    struct fx *f = *state;
    struct fd_buf bufs[6];
    for (unsigned i = 0; i < 6; i++)
        bufs[i] = (struct fd_buf){ fd_alloc(&f->g, 0, 8, 4), 8, false };
    uint64_t t = fd_indirect_table(&f->g, 0, bufs, 6);
    fd_vq_desc(&f->q, 0, t, 6 * 16, VRING_DESC_F_INDIRECT, 0);
    fd_vq_make_avail(&f->q, 0);
    assert_int_equal(pop_n(f, 5), VN_POP_BAD);
    assert_int_equal(f->err, VN_ERR_CHAIN_TOO_LONG);
    fd_assert_errors(&f->st, VN_ERR_CHAIN_TOO_LONG, 1);
}

/* ---- hostile descriptors ------------------------------------------------ */

static void test_desc_addr_outside_memory(void **state)
{
    struct fx *f = *state;
    struct {
        uint64_t addr;
        uint32_t len;
        uint16_t flags;
    } cases[] = {
        { FD_GPA_HOLE, 64, 0 },
        { 0, 1, 0 },
        { FD_GPA_A - 1, 2, 0 },                   /* starts just before region A */
        { FD_GPA_B - 8, 16, 0 },                  /* straddles A and B (read) */
        { FD_GPA_B - 1, 2, VRING_DESC_F_WRITE },  /* straddles A and B (write) */
        { FD_GPA_A, (uint32_t)(FD_LEN_A + FD_LEN_B), 0 }, /* all of A and B */
        { FD_GPA_B + FD_LEN_B - 4, 8, 0 },        /* runs past the end of B */
        { UINT64_MAX - 7, 16, 0 },                /* wraps around */
        { UINT64_MAX, 1, 0 },
        { FD_GPA_RO, 16, VRING_DESC_F_WRITE },    /* device-writable in read-only memory */
    };
    for (unsigned i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        uint64_t ok = fd_alloc(&f->g, 0, 8, 8);
        /* The bad buffer comes second in the chain. */
        fd_vq_desc(&f->q, 2, ok, 8, VRING_DESC_F_NEXT, 5);
        fd_vq_desc(&f->q, 5, cases[i].addr, cases[i].len, cases[i].flags, 0);
        fd_vq_make_avail(&f->q, 2);
        assert_int_equal(pop(f), VN_POP_BAD);
        assert_int_equal(f->err, VN_ERR_DESC_ADDR);
        assert_int_equal(f->c.head, 2);
        fd_assert_errors(&f->st, VN_ERR_DESC_ADDR, i + 1);
    }
    /* The largest buffer that fits: all of region B. */
    fd_vq_desc(&f->q, 2, FD_GPA_B, (uint32_t)FD_LEN_B, VRING_DESC_F_WRITE, 0);
    fd_vq_make_avail(&f->q, 2);
    assert_int_equal(pop(f), VN_POP_OK);
    assert_int_equal(f->c.in_len, FD_LEN_B);
    /* A readable buffer in read-only memory is fine. */
    fd_vq_desc(&f->q, 2, FD_GPA_RO + FD_LEN_RO - 16, 16, 0, 0);
    fd_vq_make_avail(&f->q, 2);
    assert_int_equal(pop(f), VN_POP_OK);
    fd_assert_errors(&f->st, VN_ERR_DESC_ADDR, 10);
}

static void test_desc_loop(void **state)
{
    struct fx *f = *state;
    uint64_t b = fd_alloc(&f->g, 0, 8, 4);
    /* 0 -> 1 -> 0 */
    fd_vq_desc(&f->q, 0, b, 8, VRING_DESC_F_NEXT, 1);
    fd_vq_desc(&f->q, 1, b, 8, VRING_DESC_F_NEXT, 0);
    fd_vq_make_avail(&f->q, 0);
    assert_int_equal(pop_n(f, IOV_MAX_TEST), VN_POP_BAD);
    assert_int_equal(f->err, VN_ERR_DESC_LOOP);
    /* Self loop, with zero-length descriptors (never put in an iovec). */
    fd_vq_desc(&f->q, 6, b, 0, VRING_DESC_F_NEXT, 6);
    fd_vq_make_avail(&f->q, 6);
    assert_int_equal(pop(f), VN_POP_BAD);
    assert_int_equal(f->err, VN_ERR_DESC_LOOP);
    assert_int_equal(f->st.errors[VN_ERR_DESC_LOOP], 2);
    assert_int_equal(f->st.errors[VN_ERR_ZERO_LENGTH], QSIZE);
    /* A loop through every descriptor of the ring. */
    for (uint16_t i = 0; i < QSIZE; i++)
        fd_vq_desc(&f->q, i, b, 8, VRING_DESC_F_NEXT, (uint16_t)((i + 3) % QSIZE));
    fd_vq_make_avail(&f->q, 4);
    assert_int_equal(pop(f), VN_POP_BAD);
    assert_int_equal(f->err, VN_ERR_DESC_LOOP);
    assert_int_equal(f->st.errors[VN_ERR_DESC_LOOP], 3);
}

static void test_chain_too_long(void **state)
{
    struct fx *f = *state;
    struct fd_buf bufs[QSIZE];
    for (unsigned i = 0; i < QSIZE; i++)
        bufs[i] = (struct fd_buf){ fd_alloc(&f->g, 0, 8, 4), 8, false };
    fd_vq_add(&f->q, bufs, QSIZE);
    assert_int_equal(pop_n(f, QSIZE - 1), VN_POP_BAD);
    assert_int_equal(f->err, VN_ERR_CHAIN_TOO_LONG);
    fd_assert_errors(&f->st, VN_ERR_CHAIN_TOO_LONG, 1);
    /* The same chain fits an iovec array of its length. */
    vn_vq_unpop(&f->vq, 1);
    assert_int_equal(pop_n(f, QSIZE), VN_POP_OK);
    assert_int_equal(f->c.niov, QSIZE);
    /* No room at all. */
    fd_vq_make_avail(&f->q, 0);
    assert_int_equal(pop_n(f, 0), VN_POP_BAD);
    assert_int_equal(f->err, VN_ERR_CHAIN_TOO_LONG);
}

static void test_zero_length_descriptors(void **state)
{
    struct fx *f = *state;
    uint64_t b = fd_alloc(&f->g, 0, 64, 4);
    /* Zero-length descriptors are skipped, even with a bogus address, and
     * counted; they do not take an iovec. */
    fd_vq_desc(&f->q, 0, b, 10, VRING_DESC_F_NEXT, 1);
    fd_vq_desc(&f->q, 1, FD_GPA_HOLE, 0, VRING_DESC_F_NEXT, 2);
    fd_vq_desc(&f->q, 2, b + 10, 0, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 3);
    fd_vq_desc(&f->q, 3, b + 20, 30, VRING_DESC_F_WRITE, 0);
    fd_vq_make_avail(&f->q, 0);
    assert_int_equal(pop_n(f, 2), VN_POP_OK);
    assert_int_equal(f->c.niov, 2);
    assert_int_equal(f->c.nout, 1);
    assert_int_equal(f->c.out_len, 10);
    assert_int_equal(f->c.in_len, 30);
    assert_ptr_equal(f->iov[1].iov_base, fd_hva(&f->g, b + 20, 30));
    fd_assert_errors(&f->st, VN_ERR_ZERO_LENGTH, 2);
    /* A chain of nothing but a zero-length descriptor. */
    fd_vq_desc(&f->q, 5, 0, 0, 0, 0);
    fd_vq_make_avail(&f->q, 5);
    assert_int_equal(pop(f), VN_POP_OK);
    assert_int_equal(f->c.niov, 0);
    assert_int_equal(f->c.out_len + f->c.in_len, 0);
    fd_assert_errors(&f->st, VN_ERR_ZERO_LENGTH, 3);
}

static void test_next_out_of_range(void **state)
{
    struct fx *f = *state;
    uint64_t b = fd_alloc(&f->g, 0, 8, 4);
    const uint16_t nexts[] = { QSIZE, QSIZE + 1, 0x8000, 0xffff };
    for (unsigned i = 0; i < sizeof(nexts) / sizeof(nexts[0]); i++) {
        fd_vq_desc(&f->q, 7, b, 8, VRING_DESC_F_NEXT, nexts[i]);
        fd_vq_make_avail(&f->q, 7);
        assert_int_equal(pop(f), VN_POP_BAD);
        assert_int_equal(f->err, VN_ERR_DESC_NEXT);
        assert_int_equal(f->c.head, 7);
        fd_assert_errors(&f->st, VN_ERR_DESC_NEXT, i + 1);
    }
    /* Without NEXT, `next` is ignored. */
    fd_vq_desc(&f->q, 7, b, 8, 0, 0xffff);
    fd_vq_make_avail(&f->q, 7);
    assert_int_equal(pop(f), VN_POP_OK);
}

static void test_write_then_read(void **state)
{
    struct fx *f = *state;
    struct fd_buf bufs[3] = { { fd_alloc(&f->g, 0, 8, 4), 8, false },
                              { fd_alloc(&f->g, 0, 8, 4), 8, true },
                              { fd_alloc(&f->g, 0, 8, 4), 8, false } };
    uint16_t head = fd_vq_add(&f->q, bufs, 3);
    expect_bad(f, head, VN_ERR_DESC_ORDER);
    expect_still_works(f);
}

/* ---- hostile rings ------------------------------------------------------ */

static void test_avail_idx_jump(void **state)
{
    struct fx *f = *state;
    /* Exactly a full ring is fine. */
    fd_vq_set_avail_idx(&f->q, QSIZE);
    assert_int_equal(vn_vq_avail_count(&f->vq), QSIZE);
    for (unsigned i = 0; i < QSIZE; i++)
        assert_int_equal(pop(f), VN_POP_OK); /* zeroed ring: head 0, empty desc */
    assert_int_equal(pop(f), VN_POP_EMPTY);
    /* One more than the ring holds. */
    fd_vq_set_avail_idx(&f->q, 2 * QSIZE + 1);
    fd_assert_errors(&f->st, VN_ERR_ZERO_LENGTH, QSIZE);
    f->st.errors[VN_ERR_ZERO_LENGTH] = 0;
    expect_fatal(f, VN_ERR_AVAIL_IDX);
}

static void test_avail_idx_backwards(void **state)
{
    struct fx *f = *state;
    fd_vq_set_avail_idx(&f->q, 2);
    assert_int_equal(pop(f), VN_POP_OK);
    assert_int_equal(pop(f), VN_POP_OK);
    fd_vq_set_avail_idx(&f->q, 1);
    f->st.errors[VN_ERR_ZERO_LENGTH] = 0;
    expect_fatal(f, VN_ERR_AVAIL_IDX);
}

static void test_head_out_of_range(void **state)
{
    struct fx *f = *state;
    fd_vq_make_avail(&f->q, QSIZE);
    expect_fatal(f, VN_ERR_HEAD_INDEX);
}

static void test_head_out_of_range_max(void **state)
{
    struct fx *f = *state;
    uint64_t b = fd_alloc(&f->g, 0, 8, 4);
    fd_vq_add(&f->q, &(struct fd_buf){ b, 8, false }, 1);
    fd_vq_make_avail(&f->q, 0xffff);
    assert_int_equal(pop(f), VN_POP_OK);
    expect_fatal(f, VN_ERR_HEAD_INDEX);
}

/* ---- wrap-around -------------------------------------------------------- */

/* More than 2^16 chains through a small ring: the 16-bit indices wrap, ring
 * slots are idx mod size, a batch straddles the wrap. */
static void test_index_wrap_around(void **state)
{
    (void)state;
    struct fx *f = fx_new(4, true, false);
    *state = f;
    uint64_t rb = fd_alloc(&f->g, 0, 64, 8);
    uint64_t wb = fd_alloc(&f->g, 1, 64, 8);
    fd_fill(&f->g, rb, 64, 0);
    uint32_t total = 0;
    for (uint32_t round = 0; round < 0x10000 / 2 + 100; round++) {
        unsigned batch = 1 + round % 3;
        uint16_t heads[3];
        for (unsigned k = 0; k < batch; k++) {
            f->q.next_desc = (uint16_t)((round + k) % 4);
            struct fd_buf b[1] = { { (k % 2) ? wb : rb, (uint32_t)(8 + k), (k % 2) != 0 } };
            heads[k] = fd_vq_chain(&f->q, b, 1);
        }
        for (unsigned k = 0; k < batch; k++)
            fd_vq_make_avail(&f->q, heads[k]);
        for (unsigned k = 0; k < batch; k++) {
            assert_int_equal(vn_vq_pop(&f->vq, f->iov, 4, &f->c, &f->err), VN_POP_OK);
            assert_int_equal(f->c.head, heads[k]);
            assert_int_equal(f->c.niov, 1);
            assert_int_equal(f->iov[0].iov_len, 8 + k);
            vn_vq_push(&f->vq, f->c.head, (uint32_t)(round + k));
        }
        vn_vq_publish(&f->vq);
        assert_int_equal(fd_vq_used_idx(&f->q), (uint16_t)(total + batch));
        for (unsigned k = 0; k < batch; k++) {
            uint32_t id, len;
            assert_true(fd_vq_get_used(&f->q, &id, &len));
            assert_int_equal(id, heads[k]);
            assert_int_equal(len, round + k);
        }
        total += batch;
    }
    assert_true(total > 0x10000);
    assert_int_equal(f->vq.last_avail, (uint16_t)total);
    assert_int_equal(f->vq.used_idx, (uint16_t)total);
    fd_assert_no_errors(&f->st);
}

/* Starting just below the wrap: avail_count and a full ring across it. */
static void test_full_ring_across_wrap(void **state)
{
    struct fx *f = *state;
    const uint16_t start = 0xfffc;
    f->vq.last_avail = f->vq.used_idx = start;
    f->q.avail_idx = f->q.last_used = start;
    fd_vq_set_avail_idx(&f->q, start);
    vn_le16_store_release((uint16_t *)fd_hva(&f->g, f->q.used + 2, 2), start);
    uint64_t b = fd_alloc(&f->g, 0, 8, 4);
    for (unsigned i = 0; i < QSIZE; i++)
        fd_vq_add(&f->q, &(struct fd_buf){ b, 8, true }, 1);
    assert_int_equal(f->q.avail_idx, (uint16_t)(start + QSIZE));
    assert_int_equal(vn_vq_avail_count(&f->vq), QSIZE);
    for (unsigned i = 0; i < QSIZE; i++) {
        assert_int_equal(pop(f), VN_POP_OK);
        assert_int_equal(f->c.head, i);
        vn_vq_push(&f->vq, f->c.head, i);
    }
    vn_vq_publish(&f->vq);
    for (unsigned i = 0; i < QSIZE; i++) {
        uint32_t id, len;
        assert_true(fd_vq_get_used(&f->q, &id, &len));
        assert_int_equal(id, i);
        assert_int_equal(len, i);
    }
    assert_int_equal(fd_vq_used_idx(&f->q), (uint16_t)(start + QSIZE));
    fd_assert_no_errors(&f->st);
}

/* ---- notification suppression ------------------------------------------ */

static void push_one(struct fx *f)
{
    uint64_t b = fd_alloc(&f->g, 0, 8, 4);
    f->q.next_desc = 0;
    fd_vq_add(&f->q, &(struct fd_buf){ b, 8, true }, 1);
    assert_int_equal(pop(f), VN_POP_OK);
    vn_vq_push(&f->vq, f->c.head, 8);
}

static void test_event_idx_interrupt_suppression(void **state)
{
    struct fx *f = *state;
    /* The first notification is always sent (whatever used_event says). */
    fd_vq_set_used_event(&f->q, 0x8000);
    push_one(f);
    vn_vq_publish(&f->vq);
    assert_true(vn_vq_should_notify(&f->vq));
    /* used_event = 1: interrupt when used idx passes 1, i.e. becomes 2. */
    fd_vq_set_used_event(&f->q, 1);
    push_one(f);
    vn_vq_publish(&f->vq);
    assert_true(vn_vq_should_notify(&f->vq)); /* used idx 2 */
    /* The driver wants no interrupt until used idx reaches 6. */
    fd_vq_set_used_event(&f->q, 5);
    for (int i = 0; i < 3; i++) {
        push_one(f);
        vn_vq_publish(&f->vq);
        assert_false(vn_vq_should_notify(&f->vq)); /* 3, 4, 5 */
    }
    push_one(f);
    vn_vq_publish(&f->vq);
    assert_true(vn_vq_should_notify(&f->vq)); /* 6 */
    /* Nothing new since the last interrupt. */
    assert_false(vn_vq_should_notify(&f->vq));
    /* A batch jumping over used_event notifies once. */
    fd_vq_set_used_event(&f->q, 7);
    for (int i = 0; i < 3; i++)
        push_one(f);
    vn_vq_publish(&f->vq);
    assert_true(vn_vq_should_notify(&f->vq)); /* 6 -> 9 passes 7 */
    /* used_event behind the last signalled index: already served. */
    fd_vq_set_used_event(&f->q, 3);
    push_one(f);
    vn_vq_publish(&f->vq);
    assert_false(vn_vq_should_notify(&f->vq));
    /* The NO_INTERRUPT flag is ignored with EVENT_IDX. */
    fd_vq_set_avail_flags(&f->q, VRING_AVAIL_F_NO_INTERRUPT);
    fd_vq_set_used_event(&f->q, f->vq.used_idx);
    push_one(f);
    vn_vq_publish(&f->vq);
    assert_true(vn_vq_should_notify(&f->vq));
    fd_assert_no_errors(&f->st);
}

static void test_event_idx_wraps(void **state)
{
    struct fx *f = *state;
    f->vq.last_avail = f->vq.used_idx = 0xfffd;
    f->q.avail_idx = f->q.last_used = 0xfffd;
    fd_vq_set_avail_idx(&f->q, 0xfffd);
    push_one(f);
    vn_vq_publish(&f->vq);
    assert_true(vn_vq_should_notify(&f->vq)); /* first: 0xfffe */
    fd_vq_set_used_event(&f->q, 0xffff);      /* wants used idx 0x0000 */
    push_one(f);
    vn_vq_publish(&f->vq);
    assert_false(vn_vq_should_notify(&f->vq)); /* 0xffff */
    push_one(f);
    vn_vq_publish(&f->vq);
    assert_true(vn_vq_should_notify(&f->vq)); /* 0x0000 */
    /* A stale used_event (already passed) asks for nothing. */
    fd_vq_set_used_event(&f->q, 0xfffe);
    push_one(f);
    push_one(f);
    vn_vq_publish(&f->vq);
    assert_false(vn_vq_should_notify(&f->vq)); /* 0x0002 */
    fd_vq_set_used_event(&f->q, 2);
    push_one(f);
    vn_vq_publish(&f->vq);
    assert_true(vn_vq_should_notify(&f->vq)); /* 0x0003 */
}

static void test_event_idx_kick_suppression(void **state)
{
    struct fx *f = *state;
    uint64_t b = fd_alloc(&f->g, 0, 8, 4);
    /* Device asks for doorbells at its current position. */
    assert_false(vn_vq_enable_notify(&f->vq));
    assert_int_equal(fd_vq_avail_event(&f->q), 0);
    uint16_t old = f->q.avail_idx;
    fd_vq_add(&f->q, &(struct fd_buf){ b, 8, false }, 1);
    assert_true(fd_vq_kick_needed(&f->q, true, old));
    /* The device has not caught up: no further kick needed. */
    old = f->q.avail_idx;
    fd_vq_add(&f->q, &(struct fd_buf){ b, 8, false }, 1);
    assert_false(fd_vq_kick_needed(&f->q, true, old));
    /* enable_notify reports the pending buffers (do not sleep). */
    assert_true(vn_vq_enable_notify(&f->vq));
    vn_vq_disable_notify(&f->vq);
    assert_int_equal(pop(f), VN_POP_OK);
    assert_int_equal(pop(f), VN_POP_OK);
    /* While busy (not re-enabled) avail_event stays behind: no kicks. */
    old = f->q.avail_idx;
    fd_vq_add(&f->q, &(struct fd_buf){ b, 8, false }, 1);
    assert_false(fd_vq_kick_needed(&f->q, true, old));
    assert_int_equal(pop(f), VN_POP_OK);
    /* Idle again: avail_event = last_avail = 3, the next buffer kicks. */
    assert_false(vn_vq_enable_notify(&f->vq));
    assert_int_equal(fd_vq_avail_event(&f->q), 3);
    old = f->q.avail_idx;
    fd_vq_add(&f->q, &(struct fd_buf){ b, 8, false }, 1);
    fd_vq_add(&f->q, &(struct fd_buf){ b, 8, false }, 1);
    assert_true(fd_vq_kick_needed(&f->q, true, old)); /* a batch of two passes 3 */
    /* The used flags are left alone with EVENT_IDX. */
    assert_int_equal(fd_vq_used_flags(&f->q), 0);
}

static void test_flags_suppression(void **state)
{
    struct fx *f = *state; /* no EVENT_IDX */
    uint64_t b = fd_alloc(&f->g, 0, 8, 4);
    /* Interrupts: VRING_AVAIL_F_NO_INTERRUPT. */
    push_one(f);
    vn_vq_publish(&f->vq);
    assert_true(vn_vq_should_notify(&f->vq));
    fd_vq_set_avail_flags(&f->q, VRING_AVAIL_F_NO_INTERRUPT);
    push_one(f);
    vn_vq_publish(&f->vq);
    assert_false(vn_vq_should_notify(&f->vq));
    fd_vq_set_avail_flags(&f->q, 0);
    push_one(f);
    vn_vq_publish(&f->vq);
    assert_true(vn_vq_should_notify(&f->vq));
    /* Kicks: VRING_USED_F_NO_NOTIFY. */
    vn_vq_disable_notify(&f->vq);
    assert_int_equal(fd_vq_used_flags(&f->q), VRING_USED_F_NO_NOTIFY);
    uint16_t old = f->q.avail_idx;
    fd_vq_add(&f->q, &(struct fd_buf){ b, 8, false }, 1);
    assert_false(fd_vq_kick_needed(&f->q, false, old));
    assert_true(vn_vq_enable_notify(&f->vq)); /* one is pending */
    assert_int_equal(fd_vq_used_flags(&f->q), 0);
    assert_int_equal(pop(f), VN_POP_OK);
    assert_false(vn_vq_enable_notify(&f->vq));
    old = f->q.avail_idx;
    fd_vq_add(&f->q, &(struct fd_buf){ b, 8, false }, 1);
    assert_true(fd_vq_kick_needed(&f->q, false, old));
    fd_assert_no_errors(&f->st);
}

/* ---- counter names (exported to Python) --------------------------------- */

static void test_reason_names(void **state)
{
    (void)state;
    for (int i = 0; i < VN_ERR__COUNT; i++) {
        assert_non_null(vn_error_reason_name(i));
        assert_string_not_equal(vn_error_reason_name(i), "unknown");
    }
    for (int i = 0; i < VN_DROP__COUNT; i++)
        assert_string_not_equal(vn_drop_reason_name(i), "unknown");
    assert_string_equal(vn_error_reason_name(VN_ERR__COUNT), "unknown");
    assert_string_equal(vn_error_reason_name(-1), "unknown");
    assert_string_equal(vn_drop_reason_name(VN_DROP__COUNT), "unknown");
}

#define T(fn, setup) cmocka_unit_test_setup_teardown(fn, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_map_valid),
        cmocka_unit_test(test_map_bad_size),
        cmocka_unit_test(test_map_misaligned),
        cmocka_unit_test(test_map_outside_memory),
        cmocka_unit_test(test_rings_against_guard_pages),
        cmocka_unit_test(test_device_never_writes_driver_area),
        cmocka_unit_test(test_map_follows_memory_changes),
        T(test_empty, setup_plain),
        T(test_single_descriptor, setup_plain),
        T(test_chain_read_then_write, setup_plain),
        T(test_chain_out_of_order_descriptors, setup_plain),
        T(test_chain_full_ring, setup_plain),
        T(test_batch_out_of_order_completion_and_unpop, setup_plain),
        T(test_mergeable_buffers, setup_plain),
        T(test_indirect_table, setup_indirect),
        T(test_indirect_table_unaligned, setup_indirect),
        T(test_indirect_after_direct, setup_indirect),
        T(test_indirect_max_table, setup_indirect),
        T(test_indirect_not_negotiated, setup_plain),
        T(test_indirect_inside_indirect, setup_indirect),
        T(test_indirect_with_next, setup_indirect),
        T(test_indirect_bad_length, setup_indirect),
        T(test_indirect_table_outside_memory, setup_indirect),
        T(test_indirect_loop, setup_indirect),
        T(test_indirect_next_out_of_range, setup_indirect),
        T(test_indirect_chain_too_long, setup_indirect),
        T(test_desc_addr_outside_memory, setup_plain),
        T(test_desc_loop, setup_plain),
        T(test_chain_too_long, setup_plain),
        T(test_zero_length_descriptors, setup_plain),
        T(test_next_out_of_range, setup_plain),
        T(test_write_then_read, setup_plain),
        T(test_avail_idx_jump, setup_plain),
        T(test_avail_idx_backwards, setup_plain),
        T(test_head_out_of_range, setup_plain),
        T(test_head_out_of_range_max, setup_plain),
        cmocka_unit_test_teardown(test_index_wrap_around, teardown),
        T(test_full_ring_across_wrap, setup_plain),
        T(test_event_idx_interrupt_suppression, setup_event_idx),
        T(test_event_idx_wraps, setup_event_idx),
        T(test_event_idx_kick_suppression, setup_event_idx),
        T(test_flags_suppression, setup_plain),
        cmocka_unit_test(test_reason_names),
    };
    return cmocka_run_group_tests_name("virtq", tests, NULL, NULL);
}
