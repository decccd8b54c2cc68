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
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import vfio_user_client as vu
from tests.harness.guest_memory import GuestMemory

log = logging.getLogger(__name__)

CANDIDATES = [
    "/var/cache/vfiouser-net/libvfio-user/build/samples/server",
    "/tmp/lvu-scratch/B/samples/server",
]


def find_sample_server() -> str | None:
    env = os.environ.get("VFIOUSER_LVU_SAMPLE_SERVER")
    if env:
        return env if os.access(env, os.X_OK) else None
    for c in CANDIDATES:
        if os.access(c, os.X_OK):
            return c
    return shutil.which("libvfio-user-sample-server")


SAMPLE = find_sample_server()

if SAMPLE is None:
    if os.environ.get("CI") == "true":
        pytest.fail(
            "libvfio-user sample server not found (looked at "
            f"$VFIOUSER_LVU_SAMPLE_SERVER and {CANDIDATES})",
            pytrace=False,
        )
    pytestmark = pytest.mark.skip(reason="libvfio-user samples/server not built")


class SampleServer:
    def __init__(self, tmp_path: Path) -> None:
        assert SAMPLE is not None
        self.sock = str(tmp_path / "sample.sock")
        self.log_path = tmp_path / "sample-server.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [SAMPLE, "-v", self.sock],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None:
                raise RuntimeError(f"sample server exited early:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError("sample server did not create its socket")
            time.sleep(0.01)

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SampleServer]:
    s = SampleServer(tmp_path)
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            s.proc.terminate()
        s.stop()
        log.debug("sample server log:\n%s", s.log_text())


@pytest.fixture
def client(server: SampleServer) -> Iterator[vu.VfioUserClient]:
    c = vu.VfioUserClient(server.sock, timeout=5)
    try:
        c.negotiate()
        yield c
    finally:
        c.close()


def test_negotiate_and_disconnect_cleanly(server: SampleServer) -> None:
    c = vu.VfioUserClient(server.sock, timeout=5)
    sv = c.negotiate()
    assert (sv.major, sv.minor) == (0, 1)
    assert sv.max_msg_fds == 8
    assert sv.max_data_xfer_size == 1024 * 1024
    assert sv.caps["capabilities"]["migration"]["pgsize"] == 4096
    c.close()
    # The sample serves one connection, then exits 0.
    assert server.stop() == 0, server.log_text()


def test_version_without_json_defaults(server: SampleServer) -> None:
    with vu.VfioUserClient(server.sock, timeout=5) as c:
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


def test_wrong_major_refused(server: SampleServer) -> None:
    with vu.VfioUserClient(server.sock, timeout=5) as c:
        with pytest.raises(vu.VfioUserError) as ei:
            c.negotiate(major=1)
        assert ei.value.errno == errno.EINVAL


def test_device_region_and_irq_info(client: vu.VfioUserClient) -> None:
    info = client.device_info()
    assert info.flags & vu.VFIO_DEVICE_FLAGS_PCI and info.flags & vu.VFIO_DEVICE_FLAGS_RESET
    assert (info.num_regions, info.num_irqs) == (10, 5)

    bar0 = client.region_info(0)
    assert (bar0.size, bar0.readable, bar0.writable, bar0.mmappable) == (
        8,
        True,
        True,
        False,
    )

    bar1 = client.region_info(1)
    try:
        assert bar1.size == 0x3000 and bar1.mmappable
        assert bar1.sparse_areas == [
            vu.SparseMmapArea(0, 0x1000),
            vu.SparseMmapArea(0x2000, 0x1000),
        ]
        assert len(bar1.fds) == 2
    finally:
        bar1.close_fds()

    cfg = client.region_info(vu.VFU_PCI_DEV_CFG_REGION_IDX)
    assert cfg.size == 256  # conventional PCI
    migr = client.region_info(vu.VFU_PCI_DEV_MIGR_REGION_IDX)
    try:
        assert migr.cap_type == (3, 1)  # VFIO_REGION_TYPE_MIGRATION / SUBTYPE
        assert len(migr.fds) == 1
    finally:
        migr.close_fds()
    assert client.region_info(2).size == 0

    with pytest.raises(vu.VfioUserError) as ei:
        client.region_info(10)
    assert ei.value.errno == errno.EINVAL

    counts = [client.irq_info(i).count for i in range(5)]
    assert counts == [1, 0, 0, 1, 1]  # INTx, MSI, MSI-X, ERR, REQ
    assert client.irq_info(0).flags & vu.VFIO_IRQ_INFO_EVENTFD
    with pytest.raises(vu.VfioUserError):
        client.irq_info(5)


def test_config_space(client: vu.VfioUserClient) -> None:
    assert client.config_read16(0x00) == 0xDEAD
    assert client.config_read16(0x02) == 0xBEEF
    assert client.config_read16(0x2C) == 0xCAFE
    assert client.config_read16(0x2E) == 0xBABE
    # Command register: memory space enable sticks.
    client.config_write16(0x04, 0x0002)
    assert client.config_read16(0x04) & 0x0002
    with pytest.raises(vu.VfioUserError):
        client.config_read(0xFF, 2)  # crosses the end of config space


def test_bar_read_write_posted_and_mmap(client: vu.VfioUserClient) -> None:
    pattern = bytes(range(16))
    client.region_write(1, 0, pattern)
    assert client.region_read(1, 0, 16) == pattern
    # A posted write (no_reply) is ordered before the next request's reply.
    client.region_write(1, 0, b"\xaa\xbb", posted=True)
    client.sync()
    assert client.region_read(1, 0, 4) == b"\xaa\xbb\x02\x03"
    # Large writes are chunked (here by a tiny chunk size) and land in order.
    client.chunk_size = 256
    big = os.urandom(0x1000)
    client.region_write(1, 0, big)
    info = client.region_info(1)
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
    assert client.region_read(1, 0, 4) == b"MMAP"
    # BAR0 wants exactly 8 bytes at offset 0.
    with pytest.raises(vu.VfioUserError) as ei:
        client.region_read(0, 0, 4)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(vu.VfioUserError):
        client.region_read(1, 0x2FFF, 2)  # out of bounds


def test_dma_map_unmap(client: vu.VfioUserClient) -> None:
    with GuestMemory(2 << 20, base=0x1000_0000) as mem:
        mem.map_into(client)
        # Same range again with the same fd/offset/prot is accepted (idempotent).
        client.dma_map(mem.base, mem.size, mem.fd, 0, vu.DMA_RW, backing=mem)
        # Overlap is refused.
        with pytest.raises(vu.VfioUserError) as ei:
            client.dma_map(mem.base + 0x1000, 0x1000, mem.fd, 0x1000)
        assert ei.value.errno == errno.EINVAL
        # Bad flags are refused.
        with pytest.raises(vu.VfioUserError):
            client.dma_map(0x2000_0000, 0x1000, mem.fd, 0, 0x80)
        # A second region elsewhere, read-only, then both unmapped.
        client.dma_map(0x2000_0000, 0x1000, mem.fd, 0x1000, vu.DMA_READ)
        client.dma_unmap(0x2000_0000, 0x1000)
        mem.unmap_from(client)
        with pytest.raises(vu.VfioUserError) as ei:
            client.dma_unmap(mem.base, mem.size)
        assert ei.value.errno == errno.ENOENT
        # Unmap-all
        client.dma_map(0x3000_0000, 0x1000, mem.fd, 0)
        client.dma_unmap(0, 0, vu.DMA_UNMAP_FLAG_ALL)
        with pytest.raises(vu.VfioUserError):
            client.dma_unmap(0x3000_0000, 0x1000)


def test_irq_and_server_dma_messages(client: vu.VfioUserClient, server: SampleServer) -> None:
    """INTx eventfd fires and the server DMA-writes/reads guest memory by message."""
    with GuestMemory(1 << 20, base=0x4000_0000) as mem:
        mem.map_into(client)
        efd = vu.new_eventfd()
        try:
            client.set_irqs(vu.VFIO_PCI_INTX_IRQ_INDEX, 0, [efd])
            # Arm the sample's timer: BAR0 takes an absolute time_t.
            client.region_write(0, 0, struct.pack("<q", int(time.time()) + 1))
            served = 0
            deadline = time.monotonic() + 10
            while served < 2 and time.monotonic() < deadline:
                served += client.serve(timeout=0.2)
            assert served == 2, server.log_text()
            assert vu.read_eventfd(efd) == 1
            assert mem.read(mem.base, 4096) == b"A" * 4096
            assert mem.read(mem.base + 4096, 1) == b"\0"
            # Still healthy afterwards; BAR0 reads back seconds since T.
            (delta,) = struct.unpack("<q", client.region_read(0, 0, 8))
            assert -5 <= delta <= 5
            # Disabling the IRQ index (count 0, DATA_NONE) is accepted.
            client.set_irqs(vu.VFIO_PCI_INTX_IRQ_INDEX, 0, [])
        finally:
            os.close(efd)


def test_set_irqs_errors(client: vu.VfioUserClient) -> None:
    a, b = vu.new_eventfd(), vu.new_eventfd()
    try:
        with pytest.raises(vu.VfioUserError) as ei:
            client.set_irqs(vu.VFIO_PCI_MSIX_IRQ_INDEX, 0, [a])  # no MSI-X vectors
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(vu.VfioUserError):
            client.set_irqs(vu.VFIO_PCI_INTX_IRQ_INDEX, 0, [a, b])  # only 1 INTx
        # fd count must match count
        with pytest.raises(vu.VfioUserError):
            client.set_irqs_raw(
                vu.VFIO_PCI_INTX_IRQ_INDEX,
                0,
                1,
                vu.VFIO_IRQ_SET_ACTION_TRIGGER | vu.VFIO_IRQ_SET_DATA_EVENTFD,
                fds=[a, b],
            )
        # ERR/REQ eventfds are accepted (QEMU registers the REQ one).
        client.set_irqs(vu.VFIO_PCI_REQ_IRQ_INDEX, 0, [a])
        client.set_irqs(vu.VFIO_PCI_ERR_IRQ_INDEX, 0, [b])
        # DATA_BOOL trigger of the REQ vector signals the eventfd we handed over.
        client.set_irqs_raw(
            vu.VFIO_PCI_REQ_IRQ_INDEX,
            0,
            1,
            vu.VFIO_IRQ_SET_ACTION_TRIGGER | vu.VFIO_IRQ_SET_DATA_BOOL,
            b"\x01",
        )
    finally:
        os.close(a)
        os.close(b)


def test_reset(client: vu.VfioUserClient, server: SampleServer) -> None:
    client.reset()
    assert "device reset callback" in server.log_text()
    assert client.device_info().num_regions == 10


def test_malformed_messages_get_error_replies(client: vu.VfioUserClient) -> None:
    # Unknown command
    r = client.request(99, b"\0" * 8, check=False)
    assert r is not None and r.header.error and r.header.error_no == errno.EINVAL
    # Truncated DMA_MAP payload
    with pytest.raises(vu.VfioUserError):
        client.request(vu.Command.DMA_MAP, b"\0" * 8)
    # A command with no payload (only DEVICE_RESET may have none)
    with pytest.raises(vu.VfioUserError):
        client.request(vu.Command.DEVICE_GET_INFO)
    # REGION_WRITE whose count disagrees with the data length
    with pytest.raises(vu.VfioUserError):
        client.request(vu.Command.REGION_WRITE, vu.pack_region_access(1, 0, 8, b"\0" * 4))
    # A header whose msg_size is smaller than the header: rejected, stream intact
    client.send_raw(struct.pack("<HHIII", 0x77, vu.Command.DEVICE_GET_INFO, 8, 0, 0))
    r = client.wait_reply(0x77, vu.Command.DEVICE_GET_INFO, check=False)
    assert r.header.error
    # A "reply" sent as a command is refused too.
    client.send_raw(vu.pack_message(0x78, vu.Command.DEVICE_RESET, b"", reply=True))
    r = client.wait_reply(0x78, vu.Command.DEVICE_RESET, check=False)
    assert r.header.error
    assert client.device_info().num_regions == 10
