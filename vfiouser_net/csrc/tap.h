/* Host side: a Linux TAP device with the virtio-net header (IFF_VNET_HDR). */
#ifndef VN_TAP_H
#define VN_TAP_H

#include <stdbool.h>
#include <stdint.h>

/* Open (attach or create) TAP `name`, non-blocking, vnet header of 12 bytes.
 * multi_queue: IFF_MULTI_QUEUE (needed for more than one queue). On success
 * returns the fd and writes the kernel's name into ifname_out (16 bytes);
 * returns -errno on failure. */
int vn_tap_open(const char *name, bool multi_queue, char *ifname_out);

/* TUNSETOFFLOAD from negotiated guest offload feature bits. */
int vn_tap_set_guest_offloads(int fd, uint64_t guest_offload_features);
/* 1 when the host kernel's TAP takes UDP segmentation offload (USO), 0 when
 * not, -errno on another error; leaves the offloads off. */
int vn_tap_probe_uso(int fd);

/* TUNSETVNETHDRSZ: the header length the guest uses (12, or 20 with hash reports). */
int vn_tap_set_vnet_hdr_len(int fd, int len);

/* Make the kernel pick a TAP queue for host-to-guest frames by the flow's
 * own hash (a two-instruction eBPF steering program) instead of following
 * the queue the guest last sent the flow on. Each flow is then read by one
 * worker, so frames of a flow cannot overtake each other between workers;
 * the device's steering engine still decides the guest queue. Returns the
 * program fd (keep it open) or -errno (then the kernel's default applies). */
int vn_tap_set_flow_steering(int fd);
/* Detach it again (a persistent TAP outlives the daemon). */
void vn_tap_clear_flow_steering(int fd);

/* Attach or detach this fd's queue (TUNSETQUEUE). The kernel spreads
 * host-to-guest frames over the attached queues only, so a queue no worker
 * reads must be detached or its frames would sit there unread. */
int vn_tap_set_queue_attached(int fd, bool attached);

/* IFF_UP of the interface (the operator's link switch on the host side):
 * 1 up, 0 down, -errno on failure. */
int vn_tap_is_up(const char *ifname);

#endif
