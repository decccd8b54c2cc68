"""The project's patches to libvfio-user (scripts/setup/libvfio-user-patches),
each shown by what a hostile vfio-user client could do without it.

The library-level ones run against libvfio-user's own sample server (it links
the patched library as the set-up built it), the rest against the daemon:
the SET_IRQS range check (the sample has one vector per index, too few to
wrap), the refused-DMA_MAP count the device exports, and the SIGBUS guard
for guest memory truncated after it was mapped (the daemon's own, see
csrc/mem_guard.h; the patched library refuses the region past the file at
DMA_MAP time, but the client keeps the file and can shrink it later).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from vfiouser_net_harness import vfio_user_client as vu
from vfiouser_net_harness.virtio_pci_driver import STATUS_DEVICE_NEEDS_RESET

from tests.protocol.lvu_sample import SampleServer
from tests.protocol.support import DeviceEnv, open_session

PAGE = os.sysconf("SC_PAGE_SIZE")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def memfd(size: int, name: str = "dma") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def refused(
    c: vu.VfioUserClient, iova: int, size: int, fd: int, offset: int = 0, prot: int = vu.DMA_RW
) -> int:
    """DMA_MAP that must fail; returns the errno of the reply."""
    with pytest.raises(vu.VfioUserError) as e:
        c.dma_map(iova, size, fd, offset, prot)
    return e.value.errno


# 0001-dma-map-repeat-closes-new-fd
def test_repeated_dma_map_keeps_no_fd(
    sample_server: SampleServer, sample_client: vu.VfioUserClient
) -> None:
    fd = memfd(1 << 20)
    try:
        sample_client.dma_map(0x100000, 1 << 20, fd)
        before = fd_count(sample_server.proc.pid)
        for _ in range(200):
            sample_client.dma_map(0x100000, 1 << 20, fd)
        assert fd_count(sample_server.proc.pid) == before
    finally:
        os.close(fd)


# 0002-dma-map-validate-region
def test_dma_map_refuses_regions_the_device_could_not_use(
    sample_server: SampleServer, sample_client: vu.VfioUserClient
) -> None:
    small = memfd(PAGE)
    ev = os.eventfd(0)
    try:
        before = fd_count(sample_server.proc.pid)
        assert refused(sample_client, 0x100000, PAGE, small, prot=0) == 13  # EACCES
        assert refused(sample_client, 0x100000, PAGE, small, prot=vu.DMA_WRITE) == 13
        # Longer than its file, and past its end by the offset alone.
        assert refused(sample_client, 0x100000, 1 << 30, small) == 22
        assert refused(sample_client, 0x100000, PAGE, small, offset=PAGE) == 22
        # Not a file that can back memory.
        assert refused(sample_client, 0x100000, PAGE, ev) == 22
        # None of them kept its fd.
        assert fd_count(sample_server.proc.pid) == before
        # The same range with a proper file still maps.
        sample_client.dma_map(0x100000, PAGE, small)
    finally:
        os.close(small)
        os.close(ev)


def _mappings_of(pid: int, name: str) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of every mapping of memfd ``name`` in pid."""
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if f"/memfd:{name} " in line + " ":
            addr, _perms, off = line.split()[:3]
            lo, hi = (int(x, 16) for x in addr.split("-"))
            out.append((lo, hi, int(off, 16)))
    return out


def test_dma_map_unaligned_offset_is_mapped_in_full(
    sample_server: SampleServer, sample_client: vu.VfioUserClient
) -> None:
    # Region [0xff0, 0x1ff0) of the file: the mapping must start at 0 (the
    # page below) and so reach 0x2000; without the patch it ended at 0x1000,
    # 4080 bytes short of the registered range.
    fd = memfd(2 * PAGE, name="unaligned")
    try:
        sample_client.dma_map(0x100000, PAGE, fd, offset=PAGE - 0x10)
        maps = _mappings_of(sample_server.proc.pid, "unaligned")
        assert maps, "the server has no mapping of the memfd"
        lo, hi, off = maps[0]
        assert off == 0
        assert hi - lo >= 2 * PAGE
    finally:
        os.close(fd)


# 0004-set-irqs-range-overflow
VFIO_PCI_MSIX_IRQ_INDEX = 2


def test_set_irqs_range_that_wraps_is_refused(env: DeviceEnv) -> None:
    c = env.connect()
    ev = os.eventfd(0)
    try:
        c.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, 0, [ev])
        for start, count, flags in (
            # Disable [1, 1 + 0xffffffff): wrapped to [1, 0) it passed the
            # check, then closed "eventfds" far past the array.
            (1, 0xFFFFFFFF, vu.VFIO_IRQ_SET_ACTION_TRIGGER | vu.VFIO_IRQ_SET_DATA_EVENTFD),
            (2, 0xFFFFFFFE, vu.VFIO_IRQ_SET_ACTION_TRIGGER | vu.VFIO_IRQ_SET_DATA_NONE),
            (1, 0xFFFFFFFF, vu.VFIO_IRQ_SET_ACTION_MASK | vu.VFIO_IRQ_SET_DATA_NONE),
        ):
            with pytest.raises(vu.VfioUserError) as e:
                c.set_irqs_raw(VFIO_PCI_MSIX_IRQ_INDEX, start, count, flags)
            assert e.value.errno == 22
        env.assert_alive()
        # The vector set before is still there: a proper disable of it works.
        c.set_irqs_raw(
            VFIO_PCI_MSIX_IRQ_INDEX,
            0,
            1,
            vu.VFIO_IRQ_SET_ACTION_TRIGGER | vu.VFIO_IRQ_SET_DATA_EVENTFD,
        )
    finally:
        os.close(ev)


# 0003-dma-refused-counter, and the daemon's own check behind it
def _device_counter(env: DeviceEnv, name: str) -> int:
    counters: dict[str, Any] = env.counters()
    dev = counters.get("device", counters)
    return int(dev[name])


def test_refused_dma_maps_are_counted(env: DeviceEnv) -> None:
    c = env.connect()
    small = memfd(PAGE)
    try:
        base = _device_counter(env, "dma_refused")
        refused(c, 0x100000, PAGE, small, prot=0)
        refused(c, 0x100000, 1 << 30, small)
        refused(c, 0x100000, PAGE, small, offset=PAGE)
        assert _device_counter(env, "dma_refused") == base + 3
        assert env.log_count(r"refused: not readable") >= 1
    finally:
        os.close(small)


def test_guest_memory_truncated_after_mapping_breaks_only_that_device(env: DeviceEnv) -> None:
    """The client shrinks the memfd its rings live in, then rings a doorbell:
    the worker's loads from the lost pages would raise SIGBUS. The daemon
    lives, the device needs a reset, and the next client is served."""
    s = open_session(env)
    try:
        s.driver.bring_up()
        os.ftruncate(s.mem.fd, 0)
        # From here the test must not touch its own mapping either.
        for q in (0, 1):
            s.driver.transport.kick(q)
        env.wait_log(r"device needs reset: guest memory shrank", timeout=10)
        env.assert_alive()
        assert _device_counter(env, "guest_mem_faults") >= 1
    finally:
        # The client's own view of the memory is gone: close without touching it.
        s.client.close()
        os.close(s.mem.fd)
        s.mem.fd = -1
    # The device serves the next client as usual.
    s2 = open_session(env)
    try:
        s2.driver.bring_up()
        assert not s2.driver.transport.status & STATUS_DEVICE_NEEDS_RESET
    finally:
        s2.close()
    env.assert_alive()


def test_notify_page_memfd_is_sealed(env_factory: Any) -> None:
    """In doorbell polling mode the client maps the daemon's notify page: it
    must not be able to shrink that file under the daemon's own mapping."""
    env = env_factory("--notify-mode", "poll")
    c = env.connect()
    info = c.region_info(vu.VFU_PCI_DEV_BAR0_REGION_IDX)
    try:
        assert info.fds, "BAR0 offers no mmappable area in polling mode"
        fd = info.fds[0]
        size = os.fstat(fd).st_size
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, size + PAGE)
    finally:
        info.close_fds()
    env.assert_alive()


# 0005-socket-timeouts-and-broken-body
def _send_half_a_message(c: vu.VfioUserClient) -> None:
    """The header of a DMA_UNMAP and 4 of its 24 payload bytes, then nothing."""
    payload = vu.pack_dma_unmap(0x1000, 0x1000)
    whole = vu.pack_message(c.next_msg_id(), vu.Command.DMA_UNMAP, payload)
    c.send_raw(whole[: vu.HEADER_SIZE + 4])


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(4096) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_half_a_message_drops_the_client(
    sample_server: SampleServer, sample_client: vu.VfioUserClient
) -> None:
    _send_half_a_message(sample_client)
    t0 = time.monotonic()
    assert _closed_by_peer(socket.socket(fileno=os.dup(sample_client.fileno())), within=5)
    assert time.monotonic() - t0 < 3


def test_half_a_message_does_not_hold_up_sigterm(env: DeviceEnv) -> None:
    """The daemon's context thread would wait in recv() for the rest; it now
    gives up after 1 s, drops the client and sees its stop request."""
    c = env.connect()
    _send_half_a_message(c)
    time.sleep(0.2)  # the daemon is now inside the body's recv()
    assert env.server.proc is not None
    t0 = time.monotonic()
    rc = env.server.stop(timeout=10)
    took = time.monotonic() - t0
    env.stopped = True
    assert rc == 0
    assert took < 2, f"SIGTERM took {took:.2f} s"
    # The next client of the same socket is the subject of the other tests;
    # here the daemon must simply be gone in time.


# 0013-irq-error-request-own-eventfds
def test_error_eventfd_never_gets_a_device_interrupt(
    sample_server: SampleServer, sample_client: vu.VfioUserClient
) -> None:
    """QEMU registers an error eventfd at start (VFIO_PCI_ERR_IRQ_INDEX). The
    unpatched library put it in interrupt slot 0, so the device's next
    interrupt 0 reported an unrecoverable error (QEMU stops the VM). The
    sample server raises interrupt 0 (its INTx) when a time written to its
    BAR0 comes."""
    intx, error = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    # After its interrupt the sample does DMA to its first region: give it one.
    fd = memfd(1 << 20)
    try:
        sample_client.dma_map(0, 1 << 20, fd)
        sample_client.set_irqs(vu.VFIO_PCI_INTX_IRQ_INDEX, 0, [intx])
        sample_client.set_irqs(vu.VFIO_PCI_ERR_IRQ_INDEX, 0, [error])
        sample_client.region_write(0, 0, int(time.time() + 1).to_bytes(8, "little"))
        deadline = time.monotonic() + 5
        fired: list[str] = []
        while not fired and time.monotonic() < deadline:
            for name, fd in (("intx", intx), ("error", error)):
                try:
                    os.eventfd_read(fd)
                    fired.append(name)
                except BlockingIOError:
                    pass
            time.sleep(0.05)
        assert fired == ["intx"], f"interrupt 0 reached {fired or 'nothing'}"
        assert sample_server.proc.poll() is None
    finally:
        os.close(intx)
        os.close(error)
        with contextlib.suppress(OSError):  # the client may have closed it with the connection
            os.close(fd)
