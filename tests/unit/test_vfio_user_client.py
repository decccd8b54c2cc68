"""Message packing against golden bytes written out from the vfio-user layouts.

Header (16 bytes, LE): u16 msg_id, u16 command, u32 msg_size, u32 flags
(bits 0-3 type, bit 4 no_reply, bit 5 error), u32 error_no.
The golden strings are spelled out field by field, not produced with struct.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vfiouser_net_harness import vfio_user_client as vu
from vfiouser_net_harness.guest_memory import GuestMemory


def h(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", "").replace("\n", ""))


# -- header -------------------------------------------------------------------


def test_header_command_golden() -> None:
    # msg_id 0x0102, cmd 4 (DEVICE_GET_INFO), size 32, flags 0 (command), error 0
    assert vu.pack_header(0x0102, 4, 16) == h("0201 0400 20000000 00000000 00000000")


def test_header_no_reply_golden() -> None:
    # REGION_WRITE (10), no_reply is bit 4 -> 0x10
    assert vu.pack_header(7, 10, 24, no_reply=True) == h("0700 0a00 28000000 10000000 00000000")


def test_header_error_reply_golden() -> None:
    # reply type 1 | error bit 5 (0x20) = 0x21, errno 22 (EINVAL)
    assert vu.pack_header(0xFFFF, 2, 0, reply=True, error_no=22) == h(
        "ffff 0200 10000000 21000000 16000000"
    )


def test_header_unpack_and_flags() -> None:
    hdr = vu.Header.unpack(h("3412 0900 18000000 21000000 05000000"))
    assert hdr == vu.Header(0x1234, 9, 24, 0x21, 5)
    assert hdr.is_reply and hdr.error and not hdr.no_reply
    assert vu.Header.unpack(h("0000 0a00 10000000 10000000 00000000")).no_reply
    with pytest.raises(vu.VfioUserProtocolError):
        vu.Header.unpack(b"\0" * 15)


def test_msg_id_wraps() -> None:
    assert vu.pack_header(0x10001, 1, 0)[:2] == h("0100")


# -- payloads -----------------------------------------------------------------


def test_version_golden() -> None:
    payload = vu.pack_version(0, 1, {"capabilities": {"max_msg_fds": 8}})
    expected = h("0000 0100") + b'{"capabilities":{"max_msg_fds":8}}\0'
    assert payload == expected
    assert vu.pack_version(0, 1, None) == h("0000 0100")
    msg = vu.pack_message(0, vu.Command.VERSION, payload)
    assert msg[:16] == h("0000 0100") + (16 + len(expected)).to_bytes(4, "little") + bytes(8)


def test_version_unpack() -> None:
    major, minor, caps = vu.unpack_version(
        h("0000 0100") + b'{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576}}\0'
    )
    assert (major, minor) == (0, 1)
    sv = vu.ServerVersion(major, minor, caps)
    assert sv.max_msg_fds == 8 and sv.max_data_xfer_size == 1048576
    assert vu.ServerVersion(0, 1, {}).max_msg_fds == 1
    assert vu.unpack_version(h("0000 0000")) == (0, 0, {})
    with pytest.raises(vu.VfioUserProtocolError):
        vu.unpack_version(b"\0")


def test_dma_map_golden() -> None:
    # argsz 32, flags R|W, offset 0x1000, addr 0x80000000, size 0x200000
    assert vu.pack_dma_map(0x8000_0000, 0x20_0000, 0x1000, vu.DMA_RW) == h(
        "20000000 03000000 0010000000000000 0000008000000000 0000200000000000"
    )


def test_dma_unmap_golden() -> None:
    # argsz 24, flags 0, addr, size
    assert vu.pack_dma_unmap(0x8000_0000, 0x20_0000) == h(
        "18000000 00000000 0000008000000000 0000200000000000"
    )
    assert vu.pack_dma_unmap(0, 0, vu.DMA_UNMAP_FLAG_ALL)[4:8] == h("02000000")


def test_device_info_golden() -> None:
    assert vu.pack_device_info_request() == h("10000000 00000000 00000000 00000000")
    info = vu.DeviceInfo.unpack(h("10000000 03000000 0a000000 05000000"))
    assert info == vu.DeviceInfo(16, vu.VFIO_DEVICE_FLAGS_PCI | vu.VFIO_DEVICE_FLAGS_RESET, 10, 5)


def test_region_info_golden() -> None:
    # argsz 32, flags 0, index 7, cap_offset 0, size 0, offset 0
    assert vu.pack_region_info_request(7) == h(
        "20000000 00000000 07000000 00000000 0000000000000000 0000000000000000"
    )
    info = vu.RegionInfo.unpack(
        h("20000000 03000000 07000000 00000000 0001000000000000 0000000000000000")
    )
    assert (info.index, info.size, info.readable, info.writable, info.mmappable) == (
        7,
        256,
        True,
        True,
        False,
    )


def test_region_info_sparse_mmap_caps() -> None:
    # vfio_region_info (32) + sparse cap at 32: hdr {id 1, ver 1, next 0},
    # nr_areas 2, reserved, areas {0,0x1000} {0x2000,0x1000}
    payload = h(
        "50000000 0f000000 01000000 20000000 0030000000000000 0000000000000000"
        "0100 0100 00000000 02000000 00000000"
        "0000000000000000 0010000000000000"
        "0020000000000000 0010000000000000"
    )
    info = vu.RegionInfo.unpack(payload)
    assert info.argsz == 0x50 and info.mmappable
    assert info.sparse_areas == [
        vu.SparseMmapArea(0, 0x1000),
        vu.SparseMmapArea(0x2000, 0x1000),
    ]


def test_region_info_type_then_sparse_caps() -> None:
    payload = h(
        "48000000 0f000000 09000000 20000000 0000010000000000 0000000000000000"
        "0200 0100 30000000 03000000 01000000"  # type cap, next at 0x30
        "0100 0100 00000000 01000000 00000000 0010000000000000 0000010000000000"
    )
    info = vu.RegionInfo.unpack(payload)
    assert info.cap_type == (3, 1)
    assert info.sparse_areas == [vu.SparseMmapArea(0x1000, 0x10000)]


def test_region_info_cap_loop_rejected() -> None:
    payload = h(
        "30000000 08000000 00000000 20000000 0000000000000000 0000000000000000"
        "0300 0100 20000000 00000000"
    )
    with pytest.raises(vu.VfioUserProtocolError):
        vu.RegionInfo.unpack(payload)


def test_irq_info_golden() -> None:
    assert vu.pack_irq_info_request(2) == h("10000000 00000000 02000000 00000000")
    assert vu.IrqInfo.unpack(h("10000000 01000000 02000000 03000000")).count == 3


def test_set_irqs_golden() -> None:
    # argsz 20, flags TRIGGER(0x20)|EVENTFD(0x4), index 2 (MSI-X), start 1, count 3
    flags = vu.VFIO_IRQ_SET_ACTION_TRIGGER | vu.VFIO_IRQ_SET_DATA_EVENTFD
    assert vu.pack_set_irqs(2, 1, 3, flags) == h("14000000 24000000 02000000 01000000 03000000")
    # DATA_BOOL carries one byte per vector and argsz covers it
    flags = vu.VFIO_IRQ_SET_ACTION_TRIGGER | vu.VFIO_IRQ_SET_DATA_BOOL
    assert vu.pack_set_irqs(0, 0, 2, flags, b"\x01\x00") == h(
        "16000000 22000000 00000000 00000000 02000000 0100"
    )


def test_region_access_golden() -> None:
    # offset u64, region u32, count u32, data
    assert vu.pack_region_access(7, 0x34, 1) == h("3400000000000000 07000000 01000000")
    assert vu.pack_region_access(4, 0x3000, 2, b"\x05\x00") == h(
        "0030000000000000 04000000 02000000 0500"
    )
    assert vu.unpack_region_access(h("3400000000000000 07000000 01000000 40")) == (
        7,
        0x34,
        1,
        b"\x40",
    )


def test_dma_access_golden() -> None:
    assert vu.pack_dma_access(0x1000, 4, b"abcd") == h("0010000000000000 0400000000000000 61626364")
    assert vu.unpack_dma_access(h("0010000000000000 0000000000000000")) == (
        0x1000,
        0,
        b"",
    )


def test_error_names_errno() -> None:
    e = vu.VfioUserError(errno.EINVAL, vu.Command.DMA_MAP, 3)
    assert e.errno == errno.EINVAL and "DMA_MAP" in str(e) and "EINVAL" in str(e)


# -- a scripted fake server on a real socket ------------------------------------


Handler = Callable[[socket.socket], None]


@pytest.fixture
def fake_server(tmp_path: Path) -> Iterator[Callable[[Handler], str]]:
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(handler: Handler) -> str:
        path = str(tmp_path / f"s{len(listeners)}.sock")
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ls.bind(path)
        ls.listen(1)
        listeners.append(ls)

        def run() -> None:
            conn, _ = ls.accept()
            with conn:
                handler(conn)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        threads.append(t)
        return path

    yield start
    for ls in listeners:
        ls.close()
    for t in threads:
        t.join(timeout=5)


def recv_msg(conn: socket.socket) -> tuple[vu.Header, bytes, list[int]]:
    fds: list[int] = []
    data = b""
    while len(data) < 16:
        chunk, anc, _, _ = conn.recvmsg(16 - len(data), socket.CMSG_SPACE(64))
        for lvl, typ, cd in anc:
            if lvl == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(cd[: len(cd) - len(cd) % 4])
                fds.extend(a)
        if not chunk:
            raise EOFError
        data += chunk
    hdr = vu.Header.unpack(data)
    body = b""
    while len(body) < hdr.msg_size - 16:
        chunk = conn.recv(hdr.msg_size - 16 - len(body))
        if not chunk:
            raise EOFError
        body += chunk
    return hdr, body, fds


def reply(
    conn: socket.socket, hdr: vu.Header, payload: bytes = b"", err: int | None = None
) -> None:
    conn.sendall(vu.pack_message(hdr.msg_id, hdr.cmd, payload, reply=True, error_no=err))


def test_negotiate_and_error_reply(fake_server: Callable[[Handler], str]) -> None:
    seen: list[bytes] = []

    def handler(conn: socket.socket) -> None:
        hdr, body, _ = recv_msg(conn)
        seen.append(body)
        reply(conn, hdr, vu.pack_version(0, 1, {"capabilities": {"max_msg_fds": 8}}))
        hdr, body, _ = recv_msg(conn)
        reply(conn, hdr, err=errno.ENOENT)
        hdr, body, _ = recv_msg(conn)  # region read
        region, off, count, _ = vu.unpack_region_access(body)
        reply(conn, hdr, vu.pack_region_access(region, off, count, bytes(range(count))))

    with vu.VfioUserClient(fake_server(handler), timeout=2) as c:
        sv = c.negotiate()
        assert sv.max_msg_fds == 8
        with pytest.raises(vu.VfioUserError) as ei:
            c.dma_unmap(0x1000, 0x1000)
        assert ei.value.errno == errno.ENOENT
        assert c.region_read(0, 4, 5) == bytes(range(5))
    assert seen[0][:4] == h("0000 0100") and seen[0].endswith(b"\0")


def test_mismatched_reply_id_rejected(fake_server: Callable[[Handler], str]) -> None:
    def handler(conn: socket.socket) -> None:
        hdr, _, _ = recv_msg(conn)
        conn.sendall(vu.pack_message(hdr.msg_id + 1, hdr.cmd, b"", reply=True))

    with (
        vu.VfioUserClient(fake_server(handler), timeout=2) as c,
        pytest.raises(vu.VfioUserProtocolError),
    ):
        c.reset()


def test_timeout_and_posted_write(fake_server: Callable[[Handler], str]) -> None:
    got: list[vu.Header] = []
    done = threading.Event()

    def handler(conn: socket.socket) -> None:
        hdr, _, _ = recv_msg(conn)
        got.append(hdr)
        done.wait(5)

    with vu.VfioUserClient(fake_server(handler), timeout=0.2) as c:
        c.region_write(2, 0x3000, b"\x01\x00", posted=True)  # returns at once
        with pytest.raises(vu.VfioUserTimeout):
            c.device_info()
        done.set()
    assert got[0].no_reply and got[0].cmd == vu.Command.REGION_WRITE


def test_disconnect_detected(fake_server: Callable[[Handler], str]) -> None:
    def handler(conn: socket.socket) -> None:
        recv_msg(conn)

    with (
        vu.VfioUserClient(fake_server(handler), timeout=2) as c,
        pytest.raises(vu.VfioUserDisconnected),
    ):
        c.device_info()


def test_fds_sent_with_dma_map_and_set_irqs(
    fake_server: Callable[[Handler], str],
) -> None:
    map_msgs: list[tuple[bytes, int]] = []
    irq_msgs: list[tuple[bytes, int]] = []

    def handler(conn: socket.socket) -> None:
        hdr, _, _ = recv_msg(conn)
        reply(conn, hdr, vu.pack_version(0, 1, {"capabilities": {"max_msg_fds": 2}}))
        hdr, body, fds = recv_msg(conn)
        map_msgs.append((body, len(fds)))
        for fd in fds:
            os.close(fd)
        reply(conn, hdr)
        for _ in range(2):  # 3 eventfds, max_msg_fds 2 -> two messages
            hdr, body, fds = recv_msg(conn)
            irq_msgs.append((body, len(fds)))
            for fd in fds:
                os.eventfd_write(fd, 1)
                os.close(fd)
            reply(conn, hdr)

    with (
        GuestMemory(1 << 20) as mem,
        vu.VfioUserClient(fake_server(handler), timeout=2) as c,
    ):
        c.negotiate()
        mem.map_into(c)
        efds = [vu.new_eventfd() for _ in range(3)]
        c.set_irqs(vu.VFIO_PCI_MSIX_IRQ_INDEX, 0, efds)
        assert [vu.read_eventfd(fd) for fd in efds] == [1, 1, 1]
        for fd in efds:
            os.close(fd)
    body, nfds = map_msgs[0]
    assert body == vu.pack_dma_map(0, 1 << 20, 0, vu.DMA_RW) and nfds == 1
    (b1, n1), (b2, n2) = irq_msgs
    flags = vu.VFIO_IRQ_SET_ACTION_TRIGGER | vu.VFIO_IRQ_SET_DATA_EVENTFD
    assert (b1, n1) == (vu.pack_set_irqs(2, 0, 2, flags), 2)
    assert (b2, n2) == (vu.pack_set_irqs(2, 2, 1, flags), 1)


def test_server_dma_write_and_read_served(
    fake_server: Callable[[Handler], str],
) -> None:
    replies: list[tuple[vu.Header, bytes]] = []

    def handler(conn: socket.socket) -> None:
        hdr, _, fds = recv_msg(conn)  # DMA_MAP
        for fd in fds:
            os.close(fd)
        # Before replying, the server issues its own commands (as vfu_sgl_* do).
        conn.sendall(
            vu.pack_message(1, vu.Command.DMA_WRITE, vu.pack_dma_access(0x2000, 3, b"abc"))
        )
        replies.append(recv_msg(conn)[:2])
        conn.sendall(vu.pack_message(2, vu.Command.DMA_READ, vu.pack_dma_access(0x2001, 2)))
        replies.append(recv_msg(conn)[:2])
        conn.sendall(vu.pack_message(3, vu.Command.DMA_READ, vu.pack_dma_access(0x900000, 2)))
        replies.append(recv_msg(conn)[:2])
        reply(conn, hdr)

    with (
        GuestMemory(1 << 20) as mem,
        vu.VfioUserClient(fake_server(handler), timeout=2) as c,
    ):
        mem.map_into(c)
        assert mem.read(0x2000, 3) == b"abc"
        assert c.server_requests_served == 3
    (h1, p1), (h2, p2), (h3, p3) = replies
    assert h1.is_reply and h1.msg_id == 1 and p1 == vu.pack_dma_access(0x2000, 3)
    assert h2.msg_id == 2 and p2 == vu.pack_dma_access(0x2001, 2, b"bc")
    assert h3.error and h3.error_no == errno.EFAULT and p3 == b""
