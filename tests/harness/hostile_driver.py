"""A hostile virtio-net driver: attacks a vfiouser-net device while healthy
traffic runs on its other queue pairs, and checks that the damage stays with
the attacked queue (or, where the spec says so, the device), that the device
writes nothing but its used rings and the buffers it was offered, and that
every event is counted.

Built on the tests' own vfio-user client and virtio driver
(:mod:`tests.harness.vfio_user_client`, :mod:`tests.harness.virtio_pci_driver`):

* **Device**: 4 queue pairs with MQ and RSS (VQ_PAIRS_SET 4, an RSS table
  ``[0, 1, 2, 3]`` over UDP/IPv4), so that host-to-guest flows land on a
  known pair. Pair 0 is the one attacked; pairs 1-3 carry healthy traffic.
* **Healthy traffic**: a background thread sends frames from the host side of
  the TAP to pairs 1-3 and receives them from their receive rings, and makes
  the guest transmit on pairs 1-3 and sees the frames arrive on the TAP. All
  use of the one vfio-user socket goes through :class:`LockedClient` (one
  lock), so the attacks and the traffic can share it.
* **Guest memory**: 8 MiB, DMA-mapped as three regions with unmapped holes
  between them (A: the driver's rings and buffers; B: pair 0's rings;
  C: the attacks' own buffers), filled with a canary pattern. Every write by
  the tool goes through :class:`TrackedGuestMemory`, which keeps a shadow
  copy; after each attack, any byte that differs from the shadow was written
  by the device and must lie in a used ring or in a buffer offered as
  device-writable (and never in a region while it is unmapped).
* **Catalogue**: :data:`CATALOGUE`, one function per attack, each with its
  scope (``queue``: the attacked queue only, healthy pairs must keep
  flowing during the attack; ``device``: the whole device, as the spec
  allows) and its expected counters and reaction. After an attack that broke
  the device (DEVICE_NEEDS_RESET) the tool resets it, brings it up again and
  checks that traffic works, on the attacked pair too.

The daemon's counters come from a callable (the protocol tests pass
``DeviceEnv.counters``; the command line reads them from the admin socket).

Command line (run it where the TAP is, e.g. under ``ip netns exec``)::

    python -m tests.harness.hostile_driver --socket PATH --tap IFNAME \\
        --admin-socket PATH [--attacks a,b,...] [--json out.json] [--list]

Exit status 0 when every attack had its expected outcome, 1 otherwise.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import errno as errno_mod
import json
import logging
import math
import os
import random
import socket
import struct
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

if __package__ in (None, ""):  # python tests/harness/hostile_driver.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.harness import vfio_user_client as vu
from tests.harness.guest_memory import GuestMemory
from tests.harness.toeplitz import toeplitz
from tests.harness.virtio_pci_driver import (
    COMMON_GF,
    DEFAULT_NET_FEATURES,
    NET_HDR_SIZE,
    PCI_CAP_ID_VNDR,
    STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_RSS_CONFIG,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_RSS,
    VIRTIO_NET_OK,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    CfgType,
    SplitQueue,
    UsedElem,
    VirtioError,
    VirtioNetDriver,
    bit,
    walk_capabilities,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# Layout and parameters
# --------------------------------------------------------------------------

PAIRS = 4
ATTACKED = 0  # the attacked pair
HEALTHY = (1, 2, 3)
QUEUE_SIZE = 128
BUF_SIZE = 2048

MEM_SIZE = 8 << 20
HOLE = 64 << 10
A_START, A_END = 0, 4 << 20  # the driver's rings and buffers
B_START, B_END = A_END + HOLE, 5 << 20  # pair 0's rings
C_START, C_END = B_END + HOLE, MEM_SIZE  # the attacks' own buffers
REGIONS = {"A": (A_START, A_END), "B": (B_START, B_END), "C": (C_START, C_END)}
HOLES = ((A_END, B_START), (B_END, C_START))

CANARY = bytes.fromhex("c3a55a3c")
FEATURES = DEFAULT_NET_FEATURES | bit(VIRTIO_NET_F_CTRL_RX) | bit(VIRTIO_NET_F_CTRL_MAC_ADDR)
FEATURES |= bit(VIRTIO_NET_F_RSS)

# Frames of healthy traffic a healthy pair must move in each direction while
# an attack runs (queue scope) and after it (after recovery when it broke the
# device).
MIN_FRAMES = 5
TRAFFIC_WAIT = 5.0  # seconds to see them (they take milliseconds when all is well)
# What the daemon may log a second under attack (it rate-limits warnings and
# errors: 20 a second per device from the datapath and libvfio-user, 10 about
# the driver from the control plane), with a margin.
LOG_LINES_PER_SEC = 40
DRAIN_UNMAP_ATTEMPTS = 5
CONFIG_VECTOR = 0

PEER_MAC = bytes.fromhex("02766e0000fe")
BROADCAST = b"\xff" * 6
ETH_P_IP = 0x0800
ETH_P_TEST = 0x88B5  # IEEE local experimental: the kernel ignores it
PACKET_OUTGOING = 4

# RSS (virtio 5.1.6.5.7): Toeplitz over UDP/IPv4, indirection table [0,1,2,3].
HASH_TYPE_UDPV4 = 1 << 2
RSS_KEY = bytes.fromhex(
    "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa"
)
RSS_TABLE = (0, 1, 2, 3)
FLOW_SRC = bytes([198, 51, 100, 10])
FLOW_DST = bytes([198, 51, 100, 1])
FLOW_DPORT = 4000


def flow_sport(pair: int) -> int:
    """A UDP source port whose flow the RSS table sends to ``pair``."""
    for sport in range(20000, 30000):
        h = toeplitz(RSS_KEY, FLOW_SRC + FLOW_DST + struct.pack("!HH", sport, FLOW_DPORT))
        if RSS_TABLE[h & (len(RSS_TABLE) - 1)] == pair:
            return sport
    raise AssertionError(f"no flow for pair {pair}")


def rss_config(
    table: Sequence[int] = RSS_TABLE, *, unclassified: int = HEALTHY[0], max_tx: int = PAIRS
) -> bytes:
    """struct virtio_net_rss_config."""
    return (
        struct.pack("<IHH", HASH_TYPE_UDPV4, len(table) - 1, unclassified)
        + b"".join(struct.pack("<H", q) for q in table)
        + struct.pack("<HB", max_tx, len(RSS_KEY))
        + RSS_KEY
    )


def _ipv4_udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0, src, dst)
    s = sum(struct.unpack("!10H", hdr))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return hdr[:10] + struct.pack("!H", ~s & 0xFFFF) + hdr[12:] + udp


def tag_of(frame: bytes) -> str | None:
    """The tag of one of our frames (``VNT:<tag>:`` in the payload), or None."""
    i = frame.find(b"VNT:")
    if i < 0:
        return None
    j = frame.find(b":", i + 4)
    return frame[i + 4 : j].decode(errors="replace") if j > 0 else None


def guest_frame(src_mac: bytes, tag: str) -> bytes:
    """A frame the guest transmits (test ethertype, broadcast)."""
    frame = BROADCAST + src_mac + struct.pack("!H", ETH_P_TEST) + b"VNT:" + tag.encode() + b":"
    return frame.ljust(60, b"\0")


# --------------------------------------------------------------------------
# Guest memory that knows what the device may write
# --------------------------------------------------------------------------


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


def _merge(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
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
        allowed = _subtract(_merge(list(self._writable)), self.strict)
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
                        bad.extend(_diff_runs(real, shadow, a, b))
        out: list[Violation] = []
        for a, b in _merge(bad):
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


def _diff_runs(real: bytes, shadow: bytes, a: int, b: int) -> list[tuple[int, int]]:
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


class _RegionBacking:
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


# --------------------------------------------------------------------------
# One vfio-user socket, two threads
# --------------------------------------------------------------------------


class LockedClient(vu.VfioUserClient):
    """The vfio-user client with every exchange on the socket under one lock
    (the attacks and the healthy traffic share the connection)."""

    def __init__(self, path: str | os.PathLike[str], **kwargs: Any) -> None:
        self.lock = threading.RLock()
        super().__init__(path, **kwargs)

    def send_raw(self, data: bytes, fds: Sequence[int] = (), timeout: float | None = None) -> None:
        with self.lock:
            super().send_raw(data, fds, timeout)

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
    ) -> vu.Message | None:
        with self.lock:
            return super().request(
                cmd, payload, fds, no_reply=no_reply, msg_id=msg_id, timeout=timeout, check=check
            )

    def serve(self, timeout: float = 0.0, max_requests: int | None = None) -> int:
        with self.lock:
            return super().serve(timeout, max_requests)


# --------------------------------------------------------------------------
# Counters
# --------------------------------------------------------------------------

CounterSource = Callable[[], dict[str, Any]]


def counter_value(snapshot: dict[str, Any], path: str) -> int | None:
    """``queues.0.tx.errors.desc_addr`` in a counters snapshot (None: absent);
    ``queues.*.rx.drops.steer_backlog`` sums over the queue pairs."""
    node: Any = snapshot
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part == "*" and isinstance(node, list):
            values = [counter_value({"x": n}, ".".join(["x", *parts[i + 1 :]])) for n in node]
            return None if None in values else sum(v or 0 for v in values)
        if isinstance(node, list):
            try:
                node = node[int(part)]
            except (ValueError, IndexError):
                return None
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return int(node) if isinstance(node, (int, float)) else None


def admin_sources(
    path: str, device: str | None
) -> tuple[CounterSource, Callable[[], list[dict[str, Any]]]]:
    """Counters (``{queues, ctrl, device}``) and ring state from the admin socket."""
    from vfiouser_net.admin.protocol import AdminClient

    def call(cmd: str, **args: Any) -> Any:
        with AdminClient(path, timeout=10) as c:
            return c.call(cmd, args)

    name = device
    if name is None:
        devices = call("list")["devices"]
        if len(devices) != 1:
            raise SystemExit(f"{len(devices)} devices on {path}: say which with --device")
        name = str(devices[0]["name"])

    def counters() -> dict[str, Any]:
        r = call("stats", device=name)
        return {"queues": r["queues"], "ctrl": r["ctrl"], "device": r["counters"]}

    def ring_state() -> list[dict[str, Any]]:
        q: list[dict[str, Any]] = call("queues", device=name)["queues"]
        return q

    return counters, ring_state


def daemon_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------
# Attack bookkeeping
# --------------------------------------------------------------------------


@dataclass
class Expectation:
    path: str
    exactly: int | None = None
    at_least: int | None = None

    def describe(self) -> str:
        if self.exactly is not None:
            return f"+{self.exactly}"
        return f">= +{self.at_least}"


class AttackFailed(Exception):
    pass


@dataclass
class AttackRun:
    """What one attack expects and what it saw."""

    name: str
    scope: str
    reaction: str
    failures: list[str] = field(default_factory=list)
    expectations: list[Expectation] = field(default_factory=list)
    observed: dict[str, Any] = field(default_factory=dict)
    broken: bool = False  # the device needs a reset afterwards

    def check(self, ok: bool, message: str) -> bool:
        if not ok:
            self.failures.append(message)
            log.warning("%s: %s", self.name, message)
        return ok

    def expect(self, path: str, exactly: int | None = None, at_least: int | None = None) -> None:
        self.expectations.append(Expectation(path, exactly, at_least))

    def unchanged(self, path: str) -> None:
        self.expect(path, exactly=0)


@dataclass(frozen=True)
class Attack:
    name: str
    fn: Callable[[HostileDriver, AttackRun], None]
    scope: str  # "queue": the attacked queue only; "device": the whole device (spec)
    reaction: str
    description: str


@dataclass
class PairCounts:
    rx: int = 0  # host -> guest frames received on this pair's ring
    tx: int = 0  # guest -> host frames seen on the TAP
    sent_rx: int = 0
    sent_tx: int = 0
    misrouted: int = 0  # host frames for this pair that arrived on another
    errors: int = 0


def _diff_counts(a: dict[int, PairCounts], b: dict[int, PairCounts]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for p, cb in b.items():
        ca = a.get(p, PairCounts())
        out[str(p)] = {k: getattr(cb, k) - getattr(ca, k) for k in asdict(cb)}
    return out


# --------------------------------------------------------------------------
# Healthy traffic
# --------------------------------------------------------------------------


class Traffic:
    """Frames both ways on the healthy pairs, in a thread, until stopped."""

    def __init__(self, hd: HostileDriver, pairs: Sequence[int]) -> None:
        self.hd = hd
        self.pairs = tuple(pairs)
        self.counts = {p: PairCounts() for p in self.pairs}
        self.lock = threading.Lock()
        self.seen: deque[str] = deque(maxlen=20000)
        self.last_error: str | None = None
        self._seq = 0
        self._stop = threading.Event()
        self._want_pause = threading.Event()
        self._paused = threading.Event()
        self._resume = threading.Event()
        self._thread = threading.Thread(target=self._run, name="healthy-traffic", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._resume.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def pause(self) -> None:
        if not self._thread.is_alive():
            return
        self._resume.clear()
        self._want_pause.set()
        if not self._paused.wait(15):
            raise AttackFailed("the healthy traffic thread did not pause (stuck?)")

    def resume(self) -> None:
        self._want_pause.clear()
        self._paused.clear()
        self._resume.set()

    def snapshot(self) -> dict[int, PairCounts]:
        with self.lock:
            return {p: PairCounts(**asdict(c)) for p, c in self.counts.items()}

    def saw(self, prefix: str, *, exact: bool = False) -> bool:
        """Whether a frame tagged ``prefix...`` (or exactly that) reached the TAP."""
        with self.lock:
            if exact:
                return prefix in self.seen
            return any(t.startswith(prefix) for t in self.seen)

    def wait_min(
        self, since: dict[int, PairCounts], n: int, timeout: float
    ) -> dict[int, PairCounts]:
        """Wait until every pair moved ``n`` frames each way since ``since``."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.snapshot()
            if all(
                now[p].rx - since[p].rx >= n and now[p].tx - since[p].tx >= n for p in self.pairs
            ):
                return now
            if time.monotonic() > deadline or not self._thread.is_alive():
                return now
            time.sleep(0.01)

    # -- the thread ---------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._want_pause.is_set():
                self._paused.set()
                self._resume.wait()
                continue
            try:
                self._round()
            except Exception as e:  # counted; the attack decides if it matters
                with self.lock:
                    for p in self.pairs:
                        self.counts[p].errors += 1
                    self.last_error = f"{type(e).__name__}: {e}"
                log.debug("healthy traffic: %s", self.last_error)
                time.sleep(0.02)

    def _round(self) -> None:
        hd = self.hd
        drv = hd.drv
        assert drv is not None
        self._seq += 1
        want: set[str] = set()
        for p in self.pairs:
            drv.reclaim_tx(p)
            if drv.pairs[p].tx.in_flight < 32:
                tag = f"g{p}.{self._seq}"
                drv.send_packet(guest_frame(hd.mac, tag), pair=p, wait=False)
                want.add(tag)
                with self.lock:
                    self.counts[p].sent_tx += 1
            tag = f"h{p}.{self._seq}"
            hd.host_send(hd.host_frame(p, tag))
            want.add(tag)
            with self.lock:
                self.counts[p].sent_rx += 1
        deadline = time.monotonic() + 0.25
        while want and time.monotonic() < deadline and not self._stop.is_set():
            if not self._poll(drv, want):
                time.sleep(0.0005)

    def _poll(self, drv: VirtioNetDriver, want: set[str]) -> bool:
        got = False
        sock = self.hd.packet_sock
        while True:
            try:
                data, addr = sock.recvfrom(65536)
            except BlockingIOError:
                break
            if addr[2] == PACKET_OUTGOING:
                continue
            tag = tag_of(data)
            if tag is None:
                continue
            got = True
            with self.lock:
                if tag.startswith("g") and tag[1:].split(".")[0].isdigit():
                    p = int(tag[1:].split(".")[0])
                    if p in self.counts:
                        self.counts[p].tx += 1
                else:
                    self.seen.append(tag)
            want.discard(tag)
        for p in self.pairs:
            q = drv.pairs[p].rx
            while q.has_used():
                _, frame = drv.recv_packet(timeout=1, pair=p)
                got = True
                tag = tag_of(frame)
                if tag is None or not tag.startswith("h"):
                    continue
                want.discard(tag)
                target = int(tag[1:].split(".")[0])
                with self.lock:
                    if target == p:
                        self.counts[p].rx += 1
                    elif target in self.counts:
                        self.counts[target].misrouted += 1
        return got


# --------------------------------------------------------------------------
# The hostile driver
# --------------------------------------------------------------------------


class HostileDriver:
    """Bring a multiqueue device up, keep healthy traffic on pairs 1-3, and
    run attacks from :data:`CATALOGUE` against it (see the module doc)."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        packet_sock: socket.socket,
        *,
        counters: CounterSource,
        ring_state: Callable[[], list[dict[str, Any]]] | None = None,
        daemon_alive: Callable[[], bool] | None = None,
        daemon_pid: int | None = None,
        daemon_log: Callable[[], str] | None = None,
        seed: int | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        self.packet_sock = packet_sock
        self.packet_sock.setblocking(False)
        self.counters = counters
        self.ring_state = ring_state
        self.daemon_alive = daemon_alive
        self.daemon_pid = daemon_pid
        self.daemon_log = daemon_log
        self.seed = random.randrange(2**32) if seed is None else seed
        self.rng = random.Random(self.seed)
        self.timeout = timeout
        self.client: LockedClient | None = None
        self.mem = TrackedGuestMemory(MEM_SIZE)
        self.zone_b = Zone(self.mem, B_START, B_END)
        self.zone_c = Zone(self.mem, C_START, C_END)
        self.drv: VirtioNetDriver | None = None
        self.mac = b"\0" * 6
        self.sports = {p: flow_sport(p) for p in range(PAIRS)}
        self.traffic = Traffic(self, HEALTHY)
        self.violations: list[Violation] = []  # found at re-initialisation
        self.ring_overrides: dict[tuple[int, str], int] = {}
        self._tags = 0

    # -- lifetime -------------------------------------------------------------

    def start(self) -> None:
        self.client = LockedClient(self.socket_path, timeout=self.timeout)
        self.client.negotiate()
        self.mem.fill_canary()
        for start, end in REGIONS.values():
            self.map_region(start, end)
        err = self.reinit()
        if err is not None:
            raise VirtioError(f"the device did not come up: {err}")
        self.traffic.start()
        first = self.traffic.wait_min(self.traffic.snapshot(), 1, 10)
        if any(first[p].rx == 0 or first[p].tx == 0 for p in HEALTHY):
            log.error("healthy traffic does not flow: %s", first)

    def close(self) -> None:
        self.traffic.stop()
        if self.drv is not None:
            with contextlib.suppress(Exception):
                self.drv.transport.reset()
            self.drv.transport.close()
        if self.client is not None:
            self.client.close()
        self.mem.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- memory ---------------------------------------------------------------

    def map_region(self, start: int, end: int) -> None:
        assert self.client is not None
        self.client.dma_map(
            self.mem.base + start,
            end - start,
            self.mem.fd,
            start,
            backing=_RegionBacking(self.mem, start),
        )

    def unmap_region(self, start: int, end: int) -> None:
        assert self.client is not None
        self.client.dma_unmap(self.mem.base + start, end - start)

    @contextlib.contextmanager
    def unmapped(self, start: int, end: int) -> Iterator[None]:
        """DMA-unmap [start, end) of guest memory for the block, then map it again."""
        self.unmap_region(start, end)
        try:
            yield
        finally:
            self.map_region(start, end)

    def addr(self, off: int) -> int:
        return self.mem.base + off

    def _place_queue(self, q: SplitQueue) -> None:
        """Pair 0's rings go to region B (or where an attack wants them)."""
        if q.index not in (2 * ATTACKED, 2 * ATTACKED + 1):
            return
        n = q.size
        self.mem.forget_writable(q.used_addr, 6 + 8 * n)
        q.desc_addr = self.zone_b.alloc(16 * n, 16)
        q.avail_addr = self.zone_b.alloc(6 + 2 * n, 2)
        q.used_addr = self.zone_b.alloc(6 + 8 * n, 4)
        for part in ("desc", "avail", "used"):
            where = self.ring_overrides.get((q.index, part))
            if where is not None:
                setattr(q, f"{part}_addr", where)
        if (q.index, "used") not in self.ring_overrides:
            self.mem.device_writable(q.used_addr, 6 + 8 * n)

    # -- (re)initialisation ----------------------------------------------------

    def reinit(self) -> str | None:
        """Reset the device and bring it up from scratch (traffic paused
        meanwhile). Returns None, or why the bring-up failed (then the
        traffic stays paused)."""
        assert self.client is not None
        self.traffic.pause()
        if self.drv is not None:
            self.drv.transport.reset()
            self.drv.transport.close()
        # The device is reset: whatever it wrote is final. Check, then start over.
        self.violations.extend(self.mem.check())
        self.mem.clear_writable()
        self.mem.fill_canary()
        self.mem.reset_allocator()
        self.zone_b.reset()
        self.zone_c.reset()
        drv = VirtioNetDriver(
            self.client,
            self.mem,
            features=FEATURES,
            queue_size=QUEUE_SIZE,
            rx_buf_size=BUF_SIZE,
            tx_block_size=BUF_SIZE,
            timeout=self.timeout,
        )
        self.drv = drv
        try:
            drv.bring_up(pairs=PAIRS, rx_buffers=0, queue_hook=self._place_queue)
        except (VirtioError, TimeoutError, vu.VfioUserError) as e:
            return f"{type(e).__name__}: {e}"
        if self.mem.allocated > A_END:
            raise AssertionError(f"driver allocations ({self.mem.allocated:#x}) overflow region A")
        self.mac = drv.read_config().mac
        for p in HEALTHY:
            drv.post_rx_buffers(drv.pairs[p].rx.size, p)
        ack = drv.ctrl_command(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_RSS_CONFIG, rss_config())
        if ack != VIRTIO_NET_OK:
            return f"RSS_CONFIG answered {ack}"
        drv.transport.irq_count(CONFIG_VECTOR)
        self.traffic.resume()
        return None

    # -- helpers for the attacks ----------------------------------------------

    @property
    def d(self) -> VirtioNetDriver:
        assert self.drv is not None
        return self.drv

    @property
    def c(self) -> LockedClient:
        assert self.client is not None
        return self.client

    def tag(self, what: str) -> str:
        self._tags += 1
        return f"{what}{self._tags}"

    def host_frame(self, pair: int, tag: str) -> bytes:
        """A UDP/IPv4 frame from the host side that RSS steers to ``pair``."""
        ip = _ipv4_udp(
            FLOW_SRC, FLOW_DST, self.sports[pair], FLOW_DPORT, b"VNT:" + tag.encode() + b":"
        )
        return self.mac + PEER_MAC + struct.pack("!H", ETH_P_IP) + ip

    def host_send(self, frame: bytes) -> None:
        deadline = time.monotonic() + 3
        while True:
            try:
                self.packet_sock.send(frame)
                return
            except (BlockingIOError, OSError) as e:
                retry = isinstance(e, BlockingIOError) or e.errno in (
                    errno_mod.ENETDOWN,
                    errno_mod.ENOBUFS,
                )
                if not retry or time.monotonic() > deadline:
                    raise
                time.sleep(0.002)

    def raw_chain(self, q: SplitQueue, n: int, token: object) -> list[int]:
        """Reserve ``n`` descriptors as one chain (not published); returns their
        ids, head first, for the attack to overwrite with write_desc."""
        scratch = self.zone_c.alloc(16)
        head = q.add_buf([(scratch, 1, False)] * n, token, indirect=False, publish=False)
        return list(q.pending[head].ids)

    def publish_kick(self, q: SplitQueue) -> None:
        q.publish()
        q.kick(force=True)

    def wait_used(self, q: SplitQueue, timeout: float | None = None) -> UsedElem | None:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            e = q.get_used()
            if e is not None:
                return e
            if time.monotonic() > deadline:
                return None
            time.sleep(0.001)

    def expect_returned_empty(self, run: AttackRun, q: SplitQueue, heads: Sequence[int]) -> None:
        """Every chain in ``heads`` comes back unused (length 0)."""
        left = set(heads)
        while left:
            e = self.wait_used(q)
            if not run.check(
                e is not None, f"queue {q.index}: chains {sorted(left)} never returned"
            ):
                return
            assert e is not None
            run.check(e.id in left, f"queue {q.index}: used id {e.id} was not one of ours")
            run.check(e.len == 0, f"queue {q.index}: bad chain {e.id} used with length {e.len}")
            left.discard(e.id)

    def wait_status(self, bits: int, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            s = self.d.transport.status
            if s & bits or time.monotonic() > deadline:
                return s
            time.sleep(0.01)

    def check_needs_reset(self, run: AttackRun) -> None:
        """DEVICE_NEEDS_RESET in the status and a config interrupt."""
        status = self.wait_status(STATUS_DEVICE_NEEDS_RESET)
        run.observed["status"] = hex(status)
        run.check(
            bool(status & STATUS_DEVICE_NEEDS_RESET), f"no DEVICE_NEEDS_RESET (status {status:#x})"
        )
        irq = self.d.transport.wait_irq(CONFIG_VECTOR, 3)
        run.observed["config_interrupt"] = irq
        run.check(irq, "no config interrupt with DEVICE_NEEDS_RESET")
        run.broken = True

    def check_broken(self, run: AttackRun, qidx: int) -> None:
        """The device marks queue ``qidx`` broken (when the ring state is visible)."""
        if self.ring_state is None:
            return
        rows = {int(r["index"]): r for r in self.ring_state()}
        row = rows.get(qidx)
        run.observed[f"queue{qidx}_broken"] = None if row is None else bool(row["broken"])
        run.check(row is not None and bool(row["broken"]), f"queue {qidx} not marked broken: {row}")

    def check_not_on_tap(self, run: AttackRun, prefix: str, wait: float = 0.3) -> None:
        time.sleep(wait)
        run.check(not self.traffic.saw(prefix), f"frame {prefix!r} of a bad chain reached the TAP")

    def wait_counter(self, path: str, base: int, at_least: int, timeout: float = 5.0) -> int:
        """Wait until counter ``path`` moved ``at_least`` past ``base``; returns the delta."""
        deadline = time.monotonic() + timeout
        while True:
            v = counter_value(self.counters(), path)
            delta = -1 if v is None else v - base
            if delta >= at_least or time.monotonic() > deadline:
                return delta
            time.sleep(0.05)

    def pair0_buffers(self, n: int) -> list[int]:
        """Post up to ``n`` receive buffers (in region C) on the attacked pair."""
        rx = self.d.pairs[ATTACKED].rx
        bufs = [self.zone_c.alloc(BUF_SIZE) for _ in range(min(n, rx.num_free))]
        for b in bufs:
            rx.add_buf([(b, BUF_SIZE, True)], ("rx0", b), publish=False)
        self.publish_kick(rx)
        return bufs

    def pair0_recv(self, run: AttackRun, tag: str, timeout: float = 3.0) -> bool:
        """Receive the frame tagged ``tag`` on the attacked pair's ring."""
        rx = self.d.pairs[ATTACKED].rx
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            e = self.wait_used(rx, max(0.0, deadline - time.monotonic()))
            if e is None:
                break
            token = e.token
            if not isinstance(token, tuple) or e.len < NET_HDR_SIZE:
                continue
            data = self.mem.read(int(token[1]), e.len)
            if tag_of(data[NET_HDR_SIZE:]) == tag:
                return True
        return run.check(False, f"pair {ATTACKED} did not receive {tag!r}")

    def pair0_send(self, run: AttackRun, tag: str, timeout: float = 3.0) -> bool:
        """The attacked pair transmits a good frame (from region C) and it reaches the TAP."""
        tx = self.d.pairs[ATTACKED].tx
        frame = bytes(NET_HDR_SIZE) + guest_frame(self.mac, tag)
        buf = self.zone_c.alloc(len(frame))
        self.mem.write(buf, frame)
        head = tx.add_buf([(buf, len(frame), False)], "good", indirect=False)
        tx.kick(force=True)
        e = self.wait_used(tx, timeout)
        if not run.check(
            e is not None and e.id == head, f"pair {ATTACKED} tx: good chain not used"
        ):
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.traffic.saw(tag, exact=True):
                return True
            time.sleep(0.01)
        return run.check(False, f"pair {ATTACKED} tx: {tag!r} did not reach the TAP")

    def pair0_roundtrip(self, run: AttackRun) -> bool:
        self.pair0_buffers(4)
        tag = self.tag("p0rx")
        self.host_send(self.host_frame(ATTACKED, tag))
        ok = self.pair0_recv(run, tag)
        return self.pair0_send(run, self.tag("p0tx")) and ok

    def steering_active_pairs(self) -> int:
        """Active pairs from the steering vendor capability (cfg_type 9)."""
        cfg = self.c.config_read(0, 256)
        for cap_id, off in walk_capabilities(cfg):
            if cap_id == PCI_CAP_ID_VNDR and cfg[off + 3] == CfgType.VENDOR:
                return int(struct.unpack_from("<H", cfg, off + 10)[0])
        return -1

    def log_mark(self) -> tuple[int, float] | None:
        """Lines in the daemon's log so far (its counter dumps left out), and when."""
        if self.daemon_log is None:
            return None
        n = sum(1 for ln in self.daemon_log().splitlines() if ": counters {" not in ln)
        return n, time.monotonic()

    def check_log_bounded(self, run: AttackRun, mark: tuple[int, float] | None) -> None:
        """Since ``mark`` the daemon logged at most about LOG_LINES_PER_SEC lines a
        second: a hostile client or guest must not be able to flood the host's logs."""
        now = self.log_mark()
        if mark is None or now is None:
            return
        lines = now[0] - mark[0]
        bound = LOG_LINES_PER_SEC * (math.ceil(now[1] - mark[1]) + 1) + 10
        run.observed["log_lines"] = lines
        run.check(lines <= bound, f"the daemon logged {lines} lines (bound {bound})")

    def alive(self) -> bool:
        if self.daemon_alive is not None and not self.daemon_alive():
            return False
        try:
            self.c.device_info()
        except (vu.VfioUserTimeout, vu.VfioUserDisconnected, OSError):
            return False
        return True

    # -- running attacks --------------------------------------------------------

    def run(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        """Run attacks (all by default), each from a freshly initialised
        device; returns the report (JSON-able)."""
        todo = list(CATALOGUE) if names is None else list(names)
        unknown = [n for n in todo if n not in CATALOGUE]
        if unknown:
            raise ValueError(f"unknown attacks: {', '.join(unknown)}")
        t0 = time.monotonic()
        results = []
        for name in todo:
            try:
                results.append(self.run_attack(CATALOGUE[name]))
            except Exception as e:  # the device or the connection is gone
                log.error("attack %s:\n%s", name, traceback.format_exc())
                a = CATALOGUE[name]
                results.append(
                    {
                        "name": name,
                        "description": a.description,
                        "scope": a.scope,
                        "reaction": a.reaction,
                        "ok": False,
                        "failures": [f"{type(e).__name__}: {e}"],
                        "counters": {},
                        "observed": {},
                        "recovered_by_reset": None,
                        "traffic_during": {},
                        "traffic_after": {},
                        "memory_violations": [],
                        "seconds": 0.0,
                    }
                )
            if not self.alive():
                log.error("the device stopped answering after %s", name)
                break
        return {
            "seed": self.seed,
            "pairs": PAIRS,
            "attacked_pair": ATTACKED,
            "healthy_pairs": list(HEALTHY),
            "seconds": round(time.monotonic() - t0, 2),
            "ok": all(r["ok"] for r in results) and len(results) == len(todo),
            "attacks": results,
        }

    def run_attack(self, attack: Attack) -> dict[str, Any]:
        run = AttackRun(attack.name, attack.scope, attack.reaction)
        t_start = time.monotonic()
        log.info("attack %s", attack.name)
        err = self.reinit()
        run.check(err is None, f"bring-up before the attack failed: {err}")
        tr = self.traffic
        warm = tr.wait_min(tr.snapshot(), 1, TRAFFIC_WAIT)
        base = self.counters()
        during0 = tr.snapshot()
        errors0 = {p: c.errors for p, c in warm.items()}
        try:
            attack.fn(self, run)
        except Exception as e:
            run.check(False, f"attack raised {type(e).__name__}: {e}")
            log.error("attack %s raised:\n%s", attack.name, traceback.format_exc())
        during = tr.snapshot()
        if attack.scope == "queue":
            during = tr.wait_min(during0, MIN_FRAMES, TRAFFIC_WAIT)
            for p in HEALTHY:
                moved = (during[p].rx - during0[p].rx, during[p].tx - during0[p].tx)
                run.check(
                    min(moved) >= MIN_FRAMES,
                    f"healthy pair {p} moved only {moved[0]} rx / {moved[1]} tx frames "
                    f"during the attack (want {MIN_FRAMES}; last error {tr.last_error})",
                )
                run.check(
                    during[p].errors == errors0[p],
                    f"healthy pair {p}: traffic errors during the attack ({tr.last_error})",
                )
                run.check(during[p].misrouted == warm[p].misrouted, f"pair {p}: frames misrouted")
        after_counters = self.counters()
        deltas: dict[str, Any] = {}
        for ex in run.expectations:
            b, a = counter_value(base, ex.path), counter_value(after_counters, ex.path)
            if a is None or b is None:
                run.check(False, f"counter {ex.path} missing")
                continue
            delta = a - b
            deltas[ex.path] = {"delta": delta, "expected": ex.describe()}
            if ex.exactly is not None:
                run.check(
                    delta == ex.exactly, f"counter {ex.path} moved {delta}, expected {ex.exactly}"
                )
            elif ex.at_least is not None:
                run.check(
                    delta >= ex.at_least,
                    f"counter {ex.path} moved {delta}, expected >= {ex.at_least}",
                )
        status = self.d.transport.status if self.alive() else -1
        run.check(status >= 0, "the device stopped answering")
        if status >= 0 and status & STATUS_DEVICE_NEEDS_RESET and not run.broken:
            run.check(False, f"unexpected DEVICE_NEEDS_RESET (status {status:#x})")
        violations = self.mem.early + self.mem.check()
        self.mem.early.clear()
        # Recovery: what broke the device is undone by a reset, as a driver would.
        recovered = None
        if (
            run.broken
            or attack.scope == "device"
            or (status >= 0 and status & STATUS_DEVICE_NEEDS_RESET)
        ):
            err = self.reinit()
            recovered = err is None
            run.check(recovered, f"re-initialisation after the attack failed: {err}")
        after0 = tr.snapshot()
        after = tr.wait_min(after0, MIN_FRAMES, TRAFFIC_WAIT)
        for p in HEALTHY:
            moved = (after[p].rx - after0[p].rx, after[p].tx - after0[p].tx)
            run.check(
                min(moved) >= MIN_FRAMES,
                f"healthy pair {p} moved only {moved[0]} rx / {moved[1]} tx frames after the "
                f"attack{' and recovery' if recovered else ''} (last error {tr.last_error})",
            )
        try:
            self.pair0_roundtrip(run)
        except Exception as e:
            run.check(False, f"pair {ATTACKED} after the attack: {type(e).__name__}: {e}")
        run.check(self.daemon_alive is None or self.daemon_alive(), "the daemon died")
        violations += self.violations + self.mem.early + self.mem.check()
        self.violations.clear()
        self.mem.early.clear()
        for v in violations:
            run.check(False, str(v))
        return {
            "name": attack.name,
            "description": attack.description,
            "scope": attack.scope,
            "reaction": attack.reaction,
            "ok": not run.failures,
            "failures": run.failures,
            "counters": deltas,
            "observed": run.observed,
            "recovered_by_reset": recovered,
            "traffic_during": _diff_counts(during0, during),
            "traffic_after": _diff_counts(after0, after),
            "memory_violations": [str(v) for v in violations],
            "seconds": round(time.monotonic() - t_start, 2),
        }


# --------------------------------------------------------------------------
# The attacks
# --------------------------------------------------------------------------

TX = f"queues.{ATTACKED}.tx"
RX = f"queues.{ATTACKED}.rx"
# Frames for a broken queue are dropped by whichever pair's worker read them
# from the TAP (each counts its own): the sum over the pairs.
BROKEN_DROPS = "queues.*.rx.drops.queue_broken"


def _tx_frame_in_c(hd: HostileDriver, tag: str) -> int:
    frame = bytes(NET_HDR_SIZE) + guest_frame(hd.mac, tag)
    buf = hd.zone_c.alloc(len(frame))
    hd.mem.write(buf, frame)
    return buf


def attack_desc_outside_memory(hd: HostileDriver, run: AttackRun) -> None:
    """tx descriptors beyond guest memory, wrapping 2^64 and 4 GiB long; an
    rx descriptor beyond guest memory."""
    tx, rx = hd.d.pairs[ATTACKED].tx, hd.d.pairs[ATTACKED].rx
    end = hd.mem.end
    cases = [(end + 0x10000, 128), (2**64 - 32, 128), (hd.addr(A_START) + (1 << 20), 0xFFFFFFFF)]
    heads = []
    for addr, length in cases:
        ids = hd.raw_chain(tx, 1, "outside")
        tx.write_desc(tx.desc_addr, ids[0], addr, length, 0, 0)
        heads.append(ids[0])
    hd.publish_kick(tx)
    hd.expect_returned_empty(run, tx, heads)
    ids = hd.raw_chain(rx, 1, "outside-rx")
    rx.write_desc(rx.desc_addr, ids[0], end + 0x1000, BUF_SIZE, VRING_DESC_F_WRITE, 0)
    hd.publish_kick(rx)
    hd.expect_returned_empty(run, rx, ids[:1])
    run.expect(f"{TX}.errors.desc_addr", exactly=len(cases))
    run.expect(f"{TX}.drops.bad_chain", exactly=len(cases))
    run.expect(f"{RX}.errors.desc_addr", exactly=1)
    run.unchanged("device.needs_reset")


def attack_desc_straddling_regions(hd: HostileDriver, run: AttackRun) -> None:
    """Descriptors that start in a DMA region and run into an unmapped hole,
    across a hole into the next region, past the end of memory, wholly in a
    hole; an indirect table straddling a hole; a good descriptor chained to a
    straddling one. Receive buffers straddling holes must stay untouched
    (the memory check sees any byte written in their mapped part)."""
    tx, rx = hd.d.pairs[ATTACKED].tx, hd.d.pairs[ATTACKED].rx
    a = hd.addr
    tx_cases = [
        (a(A_END) - 16, 128),  # A -> hole
        (a(A_END) - 16, HOLE + 32),  # A -> hole -> B
        (a(B_END) - 16, 128),  # B -> hole
        (a(C_END) - 16, 128),  # C -> past the end
        (a(A_END) + 0x100, 64),  # inside the hole
    ]
    heads = []
    for addr, length in tx_cases:
        ids = hd.raw_chain(tx, 1, "straddle")
        tx.write_desc(tx.desc_addr, ids[0], addr, length, 0, 0)
        heads.append(ids[0])
    ids = hd.raw_chain(tx, 1, "straddle-indirect")  # an indirect table A -> hole
    tx.write_desc(tx.desc_addr, ids[0], a(A_END) - 32, 64, VRING_DESC_F_INDIRECT, 0)
    heads.append(ids[0])
    good = _tx_frame_in_c(hd, "straddle-good")
    ids = hd.raw_chain(tx, 2, "good-then-straddle")
    tx.write_desc(tx.desc_addr, ids[0], good, NET_HDR_SIZE + 60, VRING_DESC_F_NEXT, ids[1])
    tx.write_desc(tx.desc_addr, ids[1], a(A_END) - 8, 64, 0, 0)
    heads.append(ids[0])
    hd.publish_kick(tx)
    hd.expect_returned_empty(run, tx, heads)
    rx_cases = [
        (a(A_END) - 1024, BUF_SIZE),  # A -> hole
        (a(B_END) - 512, HOLE + 1024),  # B -> hole -> C
        (a(C_END) - 1024, BUF_SIZE),  # C -> past the end
    ]
    rx_heads = []
    for addr, length in rx_cases:
        ids = hd.raw_chain(rx, 1, "straddle-rx")
        rx.write_desc(rx.desc_addr, ids[0], addr, length, VRING_DESC_F_WRITE, 0)
        rx_heads.append(ids[0])
    hd.publish_kick(rx)
    hd.expect_returned_empty(run, rx, rx_heads)
    hd.check_not_on_tap(run, "straddle-good")
    run.expect(f"{TX}.errors.desc_addr", exactly=len(heads))
    run.expect(f"{TX}.drops.bad_chain", exactly=len(heads))
    run.expect(f"{RX}.errors.desc_addr", exactly=len(rx_heads))
    run.unchanged("device.needs_reset")


def attack_desc_loops(hd: HostileDriver, run: AttackRun) -> None:
    """A descriptor chained to itself, two chained to each other, a loop in
    an indirect table, and a looping receive chain."""
    tx, rx = hd.d.pairs[ATTACKED].tx, hd.d.pairs[ATTACKED].rx
    buf = _tx_frame_in_c(hd, "loop")
    heads = []
    ids = hd.raw_chain(tx, 1, "self")
    tx.write_desc(tx.desc_addr, ids[0], buf, 64, VRING_DESC_F_NEXT, ids[0])
    heads.append(ids[0])
    ids = hd.raw_chain(tx, 2, "pair")
    tx.write_desc(tx.desc_addr, ids[0], buf, 64, VRING_DESC_F_NEXT, ids[1])
    tx.write_desc(tx.desc_addr, ids[1], buf, 8, VRING_DESC_F_NEXT, ids[0])
    heads.append(ids[0])
    table = hd.zone_c.alloc(16 * 4, 16)
    for i in range(4):
        tx.write_desc(table, i, buf, 16, VRING_DESC_F_NEXT, (i + 1) % 4)
    ids = hd.raw_chain(tx, 1, "indirect")
    tx.write_desc(tx.desc_addr, ids[0], table, 16 * 4, VRING_DESC_F_INDIRECT, 0)
    heads.append(ids[0])
    hd.publish_kick(tx)
    hd.expect_returned_empty(run, tx, heads)
    rbuf = hd.zone_c.alloc(BUF_SIZE)
    ids = hd.raw_chain(rx, 1, "rx-loop")
    rx.write_desc(
        rx.desc_addr, ids[0], rbuf, BUF_SIZE, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, ids[0]
    )
    hd.publish_kick(rx)
    hd.expect_returned_empty(run, rx, ids[:1])
    hd.check_not_on_tap(run, "loop")
    run.expect(f"{TX}.errors.desc_loop", exactly=3)
    run.expect(f"{TX}.drops.bad_chain", exactly=3)
    run.expect(f"{RX}.errors.desc_loop", exactly=1)
    run.unchanged("device.needs_reset")


def _indirect_table(hd: HostileDriver, q: SplitQueue, n: int, buf: int, flags: int) -> int:
    table = hd.zone_c.alloc(16 * n, 16)
    data = bytearray()
    for i in range(n):
        more = i + 1 < n
        data += struct.pack(
            "<QIHH", buf, 16, flags | (VRING_DESC_F_NEXT if more else 0), i + 1 if more else 0
        )
    hd.mem.write(table, bytes(data))
    return table


def attack_chain_longer_than_ring(hd: HostileDriver, run: AttackRun) -> None:
    """A chain through every descriptor of the ring and back to its head,
    indirect tables of 300 (more than the ring and than the device takes at
    once) and of 1100 entries (more than a ring may have), and a 300-entry
    receive chain."""
    tx, rx = hd.d.pairs[ATTACKED].tx, hd.d.pairs[ATTACKED].rx
    buf = _tx_frame_in_c(hd, "long")
    ids = hd.raw_chain(tx, tx.size, "whole-ring")
    for i, d in enumerate(ids):
        tx.write_desc(tx.desc_addr, d, buf, 1, VRING_DESC_F_NEXT, ids[(i + 1) % len(ids)])
    hd.publish_kick(tx)
    hd.expect_returned_empty(run, tx, ids[:1])
    heads = []
    for n in (300, 1100):
        table = _indirect_table(hd, tx, n, buf, 0)
        h = hd.raw_chain(tx, 1, f"indirect-{n}")
        tx.write_desc(tx.desc_addr, h[0], table, 16 * n, VRING_DESC_F_INDIRECT, 0)
        heads.append(h[0])
    hd.publish_kick(tx)
    hd.expect_returned_empty(run, tx, heads)
    rbuf = hd.zone_c.alloc(BUF_SIZE)
    table = _indirect_table(hd, rx, 300, rbuf, VRING_DESC_F_WRITE)
    h = hd.raw_chain(rx, 1, "rx-indirect-300")
    rx.write_desc(rx.desc_addr, h[0], table, 16 * 300, VRING_DESC_F_INDIRECT, 0)
    hd.publish_kick(rx)
    hd.expect_returned_empty(run, rx, h)
    hd.check_not_on_tap(run, "long")
    run.expect(f"{TX}.errors.desc_loop", exactly=1)
    run.expect(f"{TX}.errors.chain_too_long", exactly=1)
    run.expect(f"{TX}.errors.indirect", exactly=1)
    run.expect(f"{TX}.drops.bad_chain", exactly=3)
    run.expect(f"{RX}.errors.chain_too_long", exactly=1)
    run.unchanged("device.needs_reset")


def attack_rx_ring_starved(hd: HostileDriver, run: AttackRun) -> None:
    """The attacked pair offers no receive buffers while hundreds of frames
    for it arrive (its flows share the TAP's queues with the healthy pairs'):
    the healthy pairs keep flowing; the frames wait for buffers (up to a
    bound) or are dropped and counted; once buffers come, the waiting ones
    arrive in order."""
    n = 600
    rx = hd.d.pairs[ATTACKED].rx
    base = counter_value(hd.counters(), "queues.*.rx.drops.steer_backlog") or 0
    tags = [hd.tag("starved") for _ in range(n)]
    for tag in tags:
        hd.host_send(hd.host_frame(ATTACKED, tag))
    time.sleep(0.5)  # the healthy pairs carry on meanwhile (checked by the caller)
    dropped = hd.wait_counter("queues.*.rx.drops.steer_backlog", base, 1, timeout=3)
    got: list[str] = []
    idle = time.monotonic() + 1.0
    while time.monotonic() < idle:
        if rx.num_free >= 64:
            hd.pair0_buffers(64)
        e = hd.wait_used(rx, 0.05)
        if e is None:
            continue
        idle = time.monotonic() + 1.0
        if isinstance(e.token, tuple) and e.len >= NET_HDR_SIZE:
            found = tag_of(hd.mem.read(int(e.token[1]), e.len)[NET_HDR_SIZE:])
            if found is not None and found.startswith("starved"):
                got.append(found)
    dropped = counter_value(hd.counters(), "queues.*.rx.drops.steer_backlog") or 0
    dropped -= base
    run.observed["frames"] = n
    run.observed["delivered_later"] = len(got)
    run.observed["dropped_counted"] = dropped
    run.check(len(got) + dropped == n, f"{n} frames: {len(got)} delivered + {dropped} counted")
    order = [tags.index(t) for t in got if t in tags]
    run.check(order == sorted(order), "frames held for the starved pair arrived out of order")
    run.expect("queues.*.rx.drops.steer_backlog", at_least=1)
    run.unchanged("device.needs_reset")


def attack_avail_idx_jump(hd: HostileDriver, run: AttackRun) -> None:
    """The transmit ring's avail index jumps by more than the ring size."""
    tx = hd.d.pairs[ATTACKED].tx
    hd.mem.write_u16(tx.avail_idx_addr, (tx.published_idx + tx.size + 5) & 0xFFFF)
    tx.kick(force=True)
    hd.check_needs_reset(run)
    hd.check_broken(run, 2 * ATTACKED + 1)
    run.expect(f"{TX}.errors.avail_idx", exactly=1)
    run.expect("device.needs_reset", exactly=1)


def attack_head_index_out_of_range(hd: HostileDriver, run: AttackRun) -> None:
    """The receive ring's avail ring names a descriptor past the ring; then
    frames for that pair arrive (dropped, counted as queue_broken)."""
    rx = hd.d.pairs[ATTACKED].rx
    hd.mem.write_u16(rx.avail_ring_addr(rx.avail_idx), rx.size + 3)
    rx.avail_idx = (rx.avail_idx + 1) & 0xFFFF
    hd.publish_kick(rx)
    hd.check_needs_reset(run)
    hd.check_broken(run, 2 * ATTACKED)
    base = counter_value(hd.counters(), BROKEN_DROPS) or 0
    n = 5
    for _ in range(n):
        hd.host_send(hd.host_frame(ATTACKED, hd.tag("to-broken")))
    run.observed["queue_broken_drops"] = hd.wait_counter(BROKEN_DROPS, base, n)
    run.expect(f"{RX}.errors.head_index", exactly=1)
    run.expect("device.needs_reset", exactly=1)
    run.expect(BROKEN_DROPS, exactly=n)


def attack_ctrl_ring_corrupt(hd: HostileDriver, run: AttackRun) -> None:
    """The control queue's avail index jumps past its size; then the driver
    keeps ringing its doorbell."""
    q = hd.d.ctrl
    assert q is not None
    hd.mem.write_u16(q.avail_idx_addr, (q.published_idx + 1000) & 0xFFFF)
    q.kick(force=True)
    hd.check_needs_reset(run)
    hd.check_broken(run, q.index)
    mark = hd.log_mark()
    for _ in range(200):
        q.kick(force=True)
    hd.c.sync()
    hd.check_log_bounded(run, mark)
    run.expect("ctrl.errors.avail_idx", exactly=1)
    run.expect("ctrl.doorbells", at_least=201)
    run.expect("device.needs_reset", exactly=1)


def attack_ctrl_malformed_commands(hd: HostileDriver, run: AttackRun) -> None:
    """Control commands the device must refuse (VIRTIO_NET_ERR) without
    changing anything: 0 and too many pairs, a short VQ_PAIRS_SET, an RSS
    table naming a missing queue, an unknown class."""
    cmds = [
        (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 0)),
        (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", PAIRS + 1)),
        (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\x01"),
        (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_RSS_CONFIG, rss_config((0, 1, 2, 9))),
        (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\x02"),
        (200, 0, b""),
    ]
    acks = [hd.d.ctrl_command(cls, cmd, data) for cls, cmd, data in cmds]
    run.observed["acks"] = acks
    run.check(all(a == VIRTIO_NET_ERR for a in acks), f"acks {acks}, expected all VIRTIO_NET_ERR")
    active = hd.steering_active_pairs()
    run.observed["active_pairs"] = active
    run.check(active == PAIRS, f"active pairs {active} after refused commands, expected {PAIRS}")
    run.expect("device.ctrl_err", exactly=len(cmds))
    run.unchanged("device.ctrl_ok")
    run.unchanged("device.needs_reset")


def attack_rings_in_unmapped_memory(hd: HostileDriver, run: AttackRun) -> None:
    """At bring-up, pair 0's receive used ring lies in an unmapped hole and
    its transmit avail ring straddles the end of a region into a hole."""
    hd.ring_overrides = {
        (2 * ATTACKED, "used"): hd.addr(A_END) + 0x1000,
        (2 * ATTACKED + 1, "avail"): hd.addr(A_END) - 8,
    }
    try:
        err = hd.reinit()
    finally:
        hd.ring_overrides = {}
    run.observed["bring_up"] = err
    run.check(err is not None, "the device accepted rings outside guest memory")
    hd.check_needs_reset(run)
    run.expect(f"{RX}.errors.ring_addr", exactly=1)
    run.expect(f"{TX}.errors.ring_addr", exactly=1)
    run.expect("device.needs_reset", exactly=1)


def attack_dma_unmap_buffers_in_use(hd: HostileDriver, run: AttackRun) -> None:
    """Unmap region C, which holds the attacked pair's posted receive buffers
    and its transmit buffers, while traffic runs on the other pairs (their
    rings and buffers are in region A); then remap it."""
    rx, tx = hd.d.pairs[ATTACKED].rx, hd.d.pairs[ATTACKED].tx
    hd.pair0_buffers(8)
    for _ in range(2):
        tag = hd.tag("before-unmap")
        hd.host_send(hd.host_frame(ATTACKED, tag))
        hd.pair0_recv(run, tag)
    frames = [_tx_frame_in_c(hd, "void") for _ in range(2)]
    with hd.unmapped(C_START, C_END), hd.mem.strict_range(hd.addr(C_START), hd.addr(C_END)):
        heads = [
            tx.add_buf([(b, NET_HDR_SIZE + 60, False)], "void", indirect=False) for b in frames
        ]
        tx.kick(force=True)
        hd.expect_returned_empty(run, tx, heads)
        rx.kick(force=True)  # the 6 buffers left are now outside guest memory
        left = []
        for _ in range(6):
            e = hd.wait_used(rx)
            if not run.check(
                e is not None, "posted receive buffers in the unmapped region not returned"
            ):
                break
            assert e is not None
            left.append(e.len)
        run.observed["rx_used_lengths"] = left
        run.check(all(n == 0 for n in left), f"buffers in unmapped memory used with lengths {left}")
        hd.check_not_on_tap(run, "void")
        for v in hd.mem.check():
            run.check(False, f"while unmapped: {v}")
    run.check(not hd.d.transport.status & STATUS_DEVICE_NEEDS_RESET, "DEVICE_NEEDS_RESET")
    run.expect("device.dma_unmaps", exactly=1)
    run.expect("device.dma_maps", exactly=1)
    run.expect(f"{RX}.errors.desc_addr", exactly=6)
    run.expect(f"{TX}.errors.desc_addr", exactly=2)
    run.expect(f"{TX}.drops.bad_chain", exactly=2)
    run.unchanged("device.needs_reset")


def attack_dma_unmap_rings_in_use(hd: HostileDriver, run: AttackRun) -> None:
    """Unmap region B, which holds the attacked pair's rings, while traffic
    runs on the other pairs; frames for that pair keep coming."""
    hd.pair0_buffers(4)
    with hd.unmapped(B_START, B_END), hd.mem.strict_range(hd.addr(B_START), hd.addr(B_END)):
        hd.check_needs_reset(run)
        hd.check_broken(run, 2 * ATTACKED)
        hd.check_broken(run, 2 * ATTACKED + 1)
        base = counter_value(hd.counters(), BROKEN_DROPS) or 0
        n = 5
        for _ in range(n):
            hd.host_send(hd.host_frame(ATTACKED, hd.tag("to-unmapped")))
        run.observed["queue_broken_drops"] = hd.wait_counter(BROKEN_DROPS, base, n)
        for v in hd.mem.check():
            run.check(False, f"while unmapped: {v}")
    run.expect("device.dma_unmaps", exactly=1)
    run.expect("device.needs_reset", exactly=1)
    run.expect(f"{RX}.errors.ring_addr", exactly=1)
    run.expect(f"{TX}.errors.ring_addr", exactly=1)
    run.expect(BROKEN_DROPS, exactly=5)


def attack_dma_unmap_during_steering_drain(hd: HostileDriver, run: AttackRun) -> None:
    """Right after a steering switch, while the attacked pair's receive ring
    holds frames the driver has not consumed (so every worker waits for that
    ring to be caught up, and looks at it), unmap the region with its rings;
    several times."""
    attempts = DRAIN_UNMAP_ATTEMPTS
    for attempt in range(attempts):
        if attempt:
            err = hd.reinit()
            if not run.check(err is None, f"attempt {attempt}: bring-up failed: {err}"):
                return
        rx = hd.d.pairs[ATTACKED].rx
        hd.pair0_buffers(4)
        for _ in range(2):
            hd.host_send(hd.host_frame(ATTACKED, hd.tag("unconsumed")))
        deadline = time.monotonic() + 3
        while rx.used_idx() < 2 and time.monotonic() < deadline:
            time.sleep(0.002)
        ack = hd.d.set_queue_pairs(PAIRS)  # a switch: the workers wait for pair 0
        run.check(ack == VIRTIO_NET_OK, f"VQ_PAIRS_SET answered {ack}")
        with hd.unmapped(B_START, B_END), hd.mem.strict_range(hd.addr(B_START), hd.addr(B_END)):
            status = hd.wait_status(STATUS_DEVICE_NEEDS_RESET)
            if not run.check(hd.alive(), f"attempt {attempt}: the device died"):
                return
            run.check(
                bool(status & STATUS_DEVICE_NEEDS_RESET),
                f"attempt {attempt}: no DEVICE_NEEDS_RESET",
            )
            time.sleep(0.3)  # the drain deadline passes: the other pairs go on
    run.observed["attempts"] = attempts
    run.broken = True
    run.expect("device.dma_unmaps", exactly=attempts)
    run.expect("device.needs_reset", exactly=attempts)
    run.expect(f"{RX}.errors.ring_addr", exactly=attempts)


def _notify(hd: HostileDriver) -> tuple[int, int, int]:
    n = hd.d.transport.notify
    return n.bar, n.offset, n.length


def attack_doorbells_missing_queues(hd: HostileDriver, run: AttackRun) -> None:
    """A doorbell for every queue index past the control queue, in every
    width and at odd offsets, while the device runs."""
    bar, off, length = _notify(hd)
    mult = hd.d.transport.notify.notify_off_multiplier or 4
    first = 2 * PAIRS + 1  # past the control queue
    writes = 0
    for slot in range(first, length // mult):
        hd.c.region_write(bar, off + mult * slot, struct.pack("<H", slot), posted=True)
        writes += 1
    for slot in range(first, length // mult, 7):
        for o, width in ((1, 1), (0, 4), (0, 8), (3, 1)):
            if mult * slot + o + width <= length:
                hd.c.region_write(bar, off + mult * slot + o, hd.rng.randbytes(width), posted=True)
                writes += 1
    hd.c.sync()
    run.observed["doorbells"] = writes
    run.expect("device.doorbells_invalid", exactly=writes)
    run.unchanged("device.needs_reset")


def attack_doorbells_before_driver_ok(hd: HostileDriver, run: AttackRun) -> None:
    """The driver resets the device and rings every doorbell before DRIVER_OK
    (the spec forbids it: ignored, and counted)."""
    bar, off, _ = _notify(hd)
    mult = hd.d.transport.notify.notify_off_multiplier or 4
    hd.traffic.pause()
    hd.d.transport.reset()
    writes = 0
    for slot in range(0, 2 * PAIRS + 4):
        hd.c.region_write(bar, off + mult * slot, struct.pack("<H", slot), posted=True)
        writes += 1
    hd.c.sync()
    run.observed["doorbells"] = writes
    run.broken = True  # the driver reset it: bring it up again
    run.expect("device.doorbells_invalid", exactly=writes)


def _posted_fuzz(
    hd: HostileDriver, region: int, size: int, ranges: Sequence[tuple[int, int]]
) -> int:
    """A random value of each width 1/2/4/8 at every offset of ``ranges``."""
    c = hd.c
    n = 0
    for start, end in ranges:
        for o in range(start, end):
            for width in (1, 2, 4, 8):
                if o + width > size:
                    continue
                c.region_write(region, o, hd.rng.randbytes(width), posted=True)
                n += 1
                if n % 512 == 0:
                    c.sync()
    c.sync()
    return n


def _still_answers(hd: HostileDriver, run: AttackRun) -> None:
    ok = hd.alive()
    run.check(ok, "the device stopped answering")
    if ok:
        ident = hd.c.config_read(0, 4)
        run.check(ident == b"\xf4\x1a\x41\x10", f"PCI identity now {ident.hex()}")
    run.broken = True  # the driver resets it and brings it up again


def attack_config_space_writes(hd: HostileDriver, run: AttackRun) -> None:
    """A random value of every width at every offset of PCI config space."""
    info = hd.c.region_info(vu.VFU_PCI_DEV_CFG_REGION_IDX)
    info.close_fds()
    before = hd.c.config_read(0, 64)
    run.observed["writes"] = _posted_fuzz(
        hd, vu.VFU_PCI_DEV_CFG_REGION_IDX, info.size, [(0, info.size)]
    )
    _still_answers(hd, run)
    after = hd.c.config_read(0, 64)
    run.check(after[8:12] == before[8:12], "revision/class changed")


def attack_bar0_writes(hd: HostileDriver, run: AttackRun) -> None:
    """A random value of every width at every offset of BAR0: common
    configuration, ISR, device configuration, notify area and the gaps."""
    info = hd.c.region_info(vu.VFU_PCI_DEV_BAR0_REGION_IDX)
    info.close_fds()
    run.observed["writes"] = _posted_fuzz(
        hd, vu.VFU_PCI_DEV_BAR0_REGION_IDX, info.size, [(0, info.size)]
    )
    _still_answers(hd, run)


def attack_set_irqs_churn(hd: HostileDriver, run: AttackRun) -> None:
    """While the healthy pairs' traffic makes the device raise interrupts:
    replace single vectors' eventfds, disable every vector for a while and
    hand new ones, and send malformed SET_IRQS. No interrupt may reach a
    replaced eventfd; interrupts while disabled are counted (irq_errors)."""
    t = hd.d.transport
    c = hd.c
    nvec = len(t.irq_fds)
    dev_vectors = c.irq_info(vu.VFIO_PCI_MSIX_IRQ_INDEX).count
    healthy = [v for p in HEALTHY for v in (1 + 2 * p, 2 + 2 * p) if v < nvec]
    stale: list[int] = []
    refused = accepted = 0
    end = time.monotonic() + 1.5
    i = 0
    mark = hd.log_mark()
    try:
        while time.monotonic() < end:
            v = hd.rng.choice(healthy)
            old = t.irq_fds[v]
            new = vu.new_eventfd()
            c.set_irqs(vu.VFIO_PCI_MSIX_IRQ_INDEX, v, [new])
            t.irq_fds[v] = new
            vu.read_eventfd(old)  # what fired before the switch
            stale.append(old)
            if i % 8 == 7:
                c.set_irqs(vu.VFIO_PCI_MSIX_IRQ_INDEX, 0, [])  # every vector off
                for fd in t.irq_fds:
                    vu.read_eventfd(fd)
                    stale.append(fd)
                t.irq_fds = []
                time.sleep(0.05)  # interrupts due meanwhile have nowhere to go
                fresh = [vu.new_eventfd() for _ in range(nvec)]
                t.irq_fds = fresh
                c.set_irqs(vu.VFIO_PCI_MSIX_IRQ_INDEX, 0, fresh)
            bogus = [
                (vu.VFIO_PCI_MSIX_IRQ_INDEX, dev_vectors + 3, 1, vu.VFIO_IRQ_SET_DATA_NONE),
                (vu.VFIO_PCI_MSIX_IRQ_INDEX, 0, dev_vectors + 1, vu.VFIO_IRQ_SET_DATA_NONE),
                (9, 0, 1, vu.VFIO_IRQ_SET_DATA_NONE),
                (vu.VFIO_PCI_MSIX_IRQ_INDEX, 1, 0, vu.VFIO_IRQ_SET_DATA_NONE),
            ]
            for index, start, count, dtype in bogus:
                try:
                    c.set_irqs_raw(index, start, count, vu.VFIO_IRQ_SET_ACTION_TRIGGER | dtype)
                    accepted += 1
                except vu.VfioUserError:
                    refused += 1
            i += 1
        time.sleep(0.2)
        late = {fd: vu.read_eventfd(fd) for fd in stale}
        run.observed["replaced_eventfds"] = len(stale)
        run.observed["late_interrupts_on_replaced_eventfds"] = sum(late.values())
        run.check(not any(late.values()), "interrupts reached eventfds already replaced")
    finally:
        for fd in stale:
            with contextlib.suppress(OSError):
                os.close(fd)
    hd.check_log_bounded(run, mark)
    run.observed["bogus_set_irqs"] = {"refused": refused, "accepted": accepted}
    run.check(accepted == 0, f"{accepted} malformed SET_IRQS accepted")
    # Interrupts reach the current eventfds.
    fired: dict[int, int] = {}
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and len(fired) < len(healthy) // 2:
        for v in healthy:
            n = t.irq_count(v)
            if n:
                fired[v] = fired.get(v, 0) + n
        time.sleep(0.05)
    run.observed["vectors_firing_after"] = sorted(fired)
    run.check(bool(fired), "no interrupt on the new eventfds after the churn")
    run.expect("device.irq_errors", at_least=1)
    for p in HEALTHY:
        run.expect(f"queues.{p}.rx.interrupts", at_least=1)
    run.unchanged("device.needs_reset")


def attack_message_flood(hd: HostileDriver, run: AttackRun) -> None:
    """Thousands of messages as fast as the socket takes them: doorbells for
    missing and existing queues, driver feature writes after FEATURES_OK,
    config space and BAR0 reads, unknown commands, region info for a missing
    region, unmaps of unmapped memory. The daemon keeps serving, its memory
    does not keep growing and it does not log a line per message."""
    c = hd.c
    bar, off, length = _notify(hd)
    mult = hd.d.transport.notify.notify_off_multiplier or 4
    common = hd.d.transport.common
    invalid = 0
    valid: dict[int, int] = {}
    errors: dict[str, int] = {}
    answered = 0

    def batch(n: int) -> None:
        nonlocal invalid, answered
        pending: list[tuple[int, int]] = []
        with c.lock:
            for k in range(n):
                kind = k % 8
                mid = c.next_msg_id()
                if kind == 1:  # refused (FEATURES_OK is set): ignored
                    payload = vu.pack_region_access(
                        common.bar, common.offset + COMMON_GF, 4, hd.rng.randbytes(4)
                    )
                    c.send_raw(
                        vu.pack_message(mid, vu.Command.REGION_WRITE, payload, no_reply=True)
                    )
                    continue
                if kind == 0:
                    slot = 2 * PAIRS + 1 + hd.rng.randrange(length // mult - 2 * PAIRS - 1)
                    payload = vu.pack_region_access(
                        bar, off + mult * slot, 2, struct.pack("<H", slot)
                    )
                    c.send_raw(
                        vu.pack_message(mid, vu.Command.REGION_WRITE, payload, no_reply=True)
                    )
                    invalid += 1
                    continue
                if kind == 2:
                    q = 2 * hd.rng.choice(HEALTHY)  # a healthy pair's rx queue
                    payload = vu.pack_region_access(bar, off + mult * q, 2, struct.pack("<H", q))
                    c.send_raw(
                        vu.pack_message(mid, vu.Command.REGION_WRITE, payload, no_reply=True)
                    )
                    valid[q // 2] = valid.get(q // 2, 0) + 1
                    continue
                cmd: int
                if kind == 3:
                    cmd, payload = (
                        vu.Command.REGION_READ,
                        vu.pack_region_access(
                            vu.VFU_PCI_DEV_CFG_REGION_IDX, 4 * hd.rng.randrange(64), 4
                        ),
                    )
                elif kind == 4:
                    cmd, payload = vu.Command.REGION_READ, vu.pack_region_access(0, 0x2000, 4)
                elif kind == 5:
                    cmd, payload = 0x4242, bytes(16)
                elif kind == 6:
                    cmd, payload = (
                        vu.Command.DEVICE_GET_REGION_INFO,
                        vu.pack_region_info_request(99),
                    )
                else:
                    cmd, payload = vu.Command.DMA_UNMAP, vu.pack_dma_unmap(0x7000_0000_0000, 4096)
                c.send_raw(vu.pack_message(mid, cmd, payload))
                pending.append((mid, cmd))
            for mid, cmd in pending:
                reply = c.wait_reply(mid, cmd, check=False)
                reply.close_fds()
                answered += 1
                if reply.header.error:
                    name = "unknown command" if cmd == 0x4242 else vu.Command(cmd).name
                    errors[name] = errors.get(name, 0) + 1

    rss: list[int | None] = []
    mark = hd.log_mark()
    pid = hd.daemon_pid
    for _ in range(2):
        rss.append(None if pid is None else daemon_rss_kib(pid))
        for _ in range(40):
            batch(64)
    rss.append(None if pid is None else daemon_rss_kib(pid))
    run.observed["messages"] = 2 * 40 * 64
    run.observed["answered"] = answered
    run.observed["error_replies"] = errors
    run.observed["daemon_rss_kib"] = rss
    hd.check_log_bounded(run, mark)
    run.check(hd.alive(), "the device stopped answering after the flood")
    if None not in rss:
        r0, r1, r2 = (int(x or 0) for x in rss)
        run.check(r2 - r0 < 16 * 1024, f"daemon RSS grew {r2 - r0} KiB over the flood")
        run.check(r2 - r1 < 4 * 1024, f"daemon RSS still growing ({r1} -> {r2} KiB)")
    run.expect("device.doorbells_invalid", exactly=invalid)
    for p, n in valid.items():
        run.expect(f"queues.{p}.rx.doorbells", at_least=n)
    run.unchanged("device.needs_reset")


def _catalogue() -> dict[str, Attack]:
    entries = [
        (
            attack_rx_ring_starved,
            "queue",
            "frames wait (bounded), then drops.steer_backlog; others unaffected",
        ),
        (
            attack_desc_outside_memory,
            "queue",
            "drop: used length 0, errors.desc_addr, drops.bad_chain",
        ),
        (
            attack_desc_straddling_regions,
            "queue",
            "drop: used length 0, errors.desc_addr, drops.bad_chain",
        ),
        (attack_desc_loops, "queue", "drop: used length 0, errors.desc_loop, drops.bad_chain"),
        (
            attack_chain_longer_than_ring,
            "queue",
            "drop: used length 0, errors.desc_loop/chain_too_long/indirect, drops.bad_chain",
        ),
        (attack_avail_idx_jump, "queue", "DEVICE_NEEDS_RESET + config interrupt, queue broken"),
        (
            attack_head_index_out_of_range,
            "queue",
            "DEVICE_NEEDS_RESET + config interrupt, queue broken, drops.queue_broken",
        ),
        (
            attack_ctrl_ring_corrupt,
            "queue",
            "DEVICE_NEEDS_RESET + config interrupt, control queue broken",
        ),
        (attack_ctrl_malformed_commands, "queue", "VIRTIO_NET_ERR, nothing changed"),
        (
            attack_rings_in_unmapped_memory,
            "device",
            "DEVICE_NEEDS_RESET at DRIVER_OK + config interrupt",
        ),
        (attack_dma_unmap_buffers_in_use, "queue", "drop: used length 0, errors.desc_addr"),
        (
            attack_dma_unmap_rings_in_use,
            "queue",
            "DEVICE_NEEDS_RESET + config interrupt, pair broken",
        ),
        (
            attack_dma_unmap_during_steering_drain,
            "queue",
            "DEVICE_NEEDS_RESET, pair broken, no crash; the other pairs go on",
        ),
        (attack_doorbells_missing_queues, "queue", "ignored, doorbells_invalid"),
        (
            attack_doorbells_before_driver_ok,
            "device",
            "ignored, doorbells_invalid (the driver reset the device)",
        ),
        (attack_config_space_writes, "device", "survives; works after a reset by the driver"),
        (attack_bar0_writes, "device", "survives; works after a reset by the driver"),
        (
            attack_set_irqs_churn,
            "queue",
            "no interrupt to a replaced eventfd, irq_errors while disabled",
        ),
        (attack_message_flood, "queue", "keeps serving, bounded memory, doorbells_invalid"),
    ]
    out = {}
    for fn, scope, reaction in entries:
        name = fn.__name__.removeprefix("attack_")
        doc = " ".join((fn.__doc__ or "").split())
        out[name] = Attack(name, fn, scope, reaction, doc)
    return out


CATALOGUE: dict[str, Attack] = _catalogue()


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def open_packet_socket(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((ifname, 0x0003))
    return s


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.harness.hostile_driver",
        description="Attack a vfiouser-net device while healthy traffic runs on its other pairs.",
    )
    p.add_argument("--socket", help="the daemon's vfio-user socket")
    p.add_argument("--tap", help="the device's TAP (in this network namespace)")
    p.add_argument("--admin-socket", help="the daemon's admin socket (counters, ring state)")
    p.add_argument("--device", help="device name on the admin socket (default: the only one)")
    p.add_argument(
        "--daemon-pid", type=int, help="the daemon's pid (memory growth under the flood)"
    )
    p.add_argument("--attacks", help="comma-separated attack names (default: all)")
    p.add_argument("--seed", type=int, help="random seed (values written by the fuzz attacks)")
    p.add_argument("--json", help="write the report here ('-': stdout)")
    p.add_argument("--list", action="store_true", help="list the attacks and exit")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.list:
        for a in CATALOGUE.values():
            print(f"{a.name:32} [{a.scope}] {a.reaction}")
        return 0
    if not (args.socket and args.tap and args.admin_socket):
        p.error("--socket, --tap and --admin-socket are required")
    names = [n for n in args.attacks.split(",") if n] if args.attacks else None
    counters, ring_state = admin_sources(args.admin_socket, args.device)
    sock = open_packet_socket(args.tap)
    try:
        with HostileDriver(
            args.socket,
            sock,
            counters=counters,
            ring_state=ring_state,
            daemon_pid=args.daemon_pid,
            seed=args.seed,
        ) as hd:
            report = hd.run(names)
    finally:
        sock.close()
    for r in report["attacks"]:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['name']} ({r['seconds']} s)")
        for f in r["failures"]:
            print(f"     {f}")
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
