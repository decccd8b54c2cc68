/* libFuzzer target: the frame parser, the Toeplitz hash and the steering
 * decisions (rss_hash.c, steering.c) on arbitrary frames, with RSS and hash
 * configurations parsed from the input as RSS_CONFIG / HASH_CONFIG data.
 *
 * Input:
 *   u8   policy (% 4: auto, single, rss, rx-follows-tx)
 *   u8   active pairs - 1 (% 16: 1..16)
 *   u8   bit 0 the configuration is HASH_CONFIG data (else RSS_CONFIG),
 *        bits 4-7 the queue the guest sent the frame on (rx-follows-tx)
 *   le16 n, then n bytes of configuration data
 *   the frame (Ethernet, no virtio-net header), to the end
 *
 * Checked: the parser never reads past the frame (it is a heap copy of
 * exactly its length) and gives a consistent tuple; accepted configurations
 * are within bounds; the hash is the Toeplitz function of the tuple (a
 * second, bit-by-bit implementation) with the report that matches the
 * enabled types; every steering decision names an active pair; and a flow
 * the guest sent on a queue has its replies steered to that queue under
 * rx-follows-tx. */
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "rss_hash.h"
#include "steering.h"

/* Toeplitz by the definition: for every set input bit i (most significant
 * first), XOR in the 32 key bits starting at bit i (zero past the key). */
static uint32_t ref_toeplitz(const uint8_t *key, size_t key_len, const uint8_t *in, size_t len)
{
    uint32_t h = 0;
    for (size_t i = 0; i < 8 * len; i++) {
        if (!(in[i / 8] & (0x80u >> (i % 8))))
            continue;
        uint32_t w = 0;
        for (size_t b = 0; b < 32; b++) {
            size_t k = i + b;
            unsigned bit = k / 8 < key_len ? (key[k / 8] >> (7 - k % 8)) & 1u : 0;
            w = w << 1 | bit;
        }
        h ^= w;
    }
    return h;
}

static void check_tuple(const struct vn_flow_tuple *t)
{
    FZ_CHECK(t->family == 0 || t->family == 4 || t->family == 6, "family %u", t->family);
    if (t->family == 0) {
        FZ_CHECK(t->l4 == 0 && t->addr_len == 0, "not IP but l4 %u addr_len %u", t->l4,
                 t->addr_len);
        return;
    }
    FZ_CHECK(t->addr_len == (t->family == 4 ? 4 : 16), "family %u addr_len %u", t->family,
             t->addr_len);
    FZ_CHECK(t->l4 == 0 || t->l4 == IPPROTO_TCP || t->l4 == IPPROTO_UDP, "l4 %u", t->l4);
}

static void check_hash(const struct vn_flow_tuple *t, uint32_t types, const uint8_t *key,
                       size_t key_len)
{
    uint8_t report = 0xff;
    uint32_t h = vn_rss_hash(t, types, key, key_len, &report);
    if (t->family == 0) {
        FZ_CHECK(report == VN_HASH_REPORT_NONE && h == 0, "hash of a non-IP frame");
        return;
    }
    bool v4 = t->family == 4;
    uint32_t ip = v4 ? VN_HASH_TYPE_IPV4 : VN_HASH_TYPE_IPV6;
    uint32_t tcp = v4 ? VN_HASH_TYPE_TCPV4 : VN_HASH_TYPE_TCPV6;
    uint32_t udp = v4 ? VN_HASH_TYPE_UDPV4 : VN_HASH_TYPE_UDPV6;
    bool ports = (t->l4 == IPPROTO_TCP && (types & tcp)) || (t->l4 == IPPROTO_UDP && (types & udp));
    uint8_t want;
    if (ports)
        want = t->l4 == IPPROTO_TCP ? (v4 ? VN_HASH_REPORT_TCPV4 : VN_HASH_REPORT_TCPV6)
                                    : (v4 ? VN_HASH_REPORT_UDPV4 : VN_HASH_REPORT_UDPV6);
    else if (types & ip)
        want = v4 ? VN_HASH_REPORT_IPV4 : VN_HASH_REPORT_IPV6;
    else
        want = VN_HASH_REPORT_NONE;
    FZ_CHECK(report == want, "report %u, expected %u (types 0x%x, family %u, l4 %u)", report, want,
             types, t->family, t->l4);
    if (want == VN_HASH_REPORT_NONE) {
        FZ_CHECK(h == 0, "hash 0x%x without a type", h);
        return;
    }
    uint8_t in[36];
    size_t n = 0;
    memcpy(in, t->src, t->addr_len);
    memcpy(in + t->addr_len, t->dst, t->addr_len);
    n = 2u * t->addr_len;
    if (ports) {
        memcpy(in + n, t->sport, 2);
        memcpy(in + n + 2, t->dport, 2);
        n += 4;
    }
    uint32_t ref = key_len >= 4 ? ref_toeplitz(key, key_len, in, n) : 0;
    FZ_CHECK(h == ref, "hash 0x%08x, Toeplitz gives 0x%08x (key %zu bytes)", h, ref, key_len);
}

/* A frame of the reverse direction of tuple t (addresses and ports swapped). */
static size_t reverse_frame(const struct vn_flow_tuple *t, uint8_t *f)
{
    memset(f, 0, 14 + 40 + 8);
    f[0] = 0x52;
    f[6] = 0x02;
    size_t l4;
    uint8_t proto = t->l4 != 0 ? t->l4 : 1 /* ICMP: no ports */;
    if (t->family == 4) {
        f[12] = 0x08;
        f[14] = 0x45;
        f[14 + 9] = proto;
        memcpy(f + 14 + 12, t->dst, 4);
        memcpy(f + 14 + 16, t->src, 4);
        l4 = 14 + 20;
    } else {
        f[12] = 0x86;
        f[13] = 0xdd;
        f[14] = 0x60;
        f[14 + 6] = proto;
        memcpy(f + 14 + 8, t->dst, 16);
        memcpy(f + 14 + 24, t->src, 16);
        l4 = 14 + 40;
    }
    memcpy(f + l4, t->dport, 2);
    memcpy(f + l4 + 2, t->sport, 2);
    return l4 + 8;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct vn_steering s;
    struct fz_in in = { data, size };
    int policy = fz_u8(&in) % 4;
    unsigned active = 1u + fz_u8(&in) % 16;
    uint8_t opt = fz_u8(&in);
    unsigned txq = opt >> 4;
    size_t cfg_len;
    const uint8_t *cfg_in = fz_bytes(&in, fz_u16(&in), &cfg_len);
    /* Heap copies of exactly their length. */
    uint8_t *cfg = malloc(cfg_len ? cfg_len : 1);
    uint8_t *frame = malloc(in.n ? in.n : 1);
    FZ_CHECK(cfg != NULL && frame != NULL, "malloc");
    memcpy(cfg, cfg_in, cfg_len);
    size_t len = in.n;
    memcpy(frame, in.p, len);

    s.policy = policy;
    vn_steering_reset(&s);
    struct vn_rss_config rc;
    memset(&rc, 0, sizeof(rc));
    if (opt & 1) {
        if (vn_hash_config_parse(cfg, (uint32_t)cfg_len, &rc) == 0) {
            FZ_CHECK(!rc.configured && rc.key_len <= VN_RSS_MAX_KEY_SIZE &&
                         (rc.hash_types & ~VN_HASH_TYPES_SUPPORTED) == 0 && cfg_len >= 13u + rc.key_len,
                     "hash config");
            s.rss = rc;
        }
    } else {
        uint16_t tx = 0;
        if (vn_rss_config_parse(cfg, (uint32_t)cfg_len, active, &rc, &tx) == 0) {
            FZ_CHECK(rc.configured && rc.key_len <= VN_RSS_MAX_KEY_SIZE &&
                         (rc.hash_types & ~VN_HASH_TYPES_SUPPORTED) == 0 && rc.table_len >= 1 &&
                         rc.table_len <= VN_RSS_MAX_TABLE && (rc.table_len & (rc.table_len - 1)) == 0 &&
                         rc.unclassified < active && tx >= 1 && tx <= active,
                     "rss config: table %u unclassified %u tx %u of %u", rc.table_len,
                     rc.unclassified, tx, active);
            for (unsigned i = 0; i < rc.table_len; i++)
                FZ_CHECK(rc.table[i] < active, "table[%u] = %u", i, rc.table[i]);
            FZ_CHECK(cfg_len >= 8u + 2u * rc.table_len + 3u + rc.key_len, "config of %zu bytes",
                     cfg_len);
            s.rss = rc;
        }
    }

    struct vn_flow_tuple t;
    vn_flow_parse(frame, len, &t);
    check_tuple(&t);
    check_hash(&t, s.rss.hash_types, s.rss.key, s.rss.key_len);
    check_hash(&t, VN_HASH_TYPES_SUPPORTED, s.rss.key, s.rss.key_len);
    check_hash(&t, opt & VN_HASH_TYPES_SUPPORTED, cfg, cfg_len > 40 ? 40 : cfg_len);

    for (unsigned a = 1; a <= active; a += active > 1 ? active - 1 : 1) {
        uint32_t hash;
        uint8_t report;
        unsigned q = vn_steer_rx(&s, frame, len, a, &hash, &report);
        FZ_CHECK(q < a, "steered to %u of %u", q, a);
        if (s.rss.key_len == 0)
            FZ_CHECK(report == VN_HASH_REPORT_NONE && hash == 0, "a hash without a key");
    }

    vn_steer_learn_tx(&s, frame, len, txq);
    if (t.family != 0 && vn_steering_effective(&s) == VN_POLICY_RX_FOLLOWS_TX) {
        uint8_t rf[14 + 40 + 8];
        size_t rlen = reverse_frame(&t, rf);
        struct vn_flow_tuple rt;
        vn_flow_parse(rf, rlen, &rt);
        FZ_CHECK(rt.family == t.family && rt.l4 == t.l4, "reverse frame parsed as %u/%u", rt.family,
                 rt.l4);
        uint32_t hash;
        uint8_t report;
        unsigned q = vn_steer_rx(&s, rf, rlen, active, &hash, &report);
        if (txq < active && active > 1)
            FZ_CHECK(q == txq, "reply steered to %u, the flow was sent on %u", q, txq);
    }
    free(cfg);
    free(frame);
    return 0;
}
