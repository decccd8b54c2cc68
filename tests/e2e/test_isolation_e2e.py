"""Issue #12's proof, as far as it goes: one ``serve --config`` daemon with
``isolate = true``, two real QEMU guests (TCG) and a third device, each device
in a sandboxed process of its own. While both guests ping the host side of
their TAPs, the third device's process is killed with SIGKILL, then sent
SIGSEGV (as a crash would end it). After each: both guests lost no ping,
``ctl list`` and the metrics show the exit and its reason, and the third
socket serves a new client (a new process was started on it). Every device
process runs with no capabilities, no new privileges and its seccomp filter.
SIGTERM then stops the daemon and every device process within 2 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.device_fixtures import check_prerequisites
from tests.e2e.test_security_e2e import (
    SIGTERM_BOUND,
    Daemon,
    Vm,
    boot_guests,
    probe,
    start_ping,
    stop_ping,
)
from tests.harness.guest import GuestPaths
from tests.harness.metrics import scrape_text
from tests.harness.netns import NetNS, create_netns
from tests.harness.procstat import proc_status

VIRTIO_VENDOR = 0x1AF4
PHASE_S = 3.0


@pytest.fixture
def ns() -> Iterator[NetNS]:
    n = create_netns()
    try:
        for conf in ("all", "default"):
            n.run(["sysctl", "-qw", f"net.ipv6.conf.{conf}.disable_ipv6=1"], check=False)
        yield n
    finally:
        n.delete()


def ctl_list(admin: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-P", "-m", "vfiouser_net", "ctl", "--admin-socket", str(admin),
         "--json", "list"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    return {d["name"]: d for d in json.loads(out)["devices"]}


def test_device_processes_die_alone(ns: NetNS, tmp_path: Path) -> None:
    paths: GuestPaths = check_prerequisites()
    n = ns.index
    vms = [
        Vm("vm1", "tap-vm1", f"10.201.{n}.1", f"10.201.{n}.2", tmp_path / "vm1.sock",
           "52:54:00:0c:11:01"),
        Vm("vm2", "tap-vm2", f"10.201.{n}.65", f"10.201.{n}.66", tmp_path / "vm2.sock",
           "52:54:00:0c:11:02"),
    ]  # fmt: skip
    for vm in vms:
        ns.add_tap(vm.tap, address=f"{vm.host}/26")
    ns.add_tap("tap-third", address=None)
    third_sock = tmp_path / "third.sock"
    admin = tmp_path / "admin.sock"
    config = tmp_path / "vfiouser-net.toml"
    config.write_text(
        f'[daemon]\nadmin_socket = "{admin}"\nmetrics_addr = "127.0.0.1:0"\n'
        f'isolate = true\ncapture_dir = "{tmp_path}"\n'
        + "".join(
            f'\n[[device]]\nname = "{vm.name}"\nsocket = "{vm.socket}"\ntap = "{vm.tap}"\n'
            f'mac = "{vm.mac}"\n'
            for vm in vms
        )
        + f'\n[[device]]\nname = "third"\nsocket = "{third_sock}"\ntap = "tap-third"\n'
    )
    with contextlib.ExitStack() as stack:
        daemon = Daemon(ns, config, tmp_path / "daemon.log")
        stack.callback(daemon.kill)
        daemon.wait_paths([vm.socket for vm in vms] + [third_sock, admin])

        # Every device in a process of its own, sandboxed.
        devices = ctl_list(admin)
        pids = {name: d["process"]["pid"] for name, d in devices.items()}
        assert len(set(pids.values())) == 3 and daemon.pid not in pids.values(), pids
        for name, pid in pids.items():
            st = proc_status(pid)
            assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", (name, st)
            assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0, (name, st)

        boot_guests(vms, paths, tmp_path, stack)

        metrics_url = ""
        for _ in range(100):
            m = [ln for ln in daemon.log().splitlines() if "metrics on http" in ln]
            if m:
                metrics_url = m[-1].split("metrics on ", 1)[1].strip()
                break
            time.sleep(0.05)
        assert metrics_url, daemon.log()[-2000:]

        for number, sig in enumerate((signal.SIGKILL, signal.SIGSEGV), start=1):
            pings = {vm.name: start_ping(vm) for vm in vms}
            t0 = time.monotonic()
            victim = ctl_list(admin)["third"]["process"]["pid"]
            os.kill(victim, sig)
            # A new process on the same socket serves the next client.
            deadline = time.monotonic() + 20
            while True:
                third = ctl_list(admin)["third"]["process"]
                if third["pid"] != victim and third["exits"].get(sig.name) == 1:
                    break
                assert time.monotonic() < deadline, third
                time.sleep(0.1)
            assert third["restarts"] == number and third["last_exit"] == sig.name
            assert probe(third_sock) == VIRTIO_VENDOR
            time.sleep(max(0.0, t0 + PHASE_S - time.monotonic()))
            for vm in vms:
                figures = stop_ping(vm, pings[vm.name])
                assert figures.transmitted >= 5 and not figures.lost, (vm.name, sig, figures)
            # The guests' device processes were never touched.
            now = ctl_list(admin)
            for vm in vms:
                assert now[vm.name]["process"]["pid"] == pids[vm.name]
                assert now[vm.name]["process"]["restarts"] == 0
            page = scrape_text(ns, metrics_url)
            assert (
                f'vfiouser_net_device_process_exits_total{{device="third",reason="{sig.name}"}} 1.0'
                in page
            ), page[-3000:]
        assert f"its process {victim} ended (SIGSEGV)" in daemon.log()

        final = {name: d["process"]["pid"] for name, d in ctl_list(admin).items()}
        t0 = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.proc.wait(10)
        took = time.monotonic() - t0
        assert daemon.proc.returncode == 0, daemon.log()[-3000:]
        assert took <= SIGTERM_BOUND, f"the daemon took {took:.2f} s to stop"
        assert not still_alive(final), "device processes outlived the daemon"
        assert "Traceback" not in daemon.log()
        assert "sandbox refused" not in daemon.log(), daemon.log()[-3000:]


def still_alive(pids: dict[str, int]) -> list[int]:
    """The device processes still alive (none should be)."""
    alive = []
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 0)
            alive.append(pid)
    return alive
