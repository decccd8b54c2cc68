"""Attacks with guest memory: rings in unmapped memory, DMA unmaps of memory in use."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from vfiouser_net_harness.hostile_driver.attack import BROKEN_DROPS, RX, TX, AttackRun
from vfiouser_net_harness.hostile_driver.counters import counter_value
from vfiouser_net_harness.hostile_driver.layout import (
    A_END,
    ATTACKED,
    B_END,
    B_START,
    C_END,
    C_START,
    DRAIN_UNMAP_ATTEMPTS,
    PAIRS,
)
from vfiouser_net_harness.hostile_driver.rings import tx_frame_in_c
from vfiouser_net_harness.virtio_pci_driver import (
    NET_HDR_SIZE,
    STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_NET_OK,
)

if TYPE_CHECKING:
    from vfiouser_net_harness.hostile_driver.driver import HostileDriver


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
    frames = [tx_frame_in_c(hd, "void") for _ in range(2)]
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
