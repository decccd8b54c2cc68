/* Shared by the device-level benchmark's C programs: little-endian access,
 * the test frames (Ethernet/IPv4/UDP, several flows), clocks and argument
 * parsing. Header-only: every program is one .c file built on its own. */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#include <endian.h>
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BENCH_VNET_HDR_LEN 12 /* virtio_net_hdr_v1 (VERSION_1, no hash report) */
#define BENCH_MIN_FRAME 60
#define BENCH_MAX_FRAME 1514

/* --- little-endian stores/loads into memory we share ----------------------
 * One access per field (never memcpy byte by byte): the other side reads
 * ring indices concurrently and must never see half of a store. */
static inline uint16_t le16_load(const void *p)
{
    return le16toh(*(const volatile uint16_t *)p);
}

static inline void le16_store(void *p, uint16_t v)
{
    *(volatile uint16_t *)p = htole16(v);
}

static inline uint32_t le32_load(const void *p)
{
    return le32toh(*(const volatile uint32_t *)p);
}

static inline void le32_store(void *p, uint32_t v)
{
    *(volatile uint32_t *)p = htole32(v);
}

static inline void le64_store(void *p, uint64_t v)
{
    *(volatile uint64_t *)p = htole64(v);
}

/* Byte-wise (unaligned) little-endian puts for message buffers. */
static inline void put_le16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static inline void put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline void put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline uint16_t get_le16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static inline uint32_t get_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static inline void put_be16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

/* --- time ------------------------------------------------------------------ */
static inline double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* --- arguments ------------------------------------------------------------- */
static inline void die(const char *what)
{
    fprintf(stderr, "%s\n", what);
    exit(2);
}

static inline uint64_t parse_u64(const char *s, const char *what)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno != 0 || end == s || *end != '\0') {
        fprintf(stderr, "bad %s: %s\n", what, s);
        exit(2);
    }
    return (uint64_t)v;
}

static inline double parse_double(const char *s, const char *what)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno != 0 || end == s || *end != '\0' || v < 0) {
        fprintf(stderr, "bad %s: %s\n", what, s);
        exit(2);
    }
    return v;
}

static inline void parse_mac(const char *s, uint8_t mac[6])
{
    unsigned v[6];
    if (sscanf(s, "%x:%x:%x:%x:%x:%x", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5]) != 6) {
        fprintf(stderr, "bad MAC: %s\n", s);
        exit(2);
    }
    for (int i = 0; i < 6; i++) {
        if (v[i] > 0xff) {
            fprintf(stderr, "bad MAC: %s\n", s);
            exit(2);
        }
        mac[i] = (uint8_t)v[i];
    }
}

/* --- frames ---------------------------------------------------------------- */
#define BENCH_UDP_BASE_PORT 10000
#define BENCH_UDP_DST_PORT 9 /* discard */

static inline uint16_t ip_checksum(const uint8_t *p, size_t len)
{
    uint32_t sum = 0;
    for (size_t i = 0; i + 1 < len; i += 2)
        sum += (uint32_t)((p[i] << 8) | p[i + 1]);
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

/* Write an Ethernet/IPv4/UDP frame of `len` bytes (no FCS) for flow `flow`
 * (the UDP source port varies with the flow, so hashing spreads flows). */
static inline void build_frame(uint8_t *f, size_t len, const uint8_t dst[6], const uint8_t src[6],
                               unsigned flow)
{
    memset(f, 0, len);
    memcpy(f, dst, 6);
    memcpy(f + 6, src, 6);
    put_be16(f + 12, 0x0800);
    uint8_t *ip = f + 14;
    size_t ip_len = len - 14;
    ip[0] = 0x45;
    put_be16(ip + 2, (uint16_t)ip_len);
    put_be16(ip + 4, (uint16_t)flow);
    ip[8] = 64;
    ip[9] = 17; /* UDP */
    /* 198.18.0.0/15: the benchmarking range (RFC 2544). */
    ip[12] = 198, ip[13] = 18, ip[14] = 0, ip[15] = 1;
    ip[16] = 198, ip[17] = 19, ip[18] = 0, ip[19] = 1;
    put_be16(ip + 10, ip_checksum(ip, 20));
    uint8_t *udp = ip + 20;
    put_be16(udp, (uint16_t)(BENCH_UDP_BASE_PORT + flow));
    put_be16(udp + 2, BENCH_UDP_DST_PORT);
    put_be16(udp + 4, (uint16_t)(ip_len - 20));
    /* UDP checksum 0: none (allowed for IPv4). Payload: a recognisable tag. */
    if (len >= 14 + 20 + 8 + 8)
        memcpy(udp + 8, "VNBENCH", 8);
}

static inline size_t check_frame_bytes(uint64_t v)
{
    if (v < BENCH_MIN_FRAME || v > BENCH_MAX_FRAME) {
        fprintf(stderr, "frame size %llu outside [%d, %d]\n", (unsigned long long)v,
                BENCH_MIN_FRAME, BENCH_MAX_FRAME);
        exit(2);
    }
    return (size_t)v;
}

#endif
