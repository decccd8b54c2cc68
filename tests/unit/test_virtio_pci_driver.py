"""The synthetic virtio-pci driver: ring layout, capability parsing, and a full
bring-up / packet / control exchange with an in-process fake device."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from vfiouser_net_harness import virtio_pci_driver as vp
from vfiouser_net_harness.guest_memory import GuestMemory, GuestMemoryError
from vfiouser_net_harness.vfio_user_client import VfioUserClient

from tests.unit.fake_virtio_net import FakeVirtioNet

# -- guest memory ---------------------------------------------------------------


def test_guest_memory_le_accessors_and_allocator() -> None:
    with GuestMemory(1 << 16, base=0x10000) as mem:
        a = mem.alloc(10, 64)
        assert a % 64 == 0 and a >= mem.base + 4096
        b = mem.alloc(1, 4096)
        assert b % 4096 == 0 and b > a
        mem.write_u32(a, 0x11223344)
        assert mem.read(a, 4) == bytes.fromhex("44332211")
        mem.write_u64(a, 0x0102030405060708)
        assert mem.read_u16(a) == 0x0708 and mem.read_u64(a) == 0x0102030405060708
        mem.pack_into("<HB", a, 0xBEEF, 7)
        assert mem.unpack_from("<HB", a) == (0xBEEF, 7)
        with pytest.raises(ValueError):
            mem.pack_into(">H", a, 1)
        with pytest.raises(GuestMemoryError):
            mem.read(mem.base - 1, 2)
        with pytest.raises(GuestMemoryError):
            mem.write(mem.end - 1, b"ab")
        with pytest.raises(GuestMemoryError):
            mem.alloc(1 << 20)
        # The memfd sees the same bytes.
        assert os.pread(mem.fd, 4, a - mem.base) == mem.read(a, 4)


# -- capability parsing ------------------------------------------------------------


def cfg_with_caps(chain: list[tuple[int, bytes]], first: int) -> bytearray:
    c = bytearray(256)
    struct.pack_into("<H", c, vp.PCI_STATUS, vp.PCI_STATUS_CAP_LIST)
    c[vp.PCI_CAPABILITY_LIST] = first
    for off, data in chain:
        c[off : off + len(data)] = data
    return c


def test_walk_capabilities_order_and_loop() -> None:
    c = cfg_with_caps([(0x40, b"\x09\x50"), (0x50, b"\x11\x00")], 0x40)
    assert vp.walk_capabilities(bytes(c)) == [(0x09, 0x40), (0x11, 0x50)]
    loop = cfg_with_caps([(0x40, b"\x09\x50"), (0x50, b"\x09\x40")], 0x40)
    with pytest.raises(vp.VirtioError, match="loops"):
        vp.walk_capabilities(bytes(loop))
    bad = cfg_with_caps([(0x40, b"\x09\x10")], 0x40)
    with pytest.raises(vp.VirtioError, match="out of range"):
        vp.walk_capabilities(bytes(bad))
    nocap = bytearray(256)
    assert vp.walk_capabilities(bytes(nocap)) == []


def test_parse_virtio_caps() -> None:
    notify = struct.pack("<BBBBBBxxIII", 0x09, 0x54, 20, 2, 4, 0, 0x3000, 0x1000, 4)
    msix = struct.pack("<BBHII", 0x11, 0x00, 7, 0x2001, 0x2803)
    c = cfg_with_caps([(0x40, notify), (0x54, msix)], 0x40)
    caps, m = vp.parse_virtio_caps(bytes(c))
    assert caps == [vp.VirtioCap(0x40, 2, 4, 0, 0x3000, 0x1000, 4)]
    assert m == vp.MsixCap(0x54, 8, 1, 0x2000, 3, 0x2800)


def test_vring_need_event() -> None:
    assert vp.vring_need_event(0, 1, 0)
    assert not vp.vring_need_event(1, 1, 0)
    assert vp.vring_need_event(5, 10, 3)
    assert not vp.vring_need_event(10, 10, 3)
    assert vp.vring_need_event(0xFFFF, 2, 0xFFFE)  # wrap-around


# -- split queue layout ---------------------------------------------------------------


def test_split_queue_layout_and_used_validation() -> None:
    with GuestMemory(1 << 20) as mem:
        q = vp.SplitQueue(mem, 0, 8, event_idx=True, max_indirect=4)
        assert q.desc_addr % 16 == 0 and q.avail_addr % 2 == 0 and q.used_addr % 4 == 0
        assert q.used_event_addr == q.avail_addr + 4 + 16
        assert q.avail_event_addr == q.used_addr + 4 + 64
        head = q.add_buf([(0x5000, 12, False), (0x6000, 100, True)], "tok", indirect=False)
        d0 = vp.DESC.unpack(mem.read(q.desc_addr + 16 * head, 16))
        assert d0[0] == 0x5000 and d0[1] == 12 and d0[2] == vp.VRING_DESC_F_NEXT
        d1 = vp.DESC.unpack(mem.read(q.desc_addr + 16 * d0[3], 16))
        assert d1[:3] == (0x6000, 100, vp.VRING_DESC_F_WRITE)
        assert mem.read_u16(q.avail_idx_addr) == 1 and mem.read_u16(q.avail_ring_addr(0)) == head
        assert q.num_free == 6

        ih = q.add_buf([(0x7000, 1, False), (0x7100, 2, False), (0x7200, 3, True)])
        top = vp.DESC.unpack(mem.read(q.desc_addr + 16 * ih, 16))
        assert top[2] == vp.VRING_DESC_F_INDIRECT and top[1] == 48
        inner = [vp.DESC.unpack(mem.read(top[0] + 16 * i, 16)) for i in range(3)]
        assert [d[1] for d in inner] == [1, 2, 3]
        assert inner[2][2] == vp.VRING_DESC_F_WRITE and inner[0][2] == vp.VRING_DESC_F_NEXT
        assert q.num_free == 5
        with pytest.raises(ValueError):
            q.add_buf([(0x1000, 1, True), (0x2000, 1, False)])

        # Device side, by hand: complete the indirect chain first.
        mem.write(q.used_ring_addr(0), struct.pack("<II", ih, 3))
        mem.write_u16(q.used_idx_addr, 1)
        e = q.get_used()
        assert e is not None and (e.id, e.len, e.token) == (ih, 3, None)
        assert mem.read_u16(q.used_event_addr) == 1 and q.num_free == 6
        # Too long a used len for the chain
        mem.write(q.used_ring_addr(1), struct.pack("<II", head, 101))
        mem.write_u16(q.used_idx_addr, 2)
        with pytest.raises(vp.VirtqueueError, match="used len"):
            q.get_used()
        # An id that is not in flight
        q2 = vp.SplitQueue(mem, 1, 8)
        q2.add_buf([(0x5000, 8, True)])
        mem.write(q2.used_ring_addr(0), struct.pack("<II", 5, 0))
        mem.write_u16(q2.used_idx_addr, 1)
        with pytest.raises(vp.VirtqueueError, match="not in flight"):
            q2.get_used()
        # used idx running ahead of the ring
        q3 = vp.SplitQueue(mem, 2, 8)
        mem.write_u16(q3.used_idx_addr, 9)
        with pytest.raises(vp.VirtqueueError, match="ahead"):
            q3.get_used()


def test_event_idx_need_kick() -> None:
    with GuestMemory(1 << 20) as mem:
        q = vp.SplitQueue(mem, 0, 8, event_idx=True)
        for _ in range(3):
            q.add_buf([(0x5000, 8, True)], publish=False)
        old, new = q.publish()
        assert (old, new) == (0, 3)
        mem.write_u16(q.avail_event_addr, 1)  # device wants a kick after entry 1
        assert q.need_kick(old, new)
        mem.write_u16(q.avail_event_addr, 5)  # ... only after entry 5
        assert not q.need_kick(old, new)
        q2 = vp.SplitQueue(mem, 1, 8)
        mem.write_u16(q2.used_flags_addr, vp.VRING_USED_F_NO_NOTIFY)
        assert not q2.need_kick(0, 1)
        mem.write_u16(q2.used_flags_addr, 0)
        assert q2.need_kick(0, 1)


def test_guest_access_pieces() -> None:
    assert vp.guest_access_pieces(0, 17) == [(0, 4), (4, 4), (8, 4), (12, 4), (16, 1)]
    assert vp.guest_access_pieces(1, 4) == [(1, 1), (2, 2), (4, 1)]


def test_net_hdr_pack() -> None:
    h = vp.NetHdr(flags=1, gso_type=1, hdr_len=54, gso_size=1448, csum_start=34, csum_offset=16)
    assert h.pack() == bytes.fromhex("01 01 3600 a805 2200 1000 0000".replace(" ", ""))
    assert vp.NetHdr.unpack(h.pack()) == h


# -- against the fake device ---------------------------------------------------------


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeVirtioNet]:
    dev = FakeVirtioNet(str(tmp_path / "fake.sock"), pairs=2)
    dev.start()
    yield dev
    dev.stop()
    assert not dev.errors


@pytest.fixture
def rig(fake: FakeVirtioNet) -> Iterator[tuple[FakeVirtioNet, VfioUserClient, GuestMemory]]:
    with GuestMemory(16 << 20) as mem, VfioUserClient(fake.path, timeout=5) as c:
        c.negotiate()
        mem.map_into(c)
        yield fake, c, mem


Rig = tuple[FakeVirtioNet, VfioUserClient, GuestMemory]


def frame(n: int, seed: int = 0) -> bytes:
    eth = bytes.fromhex("ffffffffffff525400123456") + b"\x08\x00"
    return eth + bytes((seed + i) & 0xFF for i in range(n - len(eth)))


def test_transport_discovers_scrambled_layout(rig: Rig) -> None:
    _fake, c, _ = rig
    t = vp.VirtioPciTransport(c)
    assert (t.vendor_id, t.device_id, t.virtio_device_id) == (0x1AF4, 0x1041, 1)
    assert (t.common.bar, t.common.offset) == (2, 0x1000)
    assert (t.notify.offset, t.notify.notify_off_multiplier) == (0x3000, 4)
    assert t.msix is not None and t.msix.table_size == 8
    feats = t.negotiate(vp.DEFAULT_NET_FEATURES)
    assert feats & vp.bit(vp.VIRTIO_F_VERSION_1)
    assert not feats & vp.bit(vp.VIRTIO_NET_F_CSUM)  # offered but not wanted
    assert t.status == vp.STATUS_ACKNOWLEDGE | vp.STATUS_DRIVER | vp.STATUS_FEATURES_OK
    assert t.num_queues == 5 and t.queue_max_size(0) == 256


def test_features_ok_refused(rig: Rig) -> None:
    fake, c, _ = rig
    fake.features &= ~vp.bit(vp.VIRTIO_NET_F_MQ)
    t = vp.VirtioPciTransport(c)
    t.reset()
    t.add_status(vp.STATUS_ACKNOWLEDGE | vp.STATUS_DRIVER)
    t.write_driver_features(vp.bit(vp.VIRTIO_F_VERSION_1) | vp.bit(vp.VIRTIO_NET_F_MQ))
    t.add_status(vp.STATUS_FEATURES_OK)
    assert not t.status & vp.STATUS_FEATURES_OK
    fake.features &= ~vp.bit(vp.VIRTIO_F_VERSION_1)
    with pytest.raises(vp.VirtioError, match="lacks required"):
        t.negotiate(vp.DEFAULT_NET_FEATURES)


def test_bring_up_config_and_loopback(rig: Rig) -> None:
    fake, c, mem = rig
    drv = vp.VirtioNetDriver(c, mem, queue_size=64)
    feats = drv.bring_up()
    assert feats & vp.bit(vp.VIRTIO_NET_F_MRG_RXBUF)
    cfg = drv.read_config()
    assert cfg.mac_str == "52:54:00:12:34:56" and cfg.status & vp.VIRTIO_NET_S_LINK_UP
    assert (cfg.max_virtqueue_pairs, cfg.mtu, cfg.speed, cfg.duplex) == (2, 1500, 10000, 1)
    assert drv.ctrl_index == 4  # 2 * max_virtqueue_pairs with MQ
    assert drv.transport.status & vp.STATUS_DRIVER_OK

    f = frame(60)
    drv.send_packet(f)
    assert fake.tx_frames[-1] == (0, bytes(12), f)
    hdr, got = drv.recv_packet(timeout=2)
    assert got == f and vp.NetHdr.unpack(hdr).num_buffers == 1
    # MSI-X: config 0, rx 1, tx 2; both queue vectors fire for one more packet.
    assert len(drv.transport.irq_fds) == 3
    drv.send_packet(f, wait=False)
    c.sync()
    assert drv.transport.irq_count(1) >= 1 and drv.transport.irq_count(2) >= 1
    assert drv.recv_packet(timeout=2)[1] == f

    # Mergeable: 5000 bytes over 2048-byte buffers -> 3 buffers.
    big = frame(5000, 7)
    drv.send_packet(big, split_header=True)
    hdr, got = drv.recv_packet(timeout=2)
    assert got == big and vp.NetHdr.unpack(hdr).num_buffers == 3

    # Many in flight without waiting, then collected.
    frames = [frame(64 + i, i) for i in range(40)]
    for fr in frames:
        drv.send_packet(fr, wait=False)
    drv.wait_tx_complete(timeout=2)
    assert [drv.recv_packet(timeout=2)[1] for _ in frames] == frames

    # A frame "from the wire".
    fake.inject(frame(100, 3))
    assert drv.recv_packet(timeout=2)[1] == frame(100, 3)

    assert drv.ctrl_command(vp.VIRTIO_NET_CTRL_RX, vp.VIRTIO_NET_CTRL_RX_PROMISC, b"\x01") == 0
    assert fake.ctrl_log[-1] == (0, 0, b"\x01")
    assert drv.set_queue_pairs(2) == vp.VIRTIO_NET_OK and fake.curr_pairs == 2
    assert drv.set_queue_pairs(3) == vp.VIRTIO_NET_ERR
    # Data split over several descriptors arrives concatenated.
    drv.ctrl_command(vp.VIRTIO_NET_CTRL_MQ, vp.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, [b"\x01", b"\x00"])
    assert fake.ctrl_log[-1] == (4, 0, b"\x01\x00") and fake.curr_pairs == 1
    # QEMU-style vector fd replacement: the new eventfd gets the interrupts.
    old_fd = drv.transport.irq_fds[1]
    new_fd = drv.transport.replace_vector_fd(1)
    assert new_fd != old_fd or new_fd == drv.transport.irq_fds[1]
    drv.send_packet(f, wait=False)
    c.sync()
    assert drv.transport.irq_count(1) >= 1
    assert drv.recv_packet(timeout=2)[1] == f
    drv.shutdown()
    assert drv.transport.status == 0


def test_two_pairs_indirect_event_idx_suppression(rig: Rig) -> None:
    fake, c, mem = rig
    drv = vp.VirtioNetDriver(c, mem, queue_size=32, use_indirect=True, always_kick=False)
    drv.bring_up(pairs=2)
    assert drv.has(vp.VIRTIO_F_EVENT_IDX) and drv.has(vp.VIRTIO_F_INDIRECT_DESC)
    assert fake.curr_pairs == 2 and fake.ctrl_log[0] == (4, 0, b"\x02\x00")
    for p in (0, 1):
        f = frame(3000, p)
        drv.send_packet(f, pair=p, split_header=True)  # 2 descriptors -> indirect
        assert fake.tx_frames[-1][0] == p
        assert drv.recv_packet(timeout=2, pair=p)[1] == f
    tx = drv.pairs[0].tx
    # EVENT_IDX: the fake publishes avail_event after consuming, so every
    # single send still needs a kick; the counters prove the check ran.
    assert tx.kicks >= 1
    assert fake.kicks.get(1, 0) == tx.kicks
    drv.shutdown()


def test_without_msix_polls(rig: Rig) -> None:
    _fake, c, mem = rig
    drv = vp.VirtioNetDriver(
        c,
        mem,
        use_msix=False,
        features=vp.DEFAULT_NET_FEATURES & ~vp.bit(vp.VIRTIO_NET_F_MRG_RXBUF),
    )
    drv.bring_up()
    assert not drv.transport.irq_fds
    f = frame(1514)
    drv.send_packet(f)
    assert drv.recv_packet(timeout=2)[1] == f
    drv.shutdown()


def test_hostile_used_id_detected(rig: Rig) -> None:
    fake, c, mem = rig
    drv = vp.VirtioNetDriver(c, mem, queue_size=16)
    drv.bring_up()
    fake.corrupt_next_used_id = 999
    with pytest.raises(vp.VirtqueueError):
        drv.send_packet(frame(60))


def test_recv_timeout(rig: Rig) -> None:
    fake, c, mem = rig
    fake.loopback = False
    drv = vp.VirtioNetDriver(c, mem, queue_size=16)
    drv.bring_up()
    drv.send_packet(frame(60))
    with pytest.raises(vp.VirtioTimeout):
        drv.recv_packet(timeout=0.2)


def test_mmapped_notify_page_polling_device(tmp_path: Path) -> None:
    """With use_mmap the driver writes doorbells straight into the mmapped
    notify area (no REGION_WRITE messages), as a QEMU guest would."""
    dev = FakeVirtioNet(str(tmp_path / "m.sock"), mmap_notify=True)
    dev.start()
    try:
        with GuestMemory(8 << 20) as mem, VfioUserClient(dev.path, timeout=5) as c:
            c.negotiate()
            mem.map_into(c)
            drv = vp.VirtioNetDriver(c, mem, queue_size=32, use_mmap=True)
            drv.bring_up()
            assert drv.transport._mapped(2, 0x3000, 2) is not None
            f = frame(200, 9)
            drv.send_packet(f)
            assert drv.recv_packet(timeout=2)[1] == f
            assert dev.kicks == {}  # no doorbell message reached the device
            page = os.pread(dev.notify_fd, 8, 0x3000)
            assert page[4:6] == b"\x01\x00"  # txq 1's slot holds its index
            drv.shutdown()
    finally:
        dev.stop()
    assert not dev.errors
