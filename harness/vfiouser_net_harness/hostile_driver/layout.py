"""Layout and parameters of the attacked device, and the frames the tool sends."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from vfiouser_net_harness.toeplitz import toeplitz
from vfiouser_net_harness.virtio_pci_driver import (
    DEFAULT_NET_FEATURES,
    VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_RSS,
    bit,
)

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


def ipv4_udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
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
