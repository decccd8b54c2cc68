"""One device's state at one moment, typed: what the metrics, the admin
channel (and through it `ctl`), the SIGUSR2 dump and a device process's
supervisor all read.

counters.py fills these from the datapath. On the wire (admin channel,
msgpack; SIGUSR2, JSON) a snapshot is the plain dict of to_dict(), and a
supervisor reads its device process's answer back with from_dict(), which
checks every field: that process serves a guest and may be hostile, so a
malformed answer is a SnapshotError, not a crash of the scrape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar


class SnapshotError(ValueError):
    pass


T = TypeVar("T")


def _get(d: Any, key: str, kind: type[T]) -> T:
    if not isinstance(d, dict):
        raise SnapshotError(f"expected a map holding {key!r}, got {type(d).__name__}")
    value = d.get(key)
    # bool is an int in Python: an int field must not take one, nor the reverse.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SnapshotError(f"{key!r}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _ints(d: Any, key: str) -> list[int]:
    values = _get(d, key, list)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise SnapshotError(f"{key!r}: expected a list of integers")
    return list(values)


def _strs(d: Any, key: str) -> list[str]:
    values = _get(d, key, list)
    if not all(isinstance(v, str) for v in values):
        raise SnapshotError(f"{key!r}: expected a list of strings")
    return list(values)


def _counts(d: Any, key: str) -> dict[str, int]:
    values = _get(d, key, dict)
    if not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in values.items()
    ):
        raise SnapshotError(f"{key!r}: expected a map of names to integers")
    return dict(values)


def _optional_int(d: Any, key: str) -> int | None:
    return _get(d, key, int) if isinstance(d, dict) and key in d else None


# The checker of each plain field type, by its annotation.
_READERS: dict[str, Callable[[Any, str], Any]] = {
    "int": lambda d, k: _get(d, k, int),
    "str": lambda d, k: _get(d, k, str),
    "bool": lambda d, k: _get(d, k, bool),
    "list[int]": _ints,
    "list[str]": _strs,
    "dict[str, int]": _counts,
    "int | None": _optional_int,
}


def _plain_fields(cls: type, d: Any, nested: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every field of dataclass cls but the nested ones, read from d and
    checked against its annotation."""
    if not isinstance(d, dict):
        raise SnapshotError(f"{cls.__name__}: expected a map, got {type(d).__name__}")
    return {
        f.name: _READERS[str(f.type)](d, f.name)
        for f in dataclasses.fields(cls)
        if f.name not in nested
    }


@dataclass
class DirStats:
    """One direction of a queue pair, or the control queue (struct vn_dir_stats)."""

    packets: int
    bytes: int
    doorbells: int
    interrupts: int
    interrupts_suppressed: int
    interrupts_coalesced: int
    ring_full: int
    batches: int
    bounced: int
    steered_out: int
    avail_seen: int
    used_idx: int
    batch_hist: list[int]
    size_hist: list[int]
    drops: dict[str, int]
    errors: dict[str, int]
    # What the guest's ethtool -C asked for (NOTF_COAL); 0: off. None for
    # the control queue, which has no coalescing.
    coalesce_max_packets: int | None = None
    coalesce_max_usecs: int | None = None

    @property
    def in_flight(self) -> int:
        """Buffers the device has seen made available and not yet used."""
        return (self.avail_seen - self.used_idx) & 0xFFFF

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.coalesce_max_packets is None:
            del out["coalesce_max_packets"], out["coalesce_max_usecs"]
        return out

    @classmethod
    def from_dict(cls, d: Any) -> DirStats:
        out = cls(**_plain_fields(cls, d))
        if (out.coalesce_max_packets is None) != (out.coalesce_max_usecs is None):
            raise SnapshotError("coalescing: both parameters or neither")
        return out


@dataclass
class PairStats:
    rx: DirStats
    tx: DirStats

    def to_dict(self) -> dict[str, Any]:
        return {"rx": self.rx.to_dict(), "tx": self.tx.to_dict()}

    @classmethod
    def from_dict(cls, d: Any) -> PairStats:
        return cls(DirStats.from_dict(_get(d, "rx", dict)), DirStats.from_dict(_get(d, "tx", dict)))


@dataclass
class RssState:
    """The RSS configuration the driver set (RSS_CONFIG, HASH_CONFIG)."""

    configured: bool
    hash_types: int
    table: list[int]
    unclassified_queue: int
    key: str  # hex

    @classmethod
    def from_dict(cls, d: Any) -> RssState:
        return cls(**_plain_fields(cls, d))


@dataclass
class SteeringState:
    """The steering rule in force."""

    policy: str
    effective: str
    active_queue_pairs: int
    max_queue_pairs: int
    switches: int
    rss: RssState

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> SteeringState:
        fields = _plain_fields(cls, d, nested=("rss",))
        return cls(**fields, rss=RssState.from_dict(_get(d, "rss", dict)))


@dataclass
class RxFilterState:
    """What the guest asked to receive (CTRL_RX, CTRL_MAC)."""

    mac: str
    promisc: bool
    allmulti: bool
    unicast: list[str]
    multicast: list[str]
    uni_overflow: bool
    multi_overflow: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> RxFilterState:
        return cls(**_plain_fields(cls, d))


@dataclass
class DeviceCounters:
    """The device's events (struct vn_dev_stats: one count per field, named
    as in C) and its control commands by class and command: {class:
    {command: [ok, error]}} for the slots that saw any."""

    events: dict[str, int]
    ctrl_cmds: dict[str, dict[str, list[int]]]

    def to_dict(self) -> dict[str, Any]:
        return {**self.events, "ctrl_cmds": self.ctrl_cmds}

    @classmethod
    def from_dict(cls, d: Any) -> DeviceCounters:
        if not isinstance(d, dict):
            raise SnapshotError("device counters: expected a map")
        events = {k: v for k, v in d.items() if k != "ctrl_cmds"}
        if not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in events.items()
        ):
            raise SnapshotError("device counters: expected a map of names to integers")
        cmds = _get(d, "ctrl_cmds", dict)
        out: dict[str, dict[str, list[int]]] = {}
        for cls_key, by_cmd in cmds.items():
            if not isinstance(cls_key, str) or not isinstance(by_cmd, dict):
                raise SnapshotError("ctrl_cmds: expected {class: {command: [ok, error]}}")
            for cmd_key in by_cmd:
                if not isinstance(cmd_key, str):
                    raise SnapshotError("ctrl_cmds: expected {class: {command: [ok, error]}}")
                pair = _ints(by_cmd, cmd_key)
                if len(pair) != 2:
                    raise SnapshotError("ctrl_cmds: expected [ok, error] per command")
                out.setdefault(cls_key, {})[cmd_key] = pair
        return cls(events, out)


@dataclass
class DeviceSnapshot:
    name: str
    socket: str
    tap: str
    connected: bool
    status: int  # the virtio device status byte
    features: list[str]  # negotiated
    offered_features: list[str]
    link_up: bool
    tap_lost: bool
    mtu: int
    tap_io: str  # what the datapath does now: "io_uring" or "writev"
    queue_pairs: int
    steering: SteeringState
    rx_filter: RxFilterState
    queues: list[PairStats]
    ctrl: DirStats
    device: DeviceCounters

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["features"] = list(self.features)
        out["offered_features"] = list(self.offered_features)
        out["steering"] = self.steering.to_dict()
        out["rx_filter"] = self.rx_filter.to_dict()
        out["queues"] = [q.to_dict() for q in self.queues]
        out["ctrl"] = self.ctrl.to_dict()
        out["device"] = self.device.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Any) -> DeviceSnapshot:
        nested = ("steering", "rx_filter", "queues", "ctrl", "device")
        return cls(
            **_plain_fields(cls, d, nested),
            steering=SteeringState.from_dict(_get(d, "steering", dict)),
            rx_filter=RxFilterState.from_dict(_get(d, "rx_filter", dict)),
            queues=[PairStats.from_dict(q) for q in _get(d, "queues", list)],
            ctrl=DirStats.from_dict(_get(d, "ctrl", dict)),
            device=DeviceCounters.from_dict(_get(d, "device", dict)),
        )
