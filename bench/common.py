"""Small helpers shared by the benchmark parts: machine description, markdown
tables, percentiles, and SIGTERM turned into a clean exit (so the parts'
context managers remove their namespaces, QEMUs and daemons)."""

from __future__ import annotations

import math
import os
import platform
import signal
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType

from vfiouser_net_harness.guest import GuestPaths
from vfiouser_net_harness.server import Server

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def qemu_version() -> str:
    qemu = GuestPaths.from_cache().qemu
    try:
        out = subprocess.run(
            [str(qemu), "-version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError:
        return f"unknown (no QEMU at {qemu})"
    first = out.splitlines()[0] if out else "unknown"
    return first.removeprefix("QEMU emulator version ").strip()


def guest_kernel() -> str:
    f = GuestPaths.from_cache().kernel.parent / "KERNEL_VERSION"
    return f.read_text().strip() if f.is_file() else "unknown"


def machine() -> dict[str, str | int]:
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 0,
        "memory_gib": round(mem_kib / 2**20),
        "kernel": f"{platform.system()} {platform.release()}",
        "qemu": qemu_version(),
        "guest_kernel": guest_kernel(),
    }


def source() -> dict[str, object]:
    """What was measured: the commit and the files changed on top of it."""

    def git(*args: str) -> str:
        try:
            proc = subprocess.run(
                ["git", "-C", str(REPO), *args],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except OSError:
            return ""
        return proc.stdout.rstrip("\n") if proc.returncode == 0 else ""

    changed = [
        line[3:]
        for line in git("status", "--porcelain", "--", "vfiouser_net", "bench").splitlines()
    ]
    commit = git("rev-parse", "--short=12", "HEAD").strip() or "unknown"
    return {"commit": commit, "uncommitted": changed}


def source_line(src: dict[str, object]) -> str:
    changed = src.get("uncommitted") or []
    assert isinstance(changed, list)
    extra = f" + uncommitted changes in {len(changed)} file(s)" if changed else ""
    return f"source: commit {src.get('commit', 'unknown')}{extra}"


def machine_line(m: dict[str, str | int]) -> str:
    return (
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['kernel']}; "
        f"QEMU {m['qemu']}; guest Linux {m['guest_kernel']} under TCG"
    )


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def _stat_cpu(stat: str) -> float:
    fields = stat.rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread, also exited ones)."""
    return _stat_cpu(Path(f"/proc/{pid}/stat").read_text())


def threads_cpu_seconds(pid: int, skip: str) -> float:
    """utime + stime of the process's live threads whose name does not start
    with ``skip`` (QEMU's "CPU 0/TCG": the guest's own vCPUs)."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().startswith(skip):
                continue
            total += _stat_cpu((task / "stat").read_text())
        except OSError:
            continue
    return total


def daemon_pid(server: Server) -> int:
    """The PID of the daemon process itself (not an ``ip netns exec`` parent)."""
    assert server.proc is not None
    pid = server.proc.pid
    for candidate in [pid, *children(pid)]:
        if "vfiouser_net" in cmdline(candidate) and "serve" in cmdline(candidate):
            return candidate
    raise RuntimeError(f"no vfiouser-net daemon at PID {pid} or among its children")


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def times(x: float | None) -> str:
    """A ratio as "1.23x" ("n/a" when there is none)."""
    text = fmt(x)
    return text if text == "n/a" else f"{text}x"


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM/SIGHUP raise SystemExit: context managers tear everything down."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
