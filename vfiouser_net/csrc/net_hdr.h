/* virtio-net protocol constants (virtio 1.x, 5.1) shared by the datapath and
 * the control queue. */
#ifndef VN_NET_HDR_H
#define VN_NET_HDR_H

/* struct virtio_net_hdr_v1: always 12 bytes with VIRTIO_F_VERSION_1. */
#define VN_NET_HDR_LEN 12
#define VN_NET_HDR_FLAGS_OFF 0
#define VN_NET_HDR_GSO_TYPE_OFF 1
#define VN_NET_HDR_NUM_BUFFERS_OFF 10
/* struct virtio_net_hdr_v1_hash: with HASH_REPORT, 20 bytes. */
#define VN_NET_HDR_HASH_LEN 20
#define VN_NET_HDR_MAX_LEN 20
#define VN_NET_HDR_HASH_VALUE_OFF 12
#define VN_NET_HDR_HASH_REPORT_OFF 16

/* Feature bits the datapath looks at. */
#define VN_F_CSUM 0
#define VN_F_GUEST_CSUM 1
#define VN_F_CTRL_GUEST_OFFLOADS 2
#define VN_F_MTU 3
#define VN_F_MAC 5
#define VN_F_GUEST_TSO4 7
#define VN_F_GUEST_TSO6 8
#define VN_F_GUEST_ECN 9
#define VN_F_GUEST_UFO 10
#define VN_F_HOST_TSO4 11
#define VN_F_HOST_TSO6 12
#define VN_F_MRG_RXBUF 15
#define VN_F_STATUS 16
#define VN_F_CTRL_VQ 17
#define VN_F_CTRL_RX 18
#define VN_F_CTRL_VLAN 19
#define VN_F_GUEST_USO4 54
#define VN_F_GUEST_USO6 55
#define VN_F_HOST_USO 56
#define VN_F_GUEST_ANNOUNCE 21
#define VN_F_MQ 22
#define VN_F_CTRL_MAC_ADDR 23
#define VN_F_RING_INDIRECT_DESC 28
#define VN_F_DEVICE_STATS 50
#define VN_F_HASH_REPORT 57
#define VN_F_RSS 60
#define VN_F_RING_EVENT_IDX 29
#define VN_F_VERSION_1 32

#define VN_HAS(features, bit) (((features) >> (bit)) & 1u)

/* Control queue (5.1.6.5). */
#define VN_CTRL_OK 0
#define VN_CTRL_ERR 1

#define VN_CTRL_RX 0
#define VN_CTRL_RX_PROMISC 0
#define VN_CTRL_RX_ALLMULTI 1

#define VN_CTRL_MAC 1
#define VN_CTRL_MAC_TABLE_SET 0
#define VN_CTRL_MAC_ADDR_SET 1

#define VN_CTRL_VLAN 2
#define VN_CTRL_VLAN_ADD 0
#define VN_CTRL_VLAN_DEL 1

#define VN_CTRL_ANNOUNCE 3
#define VN_CTRL_ANNOUNCE_ACK 0

#define VN_CTRL_MQ 4
#define VN_CTRL_MQ_VQ_PAIRS_SET 0
#define VN_CTRL_MQ_RSS_CONFIG 1
#define VN_CTRL_MQ_HASH_CONFIG 2

#define VN_CTRL_GUEST_OFFLOADS 5
#define VN_CTRL_GUEST_OFFLOADS_SET 0

/* Device statistics (virtio 1.3, 5.1.6.5.x "Device Statistics"). */
#define VN_CTRL_NOTF_COAL 6
#define VN_CTRL_NOTF_COAL_TX_SET 0
#define VN_CTRL_NOTF_COAL_RX_SET 1
#define VN_CTRL_NOTF_COAL_VQ_SET 2
#define VN_CTRL_NOTF_COAL_VQ_GET 3

#define VN_CTRL_STATS 8
#define VN_CTRL_STATS_QUERY 0
#define VN_CTRL_STATS_GET 1

/* struct virtio_net_stats_capabilities { le64 supported_stats_types[1]; } and
 * virtio_net_ctrl_queue_stats.stats[i].types_bitmap[0]. */
#define VN_STATS_TYPE_RX_BASIC (1ull << 0)
#define VN_STATS_TYPE_RX_CSUM (1ull << 1)
#define VN_STATS_TYPE_RX_GSO (1ull << 2)
#define VN_STATS_TYPE_RX_SPEED (1ull << 3)
#define VN_STATS_TYPE_TX_BASIC (1ull << 16)
#define VN_STATS_TYPE_TX_CSUM (1ull << 17)
#define VN_STATS_TYPE_TX_GSO (1ull << 18)
#define VN_STATS_TYPE_TX_SPEED (1ull << 19)
#define VN_STATS_TYPE_CVQ (1ull << 32)
#define VN_STATS_TYPE_RX_ALL (VN_STATS_TYPE_RX_BASIC | VN_STATS_TYPE_RX_CSUM | \
                              VN_STATS_TYPE_RX_GSO | VN_STATS_TYPE_RX_SPEED)
#define VN_STATS_TYPE_TX_ALL (VN_STATS_TYPE_TX_BASIC | VN_STATS_TYPE_TX_CSUM | \
                              VN_STATS_TYPE_TX_GSO | VN_STATS_TYPE_TX_SPEED)
#define VN_STATS_CAPS_LEN 8

/* One request entry: le16 vq_index; le16 reserved[3]; le64 types_bitmap[1]. */
#define VN_STATS_REQ_ENTRY_LEN 16
#define VN_STATS_REQ_VQ_INDEX_OFF 0
#define VN_STATS_REQ_TYPES_OFF 8

/* struct virtio_net_stats_reply_hdr: u8 type; u8 reserved; le16 vq_index;
 * le16 reserved1; le16 size (of the whole block, header included). */
#define VN_STATS_REPLY_HDR_LEN 8
#define VN_STATS_REPLY_TYPE_OFF 0
#define VN_STATS_REPLY_VQ_INDEX_OFF 2
#define VN_STATS_REPLY_SIZE_OFF 6
/* virtio_net_stats_reply_hdr.type: the bit number of the type. */
#define VN_STATS_REPLY_RX_BASIC 0
#define VN_STATS_REPLY_TX_BASIC 16
#define VN_STATS_REPLY_CVQ 32
/* Block sizes: the header and le64 counters. struct virtio_net_stats_cvq:
 * command_num, ok_num. struct virtio_net_stats_rx_basic: rx_notifications,
 * rx_packets, rx_bytes, rx_interrupts, rx_drops, rx_drop_overruns.
 * struct virtio_net_stats_tx_basic: tx_notifications, tx_packets, tx_bytes,
 * tx_interrupts, tx_drops, tx_drop_malformed. */
#define VN_STATS_CVQ_LEN (VN_STATS_REPLY_HDR_LEN + 2 * 8)
#define VN_STATS_RX_BASIC_LEN (VN_STATS_REPLY_HDR_LEN + 6 * 8)
#define VN_STATS_TX_BASIC_LEN (VN_STATS_REPLY_HDR_LEN + 6 * 8)

/* Largest frame a guest may hand us or we may hand it: a 64 KiB GSO packet
 * plus Ethernet/VLAN headers. */
#define VN_MAX_FRAME (65535 + 14 + 4)

#endif
