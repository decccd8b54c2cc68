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
    STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_RSS_CONFIG,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_RSS,
    VIRTIO_NET_OK,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    SplitQueue,
    SteerState,
    UsedElem,
    VirtioError,
    VirtioNetDriver,
    bit,
    read_steer_state,
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
    reinit: bool = False  # the driver's own bookkeeping is off: bring the device up again

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
        # Frames from the device that carry no tag of ours (nothing the
        # driver posted: e.g. the daemon's own memory sent out), and the
        # whole frames of the attacks' tags ("x..."), to compare with what
        # was posted.
        self.untagged = 0
        self.untagged_samples: deque[str] = deque(maxlen=4)
        self.frames: dict[str, bytes] = {}
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
                with self.lock:
                    self.untagged += 1
                    self.untagged_samples.append(data[:48].hex())
                continue
            got = True
            with self.lock:
                if tag.startswith("x") and len(self.frames) < 1000:
                    self.frames[tag] = data
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
        self.foreign: list[ForeignRegion] = []  # the attacks' own DMA regions
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
        for region in self.foreign:
            region.mem.close()
        self.foreign.clear()
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

    def reinit(self, pairs: int = PAIRS, features: int = FEATURES) -> str | None:
        """Reset the device and bring it up from scratch (traffic paused
        meanwhile). Returns None, or why the bring-up failed (then the
        traffic stays paused). With fewer than PAIRS ``pairs`` only those are
        set up (VQ_PAIRS_SET ``pairs``, no RSS table) and the traffic stays
        paused."""
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
            features=features,
            queue_size=QUEUE_SIZE,
            rx_buf_size=BUF_SIZE,
            tx_block_size=BUF_SIZE,
            timeout=self.timeout,
        )
        self.drv = drv
        try:
            drv.bring_up(pairs=pairs, rx_buffers=0, queue_hook=self._place_queue)
        except (VirtioError, TimeoutError, vu.VfioUserError) as e:
            return f"{type(e).__name__}: {e}"
        if self.mem.allocated > A_END:
            raise AssertionError(f"driver allocations ({self.mem.allocated:#x}) overflow region A")
        self.mac = drv.read_config().mac
        if pairs < PAIRS:
            return None
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

    def wait_used_idx_change(self, q: SplitQueue, timeout: float) -> None:
        """Until the device used more of ``q`` than the driver took (or timeout)."""
        deadline = time.monotonic() + timeout
        while not q.has_used() and time.monotonic() < deadline:
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
        """Active pairs from the steering state in BAR0."""
        return SteerState.parse(read_steer_state(self.c)).active

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
            or run.reinit
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
    once) and of 4097 entries (more than any ring may have: 4096), and a
    300-entry receive chain."""
    tx, rx = hd.d.pairs[ATTACKED].tx, hd.d.pairs[ATTACKED].rx
    buf = _tx_frame_in_c(hd, "long")
    ids = hd.raw_chain(tx, tx.size, "whole-ring")
    for i, d in enumerate(ids):
        tx.write_desc(tx.desc_addr, d, buf, 1, VRING_DESC_F_NEXT, ids[(i + 1) % len(ids)])
    hd.publish_kick(tx)
    hd.expect_returned_empty(run, tx, ids[:1])
    heads = []
    for n in (300, 4097):
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


# --------------------------------------------------------------------------
# Issue #11: a hostile client (the vfio-user messages) and a hostile guest
# --------------------------------------------------------------------------

# IOVAs of the attacks' own DMA regions: above the guest memory (8 MiB) and
# every region of it, each backed by its own memfd.
FOREIGN_IOVA = 1 << 32
DMA_REFUSED = "device.dma_refused"
# A vfio-user message must be answered within this while a guest keeps the
# control queue busy (QEMU's x-msg-timeout is 5 s by default; the device's
# other work must not wait for the guest at all).
MSG_REPLY_BOUND = 1.0
CTRL_BUSY_SECONDS = 4.0
CTRL_BUDGET = "device.ctrl_budget_exhausted"
PAIR_NOT_READY = "queues.*.rx.drops.pair_not_ready"
# Frames steered to pairs without rings: how much the daemon's heap (RssAnon)
# may grow under a flood of 64 KiB frames. Unbounded it holds VN_INBOX_MAX
# (512) frames per pair: 32 MiB a pair.
STEER_RSS_BOUND_KIB = 16 * 1024
FLOOD_FRAMES = 2000
FLOOD_PAYLOAD = 65000  # UDP payload: 65042-byte frames
TAP_FLOOD_MTU = 65521  # tun's largest
DMA_REPEATS = 1000


def daemon_fds(pid: int) -> int | None:
    """Open descriptors of the daemon (None: gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def daemon_rss_anon_kib(pid: int) -> int | None:
    """The daemon's anonymous resident memory (its heap; guest RAM is shared)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class ForeignRegion:
    """A DMA region of its own memfd at ``iova``: ``size`` bytes declared at
    file ``offset``, over a file of ``mem.size`` bytes. ``mem`` is our view of
    the whole file with guest addresses: ``iova`` is file byte ``offset``."""

    mem: GuestMemory
    iova: int
    size: int
    offset: int
    flags: int
    error: int | None = None  # errno of the DMA_MAP reply; None: accepted
    shadow: bytes = b""  # the file's bytes as the driver wrote them

    @property
    def accepted(self) -> bool:
        return self.error is None


def _map_foreign(
    hd: HostileDriver,
    run: AttackRun,
    name: str,
    *,
    file_size: int,
    size: int,
    offset: int = 0,
    flags: int = vu.DMA_RW,
    iova: int = FOREIGN_IOVA,
) -> ForeignRegion:
    """DMA_MAP a canary-filled memfd as the hostile client chooses; the reply
    (error or not) is recorded, never raised."""
    mem = GuestMemory(file_size, base=iova - offset, name=f"hostile-{name}")
    reps = file_size // len(CANARY) + 1
    mem.write(mem.base, (CANARY * reps)[:file_size])
    region = ForeignRegion(mem, iova, size, offset, flags, shadow=bytes(mem.buf))
    hd.foreign.append(region)
    reply = hd.c.request(
        vu.Command.DMA_MAP, vu.pack_dma_map(iova, size, offset, flags), [mem.fd], check=False
    )
    assert reply is not None
    reply.close_fds()
    if reply.header.error:
        region.error = reply.header.error_no or errno_mod.EINVAL
    run.observed[f"{name}_dma_map"] = (
        "accepted" if region.accepted else f"refused ({errno_mod.errorcode.get(region.error or 0)})"
    )
    return region


def _unmap_foreign(hd: HostileDriver, region: ForeignRegion) -> None:
    """DMA_UNMAP the region (if it was accepted) and close the memfd."""
    if region in hd.foreign:
        hd.foreign.remove(region)
    try:
        if region.accepted and hd.client is not None:
            reply = hd.c.request(
                vu.Command.DMA_UNMAP, vu.pack_dma_unmap(region.iova, region.size), check=False
            )
            if reply is not None:
                reply.close_fds()
    finally:
        region.mem.close()


def _check_refused(
    hd: HostileDriver, run: AttackRun, region: ForeignRegion, base: dict[str, Any], what: str
) -> None:
    """The region was refused: an error reply, or counted in device.dma_refused."""
    if not region.accepted:
        return
    b, a = counter_value(base, DMA_REFUSED), counter_value(hd.counters(), DMA_REFUSED)
    delta = None if a is None or b is None else a - b
    run.observed[f"{what}_dma_refused_delta"] = delta
    run.check(
        delta is not None and delta >= 1,
        f"{what}: DMA_MAP answered without error and not counted as refused "
        f"({DMA_REFUSED} moved {delta})",
    )


def _check_foreign_unchanged(
    run: AttackRun,
    region: ForeignRegion,
    what: str,
    allowed: Sequence[tuple[int, int]] = (),
    upto: int | None = None,
) -> None:
    """Nothing changed in the region's file (its first ``upto`` bytes) except
    in ``allowed`` (guest address, length) ranges."""
    n = region.mem.size if upto is None else upto
    real = bytes(region.mem.buf[:n])
    shadow = bytearray(region.shadow[:n])
    for addr, length in allowed:
        a = max(0, addr - region.mem.base)
        b = min(n, addr - region.mem.base + length)
        if a < b:
            shadow[a:b] = real[a:b]
    if real != bytes(shadow):
        runs = _merge(_diff_runs(real, bytes(shadow), 0, n))
        first = runs[0][0]
        run.check(
            False,
            f"{what}: the device wrote {sum(b - a for a, b in runs)} byte(s) into the region "
            f"(first at file offset {first:#x}: {real[first : first + 16].hex()})",
        )


def _foreign_rings(base: int) -> dict[tuple[int, str], int]:
    """Pair 0's rings (queue size 128) laid out from ``base`` (0x2c08 bytes)."""
    rx, tx = 2 * ATTACKED, 2 * ATTACKED + 1
    return {
        (rx, "desc"): base,
        (rx, "avail"): base + 0x800,
        (rx, "used"): base + 0x1000,
        (tx, "desc"): base + 0x1800,
        (tx, "avail"): base + 0x2000,
        (tx, "used"): base + 0x2800,
    }


RINGS_SPAN = 0x3000


def _zero_rings(region: ForeignRegion, base: int) -> None:
    """Zeroed ring memory (where the file has it): rings a device would take
    as freshly set up."""
    if region.mem.contains(base, RINGS_SPAN):
        region.mem.write(base, bytes(RINGS_SPAN))
        region.shadow = bytes(region.mem.buf)


def _rings_refused(
    hd: HostileDriver, run: AttackRun, region: ForeignRegion, base: int, what: str
) -> None:
    """Pair 0's rings (zeroed) in a region the device must not use, then
    DRIVER_OK: DEVICE_NEEDS_RESET (rings outside usable guest memory), no
    crash. Last step of an attack (the tool resets the device afterwards)."""
    _zero_rings(region, base)
    hd.ring_overrides = _foreign_rings(base)
    try:
        err = hd.reinit()
    finally:
        hd.ring_overrides = {}
    run.observed[f"{what}_bring_up"] = err
    run.check(hd.alive(), f"{what}: the device stopped answering after DRIVER_OK")
    run.check(err is not None, f"{what}: the device accepted rings in the region")
    hd.check_needs_reset(run)
    run.expect(f"{RX}.errors.ring_addr", exactly=1)
    run.expect(f"{TX}.errors.ring_addr", exactly=1)
    run.expect("device.needs_reset", exactly=1)


def _frame_at(mem: GuestMemory, addr: int, tag: str, mac: bytes) -> bytes:
    frame = bytes(NET_HDR_SIZE) + guest_frame(mac, tag)
    mem.write(addr, frame)
    return frame


def _tx_one(hd: HostileDriver, run: AttackRun, addr: int, length: int, what: str) -> int | None:
    """One transmit chain on pair 0 with its buffer at ``addr``; the used length."""
    tx = hd.d.pairs[ATTACKED].tx
    head = tx.add_buf([(addr, length, False)], what, indirect=False)
    tx.kick(force=True)
    e = hd.wait_used(tx)
    run.check(e is not None and e.id == head, f"{what}: transmit chain not returned")
    return None if e is None else e.len


def _tx_refused(
    hd: HostileDriver, run: AttackRun, region: ForeignRegion, off: int, what: str
) -> None:
    """A frame in the region (``off`` bytes in) is not sent: used, never on the TAP."""
    tag = hd.tag(f"x{what}-tx")
    addr = region.iova + off
    frame = (
        _frame_at(region.mem, addr, tag, hd.mac)
        if region.mem.contains(addr, NET_HDR_SIZE + 60)
        else b"\0" * (NET_HDR_SIZE + 60)
    )
    region.shadow = bytes(region.mem.buf[: len(region.shadow)])
    _tx_one(hd, run, addr, len(frame), what)
    hd.check_not_on_tap(run, tag)


def _tx_exact_or_dropped(
    hd: HostileDriver, run: AttackRun, region: ForeignRegion, off: int, what: str
) -> None:
    """A frame in the region is sent exactly as the driver wrote it there, or
    not at all (the region refused); never anything else."""
    tag = hd.tag(f"x{what}-tx")
    addr = region.iova + off
    frame = _frame_at(region.mem, addr, tag, hd.mac)
    region.shadow = bytes(region.mem.buf)
    _tx_one(hd, run, addr, len(frame), what)
    time.sleep(0.3)
    with hd.traffic.lock:
        got = hd.traffic.frames.get(tag)
    run.observed[f"{what}_tx"] = "sent" if got is not None else "dropped"
    if got is not None:
        run.check(
            got[: len(frame) - NET_HDR_SIZE] == frame[NET_HDR_SIZE:],
            f"{what}: the frame on the TAP is not the one in the region: {got[:64].hex()}",
        )


def _rx_one(
    hd: HostileDriver, run: AttackRun, region: ForeignRegion, off: int, length: int, what: str
) -> tuple[int | None, str]:
    """A receive buffer of pair 0 in the region, a frame for pair 0; returns
    the used length and the tag."""
    rx = hd.d.pairs[ATTACKED].rx
    addr = region.iova + off
    head = rx.add_buf([(addr, length, True)], ("foreign", addr), indirect=False)
    rx.kick(force=True)
    tag = hd.tag(f"x{what}-rx")
    hd.host_send(hd.host_frame(ATTACKED, tag))
    e = hd.wait_used(rx)
    run.check(e is not None and e.id == head, f"{what}: receive buffer not returned")
    return (None if e is None else e.len), tag


def _ours(buf: bytes) -> bool:
    """A received buffer holds one of the attacks' frames for pair 0 (a frame
    held for a buffer refused earlier may fill a later one)."""
    found = tag_of(buf[NET_HDR_SIZE:])
    return found is not None and found.startswith("x")


def _other_pairs_moving(hd: HostileDriver, run: AttackRun, what: str) -> None:
    since = hd.traffic.snapshot()
    now = hd.traffic.wait_min(since, MIN_FRAMES, TRAFFIC_WAIT)
    for p in HEALTHY:
        moved = (now[p].rx - since[p].rx, now[p].tx - since[p].tx)
        run.check(min(moved) >= MIN_FRAMES, f"{what}: healthy pair {p} moved only {moved}")


def _check_no_untagged(hd: HostileDriver, run: AttackRun, since: int) -> None:
    with hd.traffic.lock:
        n = hd.traffic.untagged - since
        samples = list(hd.traffic.untagged_samples)
    run.observed["untagged_frames_on_tap"] = n
    run.check(n == 0, f"{n} frame(s) on the TAP that the driver never posted: {samples}")


def attack_dma_map_no_access(hd: HostileDriver, run: AttackRun) -> None:
    """DMA_MAP of a memfd with neither READ nor WRITE (flags 0): a transmit
    and a receive buffer there, then pair 0's rings there and DRIVER_OK. The
    region is refused (an error reply, or counted in dma_refused) and never
    touched: buffers come back unused, nothing is sent or written, the rings
    get DEVICE_NEEDS_RESET."""
    base = hd.counters()
    untagged = hd.traffic.untagged
    region = _map_foreign(hd, run, "no_access", file_size=64 << 10, size=64 << 10, flags=0)
    try:
        _check_refused(hd, run, region, base, "no_access")
        _tx_refused(hd, run, region, 0x8000, "no_access")
        n, _ = _rx_one(hd, run, region, 0x9000, BUF_SIZE, "no_access")
        run.check(n == 0, f"no_access: receive buffer used with length {n}")
        _other_pairs_moving(hd, run, "no_access")
        _check_no_untagged(hd, run, untagged)
        _rings_refused(hd, run, region, region.iova, "no_access")
        _check_foreign_unchanged(run, region, "no_access")
    finally:
        _unmap_foreign(hd, region)
    run.expect(f"{TX}.errors.desc_addr", at_least=1)
    run.expect(f"{RX}.errors.desc_addr", at_least=1)


def attack_dma_map_write_only(hd: HostileDriver, run: AttackRun) -> None:
    """DMA_MAP WRITE-only (the device may write the region, not read it): a
    frame there is never read (not sent), pair 0's rings there are refused at
    DRIVER_OK (DEVICE_NEEDS_RESET); a receive buffer there is either refused
    or gets the frame, in the region."""
    untagged = hd.traffic.untagged
    region = _map_foreign(
        hd, run, "write_only", file_size=64 << 10, size=64 << 10, flags=vu.DMA_WRITE
    )
    try:
        _tx_refused(hd, run, region, 0x8000, "write_only")
        n, _ = _rx_one(hd, run, region, 0x9000, BUF_SIZE, "write_only")
        run.observed["write_only_rx_len"] = n
        allowed: list[tuple[int, int]] = []
        if n:
            data = region.mem.read(region.iova + 0x9000, min(n, BUF_SIZE))
            run.check(
                _ours(data),
                f"write_only: receive buffer used with length {n} but the frame is not in it",
            )
            allowed.append((region.iova + 0x9000, BUF_SIZE))
        _other_pairs_moving(hd, run, "write_only")
        _check_no_untagged(hd, run, untagged)
        _rings_refused(hd, run, region, region.iova, "write_only")
        _check_foreign_unchanged(run, region, "write_only", allowed)
    finally:
        _unmap_foreign(hd, region)
    run.expect(f"{TX}.errors.desc_addr", at_least=1)


def attack_dma_map_beyond_file(hd: HostileDriver, run: AttackRun) -> None:
    """DMA_MAP of 1 GiB over a 4 KiB memfd: refused (error reply or
    dma_refused); buffers and pair 0's rings past the end of the file are
    never touched (no SIGBUS), a frame inside the file is sent exactly or not
    at all."""
    base = hd.counters()
    untagged = hd.traffic.untagged
    region = _map_foreign(hd, run, "beyond_file", file_size=4096, size=1 << 30)
    try:
        _check_refused(hd, run, region, base, "beyond_file")
        _tx_refused(hd, run, region, 1 << 20, "beyond_file")
        _tx_exact_or_dropped(hd, run, region, 0x100, "beyond_file_in_file")
        n, _ = _rx_one(hd, run, region, 2 << 20, BUF_SIZE, "beyond_file")
        run.check(n == 0, f"beyond_file: receive buffer past the file used with length {n}")
        run.check(hd.alive(), "beyond_file: the device stopped answering")
        _other_pairs_moving(hd, run, "beyond_file")
        _check_no_untagged(hd, run, untagged)
        _rings_refused(hd, run, region, region.iova + (64 << 20), "beyond_file")
        _check_foreign_unchanged(run, region, "beyond_file")
    finally:
        _unmap_foreign(hd, region)
    run.expect(f"{TX}.errors.desc_addr", at_least=1)
    run.expect(f"{RX}.errors.desc_addr", at_least=1)


def attack_dma_file_truncated(hd: HostileDriver, run: AttackRun) -> None:
    """A 1 MiB memfd, DMA-mapped (legitimately) with pair 0's rings, a posted
    receive buffer and a queued transmit frame in its upper half; the client
    then ftruncates it to 4 KiB, rings the doorbells and frames for pair 0
    arrive. The daemon must not die (SIGBUS): the pair may break
    (DEVICE_NEEDS_RESET), the other pairs keep moving frames, the device keeps
    answering."""
    mb = 1 << 20
    region = _map_foreign(hd, run, "truncated", file_size=mb, size=mb)
    try:
        run.check(region.accepted, "truncated: a valid DMA_MAP was refused")
        if not region.accepted:
            return
        rings = region.iova + (mb // 2)
        _zero_rings(region, rings)
        hd.ring_overrides = _foreign_rings(rings)
        try:
            err = hd.reinit()
        finally:
            hd.ring_overrides = {}
        if not run.check(err is None, f"truncated: bring-up with rings in the region: {err}"):
            run.broken = True
            return
        m = region.mem
        rx_desc, rx_avail = rings, rings + 0x800
        tx_desc, tx_avail = rings + 0x1800, rings + 0x2000
        rx_buf, tx_buf = region.iova + (mb * 3 // 4), region.iova + (mb * 7 // 8)
        m.write(rx_desc, struct.pack("<QIHH", rx_buf, BUF_SIZE, VRING_DESC_F_WRITE, 0))
        m.write_u16(rx_avail + 4, 0)
        m.write_u16(rx_avail + 2, 1)
        frame = _frame_at(m, tx_buf, hd.tag("xtruncated-tx"), hd.mac)
        m.write(tx_desc, struct.pack("<QIHH", tx_buf, len(frame), 0, 0))
        m.write_u16(tx_avail + 4, 0)
        m.write_u16(tx_avail + 2, 1)
        os.ftruncate(m.fd, 4096)  # the rings and buffers are gone from the file
        run.observed["truncated_to"] = 4096
        q_rx, q_tx = hd.d.pairs[ATTACKED].rx, hd.d.pairs[ATTACKED].tx
        q_rx.kick(force=True)
        q_tx.kick(force=True)
        for _ in range(5):
            hd.host_send(hd.host_frame(ATTACKED, hd.tag("to-truncated")))
        time.sleep(0.5)
        run.check(hd.daemon_alive is None or hd.daemon_alive(), "truncated: the daemon died")
        run.check(hd.alive(), "truncated: the device stopped answering")
        status = hd.d.transport.status
        run.observed["status"] = hex(status)
        if status & STATUS_DEVICE_NEEDS_RESET:
            run.broken = True  # an allowed reaction: the pair's memory is gone
        run.reinit = True  # pair 0's rings are in the region: start over
        _other_pairs_moving(hd, run, "truncated")
        _check_foreign_unchanged(run, region, "truncated", upto=4096)
    finally:
        _unmap_foreign(hd, region)


def attack_dma_map_unaligned_offset(hd: HostileDriver, run: AttackRun) -> None:
    """DMA_MAP of 0x1000 bytes at file offset 0xff0 (not page aligned): a
    transmit buffer there sends exactly the frame the driver wrote at that
    file offset or nothing (never the daemon's own memory: no frame on the
    TAP that the driver did not post), a receive buffer there either comes
    back unused or holds the frame, in the file."""
    untagged = hd.traffic.untagged
    region = _map_foreign(hd, run, "unaligned", file_size=0x2000, size=0x1000, offset=0xFF0)
    try:
        for off in (0x0, 0x20, 0x400, 0xF00):
            _tx_exact_or_dropped(hd, run, region, off, f"unaligned_{off:#x}")
        # One frame that runs to the region's last byte.
        tag = hd.tag("xunaligned-end-tx")
        frame = bytes(NET_HDR_SIZE) + guest_frame(hd.mac, tag).ljust(0x200, b"\0")
        end = region.iova + region.size - len(frame)
        region.mem.write(end, frame)
        region.shadow = bytes(region.mem.buf)
        _tx_one(hd, run, end, len(frame), "unaligned_end")
        time.sleep(0.3)
        with hd.traffic.lock:
            got = hd.traffic.frames.get(tag)
        if got is not None:
            run.check(
                got[: len(frame) - NET_HDR_SIZE] == frame[NET_HDR_SIZE:],
                f"unaligned_end: the frame on the TAP is not the one in the region: "
                f"{got[:64].hex()}",
            )
        allowed: list[tuple[int, int]] = []
        for off, length in ((0x10, 0x7F0), (0x800, 0x800)):
            n, _ = _rx_one(hd, run, region, off, length, f"unaligned_rx_{off:#x}")
            run.observed[f"unaligned_rx_{off:#x}_len"] = n
            if n:
                data = region.mem.read(region.iova + off, min(n, length))
                run.check(
                    _ours(data),
                    f"unaligned: receive buffer at +{off:#x} used with length {n} but the "
                    "frame is not in the region (written elsewhere)",
                )
                allowed.append((region.iova + off, length))
        time.sleep(0.3)
        _other_pairs_moving(hd, run, "unaligned")
        _check_no_untagged(hd, run, untagged)
        _check_foreign_unchanged(run, region, "unaligned", allowed)
    finally:
        _unmap_foreign(hd, region)


def attack_dma_map_repeated(hd: HostileDriver, run: AttackRun) -> None:
    """The same DMA_MAP (a fresh fd each time, as QEMU would send it) 1000
    times, then 100 overlapping ones of other sizes and files: each is
    answered (error or not), none keeps its fd or adds a region; after the
    unmap the daemon holds exactly the descriptors it held before."""
    pid = hd.daemon_pid
    if not run.check(pid is not None, "dma_map_repeated needs the daemon's pid"):
        return
    assert pid is not None
    fds0 = daemon_fds(pid)
    base = hd.counters()
    size = 64 << 10
    region = _map_foreign(hd, run, "repeated", file_size=size, size=size)
    fds1 = daemon_fds(pid)
    replies = {"ok": 0, "error": 0}
    try:
        run.check(region.accepted, "repeated: the first (valid) DMA_MAP was refused")
        others = [os.memfd_create("hostile-overlap", os.MFD_CLOEXEC) for _ in range(2)]
        try:
            for fd in others:
                os.ftruncate(fd, 2 * size)
            for i in range(DMA_REPEATS + 100):
                if i < DMA_REPEATS - 1:
                    fd, length, off = region.mem.fd, size, 0
                else:
                    fd, length, off = others[i % 2], (1 + i % 2) * size // 2, 4096 * (i % 3)
                dup = os.dup(fd)  # another descriptor of the file, like a new message
                try:
                    reply = hd.c.request(
                        vu.Command.DMA_MAP,
                        vu.pack_dma_map(region.iova, length, off, vu.DMA_RW),
                        [dup],
                        check=False,
                    )
                finally:
                    os.close(dup)
                assert reply is not None
                reply.close_fds()
                replies["error" if reply.header.error else "ok"] += 1
        finally:
            for fd in others:
                os.close(fd)
        fds2 = daemon_fds(pid)
        run.check(hd.alive(), "repeated: the device stopped answering")
    finally:
        _unmap_foreign(hd, region)
    deadline = time.monotonic() + 3
    while daemon_fds(pid) != fds0 and time.monotonic() < deadline:
        time.sleep(0.05)
    fds3 = daemon_fds(pid)
    after = hd.counters()
    maps = (counter_value(after, "device.dma_maps") or 0) - (
        counter_value(base, "device.dma_maps") or 0
    )
    unmaps = (counter_value(after, "device.dma_unmaps") or 0) - (
        counter_value(base, "device.dma_unmaps") or 0
    )
    run.observed["repeat_replies"] = replies
    run.observed["daemon_fds"] = {
        "before": fds0, "mapped": fds1, "after_repeats": fds2, "after_unmap": fds3
    }  # fmt: skip
    run.observed["dma_maps"] = maps
    run.observed["dma_unmaps"] = unmaps
    run.check(
        fds2 is not None and fds1 is not None and fds2 <= fds1,
        f"repeated DMA_MAPs left descriptors in the daemon: {fds1} -> {fds2}",
    )
    # At most: fds0 may have caught a descriptor on its way out (the previous
    # client's connection being torn down); what matters is that none stayed.
    run.check(
        fds3 is not None and fds0 is not None and fds3 <= fds0,
        f"daemon descriptors {fds0} before, {fds3} after the unmap",
    )
    run.check(maps == unmaps, f"{maps} regions registered, {unmaps} unregistered")


def attack_set_irqs_overflow(hd: HostileDriver, run: AttackRun) -> None:
    """SET_IRQS the server must refuse: start + count wrapping 32 bits, a
    huge count (with eventfds and with booleans), an index past the device's,
    more and fewer eventfds than the count says, a count of 0 with fds. Each
    gets an error reply, keeps none of its fds, and the current vectors
    still fire."""
    c = hd.c
    pid = hd.daemon_pid
    fds0 = None if pid is None else daemon_fds(pid)
    msix = vu.VFIO_PCI_MSIX_IRQ_INDEX
    trig = vu.VFIO_IRQ_SET_ACTION_TRIGGER
    ev, none, boolean = (
        vu.VFIO_IRQ_SET_DATA_EVENTFD,
        vu.VFIO_IRQ_SET_DATA_NONE,
        vu.VFIO_IRQ_SET_DATA_BOOL,
    )
    cases: list[tuple[str, int, int, int, int, bytes, int]] = [
        # name, index, start, count, flags, data, eventfds sent
        ("wrap", msix, 0xFFFFFFF0, 0x20, trig | ev, b"", 0),
        ("wrap_with_fds", msix, 0xFFFFFFFF, 2, trig | ev, b"", 2),
        ("wrap_none", msix, 0xFFFFFFFF, 2, trig | none, b"", 0),
        ("wrap_bool", msix, 0xFFFFFFFE, 4, trig | boolean, b"\x01" * 4, 0),
        ("huge_count", msix, 0, 0xFFFFFFFF, trig | ev, b"", 1),
        ("huge_count_bool", msix, 1, 0x10000000, trig | boolean, b"\x01" * 16, 0),
        ("huge_start", msix, 0x7FFFFFFF, 1, trig | ev, b"", 1),
        ("index_out_of_range", 0xFFFFFFFF, 0, 1, trig | ev, b"", 1),
        ("index_past_device", 9, 0, 1, trig | none, b"", 0),
        ("more_fds_than_count", msix, 1, 1, trig | ev, b"", 3),
        ("fewer_fds_than_count", msix, 1, 4, trig | ev, b"", 2),
        ("fds_with_count_0", msix, 0, 0, trig | ev, b"", 2),
        ("fds_with_data_none", msix, 1, 1, trig | none, b"", 1),
    ]
    accepted: list[str] = []
    for name, index, start, count, flags, data, nfds in cases:
        fds = [vu.new_eventfd() for _ in range(nfds)]
        try:
            reply = c.request(
                vu.Command.DEVICE_SET_IRQS,
                vu.pack_set_irqs(index, start, count, flags, data),
                fds,
                check=False,
            )
            assert reply is not None
            reply.close_fds()
            if not reply.header.error:
                accepted.append(name)
        finally:
            for fd in fds:
                os.close(fd)
    run.observed["accepted"] = accepted
    run.check(not accepted, f"malformed SET_IRQS accepted: {accepted}")
    run.check(hd.alive(), "the device stopped answering")
    if pid is not None:
        time.sleep(0.2)
        fds1 = daemon_fds(pid)
        run.observed["daemon_fds"] = {"before": fds0, "after": fds1}
        run.check(fds1 == fds0, f"the daemon kept descriptors: {fds0} -> {fds1}")
    # The vectors in place still fire.
    t = hd.d.transport
    healthy = [1 + 2 * p for p in HEALTHY]
    for v in healthy:
        t.irq_count(v)
    deadline = time.monotonic() + 3
    fired: set[int] = set()
    while time.monotonic() < deadline and not fired:
        fired = {v for v in healthy if t.irq_count(v)}
        time.sleep(0.05)
    run.observed["vectors_firing_after"] = sorted(fired)
    run.check(bool(fired), "no interrupt on the healthy pairs' vectors afterwards")
    run.unchanged("device.needs_reset")


def _region_sizes(hd: HostileDriver) -> dict[int, int]:
    out = {}
    for idx in (vu.VFU_PCI_DEV_BAR0_REGION_IDX, vu.VFU_PCI_DEV_CFG_REGION_IDX):
        info = hd.c.region_info(idx)
        info.close_fds()
        out[idx] = info.size
    return out


def attack_region_access_out_of_range(hd: HostileDriver, run: AttackRun) -> None:
    """REGION_READ and REGION_WRITE at odd offsets and sizes: across and past
    a region's end, offset + count wrapping 64 bits, a count far larger than
    the data (or than a message), a missing region; and 0 bytes. Each is
    refused with an error reply (0 bytes: an error or an empty success),
    the device's identity and state are unchanged, it keeps answering."""
    c = hd.c
    sizes = _region_sizes(hd)
    bar0 = vu.VFU_PCI_DEV_BAR0_REGION_IDX
    ident = c.config_read(0, 8)
    status = hd.d.transport.status
    bad: list[tuple[str, int, int, int, bytes]] = []  # name, region, offset, count, data
    for reg, size in sizes.items():
        r = "bar0" if reg == bar0 else "cfg"
        bad += [
            (f"{r}_across_end", reg, size - 2, 4, b"\xaa" * 4),
            (f"{r}_past_end", reg, size, 4, b"\xaa" * 4),
            (f"{r}_far_past_end", reg, 1 << 40, 4, b"\xaa" * 4),
            (f"{r}_wrap", reg, 2**64 - 2, 4, b"\xaa" * 4),
            (f"{r}_wrap_far", reg, 2**64 - 1, 0xFFFFFFFF, b"\xaa" * 4),
            (f"{r}_huge_count", reg, 0, 0xFFFFFFFF, b"\xaa" * 8),
            (f"{r}_count_over_region", reg, 0, size + 8, b"\xaa" * 8),
        ]
    bad += [
        ("missing_region", 42, 0, 4, b"\xaa" * 4),
        ("region_index_huge", 0xFFFFFFFF, 0, 4, b"\xaa" * 4),
        ("migration_region", vu.VFU_PCI_DEV_MIGR_REGION_IDX, 0, 4, b"\xaa" * 4),
    ]
    # Write-only: a write whose count says more than the data it carries.
    short = [(f"{'bar0' if reg == bar0 else 'cfg'}_count_over_data", reg) for reg in sizes]
    accepted: list[str] = []
    for name, reg in short:
        reply = c.request(
            vu.Command.REGION_WRITE, vu.REGION_ACCESS.pack(0, reg, 64) + b"\xaa" * 4, check=False
        )
        assert reply is not None
        reply.close_fds()
        if not reply.header.error:
            accepted.append(f"REGION_WRITE {name}")
    for name, reg, off, count, data in bad:
        for cmd in (vu.Command.REGION_READ, vu.Command.REGION_WRITE):
            payload = vu.REGION_ACCESS.pack(off, reg, count)
            if cmd == vu.Command.REGION_WRITE:
                payload += data
            reply = c.request(cmd, payload, check=False)
            assert reply is not None
            reply.close_fds()
            if not reply.header.error:
                accepted.append(f"{cmd.name} {name}")
    zero: dict[str, str] = {}
    for reg in sizes:
        for cmd in (vu.Command.REGION_READ, vu.Command.REGION_WRITE):
            reply = c.request(cmd, vu.REGION_ACCESS.pack(0, reg, 0), check=False)
            assert reply is not None
            reply.close_fds()
            ok = not reply.header.error
            if ok and cmd == vu.Command.REGION_READ:
                run.check(
                    len(reply.payload) <= vu.REGION_ACCESS.size,
                    f"{cmd.name} of 0 bytes returned {len(reply.payload)} bytes",
                )
            zero[f"{cmd.name} region {reg}"] = "ok" if ok else f"errno {reply.header.error_no}"
    run.observed["refused"] = 2 * len(bad) + len(short) - len(accepted)
    run.observed["accepted"] = accepted
    run.observed["zero_length"] = zero
    run.check(not accepted, f"out-of-range accesses accepted: {accepted}")
    run.check(hd.alive(), "the device stopped answering")
    run.check(c.config_read(0, 8) == ident, "the PCI identity changed")
    run.check(
        hd.d.transport.status == status,
        f"device status {status:#x} -> {hd.d.transport.status:#x}",
    )
    run.unchanged("device.needs_reset")


def attack_region_info_small_argsz(hd: HostileDriver, run: AttackRun) -> None:
    """DEVICE_GET_REGION_INFO with argsz smaller than struct vfio_region_info
    (0, 8, 31), with a payload shorter than its argsz, and with argsz 4 GiB - 1:
    refused with an error reply (the last: an error or a reply of sane size,
    no fds kept); the device keeps answering."""
    c = hd.c
    pid = hd.daemon_pid
    fds0 = None if pid is None else daemon_fds(pid)
    refused: dict[str, str] = {}
    accepted: list[str] = []
    for idx in (vu.VFU_PCI_DEV_BAR0_REGION_IDX, vu.VFU_PCI_DEV_CFG_REGION_IDX):
        cases = [
            (f"argsz_{n}_region_{idx}", vu.pack_region_info_request(idx, n)) for n in (0, 8, 31)
        ]
        cases.append((f"short_payload_region_{idx}", vu.pack_region_info_request(idx)[:12]))
        for name, payload in cases:
            reply = c.request(vu.Command.DEVICE_GET_REGION_INFO, payload, check=False)
            assert reply is not None
            reply.close_fds()
            if reply.header.error:
                refused[name] = errno_mod.errorcode.get(reply.header.error_no, "?")
            else:
                accepted.append(name)
        reply = c.request(
            vu.Command.DEVICE_GET_REGION_INFO,
            vu.pack_region_info_request(idx, 0xFFFFFFFF),
            check=False,
        )
        assert reply is not None
        reply.close_fds()
        run.check(
            len(reply.payload) <= 64 << 10,
            f"region {idx}: argsz 4 GiB - 1 answered with {len(reply.payload)} bytes",
        )
    run.observed["refused"] = refused
    run.observed["accepted"] = accepted
    run.check(not accepted, f"GET_REGION_INFO with a short argsz accepted: {accepted}")
    run.check(hd.alive(), "the device stopped answering")
    info = c.region_info(vu.VFU_PCI_DEV_CFG_REGION_IDX)
    info.close_fds()
    run.check(info.size >= 256, f"config space region now {info.size} bytes")
    if pid is not None:
        fds1 = daemon_fds(pid)
        run.check(fds1 == fds0, f"the daemon kept descriptors: {fds0} -> {fds1}")
    run.unchanged("device.needs_reset")


def attack_ctrl_queue_busy(hd: HostileDriver, run: AttackRun) -> None:
    """The guest keeps the control queue busy for seconds: 16 commands
    (VQ_PAIRS_SET to the same pairs, RX_PROMISC off) re-posted the moment the
    device acks each one, with a doorbell each time. Meanwhile every other
    vfio-user message is answered within MSG_REPLY_BOUND, the other pairs
    keep moving frames, and the device leaves the control queue after its
    budget (ctrl_budget_exhausted) and comes back to it (commands keep being
    acked)."""
    q = hd.d.ctrl
    assert q is not None
    cmds = [
        (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", PAIRS)),
        (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\x00"),
    ]
    slots: list[tuple[int, int]] = []  # (head, ack address)
    for i in range(min(16, q.size // 3)):
        cls, cmd, data = cmds[i % len(cmds)]
        blk = hd.zone_c.alloc(64)
        hd.mem.write(blk, bytes([cls, cmd]) + data)
        ack = blk + 48
        hd.mem.write_u8(ack, 0xFF)
        head = q.add_buf(
            [(blk, 2, False), (blk + 2, len(data), False), (ack, 1, True)],
            ("busy", i),
            indirect=False,
            publish=False,
        )
        slots.append((head, ack))
    run.reinit = True  # the control queue's bookkeeping is the attack's
    stop = threading.Event()
    acked = [0]
    poster_error: list[str] = []

    def poster() -> None:
        idx = q.avail_idx
        hd.mem.write_u16(q.avail_idx_addr, idx)
        q.kick(force=True)
        kick_due = False
        try:
            while not stop.is_set():
                n = 0
                for head, ack in slots:
                    if hd.mem.read_u8(ack) != 0xFF:
                        hd.mem.write_u8(ack, 0xFF)
                        hd.mem.write_u16(q.avail_ring_addr(idx), head)
                        idx = (idx + 1) & 0xFFFF
                        n += 1
                if n:
                    hd.mem.write_u16(q.avail_idx_addr, idx)
                    acked[0] += n
                    kick_due = True
                # A vCPU does not wait for QEMU's socket: the doorbell goes
                # when no other message holds it (the ring moved anyway).
                if kick_due and hd.c.lock.acquire(blocking=False):
                    try:
                        q.kick(force=True)
                        kick_due = False
                    finally:
                        hd.c.lock.release()
            q.kick(force=True)  # the last commands posted
        except Exception as e:  # the socket is stuck or gone: reported below
            poster_error.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=poster, name="ctrl-busy", daemon=True)
    latencies: list[float] = []
    timeouts = 0
    thread.start()
    try:
        end = time.monotonic() + CTRL_BUSY_SECONDS
        i = 0
        while time.monotonic() < end and thread.is_alive():
            t0 = time.monotonic()
            try:
                if i % 2:
                    hd.c.config_read(0, 4)
                else:
                    hd.c.device_info()
            except vu.VfioUserTimeout:
                timeouts += 1
                break
            latencies.append(time.monotonic() - t0)
            i += 1
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join(10)
    run.observed["commands_acked"] = acked[0]
    run.observed["messages"] = len(latencies)
    run.observed["max_reply_s"] = round(max(latencies, default=0.0), 3)
    run.observed["median_reply_s"] = (
        round(sorted(latencies)[len(latencies) // 2], 4) if latencies else None
    )
    run.check(not poster_error, f"the guest's doorbells: {poster_error}")
    run.check(timeouts == 0, "a vfio-user message got no reply while the control queue was busy")
    run.check(
        bool(latencies) and max(latencies) <= MSG_REPLY_BOUND,
        f"replies took up to {max(latencies, default=0.0):.3f} s (bound {MSG_REPLY_BOUND} s)",
    )
    run.check(acked[0] > 100, f"only {acked[0]} control commands acked in {CTRL_BUSY_SECONDS} s")
    # Every command posted is eventually acked: the device went back to the queue.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(hd.mem.read_u8(a) == 0xFF for _, a in slots):
        time.sleep(0.01)
    left = sum(1 for _, a in slots if hd.mem.read_u8(a) == 0xFF)
    run.check(left == 0, f"{left} control commands never acked after the guest stopped")
    run.expect(CTRL_BUDGET, at_least=1)
    run.expect("device.ctrl_ok", at_least=100)
    run.unchanged("device.needs_reset")


def _set_mtu(sock: socket.socket, mtu: int) -> int:
    """Set the MTU of the interface ``sock`` (AF_PACKET) is bound to, in its
    namespace; returns the old one."""
    import fcntl

    ifname = sock.getsockname()[0]
    siocgifmtu, siocsifmtu = 0x8921, 0x8922
    req = struct.pack("16si20x", ifname.encode(), 0)
    old = struct.unpack_from("16si", fcntl.ioctl(sock.fileno(), siocgifmtu, req))[1]
    fcntl.ioctl(sock.fileno(), siocsifmtu, struct.pack("16si20x", ifname.encode(), mtu))
    return int(old)


def _flood(hd: HostileDriver, n: int, sports: Sequence[int]) -> None:
    payload = b"VNT:xflood:" + bytes(FLOOD_PAYLOAD - 11)
    frames = [
        hd.mac + PEER_MAC + struct.pack("!H", ETH_P_IP)
        + _ipv4_udp(FLOW_SRC, FLOW_DST, sport, FLOW_DPORT, payload)
        for sport in sports
    ]  # fmt: skip
    for i in range(n):
        with contextlib.suppress(OSError):
            hd.host_send(frames[i % len(frames)])


def _recv_recycling(hd: HostileDriver, run: AttackRun, timeout: float) -> bool:
    """Pair 0 receives a frame sent now: every used buffer goes back to the
    ring in batches (the frames held from a flood, in the device and in the
    TAP's queues, come first), and a new frame is sent every 0.5 s (the TAP
    drops what its full queues cannot take)."""
    rx = hd.d.pairs[ATTACKED].rx
    deadline = time.monotonic() + timeout
    tags: set[str] = set()
    next_send = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() >= next_send:
            tag = hd.tag("p0back")
            tags.add(tag)
            hd.host_send(hd.host_frame(ATTACKED, tag))
            next_send = time.monotonic() + 0.5
        used = rx.poll_used()
        if not used:
            hd.wait_used_idx_change(rx, 0.1)
            continue
        for e in used:
            if not isinstance(e.token, tuple):
                continue
            addr = int(e.token[1])
            if e.len >= NET_HDR_SIZE and tag_of(hd.mem.read(addr, e.len)[NET_HDR_SIZE:]) in tags:
                run.observed["frames_sent_until_received"] = len(tags)
                return True
            rx.add_buf([(addr, BUF_SIZE, True)], e.token, indirect=False, publish=False)
        hd.publish_kick(rx)
    return run.check(False, f"pair {ATTACKED} received none of {len(tags)} frames in {timeout} s")


def attack_steering_to_unconfigured_pairs(hd: HostileDriver, run: AttackRun) -> None:
    """MQ negotiated, only pair 0 set up (with TSO: 64 KiB frames), then
    VQ_PAIRS_SET 4 and a flood of 64 KiB frames from the TAP, then an RSS
    table naming only pairs 1-3 and another flood. The device refuses the
    commands (VIRTIO_NET_ERR) or drops the frames for the pairs without
    rings (drops.pair_not_ready); the daemon's heap stays within
    STEER_RSS_BOUND_KIB; after VQ_PAIRS_SET 1, pair 0 receives."""
    pid = hd.daemon_pid
    if not run.check(pid is not None, "steering_to_unconfigured_pairs needs the daemon's pid"):
        return
    assert pid is not None
    tso = FEATURES | bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4)
    err = hd.reinit(pairs=1, features=tso)
    if not run.check(err is None, f"bring-up with pair 0 only: {err}"):
        return
    run.observed["tso"] = hd.d.has(VIRTIO_NET_F_GUEST_TSO4)
    hd.pair0_buffers(QUEUE_SIZE)
    base = hd.counters()
    old_mtu = _set_mtu(hd.packet_sock, TAP_FLOOD_MTU)
    rss: list[int | None] = [daemon_rss_anon_kib(pid)]
    acks: list[int] = []
    try:
        acks.append(hd.d.set_queue_pairs(PAIRS))
        _flood(hd, FLOOD_FRAMES, [hd.sports[p] for p in range(PAIRS)] + list(range(30000, 30013)))
        time.sleep(0.5)
        rss.append(daemon_rss_anon_kib(pid))
        acks.append(
            hd.d.ctrl_command(
                VIRTIO_NET_CTRL_MQ,
                VIRTIO_NET_CTRL_MQ_RSS_CONFIG,
                rss_config((1, 2, 3, 1), unclassified=1),
            )
        )
        _flood(hd, FLOOD_FRAMES, [hd.sports[p] for p in range(PAIRS)])
        time.sleep(0.5)
        rss.append(daemon_rss_anon_kib(pid))
    finally:
        _set_mtu(hd.packet_sock, old_mtu)
    run.observed["acks"] = acks
    run.observed["daemon_rss_anon_kib"] = rss
    run.check(hd.daemon_alive is None or hd.daemon_alive(), "the daemon died")
    if None not in rss:
        grown = max(int(r or 0) for r in rss[1:]) - int(rss[0] or 0)
        run.observed["rss_anon_growth_kib"] = grown
        run.check(
            grown <= STEER_RSS_BOUND_KIB,
            f"the daemon's heap grew {grown} KiB under the flood (bound {STEER_RSS_BOUND_KIB})",
        )
    after = hd.counters()
    b, a = counter_value(base, PAIR_NOT_READY), counter_value(after, PAIR_NOT_READY)
    not_ready = None if a is None or b is None else a - b
    run.observed["pair_not_ready_drops"] = not_ready
    if VIRTIO_NET_OK in acks:
        run.check(
            not_ready is not None and not_ready >= 1,
            f"frames steered to pairs without rings not counted ({PAIR_NOT_READY}: {not_ready})",
        )
    # Back to one pair: pair 0 receives.
    ack = hd.d.set_queue_pairs(1)
    run.observed["back_to_one_pair"] = ack
    run.check(ack == VIRTIO_NET_OK, f"VQ_PAIRS_SET 1 answered {ack}")
    _recv_recycling(hd, run, timeout=30)
    run.unchanged("device.needs_reset")


# The attacks of issue #11 (a hostile client, a hostile guest): scope and
# expected reaction. Before the fixes several of them take the daemon down.
SECURITY_ENTRIES: list[tuple[Callable[[HostileDriver, AttackRun], None], str, str]] = [
    (
        attack_dma_map_no_access,
        "device",
        "refused (error reply or dma_refused); buffers unused, rings DEVICE_NEEDS_RESET",
    ),
    (
        attack_dma_map_write_only,
        "device",
        "never read: frame not sent, rings DEVICE_NEEDS_RESET; rx refused or in the region",
    ),
    (
        attack_dma_map_beyond_file,
        "device",
        "refused (error reply or dma_refused); no SIGBUS, rings DEVICE_NEEDS_RESET",
    ),
    (
        attack_dma_file_truncated,
        "queue",
        "no SIGBUS: the daemon lives, the pair may break, the other pairs go on",
    ),
    (
        attack_dma_map_unaligned_offset,
        "queue",
        "exactly the frame in the file or nothing; rx in the file or unused",
    ),
    (attack_dma_map_repeated, "queue", "answered, no fd kept, no region added"),
    (attack_set_irqs_overflow, "queue", "error replies, no fd kept, vectors still fire"),
    (attack_region_access_out_of_range, "queue", "error replies, nothing changed"),
    (attack_region_info_small_argsz, "queue", "error replies, nothing changed"),
    (
        attack_ctrl_queue_busy,
        "queue",
        f"messages answered within {MSG_REPLY_BOUND} s, ctrl_budget_exhausted, others go on",
    ),
    (
        attack_steering_to_unconfigured_pairs,
        "device",
        "VIRTIO_NET_ERR or drops.pair_not_ready; heap bounded; pair 0 receives after",
    ),
]
SECURITY_ATTACKS: tuple[str, ...] = tuple(
    fn.__name__.removeprefix("attack_") for fn, _, _ in SECURITY_ENTRIES
)


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
        *SECURITY_ENTRIES,
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
