"""Issue #11's proof: one ``serve --config`` daemon, two real QEMU guests
(TCG) and a hostile vfio-user client on a third socket of the same daemon.

Both guests ping the host side of their own TAP continuously (one ping every
0.2 s) while the hostile client, the hostile driver library
(harness/vfiouser_net_harness/hostile_driver/) on a 4-pair device, does in turn:

1. DMA_MAP with neither READ nor WRITE (and WRITE only), rings there, DRIVER_OK;
2. a region longer than its file (1 GiB over 4 KiB), and a memfd truncated
   after it was mapped, with rings and buffers in the lost part;
3. a region at a file offset that is not page aligned, transmit and receive
   buffers in it;
4. the same DMA_MAP 1000 times;
5. (the guest side) a control queue kept busy;
6. (the guest side) steering to pairs without rings, a flood of 64 KiB frames.

After each: the attack's own checks passed (the daemon refused or contained
it), the daemon is alive, both guests' pings lost nothing, the daemon holds
exactly as many descriptors as before the hostile client came, its heap
(RssAnon) is within RSS_MARGIN_KIB of where it was, and the third socket
serves a new client. At the end SIGTERM stops the daemon, with both guests
attached, within 2 s.

Everything (daemon, guests, namespace with its TAPs) is removed also when the
test fails. Under CI=true a missing prerequisite fails the test.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vfiouser_net_harness.guest import Guest, GuestPaths, vfio_user_pci_args
from vfiouser_net_harness.hostile_driver import HostileDriver, admin_sources, daemon_rss_anon_kib
from vfiouser_net_harness.netns import NetNS
from vfiouser_net_harness.procstat import fd_targets
from vfiouser_net_harness.vfio_user_client import VfioUserClient

from tests.e2e.stack import check_prerequisites
from tests.protocol.support import open_packet_socket

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
GUEST_MEMORY_MB = 256
PING_INTERVAL = 0.2
RSS_MARGIN_KIB = 8 * 1024  # the daemon's heap after a hostile client, over its baseline
# Under ASan (scripts/test-asan.sh) freed memory stays in its quarantine (up
# to 256 MiB), so the heap says nothing there: the memory check is made by the
# run with the production build (scripts/test.sh runs this file again).
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")
SIGTERM_BOUND = 2.0
MIN_PHASE_S = 3.0  # the guests ping at least this long around each hostile client
HOSTILE_PAIRS = 4

# Findings 1-6 of the issue: the hostile driver's attacks for each.
PHASES: list[tuple[str, list[str]]] = [
    ("1 DMA_MAP without access", ["dma_map_no_access", "dma_map_write_only"]),
    ("2 region past its file", ["dma_map_beyond_file", "dma_file_truncated"]),
    ("3 unaligned offset", ["dma_map_unaligned_offset"]),
    ("4 repeated DMA_MAP", ["dma_map_repeated"]),
    ("5 busy control queue", ["ctrl_queue_busy"]),
    ("6 steering to pairs without rings", ["steering_to_unconfigured_pairs"]),
]

_SEQ_RE = re.compile(r"seq=(\d+)")
_SUMMARY_RE = re.compile(r"(\d+) packets transmitted, (\d+) packets received")


@dataclass
class Vm:
    name: str
    tap: str
    host: str
    guest_addr: str
    socket: Path
    mac: str
    guest: Guest | None = None
    pings: int = 0


@dataclass
class PingFigures:
    transmitted: int
    received: int
    lost: list[int]  # sequence numbers never answered (the last one may be in flight)

    @property
    def loss_percent(self) -> float:
        counted = max(1, self.transmitted - 1)
        return 100.0 * len(self.lost) / counted


class Daemon:
    """``vfiouser-net serve --config`` in the namespace, its own process group."""

    def __init__(self, ns: NetNS, config: Path, log_path: Path) -> None:
        argv = [sys.executable, "-P", "-m", "vfiouser_net", "serve", "--config", str(config)]
        self.log_path = log_path
        with log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                ns.exec_argv(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=REPO,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_paths(self, paths: list[Path], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(p.exists() for p in paths):
            assert self.alive(), f"daemon exited {self.proc.returncode}:\n{self.log()[-4000:]}"
            assert time.monotonic() < deadline, f"no {paths}:\n{self.log()[-4000:]}"
            time.sleep(0.05)
        want = os.environ.get("VN_EXPECT_NATIVE_IN")
        if want:
            maps = Path(f"/proc/{self.pid}/maps").read_text()
            assert f"{want}/vfiouser_net/_native" in maps, "not the datapath in VN_EXPECT_NATIVE_IN"

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_anon(self) -> int:
        v = daemon_rss_anon_kib(self.pid)
        assert v is not None
        return v

    def kill(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(10)


def start_ping(vm: Vm) -> str:
    assert vm.guest is not None
    vm.pings += 1
    out = f"/tmp/ping{vm.pings}.log"
    vm.guest.check(
        f"ping -i {PING_INTERVAL} {vm.host} >{out} 2>&1 & echo $! >/tmp/ping{vm.pings}.pid"
    )
    return out


def stop_ping(vm: Vm, out: str) -> PingFigures:
    assert vm.guest is not None
    vm.guest.check(f"kill -INT $(cat /tmp/ping{vm.pings}.pid)")
    vm.guest.wait_until(f"grep -q 'packets transmitted' {out}", timeout=20, interval=0.2)
    text = vm.guest.check(f"cat {out}")
    m = _SUMMARY_RE.search(text)
    assert m is not None, text[-2000:]
    transmitted, received = int(m.group(1)), int(m.group(2))
    seen = {int(s) for s in _SEQ_RE.findall(text)}
    # The echo sent just before the interrupt may still have been on its way.
    lost = [s for s in range(transmitted - 1) if s not in seen]
    return PingFigures(transmitted, received, lost)


def probe(socket_path: Path) -> int:
    """A new client on the socket: negotiate, read the vendor id, leave."""
    with VfioUserClient(socket_path, timeout=10.0, connect_timeout=10.0) as c:
        c.negotiate()
        return c.config_read16(0)


def boot_guests(
    vms: list[Vm], paths: GuestPaths, tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    """Boot a guest for each VM (in parallel), address it and wait until it
    reaches the host side of its TAP; each is closed when ``stack`` unwinds."""
    for vm in vms:
        vm.guest = Guest(
            paths=paths,
            cpus=1,
            memory_mb=GUEST_MEMORY_MB,
            extra_args=vfio_user_pci_args(vm.socket, "vn0"),
            workdir=tmp_path / vm.name,
            name=vm.name,
        )
        stack.callback(vm.guest.close)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for fut in [pool.submit(vm.guest.start) for vm in vms if vm.guest]:
            fut.result()
    for vm in vms:
        assert vm.guest is not None
        vm.guest.check(f"ip addr add {vm.guest_addr}/26 dev eth0 && ip link set eth0 up")
        vm.guest.wait_until("grep -qx 1 /sys/class/net/eth0/carrier", timeout=30)
        vm.guest.wait_until(f"ping -c 1 -W 1 {vm.host}", timeout=30)


def test_hostile_client_beside_two_vms(ns: NetNS, tmp_path: Path, record_property: Any) -> None:
    t_start = time.monotonic()
    paths: GuestPaths = check_prerequisites()
    n = ns.index
    vms = [
        Vm("vm1", "tap-vm1", f"10.201.{n}.1", f"10.201.{n}.2", tmp_path / "vm1.sock",
           "52:54:00:0b:11:01"),
        Vm("vm2", "tap-vm2", f"10.201.{n}.65", f"10.201.{n}.66", tmp_path / "vm2.sock",
           "52:54:00:0b:11:02"),
    ]  # fmt: skip
    for vm in vms:
        ns.add_tap(vm.tap, address=f"{vm.host}/26")
    ns.add_tap("tap-hostile", multi_queue=True, address=None)
    hostile_sock = tmp_path / "hostile.sock"
    admin = tmp_path / "admin.sock"
    config = tmp_path / "vfiouser-net.toml"
    config.write_text(
        # One process for every device: what this test shows is that the
        # device's own defences keep a failure to its device.
        f'[daemon]\nadmin_socket = "{admin}"\nmetrics_addr = "none"\nlog_level = "info"\n'
        "isolate = false\n"
        + "".join(
            f'\n[[device]]\nname = "{vm.name}"\nsocket = "{vm.socket}"\ntap = "{vm.tap}"\n'
            f'mac = "{vm.mac}"\n'
            for vm in vms
        )
        + f'\n[[device]]\nname = "hostile"\nsocket = "{hostile_sock}"\ntap = "tap-hostile"\n'
        f'mac = "52:54:00:0b:11:66"\nqueue_pairs = {HOSTILE_PAIRS}\n'
    )
    figures: dict[str, Any] = {"phases": []}
    with contextlib.ExitStack() as stack:
        daemon = Daemon(ns, config, tmp_path / "daemon.log")
        stack.callback(lambda: log.info("daemon log (tail):\n%s", daemon.log()[-4000:]))
        stack.callback(daemon.kill)
        daemon.wait_paths([vm.socket for vm in vms] + [hostile_sock, admin])

        boot_guests(vms, paths, tmp_path, stack)
        figures["boot_s"] = round(time.monotonic() - t_start, 1)

        packet_sock = open_packet_socket(ns, "tap-hostile")
        stack.callback(packet_sock.close)
        counters, ring_state = admin_sources(str(admin), "hostile")
        time.sleep(0.5)
        fds0, rss0 = daemon.fds(), daemon.rss_anon()
        figures["baseline"] = {"fds": fds0, "rss_anon_kib": rss0}
        log.info("baseline: %d fds, RssAnon %d KiB", fds0, rss0)
        problems: list[str] = []

        for phase, attacks in PHASES:
            t0 = time.monotonic()
            pings = {vm.name: start_ping(vm) for vm in vms}
            report: dict[str, Any] = {}
            try:
                with HostileDriver(
                    hostile_sock,
                    packet_sock,
                    counters=counters,
                    ring_state=ring_state,
                    daemon_alive=daemon.alive,
                    daemon_pid=daemon.pid,
                    daemon_log=daemon.log,
                ) as hd:
                    report = hd.run(attacks)
            except Exception as e:  # the device did not even come up
                problems.append(f"{phase}: hostile client: {type(e).__name__}: {e}")
            if not daemon.alive():
                problems.append(f"{phase}: the daemon died (exit {daemon.proc.returncode})")
                break
            time.sleep(max(0.0, t0 + MIN_PHASE_S - time.monotonic()))
            ping = {vm.name: stop_ping(vm, pings[vm.name]) for vm in vms}
            # fds: exactly the baseline once the daemon has seen the client go.
            deadline = time.monotonic() + 5
            while daemon.fds() != fds0 and time.monotonic() < deadline:
                time.sleep(0.05)
            fds, rss = daemon.fds(), daemon.rss_anon()
            served = probe(hostile_sock)
            row = {
                "phase": phase,
                "seconds": round(time.monotonic() - t0, 1),
                "attacks": {
                    r["name"]: {"ok": r["ok"], "failures": r["failures"], "observed": r["observed"]}
                    for r in report.get("attacks", [])
                },
                "pings": {
                    k: {"sent": p.transmitted, "lost": p.lost, "loss_percent": p.loss_percent}
                    for k, p in ping.items()
                },
                "fds": fds,
                "rss_anon_kib": rss,
            }
            figures["phases"].append(row)
            log.info("phase %s: %s", phase, row)
            for r in report.get("attacks", []):
                for f in r["failures"]:
                    problems.append(f"{phase}: {r['name']}: {f}")
            if report and len(report["attacks"]) != len(attacks):
                problems.append(f"{phase}: ran {[r['name'] for r in report['attacks']]}")
            for name, p in ping.items():
                if p.lost or p.transmitted < 5:
                    problems.append(f"{phase}: {name} ping lost {p.lost} of {p.transmitted}")
            if fds != fds0:
                problems.append(
                    f"{phase}: daemon fds {fds0} -> {fds}:\n" + "\n".join(fd_targets(daemon.pid))
                )
            if not UNDER_ASAN and rss - rss0 > RSS_MARGIN_KIB:
                problems.append(f"{phase}: daemon RssAnon {rss0} -> {rss} KiB")
            if served != 0x1AF4:
                problems.append(f"{phase}: the hostile socket answered vendor {served:#x}")

        # SIGTERM with both guests attached.
        alive_at_end = daemon.alive()
        t0 = time.monotonic()
        if alive_at_end:
            daemon.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.proc.wait(10)
        stop_s = time.monotonic() - t0
        code = daemon.proc.returncode
        figures["sigterm_s"] = round(stop_s, 3)
        figures["exit_code"] = code
        figures["run_s"] = round(time.monotonic() - t_start, 1)
        record_property("security_e2e", figures)
        log.info("figures: %s", figures)
        assert not problems, "\n".join(problems)
        assert alive_at_end
        assert stop_s <= SIGTERM_BOUND, f"the daemon took {stop_s:.2f} s to stop on SIGTERM"
        assert code == 0, daemon.log()[-3000:]
        assert "Traceback" not in daemon.log()
        for leftover in [*(vm.socket for vm in vms), hostile_sock, admin]:
            assert not leftover.exists(), leftover
