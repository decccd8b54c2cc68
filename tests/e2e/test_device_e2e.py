"""End to end: our vfio-user virtio-net device under QEMU with a Linux guest.

The real stack: the ``vfiouser-net serve`` daemon on a TAP in a fresh
network namespace, QEMU 11.1 (TCG, 2 vCPUs) attaching it with
``-device vfio-user-pci``, and the Linux 6.12 guest's own virtio_net driver.
The tests share one stack (see device_fixtures.py) and run in file order;
each starts from the stack's known state, so any of them also runs alone.

iperf3 byte accounting (TCP): the sender's ``sum_sent.bytes`` counts what
it wrote into its socket, the receiver's ``sum_received.bytes`` what it read
before the test ended, so received <= sent and the difference is what was
still in flight (socket buffers, the rings); the client's JSON carries the
server's figures as exchanged at the end, and those must equal the server's
own report exactly. On top of iperf3's view, the TAP's own counters must
have seen at least the payload go through the device.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable

import pytest
from vfiouser_net_harness.iperf import run_iperf3

from tests.e2e.device_fixtures import (
    DEVICE_MAC,
    DEVICE_MTU,
    DeviceStack,
    device_stack_fixture,  # noqa: F401 (fixture "device_stack")
    stack_fixture,  # noqa: F401 (fixture "stack")
)

log = logging.getLogger(__name__)

pytestmark = pytest.mark.e2e

PING_COUNT = 20
IPERF_SECONDS = 3
NEW_MAC = "52:54:00:aa:bb:cc"
FOREIGN_MAC = "02:00:00:de:ad:01"  # unicast, locally administered, nobody's
FRAMES = 40
FILTER_NOISE = 4  # other frames to the guest (e.g. the host's unicast ARP probes)
REBINDS = 10
IFF_PROMISC = 0x100
# The daemon's log lines (vfiouser_net/device.py) that some tests count.
DRIVER_READY = ": driver ready ("
CLIENT_CONNECTED = ": client connected"
CLIENT_LOST = ": reset (client lost)"

# Sends raw Ethernet frames on an interface (argv: ifname, dst MAC, count).
_SEND_FRAMES = r"""
import socket, sys
ifname, dst, count = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", "")), int(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
src = s.getsockname()[4]
frame = dst + src + b"\x88\xb5" + b"vfiouser-net e2e".ljust(46, b"\0")
for _ in range(count):
    s.send(frame)
"""


def log_count(stack: DeviceStack, text: str) -> int:
    """How many lines of the daemon's log contain text."""
    return sum(text in line for line in stack.require_server().log().splitlines())


def send_frames(stack: DeviceStack, dst_mac: str, count: int) -> None:
    """Send count frames to dst_mac from the host side of the TAP."""
    stack.ns.run([sys.executable, "-c", _SEND_FRAMES, stack.tap.name, dst_mac, str(count)])


def guest_drops(stack: DeviceStack) -> dict[str, int]:
    """eth0's rx_dropped and tx_dropped in the guest."""
    out = stack.require_guest().check(
        "cat /sys/class/net/eth0/statistics/rx_dropped /sys/class/net/eth0/statistics/tx_dropped"
    )
    rx, tx = (int(v) for v in out.split())
    return {"rx_dropped": rx, "tx_dropped": tx}


def test_driver_mac_and_mtu(stack: DeviceStack) -> None:
    guest = stack.require_guest()
    dev = f"/sys/bus/pci/devices/{stack.pci_addr}"
    ids = guest.check(f"cat {dev}/vendor {dev}/device").split()
    assert ids == ["0x1af4", "0x1041"], ids
    # virtio-pci owns the PCI function, virtio_net the virtio device behind eth0.
    pci_driver = guest.check(f"readlink {dev}/driver").strip()
    assert pci_driver.endswith("/virtio-pci"), pci_driver
    netdev_device = guest.check("readlink -f /sys/class/net/eth0/device").strip()
    assert f"/{stack.pci_addr}/virtio" in netdev_device, netdev_device
    net_driver = guest.check("readlink /sys/class/net/eth0/device/driver").strip()
    assert net_driver.endswith("/virtio_net"), net_driver
    assert guest.check("cat /sys/class/net/eth0/address").strip() == DEVICE_MAC
    assert int(guest.check("cat /sys/class/net/eth0/mtu")) == DEVICE_MTU


def test_ping_no_loss(stack: DeviceStack) -> None:
    result = stack.ping_host(PING_COUNT)
    assert result.transmitted == PING_COUNT and result.lossless, result.output
    host = stack.ns.run(["ping", "-c", "5", "-i", "0.2", "-W", "5", stack.guest_addr], timeout=60)
    assert " 0% packet loss" in host.stdout, host.stdout


def test_iperf3_tcp_both_directions(
    stack: DeviceStack, record_property: Callable[[str, object], None]
) -> None:
    guest = stack.require_guest()
    figures = {}
    for direction in ("guest_tx", "guest_rx"):
        tap_before = stack.tap.stats()
        guest_before = guest_drops(stack)
        r = run_iperf3(guest, stack.ns, direction=direction, seconds=IPERF_SECONDS)
        tap_after = stack.tap.stats()
        guest_after = guest_drops(stack)
        drops = {
            **{f"tap_{k}": tap_after[k] - tap_before[k] for k in ("rx_dropped", "tx_dropped")},
            **{f"guest_{k}": guest_after[k] - guest_before[k] for k in guest_after},
        }
        # Data both ways, and received <= sent up to the one block per stream
        # iperf3 3.18's sender may leave out of its count (IperfResult).
        assert not r.inconsistencies(), r.inconsistencies()
        # The TAP counts whole frames: at least the payload went through it.
        # guest_tx: the host receives on the TAP (rx); guest_rx: it transmits (tx).
        key = "rx_bytes" if direction == "guest_tx" else "tx_bytes"
        tap_bytes = tap_after[key] - tap_before[key]
        assert tap_bytes >= r.received_bytes, (key, tap_bytes, r.summary())
        figures[direction] = {**r.summary(), f"tap_{key}": tap_bytes, **drops}
        record_property(f"iperf3_{direction}_gbps", round(r.receiver_gbps, 3))
        log.info(
            "iperf3 %s: sent %d B, received %d B (%.1f%%), %.1f Mbit/s, tap %s %d B, "
            "retransmits %s, drops %s",
            direction,
            r.sent_bytes,
            r.received_bytes,
            100.0 * r.received_bytes / r.sent_bytes,
            r.receiver_bps / 1e6,
            key,
            tap_bytes,
            r.retransmits,
            drops,
        )
    (stack.workdir / "iperf3.json").write_text(json.dumps(figures, indent=2))
    log.info("iperf3 figures: %s", json.dumps(figures))


def test_mac_address_change(stack: DeviceStack) -> None:
    guest = stack.require_guest()
    stack.ns.ip("neigh", "flush", "dev", stack.tap.name)
    try:
        # Live change (eth0 stays up): needs VIRTIO_NET_F_CTRL_MAC_ADDR.
        guest.check(f"ip link set eth0 address {NEW_MAC}")
        assert guest.check("cat /sys/class/net/eth0/address").strip() == NEW_MAC
        result = stack.ping_host(5)
        assert result.lossless, result.output
        neigh = stack.ns.ip("neigh", "show", stack.guest_addr, "dev", stack.tap.name).stdout
        log.info("host neighbour entry: %s", neigh.strip())
        assert f"lladdr {NEW_MAC}" in neigh, neigh
    finally:
        guest.run(f"ip link set eth0 address {DEVICE_MAC}", timeout=30)
        stack.ns.ip("neigh", "flush", "dev", stack.tap.name, check=False)
    result = stack.ping_host(3)
    assert result.lossless, result.output


def _count_delivered(stack: DeviceStack, dst_mac: str) -> int:
    """How many of FRAMES frames sent to dst_mac reach the guest's driver.

    The guest's rx_packets counts every frame the device hands to virtio_net,
    whatever its destination (the driver does not filter by MAC), so frames
    that do not show up there were filtered by the device. FRAMES frames to
    the guest's own MAC follow as a marker: the device handles the TAP in
    order, so once the count has reached FRAMES and stopped moving, the
    foreign frames have been delivered or dropped. Returns the delta minus
    the markers.
    """
    before = stack.rx_packets()
    send_frames(stack, dst_mac, FRAMES)
    send_frames(stack, DEVICE_MAC, FRAMES)
    deadline = time.monotonic() + 20
    last = -1
    while True:
        delta = stack.rx_packets() - before
        if (delta >= FRAMES and delta == last) or time.monotonic() > deadline:
            break
        last = delta
        time.sleep(0.3)
    assert delta >= FRAMES, f"the {FRAMES} frames to the guest's own MAC did not all arrive"
    log.info("to %s: guest rx_packets +%d (including %d markers)", dst_mac, delta, FRAMES)
    return delta - FRAMES


def _foreign_delivered_settled(stack: DeviceStack, want_delivered: bool) -> int:
    """Count foreign frames delivered until the result is the wanted one (or 10 s).

    virtio_net applies rx-mode changes from a work item, after ``ip link``
    has returned, so the device may see VIRTIO_NET_CTRL_RX_PROMISC a moment
    later.
    """
    deadline = time.monotonic() + 10
    while True:
        delivered = _count_delivered(stack, FOREIGN_MAC)
        ok = delivered >= FRAMES if want_delivered else delivered <= FILTER_NOISE
        if ok or time.monotonic() > deadline:
            return delivered


def test_promiscuous_mode(stack: DeviceStack) -> None:
    guest = stack.require_guest()
    delivered = _count_delivered(stack, FOREIGN_MAC)
    assert delivered <= FILTER_NOISE, f"promisc off: {delivered}/{FRAMES} foreign frames delivered"
    try:
        guest.check("ip link set eth0 promisc on")
        # (busybox ip does not name IFF_PROMISC: read the flags)
        assert int(guest.check("cat /sys/class/net/eth0/flags"), 16) & IFF_PROMISC
        delivered = _foreign_delivered_settled(stack, want_delivered=True)
        assert delivered >= FRAMES, f"promisc on: only {delivered}/{FRAMES} foreign frames"
    finally:
        guest.run("ip link set eth0 promisc off", timeout=30)
    delivered = _foreign_delivered_settled(stack, want_delivered=False)
    assert delivered <= FILTER_NOISE, f"promisc off again: {delivered}/{FRAMES} delivered"
    result = stack.ping_host(3)
    assert result.lossless, result.output


def test_operator_link_down_up(stack: DeviceStack) -> None:
    guest = stack.require_guest()
    try:
        stack.ns.ip("link", "set", stack.tap.name, "down")
        stack.wait_carrier(False, timeout=15)
        assert "NO-CARRIER" in guest.check("ip link show eth0")
        assert stack.require_server().alive()
    finally:
        stack.ns.ip("link", "set", stack.tap.name, "up")
    stack.wait_carrier(True, timeout=15)
    assert "NO-CARRIER" not in guest.check("ip link show eth0")
    result = stack.ping_host(5)
    assert result.lossless, result.output


def test_unbind_rebind_ten_times(stack: DeviceStack) -> None:
    guest = stack.require_guest()
    drv = "/sys/bus/pci/drivers/virtio-pci"
    addr = stack.pci_addr
    # A subshell: the console shell sources commands, so "exit" must not reach it.
    script = f"""(
i=0
while [ $i -lt {REBINDS} ]; do
  i=$((i+1))
  echo {addr} > {drv}/unbind || {{ echo "unbind $i failed"; exit 1; }}
  if [ -e /sys/class/net/eth0 ] || [ -e {drv}/{addr} ]; then
    echo "still bound after unbind $i"; exit 1
  fi
  echo {addr} > {drv}/bind || {{ echo "bind $i failed"; exit 1; }}
  [ -e /sys/class/net/eth0 ] || {{ echo "no eth0 after bind $i"; exit 1; }}
done
echo "rebinds done: $i"
)"""
    ready_before = log_count(stack, DRIVER_READY)
    t0 = time.monotonic()
    out = guest.check(script, timeout=240)
    log.info("%d unbind/bind cycles in %.1f s: %s", REBINDS, time.monotonic() - t0, out.strip())
    assert f"rebinds done: {REBINDS}" in out
    # Each bind was a full virtio initialisation (reset, features, DRIVER_OK) of our device.
    assert log_count(stack, DRIVER_READY) - ready_before == REBINDS, stack.require_server().log()
    assert (
        guest.check(f"readlink /sys/bus/pci/devices/{addr}/driver").strip().endswith("/virtio-pci")
    )
    assert guest.check("readlink /sys/class/net/eth0/device/driver").strip().endswith("/virtio_net")
    assert guest.check("cat /sys/class/net/eth0/address").strip() == DEVICE_MAC
    assert int(guest.check("cat /sys/class/net/eth0/mtu")) == DEVICE_MTU
    stack.configure_guest()
    result = stack.ping_host(10)
    assert result.lossless, result.output
    assert stack.require_server().alive()


def test_qemu_sigkill_then_reattach(stack: DeviceStack) -> None:
    server = stack.require_server()
    old = stack.require_guest()
    connected_before = log_count(stack, CLIENT_CONNECTED)
    lost_before = log_count(stack, CLIENT_LOST)
    old.kill()  # SIGKILL to QEMU's process group
    assert not old.alive
    deadline = time.monotonic() + 10
    while log_count(stack, CLIENT_LOST) == lost_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert log_count(stack, CLIENT_LOST) > lost_before, server.log()[-3000:]
    time.sleep(0.5)
    assert server.alive(), server.log()[-3000:]
    assert stack.socket_path.exists()
    new = stack.boot_guest()  # same socket, same daemon
    assert new is not old and server.alive()
    assert log_count(stack, CLIENT_CONNECTED) == connected_before + 1
    assert stack.require_guest().check("cat /sys/class/net/eth0/address").strip() == DEVICE_MAC
    result = stack.ping_host(10)
    assert result.lossless, result.output


def test_daemon_sigterm_exits_cleanly(stack: DeviceStack) -> None:
    """SIGTERM with a guest attached and passing traffic: exit 0, socket removed."""
    result = stack.ping_host(3)
    assert result.lossless, result.output
    server = stack.require_server()
    t0 = time.monotonic()
    code = server.stop(timeout=15)
    log.info("daemon exited %s after SIGTERM in %.1f s", code, time.monotonic() - t0)
    assert code == 0, server.log()[-3000:]
    assert not stack.socket_path.exists()
    # The guest is no longer connected to anything: drop it now (the next test
    # of the module, if any, gets a new daemon and guest from the fixture).
    # QEMU itself may already have quit: a guest access to a device whose
    # server is gone is an error QEMU may stop the VM on (no reconnect in
    # its vfio-user client); that is QEMU's choice, not ours to test.
    guest = stack.guest
    assert guest is not None
    log.info("QEMU %s after the daemon exited", "still runs" if guest.alive else "has quit")
    guest.close()


def ring_sizes(ethtool_g: str) -> dict[str, tuple[int, int]]:
    """``ethtool -g``: (rx, tx) of the pre-set maximums and the current sizes."""
    maximums, current = ethtool_g.split("Current hardware settings:")
    out = {}
    for key, text in (("max", maximums), ("current", current)):
        rx = re.search(r"^RX:\s+(\d+)", text, re.M)
        tx = re.search(r"^TX:\s+(\d+)", text, re.M)
        assert rx and tx, ethtool_g
        out[key] = (int(rx.group(1)), int(tx.group(1)))
    return out


def test_ring_resize_under_traffic(stack: DeviceStack) -> None:
    """``ethtool -G`` (VIRTIO_F_RING_RESET, virtio 2.6.1): Linux resets each
    queue, lays it out anew with the new size and enables it again, with a
    ping flood from the host running; the sizes stick, nothing is reset
    beyond the queues, and the link stays lossless after."""
    guest = stack.require_guest()
    features = guest.check("cat /sys/class/net/eth0/device/features").strip()
    assert features[40] == "1", f"RING_RESET not negotiated: {features}"
    before = ring_sizes(guest.check("ethtool -g eth0"))
    assert before == {"max": (256, 256), "current": (256, 256)}, before  # --queue-size default
    server = stack.require_server()
    resets_before = log_count(stack, "reset by the driver")
    flood = stack.ns.popen(["ping", "-f", "-w", "8", stack.guest_addr])
    try:
        for rx, tx in ((64, 128), (256, 32), (128, 256), (256, 256)):
            guest.check(f"ethtool -G eth0 rx {rx} tx {tx}")
            now = ring_sizes(guest.check("ethtool -g eth0"))
            assert now["current"] == (rx, tx), now
    finally:
        flood.wait(30)
    resets = log_count(stack, "reset by the driver") - resets_before
    # Each change resets the queues it resizes (one pair: rx, tx).
    assert resets >= 6, resets
    assert log_count(stack, "enabled again, 64 entries") >= 1
    assert log_count(stack, "DEVICE_NEEDS_RESET") == 0 and "needs reset" not in server.log()
    result = stack.ping_host(PING_COUNT)
    assert result.lossless, result.output


# ARP requests in 802.1Q frames from the host side of the TAP (argv: ifname,
# VLAN ID, target IP, count); prints how many tagged ARP replies came back.
# Built by hand: the host kernel may have no 8021q module.
_VLAN_ARP = r"""
import socket, struct, sys, time
ifname, vid, target, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((ifname, 0))
mac = s.getsockname()[4]
sender = socket.inet_aton("10.99.0.1")
arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, sender, b"\0" * 6,
                  socket.inet_aton(target))
frame = b"\xff" * 6 + mac + struct.pack("!HH", 0x8100, vid) + b"\x08\x06" + arp
replies = 0
s.settimeout(0.2)
for _ in range(count):
    s.send(frame.ljust(64, b"\0"))
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        try:
            f = s.recv(2048)
        except socket.timeout:
            continue
        # The kernel may strip the tag into metadata: match on the ARP reply.
        body = f[18:] if f[12:14] == b"\x81\x00" else f[14:]
        if f[12:14] in (b"\x81\x00", b"\x08\x06") and body[6:8] == b"\x00\x02":
            replies += 1
            break
print(replies)
"""


def test_vlan_filter(stack: DeviceStack) -> None:
    """CTRL_VLAN (virtio 5.1.9.5.3): Linux adds the VLANs configured on eth0
    to the device's filter table; 802.1Q frames of those reach the guest
    (its ARP replies come back), frames of any other VLAN are dropped and
    counted (``vlan_filter``)."""
    from tests.e2e.test_device_stats_e2e import counters

    guest = stack.require_guest()
    server = stack.require_server()
    features = guest.check("cat /sys/class/net/eth0/device/features").strip()
    assert features[19] == "1", f"CTRL_VLAN not negotiated: {features}"
    n = stack.ns.index

    def vlan_drops() -> int:
        return sum(q["rx"]["drops"]["vlan_filter"] for q in counters(server)["queues"])

    def arp(vid: int, target: str) -> int:
        out = stack.ns.run(
            [sys.executable, "-c", _VLAN_ARP, stack.tap.name, str(vid), target, "3"], timeout=60
        ).stdout
        return int(out.strip())

    guest.check(f"vconfig add eth0 100 && ip addr add 10.210.{n}.2/24 dev eth0.100 "
                "&& ip link set eth0.100 up")  # fmt: skip
    try:
        before = vlan_drops()
        assert arp(100, f"10.210.{n}.2") == 3
        assert vlan_drops() == before
        # VLAN 200 was never added in the guest: dropped by the device.
        assert arp(200, f"10.210.{n}.2") == 0
        assert vlan_drops() - before == 3
        # Untagged traffic is not affected.
        assert stack.ping_host(5).lossless
    finally:
        guest.run("vconfig rem eth0.100")
