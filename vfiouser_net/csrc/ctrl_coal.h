/* VIRTIO_NET_CTRL_NOTF_COAL: interrupt coalescing set by the driver
 * (virtio 1.3, 5.1.6.5.9; VIRTIO_NET_F_NOTF_COAL, VIRTIO_NET_F_VQ_NOTF_COAL).
 * This is what the guest's `ethtool -C` (and its per-queue form) sends. */
#ifndef VN_CTRL_COAL_H
#define VN_CTRL_COAL_H

#include <stdint.h>

struct vn_dev;


#define VN_F_VQ_NOTF_COAL 52
#define VN_F_NOTF_COAL 53

/* Handles command `cmd` of the class with command-specific-data
 * data[0..len): TX_SET/RX_SET (struct virtio_net_ctrl_coal, 8 bytes) apply
 * to every transmit/receive queue; VQ_SET (struct virtio_net_ctrl_coal_vq,
 * 12 bytes) to one enabled rx/tx queue; VQ_GET (vq_index and reserved, 4
 * bytes) writes that queue's struct virtio_net_ctrl_coal to reply. Returns
 * VN_CTRL_ERR and changes nothing when the feature the command needs was not
 * negotiated, the length is wrong, the queue is not an enabled rx/tx queue,
 * or the reply does not fit. Context thread. */
uint8_t vn_ctrl_coal(struct vn_dev *dev, uint8_t cmd, const uint8_t *data, uint32_t len,
                     uint8_t *reply, uint32_t reply_cap, uint32_t *reply_len);

#endif
