"""The admin commands: what each one does with the daemon and its devices.

Arguments reach the handlers already checked against the schema in
`protocol.COMMANDS` (types, required, choices, ranges); handlers check what
depends on the daemon's state (the device exists, a queue pair is in range)
and raise `CommandError` with a protocol error code. Results are plain maps,
lists, strings, numbers and booleans (msgpack and JSON alike).

The daemon and its devices are seen through the `DaemonLike`/`DeviceLike`
protocols: `vfiouser_net.daemon.Daemon` and `VirtioNetDevice` satisfy them,
and so do the unit tests' fakes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vfiouser_net import __version__
from vfiouser_net.admin import protocol as p
from vfiouser_net.config import ConfigError, device_options
from vfiouser_net.counters import format_mac
from vfiouser_net.daemon import DaemonError
from vfiouser_net.device_options import DeviceError, DeviceOptions
from vfiouser_net.snapshot import DeviceSnapshot, SteeringState
from vfiouser_net.tap import TapError
from vfiouser_net.virtio_spec import DeviceStatus

log = logging.getLogger(__name__)


class DeviceLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def opts(self) -> DeviceOptions: ...
    @property
    def connected(self) -> bool: ...
    def snapshot(self) -> DeviceSnapshot: ...
    def steering(self) -> SteeringState: ...
    def set_steering(self, policy: str) -> None: ...
    def set_link(self, up: bool) -> None: ...
    def ring_state(self) -> list[dict[str, Any]]: ...


class DaemonLike(Protocol):
    def devices(self) -> Sequence[DeviceLike]: ...
    def add_device(self, opts: DeviceOptions) -> DeviceLike: ...
    def remove_device(self, name: str) -> None: ...
    def set_log_level(self, level: str) -> None: ...


@dataclass(frozen=True)
class Peer:
    """The process at the other end of an admin connection (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"pid {self.pid} uid {self.uid}"


@dataclass(frozen=True)
class CaptureRequest:
    device: str
    file: str  # a file name (no directory) in the daemon's capture directory
    queue: int | None = None  # queue pair, None for all
    count: int | None = None  # exactly one of count and seconds
    seconds: float | None = None


# Captures frames of a device as asked and returns a summary (frames written,
# file: the full path written); raises CommandError. None: no capture support
# in this datapath.
CaptureHook = Callable[[DeviceLike, CaptureRequest], dict[str, Any]]


class CommandError(p.AdminError):
    """A command refused or failed; code is a protocol error code."""


# -- decoding -------------------------------------------------------------------------

# Order of the virtio status bits as a driver sets them; names as operators know them.
_STATUS_BITS = (
    (DeviceStatus.ACKNOWLEDGE, "ACKNOWLEDGE"),
    (DeviceStatus.DRIVER, "DRIVER"),
    (DeviceStatus.FEATURES_OK, "FEATURES_OK"),
    (DeviceStatus.DRIVER_OK, "DRIVER_OK"),
    (DeviceStatus.DEVICE_NEEDS_RESET, "NEEDS_RESET"),
    (DeviceStatus.FAILED, "FAILED"),
)

# virtio_net RSS hash types (5.1.6.4.3.1).
HASH_TYPES = (
    "IPv4",
    "TCPv4",
    "UDPv4",
    "IPv6",
    "TCPv6",
    "UDPv6",
    "IP_EX",
    "TCP_EX",
    "UDP_EX",
)


def status_names(status: int) -> list[str]:
    names = [name for bit, name in _STATUS_BITS if status & bit]
    known = 0
    for bit, _ in _STATUS_BITS:
        known |= int(bit)
    names += [f"BIT_{i}" for i in range(8) if status & ~known & (1 << i)]
    return names


def hash_type_names(mask: int) -> list[str]:
    return [name for i, name in enumerate(HASH_TYPES) if mask >> i & 1] + [
        f"BIT_{i}" for i in range(len(HASH_TYPES), 32) if mask >> i & 1
    ]


# -- the commands -------------------------------------------------------------------------


Handler = Callable[["Commands", dict[str, Any], Peer], Any]
_HANDLERS: dict[str, Handler] = {}


def _command(name: str) -> Callable[[Handler], Handler]:
    if name not in p.COMMANDS:
        raise AssertionError(f"command {name} is not in the schema")

    def register(fn: Handler) -> Handler:
        _HANDLERS[name] = fn
        return fn

    return register


class Commands:
    """Executes validated requests against one daemon."""

    def __init__(self, daemon: DaemonLike, capture: CaptureHook | None = None) -> None:
        self.daemon = daemon
        self.capture_hook = capture

    def execute(self, cmd: str, args: Mapping[str, Any], peer: Peer) -> Any:
        """Validate args, run the command; CommandError/ProtocolError on refusal."""
        spec = p.COMMANDS.get(cmd)
        if spec is None or cmd not in _HANDLERS:
            raise CommandError(p.UNKNOWN_COMMAND, f"unknown command {cmd[:64]!r}")
        values = p.validate_args(spec, args)
        if spec.mutates:
            log.info("admin: %s %s (from %s)", cmd, _describe_args(values), peer)
        else:
            log.debug("admin: %s %s (from %s)", cmd, _describe_args(values), peer)
        try:
            return _HANDLERS[cmd](self, values, peer)
        except ConfigError as exc:
            raise CommandError(p.BAD_REQUEST, str(exc)) from exc
        except (DaemonError, DeviceError, TapError) as exc:
            raise CommandError(p.FAILED, str(exc)) from exc
        except OSError as exc:
            raise CommandError(p.FAILED, f"{cmd}: {exc.strerror or exc}") from exc

    def device(self, name: str) -> DeviceLike:
        devices = self.daemon.devices()
        for dev in devices:
            if dev.name == name:
                return dev
        known = ", ".join(d.name for d in devices) or "none"
        raise CommandError(p.NO_SUCH_DEVICE, f"no device named {name!r} (devices: {known})")


def _describe_args(values: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v!r}" for k, v in values.items())


def _summary(dev: DeviceLike, snap: DeviceSnapshot) -> dict[str, Any]:
    steer = snap.steering
    status = snap.status
    return {
        "name": dev.name,
        "socket": snap.socket,
        "tap": snap.tap,
        "connected": snap.connected,
        "link_up": snap.link_up,
        "status": status,
        "status_names": status_names(status),
        "active_queue_pairs": steer.active_queue_pairs,
        "max_queue_pairs": steer.max_queue_pairs,
        "policy": steer.policy,
        "effective": steer.effective,
        **_process(dev),
    }


def _process(dev: DeviceLike) -> dict[str, Any]:
    """Its process, when the device runs in one of its own (serve --isolate)."""
    process = getattr(dev, "process", None)
    return {} if process is None else {"process": process.as_dict()}


@_command("help")
def _help(cmds: Commands, args: dict[str, Any], peer: Peer) -> Any:
    name = args.get("command")
    if name is not None:
        spec = p.COMMANDS.get(name)
        if spec is None:
            raise CommandError(p.UNKNOWN_COMMAND, f"unknown command {name[:64]!r}")
        return {"commands": [spec.describe()]}
    return {"commands": [spec.describe() for spec in p.COMMANDS.values()]}


@_command("version")
def _version(cmds: Commands, args: dict[str, Any], peer: Peer) -> Any:
    return {"version": __version__, "protocol": p.PROTOCOL_VERSION, "pid": os.getpid()}


@_command("list")
def _list(cmds: Commands, args: dict[str, Any], peer: Peer) -> Any:
    out = []
    for dev in cmds.daemon.devices():
        try:
            out.append(_summary(dev, dev.snapshot()))
        except DeviceError as exc:
            # A device process being started again is listed, not an error
            # for the whole list.
            out.append(_unanswered(dev, str(exc)))
    return {"devices": out}


def _unanswered(dev: DeviceLike, why: str) -> dict[str, Any]:
    return {
        "name": dev.name,
        "socket": dev.opts.socket_path,
        "tap": dev.opts.tap,
        "connected": False,
        "link_up": False,
        "status": 0,
        "status_names": [],
        "active_queue_pairs": 0,
        "max_queue_pairs": dev.opts.queue_pairs,
        "policy": dev.opts.steering,
        "effective": "?",
        "error": why,
        **_process(dev),
    }


@_command("show")
def _show(cmds: Commands, args: dict[str, Any], peer: Peer) -> Any:
    dev = cmds.device(args["device"])
    snap = dev.snapshot()
    out = _summary(dev, snap)
    status = out["status"]
    steer = snap.steering
    rss = steer.to_dict()["rss"]
    rss["hash_type_names"] = hash_type_names(steer.rss.hash_types)
    out.update(
        {
            "driver_ok": bool(status & DeviceStatus.DRIVER_OK),
            "needs_reset": bool(status & DeviceStatus.DEVICE_NEEDS_RESET),
            "features": list(snap.features),
            "offered_features": list(snap.offered_features),
            "mac": snap.rx_filter.mac,
            "configured_mac": format_mac(dev.opts.mac),
            "mtu": snap.mtu,
            "speed_mbps": dev.opts.speed_mbps,
            "queue_size": dev.opts.queue_size,
            "notify_mode": dev.opts.notify_mode,
            "busy_poll_us": dev.opts.busy_poll_us,
            "tap_io": snap.tap_io,
            "tx_inline": dev.opts.tx_inline,
            "operator_link_up": bool(getattr(dev, "operator_link_up", True)),
            "steering": {
                "policy": steer.policy,
                "effective": steer.effective,
                "switches": steer.switches,
                "rss": rss,
            },
            "rx_filter": snap.rx_filter.to_dict(),
        }
    )
    return out


@_command("queues")
def _queues(cmds: Commands, args: dict[str, Any], peer: Peer) -> Any:
    dev = cmds.device(args["device"])
    return {"device": dev.name, "queues": dev.ring_state()}


@_command("stats")
def _stats(cmds: Commands, args: dict[str, Any], peer: Peer) -> Any:
    dev = cmds.device(args["device"])
    snap = dev.snapshot()
    return {
        "device": dev.name,
        "queues": [q.to_dict() for q in snap.queues],
        "ctrl": snap.ctrl.to_dict(),
        "counters": snap.device.to_dict(),
        "resets": dict(getattr(dev, "resets", {})),
    }


@_command("snapshot")
def _snapshot(cmds: Commands, args: dict[str, Any], peer: Peer) -> Any:
    dev = cmds.device(args["device"])
    transport = getattr(dev, "transport", None)
    resets = dict(getattr(dev, "resets", {}))
    if transport is not None:
        resets["driver"] = transport.driver_resets
    return {
        "snapshot": dev.snapshot().to_dict(),
        "resets": resets,
        "operator_link_up": bool(getattr(dev, "operator_link_up", True)),
    }


@_command("link")
def _link(cmds: Commands, args: dict[str, Any], peer: Peer) -> Any:
    dev = cmds.device(args["device"])
    up = args["state"] == "up"
    dev.set_link(up)
    link_up = dev.snapshot().link_up
    return {"device": dev.name, "operator_link_up": up, "link_up": link_up, "tap": dev.opts.tap}


@_command("steering")
def _steering(cmds: Commands, args: dict[str, Any], peer: Peer) -> Any:
    dev = cmds.device(args["device"])
    dev.set_steering(args["policy"])
    steer = dev.steering()
    return {
        "device": dev.name,
        "policy": steer.policy,
        "effective": steer.effective,
        "switches": steer.switches,
    }


@_command("log-level")
def _log_level(cmds: Commands, args: dict[str, Any], peer: Peer) -> Any:
    cmds.daemon.set_log_level(args["level"])
    return {"level": args["level"]}


@_command("add")
def _add(cmds: Commands, args: dict[str, Any], peer: Peer) -> Any:
    opts = device_options("admin", dict(args))
    dev = cmds.daemon.add_device(opts)
    log.info("admin: device %s added (from %s)", dev.name, peer)
    return _summary(dev, dev.snapshot())


@_command("remove")
def _remove(cmds: Commands, args: dict[str, Any], peer: Peer) -> Any:
    dev = cmds.device(args["device"])
    cmds.daemon.remove_device(dev.name)
    log.info("admin: device %s removed (from %s)", dev.name, peer)
    return {"removed": dev.name}


@_command("capture")
def _capture(cmds: Commands, args: dict[str, Any], peer: Peer) -> Any:
    # args["file"] is a plain file name (validate_args): the hook creates it
    # in the daemon's capture directory.
    dev = cmds.device(args["device"])
    queue = args.get("queue")
    if queue is not None and queue >= dev.opts.queue_pairs:
        raise CommandError(
            p.BAD_REQUEST,
            f"capture: {dev.name} has queue pairs 0..{dev.opts.queue_pairs - 1}, not {queue}",
        )
    request = CaptureRequest(
        device=dev.name,
        file=args["file"],
        queue=queue,
        count=args.get("count"),
        seconds=float(args["seconds"]) if "seconds" in args else None,
    )
    if cmds.capture_hook is None:
        raise CommandError(
            p.UNSUPPORTED,
            "capture is not available in this daemon",
        )
    return cmds.capture_hook(dev, request)


missing = set(p.COMMANDS) - set(_HANDLERS)
if missing:  # pragma: no cover - caught by any import in the tests
    raise AssertionError(f"commands without a handler: {', '.join(sorted(missing))}")
del missing

__all__ = [
    "HASH_TYPES",
    "CaptureHook",
    "CaptureRequest",
    "CommandError",
    "Commands",
    "DaemonLike",
    "DeviceLike",
    "Peer",
    "hash_type_names",
    "status_names",
]
