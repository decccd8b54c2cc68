"""The benchmark suite: device level, guest level and cost in one run.

    bash scripts/bench.sh [--quick] [--only device,guest,cost] [--out DIR] [--seconds 8]
                          [--pairs 1,4] [--pings 500] [--device-seconds 3]

- device level (bench/device_level.py): the datapath against a synthetic
  driver, packet rate per direction, frame size and pairs, against the TAP
  ceiling of a plain readv/writev loop, with doorbells and interrupts per
  packet;
- guest level (bench/guest_level.py): a TCG guest's iperf3 TCP (1 and 4
  streams, both directions) and ICMP echo latency, this device against QEMU's
  built-in virtio-net-pci, same vCPUs, same TAP set-up;
- cost (bench/cost.py): the daemon's CPU per packet and its resident memory
  with 1 and 16 queue pairs.

Prints one markdown table per part, the machine, and the targets with
pass/fail marks; writes DIR/results.json and DIR/results.png (default
bench/results/). ``--quick`` is a short smoke run (device level quick, 2 s
iperf3 runs, 100 pings, 1 pair; the 16-pair memory is still measured).
A part that fails is recorded in the JSON and the run exits 1 after the
others have run; targets that are missed do not change the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import cost  # noqa: E402
import guest_level  # noqa: E402
from common import (  # noqa: E402
    REPO,
    exit_cleanly_on_sigterm,
    fmt,
    machine,
    machine_line,
    md_table,
    source,
    source_line,
    times,
)

log = logging.getLogger("bench")

PARTS = ("device", "guest", "cost")
DEFAULT_OUT = REPO / "bench" / "results"

# Targets (issue #6).
DEVICE_MIN_RATIO = 0.9  # device level, of the TAP ceiling, per direction (issue #14)
BATCHED_MIN_RATIO = 1.2  # batched (io_uring) 64 B transmit, of the one-syscall ceiling
SCALING_MIN = 1.6  # packet rate with 2 pairs over 1 pair
GUEST_TCP_MIN_RATIO = 1.0  # over QEMU's virtio-net-pci (issue #14; 1.2x stays the goal)
LATENCY_P50_MAX_RATIO = 1.1  # over QEMU's virtio-net-pci
LATENCY_P99_MAX_RATIO = 1.2  # over QEMU's virtio-net-pci
DOORBELLS_MAX = 0.05  # per packet at saturation (device level)
INTERRUPTS_MAX = 0.1  # per packet at saturation (device level)
RSS_MAX_MIB = 64.0  # with 16 queue pairs


class DeviceLevelMissing(RuntimeError):
    pass


def load_device_level() -> ModuleType:
    """bench/device_level.py, imported only when the device part runs."""
    if not (BENCH / "device_level.py").is_file():
        raise DeviceLevelMissing(
            f"the device level benchmark ({BENCH / 'device_level.py'}) is not there yet; "
            "run the other parts with --only guest,cost"
        )
    module = importlib.import_module("device_level")
    if not callable(getattr(module, "run", None)):
        raise DeviceLevelMissing(f"{module.__file__} has no run(seconds, quick) function")
    return module


# --- targets ---------------------------------------------------------------------------


def _target(name: str, measured: str, value: float | None, ok: bool | None) -> dict[str, Any]:
    return {"target": name, "measured": measured, "value": value, "ok": ok}


def _usable(part: Any) -> bool:
    return isinstance(part, dict) and "error" not in part


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _missing(name: str, part: Any) -> dict[str, Any]:
    return _target(name, "not run" if part is None else "part failed", None, None)


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target with what was measured and a mark (None: not measured)."""
    out: list[dict[str, Any]] = []
    dev: Any = results.get("device")
    for d in ("tx", "rx"):
        name = f"device level {d} >= {DEVICE_MIN_RATIO}x TAP ceiling (every case)"
        rows = [r for r in dev["rows"] if r["direction"] == d] if _usable(dev) else []
        rows = [r for r in rows if _is_number(r["ratio"])]
        if not rows:
            out.append(_missing(name, dev))
            continue
        worst = min(rows, key=lambda r: float(r["ratio"]))
        out.append(
            _target(
                name,
                f"min {times(worst['ratio'])} ({worst['frame_bytes']} B, {worst['pairs']} pair(s))",
                float(worst["ratio"]),
                float(worst["ratio"]) >= DEVICE_MIN_RATIO,
            )
        )
    name = f"batched tx 64 B >= {BATCHED_MIN_RATIO}x one-syscall TAP ceiling (io_uring)"
    rows = (
        [r for r in dev["rows"] if r["direction"] == "tx" and r["frame_bytes"] == 64]
        if _usable(dev)
        else []
    )
    rows = [r for r in rows if "batched" in r and _is_number(r["batched"]["ratio"])]
    if rows:
        worst = min(rows, key=lambda r: float(r["batched"]["ratio"]))
        v = float(worst["batched"]["ratio"])
        shown = ", ".join(f"{r['pairs']}p {times(r['batched']['ratio'])}" for r in rows)
        out.append(_target(name, f"min {times(v)} ({shown})", v, v >= BATCHED_MIN_RATIO))
    else:
        out.append(_missing(name, dev))
    name = f"2 pairs >= {SCALING_MIN}x packet rate of 1 pair"
    scaling = {
        k: float(v)
        for k, v in (dev.get("scaling") or {} if _usable(dev) else {}).items()
        if _is_number(v)
    }
    if scaling:
        low = min(scaling.values())
        shown = ", ".join(f"{k} {times(v)}" for k, v in scaling.items())
        out.append(_target(name, shown, low, low >= SCALING_MIN))
    else:
        out.append(_missing(name, dev))
    for key, limit, label in (
        ("doorbells_per_packet", DOORBELLS_MAX, "doorbells"),
        ("interrupts_per_packet", INTERRUPTS_MAX, "interrupts"),
    ):
        name = f"<= {limit} {label} per packet at saturation (device level, every case)"
        rows = [r for r in dev["rows"] if _is_number(r["device"][key])] if _usable(dev) else []
        if not rows:
            out.append(_missing(name, dev))
            continue
        worst = max(rows, key=lambda r: float(r["device"][key]))
        v = float(worst["device"][key])
        where = f"{worst['direction']} {worst['frame_bytes']} B, {worst['pairs']} pair(s)"
        out.append(_target(name, f"max {fmt(v, 3)} ({where})", v, v <= limit))
    guest: Any = results.get("guest")
    for d in guest_level.DIRECTIONS:
        name = f"guest TCP {d} >= {GUEST_TCP_MIN_RATIO}x QEMU virtio-net-pci (every case)"
        rows = [r for r in guest["tcp"] if r["direction"] == d] if _usable(guest) else []
        if not rows:
            out.append(_missing(name, guest))
            continue
        worst = min(rows, key=lambda r: float(r["ratio"]))
        shown = ", ".join(f"x{r['streams']}/{r['pairs']}p {times(r['ratio'])}" for r in rows)
        v = float(worst["ratio"])
        out.append(_target(name, f"min {times(v)} ({shown})", v, v >= GUEST_TCP_MIN_RATIO))
    for pct, limit in (("p50", LATENCY_P50_MAX_RATIO), ("p99", LATENCY_P99_MAX_RATIO)):
        name = f"latency {pct} <= {limit}x QEMU virtio-net-pci (ICMP echo)"
        rows = guest["latency"] if _usable(guest) else []
        if rows:
            worst = max(rows, key=lambda r: float(r[f"{pct}_ratio"]))
            v = float(worst[f"{pct}_ratio"])
            shown = (
                f"{times(v)} ({fmt(worst['ours'][f'{pct}_ms'], 3)} vs "
                f"{fmt(worst['qemu'][f'{pct}_ms'], 3)} ms, {worst['pairs']} pair(s))"
            )
            out.append(_target(name, shown, v, v <= limit))
        else:
            out.append(_missing(name, guest))
    c: Any = results.get("cost")
    name = f"daemon RSS < {RSS_MAX_MIB:g} MiB with 16 queue pairs"
    rows = [r for r in c["rows"] if r["pairs"] == 16] if _usable(c) else []
    if rows:
        v = float(rows[0]["rss_max_mib"])
        shown = f"{fmt(v, 1)} MiB (max of idle, after traffic and VmHWM)"
        out.append(_target(name, shown, v, v < RSS_MAX_MIB))
    else:
        out.append(_missing(name, c))
    return out


# --- tables ----------------------------------------------------------------------------


def _mega(x: float | None) -> float | None:
    return None if x is None else x / 1e6


def device_tables(part: dict[str, Any]) -> list[str]:
    lines = [
        f"### Device level: datapath against the TAP ceiling ({part.get('seconds', '?')} s "
        "per case)",
        "",
    ]
    rows = []
    for r in part["rows"]:
        d, c = r["device"], r["ceiling"]
        rows.append(
            [
                r["direction"],
                r["frame_bytes"],
                r["pairs"],
                fmt(_mega(d["pps"]), 3),
                fmt(_mega(c["pps"]), 3),
                f"{times(r['ratio'])}",
                fmt(d["gbps"]),
                fmt(c["gbps"]),
                fmt(d["doorbells_per_packet"], 3),
                fmt(d["interrupts_per_packet"], 3),
                fmt(_mega(r["batched"]["pps"]), 3) if "batched" in r else "-",
                times(r["batched"]["ratio"]) if "batched" in r else "-",
            ]
        )
    lines += md_table(
        [
            "direction",
            "frame B",
            "pairs",
            "device Mpps",
            "ceiling Mpps",
            "ratio",
            "device Gbit/s",
            "ceiling Gbit/s",
            "doorbells/packet",
            "interrupts/packet",
            "batched Mpps",
            "batched / ceiling",
        ],
        rows,
    )
    scaling = part.get("scaling") or {}
    if scaling:
        shown = ", ".join(f"{k} {times(v)}" for k, v in scaling.items())
        lines += ["", f"2 pairs / 1 pair packet rate: {shown}"]
    return lines


def target_table(targets: Sequence[dict[str, Any]]) -> list[str]:
    marks = {True: "✅ pass", False: "❌ FAIL", None: "— n/a"}
    return [
        "### Targets",
        "",
        *md_table(
            ["target", "measured", "result"],
            ([t["target"], t["measured"], marks[t["ok"]]] for t in targets),
        ),
    ]


def report(results: dict[str, Any]) -> list[str]:
    lines = [results["machine_line"], source_line(results.get("source") or {}), ""]
    renderers: dict[str, Callable[[dict[str, Any]], list[str]]] = {
        "device": device_tables,
        "guest": guest_level.tables,
        "cost": cost.tables,
    }
    for part in PARTS:
        data = results.get(part)
        if data is None:
            continue
        if "error" in data:
            lines += [f"### {part}: FAILED", "", "```", data["error"].rstrip(), "```", ""]
            continue
        lines += [*renderers[part](data), ""]
    lines += target_table(results["targets"])
    return lines


# --- running ---------------------------------------------------------------------------


def _finite(x: Any) -> Any:
    """JSON without NaN/Infinity (they are not JSON): None instead."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    p.add_argument("--quick", action="store_true", help="short smoke run of everything")
    p.add_argument("--only", default=",".join(PARTS), help="comma-separated parts to run")
    p.add_argument("--seconds", type=int, help="iperf3 time per case (default 8; quick 2)")
    p.add_argument("--pairs", help="guest level queue pair counts (default 1)")
    p.add_argument("--pings", type=int, help="ICMP echoes per device (default 500; quick 100)")
    p.add_argument("--cpus", type=int, default=2, help="guest vCPUs (both devices)")
    p.add_argument(
        "--boots", type=int, help="guest level: boots per device, alternating (default 3; quick 1)"
    )
    p.add_argument(
        "--device-seconds",
        type=float,
        help="device level time per case (default: bench/device_level.py's, shorter with --quick)",
    )
    p.add_argument(
        "--daemon-args",
        default="",
        help="extra 'vfiouser-net serve' options for the guest level and cost "
        "(e.g. '--busy-poll-us 0')",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log the harness too")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        p.error(f"--only takes some of {','.join(PARTS)} (got {args.only!r})")
    args.parts = [x for x in PARTS if x in parts]
    q = args.quick
    args.seconds = args.seconds or (2 if q else 8)
    args.pings = args.pings or (100 if q else 500)
    args.boots = args.boots or (1 if q else 3)
    if args.boots < 1:
        p.error("--boots must be at least 1")
    pairs = args.pairs or "1"
    try:
        args.pair_list = [int(x) for x in pairs.split(",")]
    except ValueError:
        p.error(f"--pairs takes comma-separated numbers (got {pairs!r})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    if not args.verbose:
        logging.getLogger("tests").setLevel(logging.WARNING)
    exit_cleanly_on_sigterm()
    device_level = None
    if "device" in args.parts:
        try:
            device_level = load_device_level()
        except DeviceLevelMissing as exc:
            print(f"bench/run.py: {exc}", file=sys.stderr)
            return 2
    m = machine()
    results: dict[str, Any] = {
        "machine": m,
        "machine_line": machine_line(m),
        "source": source(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "options": {
            "quick": args.quick,
            "parts": args.parts,
            "seconds": args.seconds,
            "pairs": args.pair_list,
            "pings": args.pings,
            "cpus": args.cpus,
            "device_seconds": args.device_seconds,
            "daemon_args": args.daemon_args,
        },
    }

    def run_device() -> dict[str, Any]:
        assert device_level is not None
        if args.device_seconds is None:  # the module's own default (and its quick mode)
            return dict(device_level.run(quick=args.quick))
        return dict(device_level.run(seconds=args.device_seconds, quick=args.quick))

    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "device": run_device,
        "guest": lambda: guest_level.run(
            seconds=args.seconds,
            pairs=args.pair_list,
            pings=args.pings,
            cpus=args.cpus,
            boots=args.boots,
            daemon_args=shlex.split(args.daemon_args),
        ),
        "cost": lambda: cost.run(
            seconds=args.seconds,
            cpus=args.cpus,
            idle_seconds=1.0 if args.quick else 3.0,
            daemon_args=shlex.split(args.daemon_args),
        ),
    }
    t0 = time.monotonic()
    failed = []
    for part in args.parts:
        log.info("== %s", part)
        t = time.monotonic()
        try:
            results[part] = runners[part]()
        except Exception as exc:
            log.exception("%s part failed", part)
            results[part] = {"error": "".join(traceback.format_exception_only(exc))}
            failed.append(part)
        log.info("== %s done in %.0f s", part, time.monotonic() - t)
    results["duration_s"] = time.monotonic() - t0
    results["targets"] = evaluate(results)
    results = _finite(results)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "results.json"
    json_path.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    import plot  # matplotlib only when there is something to draw

    png_path = plot.plot(results, args.out / "results.png")
    print("\n" + "\n".join(report(results)))
    print(f"\nwrote {json_path} and {png_path} ({results['duration_s']:.0f} s)")
    if failed:
        print(f"failed parts: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
