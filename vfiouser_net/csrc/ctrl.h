/* The control virtqueue (virtio 1.x 5.1.6.5): what the rest of the datapath
 * calls. Commands are parsed and dispatched in ctrl.c; their classes' own
 * handlers are ctrl_coal.c (NOTF_COAL) and ctrl_stats.c (STATS), and the RSS
 * payloads are parsed by steering.c. */
#ifndef VN_CTRL_H
#define VN_CTRL_H

#include <stdint.h>

struct vn_dev;

/* Control queue (ctrl.c). At most VN_CTRL_BUDGET commands per call: a guest
 * re-posting commands as fast as they are answered would otherwise keep the
 * context thread in the control queue for good (no vfio-user message, no
 * interrupt flush, no stop request served). With commands left it sets
 * ctrl_resume and writes cmd_fd, and the context thread's loop comes back
 * (vn_dev_ctrl_poll_kick) after serving what else is pending, with no new
 * doorbell needed. 64 is well above what Linux ever has outstanding (one
 * command at a time, it waits for each ack). */
#define VN_CTRL_BUDGET 64
void vn_ctrl_process(struct vn_dev *dev);
uint8_t vn_ctrl_handle(struct vn_dev *dev, const uint8_t *req, uint32_t len);

/* vn_ctrl_handle() (ctrl.c) for commands with a command-specific-result:
 * req[0..len) is the whole device-readable part (class, command, data) and
 * reply[0..reply_cap) the device-writable bytes besides the ack. On
 * VN_CTRL_OK *reply_len bytes of result were written (0 for every class
 * but STATS); on VN_CTRL_ERR none. vn_ctrl_handle() is this with no room. */
uint8_t vn_ctrl_handle_reply(struct vn_dev *dev, const uint8_t *req, uint32_t len, uint8_t *reply,
                             uint32_t reply_cap, uint32_t *reply_len);

#endif
