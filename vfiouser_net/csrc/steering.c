#include "steering.h"

#include <limits.h>
#include <string.h>
#include <time.h>

#include "le.h"

static const char *const policy_names[VN_POLICY__COUNT] = {
    [VN_POLICY_AUTO] = "auto",
    [VN_POLICY_SINGLE] = "single",
    [VN_POLICY_RSS] = "rss",
    [VN_POLICY_RX_FOLLOWS_TX] = "rx-follows-tx",
};

const char *vn_policy_name(int policy)
{
    return policy >= 0 && policy < VN_POLICY__COUNT ? policy_names[policy] : "unknown";
}

void vn_steering_reset(struct vn_steering *s)
{
    memset(&s->rss, 0, sizeof(s->rss));
    for (unsigned i = 0; i < VN_FLOW_TABLE_SIZE; i++)
        atomic_store_explicit(&s->flows[i], 0, memory_order_relaxed);
}

void vn_steering_set_rss(struct vn_steering *s, const struct vn_rss_config *cfg)
{
    s->rss = *cfg;
}

void vn_steering_set_policy(struct vn_steering *s, int policy)
{
    s->policy = policy;
}

int vn_steering_effective(const struct vn_steering *s)
{
    if (s->policy == VN_POLICY_AUTO)
        return s->rss.configured ? VN_POLICY_RSS : VN_POLICY_RX_FOLLOWS_TX;
    if (s->policy == VN_POLICY_RSS && !s->rss.configured)
        return VN_POLICY_SINGLE; /* RSS with no table from the guest: pair 0 */
    return s->policy;
}

static uint16_t now_ticks(void)
{
    /* 1/16 s ticks: 16 bits last about 68 minutes, far beyond the expiry. */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint16_t)((uint64_t)ts.tv_sec * 16 + (uint64_t)ts.tv_nsec / 62500000);
}

#define EXPIRY_TICKS (VN_FLOW_EXPIRY_MS * 16 / 1000)

/* The flow table's own hash: never shown to the guest, so not Toeplitz
 * (which costs a loop per input bit on every transmitted frame), just a
 * multiply-xorshift mix of the addresses, ports and protocol. */
static uint32_t flow_hash(const struct vn_flow_tuple *t)
{
    uint64_t h = 0x9e3779b97f4a7c15ull ^ ((uint64_t)t->family << 8 | t->l4);
    uint8_t words[40];
    size_t n = 2 * (size_t)t->addr_len;
    memcpy(words, t->src, t->addr_len);
    memcpy(words + t->addr_len, t->dst, t->addr_len);
    memcpy(words + n, t->sport, 2);
    memcpy(words + n + 2, t->dport, 2);
    n += 4;
    for (size_t i = 0; i < n; i += 4) {
        uint32_t w;
        memcpy(&w, words + i, 4);
        h = (h ^ w) * 0xff51afd7ed558ccdull;
        h ^= h >> 32;
    }
    return (uint32_t)h;
}

static void swap_tuple(struct vn_flow_tuple *t)
{
    uint8_t tmp[16];
    memcpy(tmp, t->src, 16);
    memcpy(t->src, t->dst, 16);
    memcpy(t->dst, tmp, 16);
    uint8_t p[2];
    memcpy(p, t->sport, 2);
    memcpy(t->sport, t->dport, 2);
    memcpy(t->dport, p, 2);
}

void vn_steer_learn_tx(struct vn_steering *s, const uint8_t *frame, size_t len, unsigned txq)
{
    struct vn_flow_tuple t;
    vn_flow_parse(frame, len, &t);
    if (t.family == 0)
        return;
    swap_tuple(&t); /* key the flow as its replies will look */
    uint32_t h = flow_hash(&t);
    uint64_t e = (uint64_t)h << 32 | (uint64_t)(txq & 0xffff) << 16 | now_ticks();
    _Atomic uint64_t *slot = &s->flows[h & (VN_FLOW_TABLE_SIZE - 1)];
    /* Skip the store while the entry is fresh and unchanged: no cache line
     * ping-pong between workers for every packet of a flow. */
    uint64_t old = atomic_load_explicit(slot, memory_order_relaxed);
    if ((old & ~0xffffull) == (e & ~0xffffull) && (uint16_t)(e - old) < EXPIRY_TICKS / 4)
        return;
    atomic_store_explicit(slot, e, memory_order_relaxed);
}

unsigned vn_steer_rx(struct vn_steering *s, const uint8_t *frame, size_t len, unsigned active,
                     uint32_t *hash, uint8_t *report)
{
    return vn_steer_rx_read(s, frame, len, active, UINT_MAX, hash, report);
}

unsigned vn_steer_rx_read(struct vn_steering *s, const uint8_t *frame, size_t len,
                          unsigned active, unsigned reader, uint32_t *hash, uint8_t *report)
{
    struct vn_flow_tuple t;
    vn_flow_parse(frame, len, &t);
    const struct vn_rss_config *rss = &s->rss;
    *hash = rss->key_len ? vn_rss_hash(&t, rss->hash_types, rss->key, rss->key_len, report) : 0;
    if (rss->key_len == 0)
        *report = VN_HASH_REPORT_NONE;
    if (active <= 1)
        return 0;
    switch (vn_steering_effective(s)) {
    case VN_POLICY_RSS: {
        unsigned q = *report == VN_HASH_REPORT_NONE ? rss->unclassified
                                                    : rss->table[*hash & (rss->table_len - 1u)];
        return q < active ? q : q % active;
    }
    case VN_POLICY_RX_FOLLOWS_TX: {
        if (t.family == 0)
            return 0;
        uint32_t h = flow_hash(&t);
        uint64_t e = atomic_load_explicit(&s->flows[h & (VN_FLOW_TABLE_SIZE - 1)],
                                          memory_order_relaxed);
        if (e != 0 && (uint32_t)(e >> 32) == h && (uint16_t)(now_ticks() - e) < EXPIRY_TICKS) {
            unsigned q = (unsigned)(e >> 16) & 0xffff;
            if (q < active)
                return q;
        }
        return reader < active ? reader : h % active;
    }
    default:
        return 0;
    }
}

int vn_rss_config_parse(const uint8_t *d, uint32_t len, unsigned max_pairs,
                        struct vn_rss_config *out, uint16_t *max_tx_vq)
{
    /* le32 hash_types; le16 indirection_table_mask; le16 unclassified_queue;
     * le16 indirection_table[mask + 1]; le16 max_tx_vq; u8 hash_key_length;
     * u8 hash_key_data[hash_key_length]; */
    if (len < 8)
        return -1;
    uint32_t types = vn_le32_get(d);
    uint32_t table_len = (uint32_t)vn_le16_get(d + 4) + 1;
    uint16_t unclassified = vn_le16_get(d + 6);
    if ((types & ~VN_HASH_TYPES_SUPPORTED) != 0 || table_len > VN_RSS_MAX_TABLE ||
        (table_len & (table_len - 1)) != 0 || unclassified >= max_pairs)
        return -1;
    uint32_t off = 8 + 2 * table_len;
    if (len < off + 3)
        return -1;
    memset(out, 0, sizeof(*out));
    for (uint32_t i = 0; i < table_len; i++) {
        out->table[i] = vn_le16_get(d + 8 + 2 * i);
        if (out->table[i] >= max_pairs)
            return -1;
    }
    uint16_t tx = vn_le16_get(d + off);
    uint8_t key_len = d[off + 2];
    /* Trailing bytes are allowed: Linux 6.12 sends its trailer structure
     * whole (room for a 40-byte key plus padding) whatever the key length. */
    if (tx == 0 || tx > max_pairs || key_len > VN_RSS_MAX_KEY_SIZE || len < off + 3 + key_len)
        return -1;
    out->configured = true;
    out->hash_types = types;
    out->table_len = (uint16_t)table_len;
    out->unclassified = unclassified;
    out->key_len = key_len;
    memcpy(out->key, d + off + 3, key_len);
    *max_tx_vq = tx;
    return 0;
}

int vn_hash_config_parse(const uint8_t *d, uint32_t len, struct vn_rss_config *out)
{
    /* le32 hash_types; le16 reserved[4]; u8 hash_key_length; u8 hash_key_data[]; */
    if (len < 13)
        return -1;
    uint32_t types = vn_le32_get(d);
    uint8_t key_len = d[12];
    if ((types & ~VN_HASH_TYPES_SUPPORTED) != 0 || key_len > VN_RSS_MAX_KEY_SIZE ||
        len < 13u + key_len)
        return -1;
    memset(out, 0, sizeof(*out));
    out->hash_types = types;
    out->table_len = 1;
    out->key_len = key_len;
    memcpy(out->key, d + 13, key_len);
    return 0;
}
