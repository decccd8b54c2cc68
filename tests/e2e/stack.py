"""The end-to-end stack, one for every module that shares a booted guest: a
network namespace with a TAP (multi_queue when the device has more than one
pair), the ``vfiouser-net serve`` daemon on it configured by a StackConfig
(pairs, MAC, MTU, name, admin socket, notify mode), and the guests booted on
its socket. Everything is stopped and deleted by the module's ExitStack, also
when a test fails.

The modules add what they observe and how they bring the stack back to its
known state between tests (DeviceStack in device_fixtures.py, MQStack in
mq_fixtures.py, AdminStack in test_admin_e2e.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from vfiouser_net_harness import prereq
from vfiouser_net_harness.guest import Guest, GuestPaths, vfio_user_pci_args
from vfiouser_net_harness.netns import NetNS, Tap, create_netns
from vfiouser_net_harness.prereq import SETUP_HINT, VN_CACHE
from vfiouser_net_harness.server import Server

log = logging.getLogger(__name__)

GUEST_CPUS = 2


def require(ok: bool, what: str) -> None:
    """A prerequisite of the stack (the set-up provides it)."""
    prereq.require(ok, what, SETUP_HINT)


def _native_importable() -> bool:
    proc = subprocess.run(
        [sys.executable, "-c", "import vfiouser_net.native"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        log.warning("vfiouser_net.native: %s", proc.stderr.strip())
    return proc.returncode == 0


def check_prerequisites() -> GuestPaths:
    """Everything a stack needs; skip (or fail under CI) otherwise."""
    prereq.require_host_network("ip", "iperf3", "ss", "ping")
    paths = GuestPaths.from_cache(VN_CACHE)
    missing = paths.missing()
    require(not missing, f"missing {', '.join(map(str, missing))}")
    require(_native_importable(), f"vfiouser_net's C datapath does not import in {sys.executable}")
    return paths


@dataclass(frozen=True)
class StackConfig:
    """The daemon's device, as its command line gives it."""

    mac: str
    mtu: int = 1500
    queue_pairs: int = 1
    name: str = ""  # --name; "" for the daemon's default (the socket's name)
    socket_name: str = "vn.sock"
    # An admin socket (and a capture directory) in a world-searchable
    # directory, so that only the socket's own mode keeps other users out.
    admin: bool = False
    notify_mode: str = "message"
    tap_name: str = "vntap0"

    @property
    def multi_queue(self) -> bool:
        return self.queue_pairs > 1


class Stack:
    def __init__(
        self,
        config: StackConfig,
        ns: NetNS,
        tap: Tap,
        guest_paths: GuestPaths,
        workdir: Path,
        run_dir: Path,
        exits: contextlib.ExitStack,
    ) -> None:
        self.config = config
        self.ns = ns
        self.tap = tap
        self.guest_paths = guest_paths
        self.workdir = workdir  # the module's files: guests' consoles, daemon logs, captures
        self.run_dir = run_dir  # the sockets
        self.exits = exits
        self.server: Server | None = None
        self.guest: Guest | None = None
        self.servers_started = 0
        self.guests_started = 0

    @property
    def mac(self) -> str:
        return self.config.mac

    @property
    def socket_path(self) -> Path:
        return self.run_dir / self.config.socket_name

    @property
    def admin_socket(self) -> str:
        assert self.config.admin, "this stack's daemon has no admin socket"
        return str(self.run_dir / "admin.sock")

    @property
    def capture_dir(self) -> Path:
        """The daemon's --capture-dir: ctl capture names files in it."""
        return self.workdir / "captures"

    @property
    def guest_addr(self) -> str:
        return self.ns.guest_addr()

    @property
    def host_addr(self) -> str:
        return self.ns.host_addr

    # --- daemon -------------------------------------------------------------------------
    def daemon_args(self) -> list[str]:
        c = self.config
        args = ["--mac", c.mac, "--mtu", str(c.mtu), "--queue-pairs", str(c.queue_pairs)]
        if c.name:
            args += ["--name", c.name]
        if c.notify_mode != "message":
            args += ["--notify-mode", c.notify_mode]
        if c.admin:
            args += ["--admin-socket", self.admin_socket, "--capture-dir", str(self.capture_dir)]
        return args

    def start_server(self) -> Server:
        """Start the daemon in the namespace (the previous one must be gone)."""
        assert self.server is None or not self.server.alive()
        server = Server(
            self.socket_path, self.tap.name, netns=self.ns.name, extra_args=self.daemon_args()
        )
        self.server = server
        self.servers_started += 1
        # Stopped (SIGTERM, then SIGKILL) when the module ends, whatever happens.
        self.exits.callback(self._stop_server, server, self.servers_started)
        server.start()
        log.info("daemon pid %s, log %s", server.proc.pid if server.proc else "?", server.log_path)
        if self.config.admin:
            deadline = time.monotonic() + 20
            while not os.path.exists(self.admin_socket):
                assert server.alive(), f"daemon exited:\n{server.log()}"
                assert time.monotonic() < deadline, f"no admin socket:\n{server.log()}"
                time.sleep(0.05)
        return server

    def _stop_server(self, server: Server, number: int) -> None:
        """Stop the daemon; its log moves into the module's directory."""
        if server.alive():
            log.info("daemon stopped at teardown: exit %s", server.stop())
        kept = self.workdir / f"daemon{number}.log"
        with contextlib.suppress(OSError):
            shutil.move(server.log_path, kept)
            log.info("daemon log %s (tail):\n%s", kept, kept.read_text(errors="replace")[-3000:])

    def require_server(self) -> Server:
        assert self.server is not None and self.server.alive(), "the daemon is not running:\n" + (
            self.server.log()[-4000:] if self.server else ""
        )
        return self.server

    def daemon_pid(self) -> int:
        proc = self.require_server().proc
        assert proc is not None
        return proc.pid

    # --- guests -------------------------------------------------------------------------
    def start_guest(
        self,
        name: str,
        *,
        socket_path: Path | None = None,
        cpus: int = GUEST_CPUS,
        cmdline_extra: str = "",
    ) -> Guest:
        """Boot a guest whose only NIC is vfio-user-pci on the daemon's socket
        (or socket_path); stopped when the module ends."""
        self.guests_started += 1
        guest = Guest(
            paths=self.guest_paths,
            cpus=cpus,
            extra_args=vfio_user_pci_args(socket_path or self.socket_path, "vn0"),
            cmdline_extra=cmdline_extra,
            workdir=self.workdir / name,
            name=name,
        )
        self.exits.callback(guest.close)
        guest.start()
        log.info(
            "%s booted in %.1f s; console %s", name, guest.boot_seconds or 0, guest.console_log
        )
        return guest

    def require_guest(self) -> Guest:
        assert self.guest is not None and self.guest.alive, "no guest running"
        return self.guest


S = TypeVar("S", bound=Stack)


@contextlib.contextmanager
def open_stack(cls: type[S], config: StackConfig, workdir: Path) -> Iterator[S]:
    """A stack of class cls (namespace and TAP; no daemon or guest yet),
    deleted with everything started on it when the block ends."""
    paths = check_prerequisites()
    with contextlib.ExitStack() as exits:
        run_dir = workdir
        if config.admin:
            run_dir = Path(tempfile.mkdtemp(prefix="vn-admin-", dir="/tmp"))
            exits.callback(shutil.rmtree, run_dir, True)
            run_dir.chmod(0o755)
        ns = create_netns()
        exits.callback(ns.delete)  # last: after the daemons and the guests
        # Only the traffic the tests send: no IPv6 autoconfiguration on the TAP.
        for key in ("all", "default"):
            ns.run(["sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"], check=False)
        tap = ns.add_tap(config.tap_name, multi_queue=config.multi_queue)
        stack = cls(config, ns, tap, paths, workdir, run_dir, exits)
        if config.admin:
            stack.capture_dir.mkdir(mode=0o750)
        yield stack
        log.info(
            "%s used %d daemon(s) and %d guest boot(s)",
            cls.__name__,
            stack.servers_started,
            stack.guests_started,
        )
