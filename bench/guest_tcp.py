"""Guest TCP throughput: this device against QEMU's built-in virtio-net-pci.

Boots the same guest (TCG, same vCPUs) on the same kind of TAP set-up for
each device and each number of queue pairs, runs iperf3 in both directions
(several streams with more than one pair), and prints a table with the ratio.
Under TCG the guest's CPU dominates, so compare ratios within one run, not
Gbit/s across machines.

    python bench/guest_tcp.py [--seconds 8] [--pairs 1,2,4] [--streams 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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
OURS, QEMU = "vfiouser-net", "qemu-virtio-net-pci"


def _measure(setup: AbstractContextManager[Any], seconds: int, streams: int) -> dict[str, float]:
    with setup as ctx:
        guest: Guest = ctx[0]
        ns: NetNS = ctx[1]
        out = {}
        for direction in DIRECTIONS:
            # With several streams iperf3's own byte cross-check is loose
            # (per-stream end times); the figure is the receiver's rate.
            res = run_iperf3(
                guest, ns, direction=direction, seconds=seconds, streams=streams, check=streams == 1
            )
            out[direction] = res.receiver_bps / 1e9
            log.info("%s: %s", direction, res.summary())
        return out


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def rows(results: dict[int, dict[str, dict[str, float]]]) -> Iterator[str]:
    yield "| pairs | direction | vfiouser-net Gbit/s | QEMU virtio-net-pci Gbit/s | ratio |"
    yield "|---|---|---|---|---|"
    for pairs, res in results.items():
        for d in DIRECTIONS:
            ours, theirs = res[OURS][d], res[QEMU][d]
            ratio = ours / theirs if theirs else float("nan")
            yield f"| {pairs} | {d} | {ours:.2f} | {theirs:.2f} | {ratio:.2f}x |"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--pairs", default="1", help="comma-separated queue pair counts")
    parser.add_argument(
        "--streams", type=int, default=0, help="iperf3 streams (default 1, or 4 with pairs > 1)"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results: dict[int, dict[str, dict[str, float]]] = {}
    for pairs in (int(p) for p in args.pairs.split(",")):
        streams = args.streams or (4 if pairs > 1 else 1)
        ours = guest_on_vfiouser_net(cpus=args.cpus, server_args=["--queue-pairs", str(pairs)])
        theirs = guest_on_builtin_virtio_net(cpus=args.cpus, queues=pairs)
        results[pairs] = {
            OURS: _measure(ours, args.seconds, streams),
            QEMU: _measure(theirs, args.seconds, streams),
        }
    print(
        f"\nguest iperf3 TCP, {args.seconds} s, TCG guest with {args.cpus} vCPUs on {machine()}\n"
    )
    for line in rows(results):
        print(line)
    if args.json:
        record = {"machine": machine(), "seconds": args.seconds, "results_gbps": results}
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
