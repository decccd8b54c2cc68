"""Issue #12's proof: one ``serve --config`` daemon with ``isolate = true``,
two real QEMU guests (TCG) and a third device, each device in a sandboxed
process of its own. While both guests ping the host side of their TAPs, the
third device's process is ended five ways: SIGKILL; SIGSEGV (as a crash would
end it); made to allocate past its memory budget (gdb calls malloc in it, as a
leak would); made to hold more files than its budget (a vfio-user client maps
16 DMA regions, each with an fd of its own); and stopped (SIGSTOP), which the
supervisor's health check must find hung and kill. After each: both guests
lost no ping, ``ctl list`` and the metrics show the exit and its reason, and
the third socket serves a new client (a new process started on it).

Also: every device process runs with no capabilities, no new privileges and
its seccomp filter, and a forbidden system call made in it (gdb calls
syscall(SYS_ptrace)) fails with EPERM, is logged, and the process lives on;
``ctl add`` starts a device in a process of its own too; ``ctl capture``
through the supervisor writes the device process's frames. SIGTERM then stops
the daemon and every device process within 2 s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from vfiouser_net_harness.guest import GuestPaths
from vfiouser_net_harness.metrics import scrape_text
from vfiouser_net_harness.netns import NetNS
from vfiouser_net_harness.procstat import proc_status
from vfiouser_net_harness.vfio_user_client import VfioUserClient, VfioUserError

from tests.e2e.stack import check_prerequisites
from tests.e2e.test_security_e2e import (
    SIGTERM_BOUND,
    Daemon,
    Vm,
    boot_guests,
    probe,
    start_ping,
    stop_ping,
)
from vfiouser_net.capture import PCAP_MAGIC_NS

log = logging.getLogger(__name__)

VIRTIO_VENDOR = 0x1AF4
PHASE_S = 3.0
# The third device's budget: its idle process holds about 13 files and 16 MiB
# of private memory; a client's 16 DMA regions take 17 more files.
THIRD_NOFILE = 24
THIRD_MEMORY_MIB = 48
SYS_PTRACE = 101
EPERM = 1


def ctl_list(admin: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-P", "-m", "vfiouser_net", "ctl", "--admin-socket", str(admin),
         "--json", "list"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    return {d["name"]: d for d in json.loads(out)["devices"]}


def test_device_processes_die_alone(ns: NetNS, tmp_path: Path) -> None:
    paths: GuestPaths = check_prerequisites()
    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.fail("gdb is needed (scripts/setup/apt.sh installs it)")
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
    ns.add_tap("tap-added", address=None)
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
        f"nofile = {THIRD_NOFILE}\nmemory_max = {THIRD_MEMORY_MIB}\n"
    )
    with contextlib.ExitStack() as stack:
        daemon = Daemon(ns, config, tmp_path / "daemon.log")
        stack.callback(daemon.kill)
        daemon.wait_paths([vm.socket for vm in vms] + [third_sock, admin])

        # Every device in a process of its own, sandboxed, within its budget.
        devices = ctl_list(admin)
        pids = {name: d["process"]["pid"] for name, d in devices.items()}
        assert len(set(pids.values())) == 3 and daemon.pid not in pids.values(), pids
        for name, pid in pids.items():
            assert_sandboxed(name, pid)
        limits = Path(f"/proc/{pids['third']}/limits").read_text()
        assert re.search(rf"Max open files\s+{THIRD_NOFILE + 64}\s", limits), limits

        # A forbidden system call in a device process: refused, logged, survived.
        out = gdb_call(gdb, pids["third"], f"(long)syscall({SYS_PTRACE}, 0, 0, 0, 0)",
                       "*(int*)__errno_location()")  # fmt: skip
        assert out == [-1, EPERM], out
        wait_for(lambda: f"sandbox refused system call {SYS_PTRACE}" in daemon.log(), 5)
        assert ctl_list(admin)["third"]["process"] == devices["third"]["process"]

        # ctl add: a device of its own process too, with its budget.
        added = ctl(admin, "add", "--socket", str(tmp_path / "added.sock"), "--tap", "tap-added",
                    "--name", "added", "--nofile", "100")  # fmt: skip
        added_pid = added["process"]["pid"]
        assert added_pid not in pids.values() and added_pid != daemon.pid, added
        assert_sandboxed("added", added_pid)
        assert "Max open files            164" in Path(f"/proc/{added_pid}/limits").read_text()
        ctl(admin, "remove", "added")
        wait_for(lambda: not still_alive({"added": added_pid}), 10)

        boot_guests(vms, paths, tmp_path, stack)

        metrics_url = ""
        for _ in range(100):
            m = [ln for ln in daemon.log().splitlines() if "metrics on http" in ln]
            if m:
                metrics_url = m[-1].split("metrics on ", 1)[1].strip()
                break
            time.sleep(0.05)
        assert metrics_url, daemon.log()[-2000:]

        # ctl capture through the supervisor: the device process writes it.
        pings = {vm.name: start_ping(vm) for vm in vms}
        cap = ctl(admin, "capture", "vm1", "--file", "vm1.pcap", "--count", "4")  # fmt: skip
        for vm in vms:
            stop_ping(vm, pings[vm.name])
        pcap = (tmp_path / "vm1.pcap").read_bytes()
        assert cap["frames"] >= 4 and pcap[:4] == PCAP_MAGIC_NS.to_bytes(4, "little"), (
            cap,
            pcap[:24],
        )

        endings: list[tuple[str, Callable[[int], None]]] = [
            ("SIGKILL", lambda pid: os.kill(pid, signal.SIGKILL)),
            ("SIGSEGV", lambda pid: os.kill(pid, signal.SIGSEGV)),
            ("memory", lambda pid: allocate(gdb, pid, (THIRD_MEMORY_MIB + 32) << 20)),
            ("nofile", lambda pid: hold_files(third_sock, 16)),
            ("hang", lambda pid: os.kill(pid, signal.SIGSTOP)),
        ]
        for number, (reason, end_it) in enumerate(endings, start=1):
            pings = {vm.name: start_ping(vm) for vm in vms}
            t0 = time.monotonic()
            victim = ctl_list(admin)["third"]["process"]["pid"]
            end_it(victim)
            # A new process on the same socket serves the next client (the
            # restart delay doubles with each quick death: 8 s at the fifth).
            deadline = time.monotonic() + 40
            while True:
                third = ctl_list(admin)["third"]["process"]
                if third["pid"] != victim and third["exits"].get(reason) == 1:
                    break
                assert time.monotonic() < deadline, (reason, third, daemon.log()[-3000:])
                time.sleep(0.2)
            assert third["restarts"] == number and third["last_exit"] == reason, third
            assert not still_alive({"victim": victim})
            assert probe(third_sock) == VIRTIO_VENDOR
            time.sleep(max(0.0, t0 + PHASE_S - time.monotonic()))
            for vm in vms:
                figures = stop_ping(vm, pings[vm.name])
                assert figures.transmitted >= 5 and not figures.lost, (vm.name, reason, figures)
            # The guests' device processes were never touched.
            now = ctl_list(admin)
            for vm in vms:
                assert now[vm.name]["process"]["pid"] == pids[vm.name]
                assert now[vm.name]["process"]["restarts"] == 0
            page = scrape_text(ns, metrics_url)
            assert (
                f'vfiouser_net_device_process_exits_total{{device="third",reason="{reason}"}} 1.0'
                in page
            ), page[-3000:]
            log.info("third device's process ended by %s: replaced in %.1f s", reason,
                     time.monotonic() - t0)  # fmt: skip
        text = daemon.log()
        assert "over its budget (" in text and "MiB of private memory, budget 48 MiB" in text
        assert f"open files, budget {THIRD_NOFILE}" in text
        assert "killing it as hung" in text

        final = {name: d["process"]["pid"] for name, d in ctl_list(admin).items()}
        t0 = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.proc.wait(10)
        took = time.monotonic() - t0
        assert daemon.proc.returncode == 0, daemon.log()[-3000:]
        assert took <= SIGTERM_BOUND, f"the daemon took {took:.2f} s to stop"
        assert not still_alive(final), "device processes outlived the daemon"
        assert "Traceback" not in daemon.log()
        # The one refusal is the system call gdb made.
        refused = re.findall(r"sandbox refused system call (\d+)", daemon.log())
        assert refused == [str(SYS_PTRACE)], refused


def assert_sandboxed(name: str, pid: int) -> None:
    st = proc_status(pid)
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", (name, st)
    assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0, (name, st)
    assert int(st["CapBnd"], 16) == 0 and int(st["CapAmb"], 16) == 0, (name, st)


def ctl(admin: Path, *argv: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-P", "-m", "vfiouser_net", "ctl", "--admin-socket", str(admin),
         "--json", *argv],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, (argv, out.stdout, out.stderr)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def wait_for(cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# gdb's word for a process that ended inside the function it called.
GDB_CALLEE_EXITED = "exited while in a function called from GDB"


def gdb_call(gdb: str, pid: int, *exprs: str, may_end: bool = False) -> list[int]:
    """Call expressions in a process, as its own code would (gdb attaches,
    calls, detaches); their values. SIGSYS is the sandbox's, passed on to it.
    With may_end, the process may end inside a call (no value then)."""
    argv = [gdb, "-p", str(pid), "-batch", "-nx", "-ex", "handle SIGSYS nostop noprint pass"]
    for e in exprs:
        argv += ["-ex", f"print {e}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    values = re.findall(r"^\$\d+ = (?:\([^)]*\) )?(-?(?:0x)?[0-9a-f]+)", out.stdout, re.M)
    if may_end and GDB_CALLEE_EXITED in out.stdout + out.stderr:
        return [int(v, 0) for v in values]
    assert len(values) == len(exprs), (out.stdout[-2000:], out.stderr[-2000:])
    return [int(v, 0) for v in values]


def allocate(gdb: str, pid: int, size: int) -> None:
    """A leak in the process: size bytes allocated and written. The budget
    watchdog (every 0.2 s) may end the process while memset still writes:
    what ended it is checked by the caller, from the supervisor's count."""
    ptrs = gdb_call(gdb, pid, f"(long)memset((void*)malloc({size}), 1, {size})", may_end=True)
    assert all(ptr != 0 for ptr in ptrs)


def hold_files(socket_path: Path, regions: int) -> None:
    """A client that maps DMA regions, each with a file of its own (the
    device keeps each region's fd), and stays until the device ends."""
    with VfioUserClient(socket_path, timeout=5.0, connect_timeout=10.0) as c:
        c.negotiate()
        with contextlib.ExitStack() as fds:
            try:
                for i in range(regions):
                    fd = os.memfd_create(f"region{i}")
                    fds.callback(os.close, fd)
                    os.ftruncate(fd, 1 << 16)
                    c.dma_map(i << 20, 1 << 16, fd)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # until the device hangs up
                    c.config_read16(0)
                    time.sleep(0.1)
            except (VfioUserError, OSError):
                return


def still_alive(pids: dict[str, int]) -> list[int]:
    """The processes still alive (none should be)."""
    alive = []
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 0)
            alive.append(pid)
    return alive
