"""Command line: `vfiouser-net serve ...`, `vfiouser-net ctl ...`,
`vfiouser-net --print-capabilities`."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vfiouser_net.budget import (
    DATA_HEADROOM_MIB,
    DEFAULT_MEMORY_MIB,
    DEFAULT_NOFILE,
    EXIT_MEMORY,
    EXIT_NOFILE,
    NOFILE_HEADROOM,
    Budget,
)
from vfiouser_net.budget import watch as watch_budget
from vfiouser_net.capture import (
    CAPTURE_MAX_FRAMES,
    CAPTURE_MAX_SECONDS,
    DEFAULT_CAPTURE_DIR,
    default_capture_dir,
)
from vfiouser_net.config import ConfigError, DaemonConfig, default_mac
from vfiouser_net.config import load as load_config
from vfiouser_net.daemon import LOG_LEVELS, Daemon, DaemonError
from vfiouser_net.device import MULTIQUEUE_FEATURES, OFFERED_FEATURES
from vfiouser_net.device_options import DeviceError, DeviceOptions, parse_mac
from vfiouser_net.metrics import DEFAULT_METRICS_PORT, parse_metrics_addr, serve_metrics
from vfiouser_net.native import lib
from vfiouser_net.options import (
    DEFAULT_BUSY_POLL_US,
    DEFAULT_TAP_IO,
    NOTIFY_MODES,
    STEERING_POLICIES,
    TAP_IO_MODES,
)
from vfiouser_net.sandbox import SandboxError, SandboxLimits, sanitizer_loaded
from vfiouser_net.sandbox import enter as enter_sandbox
from vfiouser_net.tap import TapError
from vfiouser_net.virtio_spec import feature_names

if TYPE_CHECKING:
    from vfiouser_net.admin.commands import CaptureHook, CaptureRequest

log = logging.getLogger("vfiouser_net")

# systemd socket activation (sd_listen_fds(3)): the first passed fd.
SD_LISTEN_FDS_START = 3

__all__ = ["default_mac", "main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _fd(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file descriptor number") from exc
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file descriptor number")
    return value


def capabilities() -> dict[str, object]:
    """What this build can do, for management tools (like vhost-user backends' JSON)."""
    return {
        "type": "net",
        "transport": "vfio-user",
        "device": {"vendor": "0x1af4", "device": "0x1041"},
        "features": feature_names(OFFERED_FEATURES),
        "multiqueue_features": feature_names(MULTIQUEUE_FEATURES),
        "max_queue_pairs": int(lib.VN_MAX_QUEUE_PAIRS),
        "max_queue_size": int(lib.VN_VQ_MAX_SIZE),
        "steering": list(STEERING_POLICIES),
        # PCI and firmware-facing capabilities beyond the feature bits.
        "pci": {
            "pci_cfg_access": True,  # VIRTIO_PCI_CAP_PCI_CFG (iPXE, firmware)
            "msix": True,
            "intx": False,  # no INTx pin: drivers without MSI-X poll (ISR status)
            "expansion_rom": False,  # QEMU's romfile= gives one (network boot)
        },
        # Batched TAP writes: whether this kernel lets the daemon have them
        # (serve --tap-io auto takes them then).
        "tap_io": {"modes": list(TAP_IO_MODES), "io_uring": lib.vn_tap_batch_probe() == 0},
        "socket_activation": True,
        "metrics": True,
        "admin_channel": True,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfiouser-net", description="A virtio-net PCI device served over vfio-user."
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=list(LOG_LEVELS),
        help="logging threshold (default: info)",
    )
    parser.add_argument(
        "--print-capabilities",
        action="store_true",
        help="print what this build supports as JSON and exit",
    )
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser(
        "serve",
        help="serve devices: one from the flags, or many from --config",
        description="Serve one device (--socket-path or --fd, --tap, ...) or the devices of a "
        "TOML file (--config). With systemd socket activation (LISTEN_FDS) and no "
        "--socket-path, the activated socket is used.",
    )
    serve.add_argument("--config", help="TOML file with [daemon] and [[device]] entries")
    serve.add_argument("--socket-path", help="vfio-user UNIX socket to listen on")
    serve.add_argument("--fd", type=_fd, help="an already listening vfio-user socket to use")
    serve.add_argument("--tap", help="host TAP interface (attached or created)")
    serve.add_argument("--name", default="", help="device name (default: the socket's name)")
    serve.add_argument("--mac", help="guest MAC address (default: derived from the socket path)")
    serve.add_argument("--mtu", type=_positive_int, default=1500, help="MTU offered (default 1500)")
    serve.add_argument(
        "--queue-size",
        type=_positive_int,
        default=256,
        help="maximum virtqueue size, a power of two up to 4096 (default 256); the guest "
        "may use less (ethtool -G)",
    )
    serve.add_argument(
        "--queue-pairs",
        type=_positive_int,
        default=1,
        help="queue pairs offered (multiqueue, RSS and hash reports when > 1; default 1)",
    )
    serve.add_argument(
        "--steering",
        choices=STEERING_POLICIES,
        default="auto",
        help="receive steering policy (default auto: RSS once the guest configures it, "
        "rx-follows-tx before); SIGUSR1 cycles through the policies at run time",
    )
    serve.add_argument(
        "--notify-mode",
        choices=NOTIFY_MODES,
        default="message",
        help="doorbells as vfio-user messages (default), or 'poll': a shared notify page the "
        "workers poll, lower latency for a busy core per queue pair",
    )
    serve.add_argument(
        "--tap-io",
        choices=TAP_IO_MODES,
        default=DEFAULT_TAP_IO,
        help="frames to the TAP: 'io_uring' batches a ring pass's writes in one system call, "
        "'writev' makes one a frame; 'auto' (default) takes io_uring where the kernel allows",
    )
    serve.add_argument(
        "--tx-inline",
        action="store_true",
        help="a sleeping worker's few frames leave from the thread that got the transmit "
        "doorbell, instead of waking the worker (default off)",
    )
    serve.add_argument(
        "--busy-poll-us",
        type=int,
        default=DEFAULT_BUSY_POLL_US,
        help="how long a busy worker keeps looking for work before it sleeps and asks for a "
        f"doorbell, in microseconds (default {DEFAULT_BUSY_POLL_US}; 0 turns it off)",
    )
    serve.add_argument(
        "--metrics-addr",
        default=None,
        help=f"serve Prometheus metrics on HOST:PORT (default 127.0.0.1:{DEFAULT_METRICS_PORT}; "
        "port 0 picks a free one, 'none' disables)",
    )
    serve.add_argument("--admin-socket", help="admin channel UNIX socket (msgpack)")
    serve.add_argument("--admin-group", help="group allowed on the admin socket (mode 0660)")
    serve.add_argument(
        "--capture-dir",
        help="directory where `ctl capture --file NAME` creates its pcap files (clients name "
        "a file, never a path; default: systemd's $STATE_DIRECTORY, else "
        f"{DEFAULT_CAPTURE_DIR})",
    )
    serve.add_argument(
        "--sandbox",
        action="store_true",
        help="once the devices' sockets and TAPs are open, drop every capability, set no new "
        "privileges and a seccomp allow-list (other calls fail with EPERM and are logged), "
        "before any thread starts. Without capabilities the kernel lets only a TAP's owner "
        "attach its queues (as the device does when the guest changes its queue pairs), so "
        "create the TAP for the daemon's user (ip tuntap add ... user U)",
    )
    serve.add_argument(
        "--isolate",
        action="store_true",
        help="each device in a process of its own (started with --sandbox) on the socket "
        "this daemon keeps; a device process that dies is reported and started again "
        "(also: isolate = true in [daemon])",
    )
    serve.add_argument(
        "--sandbox-nofile",
        type=_positive_int,
        default=DEFAULT_NOFILE,
        help="with --sandbox: open files the process may hold; over it, the process ends "
        f"(exit {EXIT_NOFILE}) for a fresh one to start (default {DEFAULT_NOFILE}; the kernel's "
        f"limit is {NOFILE_HEADROOM} above)",
    )
    serve.add_argument(
        "--sandbox-memory",
        type=_positive_int,
        default=DEFAULT_MEMORY_MIB,
        metavar="MIB",
        help="with --sandbox: private memory (RssAnon) the process may use, in MiB; over it, "
        f"the process ends (exit {EXIT_MEMORY}) (default {DEFAULT_MEMORY_MIB}; RLIMIT_DATA is "
        f"{DATA_HEADROOM_MIB} MiB above)",
    )
    serve.add_argument(
        "--speed",
        type=_positive_int,
        default=10000,
        help="link speed in Mbit/s reported (default 10000)",
    )
    sub.add_parser(
        "ctl", help="control a running daemon (see: vfiouser-net ctl --help)", add_help=False
    )
    return parser


def _activated_fd() -> int | None:
    """The socket systemd passed us, if any (LISTEN_PID/LISTEN_FDS)."""
    try:
        pid = int(os.environ.get("LISTEN_PID", "0"))
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    if pid != os.getpid() or count < 1:
        return None
    if count > 1:
        log.warning("socket activation passed %d sockets; serving the first", count)
    return SD_LISTEN_FDS_START


def daemon_config(args: argparse.Namespace) -> DaemonConfig:
    """The configuration from --config, or one device from the flags."""
    if args.config:
        if args.socket_path or args.fd is not None or args.tap:
            raise ConfigError("--config and the single-device flags cannot be combined")
        cfg = load_config(args.config)
    else:
        fd = args.fd if args.fd is not None else None
        if fd is None and not args.socket_path:
            fd = _activated_fd()
        if fd is None and not args.socket_path:
            raise ConfigError("serve needs --socket-path, --fd, socket activation or --config")
        if not args.tap:
            raise ConfigError("serve needs --tap (or --config)")
        socket_path = args.socket_path or ""
        mac_seed = socket_path or args.name or args.tap
        mac = parse_mac(args.mac) if args.mac else default_mac(mac_seed)
        cfg = DaemonConfig(
            isolate=False,
            devices=[
                DeviceOptions(
                    socket_path=socket_path,
                    tap=args.tap,
                    mac=mac,
                    mtu=args.mtu,
                    queue_size=args.queue_size,
                    queue_pairs=args.queue_pairs,
                    steering=args.steering,
                    notify_mode=args.notify_mode,
                    busy_poll_us=args.busy_poll_us,
                    tap_io=args.tap_io,
                    tx_inline=args.tx_inline,
                    speed_mbps=args.speed,
                    name=args.name,
                    listen_fd=fd,
                )
            ],
        )
    if args.metrics_addr is not None:
        cfg.metrics_addr = args.metrics_addr
    if args.admin_socket:
        cfg.admin_socket = args.admin_socket
    if args.admin_group:
        cfg.admin_group = args.admin_group
    if args.capture_dir:
        cfg.capture_dir = args.capture_dir
    if args.isolate:
        cfg.isolate = True
    if cfg.metrics_addr != "none":
        try:
            parse_metrics_addr(cfg.metrics_addr)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    for opts in cfg.devices:
        opts.validate()
    return cfg


def capture_hook(directory: str) -> CaptureHook:
    """The admin channel's capture: into a new file of directory only."""
    from vfiouser_net.admin.commands import CommandError
    from vfiouser_net.admin.protocol import FAILED
    from vfiouser_net.capture import CaptureError

    def hook(dev: Any, req: CaptureRequest) -> dict[str, Any]:
        try:
            result: dict[str, Any] = dev.capture(
                directory,
                req.file,
                queue=-1 if req.queue is None else req.queue,
                count=req.count or CAPTURE_MAX_FRAMES,
                seconds=min(req.seconds or CAPTURE_MAX_SECONDS, CAPTURE_MAX_SECONDS),
            )
        except (CaptureError, OSError) as exc:
            raise CommandError(FAILED, f"capture failed: {exc}") from exc
        return result

    return hook


def tap_owner(name: str) -> int | None:
    """The uid a TAP belongs to (ip tuntap ... user U), or None."""
    try:
        uid = int(Path(f"/sys/class/net/{name}/owner").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if uid < 0 else uid


def capture_dir(cfg: DaemonConfig) -> str:
    """The capture directory, absolute: the reply to a capture names the full path."""
    return os.path.abspath(cfg.capture_dir or default_capture_dir())


def serve(args: argparse.Namespace) -> int:
    cfg = daemon_config(args)
    if args.config and args.log_level == "info":
        # The file's level applies unless --log-level says otherwise.
        logging.getLogger().setLevel(LOG_LEVELS[cfg.log_level])
    daemon = Daemon(
        log_level=logging.getLogger().getEffectiveLevel(),
        isolate=cfg.isolate,
        capture_dir=capture_dir(cfg),
        device_budget=Budget(cfg.device_nofile, cfg.device_memory_max),
    )
    # With isolate the device processes enter the sandbox, not this one: it
    # starts them, and they open their TAPs with its capabilities first.
    sandbox_self = args.sandbox and not cfg.isolate

    def on_stop(sig: signal.Signals) -> None:
        log.info("received %s, stopping", sig.name)
        daemon.stop()

    def on_usr1(sig: signal.Signals) -> None:
        # Cycles every device's steering policy (the admin channel sets one).
        for dev in daemon.devices():
            nxt = STEERING_POLICIES[(STEERING_POLICIES.index(dev.opts.steering) + 1) % 4]
            log.info("SIGUSR1: steering policy %s -> %s", dev.opts.steering, nxt)
            try:
                dev.set_steering(nxt)
            except DeviceError as exc:  # stopped meanwhile
                log.warning("SIGUSR1: %s", exc)

    def on_usr2(sig: signal.Signals) -> None:
        for dev in daemon.devices():
            try:
                log.info("device %s: counters %s", dev.name, json.dumps(dev.snapshot().to_dict()))
            except DeviceError as exc:
                log.warning("SIGUSR2: %s", exc)

    # Handled on the main thread's loop (Daemon.run), not in the handlers.
    daemon.handle_signals(
        {
            signal.SIGTERM: on_stop,
            signal.SIGINT: on_stop,
            signal.SIGUSR1: on_usr1,
            signal.SIGUSR2: on_usr2,
        }
    )
    # A daemon that hangs (a stop that never ends) shows where: every
    # thread's Python stack on stderr, printed from the signal handler itself,
    # so also while the main thread is blocked in C. The daemon goes on.
    faulthandler.register(signal.SIGQUIT, all_threads=True, chain=False)
    admin = None
    try:
        # With --sandbox nothing may start a thread before the sandbox is
        # entered (capabilities belong to threads): devices and the admin
        # socket are set up first and started after.
        for opts in cfg.devices:
            daemon.add_device(opts, start=not sandbox_self)
        if cfg.admin_socket:
            from vfiouser_net.admin.server import start_admin_server

            captures = capture_dir(cfg)
            if not os.path.isdir(captures):
                log.warning(
                    "capture directory %s does not exist: ctl capture fails until it does "
                    "(--capture-dir)",
                    captures,
                )
            admin = start_admin_server(
                cfg.admin_socket,
                daemon,
                group=cfg.admin_group,
                capture=capture_hook(captures),
                start=not sandbox_self,
            )
        if sandbox_self:
            for dev in daemon.devices():
                owner = tap_owner(dev.opts.tap)
                if owner != os.geteuid():
                    log.warning(
                        "device %s: TAP %s is owned by %s, not by the daemon's user %d: "
                        "in the sandbox its queues cannot be attached again after a "
                        "change of queue pairs",
                        dev.name,
                        dev.opts.tap,
                        "nobody" if owner is None else f"user {owner}",
                        os.geteuid(),
                    )
            budget = Budget(args.sandbox_nofile, args.sandbox_memory)
            try:
                budget.validate()
            except ValueError as exc:
                raise ConfigError(f"--sandbox: {exc}") from exc
            enter_sandbox(
                SandboxLimits(
                    nofile=budget.nofile + NOFILE_HEADROOM,
                    # ASan's shadow is private data of terabytes: no limit there.
                    data_bytes=0
                    if sanitizer_loaded()
                    else (budget.memory_mib + DATA_HEADROOM_MIB) << 20,
                )
            )
            watch_budget(budget, ", ".join(f"device {d.name}" for d in daemon.devices()))
            daemon.start_devices()
            if admin is not None:
                admin.start()
        if cfg.metrics_addr != "none":
            try:
                serve_metrics(cfg.metrics_addr, daemon.devices)
            except OSError as exc:
                # The devices matter more than their metrics: serve them anyway.
                log.error("metrics: cannot listen on %s: %s", cfg.metrics_addr, exc)
        daemon.run()
    finally:
        if admin is not None:
            admin.close()
        daemon.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "ctl":
        from vfiouser_net.ctl import main as ctl_main

        return ctl_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=LOG_LEVELS[args.log_level],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.print_capabilities:
        print(json.dumps(capabilities(), indent=2))
        return 0
    if args.command != "serve":
        parser.print_usage(sys.stderr)
        print("vfiouser-net: error: a command is required (serve, ctl)", file=sys.stderr)
        return 2
    try:
        return serve(args)
    except (DeviceError, TapError, ConfigError, DaemonError, SandboxError) as exc:
        print(f"vfiouser-net: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from vfiouser_net.admin.server import AdminServerError

        if isinstance(exc, AdminServerError):
            print(f"vfiouser-net: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
