/* Batched TAP writes through io_uring: one io_uring_enter for a ring pass's
 * frames instead of one writev each.
 *
 * Each queue pair owns one small ring, created when the device is (before
 * the sandbox: its seccomp filter has no io_uring_setup) and locked down
 * with io_uring restrictions: the only operation is WRITEV, only on the
 * registered file (the pair's TAP), and the only registration is replacing
 * that file. So a device process that a hostile guest took over gains no
 * way past its seccomp filter through the ring. */
#ifndef VN_TAP_BATCH_H
#define VN_TAP_BATCH_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include <liburing.h>

/* Frames per io_uring_enter, and the ring's size; iovecs for one batch's
 * frames (a batch ends early when fewer than a chain's maximum are left). */
#define VN_TAP_BATCH_MAX 32
/* A batch also ends once it holds this many bytes: the guest sees none of
 * its completions before the whole batch is written, and a TCP sender paced
 * by its completions (TSO frames of 64 KiB, the stack's small queues) would
 * wait for up to 32 of them; small frames still go 32 at a time. */
#define VN_TAP_BATCH_BYTES (64u * 1024)
#define VN_TAP_BATCH_IOVS 1024

struct vn_tap_batch {
    struct io_uring ring;
    bool ready;  /* created (and to be freed) */
    bool broken; /* an io_uring_enter failed: SQEs may be left in the ring, so
                    it is never entered again; the pair writes one by one */
    unsigned queued;
    struct iovec iov[VN_TAP_BATCH_IOVS]; /* the queued writes' buffers */
};

static inline bool vn_tap_batch_usable(const struct vn_tap_batch *b)
{
    return b->ready && !b->broken;
}

/* Creates the ring; 0 or -errno (ENOSYS, EPERM with kernel.io_uring_disabled,
 * EINVAL on kernels without restrictions). */
int vn_tap_batch_init(struct vn_tap_batch *b);
void vn_tap_batch_free(struct vn_tap_batch *b);
/* Whether a ring can be made here: 0 or what vn_tap_batch_init returns. */
int vn_tap_batch_probe(void);
/* The TAP the writes go to (-1: none). 0 or -errno. */
int vn_tap_batch_set_fd(struct vn_tap_batch *b, int fd);
/* Queues a write of iov (kept by the caller until the flush); false when
 * VN_TAP_BATCH_MAX writes are queued already. */
bool vn_tap_batch_writev(struct vn_tap_batch *b, const struct iovec *iov, unsigned niov,
                         unsigned tag);
/* Submits the queued writes and waits for all of them: res[tag] gets each
 * write's result (bytes or -errno). 0 or -errno of io_uring_enter, in which
 * case res holds -EIO for every write not reported. */
int vn_tap_batch_flush(struct vn_tap_batch *b, int32_t *res);

#endif
