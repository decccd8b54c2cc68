/* Doorbell polling mode: the notify area of BAR0 is a shared page (a memfd)
 * that QEMU maps into the guest, so a doorbell is a plain memory write with
 * no vfio-user message and no exit to QEMU. Each queue's doorbell is the
 * 32-bit slot at 4 * queue index (notify_off_multiplier 4); the device keeps
 * every slot at a sentinel the driver never writes (the driver writes a
 * 16-bit queue index, or 32-bit notification data, whose low half is a queue
 * index < 0xffff), and a slot that differs means "kicked".
 *
 * The queue pairs' workers poll their own slots (and pair 0's worker the
 * control queue's, forwarding it to the context thread), which costs a core
 * per worker while the device is started: for hosts with cores to spare. */
#ifndef VN_NOTIFY_PAGE_H
#define VN_NOTIFY_PAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define VN_NOTIFY_SENTINEL 0xffffffffu

struct vn_notify_page {
    int fd;           /* memfd backing BAR0 (only the notify area is mmappable) */
    uint8_t *map;     /* the notify area in our address space, or NULL */
    uint32_t len;
};

/* Creates the memfd (bar_size bytes) and maps the notify area [off, off+len)
 * with every slot at the sentinel. Returns 0 or -errno. */
int vn_notify_page_init(struct vn_notify_page *np, uint32_t bar_size, uint32_t off, uint32_t len);
void vn_notify_page_fini(struct vn_notify_page *np);
/* Back to "nobody kicked" (device reset). */
void vn_notify_page_clear(struct vn_notify_page *np);

/* Did the driver kick queue qidx since the last call? Re-arms the slot. */
static inline bool vn_notify_page_take(struct vn_notify_page *np, unsigned qidx)
{
    if (np->map == NULL || (uint64_t)qidx * 4 + 4 > np->len)
        return false;
    uint32_t *slot = (uint32_t *)(void *)(np->map + (uint64_t)qidx * 4);
    if (__atomic_load_n(slot, __ATOMIC_RELAXED) == VN_NOTIFY_SENTINEL)
        return false;
    /* Re-arm before the caller looks at the ring: a kick written after this
     * store is seen next time, one written before is covered by the look. */
    __atomic_store_n(slot, VN_NOTIFY_SENTINEL, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return true;
}

#endif
