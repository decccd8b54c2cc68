"""Attacks on the control queue: a corrupt ring, malformed commands, a queue kept busy."""

from __future__ import annotations

import struct
import threading
import time
from typing import TYPE_CHECKING

from vfiouser_net_harness import vfio_user_client as vu
from vfiouser_net_harness.hostile_driver.attack import AttackRun
from vfiouser_net_harness.hostile_driver.layout import (
    CTRL_BUDGET,
    CTRL_BUSY_SECONDS,
    MSG_REPLY_BOUND,
    PAIRS,
    rss_config,
)
from vfiouser_net_harness.virtio_pci_driver import (
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_RSS_CONFIG,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_ERR,
)

if TYPE_CHECKING:
    from vfiouser_net_harness.hostile_driver.driver import HostileDriver


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
