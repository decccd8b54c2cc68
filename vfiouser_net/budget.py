"""A sandboxed device process's budget: open files and private memory.

Why a watchdog besides the kernel's limits: at RLIMIT_NOFILE or RLIMIT_DATA
the kernel refuses the next file or allocation wherever it happens (a DMA_MAP's
fd silently cut from its message, a malloc in the datapath), and the process
limps on in a state nobody chose. Instead the watchdog ends the process, with a
log line and an exit code that names the budget, as soon as it is over; the
supervisor reports it and starts a fresh process for the next client. The
kernel's limits sit a headroom above the budget, as the backstop for growth
faster than the watchdog looks.

Memory is the private resident memory (RssAnon): what the process allocated
itself. Guest memory is shared with the client and does not count; it is the
client's to pay for.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEFAULT_NOFILE = 1024
DEFAULT_MEMORY_MIB = 256
# Between the budget and the kernel's limit: room for the process to go on
# while the watchdog notices, and to log and exit.
NOFILE_HEADROOM = 64
DATA_HEADROOM_MIB = 1024
CHECK_SECONDS = 0.2

# Exit codes a process over its budget ends with (the supervisor's reasons).
EXIT_NOFILE = 86
EXIT_MEMORY = 87
EXIT_REASONS = {EXIT_NOFILE: "nofile", EXIT_MEMORY: "memory"}


@dataclass(frozen=True)
class Budget:
    nofile: int = DEFAULT_NOFILE
    memory_mib: int = DEFAULT_MEMORY_MIB

    def validate(self) -> None:
        if not 16 <= self.nofile <= 1 << 20:
            raise ValueError(f"file budget {self.nofile} out of range 16..{1 << 20}")
        if not 16 <= self.memory_mib <= 1 << 20:
            raise ValueError(f"memory budget {self.memory_mib} MiB out of range 16..{1 << 20}")


def open_files() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # the listing's own


def private_memory_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def over_budget(budget: Budget) -> tuple[int, str] | None:
    """(exit code, why) when the process is over its budget, else None."""
    files = open_files()
    if files > budget.nofile:
        return EXIT_NOFILE, f"{files} open files, budget {budget.nofile}"
    kib = private_memory_kib()
    if kib > budget.memory_mib << 10:
        return EXIT_MEMORY, f"{kib >> 10} MiB of private memory, budget {budget.memory_mib} MiB"
    return None


def watch(budget: Budget, what: str) -> threading.Thread:
    """Start the watchdog thread: it ends the process when it is over budget."""

    def run() -> None:
        while True:
            time.sleep(CHECK_SECONDS)
            try:
                over = over_budget(budget)
            except OSError as exc:
                log.warning("%s: cannot read its usage: %s", what, exc)
                continue
            if over is not None:
                code, why = over
                log.error("%s: over its budget (%s): ending the process", what, why)
                for handler in logging.getLogger().handlers:
                    handler.flush()
                os._exit(code)

    t = threading.Thread(target=run, name="budget", daemon=True)
    t.start()
    return t
