"""Guest level: TCP throughput and latency through this device against QEMU's
built-in virtio-net-pci and, where the host has Debian's dpdk-dev, a DPDK
vhost-user back end, in one run.

For each number of queue pairs the same guest (TCG, same vCPUs) boots on the
same kind of TAP set-up (a fresh network namespace, multiqueue TAP with more
than one pair), first on this device (the daemon in the namespace, QEMU
attached over vfio-user), then on QEMU's own virtio-net-pci (userspace
datapath, vhost=off, mq=on), then (with dpdk-testpmd on the host) on
virtio-net-pci with a vhost-user back end: dpdk-testpmd forwarding between
its vhost-user port and a TAP of its own (net_tap, no TSO; it busy-polls a
host core). In each boot:

- latency: ICMP echo, iputils ping from the host side of the namespace to
  the guest (one echo every 10 ms, each reply's RTT parsed), p50 and p99,
  measured first while nothing else runs;
- throughput: iperf3 TCP with 1 and 4 streams, guest transmit and guest
  receive, the receiver's rate; the guest's virtio interrupts on vCPU 0 and
  a single stream's iperf3 on vCPU 1 (see IRQ_CPU);
- back-end CPU: the host CPU time outside the guest's vCPUs during each
  iperf3 run (the daemon or dpdk-testpmd, plus QEMU's threads other than
  its vCPU threads, which carry QEMU's own datapath and, for the other two,
  the doorbells and interrupts), as Gbit/s per back-end core.

Each device is booted ``--boots`` times (default 3), in alternating order
(ours, QEMU, QEMU, ours, ...): on this kind of machine one boot's figures
differ from the next boot's of the same device by up to 2x (where the host
scheduler puts the vCPU, main loop and worker threads), far more than within
a boot. A row gives the median boot's throughput and the spread; latency
percentiles are taken over the echoes of all boots together.

Under TCG the guest's CPU dominates: compare the ratios within one run, not
Gbit/s across machines.

    python bench/guest_level.py [--seconds 8] [--pairs 1,4] [--pings 500] [--boots 3]
                                [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from common import (
    cpu_seconds,
    daemon_pid,
    exit_cleanly_on_sigterm,
    fmt,
    machine,
    machine_line,
    md_table,
    percentile,
    ratio,
    threads_cpu_seconds,
    times,
)
from vfiouser_net_harness.guest import Guest
from vfiouser_net_harness.iperf import Direction, run_iperf3
from vfiouser_net_harness.netns import NetNS, run_cmd
from vfiouser_net_harness.scenarios import (
    dpdk_testpmd,
    guest_on_builtin_virtio_net,
    guest_on_dpdk_vhost_user,
    guest_on_vfiouser_net,
)

log = logging.getLogger("bench.guest")

DIRECTIONS: tuple[Direction, ...] = ("guest_tx", "guest_rx")
STREAMS = (1, 4)
OURS, QEMU, DPDK = "ours", "qemu", "dpdk"
DEVICES = {
    OURS: "vfiouser-net (vfio-user-pci, daemon with C datapath)",
    QEMU: "QEMU virtio-net-pci (userspace datapath, vhost=off)",
    DPDK: "virtio-net-pci on DPDK testpmd vhost-user + net_tap (busy-polls a core)",
}
# QEMU's vCPU threads ("CPU 0/TCG"): the guest, not the back end.
VCPU_THREAD = "CPU "
PING_INTERVAL = 0.01
_RTT = re.compile(r"time=([0-9.]+) ms")


class BenchError(RuntimeError):
    pass


def ping_version() -> str:
    proc = run_cmd(["ping", "-V"], check=False)
    text = (proc.stdout + proc.stderr).strip()
    return text.splitlines()[0] if text else "unknown ping"


def latency_method(count: int, boots: int = 1) -> str:
    per = f"{count} pings" if boots == 1 else f"{count} pings in each of {boots} boots"
    return (
        f"ICMP echo: {per} at {PING_INTERVAL * 1000:.0f} ms intervals from the host "
        f"side of the namespace to the guest ({ping_version()}), RTT of each reply"
    )


def ping_rtts(ns: NetNS, addr: str, count: int) -> list[float]:
    """RTTs (ms) of the replies to ``count`` ICMP echoes to addr from inside ns."""
    # Warm-up: neighbour entries and the guest's first wake-ups out of the way.
    ns.run(["ping", "-n", "-c", "5", "-i", "0.05", "-W", "2", addr], check=False)
    proc = ns.run(
        ["ping", "-n", "-c", str(count), "-i", str(PING_INTERVAL), "-W", "2", addr],
        check=False,
        timeout=count * PING_INTERVAL * 4 + 60,
    )
    rtts = [float(x) for x in _RTT.findall(proc.stdout)]
    if not rtts:
        raise BenchError(f"no echo replies from {addr}:\n{proc.stdout[-2000:]}{proc.stderr}")
    return rtts


def rtt_stats(rtts: Sequence[float], count: int) -> dict[str, float | int]:
    """Percentiles (ms) of the replies to ``count`` echoes."""
    return {
        "count": count,
        "received": len(rtts),
        "lost": count - len(rtts),
        "p50_ms": percentile(rtts, 50),
        "p99_ms": percentile(rtts, 99),
        "mean_ms": statistics.fmean(rtts),
        "min_ms": min(rtts),
        "max_ms": max(rtts),
    }


# Where the guest runs its network interrupts and a single iperf3 stream.
# Left to chance, a boot where the stream shares the interrupts' vCPU
# receives at about two thirds of the rate of one where it does not, which
# made single runs of the same device differ by up to 1.5x. Both devices get
# the same placement.
IRQ_CPU = 0
STREAM_CPU = 1


def pin_guest_irqs(guest: Guest, cpu: int) -> None:
    guest.check(
        "for i in $(grep virtio /proc/interrupts | cut -d: -f1); do "
        f"echo {cpu} > /proc/irq/$i/smp_affinity_list; done"
    )


def backend_cpu(dev: str, ctx: Any) -> Callable[[], float]:
    """Host CPU seconds so far outside the guest's vCPUs, for a set-up's
    context (guest, ns[, server or testpmd process])."""
    guest: Guest = ctx[0]
    assert guest.proc is not None
    qemu = guest.proc.pid
    if dev == OURS:
        daemon = daemon_pid(ctx[2])
        return lambda: cpu_seconds(daemon) + threads_cpu_seconds(qemu, VCPU_THREAD)
    if dev == DPDK:
        testpmd = ctx[2].pid
        return lambda: cpu_seconds(testpmd) + threads_cpu_seconds(qemu, VCPU_THREAD)
    return lambda: threads_cpu_seconds(qemu, VCPU_THREAD)


def measure(
    dev: str,
    setup: AbstractContextManager[Any],
    *,
    seconds: int,
    streams: Sequence[int],
    pings: int,
    cpus: int,
) -> dict[str, Any]:
    """Latency and every iperf3 case in one boot of the given set-up."""
    with setup as ctx:
        guest: Guest = ctx[0]
        ns: NetNS = ctx[1]
        cpu = backend_cpu(dev, ctx)
        pinned = cpus > STREAM_CPU
        if pinned:
            pin_guest_irqs(guest, IRQ_CPU)
        rtts = ping_rtts(ns, ns.guest_addr(), pings)
        out: dict[str, Any] = {"rtts": rtts, "tcp": {}}
        log.info("latency: %s", rtt_stats(rtts, pings))
        for direction in DIRECTIONS:
            for n in streams:
                # The receiver's rate; iperf3's byte cross-check is loose with
                # several streams (per-stream end times), so it is recorded,
                # not enforced: one odd report must not cost a whole run.
                affinity = f"-A {STREAM_CPU}" if pinned and n == 1 else ""
                c0, t0 = cpu(), time.monotonic()
                res = run_iperf3(
                    guest,
                    ns,
                    direction=direction,
                    seconds=seconds,
                    streams=n,
                    check=False,
                    extra_client_args=affinity,
                )
                c1, t1 = cpu(), time.monotonic()
                summary = res.summary()
                cores = (c1 - c0) / (t1 - t0)
                summary["backend_cores"] = cores
                summary["gbps_per_core"] = ratio(float(summary["receiver_gbps"]), cores)
                problems = res.inconsistencies()
                if problems:
                    log.warning("iperf3 %s x%d: %s", direction, n, "; ".join(problems))
                summary["problems"] = problems
                out["tcp"][f"{direction}/{n}"] = summary
        return out


def median_boot(boots: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """The boot whose receiver rate for ``key`` is the median (the lower
    middle one for an even count), with every boot's rate beside it."""
    ranked = sorted(boots, key=lambda b: float(b["tcp"][key]["receiver_gbps"]))
    mid = dict(ranked[(len(ranked) - 1) // 2]["tcp"][key])
    mid["boots_gbps"] = [b["tcp"][key]["receiver_gbps"] for b in boots]
    return mid


def devices_here() -> tuple[str, ...]:
    return (OURS, QEMU, DPDK) if dpdk_testpmd() else (OURS, QEMU)


def run(
    *,
    seconds: int = 8,
    pairs: Sequence[int] = (1,),
    streams: Sequence[int] = STREAMS,
    pings: int = 500,
    cpus: int = 2,
    boots: int = 3,
    daemon_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Every device (devices_here) for each number of pairs, each booted
    ``boots`` times in rotating order; rows with ratios (ours / QEMU, and
    ours / DPDK where it ran).

    ``daemon_args``: extra ``vfiouser-net serve`` options (e.g. ``--busy-poll-us 0``).
    """
    tcp_rows: list[dict[str, Any]] = []
    latency_rows: list[dict[str, Any]] = []
    devices = devices_here()
    for p in pairs:
        runs: dict[str, list[dict[str, Any]]] = {d: [] for d in devices}
        for b in range(boots):
            # Rotated, and reversed every other boot: ours, QEMU, DPDK, then
            # DPDK, QEMU, ours, ... (as alternating with two).
            order = devices if b % 2 == 0 else tuple(reversed(devices))
            for dev in order:
                setup: AbstractContextManager[Any]
                if dev == OURS:
                    setup = guest_on_vfiouser_net(
                        cpus=cpus, server_args=["--queue-pairs", str(p), *daemon_args]
                    )
                elif dev == DPDK:
                    setup = guest_on_dpdk_vhost_user(cpus=cpus, queues=p)
                else:
                    setup = guest_on_builtin_virtio_net(cpus=cpus, queues=p)
                log.info("pairs %d, boot %d/%d: %s", p, b + 1, boots, DEVICES[dev])
                runs[dev].append(
                    measure(dev, setup, seconds=seconds, streams=streams, pings=pings, cpus=cpus)
                )
        for direction in DIRECTIONS:
            for n in streams:
                key = f"{direction}/{n}"
                a, q = median_boot(runs[OURS], key), median_boot(runs[QEMU], key)
                row = {
                    "pairs": p,
                    "direction": direction,
                    "streams": n,
                    "ours_gbps": a["receiver_gbps"],
                    "qemu_gbps": q["receiver_gbps"],
                    "ratio": ratio(a["receiver_gbps"], q["receiver_gbps"]),
                    "ours": a,
                    "qemu": q,
                }
                if DPDK in runs:
                    d = median_boot(runs[DPDK], key)
                    row |= {
                        "dpdk_gbps": d["receiver_gbps"],
                        "dpdk_ratio": ratio(a["receiver_gbps"], d["receiver_gbps"]),
                        "dpdk": d,
                    }
                tcp_rows.append(row)
        lat: dict[str, dict[str, Any]] = {
            dev: rtt_stats([x for r in runs[dev] for x in r["rtts"]], pings * boots)
            | {"boots_p50_ms": [percentile(r["rtts"], 50) for r in runs[dev]]}
            for dev in devices
        }
        la, lb = lat[OURS], lat[QEMU]
        lrow: dict[str, Any] = {
            "pairs": p,
            "ours": la,
            "qemu": lb,
            "p50_ratio": ratio(la["p50_ms"], lb["p50_ms"]),
            "p99_ratio": ratio(la["p99_ms"], lb["p99_ms"]),
        }
        if DPDK in lat:
            lrow["dpdk"] = lat[DPDK]
        latency_rows.append(lrow)
    return {
        "devices": {d: DEVICES[d] for d in devices},
        "cpus": cpus,
        "boots": boots,
        "daemon_args": list(daemon_args),
        "seconds": seconds,
        "pairs": list(pairs),
        "streams": list(streams),
        "latency_method": latency_method(pings, boots),
        "tcp": tcp_rows,
        "latency": latency_rows,
    }


def _daemon_note(result: dict[str, Any]) -> str:
    extra = result.get("daemon_args") or []
    return f"; daemon options: {shlex.join(extra)}" if extra else ""


def _spread(values: Sequence[float] | None, digits: int = 2) -> str:
    if not values or len(values) < 2:
        return ""
    return "[" + ", ".join(fmt(v, digits) for v in values) + "]"


def tables(result: dict[str, Any]) -> list[str]:
    boots = int(result.get("boots", 1))
    dpdk = DPDK in result.get("devices", {})
    lines = [
        f"### Guest level: iperf3 TCP, {result['seconds']} s per case, TCG guest with "
        f"{result['cpus']} vCPUs (receiver's rate; median of {boots} boot(s) per device, "
        f"every boot's figure in brackets){_daemon_note(result)}",
        "",
    ]
    head = ["pairs", "direction", "streams", "vfiouser-net Gbit/s", "QEMU virtio-net-pci Gbit/s"]
    head += ["ratio"] + (["DPDK vhost-user Gbit/s", "ratio to DPDK"] if dpdk else [])
    head += ["Gbit/s per back-end core: ours / QEMU" + (" / DPDK" if dpdk else "")]
    rows: list[list[object]] = []
    for r in result["tcp"]:
        row: list[object] = [
            r["pairs"],
            r["direction"],
            r["streams"],
            f"{fmt(r['ours_gbps'])} {_spread(r['ours'].get('boots_gbps'))}",
            f"{fmt(r['qemu_gbps'])} {_spread(r['qemu'].get('boots_gbps'))}",
            f"{times(r['ratio'])}",
        ]
        per_core = [r["ours"].get("gbps_per_core"), r["qemu"].get("gbps_per_core")]
        if dpdk:
            row += [
                f"{fmt(r['dpdk_gbps'])} {_spread(r['dpdk'].get('boots_gbps'))}",
                f"{times(r['dpdk_ratio'])}",
            ]
            per_core.append(r["dpdk"].get("gbps_per_core"))
        row.append(" / ".join(fmt(x) for x in per_core))
        rows.append(row)
    lines += md_table(head, rows)
    lines += ["", f"### Guest level: latency, {result['latency_method']}", ""]
    rows = []
    for r in result["latency"]:
        a, b, d = r["ours"], r["qemu"], r.get("dpdk")
        for pct in ("p50", "p99"):
            row = [r["pairs"], pct, fmt(a[f"{pct}_ms"], 3), fmt(b[f"{pct}_ms"], 3)]
            row += [f"{fmt(r[f'{pct}_ratio'])}x"]
            if dpdk:
                row.append(fmt(d[f"{pct}_ms"], 3) if d else "n/a")
            rows.append(row)
        if len(a.get("boots_p50_ms", [])) > 1:
            row = [r["pairs"], "p50 of each boot", _spread(a["boots_p50_ms"], 3)]
            row += [_spread(b["boots_p50_ms"], 3), ""]
            if dpdk:
                row.append(_spread(d["boots_p50_ms"], 3) if d else "")
            rows.append(row)
        row = [r["pairs"], "lost", f"{a['lost']}/{a['count']}", f"{b['lost']}/{b['count']}", ""]
        if dpdk:
            row.append(f"{d['lost']}/{d['count']}" if d else "")
        rows.append(row)
    head = ["pairs", "RTT", "vfiouser-net ms", "QEMU virtio-net-pci ms", "ratio (lower is better)"]
    lines += md_table(head + (["DPDK vhost-user ms"] if dpdk else []), rows)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8, help="iperf3 time per case")
    parser.add_argument("--cpus", type=int, default=2, help="guest vCPUs (both devices)")
    parser.add_argument("--pairs", default="1", help="comma-separated queue pair counts")
    parser.add_argument("--pings", type=int, default=500, help="ICMP echoes per boot")
    parser.add_argument("--boots", type=int, default=3, help="boots per device (alternating)")
    parser.add_argument("--daemon-args", default="", help="extra vfiouser-net serve options")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    exit_cleanly_on_sigterm()
    result = run(
        seconds=args.seconds,
        pairs=[int(p) for p in args.pairs.split(",")],
        pings=args.pings,
        cpus=args.cpus,
        boots=args.boots,
        daemon_args=shlex.split(args.daemon_args),
    )
    m = machine()
    print("\n" + machine_line(m) + "\n")
    print("\n".join(tables(result)))
    if args.json:
        args.json.write_text(json.dumps({"machine": m, "guest": result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
