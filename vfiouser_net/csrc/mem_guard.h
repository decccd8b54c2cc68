/* Guest memory that its owner shrinks while we use it.
 *
 * A DMA region is a shared mapping of the client's file (memfd, tmpfs,
 * hugetlbfs). libvfio-user checks at DMA_MAP time that the file covers the
 * region, but the client keeps the file: an ftruncate afterwards turns every
 * access to the lost pages into SIGBUS, which would end the daemon and every
 * device it serves. Readv/writev on such pages fail with EFAULT by
 * themselves; the datapath's own loads and stores (rings, headers, control
 * commands) are what this guards.
 *
 * The SIGBUS handler looks the faulting address up among the guarded
 * mappings of every device in the process. Inside one, it maps private
 * anonymous memory over the lost page(s) (reads then see zeros, writes go
 * nowhere), counts the fault for that device and wakes its context thread,
 * which marks the device DEVICE_NEEDS_RESET (vn_dev_check_mem_faults): the
 * guest that shrank its memory broke only its own device. A SIGBUS anywhere
 * else goes to the handler that was there before (default: the process dies,
 * as it should for a bug of ours). */
#ifndef VN_MEM_GUARD_H
#define VN_MEM_GUARD_H

#include <stddef.h>
#include <stdint.h>

/* Mappings guarded at once in the whole process: 16 DMA regions for each of
 * 64 devices. */
#define VN_MEM_GUARD_SLOTS 1024

/* Install the SIGBUS handler (once per process; later calls do nothing).
 * Returns 0 or -errno. */
int vn_mem_guard_install(void);

/* Guard [start, start+len), mapped in units of page_size. On a fault there:
 * *faults is incremented (atomically) and wake_fd (an eventfd) written.
 * Returns 0, or -ENOSPC when every slot is taken (the region is then not
 * guarded: the caller refuses it). */
int vn_mem_guard_add(void *start, size_t len, size_t page_size, uint64_t *faults, int wake_fd);
/* Stop guarding the mapping that starts at start (before it is unmapped). */
void vn_mem_guard_remove(void *start);

#endif
