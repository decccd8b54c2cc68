"""Cost: the daemon's CPU time per packet and its resident memory.

For 1 and 16 queue pairs a guest boots on the daemon (TCG, 2 vCPUs) and
brings every queue pair up (``ethtool -L eth0 combined N``, checked in the
daemon's metrics); then:

- memory: VmRSS and VmHWM from /proc/PID/status (with its anonymous, file
  and shared-memory parts: RssShmem is guest RAM the daemon touched) and Pss
  from /proc/PID/smaps_rollup, once idle and once after the traffic below;
- idle CPU: the daemon's CPU over a few idle seconds (busy polling would
  show here);
- CPU per packet: utime+stime of the daemon (all its threads:
  /proc/PID/stat) before and after a guest iperf3 run in each direction,
  divided by the frames the device moved in that run (the per-queue
  ``vfiouser_net_queue_packets_total`` counters of both directions, data and
  ACKs; a TSO/GSO frame counts once). Doorbells and interrupts per packet
  from the same counters.

The daemon runs under ``ip netns exec``, which execs it: its PID is the
Server's child process (checked against its command line).

    python bench/cost.py [--seconds 8] [--pairs 1,16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import (
    CLK_TCK,
    cpu_seconds,
    daemon_pid,
    exit_cleanly_on_sigterm,
    fmt,
    machine,
    machine_line,
    md_table,
)
from vfiouser_net_harness import metrics
from vfiouser_net_harness.iperf import Direction, run_iperf3
from vfiouser_net_harness.netns import NetNS
from vfiouser_net_harness.scenarios import guest_on_vfiouser_net

log = logging.getLogger("bench.cost")

DIRECTIONS: tuple[Direction, ...] = ("guest_tx", "guest_rx")
RSS_TARGET_MIB = 64.0


class BenchError(RuntimeError):
    pass


def _kib_fields(path: Path, keys: Sequence[str]) -> dict[str, float]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in keys:
            out[key] = int(rest.split()[0]) / 1024  # kB -> MiB
    return out


def memory(pid: int) -> dict[str, float]:
    """Resident memory of the daemon, MiB."""
    status = _kib_fields(
        Path(f"/proc/{pid}/status"), ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
    )
    rollup = _kib_fields(Path(f"/proc/{pid}/smaps_rollup"), ("Pss",))
    threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            threads = int(line.split()[1])
    return {
        "rss_mib": status["VmRSS"],
        "hwm_mib": status["VmHWM"],
        "rss_anon_mib": status["RssAnon"],
        "rss_file_mib": status["RssFile"],
        "rss_shmem_mib": status["RssShmem"],
        "pss_mib": rollup["Pss"],
        "threads": threads,
    }


def _wait_pairs_active(ns: NetNS, url: str, pairs: int, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    active = 0.0
    while time.monotonic() < deadline:
        samples = metrics.scrape(ns, url)
        active = metrics.value(samples, "device_queue_pairs_active")
        ready = metrics.value(samples, "device_driver_ready")
        if active == pairs and ready == 1:
            return active
        time.sleep(0.5)
    raise BenchError(f"the guest brought up {active:.0f} of {pairs} queue pairs")


def measure(
    pairs: int,
    *,
    seconds: int,
    streams: int,
    cpus: int,
    idle_seconds: float,
    daemon_args: Sequence[str] = (),
) -> dict[str, Any]:
    server_args = ["--queue-pairs", str(pairs), *daemon_args]
    with guest_on_vfiouser_net(cpus=cpus, server_args=server_args) as (
        guest,
        ns,
        server,
    ):
        pid = daemon_pid(server)
        url = server.metrics_url()
        active = _wait_pairs_active(ns, url, pairs)
        time.sleep(1.0)
        mem_idle = memory(pid)
        c0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(idle_seconds)
        idle_cpu = 100 * (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
        runs = []
        for direction in DIRECTIONS:
            before = metrics.queue_totals(metrics.scrape(ns, url))
            c0, t0 = cpu_seconds(pid), time.monotonic()
            res = run_iperf3(
                guest, ns, direction=direction, seconds=seconds, streams=streams, check=False
            )
            c1, t1 = cpu_seconds(pid), time.monotonic()
            after = metrics.queue_totals(metrics.scrape(ns, url))
            d = {q: {k: after[q][k] - before[q][k] for k in after[q]} for q in ("rx", "tx")}
            packets = d["rx"]["packets"] + d["tx"]["packets"]
            nbytes = d["rx"]["bytes"] + d["tx"]["bytes"]
            cpu = c1 - c0
            if packets <= 0:
                raise BenchError(f"{direction}: the device moved no packets")
            row = {
                "direction": direction,
                "streams": streams,
                "gbps": res.receiver_gbps,
                "wall_s": t1 - t0,
                "cpu_s": cpu,
                "cpu_percent": 100 * cpu / (t1 - t0),
                "packets": int(packets),
                "bytes": int(nbytes),
                "avg_frame_bytes": nbytes / packets,
                "cpu_ns_per_packet": 1e9 * cpu / packets,
                "cpu_ns_per_kib": 1e9 * cpu / (nbytes / 1024) if nbytes else float("nan"),
                "doorbells_per_packet": (d["rx"]["doorbells"] + d["tx"]["doorbells"]) / packets,
                "interrupts_per_packet": (d["rx"]["interrupts"] + d["tx"]["interrupts"]) / packets,
                "queues": d,
            }
            log.info(
                "%d pairs %s: %.0f ns/packet over %d packets (%.2f Gbit/s, CPU %.0f%%)",
                pairs,
                direction,
                row["cpu_ns_per_packet"],
                packets,
                res.receiver_gbps,
                row["cpu_percent"],
            )
            runs.append(row)
        mem_after = memory(pid)
        return {
            "pairs": pairs,
            "pairs_active": int(active),
            "pid": pid,
            "memory_idle": mem_idle,
            "memory_after_traffic": mem_after,
            "rss_max_mib": max(mem_idle["rss_mib"], mem_after["rss_mib"], mem_after["hwm_mib"]),
            "idle_cpu_percent": idle_cpu,
            "idle_seconds": idle_seconds,
            "runs": runs,
        }


def run(
    *,
    seconds: int = 8,
    pairs: Sequence[int] = (1, 16),
    cpus: int = 2,
    idle_seconds: float = 3.0,
    daemon_args: Sequence[str] = (),
) -> dict[str, Any]:
    rows = [
        measure(
            p,
            seconds=seconds,
            streams=1 if p == 1 else 4,
            cpus=cpus,
            idle_seconds=idle_seconds,
            daemon_args=daemon_args,
        )
        for p in pairs
    ]
    return {
        "seconds": seconds,
        "cpus": cpus,
        "daemon_args": list(daemon_args),
        "clk_tck": CLK_TCK,
        "rss_target_mib": RSS_TARGET_MIB,
        "rows": rows,
    }


def _daemon_note(result: dict[str, Any]) -> str:
    extra = result.get("daemon_args") or []
    return f"; daemon options: {shlex.join(extra)}" if extra else ""


def tables(result: dict[str, Any]) -> list[str]:
    lines = [
        f"### Cost: daemon CPU per packet (iperf3 {result['seconds']} s; packets = frames "
        "the device moved in both directions, a TSO frame counts once"
        f"{_daemon_note(result)})",
        "",
    ]
    cpu_rows = []
    for r in result["rows"]:
        for run_ in r["runs"]:
            cpu_rows.append(
                [
                    r["pairs"],
                    run_["direction"],
                    run_["streams"],
                    fmt(run_["gbps"]),
                    f"{run_['packets']:,}",
                    fmt(run_["avg_frame_bytes"], 0),
                    fmt(run_["cpu_percent"], 0),
                    fmt(run_["cpu_ns_per_packet"], 0),
                    fmt(run_["doorbells_per_packet"], 3),
                    fmt(run_["interrupts_per_packet"], 3),
                ]
            )
    lines += md_table(
        [
            "pairs",
            "direction",
            "streams",
            "Gbit/s",
            "packets",
            "avg frame B",
            "daemon CPU %",
            "CPU ns/packet",
            "doorbells/packet",
            "interrupts/packet",
        ],
        cpu_rows,
    )
    lines += [
        "",
        "### Cost: daemon memory (MiB; idle = guest attached, all queue pairs up; "
        "RssShmem = guest RAM the daemon touched)",
        "",
    ]
    mem_rows = []
    for r in result["rows"]:
        for when, m in (("idle", r["memory_idle"]), ("after traffic", r["memory_after_traffic"])):
            mem_rows.append(
                [
                    f"{r['pairs']} ({r['pairs_active']} up)",
                    when,
                    fmt(m["rss_mib"], 1),
                    fmt(m["pss_mib"], 1),
                    fmt(m["rss_anon_mib"], 1),
                    fmt(m["rss_file_mib"], 1),
                    fmt(m["rss_shmem_mib"], 1),
                    fmt(m["hwm_mib"], 1),
                    m["threads"],
                    fmt(r["idle_cpu_percent"], 1) if when == "idle" else "",
                ]
            )
    lines += md_table(
        [
            "pairs",
            "when",
            "VmRSS",
            "Pss",
            "RssAnon",
            "RssFile",
            "RssShmem",
            "VmHWM",
            "threads",
            "idle CPU %",
        ],
        mem_rows,
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8, help="iperf3 time per direction")
    parser.add_argument("--cpus", type=int, default=2, help="guest vCPUs")
    parser.add_argument("--pairs", default="1,16", help="comma-separated queue pair counts")
    parser.add_argument("--daemon-args", default="", help="extra vfiouser-net serve options")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    exit_cleanly_on_sigterm()
    result = run(
        seconds=args.seconds,
        pairs=[int(p) for p in args.pairs.split(",")],
        cpus=args.cpus,
        daemon_args=shlex.split(args.daemon_args),
    )
    m = machine()
    print("\n" + machine_line(m) + "\n")
    print("\n".join(tables(result)))
    if args.json:
        args.json.write_text(json.dumps({"machine": m, "cost": result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
