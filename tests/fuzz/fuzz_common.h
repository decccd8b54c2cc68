/* Shared parts of the libFuzzer targets in tests/fuzz.
 *
 * Guest memory is tests/c/fake_driver.c's: every region is its own mmap()
 * between PROT_NONE guard pages, so a buffer the device failed to bound
 * crashes on a guard page, and the read-only region is mapped PROT_READ so a
 * device write into it crashes too. The regions are made once per process
 * and refilled from each input (the same bytes give the same run).
 *
 * Fixed layout (guest physical addresses):
 *   A  0x10000  8 KiB read-write
 *   B  0x12000  8 KiB read-write, right after A in GPA space (a buffer that
 *               straddles A and B is one range to the guest but two host
 *               mappings: the device must refuse it)
 *   RO 0x18000  4 KiB read-only (between B and RO a hole)
 * An input's "guest image" fills A, then B, then RO, in that order, from
 * their first byte; the rest of guest memory is zero. */
#ifndef VN_FUZZ_COMMON_H
#define VN_FUZZ_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "device.h"
#include "fake_driver.h"

#define FZ_GPA_A 0x10000ull
#define FZ_GPA_B 0x12000ull
#define FZ_GPA_RO 0x18000ull
#define FZ_LEN_A 0x2000ull
#define FZ_LEN_B 0x2000ull
#define FZ_LEN_RO 0x1000ull
#define FZ_IMAGE_MAX (FZ_LEN_A + FZ_LEN_B + FZ_LEN_RO)

/* A check that must hold whatever the guest wrote: abort() with a message
 * (libFuzzer reports it as a crash and keeps the input). */
#define FZ_CHECK(cond, ...)                                                            \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "%s:%d: invariant failed: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                              \
            fputc('\n', stderr);                                                       \
            abort();                                                                   \
        }                                                                              \
    } while (0)

/* Consuming reader over the input: past the end every read gives zeros. */
struct fz_in {
    const uint8_t *p;
    size_t n;
};

static inline uint8_t fz_u8(struct fz_in *in)
{
    if (in->n == 0)
        return 0;
    in->n--;
    return *in->p++;
}

static inline uint16_t fz_u16(struct fz_in *in)
{
    uint16_t lo = fz_u8(in);
    return (uint16_t)(lo | (uint16_t)fz_u8(in) << 8);
}

static inline uint32_t fz_u32(struct fz_in *in)
{
    uint32_t lo = fz_u16(in);
    return lo | (uint32_t)fz_u16(in) << 16;
}

/* Up to len bytes; *got says how many there were. */
static inline const uint8_t *fz_bytes(struct fz_in *in, size_t len, size_t *got)
{
    const uint8_t *p = in->p;
    *got = len < in->n ? len : in->n;
    in->p += *got;
    in->n -= *got;
    return p;
}

/* The process-wide guest (made on first use). */
struct fd_guest *fz_guest(void);
/* Zero guest memory, copy image[0..len) into A, B, RO in that order, and
 * register the three regions in mem (cleared first). */
void fz_guest_load(struct vn_mem *mem, const uint8_t *image, size_t len);
/* Host address of guest range [gpa, gpa+len) (it must be inside a region). */
void *fz_hva(uint64_t gpa, uint64_t len);

/* A device with max_qps pairs that logs nowhere and raises interrupts into
 * tests/c/vfu_stub.c. */
struct vn_dev *fz_dev_new(unsigned max_qps, uint32_t mtu);
void fz_dev_free(struct vn_dev *dev);
/* What vn_dev_start() does to the rings, without starting worker threads:
 * the targets drive the datapath on their own thread, deterministically.
 * Returns false when a configured ring is not usable (vn_dev_start() would
 * fail and the control plane set DEVICE_NEEDS_RESET). */
bool fz_dev_start(struct vn_dev *dev, uint64_t features);

/* Every iovec inside guest memory (writable ones in a writable region),
 * every byte read and every writable byte written back: an iovec outside
 * the regions crashes on a guard page or fails the check. */
void fz_check_iov(const struct iovec *iov, unsigned niov, unsigned nout);

/* The used ring as the driver sees it: entries [from, to) have ids below the
 * ring size. */
void fz_check_used(const struct vn_vq *vq, uint16_t from, uint16_t to);

#endif
