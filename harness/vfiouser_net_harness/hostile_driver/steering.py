"""Attack on steering: frames steered to pairs without rings, a flood of 64 KiB frames."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vfiouser_net_harness.hostile_driver.attack import AttackRun
from vfiouser_net_harness.hostile_driver.counters import counter_value, daemon_rss_anon_kib
from vfiouser_net_harness.hostile_driver.layout import (
    ATTACKED,
    BUF_SIZE,
    ETH_P_IP,
    FEATURES,
    FLOOD_FRAMES,
    FLOOD_PAYLOAD,
    FLOW_DPORT,
    FLOW_DST,
    FLOW_SRC,
    PAIR_NOT_READY,
    PAIRS,
    PEER_MAC,
    QUEUE_SIZE,
    STEER_RSS_BOUND_KIB,
    TAP_FLOOD_MTU,
    ipv4_udp,
    rss_config,
    tag_of,
)
from vfiouser_net_harness.virtio_pci_driver import (
    NET_HDR_SIZE,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_RSS_CONFIG,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_OK,
    bit,
)

if TYPE_CHECKING:
    from vfiouser_net_harness.hostile_driver.driver import HostileDriver


def _set_mtu(sock: socket.socket, mtu: int) -> int:
    """Set the MTU of the interface ``sock`` (AF_PACKET) is bound to, in its
    namespace; returns the old one."""
    import fcntl

    ifname = sock.getsockname()[0]
    siocgifmtu, siocsifmtu = 0x8921, 0x8922
    req = struct.pack("16si20x", ifname.encode(), 0)
    old = struct.unpack_from("16si", fcntl.ioctl(sock.fileno(), siocgifmtu, req))[1]
    fcntl.ioctl(sock.fileno(), siocsifmtu, struct.pack("16si20x", ifname.encode(), mtu))
    return int(old)


def _flood(hd: HostileDriver, n: int, sports: Sequence[int]) -> None:
    payload = b"VNT:xflood:" + bytes(FLOOD_PAYLOAD - 11)
    frames = [
        hd.mac + PEER_MAC + struct.pack("!H", ETH_P_IP)
        + ipv4_udp(FLOW_SRC, FLOW_DST, sport, FLOW_DPORT, payload)
        for sport in sports
    ]  # fmt: skip
    for i in range(n):
        with contextlib.suppress(OSError):
            hd.host_send(frames[i % len(frames)])


def _recv_recycling(hd: HostileDriver, run: AttackRun, timeout: float) -> bool:
    """Pair 0 receives a frame sent now: every used buffer goes back to the
    ring in batches (the frames held from a flood, in the device and in the
    TAP's queues, come first), and a new frame is sent every 0.5 s (the TAP
    drops what its full queues cannot take)."""
    rx = hd.d.pairs[ATTACKED].rx
    deadline = time.monotonic() + timeout
    tags: set[str] = set()
    next_send = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() >= next_send:
            tag = hd.tag("p0back")
            tags.add(tag)
            hd.host_send(hd.host_frame(ATTACKED, tag))
            next_send = time.monotonic() + 0.5
        used = rx.poll_used()
        if not used:
            hd.wait_used_idx_change(rx, 0.1)
            continue
        for e in used:
            if not isinstance(e.token, tuple):
                continue
            addr = int(e.token[1])
            if e.len >= NET_HDR_SIZE and tag_of(hd.mem.read(addr, e.len)[NET_HDR_SIZE:]) in tags:
                run.observed["frames_sent_until_received"] = len(tags)
                return True
            rx.add_buf([(addr, BUF_SIZE, True)], e.token, indirect=False, publish=False)
        hd.publish_kick(rx)
    return run.check(False, f"pair {ATTACKED} received none of {len(tags)} frames in {timeout} s")


def attack_steering_to_unconfigured_pairs(hd: HostileDriver, run: AttackRun) -> None:
    """MQ negotiated, only pair 0 set up (with TSO: 64 KiB frames), then
    VQ_PAIRS_SET 4 and a flood of 64 KiB frames from the TAP, then an RSS
    table naming only pairs 1-3 and another flood. The device refuses the
    commands (VIRTIO_NET_ERR) or drops the frames for the pairs without
    rings (drops.pair_not_ready); the daemon's heap stays within
    STEER_RSS_BOUND_KIB; after VQ_PAIRS_SET 1, pair 0 receives."""
    pid = hd.daemon_pid
    if not run.check(pid is not None, "steering_to_unconfigured_pairs needs the daemon's pid"):
        return
    assert pid is not None
    tso = FEATURES | bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4)
    err = hd.reinit(pairs=1, features=tso)
    if not run.check(err is None, f"bring-up with pair 0 only: {err}"):
        return
    run.observed["tso"] = hd.d.has(VIRTIO_NET_F_GUEST_TSO4)
    hd.pair0_buffers(QUEUE_SIZE)
    base = hd.counters()
    old_mtu = _set_mtu(hd.packet_sock, TAP_FLOOD_MTU)
    rss: list[int | None] = [daemon_rss_anon_kib(pid)]
    acks: list[int] = []
    try:
        acks.append(hd.d.set_queue_pairs(PAIRS))
        _flood(hd, FLOOD_FRAMES, [hd.sports[p] for p in range(PAIRS)] + list(range(30000, 30013)))
        time.sleep(0.5)
        rss.append(daemon_rss_anon_kib(pid))
        acks.append(
            hd.d.ctrl_command(
                VIRTIO_NET_CTRL_MQ,
                VIRTIO_NET_CTRL_MQ_RSS_CONFIG,
                rss_config((1, 2, 3, 1), unclassified=1),
            )
        )
        _flood(hd, FLOOD_FRAMES, [hd.sports[p] for p in range(PAIRS)])
        time.sleep(0.5)
        rss.append(daemon_rss_anon_kib(pid))
    finally:
        _set_mtu(hd.packet_sock, old_mtu)
    run.observed["acks"] = acks
    run.observed["daemon_rss_anon_kib"] = rss
    run.check(hd.daemon_alive is None or hd.daemon_alive(), "the daemon died")
    if None not in rss:
        grown = max(int(r or 0) for r in rss[1:]) - int(rss[0] or 0)
        run.observed["rss_anon_growth_kib"] = grown
        run.check(
            grown <= STEER_RSS_BOUND_KIB,
            f"the daemon's heap grew {grown} KiB under the flood (bound {STEER_RSS_BOUND_KIB})",
        )
    after = hd.counters()
    b, a = counter_value(base, PAIR_NOT_READY), counter_value(after, PAIR_NOT_READY)
    not_ready = None if a is None or b is None else a - b
    run.observed["pair_not_ready_drops"] = not_ready
    if VIRTIO_NET_OK in acks:
        run.check(
            not_ready is not None and not_ready >= 1,
            f"frames steered to pairs without rings not counted ({PAIR_NOT_READY}: {not_ready})",
        )
    # Back to one pair: pair 0 receives.
    ack = hd.d.set_queue_pairs(1)
    run.observed["back_to_one_pair"] = ack
    run.check(ack == VIRTIO_NET_OK, f"VQ_PAIRS_SET 1 answered {ack}")
    _recv_recycling(hd, run, timeout=30)
    run.unchanged("device.needs_reset")


# The attacks of issue #11 (a hostile client, a hostile guest): scope and
# expected reaction. Before the fixes several of them take the daemon down.
