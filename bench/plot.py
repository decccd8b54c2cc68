"""The benchmark's figure: one PNG with a panel per part (matplotlib, Agg).

Panels: device level packet rate against the TAP ceiling per case; guest
TCP throughput, this device against QEMU's virtio-net-pci; guest latency
p50/p99; the daemon's CPU per packet; its resident memory against the
64 MiB target; the targets with their marks. A part that was not run (or
failed) leaves its panel with a note.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

OURS_COLOR, QEMU_COLOR, CEILING_COLOR = "#1f77b4", "#ff7f0e", "#7f7f7f"


def _v(x: float | None, scale: float = 1.0) -> float:
    """A value to draw: None (a figure the run could not produce) is NaN."""
    return math.nan if x is None else float(x) / scale


def _note(ax: Axes, title: str, text: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _usable(part: Any) -> bool:
    return isinstance(part, dict) and "error" not in part


def _bars(
    ax: Axes,
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[float], str]],
    *,
    ylabel: str,
    title: str,
    annotate: str = "{:.2f}",
) -> None:
    n = len(series)
    width = 0.8 / n
    xs = range(len(labels))
    for i, (name, values, color) in enumerate(series):
        pos = [x - 0.4 + width * (i + 0.5) for x in xs]
        bars = ax.bar(pos, values, width, label=name, color=color)
        ax.bar_label(
            bars,
            labels=[annotate.format(v) if math.isfinite(v) else "n/a" for v in values],
            fontsize=7,
            padding=1,
        )
    ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.margins(y=0.15)


def _device(ax: Axes, part: Any) -> None:
    title = "Device level: packet rate vs TAP ceiling"
    if not _usable(part):
        _note(ax, title, "not run" if part is None else f"failed: {part['error'][:200]}")
        return
    rows = part["rows"]
    labels = [f"{r['direction']} {r['frame_bytes']} B\n{r['pairs']} pair(s)" for r in rows]
    _bars(
        ax,
        labels,
        [
            ("vfiouser-net", [_v(r["device"]["pps"], 1e6) for r in rows], OURS_COLOR),
            ("ceiling (TAP loop)", [_v(r["ceiling"]["pps"], 1e6) for r in rows], CEILING_COLOR),
        ],
        ylabel="Mpps",
        title=title,
    )


def _guest_tcp(ax: Axes, part: Any) -> None:
    title = "Guest level: iperf3 TCP"
    if not _usable(part):
        _note(ax, title, "not run" if part is None else f"failed: {part['error'][:200]}")
        return
    rows = part["tcp"]
    labels = [f"{r['direction']} x{r['streams']}\n{r['pairs']} pair(s)" for r in rows]
    _bars(
        ax,
        labels,
        [
            ("vfiouser-net", [_v(r["ours_gbps"]) for r in rows], OURS_COLOR),
            ("QEMU virtio-net-pci", [_v(r["qemu_gbps"]) for r in rows], QEMU_COLOR),
        ],
        ylabel="Gbit/s",
        title=title,
    )


def _latency(ax: Axes, part: Any) -> None:
    title = "Guest level: ICMP echo RTT"
    if not _usable(part):
        _note(ax, title, "not run" if part is None else f"failed: {part['error'][:200]}")
        return
    labels: list[str] = []
    ours: list[float] = []
    qemu: list[float] = []
    for r in part["latency"]:
        for pct in ("p50", "p99"):
            labels.append(f"{pct}, {r['pairs']} pair(s)")
            ours.append(_v(r["ours"][f"{pct}_ms"]))
            qemu.append(_v(r["qemu"][f"{pct}_ms"]))
    _bars(
        ax,
        labels,
        [("vfiouser-net", ours, OURS_COLOR), ("QEMU virtio-net-pci", qemu, QEMU_COLOR)],
        ylabel="ms",
        title=title,
        annotate="{:.3f}",
    )


def _cost_cpu(ax: Axes, part: Any) -> None:
    title = "Cost: daemon CPU per packet"
    if not _usable(part):
        _note(ax, title, "not run" if part is None else f"failed: {part['error'][:200]}")
        return
    labels, values = [], []
    for r in part["rows"]:
        for run in r["runs"]:
            labels.append(f"{run['direction']} x{run['streams']}\n{r['pairs']} pair(s)")
            values.append(_v(run["cpu_ns_per_packet"], 1000))
    _bars(
        ax,
        labels,
        [("CPU µs per packet", values, OURS_COLOR)],
        ylabel="µs per packet",
        title=title,
        annotate="{:.1f}",
    )


def _cost_memory(ax: Axes, part: Any) -> None:
    title = "Cost: daemon memory"
    if not _usable(part):
        _note(ax, title, "not run" if part is None else f"failed: {part['error'][:200]}")
        return
    rows = part["rows"]
    labels = [f"{r['pairs']} pair(s)" for r in rows]
    _bars(
        ax,
        labels,
        [
            ("VmRSS idle", [r["memory_idle"]["rss_mib"] for r in rows], "#aec7e8"),
            (
                "VmRSS after traffic",
                [r["memory_after_traffic"]["rss_mib"] for r in rows],
                OURS_COLOR,
            ),
            ("Pss after traffic", [r["memory_after_traffic"]["pss_mib"] for r in rows], "#2ca02c"),
        ],
        ylabel="MiB",
        title=title,
        annotate="{:.1f}",
    )
    target = float(part.get("rss_target_mib", 64.0))
    ax.axhline(target, color="red", linestyle="--", linewidth=1)
    ax.text(
        -0.4, target, f" target < {target:g} MiB (16 pairs)", color="red", va="bottom", fontsize=8
    )
    ax.set_ylim(0, max(target * 1.2, ax.get_ylim()[1]))


def _targets(ax: Axes, targets: Sequence[dict[str, Any]]) -> None:
    ax.set_title("Targets")
    ax.axis("off")
    colors = {True: "#2ca02c", False: "#d62728", None: "#7f7f7f"}
    marks = {True: "PASS", False: "FAIL", None: "n/a"}
    step = 1.0 / max(len(targets) + 1, 10)
    for i, t in enumerate(targets):
        y = 1.0 - i * step
        ax.text(
            0.0,
            y,
            marks[t["ok"]],
            color=colors[t["ok"]],
            weight="bold",
            fontsize=8,
            va="top",
            family="monospace",
            transform=ax.transAxes,
        )
        ax.text(
            0.09,
            y,
            f"{t['target']}\n{t['measured']}",
            fontsize=7.5,
            va="top",
            family="monospace",
            transform=ax.transAxes,
        )


def plot(results: dict[str, Any], path: Path) -> Path:
    """Draw the figure for merged results (run.py's JSON) into path (PNG)."""
    fig, axes = plt.subplots(2, 3, figsize=(19, 11))
    _device(axes[0][0], results.get("device"))
    _guest_tcp(axes[0][1], results.get("guest"))
    _latency(axes[0][2], results.get("guest"))
    _cost_cpu(axes[1][0], results.get("cost"))
    _cost_memory(axes[1][1], results.get("cost"))
    _targets(axes[1][2], results.get("targets", []))
    fig.suptitle(f"vfiouser-net benchmark — {results.get('machine_line', '')}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)
    return path
