"""End to end: Prometheus scraping a live daemon, the dashboard's and the
rules' queries on what it scraped, and the counters checked against iperf3
and the guest's own view.

One stack for the module: the daemon with 2 queue pairs serving a Linux
6.12 guest in a fresh network namespace, and a real Prometheus inside the
same namespace (the daemon's /metrics is on the namespace's 127.0.0.1)
scraping it every second and evaluating deploy/prometheus's rules every
second (tests/e2e/obs_fixtures.py).

The traffic phase (module fixture ``traffic``): iperf3 from the guest
(4 streams), control commands (promiscuous mode on and off, ``ethtool -L``
down to 1 combined channel and back to 2), then iperf3 to the guest; the
received bytes are read from Prometheus before and after that run, each
time once two scrapes newer than the moment agree (the link is idle).
The dashboard's queries are evaluated at the end of the receive run with
``$__rate_interval`` = 15 s (widened if this machine was slow enough that
the control commands fell out of that window), so every rate covers
traffic; the rules' expressions are evaluated at the same moment.

Then: the device's received bytes against iperf3's (and the TAP's), the guest's
``ethtool -S`` (DEVICE_STATS) against the scrape of the idle link,
``promtool check metrics`` on the live output, and a 50 scrapes/s loop
during an iperf3 run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from vfiouser_net_harness.dashboards import dashboard_queries
from vfiouser_net_harness.guest import Guest
from vfiouser_net_harness.iperf import IperfResult, run_iperf3
from vfiouser_net_harness.netns import NetNS
from vfiouser_net_harness.scenarios import GUEST_MAC, TAP_NAME, guest_on_vfiouser_net
from vfiouser_net_harness.server import Server

from tests.e2e.obs_fixtures import (
    JOB,
    RULES,
    Labels,
    NetnsHttp,
    Prometheus,
    Rule,
    popen_in_netns,
    prometheus_tools,
    read_rules,
    vector_selectors,
    without_thresholds,
)
from tests.e2e.stack import check_prerequisites

log = logging.getLogger(__name__)

pytestmark = pytest.mark.e2e

PAIRS = 2
IPERF_SECONDS = 4
IPERF_STREAMS = 4
RATE_INTERVAL_S = 15  # $__rate_interval: 15 scrapes of 1 s (Grafana wants >= 4)
SCRAPE_LOOP_RATE = 50.0  # scrapes per second
SANDWICH_TRIES = 5

# Received-bytes check: the device counts whole frames (Ethernet, IP and TCP
# headers included, no virtio header) and every frame it hands to the guest;
# iperf3 counts payload bytes its receiving application read during the test.
# So device >= iperf3. Above that: headers (66 of a 1514-byte frame, 4.4%,
# less with GRO-sized frames), iperf3's control connection and handshakes
# (a few kB), retransmissions, and the data the guest received but iperf3
# stopped reading when the test ended (at most the sockets' receive windows).
RX_OVERHEAD_MAX = 0.10

# Device rx bytes vs the TAP's tx bytes over the same span: equal, but for a
# background frame (ARP, IPv6 neighbour discovery) that may fall between a
# settled scrape and the read of the TAP's counters, and for the frames the
# device dropped (counted by reason, in frames: each at most a 64 KiB GSO frame
# plus its Ethernet header). A steering backlog that overflows while a slow
# (sanitized, 2-core) worker lags is one such drop.
TAP_SLACK = 4096
TAP_SLACK_FRAMES = 4
MAX_RX_FRAME = 65536 + 14

# Dashboard panels whose query filters with "> 0" and so shows nothing while
# the device is healthy: no drops, no guest errors, no reset in the window.
DASHBOARD_EMPTY_WHEN_HEALTHY = {"Drops by reason", "Guest errors by reason", "Resets"}
# Recording rules that legitimately record nothing: a stall candidate is a
# queue holding descriptors that moved no frame for 2 minutes (an idle
# receive queue of a guest that is up; none while both queues carry traffic).
RECORDS_EMPTY_WHEN_HEALTHY = {"vfiouser_net:queue_stall_candidate:2m"}

QUEUE_COUNTERS = ("packets", "bytes", "kicks", "interrupts")
# ethtool -S name suffix (DEVICE_STATS RX/TX_BASIC) -> the metric's counter.
ETHTOOL_FIELD = {
    "packets": "packets",
    "bytes": "bytes",
    "notifications": "kicks",
    "interrupts": "interrupts",
}
_ETHTOOL_RE = re.compile(r"^\s*([\w.-]+):\s+(\d+)\s*$", re.M)


@dataclass
class Obs:
    guest: Guest
    ns: NetNS
    server: Server
    http: NetnsHttp
    prom: Prometheus
    promtool: str
    metrics_url: str
    instance: str
    device: str

    def sel(self, name: str, **matchers: str) -> str:
        """A selector for this target's series of a metric."""
        labels = {"job": JOB, "instance": self.instance, **matchers}
        inner = ", ".join(f"{k}={json.dumps(v)}" for k, v in labels.items())
        return f"{name}{{{inner}}}"

    def sel_re(self, name_regex: str) -> str:
        """A selector for this target's series of the metrics a regex names."""
        return self.sel("").replace("{", f"{{__name__=~{json.dumps(name_regex)}, ", 1)


@dataclass
class Traffic:
    tx: IperfResult
    rx: IperfResult
    rx_bytes_before: dict[Labels, float]
    rx_bytes_after: dict[Labels, float]
    rx_frames: float  # the device's rx packet counters over the same span
    rx_drops: dict[str, float]  # the device's rx drops over the same span, by reason
    tap_tx: dict[str, int]  # the TAP's tx_* counters over the same span
    ctrl_start: float
    ctrl_end: float
    t_eval: float  # the end of the receive run: every rate window is busy then
    rate_interval: str


@pytest.fixture(scope="module", name="obs")
def obs_fixture(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Obs]:
    check_prerequisites()
    prometheus, promtool = prometheus_tools()
    workdir = tmp_path_factory.mktemp("prometheus")
    failed_before = request.session.testsfailed
    leftovers: list[Path] = []
    with contextlib.ExitStack() as stack:
        guest, ns, server = stack.enter_context(
            guest_on_vfiouser_net(server_args=["--queue-pairs", str(PAIRS)])
        )
        leftovers += [server.log_path, guest.workdir]
        metrics_url = server.metrics_url()
        instance = urllib.parse.urlsplit(metrics_url).netloc
        http = stack.enter_context(NetnsHttp(ns.name))
        prom = stack.enter_context(
            Prometheus(ns, http, workdir, instance, binary=prometheus, rules=RULES)
        )
        device = Path(server.socket_path).name
        log.info("daemon %s (device %s) scraped by %s", metrics_url, device, prom.base_url)
        yield Obs(guest, ns, server, http, prom, promtool, metrics_url, instance, device)
    # Everything is stopped. The daemon's log and the guest's console log are
    # left in /tmp by the harness: keep them only when a test failed.
    if request.session.testsfailed != failed_before:
        log.warning("kept for debugging: %s, prometheus in %s", leftovers, workdir)
        return
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _iperf(obs: Obs, direction: str) -> IperfResult:
    # Reports checked for consistency, not for how much was still in flight
    # when the run ended (a short receive run under TCG can end with a lot).
    result = run_iperf3(
        obs.guest, obs.ns, direction=direction,  # type: ignore[arg-type]
        seconds=IPERF_SECONDS, streams=IPERF_STREAMS, check=False,
    )  # fmt: skip
    problems = result.inconsistencies(min_received_ratio=0.0)
    # iperf3's sender sometimes reports one block (128 KiB) per stream less
    # than its receiver read: it stops counting before its last writes.
    slack = IPERF_STREAMS * 128 * 1024
    if 0 < result.received_bytes - result.sent_bytes <= slack:
        problems = [p for p in problems if not re.fullmatch(r"received \d+ > sent \d+", p)]
    assert not problems, f"iperf3 {direction}: {problems}"
    assert result.received_bytes > 1_000_000, result.summary()
    return result


@pytest.fixture(scope="module", name="traffic")
def traffic_fixture(obs: Obs) -> Traffic:
    guest, prom = obs.guest, obs.prom
    rx_bytes = obs.sel("vfiouser_net_queue_bytes_total", direction="rx")
    tx = _iperf(obs, "guest_tx")
    ctrl_start = time.time()
    guest.check("ip link set eth0 promisc on")
    guest.check("ip link set eth0 promisc off")
    guest.check("ethtool -L eth0 combined 1")
    guest.check(f"ethtool -L eth0 combined {PAIRS}")
    ctrl_end = time.time()
    rx_packets = obs.sel("vfiouser_net_queue_packets_total", direction="rx")
    rx_drops = obs.sel("vfiouser_net_queue_drops_total", direction="rx")
    before, _ = prom.settled(rx_bytes, time.time(), min_series=PAIRS)
    packets_before, _ = prom.settled(rx_packets, time.time(), min_series=PAIRS)
    drops_before, _ = prom.settled(rx_drops, time.time(), min_series=PAIRS)
    tap_before = obs.ns.taps[0].stats()
    rx = _iperf(obs, "guest_rx")
    t_eval = time.time()
    after, _ = prom.settled(rx_bytes, time.time(), min_series=PAIRS)
    packets_after, _ = prom.settled(rx_packets, time.time(), min_series=PAIRS)
    drops_after, _ = prom.settled(rx_drops, time.time(), min_series=PAIRS)
    frames = sum(packets_after.values()) - sum(packets_before.values())
    dropped: dict[str, float] = {}
    for labels, value in drops_after.items():
        delta = value - drops_before.get(labels, 0.0)
        if delta:
            reason = dict(labels)["reason"]
            dropped[reason] = dropped.get(reason, 0.0) + delta
    tap = {k: v - tap_before[k] for k, v in obs.ns.taps[0].stats().items() if k.startswith("tx_")}
    log.info("guest_rx: the TAP's transmit counters moved by %s", tap)
    qdisc = obs.ns.run(["tc", "-s", "qdisc", "show", "dev", TAP_NAME], check=False).stdout
    log.info("guest_rx: the TAP's queueing discipline:\n%s", qdisc.strip())
    # Grafana widens $__rate_interval with the time range; the same here if
    # the control commands are older than 15 s at t_eval.
    window = max(RATE_INTERVAL_S, math.ceil(t_eval - ctrl_start) + 2)
    log.info(
        "traffic: tx %s; rx %s; control %.1f-%.1f s before t_eval; rate interval %d s",
        tx.summary(), rx.summary(), t_eval - ctrl_start, t_eval - ctrl_end, window,
    )  # fmt: skip
    drops = prom.vector(
        f"{obs.sel('vfiouser_net_queue_drops_total')} > 0", drop=("job", "instance")
    )
    log.info("drops so far: %s", drops)
    log.info("guest_rx: device rx frames %d, rx drops %s", frames, dropped)
    return Traffic(
        tx, rx, before, after, frames, dropped, tap, ctrl_start, ctrl_end, t_eval, f"{window}s"
    )


# -- Prometheus scrapes the daemon ------------------------------------------------------


def test_prometheus_scrapes_the_daemon(obs: Obs) -> None:
    prom = obs.prom
    target = prom.wait_target_up()
    assert target["labels"]["job"] == JOB, target
    assert target["scrapeUrl"] == obs.metrics_url, target
    assert target["lastError"] == "", target
    assert prom.scalar(obs.sel("up")) == 1.0
    info = prom.query(obs.sel("vfiouser_net_device_info"))
    assert len(info) == 1, info
    labels = info[0]["metric"]
    assert labels["device"] == obs.device, labels
    assert labels["tap"] == TAP_NAME and labels["mac"] == GUEST_MAC, labels
    assert prom.scalar(obs.sel("vfiouser_net_device_queue_pairs_max")) == PAIRS
    # Every queue pair and direction has its series.
    queues = prom.vector(
        f"count by (queue, direction) ({obs.sel('vfiouser_net_queue_packets_total')})"
    )
    want = {(q, d) for q in map(str, range(PAIRS)) for d in ("rx", "tx")}
    assert {(dict(k)["queue"], dict(k)["direction"]) for k in queues} == want, queues


# -- the dashboard --------------------------------------------------------------------


def _must_have_data(obs: Obs, expr: str, at: float, records: dict[str, Rule]) -> None:
    """Every series expr reads exists at `at` (through empty recorded series)."""
    for selector in vector_selectors(expr):
        if obs.prom.query(selector, at):
            continue
        name = selector.split("{", 1)[0]
        assert name in RECORDS_EMPTY_WHEN_HEALTHY, f"no series for {selector} (in {expr})"
        _must_have_data(obs, records[name].expr, at, records)


def test_dashboard_queries_return_data(obs: Obs, traffic: Traffic) -> None:
    queries = dashboard_queries(
        obs.device, obs.instance, ".*",
        rate_interval=traffic.rate_interval, interval="1s", time_range="15m",
    )  # fmt: skip
    assert len(queries) >= 30, queries
    records = {r.name: r for r in read_rules() if r.kind == "record"}
    results: dict[str, list[list[dict[str, Any]]]] = {}
    failed, empty = [], []
    for title, expr in queries:
        body = obs.prom.query_raw(expr, traffic.t_eval)
        if body.get("status") != "success":
            failed.append(f"{title}: {body.get('errorType')}: {body.get('error')}\n{expr}")
            continue
        result = body["data"]["result"]
        results.setdefault(title, []).append(result)
        log.info("panel %r: %d series", title, len(result))
        if title in DASHBOARD_EMPTY_WHEN_HEALTHY and result:
            log.info("panel %r: %s", title, [(s["metric"], s["value"][1]) for s in result])
        if result:
            continue
        if title in DASHBOARD_EMPTY_WHEN_HEALTHY:
            # The filter hides healthy values; the data under it is there.
            assert obs.prom.query(without_thresholds(expr), traffic.t_eval), expr
            _must_have_data(obs, expr, traffic.t_eval, records)
        else:
            empty.append(f"{title}:\n{expr}")
    assert not failed, "dashboard queries failed:\n" + "\n\n".join(failed)
    assert not empty, "dashboard queries with no data:\n" + "\n\n".join(empty)

    def values(title: str, index: int = 0) -> list[float]:
        return [float(s["value"][1]) for s in results[title][index]]

    assert values("Client connected") == [1.0]
    assert values("Link") == [1.0]
    assert values("Driver ready") == [1.0]
    assert values("Needs reset") == [0.0]
    assert values("Queue pairs (active / max)", 0) == [PAIRS]
    assert values("Queue pairs (active / max)", 1) == [PAIRS]
    # The rates cover traffic both ways.
    by_dir: dict[str, float] = {}
    for s in results["Bit rate per queue"][0]:
        d = s["metric"]["direction"]
        by_dir[d] = by_dir.get(d, 0.0) + float(s["value"][1])
    assert by_dir.get("rx", 0) > 1e6 and by_dir.get("tx", 0) > 1e4, by_dir
    # The control commands of the traffic phase are in the window.
    seen = {
        (s["metric"]["class"], s["metric"]["command"], s["metric"]["result"])
        for s in results["Control commands"][0]
    }
    assert ("rx", "promisc", "ok") in seen, seen
    assert any(c == "mq" and r == "ok" for c, _, r in seen), seen


# -- the rules --------------------------------------------------------------------------


def test_rules_loaded_and_evaluated(obs: Obs, traffic: Traffic) -> None:
    rules = read_rules()
    groups = obs.prom.api("/api/v1/rules")["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(loaded) == {r.name for r in rules}, sorted(loaded)
    bad = {n: (r["health"], r.get("lastError")) for n, r in loaded.items() if r["health"] != "ok"}
    assert not bad, f"rules not evaluated cleanly: {bad}"
    # A healthy device: nothing fires, and the only alerts that may be
    # pending are those a healthy guest can meet for a while (the `for`
    # durations, 1 to 10 minutes, keep them from firing): a queue stall
    # candidate with the initial receive buffer fill's doorbell in its 2m
    # window, or a few heavy flows hashed to one receive queue.
    alerts = obs.prom.api("/api/v1/alerts")["alerts"]
    log.info("alerts: %s", alerts)
    assert not [a for a in alerts if a["state"] == "firing"], alerts
    may_be_pending = {"VfiouserNetQueueStalled", "VfiouserNetQueueImbalance"}
    pending = {a["labels"]["alertname"] for a in alerts if a["state"] == "pending"}
    assert pending <= may_be_pending, alerts


def test_rule_expressions_return_data(obs: Obs, traffic: Traffic) -> None:
    rules = read_rules()
    records = {r.name: r for r in rules if r.kind == "record"}
    assert len(records) >= 5 and len(rules) - len(records) >= 5, rules
    at = traffic.t_eval
    failed, empty = [], []
    for rule in rules:
        body = obs.prom.query_raw(rule.expr, at)
        if body.get("status") != "success":
            failed.append(f"{rule.name}: {body.get('errorType')}: {body.get('error')}")
            continue
        result = body["data"]["result"]
        log.info("%s %s: %d series", rule.kind, rule.name, len(result))
        if rule.kind == "record":
            # What Prometheus recorded agrees with what the expression gives.
            recorded = obs.prom.query(rule.name, at)
            assert len(recorded) == len(result), (rule.name, recorded, result)
            if result or rule.name in RECORDS_EMPTY_WHEN_HEALTHY:
                if not result:
                    _must_have_data(obs, without_thresholds(rule.expr), at, records)
                continue
            empty.append(rule.name)
            continue
        # An alert's expression is its condition: empty while healthy (or
        # pending at most). Under the thresholds, the data must be there.
        if not any(n in rule.expr for n in RECORDS_EMPTY_WHEN_HEALTHY):
            stripped = without_thresholds(rule.expr)
            assert obs.prom.query(stripped, at), f"{rule.name}: no data for {stripped}"
        _must_have_data(obs, rule.expr, at, records)
    assert not failed, "rule expressions failed:\n" + "\n".join(failed)
    assert not empty, f"recording rules with no data: {empty}"


# -- counters against iperf3 and the guest -------------------------------------------------


def test_rx_bytes_match_iperf3(traffic: Traffic) -> None:
    before, after = traffic.rx_bytes_before, traffic.rx_bytes_after
    assert set(before) == set(after) and len(after) == PAIRS, (before, after)
    per_queue = {dict(k)["queue"]: after[k] - before[k] for k in after}
    device = sum(per_queue.values())
    rx = traffic.rx
    ratio = device / rx.received_bytes
    log.info(
        "guest_rx: device rx bytes %d (per queue %s), iperf3 received %d, sent %d: "
        "device/received %.4f",
        device, per_queue, rx.received_bytes, rx.sent_bytes, ratio,
    )  # fmt: skip
    assert device >= rx.received_bytes, (device, rx.summary())
    assert ratio <= 1 + RX_OVERHEAD_MAX, (device, ratio, rx.summary())
    # And the frames the host's kernel handed to the device (the TAP's
    # transmit side, read right after the same settled scrapes): each one
    # either reached the guest or is counted as dropped, but for a stray
    # background frame between a scrape and a read.
    tap, tap_frames = traffic.tap_tx["tx_bytes"], traffic.tap_tx["tx_packets"]
    dropped = sum(traffic.rx_drops.values())
    log.info(
        "guest_rx: TAP transmitted %d frames (%d bytes); device received %d frames (%d bytes)"
        " and dropped %d %s",
        tap_frames, tap, traffic.rx_frames, device, dropped, traffic.rx_drops,
    )  # fmt: skip
    assert abs(tap_frames - traffic.rx_frames - dropped) <= TAP_SLACK_FRAMES, (
        tap_frames, traffic.rx_frames, traffic.rx_drops,
    )  # fmt: skip
    assert -TAP_SLACK <= tap - device <= TAP_SLACK + dropped * MAX_RX_FRAME, (
        tap, device, traffic.rx_drops,
    )  # fmt: skip


def _make_idle(guest: Guest, ns: NetNS) -> None:
    """No background frames: neighbours pinned both ways, no IPv6."""
    tap_mac = ns.run(["cat", f"/sys/class/net/{TAP_NAME}/address"]).stdout.strip()
    guest.check(f"arp -s {ns.host_addr} {tap_mac}")
    guest.run("sysctl -qw net.ipv6.conf.all.disable_ipv6=1", timeout=30)
    ns.run(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"], check=False)
    ns.ip("neigh", "replace", ns.guest_addr(), "lladdr", GUEST_MAC, "dev", TAP_NAME,
          "nud", "permanent")  # fmt: skip


def _ethtool_stats(guest: Guest) -> dict[str, int]:
    out = guest.check("ethtool -S eth0")
    stats = {m.group(1): int(m.group(2)) for m in _ETHTOOL_RE.finditer(out)}
    assert stats, out
    return stats


def _by_queue(values: dict[Labels, float]) -> dict[str, int]:
    """{labels: value} of queue counters as {"rx0_packets": n, ...}."""
    out = {}
    for labels, value in values.items():
        d = dict(labels)
        name = d["__name__"].removeprefix("vfiouser_net_queue_").removesuffix("_total")
        out[f"{d['direction']}{d['queue']}_{name}"] = int(value)
    return out


def test_ethtool_device_stats_match_the_scrape(obs: Obs, traffic: Traffic) -> None:
    """ethtool -S between two equal scrapes of the idle link equals them: no tolerance.

    The guest's GET is answered between the two scrapes and the counters only
    grow, so when both scrapes agree nothing moved in between. A background
    frame that slips in (the link is made idle: neighbours pinned, no IPv6)
    makes them differ and the read is retried.
    """
    guest, prom = obs.guest, obs.prom
    _make_idle(guest, obs.ns)
    queue_sel = obs.sel_re(f"vfiouser_net_queue_({'|'.join(QUEUE_COUNTERS)})_total")
    ctrl_sel = obs.sel("vfiouser_net_device_control_commands_total")
    tries = []
    for _ in range(SANDWICH_TRIES):
        since = time.time()
        q_before, _ = prom.settled(queue_sel, since, min_series=4 * 2 * PAIRS)
        c_before, _ = prom.settled(ctrl_sel, since)
        stats = _ethtool_stats(guest)
        since = time.time()
        q_after, _ = prom.settled(queue_sel, since, min_series=4 * 2 * PAIRS)
        c_after, _ = prom.settled(ctrl_sel, since)
        commands = sum(c_after.values()) - sum(c_before.values())
        if q_before == q_after and commands == 1:
            break
        now = _by_queue(q_after)
        moved = {k: (v, now.get(k)) for k, v in _by_queue(q_before).items() if now.get(k) != v}
        tries.append(f"{commands} control commands; {moved}")
        log.info("sandwich retried: %s", tries[-1])
    else:
        raise AssertionError("the link never stayed idle around ethtool -S:\n" + "\n".join(tries))
    scraped = _by_queue(q_after)
    compared: dict[str, tuple[int, int]] = {}
    for d in ("rx", "tx"):
        for q in range(PAIRS):
            for field, counter in ETHTOOL_FIELD.items():
                key = f"{d}{q}_hw_{field}"
                assert key in stats, f"{key} missing in ethtool -S: {sorted(stats)}"
                compared[key] = (stats[key], scraped[f"{d}{q}_{counter}"])
            if f"{d}{q}_hw_drops" in stats:  # not shown by Linux 6.12's ethtool -S
                sel = obs.sel("vfiouser_net_queue_drops_total", queue=str(q), direction=d)
                drops = int(sum(prom.vector(sel).values()))
                compared[f"{d}{q}_hw_drops"] = (stats[f"{d}{q}_hw_drops"], drops)
    # The control queue: "including the current command", i.e. the GET.
    compared["cq_hw_command_num"] = (stats["cq_hw_command_num"], int(sum(c_after.values())))
    compared["cq_hw_ok_num"] = (
        stats["cq_hw_ok_num"],
        int(sum(v for k, v in c_after.items() if dict(k)["result"] == "ok")),
    )
    log.info("ethtool -S vs scrape (ethtool, prometheus): %s", compared)
    wrong = {k: v for k, v in compared.items() if v[0] != v[1]}
    assert not wrong, f"ethtool -S != Prometheus (ethtool, prometheus): {wrong}"
    # Traffic went through both queue pairs' counters (the test saw data).
    assert stats["rx_hw_packets"] > 1000 and stats["tx_hw_packets"] > 1000, stats


# -- the exposition itself -------------------------------------------------------------


def test_promtool_check_metrics(obs: Obs) -> None:
    status, body = obs.http.request(obs.metrics_url)
    assert status == 200, (status, body[:500])
    text = body.decode()
    assert f'device="{obs.device}"' in text
    proc = subprocess.run(
        [obs.promtool, "check", "metrics"], input=text, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    output = (proc.stdout + proc.stderr).strip()
    log.info("promtool check metrics (%d bytes, %d lines): rc %d %s",
             len(body), text.count("\n"), proc.returncode, output)  # fmt: skip
    assert proc.returncode == 0 and not output, f"promtool check metrics:\n{output}"


# -- scraping hard while traffic flows --------------------------------------------------

SCRAPE_LOOP = r"""
import http.client, json, re, select, sys, time
host, port, path, rate = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
period = 1.0 / rate
series = re.compile(r"^(vfiouser_net_queue_\w+_total\{[^}]*\}) (\S+)$", re.M)
last, backwards, errors, latencies, times = {}, [], [], [], []
print("started", flush=True)
while True:
    t = time.monotonic()
    try:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read().decode()
        conn.close()
        if resp.status != 200 or "vfiouser_net_queue_packets_total" not in body:
            raise RuntimeError(f"HTTP {resp.status}: {body[:200]!r}")
        for name, value in series.findall(body):
            v = float(value)
            if v < last.get(name, 0.0):
                backwards.append([name, last[name], v])
            last[name] = v
        times.append(time.monotonic())
    except Exception as exc:
        errors.append(repr(exc))
    latencies.append(time.monotonic() - t)
    ready, _, _ = select.select([sys.stdin], [], [], max(0.0, period - (time.monotonic() - t)))
    if ready and not sys.stdin.readline():
        break
gaps = [b - a for a, b in zip(times, times[1:])]
print(json.dumps({
    "scrapes": len(times), "series": len(last), "errors": errors[:10], "n_errors": len(errors),
    "backwards": backwards[:10], "seconds": times[-1] - times[0] if times else 0.0,
    "max_gap": max(gaps, default=0.0), "max_latency": max(latencies, default=0.0),
    "mean_latency": sum(latencies) / max(1, len(latencies)),
}))
"""


def test_scrape_loop_during_iperf3(obs: Obs) -> None:
    server, prom = obs.server, obs.prom
    parts = urllib.parse.urlsplit(obs.metrics_url)
    log_lines = len(server.log().splitlines())
    loop = popen_in_netns(
        obs.ns,
        [sys.executable, "-c", SCRAPE_LOOP, str(parts.hostname), str(parts.port), parts.path,
         str(SCRAPE_LOOP_RATE)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert loop.stdout is not None
        assert loop.stdout.readline().strip() == "started", loop.stderr
        rx = _iperf(obs, "guest_rx")
        out, err = loop.communicate(timeout=60)  # closing stdin ends the loop
    finally:
        if loop.poll() is None:
            loop.kill()
            loop.wait(10)
    assert loop.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    log.info("scrape loop: %s; iperf3 %s", report, rx.summary())
    # The transfer completed, the daemon lives and answers, nothing broke.
    assert rx.received_bytes > 1_000_000, rx.summary()
    assert server.alive(), server.log()[-3000:]
    obs.guest.check(f"ping -c 1 -W 2 {obs.ns.host_addr}")
    new_log = server.log().splitlines()[log_lines:]
    assert not [ln for ln in new_log if "Traceback" in ln or " ERROR " in ln], new_log[-50:]
    assert report["n_errors"] == 0, report
    assert report["series"] >= 8 * PAIRS, report  # queue counters were parsed...
    assert not report["backwards"], report  # ...and never went down
    # It was a tight loop over the whole run: at least 10 scrapes/s (50 asked;
    # this machine is shared), never a second without one.
    assert report["scrapes"] >= 10 * IPERF_SECONDS, report
    assert report["max_gap"] < 1.0, report
    # Prometheus kept scraping too.
    since = time.time()
    up, newest = prom.settled(obs.sel("up"), since - 1)
    assert list(up.values()) == [1.0] and newest > since - 1, up
