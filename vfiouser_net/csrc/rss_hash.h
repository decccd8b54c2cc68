/* Receive-side scaling hash (virtio 1.x 5.1.6.4.3): Toeplitz over the
 * addresses and ports of a frame, for the hash types the guest enabled. */
#ifndef VN_RSS_HASH_H
#define VN_RSS_HASH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define VN_RSS_MAX_KEY_SIZE 40

/* VIRTIO_NET_RSS_HASH_TYPE_* (supported_hash_types, hash_types). */
#define VN_HASH_TYPE_IPV4 (1u << 0)
#define VN_HASH_TYPE_TCPV4 (1u << 1)
#define VN_HASH_TYPE_UDPV4 (1u << 2)
#define VN_HASH_TYPE_IPV6 (1u << 3)
#define VN_HASH_TYPE_TCPV6 (1u << 4)
#define VN_HASH_TYPE_UDPV6 (1u << 5)
#define VN_HASH_TYPES_SUPPORTED 0x3fu

/* VIRTIO_NET_HASH_REPORT_* (hash_report in the header). */
enum vn_hash_report {
    VN_HASH_REPORT_NONE = 0,
    VN_HASH_REPORT_IPV4 = 1,
    VN_HASH_REPORT_TCPV4 = 2,
    VN_HASH_REPORT_UDPV4 = 3,
    VN_HASH_REPORT_IPV6 = 4,
    VN_HASH_REPORT_TCPV6 = 5,
    VN_HASH_REPORT_UDPV6 = 6,
};

uint32_t vn_toeplitz(const uint8_t *key, size_t key_len, const uint8_t *data, size_t len);

/* The fields a hash is computed over, in Toeplitz input order (source address,
 * destination address, source port, destination port), as found in a frame. */
struct vn_flow_tuple {
    uint8_t family;     /* 4, 6, or 0 when not IP */
    uint8_t l4;         /* IPPROTO_TCP / IPPROTO_UDP when ports are valid, else 0 */
    uint8_t addr_len;   /* 4 or 16 */
    uint8_t src[16], dst[16];
    uint8_t sport[2], dport[2];
};

/* Parse an Ethernet frame (up to two VLAN tags, IPv4 without fragments for
 * ports, IPv6 with TCP/UDP as next header). Never reads past len. */
void vn_flow_parse(const uint8_t *frame, size_t len, struct vn_flow_tuple *t);

/* Hash of the tuple for the enabled types; *report says which type was used
 * (VN_HASH_REPORT_NONE and 0 when none applies). */
uint32_t vn_rss_hash(const struct vn_flow_tuple *t, uint32_t types, const uint8_t *key,
                     size_t key_len, uint8_t *report);

#endif
