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

The stack itself (namespace, TAP, daemon, guests) is tests/e2e/stack.py's,
configured by DEVICE_CONFIG; this module adds the guest's configuration and
the checks of its state. Import the fixtures into the test module (``from
tests.e2e.device_fixtures import device_stack_fixture, stack_fixture``). When
CI=true a missing prerequisite fails the tests instead of skipping them.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from vfiouser_net_harness.guest import Guest, GuestError

from tests.e2e.stack import Stack, StackConfig, open_stack

log = logging.getLogger(__name__)


DEVICE_MAC = "52:54:00:5e:a1:01"
DEVICE_MTU = 1400  # not the default 1500, so that the guest must read it from the device
VIRTIO_VENDOR = "0x1af4"
VIRTIO_NET_MODERN = "0x1041"
TAP_NAME = "vntap0"

_PING_RE = re.compile(
    r"(\d+) packets transmitted, (\d+) packets received, (?:\+\d+ duplicates, )?(\d+)% packet loss"
)


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


DEVICE_CONFIG = StackConfig(mac=DEVICE_MAC, mtu=DEVICE_MTU, tap_name=TAP_NAME)


class DeviceStack(Stack):
    """The stack of DEVICE_CONFIG; see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mtu = self.config.mtu
        self.pci_addr = ""
        self.old_guests: list[Guest] = []

    # --- guest ------------------------------------------------------------------
    def boot_guest(self) -> Guest:
        """Boot a new guest on the daemon's socket and configure eth0."""
        if self.guest is not None:
            self.guest.close()
            self.old_guests.append(self.guest)
        self.guest = self.start_guest(f"guest{self.guests_started + 1}")
        self.pci_addr = self.find_pci_addr()
        self.configure_guest()
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
    workdir = tmp_path_factory.mktemp("vn-device")
    with open_stack(DeviceStack, DEVICE_CONFIG, workdir) as stack:
        stack.start_server()
        stack.boot_guest()
        yield stack


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
