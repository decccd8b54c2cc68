/* libFuzzer target: control queue commands (ctrl.c, ctrl_stats.c,
 * ctrl_coal.c, the RSS/hash configuration parsers in steering.c), with the
 * device in various feature states.
 *
 * Input:
 *   u8   mode      bit 0: command chains through vn_ctrl_process() from a
 *                  guest image, else commands to vn_ctrl_handle_reply()
 *   le16 features  bit 0 CTRL_RX, 1 CTRL_MAC_ADDR, 2 GUEST_ANNOUNCE, 3 MQ,
 *                  4 RSS, 5 HASH_REPORT, 6 DEVICE_STATS, 7 NOTF_COAL,
 *                  8 VQ_NOTF_COAL, 9 CTRL_GUEST_OFFLOADS, 10 GUEST_CSUM,
 *                  11 GUEST_TSO4, 12 RING_EVENT_IDX, 13 RING_INDIRECT_DESC,
 *                  14 GUEST_TSO6, 15 GUEST_UFO
 *   u8   device    bits 0-1 queue pairs - 1 (1..4), bits 2-5 which of rx0,
 *                  tx0, rx1, tx1 the driver enabled, bit 7 announce pending
 *   direct mode, to the end: u8 reply room / 4, le16 length, the command
 *                  (class, command, data)
 *   chain mode:    u8 log2 of the control ring size (& 7), then the guest
 *                  image (fuzz_common.h): descriptor table at A, available
 *                  ring right after it, used ring at B + 0x1000
 *
 * Checked: a refused command (VIRTIO_NET_ERR) changes nothing and has no
 * result; an accepted one had the exact length and the features it needs
 * and did what it says; no accepted command steers to a pair whose
 * receive ring the driver did not enable; results fit their buffer and are well formed; the
 * steering state stays valid; through the queue, every chain is answered in
 * order with a used length that fits its device-writable part. */
#include <stdlib.h>
#include <string.h>

#include "ctrl.h"
#include "ctrl_coal.h"
#include "ctrl_stats.h"
#include "fuzz_common.h"
#include "le.h"
#include "net_hdr.h"

#define F(bit) (1ull << (bit))

static const int feature_bits[16] = {
    VN_F_CTRL_RX,        VN_F_CTRL_MAC_ADDR,      VN_F_GUEST_ANNOUNCE, VN_F_MQ,
    VN_F_RSS,            VN_F_HASH_REPORT,        VN_F_DEVICE_STATS,   VN_F_NOTF_COAL,
    VN_F_VQ_NOTF_COAL,   VN_F_CTRL_GUEST_OFFLOADS, VN_F_GUEST_CSUM,    VN_F_GUEST_TSO4,
    VN_F_RING_EVENT_IDX, VN_F_RING_INDIRECT_DESC, VN_F_GUEST_TSO6,     VN_F_GUEST_UFO,
};

struct snapshot {
    struct vn_rx_filter filter;
    struct vn_rss_config rss;
    unsigned active_qps;
    bool announce;
    struct vn_coal_params coal[2 * 4];
    struct vn_coal_params rx_all, tx_all;
};

static void take(struct vn_dev *dev, struct snapshot *s)
{
    memset(s, 0, sizeof(*s));
    memcpy(&s->filter, &dev->filter, sizeof(s->filter));
    memcpy(&s->rss, &dev->steer.rss, sizeof(s->rss));
    s->active_qps = dev->active_qps;
    s->announce = atomic_load(&dev->announce);
    for (unsigned q = 0; q < 2 * dev->max_qps; q++)
        s->coal[q] = vn_dev_get_coal(dev, q);
    s->rx_all = dev->coal_rx_all;
    s->tx_all = dev->coal_tx_all;
}

static bool same(const struct snapshot *a, const struct snapshot *b)
{
    return memcmp(a, b, sizeof(*a)) == 0;
}

/* Frames the steering state is tried on after every command. */
static const uint8_t frame_tcp4[] = {
    0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00,
    0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    0x30, 0x39, 0x00, 0x50, 0, 0, 0, 0,
};
static const uint8_t frame_udp6[] = {
    0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x02, 0, 0, 0, 0, 1, 0x86, 0xdd,
    0x60, 0, 0, 0, 0, 8, 17, 64,
    0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
    0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2,
    0x13, 0x88, 0x13, 0x89, 0, 8, 0, 0,
};

static void check_steering(struct vn_dev *dev)
{
    const struct vn_rss_config *r = &dev->steer.rss;
    FZ_CHECK(dev->active_qps >= 1 && dev->active_qps <= dev->max_qps, "active pairs %u of %u",
             dev->active_qps, dev->max_qps);
    FZ_CHECK(r->key_len <= VN_RSS_MAX_KEY_SIZE, "key of %u", r->key_len);
    if (r->configured) {
        FZ_CHECK(r->table_len >= 1 && r->table_len <= VN_RSS_MAX_TABLE &&
                     (r->table_len & (r->table_len - 1)) == 0,
                 "table of %u", r->table_len);
        FZ_CHECK(r->unclassified < dev->max_qps, "unclassified %u", r->unclassified);
        for (unsigned i = 0; i < r->table_len; i++)
            FZ_CHECK(r->table[i] < dev->max_qps, "table[%u] = %u", i, r->table[i]);
    }
    FZ_CHECK((r->hash_types & ~VN_HASH_TYPES_SUPPORTED) == 0, "hash types 0x%x", r->hash_types);
    const uint8_t *frames[2] = { frame_tcp4, frame_udp6 };
    size_t lens[2] = { sizeof(frame_tcp4), sizeof(frame_udp6) };
    for (int i = 0; i < 2; i++) {
        uint32_t hash;
        uint8_t report;
        unsigned q = vn_steer_rx(&dev->steer, frames[i], lens[i], dev->active_qps, &hash, &report);
        FZ_CHECK(q < dev->active_qps, "steered to %u of %u", q, dev->active_qps);
        FZ_CHECK(report <= VN_HASH_REPORT_UDPV6, "report %u", report);
    }
}

/* A STATS GET reply: blocks back to back, each with the size of its type. */
static void check_stats_reply(const uint8_t *reply, uint32_t len)
{
    uint32_t at = 0;
    while (at < len) {
        FZ_CHECK(len - at >= VN_STATS_REPLY_HDR_LEN, "truncated block at %u of %u", at, len);
        uint8_t type = reply[at + VN_STATS_REPLY_TYPE_OFF];
        uint16_t bsize = vn_le16_get(reply + at + VN_STATS_REPLY_SIZE_OFF);
        uint16_t want = type == VN_STATS_REPLY_CVQ        ? VN_STATS_CVQ_LEN
                        : type == VN_STATS_REPLY_RX_BASIC ? VN_STATS_RX_BASIC_LEN
                        : type == VN_STATS_REPLY_TX_BASIC ? VN_STATS_TX_BASIC_LEN
                                                          : 0;
        FZ_CHECK(want != 0 && bsize == want && bsize <= len - at, "block type %u size %u at %u",
                 type, bsize, at);
        at += bsize;
    }
}

static void check_accepted(struct vn_dev *dev, const uint8_t *req, uint32_t len,
                           const uint8_t *reply, uint32_t rlen, const struct snapshot *before)
{
    uint64_t f = dev->features;
    uint8_t cls = req[0], cmd = req[1];
    const uint8_t *d = req + 2;
    uint32_t dlen = len - 2;
    bool has_result = (cls == VN_CTRL_STATS) ||
                      (cls == VN_CTRL_NOTF_COAL && cmd == VN_CTRL_NOTF_COAL_VQ_GET);
    FZ_CHECK(has_result || rlen == 0, "class %u cmd %u gave a %u-byte result", cls, cmd, rlen);
    switch (cls) {
    case VN_CTRL_RX:
        FZ_CHECK(VN_HAS(f, VN_F_CTRL_RX) && dlen == 1 && d[0] <= 1 && cmd <= 1, "RX %u/%u", cmd,
                 dlen);
        FZ_CHECK((cmd == 0 ? dev->filter.promisc : dev->filter.allmulti) == (d[0] != 0),
                 "RX not applied");
        break;
    case VN_CTRL_MAC:
        if (cmd == VN_CTRL_MAC_ADDR_SET) {
            FZ_CHECK(VN_HAS(f, VN_F_CTRL_MAC_ADDR) && dlen == 6, "MAC_ADDR_SET of %u", dlen);
            FZ_CHECK(memcmp(dev->filter.mac, d, 6) == 0, "MAC not applied");
        } else {
            FZ_CHECK(cmd == VN_CTRL_MAC_TABLE_SET && VN_HAS(f, VN_F_CTRL_RX), "MAC cmd %u", cmd);
            uint32_t n_uc = vn_le32_get(d);
            uint32_t n_mc = vn_le32_get(d + 4 + 6 * (size_t)n_uc);
            FZ_CHECK(dlen == 8 + 6 * ((uint64_t)n_uc + n_mc), "MAC table of %u", dlen);
            FZ_CHECK(dev->filter.n_uc <= VN_MAC_TABLE_ENTRIES &&
                         dev->filter.n_mc <= VN_MAC_TABLE_ENTRIES,
                     "tables %u %u", dev->filter.n_uc, dev->filter.n_mc);
            FZ_CHECK(dev->filter.uni_overflow ? dev->filter.n_uc == 0 : dev->filter.n_uc == n_uc,
                     "unicast table");
        }
        break;
    case VN_CTRL_ANNOUNCE:
        FZ_CHECK(VN_HAS(f, VN_F_GUEST_ANNOUNCE) && cmd == 0 && dlen == 0, "ANNOUNCE");
        FZ_CHECK(!atomic_load(&dev->announce), "announce still pending");
        break;
    case VN_CTRL_MQ:
        if (cmd == VN_CTRL_MQ_VQ_PAIRS_SET) {
            FZ_CHECK(VN_HAS(f, VN_F_MQ) && dlen == 2, "VQ_PAIRS_SET of %u", dlen);
            FZ_CHECK(dev->active_qps == vn_le16_get(d), "pairs %u, asked %u", dev->active_qps,
                     vn_le16_get(d));
            for (unsigned i = 0; i < dev->active_qps; i++)
                FZ_CHECK(vn_qp_takes_frames(&dev->qp[i]), "pair %u of %u has no receive ring", i,
                         dev->active_qps);
        } else if (cmd == VN_CTRL_MQ_RSS_CONFIG) {
            FZ_CHECK(VN_HAS(f, VN_F_RSS) && dev->steer.rss.configured, "RSS_CONFIG");
            const struct vn_rss_config *r = &dev->steer.rss;
            for (unsigned i = 0; i < dev->active_qps; i++)
                FZ_CHECK(vn_qp_takes_frames(&dev->qp[i]), "pair %u of %u has no receive ring", i,
                         dev->active_qps);
            FZ_CHECK(vn_qp_takes_frames(&dev->qp[r->unclassified]), "unclassified queue %u "
                     "has no receive ring", r->unclassified);
            for (unsigned i = 0; i < r->table_len; i++)
                FZ_CHECK(vn_qp_takes_frames(&dev->qp[r->table[i]]), "table[%u] = %u has no "
                         "receive ring", i, r->table[i]);
        } else {
            FZ_CHECK(cmd == VN_CTRL_MQ_HASH_CONFIG && VN_HAS(f, VN_F_HASH_REPORT), "MQ cmd %u",
                     cmd);
            FZ_CHECK(dev->active_qps == before->active_qps, "HASH_CONFIG changed the pairs");
        }
        break;
    case VN_CTRL_GUEST_OFFLOADS:
        FZ_CHECK(VN_HAS(f, VN_F_CTRL_GUEST_OFFLOADS) && cmd == 0 && dlen == 8, "GUEST_OFFLOADS");
        FZ_CHECK((vn_le64_get(d) & ~f) == 0, "offloads 0x%llx not negotiated",
                 (unsigned long long)vn_le64_get(d));
        break;
    case VN_CTRL_STATS:
        FZ_CHECK(VN_HAS(f, VN_F_DEVICE_STATS), "STATS without DEVICE_STATS");
        if (cmd == VN_CTRL_STATS_QUERY) {
            FZ_CHECK(dlen == 0 && rlen == VN_STATS_CAPS_LEN, "QUERY %u -> %u", dlen, rlen);
        } else {
            FZ_CHECK(cmd == VN_CTRL_STATS_GET && dlen > 0 && dlen % VN_STATS_REQ_ENTRY_LEN == 0,
                     "STATS cmd %u of %u", cmd, dlen);
            check_stats_reply(reply, rlen);
        }
        break;
    case VN_CTRL_NOTF_COAL: {
        if (cmd == VN_CTRL_NOTF_COAL_TX_SET || cmd == VN_CTRL_NOTF_COAL_RX_SET) {
            FZ_CHECK(VN_HAS(f, VN_F_NOTF_COAL) && dlen == 8, "NOTF_COAL SET of %u", dlen);
            unsigned dir = cmd == VN_CTRL_NOTF_COAL_RX_SET ? 0 : 1;
            for (unsigned q = dir; q < 2 * dev->max_qps; q += 2) {
                struct vn_coal_params p = vn_dev_get_coal(dev, q);
                FZ_CHECK(p.max_packets == vn_le32_get(d) && p.max_usecs == vn_le32_get(d + 4),
                         "queue %u not set", q);
            }
        } else if (cmd == VN_CTRL_NOTF_COAL_VQ_SET) {
            FZ_CHECK(VN_HAS(f, VN_F_VQ_NOTF_COAL) && dlen == 12, "VQ_SET of %u", dlen);
            uint16_t q = vn_le16_get(d);
            FZ_CHECK(q < 2 * vn_dev_driver_pairs(dev, f), "VQ_SET of queue %u", q);
        } else {
            FZ_CHECK(cmd == VN_CTRL_NOTF_COAL_VQ_GET && VN_HAS(f, VN_F_VQ_NOTF_COAL) && dlen == 4 &&
                         rlen == 8,
                     "NOTF_COAL cmd %u of %u -> %u", cmd, dlen, rlen);
            struct vn_coal_params p = vn_dev_get_coal(dev, vn_le16_get(d));
            FZ_CHECK(vn_le32_get(reply) == p.max_packets && vn_le32_get(reply + 4) == p.max_usecs,
                     "VQ_GET reply");
        }
        break;
    }
    default:
        FZ_CHECK(false, "class %u accepted", cls);
    }
}

static void direct(struct vn_dev *dev, struct fz_in *in)
{
    while (in->n > 0) {
        uint32_t cap = 4u * fz_u8(in);
        size_t len;
        const uint8_t *p = fz_bytes(in, fz_u16(in), &len);
        /* Exactly the bytes given, and exactly the reply room: ASan sees
         * any access past either. */
        uint8_t *req = malloc(len ? len : 1);
        uint8_t *reply = cap ? malloc(cap) : NULL;
        FZ_CHECK(req != NULL && (cap == 0 || reply != NULL), "malloc");
        memcpy(req, p, len);
        struct snapshot before, after;
        take(dev, &before);
        uint32_t rlen = 0xdeadbeef;
        uint8_t ack = vn_ctrl_handle_reply(dev, req, (uint32_t)len, reply, cap, &rlen);
        take(dev, &after);
        if (getenv("FZ_VERBOSE") != NULL)
            fprintf(stderr, "command class %d cmd %d (%zu bytes): %s, %u result bytes\n",
                    len > 0 ? req[0] : -1, len > 1 ? req[1] : -1, len,
                    ack == VN_CTRL_OK ? "ok" : "refused", rlen);
        if (ack == VN_CTRL_ERR) {
            FZ_CHECK(rlen == 0, "refused with a %u-byte result", rlen);
            FZ_CHECK(same(&before, &after), "a refused command (class %d cmd %d, %zu bytes) "
                     "changed the device", len > 0 ? req[0] : -1, len > 1 ? req[1] : -1, len);
        } else {
            FZ_CHECK(ack == VN_CTRL_OK && len >= 2, "ack %u for %zu bytes", ack, len);
            FZ_CHECK(rlen <= cap, "result of %u bytes in %u", rlen, cap);
            check_accepted(dev, req, (uint32_t)len, reply, rlen, &before);
        }
        check_steering(dev);
        free(req);
        free(reply);
    }
}

/* What the driver will read back: one chain as vn_vq_pop() sees it. */
struct shadow {
    int r;
    uint16_t head;
    uint16_t niov, nout;
    uint32_t in_len;
};

static bool overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a < b + blen && b < a + alen;
}

/* After the start: which rx/tx queues the driver enabled (only their size
 * matters to the control queue, and for an rx ring that the device may steer
 * to it, as vn_dev_start finds), and whether an announcement is pending. */
static void enable_queues(struct vn_dev *dev, uint8_t devb)
{
    for (unsigned q = 0; q < 4 && q < 2 * dev->max_qps; q++) {
        struct vn_qp *qp = &dev->qp[q / 2];
        if (devb & (4u << q))
            (q % 2 == 0 ? &qp->rx : &qp->tx)->size = 64;
        if (q % 2 == 0)
            atomic_store(&qp->rx_ready, (devb & (4u << q)) != 0);
    }
    atomic_store(&dev->announce, (devb & 0x80) != 0);
}

static void chains(struct vn_dev *dev, struct fz_in *in, uint8_t devb)
{
    uint16_t qsize = (uint16_t)(1u << (fz_u8(in) & 7));
    uint64_t desc = FZ_GPA_A, avail = FZ_GPA_A + 16u * qsize, used = FZ_GPA_B + 0x1000;
    fz_guest_load(&dev->mem, in->p, in->n);
    FZ_CHECK(vn_dev_config_queue(dev, 2 * dev->max_qps, qsize, desc, avail, used, 9) == 0,
             "ctrl queue");

    /* The chains the device will find, popped beforehand on a copy of the
     * queue (popping only reads guest memory). Kept only while nothing the
     * device writes (the writable buffers) overlaps what it reads: the
     * rings, the indirect tables and the readable buffers. */
    struct shadow sh[128];
    unsigned nsh = 0;
    bool exact = true;
    {
        struct vn_dir_stats st;
        memset(&st, 0, sizeof(st));
        struct vn_vq vq;
        vn_vq_init(&vq, &dev->mem, &st);
        vq.size = qsize;
        vq.desc_gpa = desc;
        vq.avail_gpa = avail;
        vq.used_gpa = used;
        vq.event_idx = VN_HAS(dev->features, VN_F_RING_EVENT_IDX);
        vq.indirect = VN_HAS(dev->features, VN_F_RING_INDIRECT_DESC);
        if (!vn_vq_map(&vq))
            return;
        /* Host ranges the device reads. */
        static struct {
            const uint8_t *p;
            uint64_t len;
        } reads[128 * 64 + 130];
        unsigned nreads = 0;
        reads[nreads].p = fz_hva(desc, 16u * qsize);
        reads[nreads++].len = 16u * qsize + 6 + 2u * qsize;
        for (unsigned i = 0; i < qsize; i++) {
            const uint8_t *d = (const uint8_t *)fz_hva(desc, 16u * qsize) + 16 * i;
            if (vn_le16_get(d + 12) & VRING_DESC_F_INDIRECT) {
                const uint8_t *t =
                    vn_mem_translate(&dev->mem, vn_le64_get(d), vn_le32_get(d + 8), false);
                if (t != NULL) {
                    reads[nreads].p = t;
                    reads[nreads++].len = vn_le32_get(d + 8);
                }
            }
        }
        struct iovec iov[64];
        static struct iovec writes[128 * 64];
        unsigned nwrites = 0;
        while (nsh < 128) {
            struct vn_chain c;
            int err;
            int r = vn_vq_pop(&vq, iov, 64, &c, &err);
            if (r == VN_POP_EMPTY || r == VN_POP_FATAL)
                break;
            sh[nsh++] = (struct shadow){ r, c.head, c.niov, c.nout, c.in_len };
            if (r != VN_POP_OK)
                continue;
            for (unsigned i = 0; i < c.niov; i++) {
                if (i < c.nout) {
                    reads[nreads].p = iov[i].iov_base;
                    reads[nreads++].len = iov[i].iov_len;
                } else {
                    writes[nwrites++] = iov[i];
                }
            }
        }
        /* The used ring is written too (and checked: no buffer may
         * overlap it either). */
        uintptr_t used_p = (uintptr_t)fz_hva(used, 6 + 8u * qsize);
        uint64_t used_len = 6 + 8u * qsize;
        for (unsigned k = 0; k < nreads && exact; k++)
            if (overlaps(used_p, used_len, (uintptr_t)reads[k].p, reads[k].len))
                exact = false;
        for (unsigned w = 0; w < nwrites && exact; w++) {
            uintptr_t wp = (uintptr_t)writes[w].iov_base;
            if (overlaps(wp, writes[w].iov_len, used_p, used_len))
                exact = false;
            for (unsigned k = 0; k < nreads && exact; k++)
                if (overlaps(wp, writes[w].iov_len, (uintptr_t)reads[k].p, reads[k].len))
                    exact = false;
        }
    }

    if (!fz_dev_start(dev, dev->features))
        return;
    enable_queues(dev, devb);
    vn_ctrl_process(dev);
    struct vn_vq *vq = &dev->ctrl;
    /* One turn answers at most VN_CTRL_BUDGET commands; the context thread
     * comes back for the rest by itself (cmd_fd -> vn_dev_ctrl_poll_kick),
     * as this loop does. */
    FZ_CHECK(vq->used_idx <= VN_CTRL_BUDGET, "%u commands answered in one turn", vq->used_idx);
    for (unsigned turn = 0; atomic_load(&dev->ctrl_resume); turn++) {
        FZ_CHECK(turn <= 1024 / VN_CTRL_BUDGET + 1, "the control queue is never done");
        vn_dev_ctrl_poll_kick(dev);
    }
    if (vq->broken || !exact)
        return;
    fz_check_used(vq, 0, vq->used_idx);
    FZ_CHECK(vq->used_idx == nsh, "%u chains answered, %u made available", vq->used_idx, nsh);
    for (unsigned i = 0; i < nsh; i++) {
        const uint8_t *e = vq->used + 4 + 8 * (size_t)(i & (qsize - 1));
        uint32_t id = vn_le32_get(e), len = vn_le32_get(e + 4);
        FZ_CHECK(id == sh[i].head, "used[%u] is %u, expected %u", i, id, sh[i].head);
        if (sh[i].r != VN_POP_OK || sh[i].nout == sh[i].niov)
            FZ_CHECK(len == 0, "malformed chain %u answered with %u bytes", i, len);
        else
            FZ_CHECK(len >= 1 && len <= sh[i].in_len, "chain %u: used length %u, %u writable", i,
                     len, sh[i].in_len);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fz_in in = { data, size };
    uint8_t mode = fz_u8(&in);
    uint16_t fsel = fz_u16(&in);
    uint8_t devb = fz_u8(&in);
    unsigned max_qps = 1u + (devb & 3);
    uint64_t features = F(VN_F_VERSION_1) | F(VN_F_CTRL_VQ);
    for (int i = 0; i < 16; i++)
        if (fsel & (1u << i))
            features |= F(feature_bits[i]);

    struct vn_dev *dev = fz_dev_new(max_qps, 1500);
    dev->features = features;
    if (mode & 1) {
        chains(dev, &in, devb);
    } else {
        FZ_CHECK(fz_dev_start(dev, features), "start");
        enable_queues(dev, devb);
        direct(dev, &in);
    }
    if (getenv("FZ_VERBOSE") != NULL)
        fprintf(stderr, "commands: %llu ok, %llu refused; active pairs %u, rss %d\n",
                (unsigned long long)dev->st.ctrl_ok, (unsigned long long)dev->st.ctrl_err,
                dev->active_qps, dev->steer.rss.configured);
    fz_dev_free(dev);
    return 0;
}
