/* The process a device runs in, reduced to what serving it needs.
 *
 * A hostile guest or vfio-user client that finds a hole in the daemon (in a
 * parser, in libvfio-user, a race) gets the process it runs in: this makes
 * that process worth as little as possible. vn_sandbox_enter(), called once
 * the process holds every file it needs (the vfio-user socket, the TAP
 * queues) and before it starts any thread, in order:
 *  - its own file descriptor and data-segment budgets (setrlimit);
 *  - no new privileges (no setuid or file capabilities through exec);
 *  - no capabilities: effective, permitted, inheritable, ambient, and the
 *    bounding set as far as the process may drop it;
 *  - a seccomp allow-list of the system calls a running device makes. Any
 *    other call is refused with EPERM and logged (SIGSYS handler: a line on
 *    standard error, and a count, vn_sandbox_refused()), so a call missing
 *    from the list degrades one feature instead of killing the device, and
 *    an attacker's exec, ptrace or mount gets nowhere. On an architecture
 *    the filter was not built for, every call is fatal to the process.
 * Capabilities belong to threads: hence no thread may exist yet (the
 * seccomp filter itself is synchronised to all threads). */
#ifndef VN_SANDBOX_H
#define VN_SANDBOX_H

#include <stdint.h>

struct vn_sandbox_limits {
    uint64_t nofile;       /* RLIMIT_NOFILE; 0: unchanged */
    uint64_t data_bytes;   /* RLIMIT_DATA; 0: unchanged (ASan's shadow is data) */
};

/* 0, or -errno: -EBUSY when the process already has other threads. The
 * process is left as far as it got: a caller that fails should exit. */
int vn_sandbox_enter(const struct vn_sandbox_limits *lim);

/* System calls the filter refused so far (any thread). */
uint64_t vn_sandbox_refused(void);

#endif
