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
#define VN_F_GUEST_ANNOUNCE 21
#define VN_F_MQ 22
#define VN_F_CTRL_MAC_ADDR 23
#define VN_F_RING_INDIRECT_DESC 28
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

#define VN_CTRL_ANNOUNCE 3
#define VN_CTRL_ANNOUNCE_ACK 0

#define VN_CTRL_MQ 4
#define VN_CTRL_MQ_VQ_PAIRS_SET 0
#define VN_CTRL_MQ_RSS_CONFIG 1
#define VN_CTRL_MQ_HASH_CONFIG 2

#define VN_CTRL_GUEST_OFFLOADS 5
#define VN_CTRL_GUEST_OFFLOADS_SET 0

/* Largest frame a guest may hand us or we may hand it: a 64 KiB GSO packet
 * plus Ethernet/VLAN headers. */
#define VN_MAX_FRAME (65535 + 14 + 4)

#endif
