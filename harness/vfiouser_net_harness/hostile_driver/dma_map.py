"""Attacks of a hostile vfio-user client with DMA maps: permissions, sizes,
offsets, a truncated file, repeats."""

from __future__ import annotations

import errno as errno_mod
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vfiouser_net_harness import vfio_user_client as vu
from vfiouser_net_harness.guest_memory import GuestMemory
from vfiouser_net_harness.hostile_driver.attack import RX, TX, AttackRun
from vfiouser_net_harness.hostile_driver.counters import counter_value, daemon_fds
from vfiouser_net_harness.hostile_driver.layout import (
    ATTACKED,
    BUF_SIZE,
    CANARY,
    DMA_REFUSED,
    DMA_REPEATS,
    FOREIGN_IOVA,
    HEALTHY,
    MIN_FRAMES,
    TRAFFIC_WAIT,
    guest_frame,
    tag_of,
)
from vfiouser_net_harness.hostile_driver.memory import diff_runs, merge_ranges
from vfiouser_net_harness.virtio_pci_driver import (
    NET_HDR_SIZE,
    STATUS_DEVICE_NEEDS_RESET,
    VRING_DESC_F_WRITE,
)

if TYPE_CHECKING:
    from vfiouser_net_harness.hostile_driver.driver import HostileDriver


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
        runs = merge_ranges(diff_runs(real, bytes(shadow), 0, n))
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
