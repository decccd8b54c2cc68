/* Interrupt coalescing per virtqueue (virtio 1.3, 5.1.6.5.9 "Notifications
 * Coalescing"; VIRTIO_NET_F_NOTF_COAL and VIRTIO_NET_F_VQ_NOTF_COAL).
 *
 * The control queue (context thread) sets the parameters; the queue pair's
 * worker reads them each time it has used buffers to signal, so a change
 * takes effect at the worker's next look (the device kicks it). With both
 * parameters non-zero the worker holds the interrupt back until max_packets
 * packets were used or max_usecs passed since the first of them, whichever
 * comes first; EVENT_IDX suppression still applies on top. */
#ifndef VN_COALESCE_H
#define VN_COALESCE_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

struct vn_coal_params {
    uint32_t max_packets;
    uint32_t max_usecs;
};

struct vn_coal {
    /* Written by the context thread, read by the worker. */
    _Atomic uint32_t max_packets;
    _Atomic uint32_t max_usecs;
    /* Worker-private: packets used since the last interrupt, and when the
     * first of them was used. */
    uint32_t pending;
    uint64_t first_ns;
};

static inline void vn_coal_set(struct vn_coal *c, struct vn_coal_params p)
{
    atomic_store_explicit(&c->max_packets, p.max_packets, memory_order_relaxed);
    atomic_store_explicit(&c->max_usecs, p.max_usecs, memory_order_relaxed);
}

static inline struct vn_coal_params vn_coal_get(const struct vn_coal *c)
{
    struct vn_coal_params p = {
        atomic_load_explicit(&c->max_packets, memory_order_relaxed),
        atomic_load_explicit(&c->max_usecs, memory_order_relaxed),
    };
    return p;
}

/* When the held-back interrupt is due under the current parameters (they
 * may have changed since the first packet: the new ones apply at once). */
static inline bool vn_coal_met(const struct vn_coal *c, struct vn_coal_params p, uint64_t now)
{
    return p.max_packets == 0 || p.max_usecs == 0 || c->pending >= p.max_packets ||
           now - c->first_ns >= (uint64_t)p.max_usecs * 1000u;
}

/* Worker: `n` packets were just used at time `now`. True when the
 * interrupt is due now (counting restarts), false when it is held back
 * until vn_coal_due() says so. */
static inline bool vn_coal_account(struct vn_coal *c, uint32_t n, uint64_t now)
{
    struct vn_coal_params p = vn_coal_get(c);
    if (c->pending == 0)
        c->first_ns = now;
    c->pending = c->pending + n < c->pending ? UINT32_MAX : c->pending + n;
    if (vn_coal_met(c, p, now)) {
        c->pending = 0;
        return true;
    }
    return false;
}

/* Worker: is a held-back interrupt due now? Clears it if so. */
static inline bool vn_coal_due(struct vn_coal *c, uint64_t now)
{
    if (c->pending == 0 || !vn_coal_met(c, vn_coal_get(c), now))
        return false;
    c->pending = 0;
    return true;
}

/* Worker: nanoseconds until the held-back interrupt is due (UINT64_MAX when
 * none is held). */
static inline uint64_t vn_coal_wait_ns(const struct vn_coal *c, uint64_t now)
{
    if (c->pending == 0)
        return UINT64_MAX;
    uint64_t due = c->first_ns + (uint64_t)vn_coal_get(c).max_usecs * 1000u;
    return due > now ? due - now : 0;
}

#endif
