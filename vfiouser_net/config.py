"""The daemon's configuration file (TOML): daemon settings and devices.

    [daemon]
    admin_socket = "/run/vfiouser-net/admin.sock"   # optional
    admin_group = "kvm"                              # optional: group allowed to connect
    capture_dir = "/var/lib/vfiouser-net"            # optional: where ctl capture writes
    metrics_addr = "127.0.0.1:9742"                  # or "none"
    log_level = "info"
    isolate = true                                   # optional: a sandboxed process per device
    device_nofile = 1024                             # optional: a device process's open files
    device_memory_max = 256                          # optional: ... and private memory, MiB

    [[device]]
    name = "vm1"                                     # optional: default from the socket name
    socket = "/run/vfiouser-net/vm1.sock"
    tap = "tap-vm1"
    mac = "52:54:00:00:00:01"                        # optional
    mtu = 1500                                       # optional
    queue_pairs = 4                                  # optional
    queue_size = 256                                 # optional
    steering = "auto"                                # optional
    notify_mode = "message"                          # optional: or "poll" (a core per pair)
    busy_poll_us = 50                                # optional: 0 turns it off
    tap_io = "auto"                                  # optional: "io_uring" or "writev"
    tx_inline = false                                # optional: true handles doorbells inline
    speed = 10000                                    # optional, Mbit/s
    nofile = 1024                                    # optional: device_nofile for this one
    memory_max = 256                                 # optional: device_memory_max, MiB

Every error names the file, the entry and the key.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfiouser_net.budget import DEFAULT_MEMORY_MIB, DEFAULT_NOFILE, Budget
from vfiouser_net.device_options import DeviceError, DeviceOptions, parse_mac
from vfiouser_net.options import DEFAULT_BUSY_POLL_US, DEFAULT_TAP_IO


class ConfigError(ValueError):
    pass


@dataclass
class DaemonConfig:
    admin_socket: str | None = None
    admin_group: str | None = None
    # Where `ctl capture` creates its files (None: capture.default_capture_dir()).
    capture_dir: str | None = None
    metrics_addr: str = "127.0.0.1:9742"
    log_level: str = "info"
    # Each device in a sandboxed process of its own (device_process.py): the
    # default for a configuration file; `serve` of one device from flags runs
    # it in its own process already (--sandbox for the sandbox).
    isolate: bool = True
    # A device process's budget (budget.py), unless its entry says otherwise.
    device_nofile: int = DEFAULT_NOFILE
    device_memory_max: int = DEFAULT_MEMORY_MIB
    devices: list[DeviceOptions] = field(default_factory=list)


def default_mac(socket_path: str) -> bytes:
    """A stable locally administered MAC derived from the socket path."""
    digest = hashlib.sha256(socket_path.encode()).digest()
    return bytes([0x02, digest[0], digest[1], digest[2], digest[3], digest[4]])


_DAEMON_KEYS: dict[str, type] = {
    "admin_socket": str,
    "admin_group": str,
    "capture_dir": str,
    "metrics_addr": str,
    "log_level": str,
    "isolate": bool,
    "device_nofile": int,
    "device_memory_max": int,
}
_DEVICE_KEYS: dict[str, type] = {
    "name": str,
    "socket": str,
    "tap": str,
    "mac": str,
    "mtu": int,
    "queue_pairs": int,
    "queue_size": int,
    "steering": str,
    "speed": int,
    "notify_mode": str,
    "busy_poll_us": int,
    "tap_io": str,
    "tx_inline": bool,
    "nofile": int,
    "memory_max": int,
}


def _check_keys(where: str, table: dict[str, Any], allowed: dict[str, type]) -> None:
    for key, value in table.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(allowed)})")
        want = allowed[key]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: {key} must be a {want.__name__}, not {value!r}")


def device_options(where: str, entry: dict[str, Any]) -> DeviceOptions:
    _check_keys(where, entry, _DEVICE_KEYS)
    for key in ("socket", "tap"):
        if key not in entry:
            raise ConfigError(f"{where}: {key} is required")
    try:
        mac = parse_mac(entry["mac"]) if "mac" in entry else default_mac(entry["socket"])
        opts = DeviceOptions(
            socket_path=entry["socket"],
            tap=entry["tap"],
            mac=mac,
            mtu=entry.get("mtu", 1500),
            queue_pairs=entry.get("queue_pairs", 1),
            queue_size=entry.get("queue_size", 256),
            steering=entry.get("steering", "auto"),
            notify_mode=entry.get("notify_mode", "message"),
            busy_poll_us=entry.get("busy_poll_us", DEFAULT_BUSY_POLL_US),
            tap_io=entry.get("tap_io", DEFAULT_TAP_IO),
            tx_inline=entry.get("tx_inline", False),
            speed_mbps=entry.get("speed", 10000),
            name=entry.get("name", ""),
            nofile=entry.get("nofile", 0),
            memory_max_mib=entry.get("memory_max", 0),
        )
        opts.validate()
        if opts.nofile or opts.memory_max_mib:
            Budget(
                opts.nofile or DEFAULT_NOFILE, opts.memory_max_mib or DEFAULT_MEMORY_MIB
            ).validate()
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    except DeviceError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return opts


def load(path: str | Path) -> DaemonConfig:
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except RecursionError as exc:  # tomllib recurses per nested array or inline table
        raise ConfigError(f"{path}: arrays or tables nested too deeply") from exc
    unknown = set(raw) - {"daemon", "device"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
    daemon = raw.get("daemon", {})
    if not isinstance(daemon, dict):
        raise ConfigError(f"{path}: [daemon] must be a table")
    _check_keys(f"{path}: [daemon]", daemon, _DAEMON_KEYS)
    cfg = DaemonConfig(**daemon)
    if cfg.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(
            f"{path}: [daemon] log_level must be debug, info, warning or error, "
            f"not {cfg.log_level!r}"
        )
    try:
        Budget(cfg.device_nofile, cfg.device_memory_max).validate()
    except ValueError as exc:
        raise ConfigError(f"{path}: [daemon] {exc}") from exc
    devices = raw.get("device", [])
    if not isinstance(devices, list):
        raise ConfigError(f"{path}: devices are [[device]] tables")
    names: set[str] = set()
    for i, entry in enumerate(devices):
        where = f"{path}: device #{i + 1}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a table")
        opts = device_options(where, entry)
        name = opts.name or opts.socket_path.rsplit("/", 1)[-1]
        if name in names:
            raise ConfigError(f"{where}: duplicate device name {name!r}")
        names.add(name)
        cfg.devices.append(opts)
    return cfg
