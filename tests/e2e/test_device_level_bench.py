"""The device-level benchmark (bench/device_level.py) in its quick mode: every
case runs, the numbers are sane and consistent with the daemon's own
counters, and nothing is left behind. Speed is not asserted.

Needs root, /dev/net/tun, iproute2, a C compiler and the project's native
module; under CI=true a missing one fails the test instead of skipping it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vfiouser_net_harness.netns import list_netns

from bench import device_level
from bench.device_level import ALL_CASES, NETNS_PREFIX, Case
from tests.e2e.stack import require

log = logging.getLogger(__name__)

pytestmark = pytest.mark.e2e

# Bounds of sanity, not of speed. A driver that kicks or a device that
# interrupts for every frame is at 1; EVENT_IDX should keep both well under.
MAX_PER_PACKET = 1.0


def _native_importable() -> bool:
    try:
        import vfiouser_net.native  # noqa: F401
    except Exception:
        return False
    return True


def _ours(name: str) -> bool:
    return name.startswith(NETNS_PREFIX) and name.endswith(f"-{os.getpid()}")


def _bench_children() -> list[int]:
    """Benchmark programs still running as our children."""
    bin_dir = str(device_level.cache_dir())
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            exe = os.readlink(proc / "exe")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == os.getpid() and exe.startswith(bin_dir):
                pids.append(int(proc.name))
    return pids


@pytest.fixture
def bench_env() -> Iterator[None]:
    require(os.geteuid() == 0, "needs root (network namespaces, TAP devices)")
    require(Path("/dev/net/tun").exists(), "/dev/net/tun missing")
    require(shutil.which("ip") is not None, "ip (iproute2) not installed")
    require(shutil.which(os.environ.get("CC", "cc")) is not None, "no C compiler (cc)")
    require(
        _native_importable(), f"vfiouser_net's native module does not import in {sys.executable}"
    )
    yield
    # Whatever happened, nothing of ours may survive the test.
    leftovers = [n for n in list_netns() if _ours(n)]
    children = _bench_children()
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for name in leftovers:
        log.error("removing leftover namespace %s", name)
        subprocess.run(["ip", "netns", "del", name], check=False)
    assert not leftovers, f"namespaces left behind: {leftovers}"
    assert not children, f"benchmark processes left behind: {children}"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_device_level_bench_quick(bench_env: None) -> None:
    raw: dict[Case, dict[str, Any]] = {}
    result = device_level.run(seconds=1.0, quick=True, raw_out=raw)
    log.info("\n%s", device_level.markdown(result, raw))

    # The published schema, exactly.
    assert set(result) == {"machine", "seconds", "rows", "scaling"}
    assert isinstance(result["machine"], str) and result["machine"]
    assert result["seconds"] == pytest.approx(1.0)
    assert set(result["scaling"]) == {"tx_64", "tx_1500", "rx_64", "rx_1500"}
    for key, value in result["scaling"].items():
        assert _finite(value) and value > 0, f"scaling {key}: {value}"
    rows = result["rows"]
    assert [(r["direction"], r["frame_bytes"], r["pairs"]) for r in rows] == [
        (c.direction, c.frame_bytes, c.pairs) for c in ALL_CASES
    ]
    for row in rows:
        case = Case(row["direction"], row["frame_bytes"], row["pairs"])
        # Transmit also batched through io_uring (this host has it: the
        # daemon's default; the sandbox test checks it is allowed).
        batched = {"batched"} if case.direction == "tx" else set()
        assert set(row) == {"direction", "frame_bytes", "pairs", "device", "ceiling", "ratio"} | (
            batched
        )
        if batched:
            b = row["batched"]
            assert set(b) == {"pps", "gbps", "ratio"} and b["pps"] > 0 and b["ratio"] > 0, b
        assert set(row["device"]) == {
            "pps",
            "gbps",
            "doorbells_per_packet",
            "interrupts_per_packet",
            "device_kicks_per_packet",
            "device_interrupts_per_packet",
        }
        assert set(row["ceiling"]) == {"pps", "gbps"}
        for part in ("device", "ceiling"):
            for key, value in row[part].items():
                assert _finite(value), f"{case}: {part}.{key} = {value}"
        assert row["device"]["pps"] > 0, case
        assert row["device"]["gbps"] > 0, case
        assert row["ceiling"]["pps"] > 0, case
        assert row["ceiling"]["gbps"] > 0, case
        assert _finite(row["ratio"]) and row["ratio"] > 0, case
        for key in (
            "doorbells_per_packet",
            "interrupts_per_packet",
            "device_kicks_per_packet",
            "device_interrupts_per_packet",
        ):
            value = row["device"][key]
            assert 0 < value <= MAX_PER_PACKET, f"{case}: {key} = {value}"

        # The driver's view against the daemon's counters over the same run.
        r = raw[case]
        drv, dev = r["device"]["driver"], r["device"]["device"]
        k = case.direction
        assert not drv["fatal"], f"{case}: driver failed: {drv}"
        assert drv["server_messages"] == 0, f"{case}: the server sent messages: {drv}"
        assert drv["foreign"] == 0 and drv["bad_frames"] == 0, f"{case}: {drv}"
        errors = [q["error"] for q in drv["per_queue"] if q["error"]]
        assert not errors, f"{case}: {errors}"
        driver_pkts = drv["total"]["packets"]
        device_pkts = dev[f"{k}_packets"]
        # Both counted every frame of the run, drain included: they agree
        # (rx: a frame the device published after the driver's drain gave
        # up would be the only difference).
        tolerance = 0.001 * driver_pkts + (0 if k == "tx" else 256 * case.pairs)
        assert abs(device_pkts - driver_pkts) <= tolerance, (
            f"{case}: driver {driver_pkts} packets, device {device_pkts}"
        )
        assert dev[f"{k}_kicks"] == drv["total"]["doorbells"], (
            f"{case}: driver sent {drv['total']['doorbells']} doorbells, "
            f"device counted {dev[f'{k}_kicks']}"
        )
        assert drv["total"]["interrupts"] <= dev[f"{k}_interrupts"], (
            f"{case}: driver saw {drv['total']['interrupts']} interrupts, "
            f"device sent {dev[f'{k}_interrupts']}"
        )
        if k == "tx":
            # No frame was lost on the way: the device wrote every one.
            assert dev.get("tx_drops", 0) == 0, f"{case}: {dev}"
        assert r["ceiling"]["host"]["errors"] == 0, f"{case}: {r['ceiling']['host']}"
