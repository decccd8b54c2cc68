/* Guest memory as the vfio-user client mapped it (DMA regions).
 *
 * Every guest physical address the datapath touches is translated here, and a
 * translation only succeeds when [gpa, gpa+len) lies wholly inside one mapped
 * region with the needed access. The table changes only while every worker is
 * paused (see server.c, quiesce), so lookups take no lock. */
#ifndef VN_GUEST_MEM_H
#define VN_GUEST_MEM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define VN_MAX_DMA_REGIONS 16

struct vn_mem_region {
    uint64_t gpa;
    uint64_t len;
    uint8_t *hva;
    bool writable;
};

struct vn_mem {
    unsigned n;
    struct vn_mem_region r[VN_MAX_DMA_REGIONS];
    /* Bumped on every change so queues know to re-translate their rings. */
    uint64_t generation;
};

void vn_mem_init(struct vn_mem *m);
int vn_mem_add(struct vn_mem *m, uint64_t gpa, uint64_t len, void *hva, bool writable);
int vn_mem_remove(struct vn_mem *m, uint64_t gpa, uint64_t len);
void vn_mem_clear(struct vn_mem *m);

/* Host pointer for [gpa, gpa+len), or NULL when any byte is outside a single
 * mapped region, the range wraps, or write access is needed and not granted. */
void *vn_mem_translate(const struct vn_mem *m, uint64_t gpa, uint64_t len, bool write);

#endif
