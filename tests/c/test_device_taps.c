/* Swapping in a re-created TAP's queues (device.c vn_dev_replace_taps and the
 * context thread's vn_dev_apply_requested_taps): who owns the fds of a
 * request. The operator's thread closes them when the request fails, so a
 * request that timed out must never be installed later: its numbers may by
 * then name another client's socket or a capture file. */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#include "device.h"

#define PAIRS 2
#define LONG_MS 10000

static const uint8_t MAC[6] = { 0x52, 0x54, 0x00, 0x00, 0x00, 0x01 };

static void quiet_log(void *py, int level, const char *msg)
{
    (void)py;
    (void)level;
    (void)msg;
}

struct tfx {
    struct vn_dev *dev;
    int old[PAIRS][2]; /* the TAP queues the device starts with ([0] installed) */
};

static int setup(void **state)
{
    struct tfx *t = calloc(1, sizeof(*t));
    assert_non_null(t);
    t->dev = vn_dev_new(PAIRS, MAC, 1500);
    assert_non_null(t->dev);
    struct vn_hooks h = { .log = quiet_log };
    vn_dev_set_hooks(t->dev, &h);
    for (unsigned i = 0; i < PAIRS; i++) {
        assert_int_equal(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, t->old[i]), 0);
        vn_dev_set_tap(t->dev, i, t->old[i][0]);
    }
    *state = t;
    return 0;
}

static int teardown(void **state)
{
    struct tfx *t = *state;
    vn_dev_free(t->dev);
    for (unsigned i = 0; i < PAIRS; i++) {
        close(t->old[i][0]);
        close(t->old[i][1]);
    }
    free(t);
    return 0;
}

static int new_fd(void)
{
    int fd = eventfd(0, EFD_CLOEXEC);
    assert_true(fd >= 0);
    return fd;
}

/* Was a request posted to the context thread (its command eventfd)? */
static bool request_posted(struct vn_dev *dev, int timeout_ms)
{
    struct pollfd p = { .fd = dev->cmd_fd, .events = POLLIN };
    if (poll(&p, 1, timeout_ms) != 1)
        return false;
    eventfd_t v;
    eventfd_read(dev->cmd_fd, &v);
    return true;
}

/* The finding: the context thread is busy past the caller's timeout; the
 * caller closes its fds, their numbers are reused, then the context thread
 * gets round to the request. */
static void test_timed_out_request_is_never_installed(void **state)
{
    struct tfx *t = *state;
    int fds[PAIRS] = { new_fd(), new_fd() };
    assert_int_equal(vn_dev_replace_taps(t->dev, fds, PAIRS, 20), -ETIMEDOUT);
    int other[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, other), 0);
    /* The caller gives up and closes its fds; something else now holds
     * those numbers (dup2 makes the reuse certain). */
    for (unsigned i = 0; i < PAIRS; i++) {
        close(fds[i]);
        assert_int_equal(dup2(other[0], fds[i]), fds[i]);
    }
    uint64_t replaced = t->dev->st.tap_replacements;

    vn_dev_apply_requested_taps(t->dev);

    for (unsigned i = 0; i < PAIRS; i++)
        assert_int_equal(t->dev->qp[i].tap_fd, t->old[i][0]);
    assert_int_equal(t->dev->st.tap_replacements, replaced);
    /* The reused numbers are still the other socket, untouched. */
    assert_int_equal(write(fds[0], "x", 1), 1);
    char c;
    assert_int_equal(read(other[1], &c, 1), 1);
    for (unsigned i = 0; i < PAIRS; i++)
        close(fds[i]);
    close(other[0]);
    close(other[1]);
}

struct replace_call {
    struct vn_dev *dev;
    int fds[PAIRS];
    unsigned n;
    int ret;
};

static void *replace_thread(void *arg)
{
    struct replace_call *c = arg;
    c->ret = vn_dev_replace_taps(c->dev, c->fds, c->n, LONG_MS);
    return NULL;
}

static void test_request_in_time_is_installed(void **state)
{
    struct tfx *t = *state;
    struct replace_call c = { .dev = t->dev, .fds = { new_fd(), new_fd() }, .n = PAIRS };
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, replace_thread, &c), 0);
    assert_true(request_posted(t->dev, LONG_MS));
    vn_dev_apply_requested_taps(t->dev);
    assert_int_equal(pthread_join(th, NULL), 0);
    assert_int_equal(c.ret, 0);
    for (unsigned i = 0; i < PAIRS; i++)
        assert_int_equal(t->dev->qp[i].tap_fd, c.fds[i]);
    assert_int_equal(t->dev->st.tap_replacements, 1);
    /* Nothing left to apply. */
    vn_dev_apply_requested_taps(t->dev);
    assert_int_equal(t->dev->st.tap_replacements, 1);
    for (unsigned i = 0; i < PAIRS; i++) {
        vn_dev_set_tap(t->dev, i, t->old[i][0]);
        close(c.fds[i]);
    }
}

/* A timed-out request does not linger and spoil the next one: a later
 * request installs its own fds, and only those. */
static void test_request_after_a_timeout(void **state)
{
    struct tfx *t = *state;
    int stale[1] = { new_fd() };
    assert_int_equal(vn_dev_replace_taps(t->dev, stale, 1, 10), -ETIMEDOUT);
    assert_true(request_posted(t->dev, 0));
    struct replace_call c = { .dev = t->dev, .fds = { new_fd(), new_fd() }, .n = PAIRS };
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, replace_thread, &c), 0);
    assert_true(request_posted(t->dev, LONG_MS));
    vn_dev_apply_requested_taps(t->dev);
    assert_int_equal(pthread_join(th, NULL), 0);
    assert_int_equal(c.ret, 0);
    for (unsigned i = 0; i < PAIRS; i++)
        assert_int_equal(t->dev->qp[i].tap_fd, c.fds[i]);
    for (unsigned i = 0; i < PAIRS; i++) {
        vn_dev_set_tap(t->dev, i, t->old[i][0]);
        close(c.fds[i]);
    }
    close(stale[0]);
}

/* Two callers at once: the second waits for the first request to be
 * applied instead of overwriting it, so each caller's success means its own
 * fds were installed (the first one then closes the TAP it replaced). */
static void test_concurrent_requests_are_applied_in_turn(void **state)
{
    struct tfx *t = *state;
    struct replace_call a = { .dev = t->dev, .fds = { new_fd(), new_fd() }, .n = PAIRS };
    struct replace_call b = { .dev = t->dev, .fds = { new_fd(), new_fd() }, .n = PAIRS };
    pthread_t ta, tb;
    assert_int_equal(pthread_create(&ta, NULL, replace_thread, &a), 0);
    assert_true(request_posted(t->dev, LONG_MS));
    assert_int_equal(pthread_create(&tb, NULL, replace_thread, &b), 0);
    /* Give b time to reach the device; it must not post while a is pending. */
    usleep(100 * 1000);
    assert_false(request_posted(t->dev, 0));
    vn_dev_apply_requested_taps(t->dev);
    assert_int_equal(pthread_join(ta, NULL), 0);
    assert_int_equal(a.ret, 0);
    for (unsigned i = 0; i < PAIRS; i++)
        assert_int_equal(t->dev->qp[i].tap_fd, a.fds[i]);
    assert_true(request_posted(t->dev, LONG_MS));
    vn_dev_apply_requested_taps(t->dev);
    assert_int_equal(pthread_join(tb, NULL), 0);
    assert_int_equal(b.ret, 0);
    for (unsigned i = 0; i < PAIRS; i++)
        assert_int_equal(t->dev->qp[i].tap_fd, b.fds[i]);
    assert_int_equal(t->dev->st.tap_replacements, 2);
    for (unsigned i = 0; i < PAIRS; i++) {
        vn_dev_set_tap(t->dev, i, t->old[i][0]);
        close(a.fds[i]);
        close(b.fds[i]);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_timed_out_request_is_never_installed, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_request_in_time_is_installed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_request_after_a_timeout, setup, teardown),
        cmocka_unit_test_setup_teardown(test_concurrent_requests_are_applied_in_turn, setup,
                                        teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
