"""The daemon's counters and process readings the attacks check."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

CounterSource = Callable[[], dict[str, Any]]


def counter_value(snapshot: dict[str, Any], path: str) -> int | None:
    """``queues.0.tx.errors.desc_addr`` in a counters snapshot (None: absent);
    ``queues.*.rx.drops.steer_backlog`` sums over the queue pairs."""
    node: Any = snapshot
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part == "*" and isinstance(node, list):
            values = [counter_value({"x": n}, ".".join(["x", *parts[i + 1 :]])) for n in node]
            return None if None in values else sum(v or 0 for v in values)
        if isinstance(node, list):
            try:
                node = node[int(part)]
            except (ValueError, IndexError):
                return None
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return int(node) if isinstance(node, (int, float)) else None


def admin_sources(
    path: str, device: str | None
) -> tuple[CounterSource, Callable[[], list[dict[str, Any]]]]:
    """Counters (``{queues, ctrl, device}``) and ring state from the admin socket."""
    from vfiouser_net.admin.protocol import AdminClient

    def call(cmd: str, **args: Any) -> Any:
        with AdminClient(path, timeout=10) as c:
            return c.call(cmd, args)

    name = device
    if name is None:
        devices = call("list")["devices"]
        if len(devices) != 1:
            raise SystemExit(f"{len(devices)} devices on {path}: say which with --device")
        name = str(devices[0]["name"])

    def counters() -> dict[str, Any]:
        r = call("stats", device=name)
        return {"queues": r["queues"], "ctrl": r["ctrl"], "device": r["counters"]}

    def ring_state() -> list[dict[str, Any]]:
        q: list[dict[str, Any]] = call("queues", device=name)["queues"]
        return q

    return counters, ring_state


def daemon_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def daemon_fds(pid: int) -> int | None:
    """Open descriptors of the daemon (None: gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def daemon_rss_anon_kib(pid: int) -> int | None:
    """The daemon's anonymous resident memory (its heap; guest RAM is shared)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None
