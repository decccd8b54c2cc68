"""The datapath's counters and state read into the types of snapshot.py: per
queue pair and direction, the control queue, the device's events, the
receive filter, the steering rule; and each ring as the device sees it.
Device.snapshot() puts them together; the metrics, the admin channel, `ctl`
and the SIGUSR2 dump read that.

Each reader takes the datapath's device handle; the sizes of the arrays they
walk are the C structures' own (decl/datapath.h takes them from the headers).
"""

from __future__ import annotations

from typing import Any

from vfiouser_net.native import ffi, lib
from vfiouser_net.snapshot import (
    DeviceCounters,
    DirStats,
    PairStats,
    RssState,
    RxFilterState,
    SteeringState,
)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def dir_stats(d: Any) -> DirStats:
    """One direction's counters (struct vn_dir_stats)."""
    return DirStats(
        packets=int(d.packets),
        bytes=int(d.bytes),
        doorbells=int(d.doorbells),
        interrupts=int(d.interrupts),
        interrupts_suppressed=int(d.interrupts_suppressed),
        interrupts_coalesced=int(d.interrupts_coalesced),
        ring_full=int(d.ring_full),
        batches=int(d.batches),
        bounced=int(d.bounced),
        steered_out=int(d.steered_out),
        avail_seen=int(d.avail_seen),
        used_idx=int(d.used_idx),
        batch_hist=[int(x) for x in d.batch_hist],
        size_hist=[int(x) for x in d.size_hist],
        drops={
            ffi.string(lib.vn_drop_reason_name(i)).decode(): int(d.drops[i])
            for i in range(lib.VN_DROP__COUNT)
        },
        errors={
            ffi.string(lib.vn_error_reason_name(i)).decode(): int(d.errors[i])
            for i in range(lib.VN_ERR__COUNT)
        },
    )


def queue_stats(dev: Any, qp: int) -> PairStats:
    """Pair qp's rx and tx counters, with the coalescing the guest set."""
    st = ffi.new("struct vn_qp_stats *")
    lib.vn_dev_get_qp_stats(dev, qp, st)
    out = PairStats(dir_stats(st.rx), dir_stats(st.tx))
    for i, direction in enumerate((out.rx, out.tx)):
        coal = lib.vn_dev_get_coal(dev, 2 * qp + i)
        direction.coalesce_max_packets = int(coal.max_packets)
        direction.coalesce_max_usecs = int(coal.max_usecs)
    return out


def ctrl_stats(dev: Any) -> DirStats:
    st = ffi.new("struct vn_dir_stats *")
    lib.vn_dev_get_ctrl_stats(dev, st)
    return dir_stats(st[0])


def device_stats(dev: Any) -> DeviceCounters:
    """The device's events (struct vn_dev_stats), and control commands by
    class and command for the slots that saw any."""
    st = ffi.new("struct vn_dev_stats *")
    lib.vn_dev_get_dev_stats(dev, st)
    events = {
        name: int(getattr(st, name)) for name, _ in ffi.typeof(st[0]).fields if name != "ctrl_cmds"
    }
    cmds: dict[str, dict[str, list[int]]] = {}
    for cls, by_cmd in enumerate(st.ctrl_cmds):
        for cmd, (ok, err) in enumerate(by_cmd):
            if ok or err:
                cmds.setdefault(str(cls), {})[str(cmd)] = [int(ok), int(err)]
    return DeviceCounters(events, cmds)


def steering(dev: Any) -> SteeringState:
    """The steering rule in force: policy, pairs, switches, the RSS
    configuration the driver set."""
    info = ffi.new("struct vn_steer_info *")
    lib.vn_dev_get_steering(dev, info)
    return SteeringState(
        policy=ffi.string(lib.vn_policy_name(info.policy)).decode(),
        effective=ffi.string(lib.vn_policy_name(info.effective)).decode(),
        active_queue_pairs=int(info.active_qps),
        max_queue_pairs=int(info.max_qps),
        switches=int(info.epoch),
        rss=RssState(
            configured=bool(info.rss_configured),
            hash_types=int(info.hash_types),
            table=[int(info.table[i]) for i in range(info.table_len)]
            if info.rss_configured
            else [],
            unclassified_queue=int(info.unclassified),
            key=bytes(info.key[0 : info.key_len]).hex(),
        ),
    )


def rx_filter(dev: Any) -> RxFilterState:
    """What the guest asked to receive (CTRL_RX, CTRL_MAC)."""
    f = ffi.new("struct vn_rx_filter *")
    lib.vn_dev_get_filter(dev, f)
    return RxFilterState(
        mac=format_mac(bytes(f.mac)),
        promisc=bool(f.promisc),
        allmulti=bool(f.allmulti),
        unicast=[format_mac(bytes(f.uc[i])) for i in range(f.n_uc)],
        multicast=[format_mac(bytes(f.mc[i])) for i in range(f.n_mc)],
        uni_overflow=bool(f.uni_overflow),
        multi_overflow=bool(f.multi_overflow),
    )


def ring_state(dev: Any, num_queues: int) -> list[dict[str, Any]]:
    """Each virtqueue as the device sees it (no guest memory is read)."""
    out = []
    st = ffi.new("struct vn_ring_state *")
    for qidx in range(num_queues):
        if lib.vn_dev_get_ring_state(dev, qidx, st) < 0:
            continue
        kind = "ctrl" if qidx == num_queues - 1 else ("rx" if qidx % 2 == 0 else "tx")
        out.append(
            {
                "index": qidx,
                "kind": kind,
                "pair": qidx // 2 if kind != "ctrl" else None,
                "configured": bool(st.configured),
                "ready": bool(st.ready),
                "broken": bool(st.broken),
                "event_idx": bool(st.event_idx),
                "size": int(st.size),
                "msix_vector": int(st.msix_vector),
                "avail_idx": int(st.avail_seen),
                "last_avail_idx": int(st.last_avail),
                "used_idx": int(st.used_idx),
                "in_flight": (int(st.avail_seen) - int(st.used_idx)) & 0xFFFF,
                "desc": hex(int(st.desc_gpa)),
                "driver": hex(int(st.avail_gpa)),
                "device": hex(int(st.used_gpa)),
            }
        )
    return out
