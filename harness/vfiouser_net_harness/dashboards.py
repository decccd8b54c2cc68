"""The Grafana dashboard's queries, ready to run against Prometheus.

`dashboard_queries()` reads grafana/dashboards/vfiouser-net.json and returns
every (panel title, PromQL expression) with the dashboard variables replaced:
$instance, $device and $queue by the regexes given (the dashboard uses them
only inside `=~` matchers), and Grafana's interval macros by fixed durations.
An end-to-end test can then run each one against a Prometheus that scrapes a
live daemon.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "grafana" / "dashboards" / "vfiouser-net.json"

# $name, ${name}, ${name:format} and [[name]], Grafana's variable syntaxes.
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, with the panels of collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from iter_panels(panel)


def raw_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every target, variables left as they are."""
    out: list[tuple[str, str]] = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if isinstance(expr, str) and not target.get("hide", False):
                out.append((str(panel.get("title", "")), expr))
    return out


def variable_names(expr: str) -> set[str]:
    """The variables (and $__ macros) an expression refers to."""
    return {a or b or c for a, b, c in _VARIABLE.findall(expr)}


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace the variables in expr; KeyError names one with no value."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise KeyError(f"no value for dashboard variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(repl, expr)


def dashboard_queries(
    device: str = ".*",
    instance: str = ".*",
    queue: str = ".*",
    *,
    rate_interval: str = "1m",
    interval: str = "15s",
    time_range: str = "15m",
    path: Path = DASHBOARD,
) -> list[tuple[str, str]]:
    """Every (panel title, expr) of the dashboard, ready for Prometheus.

    device, instance and queue are regexes (as Grafana writes a multi-value or
    "All" selection); rate_interval, interval and time_range stand for
    $__rate_interval, $__interval and $__range. Use a rate_interval of at
    least four scrape intervals, as Grafana does.
    """
    values = {
        "device": device,
        "instance": instance,
        "queue": queue,
        "__rate_interval": rate_interval,
        "__interval": interval,
        "__range": time_range,
    }
    return [(title, substitute(expr, values)) for title, expr in raw_queries(load_dashboard(path))]
