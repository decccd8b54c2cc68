#include "ctrl_coal.h"

#include "device.h"
#include "le.h"
#include "net_hdr.h"

/* An rx/tx queue the driver enabled (the control queue is not one). */
static bool coal_queue_ok(struct vn_dev *dev, uint16_t qidx)
{
    if (qidx >= 2 * vn_dev_driver_pairs(dev, dev->features))
        return false;
    const struct vn_qp *qp = &dev->qp[qidx / 2];
    return (qidx % 2 == 0 ? qp->rx.size : qp->tx.size) != 0;
}

static struct vn_coal_params coal_params(const uint8_t *p)
{
    struct vn_coal_params c = { vn_le32_get(p), vn_le32_get(p + 4) };
    return c;
}

uint8_t vn_ctrl_coal(struct vn_dev *dev, uint8_t cmd, const uint8_t *data, uint32_t len,
                     uint8_t *reply, uint32_t reply_cap, uint32_t *reply_len)
{
    *reply_len = 0;
    switch (cmd) {
    case VN_CTRL_NOTF_COAL_TX_SET:
    case VN_CTRL_NOTF_COAL_RX_SET: {
        if (!VN_HAS(dev->features, VN_F_NOTF_COAL) || len != 8)
            return VN_CTRL_ERR;
        struct vn_coal_params p = coal_params(data);
        unsigned dir = cmd == VN_CTRL_NOTF_COAL_RX_SET ? 0 : 1;
        if (dir == 0)
            dev->coal_rx_all = p;
        else
            dev->coal_tx_all = p;
        for (unsigned i = 0; i < dev->max_qps; i++)
            vn_dev_set_coal(dev, 2 * i + dir, p);
        return VN_CTRL_OK;
    }
    case VN_CTRL_NOTF_COAL_VQ_SET: {
        if (!VN_HAS(dev->features, VN_F_VQ_NOTF_COAL) || len != 12)
            return VN_CTRL_ERR;
        uint16_t qidx = vn_le16_get(data);
        if (!coal_queue_ok(dev, qidx))
            return VN_CTRL_ERR;
        vn_dev_set_coal(dev, qidx, coal_params(data + 4));
        return VN_CTRL_OK;
    }
    case VN_CTRL_NOTF_COAL_VQ_GET: {
        if (!VN_HAS(dev->features, VN_F_VQ_NOTF_COAL) || len != 4 || reply_cap < 8)
            return VN_CTRL_ERR;
        uint16_t qidx = vn_le16_get(data);
        if (!coal_queue_ok(dev, qidx))
            return VN_CTRL_ERR;
        struct vn_coal_params p = vn_dev_get_coal(dev, qidx);
        vn_le32_put(reply, p.max_packets);
        vn_le32_put(reply + 4, p.max_usecs);
        *reply_len = 8;
        return VN_CTRL_OK;
    }
    default:
        return VN_CTRL_ERR;
    }
}
