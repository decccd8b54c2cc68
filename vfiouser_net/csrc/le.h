/* Little-endian accessors for guest-visible structures.
 *
 * Virtio 1.x structures are little-endian regardless of the host; every access
 * to guest memory or to a guest-written buffer goes through these so that the
 * byte order is explicit and unaligned guest pointers are safe (memcpy). */
#ifndef VN_LE_H
#define VN_LE_H

#include <endian.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t vn_le16_get(const void *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof(v));
    return le16toh(v);
}

static inline uint32_t vn_le32_get(const void *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof(v));
    return le32toh(v);
}

static inline uint64_t vn_le64_get(const void *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return le64toh(v);
}

static inline void vn_le16_put(void *p, uint16_t v)
{
    v = htole16(v);
    memcpy(p, &v, sizeof(v));
}

static inline void vn_le32_put(void *p, uint32_t v)
{
    v = htole32(v);
    memcpy(p, &v, sizeof(v));
}

/* Ring indices are shared with a concurrently running guest: they need
 * single-copy atomic 16-bit accesses with acquire/release ordering. Ring
 * structures are 2-byte aligned by the spec (checked when the ring is mapped). */
static inline uint16_t vn_le16_load_acquire(const uint16_t *p)
{
    return le16toh(__atomic_load_n(p, __ATOMIC_ACQUIRE));
}

static inline void vn_le16_store_release(uint16_t *p, uint16_t v)
{
    __atomic_store_n(p, htole16(v), __ATOMIC_RELEASE);
}

static inline uint16_t vn_le16_load_relaxed(const uint16_t *p)
{
    return le16toh(__atomic_load_n(p, __ATOMIC_RELAXED));
}

static inline void vn_le16_store_relaxed(uint16_t *p, uint16_t v)
{
    __atomic_store_n(p, htole16(v), __ATOMIC_RELAXED);
}

#endif
