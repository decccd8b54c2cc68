"""Fixtures for the multiqueue end-to-end tests (test_multiqueue_e2e.py).

One *stack* per module: a fresh network namespace with a ``multi_queue``
TAP holding the host-side address (10.201.N.1/24), the ``vfiouser-net
serve`` daemon offering 4 queue pairs on it, and one QEMU guest (TCG,
2 vCPUs, Linux 6.12) whose only NIC is the daemon's device, configured with
10.201.N.2/24. Both sides know each other's MAC permanently (no ARP frames in
the per-queue counters).

The tests observe the device through the daemon's log: SIGUSR2 makes it log
its counters and steering state as JSON (:meth:`MQStack.counters`), SIGUSR1
moves the steering policy one step round auto -> single -> rss ->
rx-follows-tx -> auto. The guest side is read over its console: ``ethtool``
for channels and RSS, ``/proc/interrupts`` for the per-queue interrupts.

:func:`mq_fixture` (``mq``) puts the shared stack back into its known state
before each test (daemon and guest alive, policy ``auto``, the guest's
default indirection table with the key it booted with), rebuilding what a
previous test broke. Everything is stopped and deleted at the end of the
module, also when a test fails (an ExitStack). When CI=true a missing
prerequisite fails instead of skipping.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from vfiouser_net_harness.guest import Guest, GuestError

from tests.e2e.stack import Stack, StackConfig, open_stack, require

log = logging.getLogger(__name__)

QUEUE_PAIRS = 4
RSS_TABLE_LEN = 128
RSS_KEY_LEN = 40
MQ_MAC = "52:54:00:5e:a1:04"
TAP_NAME = "vntap0"
POLICIES = ("auto", "single", "rss", "rx-follows-tx")  # the SIGUSR1 cycle
GUEST_TOOLS = ("ethtool", "iperf3", "taskset", "ping", "arp")

_COUNTERS_RE = re.compile(r": counters (\{.*)$")
_IRQ_RE = re.compile(r"virtio\d+-(input|output)\.(\d+)$")


# --- the daemon's counters ------------------------------------------------------------


@dataclass(frozen=True)
class Counters:
    """One SIGUSR2 snapshot of the daemon (see VirtioNetDevice.snapshot)."""

    raw: dict[str, Any]

    @property
    def steering(self) -> dict[str, Any]:
        steering: dict[str, Any] = self.raw["steering"]
        return steering

    @property
    def queues(self) -> list[dict[str, Any]]:
        queues: list[dict[str, Any]] = self.raw["queues"]
        return queues

    def packets(self, direction: str) -> list[int]:
        """Packets per queue pair in one direction ("rx": placed for the guest)."""
        return [int(q[direction]["packets"]) for q in self.queues]

    def steered_out(self) -> list[int]:
        return [int(q["rx"]["steered_out"]) for q in self.queues]

    def rx_drops(self) -> dict[str, int]:
        """Receive drops by reason, summed over the queue pairs."""
        total: dict[str, int] = {}
        for q in self.queues:
            for reason, n in q["rx"]["drops"].items():
                total[reason] = total.get(reason, 0) + int(n)
        return total

    def device(self, name: str) -> int:
        return int(self.raw["device"][name])


def deltas(before: list[int], after: list[int]) -> list[int]:
    return [a - b for a, b in zip(after, before, strict=True)]


# --- the stack --------------------------------------------------------------------------


MQ_CONFIG = StackConfig(mac=MQ_MAC, queue_pairs=QUEUE_PAIRS, tap_name=TAP_NAME)


class MQStack(Stack):
    """The stack of MQ_CONFIG: a multi_queue TAP, a 4-pair daemon, a 2-vCPU guest."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.boot_key = ""  # the RSS key the guest driver chose at boot (hex)

    def counters(self, timeout: float = 10.0) -> Counters:
        """The daemon's live snapshot: SIGUSR2, then the ``counters`` line it
        logs (the last complete one written after the signal)."""
        server = self.require_server()
        start = server.log_path.stat().st_size
        os.kill(self.daemon_pid(), signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while True:
            with server.log_path.open("rb") as f:
                f.seek(start)
                text = f.read().decode(errors="replace")
            complete = text[: text.rfind("\n") + 1]
            found = [m.group(1) for ln in complete.splitlines() if (m := _COUNTERS_RE.search(ln))]
            if found:
                return Counters(json.loads(found[-1]))
            if time.monotonic() > deadline:
                raise AssertionError(f"no counters logged on SIGUSR2:\n{server.log()[-2000:]}")
            time.sleep(0.02)

    def counters_settled(self, before: Counters, min_rx: int, timeout: float = 15.0) -> Counters:
        """Counters once at least min_rx more frames were placed for the guest
        and two snapshots 0.3 s apart agree (nothing still on its way)."""
        deadline = time.monotonic() + timeout
        last: list[int] | None = None
        while True:
            now = self.counters()
            rx = now.packets("rx")
            grown = sum(deltas(before.packets("rx"), rx))
            if grown >= min_rx and rx == last:
                return now
            if time.monotonic() > deadline:
                return now
            last = rx
            time.sleep(0.3)

    # --- steering policy (SIGUSR1) ------------------------------------------------------
    def policy(self) -> str:
        return str(self.counters().steering["policy"])

    def next_policy(self, timeout: float = 10.0) -> str:
        """One SIGUSR1; returns the new policy once the device applied it."""
        current = self.policy()
        want = POLICIES[(POLICIES.index(current) + 1) % len(POLICIES)]
        os.kill(self.daemon_pid(), signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while (got := self.policy()) != want:
            assert time.monotonic() < deadline, f"policy still {got} after SIGUSR1 (want {want})"
            time.sleep(0.05)
        return want

    def set_policy(self, want: str) -> Counters:
        """SIGUSR1 until the configured policy is want (at most one cycle)."""
        assert want in POLICIES
        for _ in range(len(POLICIES)):
            if self.policy() == want:
                break
            self.next_policy()
        snap = self.counters()
        assert snap.steering["policy"] == want, snap.steering
        return snap

    # --- guest --------------------------------------------------------------------------
    def boot_guest(self) -> Guest:
        if self.guest is not None:
            self.guest.close()
        # devmem on BAR0 (the steering state) while virtio_pci holds it.
        guest = self.start_guest(f"mqguest{self.guests_started + 1}", cmdline_extra="iomem=relaxed")
        self.guest = guest
        missing = [t for t in GUEST_TOOLS if guest.run(f"command -v {t}", timeout=30)[0] != 0]
        require(not missing, f"guest image lacks {', '.join(missing)}")
        self.configure_guest()
        self.boot_key = str(self.counters().steering["rss"]["key"])
        return guest

    def configure_guest(self) -> None:
        """Address eth0, bring it up, pin both neighbour entries."""
        guest = self.require_guest()
        guest.check(
            f"ip addr flush dev eth0 && ip addr add {self.guest_addr}/{self.ns.prefix_len} "
            "dev eth0 && ip link set eth0 up"
        )
        guest.wait_until(
            '[ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" = 1 ]', timeout=20, interval=0.2
        )
        tap_mac = self.ns.run(["cat", f"/sys/class/net/{self.tap.name}/address"]).stdout.strip()
        guest.check(f"arp -s {self.host_addr} {tap_mac}")
        # No IPv6 chatter (router solicitations, MLD) in the per-queue counters.
        guest.run("sysctl -qw net.ipv6.conf.all.disable_ipv6=1", timeout=30)
        self.ns.ip(
            "neigh", "replace", self.guest_addr, "lladdr", self.mac, "dev", self.tap.name,
            "nud", "permanent",
        )  # fmt: skip
        guest.wait_until(f"ping -c 1 -W 2 {self.host_addr}", timeout=30)

    # --- guest observations ----------------------------------------------------------------
    def ethtool(self, args: str) -> str:
        return self.require_guest().check(f"ethtool {args}")

    def channels(self) -> tuple[int, int]:
        """(maximum, current) combined channels from ``ethtool -l eth0``."""
        out = self.ethtool("-l eth0")
        found = re.findall(r"^Combined:\s+(\d+)", out, re.M)
        assert len(found) == 2, out
        return int(found[0]), int(found[1])

    def set_channels(self, n: int) -> None:
        self.ethtool(f"-L eth0 combined {n}")

    def set_rxfh(self, args: str) -> str:
        """``ethtool -X eth0 ARGS``; with ``xfrm none`` appended if the plain
        form is refused (ethtool >= 6.8 on older kernels). Returns the form used."""
        guest = self.require_guest()
        code, out = guest.run(f"ethtool -X eth0 {args}")
        if code == 0:
            return args
        log.info("ethtool -X eth0 %s exited %d (%s); retrying with xfrm none", args, code, out)
        guest.check(f"ethtool -X eth0 {args} xfrm none")
        return f"{args} xfrm none"

    def rxfh(self) -> tuple[list[int], str]:
        """The guest's indirection table and key (hex) from ``ethtool -x eth0``."""
        out = self.ethtool("-x eth0")
        table: list[int] = []
        key = ""
        lines = out.splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"^\s*(\d+):((?:\s+\d+)+)\s*$", line)
            if m:
                assert int(m.group(1)) == len(table), out
                table += [int(v) for v in m.group(2).split()]
            elif line.startswith("RSS hash key:"):
                key = lines[i + 1].strip().replace(":", "")
        return table, key

    def restore_rxfh(self) -> None:
        """The driver's default table (spread over the current channels), boot key."""
        key = ":".join(self.boot_key[i : i + 2] for i in range(0, len(self.boot_key), 2))
        self.set_rxfh(f"hkey {key} default" if key else "default")

    def irqs(self) -> dict[tuple[str, int], int]:
        """Interrupts per virtqueue (("input"|"output", K) -> sum over CPUs)."""
        out = self.require_guest().check("cat /proc/interrupts")
        lines = out.splitlines()
        ncpu = len(lines[0].split())
        counts: dict[tuple[str, int], int] = {}
        for line in lines[1:]:
            parts = line.split()
            m = _IRQ_RE.search(line)
            if m is None or len(parts) < ncpu + 1:
                continue
            counts[(m.group(1), int(m.group(2)))] = sum(int(v) for v in parts[1 : ncpu + 1])
        return counts

    def guest_rx_dropped(self) -> int:
        return int(self.require_guest().check("cat /sys/class/net/eth0/statistics/rx_dropped"))

    def guest_udp(self) -> dict[str, int]:
        """The guest's Udp: line of /proc/net/snmp (RcvbufErrors, InErrors, ...)."""
        out = self.require_guest().check("grep '^Udp:' /proc/net/snmp")
        head, values = (line.split()[1:] for line in out.splitlines()[:2])
        return {k: int(v) for k, v in zip(head, values, strict=True)}

    def guest_tcpext(self) -> dict[str, int]:
        """The guest's TcpExt: counters of /proc/net/netstat (TCPOFOQueue, ...)."""
        out = self.require_guest().check("grep '^TcpExt:' /proc/net/netstat")
        head, values = (line.split()[1:] for line in out.splitlines()[:2])
        return {k: int(v) for k, v in zip(head, values, strict=True)}

    def tap_link_stats(self) -> dict[str, Any]:
        """``ip -s -j link show`` of the TAP (stats64: rx/tx bytes, packets, dropped...)."""
        out = self.ns.run(["ip", "-s", "-j", "link", "show", "dev", self.tap.name]).stdout
        stats: dict[str, Any] = json.loads(out)[0]["stats64"]
        return stats

    # --- state between tests --------------------------------------------------------------
    def healthy(self) -> bool:
        if self.server is None or not self.server.alive():
            return False
        if self.guest is None or not self.guest.alive:
            return False
        try:
            code, _ = self.guest.run(f"ping -c 1 -W 2 {self.host_addr}", timeout=30)
        except GuestError as exc:
            log.warning("guest health check failed: %s", exc)
            return False
        return code == 0

    def ensure_ready(self) -> None:
        """Daemon and guest alive and talking, policy auto, default RSS table."""
        self.ns.ip("link", "set", self.tap.name, "up")
        if not self.healthy():
            log.info("stack not healthy; restarting the daemon and booting a new guest")
            if self.guest is not None:
                self.guest.close()
            if self.server is not None and self.server.alive():
                self.server.stop()
            self.start_server()
            self.boot_guest()
        self.set_policy("auto")
        self.restore_rxfh()


@pytest.fixture(scope="module", name="mq_stack")
def mq_stack_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MQStack]:
    """The module's shared stack (daemon + guest booted); torn down at the end."""
    workdir = tmp_path_factory.mktemp("vn-mq")
    with open_stack(MQStack, MQ_CONFIG, workdir) as stack:
        stack.start_server()
        stack.boot_guest()
        yield stack


@pytest.fixture(name="mq")
def mq_fixture(mq_stack: MQStack) -> Iterator[MQStack]:
    """The shared stack in its known state at the start of the test."""
    t0 = time.monotonic()
    mq_stack.ensure_ready()
    log.info(
        "mq stack ready in %.1f s: netns %s, daemon log %s, guest console %s",
        time.monotonic() - t0,
        mq_stack.ns.name,
        mq_stack.require_server().log_path,
        mq_stack.require_guest().console_log,
    )
    yield mq_stack


# --- iperf3 UDP, host -> guest --------------------------------------------------------------


@dataclass(frozen=True)
class UdpRun:
    """One ``iperf3 -u -R`` run: the guest receives, the namespace sends."""

    client: dict[str, Any]
    server: dict[str, Any]

    def receiver_streams(self) -> list[dict[str, Any]]:
        """Per stream: the receiver's (the guest client's) udp figures."""
        return [s["udp"] for s in self.client["end"]["streams"]]

    def sender_packets(self) -> int:
        return sum(int(s["udp"]["packets"]) for s in self.server["end"]["streams"])

    @property
    def lost(self) -> int:
        return sum(int(s["lost_packets"]) for s in self.receiver_streams())

    @property
    def received(self) -> int:
        return sum(int(s["packets"]) - int(s["lost_packets"]) for s in self.receiver_streams())

    @property
    def out_of_order(self) -> list[int]:
        return [int(s["out_of_order"]) for s in self.receiver_streams()]


def _parse_json(text: str, who: str) -> dict[str, Any]:
    start = text.find("{")
    assert start >= 0, f"no JSON from the iperf3 {who}:\n{text[-2000:]}"
    data: dict[str, Any] = json.loads(text[start:])
    assert "error" not in data, f"iperf3 {who}: {data['error']}"
    return data


def _kill_group(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def run_iperf3_udp_rx(
    stack: MQStack,
    *,
    streams: int,
    rate: str,
    seconds: int,
    port: int = 5202,
) -> UdpRun:
    """``iperf3 -u -R -P streams -b rate`` from the guest against the namespace."""
    ns, guest = stack.ns, stack.require_guest()
    server = ns.popen(
        ["iperf3", "-s", "-1", "-J", "-B", stack.host_addr, "-p", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not ns.run(["ss", "-Htln", f"sport = :{port}"], check=False).stdout.strip():
            assert server.poll() is None, f"iperf3 server exited {server.returncode}"
            assert time.monotonic() < deadline, "iperf3 server not listening"
            time.sleep(0.1)
        code, out = guest.run(
            f"iperf3 -c {stack.host_addr} -p {port} -u -b {rate} -P {streams} -t {seconds} "
            "-R -J -i 0",
            timeout=seconds + 60,
        )
        sout, serr = server.communicate(timeout=30)
        assert code == 0, f"guest iperf3 exited {code}:\n{out[-3000:]}"
        assert server.returncode == 0, f"iperf3 server exited {server.returncode}: {serr}"
    finally:
        _kill_group(server)
    return UdpRun(client=_parse_json(out, "client"), server=_parse_json(sout, "server"))


class PolicySwitcher(threading.Thread):
    """Sends SIGUSR1 to the daemon ``count`` times, ``interval`` apart, once
    ``go`` is set and the TAP has carried ``min_tx`` more frames to the guest
    than at ``go`` (traffic is flowing)."""

    def __init__(self, stack: MQStack, *, count: int, interval: float, min_tx: int = 500) -> None:
        super().__init__(name="policy-switcher", daemon=True)
        self.stack = stack
        self.pid = stack.daemon_pid()
        self.count = count
        self.interval = interval
        self.min_tx = min_tx
        self.go = threading.Event()
        self.stop_event = threading.Event()
        self.sent: list[float] = []
        self.error: BaseException | None = None

    def _tap_tx(self) -> int:
        path = f"/sys/class/net/{self.stack.tap.name}/statistics/tx_packets"
        return int(self.stack.ns.run(["cat", path]).stdout)

    def run(self) -> None:
        try:
            if not self.go.wait(60):
                return
            base = self._tap_tx()
            deadline = time.monotonic() + 60
            while self._tap_tx() - base < self.min_tx:
                if self.stop_event.is_set() or time.monotonic() > deadline:
                    return
                time.sleep(0.05)
            for _ in range(self.count):
                if self.stop_event.is_set():
                    return
                os.kill(self.pid, signal.SIGUSR1)
                self.sent.append(time.monotonic())
                time.sleep(self.interval)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def finish(self) -> None:
        self.stop_event.set()
        self.join(timeout=30)
