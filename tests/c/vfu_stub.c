/* Stand-in for the one libvfio-user call the datapath objects make
 * (vfu_irq_trigger from device.c), linked into the test binaries instead of
 * libvfio-user: it counts interrupts per vector so tests can check which ones
 * the device raised. A struct vn_dev whose vfu is &fd_fake_vfu_ctx sends its
 * interrupts here; with vfu == NULL vn_irq_raise() returns before. */
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "fake_driver.h"
#include "irq.h"
#include "libvfio-user.h"

#define STUB_VECTORS 64

char fd_fake_vfu_ctx;
static _Atomic uint64_t counts[STUB_VECTORS];
static _Atomic bool failing;

int vfu_irq_trigger(vfu_ctx_t *vfu_ctx, uint32_t subindex)
{
    if ((void *)vfu_ctx != (void *)&fd_fake_vfu_ctx || subindex >= STUB_VECTORS)
        __builtin_trap();
    if (atomic_load(&failing))
        return -1;
    atomic_fetch_add(&counts[subindex], 1);
    return 0;
}

uint64_t fd_irq_count(unsigned vector)
{
    return vector < STUB_VECTORS ? atomic_load(&counts[vector]) : 0;
}

void fd_irq_reset(void)
{
    for (unsigned i = 0; i < STUB_VECTORS; i++)
        atomic_store(&counts[i], 0);
    atomic_store(&failing, false);
}

void fd_irq_fail(bool fail)
{
    atomic_store(&failing, fail);
}
