"""Helpers for the observability end-to-end test (test_observability_e2e.py):
a real Prometheus inside the test's network namespace, HTTP from inside that
namespace, and a small reader for the rules file.

The daemon runs inside a namespace and serves /metrics on that namespace's
127.0.0.1, so everything that talks to it (Prometheus, the test's own
requests) runs inside the namespace too:

- :class:`NetnsHttp` makes HTTP requests from this process through one worker
  thread that joined the namespace with setns(2) (which moves only the calling
  thread; it is the same as ``ip netns exec``, minus a process per request);
- :class:`Prometheus` runs ``prometheus`` under ``ip netns exec`` with a
  generated config (1 s scrape and rule evaluation intervals, the daemon as
  the only target of job ``vfiouser-net``, the repository's rules file), its
  storage in a temporary directory, on 127.0.0.1:<free port>, and queries its
  HTTP API. It is stopped (SIGTERM, then SIGKILL) on the way out of the
  context manager, also when the body raises, and killed with the test
  process if that dies first (:func:`popen_in_netns`).

Prerequisites: :func:`prometheus_tools` skips the test when prometheus or
promtool is missing, and fails it under CI=true.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

from vfiouser_net_harness.netns import NetNS

from tests.e2e.stack import require

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "rules" / "vfiouser-net.rules.yml"
JOB = "vfiouser-net"
CLONE_NEWNET = 0x40000000

T = TypeVar("T")
Labels = tuple[tuple[str, str], ...]


def popen_in_netns(ns: NetNS, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
    """Like NetNS.popen (own process group, text mode), but the child does not
    outlive this process: with setpriv(1) it gets SIGKILL as its parent-death
    signal, which survives ``ip netns exec``'s exec, so a killed test run
    leaves no Prometheus behind. Call it from the main thread (the signal
    fires when the creating thread exits).
    """
    full = ns.exec_argv(argv)
    if shutil.which("setpriv") is not None:
        full = ["setpriv", "--pdeathsig", "KILL", *full]
    log.debug("popen in %s: %s", ns.name, " ".join(argv))
    return subprocess.Popen(full, text=True, start_new_session=True, **kwargs)


def prometheus_tools() -> tuple[str, str]:
    """Paths of prometheus and promtool (skip, or fail under CI=true, without them)."""
    prometheus = shutil.which("prometheus")
    promtool = shutil.which("promtool")
    require(prometheus is not None, "prometheus is not installed (Debian package prometheus)")
    require(promtool is not None, "promtool is not installed (Debian package prometheus)")
    assert prometheus is not None and promtool is not None
    return prometheus, promtool


# -- HTTP from inside a namespace ------------------------------------------------------


class NetnsHttp:
    """HTTP requests from inside network namespace ``name``, made by one thread.

    The worker thread calls setns(2) once, before anything else; every socket
    it creates afterwards belongs to the namespace. Close it (or leave the
    ``with`` block) before the namespace is deleted.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"netns-{name}")
        try:
            # max_workers=1: this task and every later one run on the same thread.
            self._pool.submit(self._enter).result(timeout=30)
        except BaseException:
            self.close()
            raise

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(self._fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({self.name}): {os.strerror(err)}")
        # The thread is in the namespace now: its net namespace is the file's.
        mine = os.stat("/proc/thread-self/ns/net").st_ino
        if mine != os.fstat(self._fd).st_ino:
            raise OSError(f"setns({self.name}) did not move the thread")

    def call(self, fn: Callable[[], T], timeout: float = 60.0) -> T:
        """Run fn on the namespace's thread and return its result."""
        return self._pool.submit(fn).result(timeout=timeout)

    def request(
        self,
        url: str,
        *,
        data: Mapping[str, str] | None = None,
        timeout: float = 20.0,
    ) -> tuple[int, bytes]:
        """GET url (POST of a form when data is given); (HTTP status, body)."""
        parts = urllib.parse.urlsplit(url)
        assert parts.hostname is not None and parts.port is not None, url
        host, port = parts.hostname, parts.port
        path = parts.path + (f"?{parts.query}" if parts.query else "")

        def do() -> tuple[int, bytes]:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
            try:
                if data is None:
                    conn.request("GET", path)
                else:
                    body = urllib.parse.urlencode(data)
                    headers = {"Content-Type": "application/x-www-form-urlencoded"}
                    conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                return resp.status, resp.read()
            finally:
                conn.close()

        return self.call(do, timeout=timeout + 10)

    def free_port(self) -> int:
        """A TCP port free on the namespace's 127.0.0.1 (only our processes live there)."""

        def pick() -> int:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port: int = s.getsockname()[1]
                return port

        return self.call(pick)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def __enter__(self) -> NetnsHttp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- Prometheus -------------------------------------------------------------------------


class PromQueryError(AssertionError):
    """Prometheus refused a query or answered with an error."""


def labels_of(metric: Mapping[str, str], *, drop: tuple[str, ...] = ()) -> Labels:
    return tuple(sorted((k, v) for k, v in metric.items() if k not in drop))


def sample_value(text: str) -> float:
    return float(text)  # Prometheus writes NaN, +Inf and -Inf as strings float() reads


class Prometheus:
    """A Prometheus server inside a namespace, scraping one target (a context manager)."""

    def __init__(
        self,
        ns: NetNS,
        http: NetnsHttp,
        workdir: Path,
        target: str,
        *,
        binary: str = "prometheus",
        rules: Path = RULES,
        interval: str = "1s",
    ) -> None:
        self.ns = ns
        self.http = http
        self.workdir = workdir
        self.target = target
        self.binary = binary
        self.rules = rules
        self.interval = interval
        self.config = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None

    # --- lifecycle ---------------------------------------------------------------
    def write_config(self) -> Path:
        self.config.write_text(
            "# Generated by tests/e2e/obs_fixtures.py\n"
            "global:\n"
            f"  scrape_interval: {self.interval}\n"
            f"  scrape_timeout: {self.interval}\n"
            f"  evaluation_interval: {self.interval}\n"
            "rule_files:\n"
            f"  - {json.dumps(str(self.rules))}\n"
            "scrape_configs:\n"
            f"  - job_name: {JOB}\n"
            "    metrics_path: /metrics\n"
            "    static_configs:\n"
            f"      - targets: [{json.dumps(self.target)}]\n"
        )
        return self.config

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> Prometheus:
        self.write_config()
        for attempt in range(3):
            self.port = self.http.free_port()
            argv = [
                self.binary,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=info",
            ]
            with self.log_path.open("a") as out:
                self.proc = popen_in_netns(self.ns, argv, stdout=out, stderr=subprocess.STDOUT)
            log.info("prometheus in %s on %s (log %s)", self.ns.name, self.base_url, self.log_path)
            if self._wait_ready(timeout):
                break
            if "address already in use" not in self.log_tail() or attempt == 2:
                self.stop()
                raise AssertionError(f"prometheus did not start:\n{self.log_tail()}")
            self.stop()  # lost the port to someone else: try another one
        try:
            self.wait_target_up(timeout)
        except BaseException:
            log.error("prometheus log (%s):\n%s", self.log_path, self.log_tail())
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, _ = self.http.request(f"{self.base_url}/-/ready", timeout=5)
                if status == 200:
                    return True
            time.sleep(0.2)
        return False

    def wait_target_up(self, timeout: float = 60.0) -> dict[str, Any]:
        """The target's entry in /api/v1/targets once its health is "up"."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            self.check_alive()
            targets = self.api("/api/v1/targets")["activeTargets"]
            last = targets
            for t in targets:
                if t["labels"].get("instance") == self.target and t["health"] == "up":
                    log.info("prometheus: target %s up (job %s)", self.target, t["labels"]["job"])
                    return dict(t)
            time.sleep(0.5)
        raise AssertionError(f"target {self.target} never up: {last}\n{self.log_tail()}")

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise AssertionError(f"prometheus exited ({code}):\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # `ip netns exec` execs prometheus: the group's leader is prometheus.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("prometheus ignored SIGTERM for %.0f s; killing it", timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            log.error("prometheus log (%s):\n%s", self.log_path, self.log_tail())
        self.stop()

    # --- HTTP API ----------------------------------------------------------------
    def api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """GET (POST with params) an API path; its "data" (raises unless "success")."""
        body = self.api_raw(path, params)
        if body.get("status") != "success":
            raise PromQueryError(f"{path} {dict(params or {})}: {body}")
        return body["data"]

    def api_raw(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        status, raw = self.http.request(f"{self.base_url}{path}", data=params)
        try:
            body: dict[str, Any] = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise PromQueryError(f"{path}: HTTP {status}, not JSON: {raw[:500]!r}") from exc
        return body

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query (at a Unix time, default now); the result list."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("/api/v1/query", params)
        result = data["result"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        assert isinstance(result, list)
        return result

    def query_raw(self, expr: str, at: float | None = None) -> dict[str, Any]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api_raw("/api/v1/query", params)

    def vector(
        self, expr: str, at: float | None = None, *, drop: tuple[str, ...] = ()
    ) -> dict[Labels, float]:
        """An instant vector as {labels: value}."""
        return {
            labels_of(s["metric"], drop=drop): sample_value(s["value"][1])
            for s in self.query(expr, at)
        }

    def scalar(self, expr: str, at: float | None = None) -> float:
        values = list(self.vector(expr, at).values())
        assert len(values) == 1, f"{expr}: {len(values)} series"
        return values[0]

    def settled(
        self,
        selector: str,
        since: float,
        *,
        timeout: float = 30.0,
        min_series: int = 1,
    ) -> tuple[dict[Labels, float], float]:
        """Values of selector's series once two scrapes newer than since agree.

        Returns ({labels: value}, timestamp of the newest of those scrapes).
        A sample's timestamp is when its scrape started, so these values were
        read after ``since``.
        """
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            window = max(5, math.ceil(time.time() - since) + 2)
            series = self.query(f"{selector}[{window}s]")
            values: dict[Labels, float] = {}
            newest = 0.0
            ok = len(series) >= min_series
            for s in series:
                points = [(float(t), sample_value(v)) for t, v in s["values"] if float(t) > since]
                if len(points) < 2 or points[-1][1] != points[-2][1]:
                    ok = False
                    break
                values[labels_of(s["metric"])] = points[-1][1]
                newest = max(newest, points[-1][0])
            if ok:
                return values, newest
            last = series
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{selector}: no two agreeing scrapes after {since:.3f} within "
                    f"{timeout:.0f} s (still moving?): {str(last)[:3000]}"
                )
            time.sleep(0.5)


# -- the rules file -------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    kind: Literal["record", "alert"]
    name: str
    expr: str
    duration: str | None  # the alert's `for:`


_RULE_START = re.compile(r"^\s*-\s+(record|alert):\s*(\S+)\s*$")
_KEY = re.compile(r"^(\s*)(expr|for):\s*(.*?)\s*$")


def _scalar(value: str) -> str:
    if value.startswith('"'):
        text: str = json.loads(value)
        return text
    if value.startswith("'"):
        return value[1:-1].replace("''", "'")
    return re.sub(r"\s+#.*$", "", value)


def read_rules(path: Path = RULES) -> list[Rule]:
    """Every rule of a Prometheus rules file, in order.

    A small reader for the layout this repository uses (no PyYAML in the
    venv): ``- record:``/``- alert:`` items whose ``expr`` is an inline
    scalar or a ``|``/``>`` block. ``promtool check rules`` (and Prometheus,
    which loads the file) validate the full syntax.
    """
    lines = path.read_text().splitlines()
    rules: list[Rule] = []
    current: dict[str, Any] | None = None

    def flush() -> None:
        if current is not None:
            assert "expr" in current, f"{path}: rule {current['name']} without expr"
            rules.append(
                Rule(current["kind"], current["name"], current["expr"], current.get("for"))
            )

    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if m := _RULE_START.match(line):
            flush()
            current = {"kind": m.group(1), "name": _scalar(m.group(2))}
            continue
        m = _KEY.match(line)
        if m is None or current is None:
            continue
        indent, key, value = len(m.group(1)), m.group(2), m.group(3)
        if value[:1] in ("|", ">"):
            block: list[str] = []
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
            ):
                block.append(lines[i].strip())
                i += 1
            value = ("\n" if value[0] == "|" else " ").join(block).strip()
        else:
            value = _scalar(value)
        current[key] = value
    flush()
    return rules


# -- PromQL, enough to find the series an expression reads ---------------------------

_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_SELECTOR = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)\s*(\{[^{}]*\})?(\s*\()?")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan"}  # fmt: skip
_COMPARISON = re.compile(
    r"\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
    r"(?![\w.])"
)


def vector_selectors(expr: str) -> list[str]:
    """The vector selectors (name{matchers}) an expression reads, in order."""
    # Hide label lists, and the strings' contents only outside of matchers:
    # the matchers are kept as written.
    text = _LABEL_LIST.sub(" ", expr)
    out: list[str] = []
    pos = 0
    while m := _SELECTOR.search(text, pos):
        pos = m.end()
        name, matchers, call = m.group(1), m.group(2), m.group(3)
        if call and not matchers:
            continue  # a function or an aggregation
        if name.lower() in _KEYWORDS:
            continue
        before = text[: m.start()]
        if before.count('"') % 2 == 1:
            continue  # inside a string argument
        selector = name + (matchers or "")
        if selector not in out:
            out.append(selector)
    return out


def without_thresholds(expr: str) -> str:
    """expr with every comparison against a number removed: the data, not the filter.

    (Label matchers compare with strings, never with a bare number, so they stay.)
    """
    return _COMPARISON.sub("", expr)
