/* A synthetic virtio driver for the C unit tests.
 *
 * Guest memory is made of separately mmap()ed regions, each surrounded by
 * PROT_NONE guard pages, and registered in a struct vn_mem at chosen guest
 * physical addresses. Two regions may be adjacent in guest physical space
 * while their host mappings are not, so a buffer straddling them that the
 * device failed to reject would be accessed through a guard page and crash
 * the test. A read-only region is mapped PROT_READ.
 *
 * On top of that, a driver-side split virtqueue: it writes descriptors and the
 * available ring, reads the used ring and emulates VIRTIO_F_EVENT_IDX
 * (used_event written by the driver, avail_event read to decide on kicks),
 * always through little-endian accessors at guest physical addresses. */
#ifndef VN_TEST_FAKE_DRIVER_H
#define VN_TEST_FAKE_DRIVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "guest_mem.h"
#include "stats.h"
#include "virtq.h"

#define FD_PAGE 4096u
#define FD_MAX_REGIONS 8

/* The default layout made by fd_guest_init(). */
#define FD_GPA_A 0x100000ull   /* region 0: 256 KiB, read-write */
#define FD_GPA_B 0x140000ull   /* region 1: 256 KiB, read-write, right after A in GPA space */
#define FD_GPA_RO 0x800000ull  /* region 2: 64 KiB, read-only */
#define FD_LEN_A 0x40000ull
#define FD_LEN_B 0x40000ull
#define FD_LEN_RO 0x10000ull
#define FD_GPA_HOLE 0x400000ull /* not mapped */

struct fd_region {
    uint64_t gpa;
    uint64_t len;
    bool writable;
    uint8_t *hva;     /* first byte of the region (a guard page precedes it) */
    void *map;        /* the whole mapping, guard pages included */
    size_t map_len;
    uint64_t brk;     /* bump allocator: offset of the next free byte */
};

struct fd_guest {
    struct vn_mem *mem;       /* where the regions are registered */
    struct vn_mem own_mem;
    unsigned n;
    struct fd_region r[FD_MAX_REGIONS];
};

/* The default layout (regions 0, 1 and 2 above), registered in `mem`, or in
 * the guest's own table when mem is NULL. */
void fd_guest_init(struct fd_guest *g, struct vn_mem *mem);
/* An empty guest (no region). */
void fd_guest_init_empty(struct fd_guest *g, struct vn_mem *mem);
/* Map and register one more region; returns its index. */
unsigned fd_guest_add(struct fd_guest *g, uint64_t gpa, uint64_t len, bool writable);
/* Unregister and unmap region i (later indices keep their numbers). */
void fd_guest_remove(struct fd_guest *g, unsigned i);
void fd_guest_destroy(struct fd_guest *g);
/* Change the host protection of region i (PROT_*), e.g. to let the test
 * fill a region the device may only read, then make it read-only. */
void fd_guest_protect(struct fd_guest *g, unsigned i, int prot);

/* Zeroed guest memory from region i, aligned (a power of two). */
uint64_t fd_alloc(struct fd_guest *g, unsigned region, uint64_t len, uint64_t align);
/* Guest memory ending exactly at the end of region i, start aligned down
 * (so [start, start+len) touches the trailing guard page's neighbour). */
uint64_t fd_alloc_at_end(struct fd_guest *g, unsigned region, uint64_t len, uint64_t align);

/* Host address of [gpa, gpa+len); the test fails when it is not wholly
 * inside one region. */
void *fd_hva(const struct fd_guest *g, uint64_t gpa, uint64_t len);
/* Is [p, p+len) inside one region's host mapping (guard pages excluded)? */
bool fd_host_range_in_guest(const struct fd_guest *g, const void *p, size_t len, bool write);
/* Asserts every iovec is inside a region (writable ones in a writable
 * region), then reads every byte and writes every writable byte back, so an
 * iovec that escaped the mapping crashes on a guard page. */
void fd_check_iov(const struct fd_guest *g, const struct iovec *iov, unsigned niov, unsigned nout);

void fd_write(struct fd_guest *g, uint64_t gpa, const void *src, uint64_t len);
void fd_read(const struct fd_guest *g, uint64_t gpa, void *dst, uint64_t len);
void fd_fill(struct fd_guest *g, uint64_t gpa, uint64_t len, uint8_t seed);
void fd_write_desc(struct fd_guest *g, uint64_t table_gpa, uint16_t i, uint64_t addr, uint32_t len,
                   uint16_t flags, uint16_t next);

/* One buffer of a chain. */
struct fd_buf {
    uint64_t gpa;
    uint32_t len;
    bool write;   /* device-writable */
};

/* An indirect table holding bufs[0..n) chained in order, allocated in region. */
uint64_t fd_indirect_table(struct fd_guest *g, unsigned region, const struct fd_buf *bufs,
                           unsigned n);

/* Driver side of a split virtqueue. */
struct fd_vq {
    struct fd_guest *g;
    uint16_t size;
    uint64_t desc, avail, used;   /* guest physical addresses */
    uint16_t avail_idx;           /* the driver's copy of avail->idx */
    uint16_t last_used;           /* next used entry the driver reads */
    uint16_t next_desc;           /* next free descriptor for fd_vq_add */
};

/* Rings in region `region` (zeroed, spec alignment). */
void fd_vq_init(struct fd_vq *q, struct fd_guest *g, unsigned region, uint16_t size);
/* Rings at explicit addresses (not checked: for hostile layouts). */
void fd_vq_init_at(struct fd_vq *q, struct fd_guest *g, uint16_t size, uint64_t desc,
                   uint64_t avail, uint64_t used);
/* The device side: vn_vq_init() and the common-config fields, not mapped. */
void fd_vq_attach(const struct fd_vq *q, struct vn_vq *vq, struct vn_dir_stats *st, bool event_idx,
                  bool indirect);

void fd_vq_desc(struct fd_vq *q, uint16_t i, uint64_t addr, uint32_t len, uint16_t flags,
                uint16_t next);
/* Write bufs as a chain in descriptors next_desc, next_desc+1, ... (mod size)
 * and return its head; does not make it available. */
uint16_t fd_vq_chain(struct fd_vq *q, const struct fd_buf *bufs, unsigned n);
/* Put head in the next avail slot and publish avail->idx (release). */
void fd_vq_make_avail(struct fd_vq *q, uint16_t head);
/* fd_vq_chain + fd_vq_make_avail. */
uint16_t fd_vq_add(struct fd_vq *q, const struct fd_buf *bufs, unsigned n);
/* Raw ring writes, for hostile drivers. */
void fd_vq_set_avail_slot(struct fd_vq *q, uint16_t slot, uint16_t head);
void fd_vq_set_avail_idx(struct fd_vq *q, uint16_t idx);
void fd_vq_set_avail_flags(struct fd_vq *q, uint16_t flags);

uint16_t fd_vq_used_idx(const struct fd_vq *q);
uint16_t fd_vq_used_flags(const struct fd_vq *q);
/* Next used element, or false when the device has not published one. */
bool fd_vq_get_used(struct fd_vq *q, uint32_t *id, uint32_t *len);

/* EVENT_IDX: used_event (driver -> device) and avail_event (device -> driver). */
void fd_vq_set_used_event(struct fd_vq *q, uint16_t v);
uint16_t fd_vq_avail_event(const struct fd_vq *q);
/* Does the driver have to kick after moving avail->idx from old_idx to its
 * current value (vring_need_event on avail_event, or VRING_USED_F_NO_NOTIFY)? */
bool fd_vq_kick_needed(const struct fd_vq *q, bool event_idx, uint16_t old_idx);

static inline bool fd_need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

/* Counter checks: errors[reason] == n and every other error counter is 0. */
void fd_assert_errors(const struct vn_dir_stats *st, int reason, uint64_t n);
void fd_assert_no_errors(const struct vn_dir_stats *st);

/* libvfio-user stand-in (vfu_stub.c): vfu_irq_trigger() counts per vector. */
uint64_t fd_irq_count(unsigned vector);
void fd_irq_reset(void);
void fd_irq_fail(bool fail);   /* make vfu_irq_trigger() return -1 */
/* A non-NULL vfu_ctx_t for struct vn_dev.vfu so interrupts reach the stub. */
extern char fd_fake_vfu_ctx;

#endif
