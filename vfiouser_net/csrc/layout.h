/* The device's BAR layout, chosen for QEMU's vfio-user client (see README,
 * "PCI layout"). By default no region is mmappable: QEMU then sends doorbell
 * writes as posted (fire-and-forget) region writes, which keeps kicks cheap.
 * In doorbell polling mode the notify area (one page) is mmappable and
 * polled (notify_page.h); QEMU then waits for a reply to every other write. */
#ifndef VN_LAYOUT_H
#define VN_LAYOUT_H

#define VN_BAR0_SIZE 0x4000
#define VN_COMMON_CFG_OFF 0x0000
/* Up to queue_reset (virtio 1.2+, VIRTIO_F_RING_RESET). */
#define VN_COMMON_CFG_LEN 0x003c
#define VN_ISR_OFF 0x1000
#define VN_ISR_LEN 0x0004
#define VN_DEVICE_CFG_OFF 0x2000
#define VN_DEVICE_CFG_LEN 0x0100
/* The steering state, read-only, for debugging from inside the guest
 * (vn_dev_steer_state): outside every virtio structure, so that no virtio
 * rule covers it (a vendor data capability would need a PCI-SIG vendor ID
 * other than virtio's, 4.1.4.8). */
#define VN_STEER_STATE_OFF 0x2800
#define VN_STEER_STATE_LEN 0x0010
#define VN_STEER_STATE_MAGIC 0x54534e56u /* "VNST" */
#define VN_NOTIFY_OFF 0x3000
#define VN_NOTIFY_LEN 0x1000

#define VN_MSIX_BAR 4
#define VN_MSIX_BAR_SIZE 0x1000
#define VN_MSIX_TABLE_OFF 0x0000
#define VN_MSIX_PBA_OFF 0x0800

#endif
