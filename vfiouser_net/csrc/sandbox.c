#include "sandbox.h"

#include <dirent.h>
#include <errno.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#if defined(__x86_64__)
#define VN_AUDIT_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define VN_AUDIT_ARCH AUDIT_ARCH_AARCH64
#endif

/* What a running device calls: its rings, TAP and eventfds, the vfio-user
 * socket, Python's runtime and threads, its metrics and admin sockets, a
 * capture file. Not there, among others: exec, ptrace and other processes'
 * memory, mount and namespaces, bpf, modules, keys, perf, userfaultfd,
 * set*id, mkdir/chmod/chown, io_uring_setup: nothing a device needs once
 * it runs. */
static const int allowed[] = {
    SYS_read, SYS_write, SYS_readv, SYS_writev, SYS_pread64, SYS_pwrite64,
    SYS_recvmsg, SYS_sendmsg, SYS_recvfrom, SYS_sendto, SYS_recvmmsg, SYS_sendmmsg,
    SYS_ppoll, SYS_pselect6, SYS_epoll_create1, SYS_epoll_ctl, SYS_epoll_pwait,
    SYS_eventfd2, SYS_futex, SYS_set_robust_list, SYS_get_robust_list, SYS_rseq,
    SYS_clone, SYS_clone3, SYS_exit, SYS_exit_group, SYS_set_tid_address,
    SYS_restart_syscall, SYS_mmap, SYS_munmap, SYS_mremap, SYS_mprotect, SYS_madvise,
    SYS_brk, SYS_msync, SYS_close, SYS_close_range, SYS_dup, SYS_dup3, SYS_fcntl, SYS_ioctl,
    SYS_lseek, SYS_fstat, SYS_newfstatat, SYS_statx, SYS_fstatfs, SYS_getdents64,
    SYS_readlinkat, SYS_openat, SYS_faccessat, SYS_faccessat2, SYS_getcwd,
    SYS_socket, SYS_socketpair, SYS_bind, SYS_listen, SYS_accept4, SYS_connect,
    SYS_getsockname, SYS_getpeername, SYS_getsockopt, SYS_setsockopt, SYS_shutdown,
    SYS_rt_sigaction, SYS_rt_sigprocmask, SYS_rt_sigreturn, SYS_sigaltstack,
    SYS_rt_sigtimedwait, SYS_tgkill, SYS_getpid, SYS_gettid, SYS_getppid, SYS_getuid,
    SYS_geteuid, SYS_getgid, SYS_getegid, SYS_getgroups, SYS_getresuid, SYS_getresgid,
    SYS_clock_gettime, SYS_clock_getres, SYS_clock_nanosleep, SYS_nanosleep,
    SYS_gettimeofday, SYS_sched_yield, SYS_sched_getaffinity, SYS_getpriority,
    SYS_getrandom, SYS_uname, SYS_sysinfo, SYS_prlimit64, SYS_getrlimit, SYS_pipe2,
    SYS_memfd_create, SYS_ftruncate, SYS_fallocate, SYS_unlinkat, SYS_fsync,
    SYS_fdatasync, SYS_timerfd_create, SYS_timerfd_settime, SYS_timerfd_gettime,
    SYS_prctl, SYS_membarrier,
    /* The pairs' rings for batched TAP writes (tap_batch.h), created before
     * the filter and restricted to writes to their TAP and to replacing it.
     * io_uring_setup stays out: no ring without those restrictions. */
    SYS_io_uring_enter, SYS_io_uring_register,
#ifdef SYS_poll
    SYS_poll, SYS_select, SYS_epoll_wait, SYS_dup2, SYS_pipe, SYS_access, SYS_open,
    SYS_readlink, SYS_unlink, SYS_accept, SYS_getdents, SYS_time,
#endif
#ifdef SYS_epoll_pwait2
    SYS_epoll_pwait2,
#endif
};

static _Atomic uint64_t refused;

uint64_t vn_sandbox_refused(void)
{
    return atomic_load_explicit(&refused, memory_order_relaxed);
}

/* "vfiouser-net: sandbox refused system call N" without stdio: this runs in
 * a signal handler. */
static void log_refused(long nr)
{
    char line[64] = "vfiouser-net: sandbox refused system call ";
    size_t n = strlen(line);
    char digits[24];
    size_t d = 0;
    unsigned long v = nr < 0 ? 0 : (unsigned long)nr;
    do {
        digits[d++] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0 && d < sizeof(digits));
    while (d > 0 && n < sizeof(line) - 2)
        line[n++] = digits[--d];
    line[n++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, n);
    (void)w;
}

static void on_sigsys(int sig, siginfo_t *si, void *uctx)
{
    (void)sig;
    int saved_errno = errno;
    atomic_fetch_add_explicit(&refused, 1, memory_order_relaxed);
    log_refused(si->si_syscall);
    /* The refused call returns -EPERM to its caller. */
    ucontext_t *uc = uctx;
#if defined(__x86_64__)
    uc->uc_mcontext.gregs[REG_RAX] = -EPERM;
#elif defined(__aarch64__)
    uc->uc_mcontext.regs[0] = (unsigned long long)-EPERM;
#else
    (void)uc;
#endif
    errno = saved_errno;
}

static int single_threaded(void)
{
    DIR *d = opendir("/proc/self/task");
    if (d == NULL)
        return -errno;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n == 1 ? 0 : -EBUSY;
}

static int set_limit(int resource, uint64_t value)
{
    if (value == 0)
        return 0;
    struct rlimit rl = { .rlim_cur = value, .rlim_max = value };
    return setrlimit(resource, &rl) < 0 ? -errno : 0;
}

static int drop_capabilities(void)
{
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
        return -errno;
    /* Dropping from the bounding set needs CAP_SETPCAP: done while we still
     * have it; an unprivileged process has nothing there to lose. */
    for (int cap = 0; cap <= CAP_LAST_CAP; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL && errno != EPERM)
            return -errno;
    struct __user_cap_header_struct hdr = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof(data));
    if (syscall(SYS_capset, &hdr, data) < 0)
        return -errno;
    return 0;
}

#define STMT(code, k) ((struct sock_filter)BPF_STMT((code), (k)))
#define JUMP(code, k, jt, jf) ((struct sock_filter)BPF_JUMP((code), (k), (jt), (jf)))
#define N_ALLOWED (sizeof(allowed) / sizeof(allowed[0]))

static int install_filter(void)
{
    /* arch check (3), nr load (1), one compare per allowed call, and the
     * three returns. */
    struct sock_filter prog[3 + 1 + N_ALLOWED + 3];
    size_t n = 0;
#ifdef VN_AUDIT_ARCH
    prog[n++] = STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
    prog[n++] = JUMP(BPF_JMP | BPF_JEQ | BPF_K, VN_AUDIT_ARCH, 1, 0);
    prog[n++] = STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
    prog[n++] = STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
    for (size_t i = 0; i < N_ALLOWED; i++) {
        /* Match: jump to the ALLOW return right after the list. */
        prog[n] = JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)allowed[i],
                       (uint8_t)(N_ALLOWED - i), 0);
        n++;
    }
    prog[n++] = STMT(BPF_RET | BPF_K, SECCOMP_RET_TRAP);
    prog[n++] = STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
#else
    prog[n++] = STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
#endif
    struct sock_fprog fprog = { .len = (unsigned short)n, .filter = prog };
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &fprog) != 0)
        return errno != 0 ? -errno : -EBUSY;
    return 0;
}

int vn_sandbox_enter(const struct vn_sandbox_limits *lim)
{
    _Static_assert(N_ALLOWED < 250, "the jump offsets are 8 bits");
    int r = single_threaded();
    if (r < 0)
        return r;
    if ((r = set_limit(RLIMIT_NOFILE, lim->nofile)) < 0 ||
        (r = set_limit(RLIMIT_DATA, lim->data_bytes)) < 0)
        return r;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        return -errno;
    if ((r = drop_capabilities()) < 0)
        return r;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_sigsys;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSYS, &sa, NULL) < 0)
        return -errno;
    return install_filter();
}
