"""The observability files: Prometheus config, rules and their unit tests,
and the Grafana dashboard and provisioning.

promtool checks the config and the rules and runs the rules' unit tests (every
alert shown firing and not firing); every dashboard expression is checked as
PromQL by promtool too (wrapped into a temporary file of recording rules).
Every metric name a rule, a rule test or the dashboard uses must be one the
daemon exports: the names come from vfiouser_net.metrics's collector run over
a stub device, not from a scrape.

Without promtool the promtool tests are skipped, except under CI (CI=true),
where that is a failure.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from vfiouser_net_harness import dashboards
from vfiouser_net_harness.fake_snapshot import fake_snapshot
from vfiouser_net_harness.prereq import require

from vfiouser_net.snapshot import DeviceSnapshot

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
RULES = PROM_DIR / "rules" / "vfiouser-net.rules.yml"
RULES_TEST = PROM_DIR / "rules" / "vfiouser-net.rules.test.yml"
GRAFANA = ROOT / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "vfiouser-net.json"
DS_PROVISIONING = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
DASH_PROVISIONING = GRAFANA / "provisioning" / "dashboards" / "vfiouser-net.yaml"

REQUIRED_ALERTS = {
    "VfiouserNetClientDisconnected",
    "VfiouserNetQueueStalled",
    "VfiouserNetSustainedDrops",
    "VfiouserNetQueueImbalance",
    "VfiouserNetDeviceNeedsReset",
    "VfiouserNetHostileClient",
    "VfiouserNetDeviceProcessEnded",
}
# Series Prometheus makes itself, allowed in rules.
PROMETHEUS_SERIES = {"up"}
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
GRAFANA_MACROS = {"__rate_interval", "__interval", "__range"}


# -- promtool ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    require(path is not None, "promtool is not installed (prometheus package)")
    assert path is not None
    return path


def run_promtool(promtool: str, *args: str | Path) -> str:
    proc = subprocess.run(
        [promtool, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(map(str, args))} failed:\n{output}"
    return output


# -- the names the daemon exports ----------------------------------------------------


class _StubDevice:
    """What DeviceCollector reads from a VirtioNetDevice, every field filled."""

    def __init__(self) -> None:
        from vfiouser_net.device_process import ProcessInfo
        from vfiouser_net.metrics import BATCH_BOUNDS, SIZE_BOUNDS

        self.name = "vm1"

        class _Opts:
            mac = bytes.fromhex("525400c0ff01")

        class _Transport:
            driver_resets = 1

        self.opts = _Opts()
        self.transport = _Transport()
        self.resets = {"device": 1, "client_lost": 1}
        # As a device in its own process (serve --isolate) has it.
        self.process = ProcessInfo(pid=4242, starts=2, exits={"SIGKILL": 1})

        def direction() -> dict[str, Any]:
            return {
                "packets": 10,
                "bytes": 1000,
                "doorbells": 1,
                "interrupts": 1,
                "interrupts_suppressed": 1,
                "interrupts_coalesced": 1,
                "ring_full": 0,
                "batches": 5,
                "bounced": 0,
                "steered_out": 1,
                "avail_seen": 20,
                "used_idx": 10,
                "batch_hist": [5] + [0] * len(BATCH_BOUNDS),
                "size_hist": [10] + [0] * len(SIZE_BOUNDS),
                "drops": {"mac_filter": 1, "steer_backlog": 0},
                "errors": {"desc_addr": 0},
            }

        self._snapshot = fake_snapshot(
            {
                "name": self.name,
                "socket": "/run/vfiouser-net/vm1.sock",
                "tap": "tap-vm1",
                "connected": True,
                "status": 15,
                "features": ["MAC", "MQ"],
                "link_up": True,
                "mtu": 1500,
                "tap_io": "io_uring",
                "queue_pairs": 2,
                "steering": {
                    "policy": "auto",
                    "effective": "rss",
                    "active_queue_pairs": 2,
                    "max_queue_pairs": 2,
                },
                "rx_filter": {"mac": "52:54:00:c0:ff:01"},
                "queues": [{"rx": direction(), "tx": direction()} for _ in range(2)],
                "ctrl": direction(),
                "device": {
                    "steering_switches": 1,
                    "dma_maps": 3,
                    "dma_unmaps": 1,
                    "needs_reset": 0,
                    "doorbells_invalid": 2,
                    "irq_errors": 0,
                    "quiesces": 4,
                    "steering_drain_timeouts": 0,
                    "tap_failures": 1,
                    "tap_replacements": 1,
                    "dma_refused": 1,
                    "guest_mem_faults": 1,
                    "irqs_msix_off": 1,
                    "pci_cfg_invalid": 1,
                    "rx_reselected": 1,
                    "doorbells_inline": 1,
                    "rx_inline": 1,
                    "ctrl_budget_exhausted": 0,
                    "ctrl_cmds": {"0": {"0": [1, 0]}, "4": {"0": [1, 1]}},
                },
            }
        )

    def snapshot(self) -> DeviceSnapshot:
        return self._snapshot


_SUFFIXES = {
    "counter": ["_total", "_created"],
    "gauge": [""],
    "histogram": ["_bucket", "_count", "_sum", "_created"],
    "info": ["_info"],
}


@pytest.fixture(scope="module")
def exported_families() -> dict[str, set[str]]:
    """Per family the daemon's collector produces: its sample names."""
    from vfiouser_net.metrics import DeviceCollector, _Families

    stub = _StubDevice()
    # The collector skips a device it cannot read (a scrape must not fail):
    # here that would hide a field the stub lacks, so read it directly first.
    _Families().add_device(cast(Any, stub))
    families: dict[str, set[str]] = {}
    for family in DeviceCollector(lambda: [cast(Any, stub)]).collect():
        assert family.samples, f"{family.name}: the stub device produced no sample"
        names = {family.name + suffix for suffix in _SUFFIXES[family.type]}
        families[family.name] = names | {sample.name for sample in family.samples}
    assert len(families) > 20
    return families


@pytest.fixture(scope="module")
def exported_names(exported_families: dict[str, set[str]]) -> set[str]:
    return set().union(*exported_families.values())


@pytest.fixture(scope="module")
def reason_names() -> set[str]:
    from vfiouser_net.native import ffi, lib

    drops = {ffi.string(lib.vn_drop_reason_name(i)).decode() for i in range(lib.VN_DROP__COUNT)}
    errors = {ffi.string(lib.vn_error_reason_name(i)).decode() for i in range(lib.VN_ERR__COUNT)}
    from vfiouser_net.device_process import COMMON_EXIT_REASONS

    return drops | errors | set(COMMON_EXIT_REASONS)


# -- PromQL and YAML, enough for these files ---------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan",
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (not functions, keywords or labels)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("{}", text)
    text = _RANGE.sub("[]", text)
    text = _LABEL_LIST.sub(" ", text)
    return {
        name for name, call in _IDENT.findall(text) if not call and name.lower() not in _KEYWORDS
    }


def selectors(expr: str) -> list[str]:
    """The label matcher lists ({...}) in an expression."""
    return _MATCHERS.findall(expr)


def _unquote(value: str) -> str:
    value = value.strip()
    if value.startswith('"'):
        unquoted: str = json.loads(value)
        return unquoted
    if value.startswith("'"):
        return value[1:-1].replace("''", "'")
    return re.sub(r"\s+#.*$", "", value)


def yaml_values(path: Path, key: str) -> list[str]:
    """Values of `key:` in a YAML file: inline scalars and | / > blocks.

    A deliberately small reader for the files of this repository (the test
    runs without PyYAML); promtool validates the full syntax.
    """
    lines = path.read_text().splitlines()
    pattern = re.compile(rf"^(\s*)(?:-\s+)?{re.escape(key)}:\s*(.*)$")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = pattern.match(lines[i])
        i += 1
        if m is None:
            continue
        indent, value = len(m.group(1)), m.group(2).strip()
        if value[:1] in ("|", ">"):
            block: list[str] = []
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
            ):
                block.append(lines[i].strip())
                i += 1
            out.append(("\n" if value[0] == "|" else " ").join(block).strip())
        else:
            out.append(_unquote(value))
    return out


def rule_exprs() -> list[str]:
    exprs = yaml_values(RULES, "expr")
    assert len(exprs) >= 10, exprs
    return exprs


def recorded_names() -> set[str]:
    return set(yaml_values(RULES, "record"))


def alert_names() -> set[str]:
    return set(yaml_values(RULES, "alert"))


# -- Prometheus ---------------------------------------------------------------------


def test_prometheus_config_is_valid_and_loads_the_rules(promtool: str) -> None:
    output = run_promtool(promtool, "check", "config", PROM_CONFIG.relative_to(ROOT))
    assert "1 rule files found" in output, output
    assert RULES.name in output, output
    assert "127.0.0.1:9742" in PROM_CONFIG.read_text()


def test_rules_are_valid(promtool: str) -> None:
    output = run_promtool(promtool, "check", "rules", RULES.relative_to(ROOT))
    assert "SUCCESS" in output, output


def test_rules_unit_tests_pass(promtool: str) -> None:
    output = run_promtool(promtool, "test", "rules", RULES_TEST.relative_to(ROOT))
    assert "SUCCESS" in output, output


def test_required_alerts_exist_with_severity_and_annotations() -> None:
    alerts = alert_names()
    assert alerts >= REQUIRED_ALERTS, REQUIRED_ALERTS - alerts
    text = RULES.read_text()
    for chunk in re.split(r"\n\s*- alert: ", text)[1:]:
        name = chunk.split()[0]
        body = re.split(r"\n\s*- (?:alert|record): ", chunk)[0]
        assert re.search(r"\n\s+severity: (critical|warning|info)\b", body), name
        assert re.search(r"\n\s+summary: ", body), name
        assert re.search(r"\n\s+description: ", body), name
        assert re.search(r"\n\s+for: \d+[smh]\b", body), name


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    text = RULES_TEST.read_text()
    cases = re.findall(r"alertname:\s*(\w+)\s*\n\s*exp_alerts:[ \t]*(\[\])?", text)
    firing = {name for name, empty in cases if not empty}
    silent = {name for name, empty in cases if empty}
    assert alert_names() - firing == set(), "alerts never shown firing"
    assert alert_names() - silent == set(), "alerts never shown not firing"


def test_rules_use_only_exported_metrics(exported_names: set[str], reason_names: set[str]) -> None:
    known = exported_names | recorded_names() | PROMETHEUS_SERIES
    for expr in rule_exprs():
        unknown = metric_names(expr) - known
        assert not unknown, f"unknown metric {sorted(unknown)} in rule expression:\n{expr}"
        _check_reasons(expr, reason_names)
    # Names quoted anywhere (annotations, comments) and the tests' input series.
    for path in (RULES, RULES_TEST):
        for name in set(re.findall(r"\bvfiouser_net_\w+", path.read_text())):
            assert name in exported_names, f"{path.name}: {name} is not exported"
    for series in yaml_values(RULES_TEST, "series"):
        names = metric_names(series)
        assert names and names <= exported_names | PROMETHEUS_SERIES, series
        _check_reasons(series, reason_names)


def _check_reasons(expr: str, reason_names: set[str]) -> None:
    for selector in selectors(expr):
        for op, value in re.findall(r'\breason\s*(=~|!~|!=|=)\s*"([^"]*)"', selector):
            if op in ("=", "!="):
                assert value in reason_names, f"reason {value!r} does not exist: {expr}"


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (device, le) (rate(a_total{device=~"$device", reason!="x y"}[5m])) '
        "/ ignoring (queue) group_left b:rec:rate5m > 0.8 and on (device) c == 1 "
        "or histogram_quantile(0.99, d_bucket[1m] offset 5m) unless max(e) * 1e3"
    )
    assert metric_names(expr) == {"a_total", "b:rec:rate5m", "c", "d_bucket", "e"}


# -- Grafana -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return dashboards.load_dashboard(DASHBOARD)


def content_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboards.iter_panels(dashboard):
        if panel.get("type") != "row":
            yield panel


def test_dashboard_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "vfiouser-net"
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 39
    assert dashboard.get("id") is None, "an exported dashboard must not carry a database id"
    assert dashboard["title"]


def _variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query")
    if isinstance(query, dict):
        query = query.get("query")
    assert isinstance(query, str), variable
    return query


def test_dashboard_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "instance", "device", "queue"]

    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"

    for name in ("instance", "device", "queue"):
        var = variables[name]
        assert var["type"] == "query", name
        assert var["datasource"] == DATASOURCE_REF, name
        assert var.get("definition", _variable_query(var)) == _variable_query(var), name

    def compact(query: str) -> str:
        return re.sub(r"\s+", "", query)

    assert compact(_variable_query(variables["instance"])) == compact(
        "label_values(vfiouser_net_device_info, instance)"
    )
    assert compact(_variable_query(variables["device"])) == compact(
        'label_values(vfiouser_net_device_info{instance=~"$instance"}, device)'
    )
    queue_query = compact(_variable_query(variables["queue"]))
    assert queue_query.startswith("label_values(vfiouser_net_queue_packets_total{")
    assert queue_query.endswith("},queue)")
    assert 'device=~"$device"' in queue_query
    for name in ("device", "queue"):
        assert variables[name]["multi"] is True, name
        assert variables[name]["includeAll"] is True, name


def test_dashboard_panels_use_the_datasource_variable_and_have_queries(
    dashboard: dict[str, Any],
) -> None:
    panels = list(content_panels(dashboard))
    assert len(panels) >= 20
    ids = [p["id"] for p in dashboards.iter_panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles)), "duplicate panel titles"
    variables = {v["name"] for v in dashboard["templating"]["list"]} | GRAFANA_MACROS
    for panel in panels:
        title = panel["title"]
        assert panel["type"] in ("timeseries", "stat", "table", "gauge", "bargauge"), title
        assert panel.get("datasource") == DATASOURCE_REF, title
        targets = panel.get("targets", [])
        assert targets, f"{title}: no query"
        for target in targets:
            assert target.get("datasource", DATASOURCE_REF) == DATASOURCE_REF, title
            expr = target.get("expr")
            assert isinstance(expr, str) and expr.strip(), f"{title}: target without expr"
            assert '=~"$instance"' in expr and '=~"$device"' in expr, f"{title}: {expr}"
            used = dashboards.variable_names(expr)
            assert used <= variables, f"{title}: unknown variables {used - variables}"
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, title


def test_dashboard_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                other = cells.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"{panel['title']} overlaps {other}"


def test_dashboard_covers_the_required_views(dashboard: dict[str, Any]) -> None:
    exprs = "\n".join(expr for _, expr in dashboards.raw_queries(dashboard))
    for needle in (
        "rate(vfiouser_net_queue_packets_total",
        "rate(vfiouser_net_queue_bytes_total",
        "vfiouser_net_queue_drops_total",
        "vfiouser_net_queue_errors_total",
        "rate(vfiouser_net_queue_kicks_total",
        "rate(vfiouser_net_queue_interrupts_total",
        "vfiouser_net_queue_descriptors_in_flight",
        "histogram_quantile(0.99, sum by (instance, device, queue, direction, le) "
        "(rate(vfiouser_net_queue_batch_size_bucket",
        "histogram_quantile(0.99, sum by (instance, device, queue, direction, le) "
        "(rate(vfiouser_net_queue_packet_size_bytes_bucket",
        "vfiouser_net_device_link_up",
        "vfiouser_net_device_driver_ready",
        "vfiouser_net_device_client_connected",
        "vfiouser_net_device_queue_pairs_active",
        "vfiouser_net_device_queue_pairs_max",
        "vfiouser_net_device_steering_policy",
        "vfiouser_net_device_steering_switches_total",
        "vfiouser_net_device_control_commands_total",
        "vfiouser_net_device_resets_total",
        "vfiouser_net_device_dma_regions",
        "vfiouser_net_device_events_total",
    ):
        assert needle in exprs, f"no dashboard query with {needle}"
    by_title = dict(dashboards.raw_queries(dashboard))
    assert "sum by (instance, device, queue, direction, reason)" in by_title["Drops by reason"]
    assert "class, command, result" in by_title["Control commands"]


def test_dashboard_uses_only_exported_metrics_and_shows_them_all(
    dashboard: dict[str, Any], exported_families: dict[str, set[str]]
) -> None:
    exported = set().union(*exported_families.values())
    used: set[str] = set()
    for title, expr in dashboards.raw_queries(dashboard):
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr}"
        unknown = names - exported
        assert not unknown, f"{title}: unknown metric {sorted(unknown)} in {expr}"
        used |= names
    for family, names in sorted(exported_families.items()):
        assert names & used, f"{family} is exported but no dashboard panel shows it"


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    queries = dashboards.dashboard_queries(device="(vm1|vm2)", instance="127.0.0.1:9742")
    assert len(queries) == len(dashboards.raw_queries(dashboards.load_dashboard()))
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}:expr", "expr": expr}
                    for i, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(json.dumps(rules, indent=1))  # JSON is YAML
    output = run_promtool(promtool, "check", "rules", path)
    assert f"SUCCESS: {len(queries)} rules found" in output, output


def test_harness_substitutes_every_variable() -> None:
    queries = dashboards.dashboard_queries(device="vm1", instance="h:9742", queue="0|1")
    assert queries
    for title, expr in queries:
        assert "$" not in expr and "[[" not in expr, (title, expr)
    assert any('queue=~"0|1"' in expr for _, expr in queries)
    values = {"__range": "1h", "device": "a", "queue": "b"}
    assert dashboards.substitute("x[${__range}] $device [[queue]]", values) == "x[1h] a b"
    with pytest.raises(KeyError):
        dashboards.substitute("rate(x[$__unknown])", {})


def test_grafana_provisioning_files() -> None:
    ds = DS_PROVISIONING.read_text()
    assert re.search(r"^apiVersion: 1$", ds, re.M)
    assert re.search(r"^\s+type: prometheus$", ds, re.M)
    assert re.search(r"^\s+url: http", ds, re.M)

    prov = DASH_PROVISIONING.read_text()
    assert re.search(r"^apiVersion: 1$", prov, re.M)
    assert re.search(r"^\s+type: file$", prov, re.M)
    paths = re.findall(r"^\s+path: (\S+)$", prov, re.M)
    assert len(paths) == 1 and paths[0].startswith("/"), paths
    # The README tells where to put the JSON: the provider's path.
    readme = (GRAFANA / "README.md").read_text()
    assert paths[0] in readme
    assert f"{paths[0]}/vfiouser-net.json" in readme
