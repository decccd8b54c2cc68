/* Split virtqueue (virtio 1.x, 2.7) as seen from the device.
 *
 * The guest writes the descriptor table and the available ring concurrently
 * with us, so every descriptor is copied once into a local before any check
 * (no double fetch), every address is translated through vn_mem with its
 * length, and chain walks are bounded by the table length. */
#ifndef VN_VIRTQ_H
#define VN_VIRTQ_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include "guest_mem.h"
#include "stats.h"

#define VN_VQ_MAX_SIZE 4096
#define VN_VQ_NO_VECTOR 0xffff

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_USED_F_NO_NOTIFY 1
#define VRING_AVAIL_F_NO_INTERRUPT 1

struct vn_vq {
    /* Set by the driver through common config. */
    uint16_t size;
    uint64_t desc_gpa, avail_gpa, used_gpa;
    uint16_t msix_vector;
    bool event_idx;
    bool indirect;

    /* Host views of the rings, valid for mem_generation. */
    uint8_t *desc;
    uint8_t *avail;
    uint8_t *used;
    uint64_t mem_generation;
    const struct vn_mem *mem;

    uint16_t last_avail;
    uint16_t used_idx;
    uint16_t signalled_used;
    bool signalled_valid;
    bool broken;

    struct vn_dir_stats *st;
};

struct vn_chain {
    uint16_t head;
    uint16_t niov;
    uint16_t nout;      /* iov[0..nout) are device-readable, the rest writable */
    uint32_t out_len;
    uint32_t in_len;
};

enum vn_pop_result {
    VN_POP_OK = 0,
    VN_POP_EMPTY = 1,
    VN_POP_BAD = 2,    /* chain malformed; head valid: return it with length 0 */
    VN_POP_FATAL = 3,  /* ring itself corrupt: the queue is broken */
};

void vn_vq_init(struct vn_vq *vq, const struct vn_mem *mem, struct vn_dir_stats *st);
/* Reset device-side state (indices) and forget the ring mapping. */
void vn_vq_reset_state(struct vn_vq *vq);
/* Translate the ring addresses; false (and VN_ERR_RING_ADDR) when they are not
 * in guest memory or misaligned. Cheap when nothing changed. */
bool vn_vq_map(struct vn_vq *vq);

int vn_vq_pop(struct vn_vq *vq, struct iovec *iov, unsigned iov_max, struct vn_chain *c,
              int *err_reason);
/* Give back the last n popped chains (they will be popped again). */
void vn_vq_unpop(struct vn_vq *vq, uint16_t n);
/* Number of chains the driver has made available and we have not popped. */
uint16_t vn_vq_avail_count(const struct vn_vq *vq);

void vn_vq_push(struct vn_vq *vq, uint16_t head, uint32_t len);
/* Make pushed entries visible to the driver. */
void vn_vq_publish(struct vn_vq *vq);
/* After publish: does the driver want an interrupt (EVENT_IDX or flags)? */
bool vn_vq_should_notify(struct vn_vq *vq);

/* Ask for doorbells before sleeping; returns true when buffers arrived in the
 * meantime (the caller must then not sleep). */
bool vn_vq_enable_notify(struct vn_vq *vq);
void vn_vq_disable_notify(struct vn_vq *vq);

/* Has the driver consumed every used entry we published? Only known with
 * EVENT_IDX (the driver's used_event); true without it. */
bool vn_vq_driver_caught_up(const struct vn_vq *vq);

static inline bool vn_vq_ready(const struct vn_vq *vq)
{
    return vq->desc != NULL && !vq->broken;
}

#endif
