"""Multiqueue vfiouser-net at the protocol level: the tests' own vfio-user
client and virtio driver play the guest of a 4-pair device whose TAP lives in
a fresh network namespace.

* negotiation and layout: MQ/RSS/HASH_REPORT offered only with several pairs,
  the RSS limits in device config, queue numbering (control queue last, or at
  index 2 without MQ), MSI-X vectors, and the steering state in BAR0;
* hostile control input: malformed VQ_PAIRS_SET / RSS_CONFIG / HASH_CONFIG are
  refused and change nothing, valid ones split across descriptors anywhere
  are accepted, MQ commands without their feature are refused;
* steering at the ring level: which receive queue each flow lands on (active
  pairs only, RSS against an independent Toeplitz, hash reports, `single`,
  rx-follows-tx);
* no reordering on a switch: a numbered UDP stream from the namespace while
  the test switches steering repeatedly; per flow, the sequence numbers come
  out of the rings in order.

Frames towards the device are injected into the TAP through an AF_PACKET
socket opened in the namespace (support.TapPort), or sent by a UDP sender
running in the namespace. Steering state is observed through the vendor
capability and the daemon's SIGUSR2 counters.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from vfiouser_net_harness import vfio_user_client as vu
from vfiouser_net_harness.guest_memory import GuestMemory
from vfiouser_net_harness.toeplitz import toeplitz
from vfiouser_net_harness.virtio_pci_driver import (
    STATUS_DEVICE_NEEDS_RESET,
    STEER_STATE_LEN,
    STEER_STATE_OFF,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_HASH_CONFIG,
    VIRTIO_NET_CTRL_MQ_RSS_CONFIG,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_HASH_REPORT,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_RSS,
    VIRTIO_NET_OK,
    SteerState,
    VirtioNetDriver,
    VirtioPciTransport,
    bit,
    read_steer_state,
)

from tests.protocol.support import (
    BROADCAST,
    ETH_P_TEST,
    GUEST_FEATURES,
    GUEST_MAC,
    PEER_MAC,
    DeviceEnv,
    GuestSession,
    eth_frame,
    has_tag,
    tagged_frame,
)

log = logging.getLogger(__name__)

PAIRS = 4
MQ_ARGS = ("--queue-pairs", str(PAIRS))
CTRL_INDEX = 2 * PAIRS

F_MQ = bit(VIRTIO_NET_F_MQ)
F_RSS = bit(VIRTIO_NET_F_RSS)
F_HASH = bit(VIRTIO_NET_F_HASH_REPORT)
MQ_FEATURES = GUEST_FEATURES | F_MQ | F_RSS | F_HASH
NO_MQ_FEATURES = GUEST_FEATURES & ~(F_MQ | F_RSS | F_HASH)

GUEST_MEM_SIZE = 16 << 20
NET_HDR_LEN = 12
NET_HDR_HASH_LEN = 20

# virtio_net_config offsets (virtio 1.x 5.1.4).
CFG_MAX_PAIRS = 8
CFG_RSS_MAX_KEY = 17
CFG_RSS_MAX_TABLE = 18
CFG_HASH_TYPES = 20

# VIRTIO_NET_RSS_HASH_TYPE_* and VIRTIO_NET_HASH_REPORT_*.
HT_IPV4, HT_TCPV4, HT_UDPV4, HT_IPV6, HT_TCPV6, HT_UDPV6 = (1 << i for i in range(6))
HT_ALL = 0x3F
REPORT_NONE, REPORT_IPV4, REPORT_TCPV4, REPORT_UDPV4 = 0, 1, 2, 3
REPORT_IPV6, REPORT_TCPV6, REPORT_UDPV6 = 4, 5, 6

# Steering policy numbers, as the BAR0 steering state shows them (README "Multiqueue and steering").
POLICIES = ("auto", "single", "rss", "rx-follows-tx")
P_AUTO, P_SINGLE, P_RSS, P_RXFT = range(4)

IPPROTO_TCP = 6
IPPROTO_UDP = 17
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD

# The Microsoft RSS verification key.
MS_KEY = bytes.fromhex(
    "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa"
)


_COUNTERS_RE = re.compile(r": counters (\{.*)$")


def counters(env: DeviceEnv, timeout: float = 5.0) -> dict[str, Any]:
    """The daemon's counters (SIGUSR2 makes it log them as JSON); unlike
    DeviceEnv.counters, waits for the line to be complete in the log."""
    before = sum(1 for ln in env.log().splitlines() if _COUNTERS_RE.search(ln))
    assert env.server.proc is not None
    os.kill(env.server.proc.pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while True:
        lines = [m.group(1) for ln in env.log().splitlines() if (m := _COUNTERS_RE.search(ln))]
        if len(lines) > before:
            try:
                parsed: dict[str, Any] = json.loads(lines[before])
                return parsed
            except json.JSONDecodeError:
                pass  # still being written
        if time.monotonic() > deadline:
            raise AssertionError(f"no counters logged on SIGUSR2:\n{env.log()[-2000:]}")
        time.sleep(0.01)


# --------------------------------------------------------------------------
# Toeplitz, independently of the device
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Flow:
    """An IPv4/IPv6 flow from the namespace side to the guest (or non-IP)."""

    kind: str  # "udp4", "tcp4", "ip4", "udp6", "tcp6", "ip6", "raw"
    src: bytes = b""
    dst: bytes = b""
    sport: int = 0
    dport: int = 0

    @property
    def v6(self) -> bool:
        return self.kind.endswith("6")

    def frame(self, payload: bytes, dst_mac: bytes = GUEST_MAC, src_mac: bytes = PEER_MAC) -> bytes:
        if self.kind == "raw":
            return eth_frame(dst_mac, src_mac, ETH_P_TEST, payload)
        proto = {"udp": IPPROTO_UDP, "tcp": IPPROTO_TCP, "ip": 253}[self.kind[:-1]]
        if proto == IPPROTO_UDP:
            l4 = struct.pack("!HHHH", self.sport, self.dport, 8 + len(payload), 0) + payload
        elif proto == IPPROTO_TCP:
            l4 = (
                struct.pack("!HHIIBBHHH", self.sport, self.dport, 1, 0, 5 << 4, 0x18, 8192, 0, 0)
                + payload
            )
        else:
            l4 = payload
        if self.v6:
            ip = struct.pack("!IHBB", 6 << 28, len(l4), proto, 64) + self.src + self.dst
            return eth_frame(dst_mac, src_mac, ETH_P_IPV6, ip + l4)
        return eth_frame(
            dst_mac, src_mac, ETH_P_IP, ipv4_header(self.src, self.dst, proto, l4) + l4
        )

    def reverse(self) -> Flow:
        return Flow(self.kind, self.dst, self.src, self.dport, self.sport)

    def expected_hash(self, types: int, key: bytes) -> tuple[int, int]:
        """(hash, report) as virtio 5.1.6.4.3 defines them for this flow."""
        if self.kind == "raw":
            return 0, REPORT_NONE
        ports = struct.pack("!HH", self.sport, self.dport)
        addrs = self.src + self.dst
        proto = self.kind[:-1]
        if self.v6:
            tcp, udp, ip = (
                (HT_TCPV6, REPORT_TCPV6),
                (HT_UDPV6, REPORT_UDPV6),
                (HT_IPV6, REPORT_IPV6),
            )
        else:
            tcp, udp, ip = (
                (HT_TCPV4, REPORT_TCPV4),
                (HT_UDPV4, REPORT_UDPV4),
                (HT_IPV4, REPORT_IPV4),
            )
        if proto == "tcp" and types & tcp[0]:
            return toeplitz(key, addrs + ports), tcp[1]
        if proto == "udp" and types & udp[0]:
            return toeplitz(key, addrs + ports), udp[1]
        if types & ip[0]:
            return toeplitz(key, addrs), ip[1]
        return 0, REPORT_NONE


def ipv4_header(src: bytes, dst: bytes, proto: int, l4: bytes) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, proto, 0, src, dst)
    s = sum(struct.unpack("!10H", hdr))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return hdr[:10] + struct.pack("!H", ~s & 0xFFFF) + hdr[12:]


def v4(a: int, b: int) -> bytes:
    return bytes([198, 51, a, b])


def v6(a: int) -> bytes:
    return bytes.fromhex("20010db8000000000000000000000000")[:15] + bytes([a])


def make_flows(rng: random.Random) -> list[Flow]:
    flows: list[Flow] = []
    for i in range(8):
        flows.append(Flow("udp4", v4(1, i + 1), v4(2, 1), rng.randrange(1024, 65535), 4000 + i))
        flows.append(Flow("tcp4", v4(3, i + 1), v4(2, 1), rng.randrange(1024, 65535), 80))
    for i in range(4):
        flows.append(Flow("ip4", v4(4, i + 1), v4(2, 1)))
        flows.append(Flow("udp6", v6(0x10 + i), v6(1), rng.randrange(1024, 65535), 5000 + i))
        flows.append(Flow("tcp6", v6(0x20 + i), v6(1), rng.randrange(1024, 65535), 443))
    flows.append(Flow("ip6", v6(0x30), v6(1)))
    flows.append(Flow("raw"))
    return flows


@dataclass(frozen=True)
class RssConfig:
    table: tuple[int, ...]
    key: bytes = MS_KEY
    types: int = HT_ALL
    unclassified: int = 0
    max_tx: int = PAIRS
    mask: int | None = None

    def pack(self) -> bytes:
        """struct virtio_net_rss_config."""
        m = len(self.table) - 1 if self.mask is None else self.mask
        return (
            struct.pack("<IHH", self.types, m, self.unclassified)
            + b"".join(struct.pack("<H", q) for q in self.table)
            + struct.pack("<HB", self.max_tx, len(self.key))
            + self.key
        )

    def queue_of(self, flow: Flow, active: int) -> int:
        h, report = flow.expected_hash(self.types, self.key)
        q = self.unclassified if report == REPORT_NONE else self.table[h & (len(self.table) - 1)]
        return q if q < active else q % active

    def snapshot(self) -> dict[str, Any]:
        """What the daemon's counters should say about it."""
        return {
            "configured": True,
            "hash_types": self.types,
            "table": list(self.table),
            "unclassified_queue": self.unclassified,
            "key": self.key.hex(),
        }


def hash_config(types: int, key: bytes, reserved: bytes = bytes(8)) -> bytes:
    """struct virtio_net_hash_config."""
    return struct.pack("<I", types) + reserved + bytes([len(key)]) + key


def random_table(rng: random.Random, n: int, queues: int = PAIRS) -> tuple[int, ...]:
    while True:
        t = tuple(rng.randrange(queues) for _ in range(n))
        if len(set(t)) == min(n, queues):
            return t


# --------------------------------------------------------------------------
# The guest
# --------------------------------------------------------------------------


@dataclass
class Rx:
    queue: int
    used_idx: int
    hdr: bytes
    frame: bytes

    @property
    def hash_value(self) -> int:
        return int(struct.unpack_from("<I", self.hdr, 12)[0])

    @property
    def hash_report(self) -> int:
        return int(struct.unpack_from("<H", self.hdr, 16)[0])


@dataclass
class MqGuest:
    """A driver on a multiqueue device: rx buffers on every pair, drained by
    polling each queue completely in turn (used_event follows, like NAPI)."""

    env: DeviceEnv
    session: GuestSession
    hdr_len: int
    stray: list[Rx] = field(default_factory=list)

    @property
    def drv(self) -> VirtioNetDriver:
        return self.session.driver

    @property
    def pairs(self) -> int:
        return len(self.drv.pairs)

    # -- control ------------------------------------------------------------

    def ctrl(self, cmd: int, data: bytes | Sequence[bytes]) -> int:
        return self.drv.ctrl_command(VIRTIO_NET_CTRL_MQ, cmd, data)

    def pairs_set(self, n: int) -> None:
        assert self.ctrl(VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", n)) == VIRTIO_NET_OK

    def rss(self, cfg: RssConfig) -> None:
        assert self.ctrl(VIRTIO_NET_CTRL_MQ_RSS_CONFIG, cfg.pack()) == VIRTIO_NET_OK

    def state_raw(self) -> bytes:
        return read_steer_state(self.session.client)

    def steer_state(self) -> SteerState:
        return SteerState.parse(self.state_raw())

    def state(self) -> tuple[dict[str, Any], bytes]:
        """Everything that must not change on a refused command."""
        return counters(self.env)["steering"], self.state_raw()

    # -- rx -------------------------------------------------------------------

    def drain(self) -> list[Rx]:
        """Consume every used rx buffer, queue by queue, and refill."""
        out: list[Rx] = []
        for p in range(self.pairs):
            q = self.drv.pairs[p].rx
            while q.has_used():
                idx = q.last_used_idx
                hdr, rest = self.drv.recv_packet(timeout=1, pair=p)
                raw = hdr + rest
                out.append(Rx(p, idx, raw[: self.hdr_len], raw[self.hdr_len :]))
            self.drv.post_rx_buffers(q.size, p)
        return out

    def collect(self, match: Callable[[bytes], bool], n: int, timeout: float = 3.0) -> list[Rx]:
        """Drain until ``n`` frames ``match``; the others are kept in ``stray``."""
        got: list[Rx] = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            for r in self.drain():
                (got if match(r.frame) else self.stray).append(r)
            if len(got) >= n:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(got)} of {n} frames received: {got}")
            time.sleep(0.002)
        return got

    def quiet(self, match: Callable[[bytes], bool], wait: float = 0.3) -> list[Rx]:
        """Frames matching within ``wait`` (expected: none)."""
        got: list[Rx] = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            for r in self.drain():
                (got if match(r.frame) else self.stray).append(r)
            time.sleep(0.005)
        return got

    # -- tx -------------------------------------------------------------------

    def send(self, frame: bytes, pair: int) -> None:
        self.drv.send_packet(frame, hdr=bytes(self.hdr_len), pair=pair)


class AtomicIndexMemory(GuestMemory):
    """Guest memory whose 16-bit stores are single stores.

    GuestMemory.write_u16 uses struct.pack_into, and CPython's pack zero-fills
    its destination before writing the value (s_pack_internal's memset): a
    device worker reading avail->idx at that instant sees 0, a jump backwards
    that it rightly treats as a corrupt ring (DEVICE_NEEDS_RESET, avail_idx).
    A real guest writes the index with one store, and so does this.
    """

    def write_u16(self, addr: int, value: int) -> None:
        off = self._off(addr, 2)
        with memoryview(self.buf) as mv, mv[off : off + 2].cast("H") as word:
            word[0] = value


class SpecNetDriver(VirtioNetDriver):
    """The harness driver with the queue layout of virtio 5.1.2: N pairs =
    max_virtqueue_pairs when MQ *or RSS* is negotiated (1 otherwise), the
    control queue at 2N. (VirtioNetDriver only looks at MQ.)"""

    @property
    def max_pairs(self) -> int:
        if self.features & (F_MQ | F_RSS):
            return self.read_config().max_virtqueue_pairs
        return 1

    @property
    def ctrl_index(self) -> int:
        return 2 * self.max_pairs


@contextlib.contextmanager
def mq_guest(
    env: DeviceEnv, features: int = MQ_FEATURES, *, pairs: int = PAIRS, set_pairs: bool = True
) -> Iterator[MqGuest]:
    assert sys.byteorder == "little"
    client = env.connect()
    mem = AtomicIndexMemory(GUEST_MEM_SIZE)
    mem.map_into(client)
    drv = SpecNetDriver(client, mem, features=features, auto_refill=False, tx_block_size=2048)
    s = GuestSession(env, client, mem, drv)
    try:
        s.driver.bring_up(pairs=pairs, set_pairs=set_pairs)
        hdr_len = NET_HDR_HASH_LEN if s.driver.has(VIRTIO_NET_F_HASH_REPORT) else NET_HDR_LEN
        yield MqGuest(env, s, hdr_len)
    finally:
        s.close()


def tag_of(frame: bytes) -> bytes | None:
    """The payload tag ``b"tag"`` of our frames (UDP/TCP/IP/raw), or None."""
    i = frame.find(b"VNT:")
    if i < 0:
        return None
    j = frame.find(b":", i + 4)
    return frame[i + 4 : j] if j > 0 else None


def tagged(prefix: bytes) -> Callable[[bytes], bool]:
    def match(frame: bytes) -> bool:
        t = tag_of(frame)
        return t is not None and t.startswith(prefix)

    return match


def flow_payload(tag: str) -> bytes:
    return b"VNT:" + tag.encode() + b":"


def sigusr1_until(g: MqGuest, policy: int, effective: int, tries: int = 4) -> SteerState:
    """SIGUSR1 the daemon until the capability shows ``policy``/``effective``."""
    assert g.env.server.proc is not None
    for _ in range(tries):
        before = g.steer_state()
        if (before.policy, before.effective) == (policy, effective):
            return before
        os.kill(g.env.server.proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 3
        while g.steer_state().switches == before.switches:
            assert time.monotonic() < deadline, "SIGUSR1 did not switch the policy"
            time.sleep(0.01)
    cap = g.steer_state()
    assert (cap.policy, cap.effective) == (policy, effective), cap
    return cap


def assert_tx_all_pairs(g: MqGuest, tag: str, pairs: int | None = None) -> None:
    for pair in range(g.pairs if pairs is None else pairs):
        t = f"{tag}-tx{pair}".encode()
        g.send(tagged_frame(BROADCAST, t, src=GUEST_MAC), pair)
        assert g.env.port.recv(functools.partial(has_tag, tag=t)) is not None, f"tx {pair} lost"


def assert_rss_in_force(g: MqGuest, cfg: RssConfig, flows: Sequence[Flow], tag: str) -> None:
    """Every flow lands where ``cfg`` says (with the right hash report)."""
    active = g.steer_state().active
    for i, f in enumerate(flows):
        g.env.port.send(f.frame(flow_payload(f"{tag}-{i}")))
    got = g.collect(tagged(f"{tag}-".encode()), len(flows))
    for r in got:
        t = tag_of(r.frame)
        assert t is not None
        f = flows[int(t.split(b"-")[-1])]
        assert r.queue == cfg.queue_of(f, active), f"{f} on queue {r.queue}"
        if g.hdr_len == NET_HDR_HASH_LEN:
            assert (r.hash_value, r.hash_report) == f.expected_hash(cfg.types, cfg.key), f


def ring_state(g: MqGuest) -> str:
    """The driver's view of every rx/tx ring (for failure messages)."""
    out = []
    for p, qp in enumerate(g.drv.pairs):
        for name, q in (("rx", qp.rx), ("tx", qp.tx)):
            out.append(
                f"{name}{p}: avail {q.published_idx} used {q.used_idx()} "
                f"last_used {q.last_used_idx} in flight {q.in_flight}"
            )
    return "; ".join(out)


def assert_healthy(g: MqGuest) -> None:
    g.env.assert_alive()
    if g.drv.transport.status & STATUS_DEVICE_NEEDS_RESET:
        lines = [ln for ln in g.env.log().splitlines() if ": counters {" not in ln]
        at = next((i for i, ln in enumerate(lines) if "needs reset" in ln), len(lines))
        context = "\n".join(lines[max(0, at - 25) : at + 3])
        raise AssertionError(
            f"DEVICE_NEEDS_RESET; driver rings: {ring_state(g)}; daemon log:\n{context}"
        )


# --------------------------------------------------------------------------
# 0. The test's own Toeplitz
# --------------------------------------------------------------------------


def test_toeplitz_reference_vectors() -> None:
    """Microsoft's RSS verification suite (IPv4 and IPv6, with and without ports)."""
    cases = [
        ("66.9.149.187", 2794, "161.142.100.80", 1766, 0x51CCC178, 0x323E8FC2),
        ("199.92.111.2", 14230, "65.69.140.83", 4739, 0xC626B0EA, 0xD718262A),
        ("24.19.198.95", 12898, "12.22.207.184", 38024, 0x5C2B394A, 0xD2D0A5DE),
        ("38.27.205.30", 48228, "209.142.163.6", 2217, 0xAFC7327F, 0x82989176),
        ("153.39.163.191", 44251, "202.188.127.2", 1303, 0x10E828A2, 0x5D1809C5),
    ]
    for src, sport, dst, dport, with_ports, addrs_only in cases:
        a = bytes(int(x) for x in src.split(".")) + bytes(int(x) for x in dst.split("."))
        assert toeplitz(MS_KEY, a + struct.pack("!HH", sport, dport)) == with_ports
        assert toeplitz(MS_KEY, a) == addrs_only
    # 3ffe:2501:200:1fff::7 -> 3ffe:2501:200:3::1, ports 2794 -> 1766
    s = bytes.fromhex("3ffe250102001fff0000000000000007")
    d = bytes.fromhex("3ffe2501020000030000000000000001")
    assert toeplitz(MS_KEY, s + d + struct.pack("!HH", 2794, 1766)) == 0x40207D3D
    assert toeplitz(MS_KEY, s + d) == 0x2CC18CD5


# --------------------------------------------------------------------------
# 1. Negotiation and layout
# --------------------------------------------------------------------------


@pytest.mark.parametrize("pairs", [1, PAIRS])
def test_multiqueue_features_and_config(env_factory: Callable[..., DeviceEnv], pairs: int) -> None:
    env = env_factory("--queue-pairs", str(pairs), multi_queue=pairs > 1)
    c = env.connect()
    t = VirtioPciTransport(c)
    try:
        t.reset()
        offered = t.device_features()
        assert offered & bit(VIRTIO_F_VERSION_1)
        mq_bits = {b: bool(offered & bit(b)) for b in (22, 57, 60)}
        if pairs > 1:
            assert mq_bits == {22: True, 57: True, 60: True}, f"offered {offered:#x}"
        else:
            assert mq_bits == {22: False, 57: False, 60: False}, f"offered {offered:#x}"
        assert t.num_queues == 2 * pairs + 1
        assert t.msix is not None and t.msix.table_size == 2 * pairs + 2
        assert c.irq_info(vu.VFIO_PCI_MSIX_IRQ_INDEX).count == 2 * pairs + 2
        if pairs > 1:
            cfg = t.device_config_read(0, 24)
            assert struct.unpack_from("<H", cfg, CFG_MAX_PAIRS)[0] == pairs
            assert cfg[CFG_RSS_MAX_KEY] == 40
            assert struct.unpack_from("<H", cfg, CFG_RSS_MAX_TABLE)[0] == 128
            assert struct.unpack_from("<I", cfg, CFG_HASH_TYPES)[0] == HT_ALL
            # Every queue of the layout exists: rx/tx per pair and control last.
            for idx in range(2 * pairs + 1):
                assert t.queue_max_size(idx) > 0, f"queue {idx} missing"
            assert t.queue_max_size(2 * pairs + 1) == 0
    finally:
        t.close()


def test_queue_layout_with_mq(env_factory: Callable[..., DeviceEnv]) -> None:
    """With MQ: rx k = 2k, tx k = 2k+1, control queue at 2N = 8."""
    env = env_factory(*MQ_ARGS, multi_queue=True)
    with mq_guest(env) as g:
        assert g.drv.ctrl is not None and g.drv.ctrl.index == CTRL_INDEX
        assert g.drv.transport.msix is not None and g.drv.transport.msix.table_size == 10
        assert [(p.rx.index, p.tx.index) for p in g.drv.pairs] == [(0, 1), (2, 3), (4, 5), (6, 7)]
        assert g.drv.ctrl_command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\1") == 0
        assert g.steer_state().active == PAIRS
        assert_tx_all_pairs(g, "layout")
        # The doorbell of queue 8 is the control queue's: a command on it is answered.
        assert g.drv.ctrl.kicks > 0
        assert_healthy(g)


def test_queue_layout_without_mq(env_factory: Callable[..., DeviceEnv]) -> None:
    """A driver that does not negotiate MQ finds the control queue at index 2,
    uses one pair, and every MQ command is refused."""
    env = env_factory(*MQ_ARGS, multi_queue=True)
    with mq_guest(env, NO_MQ_FEATURES, pairs=1) as g:
        assert not g.drv.features & (F_MQ | F_RSS | F_HASH)
        assert g.drv.ctrl is not None and g.drv.ctrl.index == 2
        assert g.drv.ctrl_command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\1") == 0
        before = g.state()
        refused = [
            (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 1)),
            (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, RssConfig((0,), max_tx=1).pack()),
            (VIRTIO_NET_CTRL_MQ_HASH_CONFIG, hash_config(HT_ALL, MS_KEY)),
        ]
        for cmd, data in refused:
            assert g.ctrl(cmd, data) == VIRTIO_NET_ERR, f"MQ command {cmd} without MQ"
        assert g.state() == before
        assert g.steer_state().active == 1
        flows = make_flows(random.Random(1))[:6]
        for i, f in enumerate(flows):
            g.env.port.send(f.frame(flow_payload(f"nomq-{i}")))
        assert {r.queue for r in g.collect(tagged(b"nomq-"), len(flows))} == {0}
        assert_tx_all_pairs(g, "nomq")
        assert_healthy(g)


def test_steering_state_in_bar0(env_factory: Callable[..., DeviceEnv]) -> None:
    """The steering state in BAR0 follows VQ_PAIRS_SET, RSS_CONFIG and
    SIGUSR1, agrees with the daemon's own account, and ignores writes."""
    env = env_factory(*MQ_ARGS, multi_queue=True)
    c = env.connect()
    initial = SteerState.parse(read_steer_state(c))
    assert (initial.version, initial.policy, initial.max_pairs) == (1, P_AUTO, PAIRS)
    # Any width at any offset reads the same bytes.
    raw = read_steer_state(c)
    for width in (1, 2, 8):
        got = b"".join(
            c.region_read(vu.VFU_PCI_DEV_BAR0_REGION_IDX, STEER_STATE_OFF + o, width)
            for o in range(0, STEER_STATE_LEN, width)
        )
        assert got == raw, width
    c.close()  # one client at a time

    with mq_guest(env, set_pairs=False) as g:
        c = g.session.client
        # DRIVER_OK: one pair until the driver asks for more.
        st = g.steer_state()
        assert (st.version, st.policy, st.effective) == (1, P_AUTO, P_RXFT)
        assert (st.active, st.max_pairs) == (1, PAIRS)

        def check(expect_active: int, policy: int, effective: int, switches: int) -> SteerState:
            st = g.steer_state()
            assert (st.active, st.policy, st.effective, st.switches) == (
                expect_active,
                policy,
                effective,
                switches,
            ), st
            snap = counters(env)["steering"]
            assert snap["active_queue_pairs"] == st.active
            assert snap["max_queue_pairs"] == PAIRS
            assert snap["policy"] == POLICIES[st.policy]
            assert snap["effective"] == POLICIES[st.effective]
            assert snap["switches"] == st.switches
            return st

        n = st.switches
        g.pairs_set(4)
        check(4, P_AUTO, P_RXFT, n + 1)
        g.pairs_set(2)
        check(2, P_AUTO, P_RXFT, n + 2)
        # Refused commands change nothing.
        assert g.ctrl(VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 0)) == VIRTIO_NET_ERR
        check(2, P_AUTO, P_RXFT, n + 2)
        g.rss(RssConfig((0, 1, 2, 0), max_tx=3))
        check(3, P_AUTO, P_RSS, n + 3)
        # SIGUSR1 cycles auto -> single -> rss -> rx-follows-tx -> auto.
        k = n + 3
        for policy, effective in (
            (P_SINGLE, P_SINGLE),
            (P_RSS, P_RSS),
            (P_RXFT, P_RXFT),
            (P_AUTO, P_RSS),
        ):
            sigusr1_until(g, policy, effective)
            k += 1
            check(3, policy, effective, k)

        # Writes from the client: ignored, as for any read-only register.
        before = g.state_raw()
        rng = random.Random(0x57EE)
        writes = [(o, bytes([rng.randrange(256)])) for o in range(STEER_STATE_LEN)]
        writes += [(o, bytes([before[o] ^ 0xFF])) for o in range(STEER_STATE_LEN)]
        writes += [(o, rng.randbytes(4)) for o in range(0, STEER_STATE_LEN, 4)]
        writes += [(o, rng.randbytes(8)) for o in range(0, STEER_STATE_LEN, 8)]
        for o, data in writes:
            c.region_write(vu.VFU_PCI_DEV_BAR0_REGION_IDX, STEER_STATE_OFF + o, data)
        assert g.state_raw() == before
        check(3, P_AUTO, P_RSS, k)
        assert_healthy(g)


# --------------------------------------------------------------------------
# 2. Hostile control input
# --------------------------------------------------------------------------

GOOD_RSS = RssConfig((3, 1, 0, 2, 2, 0, 1, 3), key=bytes(range(1, 41)), unclassified=2)
TRAFFIC_FLOWS = make_flows(random.Random(7))

MALFORMED: dict[str, tuple[int, bytes | list[bytes]]] = {
    "pairs_zero": (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 0)),
    "pairs_five": (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", PAIRS + 1)),
    "pairs_max": (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 0x8000)),
    "pairs_1_byte": (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\2"),
    "pairs_3_bytes": (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\2\0\0"),
    "pairs_3_bytes_split": (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, [b"\2", b"\0", b"\0"]),
    "pairs_empty": (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b""),
    "rss_entry_4": (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, RssConfig((0, 1, 2, 4)).pack()),
    "rss_entry_reserved_bit": (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, RssConfig((0, 1, 0x8002, 3)).pack()),
    "rss_unclassified_4": (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, RssConfig((0, 1), unclassified=4).pack()),
    "rss_max_tx_0": (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, RssConfig((0, 1), max_tx=0).pack()),
    "rss_max_tx_5": (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, RssConfig((0, 1), max_tx=5).pack()),
    "rss_key_41": (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, RssConfig((0, 1), key=bytes(41)).pack()),
    "rss_key_255": (
        VIRTIO_NET_CTRL_MQ_RSS_CONFIG,
        RssConfig((0, 1), key=bytes(255)).pack(),
    ),
    "rss_table_100": (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, RssConfig((1,) * 100).pack()),
    "rss_table_256": (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, RssConfig((1,) * 256).pack()),
    "rss_mask_255_short_table": (
        VIRTIO_NET_CTRL_MQ_RSS_CONFIG,
        RssConfig((1,) * 128, mask=255).pack(),
    ),
    "rss_mask_ffff": (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, RssConfig((1, 1), mask=0xFFFF).pack()),
    "rss_hash_type_0x40": (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, RssConfig((0, 1), types=0x7F).pack()),
    "rss_hash_type_high": (
        VIRTIO_NET_CTRL_MQ_RSS_CONFIG,
        RssConfig((0, 1), types=0x80000001).pack(),
    ),
    "hash_key_41": (VIRTIO_NET_CTRL_MQ_HASH_CONFIG, hash_config(HT_ALL, bytes(41))),
    "hash_type_0x40": (VIRTIO_NET_CTRL_MQ_HASH_CONFIG, hash_config(0x40, MS_KEY)),
    "hash_truncated_key": (VIRTIO_NET_CTRL_MQ_HASH_CONFIG, hash_config(HT_ALL, MS_KEY)[:-1]),
    "unknown_mq_cmd": (3, struct.pack("<H", 2)),
}


def _hostile_setup(g: MqGuest) -> None:
    g.rss(GOOD_RSS)
    assert counters(g.env)["steering"]["rss"] == GOOD_RSS.snapshot()


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_mq_command(env_factory: Callable[..., DeviceEnv], case: str) -> None:
    """Refused with VIRTIO_NET_ERR; steering state (counters and capability)
    identical; the daemon alive; traffic in both directions as before."""
    env = env_factory(*MQ_ARGS, multi_queue=True)
    with mq_guest(env) as g:
        _hostile_setup(g)
        before = g.state()
        cmd, data = MALFORMED[case]
        assert g.ctrl(cmd, data) == VIRTIO_NET_ERR
        assert g.state() == before
        assert_healthy(g)
        assert_rss_in_force(g, GOOD_RSS, TRAFFIC_FLOWS, case)
        assert_tx_all_pairs(g, case)


def test_rss_config_truncated_at_every_length(env_factory: Callable[..., DeviceEnv]) -> None:
    env = env_factory(*MQ_ARGS, multi_queue=True)
    with mq_guest(env) as g:
        _hostile_setup(g)
        before = g.state()
        other = RssConfig((0, 3, 3, 0), key=bytes(range(100, 140)), unclassified=1, max_tx=3)
        full = other.pack()
        answers = {n: g.ctrl(VIRTIO_NET_CTRL_MQ_RSS_CONFIG, full[:n]) for n in range(len(full))}
        accepted = [n for n, ack in answers.items() if ack != VIRTIO_NET_ERR]
        assert not accepted, f"truncated RSS_CONFIG accepted at lengths {accepted}"
        assert g.state() == before
        # A 128-entry table cut inside the table, inside max_tx_vq, inside the key.
        big = RssConfig(random_table(random.Random(3), 128), key=bytes(range(40))).pack()
        for n in (8, 9, 8 + 127, 8 + 255, 8 + 256, 8 + 257, 8 + 258, 8 + 259, len(big) - 1):
            assert g.ctrl(VIRTIO_NET_CTRL_MQ_RSS_CONFIG, big[:n]) == VIRTIO_NET_ERR, n
        assert g.state() == before
        assert_healthy(g)
        assert_rss_in_force(g, GOOD_RSS, TRAFFIC_FLOWS, "trunc")
        assert_tx_all_pairs(g, "trunc")


def _splits(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    edges = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def test_rss_config_split_across_descriptors(env_factory: Callable[..., DeviceEnv]) -> None:
    """A valid RSS_CONFIG is accepted however the driver cuts it into buffers."""
    env = env_factory(*MQ_ARGS, multi_queue=True)
    rng = random.Random(0x5EED)
    small = [
        RssConfig((1, 2, 3, 0), key=rng.randbytes(40), unclassified=3),
        RssConfig((2, 0, 1, 3), key=rng.randbytes(40), unclassified=1, types=HT_UDPV4),
    ]
    big = [
        RssConfig(random_table(rng, 128), key=rng.randbytes(40), unclassified=2),
        RssConfig(random_table(rng, 128), key=rng.randbytes(40), max_tx=3, types=HT_IPV4),
    ]
    with mq_guest(env) as g:
        step = 0

        def accept(cfg: RssConfig, parts: list[bytes], what: str) -> None:
            nonlocal step
            step += 1
            assert b"".join(parts) == cfg.pack()
            assert g.ctrl(VIRTIO_NET_CTRL_MQ_RSS_CONFIG, parts) == VIRTIO_NET_OK, what
            snap = counters(g.env)["steering"]
            assert snap["rss"] == cfg.snapshot(), what
            assert snap["active_queue_pairs"] == cfg.max_tx, what

        data = small[0].pack()
        accept(small[0], [data[i : i + 1] for i in range(len(data))], "1-byte pieces")
        # Every single cut point: inside hash_types, the mask, each le16 entry,
        # max_tx_vq, between the key length and the key, inside the key.
        for cut in range(1, len(data)):
            cfg = small[cut % 2]
            accept(cfg, _splits(cfg.pack(), [cut]), f"cut at {cut}")
        for i, cfg in enumerate(big):
            d = cfg.pack()
            tail = 8 + 2 * 128
            cuts = [1, 3, 5, 7, 9, 8 + 2 * 77 + 1, tail + 1, tail + 2, tail + 3, tail + 3 + 17]
            accept(cfg, _splits(d, cuts), f"128-entry table, {len(cuts)} odd cuts")
            accept(cfg, _splits(d, list(range(1, len(d), 7 + i))), "128-entry table, small pieces")
        assert_healthy(g)
        final = big[-1]
        assert g.steer_state().active == final.max_tx
        assert_rss_in_force(g, final, TRAFFIC_FLOWS, "split")


def test_hash_config(env_factory: Callable[..., DeviceEnv]) -> None:
    """HASH_REPORT without RSS: HASH_CONFIG sets the reported hash (any
    split accepted); malformed ones are refused and change nothing."""
    env = env_factory(*MQ_ARGS, multi_queue=True)
    with mq_guest(env, GUEST_FEATURES | F_MQ | F_HASH) as g:
        assert g.hdr_len == NET_HDR_HASH_LEN and not g.drv.has(VIRTIO_NET_F_RSS)
        flows = TRAFFIC_FLOWS[:12]
        # Initially every hash type is disabled: hash reports say NONE.
        for i, f in enumerate(flows):
            g.env.port.send(f.frame(flow_payload(f"h0-{i}")))
        for r in g.collect(tagged(b"h0-"), len(flows)):
            assert (r.hash_value, r.hash_report) == (0, REPORT_NONE)

        key = random.Random(11).randbytes(40)
        data = hash_config(HT_UDPV4 | HT_TCPV4 | HT_IPV6, key)
        assert g.ctrl(VIRTIO_NET_CTRL_MQ_HASH_CONFIG, data) == VIRTIO_NET_OK
        before = g.state()
        assert before[0]["rss"]["hash_types"] == HT_UDPV4 | HT_TCPV4 | HT_IPV6
        assert before[0]["rss"]["key"] == key.hex()
        assert not before[0]["rss"]["configured"]

        def reports_match(tag: str, types: int, k: bytes) -> None:
            for i, f in enumerate(flows):
                g.env.port.send(f.frame(flow_payload(f"{tag}-{i}")))
            for r in g.collect(tagged(f"{tag}-".encode()), len(flows)):
                t = tag_of(r.frame)
                assert t is not None
                f = flows[int(t.split(b"-")[-1])]
                assert (r.hash_value, r.hash_report) == f.expected_hash(types, k), f
                assert r.queue < PAIRS

        reports_match("h1", HT_UDPV4 | HT_TCPV4 | HT_IPV6, key)

        # Refused: RSS_CONFIG (RSS not negotiated), bad keys, types, truncations.
        bad: list[bytes | list[bytes]] = [
            hash_config(HT_ALL, bytes(41)),
            hash_config(0x40, key),
            hash_config(HT_ALL | 0x100, key),
        ]
        bad += [data[:n] for n in range(len(data))]
        for b in bad:
            assert g.ctrl(VIRTIO_NET_CTRL_MQ_HASH_CONFIG, b) == VIRTIO_NET_ERR, b
        assert g.ctrl(VIRTIO_NET_CTRL_MQ_RSS_CONFIG, GOOD_RSS.pack()) == VIRTIO_NET_ERR
        assert g.state() == before
        reports_match("h2", HT_UDPV4 | HT_TCPV4 | HT_IPV6, key)

        # Valid, in 1-byte pieces: accepted.
        key2 = bytes(range(200, 240))
        data2 = hash_config(HT_ALL, key2)
        parts = [data2[i : i + 1] for i in range(len(data2))]
        assert g.ctrl(VIRTIO_NET_CTRL_MQ_HASH_CONFIG, parts) == VIRTIO_NET_OK
        assert counters(g.env)["steering"]["rss"]["key"] == key2.hex()
        reports_match("h3", HT_ALL, key2)
        assert_tx_all_pairs(g, "hash")
        assert_healthy(g)


def test_rss_without_mq(env_factory: Callable[..., DeviceEnv]) -> None:
    """RSS needs only CTRL_VQ (virtio 5.1.3.1). Without MQ the driver still
    sees max_virtqueue_pairs pairs and the control queue at 2N (5.1.2); one
    receive queue until RSS_CONFIG, then the table; VQ_PAIRS_SET is refused."""
    env = env_factory(*MQ_ARGS, multi_queue=True)
    rng = random.Random(81)
    with mq_guest(env, NO_MQ_FEATURES | F_RSS) as g:
        assert g.drv.has(VIRTIO_NET_F_RSS) and not g.drv.has(VIRTIO_NET_F_MQ)
        assert g.drv.ctrl is not None and g.drv.ctrl.index == CTRL_INDEX
        assert g.drv.ctrl_command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\1") == 0
        assert g.steer_state().active == 1
        flows = [f for f in TRAFFIC_FLOWS if f.kind != "raw"]
        assert set().union(*_inject(g, flows, "one").values()) == {0}
        before = g.state()
        assert g.ctrl(VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 2)) == VIRTIO_NET_ERR
        assert g.ctrl(VIRTIO_NET_CTRL_MQ_HASH_CONFIG, hash_config(HT_ALL, MS_KEY)) == VIRTIO_NET_ERR
        assert g.state() == before
        cfg = RssConfig(random_table(rng, 32), key=rng.randbytes(40), unclassified=3)
        g.rss(cfg)
        assert (g.steer_state().active, g.steer_state().effective) == (PAIRS, P_RSS)
        assert_rss_in_force(g, cfg, TRAFFIC_FLOWS, "rss")
        assert_tx_all_pairs(g, "rss-nomq")
        assert_healthy(g)


@pytest.mark.parametrize(
    "features",
    ["mq_only", "mq_rss", "mq_hash"],
)
def test_mq_commands_need_their_feature(
    env_factory: Callable[..., DeviceEnv], features: str
) -> None:
    """RSS_CONFIG needs RSS, HASH_CONFIG needs HASH_REPORT (VQ_PAIRS_SET and
    everything without MQ: test_queue_layout_without_mq)."""
    env = env_factory(*MQ_ARGS, multi_queue=True)
    f = {"mq_only": F_MQ, "mq_rss": F_MQ | F_RSS, "mq_hash": F_MQ | F_HASH}[features]
    with mq_guest(env, GUEST_FEATURES | f) as g:
        before = g.state()
        rss_ack = g.ctrl(VIRTIO_NET_CTRL_MQ_RSS_CONFIG, GOOD_RSS.pack())
        if f & F_RSS:
            assert rss_ack == VIRTIO_NET_OK
            before = g.state()
        else:
            assert rss_ack == VIRTIO_NET_ERR
        hash_ack = g.ctrl(VIRTIO_NET_CTRL_MQ_HASH_CONFIG, hash_config(HT_ALL, MS_KEY))
        if f & F_HASH:
            assert hash_ack == VIRTIO_NET_OK
        else:
            assert hash_ack == VIRTIO_NET_ERR
            assert g.state() == before
        g.pairs_set(3)
        assert g.steer_state().active == 3
        assert_tx_all_pairs(g, features, pairs=3)
        assert_healthy(g)


# --------------------------------------------------------------------------
# 3. Steering at the ring level
# --------------------------------------------------------------------------


def _inject(g: MqGuest, flows: Sequence[Flow], tag: str, per_flow: int = 2) -> dict[int, set[int]]:
    """Send ``per_flow`` frames of each flow; returns flow index -> queues."""
    for k in range(per_flow):
        for i, f in enumerate(flows):
            g.env.port.send(f.frame(flow_payload(f"{tag}-{i}-{k}")))
    got = g.collect(tagged(f"{tag}-".encode()), per_flow * len(flows))
    where: dict[int, set[int]] = {}
    for r in got:
        t = tag_of(r.frame)
        assert t is not None
        where.setdefault(int(t.split(b"-")[1]), set()).add(r.queue)
    return where


def test_rx_lands_on_active_queues_only(env_factory: Callable[..., DeviceEnv]) -> None:
    env = env_factory(*MQ_ARGS, multi_queue=True)
    flows = [f for f in make_flows(random.Random(5)) if f.kind != "raw"]
    with mq_guest(env, GUEST_FEATURES | F_MQ, set_pairs=False) as g:
        # Before VQ_PAIRS_SET: receiveq1 only (virtio 5.1.6.5.5).
        where = _inject(g, flows, "one")
        assert set().union(*where.values()) == {0}

        g.pairs_set(4)
        assert g.steer_state().effective == P_RXFT
        where = _inject(g, flows, "four")
        assert all(len(qs) == 1 for qs in where.values()), f"a flow on several queues: {where}"
        used = set().union(*where.values())
        assert used <= set(range(4))
        assert len(used) > 1, "unseen flows are spread by hash over the active queues"

        g.pairs_set(2)
        rx = [p.rx for p in g.drv.pairs]
        idx23 = [rx[2].used_idx(), rx[3].used_idx()]
        where = _inject(g, flows, "two", per_flow=3)
        assert all(len(qs) == 1 for qs in where.values()), where
        assert set().union(*where.values()) <= {0, 1}
        assert [rx[2].used_idx(), rx[3].used_idx()] == idx23

        g.pairs_set(1)
        where = _inject(g, flows, "back1")
        assert set().union(*where.values()) == {0}
        assert_healthy(g)


def test_rss_steering_and_hash_report(env_factory: Callable[..., DeviceEnv]) -> None:
    env = env_factory(*MQ_ARGS, multi_queue=True)
    rng = random.Random(0xD1CE)
    flows = make_flows(rng)
    with mq_guest(env) as g:
        assert g.hdr_len == NET_HDR_HASH_LEN
        configs = [
            RssConfig(random_table(rng, 128), key=rng.randbytes(40), unclassified=3),
            RssConfig(random_table(rng, 8), key=MS_KEY, types=HT_IPV4, unclassified=1),
            RssConfig(random_table(rng, 16), key=rng.randbytes(40), types=HT_TCPV4 | HT_UDPV6),
            RssConfig((2,), key=rng.randbytes(40), types=HT_IPV6 | HT_UDPV4, unclassified=0),
            RssConfig(random_table(rng, 64), key=rng.randbytes(24), types=HT_ALL, unclassified=2),
        ]
        for n, cfg in enumerate(configs):
            g.rss(cfg)
            cap = g.steer_state()
            assert (cap.effective, cap.active) == (P_RSS, cfg.max_tx)
            assert counters(g.env)["steering"]["rss"] == cfg.snapshot()
            assert_rss_in_force(g, cfg, flows, f"rss{n}")
        assert not g.stray, f"unexpected frames {g.stray}"
        # The device's per-queue rx counters agree with what the rings gave us.
        before = [q["rx"]["packets"] for q in counters(g.env)["queues"]]
        expected = [0] * PAIRS
        cfg = configs[0]
        g.rss(cfg)
        for i, f in enumerate(flows):
            g.env.port.send(f.frame(flow_payload(f"cnt-{i}")))
            expected[cfg.queue_of(f, PAIRS)] += 1
        got = g.collect(tagged(b"cnt-"), len(flows))
        assert sorted(r.queue for r in got) == sorted(
            q for q in range(PAIRS) for _ in range(expected[q])
        )
        after = [q["rx"]["packets"] for q in counters(g.env)["queues"]]
        assert [a - b for a, b in zip(after, before, strict=True)] == expected
        assert len({q for q in range(PAIRS) if expected[q]}) > 1
        # Frames read by one pair's worker and placed by another are counted.
        final = counters(g.env)["queues"]
        assert sum(q["rx"]["steered_out"] for q in final) > 0
        assert_healthy(g)


def test_rss_table_survives_vq_pairs_set(env_factory: Callable[..., DeviceEnv]) -> None:
    """VQ_PAIRS_SET 2 after RSS_CONFIG: nothing lands on queues 2 and 3."""
    env = env_factory(*MQ_ARGS, multi_queue=True)
    rng = random.Random(21)
    flows = make_flows(rng)
    cfg = RssConfig(random_table(rng, 32), key=rng.randbytes(40), unclassified=3)
    with mq_guest(env) as g:
        g.rss(cfg)
        assert_rss_in_force(g, cfg, flows, "rss4")
        g.pairs_set(2)
        rx = [p.rx for p in g.drv.pairs]
        idx23 = [rx[2].used_idx(), rx[3].used_idx()]
        assert g.steer_state().active == 2
        assert_rss_in_force(g, cfg, flows, "rss2")
        assert [rx[2].used_idx(), rx[3].used_idx()] == idx23
        assert_healthy(g)


def test_single_policy(env_factory: Callable[..., DeviceEnv]) -> None:
    env = env_factory(*MQ_ARGS, multi_queue=True)
    rng = random.Random(31)
    flows = make_flows(rng)
    cfg = RssConfig(random_table(rng, 16), key=rng.randbytes(40), unclassified=2)
    with mq_guest(env) as g:
        g.rss(cfg)
        sigusr1_until(g, P_SINGLE, P_SINGLE)
        where = _inject(g, flows, "single")
        assert set().union(*where.values()) == {0}
        # Hash reports still follow the guest's RSS configuration.
        g.env.port.send(flows[0].frame(flow_payload("single-hash")))
        (r,) = g.collect(tagged(b"single-hash"), 1)
        assert (r.queue, (r.hash_value, r.hash_report)) == (
            0,
            flows[0].expected_hash(cfg.types, cfg.key),
        )
        # Onwards to rss: the table is in force again.
        sigusr1_until(g, P_RSS, P_RSS)
        assert_rss_in_force(g, cfg, flows, "back-to-rss")
        assert_healthy(g)


def test_rx_follows_tx(env_factory: Callable[..., DeviceEnv]) -> None:
    """After the guest sends a flow on txq K, the flow's replies arrive on rxq K."""
    env = env_factory(*MQ_ARGS, multi_queue=True)
    rng = random.Random(41)
    guest_side = [Flow("udp4", v4(9, 2), v4(9, 1), 30000 + i, 7000 + i) for i in range(6)] + [
        Flow("tcp4", v4(9, 2), v4(9, 1), 31000 + i, 22) for i in range(2)
    ]
    with mq_guest(env, GUEST_FEATURES | F_MQ) as g:
        assert g.steer_state().effective == P_RXFT
        for round_ in range(3):
            assignment = [rng.randrange(PAIRS) for _ in guest_side]
            for i, (f, k) in enumerate(zip(guest_side, assignment, strict=True)):
                # To a MAC nobody has: the namespace's kernel ignores it.
                g.send(f.frame(flow_payload(f"out{round_}-{i}"), PEER_MAC, GUEST_MAC), k)
            for i, f in enumerate(guest_side):
                g.env.port.send(f.reverse().frame(flow_payload(f"back{round_}-{i}")))
            got = g.collect(tagged(f"back{round_}-".encode()), len(guest_side))
            for r in got:
                t = tag_of(r.frame)
                assert t is not None
                i = int(t.split(b"-")[1])
                assert r.queue == assignment[i], f"flow {i}: rx {r.queue}, tx {assignment[i]}"
        assert_healthy(g)


# --------------------------------------------------------------------------
# 4. No reordering on a switch
# --------------------------------------------------------------------------


def _flow_to(cfg_key: bytes, queue: int, table_len: int, rng: random.Random) -> Flow:
    """A UDPv4 flow whose hash under ``cfg_key`` selects table slot ``queue``."""
    while True:
        f = Flow("udp4", v4(7, rng.randrange(1, 255)), v4(2, 1), rng.randrange(1024, 65535), 9)
        h, _ = f.expected_hash(HT_ALL, cfg_key)
        if h & (table_len - 1) == queue:
            return f


def _wait_idx(q: Any, old: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while q.used_idx() == old:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


@pytest.mark.parametrize(
    "switch",
    [
        "rss_table",
        "vq_pairs_shrink",
    ],
)
def test_switch_holds_new_frames_until_old_consumed(
    env_factory: Callable[..., DeviceEnv], switch: str
) -> None:
    """Deterministic form of the ordering guarantee: a flow's frame placed on
    queue 2 under the old rule and not yet consumed; after a switch moving the
    flow to another queue, its next frame must wait until the guest consumed
    the old one (or the 200 ms drain deadline passed)."""
    env = env_factory(*MQ_ARGS, multi_queue=True)
    rng = random.Random(51)
    # Identity table: queue = hash & 3; the flow hashes to slot 2.
    ident = RssConfig((0, 1, 2, 3), key=MS_KEY)
    flow = _flow_to(MS_KEY, 2, 4, rng)
    with mq_guest(env) as g:
        g.rss(ident)
        rx = [p.rx for p in g.drv.pairs]
        g.env.port.send(flow.frame(flow_payload("old-1")))
        assert _wait_idx(rx[2], rx[2].last_used_idx, 3), "old frame not placed on queue 2"
        # Everything else consumed (queue 2 left alone): all other rings caught up.
        for p in (0, 1, 3):
            while rx[p].has_used():
                g.drv.recv_packet(timeout=1, pair=p)
        if switch == "rss_table":
            g.rss(RssConfig((0, 1, 1, 3), key=MS_KEY))
            new_q = 1
        else:
            g.pairs_set(2)  # slot 2 now wraps to queue 0
            new_q = 0
        timeouts0 = counters(g.env)["device"]["steering_drain_timeouts"]
        idx_new = rx[new_q].used_idx()
        g.env.port.send(flow.frame(flow_payload("new-2")))
        early = _wait_idx(rx[new_q], idx_new, 0.1)
        assert rx[2].has_used(), "the old frame is still waiting on queue 2"
        assert not early, (
            f"{switch}: the flow's next frame was placed on queue {new_q} while its "
            "previous frame on queue 2 was not consumed yet (reordering for the guest)"
        )
        # Consume the old frame: the new one follows on the new queue.
        (old,) = g.collect(tagged(b"old-"), 1)
        assert old.queue == 2
        (new,) = g.collect(tagged(b"new-"), 1)
        assert new.queue == new_q
        assert counters(g.env)["device"]["steering_drain_timeouts"] == timeouts0
        assert_healthy(g)


def test_switch_drain_deadline(env_factory: Callable[..., DeviceEnv]) -> None:
    """A guest that never consumes its old frames holds new ones back for
    at most about 200 ms, and the timeout is counted."""
    env = env_factory(*MQ_ARGS, multi_queue=True)
    rng = random.Random(61)
    flow = _flow_to(MS_KEY, 2, 4, rng)
    with mq_guest(env) as g:
        g.rss(RssConfig((0, 1, 2, 3), key=MS_KEY))
        rx = [p.rx for p in g.drv.pairs]
        g.env.port.send(flow.frame(flow_payload("stuck-1")))
        assert _wait_idx(rx[2], rx[2].last_used_idx, 3)
        for p in (0, 1, 3):
            while rx[p].has_used():
                g.drv.recv_packet(timeout=1, pair=p)
        timeouts0 = counters(g.env)["device"]["steering_drain_timeouts"]
        g.rss(RssConfig((0, 1, 1, 3), key=MS_KEY))
        t0 = time.monotonic()
        idx1 = rx[1].used_idx()
        g.env.port.send(flow.frame(flow_payload("late-2")))
        assert _wait_idx(rx[1], idx1, 3), "new frame never placed"
        waited = time.monotonic() - t0
        assert 0.1 < waited < 1.5, f"held {waited:.3f} s"
        assert counters(g.env)["device"]["steering_drain_timeouts"] == timeouts0 + 1
        assert_healthy(g)


SENDER = r"""
import socket, struct, sys, time
dst, nflows, total, rate, sport0, dport0 = sys.argv[1], *map(int, sys.argv[2:7])
socks = []
for i in range(nflows):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("", sport0 + i))
    s.connect((dst, dport0 + i))
    socks.append(s)
print("ready", flush=True)
sys.stdin.readline()
errors = 0
start = time.monotonic()
for n in range(total):
    f, seq = n % nflows, n // nflows
    try:
        socks[f].send(b"VNS:" + struct.pack("!II", f, seq))
    except OSError:
        errors += 1
    ahead = start + (n + 1) / rate - time.monotonic()
    if ahead > 0.001:
        time.sleep(ahead)
print("done", errors, flush=True)
"""


def _stream_record(frame: bytes) -> tuple[int, int] | None:
    """(flow, seq) of a datagram of the sender, or None."""
    if len(frame) < 14 + 20 + 8 + 12 or frame[12:14] != b"\x08\x00" or frame[23] != IPPROTO_UDP:
        return None
    payload = frame[14 + 20 + 8 :]
    if not payload.startswith(b"VNS:"):
        return None
    f, seq = struct.unpack_from("!II", payload, 4)
    return int(f), int(seq)


def test_no_reordering_across_switches(env_factory: Callable[..., DeviceEnv]) -> None:
    """A numbered UDP stream of several flows from the namespace while the
    guest switches steering (RSS tables, VQ_PAIRS_SET 4/2, SIGUSR1) again and
    again: draining every queue completely in turn, each flow's sequence
    numbers strictly increase; nothing is lost that the device did not count;
    after VQ_PAIRS_SET 2 nothing new lands on queues 2 and 3."""
    env = env_factory(*MQ_ARGS, multi_queue=True)
    rng = random.Random(71)
    nflows, total, rate = 16, 5000, 2000
    guest_ip = env.ns.guest_addr(0)
    env.ns.ip(
        "neigh", "replace", guest_ip, "lladdr", ":".join(f"{b:02x}" for b in GUEST_MAC),
        "dev", env.tap.name, "nud", "permanent",
    )  # fmt: skip
    tap_before = env.tap.stats()
    with mq_guest(env) as g:
        proc = env.ns.popen(
            [sys.executable, "-c", SENDER, guest_ip, str(nflows), str(total), str(rate),
             "40000", "9000"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stdout is not None and proc.stdin is not None
            assert proc.stdout.readline().strip() == "ready"
            received: list[tuple[int, int, int, int]] = []  # flow, seq, queue, pass
            actions: list[str] = []
            rx = [p.rx for p in g.drv.pairs]
            frozen: list[int] | None = None  # used idx of queues 2,3 while 2 pairs
            cycle = ["rss", "pairs2", "sigusr1", "rss", "pairs4", "rss2", "sigusr1", "pairs4"]
            proc.stdin.write("go\n")
            proc.stdin.flush()
            start = time.monotonic()
            next_switch = start + 0.1
            last_rx = start
            done_line = ""
            passes = 0
            while True:
                passes += 1
                batch = g.drain()
                if not batch:
                    time.sleep(0.0001)  # poll like NAPI, but leave the daemon some CPU
                for r in batch:
                    rec = _stream_record(r.frame)
                    if rec is None:
                        g.stray.append(r)
                        continue
                    received.append((rec[0], rec[1], r.queue, passes))
                    last_rx = time.monotonic()
                now = time.monotonic()
                if frozen is not None:
                    assert [rx[2].used_idx(), rx[3].used_idx()] == frozen, (
                        "frames placed on queues 2/3 after VQ_PAIRS_SET 2 was acknowledged"
                    )
                if not done_line and now >= next_switch:
                    a = cycle[len(actions) % len(cycle)]
                    actions.append(a)
                    log.info("switch %d: %s (%s)", len(actions), a, ring_state(g))
                    if a in ("rss", "rss2"):
                        g.rss(
                            RssConfig(
                                random_table(rng, 128),
                                key=rng.randbytes(40),
                                max_tx=PAIRS if a == "rss" else 3,
                            )
                        )
                        frozen = None
                    elif a == "pairs2":
                        g.pairs_set(2)
                        frozen = [rx[2].used_idx(), rx[3].used_idx()]
                    elif a == "pairs4":
                        g.pairs_set(4)
                        frozen = None
                    else:
                        assert env.server.proc is not None
                        os.kill(env.server.proc.pid, signal.SIGUSR1)
                    next_switch = now + rng.uniform(0.05, 0.2)
                if not done_line and proc.poll() is not None:
                    done_line = proc.stdout.readline().strip()
                if done_line and now - last_rx > 0.5:
                    break
                assert now - start < 30, "stream did not finish"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)
        assert done_line.startswith("done"), done_line
        send_errors = int(done_line.split()[1])
        final = counters(env)
        assert_healthy(g)

    # Per flow, in the order the driver drained them: strictly increasing.
    last: dict[int, tuple[int, int, int]] = {}
    backwards: list[str] = []
    for f, seq, q, p in received:
        if f in last and seq <= last[f][0]:
            backwards.append(
                f"flow {f}: seq {seq} (queue {q}, pass {p}) after {last[f][0]} "
                f"(queue {last[f][1]}, pass {last[f][2]})"
            )
        last[f] = (seq, q, p)
    switches = final["steering"]["switches"]
    dev = final["device"]
    log.info(
        "stream: %d received over %d passes, %d switches (%s), drain timeouts %d",
        len(received),
        passes,
        switches,
        ",".join(actions),
        dev["steering_drain_timeouts"],
    )
    assert len(actions) >= 10, f"only {len(actions)} switches during the stream"
    assert not backwards, f"{len(backwards)} reorderings: {backwards[:10]}"
    assert dev["steering_drain_timeouts"] == 0, "the driver kept up; no drain should time out"

    # Loss: only what the device counted as dropped (or the kernel refused).
    sent = total - send_errors
    seen = {(f, s) for f, s, _, _ in received}
    assert len(seen) == len(received), "duplicate datagrams"
    drops = sum(sum(q["rx"]["drops"].values()) for q in final["queues"])
    tap_after = env.tap.stats()
    tap_dropped = tap_after.get("tx_dropped", 0) - tap_before.get("tx_dropped", 0)
    lost = sent - len(received)
    log.info("stream: sent %d, lost %d, device drops %d, TAP tx_dropped %d",
             sent, lost, drops, tap_dropped)  # fmt: skip
    assert lost <= drops, (
        f"{lost} datagrams lost, device counted {drops} drops (TAP tx_dropped {tap_dropped}): "
        f"{final['queues']}"
    )
