#include "rss_hash.h"

#include <netinet/in.h>
#include <string.h>

uint32_t vn_toeplitz(const uint8_t *key, size_t key_len, const uint8_t *data, size_t len)
{
    /* Input bit n (most significant first) selects the 32 key bits from key
     * bit n on. w holds the 64 key bits from the current byte's first bit
     * (zeros past the key): the window of the byte's bit at offset j is its
     * top 32 bits shifted by j. Only set input bits cost anything. */
    if (key_len < 4)
        return 0;
    uint64_t w = 0;
    for (size_t k = 0; k < 8; k++)
        w = w << 8 | (k < key_len ? key[k] : 0u);
    uint32_t result = 0;
    for (size_t i = 0; i < len; i++) {
        for (unsigned d = data[i]; d != 0; d &= d - 1) {
            unsigned j = 7u - (unsigned)__builtin_ctz(d);
            result ^= (uint32_t)(w >> (32u - j));
        }
        w = w << 8 | (i + 8 < key_len ? key[i + 8] : 0u);
    }
    return result;
}

void vn_flow_parse(const uint8_t *f, size_t len, struct vn_flow_tuple *t)
{
    memset(t, 0, sizeof(*t));
    size_t off = 12;
    if (len < 14)
        return;
    uint16_t type = (uint16_t)(f[off] << 8 | f[off + 1]);
    off += 2;
    for (int tags = 0; (type == 0x8100 || type == 0x88a8) && tags < 2; tags++) {
        if (len < off + 4)
            return;
        type = (uint16_t)(f[off + 2] << 8 | f[off + 3]);
        off += 4;
    }
    size_t l4off;
    uint8_t proto;
    if (type == 0x0800) {
        if (len < off + 20)
            return;
        const uint8_t *ip = f + off;
        size_t ihl = (size_t)(ip[0] & 0x0f) * 4;
        if ((ip[0] >> 4) != 4 || ihl < 20 || len < off + ihl)
            return;
        t->family = 4;
        t->addr_len = 4;
        memcpy(t->src, ip + 12, 4);
        memcpy(t->dst, ip + 16, 4);
        /* Only the first fragment carries ports, and not reliably: none. */
        if ((ip[6] & 0x3f) != 0 || ip[7] != 0)
            return;
        proto = ip[9];
        l4off = off + ihl;
    } else if (type == 0x86dd) {
        if (len < off + 40)
            return;
        const uint8_t *ip = f + off;
        if ((ip[0] >> 4) != 6)
            return;
        t->family = 6;
        t->addr_len = 16;
        memcpy(t->src, ip + 8, 16);
        memcpy(t->dst, ip + 24, 16);
        proto = ip[6];
        l4off = off + 40;
    } else {
        return;
    }
    if ((proto == IPPROTO_TCP || proto == IPPROTO_UDP) && len >= l4off + 4) {
        t->l4 = proto;
        memcpy(t->sport, f + l4off, 2);
        memcpy(t->dport, f + l4off + 2, 2);
    }
}

uint32_t vn_rss_hash(const struct vn_flow_tuple *t, uint32_t types, const uint8_t *key,
                     size_t key_len, uint8_t *report)
{
    uint8_t in[36];
    size_t n = 0;
    *report = VN_HASH_REPORT_NONE;
    if (t->family == 0)
        return 0;
    bool v4 = t->family == 4;
    uint32_t tcp = v4 ? VN_HASH_TYPE_TCPV4 : VN_HASH_TYPE_TCPV6;
    uint32_t udp = v4 ? VN_HASH_TYPE_UDPV4 : VN_HASH_TYPE_UDPV6;
    uint32_t ip = v4 ? VN_HASH_TYPE_IPV4 : VN_HASH_TYPE_IPV6;
    memcpy(in, t->src, t->addr_len);
    memcpy(in + t->addr_len, t->dst, t->addr_len);
    n = 2 * (size_t)t->addr_len;
    if ((t->l4 == IPPROTO_TCP && (types & tcp)) || (t->l4 == IPPROTO_UDP && (types & udp))) {
        memcpy(in + n, t->sport, 2);
        memcpy(in + n + 2, t->dport, 2);
        n += 4;
        if (t->l4 == IPPROTO_TCP)
            *report = v4 ? VN_HASH_REPORT_TCPV4 : VN_HASH_REPORT_TCPV6;
        else
            *report = v4 ? VN_HASH_REPORT_UDPV4 : VN_HASH_REPORT_UDPV6;
    } else if (types & ip) {
        *report = v4 ? VN_HASH_REPORT_IPV4 : VN_HASH_REPORT_IPV6;
    } else {
        return 0;
    }
    return vn_toeplitz(key, key_len, in, n);
}
