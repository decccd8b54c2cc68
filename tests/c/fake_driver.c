#include "fake_driver.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#include <cmocka.h>

#include "le.h"

void fd_guest_init_empty(struct fd_guest *g, struct vn_mem *mem)
{
    memset(g, 0, sizeof(*g));
    vn_mem_init(&g->own_mem);
    g->mem = mem != NULL ? mem : &g->own_mem;
}

void fd_guest_init(struct fd_guest *g, struct vn_mem *mem)
{
    fd_guest_init_empty(g, mem);
    assert_int_equal(fd_guest_add(g, FD_GPA_A, FD_LEN_A, true), 0);
    assert_int_equal(fd_guest_add(g, FD_GPA_B, FD_LEN_B, true), 1);
    assert_int_equal(fd_guest_add(g, FD_GPA_RO, FD_LEN_RO, false), 2);
}

unsigned fd_guest_add(struct fd_guest *g, uint64_t gpa, uint64_t len, bool writable)
{
    assert_true(g->n < FD_MAX_REGIONS);
    assert_true(len > 0 && len % FD_PAGE == 0);
    struct fd_region *r = &g->r[g->n];
    memset(r, 0, sizeof(*r));
    r->map_len = len + 2 * FD_PAGE;
    r->map = mmap(NULL, r->map_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(r->map != MAP_FAILED);
    r->hva = (uint8_t *)r->map + FD_PAGE;
    assert_int_equal(mprotect(r->hva, len, writable ? PROT_READ | PROT_WRITE : PROT_READ), 0);
    r->gpa = gpa;
    r->len = len;
    r->writable = writable;
    assert_int_equal(vn_mem_add(g->mem, gpa, len, r->hva, writable), 0);
    return g->n++;
}

void fd_guest_remove(struct fd_guest *g, unsigned i)
{
    struct fd_region *r = &g->r[i];
    assert_non_null(r->map);
    assert_int_equal(vn_mem_remove(g->mem, r->gpa, r->len), 0);
    munmap(r->map, r->map_len);
    r->map = NULL;
    r->hva = NULL;
    r->len = 0;
}

void fd_guest_protect(struct fd_guest *g, unsigned i, int prot)
{
    struct fd_region *r = &g->r[i];
    assert_non_null(r->map);
    assert_int_equal(mprotect(r->hva, r->len, prot), 0);
}

void fd_guest_destroy(struct fd_guest *g)
{
    for (unsigned i = 0; i < g->n; i++)
        if (g->r[i].map != NULL)
            fd_guest_remove(g, i);
    g->n = 0;
}

uint64_t fd_alloc(struct fd_guest *g, unsigned region, uint64_t len, uint64_t align)
{
    struct fd_region *r = &g->r[region];
    uint64_t off = (r->brk + align - 1) & ~(align - 1);
    assert_true(off + len <= r->len);
    r->brk = off + len;
    return r->gpa + off;
}

uint64_t fd_alloc_at_end(struct fd_guest *g, unsigned region, uint64_t len, uint64_t align)
{
    struct fd_region *r = &g->r[region];
    assert_true(len <= r->len);
    uint64_t off = (r->len - len) & ~(align - 1);
    assert_true(off >= r->brk);
    if (r->writable)
        memset(r->hva + off, 0, r->len - off);
    return r->gpa + off;
}

static const struct fd_region *find(const struct fd_guest *g, uint64_t gpa, uint64_t len)
{
    for (unsigned i = 0; i < g->n; i++) {
        const struct fd_region *r = &g->r[i];
        if (r->map != NULL && gpa >= r->gpa && gpa - r->gpa <= r->len && len <= r->len - (gpa - r->gpa))
            return r;
    }
    return NULL;
}

void *fd_hva(const struct fd_guest *g, uint64_t gpa, uint64_t len)
{
    const struct fd_region *r = find(g, gpa, len);
    if (r == NULL)
        fail_msg("test bug: guest range 0x%llx+0x%llx is not in one region",
                 (unsigned long long)gpa, (unsigned long long)len);
    return r->hva + (gpa - r->gpa);
}

bool fd_host_range_in_guest(const struct fd_guest *g, const void *p, size_t len, bool write)
{
    uintptr_t a = (uintptr_t)p;
    for (unsigned i = 0; i < g->n; i++) {
        const struct fd_region *r = &g->r[i];
        uintptr_t s = (uintptr_t)r->hva;
        if (r->map != NULL && a >= s && a - s <= r->len && len <= r->len - (a - s))
            return !write || r->writable;
    }
    return false;
}

void fd_check_iov(const struct fd_guest *g, const struct iovec *iov, unsigned niov, unsigned nout)
{
    for (unsigned i = 0; i < niov; i++) {
        bool write = i >= nout;
        assert_true(iov[i].iov_len > 0);
        if (!fd_host_range_in_guest(g, iov[i].iov_base, iov[i].iov_len, write))
            fail_msg("iov[%u] %p+%zu is outside guest memory", i, iov[i].iov_base, iov[i].iov_len);
        volatile uint8_t *p = iov[i].iov_base;
        for (size_t k = 0; k < iov[i].iov_len; k++) {
            uint8_t v = p[k];
            if (write)
                p[k] = v;
        }
    }
}

void fd_write(struct fd_guest *g, uint64_t gpa, const void *src, uint64_t len)
{
    memcpy(fd_hva(g, gpa, len), src, len);
}

void fd_read(const struct fd_guest *g, uint64_t gpa, void *dst, uint64_t len)
{
    memcpy(dst, fd_hva(g, gpa, len), len);
}

void fd_fill(struct fd_guest *g, uint64_t gpa, uint64_t len, uint8_t seed)
{
    uint8_t *p = fd_hva(g, gpa, len);
    for (uint64_t i = 0; i < len; i++)
        p[i] = (uint8_t)(seed + i * 7);
}

void fd_write_desc(struct fd_guest *g, uint64_t table_gpa, uint16_t i, uint64_t addr, uint32_t len,
                   uint16_t flags, uint16_t next)
{
    uint8_t d[16];
    uint64_t a = htole64(addr);
    memcpy(d, &a, 8);
    vn_le32_put(d + 8, len);
    vn_le16_put(d + 12, flags);
    vn_le16_put(d + 14, next);
    fd_write(g, table_gpa + 16 * (uint64_t)i, d, 16);
}

uint64_t fd_indirect_table(struct fd_guest *g, unsigned region, const struct fd_buf *bufs,
                           unsigned n)
{
    uint64_t t = fd_alloc(g, region, 16 * (uint64_t)n, 16);
    for (unsigned i = 0; i < n; i++) {
        uint16_t flags = (uint16_t)((bufs[i].write ? VRING_DESC_F_WRITE : 0) |
                                    (i + 1 < n ? VRING_DESC_F_NEXT : 0));
        fd_write_desc(g, t, (uint16_t)i, bufs[i].gpa, bufs[i].len, flags,
                      (uint16_t)(i + 1 < n ? i + 1 : 0));
    }
    return t;
}

void fd_vq_init_at(struct fd_vq *q, struct fd_guest *g, uint16_t size, uint64_t desc,
                   uint64_t avail, uint64_t used)
{
    memset(q, 0, sizeof(*q));
    q->g = g;
    q->size = size;
    q->desc = desc;
    q->avail = avail;
    q->used = used;
}

void fd_vq_init(struct fd_vq *q, struct fd_guest *g, unsigned region, uint16_t size)
{
    uint64_t desc = fd_alloc(g, region, 16 * (uint64_t)size, 16);
    uint64_t avail = fd_alloc(g, region, 6 + 2 * (uint64_t)size, 2);
    uint64_t used = fd_alloc(g, region, 6 + 8 * (uint64_t)size, 4);
    fd_vq_init_at(q, g, size, desc, avail, used);
}

void fd_vq_attach(const struct fd_vq *q, struct vn_vq *vq, struct vn_dir_stats *st, bool event_idx,
                  bool indirect)
{
    vn_vq_init(vq, q->g->mem, st);
    vq->size = q->size;
    vq->desc_gpa = q->desc;
    vq->avail_gpa = q->avail;
    vq->used_gpa = q->used;
    vq->event_idx = event_idx;
    vq->indirect = indirect;
}

void fd_vq_desc(struct fd_vq *q, uint16_t i, uint64_t addr, uint32_t len, uint16_t flags,
                uint16_t next)
{
    fd_write_desc(q->g, q->desc, i, addr, len, flags, next);
}

uint16_t fd_vq_chain(struct fd_vq *q, const struct fd_buf *bufs, unsigned n)
{
    assert_true(n >= 1 && n <= q->size);
    uint16_t head = q->next_desc;
    for (unsigned i = 0; i < n; i++) {
        uint16_t idx = (uint16_t)((head + i) % q->size);
        uint16_t next = (uint16_t)((head + i + 1) % q->size);
        uint16_t flags = (uint16_t)((bufs[i].write ? VRING_DESC_F_WRITE : 0) |
                                    (i + 1 < n ? VRING_DESC_F_NEXT : 0));
        fd_vq_desc(q, idx, bufs[i].gpa, bufs[i].len, flags, i + 1 < n ? next : 0);
    }
    q->next_desc = (uint16_t)((head + n) % q->size);
    return head;
}

static uint16_t *ring16(const struct fd_vq *q, uint64_t gpa)
{
    return fd_hva(q->g, gpa, 2);
}

void fd_vq_set_avail_slot(struct fd_vq *q, uint16_t slot, uint16_t head)
{
    vn_le16_put(fd_hva(q->g, q->avail + 4 + 2 * (uint64_t)(slot % q->size), 2), head);
}

void fd_vq_set_avail_idx(struct fd_vq *q, uint16_t idx)
{
    q->avail_idx = idx;
    vn_le16_store_release(ring16(q, q->avail + 2), idx);
}

void fd_vq_set_avail_flags(struct fd_vq *q, uint16_t flags)
{
    vn_le16_store_release(ring16(q, q->avail), flags);
}

void fd_vq_make_avail(struct fd_vq *q, uint16_t head)
{
    fd_vq_set_avail_slot(q, q->avail_idx, head);
    fd_vq_set_avail_idx(q, (uint16_t)(q->avail_idx + 1));
}

uint16_t fd_vq_add(struct fd_vq *q, const struct fd_buf *bufs, unsigned n)
{
    uint16_t head = fd_vq_chain(q, bufs, n);
    fd_vq_make_avail(q, head);
    return head;
}

uint16_t fd_vq_used_idx(const struct fd_vq *q)
{
    return vn_le16_load_acquire(ring16(q, q->used + 2));
}

uint16_t fd_vq_used_flags(const struct fd_vq *q)
{
    return vn_le16_load_acquire(ring16(q, q->used));
}

bool fd_vq_get_used(struct fd_vq *q, uint32_t *id, uint32_t *len)
{
    if (fd_vq_used_idx(q) == q->last_used)
        return false;
    const uint8_t *e = fd_hva(q->g, q->used + 4 + 8 * (uint64_t)(q->last_used % q->size), 8);
    *id = vn_le32_get(e);
    *len = vn_le32_get(e + 4);
    q->last_used++;
    return true;
}

void fd_vq_set_used_event(struct fd_vq *q, uint16_t v)
{
    vn_le16_store_release(ring16(q, q->avail + 4 + 2 * (uint64_t)q->size), v);
}

uint16_t fd_vq_avail_event(const struct fd_vq *q)
{
    return vn_le16_load_acquire(ring16(q, q->used + 4 + 8 * (uint64_t)q->size));
}

bool fd_vq_kick_needed(const struct fd_vq *q, bool event_idx, uint16_t old_idx)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (event_idx)
        return fd_need_event(fd_vq_avail_event(q), q->avail_idx, old_idx);
    return !(fd_vq_used_flags(q) & VRING_USED_F_NO_NOTIFY);
}

void fd_assert_errors(const struct vn_dir_stats *st, int reason, uint64_t n)
{
    for (int i = 0; i < VN_ERR__COUNT; i++) {
        uint64_t want = i == reason ? n : 0;
        if (st->errors[i] != want)
            fail_msg("errors[%s] is %llu, expected %llu", vn_error_reason_name(i),
                     (unsigned long long)st->errors[i], (unsigned long long)want);
    }
}

void fd_assert_no_errors(const struct vn_dir_stats *st)
{
    fd_assert_errors(st, -1, 0);
}
