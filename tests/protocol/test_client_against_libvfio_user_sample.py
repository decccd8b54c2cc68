"""The test-side vfio-user client against libvfio-user's own sample server.

``samples/server`` (libvfio-user 0b28d205) exposes: PCI ids dead:beef
(subsystem cafe:babe), BAR0 = 8 bytes (a time_t: writing T arms a timer for
absolute time T; on expiry it triggers INTx vector 0, then DMA-writes 4 KiB of
'A' to the first DMA region through a VFIO_USER_DMA_WRITE message and reads
it back with VFIO_USER_DMA_READ), BAR1 = 0x3000 bytes with mmap areas
[0, 0x1000) and [0x2000, 0x3000) (reads return BAR1 from offset 0, whatever
the offset), a migration region (index 9), one INTx, ERR and REQ IRQ, DMA
map/unmap.  It serves one connection and exits 0 when the client goes away.

Skipped when the binary is missing, unless CI=true.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
import time

import pytest
from vfiouser_net_harness import vfio_user_client as vu
from vfiouser_net_harness.guest_memory import GuestMemory

from tests.protocol.lvu_sample import SampleServer

log = logging.getLogger(__name__)


def test_negotiate_and_disconnect_cleanly(sample_server: SampleServer) -> None:
    c = vu.VfioUserClient(sample_server.sock, timeout=5)
    sv = c.negotiate()
    assert (sv.major, sv.minor) == (0, 1)
    assert sv.max_msg_fds == 8
    assert sv.max_data_xfer_size == 1024 * 1024
    assert sv.caps["capabilities"]["migration"]["pgsize"] == 4096
    c.close()
    # The sample serves one connection, then exits 0.
    assert sample_server.stop() == 0, sample_server.log_text()


def test_version_without_json_defaults(sample_server: SampleServer) -> None:
    with vu.VfioUserClient(sample_server.sock, timeout=5) as c:
        sv = c.negotiate(no_json=True)
        assert (sv.major, sv.minor) == (0, 1) and "capabilities" in sv.caps
        # Without JSON the client's max_msg_fds defaults to 1: BAR1 has two mmap
        # areas, so its region info with caps fails (ENOSPC) ...
        with pytest.raises(vu.VfioUserError) as ei:
            c.region_info(1)
        assert ei.value.errno == errno.ENOSPC
        # ... while a caps-less request (argsz 32) still succeeds.
        r = c.request(vu.Command.DEVICE_GET_REGION_INFO, vu.pack_region_info_request(1))
        assert r is not None
        info = vu.RegionInfo.unpack(r.payload)
        assert info.argsz > 32 and not info.sparse_areas and not r.fds


def test_wrong_major_refused(sample_server: SampleServer) -> None:
    with vu.VfioUserClient(sample_server.sock, timeout=5) as c:
        with pytest.raises(vu.VfioUserError) as ei:
            c.negotiate(major=1)
        assert ei.value.errno == errno.EINVAL


def test_device_region_and_irq_info(sample_client: vu.VfioUserClient) -> None:
    info = sample_client.device_info()
    assert info.flags & vu.VFIO_DEVICE_FLAGS_PCI and info.flags & vu.VFIO_DEVICE_FLAGS_RESET
    assert (info.num_regions, info.num_irqs) == (10, 5)

    bar0 = sample_client.region_info(0)
    assert (bar0.size, bar0.readable, bar0.writable, bar0.mmappable) == (
        8,
        True,
        True,
        False,
    )

    bar1 = sample_client.region_info(1)
    try:
        assert bar1.size == 0x3000 and bar1.mmappable
        assert bar1.sparse_areas == [
            vu.SparseMmapArea(0, 0x1000),
            vu.SparseMmapArea(0x2000, 0x1000),
        ]
        assert len(bar1.fds) == 2
    finally:
        bar1.close_fds()

    cfg = sample_client.region_info(vu.VFU_PCI_DEV_CFG_REGION_IDX)
    assert cfg.size == 256  # conventional PCI
    migr = sample_client.region_info(vu.VFU_PCI_DEV_MIGR_REGION_IDX)
    try:
        assert migr.cap_type == (3, 1)  # VFIO_REGION_TYPE_MIGRATION / SUBTYPE
        assert len(migr.fds) == 1
    finally:
        migr.close_fds()
    assert sample_client.region_info(2).size == 0

    with pytest.raises(vu.VfioUserError) as ei:
        sample_client.region_info(10)
    assert ei.value.errno == errno.EINVAL

    counts = [sample_client.irq_info(i).count for i in range(5)]
    assert counts == [1, 0, 0, 1, 1]  # INTx, MSI, MSI-X, ERR, REQ
    assert sample_client.irq_info(0).flags & vu.VFIO_IRQ_INFO_EVENTFD
    with pytest.raises(vu.VfioUserError):
        sample_client.irq_info(5)


def test_config_space(sample_client: vu.VfioUserClient) -> None:
    assert sample_client.config_read16(0x00) == 0xDEAD
    assert sample_client.config_read16(0x02) == 0xBEEF
    assert sample_client.config_read16(0x2C) == 0xCAFE
    assert sample_client.config_read16(0x2E) == 0xBABE
    # Command register: memory space enable sticks.
    sample_client.config_write16(0x04, 0x0002)
    assert sample_client.config_read16(0x04) & 0x0002
    with pytest.raises(vu.VfioUserError):
        sample_client.config_read(0xFF, 2)  # crosses the end of config space


def test_bar_read_write_posted_and_mmap(sample_client: vu.VfioUserClient) -> None:
    pattern = bytes(range(16))
    sample_client.region_write(1, 0, pattern)
    assert sample_client.region_read(1, 0, 16) == pattern
    # A posted write (no_reply) is ordered before the next request's reply.
    sample_client.region_write(1, 0, b"\xaa\xbb", posted=True)
    sample_client.sync()
    assert sample_client.region_read(1, 0, 4) == b"\xaa\xbb\x02\x03"
    # Large writes are chunked (here by a tiny chunk size) and land in order.
    sample_client.chunk_size = 256
    big = os.urandom(0x1000)
    sample_client.region_write(1, 0, big)
    info = sample_client.region_info(1)
    try:
        area = info.sparse_areas[0]
        m = mmap.mmap(info.fds[0], area.size, mmap.MAP_SHARED, offset=info.offset + area.offset)
        try:
            assert m[: len(big)] == big  # the server's BAR1 backing file
            m[0:4] = b"MMAP"
        finally:
            m.close()
    finally:
        info.close_fds()
    assert sample_client.region_read(1, 0, 4) == b"MMAP"
    # BAR0 wants exactly 8 bytes at offset 0.
    with pytest.raises(vu.VfioUserError) as ei:
        sample_client.region_read(0, 0, 4)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(vu.VfioUserError):
        sample_client.region_read(1, 0x2FFF, 2)  # out of bounds


def test_dma_map_unmap(sample_client: vu.VfioUserClient) -> None:
    with GuestMemory(2 << 20, base=0x1000_0000) as mem:
        mem.map_into(sample_client)
        # Same range again with the same fd/offset/prot is accepted (idempotent).
        sample_client.dma_map(mem.base, mem.size, mem.fd, 0, vu.DMA_RW, backing=mem)
        # Overlap is refused.
        with pytest.raises(vu.VfioUserError) as ei:
            sample_client.dma_map(mem.base + 0x1000, 0x1000, mem.fd, 0x1000)
        assert ei.value.errno == errno.EINVAL
        # Bad flags are refused.
        with pytest.raises(vu.VfioUserError):
            sample_client.dma_map(0x2000_0000, 0x1000, mem.fd, 0, 0x80)
        # A second region elsewhere, read-only, then both unmapped.
        sample_client.dma_map(0x2000_0000, 0x1000, mem.fd, 0x1000, vu.DMA_READ)
        sample_client.dma_unmap(0x2000_0000, 0x1000)
        mem.unmap_from(sample_client)
        with pytest.raises(vu.VfioUserError) as ei:
            sample_client.dma_unmap(mem.base, mem.size)
        assert ei.value.errno == errno.ENOENT
        # Unmap-all
        sample_client.dma_map(0x3000_0000, 0x1000, mem.fd, 0)
        sample_client.dma_unmap(0, 0, vu.DMA_UNMAP_FLAG_ALL)
        with pytest.raises(vu.VfioUserError):
            sample_client.dma_unmap(0x3000_0000, 0x1000)


def test_irq_and_server_dma_messages(
    sample_client: vu.VfioUserClient, sample_server: SampleServer
) -> None:
    """INTx eventfd fires and the server DMA-writes/reads guest memory by message."""
    with GuestMemory(1 << 20, base=0x4000_0000) as mem:
        mem.map_into(sample_client)
        efd = vu.new_eventfd()
        try:
            sample_client.set_irqs(vu.VFIO_PCI_INTX_IRQ_INDEX, 0, [efd])
            # Arm the sample's timer: BAR0 takes an absolute time_t.
            sample_client.region_write(0, 0, struct.pack("<q", int(time.time()) + 1))
            served = 0
            deadline = time.monotonic() + 10
            while served < 2 and time.monotonic() < deadline:
                served += sample_client.serve(timeout=0.2)
            assert served == 2, sample_server.log_text()
            assert vu.read_eventfd(efd) == 1
            assert mem.read(mem.base, 4096) == b"A" * 4096
            assert mem.read(mem.base + 4096, 1) == b"\0"
            # Still healthy afterwards; BAR0 reads back seconds since T.
            (delta,) = struct.unpack("<q", sample_client.region_read(0, 0, 8))
            assert -5 <= delta <= 5
            # Disabling the IRQ index (count 0, DATA_NONE) is accepted.
            sample_client.set_irqs(vu.VFIO_PCI_INTX_IRQ_INDEX, 0, [])
        finally:
            os.close(efd)


def test_set_irqs_errors(sample_client: vu.VfioUserClient) -> None:
    a, b = vu.new_eventfd(), vu.new_eventfd()
    try:
        with pytest.raises(vu.VfioUserError) as ei:
            sample_client.set_irqs(vu.VFIO_PCI_MSIX_IRQ_INDEX, 0, [a])  # no MSI-X vectors
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(vu.VfioUserError):
            sample_client.set_irqs(vu.VFIO_PCI_INTX_IRQ_INDEX, 0, [a, b])  # only 1 INTx
        # fd count must match count
        with pytest.raises(vu.VfioUserError):
            sample_client.set_irqs_raw(
                vu.VFIO_PCI_INTX_IRQ_INDEX,
                0,
                1,
                vu.VFIO_IRQ_SET_ACTION_TRIGGER | vu.VFIO_IRQ_SET_DATA_EVENTFD,
                fds=[a, b],
            )
        # ERR/REQ eventfds are accepted (QEMU registers the REQ one).
        sample_client.set_irqs(vu.VFIO_PCI_REQ_IRQ_INDEX, 0, [a])
        sample_client.set_irqs(vu.VFIO_PCI_ERR_IRQ_INDEX, 0, [b])
        # DATA_BOOL trigger of the REQ vector signals the eventfd we handed over.
        sample_client.set_irqs_raw(
            vu.VFIO_PCI_REQ_IRQ_INDEX,
            0,
            1,
            vu.VFIO_IRQ_SET_ACTION_TRIGGER | vu.VFIO_IRQ_SET_DATA_BOOL,
            b"\x01",
        )
    finally:
        os.close(a)
        os.close(b)


def test_reset(sample_client: vu.VfioUserClient, sample_server: SampleServer) -> None:
    sample_client.reset()
    assert "device reset callback" in sample_server.log_text()
    assert sample_client.device_info().num_regions == 10


def test_malformed_messages_get_error_replies(sample_client: vu.VfioUserClient) -> None:
    # Unknown command
    r = sample_client.request(99, b"\0" * 8, check=False)
    assert r is not None and r.header.error and r.header.error_no == errno.EINVAL
    # Truncated DMA_MAP payload
    with pytest.raises(vu.VfioUserError):
        sample_client.request(vu.Command.DMA_MAP, b"\0" * 8)
    # A command with no payload (only DEVICE_RESET may have none)
    with pytest.raises(vu.VfioUserError):
        sample_client.request(vu.Command.DEVICE_GET_INFO)
    # REGION_WRITE whose count disagrees with the data length
    with pytest.raises(vu.VfioUserError):
        sample_client.request(vu.Command.REGION_WRITE, vu.pack_region_access(1, 0, 8, b"\0" * 4))
    # A header whose msg_size is smaller than the header: rejected, stream intact
    sample_client.send_raw(struct.pack("<HHIII", 0x77, vu.Command.DEVICE_GET_INFO, 8, 0, 0))
    r = sample_client.wait_reply(0x77, vu.Command.DEVICE_GET_INFO, check=False)
    assert r.header.error
    # A "reply" sent as a command is refused too.
    sample_client.send_raw(vu.pack_message(0x78, vu.Command.DEVICE_RESET, b"", reply=True))
    r = sample_client.wait_reply(0x78, vu.Command.DEVICE_RESET, check=False)
    assert r.header.error
    assert sample_client.device_info().num_regions == 10
