"""Attacks of a hostile vfio-user client with messages: SET_IRQS overflow,
region accesses out of range, REGION_INFO with a small argsz."""

from __future__ import annotations

import errno as errno_mod
import os
import time
from typing import TYPE_CHECKING

from vfiouser_net_harness import vfio_user_client as vu
from vfiouser_net_harness.hostile_driver.attack import AttackRun
from vfiouser_net_harness.hostile_driver.counters import daemon_fds
from vfiouser_net_harness.hostile_driver.layout import HEALTHY

if TYPE_CHECKING:
    from vfiouser_net_harness.hostile_driver.driver import HostileDriver


def attack_set_irqs_overflow(hd: HostileDriver, run: AttackRun) -> None:
    """SET_IRQS the server must refuse: start + count wrapping 32 bits, a
    huge count (with eventfds and with booleans), an index past the device's,
    more and fewer eventfds than the count says, a count of 0 with fds. Each
    gets an error reply, keeps none of its fds, and the current vectors
    still fire."""
    c = hd.c
    pid = hd.daemon_pid
    fds0 = None if pid is None else daemon_fds(pid)
    msix = vu.VFIO_PCI_MSIX_IRQ_INDEX
    trig = vu.VFIO_IRQ_SET_ACTION_TRIGGER
    ev, none, boolean = (
        vu.VFIO_IRQ_SET_DATA_EVENTFD,
        vu.VFIO_IRQ_SET_DATA_NONE,
        vu.VFIO_IRQ_SET_DATA_BOOL,
    )
    cases: list[tuple[str, int, int, int, int, bytes, int]] = [
        # name, index, start, count, flags, data, eventfds sent
        ("wrap", msix, 0xFFFFFFF0, 0x20, trig | ev, b"", 0),
        ("wrap_with_fds", msix, 0xFFFFFFFF, 2, trig | ev, b"", 2),
        ("wrap_none", msix, 0xFFFFFFFF, 2, trig | none, b"", 0),
        ("wrap_bool", msix, 0xFFFFFFFE, 4, trig | boolean, b"\x01" * 4, 0),
        ("huge_count", msix, 0, 0xFFFFFFFF, trig | ev, b"", 1),
        ("huge_count_bool", msix, 1, 0x10000000, trig | boolean, b"\x01" * 16, 0),
        ("huge_start", msix, 0x7FFFFFFF, 1, trig | ev, b"", 1),
        ("index_out_of_range", 0xFFFFFFFF, 0, 1, trig | ev, b"", 1),
        ("index_past_device", 9, 0, 1, trig | none, b"", 0),
        ("more_fds_than_count", msix, 1, 1, trig | ev, b"", 3),
        ("fewer_fds_than_count", msix, 1, 4, trig | ev, b"", 2),
        ("fds_with_count_0", msix, 0, 0, trig | ev, b"", 2),
        ("fds_with_data_none", msix, 1, 1, trig | none, b"", 1),
    ]
    accepted: list[str] = []
    for name, index, start, count, flags, data, nfds in cases:
        fds = [vu.new_eventfd() for _ in range(nfds)]
        try:
            reply = c.request(
                vu.Command.DEVICE_SET_IRQS,
                vu.pack_set_irqs(index, start, count, flags, data),
                fds,
                check=False,
            )
            assert reply is not None
            reply.close_fds()
            if not reply.header.error:
                accepted.append(name)
        finally:
            for fd in fds:
                os.close(fd)
    run.observed["accepted"] = accepted
    run.check(not accepted, f"malformed SET_IRQS accepted: {accepted}")
    run.check(hd.alive(), "the device stopped answering")
    if pid is not None:
        time.sleep(0.2)
        fds1 = daemon_fds(pid)
        run.observed["daemon_fds"] = {"before": fds0, "after": fds1}
        run.check(fds1 == fds0, f"the daemon kept descriptors: {fds0} -> {fds1}")
    # The vectors in place still fire.
    t = hd.d.transport
    healthy = [1 + 2 * p for p in HEALTHY]
    for v in healthy:
        t.irq_count(v)
    deadline = time.monotonic() + 3
    fired: set[int] = set()
    while time.monotonic() < deadline and not fired:
        fired = {v for v in healthy if t.irq_count(v)}
        time.sleep(0.05)
    run.observed["vectors_firing_after"] = sorted(fired)
    run.check(bool(fired), "no interrupt on the healthy pairs' vectors afterwards")
    run.unchanged("device.needs_reset")


def _region_sizes(hd: HostileDriver) -> dict[int, int]:
    out = {}
    for idx in (vu.VFU_PCI_DEV_BAR0_REGION_IDX, vu.VFU_PCI_DEV_CFG_REGION_IDX):
        info = hd.c.region_info(idx)
        info.close_fds()
        out[idx] = info.size
    return out


def attack_region_access_out_of_range(hd: HostileDriver, run: AttackRun) -> None:
    """REGION_READ and REGION_WRITE at odd offsets and sizes: across and past
    a region's end, offset + count wrapping 64 bits, a count far larger than
    the data (or than a message), a missing region; and 0 bytes. Each is
    refused with an error reply (0 bytes: an error or an empty success),
    the device's identity and state are unchanged, it keeps answering."""
    c = hd.c
    sizes = _region_sizes(hd)
    bar0 = vu.VFU_PCI_DEV_BAR0_REGION_IDX
    ident = c.config_read(0, 8)
    status = hd.d.transport.status
    bad: list[tuple[str, int, int, int, bytes]] = []  # name, region, offset, count, data
    for reg, size in sizes.items():
        r = "bar0" if reg == bar0 else "cfg"
        bad += [
            (f"{r}_across_end", reg, size - 2, 4, b"\xaa" * 4),
            (f"{r}_past_end", reg, size, 4, b"\xaa" * 4),
            (f"{r}_far_past_end", reg, 1 << 40, 4, b"\xaa" * 4),
            (f"{r}_wrap", reg, 2**64 - 2, 4, b"\xaa" * 4),
            (f"{r}_wrap_far", reg, 2**64 - 1, 0xFFFFFFFF, b"\xaa" * 4),
            (f"{r}_huge_count", reg, 0, 0xFFFFFFFF, b"\xaa" * 8),
            (f"{r}_count_over_region", reg, 0, size + 8, b"\xaa" * 8),
        ]
    bad += [
        ("missing_region", 42, 0, 4, b"\xaa" * 4),
        ("region_index_huge", 0xFFFFFFFF, 0, 4, b"\xaa" * 4),
        ("migration_region", vu.VFU_PCI_DEV_MIGR_REGION_IDX, 0, 4, b"\xaa" * 4),
    ]
    # Write-only: a write whose count says more than the data it carries.
    short = [(f"{'bar0' if reg == bar0 else 'cfg'}_count_over_data", reg) for reg in sizes]
    accepted: list[str] = []
    for name, reg in short:
        reply = c.request(
            vu.Command.REGION_WRITE, vu.REGION_ACCESS.pack(0, reg, 64) + b"\xaa" * 4, check=False
        )
        assert reply is not None
        reply.close_fds()
        if not reply.header.error:
            accepted.append(f"REGION_WRITE {name}")
    for name, reg, off, count, data in bad:
        for cmd in (vu.Command.REGION_READ, vu.Command.REGION_WRITE):
            payload = vu.REGION_ACCESS.pack(off, reg, count)
            if cmd == vu.Command.REGION_WRITE:
                payload += data
            reply = c.request(cmd, payload, check=False)
            assert reply is not None
            reply.close_fds()
            if not reply.header.error:
                accepted.append(f"{cmd.name} {name}")
    zero: dict[str, str] = {}
    for reg in sizes:
        for cmd in (vu.Command.REGION_READ, vu.Command.REGION_WRITE):
            reply = c.request(cmd, vu.REGION_ACCESS.pack(0, reg, 0), check=False)
            assert reply is not None
            reply.close_fds()
            ok = not reply.header.error
            if ok and cmd == vu.Command.REGION_READ:
                run.check(
                    len(reply.payload) <= vu.REGION_ACCESS.size,
                    f"{cmd.name} of 0 bytes returned {len(reply.payload)} bytes",
                )
            zero[f"{cmd.name} region {reg}"] = "ok" if ok else f"errno {reply.header.error_no}"
    run.observed["refused"] = 2 * len(bad) + len(short) - len(accepted)
    run.observed["accepted"] = accepted
    run.observed["zero_length"] = zero
    run.check(not accepted, f"out-of-range accesses accepted: {accepted}")
    run.check(hd.alive(), "the device stopped answering")
    run.check(c.config_read(0, 8) == ident, "the PCI identity changed")
    run.check(
        hd.d.transport.status == status,
        f"device status {status:#x} -> {hd.d.transport.status:#x}",
    )
    run.unchanged("device.needs_reset")


def attack_region_info_small_argsz(hd: HostileDriver, run: AttackRun) -> None:
    """DEVICE_GET_REGION_INFO with argsz smaller than struct vfio_region_info
    (0, 8, 31), with a payload shorter than its argsz, and with argsz 4 GiB - 1:
    refused with an error reply (the last: an error or a reply of sane size,
    no fds kept); the device keeps answering."""
    c = hd.c
    pid = hd.daemon_pid
    fds0 = None if pid is None else daemon_fds(pid)
    refused: dict[str, str] = {}
    accepted: list[str] = []
    for idx in (vu.VFU_PCI_DEV_BAR0_REGION_IDX, vu.VFU_PCI_DEV_CFG_REGION_IDX):
        cases = [
            (f"argsz_{n}_region_{idx}", vu.pack_region_info_request(idx, n)) for n in (0, 8, 31)
        ]
        cases.append((f"short_payload_region_{idx}", vu.pack_region_info_request(idx)[:12]))
        for name, payload in cases:
            reply = c.request(vu.Command.DEVICE_GET_REGION_INFO, payload, check=False)
            assert reply is not None
            reply.close_fds()
            if reply.header.error:
                refused[name] = errno_mod.errorcode.get(reply.header.error_no, "?")
            else:
                accepted.append(name)
        reply = c.request(
            vu.Command.DEVICE_GET_REGION_INFO,
            vu.pack_region_info_request(idx, 0xFFFFFFFF),
            check=False,
        )
        assert reply is not None
        reply.close_fds()
        run.check(
            len(reply.payload) <= 64 << 10,
            f"region {idx}: argsz 4 GiB - 1 answered with {len(reply.payload)} bytes",
        )
    run.observed["refused"] = refused
    run.observed["accepted"] = accepted
    run.check(not accepted, f"GET_REGION_INFO with a short argsz accepted: {accepted}")
    run.check(hd.alive(), "the device stopped answering")
    info = c.region_info(vu.VFU_PCI_DEV_CFG_REGION_IDX)
    info.close_fds()
    run.check(info.size >= 256, f"config space region now {info.size} bytes")
    if pid is not None:
        fds1 = daemon_fds(pid)
        run.check(fds1 == fds0, f"the daemon kept descriptors: {fds0} -> {fds1}")
    run.unchanged("device.needs_reset")
