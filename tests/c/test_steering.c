/* The steering engine (steering.c) and the RSS hash (rss_hash.c):
 *  - RSS_CONFIG / HASH_CONFIG parsing, every malformation refused, every
 *    truncation refused, each request flush against a guard page so that a
 *    read past its end crashes; trailing padding accepted (Linux 6.12 sends
 *    its whole trailer structure);
 *  - the effective policy for each configured policy, with and without RSS;
 *  - vn_steer_rx for SINGLE, RSS (queue and hash checked against a Toeplitz
 *    written here from the definition, and against the published RSS
 *    verification vectors) and RX_FOLLOWS_TX (learning, spreading, expiry);
 *  - frame parsing (VLAN tags, fragments, IP options, truncation). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include <cmocka.h>

#include "fake_driver.h"
#include "le.h"
#include "rss_hash.h"
#include "steering.h"

/* The RSS verification key (also what Linux uses by default). */
static const uint8_t MS_KEY[40] = {
    0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3,
    0x8f, 0xb0, 0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3,
    0x80, 0x30, 0xf2, 0x0c, 0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
};

/* Another key, so nothing passes by matching the steering engine's own. */
static const uint8_t KEY2[40] = {
    0x3c, 0x91, 0x07, 0xe2, 0x5f, 0xa8, 0x14, 0x6b, 0xd3, 0x20, 0x8e, 0x77, 0x01, 0xc4,
    0x9a, 0x5d, 0xb6, 0x2f, 0x48, 0xe1, 0x73, 0x0c, 0xfd, 0x96, 0x2a, 0x65, 0xbe, 0x18,
    0x87, 0x4e, 0xd0, 0x39, 0xa2, 0x6f, 0x15, 0xcb, 0x50, 0xee, 0x04, 0x7a,
};

#define PROTO_TCP 6
#define PROTO_UDP 17
#define PROTO_ICMP 1

/* ---- a buffer flush against a guard page --------------------------------- */

#define GUARD_PAGES 2
static uint8_t *guard_map;

static int group_setup(void **state)
{
    (void)state;
    guard_map = mmap(NULL, (GUARD_PAGES + 1) * FD_PAGE, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (guard_map == MAP_FAILED)
        return -1;
    return mprotect(guard_map + GUARD_PAGES * FD_PAGE, FD_PAGE, PROT_NONE);
}

static int group_teardown(void **state)
{
    (void)state;
    munmap(guard_map, (GUARD_PAGES + 1) * FD_PAGE);
    return 0;
}

/* A copy of src[0..len) ending exactly at the guard page. */
static const uint8_t *guarded(const void *src, size_t len)
{
    assert_true(len <= GUARD_PAGES * FD_PAGE);
    uint8_t *p = guard_map + GUARD_PAGES * FD_PAGE - len;
    memcpy(p, src, len);
    return p;
}

/* ---- reference Toeplitz, from the definition ----------------------------- */

static unsigned key_bit(const uint8_t *key, size_t key_len, size_t bit)
{
    size_t byte = bit / 8;
    if (byte >= key_len)
        return 0; /* the key is zero past its end */
    return (key[byte] >> (7 - bit % 8)) & 1u;
}

/* For each set input bit i (most significant first), XOR in the 32 key bits
 * starting at key bit i. */
static uint32_t ref_toeplitz(const uint8_t *key, size_t key_len, const uint8_t *in, size_t n)
{
    uint32_t r = 0;
    for (size_t i = 0; i < 8 * n; i++) {
        if (!((in[i / 8] >> (7 - i % 8)) & 1u))
            continue;
        uint32_t window = 0;
        for (size_t k = 0; k < 32; k++)
            window = window << 1 | key_bit(key, key_len, i + k);
        r ^= window;
    }
    return r;
}

/* ---- frames -------------------------------------------------------------- */

struct flow {
    int family;              /* 4 or 6 */
    uint8_t proto;
    uint8_t src[16], dst[16];
    uint16_t sport, dport;
};

static void put16be(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

/* An Ethernet frame for the flow: vlans tags (0, 1 or 2), IPv4 with
 * `opt_words` option words and fragment field `frag`, or IPv6; then 20
 * bytes of L4 header. Returns its length. */
static size_t make_frame_ex(uint8_t *out, const struct flow *fl, unsigned vlans, unsigned opt_words,
                            uint16_t frag)
{
    size_t off = 0;
    memset(out, 0, 256);
    memcpy(out, (uint8_t[6]){ 0x52, 0x54, 0, 0, 0, 1 }, 6);
    memcpy(out + 6, (uint8_t[6]){ 0x02, 0, 0, 0, 0, 2 }, 6);
    off = 12;
    for (unsigned v = 0; v < vlans; v++) {
        put16be(out + off, v == 0 && vlans == 2 ? 0x88a8 : 0x8100);
        put16be(out + off + 2, (uint16_t)(100 + v));
        off += 4;
    }
    if (fl->family == 4) {
        put16be(out + off, 0x0800);
        off += 2;
        uint8_t *ip = out + off;
        size_t ihl = 20 + 4 * (size_t)opt_words;
        ip[0] = (uint8_t)(0x40 | ihl / 4);
        put16be(ip + 2, (uint16_t)(ihl + 20));
        put16be(ip + 6, frag);
        ip[8] = 64;
        ip[9] = fl->proto;
        memcpy(ip + 12, fl->src, 4);
        memcpy(ip + 16, fl->dst, 4);
        for (size_t i = 20; i < ihl; i++)
            ip[i] = 1; /* NOP options */
        off += ihl;
    } else {
        put16be(out + off, 0x86dd);
        off += 2;
        uint8_t *ip = out + off;
        ip[0] = 0x60;
        put16be(ip + 4, 20);
        ip[6] = fl->proto;
        ip[7] = 64;
        memcpy(ip + 8, fl->src, 16);
        memcpy(ip + 24, fl->dst, 16);
        off += 40;
    }
    put16be(out + off, fl->sport);
    put16be(out + off + 2, fl->dport);
    off += 20;
    return off;
}

static size_t make_frame(uint8_t *out, const struct flow *fl)
{
    return make_frame_ex(out, fl, 0, 0, 0);
}

static struct flow flow4(uint8_t proto, uint32_t src, uint32_t dst, uint16_t sport, uint16_t dport)
{
    struct flow f = { .family = 4, .proto = proto, .sport = sport, .dport = dport };
    for (int i = 0; i < 4; i++) {
        f.src[i] = (uint8_t)(src >> (24 - 8 * i));
        f.dst[i] = (uint8_t)(dst >> (24 - 8 * i));
    }
    return f;
}

static struct flow flow6(uint8_t proto, uint8_t src_last, uint8_t dst_last, uint16_t sport,
                         uint16_t dport)
{
    struct flow f = { .family = 6, .proto = proto, .sport = sport, .dport = dport };
    static const uint8_t prefix[8] = { 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 1 };
    memcpy(f.src, prefix, 8);
    memcpy(f.dst, prefix, 8);
    f.src[15] = src_last;
    f.dst[15] = dst_last;
    f.src[9] = 0x42;
    return f;
}

static struct flow reversed(const struct flow *f)
{
    struct flow r = *f;
    memcpy(r.src, f->dst, 16);
    memcpy(r.dst, f->src, 16);
    r.sport = f->dport;
    r.dport = f->sport;
    return r;
}

/* The expected hash of a flow for the enabled types, from the definition
 * (virtio 5.1.6.4.3): ports only with the L4 type of the flow's protocol
 * enabled, else addresses with the IP type enabled, else no hash. */
static uint32_t expected_hash(const struct flow *f, uint32_t types, const uint8_t *key,
                              size_t key_len, uint8_t *report)
{
    bool v4 = f->family == 4;
    size_t alen = v4 ? 4 : 16;
    uint8_t in[36];
    memcpy(in, f->src, alen);
    memcpy(in + alen, f->dst, alen);
    size_t n = 2 * alen;
    bool tcp = f->proto == PROTO_TCP && (types & (v4 ? VN_HASH_TYPE_TCPV4 : VN_HASH_TYPE_TCPV6));
    bool udp = f->proto == PROTO_UDP && (types & (v4 ? VN_HASH_TYPE_UDPV4 : VN_HASH_TYPE_UDPV6));
    if (tcp || udp) {
        put16be(in + n, f->sport);
        put16be(in + n + 2, f->dport);
        n += 4;
        *report = tcp ? (v4 ? VN_HASH_REPORT_TCPV4 : VN_HASH_REPORT_TCPV6)
                      : (v4 ? VN_HASH_REPORT_UDPV4 : VN_HASH_REPORT_UDPV6);
    } else if (types & (v4 ? VN_HASH_TYPE_IPV4 : VN_HASH_TYPE_IPV6)) {
        *report = v4 ? VN_HASH_REPORT_IPV4 : VN_HASH_REPORT_IPV6;
    } else {
        *report = VN_HASH_REPORT_NONE;
        return 0;
    }
    return ref_toeplitz(key, key_len, in, n);
}

static const uint8_t ARP_FRAME[42] = {
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 2, 0x08, 0x06,
    0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01,
};

/* ---- RSS_CONFIG / HASH_CONFIG requests ----------------------------------- */

struct rss_req {
    uint32_t types;
    uint16_t mask;
    uint16_t unclassified;
    unsigned n_table;          /* entries written (normally mask + 1) */
    uint16_t table[512];
    uint16_t max_tx;
    uint8_t key_len;           /* the field */
    unsigned key_bytes;        /* key bytes written (normally key_len) */
    unsigned pad;              /* trailing bytes */
};

static size_t rss_build(uint8_t *out, const struct rss_req *r)
{
    size_t off = 0;
    vn_le32_put(out, r->types);
    vn_le16_put(out + 4, r->mask);
    vn_le16_put(out + 6, r->unclassified);
    off = 8;
    for (unsigned i = 0; i < r->n_table; i++, off += 2)
        vn_le16_put(out + off, r->table[i]);
    vn_le16_put(out + off, r->max_tx);
    out[off + 2] = r->key_len;
    off += 3;
    for (unsigned i = 0; i < r->key_bytes; i++)
        out[off++] = i < sizeof(KEY2) ? KEY2[i] : (uint8_t)(0xa0 + i);
    for (unsigned i = 0; i < r->pad; i++)
        out[off++] = 0x5a;
    return off;
}

/* A valid request: 4 pairs, 8-entry table, 40-byte key, every type. */
static struct rss_req rss_valid(void)
{
    struct rss_req r = {
        .types = VN_HASH_TYPES_SUPPORTED,
        .mask = 7,
        .unclassified = 2,
        .n_table = 8,
        .table = { 3, 1, 2, 0, 1, 3, 0, 2 },
        .max_tx = 4,
        .key_len = 40,
        .key_bytes = 40,
    };
    return r;
}

static int rss_parse(const struct rss_req *r, unsigned max_pairs, struct vn_rss_config *cfg,
                     uint16_t *tx)
{
    static uint8_t buf[2048];
    size_t len = rss_build(buf, r);
    return vn_rss_config_parse(guarded(buf, len), (uint32_t)len, max_pairs, cfg, tx);
}

static void expect_rss_refused(const struct rss_req *r, unsigned max_pairs)
{
    struct vn_rss_config cfg;
    uint16_t tx = 0x7777;
    assert_int_equal(rss_parse(r, max_pairs, &cfg, &tx), -1);
    assert_int_equal(tx, 0x7777);
}

static void test_toeplitz_reference(void **state)
{
    (void)state;
    /* The reference against the published verification vectors. */
    uint8_t in4[12] = { 66, 9, 149, 187, 161, 142, 100, 80 };
    put16be(in4 + 8, 2794);
    put16be(in4 + 10, 1766);
    assert_int_equal(ref_toeplitz(MS_KEY, 40, in4, 8), 0x323e8fc2);
    assert_int_equal(ref_toeplitz(MS_KEY, 40, in4, 12), 0x51ccc178);
    uint8_t in6[36] = { 0x3f, 0xfe, 0x25, 0x01, 0x02, 0x00, 0x1f, 0xff, 0, 0, 0, 0, 0, 0, 0, 7,
                        0x3f, 0xfe, 0x25, 0x01, 0x02, 0x00, 0x00, 0x03, 0, 0, 0, 0, 0, 0, 0, 1 };
    put16be(in6 + 32, 2794);
    put16be(in6 + 34, 1766);
    assert_int_equal(ref_toeplitz(MS_KEY, 40, in6, 32), 0x2cc18cd5);
    assert_int_equal(ref_toeplitz(MS_KEY, 40, in6, 36), 0x40207d3d);
    /* And vn_toeplitz against the reference: random inputs, every input
     * length up to 36, keys of 4 to 40 bytes (zero past their end). */
    srand(1234);
    for (int round = 0; round < 400; round++) {
        uint8_t in[36];
        size_t n = (size_t)round % 37;
        size_t key_len = 4 + (size_t)(round * 7) % 37;
        for (size_t i = 0; i < n; i++)
            in[i] = (uint8_t)rand();
        const uint8_t *key = round % 2 ? MS_KEY : KEY2;
        uint32_t want = ref_toeplitz(key, key_len, in, n);
        if (vn_toeplitz(key, key_len, in, n) != want)
            fail_msg("vn_toeplitz differs (round %d, %zu bytes, key %zu)", round, n, key_len);
    }
}

static void test_rss_parse_valid(void **state)
{
    (void)state;
    struct rss_req r = rss_valid();
    struct vn_rss_config cfg;
    uint16_t tx = 0;
    assert_int_equal(rss_parse(&r, 4, &cfg, &tx), 0);
    assert_int_equal(tx, 4);
    assert_true(cfg.configured);
    assert_int_equal(cfg.hash_types, VN_HASH_TYPES_SUPPORTED);
    assert_int_equal(cfg.table_len, 8);
    assert_int_equal(cfg.unclassified, 2);
    for (unsigned i = 0; i < 8; i++)
        assert_int_equal(cfg.table[i], r.table[i]);
    assert_int_equal(cfg.key_len, 40);
    assert_memory_equal(cfg.key, KEY2, 40);

    /* The smallest: one entry, one pair, a short key, one type. */
    struct rss_req s = { .types = VN_HASH_TYPE_IPV4, .mask = 0, .n_table = 1, .max_tx = 1,
                         .key_len = 4, .key_bytes = 4 };
    assert_int_equal(rss_parse(&s, 1, &cfg, &tx), 0);
    assert_int_equal(tx, 1);
    assert_int_equal(cfg.table_len, 1);
    assert_int_equal(cfg.table[0], 0);
    assert_int_equal(cfg.key_len, 4);
    assert_int_equal(cfg.hash_types, VN_HASH_TYPE_IPV4);

    /* The largest table, entries up to the last pair, max_tx_vq = max. */
    struct rss_req big = rss_valid();
    big.mask = VN_RSS_MAX_TABLE - 1;
    big.n_table = VN_RSS_MAX_TABLE;
    for (unsigned i = 0; i < VN_RSS_MAX_TABLE; i++)
        big.table[i] = (uint16_t)(i % 16);
    big.max_tx = 16;
    big.unclassified = 15;
    assert_int_equal(rss_parse(&big, 16, &cfg, &tx), 0);
    assert_int_equal(cfg.table_len, VN_RSS_MAX_TABLE);
    assert_int_equal(cfg.table[VN_RSS_MAX_TABLE - 1], 15);
    assert_int_equal(cfg.unclassified, 15);
    assert_int_equal(tx, 16);

    /* No hash type at all is a valid (if useless) configuration. */
    struct rss_req none = rss_valid();
    none.types = 0;
    assert_int_equal(rss_parse(&none, 4, &cfg, &tx), 0);
    assert_int_equal(cfg.hash_types, 0);
}

static void test_rss_parse_table_entry_out_of_range(void **state)
{
    (void)state;
    for (unsigned pos = 0; pos < 8; pos++) {
        struct rss_req r = rss_valid();
        r.table[pos] = 4; /* == max pairs */
        expect_rss_refused(&r, 4);
        r.table[pos] = 0xffff;
        expect_rss_refused(&r, 4);
        r.table[pos] = 0x8000 | 1; /* reserved bit set */
        expect_rss_refused(&r, 4);
    }
    /* An entry legal for 4 pairs is refused by a device with 2. */
    struct rss_req r = rss_valid();
    r.max_tx = 2;
    r.unclassified = 0;
    expect_rss_refused(&r, 2);
}

static void test_rss_parse_unclassified_out_of_range(void **state)
{
    (void)state;
    struct rss_req r = rss_valid();
    r.unclassified = 4;
    expect_rss_refused(&r, 4);
    r.unclassified = 0xffff;
    expect_rss_refused(&r, 4);
    r.unclassified = 3;
    struct vn_rss_config cfg;
    uint16_t tx;
    assert_int_equal(rss_parse(&r, 4, &cfg, &tx), 0);
}

static void test_rss_parse_mask_not_power_of_two(void **state)
{
    (void)state;
    /* mask + 1 entries, all present, but not a power of two. */
    const uint16_t masks[] = { 2, 4, 5, 6, 9, 14, 62, 100, 126 };
    for (unsigned i = 0; i < sizeof(masks) / sizeof(masks[0]); i++) {
        struct rss_req r = rss_valid();
        r.mask = masks[i];
        r.n_table = masks[i] + 1u;
        for (unsigned k = 0; k < r.n_table; k++)
            r.table[k] = (uint16_t)(k % 4);
        expect_rss_refused(&r, 4);
    }
    /* Powers of two up to the limit are fine. */
    for (unsigned len = 1; len <= VN_RSS_MAX_TABLE; len *= 2) {
        struct rss_req r = rss_valid();
        r.mask = (uint16_t)(len - 1);
        r.n_table = len;
        for (unsigned k = 0; k < len; k++)
            r.table[k] = (uint16_t)(k % 4);
        struct vn_rss_config cfg;
        uint16_t tx;
        assert_int_equal(rss_parse(&r, 4, &cfg, &tx), 0);
        assert_int_equal(cfg.table_len, len);
    }
}

static void test_rss_parse_table_too_big(void **state)
{
    (void)state;
    /* 256 entries (a power of two), all present and valid. */
    struct rss_req r = rss_valid();
    r.mask = 255;
    r.n_table = 256;
    for (unsigned k = 0; k < 256; k++)
        r.table[k] = (uint16_t)(k % 4);
    expect_rss_refused(&r, 4);
    /* mask 0xffff: 65536 entries (table_len must not wrap to 0). */
    struct rss_req w = rss_valid();
    w.mask = 0xffff;
    w.n_table = 512;
    memset(w.table, 0, sizeof(w.table));
    expect_rss_refused(&w, 4);
    w.mask = 0x7fff;
    expect_rss_refused(&w, 4);
}

static void test_rss_parse_max_tx_vq(void **state)
{
    (void)state;
    struct rss_req r = rss_valid();
    r.max_tx = 0;
    expect_rss_refused(&r, 4);
    r.max_tx = 5;
    expect_rss_refused(&r, 4);
    r.max_tx = 0xffff;
    expect_rss_refused(&r, 4);
    struct vn_rss_config cfg;
    uint16_t tx;
    for (uint16_t n = 1; n <= 4; n++) {
        r.max_tx = n;
        assert_int_equal(rss_parse(&r, 4, &cfg, &tx), 0);
        assert_int_equal(tx, n);
    }
}

static void test_rss_parse_key_too_long(void **state)
{
    (void)state;
    struct rss_req r = rss_valid();
    r.key_len = 41;
    r.key_bytes = 41;
    expect_rss_refused(&r, 4);
    r.key_len = 255;
    r.key_bytes = 255;
    expect_rss_refused(&r, 4);
    /* Every length up to the maximum is fine. */
    for (unsigned k = 0; k <= VN_RSS_MAX_KEY_SIZE; k++) {
        struct rss_req ok = rss_valid();
        ok.key_len = (uint8_t)k;
        ok.key_bytes = k;
        struct vn_rss_config cfg;
        uint16_t tx;
        assert_int_equal(rss_parse(&ok, 4, &cfg, &tx), 0);
        assert_int_equal(cfg.key_len, k);
        assert_memory_equal(cfg.key, KEY2, k);
    }
}

static void test_rss_parse_unsupported_hash_types(void **state)
{
    (void)state;
    /* IP_EX, TCP_EX, UDP_EX (6..8) and anything above. */
    for (unsigned bit = 6; bit < 32; bit++) {
        struct rss_req r = rss_valid();
        r.types = VN_HASH_TYPE_TCPV4 | (1u << bit);
        expect_rss_refused(&r, 4);
    }
}

/* Every prefix of a valid request is refused, and nothing past the given
 * length is read (the prefix ends at a guard page). */
static void test_rss_parse_truncated(void **state)
{
    (void)state;
    struct rss_req variants[3] = { rss_valid(), rss_valid(), rss_valid() };
    variants[1].key_len = 0;
    variants[1].key_bytes = 0;
    variants[2].mask = VN_RSS_MAX_TABLE - 1;
    variants[2].n_table = VN_RSS_MAX_TABLE;
    for (unsigned v = 0; v < 3; v++) {
        uint8_t buf[512];
        size_t full = rss_build(buf, &variants[v]);
        struct vn_rss_config cfg;
        uint16_t tx;
        assert_int_equal(vn_rss_config_parse(guarded(buf, full), (uint32_t)full, 4, &cfg, &tx), 0);
        for (size_t len = 0; len < full; len++) {
            tx = 0x7777;
            if (vn_rss_config_parse(guarded(buf, len), (uint32_t)len, 4, &cfg, &tx) != -1)
                fail_msg("variant %u: %zu of %zu bytes accepted", v, len, full);
            assert_int_equal(tx, 0x7777);
        }
    }
}

static void test_rss_parse_trailing_padding(void **state)
{
    (void)state;
    /* Linux 6.12: the trailer structure (le16 max_tx_vq, u8 key_length,
     * u8 key[40]) padded to 44 bytes: one byte after a 40-byte key. */
    struct rss_req r = rss_valid();
    r.pad = 1;
    struct vn_rss_config cfg, ref;
    uint16_t tx, ref_tx;
    assert_int_equal(rss_parse(&r, 4, &cfg, &tx), 0);
    r.pad = 0;
    assert_int_equal(rss_parse(&r, 4, &ref, &ref_tx), 0);
    assert_memory_equal(&cfg, &ref, sizeof(cfg));
    assert_int_equal(tx, ref_tx);
    /* Its whole trailer whatever the key length: a 4-byte key followed by
     * the unused rest of the 40-byte array and the padding. */
    r.key_len = 4;
    r.key_bytes = 4;
    r.pad = 37;
    assert_int_equal(rss_parse(&r, 4, &cfg, &tx), 0);
    assert_int_equal(cfg.key_len, 4);
    assert_memory_equal(cfg.key, KEY2, 4);
    for (unsigned i = 4; i < VN_RSS_MAX_KEY_SIZE; i++)
        assert_int_equal(cfg.key[i], 0);
}

/* le32 hash_types; le16 reserved[4]; u8 hash_key_length; u8 hash_key_data[]. */
static size_t hash_build(uint8_t *out, uint32_t types, uint8_t key_len, unsigned key_bytes,
                         unsigned pad)
{
    vn_le32_put(out, types);
    for (int i = 0; i < 8; i++)
        out[4 + i] = (uint8_t)(0x11 * i); /* reserved: ignored */
    out[12] = key_len;
    size_t off = 13;
    for (unsigned i = 0; i < key_bytes; i++)
        out[off++] = i < sizeof(KEY2) ? KEY2[i] : 0xee;
    for (unsigned i = 0; i < pad; i++)
        out[off++] = 0x5a;
    return off;
}

static void test_hash_parse_valid(void **state)
{
    (void)state;
    uint8_t buf[128];
    struct vn_rss_config cfg;
    memset(&cfg, 0xcc, sizeof(cfg));
    size_t len = hash_build(buf, VN_HASH_TYPE_TCPV4 | VN_HASH_TYPE_UDPV6, 40, 40, 0);
    assert_int_equal(vn_hash_config_parse(guarded(buf, len), (uint32_t)len, &cfg), 0);
    assert_false(cfg.configured); /* hashes for reports, no steering table */
    assert_int_equal(cfg.hash_types, VN_HASH_TYPE_TCPV4 | VN_HASH_TYPE_UDPV6);
    assert_int_equal(cfg.key_len, 40);
    assert_memory_equal(cfg.key, KEY2, 40);
    assert_int_equal(cfg.table_len, 1);
    assert_int_equal(cfg.table[0], 0);
    assert_int_equal(cfg.unclassified, 0);
    for (unsigned k = 0; k <= VN_RSS_MAX_KEY_SIZE; k++) {
        len = hash_build(buf, VN_HASH_TYPES_SUPPORTED, (uint8_t)k, k, 0);
        assert_int_equal(vn_hash_config_parse(guarded(buf, len), (uint32_t)len, &cfg), 0);
        assert_int_equal(cfg.key_len, k);
    }
    /* Hash reports off: no type. */
    len = hash_build(buf, 0, 0, 0, 0);
    assert_int_equal(vn_hash_config_parse(guarded(buf, len), (uint32_t)len, &cfg), 0);
    assert_int_equal(cfg.hash_types, 0);
}

static void test_hash_parse_invalid(void **state)
{
    (void)state;
    uint8_t buf[512];
    struct vn_rss_config cfg;
    size_t len = hash_build(buf, VN_HASH_TYPES_SUPPORTED, 41, 41, 0);
    assert_int_equal(vn_hash_config_parse(guarded(buf, len), (uint32_t)len, &cfg), -1);
    len = hash_build(buf, VN_HASH_TYPES_SUPPORTED, 255, 255, 0);
    assert_int_equal(vn_hash_config_parse(guarded(buf, len), (uint32_t)len, &cfg), -1);
    for (unsigned bit = 6; bit < 32; bit++) {
        len = hash_build(buf, VN_HASH_TYPE_IPV4 | (1u << bit), 40, 40, 0);
        assert_int_equal(vn_hash_config_parse(guarded(buf, len), (uint32_t)len, &cfg), -1);
    }
}

static void test_hash_parse_truncated(void **state)
{
    (void)state;
    const unsigned keys[] = { 0, 1, 40 };
    for (unsigned v = 0; v < 3; v++) {
        uint8_t buf[128];
        struct vn_rss_config cfg;
        size_t full = hash_build(buf, VN_HASH_TYPES_SUPPORTED, (uint8_t)keys[v], keys[v], 0);
        assert_int_equal(vn_hash_config_parse(guarded(buf, full), (uint32_t)full, &cfg), 0);
        for (size_t len = 0; len < full; len++)
            if (vn_hash_config_parse(guarded(buf, len), (uint32_t)len, &cfg) != -1)
                fail_msg("key %u: %zu of %zu bytes accepted", keys[v], len, full);
    }
}

static void test_hash_parse_trailing_padding(void **state)
{
    (void)state;
    uint8_t buf[128];
    struct vn_rss_config cfg, ref;
    size_t len = hash_build(buf, VN_HASH_TYPES_SUPPORTED, 40, 40, 0);
    assert_int_equal(vn_hash_config_parse(guarded(buf, len), (uint32_t)len, &ref), 0);
    len = hash_build(buf, VN_HASH_TYPES_SUPPORTED, 40, 40, 1);
    assert_int_equal(vn_hash_config_parse(guarded(buf, len), (uint32_t)len, &cfg), 0);
    assert_memory_equal(&cfg, &ref, sizeof(cfg));
    len = hash_build(buf, VN_HASH_TYPES_SUPPORTED, 8, 8, 33);
    assert_int_equal(vn_hash_config_parse(guarded(buf, len), (uint32_t)len, &cfg), 0);
    assert_int_equal(cfg.key_len, 8);
    assert_memory_equal(cfg.key, KEY2, 8);
}

/* ---- policies ------------------------------------------------------------ */

static struct vn_steering *new_steering(int policy)
{
    struct vn_steering *s = calloc(1, sizeof(*s));
    assert_non_null(s);
    s->policy = policy;
    vn_steering_reset(s);
    return s;
}

static void configure_rss(struct vn_steering *s, uint32_t types, const uint16_t *table,
                          unsigned table_len, uint16_t unclassified, const uint8_t *key,
                          unsigned key_len)
{
    struct vn_rss_config *r = &s->rss;
    memset(r, 0, sizeof(*r));
    r->configured = true;
    r->hash_types = types;
    r->table_len = (uint16_t)table_len;
    memcpy(r->table, table, table_len * sizeof(table[0]));
    r->unclassified = unclassified;
    r->key_len = (uint8_t)key_len;
    memcpy(r->key, key, key_len);
}

static void test_effective_policy(void **state)
{
    (void)state;
    struct vn_steering *s = new_steering(VN_POLICY_AUTO);
    static const uint16_t t[1] = { 0 };
    struct { int policy; int without_rss; int with_rss; } cases[] = {
        { VN_POLICY_AUTO, VN_POLICY_RX_FOLLOWS_TX, VN_POLICY_RSS },
        { VN_POLICY_SINGLE, VN_POLICY_SINGLE, VN_POLICY_SINGLE },
        { VN_POLICY_RSS, VN_POLICY_SINGLE, VN_POLICY_RSS },
        { VN_POLICY_RX_FOLLOWS_TX, VN_POLICY_RX_FOLLOWS_TX, VN_POLICY_RX_FOLLOWS_TX },
    };
    for (unsigned i = 0; i < 4; i++) {
        s->policy = cases[i].policy;
        vn_steering_reset(s);
        assert_int_equal(vn_steering_effective(s), cases[i].without_rss);
        /* HASH_CONFIG alone (hash reports) is not an RSS configuration. */
        s->rss.key_len = 40;
        s->rss.hash_types = VN_HASH_TYPES_SUPPORTED;
        assert_int_equal(vn_steering_effective(s), cases[i].without_rss);
        configure_rss(s, VN_HASH_TYPES_SUPPORTED, t, 1, 0, MS_KEY, 40);
        assert_int_equal(vn_steering_effective(s), cases[i].with_rss);
        /* A reset (device reset) forgets the guest's configuration. */
        vn_steering_reset(s);
        assert_int_equal(vn_steering_effective(s), cases[i].without_rss);
        assert_int_equal(s->policy, cases[i].policy);
    }
    free(s);
}

static void test_policy_names(void **state)
{
    (void)state;
    assert_string_equal(vn_policy_name(VN_POLICY_AUTO), "auto");
    assert_string_equal(vn_policy_name(VN_POLICY_SINGLE), "single");
    assert_string_equal(vn_policy_name(VN_POLICY_RSS), "rss");
    assert_string_equal(vn_policy_name(VN_POLICY_RX_FOLLOWS_TX), "rx-follows-tx");
    assert_string_equal(vn_policy_name(-1), "unknown");
    assert_string_equal(vn_policy_name(VN_POLICY__COUNT), "unknown");
}

/* ---- vn_steer_rx ----------------------------------------------------------- */

static unsigned steer(struct vn_steering *s, const uint8_t *frame, size_t len, unsigned active,
                      uint32_t *hash, uint8_t *report)
{
    return vn_steer_rx(s, guarded(frame, len), len, active, hash, report);
}

static const uint16_t TABLE8[8] = { 3, 1, 2, 0, 1, 3, 0, 2 };

static void test_steer_single(void **state)
{
    (void)state;
    struct vn_steering *s = new_steering(VN_POLICY_SINGLE);
    configure_rss(s, VN_HASH_TYPES_SUPPORTED, TABLE8, 8, 3, MS_KEY, 40);
    uint8_t f[256];
    for (unsigned i = 0; i < 64; i++) {
        struct flow fl = flow4(PROTO_TCP, 0x0a000001, 0x0a000002 + i, (uint16_t)(1000 + i), 80);
        size_t len = make_frame(f, &fl);
        uint32_t hash;
        uint8_t report;
        assert_int_equal(steer(s, f, len, 4, &hash, &report), 0);
        /* Hash reports still come from the guest's key. */
        uint8_t want_report;
        assert_int_equal(hash, expected_hash(&fl, VN_HASH_TYPES_SUPPORTED, MS_KEY, 40, &want_report));
        assert_int_equal(report, want_report);
    }
    /* RSS policy with no table from the guest: also pair 0. */
    vn_steering_reset(s);
    s->policy = VN_POLICY_RSS;
    struct flow fl = flow4(PROTO_UDP, 0x0a000001, 0x0a000009, 53, 5353);
    size_t len = make_frame(f, &fl);
    uint32_t hash;
    uint8_t report;
    assert_int_equal(steer(s, f, len, 4, &hash, &report), 0);
    assert_int_equal(hash, 0);
    assert_int_equal(report, VN_HASH_REPORT_NONE);
    free(s);
}

static void test_steer_rss_table(void **state)
{
    (void)state;
    struct vn_steering *s = new_steering(VN_POLICY_RSS);
    configure_rss(s, VN_HASH_TYPES_SUPPORTED, TABLE8, 8, 3, KEY2, 40);
    uint8_t f[256];
    unsigned seen[4] = { 0 };
    srand(42);
    for (unsigned i = 0; i < 400; i++) {
        struct flow fl;
        uint8_t proto = i % 3 == 0 ? PROTO_TCP : i % 3 == 1 ? PROTO_UDP : PROTO_ICMP;
        if (i % 2)
            fl = flow4(proto, (uint32_t)rand(), (uint32_t)rand(), (uint16_t)rand(), (uint16_t)rand());
        else
            fl = flow6(proto, (uint8_t)rand(), (uint8_t)rand(), (uint16_t)rand(), (uint16_t)rand());
        size_t len = make_frame(f, &fl);
        uint32_t hash;
        uint8_t report, want_report;
        uint32_t want = expected_hash(&fl, VN_HASH_TYPES_SUPPORTED, KEY2, 40, &want_report);
        unsigned q = steer(s, f, len, 4, &hash, &report);
        assert_int_equal(hash, want);
        assert_int_equal(report, want_report);
        assert_int_equal(q, TABLE8[want & 7]);
        seen[q]++;
    }
    for (unsigned q = 0; q < 4; q++)
        assert_true(seen[q] > 40);
    free(s);
}

static void test_steer_rss_unclassified(void **state)
{
    (void)state;
    struct vn_steering *s = new_steering(VN_POLICY_RSS);
    const uint16_t table[2] = { 0, 1 };
    configure_rss(s, VN_HASH_TYPES_SUPPORTED, table, 2, 3, MS_KEY, 40);
    uint32_t hash;
    uint8_t report;
    /* Not IP: ARP, a runt, an unknown ethertype, a bad IP version. */
    assert_int_equal(steer(s, ARP_FRAME, sizeof(ARP_FRAME), 4, &hash, &report), 3);
    assert_int_equal(hash, 0);
    assert_int_equal(report, VN_HASH_REPORT_NONE);
    assert_int_equal(steer(s, ARP_FRAME, 13, 4, &hash, &report), 3);
    uint8_t f[256];
    struct flow fl = flow4(PROTO_TCP, 0x0a000001, 0x0a000002, 1, 2);
    size_t len = make_frame(f, &fl);
    f[14] = 0x55; /* IPv4 ethertype, version 5 */
    assert_int_equal(steer(s, f, len, 4, &hash, &report), 3);
    f[14] = 0x44; /* version 4, IHL 4 (< 5) */
    assert_int_equal(steer(s, f, len, 4, &hash, &report), 3);
    len = make_frame(f, &fl);
    f[12] = 0x88;
    f[13] = 0xb5;
    assert_int_equal(steer(s, f, len, 4, &hash, &report), 3);
    /* IP, but no enabled type applies: IPv4 TCP with only IPv6 types. */
    s->rss.hash_types = VN_HASH_TYPE_IPV6 | VN_HASH_TYPE_TCPV6;
    len = make_frame(f, &fl);
    assert_int_equal(steer(s, f, len, 4, &hash, &report), 3);
    assert_int_equal(report, VN_HASH_REPORT_NONE);
    assert_int_equal(hash, 0);
    /* ... and IPv6 UDP with only TCPv6: IPv6 is on, so it is classified. */
    struct flow f6 = flow6(PROTO_UDP, 1, 2, 3, 4);
    len = make_frame(f, &f6);
    uint8_t want_report;
    uint32_t want = expected_hash(&f6, s->rss.hash_types, MS_KEY, 40, &want_report);
    assert_int_equal(want_report, VN_HASH_REPORT_IPV6);
    assert_int_equal(steer(s, f, len, 4, &hash, &report), table[want & 1]);
    assert_int_equal(hash, want);
    assert_int_equal(report, VN_HASH_REPORT_IPV6);
    /* Hash types none at all: everything is unclassified. */
    s->rss.hash_types = 0;
    assert_int_equal(steer(s, f, len, 4, &hash, &report), 3);
    free(s);
}

static void test_steer_rss_wraps_to_active(void **state)
{
    (void)state;
    /* Table entries and the unclassified queue past the active pairs (the
     * guest lowered VQ_PAIRS_SET after RSS_CONFIG) wrap modulo active. */
    struct vn_steering *s = new_steering(VN_POLICY_AUTO);
    const uint16_t table[4] = { 0, 1, 2, 3 };
    configure_rss(s, VN_HASH_TYPES_SUPPORTED, table, 4, 3, MS_KEY, 40);
    uint8_t f[256];
    for (unsigned active = 2; active <= 4; active++) {
        for (unsigned i = 0; i < 100; i++) {
            struct flow fl = flow4(PROTO_TCP, 0xc0a80001, 0xc0a80100 + i, (uint16_t)(40000 + i), 443);
            size_t len = make_frame(f, &fl);
            uint32_t hash;
            uint8_t report, want_report;
            uint32_t want = expected_hash(&fl, VN_HASH_TYPES_SUPPORTED, MS_KEY, 40, &want_report);
            unsigned q = steer(s, f, len, active, &hash, &report);
            assert_int_equal(q, table[want & 3] % active);
        }
        uint32_t hash;
        uint8_t report;
        assert_int_equal(steer(s, ARP_FRAME, sizeof(ARP_FRAME), active, &hash, &report), 3 % active);
    }
    free(s);
}

static void test_steer_one_active(void **state)
{
    (void)state;
    const int policies[] = { VN_POLICY_AUTO, VN_POLICY_RSS, VN_POLICY_RX_FOLLOWS_TX, VN_POLICY_SINGLE };
    const uint16_t table[4] = { 1, 2, 3, 3 };
    uint8_t f[256];
    for (unsigned p = 0; p < 4; p++) {
        struct vn_steering *s = new_steering(policies[p]);
        configure_rss(s, VN_HASH_TYPES_SUPPORTED, table, 4, 3, MS_KEY, 40);
        for (unsigned active = 0; active <= 1; active++) {
            for (unsigned i = 0; i < 32; i++) {
                struct flow fl = flow6(PROTO_TCP, (uint8_t)i, 9, (uint16_t)(7000 + i), 22);
                size_t len = make_frame(f, &fl);
                vn_steer_learn_tx(s, f, len, 2);
                struct flow back = reversed(&fl);
                len = make_frame(f, &back);
                uint32_t hash;
                uint8_t report, want_report;
                assert_int_equal(steer(s, f, len, active, &hash, &report), 0);
                /* The hash report does not depend on the number of queues. */
                assert_int_equal(hash, expected_hash(&back, VN_HASH_TYPES_SUPPORTED, MS_KEY, 40,
                                                     &want_report));
                assert_int_equal(report, want_report);
            }
            uint32_t hash;
            uint8_t report;
            assert_int_equal(steer(s, ARP_FRAME, sizeof(ARP_FRAME), active, &hash, &report), 0);
        }
        free(s);
    }
}

/* The hash and report for each frame kind and enabled type set. */
static void test_steer_hash_reports(void **state)
{
    (void)state;
    struct vn_steering *s = new_steering(VN_POLICY_RSS);
    const uint16_t table[1] = { 0 };
    const struct flow flows[] = {
        flow4(PROTO_TCP, 0x01020304, 0x05060708, 1234, 80),
        flow4(PROTO_UDP, 0x01020304, 0x05060708, 1234, 53),
        flow4(PROTO_ICMP, 0x01020304, 0x05060708, 0, 0),
        flow6(PROTO_TCP, 1, 2, 5555, 443),
        flow6(PROTO_UDP, 1, 2, 5555, 4789),
        flow6(58 /* ICMPv6 */, 1, 2, 0, 0),
    };
    /* Expected report with: everything; IP types only; L4 types only. */
    const uint8_t want_all[] = { VN_HASH_REPORT_TCPV4, VN_HASH_REPORT_UDPV4, VN_HASH_REPORT_IPV4,
                                 VN_HASH_REPORT_TCPV6, VN_HASH_REPORT_UDPV6, VN_HASH_REPORT_IPV6 };
    const uint8_t want_ip[] = { VN_HASH_REPORT_IPV4, VN_HASH_REPORT_IPV4, VN_HASH_REPORT_IPV4,
                                VN_HASH_REPORT_IPV6, VN_HASH_REPORT_IPV6, VN_HASH_REPORT_IPV6 };
    const uint8_t want_l4[] = { VN_HASH_REPORT_TCPV4, VN_HASH_REPORT_UDPV4, VN_HASH_REPORT_NONE,
                                VN_HASH_REPORT_TCPV6, VN_HASH_REPORT_UDPV6, VN_HASH_REPORT_NONE };
    const struct { uint32_t types; const uint8_t *want; } sets[] = {
        { VN_HASH_TYPES_SUPPORTED, want_all },
        { VN_HASH_TYPE_IPV4 | VN_HASH_TYPE_IPV6, want_ip },
        { VN_HASH_TYPE_TCPV4 | VN_HASH_TYPE_UDPV4 | VN_HASH_TYPE_TCPV6 | VN_HASH_TYPE_UDPV6, want_l4 },
    };
    uint8_t f[256];
    for (unsigned k = 0; k < 3; k++) {
        configure_rss(s, sets[k].types, table, 1, 0, KEY2, 40);
        for (unsigned i = 0; i < 6; i++) {
            size_t len = make_frame(f, &flows[i]);
            uint32_t hash;
            uint8_t report, want_report;
            uint32_t want = expected_hash(&flows[i], sets[k].types, KEY2, 40, &want_report);
            assert_int_equal(want_report, sets[k].want[i]);
            steer(s, f, len, 1, &hash, &report);
            assert_int_equal(report, sets[k].want[i]);
            assert_int_equal(hash, want);
            if (report != VN_HASH_REPORT_NONE)
                assert_int_not_equal(hash, 0);
        }
    }
    /* Only TCPv4 (and not IPv4): UDPv4 gets no hash. */
    configure_rss(s, VN_HASH_TYPE_TCPV4, table, 1, 0, KEY2, 40);
    size_t len = make_frame(f, &flows[1]);
    uint32_t hash;
    uint8_t report;
    steer(s, f, len, 1, &hash, &report);
    assert_int_equal(report, VN_HASH_REPORT_NONE);
    assert_int_equal(hash, 0);
    /* No key (no RSS_CONFIG/HASH_CONFIG): no hash. */
    vn_steering_reset(s);
    len = make_frame(f, &flows[0]);
    steer(s, f, len, 1, &hash, &report);
    assert_int_equal(report, VN_HASH_REPORT_NONE);
    assert_int_equal(hash, 0);
    free(s);
}

/* Whole frames of the published verification vectors. */
static void test_steer_hash_vectors(void **state)
{
    (void)state;
    struct vn_steering *s = new_steering(VN_POLICY_RSS);
    const uint16_t table[1] = { 0 };
    configure_rss(s, VN_HASH_TYPES_SUPPORTED, table, 1, 0, MS_KEY, 40);
    uint8_t f[256];
    uint32_t hash;
    uint8_t report;
    struct flow v4 = flow4(PROTO_TCP, 0x420995bb, 0xa18e6450, 2794, 1766); /* 66.9.149.187 -> 161.142.100.80 */
    size_t len = make_frame(f, &v4);
    steer(s, f, len, 1, &hash, &report);
    assert_int_equal(hash, 0x51ccc178);
    assert_int_equal(report, VN_HASH_REPORT_TCPV4);
    v4.proto = PROTO_ICMP;
    len = make_frame(f, &v4);
    steer(s, f, len, 1, &hash, &report);
    assert_int_equal(hash, 0x323e8fc2);
    assert_int_equal(report, VN_HASH_REPORT_IPV4);
    struct flow v6 = { .family = 6, .proto = PROTO_TCP, .sport = 2794, .dport = 1766,
                       .src = { 0x3f, 0xfe, 0x25, 0x01, 0x02, 0x00, 0x1f, 0xff, 0, 0, 0, 0, 0, 0, 0, 7 },
                       .dst = { 0x3f, 0xfe, 0x25, 0x01, 0x02, 0x00, 0x00, 0x03, 0, 0, 0, 0, 0, 0, 0, 1 } };
    len = make_frame(f, &v6);
    steer(s, f, len, 1, &hash, &report);
    assert_int_equal(hash, 0x40207d3d);
    assert_int_equal(report, VN_HASH_REPORT_TCPV6);
    v6.proto = PROTO_UDP;
    s->rss.hash_types = VN_HASH_TYPE_IPV6 | VN_HASH_TYPE_TCPV6;
    len = make_frame(f, &v6);
    steer(s, f, len, 1, &hash, &report);
    assert_int_equal(hash, 0x2cc18cd5);
    assert_int_equal(report, VN_HASH_REPORT_IPV6);
    free(s);
}

/* ---- frame parsing ----------------------------------------------------------- */

static void test_flow_parse_variants(void **state)
{
    (void)state;
    uint8_t f[256];
    struct vn_flow_tuple t;
    struct flow fl = flow4(PROTO_TCP, 0x0a000001, 0x0a000002, 1111, 2222);
    /* One and two VLAN tags (802.1Q, 802.1ad + 802.1Q). */
    for (unsigned vlans = 0; vlans <= 2; vlans++) {
        size_t len = make_frame_ex(f, &fl, vlans, 0, 0);
        vn_flow_parse(guarded(f, len), len, &t);
        assert_int_equal(t.family, 4);
        assert_int_equal(t.l4, PROTO_TCP);
        assert_int_equal(t.addr_len, 4);
        assert_memory_equal(t.src, fl.src, 4);
        assert_memory_equal(t.dst, fl.dst, 4);
        assert_int_equal(t.sport[0] << 8 | t.sport[1], 1111);
        assert_int_equal(t.dport[0] << 8 | t.dport[1], 2222);
    }
    /* Three tags: not looked into. */
    {
        uint8_t g[256];
        size_t len = make_frame_ex(f, &fl, 2, 0, 0);
        memcpy(g, f, 12);
        g[12] = 0x81;
        g[13] = 0x00;
        g[14] = 0;
        g[15] = 7;
        memcpy(g + 16, f + 12, len - 12);
        vn_flow_parse(guarded(g, len + 4), len + 4, &t);
        assert_int_equal(t.family, 0);
    }
    /* IPv4 options: the ports are after them. */
    for (unsigned words = 1; words <= 10; words++) {
        size_t len = make_frame_ex(f, &fl, 1, words, 0);
        vn_flow_parse(guarded(f, len), len, &t);
        assert_int_equal(t.family, 4);
        assert_int_equal(t.l4, PROTO_TCP);
        assert_int_equal(t.sport[0] << 8 | t.sport[1], 1111);
    }
    /* Don't-fragment is not a fragment; MF or an offset is: addresses only. */
    const uint16_t frags[] = { 0x4000, 0x2000, 0x0001, 0x00b9, 0x1fff, 0x3000 };
    for (unsigned i = 0; i < sizeof(frags) / sizeof(frags[0]); i++) {
        size_t len = make_frame_ex(f, &fl, 0, 0, frags[i]);
        vn_flow_parse(guarded(f, len), len, &t);
        assert_int_equal(t.family, 4);
        assert_int_equal(t.l4, frags[i] == 0x4000 ? PROTO_TCP : 0);
    }
    /* IPv6 with a next header other than TCP/UDP (an extension header). */
    struct flow f6 = flow6(0 /* hop-by-hop */, 1, 2, 3, 4);
    size_t len = make_frame_ex(f, &f6, 1, 0, 0);
    vn_flow_parse(guarded(f, len), len, &t);
    assert_int_equal(t.family, 6);
    assert_int_equal(t.addr_len, 16);
    assert_int_equal(t.l4, 0);
    assert_memory_equal(t.src, f6.src, 16);
    /* IPv6 ethertype with a version 4 header. */
    f6.proto = PROTO_UDP;
    len = make_frame(f, &f6);
    f[14] = 0x40;
    vn_flow_parse(guarded(f, len), len, &t);
    assert_int_equal(t.family, 0);
}

/* Every prefix of a frame: parsed as far as it goes, never read past. */
static void test_flow_parse_truncated(void **state)
{
    (void)state;
    uint8_t f[256];
    struct vn_flow_tuple t;
    struct { struct flow fl; unsigned vlans, opts; } cases[] = {
        { flow4(PROTO_TCP, 1, 2, 3, 4), 0, 0 },
        { flow4(PROTO_UDP, 1, 2, 3, 4), 2, 3 },
        { flow6(PROTO_TCP, 1, 2, 3, 4), 0, 0 },
        { flow6(PROTO_UDP, 1, 2, 3, 4), 1, 0 },
    };
    for (unsigned c = 0; c < 4; c++) {
        size_t full = make_frame_ex(f, &cases[c].fl, cases[c].vlans, cases[c].opts, 0);
        size_t l4 = 14 + 4 * (size_t)cases[c].vlans + (cases[c].fl.family == 4 ? 20 + 4 * (size_t)cases[c].opts : 40);
        for (size_t len = 0; len <= full; len++) {
            vn_flow_parse(guarded(f, len), len, &t);
            /* The addresses need the whole IP header (options included). */
            int want_family = len >= l4 ? cases[c].fl.family : 0;
            if (t.family != want_family)
                fail_msg("case %u, %zu bytes: family %u, expected %d", c, len, t.family, want_family);
            uint8_t want_l4 = len >= l4 + 4 ? cases[c].fl.proto : 0;
            if (t.l4 != want_l4)
                fail_msg("case %u, %zu bytes: l4 %u, expected %u", c, len, t.l4, want_l4);
        }
    }
}

/* ---- rx follows tx ------------------------------------------------------------ */

static unsigned steer_flow(struct vn_steering *s, const struct flow *fl, unsigned active)
{
    uint8_t f[256];
    size_t len = make_frame(f, fl);
    uint32_t hash;
    uint8_t report;
    return steer(s, f, len, active, &hash, &report);
}

static void learn(struct vn_steering *s, const struct flow *fl, unsigned txq)
{
    uint8_t f[256];
    size_t len = make_frame(f, fl);
    vn_steer_learn_tx(s, guarded(f, len), len, txq);
}

static void test_rx_follows_tx_learned(void **state)
{
    (void)state;
    const int policies[] = { VN_POLICY_RX_FOLLOWS_TX, VN_POLICY_AUTO };
    for (unsigned p = 0; p < 2; p++) {
        struct vn_steering *s = new_steering(policies[p]);
        for (unsigned i = 0; i < 64; i++) {
            struct flow out = i % 2 ? flow4(i % 4 == 1 ? PROTO_TCP : PROTO_UDP, 0x0a000002,
                                            0x08080800 + i, (uint16_t)(33000 + i), 443)
                                    : flow6(i % 4 == 0 ? PROTO_TCP : PROTO_ICMP, 2, (uint8_t)i,
                                            (uint16_t)(33000 + i), 443);
            struct flow in = reversed(&out);
            unsigned before = steer_flow(s, &in, 4);
            unsigned k = (before + 1 + i % 3) % 4; /* anywhere but where hashing put it */
            learn(s, &out, k);
            assert_int_equal(steer_flow(s, &in, 4), k);
        }
        free(s);
    }
}

static void test_rx_follows_tx_spread(void **state)
{
    (void)state;
    struct vn_steering *s = new_steering(VN_POLICY_RX_FOLLOWS_TX);
    unsigned seen[4] = { 0 };
    unsigned q[256];
    for (unsigned i = 0; i < 256; i++) {
        struct flow in = flow4(PROTO_TCP, 0x5db8d822 + i, 0x0a000002, 443, (uint16_t)(40000 + i));
        q[i] = steer_flow(s, &in, 4);
        assert_true(q[i] < 4);
        seen[q[i]]++;
    }
    for (unsigned k = 0; k < 4; k++)
        assert_true(seen[k] > 20);
    /* Learning one flow moves that one only; the others keep their queue. */
    struct flow out0 = flow4(PROTO_TCP, 0x0a000002, 0x5db8d822, 40000, 443);
    learn(s, &out0, (q[0] + 2) % 4);
    for (unsigned i = 0; i < 256; i++) {
        struct flow in = flow4(PROTO_TCP, 0x5db8d822 + i, 0x0a000002, 443, (uint16_t)(40000 + i));
        unsigned want = i == 0 ? (q[0] + 2) % 4 : q[i];
        assert_int_equal(steer_flow(s, &in, 4), want);
    }
    /* A flow in the learned direction (not a reply) is not affected either. */
    struct flow same_dir = out0;
    unsigned before = steer_flow(s, &same_dir, 4);
    vn_steering_reset(s);
    assert_int_equal(steer_flow(s, &same_dir, 4), before);
    /* Fewer active pairs: spread over those. */
    for (unsigned i = 0; i < 64; i++) {
        struct flow in = flow4(PROTO_UDP, 0x5db8d822 + i, 0x0a000002, 53, (uint16_t)(40000 + i));
        assert_true(steer_flow(s, &in, 3) < 3);
    }
    free(s);
}

/* A frame read by a pair: an unlearned flow stays with its reader while that
 * pair is in use (no copy to another pair), else it goes by its hash; a
 * learned flow goes where it was learned whoever read it; other policies
 * ignore the reader. */
static void test_rx_follows_tx_reader(void **state)
{
    (void)state;
    struct vn_steering *s = new_steering(VN_POLICY_RX_FOLLOWS_TX);
    for (unsigned i = 0; i < 64; i++) {
        struct flow in = flow4(PROTO_TCP, 0x5db8d822 + i, 0x0a000002, 443, (uint16_t)(40000 + i));
        uint8_t f[256];
        size_t len = make_frame(f, &in);
        uint32_t hash;
        uint8_t report;
        unsigned by_hash = steer_flow(s, &in, 3);
        for (unsigned reader = 0; reader < 4; reader++) {
            unsigned q = vn_steer_rx_read(s, guarded(f, len), len, 3, reader, &hash, &report);
            assert_int_equal(q, reader < 3 ? reader : by_hash);
        }
        struct flow out = reversed(&in);
        learn(s, &out, (i + 1) % 3);
        for (unsigned reader = 0; reader < 4; reader++)
            assert_int_equal(vn_steer_rx_read(s, guarded(f, len), len, 3, reader, &hash, &report),
                             (i + 1) % 3);
    }
    free(s);
    s = new_steering(VN_POLICY_SINGLE);
    struct flow in = flow4(PROTO_UDP, 0x5db8d822, 0x0a000002, 53, 40000);
    uint8_t f[256];
    size_t len = make_frame(f, &in);
    uint32_t hash;
    uint8_t report;
    assert_int_equal(vn_steer_rx_read(s, guarded(f, len), len, 4, 2, &hash, &report), 0);
    free(s);
}

static void test_rx_follows_tx_relearn_and_limits(void **state)
{
    (void)state;
    struct vn_steering *s = new_steering(VN_POLICY_RX_FOLLOWS_TX);
    struct flow out = flow4(PROTO_TCP, 0x0a000002, 0xac100001, 51000, 22);
    struct flow in = reversed(&out);
    unsigned hashed = steer_flow(s, &in, 4);
    /* The guest moves the flow between queues: the replies follow at once. */
    for (unsigned round = 0; round < 8; round++) {
        unsigned k = (hashed + 1 + round) % 4;
        learn(s, &out, k);
        assert_int_equal(steer_flow(s, &in, 4), k);
    }
    /* Learned on a queue that is no longer active: spread by hash. */
    learn(s, &out, 3);
    assert_int_equal(steer_flow(s, &in, 4), 3);
    unsigned q2 = steer_flow(s, &in, 2);
    assert_true(q2 < 2);
    struct vn_steering *fresh = new_steering(VN_POLICY_RX_FOLLOWS_TX);
    assert_int_equal(q2, steer_flow(fresh, &in, 2));
    free(fresh);
    /* Not IP: learning does nothing, receive goes to pair 0. */
    vn_steer_learn_tx(s, guarded(ARP_FRAME, sizeof(ARP_FRAME)), sizeof(ARP_FRAME), 2);
    uint32_t hash;
    uint8_t report;
    assert_int_equal(steer(s, ARP_FRAME, sizeof(ARP_FRAME), 4, &hash, &report), 0);
    for (size_t len = 0; len < 14; len++)
        vn_steer_learn_tx(s, guarded(ARP_FRAME, len), len, 1);
    /* A reset forgets what was learned. */
    learn(s, &out, (hashed + 1) % 4);
    assert_int_equal(steer_flow(s, &in, 4), (hashed + 1) % 4);
    vn_steering_reset(s);
    assert_int_equal(steer_flow(s, &in, 4), hashed);
    /* RSS once the guest configures it (AUTO): the table wins over learning. */
    s->policy = VN_POLICY_AUTO;
    learn(s, &out, (hashed + 1) % 4);
    assert_int_equal(steer_flow(s, &in, 4), (hashed + 1) % 4);
    const uint16_t table[1] = { 2 };
    configure_rss(s, VN_HASH_TYPES_SUPPORTED, table, 1, 2, KEY2, 40);
    assert_int_equal(steer_flow(s, &in, 4), 2);
    free(s);
}

/* One real wait past VN_FLOW_EXPIRY_MS: a learned flow falls back to the
 * hash; learning it again (also right after, when a fresh entry would not
 * be stored again) takes effect. */
static void test_rx_follows_tx_expiry(void **state)
{
    (void)state;
    struct vn_steering *s = new_steering(VN_POLICY_RX_FOLLOWS_TX);
    struct flow out = flow6(PROTO_UDP, 7, 9, 5000, 6000);
    struct flow in = reversed(&out);
    struct flow out2 = flow4(PROTO_TCP, 0x0a000002, 0x0a000003, 5000, 6000);
    struct flow in2 = reversed(&out2);
    unsigned hashed = steer_flow(s, &in, 4), hashed2 = steer_flow(s, &in2, 4);
    unsigned k = (hashed + 1) % 4, k2 = (hashed2 + 3) % 4;
    learn(s, &out, k);
    learn(s, &out2, k2);
    assert_int_equal(steer_flow(s, &in, 4), k);
    struct timespec ts = { .tv_sec = VN_FLOW_EXPIRY_MS / 1000 - 1, .tv_nsec = 0 };
    nanosleep(&ts, NULL);
    /* Two seconds in: still learned; the second flow is refreshed now. */
    assert_int_equal(steer_flow(s, &in, 4), k);
    learn(s, &out2, k2);
    ts = (struct timespec){ .tv_sec = 1, .tv_nsec = 200 * 1000 * 1000 };
    nanosleep(&ts, NULL);
    /* 3.2 s after learning: expired. The refreshed one is not. */
    assert_int_equal(steer_flow(s, &in, 4), hashed);
    assert_int_equal(steer_flow(s, &in2, 4), k2);
    learn(s, &out, k);
    assert_int_equal(steer_flow(s, &in, 4), k);
    free(s);
}

#define T(fn) cmocka_unit_test(fn)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_toeplitz_reference),
        T(test_rss_parse_valid),
        T(test_rss_parse_table_entry_out_of_range),
        T(test_rss_parse_unclassified_out_of_range),
        T(test_rss_parse_mask_not_power_of_two),
        T(test_rss_parse_table_too_big),
        T(test_rss_parse_max_tx_vq),
        T(test_rss_parse_key_too_long),
        T(test_rss_parse_unsupported_hash_types),
        T(test_rss_parse_truncated),
        T(test_rss_parse_trailing_padding),
        T(test_hash_parse_valid),
        T(test_hash_parse_invalid),
        T(test_hash_parse_truncated),
        T(test_hash_parse_trailing_padding),
        T(test_effective_policy),
        T(test_policy_names),
        T(test_steer_single),
        T(test_steer_rss_table),
        T(test_steer_rss_unclassified),
        T(test_steer_rss_wraps_to_active),
        T(test_steer_one_active),
        T(test_steer_hash_reports),
        T(test_steer_hash_vectors),
        T(test_flow_parse_variants),
        T(test_flow_parse_truncated),
        T(test_rx_follows_tx_learned),
        T(test_rx_follows_tx_spread),
        T(test_rx_follows_tx_reader),
        T(test_rx_follows_tx_relearn_and_limits),
        T(test_rx_follows_tx_expiry),
    };
    return cmocka_run_group_tests_name("steering", tests, group_setup, group_teardown);
}
