#include "fuzz_common.h"

#include <string.h>
#include <sys/mman.h>

#include "le.h"
#include "net_hdr.h"

static struct fd_guest guest;
static bool guest_ready;

struct fd_guest *fz_guest(void)
{
    if (!guest_ready) {
        fd_guest_init_empty(&guest, NULL);
        fd_guest_add(&guest, FZ_GPA_A, FZ_LEN_A, true);
        fd_guest_add(&guest, FZ_GPA_B, FZ_LEN_B, true);
        fd_guest_add(&guest, FZ_GPA_RO, FZ_LEN_RO, false);
        guest_ready = true;
    }
    return &guest;
}

void fz_guest_load(struct vn_mem *mem, const uint8_t *image, size_t len)
{
    struct fd_guest *g = fz_guest();
    vn_mem_clear(mem);
    for (unsigned i = 0; i < g->n; i++) {
        struct fd_region *r = &g->r[i];
        if (!r->writable)
            fd_guest_protect(g, i, PROT_READ | PROT_WRITE);
        size_t n = len < r->len ? len : (size_t)r->len;
        memcpy(r->hva, image, n);
        memset(r->hva + n, 0, r->len - n);
        image += n;
        len -= n;
        if (!r->writable)
            fd_guest_protect(g, i, PROT_READ);
        FZ_CHECK(vn_mem_add(mem, r->gpa, r->len, r->hva, r->writable) == 0, "region %u", i);
    }
}

void *fz_hva(uint64_t gpa, uint64_t len)
{
    return fd_hva(fz_guest(), gpa, len);
}

/* Quiet unless FZ_VERBOSE is set (to see what a seed does). */
static void quiet_log(void *py, int level, const char *msg)
{
    (void)py;
    static int verbose = -1;
    if (verbose < 0)
        verbose = getenv("FZ_VERBOSE") != NULL;
    if (verbose)
        fprintf(stderr, "log %d: %s\n", level, msg);
}

struct vn_dev *fz_dev_new(unsigned max_qps, uint32_t mtu)
{
    static const uint8_t mac[6] = { 0x52, 0x54, 0x00, 0x12, 0x34, 0x56 };
    struct vn_dev *dev = vn_dev_new(max_qps, mac, mtu);
    FZ_CHECK(dev != NULL, "vn_dev_new(%u)", max_qps);
    struct vn_hooks h = { .log = quiet_log };
    vn_dev_set_hooks(dev, &h);
    dev->vfu = &fd_fake_vfu_ctx;
    vn_dev_set_config_vector(dev, 0);
    return dev;
}

void fz_dev_free(struct vn_dev *dev)
{
    /* The TAP fds are the target's own (or none): vn_dev_reset() must not
     * issue TAP ioctls on them. */
    for (unsigned i = 0; i < dev->max_qps; i++)
        dev->qp[i].tap_fd = -1;
    dev->vfu = NULL;
    vn_dev_free(dev);
}

bool fz_dev_start(struct vn_dev *dev, uint64_t features)
{
    dev->features = features;
    dev->hdr_len = VN_HAS(features, VN_F_HASH_REPORT) ? VN_NET_HDR_HASH_LEN : VN_NET_HDR_LEN;
    bool event_idx = VN_HAS(features, VN_F_RING_EVENT_IDX);
    bool indirect = VN_HAS(features, VN_F_RING_INDIRECT_DESC);
    dev->active_qps = 1;
    unsigned pairs = vn_dev_driver_pairs(dev, features);
    bool ok = true;
    for (unsigned i = 0; i < pairs; i++) {
        struct vn_vq *vqs[2] = { &dev->qp[i].rx, &dev->qp[i].tx };
        for (int k = 0; k < 2; k++) {
            vn_vq_reset_state(vqs[k]);
            vqs[k]->event_idx = event_idx;
            vqs[k]->indirect = indirect;
            if (vqs[k]->size != 0 && !vn_vq_map(vqs[k]))
                ok = false;
        }
    }
    vn_vq_reset_state(&dev->ctrl);
    dev->ctrl.event_idx = event_idx;
    dev->ctrl.indirect = indirect;
    if (VN_HAS(features, VN_F_CTRL_VQ) && dev->ctrl.size != 0 && !vn_vq_map(&dev->ctrl))
        ok = false;
    if (!ok)
        return false;
    dev->learn_tx = vn_steering_effective(&dev->steer) == VN_POLICY_RX_FOLLOWS_TX;
    /* As vn_dev_start: frames may be queued for a pair whose receive ring
     * is usable (the target runs its "worker" itself). */
    for (unsigned i = 0; i < pairs; i++)
        atomic_store(&dev->qp[i].rx_ready, vn_vq_ready(&dev->qp[i].rx));
    dev->started = true;
    return true;
}

void fz_check_iov(const struct iovec *iov, unsigned niov, unsigned nout)
{
    fd_check_iov(fz_guest(), iov, niov, nout);
}

void fz_check_used(const struct vn_vq *vq, uint16_t from, uint16_t to)
{
    for (uint16_t i = from; i != to; i++) {
        const uint8_t *e = vq->used + 4 + 8 * (size_t)(i & (vq->size - 1));
        uint32_t id = vn_le32_get(e);
        FZ_CHECK(id < vq->size, "used entry %u names descriptor %u of %u", i, id, vq->size);
    }
    FZ_CHECK(vn_le16_get(vq->used + 2) == to, "used idx %u, expected %u",
             vn_le16_get(vq->used + 2), to);
}
