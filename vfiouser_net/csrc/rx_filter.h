/* Receive filter: what the guest asked to receive (CTRL_RX, CTRL_MAC). */
#ifndef VN_RX_FILTER_H
#define VN_RX_FILTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define VN_MAC_TABLE_ENTRIES 64

struct vn_rx_filter {
    uint8_t mac[6];
    bool promisc;
    bool allmulti;
    bool uni_overflow;    /* guest listed more unicast addresses than we keep */
    bool multi_overflow;
    unsigned n_uc, n_mc;
    uint8_t uc[VN_MAC_TABLE_ENTRIES][6];
    uint8_t mc[VN_MAC_TABLE_ENTRIES][6];
    /* CTRL_VLAN negotiated: 802.1Q frames pass only for VLAN IDs in the
     * table (5.1.9.5.3). Bits set by the control queue while workers read
     * them: atomic words. */
    bool vlan_filter;
    uint64_t vlans[4096 / 64];
};

/* The state after reset: promiscuous until the driver programs the filter,
 * which is what drivers without CTRL_RX rely on. */
void vn_rx_filter_reset(struct vn_rx_filter *f, const uint8_t mac[6]);
bool vn_rx_filter_accepts(const struct vn_rx_filter *f, const uint8_t dst[6]);
/* Whether a frame (len bytes from its destination MAC) passes the VLAN
 * filter: untagged frames always do. */
bool vn_rx_filter_vlan_accepts(const struct vn_rx_filter *f, const uint8_t *frame, size_t len);
void vn_rx_filter_vlan_set(struct vn_rx_filter *f, uint16_t vid, bool on);

#endif
