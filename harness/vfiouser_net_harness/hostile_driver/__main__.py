"""Command line: run the catalogue (or some attacks) against a daemon."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from vfiouser_net_harness.hostile_driver.catalogue import CATALOGUE
from vfiouser_net_harness.hostile_driver.counters import admin_sources
from vfiouser_net_harness.hostile_driver.driver import HostileDriver


def open_packet_socket(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((ifname, 0x0003))
    return s


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vfiouser_net_harness.hostile_driver",
        description="Attack a vfiouser-net device while healthy traffic runs on its other pairs.",
    )
    p.add_argument("--socket", help="the daemon's vfio-user socket")
    p.add_argument("--tap", help="the device's TAP (in this network namespace)")
    p.add_argument("--admin-socket", help="the daemon's admin socket (counters, ring state)")
    p.add_argument("--device", help="device name on the admin socket (default: the only one)")
    p.add_argument(
        "--daemon-pid", type=int, help="the daemon's pid (memory growth under the flood)"
    )
    p.add_argument("--attacks", help="comma-separated attack names (default: all)")
    p.add_argument("--seed", type=int, help="random seed (values written by the fuzz attacks)")
    p.add_argument("--json", help="write the report here ('-': stdout)")
    p.add_argument("--list", action="store_true", help="list the attacks and exit")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.list:
        for a in CATALOGUE.values():
            print(f"{a.name:32} [{a.scope}] {a.reaction}")
        return 0
    if not (args.socket and args.tap and args.admin_socket):
        p.error("--socket, --tap and --admin-socket are required")
    names = [n for n in args.attacks.split(",") if n] if args.attacks else None
    counters, ring_state = admin_sources(args.admin_socket, args.device)
    sock = open_packet_socket(args.tap)
    try:
        with HostileDriver(
            args.socket,
            sock,
            counters=counters,
            ring_state=ring_state,
            daemon_pid=args.daemon_pid,
            seed=args.seed,
        ) as hd:
            report = hd.run(names)
    finally:
        sock.close()
    for r in report["attacks"]:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['name']} ({r['seconds']} s)")
        for f in r["failures"]:
            print(f"     {f}")
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
