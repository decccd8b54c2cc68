"""Fixtures for the end-to-end tests of our vfio-user virtio-net device.

One *stack* per test module: a fresh network namespace holding a TAP with the
host-side address (10.201.N.1/24), the ``vfiouser-net serve`` daemon attached
to that TAP inside the namespace (with a fixed ``--mac`` and a non-default
``--mtu``), and one QEMU guest whose only NIC is ``vfio-user-pci`` on the
daemon's socket, configured with 10.201.N.2/24 on eth0.

The stack is shared by the tests of a module to keep the number of guest
boots (the slow part under TCG) down. Each test asks for :func:`stack`,
which first puts the stack back into its known state (daemon running, guest
running, eth0 with the configured MAC, not promiscuous, addressed and with
carrier, TAP up) and rebuilds the part that a previous test broke or used up
(a killed QEMU, a stopped daemon). Everything is stopped and deleted at the
end of the module, also when a test fails, by an ExitStack.

Import the fixtures into the test module (``from tests.e2e.device_fixtures
import device_stack_fixture, stack_fixture``). When CI=true a missing prerequisite fails the
tests instead of skipping them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from vfiouser_net_harness import prereq
from vfiouser_net_harness.guest import Guest, GuestError, GuestPaths, vfio_user_pci_args
from vfiouser_net_harness.netns import NetNS, Tap, create_netns
from vfiouser_net_harness.prereq import SETUP_HINT, VN_CACHE
from vfiouser_net_harness.server import Server

log = logging.getLogger(__name__)


DEVICE_MAC = "52:54:00:5e:a1:01"
DEVICE_MTU = 1400  # not the default 1500, so that the guest must read it from the device
VIRTIO_VENDOR = "0x1af4"
VIRTIO_NET_MODERN = "0x1041"
TAP_NAME = "vntap0"
GUEST_CPUS = 2

_PING_RE = re.compile(
    r"(\d+) packets transmitted, (\d+) packets received, (?:\+\d+ duplicates, )?(\d+)% packet loss"
)


def require(ok: bool, what: str) -> None:
    """A prerequisite of the device stack (the set-up provides it)."""
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
    """Everything the device stack needs; skip (or fail under CI) otherwise."""
    require(os.geteuid() == 0, "needs root (network namespaces, TAP devices)")
    for tool in ("ip", "iperf3", "ss", "ping"):
        require(shutil.which(tool) is not None, f"{tool} not installed")
    require(Path("/dev/net/tun").exists(), "/dev/net/tun missing")
    paths = GuestPaths.from_cache(VN_CACHE)
    missing = paths.missing()
    require(not missing, f"missing {', '.join(map(str, missing))}")
    require(_native_importable(), f"vfiouser_net's C datapath does not import in {sys.executable}")
    return paths


@dataclass(frozen=True)
class PingResult:
    transmitted: int
    received: int
    loss_percent: int
    output: str

    @classmethod
    def parse(cls, output: str) -> PingResult:
        m = _PING_RE.search(output)
        if m is None:
            raise AssertionError(f"no ping summary in:\n{output}")
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)), output)

    @property
    def lossless(self) -> bool:
        return self.transmitted > 0 and self.received == self.transmitted


@dataclass
class DeviceStack:
    """netns + TAP + daemon + guest; see the module docstring."""

    ns: NetNS
    tap: Tap
    guest_paths: GuestPaths
    workdir: Path
    exits: contextlib.ExitStack
    mac: str = DEVICE_MAC
    mtu: int = DEVICE_MTU
    server: Server | None = None
    guest: Guest | None = None
    pci_addr: str = ""
    servers_started: int = 0
    guests_started: int = 0
    old_guests: list[Guest] = field(default_factory=list)

    @property
    def socket_path(self) -> Path:
        return self.workdir / "vn.sock"

    @property
    def guest_addr(self) -> str:
        return self.ns.guest_addr()

    @property
    def host_addr(self) -> str:
        return self.ns.host_addr

    # --- daemon --------------------------------------------------------------
    def start_server(self) -> Server:
        """Start the daemon in the namespace (the previous one must be gone)."""
        assert self.server is None or not self.server.alive()
        server = Server(
            self.socket_path,
            self.tap.name,
            netns=self.ns.name,
            extra_args=["--mac", self.mac, "--mtu", str(self.mtu)],
        )
        self.server = server
        self.servers_started += 1
        # Stopped (SIGTERM, then SIGKILL) when the module ends, whatever happens.
        self.exits.callback(self._stop_server, server)
        server.start()
        log.info("daemon pid %s, log %s", server.proc.pid if server.proc else "?", server.log_path)
        return server

    @staticmethod
    def _stop_server(server: Server) -> None:
        if server.alive():
            code = server.stop()
            log.info("daemon stopped at teardown: exit %s", code)
        log.info("daemon log %s (tail):\n%s", server.log_path, server.log()[-3000:])

    def require_server(self) -> Server:
        assert self.server is not None, "no daemon started"
        return self.server

    # --- guest ------------------------------------------------------------------
    def boot_guest(self) -> Guest:
        """Boot a new guest on the daemon's socket and configure eth0."""
        if self.guest is not None:
            self.guest.close()
            self.old_guests.append(self.guest)
        self.guests_started += 1
        name = f"guest{self.guests_started}"
        guest = Guest(
            paths=self.guest_paths,
            cpus=GUEST_CPUS,
            extra_args=vfio_user_pci_args(self.socket_path, "vn0"),
            workdir=self.workdir / name,
            name=name,
        )
        self.exits.callback(guest.close)
        self.guest = guest
        guest.start()
        log.info(
            "%s booted in %.1f s; console %s", name, guest.boot_seconds or 0, guest.console_log
        )
        self.pci_addr = self.find_pci_addr()
        self.configure_guest()
        return guest

    def require_guest(self) -> Guest:
        assert self.guest is not None and self.guest.alive, "no guest running"
        return self.guest

    def find_pci_addr(self) -> str:
        """The guest's PCI address of the device (vendor 0x1af4, device 0x1041)."""
        out = self.require_guest().check(
            "for d in /sys/bus/pci/devices/*; do "
            f'[ "$(cat $d/vendor):$(cat $d/device)" = {VIRTIO_VENDOR}:{VIRTIO_NET_MODERN} ] '
            "&& echo ${d##*/}; done; true"
        )
        addrs = out.split()
        assert len(addrs) == 1, f"expected one virtio-net (1af4:1041) PCI device, found {addrs}"
        return addrs[0]

    def configure_guest(self) -> None:
        """Idempotently give eth0 its configured MAC, no promisc, the address, up."""
        guest = self.require_guest()
        guest.check(
            f"ip link set eth0 promisc off && ip link set eth0 address {self.mac} && "
            f"ip addr flush dev eth0 && "
            f"ip addr add {self.guest_addr}/{self.ns.prefix_len} dev eth0 && "
            "ip link set eth0 up"
        )
        self.wait_carrier(True)

    def wait_carrier(self, up: bool, timeout: float = 20.0) -> None:
        want = "1" if up else "0"
        self.require_guest().wait_until(
            f'[ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" = {want} ]',
            timeout=timeout,
            interval=0.2,
        )

    def guest_state_ok(self) -> bool:
        """Is the guest in the state configure_guest() leaves it in?"""
        guest = self.guest
        if guest is None or not guest.alive:
            return False
        try:
            code, out = guest.run(
                "cat /sys/class/net/eth0/address /sys/class/net/eth0/carrier "
                "/sys/class/net/eth0/flags && ip -4 addr show dev eth0",
                timeout=30,
            )
        except GuestError as exc:
            log.warning("guest health check failed: %s", exc)
            return False
        lines = out.split("\n")
        if code != 0 or len(lines) < 3:
            return False
        flags = int(lines[2].strip(), 16)
        promisc = bool(flags & 0x100)  # IFF_PROMISC
        return (
            lines[0].strip() == self.mac
            and lines[1].strip() == "1"
            and not promisc
            and f"inet {self.guest_addr}/" in out
        )

    def ensure_ready(self) -> None:
        """Bring the stack back to its known state, rebuilding what is gone."""
        self.ns.ip("link", "set", self.tap.name, "up")
        if self.server is None or not self.server.alive():
            if self.server is not None:
                log.info("daemon is gone (exit %s); starting a new one", self.server.returncode)
            if self.guest is not None:
                self.guest.close()  # its vfio-user connection died with the daemon
            self.start_server()
            self.boot_guest()
            return
        if self.guest is None or not self.guest.alive:
            self.boot_guest()
            return
        if self.guest_state_ok():
            return
        log.info("guest eth0 not in its initial state; reconfiguring")
        try:
            code, _ = self.guest.run("test -e /sys/class/net/eth0", timeout=30)
            if code != 0:  # e.g. a rebind test stopped with the driver unbound
                self.guest.run(
                    f"echo {self.pci_addr} > /sys/bus/pci/drivers/virtio-pci/bind", timeout=30
                )
            self.configure_guest()
        except (GuestError, AssertionError) as exc:
            log.warning("reconfiguring failed (%s); booting a new guest", exc)
            self.boot_guest()

    # --- traffic ------------------------------------------------------------------
    def ping_host(self, count: int = 20, interval: float = 0.2, timeout: float = 60) -> PingResult:
        """Ping the host side of the TAP from the guest."""
        _, out = self.require_guest().run(
            f"ping -c {count} -i {interval} -W 5 {self.host_addr}", timeout=timeout
        )
        result = PingResult.parse(out)
        log.info(
            "guest ping %s: %d/%d received", self.host_addr, result.received, result.transmitted
        )
        return result

    def rx_packets(self) -> int:
        return int(self.require_guest().check("cat /sys/class/net/eth0/statistics/rx_packets"))


@pytest.fixture(scope="module", name="device_stack")
def device_stack_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeviceStack]:
    """The module's shared stack (daemon + guest booted); torn down at the end."""
    paths = check_prerequisites()
    workdir = tmp_path_factory.mktemp("vn-device")
    with contextlib.ExitStack() as exits:
        ns = create_netns()
        exits.callback(ns.delete)  # after the daemon and guests (LIFO)
        # Only traffic that the tests send: no IPv6 autoconfiguration noise on the TAP.
        ns.run(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"], check=False)
        ns.run(["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"], check=False)
        tap = ns.add_tap(TAP_NAME)
        stack = DeviceStack(ns=ns, tap=tap, guest_paths=paths, workdir=workdir, exits=exits)
        stack.start_server()
        stack.boot_guest()
        yield stack
        log.info(
            "stack used %d daemon(s) and %d guest boot(s)",
            stack.servers_started,
            stack.guests_started,
        )


@pytest.fixture(name="stack")
def stack_fixture(device_stack: DeviceStack) -> Iterator[DeviceStack]:
    """The shared stack, in its known state at the start of the test."""
    t0 = time.monotonic()
    device_stack.ensure_ready()
    server = device_stack.require_server()
    log.info(
        "stack ready in %.1f s: netns %s, daemon log %s, guest console %s",
        time.monotonic() - t0,
        device_stack.ns.name,
        server.log_path,
        device_stack.guest.console_log if device_stack.guest else None,
    )
    yield device_stack
