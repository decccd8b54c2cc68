"""Faults under load, end to end: a real QEMU and Linux guest on the 4-pair
daemon (the multiqueue stack of mq_fixtures.py), traffic running while

- QEMU is killed mid-transfer: the daemon frees everything the client had
  (worker threads, DMA regions, descriptors) and serves the next QEMU;
- the TAP is deleted and re-created: the guest sees the link go down and
  come back, and traffic resumes on the new TAP;
- the guest's driver is unbound and rebound;
- ``ethtool -L`` and a steering switch happen every second during a TCP
  transfer, which completes;
- the daemon gets SIGTERM: it exits 0 and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

from vfiouser_net_harness.guest import GuestError
from vfiouser_net_harness.procstat import fd_targets, proc_stat

from tests.e2e.mq_fixtures import (
    POLICIES,
    QUEUE_PAIRS,
    TAP_NAME,
    Counters,
    MQStack,
    _kill_group,
    deltas,
    mq_fixture,
    mq_stack_fixture,
)

__all__ = ["mq_fixture", "mq_stack_fixture"]

log = logging.getLogger(__name__)

IPERF_PORT = 5201


def _carrier(stack: MQStack, want: int, timeout: float = 15.0) -> None:
    stack.require_guest().wait_until(
        f'[ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" = {want} ]',
        timeout=timeout,
        interval=0.2,
    )


def _ping(stack: MQStack, count: int = 20) -> tuple[int, int]:
    """(sent, received) of pings from the namespace to the guest."""
    proc = stack.ns.run(
        ["ping", "-n", "-c", str(count), "-i", "0.05", "-W", "2", stack.guest_addr], check=False
    )
    sent = received = 0
    for line in proc.stdout.splitlines():
        if "packets transmitted" in line:
            parts = line.split()
            sent, received = int(parts[0]), int(parts[3])
    return sent, received


@contextlib.contextmanager
def _host_iperf(
    stack: MQStack, *, seconds: int, streams: int = 4, reverse: bool = False
) -> Iterator[subprocess.Popen[str]]:
    """iperf3 from the namespace to a server in the guest, in the background."""
    guest = stack.require_guest()
    guest.run("pkill iperf3", timeout=30)
    guest.check(f"iperf3 -s -D -p {IPERF_PORT}")
    guest.wait_until(f"netstat -ltn | grep -q ':{IPERF_PORT} '", timeout=10)
    args = ["iperf3", "-c", stack.guest_addr, "-p", str(IPERF_PORT), "-t", str(seconds)]
    args += ["-P", str(streams), "-J", "-i", "0"] + (["-R"] if reverse else [])
    proc = stack.ns.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        _kill_group(proc)
        # The guest may be gone with its QEMU (that is what some tests do).
        with contextlib.suppress(GuestError):
            if stack.guest is not None and stack.guest.alive:
                stack.guest.run("pkill iperf3", timeout=30)


def _iperf_result(proc: subprocess.Popen[str], timeout: float) -> dict[str, object]:
    out, err = proc.communicate(timeout=timeout)
    start = out.find("{")
    assert start >= 0, f"iperf3 printed no JSON (exit {proc.returncode}): {err}\n{out[-2000:]}"
    data: dict[str, object] = json.loads(out[start:])
    return data


def _wait_tap_traffic(stack: MQStack, frames: int, timeout: float = 30.0) -> None:
    """Until the TAP carried ``frames`` more frames either way (traffic flows)."""

    def total() -> int:
        s = stack.tap_link_stats()
        return int(s["tx"]["packets"]) + int(s["rx"]["packets"])

    base = total()
    deadline = time.monotonic() + timeout
    while total() - base < frames:
        assert time.monotonic() < deadline, f"fewer than {frames} frames on the TAP in {timeout} s"
        time.sleep(0.1)


def test_tap_deleted_and_recreated_under_traffic(mq: MQStack) -> None:
    pid = mq.daemon_pid()
    before = mq.counters()
    with _host_iperf(mq, seconds=60, streams=2) as client:
        _wait_tap_traffic(mq, 2000)
        mq.ns.ip("link", "del", TAP_NAME)
        t0 = time.monotonic()
        _carrier(mq, 0)
        log.info("guest saw the carrier go after %.2f s", time.monotonic() - t0)
        _kill_group(client)
    gone = mq.counters()
    assert gone.raw["tap_lost"] is True and gone.raw["link_up"] is False, gone.raw
    assert gone.device("tap_failures") > before.device("tap_failures")
    # A deleted TAP polls as readable forever: the workers must not spin on it.
    cpu0 = proc_stat(pid).cpu_seconds
    time.sleep(2.0)
    busy = (proc_stat(pid).cpu_seconds - cpu0) / 2.0
    assert busy < 0.3, f"daemon used {busy:.0%} CPU with its TAP deleted"

    # The operator re-creates it (same name, a new interface).
    mq.ns.add_tap(TAP_NAME, multi_queue=True)
    t0 = time.monotonic()
    _carrier(mq, 1)
    log.info("guest saw the carrier back after %.2f s", time.monotonic() - t0)
    back = mq.counters()
    assert back.raw["tap_lost"] is False and back.raw["link_up"] is True, back.raw
    assert back.device("tap_replacements") == before.device("tap_replacements") + 1
    mq.configure_guest()  # the new TAP has a new MAC: neighbour entries
    sent, received = _ping(mq)
    assert sent == 20 and received == 20, (sent, received)
    with _host_iperf(mq, seconds=3, streams=QUEUE_PAIRS) as client:
        res = _iperf_result(client, timeout=60)
    end = res["end"]
    assert isinstance(end, dict) and end["sum_received"]["bytes"] > 1_000_000, res.get("error")
    assert mq.counters().device("needs_reset") == before.device("needs_reset")


def test_qemu_killed_mid_transfer_then_next_qemu(mq: MQStack) -> None:
    pid = mq.daemon_pid()
    attached = proc_stat(pid)
    with _host_iperf(mq, seconds=60, reverse=True) as client:
        _wait_tap_traffic(mq, 2000)
        mq.require_guest().kill()  # SIGKILL, mid-transfer
        _kill_group(client)
    deadline = time.monotonic() + 15
    while mq.counters().raw["connected"]:
        assert time.monotonic() < deadline, "daemon still sees the killed QEMU"
        time.sleep(0.2)
    detached = proc_stat(pid)
    snap = mq.counters()
    log.info("attached: %s; after the kill: %s", attached, detached)
    # Every worker stopped, every DMA region unmapped, the client's descriptors closed.
    assert detached.threads == attached.threads - QUEUE_PAIRS, (attached, detached)
    assert snap.device("dma_maps") == snap.device("dma_unmaps"), snap.raw["device"]
    assert detached.fds < attached.fds, fd_targets(pid)

    mq.boot_guest()  # the next QEMU, same socket, same daemon
    assert mq.daemon_pid() == pid
    mq.set_channels(QUEUE_PAIRS)
    sent, received = _ping(mq)
    assert sent == 20 and received == 20, (sent, received)
    again = proc_stat(pid)
    assert again.threads == attached.threads, (attached, again)
    assert again.fds == attached.fds, "\n".join(fd_targets(pid))


def rx_accounting(stack: MQStack, before: Counters, tap_before: dict[str, Any]) -> dict[str, int]:
    """Host-to-guest frames since ``before``: what the TAP handed the device
    (tun counts a frame as transmitted when its reader takes it), and what
    the device did with them: placed in the guest's rings or dropped with a
    reason. Read once two snapshots agree (nothing in flight)."""
    last: tuple[int, int] | None = None
    deadline = time.monotonic() + 15
    while True:
        now, tap = stack.counters(), stack.tap_link_stats()
        placed = sum(deltas(before.packets("rx"), now.packets("rx")))
        dropped = sum(now.rx_drops().values()) - sum(before.rx_drops().values())
        taken = int(tap["tx"]["packets"]) - int(tap_before["tx"]["packets"])
        if (taken, placed + dropped) == last or time.monotonic() > deadline:
            return {"tap_taken": taken, "placed": placed, "dropped": dropped}
        last = (taken, placed + dropped)
        time.sleep(0.3)


def test_driver_unbind_rebind_during_traffic(mq: MQStack) -> None:
    guest = mq.require_guest()
    dev = guest.check("readlink -f /sys/class/net/eth0/device").strip()
    pci = os.path.basename(os.path.dirname(dev))
    drv = "/sys/bus/pci/drivers/virtio-pci"
    before, tap_before = mq.counters(), mq.tap_link_stats()
    flood = mq.ns.popen(
        ["ping", "-n", "-q", "-i", "0.002", "-w", "120", mq.guest_addr],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        for i in range(3):
            _wait_tap_traffic(mq, 300)
            guest.check(f"echo {pci} > {drv}/unbind")
            time.sleep(0.5)  # frames keep coming from the host meanwhile
            guest.check(f"echo {pci} > {drv}/bind")
            guest.wait_until("[ -e /sys/class/net/eth0 ]", timeout=20)
            mq.configure_guest()
            log.info("rebind %d done", i + 1)
    finally:
        _kill_group(flood)
    sent, received = _ping(mq)
    assert sent == 20 and received == 20, (sent, received)
    after = mq.counters()
    assert after.device("needs_reset") == before.device("needs_reset"), after.raw["device"]
    # Every frame the TAP handed over, across three resets, was placed or
    # dropped with a reason.
    acc = rx_accounting(mq, before, tap_before)
    log.info(
        "host-to-guest frames across three rebinds under a flood: %s; drops %s",
        acc,
        {k: v - before.rx_drops().get(k, 0) for k, v in mq.counters().rx_drops().items()},
    )
    assert acc["tap_taken"] > 300
    assert acc["tap_taken"] == acc["placed"] + acc["dropped"], acc
    assert mq.require_server().alive()


def test_channels_and_steering_every_second_during_transfer(mq: MQStack) -> None:
    before = mq.counters()
    seconds = 14
    switches = 0
    with _host_iperf(mq, seconds=seconds, streams=4) as client:
        _wait_tap_traffic(mq, 1000)
        pid = mq.daemon_pid()
        end = time.monotonic() + seconds - 3
        n = 0
        while time.monotonic() < end:
            n += 1
            mq.set_channels(1 + n % QUEUE_PAIRS)
            os.kill(pid, signal.SIGUSR1)
            switches += 1
            time.sleep(1.0)
        res = _iperf_result(client, timeout=seconds + 60)
    assert client.returncode == 0, res.get("error")
    end_ = res["end"]
    assert isinstance(end_, dict)
    received = int(end_["sum_received"]["bytes"])
    log.info("%d channel changes and steering switches; %d bytes received", switches, received)
    assert switches >= 8
    assert received > 5_000_000
    after = mq.counters()
    assert after.device("needs_reset") == before.device("needs_reset")
    assert after.device("steering_switches") > before.device("steering_switches")
    assert after.steering["policy"] in POLICIES
    sent, got = _ping(mq)
    assert sent == 20 and got == 20, (sent, got)


def test_sigterm_during_traffic_leaves_nothing(mq: MQStack) -> None:
    server = mq.require_server()
    pid = mq.daemon_pid()
    with _host_iperf(mq, seconds=60, streams=2, reverse=True) as client:
        _wait_tap_traffic(mq, 2000)
        t0 = time.monotonic()
        code = server.stop(timeout=15)
        log.info("daemon exited %s %.2f s after SIGTERM", code, time.monotonic() - t0)
        _kill_group(client)
    assert code == 0, server.log()[-3000:]
    assert not os.path.exists(f"/proc/{pid}"), "daemon process still there"
    assert not mq.socket_path.exists(), "socket left behind"
    # No process of the daemon's left in its namespace (no helper, no child).
    left = subprocess.run(
        ["ip", "netns", "pids", mq.ns.name], capture_output=True, text=True, check=False
    ).stdout.split()
    others = [p for p in left if p.isdigit() and "vfiouser" in _cmdline(int(p))]
    assert not others, others
    # A pre-created TAP outlives the daemon.
    assert mq.ns.run(["ip", "link", "show", TAP_NAME], check=False).returncode == 0
    # QEMU's vfio-user client has no reconnect: the guest is done (QEMU 11.1
    # may even abort on the lost socket); the next test gets a new stack.
    guest = mq.guest
    assert guest is not None
    guest.kill()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
