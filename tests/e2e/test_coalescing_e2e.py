"""Interrupt coalescing set from the guest (VIRTIO_NET_F_NOTF_COAL and
VIRTIO_NET_F_VQ_NOTF_COAL): the guest's ``ethtool -C`` changes the rate of
the interrupts it receives, in /proc/interrupts and in the device's own
counters, and a per-queue setting reaches only that queue.

Traffic: 300 ICMP echo requests from the host namespace at 5 ms intervals
(1.5 s), so without coalescing every request and every reply costs an
interrupt, and with a 100 ms hold only about one per 100 ms window remains.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from vfiouser_net_harness import metrics
from vfiouser_net_harness.guest import Guest, GuestPaths
from vfiouser_net_harness.netns import NetNS
from vfiouser_net_harness.scenarios import guest_on_vfiouser_net
from vfiouser_net_harness.server import Server

from tests.e2e.stack import require

pytestmark = pytest.mark.e2e

PINGS = 300
OFF = "rx-usecs 0 rx-frames 0 tx-usecs 0 tx-frames 1"


@pytest.fixture(scope="module")
def stack(guest_paths: GuestPaths) -> Iterator[tuple[Guest, NetNS, Server]]:
    require(not guest_paths.missing(), "guest image and QEMU")
    with guest_on_vfiouser_net(cpus=2) as s:
        yield s


def guest_irqs(guest: Guest, kind: str) -> int:
    """Interrupts of virtio-net queue 0 (`input` rx, `output` tx), all CPUs."""
    total = 0
    for line in guest.check("cat /proc/interrupts").splitlines():
        if re.search(rf"virtio\d+-{kind}\.0\b", line):
            total += sum(int(x) for x in line.split()[1:] if x.isdigit())
    return total


def device_queue0(ns: NetNS, server: Server) -> dict[str, dict[str, float]]:
    rows = metrics.scrape(ns, server.metrics_url())
    return {
        d: {
            "interrupts": metrics.value(rows, "queue_interrupts_total", queue="0", direction=d),
            "coalesced": metrics.value(
                rows, "queue_notifications_coalesced_total", queue="0", direction=d
            ),
            "max_packets": metrics.value(
                rows, "queue_coalesce_max_packets", queue="0", direction=d
            ),
            "max_usecs": metrics.value(rows, "queue_coalesce_max_usecs", queue="0", direction=d),
        }
        for d in ("rx", "tx")
    }


def interrupts_during_pings(
    stack: tuple[Guest, NetNS, Server], setting: str
) -> dict[str, dict[str, float]]:
    """Apply `ethtool -C eth0 <setting>`, ping, and count interrupts on
    both sides: guest {rx, tx} and device {rx, tx} (and coalesced)."""
    guest, ns, server = stack
    guest.check(f"ethtool -C eth0 {setting}")
    g0 = {"rx": guest_irqs(guest, "input"), "tx": guest_irqs(guest, "output")}
    d0 = device_queue0(ns, server)
    out = ns.run(
        ["ping", "-q", "-c", str(PINGS), "-i", "0.005", "-W", "2", ns.guest_addr()], timeout=60
    ).stdout
    assert f"{PINGS} received" in out, out
    g1 = {"rx": guest_irqs(guest, "input"), "tx": guest_irqs(guest, "output")}
    d1 = device_queue0(ns, server)
    return {
        "guest": {d: g1[d] - g0[d] for d in ("rx", "tx")},
        "device": {d: d1[d]["interrupts"] - d0[d]["interrupts"] for d in ("rx", "tx")},
        "coalesced": {d: d1[d]["coalesced"] - d0[d]["coalesced"] for d in ("rx", "tx")},
        "params": {d: (d1[d]["max_packets"], d1[d]["max_usecs"]) for d in ("rx", "tx")},
    }


def test_features_negotiated(stack: tuple[Guest, NetNS, Server]) -> None:
    guest = stack[0]
    # Bits 52 (VQ_NOTF_COAL) and 53 (NOTF_COAL) of the driver's features.
    bits = guest.check("cat /sys/class/net/eth0/device/features").strip()
    assert bits[52] == "1" and bits[53] == "1", bits
    assert "rx-usecs:\t0" in guest.check("ethtool -c eth0")


def test_rx_coalescing_changes_the_interrupt_rate(stack: tuple[Guest, NetNS, Server]) -> None:
    base = interrupts_during_pings(stack, OFF)
    assert base["params"]["rx"] == (0, 0)
    # Without coalescing each request is about one interrupt.
    assert base["guest"]["rx"] >= PINGS // 2, base
    assert base["coalesced"]["rx"] == 0, base

    held = interrupts_during_pings(stack, "rx-usecs 100000 rx-frames 1000")
    assert held["params"]["rx"] == (1000, 100000)
    # 1.5 s of traffic in 100 ms windows: about 15-30 interrupts.
    assert held["guest"]["rx"] <= base["guest"]["rx"] // 4, (base, held)
    assert held["device"]["rx"] <= base["device"]["rx"] // 4, (base, held)
    assert held["coalesced"]["rx"] >= PINGS // 2, held

    again = interrupts_during_pings(stack, OFF)
    assert again["params"]["rx"] == (0, 0)
    assert again["guest"]["rx"] >= PINGS // 2, again


def test_tx_coalescing_changes_the_interrupt_rate(stack: tuple[Guest, NetNS, Server]) -> None:
    base = interrupts_during_pings(stack, OFF)
    assert base["device"]["tx"] >= PINGS // 2, base
    held = interrupts_during_pings(stack, "tx-usecs 100000 tx-frames 1000")
    assert held["params"]["tx"] == (1000, 100000)
    assert held["device"]["tx"] <= base["device"]["tx"] // 4, (base, held)
    assert held["guest"]["tx"] <= base["guest"]["tx"] // 4, (base, held)
    assert held["coalesced"]["tx"] > 0, held
    interrupts_during_pings(stack, OFF)


def test_per_queue_setting_reaches_that_queue_only(stack: tuple[Guest, NetNS, Server]) -> None:
    guest, ns, server = stack
    guest.check(f"ethtool -C eth0 {OFF}")
    guest.check("ethtool --per-queue eth0 queue_mask 0x1 --coalesce rx-usecs 500 rx-frames 8")
    q0 = device_queue0(ns, server)
    assert (q0["rx"]["max_packets"], q0["rx"]["max_usecs"]) == (8, 500)
    assert (q0["tx"]["max_packets"], q0["tx"]["max_usecs"]) == (1, 0)
    shown = guest.check("ethtool --per-queue eth0 queue_mask 0x1 --show-coalesce")
    assert "rx-usecs: 500" in shown and "rx-frames: 8" in shown, shown
    # (A global `ethtool -C` equal to the driver's cached global values
    # sends nothing, so the queue is put back per queue.)
    guest.check("ethtool --per-queue eth0 queue_mask 0x1 --coalesce rx-usecs 0 rx-frames 0")
    q0 = device_queue0(ns, server)
    assert (q0["rx"]["max_packets"], q0["rx"]["max_usecs"]) == (0, 0)
