"""A pure-Python vfio-user client for tests.

Written against the vfio-user protocol as implemented by libvfio-user revision
0b28d205 (June 2022, the copy QEMU 10.x/11.x source packages carry) and QEMU's
``vfio-user-pci`` client.  Every message is a 16-byte little-endian header::

    u16 msg_id | u16 command | u32 msg_size (incl. header) | u32 flags | u32 error_no

``flags`` bits 0-3 are the message type (0 command, 1 reply), bit 4 is
*no_reply* (0x10) and bit 5 is *error* (0x20).  (The 0b28d205 header declares
these as C bit-fields; its ``VFIO_USER_FLAGS_NO_REPLY`` macro says 0x1, but the
on-wire bit is 0x10.)

File descriptors (DMA regions, eventfds) travel as SCM_RIGHTS ancillary data
on the same ``sendmsg`` as the message bytes.

The server may also send *commands* to the client (``VFIO_USER_DMA_READ`` /
``VFIO_USER_DMA_WRITE``: at 0b28d205 ``vfu_sgl_read``/``vfu_sgl_write`` always
use these messages).  The client services them from the memory it DMA-mapped,
both while it waits for a reply and from :meth:`VfioUserClient.serve`.

Besides the well-formed API, :meth:`VfioUserClient.request` and
:meth:`VfioUserClient.send_raw` let hostile-guest tests send malformed
messages.
"""

from __future__ import annotations

import array
import contextlib
import enum
import errno as errno_mod
import json
import logging
import mmap
import os
import select
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# Protocol constants
# --------------------------------------------------------------------------


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14  # 0b28d205 only; later revisions reuse the range


LIB_VFIO_USER_MAJOR = 0
LIB_VFIO_USER_MINOR = 1

HEADER = struct.Struct("<HHIII")
HEADER_SIZE = HEADER.size  # 16

F_TYPE_MASK = 0xF
F_TYPE_COMMAND = 0x0
F_TYPE_REPLY = 0x1
F_NO_REPLY = 0x10
F_ERROR = 0x20

# DMA map flags (struct vfio_user_dma_map.flags)
DMA_READ = 1 << 0
DMA_WRITE = 1 << 1
DMA_RW = DMA_READ | DMA_WRITE
# DMA unmap flags (linux/vfio.h values)
DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
DMA_UNMAP_FLAG_ALL = 1 << 1

# struct vfio_device_info.flags
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1

# struct vfio_region_info.flags
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3
VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_TYPE = 2

# IRQ indices (VFIO_PCI_*_IRQ_INDEX)
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4

# struct vfio_irq_info.flags
VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3

# struct vfio_irq_set.flags
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

# libvfio-user PCI region indices
VFU_PCI_DEV_BAR0_REGION_IDX = 0
VFU_PCI_DEV_ROM_REGION_IDX = 6
VFU_PCI_DEV_CFG_REGION_IDX = 7
VFU_PCI_DEV_VGA_REGION_IDX = 8
VFU_PCI_DEV_MIGR_REGION_IDX = 9

DEFAULT_MAX_DATA_XFER_SIZE = 1024 * 1024
# Region accesses are split to this size by default: the 0b28d205 server reads
# a message body with one recv() (no MSG_WAITALL) and fails a short read, so a
# message larger than the socket buffer can be rejected.
DEFAULT_CHUNK = 64 * 1024

# Payload layouts
VERSION_HDR = struct.Struct("<HH")
DMA_MAP = struct.Struct("<IIQQQ")  # argsz flags offset addr size
DMA_UNMAP = struct.Struct("<IIQQ")  # argsz flags addr size
DEVICE_INFO = struct.Struct("<IIII")  # argsz flags num_regions num_irqs
REGION_INFO = struct.Struct("<IIIIQQ")  # argsz flags index cap_offset size offset
IRQ_INFO = struct.Struct("<IIII")  # argsz flags index count
IRQ_SET = struct.Struct("<IIIII")  # argsz flags index start count
REGION_ACCESS = struct.Struct("<QII")  # offset region count
DMA_ACCESS = struct.Struct("<QQ")  # addr count
CAP_HEADER = struct.Struct("<HHI")  # id version next
SPARSE_MMAP_HDR = struct.Struct("<II")  # nr_areas reserved
SPARSE_MMAP_AREA = struct.Struct("<QQ")  # offset size
CAP_TYPE = struct.Struct("<II")  # type subtype


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class VfioUserError(Exception):
    """The server answered a command with an error reply."""

    def __init__(self, errno: int, cmd: int, msg_id: int) -> None:
        self.errno = errno
        self.cmd = cmd
        self.msg_id = msg_id
        try:
            cmd_name = Command(cmd).name
        except ValueError:
            cmd_name = str(cmd)
        name = errno_mod.errorcode.get(errno, str(errno))
        super().__init__(
            f"vfio-user {cmd_name} (msg {msg_id:#x}) failed: {name} ({os.strerror(errno)})"
        )


class VfioUserProtocolError(Exception):
    """A reply was malformed or did not match the request."""


class VfioUserTimeout(TimeoutError):
    """No (complete) message arrived in time."""


class VfioUserDisconnected(ConnectionError):
    """The server closed the connection."""


# --------------------------------------------------------------------------
# Message packing (pure functions: unit-tested against golden bytes)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    msg_id: int
    cmd: int
    msg_size: int
    flags: int = 0
    error_no: int = 0

    @property
    def type(self) -> int:
        return self.flags & F_TYPE_MASK

    @property
    def is_reply(self) -> bool:
        return self.type == F_TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & F_NO_REPLY)

    @property
    def error(self) -> bool:
        return bool(self.flags & F_ERROR)

    def pack(self) -> bytes:
        return HEADER.pack(self.msg_id, self.cmd, self.msg_size, self.flags, self.error_no)

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        if len(data) < HEADER_SIZE:
            raise VfioUserProtocolError(f"short header: {len(data)} bytes")
        return cls(*HEADER.unpack_from(data))


def pack_header(
    msg_id: int,
    cmd: int,
    payload_len: int,
    *,
    reply: bool = False,
    no_reply: bool = False,
    error_no: int | None = None,
) -> bytes:
    """Header for a message with ``payload_len`` bytes after the header."""
    flags = F_TYPE_REPLY if reply else F_TYPE_COMMAND
    if no_reply:
        flags |= F_NO_REPLY
    err = 0
    if error_no is not None:
        flags |= F_ERROR
        err = error_no
    return HEADER.pack(msg_id & 0xFFFF, cmd, HEADER_SIZE + payload_len, flags, err)


def pack_message(msg_id: int, cmd: int, payload: bytes = b"", **kw: Any) -> bytes:
    return pack_header(msg_id, cmd, len(payload), **kw) + payload


def pack_version(major: int, minor: int, caps: dict[str, Any] | None) -> bytes:
    """VFIO_USER_VERSION payload: u16 major, u16 minor, NUL-terminated JSON."""
    body = VERSION_HDR.pack(major, minor)
    if caps is not None:
        body += json.dumps(caps, separators=(",", ":")).encode() + b"\0"
    return body


def unpack_version(payload: bytes) -> tuple[int, int, dict[str, Any]]:
    if len(payload) < VERSION_HDR.size:
        raise VfioUserProtocolError(f"short VERSION payload ({len(payload)} bytes)")
    major, minor = VERSION_HDR.unpack_from(payload)
    data = payload[VERSION_HDR.size :]
    caps: dict[str, Any] = {}
    if data:
        text = data.split(b"\0", 1)[0].decode()
        if text:
            parsed = json.loads(text)
            if not isinstance(parsed, dict):
                raise VfioUserProtocolError(f"VERSION JSON is not an object: {text!r}")
            caps = parsed
    return major, minor, caps


def pack_dma_map(iova: int, size: int, offset: int, flags: int) -> bytes:
    return DMA_MAP.pack(DMA_MAP.size, flags, offset, iova, size)


def pack_dma_unmap(iova: int, size: int, flags: int = 0) -> bytes:
    return DMA_UNMAP.pack(DMA_UNMAP.size, flags, iova, size)


def pack_device_info_request() -> bytes:
    return DEVICE_INFO.pack(DEVICE_INFO.size, 0, 0, 0)


def pack_region_info_request(index: int, argsz: int = REGION_INFO.size) -> bytes:
    return REGION_INFO.pack(argsz, 0, index, 0, 0, 0)


def pack_irq_info_request(index: int) -> bytes:
    return IRQ_INFO.pack(IRQ_INFO.size, 0, index, 0)


def pack_set_irqs(index: int, start: int, count: int, flags: int, data: bytes = b"") -> bytes:
    return IRQ_SET.pack(IRQ_SET.size + len(data), flags, index, start, count) + data


def pack_region_access(region: int, offset: int, count: int, data: bytes = b"") -> bytes:
    return REGION_ACCESS.pack(offset, region, count) + data


def unpack_region_access(payload: bytes) -> tuple[int, int, int, bytes]:
    """Return (region, offset, count, data)."""
    if len(payload) < REGION_ACCESS.size:
        raise VfioUserProtocolError(f"short region access payload ({len(payload)} bytes)")
    offset, region, count = REGION_ACCESS.unpack_from(payload)
    return region, offset, count, payload[REGION_ACCESS.size :]


def pack_dma_access(addr: int, count: int, data: bytes = b"") -> bytes:
    return DMA_ACCESS.pack(addr, count) + data


def unpack_dma_access(payload: bytes) -> tuple[int, int, bytes]:
    if len(payload) < DMA_ACCESS.size:
        raise VfioUserProtocolError(f"short DMA access payload ({len(payload)} bytes)")
    addr, count = DMA_ACCESS.unpack_from(payload)
    return addr, count, payload[DMA_ACCESS.size :]


@dataclass(frozen=True)
class DeviceInfo:
    argsz: int
    flags: int
    num_regions: int
    num_irqs: int

    @classmethod
    def unpack(cls, payload: bytes) -> DeviceInfo:
        if len(payload) < DEVICE_INFO.size:
            raise VfioUserProtocolError(f"short DEVICE_GET_INFO reply ({len(payload)} bytes)")
        return cls(*DEVICE_INFO.unpack_from(payload))


@dataclass(frozen=True)
class SparseMmapArea:
    offset: int
    size: int


@dataclass
class RegionInfo:
    argsz: int
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int
    sparse_areas: list[SparseMmapArea] = field(default_factory=list)
    cap_type: tuple[int, int] | None = None
    fds: list[int] = field(default_factory=list)

    @property
    def readable(self) -> bool:
        return bool(self.flags & VFIO_REGION_INFO_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & VFIO_REGION_INFO_FLAG_WRITE)

    @property
    def mmappable(self) -> bool:
        return bool(self.flags & VFIO_REGION_INFO_FLAG_MMAP)

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    @classmethod
    def unpack(cls, payload: bytes) -> RegionInfo:
        if len(payload) < REGION_INFO.size:
            raise VfioUserProtocolError(f"short REGION_INFO reply ({len(payload)} bytes)")
        info = cls(*REGION_INFO.unpack_from(payload))
        if info.flags & VFIO_REGION_INFO_FLAG_CAPS and info.cap_offset:
            info._parse_caps(payload)
        return info

    def _parse_caps(self, payload: bytes) -> None:
        off = self.cap_offset
        seen: set[int] = set()
        while off:
            if off in seen or off + CAP_HEADER.size > len(payload):
                raise VfioUserProtocolError(f"bad region cap chain at offset {off}")
            seen.add(off)
            cap_id, _version, nxt = CAP_HEADER.unpack_from(payload, off)
            body = off + CAP_HEADER.size
            if cap_id == VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                nr_areas, _ = SPARSE_MMAP_HDR.unpack_from(payload, body)
                base = body + SPARSE_MMAP_HDR.size
                if base + nr_areas * SPARSE_MMAP_AREA.size > len(payload):
                    raise VfioUserProtocolError("truncated sparse mmap capability")
                for i in range(nr_areas):
                    a_off, a_size = SPARSE_MMAP_AREA.unpack_from(
                        payload, base + i * SPARSE_MMAP_AREA.size
                    )
                    self.sparse_areas.append(SparseMmapArea(a_off, a_size))
            elif cap_id == VFIO_REGION_INFO_CAP_TYPE:
                self.cap_type = CAP_TYPE.unpack_from(payload, body)
            else:
                log.debug("region %d: ignoring cap id %d", self.index, cap_id)
            off = nxt


@dataclass(frozen=True)
class IrqInfo:
    argsz: int
    flags: int
    index: int
    count: int

    @classmethod
    def unpack(cls, payload: bytes) -> IrqInfo:
        if len(payload) < IRQ_INFO.size:
            raise VfioUserProtocolError(f"short IRQ_INFO reply ({len(payload)} bytes)")
        return cls(*IRQ_INFO.unpack_from(payload))


@dataclass
class Message:
    header: Header
    payload: bytes
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


@dataclass(frozen=True)
class ServerVersion:
    major: int
    minor: int
    caps: dict[str, Any]

    @property
    def max_msg_fds(self) -> int:
        # The spec's default when the capability is absent is 1.
        v = self.caps.get("capabilities", {}).get("max_msg_fds", 1)
        return int(v)

    @property
    def max_data_xfer_size(self) -> int:
        v = self.caps.get("capabilities", {}).get("max_data_xfer_size", DEFAULT_MAX_DATA_XFER_SIZE)
        return int(v)


# --------------------------------------------------------------------------
# DMA backing for server-initiated DMA_READ / DMA_WRITE
# --------------------------------------------------------------------------


class DmaBacking(Protocol):
    """Something that holds the bytes of a DMA-mapped range (e.g. GuestMemory)."""

    def dma_read(self, offset: int, count: int) -> bytes: ...

    def dma_write(self, offset: int, data: bytes) -> None: ...


class _MmapBacking:
    """A client-side mapping of the fd handed to the server."""

    def __init__(self, fd: int, size: int, offset: int) -> None:
        gran = mmap.ALLOCATIONGRANULARITY
        aligned = offset - offset % gran
        self._delta = offset - aligned
        self._map = mmap.mmap(fd, size + self._delta, mmap.MAP_SHARED, offset=aligned)

    def dma_read(self, offset: int, count: int) -> bytes:
        o = self._delta + offset
        return bytes(self._map[o : o + count])

    def dma_write(self, offset: int, data: bytes) -> None:
        o = self._delta + offset
        self._map[o : o + len(data)] = data

    def close(self) -> None:
        self._map.close()


@dataclass
class _DmaMapping:
    iova: int
    size: int
    prot: int
    backing: DmaBacking | None
    owned: _MmapBacking | None = None


# --------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------


class VfioUserClient:
    """Synchronous vfio-user client over an AF_UNIX stream socket.

    Every receive is bounded by ``timeout`` seconds (per call override where
    offered).  Not thread-safe: use one client per thread.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 5.0,
        connect_timeout: float = 5.0,
        max_msg_fds: int = 16,
        max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.max_msg_fds = max_msg_fds
        self.max_data_xfer_size = max_data_xfer_size
        self.chunk_size = chunk_size
        self.server: ServerVersion | None = None
        self._next_id = 0
        self._dma: list[_DmaMapping] = []
        self._rxbuf = bytearray()
        self._rxfds: list[int] = []
        self.server_requests_served = 0
        self.sock = self._connect(connect_timeout)

    # -- connection -----------------------------------------------------------

    def _connect(self, connect_timeout: float) -> socket.socket:
        deadline = time.monotonic() + connect_timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(max(0.05, deadline - time.monotonic()))
                s.connect(self.path)
                log.debug("connected to %s", self.path)
                return s
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                if time.monotonic() >= deadline:
                    raise VfioUserTimeout(f"cannot connect to {self.path}: {e}") from e
                time.sleep(0.02)
            except BaseException:
                s.close()
                raise

    def close(self) -> None:
        """Close the socket and any client-side DMA mappings."""
        for m in self._dma:
            if m.owned is not None:
                m.owned.close()
        self._dma.clear()
        for fd in self._rxfds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._rxfds.clear()
        if self.sock.fileno() != -1:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            log.debug("closed connection to %s", self.path)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- raw I/O --------------------------------------------------------------

    def next_msg_id(self) -> int:
        mid = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFF
        return mid

    def send_raw(self, data: bytes, fds: Sequence[int] = (), timeout: float | None = None) -> None:
        """Send bytes as they are (one sendmsg; fds attached to the first byte)."""
        t = self.timeout if timeout is None else timeout
        self.sock.settimeout(t)
        view = memoryview(data)
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            sent = self.sock.sendmsg([view], anc)
            while sent < len(view):
                sent += self.sock.send(view[sent:])
        except TimeoutError as e:
            raise VfioUserTimeout(f"send timed out after {t}s") from e
        except (BrokenPipeError, ConnectionResetError) as e:
            raise VfioUserDisconnected(f"server closed the connection: {e}") from e

    def _recv_some(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise VfioUserTimeout("timed out waiting for a message")
        self.sock.settimeout(remaining)
        ancsize = socket.CMSG_SPACE(self.max_msg_fds * array.array("i").itemsize)
        try:
            data, anc, msg_flags, _ = self.sock.recvmsg(65536, ancsize)
        except TimeoutError as e:
            raise VfioUserTimeout("timed out waiting for a message") from e
        except ConnectionResetError as e:
            raise VfioUserDisconnected(f"connection reset: {e}") from e
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds = array.array("i")
                usable = len(cdata) - len(cdata) % fds.itemsize
                fds.frombytes(cdata[:usable])
                self._rxfds.extend(fds)
        if msg_flags & socket.MSG_CTRUNC:
            log.warning(
                "ancillary data truncated: server sent more than %d fds",
                self.max_msg_fds,
            )
        if not data:
            raise VfioUserDisconnected("server closed the connection")
        self._rxbuf += data

    def recv_message(self, timeout: float | None = None) -> Message:
        """Receive one whole message (any type) with the fds that came with it."""
        t = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        while len(self._rxbuf) < HEADER_SIZE:
            self._recv_some(deadline)
        hdr = Header.unpack(bytes(self._rxbuf[:HEADER_SIZE]))
        if hdr.msg_size < HEADER_SIZE:
            raise VfioUserProtocolError(f"message size {hdr.msg_size} < header size")
        if hdr.msg_size > HEADER_SIZE + max(self.max_data_xfer_size, 1 << 20) + 4096:
            raise VfioUserProtocolError(f"message size {hdr.msg_size} too large")
        while len(self._rxbuf) < hdr.msg_size:
            self._recv_some(deadline)
        payload = bytes(self._rxbuf[HEADER_SIZE : hdr.msg_size])
        del self._rxbuf[: hdr.msg_size]
        fds, self._rxfds = self._rxfds, []
        return Message(hdr, payload, fds)

    # -- request / reply ------------------------------------------------------

    def request(
        self,
        cmd: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        no_reply: bool = False,
        msg_id: int | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> Message | None:
        """Send a command; wait for and return its reply (None when no_reply).

        Server commands that arrive meanwhile (DMA_READ/DMA_WRITE) are served.
        With ``check`` an error reply raises :class:`VfioUserError`; without,
        the error reply is returned.
        """
        mid = self.next_msg_id() if msg_id is None else msg_id
        msg = pack_message(mid, cmd, payload, no_reply=no_reply)
        log.debug(
            "-> msg %#x cmd %s size %d fds %d%s",
            mid,
            _cmd_name(cmd),
            len(msg),
            len(fds),
            " (no reply)" if no_reply else "",
        )
        self.send_raw(msg, fds, timeout)
        if no_reply:
            return None
        return self.wait_reply(mid, cmd, timeout=timeout, check=check)

    def wait_reply(
        self, msg_id: int, cmd: int, *, timeout: float | None = None, check: bool = True
    ) -> Message:
        t = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        while True:
            reply = self.recv_message(max(0.0, deadline - time.monotonic()))
            h = reply.header
            if h.type == F_TYPE_COMMAND:
                self._serve_one(reply)
                continue
            if h.type != F_TYPE_REPLY:
                reply.close_fds()
                raise VfioUserProtocolError(f"unknown message type {h.type} (flags {h.flags:#x})")
            if h.msg_id != msg_id:
                reply.close_fds()
                raise VfioUserProtocolError(
                    f"reply msg_id {h.msg_id:#x} does not match request {msg_id:#x}"
                )
            if h.cmd != cmd:
                reply.close_fds()
                raise VfioUserProtocolError(
                    f"reply command {h.cmd} does not match request {_cmd_name(cmd)}"
                )
            log.debug(
                "<- msg %#x cmd %s size %d fds %d%s",
                h.msg_id,
                _cmd_name(h.cmd),
                h.msg_size,
                len(reply.fds),
                f" error {h.error_no}" if h.error else "",
            )
            if h.error and check:
                reply.close_fds()
                raise VfioUserError(h.error_no or errno_mod.EINVAL, cmd, h.msg_id)
            return reply

    def _call(self, cmd: int, payload: bytes = b"", fds: Sequence[int] = ()) -> Message:
        reply = self.request(cmd, payload, fds)
        assert reply is not None
        return reply

    # -- server-initiated commands -------------------------------------------

    def serve(self, timeout: float = 0.0, max_requests: int | None = None) -> int:
        """Serve server commands (DMA_READ/DMA_WRITE) arriving within ``timeout``.

        Returns how many were served.  A reply arriving here is a protocol error.
        """
        served = 0
        deadline = time.monotonic() + timeout
        while max_requests is None or served < max_requests:
            remaining = max(0.0, deadline - time.monotonic())
            if not self._rxbuf:
                readable, _, _ = select.select([self.sock], [], [], remaining)
                if not readable:
                    break
            # Once a message has started to arrive, give it the full timeout.
            msg = self.recv_message(max(remaining, self.timeout))
            if msg.header.type != F_TYPE_COMMAND:
                msg.close_fds()
                raise VfioUserProtocolError(f"unexpected reply msg {msg.header.msg_id:#x}")
            self._serve_one(msg)
            served += 1
        return served

    def _find_dma(self, addr: int, count: int) -> _DmaMapping | None:
        for m in self._dma:
            if m.iova <= addr and addr + count <= m.iova + m.size:
                return m
        return None

    def _serve_one(self, msg: Message) -> None:
        h = msg.header
        msg.close_fds()
        self.server_requests_served += 1
        err: int | None = None
        out = b""
        try:
            if h.cmd in (Command.DMA_READ, Command.DMA_WRITE):
                addr, count, data = unpack_dma_access(msg.payload)
                m = self._find_dma(addr, count)
                log.debug("server %s addr %#x count %d", _cmd_name(h.cmd), addr, count)
                if m is None or m.backing is None:
                    err = errno_mod.EFAULT
                elif h.cmd == Command.DMA_READ:
                    if not m.prot & DMA_READ:
                        err = errno_mod.EPERM
                    else:
                        out = pack_dma_access(addr, count, m.backing.dma_read(addr - m.iova, count))
                else:
                    if len(data) != count:
                        err = errno_mod.EINVAL
                    elif not m.prot & DMA_WRITE:
                        err = errno_mod.EPERM
                    else:
                        m.backing.dma_write(addr - m.iova, data)
                        out = pack_dma_access(addr, count)
            else:
                err = errno_mod.ENOTSUP
        except VfioUserProtocolError:
            err = errno_mod.EINVAL
        if err is not None:
            log.warning(
                "server command %s (msg %#x) failed: errno %d",
                _cmd_name(h.cmd),
                h.msg_id,
                err,
            )
        if h.no_reply:
            return
        self.send_raw(pack_message(h.msg_id, h.cmd, b"" if err else out, reply=True, error_no=err))

    # -- protocol operations --------------------------------------------------

    def negotiate(
        self,
        *,
        major: int = LIB_VFIO_USER_MAJOR,
        minor: int = LIB_VFIO_USER_MINOR,
        caps: dict[str, Any] | None = None,
        no_json: bool = False,
    ) -> ServerVersion:
        """Send VFIO_USER_VERSION; the first message on a connection.

        ``caps`` replaces the default capabilities JSON; ``no_json`` sends none
        (the server then assumes max_msg_fds 1).
        """
        if caps is None and not no_json:
            caps = {
                "capabilities": {
                    "max_msg_fds": self.max_msg_fds,
                    "max_data_xfer_size": self.max_data_xfer_size,
                }
            }
        reply = self._call(Command.VERSION, pack_version(major, minor, None if no_json else caps))
        reply.close_fds()
        smajor, sminor, scaps = unpack_version(reply.payload)
        if smajor != major:
            raise VfioUserProtocolError(f"server major {smajor} != proposed {major}")
        if sminor > minor:
            raise VfioUserProtocolError(f"server minor {sminor} > proposed {minor}")
        self.server = ServerVersion(smajor, sminor, scaps)
        log.info("negotiated vfio-user %d.%d caps %s", smajor, sminor, scaps)
        return self.server

    @property
    def _xfer(self) -> int:
        limit = self.server.max_data_xfer_size if self.server else DEFAULT_MAX_DATA_XFER_SIZE
        return max(1, min(self.chunk_size, limit, self.max_data_xfer_size))

    def device_info(self) -> DeviceInfo:
        return DeviceInfo.unpack(
            self._call(Command.DEVICE_GET_INFO, pack_device_info_request()).payload
        )

    def region_info(self, index: int) -> RegionInfo:
        """DEVICE_GET_REGION_INFO, re-asked with a larger argsz if caps don't fit.

        Fds received for mmap areas are in ``RegionInfo.fds`` (caller closes).
        """
        argsz = REGION_INFO.size
        for _ in range(3):
            reply = self._call(
                Command.DEVICE_GET_REGION_INFO, pack_region_info_request(index, argsz)
            )
            info = RegionInfo.unpack(reply.payload)
            if info.argsz > argsz:
                reply.close_fds()
                argsz = info.argsz
                continue
            info.fds = reply.fds
            return info
        raise VfioUserProtocolError(f"region {index}: argsz keeps growing")

    def irq_info(self, index: int) -> IrqInfo:
        return IrqInfo.unpack(
            self._call(Command.DEVICE_GET_IRQ_INFO, pack_irq_info_request(index)).payload
        )

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        out = bytearray()
        pos = 0
        while pos < count or count == 0:
            n = min(self._xfer, count - pos)
            reply = self._call(Command.REGION_READ, pack_region_access(region, offset + pos, n))
            reply.close_fds()
            if count == 0:
                return b""
            r_region, r_off, r_count, data = unpack_region_access(reply.payload)
            if (r_region, r_off, r_count) != (region, offset + pos, n) or len(data) != n:
                raise VfioUserProtocolError(
                    f"REGION_READ reply mismatch: region {r_region} offset {r_off:#x} "
                    f"count {r_count} data {len(data)}; asked {region} {offset + pos:#x} {n}"
                )
            out += data
            pos += n
        return bytes(out)

    def region_write(self, region: int, offset: int, data: bytes, posted: bool = False) -> None:
        """REGION_WRITE; ``posted`` sets no_reply (like QEMU's doorbell writes)."""
        pos = 0
        while True:
            n = min(self._xfer, len(data) - pos)
            payload = pack_region_access(region, offset + pos, n, data[pos : pos + n])
            reply = self.request(Command.REGION_WRITE, payload, no_reply=posted)
            if reply is not None:
                reply.close_fds()
                if reply.payload:
                    r_region, r_off, r_count, _ = unpack_region_access(reply.payload)
                    if (r_region, r_off, r_count) != (region, offset + pos, n):
                        raise VfioUserProtocolError(
                            f"REGION_WRITE reply mismatch: {r_region} {r_off:#x} {r_count}"
                        )
            pos += n
            if pos >= len(data):
                return

    def sync(self) -> None:
        """Round trip that returns after every earlier posted write was handled."""
        self.device_info()

    # PCI config space (region 7)
    def config_read(self, offset: int, count: int) -> bytes:
        return self.region_read(VFU_PCI_DEV_CFG_REGION_IDX, offset, count)

    def config_write(self, offset: int, data: bytes) -> None:
        self.region_write(VFU_PCI_DEV_CFG_REGION_IDX, offset, data)

    def config_read8(self, offset: int) -> int:
        return self.config_read(offset, 1)[0]

    def config_read16(self, offset: int) -> int:
        return int(struct.unpack("<H", self.config_read(offset, 2))[0])

    def config_read32(self, offset: int) -> int:
        return int(struct.unpack("<I", self.config_read(offset, 4))[0])

    def config_write8(self, offset: int, value: int) -> None:
        self.config_write(offset, struct.pack("<B", value))

    def config_write16(self, offset: int, value: int) -> None:
        self.config_write(offset, struct.pack("<H", value))

    def config_write32(self, offset: int, value: int) -> None:
        self.config_write(offset, struct.pack("<I", value))

    def dma_map(
        self,
        iova: int,
        size: int,
        fd: int | None,
        offset: int = 0,
        prot: int = DMA_RW,
        *,
        backing: DmaBacking | None = None,
    ) -> None:
        """DMA_MAP [iova, iova+size) to ``fd`` at ``offset`` (fd=None: no fd sent).

        ``backing`` serves the server's DMA_READ/DMA_WRITE for this range; when
        absent and an fd is given the client maps the fd itself.
        """
        owned: _MmapBacking | None = None
        if backing is None and fd is not None:
            try:
                owned = _MmapBacking(fd, size, offset)
                backing = owned
            except (OSError, ValueError) as e:
                log.debug("cannot mmap DMA fd %d client-side: %s", fd, e)
        # Registered before the request: the server may DMA before it replies.
        mapping = _DmaMapping(iova, size, prot, backing, owned)
        self._dma.append(mapping)
        try:
            self._call(
                Command.DMA_MAP,
                pack_dma_map(iova, size, offset, prot),
                [] if fd is None else [fd],
            )
        except BaseException:
            self._dma.remove(mapping)
            if owned is not None:
                owned.close()
            raise
        log.debug("dma_map iova %#x size %#x offset %#x prot %#x", iova, size, offset, prot)

    def dma_unmap(self, iova: int, size: int, flags: int = 0) -> None:
        reply = self._call(Command.DMA_UNMAP, pack_dma_unmap(iova, size, flags))
        reply.close_fds()
        keep = []
        for m in self._dma:
            gone = (flags & DMA_UNMAP_FLAG_ALL) or (m.iova == iova and m.size == size)
            if gone:
                if m.owned is not None:
                    m.owned.close()
            else:
                keep.append(m)
        self._dma = keep

    def set_irqs(
        self,
        index: int,
        start: int,
        fds: Sequence[int],
        *,
        action: int = VFIO_IRQ_SET_ACTION_TRIGGER,
    ) -> None:
        """Attach eventfds to vectors [start, start+len(fds)) of IRQ ``index``.

        Empty ``fds`` disables the whole index (count 0, DATA_NONE).  Split into
        messages of at most the server's max_msg_fds fds, as QEMU does.
        """
        if not fds:
            self.set_irqs_raw(index, 0, 0, action | VFIO_IRQ_SET_DATA_NONE)
            return
        per_msg = max(1, min(self.server.max_msg_fds if self.server else 1, len(fds)))
        for i in range(0, len(fds), per_msg):
            part = list(fds[i : i + per_msg])
            self.set_irqs_raw(
                index,
                start + i,
                len(part),
                action | VFIO_IRQ_SET_DATA_EVENTFD,
                fds=part,
            )

    def set_irqs_raw(
        self,
        index: int,
        start: int,
        count: int,
        flags: int,
        data: bytes = b"",
        fds: Sequence[int] = (),
    ) -> None:
        reply = self._call(
            Command.DEVICE_SET_IRQS,
            pack_set_irqs(index, start, count, flags, data),
            fds,
        )
        reply.close_fds()

    def reset(self) -> None:
        reply = self._call(Command.DEVICE_RESET)
        reply.close_fds()


def _cmd_name(cmd: int) -> str:
    try:
        return Command(cmd).name
    except ValueError:
        return str(cmd)


def new_eventfd(nonblocking: bool = True) -> int:
    flags = os.EFD_CLOEXEC | (os.EFD_NONBLOCK if nonblocking else 0)
    return os.eventfd(0, flags)


def read_eventfd(fd: int) -> int:
    """Non-blocking read of an eventfd counter (0 when not signalled)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
