/* The control virtqueue (virtio 1.x 5.1.6.5): parse and apply commands.
 *
 * Runs on the context thread from the control queue's doorbell; the Linux
 * driver busy-waits for the ack, so commands are answered synchronously.
 * Every command is validated for its exact length and for the features the
 * driver negotiated; anything else gets VIRTIO_NET_ERR and changes nothing. */
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <syslog.h>

#include "ctrl.h"
#include "ctrl_coal.h"
#include "ctrl_stats.h"
#include "device.h"
#include "irq.h"
#include "le.h"
#include "log.h"
#include "net_hdr.h"
#include "tap.h"

/* Largest command accepted. MAC_TABLE_SET is not bounded by the 64 entries
 * we keep: Linux sends its whole unicast and multicast lists, and longer
 * tables must overflow to "accept all", not be refused. 64 KiB holds about
 * 10000 addresses. */
#define CTRL_MAX_REQ (64 * 1024)
/* Largest command-specific-result (STATS GET for 16 pairs and the control
 * queue is under 2 KiB); a larger writable part is used up to this. */
#define CTRL_MAX_REPLY (64 * 1024)

static uint8_t ctrl_rx(struct vn_dev *dev, uint8_t cmd, const uint8_t *data, uint32_t len)
{
    if (!VN_HAS(dev->features, VN_F_CTRL_RX) || len != 1 || data[0] > 1)
        return VN_CTRL_ERR;
    bool on = data[0] != 0;
    switch (cmd) {
    case VN_CTRL_RX_PROMISC:
        vn_dev_pause_workers(dev);
        dev->filter.promisc = on;
        vn_dev_resume_workers(dev);
        return VN_CTRL_OK;
    case VN_CTRL_RX_ALLMULTI:
        vn_dev_pause_workers(dev);
        dev->filter.allmulti = on;
        vn_dev_resume_workers(dev);
        return VN_CTRL_OK;
    default:
        return VN_CTRL_ERR;
    }
}

/* One table of struct virtio_net_ctrl_mac { le32 entries; u8 macs[][6]; }.
 * Returns the bytes consumed or 0 when malformed. */
static uint32_t parse_mac_table(const uint8_t *data, uint32_t len, uint32_t *entries)
{
    if (len < 4)
        return 0;
    uint32_t n = vn_le32_get(data);
    if (n > (len - 4) / 6)
        return 0;
    *entries = n;
    return 4 + 6 * n;
}

static uint8_t ctrl_mac(struct vn_dev *dev, uint8_t cmd, const uint8_t *data, uint32_t len)
{
    if (cmd == VN_CTRL_MAC_ADDR_SET) {
        if (!VN_HAS(dev->features, VN_F_CTRL_MAC_ADDR) || len != 6)
            return VN_CTRL_ERR;
        vn_dev_pause_workers(dev);
        memcpy(dev->filter.mac, data, 6);
        vn_dev_resume_workers(dev);
        return VN_CTRL_OK;
    }
    if (cmd != VN_CTRL_MAC_TABLE_SET || !VN_HAS(dev->features, VN_F_CTRL_RX))
        return VN_CTRL_ERR;
    uint32_t n_uc, n_mc;
    uint32_t uc_len = parse_mac_table(data, len, &n_uc);
    if (uc_len == 0)
        return VN_CTRL_ERR;
    uint32_t mc_len = parse_mac_table(data + uc_len, len - uc_len, &n_mc);
    if (mc_len == 0 || uc_len + mc_len != len)
        return VN_CTRL_ERR;
    vn_dev_pause_workers(dev);
    struct vn_rx_filter *f = &dev->filter;
    f->uni_overflow = n_uc > VN_MAC_TABLE_ENTRIES;
    f->n_uc = f->uni_overflow ? 0 : n_uc;
    memcpy(f->uc, data + 4, 6 * (size_t)f->n_uc);
    f->multi_overflow = n_mc > VN_MAC_TABLE_ENTRIES;
    f->n_mc = f->multi_overflow ? 0 : n_mc;
    memcpy(f->mc, data + uc_len + 4, 6 * (size_t)f->n_mc);
    vn_dev_resume_workers(dev);
    return VN_CTRL_OK;
}

static uint8_t ctrl_guest_offloads(struct vn_dev *dev, uint8_t cmd, const uint8_t *data, uint32_t len)
{
    if (!VN_HAS(dev->features, VN_F_CTRL_GUEST_OFFLOADS) || cmd != VN_CTRL_GUEST_OFFLOADS_SET ||
        len != 8)
        return VN_CTRL_ERR;
    uint64_t want = vn_le64_get(data);
    const uint64_t guest_bits = (1ull << VN_F_GUEST_CSUM) | (1ull << VN_F_GUEST_TSO4) |
                                (1ull << VN_F_GUEST_TSO6) | (1ull << VN_F_GUEST_ECN) |
                                (1ull << VN_F_GUEST_UFO);
    /* Only offloads that were negotiated can be switched. */
    if ((want & ~(dev->features & guest_bits)) != 0)
        return VN_CTRL_ERR;
    for (unsigned i = 0; i < dev->active_qps; i++)
        if (dev->qp[i].tap_fd >= 0 && vn_tap_set_guest_offloads(dev->qp[i].tap_fd, want) < 0)
            return VN_CTRL_ERR;
    return VN_CTRL_OK;
}

/* Steering to a pair whose receive ring the driver did not set up (or that
 * broke) would hand its frames to no one: they would only be dropped
 * (pair_not_ready, worker.c). Such a VQ_PAIRS_SET or RSS_CONFIG is refused
 * instead (VIRTIO_NET_ERR, allowed for an invalid command, virtio 1.3
 * 5.1.6.5) and the previous steering stays: the driver learns at once that
 * it asked for something it had not prepared, rather than losing a share of
 * its traffic silently. Linux enables every queue it creates before
 * DRIVER_OK, so it never meets this. */
static bool pairs_ready(const struct vn_dev *dev, unsigned pairs)
{
    for (unsigned i = 0; i < pairs; i++)
        if (!vn_qp_takes_frames(&dev->qp[i]))
            return false;
    return true;
}

static bool rss_targets_ready(const struct vn_dev *dev, const struct vn_rss_config *cfg,
                              uint16_t pairs)
{
    if (!pairs_ready(dev, pairs) || !vn_qp_takes_frames(&dev->qp[cfg->unclassified]))
        return false;
    for (unsigned i = 0; i < cfg->table_len; i++)
        if (!vn_qp_takes_frames(&dev->qp[cfg->table[i]]))
            return false;
    return true;
}

/* VIRTIO_NET_CTRL_MQ: the number of pairs, RSS and hash reporting. Each
 * accepted command is a steering switch: transmit queues drain, frames
 * already steered are placed first, the new rule applies after. */
static uint8_t ctrl_mq(struct vn_dev *dev, uint8_t cmd, const uint8_t *data, uint32_t len)
{
    switch (cmd) {
    case VN_CTRL_MQ_VQ_PAIRS_SET: {
        if (!VN_HAS(dev->features, VN_F_MQ) || len != 2)
            return VN_CTRL_ERR;
        uint16_t pairs = vn_le16_get(data);
        if (pairs == 0 || pairs > dev->max_qps)
            return VN_CTRL_ERR;
        if (!pairs_ready(dev, pairs)) {
            vn_log(dev, LOG_WARNING, "VQ_PAIRS_SET %u refused: not every pair has a receive ring",
                   pairs);
            return VN_CTRL_ERR;
        }
        /* A table the guest set stays in force (Linux sends VQ_PAIRS_SET for
         * `ethtool -L` once the user set the table with `ethtool -X`); its
         * entries past the active pairs wrap around. */
        vn_dev_steering_begin(dev);
        vn_dev_steering_commit(dev, pairs);
        vn_log(dev, LOG_INFO, "queue pairs: %u of %u", pairs, dev->max_qps);
        return VN_CTRL_OK;
    }
    case VN_CTRL_MQ_RSS_CONFIG: {
        struct vn_rss_config cfg;
        uint16_t tx;
        if (!VN_HAS(dev->features, VN_F_RSS) ||
            vn_rss_config_parse(data, len, dev->max_qps, &cfg, &tx) < 0)
            return VN_CTRL_ERR;
        if (!rss_targets_ready(dev, &cfg, tx)) {
            vn_log(dev, LOG_WARNING, "RSS_CONFIG refused: it names a pair without receive ring");
            return VN_CTRL_ERR;
        }
        vn_dev_steering_begin(dev);
        vn_steering_set_rss(&dev->steer, &cfg);
        vn_dev_steering_commit(dev, tx);
        vn_log(dev, LOG_INFO, "RSS: %u pairs, table of %u, hash types 0x%x, key %u bytes", tx,
               cfg.table_len, cfg.hash_types, cfg.key_len);
        return VN_CTRL_OK;
    }
    case VN_CTRL_MQ_HASH_CONFIG: {
        struct vn_rss_config cfg;
        if (!VN_HAS(dev->features, VN_F_HASH_REPORT) || vn_hash_config_parse(data, len, &cfg) < 0)
            return VN_CTRL_ERR;
        vn_dev_steering_begin(dev);
        vn_steering_set_rss(&dev->steer, &cfg);
        vn_dev_steering_commit(dev, dev->active_qps);
        return VN_CTRL_OK;
    }
    default:
        return VN_CTRL_ERR;
    }
}

uint8_t vn_ctrl_handle_reply(struct vn_dev *dev, const uint8_t *req, uint32_t len, uint8_t *reply,
                             uint32_t reply_cap, uint32_t *reply_len)
{
    *reply_len = 0;
    if (len < 2)
        return VN_CTRL_ERR;
    uint8_t cls = req[0], cmd = req[1];
    const uint8_t *data = req + 2;
    uint32_t dlen = len - 2;
    switch (cls) {
    case VN_CTRL_RX:
        return ctrl_rx(dev, cmd, data, dlen);
    case VN_CTRL_MAC:
        return ctrl_mac(dev, cmd, data, dlen);
    case VN_CTRL_VLAN: {
        if (!VN_HAS(dev->features, VN_F_CTRL_VLAN) || dlen != 2 ||
            (cmd != VN_CTRL_VLAN_ADD && cmd != VN_CTRL_VLAN_DEL))
            return VN_CTRL_ERR;
        uint16_t vid = vn_le16_get(data);
        if (vid >= 4096)
            return VN_CTRL_ERR;
        vn_rx_filter_vlan_set(&dev->filter, vid, cmd == VN_CTRL_VLAN_ADD);
        return VN_CTRL_OK;
    }
    case VN_CTRL_ANNOUNCE:
        if (!VN_HAS(dev->features, VN_F_GUEST_ANNOUNCE) || cmd != VN_CTRL_ANNOUNCE_ACK || dlen != 0)
            return VN_CTRL_ERR;
        atomic_store(&dev->announce, false);
        return VN_CTRL_OK;
    case VN_CTRL_GUEST_OFFLOADS:
        return ctrl_guest_offloads(dev, cmd, data, dlen);
    case VN_CTRL_MQ:
        return ctrl_mq(dev, cmd, data, dlen);
    case VN_CTRL_STATS:
        return vn_ctrl_stats(dev, cmd, data, dlen, reply, reply_cap, reply_len);
    case VN_CTRL_NOTF_COAL:
        return vn_ctrl_coal(dev, cmd, data, dlen, reply, reply_cap, reply_len);
    default:
        return VN_CTRL_ERR;
    }
}

uint8_t vn_ctrl_handle(struct vn_dev *dev, const uint8_t *req, uint32_t len)
{
    uint32_t reply_len;
    return vn_ctrl_handle_reply(dev, req, len, NULL, 0, &reply_len);
}

/* Copy data[0..len) into the device-writable buffers iov[0..n) from byte
 * `at` of their concatenation (at + len fits in their total). */
static void put_writable(const struct iovec *iov, unsigned n, uint32_t at, const uint8_t *data,
                         uint32_t len)
{
    for (unsigned i = 0; i < n && len > 0; i++) {
        if (at >= iov[i].iov_len) {
            at -= (uint32_t)iov[i].iov_len;
            continue;
        }
        size_t k = iov[i].iov_len - at < len ? iov[i].iov_len - at : len;
        memcpy((uint8_t *)iov[i].iov_base + at, data, k);
        at = 0;
        data += k;
        len -= (uint32_t)k;
    }
}

void vn_ctrl_process(struct vn_dev *dev)
{
    struct vn_vq *vq = &dev->ctrl;
    if (!vn_vq_ready(vq)) {
        vn_log(dev, LOG_WARNING, "control queue kicked but not ready (size %u, broken %d)",
               vq->size, vq->broken);
        return;
    }
    struct iovec iov[64];
    bool pushed = false;
    unsigned handled = 0;
    for (;;) {
        if (handled >= VN_CTRL_BUDGET && vn_vq_avail_count(vq) != 0) {
            /* The rest after the context thread's other work (device.h). */
            VN_STAT_INC(dev->st.ctrl_budget_exhausted);
            atomic_store(&dev->ctrl_resume, true);
            eventfd_write(dev->cmd_fd, 1);
            break;
        }
        struct vn_chain c;
        int err;
        int r = vn_vq_pop(vq, iov, 64, &c, &err);
        /* The control queue is only served on doorbells: keep asking for
         * them (avail_event follows us with EVENT_IDX), and look again in
         * case a command slipped in meanwhile. */
        if (r == VN_POP_EMPTY && !vn_vq_enable_notify(vq))
            break;
        if (r == VN_POP_EMPTY)
            continue;
        if (r == VN_POP_FATAL) {
            vn_dev_fatal(dev, "control queue ring corrupt");
            break;
        }
        pushed = true;
        handled++;
        if (r == VN_POP_BAD || c.nout == c.niov) {
            /* Malformed, or no byte to put the ack in: nothing to answer. */
            vn_log(dev, LOG_WARNING, "control queue: malformed command chain (%s)",
                   r == VN_POP_BAD ? vn_error_reason_name(err) : "no ack buffer");
            VN_STAT_INC(dev->st.ctrl_err);
            vn_vq_push(vq, c.head, 0);
            continue;
        }
        uint8_t ack = VN_CTRL_ERR;
        uint8_t cls = 0, cmd = 0;
        /* Writable bytes besides the ack, for a command-specific-result;
         * none (the usual ack-only buffer) needs no allocation. */
        uint32_t reply_cap = c.in_len - 1 < CTRL_MAX_REPLY ? c.in_len - 1 : CTRL_MAX_REPLY;
        uint32_t reply_len = 0;
        bool with_result = false;
        uint8_t *reply = reply_cap > 0 ? malloc(reply_cap) : NULL;
        if (reply == NULL)
            reply_cap = 0;
        uint8_t *req = c.out_len <= CTRL_MAX_REQ ? malloc(c.out_len + 1) : NULL;
        if (req != NULL) {
            uint32_t off = 0;
            for (unsigned i = 0; i < c.nout; i++) {
                memcpy(req + off, iov[i].iov_base, iov[i].iov_len);
                off += (uint32_t)iov[i].iov_len;
            }
            cls = off > 0 ? req[0] : 0;
            cmd = off > 1 ? req[1] : 0;
            ack = vn_ctrl_handle_reply(dev, req, off, reply, reply_cap, &reply_len);
            with_result = vn_ctrl_has_result(cls);
            if (ack != VN_CTRL_OK)
                vn_log(dev, LOG_WARNING, "control queue: command class %u cmd %u (%u bytes) refused",
                       cls, cmd, off);
            free(req);
        } else {
            vn_log(dev, LOG_WARNING, "control queue: command of %u bytes refused", c.out_len);
        }
        vn_log(dev, LOG_DEBUG, "control queue: class %u cmd %u -> %s", cls, cmd,
               ack == VN_CTRL_OK ? "ok" : "err");
        if (ack == VN_CTRL_OK)
            VN_STAT_INC(dev->st.ctrl_ok);
        else
            VN_STAT_INC(dev->st.ctrl_err);
        unsigned cs = cls < VN_CTRL_CLASS_SLOTS - 1 ? cls : VN_CTRL_CLASS_SLOTS - 1;
        unsigned cm = cmd < VN_CTRL_CMD_SLOTS - 1 ? cmd : VN_CTRL_CMD_SLOTS - 1;
        VN_STAT_INC(dev->st.ctrl_cmds[cs][cm][ack == VN_CTRL_OK ? 0 : 1]);
        if (ack != VN_CTRL_OK || reply_len > reply_cap)
            reply_len = 0;
        /* struct virtio_net_ctrl (5.1.6.5): the ack is the first
         * device-writable byte, the command-specific-result follows it
         * (Linux: its status byte, then its reply buffer). */
        put_writable(&iov[c.nout], c.niov - c.nout, 0, &ack, 1);
        if (with_result)
            put_writable(&iov[c.nout], c.niov - c.nout, 1, reply, reply_len);
        free(reply);
        /* The used length counts the bytes written. */
        vn_vq_push(vq, c.head, 1 + reply_len);
        if (dev->hooks.event != NULL)
            dev->hooks.event(dev->hooks.py, VN_EVENT_CTRL);
    }
    if (pushed) {
        vn_vq_publish(vq);
        if (vn_vq_should_notify(vq) && vn_irq_notify_queue(dev, vq->msix_vector))
            VN_STAT_INC(vq->st->interrupts);
    }
}
