"""memfd-backed "guest RAM" for tests that play the guest.

The memory is a memfd mapped MAP_SHARED into the test process; its fd is what
gets DMA-mapped into the device (VFIO_USER_DMA_MAP), so the device and the test
see the same bytes.  Guest-physical addresses (= IOVAs) run from ``base``.

All multi-byte accessors are explicit little-endian (virtio 1.x is LE).
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import sys
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self

if TYPE_CHECKING:
    from .vfio_user_client import VfioUserClient

log = logging.getLogger(__name__)

PAGE_SIZE = mmap.PAGESIZE

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemoryError(Exception):
    pass


class GuestMemory:
    """``size`` bytes of shared memory at guest addresses [base, base+size).

    A bump allocator hands out aligned blocks; it starts one page in, so guest
    address ``base`` (0 by default) is never handed out and a zero address in a
    ring is always a bug.
    """

    def __init__(self, size: int, *, base: int = 0, name: str = "guest-ram") -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"size must be a positive multiple of {PAGE_SIZE}")
        self.size = size
        self.base = base
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.buf = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self._next = PAGE_SIZE
        self._mapped_into: list[tuple[VfioUserClient, int, int]] = []
        log.debug("guest memory %#x bytes at %#x fd %d", size, base, self.fd)

    # -- lifetime ---------------------------------------------------------------

    def close(self) -> None:
        if not self.buf.closed:
            self.buf.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- addressing ---------------------------------------------------------------

    @property
    def end(self) -> int:
        return self.base + self.size

    def _off(self, addr: int, length: int) -> int:
        off = addr - self.base
        if off < 0 or length < 0 or off + length > self.size:
            raise GuestMemoryError(
                f"access [{addr:#x}, {addr + length:#x}) outside guest memory "
                f"[{self.base:#x}, {self.end:#x})"
            )
        return off

    def contains(self, addr: int, length: int = 1) -> bool:
        return self.base <= addr and addr + length <= self.end

    # -- allocation ---------------------------------------------------------------

    def alloc(self, size: int, align: int = 16) -> int:
        """Return the guest address of a fresh zeroed block of ``size`` bytes."""
        if align <= 0 or align & (align - 1):
            raise ValueError("align must be a power of two")
        start = (self._next + align - 1) & ~(align - 1)
        if start + size > self.size:
            raise GuestMemoryError(
                f"out of guest memory: need {size:#x} at {start:#x}, size {self.size:#x}"
            )
        self._next = start + size
        self.buf[start : start + size] = bytes(size)
        return self.base + start

    def reset_allocator(self) -> None:
        self._next = PAGE_SIZE

    @property
    def allocated(self) -> int:
        return self._next

    # -- byte access ----------------------------------------------------------------

    def read(self, addr: int, length: int) -> bytes:
        off = self._off(addr, length)
        return self.buf[off : off + length]

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        off = self._off(addr, len(data))
        self.buf[off : off + len(data)] = data

    def fill(self, addr: int, length: int, value: int = 0) -> None:
        self.write(addr, bytes([value]) * length)

    def view(self, addr: int, length: int) -> memoryview:
        off = self._off(addr, length)
        return memoryview(self.buf)[off : off + length]

    def read_u8(self, addr: int) -> int:
        return self.buf[self._off(addr, 1)]

    def write_u8(self, addr: int, value: int) -> None:
        self.buf[self._off(addr, 1)] = value

    def read_u16(self, addr: int) -> int:
        return int(_U16.unpack_from(self.buf, self._off(addr, 2))[0])

    def write_u16(self, addr: int, value: int) -> None:
        # One 16-bit store: struct.pack_into zero-fills first, and the device
        # reading ring indices concurrently must never see that 0.
        self._store(addr, 2, "H", value)

    def read_u32(self, addr: int) -> int:
        return int(_U32.unpack_from(self.buf, self._off(addr, 4))[0])

    def write_u32(self, addr: int, value: int) -> None:
        self._store(addr, 4, "I", value)

    def read_u64(self, addr: int) -> int:
        return int(_U64.unpack_from(self.buf, self._off(addr, 8))[0])

    def write_u64(self, addr: int, value: int) -> None:
        self._store(addr, 8, "Q", value)

    def _store(self, addr: int, size: int, code: Literal["H", "I", "Q"], value: int) -> None:
        off = self._off(addr, size)
        if off % size == 0 and sys.byteorder == "little":
            memoryview(self.buf)[off : off + size].cast(code)[0] = value
        else:
            self.buf[off : off + size] = value.to_bytes(size, "little")

    def pack_into(self, fmt: str | struct.Struct, addr: int, *values: object) -> None:
        s = fmt if isinstance(fmt, struct.Struct) else struct.Struct(fmt)
        if not s.format.startswith(("<", "=")) and s.size > 1:
            raise ValueError("use an explicit little-endian format ('<...')")
        s.pack_into(self.buf, self._off(addr, s.size), *values)

    def unpack_from(self, fmt: str | struct.Struct, addr: int) -> tuple[object, ...]:
        s = fmt if isinstance(fmt, struct.Struct) else struct.Struct(fmt)
        return s.unpack_from(self.buf, self._off(addr, s.size))

    def device_writable(self, addr: int, length: int) -> None:
        """The driver lets the device write [addr, addr+length) (a used ring,
        or a buffer offered as device-writable). Nothing to do here; a memory
        that checks what the device wrote records it
        (harness/vfiouser_net_harness/hostile_driver/)."""

    # -- DmaBacking (serves the server's DMA_READ / DMA_WRITE messages) -------------

    def dma_read(self, offset: int, count: int) -> bytes:
        return self.read(self.base + offset, count)

    def dma_write(self, offset: int, data: bytes) -> None:
        self.write(self.base + offset, data)

    # -- mapping into a device ------------------------------------------------------

    def map_into(self, client: VfioUserClient, prot: int | None = None) -> None:
        """DMA_MAP the whole memory at IOVA ``base`` with its memfd."""
        from .vfio_user_client import DMA_RW

        client.dma_map(
            self.base,
            self.size,
            self.fd,
            0,
            DMA_RW if prot is None else prot,
            backing=self,
        )
        self._mapped_into.append((client, self.base, self.size))

    def unmap_from(self, client: VfioUserClient) -> None:
        client.dma_unmap(self.base, self.size)
        self._mapped_into = [m for m in self._mapped_into if m[0] is not client]
