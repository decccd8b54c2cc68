"""End to end: VIRTIO_NET_F_DEVICE_STATS under the Linux 6.12 guest.

The daemon offers 2 queue pairs; the guest's virtio_net driver negotiates
DEVICE_STATS, asks for the statistic types at probe (VIRTIO_NET_CTRL_STATS
QUERY) and, for ``ethtool -S eth0``, sends one GET for every queue it uses
and the control queue. Its ``*_hw_*`` lines must be the device's own
counters, the ones the daemon logs on SIGUSR2 (and Prometheus scrapes):

    rx{i}_hw_packets / _bytes / _notifications / _interrupts
        = queues[i]["rx"]["packets" / "bytes" / "doorbells" / "interrupts"]
    tx{i}_hw_... likewise from queues[i]["tx"]
    rx_hw_* / tx_hw_* = their sums over the pairs in use
    cq_hw_command_num = device ctrl_ok + ctrl_err, cq_hw_ok_num = ctrl_ok

(Linux 6.12 shows the drop counters of the RX/TX basic blocks only through
the netlink per-queue statistics, not ``ethtool -S``; they are compared too
if a kernel shows them.)

After some iperf3 traffic both ways the link is made idle (traffic stopped,
neighbours pinned, no IPv6) and the two sides are read as a sandwich:
snapshot, ``ethtool -S``, snapshot. The device answers the GET between the
two snapshots and its counters only grow, so when the snapshots agree on
every per-queue counter (and differ by exactly that one control command)
nothing moved in between and ``ethtool -S`` must equal them exactly: no
tolerance. A frame that does slip through (some stray guest or host frame)
makes the snapshots differ, and the read is retried.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
from typing import Any

import pytest
from vfiouser_net_harness.guest import Guest
from vfiouser_net_harness.iperf import run_iperf3
from vfiouser_net_harness.netns import NetNS
from vfiouser_net_harness.scenarios import GUEST_MAC, TAP_NAME, guest_on_vfiouser_net
from vfiouser_net_harness.server import Server

from tests.e2e.stack import check_prerequisites

log = logging.getLogger(__name__)

pytestmark = pytest.mark.e2e

PAIRS = 2
IPERF_SECONDS = 2
IPERF_STREAMS = 4
SANDWICH_TRIES = 6
BASIC = ("packets", "bytes", "notifications", "interrupts")
# ethtool name suffix -> the daemon's per-direction counter.
SNAPSHOT_FIELD = {
    "packets": "packets",
    "bytes": "bytes",
    "notifications": "doorbells",
    "interrupts": "interrupts",
}
MALFORMED = ("bad_chain", "header_too_short", "frame_too_big")

_COUNTERS_RE = re.compile(r": counters (\{.*)$")
_ETHTOOL_RE = re.compile(r"^\s*([\w.-]+):\s+(\d+)\s*$", re.M)


def counters(server: Server, timeout: float = 10.0) -> dict[str, Any]:
    """One SIGUSR2 snapshot: the ``device NAME: counters {json}`` log line."""
    assert server.proc is not None
    before = sum(1 for ln in server.log().splitlines() if _COUNTERS_RE.search(ln))
    os.kill(server.proc.pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while True:
        found = [m.group(1) for ln in server.log().splitlines() if (m := _COUNTERS_RE.search(ln))]
        if len(found) > before:
            snap: dict[str, Any] = json.loads(found[-1])
            return snap
        assert time.monotonic() < deadline, f"no counters on SIGUSR2:\n{server.log()[-2000:]}"
        time.sleep(0.02)


def ethtool_stats(guest: Guest) -> dict[str, int]:
    out = guest.check("ethtool -S eth0")
    log.info("guest: ethtool -S eth0\n%s", out.rstrip())
    stats = {m.group(1): int(m.group(2)) for m in _ETHTOOL_RE.finditer(out)}
    assert stats, out
    return stats


def device_view(snap: dict[str, Any]) -> dict[str, int]:
    """What ``ethtool -S`` must show for the device, from a daemon snapshot."""
    want: dict[str, int] = {}
    for d in ("rx", "tx"):
        for name in (*BASIC, "drops", "drop_overruns" if d == "rx" else "drop_malformed"):
            want[f"{d}_hw_{name}"] = 0
        for i in range(PAIRS):
            s = snap["queues"][i][d]
            vals = {n: int(s[SNAPSHOT_FIELD[n]]) for n in BASIC}
            vals["drops"] = sum(int(v) for v in s["drops"].values())
            if d == "rx":
                vals["drop_overruns"] = int(s["drops"]["steer_backlog"])
            else:
                vals["drop_malformed"] = sum(int(s["drops"][r]) for r in MALFORMED)
            for name, v in vals.items():
                want[f"{d}{i}_hw_{name}"] = v
                want[f"{d}_hw_{name}"] += v
    dev = snap["device"]
    want["cq_hw_command_num"] = int(dev["ctrl_ok"]) + int(dev["ctrl_err"])
    want["cq_hw_ok_num"] = int(dev["ctrl_ok"])
    return want


def per_queue(snap: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in device_view(snap).items() if not k.startswith("cq_")}


def settle(server: Server, timeout: float = 20.0) -> dict[str, Any]:
    """A snapshot once two of them 0.5 s apart agree on every queue counter."""
    deadline = time.monotonic() + timeout
    last = counters(server)
    while True:
        time.sleep(0.5)
        now = counters(server)
        if per_queue(now) == per_queue(last):
            return now
        assert time.monotonic() < deadline, "the link never went idle"
        last = now


def make_idle(guest: Guest, ns: NetNS) -> None:
    """No background frames: neighbours pinned both ways, no IPv6."""
    tap_mac = ns.run(["cat", f"/sys/class/net/{TAP_NAME}/address"]).stdout.strip()
    guest.check(f"arp -s {ns.host_addr} {tap_mac}")
    guest.run("sysctl -qw net.ipv6.conf.all.disable_ipv6=1", timeout=30)
    ns.run(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"], check=False)
    ns.ip("neigh", "replace", ns.guest_addr(), "lladdr", GUEST_MAC, "dev", TAP_NAME,
          "nud", "permanent")  # fmt: skip


def sandwich(guest: Guest, server: Server) -> tuple[dict[str, Any], dict[str, int], dict[str, Any]]:
    """(before, ethtool -S, after) with nothing but the GET in between."""
    tries = []
    for _ in range(SANDWICH_TRIES):
        before = settle(server)
        stats = ethtool_stats(guest)
        after = counters(server)
        commands = (
            device_view(after)["cq_hw_command_num"] - device_view(before)["cq_hw_command_num"]
        )
        if per_queue(before) == per_queue(after) and commands == 1:
            return before, stats, after
        moved = {
            k: (v, per_queue(after)[k])
            for k, v in per_queue(before).items()
            if per_queue(after)[k] != v
        }
        tries.append(f"{commands} control commands, moved {moved}")
        log.info("sandwich retried: %s", tries[-1])
    raise AssertionError("the link never stayed idle around ethtool -S:\n" + "\n".join(tries))


@pytest.fixture(scope="module", name="stack")
def stack_fixture() -> Any:
    check_prerequisites()
    with guest_on_vfiouser_net(server_args=["--queue-pairs", str(PAIRS)]) as (guest, ns, server):
        yield guest, ns, server


def test_device_stats_negotiated_and_listed(stack: tuple[Guest, NetNS, Server]) -> None:
    guest, _ns, server = stack
    # The driver took the feature (bit 50 of the device's feature words).
    features = guest.check("cat /sys/class/net/eth0/device/features").strip()
    assert features[50] == "1", features
    assert re.search(r"Combined:\s+2\s*$", guest.check("ethtool -l eth0"), re.M)
    stats = ethtool_stats(guest)
    names = [f"cq_hw_{n}" for n in ("command_num", "ok_num")]
    for d in ("rx", "tx"):
        names += [f"{d}_hw_{n}" for n in BASIC]
        names += [f"{d}{i}_hw_{n}" for i in range(PAIRS) for n in BASIC]
    missing = [n for n in names if n not in stats]
    assert not missing, f"missing {missing} in ethtool -S:\n{sorted(stats)}"
    # One QUERY at probe and every GET answered; none refused.
    snap = counters(server)
    cmds = snap["device"]["ctrl_cmds"].get("8", {})
    assert cmds.get("0", [0, 0]) == [1, 0], cmds
    assert cmds.get("1", [0, 0])[0] >= 1 and cmds["1"][1] == 0, cmds
    assert "Failed to get hw stats" not in guest.check("dmesg")
    assert "command class 8 " not in server.log()


def test_ethtool_matches_daemon_counters(stack: tuple[Guest, NetNS, Server]) -> None:
    guest, ns, server = stack
    make_idle(guest, ns)
    start = settle(server)
    for direction in ("guest_tx", "guest_rx"):
        # Only traffic is wanted here: a short receive run under TCG can end
        # with much still in flight, which run_iperf3's own check refuses.
        result = run_iperf3(
            guest, ns, direction=direction, seconds=IPERF_SECONDS, streams=IPERF_STREAMS,
            check=False,
        )  # fmt: skip
        assert result.received_bytes > 0, result.summary()
    before, stats, after = sandwich(guest, server)
    want = device_view(after)
    log.info("ethtool -S eth0 (device part): %s", {k: stats.get(k) for k in sorted(want)})
    # Traffic went through: thousands of frames each way since the start.
    moved = {k: want[k] - device_view(start)[k] for k in ("rx_hw_packets", "tx_hw_packets")}
    assert min(moved.values()) > 1000, moved
    # Every device figure ethtool shows equals the daemon's, exactly.
    shown = {k: v for k, v in want.items() if k in stats}
    assert set(shown) >= {k for k in want if not re.search(r"_drop", k)}, sorted(stats)
    wrong = {k: (stats[k], v) for k, v in shown.items() if stats[k] != v}
    assert not wrong, f"ethtool -S != daemon (ethtool, daemon): {wrong}"
    # The guest driver's own kick counters are the doorbells the device
    # received for each queue.
    for d in ("rx", "tx"):
        for i in range(PAIRS):
            if f"{d}{i}_kicks" in stats:
                assert stats[f"{d}{i}_kicks"] == want[f"{d}{i}_hw_notifications"], (
                    d,
                    i,
                    stats[f"{d}{i}_kicks"],
                    want[f"{d}{i}_hw_notifications"],
                )
    assert before["device"]["ctrl_ok"] + 1 == after["device"]["ctrl_ok"]
