/* VIRTIO_NET_CTRL_STATS: device statistics through the control queue
 * (virtio 1.3, 5.1.6.5.x "Device Statistics"; VIRTIO_NET_F_DEVICE_STATS).
 *
 * The figures are the datapath's own counters (stats.h), the ones the
 * Prometheus metrics and the SIGUSR2 snapshot show, read with relaxed loads. */
#ifndef VN_CTRL_STATS_H
#define VN_CTRL_STATS_H

#include <stdbool.h>
#include <stdint.h>

#include "net_hdr.h"

struct vn_dev;

/* The statistic types the device supports (the QUERY reply): controlq,
 * receiveq basic and transmitq basic. CSUM, GSO and SPEED are not. */
#define VN_STATS_SUPPORTED (VN_STATS_TYPE_CVQ | VN_STATS_TYPE_RX_BASIC | VN_STATS_TYPE_TX_BASIC)

/* Commands of this class have a command-specific-result. The device-writable
 * part is then laid out as struct virtio_net_ctrl says (5.1.6.5): the ack
 * byte first, the result after it (Linux 6.12 virtnet_send_command_reply():
 * the status buffer, then the caller's). NOTF_COAL's VQ_GET has one too. Other classes have no result and
 * keep the ack in the last device-writable byte. */
static inline bool vn_ctrl_has_result(uint8_t cls)
{
    return cls == VN_CTRL_STATS || cls == VN_CTRL_NOTF_COAL;
}

/* Handles VIRTIO_NET_CTRL_STATS command `cmd` whose command-specific-data is
 * data[0..len). The command-specific-result goes into reply[0..reply_cap)
 * (the device-writable bytes after the ack). Returns VN_CTRL_OK with
 * *reply_len bytes written, or VN_CTRL_ERR with *reply_len = 0 and nothing
 * written: DEVICE_STATS not negotiated, unknown command, wrong data length,
 * an unknown, unsupported or misplaced statistic type, a virtqueue index out
 * of range or of a queue the driver does not use, or a reply that does not
 * fit. Context thread (the counters of the current command are not yet
 * counted: the CVQ block includes it, as the spec asks). */
uint8_t vn_ctrl_stats(struct vn_dev *dev, uint8_t cmd, const uint8_t *data, uint32_t len,
                      uint8_t *reply, uint32_t reply_cap, uint32_t *reply_len);

#endif
