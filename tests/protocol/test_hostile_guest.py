"""A hostile (or broken) guest, played by the tests' own client and driver:
descriptors outside guest memory, loops, over-long and malformed chains,
zero-length buffers, bogus ring addresses, corrupt avail rings, malformed
control commands, stray doorbells, random writes over BAR0 and config space,
DMA unmaps under the device's feet and garbage on the vfio-user socket.

After each: the daemon is alive (the fixture also checks it stops cleanly),
the other queues keep working, the virtio-visible reaction is right (used
entry with length 0, DEVICE_NEEDS_RESET plus a config interrupt, ack
VIRTIO_NET_ERR with the state unchanged), and the error is counted - seen
through the daemon's log lines, as it has no admin channel yet.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest
from vfiouser_net_harness import vfio_user_client as vu
from vfiouser_net_harness.guest_memory import GuestMemory
from vfiouser_net_harness.virtio_pci_driver import (
    COMMON_Q_MSIX,
    COMMON_Q_SIZE,
    NET_HDR_SIZE,
    STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_NET_CTRL_ANNOUNCE,
    VIRTIO_NET_CTRL_GUEST_OFFLOADS,
    VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET,
    VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_HASH_CONFIG,
    VIRTIO_NET_CTRL_MQ_RSS_CONFIG,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_RSS,
    VIRTIO_NET_OK,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    CfgType,
    NetHdr,
    SplitQueue,
    VirtioNetDriver,
    VirtioPciTransport,
    bit,
    parse_virtio_caps,
)

from tests.protocol.support import (
    BROADCAST,
    GUEST_FEATURES,
    GUEST_MAC,
    GUEST_MEM_SIZE,
    DeviceEnv,
    GuestSession,
    has_tag,
    mac_table,
    open_session,
    recv_tagged,
    tagged_frame,
    wait_used,
)

log = logging.getLogger(__name__)

CONFIG_VECTOR = 0
LISTED_UC = bytes.fromhex("02766e00bbbb")
OTHER_UC = bytes.fromhex("02766e00aaaa")

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def raw_chain(q: SplitQueue, n: int, token: object, *, writable: bool = False) -> list[int]:
    """Reserve ``n`` descriptors as one chain (bookkept by the queue, not yet
    published) and return their ids, head first; the caller overwrites them
    with write_desc, then calls publish_kick."""
    scratch = q.mem.alloc(64)
    head = q.add_buf([(scratch, 1, writable)] * n, token, indirect=False, publish=False)
    return list(q.pending[head].ids)


def publish_kick(q: SplitQueue) -> None:
    q.publish()
    q.kick(force=True)


def tx_frame_bytes(tag: bytes, size: int = 60) -> bytes:
    return bytes(NET_HDR_SIZE) + tagged_frame(BROADCAST, tag, src=GUEST_MAC, size=size)


def assert_tx_still_works(s: GuestSession, tag: bytes) -> None:
    s.driver.send_packet(tagged_frame(BROADCAST, tag, src=GUEST_MAC))
    assert s.env.port.recv(lambda f: has_tag(f, tag)) is not None, "a good tx frame was lost"


def assert_rx_still_works(s: GuestSession, tag: bytes) -> None:
    s.env.port.send(tagged_frame(GUEST_MAC, tag))
    recv_tagged(s.driver, tag)


def assert_healthy(s: GuestSession) -> None:
    assert not s.driver.transport.status & STATUS_DEVICE_NEEDS_RESET
    s.env.assert_alive()


def queue_counters(env: DeviceEnv, direction: str) -> dict[str, Any]:
    """Stop the daemon and return the final counters of pair 0's ``direction``."""
    c: dict[str, Any] = env.final_counters()["queues"][0][direction]
    return c


def guest_error(direction: str, reason: str) -> str:
    return rf"queue pair 0 {direction}: guest error {reason} \(counted\)"


def restart_and_check(s: GuestSession, tag: bytes) -> VirtioNetDriver:
    """Reset the device, bring it up from scratch and pass traffic both ways."""
    s.driver.transport.reset()
    assert s.driver.transport.status == 0
    drv = s.new_driver()
    drv.bring_up()
    assert_tx_still_works(s, tag + b"-tx")
    assert_rx_still_works(s, tag + b"-rx")
    return drv


def assert_needs_reset(s: GuestSession, why: str) -> None:
    """DEVICE_NEEDS_RESET in the status, a config interrupt, the log line."""
    t = s.driver.transport
    s.env.wait_log(rf"device needs reset: {why}")
    assert t.status & STATUS_DEVICE_NEEDS_RESET, f"status {t.status:#x}"
    assert t.wait_irq(CONFIG_VECTOR, 3), "no config interrupt for DEVICE_NEEDS_RESET"


# --------------------------------------------------------------------------
# Descriptors
# --------------------------------------------------------------------------

OUTSIDE_CASES: dict[str, Callable[[GuestMemory], tuple[int, int]]] = {
    "beyond_end": lambda m: (m.end + 0x10000, 128),
    "straddling_end": lambda m: (m.end - 16, 128),
    "wrapping": lambda m: (2**64 - 32, 128),
    "huge_length": lambda m: (m.base + 0x100000, 0xFFFFFFFF),
}


@pytest.mark.parametrize("case", sorted(OUTSIDE_CASES))
def test_tx_descriptor_outside_memory(session: GuestSession, case: str) -> None:
    drv = session.driver
    drv.bring_up()
    tx = drv.pairs[0].tx
    addr, length = OUTSIDE_CASES[case](session.mem)
    ids = raw_chain(tx, 1, "bad")
    tx.write_desc(tx.desc_addr, ids[0], addr, length, 0, 0)
    publish_kick(tx)
    e = wait_used(drv, tx)
    assert (e.id, e.len) == (ids[0], 0)
    session.env.wait_log(guest_error("tx", "desc_addr"))
    assert session.env.counters()["queues"][0]["tx"]["errors"]["desc_addr"] == 1
    assert_healthy(session)
    assert_tx_still_works(session, b"good-after-" + case.encode())
    assert_rx_still_works(session, b"rx-after-" + case.encode())
    tx_stats = queue_counters(session.env, "tx")
    assert tx_stats["errors"]["desc_addr"] == 1
    assert tx_stats["drops"]["bad_chain"] == 1


def test_rx_descriptor_outside_memory(session: GuestSession) -> None:
    drv = session.driver
    drv.bring_up(rx_buffers=0)
    rx = drv.pairs[0].rx
    # Outside memory, then in memory the device may only read.
    ro = GuestMemory(1 << 20, base=0x4000_0000, name="ro")
    try:
        ro.map_into(session.client, prot=vu.DMA_READ)
        for token, addr in (("outside", session.mem.end + 0x1000), ("readonly", ro.base + 4096)):
            ids = raw_chain(rx, 1, token, writable=True)
            rx.write_desc(rx.desc_addr, ids[0], addr, 2048, VRING_DESC_F_WRITE, 0)
        rx.publish()
        drv.post_rx_buffers(16)
        for token in ("outside", "readonly"):
            e = wait_used(drv, rx)
            assert (e.token, e.len) == (token, 0)
        session.env.wait_log(guest_error("rx", "desc_addr"), count=2)
        assert_healthy(session)
        assert_rx_still_works(session, b"rx-after-bad")
        assert_tx_still_works(session, b"tx-after-bad")
        assert queue_counters(session.env, "rx")["errors"]["desc_addr"] == 2
    finally:
        ro.close()


@pytest.mark.parametrize("kind", ["self", "pair", "indirect"])
def test_descriptor_loop(session: GuestSession, kind: str) -> None:
    drv = session.driver
    drv.bring_up()
    tx = drv.pairs[0].tx
    buf = session.mem.alloc(256)
    session.mem.write(buf, tx_frame_bytes(b"loop"))
    if kind == "self":
        ids = raw_chain(tx, 1, "loop")
        tx.write_desc(tx.desc_addr, ids[0], buf, 64, VRING_DESC_F_NEXT, ids[0])
    elif kind == "pair":
        ids = raw_chain(tx, 2, "loop")
        tx.write_desc(tx.desc_addr, ids[0], buf, 64, VRING_DESC_F_NEXT, ids[1])
        tx.write_desc(tx.desc_addr, ids[1], buf, 0, VRING_DESC_F_NEXT, ids[0])
    else:
        table = session.mem.alloc(16 * 4, 16)
        for i in range(4):
            tx.write_desc(table, i, buf, 64, VRING_DESC_F_NEXT, (i + 1) % 4)
        ids = raw_chain(tx, 1, "loop")
        tx.write_desc(tx.desc_addr, ids[0], table, 16 * 4, VRING_DESC_F_INDIRECT, 0)
    publish_kick(tx)
    e = wait_used(drv, tx)
    assert (e.id, e.len) == (ids[0], 0)
    session.env.wait_log(guest_error("tx", "desc_loop"))
    assert session.env.port.recv(lambda f: has_tag(f, b"loop"), timeout=0.2) is None
    assert_healthy(session)
    assert_tx_still_works(session, b"after-loop")
    assert queue_counters(session.env, "tx")["errors"]["desc_loop"] == 1


MALFORMED_CHAINS = [
    "next_out_of_range",
    "too_long",
    "indirect_too_big",
    "nested_indirect",
    "indirect_with_next",
    "indirect_bad_len",
    "indirect_outside",
    "writable_in_tx",
]
MALFORMED_REASON = {
    "next_out_of_range": "desc_next",
    "too_long": "chain_too_long",
    "indirect_too_big": "indirect",
    "nested_indirect": "indirect",
    "indirect_with_next": "indirect",
    "indirect_bad_len": "indirect",
    "indirect_outside": "desc_addr",
    "writable_in_tx": "desc_order",
}


@pytest.mark.parametrize("case", MALFORMED_CHAINS)
def test_malformed_tx_chain(session: GuestSession, case: str) -> None:
    drv = session.driver
    drv.bring_up()
    tx = drv.pairs[0].tx
    mem = session.mem
    buf = mem.alloc(256)
    mem.write(buf, tx_frame_bytes(b"malformed"))
    ids = raw_chain(tx, 2 if case in ("next_out_of_range", "writable_in_tx") else 1, case)
    head = ids[0]
    if case == "next_out_of_range":
        tx.write_desc(tx.desc_addr, head, buf, 64, VRING_DESC_F_NEXT, tx.size + 7)
    elif case == "writable_in_tx":
        tx.write_desc(tx.desc_addr, head, buf, 64, VRING_DESC_F_NEXT, ids[1])
        tx.write_desc(tx.desc_addr, ids[1], buf + 128, 64, VRING_DESC_F_WRITE, 0)
    else:
        # indirect_too_big: more entries than any ring may have (4096).
        n = {"too_long": 300, "indirect_too_big": 4097}.get(case, 4)
        table = mem.alloc(16 * n, 16)
        for i in range(n):
            more = i + 1 < n
            tx.write_desc(table, i, buf, 1, VRING_DESC_F_NEXT if more else 0, i + 1 if more else 0)
        length, flags = 16 * n, VRING_DESC_F_INDIRECT
        if case == "nested_indirect":
            tx.write_desc(table, 1, table, 16 * n, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 2)
        elif case == "indirect_with_next":
            flags |= VRING_DESC_F_NEXT
        elif case == "indirect_bad_len":
            length = 16 * n - 3
        elif case == "indirect_outside":
            table = mem.end + 0x2000
        tx.write_desc(tx.desc_addr, head, table, length, flags, ids[1] if len(ids) > 1 else 0)
    publish_kick(tx)
    e = wait_used(drv, tx)
    assert (e.id, e.len) == (head, 0)
    session.env.wait_log(guest_error("tx", MALFORMED_REASON[case]))
    assert session.env.port.recv(lambda f: has_tag(f, b"malformed"), timeout=0.2) is None
    assert_healthy(session)
    assert_tx_still_works(session, b"after-" + case.encode())
    assert_rx_still_works(session, b"rx-after-" + case.encode())
    tx_stats = queue_counters(session.env, "tx")
    assert tx_stats["errors"][MALFORMED_REASON[case]] == 1
    assert tx_stats["drops"]["bad_chain"] == 1


def test_readable_descriptor_in_rx_chain(session: GuestSession) -> None:
    drv = session.driver
    drv.bring_up(rx_buffers=0)
    rx = drv.pairs[0].rx
    buf = session.mem.alloc(4096)
    ids = raw_chain(rx, 1, "readable", writable=True)
    rx.write_desc(rx.desc_addr, ids[0], buf, 2048, 0, 0)  # not VRING_DESC_F_WRITE
    rx.publish()
    drv.post_rx_buffers(16)
    e = wait_used(drv, rx)
    assert (e.token, e.len) == ("readable", 0)
    session.env.wait_log(guest_error("rx", "desc_order"))
    assert_rx_still_works(session, b"rx-after-readable")
    assert_healthy(session)
    assert queue_counters(session.env, "rx")["errors"]["desc_order"] == 1


def test_zero_length_buffers_tx(session: GuestSession) -> None:
    drv = session.driver
    drv.bring_up()
    tx = drv.pairs[0].tx
    mem = session.mem
    frame = tx_frame_bytes(b"zl-mixed")
    buf = mem.alloc(256)
    mem.write(buf, frame)
    # Zero-length descriptors around a good one: skipped, the frame passes.
    ids = raw_chain(tx, 3, "mixed")
    tx.write_desc(tx.desc_addr, ids[0], buf, 0, VRING_DESC_F_NEXT, ids[1])
    tx.write_desc(tx.desc_addr, ids[1], buf, len(frame), VRING_DESC_F_NEXT, ids[2])
    tx.write_desc(tx.desc_addr, ids[2], 0, 0, 0, 0)
    publish_kick(tx)
    assert wait_used(drv, tx).id == ids[0]
    assert session.env.port.recv(lambda f: has_tag(f, b"zl-mixed")) == frame[NET_HDR_SIZE:]
    # Only zero-length descriptors (even at address 0 or outside memory): nothing sent.
    ids = raw_chain(tx, 2, "only-zero")
    tx.write_desc(tx.desc_addr, ids[0], mem.end + 0x1000, 0, VRING_DESC_F_NEXT, ids[1])
    tx.write_desc(tx.desc_addr, ids[1], 0, 0, 0, 0)
    publish_kick(tx)
    e = wait_used(drv, tx)
    assert (e.id, e.len) == (ids[0], 0)
    assert_healthy(session)
    assert_tx_still_works(session, b"after-zero")
    tx_stats = queue_counters(session.env, "tx")
    assert tx_stats["errors"]["zero_length"] == 4
    assert tx_stats["drops"]["header_too_short"] == 1


@pytest.mark.parametrize(
    ("mergeable", "zero_buffers"),
    [(True, 1), (False, 1), (True, 130)],
    ids=["mergeable", "not_mergeable", "mergeable_many"],
)
def test_zero_length_rx_buffers(env: DeviceEnv, mergeable: bool, zero_buffers: int) -> None:
    """Zero-length rx buffers hold no packet: they come back with length 0
    on their own (never as part of a packet, which would give the driver a
    packet shorter than its virtio-net header), and the frame arrives whole
    in the good buffers after them. (130 is more than the device prefetches.)"""
    features = GUEST_FEATURES if mergeable else GUEST_FEATURES & ~bit(VIRTIO_NET_F_MRG_RXBUF)
    s = open_session(env, features=features)
    try:
        drv = s.driver
        drv.bring_up(rx_buffers=0)
        rx = drv.pairs[0].rx
        buf = s.mem.alloc(64)
        for i in range(zero_buffers):
            ids = raw_chain(rx, 1, f"zero{i}", writable=True)
            rx.write_desc(rx.desc_addr, ids[0], buf, 0, VRING_DESC_F_WRITE, 0)
        rx.publish()
        drv.post_rx_buffers(16)
        env.port.send(tagged_frame(GUEST_MAC, b"after-zero-rx"))
        for i in range(zero_buffers):
            e = wait_used(drv, rx, timeout=3)
            assert (e.token, e.len) == (f"zero{i}", 0), f"zero-length buffer {i}: {e}"
        hdr, frame = drv.recv_packet(timeout=3)
        assert frame == tagged_frame(GUEST_MAC, b"after-zero-rx")
        assert NetHdr.unpack(hdr).num_buffers == 1
        # The device is not stuck: DMA_UNMAP (which pauses the workers) completes.
        s.client.dma_unmap(s.mem.base, s.mem.size)
        env.assert_alive()
    finally:
        s.close()


# --------------------------------------------------------------------------
# Rings
# --------------------------------------------------------------------------

BOGUS_RINGS = ["desc", "avail", "used", "used_readonly", "desc_misaligned", "size_not_pow2"]


def _manual_bring_up(s: GuestSession, bad_queue: int, bogus: str, ro: GuestMemory) -> None:
    """Bring-up with queue ``bad_queue``'s ring set up as ``bogus``."""
    t = s.driver.transport
    t.negotiate(GUEST_FEATURES)
    t.enable_msix(3)
    t.set_config_msix_vector(CONFIG_VECTOR)
    outside = s.mem.end + 0x10000
    for idx in (0, 1, 2):
        q = SplitQueue(s.mem, idx, 256, event_idx=True)
        if idx == bad_queue:
            if bogus == "desc":
                q.desc_addr = outside
            elif bogus == "avail":
                q.avail_addr = s.mem.end - 8  # starts inside, runs past the end
            elif bogus == "used":
                q.used_addr = outside
            elif bogus == "used_readonly":
                q.used_addr = ro.base + 4096
            elif bogus == "desc_misaligned":
                q.desc_addr += 8
        t.setup_queue(q, 1 + idx if idx < 2 else VIRTIO_MSI_NO_VECTOR)
        if idx == bad_queue and bogus == "size_not_pow2":
            t.select_queue(idx)
            t.common_write(COMMON_Q_SIZE, 2, 100)
    t.driver_ok()


BOGUS_RING_CASES = [(b, 1) for b in BOGUS_RINGS] + [
    (b, q) for q in (0, 2) for b in ("desc", "used")
]


@pytest.mark.parametrize(
    ("bogus", "queue"),
    BOGUS_RING_CASES,
    ids=[f"{b}-{('rx', 'tx', 'ctrl')[q]}" for b, q in BOGUS_RING_CASES],
)
def test_bogus_ring_address(session: GuestSession, bogus: str, queue: int) -> None:
    with GuestMemory(1 << 20, base=0x4000_0000, name="ro") as ro:
        ro.map_into(session.client, prot=vu.DMA_READ)
        _manual_bring_up(session, queue, bogus, ro)
        assert_needs_reset(session, "ring addresses outside guest memory at DRIVER_OK")
        session.env.assert_alive()
        assert session.client.config_read(0, 4) == b"\xf4\x1a\x41\x10"
        restart_and_check(session, b"after-" + bogus.encode())
    counters = session.env.final_counters()
    assert counters["device"]["needs_reset"] == 1
    stats = counters["ctrl"] if queue == 2 else counters["queues"][0][("rx", "tx")[queue]]
    assert stats["errors"]["ring_addr"] == 1


@pytest.mark.parametrize("queue", ["tx", "rx"])
def test_avail_idx_beyond_ring_size(session: GuestSession, queue: str) -> None:
    drv = session.driver
    drv.bring_up()
    pair = drv.pairs[0]
    q = pair.tx if queue == "tx" else pair.rx
    session.mem.write_u16(q.avail_idx_addr, (q.published_idx + q.size + 5) & 0xFFFF)
    q.kick(force=True)
    if queue == "rx":  # the rx worker looks at the ring when a frame comes
        session.env.port.send(tagged_frame(GUEST_MAC, b"wake-rx"))
    session.env.wait_log(guest_error(queue, "avail_idx"))
    assert_needs_reset(session, rf"queue pair 0 {queue} ring corrupt \(avail_idx\)")
    # The other direction keeps working until the driver resets the device.
    if queue == "tx":
        session.mem.write_u16(q.avail_idx_addr, q.published_idx)
        assert_rx_still_works(session, b"rx-while-tx-broken")
    else:
        assert_tx_still_works(session, b"tx-while-rx-broken")
    session.env.assert_alive()
    restart_and_check(session, b"after-avail-idx")
    counters = session.env.final_counters()
    assert counters["queues"][0][queue]["errors"]["avail_idx"] == 1
    assert counters["device"]["needs_reset"] == 1


def test_needs_reset_sets_isr_config_bit(session: GuestSession) -> None:
    """virtio 1.x 4.1.4.5.1: the device sets the configuration-change bit in
    ISR status before sending a configuration change notification, which
    DEVICE_NEEDS_RESET requires (2.1.2)."""
    drv = session.driver
    drv.bring_up()
    t = drv.transport
    assert t.read_isr() == 0
    tx = drv.pairs[0].tx
    session.mem.write_u16(tx.avail_idx_addr, (tx.published_idx + tx.size + 1) & 0xFFFF)
    tx.kick(force=True)
    assert_needs_reset(session, "queue pair 0 tx ring corrupt")
    assert t.read_isr() & 2, "ISR configuration-change bit not set for DEVICE_NEEDS_RESET"


def test_head_index_out_of_range(session: GuestSession) -> None:
    drv = session.driver
    drv.bring_up()
    tx = drv.pairs[0].tx
    session.mem.write_u16(tx.avail_ring_addr(tx.avail_idx), tx.size + 3)
    tx.avail_idx = (tx.avail_idx + 1) & 0xFFFF
    publish_kick(tx)
    session.env.wait_log(guest_error("tx", "head_index"))
    assert_needs_reset(session, r"queue pair 0 tx ring corrupt \(head_index\)")
    assert_rx_still_works(session, b"rx-while-tx-broken")
    restart_and_check(session, b"after-head-index")
    counters = session.env.final_counters()
    assert counters["queues"][0]["tx"]["errors"]["head_index"] == 1
    assert counters["device"]["needs_reset"] == 1


# --------------------------------------------------------------------------
# Control queue
# --------------------------------------------------------------------------

MALFORMED_CTRL: dict[str, tuple[int, int, bytes]] = {
    "unknown_class": (200, 0, b""),
    "unknown_rx_cmd": (VIRTIO_NET_CTRL_RX, 9, b"\1"),
    "rx_no_data": (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b""),
    "rx_long_data": (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\1\0"),
    "rx_bad_value": (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\2"),
    "mac_table_uc_overcount": (
        VIRTIO_NET_CTRL_MAC,
        VIRTIO_NET_CTRL_MAC_TABLE_SET,
        struct.pack("<I", 5) + OTHER_UC + struct.pack("<I", 0),
    ),
    "mac_table_mc_overcount": (
        VIRTIO_NET_CTRL_MAC,
        VIRTIO_NET_CTRL_MAC_TABLE_SET,
        struct.pack("<I", 1) + OTHER_UC + struct.pack("<I", 3) + bytes.fromhex("01005e000001"),
    ),
    "mac_table_huge_count": (
        VIRTIO_NET_CTRL_MAC,
        VIRTIO_NET_CTRL_MAC_TABLE_SET,
        struct.pack("<I", 0xFFFFFFFF) + OTHER_UC + struct.pack("<I", 0),
    ),
    "mac_table_no_mc_table": (
        VIRTIO_NET_CTRL_MAC,
        VIRTIO_NET_CTRL_MAC_TABLE_SET,
        struct.pack("<I", 1) + OTHER_UC,
    ),
    "mac_table_trailing": (
        VIRTIO_NET_CTRL_MAC,
        VIRTIO_NET_CTRL_MAC_TABLE_SET,
        mac_table([OTHER_UC]) + b"\0\0",
    ),
    "mac_table_truncated": (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, b"\1\0"),
    "mac_addr_short": (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, OTHER_UC[:5]),
    "mac_addr_long": (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, OTHER_UC + b"\0"),
    "unknown_mac_cmd": (VIRTIO_NET_CTRL_MAC, 7, OTHER_UC),
    "mq_not_negotiated": (VIRTIO_NET_CTRL_MQ, 0, struct.pack("<H", 1)),
    "announce_not_negotiated": (VIRTIO_NET_CTRL_ANNOUNCE, 0, b""),
    "offloads_not_negotiated": (VIRTIO_NET_CTRL_GUEST_OFFLOADS, 0, struct.pack("<Q", 2)),
    "mac_table_zero_padded": (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, bytes(3000)),
}


def _filtered_setup(s: GuestSession) -> VirtioNetDriver:
    """Bring up with promisc off and LISTED_UC in the unicast table."""
    drv = s.driver
    drv.bring_up()
    assert drv.ctrl_command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\0") == 0
    ok = drv.ctrl_command(
        VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, mac_table([LISTED_UC])
    )
    assert ok == VIRTIO_NET_OK
    return drv


def _assert_filter_unchanged(s: GuestSession, tag: str) -> None:
    drv = s.driver
    assert drv.read_config().mac == GUEST_MAC
    port = s.env.port
    port.send(tagged_frame(OTHER_UC, f"{tag}-other".encode()))
    port.send(tagged_frame(LISTED_UC, f"{tag}-listed".encode()))
    port.send(tagged_frame(GUEST_MAC, f"{tag}-own".encode()))
    for which in ("listed", "own"):
        _, frame = drv.recv_packet(timeout=3)
        assert has_tag(frame, f"{tag}-{which}".encode()), f"got {frame[:40].hex()}"


@pytest.mark.parametrize("case", sorted(MALFORMED_CTRL))
def test_malformed_control_command(session: GuestSession, case: str) -> None:
    drv = _filtered_setup(session)
    cls, cmd, data = MALFORMED_CTRL[case]
    assert drv.ctrl_command(cls, cmd, data) == VIRTIO_NET_ERR
    session.env.wait_log(rf"control queue: command class {cls} cmd {cmd} \(\d+ bytes\) refused")
    _assert_filter_unchanged(session, case)
    assert drv.ctrl_command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\1") == 0
    assert_healthy(session)
    device = session.env.final_counters()["device"]
    assert (device["ctrl_err"], device["ctrl_ok"]) == (1, 3)


def rss_config(
    table: tuple[int, ...] = (0, 1, 2, 3),
    *,
    types: int = 0x3F,
    unclassified: int = 0,
    max_tx: int = 4,
    key: bytes = bytes(range(40)),
    mask: int | None = None,
) -> bytes:
    """struct virtio_net_rss_config."""
    m = len(table) - 1 if mask is None else mask
    return (
        struct.pack("<IHH", types, m, unclassified)
        + b"".join(struct.pack("<H", q) for q in table)
        + struct.pack("<HB", max_tx, len(key))
        + key
    )


MQ_PAIRS = 4
MALFORMED_MQ: dict[str, tuple[int, bytes]] = {
    "pairs_zero": (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 0)),
    "pairs_too_many": (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", MQ_PAIRS + 1)),
    "pairs_huge": (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 0xFFFF)),
    "pairs_short": (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\1"),
    "pairs_long": (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\1\0\0"),
    "rss_truncated": (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, rss_config()[:7]),
    "rss_table_truncated": (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, rss_config()[:12]),
    "rss_table_not_pow2": (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, rss_config((0, 1, 2))),
    "rss_table_too_big": (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, rss_config((0,) * 256)),
    "rss_mask_beyond_data": (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, rss_config(mask=0x7F)),
    "rss_entry_out_of_range": (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, rss_config((0, 1, 2, 9))),
    "rss_unclassified_out_of_range": (
        VIRTIO_NET_CTRL_MQ_RSS_CONFIG,
        rss_config(unclassified=MQ_PAIRS),
    ),
    "rss_max_tx_zero": (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, rss_config(max_tx=0)),
    "rss_max_tx_too_many": (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, rss_config(max_tx=MQ_PAIRS + 1)),
    "rss_key_too_long": (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, rss_config(key=bytes(41))),
    "rss_key_truncated": (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, rss_config()[:-30]),
    "rss_unknown_hash_types": (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, rss_config(types=1 << 20)),
    "hash_config_not_negotiated": (VIRTIO_NET_CTRL_MQ_HASH_CONFIG, bytes(13)),
    "unknown_mq_cmd": (9, struct.pack("<H", 1)),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_MQ))
def test_malformed_multiqueue_command(env_factory: Callable[..., DeviceEnv], case: str) -> None:
    """With 4 queue pairs and RSS negotiated: malformed MQ commands are
    answered VIRTIO_NET_ERR and change neither the pairs nor the RSS state."""
    env = env_factory("--queue-pairs", str(MQ_PAIRS), multi_queue=True)
    s = open_session(env, features=GUEST_FEATURES | bit(VIRTIO_NET_F_RSS))
    try:
        drv = s.driver
        drv.bring_up(pairs=MQ_PAIRS)
        assert drv.has(VIRTIO_NET_F_RSS)
        good = rss_config((3, 2, 1, 0))
        assert drv.ctrl_command(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_RSS_CONFIG, good) == 0
        before = env.counters()["steering"]
        cmd, data = MALFORMED_MQ[case]
        assert drv.ctrl_command(VIRTIO_NET_CTRL_MQ, cmd, data) == VIRTIO_NET_ERR
        env.wait_log(rf"control queue: command class {VIRTIO_NET_CTRL_MQ} cmd {cmd} .* refused")
        after = env.counters()["steering"]
        assert after["active_queue_pairs"] == MQ_PAIRS
        assert after["rss"] == before["rss"]
        assert after["rss"]["table"] == [3, 2, 1, 0]
        assert not drv.transport.status & STATUS_DEVICE_NEEDS_RESET
        for pair in range(MQ_PAIRS):
            tag = f"mq-tx{pair}".encode()
            drv.send_packet(tagged_frame(BROADCAST, tag, src=GUEST_MAC), pair=pair)
            assert env.port.recv(functools.partial(has_tag, tag=tag)) is not None
    finally:
        s.close()


def _ctrl_raw(s: GuestSession, chain: list[tuple[int, int, bool]]) -> tuple[int, int]:
    """Put a raw chain on the control queue; returns (used len, head)."""
    drv = s.driver
    q = drv.ctrl
    assert q is not None
    head = q.add_buf(chain, "raw", indirect=False)
    q.kick(force=True)
    e = wait_used(drv, q)
    assert e.id == head
    return e.len, head


def test_control_chain_malformations(session: GuestSession) -> None:
    drv = _filtered_setup(session)
    mem = session.mem
    env = session.env
    buf = mem.alloc(64)
    ack = mem.alloc(16)

    # A one-byte command (no cmd byte): ERR in the ack.
    mem.write(buf, bytes([VIRTIO_NET_CTRL_RX]))
    mem.write_u8(ack, 0xFF)
    used, _ = _ctrl_raw(session, [(buf, 1, False), (ack, 1, True)])
    assert (used, mem.read_u8(ack)) == (1, VIRTIO_NET_ERR)
    env.wait_log(r"control queue: command class 0 cmd 0 \(1 bytes\) refused")

    # Only an ack buffer: an empty command, ERR.
    mem.write_u8(ack, 0xFF)
    used, _ = _ctrl_raw(session, [(ack, 1, True)])
    assert (used, mem.read_u8(ack)) == (1, VIRTIO_NET_ERR)

    # No writable byte for the ack: returned unanswered.
    mem.write(buf, bytes([VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, 1]))
    used, _ = _ctrl_raw(session, [(buf, 3, False)])
    assert used == 0
    env.wait_log(r"control queue: malformed command chain \(no ack buffer\)")

    # Command split over buffers with the ack outside memory: not applied.
    used, _ = _ctrl_raw(
        session, [(buf, 2, False), (buf + 2, 1, False), (mem.end + 0x1000, 1, True)]
    )
    assert used == 0
    env.wait_log(r"control queue: malformed command chain \(desc_addr\)")

    # A command larger than any the device accepts (64 KiB): ERR, not applied.
    big = mem.alloc(70000)
    mem.write(big, bytes([VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, 1]))
    mem.write_u8(ack, 0xFF)
    used, _ = _ctrl_raw(session, [(big, 70000, False), (ack, 1, True)])
    assert (used, mem.read_u8(ack)) == (1, VIRTIO_NET_ERR)
    env.wait_log(r"control queue: command of 70000 bytes refused")

    # A loop on the control queue.
    q = drv.ctrl
    assert q is not None
    ids = raw_chain(q, 2, "ctrl-loop")
    q.write_desc(q.desc_addr, ids[0], buf, 2, VRING_DESC_F_NEXT, ids[1])
    q.write_desc(q.desc_addr, ids[1], buf, 1, VRING_DESC_F_NEXT, ids[0])
    publish_kick(q)
    e = wait_used(drv, q)
    assert (e.id, e.len) == (ids[0], 0)
    env.wait_log(r"control queue: malformed command chain \(desc_loop\)")

    _assert_filter_unchanged(session, "ctrl-chains")
    # The control queue still answers.
    assert drv.ctrl_command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\1") == 0
    assert_healthy(session)
    counters = session.env.final_counters()
    assert counters["device"]["ctrl_err"] == 6
    assert counters["ctrl"]["errors"]["desc_addr"] == 1
    assert counters["ctrl"]["errors"]["desc_loop"] == 1


def test_control_avail_idx_corrupt(session: GuestSession) -> None:
    drv = session.driver
    drv.bring_up()
    q = drv.ctrl
    assert q is not None
    session.mem.write_u16(q.avail_idx_addr, (q.published_idx + 1000) & 0xFFFF)
    q.kick(force=True)
    assert_needs_reset(session, "control queue ring corrupt")
    assert_tx_still_works(session, b"tx-while-ctrl-broken")
    restart_and_check(session, b"after-ctrl-corrupt")


# --------------------------------------------------------------------------
# Doorbells, BAR0 and config space
# --------------------------------------------------------------------------


def _notify_base(t: VirtioPciTransport) -> tuple[int, int, int]:
    n = t.notify
    return n.bar, n.offset, n.length


def test_doorbells_for_missing_queues(session: GuestSession) -> None:
    drv = session.driver
    t = drv.transport
    c = session.client
    bar, off, length = _notify_base(t)
    # Before any set-up: every doorbell, of every width.
    for o in range(0, length, 2):
        c.region_write(bar, off + o, struct.pack("<H", o // 4), posted=True)
    c.sync()
    drv.bring_up()
    for o in range(0, length, 4):
        c.region_write(bar, off + o, struct.pack("<I", 0xFFFF0000 | o), posted=True)
    for o in (1, 3, 5, length - 1):
        c.region_write(bar, off + o, b"\xff", posted=True)
    c.sync()
    session.env.assert_alive()
    assert_healthy(session)
    assert_tx_still_works(session, b"after-doorbells")
    assert_rx_still_works(session, b"rx-after-doorbells")
    assert session.env.final_counters()["device"]["doorbells_invalid"] > 0


def _random_writes(
    c: vu.VfioUserClient, region: int, size: int, rng: random.Random, beyond: int = 16
) -> int:
    """A random value of a random width at every offset (and a few past the
    end); returns how many writes the server refused."""
    refused = 0
    for off in [*range(size), *range(size, size + beyond)]:
        width = rng.choice((1, 2, 4, 8))
        try:
            c.region_write(region, off, rng.randbytes(width))
        except vu.VfioUserError:
            refused += 1
    return refused


@pytest.mark.parametrize("phase", ["before_setup", "running"])
def test_random_bar0_writes(session: GuestSession, phase: str) -> None:
    """A random value of a random width at every offset of BAR0 (common
    config, ISR, device config, doorbells), then a few thousand random writes
    into the common configuration, before any set-up or with the datapath
    running and frames flowing."""
    drv = session.driver
    if phase == "running":
        drv.bring_up()
    c = session.client
    seed = random.randrange(2**32)
    log.warning("random seed %d", seed)
    rng = random.Random(seed)
    info = c.region_info(vu.VFU_PCI_DEV_BAR0_REGION_IDX)
    info.close_fds()
    common = drv.transport.common
    _random_writes(c, vu.VFU_PCI_DEV_BAR0_REGION_IDX, info.size, rng)
    for i in range(3000):
        width = rng.choice((1, 2, 4, 8))
        off = common.offset + rng.randrange(common.length)
        with contextlib.suppress(vu.VfioUserError):
            c.region_write(common.bar, off, rng.randbytes(width), posted=i % 2 == 0)
        if i % 300 == 0:
            session.env.port.send(tagged_frame(GUEST_MAC, b"noise"))
    session.env.assert_alive()
    assert c.device_info().num_regions > 0, f"seed {seed}: device stopped answering"
    assert c.config_read(0, 4) == b"\xf4\x1a\x41\x10"
    restart_and_check(session, b"after-bar0-fuzz")


def test_random_config_space_writes(session: GuestSession) -> None:
    drv = session.driver
    drv.bring_up()
    c = session.client
    seed = random.randrange(2**32)
    log.warning("random seed %d", seed)
    rng = random.Random(seed)
    before = c.config_read(0, 256)
    vcaps, msix = parse_virtio_caps(before)
    info = c.region_info(vu.VFU_PCI_DEV_CFG_REGION_IDX)
    info.close_fds()
    for _ in range(2):
        _random_writes(c, vu.VFU_PCI_DEV_CFG_REGION_IDX, info.size, rng)
    # The MSI-X BAR too (QEMU emulates the table; writes land in the device).
    if msix is not None:
        bar = c.region_info(msix.table_bar)
        bar.close_fds()
        _random_writes(c, msix.table_bar, bar.size, rng)
    session.env.assert_alive()
    after = c.config_read(0, 256)
    assert after[:4] == before[:4], f"seed {seed}: identity changed"
    assert after[8:12] == before[8:12], f"seed {seed}: revision/class changed"
    # PCI_CFG's bar, offset and length are the driver's to write.
    fixed = [v for v in vcaps if v.cfg_type != CfgType.PCI]
    now = [v for v in parse_virtio_caps(after)[0] if v.cfg_type != CfgType.PCI]
    assert now == fixed, f"seed {seed}: virtio caps changed"
    restart_and_check(session, b"after-cfg-fuzz")


def test_bogus_common_config_values(session: GuestSession) -> None:
    t = session.driver.transport
    # A queue that does not exist reads as size 0 and ignores writes.
    t.select_queue(77)
    assert t.common_read(COMMON_Q_SIZE, 2) == 0
    t.common_write(COMMON_Q_SIZE, 2, 64)
    t.common_write(0x1C, 2, 1)
    assert t.common_read(COMMON_Q_SIZE, 2) == 0
    # Vectors beyond the MSI-X table are refused (read back NO_VECTOR).
    t.select_queue(0)
    t.common_write(COMMON_Q_MSIX, 2, 500)
    assert t.common_read(COMMON_Q_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
    t.common_write(0x10, 2, 77)
    assert t.common_read(0x10, 2) == VIRTIO_MSI_NO_VECTOR
    # Feature select beyond the defined words.
    t.common_write(0x00, 4, 0xFFFFFFFF)
    assert t.common_read(0x04, 4) == 0
    session.driver.bring_up()
    assert_tx_still_works(session, b"after-bogus-common")


# --------------------------------------------------------------------------
# DMA unmaps under the device
# --------------------------------------------------------------------------


def test_dma_unmap_of_memory_in_use(session: GuestSession) -> None:
    drv = session.driver
    drv.bring_up()
    c = session.client
    mem = session.mem
    tx = drv.pairs[0].tx
    c.dma_unmap(mem.base, mem.size)
    # Traffic while the rings and buffers are gone.
    session.env.port.send(tagged_frame(GUEST_MAC, b"into-the-void"))
    buf = mem.alloc(256)
    mem.write(buf, tx_frame_bytes(b"from-the-void"))
    tx.add_buf([(buf, NET_HDR_SIZE + 60, False)], "void")
    tx.kick(force=True)
    assert drv.ctrl is not None
    drv.ctrl.kick(force=True)
    assert_needs_reset(session, r".*no longer in guest memory")
    session.env.assert_alive()
    assert session.env.port.recv(lambda f: has_tag(f, b"from-the-void"), timeout=0.3) is None
    mem.map_into(c)
    restart_and_check(session, b"after-unmap")


def test_dma_unmap_of_buffer_region(env: DeviceEnv) -> None:
    """Rings in one DMA region, some buffers in another that is unmapped:
    chains into it are bad (length 0, counted), the queues stay usable."""
    s = open_session(env, map_memory=False)
    try:
        half = GUEST_MEM_SIZE // 2
        c, mem, drv = s.client, s.mem, s.driver
        c.dma_map(mem.base, half, mem.fd, 0)
        c.dma_map(mem.base + half, half, mem.fd, half)
        drv.bring_up()
        assert mem.allocated < half
        mem.alloc(half - mem.allocated)
        upper = mem.alloc(4096)
        assert upper >= mem.base + half
        tx = drv.pairs[0].tx
        frame = tx_frame_bytes(b"upper-1")
        mem.write(upper, frame)
        head = tx.add_buf([(upper, len(frame), False)], "upper-1")
        tx.kick(force=True)
        assert wait_used(drv, tx).id == head
        assert env.port.recv(lambda f: has_tag(f, b"upper-1")) is not None

        c.dma_unmap(mem.base + half, half)
        frame = tx_frame_bytes(b"upper-2")
        mem.write(upper, frame)
        head = tx.add_buf([(upper, len(frame), False)], "upper-2")
        tx.kick(force=True)
        e = wait_used(drv, tx)
        assert (e.id, e.len) == (head, 0)
        env.wait_log(guest_error("tx", "desc_addr"))
        assert env.port.recv(lambda f: has_tag(f, b"upper-2"), timeout=0.3) is None
        assert_healthy(s)
        assert_tx_still_works(s, b"lower-after-unmap")
        assert_rx_still_works(s, b"rx-after-unmap")
        counters = env.final_counters()
        assert counters["queues"][0]["tx"]["errors"]["desc_addr"] == 1
        assert counters["device"]["dma_unmaps"] >= 1
        assert counters["device"]["needs_reset"] == 0
    finally:
        s.close()


# --------------------------------------------------------------------------
# The vfio-user socket
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    ["half_header", "huge_size", "bad_command", "short_dma_map", "random_bytes"],
)
def test_garbage_on_socket(env: DeviceEnv, garbage: str) -> None:
    """A client that sends junk and goes away; the next one works."""
    c = env.connect()
    payloads = {
        "half_header": vu.pack_header(1, vu.Command.DEVICE_GET_INFO, 0)[:7],
        "huge_size": vu.HEADER.pack(2, vu.Command.REGION_WRITE, 0x7FFFFFFF, 0, 0) + b"x" * 64,
        "bad_command": vu.pack_message(3, 999, b"\0" * 16),
        "short_dma_map": vu.pack_message(4, vu.Command.DMA_MAP, b"\0" * 8),
        "random_bytes": random.Random(7).randbytes(4096),
    }
    try:
        c.send_raw(payloads[garbage])
        time.sleep(0.05)
    except vu.VfioUserDisconnected:
        pass
    c.close()
    env.assert_alive()
    s2 = open_session(env)
    try:
        s2.driver.bring_up()
        assert_tx_still_works(s2, b"after-garbage")
    finally:
        s2.close()
