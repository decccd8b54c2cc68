"""Baseline: QEMU's built-in virtio-net-pci on a TAP in a fresh namespace.

Proves the end-to-end harness (netns + TAP, QEMU under TCG, the guest image
and its serial-console driver, iperf3 parsing) on a device we did not write,
and gives the reference figures that the vfio-user device is compared with.
QEMU runs inside the namespace (it opens the TAP there); vhost is off, so
the datapath is QEMU's userspace one.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from vfiouser_net_harness.guest import Guest
from vfiouser_net_harness.iperf import run_iperf3
from vfiouser_net_harness.netns import NetNS, Tap
from vfiouser_net_harness.scenarios import GUEST_MAC, builtin_virtio_net_args

log = logging.getLogger(__name__)

IPERF_SECONDS = 3


@pytest.mark.e2e
def test_builtin_virtio_net_baseline(
    netns_tap: tuple[NetNS, Tap],
    guest_factory: Callable[..., Guest],
    guest_kernel_version: str,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    ns, tap = netns_tap
    guest = guest_factory(netns=ns.name, cpus=2, extra_args=builtin_virtio_net_args(tap.name))
    log.info("guest booted in %.1f s", guest.boot_seconds or 0.0)

    assert guest.check("uname -r").strip() == guest_kernel_version

    # The virtio_net driver is bound to the device behind eth0.
    driver = guest.check("readlink /sys/class/net/eth0/device/driver")
    assert driver.strip().endswith("/virtio_net"), driver
    assert guest.check("cat /sys/class/net/eth0/address").strip() == GUEST_MAC

    guest.check(f"ip addr add {ns.guest_addr()}/{ns.prefix_len} dev eth0 && ip link set eth0 up")
    guest.wait_until("grep -qx up /sys/class/net/eth0/operstate", timeout=20)

    # Ping the host side, both ways, without loss.
    out = guest.check(f"ping -c 5 -i 0.2 -W 5 {ns.host_addr}", timeout=60)
    m = re.search(r"(\d+) packets transmitted, (\d+) packets received, (\d+)% packet loss", out)
    assert m is not None, out
    assert m.group(1) == m.group(2) == "5" and m.group(3) == "0", out
    host_ping = ns.run(["ping", "-c", "3", "-i", "0.2", "-W", "5", ns.guest_addr()], timeout=60)
    assert " 0% packet loss" in host_ping.stdout, host_ping.stdout

    # iperf3 TCP both directions; the two reports must agree.
    results = {}
    for direction in ("guest_tx", "guest_rx"):
        r = run_iperf3(guest, ns, direction=direction, seconds=IPERF_SECONDS)
        assert not r.inconsistencies(), r.inconsistencies()
        assert r.receiver_bps > 1e6, r.summary()
        results[direction] = r.summary()
        record_property(f"iperf3_{direction}_gbps", round(r.receiver_gbps, 3))
    summary = {
        "device": "qemu virtio-net-pci (userspace, vhost=off)",
        "guest_cpus": guest.cpus,
        "boot_seconds": round(guest.boot_seconds or 0.0, 1),
        "iperf3": results,
    }
    (tmp_path / "baseline.json").write_text(json.dumps(summary, indent=2))
    log.info("baseline: %s", json.dumps(summary))

    stats = tap.stats()
    assert stats["rx_packets"] > 0 and stats["tx_packets"] > 0, stats
