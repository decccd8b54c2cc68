"""Command line: `vfiouser-net serve ...`."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
import threading
from types import FrameType

from vfiouser_net.device import (
    STEERING_POLICIES,
    DeviceError,
    DeviceOptions,
    VirtioNetDevice,
    parse_mac,
)
from vfiouser_net.metrics import DEFAULT_METRICS_PORT, parse_metrics_addr, serve_metrics
from vfiouser_net.tap import TapError

log = logging.getLogger("vfiouser_net")

LINK_POLL_SECONDS = 0.2


def default_mac(socket_path: str) -> bytes:
    """A stable locally administered MAC derived from the socket path."""
    digest = hashlib.sha256(socket_path.encode()).digest()
    return bytes([0x02, digest[0], digest[1], digest[2], digest[3], digest[4]])


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfiouser-net", description="A virtio-net PCI device served over vfio-user."
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="logging threshold (default: info)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve one device on a UNIX socket")
    serve.add_argument("--socket-path", required=True, help="vfio-user UNIX socket to listen on")
    serve.add_argument("--tap", required=True, help="host TAP interface (attached or created)")
    serve.add_argument("--mac", help="guest MAC address (default: derived from the socket path)")
    serve.add_argument("--mtu", type=_positive_int, default=1500, help="MTU offered (default 1500)")
    serve.add_argument(
        "--queue-size",
        type=_positive_int,
        default=256,
        help="maximum virtqueue size, a power of two (default 256)",
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
        "--metrics-addr",
        default=f"127.0.0.1:{DEFAULT_METRICS_PORT}",
        help=f"serve Prometheus metrics on HOST:PORT (default 127.0.0.1:{DEFAULT_METRICS_PORT}; "
        "port 0 picks a free one, 'none' disables)",
    )
    serve.add_argument(
        "--speed",
        type=_positive_int,
        default=10000,
        help="link speed in Mbit/s reported (default 10000)",
    )
    return parser


def serve(args: argparse.Namespace) -> int:
    mac = parse_mac(args.mac) if args.mac else default_mac(args.socket_path)
    opts = DeviceOptions(
        socket_path=args.socket_path,
        tap=args.tap,
        mac=mac,
        mtu=args.mtu,
        queue_size=args.queue_size,
        queue_pairs=args.queue_pairs,
        steering=args.steering,
        speed_mbps=args.speed,
    )
    if args.metrics_addr != "none":
        try:
            parse_metrics_addr(args.metrics_addr)
        except ValueError as exc:
            raise DeviceError(str(exc)) from exc
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    device = VirtioNetDevice(opts, log_level=logging.getLogger().getEffectiveLevel())

    def on_usr1(signum: int, frame: FrameType | None) -> None:
        # Until the admin channel exists, the operator's way to switch policy.
        nxt = STEERING_POLICIES[(STEERING_POLICIES.index(device.opts.steering) + 1) % 4]
        log.info("SIGUSR1: steering policy %s -> %s", device.opts.steering, nxt)
        device.set_steering(nxt)

    def on_usr2(signum: int, frame: FrameType | None) -> None:
        # Until metrics and the admin channel exist: counters into the log.
        log.info("device %s: counters %s", device.name, json.dumps(device.snapshot()))

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGUSR2, on_usr2)
    if args.metrics_addr != "none":
        try:
            serve_metrics(args.metrics_addr, lambda: [device])
        except OSError as exc:
            # The device matters more than its metrics: serve it anyway.
            log.error("metrics: cannot listen on %s: %s", args.metrics_addr, exc)
    try:
        device.start()
        while not stop.wait(LINK_POLL_SECONDS):
            device.poll_link()
    finally:
        device.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "serve":
            return serve(args)
    except (DeviceError, TapError) as exc:
        print(f"vfiouser-net: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
