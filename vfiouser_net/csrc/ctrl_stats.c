/* VIRTIO_NET_CTRL_STATS (virtio 1.3, 5.1.6.5.x "Device Statistics").
 *
 * QUERY (no command-specific-data) answers
 *     struct virtio_net_stats_capabilities { le64 supported_stats_types[1]; }
 * with CVQ | RX_BASIC | TX_BASIC.
 *
 * GET takes struct virtio_net_ctrl_queue_stats, an array of 16-byte entries
 *     { le16 vq_index; le16 reserved[3]; le64 types_bitmap[1]; }
 * and answers, entry after entry and within an entry by increasing type bit,
 * one block per requested type: struct virtio_net_stats_reply_hdr
 *     { u8 type; u8 reserved; le16 vq_index; le16 reserved1; le16 size; }
 * followed by the block's le64 counters, `size` counting the header too:
 *     CVQ (type 32, 24 bytes):      command_num, ok_num
 *     RX_BASIC (type 0, 56 bytes):  rx_notifications, rx_packets, rx_bytes,
 *                                   rx_interrupts, rx_drops, rx_drop_overruns
 *     TX_BASIC (type 16, 56 bytes): tx_notifications, tx_packets, tx_bytes,
 *                                   tx_interrupts, tx_drops, tx_drop_malformed
 *
 * The request is checked whole before anything is written (the spec: one
 * bad entry fails the entire command). Beyond the spec's list (vq_index out
 * of range, unknown types, types not valid for the queue, types whose
 * feature is not negotiated) this device also refuses:
 *  - a queue the driver does not use (a pair past the ones it enabled with
 *    VQ_PAIRS_SET/RSS_CONFIG, or any pair but the first without MQ): its
 *    figures would be stale and Linux never asks for them;
 *  - types it did not report in QUERY (CSUM, GSO, SPEED), which a driver
 *    must not ask for;
 *  - an empty request or an entry with no type: a request that asks for
 *    nothing is malformed (Linux never sends one);
 *  - a result buffer too small for the whole reply. The spec lets the device
 *    fill "only up to the valid bytes", but Linux walks its whole buffer by
 *    the blocks' size fields: a partial reply would leave it reading
 *    uninitialised bytes, so this is an error, with nothing written.
 * reserved fields are ignored. */
#include <string.h>

#include "ctrl.h"
#include "ctrl_stats.h"
#include "device.h"
#include "le.h"

enum vq_kind { VQ_NONE, VQ_RX, VQ_TX, VQ_CTRL };

/* The statistic blocks this device answers, by increasing type bit. */
static const struct {
    uint64_t type;       /* VN_STATS_TYPE_* bit */
    uint8_t reply_type;  /* virtio_net_stats_reply_hdr.type */
    uint16_t len;        /* block size, header included */
    enum vq_kind kind;   /* the only kind of queue it is valid for */
} blocks[] = {
    { VN_STATS_TYPE_RX_BASIC, VN_STATS_REPLY_RX_BASIC, VN_STATS_RX_BASIC_LEN, VQ_RX },
    { VN_STATS_TYPE_TX_BASIC, VN_STATS_REPLY_TX_BASIC, VN_STATS_TX_BASIC_LEN, VQ_TX },
    { VN_STATS_TYPE_CVQ, VN_STATS_REPLY_CVQ, VN_STATS_CVQ_LEN, VQ_CTRL },
};
#define N_BLOCKS (sizeof(blocks) / sizeof(blocks[0]))

static void put_le64(uint8_t *p, uint64_t v)
{
    vn_le32_put(p, (uint32_t)v);
    vn_le32_put(p + 4, (uint32_t)(v >> 32));
}

/* What vq_index names: the driver numbers its queues rx0, tx0, rx1, ...
 * and the control queue after every pair it can see (2 * max pairs with MQ
 * or RSS, 2 without; the doorbell uses the same rule). */
static enum vq_kind vq_kind(const struct vn_dev *dev, uint16_t vq)
{
    unsigned visible = vn_dev_driver_pairs(dev, dev->features);
    if (vq == 2 * visible && VN_HAS(dev->features, VN_F_CTRL_VQ))
        return VQ_CTRL;
    /* Pairs in use: those the driver enabled (1 until it asks for more),
     * never more than it can see. */
    unsigned pairs = dev->active_qps < visible ? dev->active_qps : visible;
    if (vq >= 2 * pairs)
        return VQ_NONE;
    return vq % 2 == 0 ? VQ_RX : VQ_TX;
}

static uint64_t types_for(enum vq_kind kind)
{
    uint64_t t = 0;
    for (unsigned i = 0; i < N_BLOCKS; i++)
        if (blocks[i].kind == kind)
            t |= blocks[i].type;
    return t;
}

static uint64_t sum_drops(const struct vn_dir_stats *d)
{
    uint64_t n = 0;
    for (unsigned i = 0; i < VN_DROP__COUNT; i++)
        n += d->drops[i];
    return n;
}

/* Writes one block at p (len bytes). */
static void put_block(struct vn_dev *dev, uint8_t *p, unsigned b, uint16_t vq)
{
    memset(p, 0, blocks[b].len);
    p[VN_STATS_REPLY_TYPE_OFF] = blocks[b].reply_type;
    vn_le16_put(p + VN_STATS_REPLY_VQ_INDEX_OFF, vq);
    vn_le16_put(p + VN_STATS_REPLY_SIZE_OFF, blocks[b].len);
    uint8_t *f = p + VN_STATS_REPLY_HDR_LEN;
    if (blocks[b].kind == VQ_CTRL) {
        /* "including the current command": this one, which succeeds, is
         * counted in ctrl_ok by vn_ctrl_process only after it returns. So
         * once it completes these equal ctrl_ok + ctrl_err and ctrl_ok, the
         * figures the metrics and the SIGUSR2 snapshot show. Malformed
         * chains (returned unanswered) count as received commands. */
        uint64_t ok = VN_STAT_LOAD(dev->st.ctrl_ok);
        uint64_t err = VN_STAT_LOAD(dev->st.ctrl_err);
        put_le64(f, ok + err + 1);     /* command_num */
        put_le64(f + 8, ok + 1);       /* ok_num */
        return;
    }
    struct vn_qp_stats s;
    vn_dev_get_qp_stats(dev, vq / 2u, &s);
    const struct vn_dir_stats *d = blocks[b].kind == VQ_RX ? &s.rx : &s.tx;
    put_le64(f, d->doorbells);        /* notifications: the driver's kicks */
    put_le64(f + 8, d->packets);
    put_le64(f + 16, d->bytes);       /* frame bytes, virtio-net header excluded */
    put_le64(f + 24, d->interrupts);
    put_le64(f + 32, sum_drops(d));   /* every drop reason */
    if (blocks[b].kind == VQ_RX) {
        /* rx_drop_overruns, "dropped when no more descriptors were
         * available": this device does not drop a frame because its own
         * receive ring is empty; the worker stops reading the TAP and the
         * frames wait in the host kernel (whose TAP queue drops, counted on
         * the host, not here). The frames it does drop for want of guest
         * buffers are those this pair read and steered to another pair whose
         * backlog, waiting for that pair's buffers, was full: steer_backlog
         * (which also counts the rare allocation failure on that path). */
        put_le64(f + 40, d->drops[VN_DROP_STEER_BACKLOG]);
    } else {
        /* tx_drop_malformed: chains the driver got wrong. */
        put_le64(f + 40, d->drops[VN_DROP_BAD_CHAIN] + d->drops[VN_DROP_HEADER_TOO_SHORT] +
                             d->drops[VN_DROP_FRAME_TOO_BIG]);
    }
}

static uint8_t stats_get(struct vn_dev *dev, const uint8_t *data, uint32_t len, uint8_t *reply,
                         uint32_t reply_cap, uint32_t *reply_len)
{
    if (len == 0 || len % VN_STATS_REQ_ENTRY_LEN != 0)
        return VN_CTRL_ERR;
    uint32_t n = len / VN_STATS_REQ_ENTRY_LEN;
    /* Check everything and size the reply first. */
    uint64_t total = 0;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *e = data + (size_t)i * VN_STATS_REQ_ENTRY_LEN;
        uint16_t vq = vn_le16_get(e + VN_STATS_REQ_VQ_INDEX_OFF);
        uint64_t types = vn_le64_get(e + VN_STATS_REQ_TYPES_OFF);
        enum vq_kind kind = vq_kind(dev, vq);
        if (kind == VQ_NONE || types == 0 || (types & ~types_for(kind)) != 0)
            return VN_CTRL_ERR;
        for (unsigned b = 0; b < N_BLOCKS; b++)
            if (types & blocks[b].type)
                total += blocks[b].len;
    }
    if (total > reply_cap)
        return VN_CTRL_ERR;
    uint32_t at = 0;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *e = data + (size_t)i * VN_STATS_REQ_ENTRY_LEN;
        uint16_t vq = vn_le16_get(e + VN_STATS_REQ_VQ_INDEX_OFF);
        uint64_t types = vn_le64_get(e + VN_STATS_REQ_TYPES_OFF);
        for (unsigned b = 0; b < N_BLOCKS; b++) {
            if (types & blocks[b].type) {
                put_block(dev, reply + at, b, vq);
                at += blocks[b].len;
            }
        }
    }
    *reply_len = at;
    return VN_CTRL_OK;
}

uint8_t vn_ctrl_stats(struct vn_dev *dev, uint8_t cmd, const uint8_t *data, uint32_t len,
                      uint8_t *reply, uint32_t reply_cap, uint32_t *reply_len)
{
    *reply_len = 0;
    if (!VN_HAS(dev->features, VN_F_DEVICE_STATS) || (reply == NULL && reply_cap != 0))
        return VN_CTRL_ERR;
    switch (cmd) {
    case VN_CTRL_STATS_QUERY:
        if (len != 0 || reply_cap < VN_STATS_CAPS_LEN)
            return VN_CTRL_ERR;
        put_le64(reply, VN_STATS_SUPPORTED);
        *reply_len = VN_STATS_CAPS_LEN;
        return VN_CTRL_OK;
    case VN_CTRL_STATS_GET:
        return stats_get(dev, data, len, reply, reply_cap, reply_len);
    default:
        return VN_CTRL_ERR;
    }
}
