/* libFuzzer target: split virtqueue chains (virtq.c) against a hostile
 * guest's descriptor table, available ring and indirect tables.
 *
 * Input:
 *   u8  flags   bit 0 EVENT_IDX, bit 1 INDIRECT_DESC, bits 2-3 what the
 *               caller expects (0/3 any, 1 readable only as tx, 2 writable
 *               only as rx), bit 4 pop/unpop/pop gives the same chain,
 *               bit 5 ring addresses from the input, bit 6 guest edits
 *               between pops, bit 7 any ring size (the le16 below)
 *   u8  log2 of the ring size (& 7: 1..128)
 *   u8  iov_max - 1 (1..256 iovecs)
 *   u8  pops - 1 (1..256)
 *   [bit 7] le16 ring size as the driver wrote it (mapping must refuse
 *           0, more than 1024 and non-powers of two)
 *   [bit 5] le16 desc, avail, used offsets from A (else desc at A,
 *           avail right after it, used at B + 0x1000)
 *   [bit 6] u8 n, then n x (le16 offset from A, u8 value): one byte the
 *           guest changes after each pop
 *   the guest image (fuzz_common.h): A, then B, then RO
 *
 * Every chain popped must lie in guest memory (guard pages and the
 * read-only mapping catch the rest), its lengths must add up, a
 * pop after unpop must return the same chain, and the used ring must hold
 * exactly what was pushed. */
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "le.h"

struct edit {
    uint16_t off;
    uint8_t val;
};

static void check_chain(const struct vn_vq *vq, const struct iovec *iov, unsigned iov_max,
                        const struct vn_chain *c)
{
    FZ_CHECK(c->head < vq->size, "head %u, size %u", c->head, vq->size);
    FZ_CHECK(c->niov <= iov_max && c->nout <= c->niov, "niov %u nout %u max %u", c->niov, c->nout,
             iov_max);
    fz_check_iov(iov, c->niov, c->nout);
    uint64_t out = 0, in = 0;
    for (unsigned i = 0; i < c->niov; i++) {
        if (i < c->nout)
            out += iov[i].iov_len;
        else
            in += iov[i].iov_len;
    }
    FZ_CHECK(c->out_len == (out > UINT32_MAX ? UINT32_MAX : out), "out_len %u vs %llu", c->out_len,
             (unsigned long long)out);
    FZ_CHECK(c->in_len == (in > UINT32_MAX ? UINT32_MAX : in), "in_len %u vs %llu", c->in_len,
             (unsigned long long)in);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fz_in in = { data, size };
    uint8_t flags = fz_u8(&in);
    uint16_t qsize = (uint16_t)(1u << (fz_u8(&in) & 7));
    unsigned iov_max = 1u + fz_u8(&in);
    unsigned pops = 1u + fz_u8(&in);
    if (flags & 0x80)
        qsize = fz_u16(&in);
    bool event_idx = flags & 1, indirect = flags & 2;
    unsigned expect = (flags >> 2) & 3;
    uint64_t desc = FZ_GPA_A, avail = FZ_GPA_A + 16u * qsize, used = FZ_GPA_B + 0x1000;
    if (flags & 0x20) {
        desc = FZ_GPA_A + fz_u16(&in);
        avail = FZ_GPA_A + fz_u16(&in);
        used = FZ_GPA_A + fz_u16(&in);
    }
    struct edit edits[32];
    unsigned nedits = 0;
    if (flags & 0x40) {
        nedits = fz_u8(&in) % 32;
        for (unsigned i = 0; i < nedits; i++) {
            edits[i].off = fz_u16(&in);
            edits[i].val = fz_u8(&in);
        }
    }

    static struct vn_mem mem;
    fz_guest_load(&mem, in.p, in.n);
    struct vn_dir_stats st;
    memset(&st, 0, sizeof(st));
    struct vn_vq vq;
    vn_vq_init(&vq, &mem, &st);
    vq.size = qsize;
    vq.desc_gpa = desc;
    vq.avail_gpa = avail;
    vq.used_gpa = used;
    vq.event_idx = event_idx;
    vq.indirect = indirect;
    if (!vn_vq_map(&vq)) {
        FZ_CHECK(vq.broken && st.errors[VN_ERR_RING_ADDR] == 1, "map failure not counted");
        return 0;
    }
    FZ_CHECK(qsize != 0 && qsize <= VN_VQ_MAX_SIZE && (qsize & (qsize - 1)) == 0,
             "ring of %u mapped", qsize);
    /* Exactly iov_max entries on the heap: a write past them is an ASan
     * report. */
    struct iovec *iov = malloc(sizeof(*iov) * iov_max);
    struct iovec *iov2 = malloc(sizeof(*iov2) * iov_max);
    FZ_CHECK(iov != NULL && iov2 != NULL, "malloc");
    uint16_t pushed = 0;
    bool unpop_checked = !(flags & 0x10);
    unsigned edit_next = 0;
    for (unsigned n = 0; n < pops; n++) {
        struct vn_chain c;
        int err;
        uint16_t before = vq.last_avail;
        int r = vn_vq_pop(&vq, iov, iov_max, &c, &err);
        if (r == VN_POP_EMPTY) {
            FZ_CHECK(vn_vq_avail_count(&vq) == 0, "empty with %u available", vn_vq_avail_count(&vq));
            break;
        }
        if (r == VN_POP_FATAL) {
            FZ_CHECK(vq.broken && (err == VN_ERR_AVAIL_IDX || err == VN_ERR_HEAD_INDEX),
                     "fatal: broken %d err %d", vq.broken, err);
            FZ_CHECK(vq.last_avail == before, "a fatal pop consumed an entry");
            break;
        }
        FZ_CHECK(vq.last_avail == (uint16_t)(before + 1), "pop consumed %u entries",
                 (uint16_t)(vq.last_avail - before));
        uint32_t len = 0;
        if (r == VN_POP_BAD) {
            FZ_CHECK(err >= 0 && err < VN_ERR__COUNT && err != VN_ERR_AVAIL_IDX &&
                         err != VN_ERR_HEAD_INDEX && err != VN_ERR_RING_ADDR,
                     "bad chain reason %d", err);
            FZ_CHECK(c.head < qsize, "bad chain head %u", c.head);
            FZ_CHECK(st.errors[err] > 0, "reason %d not counted", err);
        } else {
            FZ_CHECK(r == VN_POP_OK, "pop returned %d", r);
            check_chain(&vq, iov, iov_max, &c);
            if (!unpop_checked) {
                unpop_checked = true;
                vn_vq_unpop(&vq, 1);
                struct vn_chain c2;
                int err2;
                int r2 = vn_vq_pop(&vq, iov2, iov_max, &c2, &err2);
                FZ_CHECK(r2 == VN_POP_OK && c2.head == c.head && c2.niov == c.niov &&
                             c2.nout == c.nout && c2.in_len == c.in_len && c2.out_len == c.out_len &&
                             memcmp(iov, iov2, sizeof(*iov) * c.niov) == 0,
                         "the chain popped again differs (r %d head %u/%u)", r2, c2.head, c.head);
            }
            bool readable_only = c.nout == c.niov, writable_only = c.nout == 0;
            if (expect == 2 && writable_only)
                len = c.in_len; /* as rx: the device filled it */
            else if (expect == 1 && !readable_only)
                len = 0; /* as tx: refused */
        }
        vn_vq_push(&vq, c.head, len);
        pushed++;
        if (edit_next < nedits) {
            struct edit e = edits[edit_next++];
            uint64_t gpa = FZ_GPA_A + e.off % (FZ_LEN_A + FZ_LEN_B);
            /* The used ring is the device's to write. */
            if (gpa - used >= 6 + 8 * (uint64_t)qsize)
                *(uint8_t *)fz_hva(gpa, 1) = e.val;
        }
    }
    vn_vq_publish(&vq);
    FZ_CHECK(vq.used_idx == pushed, "used idx %u, pushed %u", vq.used_idx, pushed);
    fz_check_used(&vq, 0, vq.used_idx);
    (void)vn_vq_should_notify(&vq);
    (void)vn_vq_should_notify(&vq);
    if (!vq.broken) {
        (void)vn_vq_enable_notify(&vq);
        vn_vq_disable_notify(&vq);
        (void)vn_vq_avail_count(&vq);
    }
    (void)vn_vq_driver_caught_up(&vq);
    free(iov);
    free(iov2);
    return 0;
}
