/* Batched TAP writes through io_uring (tap_batch.h). */
#include "tap_batch.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Debian 12's liburing (2.3) declares io_uring_register_restrictions and
 * io_uring_enable_rings but does not export them: the system call itself. */
static int ring_register(struct io_uring *ring, unsigned op, const void *arg, unsigned n)
{
    long r = syscall(__NR_io_uring_register, ring->ring_fd, op, arg, n);
    return r < 0 ? -errno : (int)r;
}

int vn_tap_batch_init(struct vn_tap_batch *b)
{
    memset(b, 0, sizeof(*b));
    struct io_uring_params p = { .flags = IORING_SETUP_R_DISABLED };
    int r = io_uring_queue_init_params(VN_TAP_BATCH_MAX, &b->ring, &p);
    if (r < 0)
        return r;
    /* One fixed-file slot, empty until the TAP is known. */
    int none = -1;
    struct io_uring_restriction rs[] = {
        { .opcode = IORING_RESTRICTION_SQE_OP, .sqe_op = IORING_OP_WRITEV },
        { .opcode = IORING_RESTRICTION_SQE_FLAGS_REQUIRED, .sqe_flags = IOSQE_FIXED_FILE },
        { .opcode = IORING_RESTRICTION_REGISTER_OP, .register_op = IORING_REGISTER_FILES_UPDATE },
    };
    if ((r = io_uring_register_files(&b->ring, &none, 1)) < 0 ||
        (r = ring_register(&b->ring, IORING_REGISTER_RESTRICTIONS, rs,
                           sizeof(rs) / sizeof(rs[0]))) < 0 ||
        (r = ring_register(&b->ring, IORING_REGISTER_ENABLE_RINGS, NULL, 0)) < 0) {
        io_uring_queue_exit(&b->ring);
        return r;
    }
    b->ready = true;
    return 0;
}

void vn_tap_batch_free(struct vn_tap_batch *b)
{
    if (b->ready)
        io_uring_queue_exit(&b->ring);
    b->ready = false;
}

int vn_tap_batch_probe(void)
{
    struct vn_tap_batch *b = malloc(sizeof(*b)); /* big (its iovecs) */
    if (b == NULL)
        return -ENOMEM;
    int r = vn_tap_batch_init(b);
    vn_tap_batch_free(b);
    free(b);
    return r;
}

int vn_tap_batch_set_fd(struct vn_tap_batch *b, int fd)
{
    if (!b->ready)
        return -EINVAL;
    /* Always updated, also for the same number: a registered file holds the
     * file itself, and a new TAP may have got the old one's descriptor. */
    int r = io_uring_register_files_update(&b->ring, 0, &fd, 1);
    return r < 0 ? r : 0;
}

bool vn_tap_batch_writev(struct vn_tap_batch *b, const struct iovec *iov, unsigned niov,
                         unsigned tag)
{
    if (b->queued >= VN_TAP_BATCH_MAX)
        return false;
    struct io_uring_sqe *sqe = io_uring_get_sqe(&b->ring);
    if (sqe == NULL)
        return false;
    io_uring_prep_writev(sqe, 0, iov, niov, 0);
    /* Offset 0 on a character device means "the current position", which a
     * TAP ignores; fixed file slot 0. */
    sqe->flags |= IOSQE_FIXED_FILE;
    io_uring_sqe_set_data64(sqe, tag);
    b->queued++;
    return true;
}

int vn_tap_batch_flush(struct vn_tap_batch *b, int32_t *res)
{
    unsigned want = b->queued;
    if (want == 0)
        return 0;
    for (unsigned i = 0; i < VN_TAP_BATCH_MAX; i++)
        res[i] = -EIO;
    int r = io_uring_submit_and_wait(&b->ring, want);
    while (r == -EINTR)
        r = io_uring_submit_and_wait(&b->ring, want);
    unsigned seen = 0;
    struct io_uring_cqe *cqe;
    unsigned head;
    io_uring_for_each_cqe(&b->ring, head, cqe)
    {
        uint64_t tag = io_uring_cqe_get_data64(cqe);
        if (tag < VN_TAP_BATCH_MAX)
            res[tag] = cqe->res;
        seen++;
    }
    io_uring_cq_advance(&b->ring, seen);
    b->queued = 0;
    if (r < 0)
        b->broken = true;
    return r < 0 ? r : 0;
}
