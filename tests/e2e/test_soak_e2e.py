"""Soak: the 4-pair daemon with a real guest for ``--soak-seconds`` (default
300; ``VN_SOAK_SECONDS``), in cycles of

1. a new QEMU on the same daemon (the previous one SIGKILLed: a reconnect),
2. resources sampled at the same point of every cycle: the daemon's file
   descriptors, threads and anonymous memory,
3. mixed traffic: TCP to and from the guest with 4 streams and a ping
   stream, while the guest changes its channels (``ethtool -L``) and the
   steering policy moves on (SIGUSR1) every two seconds,
4. an account of every frame, once traffic stopped: what the TAP handed
   the device was placed in the guest's rings or dropped with a reason;
   what the guest sent reached the TAP or was dropped with a reason; the
   guest saw what the device placed.

Descriptors and threads must be the same in every cycle and the heap must
not grow beyond a small allowance after the first cycles.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import pytest
from vfiouser_net_harness.procstat import ProcStat, fd_targets, proc_stat

from tests.e2e.mq_fixtures import QUEUE_PAIRS, Counters, MQStack, _kill_group, deltas
from tests.e2e.mq_fixtures import mq_stack_fixture as mq_stack_fixture

log = logging.getLogger(__name__)

IPERF_PORT = 5201
TRAFFIC_SECONDS = 6
CHANGE_INTERVAL = 2.0
# Python's allocator and glibc's arenas settle within the first cycles;
# beyond that the heap may move by this much without it being a leak.
HEAP_ALLOWANCE_KIB = 4096


@dataclass
class Sample:
    cycle: int
    stat: ProcStat


def _guest_stats(stack: MQStack) -> dict[str, int]:
    out = stack.require_guest().check(
        "cd /sys/class/net/eth0/statistics && for f in rx_packets rx_dropped tx_packets "
        "tx_dropped; do echo $f $(cat $f); done"
    )
    return {k: int(v) for k, v in (line.split() for line in out.splitlines() if line.strip())}


def _tx_total(c: Counters) -> tuple[int, int]:
    """(sent to the TAP, dropped with a reason) over every pair."""
    sent = sum(c.packets("tx"))
    dropped = sum(int(n) for q in c.queues for n in q["tx"]["drops"].values())
    return sent, dropped


def _traffic(stack: MQStack, cycle: int) -> int:
    """TCP both ways and a ping stream with channel and steering changes;
    returns the changes made."""
    guest, ns = stack.require_guest(), stack.ns
    guest.check(f"iperf3 -s -D -p {IPERF_PORT}")
    guest.wait_until(f"netstat -ltn | grep -q ':{IPERF_PORT} '", timeout=10)
    pinger = ns.popen(
        ["ping", "-n", "-q", "-i", "0.01", "-w", str(4 * TRAFFIC_SECONDS), stack.guest_addr],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    changes = 0
    try:
        for reverse in (False, True):
            # iperf3's server in the guest sometimes exits after a transfer
            # that ended in an error (seen once in 14 cycles: the next client
            # was refused); frames are accounted separately, so start it again
            # and say so.
            if guest.run(f"netstat -ltn | grep -q ':{IPERF_PORT} '", timeout=30)[0]:
                log.warning("cycle %d: the guest's iperf3 server had exited; started again", cycle)
                guest.check(f"iperf3 -s -D -p {IPERF_PORT}")
                guest.wait_until(f"netstat -ltn | grep -q ':{IPERF_PORT} '", timeout=10)
            args = ["iperf3", "-c", stack.guest_addr, "-p", str(IPERF_PORT)]
            args += ["-t", str(TRAFFIC_SECONDS), "-P", "4", "-i", "0"]
            client = ns.popen(
                args + (["-R"] if reverse else []),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            try:
                end = time.monotonic() + TRAFFIC_SECONDS
                while time.monotonic() < end - 0.5:
                    time.sleep(CHANGE_INTERVAL)
                    changes += 1
                    stack.set_channels(1 + (cycle + changes) % QUEUE_PAIRS)
                    os.kill(stack.daemon_pid(), signal.SIGUSR1)
                out, err = client.communicate(timeout=TRAFFIC_SECONDS + 60)
                assert client.returncode == 0, f"iperf3 (reverse={reverse}): {err}\n{out[-1500:]}"
            finally:
                _kill_group(client)
    finally:
        _kill_group(pinger)
        guest.run("pkill iperf3", timeout=30)
    return changes


def _settled(stack: MQStack) -> tuple[Counters, dict[str, Any], dict[str, int]]:
    """Daemon counters, TAP and guest statistics once two readings agree."""
    last: tuple[Any, ...] | None = None
    deadline = time.monotonic() + 20
    while True:
        c, tap, g = stack.counters(), stack.tap_link_stats(), _guest_stats(stack)
        key = (tuple(c.packets("rx")), tuple(c.packets("tx")), tap["tx"]["packets"], g)
        if key == last or time.monotonic() > deadline:
            return c, tap, g
        last = key
        time.sleep(0.5)


def _account(
    before: tuple[Counters, dict[str, Any], dict[str, int]],
    after: tuple[Counters, dict[str, Any], dict[str, int]],
) -> dict[str, int]:
    c0, tap0, g0 = before
    c1, tap1, g1 = after
    tx0, txd0 = _tx_total(c0)
    tx1, txd1 = _tx_total(c1)
    return {
        # host -> guest
        "tap_handed": int(tap1["tx"]["packets"]) - int(tap0["tx"]["packets"]),
        "placed": sum(deltas(c0.packets("rx"), c1.packets("rx"))),
        "rx_dropped": sum(c1.rx_drops().values()) - sum(c0.rx_drops().values()),
        "guest_received": g1["rx_packets"] - g0["rx_packets"] + g1["rx_dropped"] - g0["rx_dropped"],
        # guest -> host
        "guest_sent": g1["tx_packets"] - g0["tx_packets"],
        "to_tap": tx1 - tx0,
        "tx_dropped": txd1 - txd0,
        "tap_took": int(tap1["rx"]["packets"])
        - int(tap0["rx"]["packets"])
        + int(tap1["rx"]["dropped"])
        - int(tap0["rx"]["dropped"]),
    }


def test_soak(mq_stack: MQStack, request: pytest.FixtureRequest) -> None:
    seconds = float(request.config.getoption("--soak-seconds"))
    stack = mq_stack
    pid = stack.daemon_pid()
    samples: list[Sample] = []
    t_end = time.monotonic() + seconds
    cycle = 0
    totals = {"changes": 0, "frames": 0}
    while cycle < 2 or time.monotonic() < t_end:
        cycle += 1
        if cycle > 1:
            stack.require_guest().kill()  # the reconnect: a new QEMU
            stack.boot_guest()
        stack.set_channels(QUEUE_PAIRS)
        assert stack.daemon_pid() == pid, "the daemon was restarted"
        samples.append(Sample(cycle, proc_stat(pid)))
        log.info("cycle %d: %s", cycle, samples[-1].stat)
        before = _settled(stack)
        totals["changes"] += _traffic(stack, cycle)
        after = _settled(stack)
        acc = _account(before, after)
        log.info("cycle %d account: %s", cycle, acc)
        totals["frames"] += acc["tap_handed"] + acc["guest_sent"]
        assert acc["tap_handed"] > 1000 and acc["guest_sent"] > 1000, acc
        # Nothing the TAP handed over went missing in the device...
        assert acc["tap_handed"] == acc["placed"] + acc["rx_dropped"], acc
        # ...nor between the device and the guest's driver,
        assert acc["guest_received"] >= acc["placed"], acc
        # ...nor on the way out: the guest counts a frame when it gets the
        # buffer back, so the device saw at least as many.
        assert acc["to_tap"] + acc["tx_dropped"] >= acc["guest_sent"], acc
        assert acc["to_tap"] == acc["tap_took"], acc
        assert after[0].device("needs_reset") == 0, after[0].raw["device"]

    log.info(
        "soak: %d cycles in %.0f s, %d channel/steering changes, %d frames accounted",
        cycle,
        seconds,
        totals["changes"],
        totals["frames"],
    )
    first = samples[0].stat
    for s in samples[1:]:
        assert s.stat.fds == first.fds, (
            f"cycle {s.cycle}: {s.stat.fds} fds, cycle 1 had {first.fds}:\n"
            + "\n".join(fd_targets(pid))
        )
        assert s.stat.threads == first.threads, (s.cycle, s.stat, first)
    settled = samples[min(2, len(samples) - 1)].stat.rss_anon_kib
    grown = max(s.stat.rss_anon_kib for s in samples) - settled
    assert grown <= HEAP_ALLOWANCE_KIB, [str(s.stat) for s in samples]
