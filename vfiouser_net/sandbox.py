"""The process a device runs in, reduced to what serving it needs (see
csrc/sandbox.h): file descriptor and data budgets, no new privileges, no
capabilities, a seccomp allow-list whose refusals are logged and counted.

Entered once the process holds every file it needs and before it starts a
thread (capabilities belong to threads)."""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

from vfiouser_net.native import ffi, lib, vn_check

log = logging.getLogger(__name__)


class SandboxError(RuntimeError):
    pass


@dataclass(frozen=True)
class SandboxLimits:
    nofile: int = 0
    """RLIMIT_NOFILE (0: unchanged)."""
    data_bytes: int = 0
    """RLIMIT_DATA (0: unchanged; ASan's shadow memory counts as data)."""


def enter(limits: SandboxLimits) -> None:
    """Enter the sandbox; a SandboxError says which step failed and why.

    The process may be left half-way in: the caller should exit on error."""
    if limits.nofile < 0 or limits.data_bytes < 0:
        raise SandboxError("sandbox limits must not be negative")
    lim = ffi.new("struct vn_sandbox_limits *", (limits.nofile, limits.data_bytes))
    r = lib.vn_sandbox_enter(lim)
    if r == -errno.EBUSY:
        raise SandboxError(
            "the sandbox must be entered before the process starts a thread "
            f"({len(os.listdir('/proc/self/task'))} threads now)"
        )
    vn_check(r, "entering the sandbox failed", SandboxError)
    log.info(
        "sandbox entered: no new privileges, no capabilities, seccomp allow-list%s%s",
        f", at most {limits.nofile} files" if limits.nofile else "",
        f", at most {limits.data_bytes >> 20} MiB of data" if limits.data_bytes else "",
    )


def refused_syscalls() -> int:
    """System calls the sandbox refused so far (each also logged on stderr)."""
    return int(lib.vn_sandbox_refused())


def sanitizer_loaded() -> bool:
    """Whether AddressSanitizer runs in this process (its shadow memory is
    terabytes of private data: RLIMIT_DATA cannot apply)."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            return any("libasan" in line for line in f)
    except OSError:
        return False
