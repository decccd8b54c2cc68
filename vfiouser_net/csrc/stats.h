/* Per-queue counters.
 *
 * Each counter has exactly one writer thread (the queue pair's worker, or the
 * vfio-user context thread for doorbells), and is read by the control plane at
 * any time. Relaxed atomic loads and stores make those reads race-free without
 * a lock or a locked instruction on the hot path. */
#ifndef VN_STATS_H
#define VN_STATS_H

#include <stdint.h>

/* Why a packet was dropped. Names are exported to Python (vn_drop_reason_name). */
enum vn_drop_reason {
    VN_DROP_BAD_CHAIN,        /* descriptor chain rejected (see errors) */
    VN_DROP_HEADER_TOO_SHORT, /* tx chain shorter than the virtio-net header */
    VN_DROP_FRAME_TOO_BIG,    /* tx frame larger than the device accepts */
    VN_DROP_BUFFER_TOO_SMALL, /* rx packet did not fit the guest's buffers */
    VN_DROP_MAC_FILTER,       /* rx destination not accepted by the rx filter */
    VN_DROP_LINK_DOWN,        /* link down: nothing is delivered */
    VN_DROP_TAP_ERROR,        /* TAP read/write failed */
    VN_DROP_QUEUE_BROKEN,     /* ring unusable until the device is reset */
    VN_DROP_RESET,            /* held by the device when the driver reset it */
    VN_DROP_STEER_BACKLOG,    /* target queue's backlog full (frames or bytes) */
    VN_DROP_QUEUE_DISABLED,   /* steered to a queue the driver then disabled */
    VN_DROP_PAIR_NOT_READY,   /* steered to a pair without worker or receive ring */
    VN_DROP_VLAN_FILTER,      /* an 802.1Q frame whose VLAN the driver did not add */
    VN_DROP__COUNT
};

/* Guest errors by kind (each is also logged, rate limited). */
enum vn_error_reason {
    VN_ERR_DESC_ADDR,        /* descriptor buffer outside guest memory */
    VN_ERR_DESC_NEXT,        /* next index out of range */
    VN_ERR_DESC_LOOP,        /* chain longer than the ring or table: a loop */
    VN_ERR_DESC_ORDER,       /* writable/readable descriptors in the wrong place */
    VN_ERR_INDIRECT,         /* malformed indirect table */
    VN_ERR_CHAIN_TOO_LONG,   /* more buffers than the device handles at once */
    VN_ERR_AVAIL_IDX,        /* avail index moved by more than the ring size */
    VN_ERR_HEAD_INDEX,       /* avail ring names a descriptor past the ring */
    VN_ERR_RING_ADDR,        /* ring not inside guest memory */
    VN_ERR_ZERO_LENGTH,      /* zero-length descriptor (skipped), or rx buffer without room for the header */
    VN_ERR__COUNT
};

/* Histogram buckets (upper bounds); the last slot counts larger values.
 * The metrics take the bounds from here (vn_*_bucket_bound). */
#define VN_BATCH_BUCKETS 9   /* 1 2 4 8 16 32 64 128 256 */
#define VN_SIZE_BUCKETS 10
#define VN_SIZE_BOUNDS { 64, 128, 256, 512, 1024, 1518, 4096, 9216, 16384, 65535 }

struct vn_dir_stats {
    uint64_t packets;
    uint64_t bytes;
    uint64_t doorbells;      /* written by the context thread only */
    uint64_t interrupts;
    uint64_t interrupts_suppressed;
    uint64_t interrupts_coalesced; /* held back by NOTF_COAL, sent later as one */
    uint64_t ring_full;      /* rx: packet waiting and no guest buffer */
    uint64_t batches;
    uint64_t bounced;        /* rx frames copied through the bounce buffer */
    uint64_t steered_out;    /* rx frames this pair read and handed to another */
    uint64_t drops[VN_DROP__COUNT];
    uint64_t errors[VN_ERR__COUNT];
    /* Ring position as last seen by the worker (gauges): the driver's avail
     * index and our used index; their difference is what is in flight. */
    uint64_t avail_seen;
    uint64_t used_idx;
    uint64_t batch_hist[VN_BATCH_BUCKETS + 1];
    uint64_t size_hist[VN_SIZE_BUCKETS + 1];
};

static inline unsigned vn_batch_bucket(uint64_t n)
{
    unsigned i = 0;
    while (i < VN_BATCH_BUCKETS && n > (1ull << i))
        i++;
    return i;
}

static inline unsigned vn_size_bucket(uint64_t n)
{
    static const uint32_t bounds[VN_SIZE_BUCKETS] = VN_SIZE_BOUNDS;
    unsigned i = 0;
    while (i < VN_SIZE_BUCKETS && n > bounds[i])
        i++;
    return i;
}

struct vn_qp_stats {
    struct vn_dir_stats rx;
    struct vn_dir_stats tx;
};

#define VN_STAT_LOAD(field) __atomic_load_n(&(field), __ATOMIC_RELAXED)
/* Single writer: a relaxed load and store, no read-modify-write lock prefix. */
#define VN_STAT_ADD(field, n) \
    __atomic_store_n(&(field), __atomic_load_n(&(field), __ATOMIC_RELAXED) + (n), __ATOMIC_RELAXED)
#define VN_STAT_INC(field) VN_STAT_ADD(field, 1)
#define VN_STAT_STORE(field, v) __atomic_store_n(&(field), (uint64_t)(v), __ATOMIC_RELAXED)

const char *vn_drop_reason_name(int reason);
/* Upper bound of histogram bucket i (< VN_*_BUCKETS). */
uint32_t vn_batch_bucket_bound(unsigned i);
uint32_t vn_size_bucket_bound(unsigned i);
const char *vn_error_reason_name(int reason);

#endif
