"""Snapshots for the fake devices of unit tests and fuzz targets: the fields
a fake sets, the rest zero or empty, checked by DeviceSnapshot.from_dict as
a device process's answer would be."""

from __future__ import annotations

from typing import Any

from vfiouser_net.snapshot import DeviceSnapshot

_DIRECTION: dict[str, Any] = {
    "packets": 0,
    "bytes": 0,
    "doorbells": 0,
    "interrupts": 0,
    "interrupts_suppressed": 0,
    "interrupts_coalesced": 0,
    "ring_full": 0,
    "batches": 0,
    "bounced": 0,
    "steered_out": 0,
    "avail_seen": 0,
    "used_idx": 0,
    "batch_hist": [],
    "size_hist": [],
    "drops": {},
    "errors": {},
}

_DEVICE: dict[str, Any] = {
    "name": "",
    "socket": "",
    "tap": "",
    "connected": False,
    "status": 0,
    "features": [],
    "offered_features": [],
    "link_up": True,
    "tap_lost": False,
    "mtu": 1500,
    "tap_io": "writev",
    "queue_pairs": 1,
    "steering": {
        "policy": "auto",
        "effective": "auto",
        "active_queue_pairs": 0,
        "max_queue_pairs": 1,
        "switches": 0,
        "rss": {
            "configured": False,
            "hash_types": 0,
            "table": [],
            "unclassified_queue": 0,
            "key": "",
        },
    },
    "rx_filter": {
        "mac": "00:00:00:00:00:00",
        "promisc": False,
        "allmulti": False,
        "unicast": [],
        "multicast": [],
        "uni_overflow": False,
        "multi_overflow": False,
    },
    "queues": [],
    "ctrl": _DIRECTION,
    "device": {"ctrl_cmds": {}},
}


def _merge(base: Any, given: Any) -> Any:
    if isinstance(base, dict) and isinstance(given, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in given.items()}}
    return given


def fake_snapshot(fields: dict[str, Any]) -> DeviceSnapshot:
    """A DeviceSnapshot with `fields` (nested maps merged, each queue pair's
    directions completed) over zero counters and an idle device."""
    merged = _merge(_DEVICE, fields)
    merged["queues"] = [
        {d: _merge(_DIRECTION, q.get(d, {})) for d in ("rx", "tx")} for q in merged["queues"]
    ]
    return DeviceSnapshot.from_dict(merged)
