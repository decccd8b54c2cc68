#include "mem_guard.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* A slot is free while start is 0. Writers fill the other fields before they
 * publish start (release) and clear start before they change them, so the
 * handler, which may interrupt any thread, reads a consistent slot after an
 * acquire load of start. Slots change only on the context threads, while that
 * device's workers are paused, so a slot is not torn down under a fault of
 * its own device. */
struct guard_slot {
    _Atomic uintptr_t start;
    size_t len;
    size_t page_size;
    uint64_t *faults;
    int wake_fd;
};

static struct guard_slot slots[VN_MEM_GUARD_SLOTS];
static pthread_mutex_t slots_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction previous;
static pthread_once_t install_once = PTHREAD_ONCE_INIT;
static int install_err;

static void on_sigbus(int sig, siginfo_t *si, void *uctx)
{
    (void)uctx;
    int saved_errno = errno;
    uintptr_t addr = (uintptr_t)si->si_addr;
    for (size_t i = 0; i < VN_MEM_GUARD_SLOTS; i++) {
        struct guard_slot *s = &slots[i];
        uintptr_t start = atomic_load_explicit(&s->start, memory_order_acquire);
        if (start == 0 || addr < start || addr - start >= s->len)
            continue;
        uintptr_t page = start + (addr - start) / s->page_size * s->page_size;
        /* async-signal-safe in practice: both are plain system calls. */
        void *m = mmap((void *)page, s->page_size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (m == MAP_FAILED)
            break;
        __atomic_fetch_add(s->faults, 1, __ATOMIC_RELAXED);
        uint64_t one = 1;
        ssize_t w = write(s->wake_fd, &one, sizeof(one));
        (void)w;
        errno = saved_errno;
        return;
    }
    /* Not guest memory (or it could not be replaced): whoever handled SIGBUS
     * before us, or the default action, gets the fault when it repeats. */
    sigaction(sig, &previous, NULL);
    errno = saved_errno;
}

static void install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &previous) < 0)
        install_err = -errno;
}

int vn_mem_guard_install(void)
{
    pthread_once(&install_once, install);
    return install_err;
}

int vn_mem_guard_add(void *start, size_t len, size_t page_size, uint64_t *faults, int wake_fd)
{
    if (start == NULL || len == 0 || page_size == 0 || (uintptr_t)start % page_size != 0)
        return -EINVAL;
    int r = -ENOSPC;
    pthread_mutex_lock(&slots_lock);
    for (size_t i = 0; i < VN_MEM_GUARD_SLOTS; i++) {
        struct guard_slot *s = &slots[i];
        if (atomic_load_explicit(&s->start, memory_order_relaxed) != 0)
            continue;
        s->len = len;
        s->page_size = page_size;
        s->faults = faults;
        s->wake_fd = wake_fd;
        atomic_store_explicit(&s->start, (uintptr_t)start, memory_order_release);
        r = 0;
        break;
    }
    pthread_mutex_unlock(&slots_lock);
    return r;
}

void vn_mem_guard_remove(void *start)
{
    pthread_mutex_lock(&slots_lock);
    for (size_t i = 0; i < VN_MEM_GUARD_SLOTS; i++) {
        if (atomic_load_explicit(&slots[i].start, memory_order_relaxed) == (uintptr_t)start) {
            atomic_store_explicit(&slots[i].start, 0, memory_order_release);
            break;
        }
    }
    pthread_mutex_unlock(&slots_lock);
}
