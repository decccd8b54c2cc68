"""What a running process holds, read from /proc: open file descriptors,
threads, resident memory and CPU time. Used to show that the daemon gives
back what a client, a guest or a fault made it take."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    fds: int
    threads: int
    rss_kib: int
    rss_anon_kib: int  # the heap: what a leak grows (RSS also holds guest RAM touched)
    cpu_seconds: float

    def __str__(self) -> str:
        return (
            f"{self.fds} fds, {self.threads} threads, {self.rss_kib / 1024:.1f} MiB RSS "
            f"({self.rss_anon_kib / 1024:.1f} MiB anonymous), {self.cpu_seconds:.2f} s CPU"
        )


def fd_targets(pid: int) -> list[str]:
    """What each open descriptor points to (for a message when counts differ)."""
    out = []
    for fd in sorted(Path(f"/proc/{pid}/fd").iterdir(), key=lambda p: int(p.name)):
        try:
            out.append(f"{fd.name} -> {os.readlink(fd)}")
        except OSError:
            continue
    return out


def proc_stat(pid: int) -> ProcStat:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.split()
    # Fields after the command name (which may hold spaces): utime, stime at 14, 15.
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return ProcStat(
        fds=fds,
        threads=threads,
        rss_kib=int(status["VmRSS"][0]),
        rss_anon_kib=int(status["RssAnon"][0]),
        cpu_seconds=cpu,
    )


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a map (NoNewPrivs, Seccomp, CapEff, ... as the kernel writes them)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out
