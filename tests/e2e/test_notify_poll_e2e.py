"""Doorbell polling mode with a real QEMU and Linux guest: with
`--notify-mode poll` QEMU maps the notify page into the guest, so the
guest's doorbells are plain stores the workers poll. Traffic, control
commands (ethtool, promiscuous mode) and a reset work as in the default mode,
and the device sees almost no doorbells: the workers keep notifications off
and poll the rings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from vfiouser_net_harness import metrics
from vfiouser_net_harness.guest import Guest, GuestPaths
from vfiouser_net_harness.iperf import run_iperf3
from vfiouser_net_harness.netns import NetNS
from vfiouser_net_harness.scenarios import guest_on_vfiouser_net
from vfiouser_net_harness.server import Server

from tests.e2e.stack import require

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(guest_paths: GuestPaths) -> Iterator[tuple[Guest, NetNS, Server]]:
    require(not guest_paths.missing(), "guest image and QEMU")
    with guest_on_vfiouser_net(cpus=2, server_args=["--notify-mode", "poll"]) as s:
        yield s


def test_traffic_and_control_in_polling_mode(stack: tuple[Guest, NetNS, Server]) -> None:
    guest, ns, server = stack
    out = ns.run(["ping", "-q", "-c", "50", "-i", "0.02", ns.guest_addr()], timeout=60).stdout
    assert "50 received" in out, out
    for direction in ("guest_tx", "guest_rx"):
        # check=True: iperf3's sender and receiver byte counts agree.
        res = run_iperf3(guest, ns, direction=direction, seconds=3)
        assert res.receiver_bps > 0
    # Control queue commands go through the polled page as well.
    guest.check("ip link set eth0 promisc on && ip link set eth0 promisc off")
    guest.check("ethtool -C eth0 rx-usecs 20 rx-frames 8 && ethtool -C eth0 rx-usecs 0 rx-frames 0")
    totals = metrics.queue_totals(metrics.scrape(ns, server.metrics_url()))
    packets = totals["rx"]["packets"] + totals["tx"]["packets"]
    doorbells = totals["rx"]["doorbells"] + totals["tx"]["doorbells"]
    assert packets > 10_000, totals
    assert doorbells <= 0.01 * packets, totals


def test_driver_rebind_in_polling_mode(stack: tuple[Guest, NetNS, Server]) -> None:
    """A device reset (unbind and bind the driver) re-arms the page."""
    guest, ns, _ = stack
    guest.check("echo virtio0 > /sys/bus/virtio/drivers/virtio_net/unbind")
    guest.check("echo virtio0 > /sys/bus/virtio/drivers/virtio_net/bind")
    guest.wait_until("ip link show eth0", timeout=20)
    guest.check(f"ip addr add {ns.guest_addr()}/{ns.prefix_len} dev eth0; ip link set eth0 up")
    guest.wait_until("grep -qx 1 /sys/class/net/eth0/carrier", timeout=20)
    guest.wait_until(f"ping -c 1 -W 1 {ns.host_addr}", timeout=30)
