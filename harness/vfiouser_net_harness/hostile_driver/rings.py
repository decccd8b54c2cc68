"""Attacks on the rings: descriptors, chains, indices, a starved receive ring."""

from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING

from vfiouser_net_harness.hostile_driver.attack import BROKEN_DROPS, RX, TX, AttackRun
from vfiouser_net_harness.hostile_driver.counters import counter_value
from vfiouser_net_harness.hostile_driver.layout import (
    A_END,
    A_START,
    ATTACKED,
    B_END,
    BUF_SIZE,
    C_END,
    HOLE,
    guest_frame,
    tag_of,
)
from vfiouser_net_harness.virtio_pci_driver import (
    NET_HDR_SIZE,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    SplitQueue,
)

if TYPE_CHECKING:
    from vfiouser_net_harness.hostile_driver.driver import HostileDriver


def tx_frame_in_c(hd: HostileDriver, tag: str) -> int:
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
    good = tx_frame_in_c(hd, "straddle-good")
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
    buf = tx_frame_in_c(hd, "loop")
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
    buf = tx_frame_in_c(hd, "long")
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
