"""vfiouser-net as a well-behaved guest sees it, through the tests' own
vfio-user client and spec-only virtio-pci driver: PCI identity and
capabilities, feature negotiation, queues and MSI-X, packets in both
directions through the TAP, the control queue (rx filter, MAC), link status,
device reset, reconnection, interrupts and EVENT_IDX suppression.

Every test has its own namespace, TAP and daemon (fixtures in conftest.py).
"""

from __future__ import annotations

import functools
import random
import shutil
import struct
import subprocess
import time
from collections.abc import Callable

import pytest
from vfiouser_net_harness import vfio_user_client as vu
from vfiouser_net_harness.virtio_pci_driver import (
    COMMON_CFGGENERATION,
    COMMON_DF,
    COMMON_DFSELECT,
    COMMON_MSIX,
    COMMON_Q_DESCLO,
    COMMON_Q_ENABLE,
    COMMON_Q_MSIX,
    COMMON_Q_SIZE,
    COMMON_Q_USEDLO,
    NET_HDR_SIZE,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_VNDR,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET,
    VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_ALLMULTI,
    VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_OK,
    VIRTIO_NET_S_LINK_UP,
    CfgType,
    NetHdr,
    VirtioNetDriver,
    VirtioPciTransport,
    bit,
    parse_virtio_caps,
    walk_capabilities,
)

from tests.protocol.support import (
    BROADCAST,
    ETH_P_ARP,
    ETH_P_IP,
    GUEST_FEATURES,
    GUEST_MAC,
    PEER_MAC,
    DeviceEnv,
    GuestSession,
    eth_frame,
    has_tag,
    mac_table,
    open_session,
    recv_tagged,
    require,
    tagged_frame,
    wait_used_idx,
)

CONFIG_VECTOR = 0
RX_VECTOR = 1
TX_VECTOR = 2

# --------------------------------------------------------------------------
# PCI identity and capabilities
# --------------------------------------------------------------------------


def test_pci_identity(env: DeviceEnv) -> None:
    c = env.connect()
    info = c.device_info()
    assert info.flags & vu.VFIO_DEVICE_FLAGS_PCI
    cfg = c.config_read(0, 64)
    vendor, device = struct.unpack_from("<HH", cfg, 0)
    assert (vendor, device) == (0x1AF4, 0x1041)  # virtio, modern id 0x1040 + net (1)
    rev_class = struct.unpack_from("<I", cfg, 0x08)[0]
    assert rev_class & 0xFF == 1, "virtio 1.x devices have revision >= 1"
    assert rev_class >> 8 == 0x020000, f"class code {rev_class >> 8:#08x}"
    sub_vendor = struct.unpack_from("<H", cfg, 0x2C)[0]
    assert sub_vendor == 0x1AF4
    assert struct.unpack_from("<H", cfg, 0x06)[0] & 0x10, "status: capability list"


STRUCTURE_CAPS = (CfgType.COMMON, CfgType.NOTIFY, CfgType.ISR, CfgType.DEVICE)
# Other virtio vendor capabilities a device may add (PCI config access,
# shared memory, vendor data).
OPTIONAL_CAPS = (CfgType.PCI, CfgType.SHARED_MEMORY, CfgType.VENDOR)


@pytest.mark.parametrize("pairs", [1, 4])
def test_capabilities(env_factory: Callable[..., DeviceEnv], pairs: int) -> None:
    env = env_factory("--queue-pairs", str(pairs), multi_queue=pairs > 1)
    c = env.connect()
    cfg = c.config_read(0, 256)
    all_vcaps, msix = parse_virtio_caps(cfg)
    ids = [cap_id for cap_id, _ in walk_capabilities(cfg)]
    assert ids.count(PCI_CAP_ID_MSIX) == 1
    # The four virtio structures, once each; anything else must be a known type.
    vcaps = [v for v in all_vcaps if v.cfg_type in STRUCTURE_CAPS]
    assert sorted(v.cfg_type for v in vcaps) == sorted(STRUCTURE_CAPS)
    others = [v.cfg_type for v in all_vcaps if v.cfg_type not in STRUCTURE_CAPS]
    assert all(t in OPTIONAL_CAPS for t in others), f"unexpected vendor capabilities {others}"
    # 4.1.4.8: a vendor data capability never carries virtio's own vendor id.
    for cap_id, off in walk_capabilities(cfg):
        if cap_id == PCI_CAP_ID_VNDR and cfg[off + 3] == CfgType.VENDOR:
            assert struct.unpack_from("<H", cfg, off + 4)[0] != 0x1AF4, f"at {off:#x}"
    assert ids.count(PCI_CAP_ID_VNDR) == len(all_vcaps)
    regions = {}
    for v in vcaps:
        if v.bar not in regions:
            regions[v.bar] = c.region_info(v.bar)
            regions[v.bar].close_fds()
        assert v.length > 0
        assert v.offset + v.length <= regions[v.bar].size, f"cap {v} outside its BAR"
        cap_len = cfg[v.cap_offset + 2]
        assert cap_len == (20 if v.cfg_type == CfgType.NOTIFY else 16)
    common = next(v for v in vcaps if v.cfg_type == CfgType.COMMON)
    assert common.length >= 0x38
    notify = next(v for v in vcaps if v.cfg_type == CfgType.NOTIFY)
    assert notify.notify_off_multiplier in (0, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)

    # MSI-X: a vector per queue (rx+tx per pair, control) plus the config vector.
    assert msix is not None
    t = VirtioPciTransport(c)
    try:
        assert struct.unpack("<H", t.device_config_read(8, 2))[0] == pairs
        assert msix.table_size == 2 * pairs + 2
        assert t.num_queues == 2 * pairs + 1
    finally:
        t.close()
    bar = c.region_info(msix.table_bar)
    bar.close_fds()
    assert msix.table_offset + 16 * msix.table_size <= bar.size
    assert msix.pba_bar == msix.table_bar or c.region_info(msix.pba_bar).size > msix.pba_offset
    assert c.irq_info(vu.VFIO_PCI_MSIX_IRQ_INDEX).count == msix.table_size


def test_vendor_capabilities_ignore_writes(env: DeviceEnv) -> None:
    c = env.connect()
    before = c.config_read(0, 256)
    offsets = [off for cap_id, off in walk_capabilities(before) if cap_id == PCI_CAP_ID_VNDR]
    structures = [
        v.cap_offset for v in parse_virtio_caps(before)[0] if v.cfg_type in STRUCTURE_CAPS
    ]
    assert len(structures) == 4
    rng = random.Random(0x1AF4)
    refused = 0
    for cap in offsets:
        cap_len = before[cap + 2]
        writes: list[tuple[int, bytes]] = [
            (cap + o, bytes([rng.randrange(256)])) for o in range(cap_len)
        ]
        writes += [(cap + o, rng.randbytes(4)) for o in range(0, cap_len, 4)]
        writes.append((cap, rng.randbytes(cap_len)))
        for off, data in writes:
            try:
                c.config_write(off, data)
            except vu.VfioUserError:
                refused += 1
    after = c.config_read(0, 256)
    for cap in offsets:
        # PCI_CFG's bar, offset, length and data are the driver's
        # (test_conformance_protocol.py): its header only.
        n = before[cap + 2] if cap in structures else 4
        assert after[cap : cap + n] == before[cap : cap + n], f"capability at {cap:#x} changed"
    assert walk_capabilities(after) == walk_capabilities(before)
    # PCI: a write to a read-only register has no effect; it is not an error.
    assert refused == 0, f"{refused} writes to read-only capabilities refused"
    # The device still works normally.
    assert c.config_read(0, 4) == before[:4]


# --------------------------------------------------------------------------
# Feature negotiation
# --------------------------------------------------------------------------


def _start_negotiation(t: VirtioPciTransport) -> int:
    t.reset()
    t.add_status(STATUS_ACKNOWLEDGE)
    t.add_status(STATUS_DRIVER)
    return t.device_features()


def test_feature_negotiation(env: DeviceEnv) -> None:
    c = env.connect()
    t = VirtioPciTransport(c)
    try:
        offered = _start_negotiation(t)
        assert offered & bit(VIRTIO_F_VERSION_1)
        for b in (VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_CTRL_VQ, VIRTIO_F_EVENT_IDX):
            assert offered & bit(b), f"feature bit {b} not offered"
        # device_feature beyond the 64 defined bits reads 0
        t.common_write(COMMON_DFSELECT, 4, 2)
        assert t.common_read(COMMON_DF, 4) == 0

        # A feature the device does not offer: FEATURES_OK does not stick.
        not_offered = next(
            b for b in (VIRTIO_NET_F_MQ, VIRTIO_F_RING_PACKED, 40, 41) if not offered & bit(b)
        )
        t.write_driver_features(offered | bit(not_offered))
        t.add_status(STATUS_FEATURES_OK)
        assert not t.status & STATUS_FEATURES_OK
        # ... and DRIVER_OK without FEATURES_OK is not accepted either.
        t.add_status(STATUS_DRIVER_OK)
        assert not t.status & STATUS_DRIVER_OK
        env.wait_log("FEATURES_OK refused: driver asked for features not offered")

        # Without VERSION_1 (a legacy driver): refused.
        _start_negotiation(t)
        t.write_driver_features(offered & ~bit(VIRTIO_F_VERSION_1))
        t.add_status(STATUS_FEATURES_OK)
        assert not t.status & STATUS_FEATURES_OK
        env.wait_log("FEATURES_OK refused: VERSION_1 not accepted")

        # A proper subset with VERSION_1: accepted, and the status reads back.
        _start_negotiation(t)
        want = offered & GUEST_FEATURES
        t.write_driver_features(want)
        t.add_status(STATUS_FEATURES_OK)
        assert t.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        # Driver features can no longer change after FEATURES_OK.
        t.write_driver_features(offered)
        t.common_write(0x08, 4, 0)
        assert t.common_read(0x0C, 4) == want & 0xFFFFFFFF
    finally:
        t.close()


# --------------------------------------------------------------------------
# Packets through the TAP
# --------------------------------------------------------------------------


def test_bring_up_and_tx_to_tap(session: GuestSession) -> None:
    drv = session.driver
    features = drv.bring_up()
    assert features & bit(VIRTIO_F_VERSION_1)
    assert drv.transport.status == (
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
    )
    cfg = drv.read_config()
    assert cfg.mac == GUEST_MAC
    assert cfg.mtu == 1500
    port = session.env.port
    for i, size in enumerate((60, 200, 1514)):
        tag = f"tx{i}".encode()
        frame = tagged_frame(BROADCAST, tag, src=GUEST_MAC, size=size)
        drv.send_packet(frame)
        got = port.recv(functools.partial(has_tag, tag=tag))
        assert got == frame, f"frame of {size} bytes not seen intact on the TAP"
    # Header in its own descriptor, frame split over several descriptors.
    frame = tagged_frame(PEER_MAC, b"split", src=GUEST_MAC, size=1514)
    drv.tx_block_size = 512
    drv.send_packet(frame, split_header=True)
    assert port.recv(lambda f: has_tag(f, b"split")) == frame


def _burst_tag(frame: bytes) -> bool:
    return len(frame) > 20 and frame[14:20] == b"VNT:bu"


@pytest.mark.parametrize("tap_io", ["io_uring", "writev"])
def test_tx_bursts_in_order_either_tap_io(
    env_factory: Callable[..., DeviceEnv], tap_io: str
) -> None:
    """``--tap-io``: 200 frames posted in bursts of 50 (doorbells posted, so
    the worker finds several at a time) reach the TAP intact and in order,
    batched through io_uring or one writev each; the snapshot (ctl show,
    metrics) says which."""
    env = env_factory("--tap-io", tap_io)
    assert env.counters()["tap_io"] == tap_io
    s = open_session(env)
    try:
        drv = s.driver
        drv.bring_up()
        sent: list[bytes] = []
        got: list[bytes] = []
        for burst in range(4):
            frames = [
                tagged_frame(BROADCAST, f"bu{burst}-{i}".encode(), src=GUEST_MAC, size=60 + 7 * i)
                for i in range(50)
            ]
            for f in frames:
                drv.send_packet(f, wait=False)
            drv.wait_tx_complete()
            sent += frames
            while len(got) < len(sent):
                frame = env.port.recv(_burst_tag)
                assert frame is not None, f"{len(got)} of {len(sent)} frames on the TAP"
                got.append(frame)
        assert got == sent
        assert env.counters()["queues"][0]["tx"]["packets"] >= len(sent)
        assert ("TAP writes batched through io_uring" in env.log()) == (tap_io == "io_uring")
    finally:
        s.close()


@pytest.mark.parametrize("inline", [True, False])
def test_sparse_tx_with_and_without_tx_inline(
    env_factory: Callable[..., DeviceEnv], inline: bool
) -> None:
    """``--tx-inline``: frames sent one at a time, the worker asleep in
    between, leave from the thread that got the doorbell (counted
    doorbells_inline) and reach the TAP intact; without it, none does."""
    env = env_factory(*(["--tx-inline"] if inline else []))
    s = open_session(env)
    try:
        drv = s.driver
        drv.bring_up()
        for i in range(10):
            time.sleep(0.05)  # longer than the worker's busy-poll: it sleeps
            frame = tagged_frame(BROADCAST, f"sp{i}".encode(), src=GUEST_MAC, size=90)
            drv.send_packet(frame)
            assert env.port.recv(functools.partial(has_tag, tag=f"sp{i}".encode())) == frame
        inline_doorbells = env.counters()["device"]["doorbells_inline"]
        assert (inline_doorbells >= 5) if inline else (inline_doorbells == 0), inline_doorbells
        # The threads that did it, by name (top -H, perf): the context
        # thread and the pair's worker.
        names = env.server.thread_names()
        assert {"vn-ctx", "vn-qp0"} <= set(names), names
    finally:
        s.close()


def _arp_request(sender_ip: str, target_ip: str) -> bytes:
    def ip4(a: str) -> bytes:
        return bytes(int(x) for x in a.split("."))

    arp = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, 1) + GUEST_MAC + ip4(sender_ip)
    arp += bytes(6) + ip4(target_ip)
    return eth_frame(BROADCAST, GUEST_MAC, ETH_P_ARP, arp)


@pytest.mark.parametrize("inline", [True, False])
def test_replies_placed_inline(env_factory: Callable[..., DeviceEnv], inline: bool) -> None:
    """``--tx-inline``: the namespace's kernel answers an ARP request inside
    the TAP write, so the thread that sent it finds the reply and places it
    too (counted rx_inline), the worker asleep throughout; every reply
    arrives intact either way."""
    env = env_factory(*(["--tx-inline"] if inline else []))
    s = open_session(env)
    try:
        drv = s.driver
        drv.bring_up()
        request = _arp_request(env.ns.guest_addr(0), env.ns.host_addr)
        tap_mac = bytes.fromhex(
            env.ns.run(["cat", f"/sys/class/net/{env.tap.name}/address"])
            .stdout.strip()
            .replace(":", "")
        )
        for _ in range(10):
            time.sleep(0.05)  # longer than the worker's busy-poll: it sleeps
            drv.send_packet(request)
            _, reply = drv.recv_packet(timeout=3)
            while struct.unpack_from("!H", reply, 12)[0] != ETH_P_ARP:
                _, reply = drv.recv_packet(timeout=3)  # IPv6 neighbour discovery
            assert reply[:12] == GUEST_MAC + tap_mac, reply.hex()
            assert struct.unpack_from("!H", reply, 20)[0] == 2, reply.hex()  # an ARP reply
            assert reply[22:28] == tap_mac, reply.hex()
        counters = env.counters()["device"]
        rx_inline = counters["rx_inline"]
        assert (rx_inline >= 5) if inline else (rx_inline == 0), counters
    finally:
        s.close()


def test_rx_from_tap(session: GuestSession) -> None:
    drv = session.driver
    drv.bring_up()
    port = session.env.port
    for i, (dst, size) in enumerate(((GUEST_MAC, 60), (BROADCAST, 400), (GUEST_MAC, 1514))):
        tag = f"rx{i}".encode()
        frame = tagged_frame(dst, tag, size=size)
        port.send(frame)
        hdr, got = drv.recv_packet(timeout=3)
        while not has_tag(got, tag):
            hdr, got = drv.recv_packet(timeout=3)
        assert got == frame
        h = NetHdr.unpack(hdr)
        assert h.num_buffers == 1
        assert h.gso_type == 0


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(int(x) for x in struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _answer(frame: bytes, guest_ip: bytes) -> bytes | None:
    """ARP reply or ICMP echo reply from the guest for ``frame``, if it asks."""
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == ETH_P_ARP:
        htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", frame, 14)
        sha, spa, _tha, tpa = frame[22:28], frame[28:32], frame[32:38], frame[38:42]
        if op != 1 or tpa != guest_ip:
            return None
        arp = struct.pack("!HHBBH", htype, ptype, hlen, plen, 2) + GUEST_MAC + guest_ip + sha + spa
        return eth_frame(sha, GUEST_MAC, ETH_P_ARP, arp)
    if ethertype == ETH_P_IP:
        ip = frame[14:]
        ihl = (ip[0] & 0xF) * 4
        total = struct.unpack_from("!H", ip, 2)[0]
        if ip[9] != 1 or ip[16:20] != guest_ip or ip[ihl] != 8:  # ICMP echo request
            return None
        icmp = bytearray(ip[ihl:total])
        icmp[0] = 0
        icmp[2:4] = b"\0\0"
        icmp[2:4] = struct.pack("!H", _checksum(bytes(icmp)))
        hdr = bytearray(ip[:ihl])
        hdr[12:16], hdr[16:20] = ip[16:20], ip[12:16]
        hdr[8] = 64
        hdr[10:12] = b"\0\0"
        hdr[10:12] = struct.pack("!H", _checksum(bytes(hdr)))
        return eth_frame(frame[6:12], GUEST_MAC, ETH_P_IP, bytes(hdr) + bytes(icmp))
    return None


def test_ping_from_namespace(session: GuestSession) -> None:
    """The kernel in the namespace pings the "guest", which the test plays:
    ARP and ICMP go through the TAP, the device and both queues."""
    require(shutil.which("ping") is not None, "ping (iputils) not installed")
    env = session.env
    drv = session.driver
    drv.bring_up()
    guest_ip = env.ns.guest_addr(0)
    ip_bytes = bytes(int(x) for x in guest_ip.split("."))
    ping = env.ns.popen(
        ["ping", "-c", "3", "-i", "0.2", "-W", "2", guest_ip],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    answered = 0
    try:
        deadline = time.monotonic() + 10
        while ping.poll() is None and time.monotonic() < deadline:
            if not drv.pairs[0].rx.has_used():
                time.sleep(0.002)
                continue
            _, frame = drv.recv_packet()
            reply = _answer(frame, ip_bytes)
            if reply is not None:
                drv.send_packet(reply)
                answered += 1
        out = ping.communicate(timeout=5)[0]
    finally:
        if ping.poll() is None:
            ping.kill()
            ping.wait()
    assert ping.returncode == 0, f"ping failed ({answered} frames answered):\n{out}"
    assert " 0% packet loss" in out
    assert answered >= 4  # one ARP reply and three echo replies


# --------------------------------------------------------------------------
# Control queue: rx filter, MAC address
# --------------------------------------------------------------------------

OTHER_UC = bytes.fromhex("02766e00aaaa")
LISTED_UC = bytes.fromhex("02766e00bbbb")
LISTED_MC = bytes.fromhex("01005e0000fb")
OTHER_MC = bytes.fromhex("01005e000001")


def test_mac_filter(session: GuestSession) -> None:
    drv = session.driver
    drv.bring_up()
    port = session.env.port
    # Promiscuous at start (like QEMU): anything passes.
    port.send(tagged_frame(OTHER_UC, b"promisc"))
    recv_tagged(drv, b"promisc")

    ack = drv.ctrl_command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\0")
    assert ack == VIRTIO_NET_OK
    ack = drv.ctrl_command(
        VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, mac_table([LISTED_UC], [LISTED_MC])
    )
    assert ack == VIRTIO_NET_OK

    # Dropped frames first, then one that passes: the device handles the TAP
    # queue in order, so seeing the later frame proves the earlier were dropped.
    port.send(tagged_frame(OTHER_UC, b"unlisted-uc"))
    port.send(tagged_frame(OTHER_MC, b"unlisted-mc"))
    for dst, tag in (
        (BROADCAST, b"bcast"),
        (GUEST_MAC, b"own"),
        (LISTED_UC, b"listed-uc"),
        (LISTED_MC, b"listed-mc"),
    ):
        port.send(tagged_frame(dst, tag))
        _, frame = drv.recv_packet(timeout=3)
        assert has_tag(frame, tag), f"expected the {tag!r} frame, got {frame[:40].hex()}"
    assert not drv.pairs[0].rx.has_used()

    # All-multicast lets the unlisted group through, not the unlisted unicast.
    assert drv.ctrl_command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, b"\1") == 0
    port.send(tagged_frame(OTHER_UC, b"unlisted-uc2"))
    port.send(tagged_frame(OTHER_MC, b"unlisted-mc2"))
    _, frame = drv.recv_packet(timeout=3)
    assert has_tag(frame, b"unlisted-mc2")

    # Promiscuous again: everything passes.
    assert drv.ctrl_command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\1") == 0
    port.send(tagged_frame(OTHER_UC, b"unlisted-uc3"))
    recv_tagged(drv, b"unlisted-uc3")
    # The three filtered frames were counted as such.
    rx_stats = session.env.final_counters()["queues"][0]["rx"]
    assert rx_stats["drops"]["mac_filter"] == 3


def test_mac_table_overflow(session: GuestSession) -> None:
    """More addresses than the device keeps (Linux sends its whole lists):
    accepted, and the device then lets every unicast (multicast) through."""
    drv = session.driver
    drv.bring_up()
    port = session.env.port
    assert drv.ctrl_command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\0") == 0
    many_uc = [bytes([2, 0x76, 0x6E, 1, i >> 8, i & 0xFF]) for i in range(200)]
    ack = drv.ctrl_command(
        VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, mac_table(many_uc, [])
    )
    assert ack == VIRTIO_NET_OK
    port.send(tagged_frame(OTHER_MC, b"mc-dropped"))
    port.send(tagged_frame(OTHER_UC, b"uc-overflow"))
    _, frame = drv.recv_packet(timeout=3)
    assert has_tag(frame, b"uc-overflow"), f"got {frame[:40].hex()}"
    many_mc = [bytes([1, 0, 0x5E, 0, i >> 8, i & 0xFF]) for i in range(200)]
    ack = drv.ctrl_command(
        VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, mac_table([LISTED_UC], many_mc)
    )
    assert ack == VIRTIO_NET_OK
    port.send(tagged_frame(OTHER_UC, b"uc-dropped"))
    port.send(tagged_frame(OTHER_MC, b"mc-overflow"))
    _, frame = drv.recv_packet(timeout=3)
    assert has_tag(frame, b"mc-overflow"), f"got {frame[:40].hex()}"


def test_ctrl_mac_addr_set(session: GuestSession) -> None:
    drv = session.driver
    drv.bring_up()
    env = session.env
    new_mac = bytes.fromhex("02766e00c0de")
    assert drv.read_config().mac == GUEST_MAC
    ack = drv.ctrl_command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, new_mac)
    assert ack == VIRTIO_NET_OK
    assert drv.read_config().mac == new_mac
    # The rx filter follows the new address.
    assert drv.ctrl_command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\0") == 0
    env.port.send(tagged_frame(GUEST_MAC, b"old-mac"))
    env.port.send(tagged_frame(new_mac, b"new-mac"))
    _, frame = drv.recv_packet(timeout=3)
    assert has_tag(frame, b"new-mac"), "the old MAC should no longer pass the filter"
    # The device transmits whatever source the driver writes.
    drv.send_packet(tagged_frame(BROADCAST, b"from-new", src=new_mac))
    got = env.port.recv(lambda f: has_tag(f, b"from-new"))
    assert got is not None and got[6:12] == new_mac


# --------------------------------------------------------------------------
# Link status
# --------------------------------------------------------------------------


def test_link_status(session: GuestSession) -> None:
    env = session.env
    drv = session.driver
    drv.bring_up()
    t = drv.transport
    assert drv.has(VIRTIO_NET_F_STATUS)
    assert drv.read_config().status & VIRTIO_NET_S_LINK_UP
    t.irq_count(CONFIG_VECTOR)
    gen = t.common_read(COMMON_CFGGENERATION, 1)

    env.set_link(False)
    assert t.wait_irq(CONFIG_VECTOR, 3), "no config interrupt on link down"
    assert not drv.read_config().status & VIRTIO_NET_S_LINK_UP
    assert t.common_read(COMMON_CFGGENERATION, 1) != gen
    env.wait_log("link down")

    env.set_link(True)
    assert t.wait_irq(CONFIG_VECTOR, 3), "no config interrupt on link up"
    assert drv.read_config().status & VIRTIO_NET_S_LINK_UP
    # Traffic flows again.
    env.port.send(tagged_frame(GUEST_MAC, b"after-link"))
    recv_tagged(drv, b"after-link")


# --------------------------------------------------------------------------
# Reset and reconnection
# --------------------------------------------------------------------------


def _assert_initial_common_cfg(t: VirtioPciTransport, max_size: int) -> None:
    assert t.status == 0
    assert t.common_read(COMMON_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
    t.common_write(0x08, 4, 0)
    assert t.common_read(0x0C, 4) == 0, "driver features survive a reset"
    t.common_write(0x08, 4, 1)
    assert t.common_read(0x0C, 4) == 0, "driver features survive a reset"
    for q in range(t.num_queues):
        t.select_queue(q)
        assert t.common_read(COMMON_Q_ENABLE, 2) == 0, f"queue {q} still enabled"
        assert t.common_read(COMMON_Q_SIZE, 2) == max_size, f"queue {q} size not reset"
        assert t.common_read(COMMON_Q_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
        assert t.common_read(COMMON_Q_DESCLO, 4) == 0
        assert t.common_read(COMMON_Q_USEDLO, 4) == 0


def _exchange(drv: VirtioNetDriver, env: DeviceEnv, tag: bytes, dst: bytes = GUEST_MAC) -> None:
    drv.send_packet(tagged_frame(BROADCAST, tag + b"-tx", src=GUEST_MAC))
    assert env.port.recv(lambda f: has_tag(f, tag + b"-tx")) is not None, "tx frame lost"
    env.port.send(tagged_frame(dst, tag + b"-rx"))
    recv_tagged(drv, tag + b"-rx")


def test_device_reset(session: GuestSession) -> None:
    env = session.env
    drv = session.driver
    t = drv.transport
    max_size = t.queue_max_size(0)
    drv.bring_up()
    _exchange(drv, env, b"before")
    # Change state the reset must undo: MAC, rx filter.
    new_mac = bytes.fromhex("02766e00d00d")
    assert drv.ctrl_command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, new_mac) == 0
    assert drv.ctrl_command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\0") == 0
    # Leave rx buffers and an unanswered tx frame behind.
    drv.send_packet(tagged_frame(BROADCAST, b"pending", src=GUEST_MAC), wait=False)

    t.reset()
    _assert_initial_common_cfg(t, max_size)
    mac_after_reset = drv.read_config().mac

    # Works again from scratch, with the initial rx filter (promiscuous).
    drv = session.new_driver()
    drv.bring_up()
    _exchange(drv, env, b"after")
    env.port.send(tagged_frame(bytes.fromhex("02766e00eeee"), b"promisc-again"))
    recv_tagged(drv, b"promisc-again")
    # Like QEMU (virtio_net_reset restores conf->macaddr): the MAC in config
    # space is the configured one again, not the one the last driver set.
    assert mac_after_reset == GUEST_MAC, (
        f"the MAC set by the driver ({mac_after_reset.hex(':')}) survived a reset"
    )


def test_reconnect(env: DeviceEnv) -> None:
    """A client goes away (mid-traffic, without resetting); the next one
    connects to the same socket and finds a fresh device."""
    for round_ in range(3):
        s = open_session(env)
        try:
            t = s.driver.transport
            assert t.status == 0, f"round {round_}: device not reset after the last client"
            s.driver.bring_up()
            _exchange(s.driver, env, f"round{round_}".encode())
            s.driver.send_packet(tagged_frame(BROADCAST, b"inflight", src=GUEST_MAC), wait=False)
            env.port.send(tagged_frame(GUEST_MAC, b"unread"))
        finally:
            s.close()
        env.wait_log("client disconnected", count=round_ + 1)
        env.assert_alive()


def test_reset_through_vfio_user(session: GuestSession) -> None:
    """VFIO_USER_DEVICE_RESET resets the virtio device too."""
    drv = session.driver
    drv.bring_up()
    session.client.reset()
    assert drv.transport.status == 0
    drv = session.new_driver()
    drv.bring_up()
    _exchange(drv, session.env, b"after-vfu-reset")


# --------------------------------------------------------------------------
# Interrupts
# --------------------------------------------------------------------------


def test_interrupts_on_queue_vectors(session: GuestSession) -> None:
    env = session.env
    drv = session.driver
    drv.bring_up()
    t = drv.transport
    rx, tx = drv.pairs[0].rx, drv.pairs[0].tx
    assert (rx.vector, tx.vector) == (RX_VECTOR, TX_VECTOR)
    for v in range(len(t.irq_fds)):
        t.irq_count(v)

    env.port.send(tagged_frame(GUEST_MAC, b"irq-rx"))
    assert t.wait_irq(RX_VECTOR, 3), "no interrupt on the rx vector"
    assert rx.has_used()
    assert t.irq_count(TX_VECTOR) == 0
    assert t.irq_count(CONFIG_VECTOR) == 0
    recv_tagged(drv, b"irq-rx")

    drv.send_packet(tagged_frame(BROADCAST, b"irq-tx", src=GUEST_MAC), wait=False)
    assert t.wait_irq(TX_VECTOR, 3), "no interrupt on the tx vector"
    assert t.irq_count(RX_VECTOR) == 0
    assert t.irq_count(CONFIG_VECTOR) == 0
    drv.wait_tx_complete()

    # A vector's eventfd replaced (as QEMU does on mask/unmask) keeps working.
    t.replace_vector_fd(RX_VECTOR)
    env.port.send(tagged_frame(GUEST_MAC, b"irq-rx2"))
    assert t.wait_irq(RX_VECTOR, 3), "no interrupt on the replaced rx eventfd"


def test_no_interrupts_when_suppressed_without_event_idx(env: DeviceEnv) -> None:
    s = open_session(env, features=GUEST_FEATURES & ~bit(VIRTIO_F_EVENT_IDX))
    try:
        drv = s.driver
        drv.bring_up()
        assert not drv.has(VIRTIO_F_EVENT_IDX)
        t = drv.transport
        rx = drv.pairs[0].rx
        rx.disable_interrupts()  # VRING_AVAIL_F_NO_INTERRUPT
        t.irq_count(RX_VECTOR)
        start = rx.last_used_idx
        for i in range(4):
            env.port.send(tagged_frame(GUEST_MAC, f"noint{i}".encode()))
        wait_used_idx(rx, start + 4)
        time.sleep(0.05)
        assert t.irq_count(RX_VECTOR) == 0
        rx.enable_interrupts()
        env.port.send(tagged_frame(GUEST_MAC, b"int"))
        assert t.wait_irq(RX_VECTOR, 3)
    finally:
        s.close()


def test_event_idx_suppression(session: GuestSession) -> None:
    env = session.env
    drv = session.driver
    drv.bring_up()
    assert drv.has(VIRTIO_F_EVENT_IDX)
    t = drv.transport
    rx = drv.pairs[0].rx
    n = 8

    # Re-armed after every packet: one interrupt per packet.
    t.irq_count(RX_VECTOR)
    for i in range(n):
        env.port.send(tagged_frame(GUEST_MAC, f"each{i}".encode()))
        assert t.wait_irq(RX_VECTOR, 3), f"no interrupt for packet {i}"
        recv_tagged(drv, f"each{i}".encode())  # pops and re-arms used_event
    assert t.irq_count(RX_VECTOR) == 0

    # used_event set n-1 entries ahead: one interrupt for the whole burst.
    start = rx.last_used_idx
    session.mem.write_u16(rx.used_event_addr, (start + n - 1) & 0xFFFF)
    for i in range(n):
        env.port.send(tagged_frame(GUEST_MAC, f"burst{i}".encode()))
    wait_used_idx(rx, start + n)
    time.sleep(0.05)
    irqs = t.irq_count(RX_VECTOR)
    assert 1 <= irqs < n, f"{irqs} interrupts for {n} packets with used_event {n - 1} ahead"
    for i in range(n):
        recv_tagged(drv, f"burst{i}".encode())

    # used_event far behind the device (never crossed): no interrupt at all.
    start = rx.last_used_idx
    session.mem.write_u16(rx.used_event_addr, (start - 100) & 0xFFFF)
    t.irq_count(RX_VECTOR)
    for i in range(4):
        env.port.send(tagged_frame(GUEST_MAC, f"quiet{i}".encode()))
    wait_used_idx(rx, start + 4)
    time.sleep(0.05)
    assert t.irq_count(RX_VECTOR) == 0
    rx_stats = env.final_counters()["queues"][0]["rx"]
    assert rx_stats["interrupts_suppressed"] > 0
    assert rx_stats["interrupts"] == n + irqs


def test_event_idx_tx(session: GuestSession) -> None:
    """Frames sent one kick at a time, used_event set n-1 ahead: n completions,
    one interrupt (the driver does not reclaim in between, which would move
    used_event)."""
    env = session.env
    drv = session.driver
    drv.bring_up()
    t = drv.transport
    tx = drv.pairs[0].tx
    n = 8
    # The device always signals its first completion (like vhost): get it done.
    drv.send_packet(tagged_frame(BROADCAST, b"warm-up", src=GUEST_MAC))
    start = tx.last_used_idx
    session.mem.write_u16(tx.used_event_addr, (start + n - 1) & 0xFFFF)
    # Its interrupt follows the used entry (after a whole batched pass of TAP
    # writes) unless waiting for it took it already: let it land, then drop
    # it, so that it is not counted below.
    time.sleep(0.05)
    t.irq_count(TX_VECTOR)
    for i in range(n):
        frame = bytes(NET_HDR_SIZE) + tagged_frame(BROADCAST, f"txb{i}".encode(), src=GUEST_MAC)
        buf = session.mem.alloc(len(frame))
        session.mem.write(buf, frame)
        tx.add_buf([(buf, len(frame), False)], f"txb{i}")
        tx.kick(force=True)
        wait_used_idx(tx, start + i + 1)
        assert env.port.recv(functools.partial(has_tag, tag=f"txb{i}".encode())) is not None
    time.sleep(0.05)
    assert t.irq_count(TX_VECTOR) == 1
    assert [e.token for e in tx.poll_used()] == [f"txb{i}" for i in range(n)]
    tx_stats = env.final_counters()["queues"][0]["tx"]
    assert tx_stats["interrupts_suppressed"] >= n - 1


def test_control_queue_rejects_unknown_commands(session: GuestSession) -> None:
    """Sanity for the hostile tests: a well-formed but unsupported command is
    answered VIRTIO_NET_ERR and the queue keeps working."""
    drv = session.driver
    drv.bring_up()
    assert drv.ctrl_command(VIRTIO_NET_CTRL_RX, 7, b"\0") == VIRTIO_NET_ERR
    assert drv.ctrl_command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\1") == 0
