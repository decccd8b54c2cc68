"""End to end: multiqueue, RSS and receive steering of our device under a
Linux guest.

The stack (mq_fixtures.py): the daemon offering 4 queue pairs on a
``multi_queue`` TAP, a 2-vCPU Linux 6.12 guest driving it with its own
virtio_net driver (MQ, RSS, hash reports negotiated). One guest boot is
shared by the tests; each starts from the stack's known state (policy
``auto``, the driver's default indirection table).

What is observed where:

- the device: per queue pair, the frames placed in the guest's receive queue
  (``rx.packets``) and taken from its transmit queue (``tx.packets``), the
  drops by reason, and the steering state (policy, effective policy, active
  pairs, RSS table, key, hash types, number of switches), all from the
  daemon's SIGUSR2 snapshot;
- the guest: ``ethtool -l/-x``, per-virtqueue interrupts
  (``virtioN-input.K`` / ``virtioN-output.K`` in /proc/interrupts), drops;
- iperf3 on both ends.

Placement is checked against a Toeplitz hash written here from the RSS
specification (not the datapath's C code), itself checked against the
standard verification vectors.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from vfiouser_net_harness.iperf import Direction, IperfResult, run_iperf3

from tests.e2e.mq_fixtures import (
    QUEUE_PAIRS,
    RSS_KEY_LEN,
    RSS_TABLE_LEN,
    Counters,
    MQStack,
    PolicySwitcher,
    UdpRun,
    deltas,
    mq_fixture,  # noqa: F401 (fixture "mq")
    mq_stack_fixture,  # noqa: F401 (fixture "mq_stack")
    run_iperf3_udp_rx,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

pytestmark = pytest.mark.e2e

IPERF_SECONDS = 2
IPERF_STREAMS = 4
SPREAD_STREAMS = 8
UDP_BURST = 32
UDP_DPORT = 9
UDP_SPORTS = (40001, 40002, 40003, 40004, 40005, 40006, 40007, 40008)
PING_COUNT = 20
SWITCH_SIGNALS = 12  # a multiple of 4: the policy ends where it started
SWITCH_INTERVAL = 0.5
LOAD_SECONDS = 8  # the signals start once traffic flows and take 6 s
UDP_RATE = "20M"  # per stream
BUSY = 50  # packets: more than the iperf3 control connection carries

# VIRTIO_NET_RSS_HASH_TYPE_*
HASH_TCPV4 = 1 << 1
HASH_UDPV4 = 1 << 2

# The key of the RSS verification suite, and a second one of our own.
KEY_A = bytes.fromhex(
    "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa"
)
KEY_B = (hashlib.sha256(b"vfiouser-net key B").digest() * 2)[:RSS_KEY_LEN]


# --- reference Toeplitz hash ----------------------------------------------------------


def toeplitz(key: bytes, data: bytes) -> int:
    """The RSS Toeplitz hash: for every set bit of the input (most significant
    first), XOR in the 32 key bits that start at that bit's position."""
    assert len(key) * 8 >= len(data) * 8 + 32, "key too short for the input"
    key_int = int.from_bytes(key, "big")
    key_bits = len(key) * 8
    result = 0
    for i in range(len(data) * 8):
        if data[i // 8] & (0x80 >> (i % 8)):
            result ^= (key_int >> (key_bits - 32 - i)) & 0xFFFFFFFF
    return result


def rss_input_v4(src: str, dst: str, sport: int | None = None, dport: int | None = None) -> bytes:
    """Hash input for IPv4: source and destination address, then the ports."""
    data = ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
    if sport is not None and dport is not None:
        data += struct.pack("!HH", sport, dport)
    return data


def expected_queue(
    key: bytes, table: list[int], active: int, tuple4: tuple[str, str, int, int]
) -> int:
    """Receive queue of a TCP/UDP over IPv4 frame (src, dst, sport, dport)."""
    h = toeplitz(key, rss_input_v4(*tuple4))
    q = table[h & (len(table) - 1)]
    return q if q < active else q % active


# (destination, destination port, source, source port, hash IP only, hash with TCP)
RSS_VECTORS = [
    ("161.142.100.80", 1766, "66.9.149.187", 2794, 0x323E8FC2, 0x51CCC178),
    ("65.69.140.83", 4739, "199.92.111.2", 14230, 0xD718262A, 0xC626B0EA),
    ("12.22.207.184", 38024, "24.19.198.95", 12898, 0xD2D0A5DE, 0x5C2B394A),
    ("209.142.163.6", 2217, "38.27.205.30", 48228, 0x82989176, 0xAFC7327F),
    ("202.188.127.2", 1303, "153.39.163.191", 44251, 0x5D1809C5, 0x10E828A2),
]


def test_reference_toeplitz_matches_verification_vectors() -> None:
    """The reference hash reproduces the RSS verification suite (IPv4, with and
    without ports), so the placement checks below rest on a known-good hash."""
    for dst, dport, src, sport, ip_only, with_ports in RSS_VECTORS:
        assert toeplitz(KEY_A, rss_input_v4(src, dst)) == ip_only
        assert toeplitz(KEY_A, rss_input_v4(src, dst, sport, dport)) == with_ports


# --- helpers --------------------------------------------------------------------------


def hkey_arg(key: bytes) -> str:
    return ":".join(f"{b:02x}" for b in key)


def busy_queues(d: list[int], threshold: int = 1) -> list[int]:
    return [q for q, n in enumerate(d) if n >= threshold]


def iperf(mq: MQStack, direction: Direction, streams: int, port: int = 5201) -> IperfResult:
    """A TCP run. check=False: with several streams the two ends' byte counts
    at the end of the test may disagree by a block or so either way (a 3.18
    client against a 3.12 server); the transfer itself must work."""
    r = run_iperf3(
        mq.require_guest(),
        mq.ns,
        direction=direction,
        seconds=IPERF_SECONDS,
        streams=streams,
        port=port,
        check=False,
    )
    assert r.sent_bytes > 0 and r.received_bytes > 0, r.summary()
    if r.inconsistencies():
        log.info("iperf3 %s byte counts: %s", direction, r.inconsistencies())
    return r


_SEND_UDP = r"""
import socket, sys
src, dst, sport, dport, count = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, sport))
for i in range(count):
    s.sendto(b"vfiouser-net rss %05d" % i, (dst, dport))
"""


def send_udp_flow(mq: MQStack, sport: int, count: int = UDP_BURST) -> None:
    """count datagrams host:sport -> guest:UDP_DPORT from the namespace."""
    mq.ns.run(
        [sys.executable, "-c", _SEND_UDP, mq.host_addr, mq.guest_addr, str(sport),
         str(UDP_DPORT), str(count)]
    )  # fmt: skip


# --- 1. channels ------------------------------------------------------------------------


def guest_steer_state(mq: MQStack) -> tuple[str, int, int]:
    """Magic, active and maximum pairs of the steering state, read inside
    the guest with devmem at BAR0 + 0x2800, as the README shows."""
    g = mq.require_guest()
    bar0 = g.check("cut -d' ' -f1 /sys/class/net/eth0/device/../resource | head -n 1").strip()
    base = int(bar0, 16) + 0x2800
    magic = g.check(f"devmem {base:#x} 32").strip()
    active = int(g.check(f"devmem {base + 8:#x} 16").strip(), 16)
    maximum = int(g.check(f"devmem {base + 10:#x} 16").strip(), 16)
    return magic, active, maximum


def test_channels_confine_traffic_to_active_pairs(
    mq: MQStack, record_property: Callable[[str, object], None]
) -> None:
    """ethtool -l shows 4 combined channels at most; after ``ethtool -L eth0
    combined N`` (1, 2, 4) the daemon has N active pairs and TCP both ways
    (iperf3 -P 4) moves frames, and raises guest interrupts, only on pairs < N."""
    maximum, current = mq.channels()
    assert maximum == QUEUE_PAIRS, mq.ethtool("-l eth0")
    log.info("ethtool -l: combined max %d, current %d", maximum, current)
    figures: dict[str, Any] = {}
    for n in (1, 2, 4):
        mq.set_channels(n)
        assert mq.channels() == (QUEUE_PAIRS, n)
        guest_queues = mq.require_guest().check("ls /sys/class/net/eth0/queues").split()
        assert sorted(guest_queues) == sorted(
            [f"rx-{k}" for k in range(n)] + [f"tx-{k}" for k in range(n)]
        ), guest_queues
        steering = mq.counters().steering
        assert steering["active_queue_pairs"] == n, steering
        assert steering["max_queue_pairs"] == QUEUE_PAIRS, steering
        # The guest sees the same in BAR0's steering state (README).
        assert guest_steer_state(mq) == ("0x54534E56", n, QUEUE_PAIRS)
        for direction in ("guest_tx", "guest_rx"):
            before, irq_before = mq.counters(), mq.irqs()
            r = iperf(mq, direction, IPERF_STREAMS)
            after, irq_after = mq.counters(), mq.irqs()
            rx = deltas(before.packets("rx"), after.packets("rx"))
            tx = deltas(before.packets("tx"), after.packets("tx"))
            irq_in = [
                irq_after[("input", k)] - irq_before[("input", k)] for k in range(QUEUE_PAIRS)
            ]
            irq_out = [
                irq_after[("output", k)] - irq_before[("output", k)] for k in range(QUEUE_PAIRS)
            ]
            key = f"combined{n}_{direction}"
            figures[key] = {
                "device_rx": rx,
                "device_tx": tx,
                "steered_out": deltas(before.steered_out(), after.steered_out()),
                "guest_irq_input": irq_in,
                "guest_irq_output": irq_out,
                "mbps": round(r.receiver_bps / 1e6, 1),
                "retransmits": r.retransmits,
            }
            log.info("%s: %s", key, figures[key])
            record_property(key, json.dumps(figures[key]))
            assert after.steering["active_queue_pairs"] == n, after.steering
            # Both directions carry frames both ways (data one way, ACKs back).
            assert sum(rx[:n]) > 0 and sum(tx[:n]) > 0, figures[key]
            assert sum(irq_in[:n]) > 0, figures[key]
            # Nothing at all on the pairs past the active ones.
            assert rx[n:] == [0] * (QUEUE_PAIRS - n), f"device rx on disabled pairs: {figures[key]}"
            assert tx[n:] == [0] * (QUEUE_PAIRS - n), f"device tx on disabled pairs: {figures[key]}"
            assert irq_in[n:] == [0] * (QUEUE_PAIRS - n), f"guest rx irqs: {figures[key]}"
            assert irq_out[n:] == [0] * (QUEUE_PAIRS - n), f"guest tx irqs: {figures[key]}"
    (mq.workdir / "channels.json").write_text(json.dumps(figures, indent=2))


# --- 2. indirection table ---------------------------------------------------------------


def _data_flows(r: IperfResult) -> list[tuple[str, str, int, int]]:
    """The received data flows of a guest_rx run: (host, guest, 5201, guest port)."""
    flows = []
    for c in r.client_json["start"]["connected"]:
        flows.append(
            (c["remote_host"], c["local_host"], int(c["remote_port"]), int(c["local_port"]))
        )
    return flows


def test_rss_indirection_table_equal_1_and_4(
    mq: MQStack, record_property: Callable[[str, object], None]
) -> None:
    """``ethtool -X equal 1`` puts every received frame on queue 0; ``equal 4``
    spreads 8 TCP flows, each on the queue its Toeplitz hash selects."""
    mq.set_channels(QUEUE_PAIRS)
    try:
        # equal 1: every entry is queue 0.
        used = mq.set_rxfh("equal 1")
        log.info("ethtool -X eth0 %s", used)
        snap = mq.counters()
        assert snap.steering["rss"]["table"] == [0] * RSS_TABLE_LEN, snap.steering
        assert mq.rxfh()[0] == snap.steering["rss"]["table"]
        assert snap.steering["active_queue_pairs"] == QUEUE_PAIRS
        r = iperf(mq, "guest_rx", SPREAD_STREAMS)
        after = mq.counters()
        rx = deltas(snap.packets("rx"), after.packets("rx"))
        log.info("equal 1: device rx per queue %s (%d flows)", rx, len(_data_flows(r)))
        record_property("equal1_rx", json.dumps(rx))
        assert rx[0] > 0 and rx[1:] == [0] * (QUEUE_PAIRS - 1), rx

        # equal 4: entries 0,1,2,3,0,1,...; the flows spread as the hash says.
        mq.set_rxfh("equal 4")
        snap = mq.counters()
        table = snap.steering["rss"]["table"]
        assert table == [i % 4 for i in range(RSS_TABLE_LEN)], snap.steering
        assert mq.rxfh()[0] == table
        key = bytes.fromhex(snap.steering["rss"]["key"])
        assert snap.steering["rss"]["hash_types"] & HASH_TCPV4, snap.steering
        for _attempt in range(3):
            before = mq.counters()
            r = iperf(mq, "guest_rx", SPREAD_STREAMS)
            after = mq.counters()
            rx = deltas(before.packets("rx"), after.packets("rx"))
            flows = _data_flows(r)
            expected = sorted({expected_queue(key, table, QUEUE_PAIRS, f) for f in flows})
            log.info("equal 4: device rx per queue %s; flows %s -> queues %s", rx, flows, expected)
            if len(expected) > 1:
                break
            log.info("all %d flows hash to one queue; again with new ports", len(flows))
        record_property("equal4_rx", json.dumps(rx))
        assert len(expected) > 1, "the flows never hashed to more than one queue"
        assert len(busy_queues(rx)) > 1, rx
        # Each data flow's queue carried it; the others at most the control connection.
        assert busy_queues(rx, BUSY) == expected, (rx, expected)
    finally:
        mq.restore_rxfh()


# --- 3. the key decides placement exactly as Toeplitz says ----------------------------------


def _place_flows(mq: MQStack, key: bytes) -> dict[int, int]:
    """Set key (equal 4), send one UDP burst per source port, one flow at a time;
    returns the device queue each flow was placed on (checked against Toeplitz)."""
    used = mq.set_rxfh(f"hkey {hkey_arg(key)} equal 4")
    log.info("ethtool -X eth0 %s", used)
    snap = mq.counters()
    rss = snap.steering["rss"]
    table: list[int] = rss["table"]
    # The daemon holds what ethtool set, and the guest reports the same.
    assert rss["configured"], rss
    assert rss["key"] == key.hex(), rss
    assert table == [i % 4 for i in range(RSS_TABLE_LEN)], rss
    assert mq.rxfh() == (table, key.hex())
    assert rss["hash_types"] & HASH_UDPV4, rss
    assert snap.steering["effective"] == "rss", snap.steering
    placed: dict[int, int] = {}
    for sport in UDP_SPORTS:
        want = expected_queue(
            key, table, QUEUE_PAIRS, (mq.host_addr, mq.guest_addr, sport, UDP_DPORT)
        )
        before = mq.counters()
        send_udp_flow(mq, sport)
        after = mq.counters_settled(before, UDP_BURST)
        rx = deltas(before.packets("rx"), after.packets("rx"))
        log.info(
            "key %s.. sport %d: device rx %s, Toeplitz says queue %d",
            key[:4].hex(),
            sport,
            rx,
            want,
        )
        got = [q for q, n in enumerate(rx) if n > 0]
        assert got == [want], f"sport {sport}: device rx per queue {rx}, Toeplitz queue {want}"
        assert rx[want] >= UDP_BURST, rx
        placed[sport] = want
    return placed


def test_rss_key_changes_placement_as_toeplitz_predicts(
    mq: MQStack, record_property: Callable[[str, object], None]
) -> None:
    """UDP 4-tuple hashing with two keys: each of 8 flows, sent alone, lands on
    table[toeplitz(key, tuple) & 127]; the daemon holds the key and table that
    ethtool set; the second key moves flows."""
    mq.set_channels(QUEUE_PAIRS)
    try:
        mq.ethtool("-N eth0 rx-flow-hash udp4 sdfn")
        fields = mq.ethtool("-n eth0 rx-flow-hash udp4")
        assert "L4 bytes 0 & 1" in fields and "L4 bytes 2 & 3" in fields, fields
        placed_a = _place_flows(mq, KEY_A)
        placed_b = _place_flows(mq, KEY_B)
    finally:
        mq.restore_rxfh()
    moved = [p for p in UDP_SPORTS if placed_a[p] != placed_b[p]]
    log.info("queues with key A %s, with key B %s; moved: %s", placed_a, placed_b, moved)
    record_property("placement", json.dumps({"key_a": placed_a, "key_b": placed_b}))
    assert moved, "no flow changed queue with the new key"
    assert len(set(placed_a.values())) > 1 and len(set(placed_b.values())) > 1


# --- 4. rx follows tx --------------------------------------------------------------------------


def test_rx_follows_tx_replies_on_the_transmit_queue(
    mq: MQStack, record_property: Callable[[str, object], None]
) -> None:
    """Policy rx-follows-tx (SIGUSR1): a ping pinned to CPU K goes out on
    transmit queue K (XPS) and its replies are placed on receive queue K."""
    guest = mq.require_guest()
    mq.set_channels(2)
    # virtio_net's XPS with 2 CPUs and 2 pairs: CPU K transmits on queue K.
    xps = [int(guest.check(f"cat /sys/class/net/eth0/queues/tx-{k}/xps_cpus"), 16) for k in (0, 1)]
    assert xps == [1, 2], xps
    try:
        snap = mq.set_policy("rx-follows-tx")
        assert snap.steering["effective"] == "rx-follows-tx", snap.steering
        assert snap.steering["active_queue_pairs"] == 2, snap.steering
        for cpu in (0, 1):
            before = mq.counters()
            _, out = guest.run(
                f"taskset -c {cpu} ping -c {PING_COUNT} -i 0.2 -W 5 {mq.host_addr}", timeout=60
            )
            after = mq.counters()
            assert f"{PING_COUNT} packets received" in out, out
            rx = deltas(before.packets("rx"), after.packets("rx"))
            tx = deltas(before.packets("tx"), after.packets("tx"))
            log.info("ping on CPU %d: device tx per queue %s, rx per queue %s", cpu, tx, rx)
            record_property(f"cpu{cpu}", json.dumps({"tx": tx, "rx": rx}))
            assert tx[cpu] >= PING_COUNT, (tx, rx)
            assert rx[cpu] >= PING_COUNT, (tx, rx)
            others = [q for q in range(QUEUE_PAIRS) if q != cpu]
            assert [tx[q] for q in others] == [0] * len(others), (tx, rx)
            assert [rx[q] for q in others] == [0] * len(others), (tx, rx)
    finally:
        mq.set_policy("auto")


# --- 5. policy switches under load ---------------------------------------------------------------


def _switch_under_load(mq: MQStack, run: Callable[[], T]) -> tuple[T, Counters, Counters]:
    """Run the transfer while SWITCH_SIGNALS SIGUSR1s go to the daemon; check
    that each was one steering switch and that the policy is back where it was."""
    before = mq.counters()
    switcher = PolicySwitcher(mq, count=SWITCH_SIGNALS, interval=SWITCH_INTERVAL)
    switcher.start()
    try:
        switcher.go.set()
        result = run()
        t_end = time.monotonic()
    finally:
        switcher.finish()
    assert switcher.error is None, switcher.error
    assert len(switcher.sent) == SWITCH_SIGNALS, f"only {len(switcher.sent)} signals sent"
    assert switcher.sent[-1] < t_end, "the policy switches did not all happen under load"
    deadline = time.monotonic() + 10
    while True:
        after = mq.counters()
        switches = after.steering["switches"] - before.steering["switches"]
        if switches >= SWITCH_SIGNALS or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert switches == SWITCH_SIGNALS, after.steering
    assert after.steering["policy"] == before.steering["policy"], after.steering
    return result, before, after


def test_policy_switches_under_udp_load_keep_order(
    mq: MQStack, record_property: Callable[[str, object], None]
) -> None:
    """12 policy switches (SIGUSR1 every 0.5 s) during 4 UDP streams host ->
    guest: no datagram out of order, every lost one counted as a drop by the
    device, the TAP or the guest, and 12 switches in the steering state."""
    mq.set_channels(QUEUE_PAIRS)
    tap_before = mq.tap_link_stats()
    guest_drops_before, udp_before = mq.guest_rx_dropped(), mq.guest_udp()

    def run() -> UdpRun:
        return run_iperf3_udp_rx(mq, streams=IPERF_STREAMS, rate=UDP_RATE, seconds=LOAD_SECONDS)

    udp, before, after = _switch_under_load(mq, run)
    tap_after = mq.tap_link_stats()
    guest_drops_after, udp_after = mq.guest_rx_dropped(), mq.guest_udp()
    drops_before, drops_after = before.rx_drops(), after.rx_drops()
    device_drops = {
        k: v - drops_before.get(k, 0) for k, v in drops_after.items() if v != drops_before.get(k, 0)
    }
    accounted = {
        "device_rx_drops": sum(device_drops.values()),
        "tap_tx_dropped": tap_after["tx"]["dropped"] - tap_before["tx"]["dropped"],
        "guest_rx_dropped": guest_drops_after - guest_drops_before,
        "guest_udp_rcvbuf_errors": udp_after["RcvbufErrors"] - udp_before["RcvbufErrors"],
    }
    streams = udp.receiver_streams()
    figures = {
        "streams": [
            {k: s[k] for k in ("packets", "lost_packets", "out_of_order")} for s in streams
        ],
        "sent": udp.sender_packets(),
        "lost": udp.lost,
        "accounted": accounted,
        "device_drops_by_reason": device_drops,
        "device_rx_per_queue": deltas(before.packets("rx"), after.packets("rx")),
        "switches": after.steering["switches"] - before.steering["switches"],
        "drain_timeouts": after.device("steering_drain_timeouts")
        - before.device("steering_drain_timeouts"),
        "guest_udp_in_errors": udp_after["InErrors"] - udp_before["InErrors"],
    }
    log.info("UDP under policy switches: %s", json.dumps(figures))
    record_property("udp_switch", json.dumps(figures))
    (mq.workdir / "udp_switch.json").write_text(json.dumps(figures, indent=2))
    assert udp.received > 0, figures
    assert udp.out_of_order == [0] * IPERF_STREAMS, figures
    assert udp.lost <= sum(accounted.values()), figures


def test_policy_switches_under_tcp_load_complete(
    mq: MQStack, record_property: Callable[[str, object], None]
) -> None:
    """12 policy switches during 4 TCP streams host -> guest: the transfer
    completes; retransmits and the guest's out-of-order queueing are recorded."""
    mq.set_channels(QUEUE_PAIRS)
    tap_before, tcp_before = mq.tap_link_stats(), mq.guest_tcpext()

    def run() -> IperfResult:
        return run_iperf3(
            mq.require_guest(),
            mq.ns,
            direction="guest_rx",
            seconds=LOAD_SECONDS,
            streams=IPERF_STREAMS,
            port=5203,
            check=False,
        )

    result, before, after = _switch_under_load(mq, run)
    tap_after, tcp_after = mq.tap_link_stats(), mq.guest_tcpext()
    drops_before, drops_after = before.rx_drops(), after.rx_drops()
    figures = {
        **result.summary(),
        "device_rx_per_queue": deltas(before.packets("rx"), after.packets("rx")),
        "switches": after.steering["switches"] - before.steering["switches"],
        "drain_timeouts": after.device("steering_drain_timeouts")
        - before.device("steering_drain_timeouts"),
        "device_rx_drops": {
            k: v - drops_before.get(k, 0)
            for k, v in drops_after.items()
            if v != drops_before.get(k, 0)
        },
        "tap_tx_dropped": tap_after["tx"]["dropped"] - tap_before["tx"]["dropped"],
        # The guest's receiver: segments that arrived ahead of a hole.
        "guest_tcp_ofo_queue": tcp_after["TCPOFOQueue"] - tcp_before["TCPOFOQueue"],
    }
    log.info("TCP under policy switches: %s", json.dumps(figures))
    record_property("tcp_switch", json.dumps(figures))
    assert result.sent_bytes > 0 and result.received_bytes > 0, figures
