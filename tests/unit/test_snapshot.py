"""The typed snapshot: its wire form (to_dict) is what the admin channel and
the SIGUSR2 dump have always carried, and from_dict, which a supervisor
applies to its device process's answer, takes that form back and refuses
anything else with a SnapshotError."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from vfiouser_net_harness.fake_snapshot import fake_snapshot

from vfiouser_net.snapshot import DeviceSnapshot, DirStats, SnapshotError

WIRE_KEYS = [
    "name", "socket", "tap", "connected", "status", "features", "offered_features", "link_up",
    "tap_lost", "mtu", "tap_io", "queue_pairs", "steering", "rx_filter", "queues", "ctrl",
    "device",
]  # fmt: skip
DIR_KEYS = [
    "packets", "bytes", "doorbells", "interrupts", "interrupts_suppressed",
    "interrupts_coalesced", "ring_full", "batches", "bounced", "steered_out", "avail_seen",
    "used_idx", "batch_hist", "size_hist", "drops", "errors",
]  # fmt: skip


def sample() -> dict[str, Any]:
    snap = fake_snapshot(
        {
            "name": "vm1",
            "socket": "/run/vfiouser-net/vm1.sock",
            "tap": "tap-vm1",
            "connected": True,
            "status": 15,
            "features": ["VERSION_1", "MQ"],
            "queue_pairs": 2,
            "steering": {"policy": "rss", "effective": "rss", "active_queue_pairs": 2},
            "queues": [
                {"rx": {"packets": 5, "drops": {"mac_filter": 2}}, "tx": {"packets": 7}},
                {"rx": {"avail_seen": 3, "used_idx": 65535}, "tx": {}},
            ],
            "device": {"dma_maps": 2, "ctrl_cmds": {"4": {"0": [1, 0]}}},
        }
    )
    for pair in snap.queues:
        for direction in (pair.rx, pair.tx):
            direction.coalesce_max_packets = 0
            direction.coalesce_max_usecs = 0
    return snap.to_dict()


def test_wire_form_keeps_its_keys_and_order() -> None:
    wire = sample()
    assert list(wire) == WIRE_KEYS
    assert list(wire["ctrl"]) == DIR_KEYS  # no coalescing on the control queue
    assert list(wire["queues"][0]["rx"]) == [
        *DIR_KEYS,
        "coalesce_max_packets",
        "coalesce_max_usecs",
    ]
    assert wire["device"] == {"dma_maps": 2, "ctrl_cmds": {"4": {"0": [1, 0]}}}
    assert wire["steering"]["rss"]["configured"] is False
    json.dumps(wire)  # the SIGUSR2 dump


def test_round_trip() -> None:
    wire = sample()
    snap = DeviceSnapshot.from_dict(wire)
    assert snap.to_dict() == wire
    assert snap.queues[0].rx.drops == {"mac_filter": 2}
    assert snap.queues[1].rx.in_flight == 4  # 3 - 65535, modulo 2^16
    assert snap.device.events["dma_maps"] == 2


def _set(d: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    d = copy.deepcopy(d)
    *parents, last = path.split(".")
    node: Any = d
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return d


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("connected", 1),  # an int where a bool belongs
        ("status", True),  # a bool where an int belongs
        ("status", "15"),
        ("mtu", KeyError),
        ("features", ["MQ", 3]),
        ("features", "MQ"),
        ("steering.policy", None),
        ("steering.rss.table", [0, "1"]),
        ("steering.rss", []),
        ("rx_filter.unicast", [b"\x02"]),
        ("queues", {"0": {}}),
        ("queues.0.rx.packets", 1.5),
        ("queues.0.rx.drops", {"mac_filter": "2"}),
        ("queues.0.tx", KeyError),
        ("ctrl.batch_hist", [0, None]),
        ("device.ctrl_cmds", {"4": {"0": [1]}}),
        ("device.ctrl_cmds", {"4": [1, 0]}),
        ("device.dma_maps", "2"),
        ("device", []),
    ],
)
def test_malformed_answers_are_refused(path: str, value: Any) -> None:
    with pytest.raises(SnapshotError):
        DeviceSnapshot.from_dict(_set(sample(), path, value))


def test_not_a_map_is_refused() -> None:
    for bad in (None, [], "snapshot", 3):
        with pytest.raises(SnapshotError):
            DeviceSnapshot.from_dict(bad)
    with pytest.raises(SnapshotError):
        DirStats.from_dict([])
