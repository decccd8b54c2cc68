"""Guest TCP throughput: this device against QEMU's built-in virtio-net-pci.

Boots the same guest (TCG, same vCPUs) twice on the same kind of TAP set-up,
runs iperf3 in both directions through each, and prints a table with the
ratio. Under TCG the guest's CPU dominates, so compare the ratio within one
run, not Gbit/s across machines.

    python bench/guest_tcp.py [--seconds 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness.guest import Guest
from tests.harness.iperf import Direction, run_iperf3
from tests.harness.netns import NetNS
from tests.harness.scenarios import (
    guest_on_builtin_virtio_net,
    guest_on_vfiouser_net,
)

log = logging.getLogger("bench")
DIRECTIONS: tuple[Direction, ...] = ("guest_tx", "guest_rx")


def _measure(setup: AbstractContextManager[Any], seconds: int) -> dict[str, float]:
    with setup as ctx:
        guest: Guest = ctx[0]
        ns: NetNS = ctx[1]
        out = {}
        for direction in DIRECTIONS:
            res = run_iperf3(guest, ns, direction=direction, seconds=seconds)
            out[direction] = res.receiver_bps / 1e9
            log.info("%s: %s", direction, res.summary())
        return out


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import os

    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def rows(results: dict[str, dict[str, float]]) -> Iterator[str]:
    yield "| direction | vfiouser-net Gbit/s | QEMU virtio-net-pci Gbit/s | ratio |"
    yield "|---|---|---|---|"
    for d in DIRECTIONS:
        ours, theirs = results["vfiouser-net"][d], results["qemu-virtio-net-pci"][d]
        ratio = ours / theirs if theirs else float("nan")
        yield f"| {d} | {ours:.2f} | {theirs:.2f} | {ratio:.2f}x |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = {
        "vfiouser-net": _measure(guest_on_vfiouser_net(cpus=args.cpus), args.seconds),
        "qemu-virtio-net-pci": _measure(guest_on_builtin_virtio_net(cpus=args.cpus), args.seconds),
    }
    print(
        f"\nguest iperf3 TCP, {args.seconds} s, TCG guest with {args.cpus} vCPUs on {machine()}\n"
    )
    for line in rows(results):
        print(line)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": machine(), "seconds": args.seconds, "results_gbps": results}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
