"""Guest memory that knows what the device may write."""

from __future__ import annotations

import bisect
import contextlib
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from vfiouser_net_harness.guest_memory import GuestMemory
from vfiouser_net_harness.hostile_driver.layout import CANARY, HOLES, REGIONS


@dataclass(frozen=True)
class Violation:
    """Bytes the device changed where it had no right to."""

    addr: int
    length: int
    where: str
    expected: str
    found: str

    def __str__(self) -> str:
        return (
            f"device wrote {self.length} byte(s) at {self.addr:#x} ({self.where}): "
            f"{self.expected} -> {self.found}"
        )


def merge_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _subtract(
    ranges: list[tuple[int, int]], minus: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    out = ranges
    for ma, mb in minus:
        nxt: list[tuple[int, int]] = []
        for a, b in out:
            if b <= ma or mb <= a:
                nxt.append((a, b))
                continue
            if a < ma:
                nxt.append((a, ma))
            if mb < b:
                nxt.append((mb, b))
        out = nxt
    return out


class TrackedGuestMemory(GuestMemory):
    """Guest memory with a shadow copy of everything the driver wrote.

    Every write of the tool (allocation, ring and buffer writes) updates the
    real memory and the shadow under one lock; the device writes only the
    real memory. :meth:`check` reports bytes that differ from the shadow
    outside the ranges the driver let the device write (used rings, buffers
    offered as device-writable), and everywhere in ranges declared
    ``strict`` (a region while it is unmapped).
    """

    def __init__(self, size: int, **kwargs: Any) -> None:
        super().__init__(size, **kwargs)
        self._wlock = threading.Lock()
        self.shadow = bytearray(size)  # a fresh memfd reads as zeros
        self._writable: set[tuple[int, int]] = set()
        self.strict: list[tuple[int, int]] = []
        self.early: list[Violation] = []  # found by strict_range

    # -- the tool's writes ----------------------------------------------------

    def alloc(self, size: int, align: int = 16) -> int:
        with self._wlock:
            addr = super().alloc(size, align)
            off = addr - self.base
            self.shadow[off : off + size] = bytes(size)
            return addr

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        with self._wlock:
            super().write(addr, data)
            off = addr - self.base
            self.shadow[off : off + len(data)] = data

    def write_u8(self, addr: int, value: int) -> None:
        with self._wlock:
            super().write_u8(addr, value)
            self.shadow[addr - self.base] = value

    def _store(self, addr: int, size: int, code: Literal["H", "I", "Q"], value: int) -> None:
        with self._wlock:
            super()._store(addr, size, code, value)
            off = addr - self.base
            self.shadow[off : off + size] = value.to_bytes(size, "little")

    def pack_into(self, fmt: str | struct.Struct, addr: int, *values: object) -> None:
        s = fmt if isinstance(fmt, struct.Struct) else struct.Struct(fmt)
        with self._wlock:
            super().pack_into(s, addr, *values)
            off = addr - self.base
            self.shadow[off : off + s.size] = self.buf[off : off + s.size]

    # -- what the device may write --------------------------------------------

    def device_writable(self, addr: int, length: int) -> None:
        a = max(addr, self.base)
        b = min(addr + length, self.end)
        if a < b:
            self._writable.add((a - self.base, b - self.base))

    def forget_writable(self, addr: int, length: int) -> None:
        self._writable.discard((addr - self.base, addr - self.base + length))

    def clear_writable(self) -> None:
        self._writable.clear()

    @contextlib.contextmanager
    def strict_range(self, start: int, end: int) -> Iterator[None]:
        """Nothing may change in [start, end) (guest addresses) meanwhile,
        used ring or offered buffer or not (the range is unmapped). What the
        device wrote there before counts from now on (checked first)."""
        rng = (start - self.base, end - self.base)
        self.early.extend(self.check())
        with self._wlock:
            self.shadow[rng[0] : rng[1]] = self.buf[rng[0] : rng[1]]
        self.strict.append(rng)
        try:
            yield
        finally:
            self.strict.remove(rng)

    def fill_canary(self) -> None:
        reps = self.size // len(CANARY) + 1
        self.write(self.base, (CANARY * reps)[: self.size])

    def where(self, off: int) -> str:
        for name, (a, b) in REGIONS.items():
            if a <= off < b:
                return f"region {name} +{off - a:#x}"
        for a, b in HOLES:
            if a <= off < b:
                return f"unmapped hole +{off - a:#x}"
        return "outside the regions"

    def check(self) -> list[Violation]:
        """Bytes the device changed outside what it may write (reported once)."""
        with self._wlock:
            real = bytes(self.buf)
            shadow = bytes(self.shadow)
        if real == shadow:
            return []
        allowed = _subtract(merge_ranges(list(self._writable)), self.strict)
        starts = [a for a, _ in allowed]
        bad: list[tuple[int, int]] = []
        block = 64 << 10
        for b0 in range(0, self.size, block):
            if real[b0 : b0 + block] == shadow[b0 : b0 + block]:
                continue
            for c0 in range(b0, min(b0 + block, self.size), 4096):
                c1 = min(c0 + 4096, self.size)
                if real[c0:c1] == shadow[c0:c1]:
                    continue
                # The parts of [c0, c1) not covered by an allowed range.
                i = max(0, bisect.bisect_right(starts, c0) - 1)
                pos = c0
                pieces: list[tuple[int, int]] = []
                while pos < c1:
                    while i < len(allowed) and allowed[i][1] <= pos:
                        i += 1
                    if i < len(allowed) and allowed[i][0] <= pos:
                        pos = allowed[i][1]
                        continue
                    nxt = allowed[i][0] if i < len(allowed) else c1
                    pieces.append((pos, min(nxt, c1)))
                    pos = min(nxt, c1)
                for a, b in pieces:
                    if real[a:b] != shadow[a:b]:
                        bad.extend(diff_runs(real, shadow, a, b))
        out: list[Violation] = []
        for a, b in merge_ranges(bad):
            n = min(b - a, 16)
            out.append(
                Violation(
                    self.base + a,
                    b - a,
                    self.where(a),
                    shadow[a : a + n].hex(),
                    real[a : a + n].hex(),
                )
            )
            with self._wlock:  # report each change once
                self.shadow[a:b] = self.buf[a:b]
        return out


def diff_runs(real: bytes, shadow: bytes, a: int, b: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    start = -1
    for i in range(a, b):
        if real[i] != shadow[i]:
            if start < 0:
                start = i
        elif start >= 0:
            runs.append((start, i))
            start = -1
    if start >= 0:
        runs.append((start, b))
    return runs


class RegionBacking:
    """Serves DMA_READ/DMA_WRITE for a region that starts ``start`` bytes into memory."""

    def __init__(self, mem: GuestMemory, start: int) -> None:
        self.mem = mem
        self.start = start

    def dma_read(self, offset: int, count: int) -> bytes:
        return self.mem.read(self.mem.base + self.start + offset, count)

    def dma_write(self, offset: int, data: bytes) -> None:
        self.mem.write(self.mem.base + self.start + offset, data)


class Zone:
    """A bump allocator over [start, end) of guest memory (zeroed blocks)."""

    def __init__(self, mem: GuestMemory, start: int, end: int) -> None:
        self.mem = mem
        self.start = mem.base + start
        self.end = mem.base + end
        self.next = self.start

    def reset(self) -> None:
        self.next = self.start

    def alloc(self, size: int, align: int = 64) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise MemoryError(f"zone [{self.start:#x}, {self.end:#x}) exhausted")
        self.next = addr + size
        self.mem.write(addr, bytes(size))
        return addr
