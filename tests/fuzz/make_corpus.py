"""Write the fuzzers' seed corpus: tests/fuzz/corpus/<target>/seed-*.

    python tests/fuzz/make_corpus.py [--check]

Each target gets small, meaningful inputs in its own input format (see the
comment at the top of each tests/fuzz/fuzz_*.{c,py}): valid chains of every
shape, valid control commands of every class, valid frames (IPv4/IPv6,
TCP/UDP, VLAN), valid admin requests and configuration files, a whole
driver initialisation over BAR0, and a few hostile cases. The output is a
pure function of this file, so the seeds are reproducible; files named
other than seed-* (reproducers of bugs found, kept so they stay covered)
are left alone. --check exits 1 when the committed seeds differ.
"""

from __future__ import annotations

import argparse
import hashlib
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import msgpack  # type: ignore[import-untyped]

CORPUS = Path(__file__).resolve().parent / "corpus"

# -- guest memory (fuzz_common.h) ------------------------------------------------------

A, B, RO = 0x10000, 0x12000, 0x18000
LEN_A, LEN_B, LEN_RO = 0x2000, 0x2000, 0x1000
NEXT, WRITE, INDIRECT = 1, 2, 4

VERSION_1 = 32
F_MRG_RXBUF, F_EVENT_IDX, F_INDIRECT = 15, 29, 28


def image_offset(gpa: int) -> int:
    if A <= gpa < A + LEN_A + LEN_B:
        return gpa - A
    if RO <= gpa < RO + LEN_RO:
        return LEN_A + LEN_B + gpa - RO
    raise ValueError(f"0x{gpa:x} is not in the image")


class Image:
    """Guest memory as an input's image: A, then B, then RO."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def put(self, gpa: int, data: bytes) -> None:
        off = image_offset(gpa)
        if len(self.buf) < off + len(data):
            self.buf.extend(bytes(off + len(data) - len(self.buf)))
        self.buf[off : off + len(data)] = data

    def bytes(self) -> bytes:
        return bytes(self.buf)


def desc(addr: int, length: int, flags: int = 0, nxt: int = 0) -> bytes:
    return struct.pack("<QIHH", addr, length, flags, nxt)


Buf = tuple[int, int, bool]  # gpa, length, device-writable


class Ring:
    """The driver's side of a split ring in an Image."""

    def __init__(self, img: Image, desc_gpa: int, avail_gpa: int, size: int) -> None:
        self.img, self.desc, self.avail, self.size = img, desc_gpa, avail_gpa, size
        self.next_desc = 0
        self.heads: list[int] = []

    def raw(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.img.put(self.desc + 16 * i, desc(addr, length, flags, nxt))

    def chain(self, bufs: Sequence[Buf]) -> int:
        head = self.next_desc
        for k, (gpa, length, write) in enumerate(bufs):
            i = (head + k) % self.size
            more = k + 1 < len(bufs)
            flags = (WRITE if write else 0) | (NEXT if more else 0)
            self.raw(i, gpa, length, flags, (i + 1) % self.size if more else 0)
        self.next_desc = (head + len(bufs)) % self.size
        return head

    def indirect(self, table_gpa: int, bufs: Sequence[Buf]) -> int:
        """A head descriptor pointing to an indirect table of bufs."""
        for k, (gpa, length, write) in enumerate(bufs):
            more = k + 1 < len(bufs)
            flags = (WRITE if write else 0) | (NEXT if more else 0)
            self.img.put(table_gpa + 16 * k, desc(gpa, length, flags, k + 1 if more else 0))
        head = self.next_desc
        self.raw(head, table_gpa, 16 * len(bufs), INDIRECT)
        self.next_desc = (head + 1) % self.size
        return head

    def add(self, head: int) -> None:
        self.heads.append(head)

    def publish(self, idx: int | None = None, used_event: int = 0) -> None:
        ring = b"".join(struct.pack("<H", h) for h in self.heads[-self.size :])
        n = len(self.heads) if idx is None else idx
        self.img.put(self.avail, struct.pack("<HH", 0, n & 0xFFFF) + ring)
        self.img.put(self.avail + 4 + 2 * self.size, struct.pack("<H", used_event))


def log2(n: int) -> int:
    return n.bit_length() - 1


# -- frames ---------------------------------------------------------------------------

GUEST_MAC = bytes([0x52, 0x54, 0x00, 0x12, 0x34, 0x56])
HOST_MAC = bytes([0x02, 0, 0, 0, 0, 0x01])


def ipv4(
    proto: int, l4: bytes, src: str = "10.0.0.1", dst: str = "10.0.0.2", frag: int = 0
) -> bytes:
    total = 20 + len(l4)
    s = bytes(int(x) for x in src.split("."))
    d = bytes(int(x) for x in dst.split("."))
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, frag, 64, proto, 0, s, d) + l4


def ipv6(proto: int, l4: bytes, src: int = 1, dst: int = 2) -> bytes:
    s = bytes([0xFD]) + bytes(14) + bytes([src])
    d = bytes([0xFD]) + bytes(14) + bytes([dst])
    return struct.pack("!IHBB", 6 << 28, len(l4), proto, 64) + s + d + l4


def tcp(sport: int = 12345, dport: int = 80, payload: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x18, 1024, 0, 0) + payload


def udp(sport: int = 5000, dport: int = 5001, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def eth(
    ethertype: int,
    payload: bytes,
    dst: bytes = GUEST_MAC,
    tags: Sequence[tuple[int, int]] = (),
) -> bytes:
    vlan = b"".join(struct.pack("!HH", tpid, vid) for tpid, vid in tags)
    return dst + HOST_MAC + vlan + struct.pack("!H", ethertype) + payload


def frames() -> dict[str, bytes]:
    """Frames of every kind the parser tells apart."""
    return {
        "ipv4-tcp": eth(0x0800, ipv4(6, tcp(payload=b"x" * 16))),
        "ipv4-udp": eth(0x0800, ipv4(17, udp(payload=b"y" * 8))),
        "ipv6-tcp": eth(0x86DD, ipv6(6, tcp(40000, 443))),
        "ipv6-udp": eth(0x86DD, ipv6(17, udp(53, 5353))),
        "vlan-ipv4-udp": eth(0x0800, ipv4(17, udp()), tags=[(0x8100, 100)]),
        "qinq-ipv6-tcp": eth(0x86DD, ipv6(6, tcp()), tags=[(0x88A8, 10), (0x8100, 20)]),
        "ipv4-fragment": eth(0x0800, ipv4(17, udp(), frag=0x2000)),
        "ipv4-icmp": eth(0x0800, ipv4(1, b"\x08\x00" + bytes(6))),
        "arp": eth(0x0806, bytes(28), dst=b"\xff" * 6),
        "truncated-ipv6": eth(0x86DD, ipv6(6, tcp()))[:40],
    }


def vnet_hdr(hdr_len: int = 12) -> bytes:
    return bytes(hdr_len)


# -- fuzz_virtq ------------------------------------------------------------------------


def virtq_seed(
    flags: int, size: int, iov_max: int, pops: int, img: Image, extra: bytes = b""
) -> bytes:
    return bytes([flags, log2(size), iov_max - 1, pops - 1]) + extra + img.bytes()


def virtq_seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    size = 16
    ring_desc, ring_avail = A, A + 16 * size
    data = A + 0x1000

    def new() -> tuple[Image, Ring]:
        img = Image()
        return img, Ring(img, ring_desc, ring_avail, size)

    # tx-like: readable chains, one with the frame in the read-only region.
    img, r = new()
    r.add(r.chain([(data, 12 + 60, False)]))
    r.add(r.chain([(data + 0x100, 12, False), (data + 0x200, 1500, False)]))
    r.add(r.chain([(RO, 12, False), (RO + 0x100, 100, False)]))
    r.publish()
    out["tx-chains"] = virtq_seed(0b0101, size, 256, 8, img)  # EVENT_IDX, readable only
    # rx-like: writable buffers in A and B.
    img, r = new()
    for i in range(4):
        r.add(r.chain([(data + 0x200 * i, 0x200, True)]))
    r.add(r.chain([(B, 0x100, True), (B + 0x100, 0x100, True)]))
    r.publish(used_event=2)
    out["rx-buffers"] = virtq_seed(0b1001, size, 256, 8, img)  # EVENT_IDX, writable only
    # Indirect tables: readable + writable (a control command), and rx.
    img, r = new()
    r.add(r.indirect(A + 0x800, [(data, 2, False), (data + 0x10, 6, False), (B, 1, True)]))
    r.add(r.indirect(A + 0x900, [(B + 0x100, 0x80, True), (B + 0x200, 0x80, True)]))
    r.add(r.chain([(data + 0x40, 8, False), (B + 0x300, 1, True)]))
    r.publish()
    out["indirect"] = virtq_seed(0b10010, size, 64, 8, img)  # INDIRECT, unpop check
    # Zero-length descriptors are skipped; a chain through the whole ring.
    img, r = new()
    r.add(r.chain([(data, 0, False), (data, 10, False), (B, 0, True), (B, 4, True)]))
    r.add(r.chain([(data + 0x100 + i, 1, False) for i in range(size - 4)]))
    r.publish()
    out["zero-length-long"] = virtq_seed(0b0000, size, 256, 4, img)
    # Hostile: a loop, a next past the ring, a buffer across A and B (two
    # host mappings), one in a hole, a write into the read-only region, too
    # many iovecs, an indirect table with INDIRECT inside.
    img, r = new()
    r.raw(0, data, 10, NEXT, 1)
    r.raw(1, data, 10, NEXT, 0)
    r.raw(2, data, 10, NEXT, size + 3)
    r.raw(3, A + LEN_A - 8, 16, 0)
    r.raw(4, 0x14000, 64, 0)
    r.raw(5, RO, 64, WRITE)
    r.raw(6, B, 16, WRITE | NEXT, 7)
    r.raw(7, data, 16, 0)
    r.img.put(A + 0xA00, desc(A + 0xA00, 16, INDIRECT))
    r.raw(8, A + 0xA00, 16, INDIRECT)
    for i in range(9, 14):
        r.raw(i, data + i, 1, NEXT, i + 1)
    r.raw(14, data, 1)
    r.heads = [0, 2, 3, 4, 5, 6, 8, 9]
    r.publish()
    out["hostile-chains"] = virtq_seed(0b0010, size, 4, 16, img)
    # Hostile ring: the available index jumps by more than the ring size,
    # and a head past the ring.
    img, r = new()
    r.add(r.chain([(data, 64, True)]))
    r.publish(idx=size + 5)
    out["hostile-avail-idx"] = virtq_seed(0b0000, size, 8, 4, img)
    img, r = new()
    r.add(r.chain([(data, 64, True)]))
    r.add(size + 1)
    r.publish()
    out["hostile-head"] = virtq_seed(0b0000, size, 8, 4, img)
    # Rings where the input says: a used ring ending at the end of A, a
    # misaligned one, a ring in the read-only region.
    for name, used in (("rings-used-at-end", LEN_A - (6 + 8 * 8)), ("rings-misaligned", 0x1802)):
        img = Image()
        r = Ring(img, A + 0x100, A + 0x200, 8)
        r.add(r.chain([(data, 32, True)]))
        r.publish()
        extra = struct.pack("<HHH", 0x100, 0x200, used)
        out[name] = virtq_seed(0b100000, 8, 8, 4, img, extra)
    img = Image()
    r = Ring(img, A + 0x100, A + 0x200, 8)
    r.add(r.chain([(data, 32, True)]))
    r.publish()
    out["rings-used-read-only"] = virtq_seed(
        0b100000, 8, 8, 4, img, struct.pack("<HHH", 0x100, 0x200, RO - A)
    )
    # Ring sizes as the driver wrote them: not a power of two, too big.
    for name, raw in (("ring-size-odd", 24), ("ring-size-huge", 2048)):
        img, r = new()
        r.add(r.chain([(data, 32, True)]))
        r.publish()
        out[name] = virtq_seed(0x80, size, 8, 4, img, struct.pack("<H", raw))
    # The guest rewrites a descriptor and the available ring while we pop.
    img, r = new()
    for i in range(4):
        r.add(r.chain([(data + 0x40 * i, 0x40, True)]))
    r.publish()
    edits = [(16 * 1 + 8, 0xFF), (16 * 2 + 12, NEXT), (16 * size + 4 + 6, 9)]
    extra = bytes([len(edits)]) + b"".join(struct.pack("<HB", o, v) for o, v in edits)
    out["guest-edits"] = virtq_seed(0b1000000, size, 16, 8, img, extra)
    return out


# -- fuzz_worker -----------------------------------------------------------------------


def worker_queue(img: Image, k: int, size: int) -> Ring:
    base = A + 0x400 * k
    return Ring(img, base, base + 16 * size, size)


def worker_seed(fb: int, opt: int, size: int, rb: int, img: Image, host: Iterable[bytes]) -> bytes:
    image = img.bytes()
    out = bytes([fb, opt, log2(size), rb]) + struct.pack("<H", len(image)) + image
    for f in host:
        out += struct.pack("<H", len(f)) + f
    return out


MTU = {68: 0, 128: 1, 256: 2, 576: 3, 1000: 4, 1500: 5, 2000: 6, 9000: 7}


def worker_seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    fr = frames()
    size = 8
    rxa = A + 0x1000  # rx buffers in A (0x1000 bytes) and B (0x1000 bytes)

    def tx_frames(img: Image, ring: Ring, items: Sequence[bytes], hdr: int = 12) -> None:
        at = ring.desc + 0x200
        for f in items:
            img.put(at, vnet_hdr(hdr) + f)
            if len(ring.heads) % 2:
                ring.add(ring.chain([(at, hdr, False), (at + hdr, len(f), False)]))
            else:
                ring.add(ring.chain([(at, hdr + len(f), False)]))
            at += (hdr + len(f) + 15) & ~15
        ring.publish()

    # Mergeable rx over 256-byte buffers (a 1000-byte frame takes four), tx
    # of two frames, one pair.
    img = Image()
    rx, tx = worker_queue(img, 0, size), worker_queue(img, 1, size)
    for i in range(size):
        rx.add(rx.chain([(rxa + 0x100 * i, 0x100, True)]))
    rx.publish()
    tx_frames(img, tx, [fr["ipv4-tcp"], fr["ipv6-udp"]])
    host = [
        vnet_hdr() + fr["ipv4-tcp"],
        vnet_hdr() + eth(0x0800, ipv4(17, udp(payload=bytes(950)))),
    ]
    out["mergeable"] = worker_seed(0b011, MTU[1500] << 4, size, 1, img, host)
    out["mergeable-capture"] = worker_seed(0b011, MTU[1500] << 4, size, 0b1001, img, host)
    # The same served by inline doorbells (the replies read in the same pass).
    out["mergeable-inline"] = worker_seed(0b011, MTU[1500] << 4, size, 0b1000001, img, host)
    # TAP errors: a read fails with EIO, then with EBADFD (the interface was
    # deleted: the worker stops reading it); writes fail with EIO.
    errors = [host[0], struct.pack("<H", 0xFFFE)[:0], host[1]]
    tail = b"".join(struct.pack("<H", len(f)) + f for f in errors if f)
    tap_errors = worker_seed(0b011, MTU[1500] << 4, size, 0b10001, img, [])
    tap_errors += struct.pack("<H", 0xFFFE) + tail + struct.pack("<H", 0xFFFF)
    out["tap-errors"] = tap_errors + struct.pack("<H", len(host[0])) + host[0]
    # A transmitted frame over 64 KiB: an indirect table of 17 descriptors
    # of 4 KiB, the same buffer each time; and one of exactly 64 KiB + 18.
    img = Image()
    tx = worker_queue(img, 1, size)
    img.put(A + 0x1000, vnet_hdr() + fr["ipv4-tcp"])
    tx.add(tx.indirect(A + 0x600, [(A + 0x1000, 0x1000, False)] * 17))
    tx.add(
        tx.indirect(
            A + 0x800, [(A + 0x1000, 0x1000, False)] * 16 + [(A + 0x1000, 12 + 18 - 1, False)]
        )
    )
    tx.publish()
    out["tx-frame-too-big"] = worker_seed(0b100, MTU[1500] << 4, size, 0, img, [])
    # Not mergeable: one big buffer per frame (MTU 1500 needs 1530 bytes),
    # split over two descriptors; indirect.
    img = Image()
    rx, tx = worker_queue(img, 0, size), worker_queue(img, 1, size)
    rx.add(rx.chain([(rxa, 12, True), (rxa + 0x10, 0x700, True)]))
    rx.add(rx.indirect(A + 0x300, [(B, 0x300, True), (B + 0x300, 0x400, True)]))
    rx.publish()
    tx_frames(img, tx, [fr["vlan-ipv4-udp"]])
    host = [vnet_hdr() + fr["ipv6-tcp"], vnet_hdr() + fr["arp"]]
    out["big-buffers-indirect"] = worker_seed(0b110, MTU[1500] << 4, size, 0, img, host)
    # Two pairs with RSS and hash reports (20-byte headers): frames of every
    # kind, steered to both pairs.
    img = Image()
    rings = [worker_queue(img, k, size) for k in range(4)]
    for q in (0, 2):
        for i in range(size // 2):
            rings[q].add(rings[q].chain([(rxa + 0x800 * (q // 2) + 0x200 * i, 0x200, True)]))
        rings[q].publish()
    tx_frames(img, rings[1], [fr["ipv4-udp"]], hdr=20)
    tx_frames(img, rings[3], [fr["ipv6-tcp"]], hdr=20)
    host = [vnet_hdr(20) + fr[k] for k in ("ipv4-tcp", "ipv4-udp", "ipv6-tcp", "ipv6-udp", "arp")]
    out["mq-rss-hash"] = worker_seed(0b1001011, MTU[576] << 4, size, 2, img, host)
    out["mq-rss-hash-inline"] = worker_seed(0b1001011, MTU[576] << 4, size, 0b1000010, img, host)
    # rx-follows-tx: the guest sends flows on pair 1, replies come back.
    opt = 0b1000 | MTU[576] << 4
    rev = [
        vnet_hdr() + eth(0x0800, ipv4(6, tcp(80, 12345), "10.0.0.2", "10.0.0.1")),
        vnet_hdr() + eth(0x86DD, ipv6(17, udp(5353, 53), 2, 1)),
    ]
    img = Image()
    rings = [worker_queue(img, k, size) for k in range(4)]
    for q in (0, 2):
        for i in range(size // 2):
            rings[q].add(rings[q].chain([(rxa + 0x800 * (q // 2) + 0x200 * i, 0x200, True)]))
        rings[q].publish()
    tx_frames(img, rings[3], [fr["ipv4-tcp"], fr["ipv6-udp"]])
    out["mq-rx-follows-tx"] = worker_seed(0b1000011, opt, size, 1, img, rev)
    # GUEST_TSO4: a buffer can never hold the 64 KiB a frame may need, so
    # frames go through the bounce path and the inbox.
    img = Image()
    rx = worker_queue(img, 0, size)
    for i in range(size):
        rx.add(rx.chain([(rxa + 0x200 * i, 0x200, True)]))
    rx.publish()
    host = [
        vnet_hdr() + fr["ipv4-tcp"],
        vnet_hdr() + eth(0x0800, ipv4(17, udp(payload=bytes(1200)))),
    ]
    out["tso-bounce"] = worker_seed(0b100011, MTU[1500] << 4, size, 3, img, host)
    # The rx filter on: our MAC, a listed unicast, broadcast, multicast, and
    # a stranger; then the link down.
    img = Image()
    rx = worker_queue(img, 0, size)
    for i in range(size):
        rx.add(rx.chain([(rxa + 0x200 * i, 0x200, True)]))
    rx.publish()
    host = [
        vnet_hdr() + eth(0x0800, ipv4(17, udp()), dst=d)
        for d in (GUEST_MAC, HOST_MAC, b"\xff" * 6, b"\x01\x00\x5e\x00\x00\x01", b"\x02" * 6)
    ]
    out["rx-filter"] = worker_seed(0b011, 0b111 | MTU[256] << 4, size, 0, img, host)
    out["link-down"] = worker_seed(0b10000011, MTU[256] << 4, size, 0, img, host[:2])
    # Hostile rx ring: a readable buffer, one too small for the header, a
    # loop, then good ones; coalescing on.
    img = Image()
    rx = worker_queue(img, 0, size)
    rx.add(rx.chain([(rxa, 0x100, False)]))
    rx.add(rx.chain([(rxa + 0x100, 4, True)]))
    head = rx.next_desc
    rx.raw(head, rxa + 0x200, 0x100, WRITE | NEXT, head)
    rx.next_desc += 1
    rx.add(head)
    for i in range(3):
        rx.add(rx.chain([(rxa + 0x400 + 0x200 * i, 0x200, True)]))
    rx.publish()
    host = [vnet_hdr() + fr["ipv4-udp"], vnet_hdr() + fr["ipv6-tcp"]]
    out["hostile-rx"] = worker_seed(0b011, MTU[256] << 4, size, 0b111, img, host)
    # Reproducer: chains of 20 descriptors (an indirect table shared by
    # every head) without mergeable buffers. Each frame takes 20 of the
    # worker's 256 iovecs; the 13th chain found 16 left and was refused as
    # "too long", returned to the guest empty.
    img = Image()
    rx = worker_queue(img, 0, 16)
    table = A + 0x300
    for k in range(20):
        more = k + 1 < 20
        img.put(
            table + 16 * k,
            desc(rxa + 80 * k, 80, WRITE | (NEXT if more else 0), k + 1 if more else 0),
        )
    for i in range(16):
        rx.raw(i, table, 16 * 20, INDIRECT)
        rx.add(i)
    rx.publish()
    host = [vnet_hdr() + fr["ipv4-udp"]] * 15
    out["repro-rx-iov-room"] = worker_seed(0b110, MTU[1500] << 4, 16, 0, img, host)
    # Reproducer: mergeable buffers of 150 descriptors (1200 bytes). Two do
    # not fit in the worker's iovecs together, and a 1300-byte frame needs
    # two: the worker waited for room that could never come, with buffers
    # available, so it never slept (100 % of a core) and received nothing.
    img = Image()
    rx = worker_queue(img, 0, 8)
    table = B
    for k in range(150):
        more = k + 1 < 150
        img.put(
            table + 16 * k,
            desc(rxa + 8 * k, 8, WRITE | (NEXT if more else 0), k + 1 if more else 0),
        )
    for i in range(8):
        rx.raw(i, table, 16 * 150, INDIRECT)
        rx.add(i)
    rx.publish()
    host = [vnet_hdr() + eth(0x0800, ipv4(17, udp(payload=bytes(1250))))]
    out["repro-rx-spin"] = worker_seed(0b111, MTU[1500] << 4, 8, 0, img, host)
    return out


# -- fuzz_ctrl -------------------------------------------------------------------------

CTRL_RX, CTRL_MAC, CTRL_ANNOUNCE, CTRL_MQ, CTRL_OFFLOADS, CTRL_COAL, CTRL_STATS = (
    0,
    1,
    3,
    4,
    5,
    6,
    8,
)
ALL_FEATURES = 0xFFFF
DEV_4_PAIRS_ALL_QUEUES = 3 | 0x3C | 0x80


def rss_config(
    pairs: int, types: int = 0x3F, key_len: int = 40, table: Sequence[int] = ()
) -> bytes:
    table = list(table) or [i % pairs for i in range(8)]
    key = bytes((0x6D + 7 * i) & 0xFF for i in range(key_len))
    return (
        struct.pack("<IHH", types, len(table) - 1, 0)
        + b"".join(struct.pack("<H", q) for q in table)
        + struct.pack("<HB", pairs, key_len)
        + key
    )


def hash_config(types: int = 0x3F, key_len: int = 40) -> bytes:
    return struct.pack("<I8xB", types, key_len) + bytes((0x11 * i) & 0xFF for i in range(key_len))


def stats_entry(vq: int, types: int) -> bytes:
    return struct.pack("<H6xQ", vq, types)


def commands() -> dict[str, tuple[int, bytes]]:
    """One valid command of every kind: (reply room, class + command + data)."""
    mac_tables = struct.pack("<I", 2) + HOST_MAC + bytes([2, 0, 0, 0, 0, 2])
    mac_tables += struct.pack("<I", 1) + bytes([0x01, 0x00, 0x5E, 0, 0, 1])
    return {
        "rx-promisc": (0, bytes([CTRL_RX, 0, 1])),
        "rx-allmulti": (0, bytes([CTRL_RX, 1, 0])),
        "mac-table-set": (0, bytes([CTRL_MAC, 0]) + mac_tables),
        "mac-addr-set": (0, bytes([CTRL_MAC, 1]) + bytes([0x52, 0x54, 0, 0, 0, 0x99])),
        "announce-ack": (0, bytes([CTRL_ANNOUNCE, 0])),
        "mq-pairs-set": (0, bytes([CTRL_MQ, 0]) + struct.pack("<H", 2)),
        "mq-rss-config": (0, bytes([CTRL_MQ, 1]) + rss_config(4)),
        "mq-hash-config": (0, bytes([CTRL_MQ, 2]) + hash_config()),
        "guest-offloads": (0, bytes([CTRL_OFFLOADS, 0]) + struct.pack("<Q", 1 << 1)),
        "coal-tx-set": (0, bytes([CTRL_COAL, 0]) + struct.pack("<II", 32, 100)),
        "coal-rx-set": (0, bytes([CTRL_COAL, 1]) + struct.pack("<II", 64, 50)),
        "coal-vq-set": (0, bytes([CTRL_COAL, 2]) + struct.pack("<HHII", 1, 0, 8, 20)),
        "coal-vq-get": (8, bytes([CTRL_COAL, 3]) + struct.pack("<HH", 1, 0)),
        "stats-query": (8, bytes([CTRL_STATS, 0])),
        "stats-get": (
            24 + 56 + 56 + 56,
            bytes([CTRL_STATS, 1])
            + stats_entry(8, 1 << 32)
            + stats_entry(0, 1)
            + stats_entry(1, 1 << 16)
            + stats_entry(2, 1),
        ),
    }


def ctrl_direct(features: int, devb: int, cmds: Iterable[tuple[int, bytes]]) -> bytes:
    out = bytes([0]) + struct.pack("<H", features) + bytes([devb])
    for room, cmd in cmds:
        out += bytes([(room + 3) // 4]) + struct.pack("<H", len(cmd)) + cmd
    return out


def ctrl_chains(features: int, devb: int, size: int, cmds: Sequence[tuple[int, bytes]]) -> bytes:
    img = Image()
    ring = Ring(img, A, A + 16 * size, size)
    at, ack = A + 0x800, B
    for i, (room, cmd) in enumerate(cmds):
        img.put(at, cmd)
        parts: list[Buf] = [(at, 2, False)]
        if len(cmd) > 2:
            parts.append((at + 2, len(cmd) - 2, False))
        parts.append((ack, 1, True))
        if room:
            parts.append((ack + 1, room, True))
        if i % 3 == 2 and features >> 13 & 1:
            ring.add(ring.indirect(A + 0x600 + 0x40 * i, parts))
        else:
            ring.add(ring.chain(parts))
        at += (len(cmd) + 15) & ~15
        ack += (1 + room + 15) & ~15
    ring.publish()
    return bytes([1]) + struct.pack("<H", features) + bytes([devb, log2(size)]) + img.bytes()


def ctrl_seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    cmds = commands()
    for name, cmd in cmds.items():
        out["direct-" + name] = ctrl_direct(ALL_FEATURES, DEV_4_PAIRS_ALL_QUEUES, [cmd])
    out["direct-all"] = ctrl_direct(ALL_FEATURES, DEV_4_PAIRS_ALL_QUEUES, cmds.values())
    # Nothing negotiated, one pair: every command refused.
    out["direct-no-features"] = ctrl_direct(0, 0, cmds.values())
    # MQ without RSS, RSS then fewer pairs, stats of a pair no longer used.
    out["direct-mq-sequence"] = ctrl_direct(
        0b1001001000,
        3 | 0x3C,
        [
            cmds["mq-pairs-set"],
            cmds["stats-get"],
            (0, bytes([CTRL_MQ, 0, 1, 0])),
            cmds["stats-get"],
        ],
    )
    # Hostile: short and long commands, a MAC table whose count overflows,
    # RSS naming queues past the pairs, a stats reply that does not fit.
    out["direct-hostile"] = ctrl_direct(
        ALL_FEATURES,
        DEV_4_PAIRS_ALL_QUEUES,
        [
            (0, b""),
            (0, bytes([CTRL_RX])),
            (0, bytes([CTRL_RX, 0, 1, 0])),
            (0, bytes([CTRL_MAC, 0]) + struct.pack("<I", 0x40000000)),
            (0, bytes([CTRL_MQ, 1]) + rss_config(4, table=[0, 1, 2, 9])),
            (0, bytes([CTRL_MQ, 1]) + rss_config(4, key_len=41)),
            (8, cmds["stats-get"][1]),
            (0, bytes([9, 0])),
        ],
    )
    order = [
        "rx-promisc",
        "mac-table-set",
        "mq-rss-config",
        "stats-get",
        "coal-vq-get",
        "announce-ack",
    ]
    out["chains"] = ctrl_chains(ALL_FEATURES, DEV_4_PAIRS_ALL_QUEUES, 32, [cmds[k] for k in order])
    out["chains-one-pair"] = ctrl_chains(
        0b1000001,
        0x0C,
        16,
        [cmds["rx-allmulti"], cmds["stats-query"], (0, bytes([CTRL_MQ, 0, 1, 0]))],
    )
    return out


# -- fuzz_steering ---------------------------------------------------------------------


def steering_seed(policy: int, active: int, opt: int, cfg: bytes, frame: bytes) -> bytes:
    return bytes([policy, active - 1, opt]) + struct.pack("<H", len(cfg)) + cfg + frame


def steering_seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    fr = frames()
    rss4 = rss_config(4)
    for name, frame in fr.items():
        out["rss-" + name] = steering_seed(2, 4, 0x10, rss4, frame)
    out["follows-tx-ipv4-tcp"] = steering_seed(3, 4, 0x30, b"", fr["ipv4-tcp"])
    out["follows-tx-ipv6-udp"] = steering_seed(3, 8, 0x50, b"", fr["ipv6-udp"])
    out["auto-hash-config"] = steering_seed(0, 2, 0x11, hash_config(0x12), fr["ipv4-tcp"])
    out["rss-ipv4-only-types"] = steering_seed(
        2, 16, 0, rss_config(16, types=0x9, table=list(range(16))), fr["ipv4-udp"]
    )
    out["rss-short-key"] = steering_seed(2, 2, 0, rss_config(2, key_len=3), fr["ipv6-tcp"])
    out["single"] = steering_seed(1, 1, 0, b"", fr["ipv4-udp"])
    return out


# -- fuzz_admin_protocol ---------------------------------------------------------------


def frame(obj: object) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def request(rid: int, cmd: str, args: dict[str, object] | None = None) -> dict[str, object]:
    return {"v": 1, "id": rid, "cmd": cmd, "args": args or {}}


def admin_seeds() -> dict[str, bytes]:
    reqs = {
        "help": request(1, "help", {"command": "add"}),
        "version": request(2, "version"),
        "list": request(3, "list"),
        "show": request(4, "show", {"device": "vm1"}),
        "queues": request(5, "queues", {"device": "vm1"}),
        "stats": request(6, "stats", {"device": "vm1"}),
        "link": request(7, "link", {"device": "vm1", "state": "down"}),
        "steering": request(8, "steering", {"device": "vm1", "policy": "rx-follows-tx"}),
        "log-level": request(9, "log-level", {"level": "debug"}),
        "add": request(
            10,
            "add",
            {
                "socket": "/run/vfiouser-net/vm2.sock",
                "tap": "tap-vm2",
                "name": "vm2",
                "mac": "52:54:00:00:00:02",
                "mtu": 9000,
                "queue_pairs": 4,
                "queue_size": 1024,
                "steering": "rss",
                "notify_mode": "poll",
                "busy_poll_us": 0,
                "speed": 25000,
            },
        ),
        "remove": request(11, "remove", {"device": "vm2"}),
        "capture-count": request(12, "capture", {"device": "vm1", "count": 10, "file": "a.pcap"}),
        "capture-seconds": request(
            13, "capture", {"device": "vm1", "seconds": 1.5, "queue": 0, "file": "b.pcap"}
        ),
    }
    out = {name: b"\xff" + frame(r) for name, r in reqs.items()}
    out["all-split"] = b"\x02" + b"".join(frame(r) for r in reqs.values())
    out["bad-requests"] = b"\x40" + b"".join(
        frame(o)
        for o in (
            [1, 2],
            {"v": 2, "id": 1, "cmd": "list"},
            {"v": 1, "id": "x", "cmd": "list"},
            {"v": 1, "id": 1, "cmd": "nope"},
            {"v": 1, "id": 1, "cmd": "add", "args": {"socket": "/s", "tap": "t", "mtu": 1}},
            {"v": 1, "id": 1, "cmd": "capture", "args": {"device": "d", "file": "/f"}},
            {"v": 1, "id": 1, "cmd": "list", "extra": True},
            {"v": 1, "id": 1, "ok": False, "error": {"code": "failed", "message": "no"}},
        )
    )
    out["garbage-body"] = b"\xff" + struct.pack(">I", 3) + b"\xc1\xc1\xc1"
    out["too-large"] = b"\xff" + struct.pack(">I", (1 << 20) + 1)
    out["truncated"] = b"\xff" + struct.pack(">I", 100) + b"\x80"
    return out


# -- fuzz_config -----------------------------------------------------------------------


def config_seeds() -> dict[str, bytes]:
    full = """\
[daemon]
admin_socket = "/run/vfiouser-net/admin.sock"
admin_group = "kvm"
metrics_addr = "127.0.0.1:9742"
log_level = "info"

[[device]]
name = "vm1"
socket = "/run/vfiouser-net/vm1.sock"
tap = "tap-vm1"
mac = "52:54:00:00:00:01"
mtu = 1500
queue_pairs = 4
queue_size = 256
steering = "auto"
notify_mode = "message"
busy_poll_us = 50
speed = 10000

[[device]]
socket = "/run/vfiouser-net/vm2.sock"
tap = "tap-vm2"
notify_mode = "poll"
"""
    out = {
        "full": b"\x00" + full.encode(),
        "minimal": b"\x00" + b'[[device]]\nsocket = "/s"\ntap = "t"\n',
        "empty": b"\x00",
        "bad-mtu": b"\x00" + b'[[device]]\nsocket = "/s"\ntap = "t"\nmtu = 10\n',
        "duplicate": b"\x00"
        + b'[[device]]\nsocket = "/a/s"\ntap = "t"\n[[device]]\nsocket = "/b/s"\ntap = "u"\n',
        "not-toml": b"\x00" + b"[daemon\n",
        "mac": b"\x01" + b"52:54:00:ab:cd:ef",
        "mac-upper": b"\x01" + b"02:AA:BB:CC:DD:EE",
    }
    return out


# -- fuzz_bar0 -------------------------------------------------------------------------

COMMON, ISR, DEVCFG = 0, 1, 2


def bar_read(region: int, off: int, size: int) -> bytes:
    return bytes([((size - 1) << 3) | 0]) + struct.pack("<H", region << 14 | off)


def bar_write(region: int, off: int, value: bytes) -> bytes:
    return bytes([((len(value) - 1) << 3) | 4]) + struct.pack("<H", region << 14 | off) + value


def bar0_seeds() -> dict[str, bytes]:
    def w8(off: int, v: int) -> bytes:
        return bar_write(COMMON, off, struct.pack("<B", v))

    def w16(off: int, v: int) -> bytes:
        return bar_write(COMMON, off, struct.pack("<H", v))

    def w32(off: int, v: int) -> bytes:
        return bar_write(COMMON, off, struct.pack("<I", v))

    def w64(off: int, v: int) -> bytes:
        return bar_write(COMMON, off, struct.pack("<Q", v))

    status = 0x14
    init = w8(status, 0) + w8(status, 1) + w8(status, 3)
    for sel in (0, 1):
        init += w32(0x00, sel) + bar_read(COMMON, 0x04, 4)
    features = 1 << VERSION_1 | 1 << F_MRG_RXBUF | 1 << F_EVENT_IDX | 1 << 17 | 1 << 22
    init += w32(0x08, 0) + w32(0x0C, features & 0xFFFFFFFF)
    init += w32(0x08, 1) + w32(0x0C, features >> 32)
    init += w8(status, 0xB) + bar_read(COMMON, status, 1)
    init += w16(0x10, 5) + bar_read(COMMON, 0x12, 2)
    for q in range(5):
        init += w16(0x16, q) + bar_read(COMMON, 0x18, 2) + w16(0x18, 128) + w16(0x1A, q + 1)
        init += w64(0x20, 0x100000 + 0x4000 * q) + w64(0x28, 0x101000 + 0x4000 * q)
        init += w64(0x30, 0x102000 + 0x4000 * q) + w16(0x1C, 1)
    init += w8(status, 0xF) + bar_read(COMMON, status, 1)
    devcfg = bar_read(DEVCFG, 0, 4) + bar_read(DEVCFG, 4, 2) + bar_read(DEVCFG, 6, 2)
    devcfg += bar_read(DEVCFG, 8, 2) + bar_read(DEVCFG, 10, 2) + bar_read(DEVCFG, 12, 4)
    devcfg += bar_read(DEVCFG, 16, 4) + bar_read(DEVCFG, 20, 4)
    out = {
        "driver-init": init + devcfg + bar_read(ISR, 0, 1),
        # After DRIVER_OK: a queue change (ignored), a config change, the
        # datapath breaking (DEVICE_NEEDS_RESET), reset by the driver.
        "after-driver-ok": init
        + w16(0x16, 0)
        + w16(0x18, 64)
        + bytes([6 | 8])
        + bytes([7 | 8])
        + bar_read(COMMON, status, 1)
        + bar_read(ISR, 0, 1)
        + w8(status, 0)
        + bar_read(COMMON, 0x18, 2),
        # Features not offered, DRIVER_OK without FEATURES_OK, split 64-bit
        # writes, wide accesses across fields, an FLR.
        "hostile": w8(status, 3)
        + w32(0x08, 1)
        + w32(0x0C, 0xFFFFFFFF)
        + w8(status, 0xB)
        + w8(status, 0x7)
        + w32(0x08, 7)
        + bar_read(COMMON, 0x0C, 4)
        + w32(0x20, 0x1000)
        + w32(0x24, 0x1)
        + bar_write(COMMON, 0x10, bytes(8))
        + bar_write(COMMON, 0x14, bytes([0, 0, 4, 0, 0, 1, 0, 0]))
        + bytes([7 | 16])
        + bar_read(3, 0x0FFC, 8),
    }
    return out


# -- fuzz_vfio_user --------------------------------------------------------------------

# vfio-user commands (vfio-user.h) and the fuzzer's op bytes (fuzz_vfio_user.c).
VU_VERSION, VU_DMA_MAP, VU_DMA_UNMAP, VU_GET_INFO, VU_REGION_INFO = 1, 2, 3, 4, 5
VU_REGION_IO_FDS, VU_IRQ_INFO, VU_SET_IRQS, VU_REGION_READ, VU_REGION_WRITE = 6, 7, 8, 9, 10
VU_DMA_READ, VU_DMA_WRITE, VU_RESET, VU_DIRTY_PAGES = 11, 12, 13, 14
VU_RECONNECT, VU_SHRINK = 0xF0, 0xF1
MOD_NO_REPLY, MOD_NOT_CMD, MOD_SIZE, MOD_CUT = 1, 2, 4, 8
# Fd kinds (attach_fds): a new memfd (then its size byte), eventfd, /dev/null,
# the first memfd again, a pipe.
FD_MEMFD, FD_EVENTFD, FD_DEVNULL, FD_MEMFD0, FD_PIPE = 1, 4, 5, 6, 7
# Region choices (build_region_access): BAR0, BAR4, config space, BAR1,
# migration, ROM, VGA, past the last.
R_BAR0, R_BAR4, R_CFG, R_BAR1, R_MIGR = 0, 1, 2, 3, 4
DMA_R, DMA_W = 1, 2


def vu_memfd(pages: int, tail: int = 0, sealed: bool = False) -> bytes:
    b = (pages & 0x1F) | (0x20 if tail else 0) | (0x40 if sealed else 0)
    return bytes([FD_MEMFD, b]) + (struct.pack("<H", tail) if tail else b"")


def vu_addr(pages: int, tail: int = 0) -> bytes:
    """addr_field: pages (< 64) and an unaligned tail."""
    if pages >= 0x40:
        return bytes([0x80]) + struct.pack("<II", pages >> 20, (pages << 12) & 0xFFFFFFFF)
    return bytes([pages | (0x40 if tail else 0)]) + (struct.pack("<H", tail) if tail else b"")


def vu_version(json_variant: int = 2, minor: int = 0, mods: int = 0) -> bytes:
    return bytes([json_variant]) + struct.pack("<H", minor) + bytes([mods])


def vu_dma_map(
    flags: int, addr: int, size: int, offset: int, fds: bytes, off_tail: int = 0, nfds: int = 1
) -> bytes:
    return (
        bytes([VU_DMA_MAP, flags & 3])
        + vu_addr(addr)
        + vu_addr(size)
        + vu_addr(offset, off_tail)
        + bytes([0, nfds - 1])
        + fds
    )


def vu_dma_unmap(addr: int, size: int, flags: int = 0) -> bytes:
    if flags == 2:  # unmap all: no address or size
        return bytes([VU_DMA_UNMAP, 2 | 4, 0])
    return bytes([VU_DMA_UNMAP, flags]) + vu_addr(addr) + vu_addr(size) + b"\0"


def vu_words(cmd: int, *words: int) -> bytes:
    return bytes([cmd, 0]) + bytes(words)


def vu_region_info(region: int) -> bytes:
    return vu_words(VU_REGION_INFO, 0, 0, 0, 0, 0, 0, 0) + bytes([region])


def vu_set_irqs(
    action: int, data: int, start: int, count: int, bools: bytes = b"", fds: bytes = b""
) -> bytes:
    """action 0 trigger, 1 mask, 2 unmask; data 0 none, 1 bool, 2 eventfd."""
    return bytes([VU_SET_IRQS, data | action << 2, start, count]) + bools + b"\0" + fds


def vu_access(
    write: bool, region: int, off_kind: int, off: int, count_i: int, data: bytes = b""
) -> bytes:
    """count_i: 0..7 for 1, 2, 4, 8, 3, 16, 256, 0 bytes."""
    cmd = VU_REGION_WRITE if write else VU_REGION_READ
    return bytes([cmd, region | off_kind << 3]) + struct.pack("<H", off) + bytes([count_i]) + data


def vu_dirty(flag_i: int, with_range: bool = False) -> bytes:
    out = bytes([VU_DIRTY_PAGES, flag_i | (4 if with_range else 0)])
    if with_range:
        out += vu_addr(16) + vu_addr(4) + bytes([12]) + struct.pack("<H", 1)
    return out + b"\0"


def vu_seed(setup: int, version: bytes, *ops: bytes) -> bytes:
    return bytes([setup]) + version + b"".join(ops)


def vfio_user_seeds() -> dict[str, bytes]:
    v = vu_version()
    four = 3  # four queue pairs
    # Guest RAM as QEMU maps it: two memfd-backed regions, one read-only.
    ram = [
        vu_dma_map(DMA_R | DMA_W, 16, 8, 0, vu_memfd(8)),
        vu_dma_map(DMA_R, 32, 4, 2, vu_memfd(8)),
    ]
    info = [
        vu_words(VU_GET_INFO, 0, 0, 0),
        *(vu_region_info(r) for r in range(10)),
        vu_words(VU_REGION_IO_FDS, 0, 0, 0),
        *(vu_words(VU_IRQ_INFO, 0, i, 0) for i in range(5)),
    ]
    irqs = [
        vu_set_irqs(0, 2, 0, 4, fds=bytes([FD_EVENTFD] * 4)),
        vu_set_irqs(0, 1, 0, 2, bools=bytes([1, 0])),
        vu_set_irqs(1, 0, 0, 1),
        vu_set_irqs(2, 0, 0, 1),
        vu_set_irqs(0, 2, 0, 0),  # disable all
    ]
    access = [
        vu_access(False, R_CFG, 2, 0, 3),
        vu_access(False, R_CFG, 2, 0x34, 0),
        vu_access(False, R_CFG, 2, 0, 6),
        vu_access(True, R_CFG, 2, 4, 1, bytes([6, 0])),
        vu_access(False, R_BAR0, 0, 0x14 << 2, 0),  # device status
        vu_access(True, R_BAR0, 0, 0x14 << 2, 0, bytes([1])),
        vu_access(False, R_BAR0, 0, 2, 3),  # device config
        vu_access(True, R_BAR0, 1, 1, 1, bytes([1, 0])),  # doorbell of queue 1
        vu_access(False, R_BAR4, 2, 0, 5),
        vu_access(True, R_BAR4, 2, 0x800, 2, bytes(4)),
    ]
    out = {
        "negotiate": vu_seed(four, v),
        "full-session": vu_seed(
            four,
            v,
            *ram,
            *info,
            *irqs,
            *access,
            bytes([VU_RESET]),
            vu_dma_unmap(32, 4),
            vu_dma_unmap(0, 0, 2),
            bytes([VU_RECONNECT]),
            ram[0],
        ),
        "polling-mode": vu_seed(
            4 | four, v, vu_region_info(0), vu_words(VU_REGION_IO_FDS, 0, 0, 0)
        ),
        "dma-map": vu_seed(0, v, ram[0]),
        "dma-unmap": vu_seed(0, v, ram[0], vu_dma_unmap(16, 8)),
        "dma-unmap-all": vu_seed(0, v, *ram, vu_dma_unmap(0, 0, 2)),
        "dma-unmap-bitmap": vu_seed(
            0,
            v,
            ram[0],
            bytes([VU_DMA_UNMAP, 1 | 8])
            + vu_addr(16)
            + vu_addr(8)
            + bytes([12])
            + struct.pack("<H", 1)
            + b"\0",
        ),
        "device-get-info": vu_seed(0, v, info[0]),
        "region-info": vu_seed(0, v, *(vu_region_info(r) for r in range(10))),
        "region-io-fds": vu_seed(0, v, info[11]),
        "irq-info": vu_seed(0, v, *info[12:]),
        "set-irqs": vu_seed(1, v, *irqs),
        "region-read": vu_seed(0, v, access[0], access[4]),
        "region-write": vu_seed(0, v, access[3], access[5], access[7]),
        "dma-read-write": vu_seed(
            0,
            v,
            bytes([VU_DMA_READ]) + vu_addr(16) + struct.pack("<H", 64),
            bytes([VU_DMA_WRITE]) + vu_addr(16) + struct.pack("<H", 8),
            # the same as replies nobody asked for
            bytes([VU_DMA_READ | MOD_NOT_CMD << 4]) + vu_addr(16) + struct.pack("<H", 64) + b"\x01",
            bytes([VU_DMA_WRITE | MOD_NOT_CMD << 4]) + vu_addr(16) + struct.pack("<H", 8) + b"\x01",
        ),
        "device-reset": vu_seed(0, v, ram[0], bytes([VU_RESET])),
        "dirty-pages": vu_seed(
            0, vu_version(6), *(vu_dirty(i) for i in range(3)), vu_dirty(2, True)
        ),
        "migration-region": vu_seed(0, v, vu_region_info(9), vu_access(False, R_MIGR, 2, 0, 3)),
        "version-bad-major": vu_seed(0, bytes([0x22]) + struct.pack("<HH", 1, 0) + b"\0", info[0]),
        "version-with-fd": vu_seed(0, vu_version(0x42) + bytes([FD_EVENTFD]), info[0]),
        # Hostile: what the known libvfio-user bugs needed (fixed by
        # scripts/setup/libvfio-user-patches 0001-0005).
        "dma-map-repeated": vu_seed(
            0,
            v,
            ram[0],
            vu_dma_map(DMA_R | DMA_W, 16, 8, 0, bytes([FD_MEMFD0])),
            vu_dma_map(DMA_R | DMA_W, 16, 8, 0, bytes([FD_MEMFD0])),
        ),
        "dma-map-flags-0": vu_seed(0, v, vu_dma_map(0, 16, 8, 0, vu_memfd(8))),
        "dma-map-unaligned-offset": vu_seed(
            0, v, vu_dma_map(DMA_R | DMA_W, 16, 2, 1, vu_memfd(8), off_tail=0x800)
        ),
        "dma-map-past-file": vu_seed(0, v, vu_dma_map(DMA_R | DMA_W, 16, 8, 0, vu_memfd(2))),
        "dma-map-not-a-file": vu_seed(
            0,
            v,
            vu_dma_map(DMA_R, 16, 1, 0, bytes([FD_DEVNULL])),
            vu_dma_map(DMA_R, 17, 1, 0, bytes([FD_EVENTFD])),
            vu_dma_map(DMA_R, 18, 1, 0, bytes([FD_PIPE])),
            vu_dma_map(DMA_R, 19, 1, 0, vu_memfd(1) + vu_memfd(1), nfds=2),
        ),
        # A range without a file past the top of the address space
        # (patch 0010), and one at address 0.
        "dma-map-wrapping-no-fd": vu_seed(
            0,
            v,
            vu_dma_map(DMA_R | DMA_W, 0xFFFFFFFFFFFFF, 2, 0, b"\0"),
            vu_dma_map(DMA_R | DMA_W, 0, 1, 0, b"\0"),
        ),
        # Bodies shorter than their struct (patch 0011): raw ops with the
        # command, the body's length and bytes, no fds.
        "short-bodies": vu_seed(
            0,
            v,
            bytes([0, VU_DMA_MAP, 0, 1, 0x20, 0]),
            bytes([0, VU_DMA_UNMAP, 0, 4]) + struct.pack("<I", 24) + b"\0",
            bytes([0, VU_DMA_UNMAP, 0, 24]) + struct.pack("<IIQQ", 64, 1, 0x10000, 0x1000) + b"\0",
            bytes([0, VU_DIRTY_PAGES, 0, 8]) + struct.pack("<II", 64, 4) + b"\0",
        ),
        # Config space writes shorter than the register (patch 0012): a
        # byte of the command register, two bytes of BAR0.
        "config-short-writes": vu_seed(
            0,
            v,
            vu_access(True, R_CFG, 2, 4, 0, bytes([6])),
            vu_access(True, R_CFG, 2, 0x10, 1, bytes([0xFF, 0xFF])),
            vu_access(True, R_CFG, 2, 0x30, 0, bytes([1])),
        ),
        "dma-map-shrunk-after": vu_seed(0, v, ram[0], bytes([VU_SHRINK, 0, 2]), access[0]),
        "set-irqs-overflow": vu_seed(
            0,
            v,
            bytes([VU_SET_IRQS, 2, 4, 0xFF])
            + struct.pack("<I", 0xFFFFFFFE)
            + bytes([0, FD_EVENTFD, 0]),
            bytes([VU_SET_IRQS, 0, 0xFF, 0xFF]) + struct.pack("<II", 0xFFFFFFFF, 2) + b"\0",
        ),
        "lies": vu_seed(
            0,
            v,
            bytes([VU_GET_INFO | MOD_SIZE << 4, 0, 0, 0, 0, 0xF8]),
            bytes([VU_GET_INFO | MOD_SIZE << 4, 0, 0, 0, 0, 0x08]),
            bytes([VU_GET_INFO | MOD_NO_REPLY << 4, 0, 0, 0, 0]),
            bytes([VU_REGION_WRITE | MOD_CUT << 4, R_CFG | 2 << 3, 4, 0, 1, 6, 0])
            + struct.pack("<H", 5),
        ),
        "version-lies": vu_seed(0, vu_version(2, mods=MOD_SIZE) + b"\x10", info[0]),
    }
    for variant in (0, 1, 3, 4, 5, 8, 10, 13, 14, 15):
        out[f"version-json-{variant}"] = vu_seed(0, vu_version(variant), info[0], ram[0])
    return out


# -- output ----------------------------------------------------------------------------

TARGETS: dict[str, Callable[[], dict[str, bytes]]] = {
    "fuzz_virtq": virtq_seeds,
    "fuzz_worker": worker_seeds,
    "fuzz_ctrl": ctrl_seeds,
    "fuzz_steering": steering_seeds,
    "fuzz_vfio_user": vfio_user_seeds,
    "fuzz_admin_protocol": admin_seeds,
    "fuzz_config": config_seeds,
    "fuzz_bar0": bar0_seeds,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed seeds")
    args = ap.parse_args(argv)
    differ = []
    for target, make in TARGETS.items():
        d = CORPUS / target
        want = {f"seed-{name}": data for name, data in make().items()}
        have = {p.name: p.read_bytes() for p in d.glob("seed-*")} if d.is_dir() else {}
        if args.check:
            if want != have:
                differ.append(target)
            continue
        d.mkdir(parents=True, exist_ok=True)
        for name in set(have) - set(want):
            (d / name).unlink()
        for name, data in want.items():
            if have.get(name) != data:
                (d / name).write_bytes(data)
        digest = hashlib.sha256(b"".join(want[k] for k in sorted(want))).hexdigest()[:12]
        size = sum(len(v) for v in want.values())
        print(f"{target:22} {len(want):3} seeds {size:7} bytes  sha256 {digest}")
    if differ:
        print("seed corpus out of date (run tests/fuzz/make_corpus.py):", ", ".join(differ))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
