#include "virtq.h"

#include <string.h>

#include "le.h"

#define DESC_SIZE 16

static inline uint16_t *avail_idx_ptr(const struct vn_vq *vq) { return (uint16_t *)(vq->avail + 2); }
static inline uint16_t *avail_flags_ptr(const struct vn_vq *vq) { return (uint16_t *)vq->avail; }
static inline uint16_t *used_event_ptr(const struct vn_vq *vq)
{
    return (uint16_t *)(vq->avail + 4 + 2 * (size_t)vq->size);
}
static inline uint16_t *used_idx_ptr(const struct vn_vq *vq) { return (uint16_t *)(vq->used + 2); }
static inline uint16_t *used_flags_ptr(const struct vn_vq *vq) { return (uint16_t *)vq->used; }
static inline uint16_t *avail_event_ptr(const struct vn_vq *vq)
{
    return (uint16_t *)(vq->used + 4 + 8 * (size_t)vq->size);
}

void vn_vq_init(struct vn_vq *vq, const struct vn_mem *mem, struct vn_dir_stats *st)
{
    memset(vq, 0, sizeof(*vq));
    vq->mem = mem;
    vq->st = st;
    vq->msix_vector = VN_VQ_NO_VECTOR;
}

void vn_vq_reset_state(struct vn_vq *vq)
{
    vq->desc = vq->avail = vq->used = NULL;
    vq->last_avail = vq->used_idx = vq->signalled_used = 0;
    vq->signalled_valid = false;
    vq->broken = false;
    vq->mem_generation = 0;
}

bool vn_vq_map(struct vn_vq *vq)
{
    if (vq->desc != NULL && vq->mem_generation == vq->mem->generation)
        return true;
    size_t n = vq->size;
    if (n == 0 || n > VN_VQ_MAX_SIZE || (n & (n - 1)) != 0 || (vq->desc_gpa & 15) != 0 ||
        (vq->avail_gpa & 1) != 0 || (vq->used_gpa & 3) != 0)
        goto bad;
    vq->desc = vn_mem_translate(vq->mem, vq->desc_gpa, DESC_SIZE * n, false);
    vq->avail = vn_mem_translate(vq->mem, vq->avail_gpa, 6 + 2 * n, false);
    vq->used = vn_mem_translate(vq->mem, vq->used_gpa, 6 + 8 * n, true);
    if (vq->desc == NULL || vq->avail == NULL || vq->used == NULL)
        goto bad;
    /* Last, and released: other workers read this ring (driver_caught_up)
     * only once they see the views made for the current guest memory. */
    __atomic_store_n(&vq->mem_generation, vq->mem->generation, __ATOMIC_RELEASE);
    return true;
bad:
    vq->desc = vq->avail = vq->used = NULL;
    VN_STAT_INC(vq->st->errors[VN_ERR_RING_ADDR]);
    vq->broken = true;
    return false;
}

uint16_t vn_vq_avail_count(const struct vn_vq *vq)
{
    return (uint16_t)(vn_le16_load_acquire(avail_idx_ptr(vq)) - vq->last_avail);
}

static int chain_error(struct vn_vq *vq, int reason, int *err_reason)
{
    VN_STAT_INC(vq->st->errors[reason]);
    *err_reason = reason;
    return VN_POP_BAD;
}

int vn_vq_pop(struct vn_vq *vq, struct iovec *iov, unsigned iov_max, struct vn_chain *c,
              int *err_reason)
{
    *err_reason = -1;
    /* Read on every pop, not cached for a batch: a corrupt index is caught
     * at the next chain, whatever was read before. */
    uint16_t avail_idx = vn_le16_load_acquire(avail_idx_ptr(vq));
    uint16_t pending = (uint16_t)(avail_idx - vq->last_avail);
    VN_STAT_STORE(vq->st->avail_seen, avail_idx);
    if (pending == 0)
        return VN_POP_EMPTY;
    if (pending > vq->size) {
        VN_STAT_INC(vq->st->errors[VN_ERR_AVAIL_IDX]);
        *err_reason = VN_ERR_AVAIL_IDX;
        vq->broken = true;
        return VN_POP_FATAL;
    }
    uint16_t head = vn_le16_get(vq->avail + 4 + 2 * (size_t)(vq->last_avail & (vq->size - 1)));
    if (head >= vq->size) {
        VN_STAT_INC(vq->st->errors[VN_ERR_HEAD_INDEX]);
        *err_reason = VN_ERR_HEAD_INDEX;
        vq->broken = true;
        return VN_POP_FATAL;
    }
    vq->last_avail++;

    memset(c, 0, sizeof(*c));
    c->head = head;
    const uint8_t *table = vq->desc;
    uint32_t table_len = vq->size;
    uint32_t idx = head;
    uint32_t visited = 0;
    bool in_indirect = false;
    uint64_t out_len = 0, in_len = 0;
    unsigned nin = 0;

    for (;;) {
        if (++visited > table_len)
            return chain_error(vq, VN_ERR_DESC_LOOP, err_reason);
        uint8_t d[DESC_SIZE];
        memcpy(d, table + DESC_SIZE * (size_t)idx, DESC_SIZE);
        uint64_t addr = vn_le64_get(d);
        uint32_t len = vn_le32_get(d + 8);
        uint16_t flags = vn_le16_get(d + 12);
        uint16_t next = vn_le16_get(d + 14);

        if (flags & VRING_DESC_F_INDIRECT) {
            if (!vq->indirect || in_indirect || (flags & VRING_DESC_F_NEXT) || len == 0 ||
                len % DESC_SIZE != 0 || len / DESC_SIZE > VN_VQ_MAX_SIZE)
                return chain_error(vq, VN_ERR_INDIRECT, err_reason);
            const uint8_t *t = vn_mem_translate(vq->mem, addr, len, false);
            if (t == NULL)
                return chain_error(vq, VN_ERR_DESC_ADDR, err_reason);
            table = t;
            table_len = len / DESC_SIZE;
            idx = 0;
            visited = 0;
            in_indirect = true;
            continue;
        }
        if (len == 0) {
            VN_STAT_INC(vq->st->errors[VN_ERR_ZERO_LENGTH]);
        } else {
            bool write = (flags & VRING_DESC_F_WRITE) != 0;
            if (!write && nin > 0)
                return chain_error(vq, VN_ERR_DESC_ORDER, err_reason);
            if (c->niov >= iov_max)
                return chain_error(vq, VN_ERR_CHAIN_TOO_LONG, err_reason);
            void *p = vn_mem_translate(vq->mem, addr, len, write);
            if (p == NULL)
                return chain_error(vq, VN_ERR_DESC_ADDR, err_reason);
            iov[c->niov].iov_base = p;
            iov[c->niov].iov_len = len;
            c->niov++;
            if (write) {
                nin++;
                in_len += len;
            } else {
                c->nout++;
                out_len += len;
            }
        }
        if (!(flags & VRING_DESC_F_NEXT))
            break;
        if (next >= table_len)
            return chain_error(vq, VN_ERR_DESC_NEXT, err_reason);
        idx = next;
    }
    /* A chain is at most table_len (<= 1024) descriptors of at most 4 GiB:
     * saturate rather than wrap. */
    c->out_len = out_len > UINT32_MAX ? UINT32_MAX : (uint32_t)out_len;
    c->in_len = in_len > UINT32_MAX ? UINT32_MAX : (uint32_t)in_len;
    return VN_POP_OK;
}

void vn_vq_unpop(struct vn_vq *vq, uint16_t n)
{
    vq->last_avail = (uint16_t)(vq->last_avail - n);
}

void vn_vq_push(struct vn_vq *vq, uint16_t head, uint32_t len)
{
    uint8_t *e = vq->used + 4 + 8 * (size_t)(vq->used_idx & (vq->size - 1));
    vn_le32_put(e, head);
    vn_le32_put(e + 4, len);
    vq->used_idx++;
}

void vn_vq_publish(struct vn_vq *vq)
{
    vn_le16_store_release(used_idx_ptr(vq), vq->used_idx);
    VN_STAT_STORE(vq->st->used_idx, vq->used_idx);
}

bool vn_vq_should_notify(struct vn_vq *vq)
{
    /* Order the used idx store before reading the driver's suppression
     * fields (a store-load barrier; release alone is not enough). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t new_idx = vq->used_idx;
    if (!vq->event_idx) {
        bool want = !(vn_le16_load_relaxed(avail_flags_ptr(vq)) & VRING_AVAIL_F_NO_INTERRUPT);
        vq->signalled_used = new_idx;
        return want;
    }
    uint16_t old_idx = vq->signalled_used;
    bool valid = vq->signalled_valid;
    vq->signalled_used = new_idx;
    vq->signalled_valid = true;
    if (!valid)
        return true;
    uint16_t event = vn_le16_load_relaxed(used_event_ptr(vq));
    /* vring_need_event(): did new_idx pass event since old_idx? */
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

bool vn_vq_enable_notify(struct vn_vq *vq)
{
    if (vq->event_idx)
        vn_le16_store_relaxed(avail_event_ptr(vq), vq->last_avail);
    else
        vn_le16_store_relaxed(used_flags_ptr(vq), 0);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return vn_le16_load_acquire(avail_idx_ptr(vq)) != vq->last_avail;
}

void vn_vq_disable_notify(struct vn_vq *vq)
{
    if (!vq->event_idx)
        vn_le16_store_relaxed(used_flags_ptr(vq), VRING_USED_F_NO_NOTIFY);
    /* With EVENT_IDX, leaving avail_event behind suppresses doorbells. */
}

bool vn_vq_driver_caught_up(const struct vn_vq *vq)
{
    if (!vq->event_idx)
        return true;
    /* Other workers than the ring's own ask this. After guest memory
     * changed (a DMA unmap) the ring's views point to unmapped memory, or
     * are being cleared, until its own worker has translated them again:
     * only views made for the current memory are read (else: unknown, not
     * waited for). Guest memory changes only while every worker is parked. */
    if (__atomic_load_n(&vq->mem_generation, __ATOMIC_ACQUIRE) != vq->mem->generation)
        return true;
    uint8_t *avail = __atomic_load_n(&vq->avail, __ATOMIC_RELAXED);
    uint8_t *used = __atomic_load_n(&vq->used, __ATOMIC_RELAXED);
    if (avail == NULL || used == NULL)
        return true;
    uint16_t published = vn_le16_load_acquire((uint16_t *)(used + 2));
    uint16_t seen = vn_le16_load_relaxed((uint16_t *)(avail + 4 + 2 * (size_t)vq->size));
    if (seen == published)
        return true;
    /* Linux writes 0 while it polls with interrupts off (a placeholder,
     * not a position): that says nothing about what it consumed. */
    if (seen == 0)
        return false;
    /* Otherwise used_event is where the driver wants its next interrupt:
     * it has consumed everything before it. */
    return (uint16_t)(seen - published) < 0x8000;
}
