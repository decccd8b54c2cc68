"""Attacks through the device's regions and interrupts: doorbells, config
space and BAR0 writes, SET_IRQS churn, a message flood."""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vfiouser_net_harness import vfio_user_client as vu
from vfiouser_net_harness.hostile_driver.attack import AttackRun
from vfiouser_net_harness.hostile_driver.counters import daemon_rss_kib
from vfiouser_net_harness.hostile_driver.layout import HEALTHY, PAIRS
from vfiouser_net_harness.virtio_pci_driver import (
    COMMON_GF,
)

if TYPE_CHECKING:
    from vfiouser_net_harness.hostile_driver.driver import HostileDriver


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
