"""Smoke test of the benchmark suite: ``bench/run.py --quick --only guest,cost``.

Runs the orchestrator as a user would (a separate process, into a temporary
directory) and checks what it produced, never how fast: results.json has
every expected key with finite, positive, sane numbers; results.png is a
PNG; the printed report has a table for each part and the targets. (The
device level has its own test, tests/e2e/test_device_level_bench.py.)

Clean-up also on failure: a watcher thread records every descendant of the
benchmark process (QEMUs and daemons run in sessions of their own, so a
process group kill would miss them) while it runs; on the way out the run
gets SIGTERM (it exits through its context managers), then whatever it
left (same PID and start time as recorded) gets SIGKILL, and the network
namespaces of the dead run are removed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vfiouser_net_harness.netns import cleanup_stale
from vfiouser_net_harness.scenarios import dpdk_testpmd

from tests.e2e.stack import check_prerequisites, require

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "bench" / "run.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_LIMIT_S = 900  # a hang guard only: the quick run takes a minute or two


# --- process bookkeeping --------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent PID, start time in ticks) of a live process, None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """Every live descendant of root: PID -> start time."""
    parents: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                parents.setdefault(st[0], []).append((int(entry.name), st[1]))
    out: dict[int, int] = {}
    todo = [root]
    while todo:
        for pid, start in parents.get(todo.pop(), []):
            if pid not in out:
                out[pid] = start
                todo.append(pid)
    return out


class Watched:
    """A benchmark process and everything it starts, killed for sure on close()."""

    def __init__(self, argv: list[str], stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        with stderr_path.open("w") as err:
            self.proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
                cwd=REPO,
            )
        self.seen: dict[int, int] = {}
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.is_set() and self.proc.poll() is None:
            self.seen.update(_descendants(self.proc.pid))
            self._stop.wait(0.5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.seen.update(_descendants(self.proc.pid))
            self.proc.send_signal(signal.SIGTERM)  # clean exit through its context managers
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                log.error("benchmark ignored SIGTERM; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._stop.set()
        self._watcher.join(timeout=10)
        for pid, start in self.seen.items():
            st = _stat(pid)
            if st is not None and st[1] == start:
                log.warning("killing leftover process %d of the benchmark", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        # The run's namespaces are named after its (now dead) PID.
        cleanup_stale()


@contextlib.contextmanager
def watched(argv: list[str], stderr_path: Path) -> Iterator[Watched]:
    w = Watched(argv, stderr_path)
    try:
        yield w
    finally:
        w.close()


# --- checks ---------------------------------------------------------------------------


def number(x: Any, what: str, lo: float = 0.0, hi: float = math.inf) -> float:
    """x is a finite number with lo < x < hi (lo excluded: positive by default)."""
    assert isinstance(x, int | float) and not isinstance(x, bool), f"{what}: {x!r} not a number"
    v = float(x)
    assert math.isfinite(v), f"{what}: {v} not finite"
    assert lo < v < hi, f"{what}: {v} not in ({lo}, {hi})"
    return v


def check_guest(guest: dict[str, Any]) -> None:
    for key in ("devices", "cpus", "seconds", "pairs", "streams", "latency_method", "tcp"):
        assert key in guest, f"guest.{key} missing"
    assert "ICMP echo" in guest["latency_method"]
    cases = {(r["pairs"], r["direction"], r["streams"]) for r in guest["tcp"]}
    assert cases == {(1, d, s) for d in ("guest_tx", "guest_rx") for s in (1, 4)}, cases
    # The DPDK vhost-user peer runs wherever dpdk-testpmd is installed.
    devs = ["ours", "qemu"] + (["dpdk"] if dpdk_testpmd() else [])
    assert sorted(guest["devices"]) == sorted(devs), guest["devices"]
    for r in guest["tcp"]:
        case = f"{r['direction']} x{r['streams']}"
        number(r["ours_gbps"], f"{case} vfiouser-net Gbit/s", 0.01, 100)
        number(r["qemu_gbps"], f"{case} QEMU Gbit/s", 0.01, 100)
        number(r["ratio"], f"{case} ratio", 0.0, 1000)
        for dev in devs:
            assert r[dev]["sent_bytes"] > 0 and r[dev]["received_bytes"] > 0, r[dev]
            number(r[dev]["backend_cores"], f"{case} {dev} back-end cores", 0.0, 64)
            number(r[dev]["gbps_per_core"], f"{case} {dev} Gbit/s per core", 0.0, 10000)
    assert [r["pairs"] for r in guest["latency"]] == [1]
    for r in guest["latency"]:
        for dev in devs:
            lat = r[dev]
            assert lat["received"] > 0, f"{dev}: no echo replies"
            assert lat["received"] + lat["lost"] == lat["count"]
            p50 = number(lat["p50_ms"], f"{dev} p50 ms", 0.0, 1000)
            p99 = number(lat["p99_ms"], f"{dev} p99 ms", 0.0, 1000)
            assert lat["min_ms"] <= p50 <= p99 <= lat["max_ms"], lat
        number(r["p50_ratio"], "p50 ratio", 0.0, 1000)
        number(r["p99_ratio"], "p99 ratio", 0.0, 1000)


def check_cost(cost: dict[str, Any]) -> None:
    rows = {r["pairs"]: r for r in cost["rows"]}
    assert sorted(rows) == [1, 16], sorted(rows)
    for pairs, r in rows.items():
        assert r["pairs_active"] == pairs, f"{r['pairs_active']} of {pairs} pairs up"
        for when in ("memory_idle", "memory_after_traffic"):
            m = r[when]
            rss = number(m["rss_mib"], f"{pairs} pairs {when} VmRSS MiB", 5, 1024)
            number(m["pss_mib"], f"{pairs} pairs {when} Pss MiB", 0, rss + 0.01)
            assert m["hwm_mib"] >= rss - 0.01, m
            assert m["threads"] >= 1, m
        number(r["rss_max_mib"], f"{pairs} pairs RSS max", 5, 1024)
        number(r["idle_cpu_percent"], "idle CPU %", -1e-9, 200)
        assert {x["direction"] for x in r["runs"]} == {"guest_tx", "guest_rx"}
        for x in r["runs"]:
            what = f"{pairs} pairs {x['direction']}"
            number(x["gbps"], f"{what} Gbit/s", 0.01, 100)
            assert x["packets"] > 0 and x["bytes"] > x["packets"], x
            number(x["cpu_s"], f"{what} CPU s")
            number(x["cpu_ns_per_packet"], f"{what} CPU ns per packet")
            number(x["doorbells_per_packet"], f"{what} doorbells per packet", -1e-9, 100)
            number(x["interrupts_per_packet"], f"{what} interrupts per packet", -1e-9, 100)


@pytest.mark.e2e
def test_bench_quick_guest_and_cost(tmp_path: Path) -> None:
    check_prerequisites()
    require(importlib.util.find_spec("matplotlib") is not None, "matplotlib not installed")
    out_dir = tmp_path / "results"
    argv = [sys.executable, str(RUN), "--quick", "--only", "guest,cost", "--out", str(out_dir)]
    stderr_path = tmp_path / "bench.stderr"
    with watched(argv, stderr_path) as w:
        try:
            stdout, _ = w.proc.communicate(timeout=RUN_LIMIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"bench/run.py still running after {RUN_LIMIT_S} s (hung?)")
    stderr = stderr_path.read_text(errors="replace")
    assert w.proc.returncode == 0, (
        f"bench/run.py exited {w.proc.returncode}\nstdout:\n{stdout[-3000:]}\n"
        f"stderr:\n{stderr[-5000:]}"
    )

    results = json.loads((out_dir / "results.json").read_text())
    for key in ("machine", "source", "options", "guest", "cost", "targets", "duration_s"):
        assert key in results, f"{key} missing from results.json"
    assert "device" not in results
    for key in ("cpu", "cores", "kernel", "qemu"):
        assert results["machine"][key], f"machine.{key} empty"
    check_guest(results["guest"])
    check_cost(results["cost"])
    targets = results["targets"]
    assert len(targets) >= 4, targets
    for t in targets:
        assert set(t) >= {"target", "measured", "value", "ok"}, t
        if any(k in t["target"] for k in ("guest TCP", "latency", "RSS")):
            assert t["ok"] in (True, False), t  # measured in this run, whatever the mark
            number(t["value"], t["target"])
        else:
            assert t["ok"] is None and t["measured"] == "not run", t  # device level

    png = (out_dir / "results.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE), png[:16]
    assert len(png) > 10_000

    for heading in ("machine:", "source: commit", "### Guest level", "### Cost", "### Targets"):
        assert heading in stdout, f"{heading!r} not in the report:\n{stdout}"
    assert "### Device level" not in stdout
