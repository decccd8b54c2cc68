"""Shared pieces of the protocol tests: a vfiouser-net daemon in its own
network namespace, a raw packet port on its TAP, and a test-driven guest.

Each test gets a fresh namespace with TAP ``vntap0`` (IPv6 off so the kernel
stays quiet), a daemon serving a short socket path under /tmp, and an
AF_PACKET socket on the TAP opened *inside* the namespace (a short helper
process under ``ip netns exec`` opens it and passes the fd back), so the test
can inject frames towards the device and capture what the device transmits.
Nothing leaves the namespace.

The daemon has no admin channel yet: its counters are observed through the
log lines it writes ("guest error <reason> (counted)", "device needs reset:
...") with :meth:`DeviceEnv.wait_log`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfiouser_net_harness.guest_memory import GuestMemory
from vfiouser_net_harness.netns import NetNS, Tap, netns
from vfiouser_net_harness.prereq import require, require_host_network
from vfiouser_net_harness.server import Server
from vfiouser_net_harness.vfio_user_client import VfioUserClient
from vfiouser_net_harness.virtio_pci_driver import (
    DEFAULT_NET_FEATURES,
    VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_RX,
    SplitQueue,
    UsedElem,
    VirtioNetDriver,
    VirtioTimeout,
    bit,
)

log = logging.getLogger(__name__)


TAP_NAME = "vntap0"
GUEST_MAC = bytes.fromhex("02766e000001")
PEER_MAC = bytes.fromhex("02766e0000fe")
BROADCAST = b"\xff" * 6
ETH_P_ALL = 0x0003
ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
# IEEE 802 "local experimental" ethertype: the kernel ignores such frames.
ETH_P_TEST = 0x88B5
PACKET_OUTGOING = 4

GUEST_FEATURES = DEFAULT_NET_FEATURES | bit(VIRTIO_NET_F_CTRL_RX) | bit(VIRTIO_NET_F_CTRL_MAC_ADDR)
GUEST_MEM_SIZE = 8 << 20


def check_prerequisites() -> None:
    require_host_network("ip")
    try:
        import vfiouser_net.native  # noqa: F401
    except Exception as e:  # ImportError, or the native module failing to load
        require(False, f"vfiouser_net not importable by {sys.executable}: {e}")


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


# --------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------


def eth_frame(dst: bytes, src: bytes, ethertype: int, payload: bytes, size: int = 60) -> bytes:
    frame = dst + src + struct.pack("!H", ethertype) + payload
    return frame.ljust(size, b"\0")


def tagged_frame(dst: bytes, tag: bytes, src: bytes = PEER_MAC, size: int = 60) -> bytes:
    """A frame of the test ethertype carrying ``tag`` (the kernel ignores it)."""
    return eth_frame(dst, src, ETH_P_TEST, b"VNT:" + tag + b":", size)


def has_tag(frame: bytes, tag: bytes) -> bool:
    return (
        len(frame) >= 14
        and struct.unpack_from("!H", frame, 12)[0] == ETH_P_TEST
        and frame[14:].startswith(b"VNT:" + tag + b":")
    )


# --------------------------------------------------------------------------
# Raw packet port on the TAP, inside the namespace
# --------------------------------------------------------------------------

_OPEN_PACKET_SOCKET = """
import socket, sys
ifname, fd = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind((ifname, 0x0003))
socket.send_fds(socket.socket(fileno=fd), [b"ok"], [s.fileno()])
"""


def open_packet_socket(ns: NetNS, ifname: str) -> socket.socket:
    """An AF_PACKET socket bound to ``ifname`` in ``ns`` (made there, used here)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        argv = ns.exec_argv(
            [sys.executable, "-c", _OPEN_PACKET_SOCKET, ifname, str(child.fileno())]
        )
        proc = subprocess.run(
            argv, pass_fds=(child.fileno(),), capture_output=True, text=True, timeout=20
        )
        if proc.returncode != 0:
            raise RuntimeError(f"opening a packet socket in {ns.name} failed: {proc.stderr}")
        child.close()
        parent.settimeout(5)
        _, fds, _, _ = socket.recv_fds(parent, 16, 1)
        if not fds:
            raise RuntimeError("no packet socket fd received")
        return socket.socket(fileno=fds[0])
    finally:
        parent.close()
        child.close()


class TapPort:
    """Inject frames into the TAP (towards the device) and capture its output."""

    def __init__(self, ns: NetNS, ifname: str = TAP_NAME) -> None:
        self.sock = open_packet_socket(ns, ifname)
        self.sock.setblocking(False)

    def close(self) -> None:
        self.sock.close()

    def send(self, frame: bytes) -> None:
        """The frame leaves the host side of the TAP: the device receives it.

        Retried for a while on ENETDOWN (the TAP was just set up again).
        """
        deadline = time.monotonic() + 3
        while True:
            try:
                self.sock.send(frame)
                return
            except OSError as e:
                if e.errno != errno.ENETDOWN or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def drain(self) -> int:
        n = 0
        while True:
            try:
                self.sock.recv(65536)
            except BlockingIOError:
                return n
            n += 1

    def recv(self, match: Callable[[bytes], bool], timeout: float = 3.0) -> bytes | None:
        """First frame sent by the device (not by the host) that ``match``es."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            r, _, _ = select.select([self.sock], [], [], remaining)
            if not r:
                return None
            try:
                data, addr = self.sock.recvfrom(65536)
            except BlockingIOError:
                continue
            if addr[2] == PACKET_OUTGOING:
                continue
            if match(data):
                return data


# --------------------------------------------------------------------------
# The daemon under test
# --------------------------------------------------------------------------


@dataclass
class DeviceEnv:
    ns: NetNS
    tap: Tap
    server: Server
    socket_path: Path
    mac: bytes
    port: TapPort
    clients: list[VfioUserClient] = field(default_factory=list)
    stopped: bool = False
    final_log: str | None = None

    def connect(self, timeout: float = 5.0) -> VfioUserClient:
        """A new negotiated vfio-user connection (closed at the end of the test)."""
        c = VfioUserClient(self.socket_path, timeout=timeout)
        self.clients.append(c)
        c.negotiate()
        return c

    def log(self) -> str:
        """The daemon's log so far (kept after the log file is removed)."""
        if self.final_log is not None:
            return self.final_log
        return self.server.log()

    def wait_log(self, pattern: str, timeout: float = 5.0, count: int = 1) -> list[str]:
        """Wait until ``count`` log lines match the regex; returns them."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            lines = [ln for ln in self.log().splitlines() if rx.search(ln)]
            if len(lines) >= count:
                return lines
            if not self.server.alive():
                raise AssertionError(f"server died waiting for {pattern!r}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{count} log line(s) matching {pattern!r} expected, got {len(lines)}:\n"
                    f"{self.log()[-3000:]}"
                )
            time.sleep(0.02)

    def log_count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for ln in self.log().splitlines() if rx.search(ln))

    def assert_alive(self) -> None:
        assert self.server.alive(), f"server exited:\n{self.log()[-3000:]}"

    def counters(self, timeout: float = 5.0) -> dict[str, Any]:
        """The daemon's counters now: SIGUSR2 makes it log them as JSON."""
        rx = re.compile(r": counters (\{.*)$")
        before = sum(1 for ln in self.log().splitlines() if rx.search(ln))
        assert self.server.proc is not None
        os.kill(self.server.proc.pid, signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while True:
            found = [m.group(1) for ln in self.log().splitlines() if (m := rx.search(ln))]
            if len(found) > before:
                try:
                    counters: dict[str, Any] = json.loads(found[-1])
                    return counters
                except json.JSONDecodeError:
                    pass  # the line is still being written
            if time.monotonic() > deadline:
                raise AssertionError(f"no counters logged on SIGUSR2:\n{self.log()[-2000:]}")
            time.sleep(0.02)

    def final_counters(self) -> dict[str, Any]:
        """Stop the daemon (SIGTERM, must exit 0) and return the counters it
        logs on the way out ("final counters {json}"): the only way to read
        them until the daemon has an admin channel. Ends the device's life
        for this test."""
        for c in self.clients:
            c.close()
        rc = self.server.stop(timeout=5)
        self.stopped = True
        assert rc == 0, f"server exited {rc} on SIGTERM:\n{self.log()[-3000:]}"
        lines = [ln for ln in self.log().splitlines() if "final counters " in ln]
        assert lines, f"no final counters logged:\n{self.log()[-3000:]}"
        counters: dict[str, Any] = json.loads(lines[-1].split("final counters ", 1)[1])
        return counters

    def set_link(self, up: bool) -> None:
        self.ns.ip("link", "set", self.tap.name, "up" if up else "down")


@contextlib.contextmanager
def device_env(
    mac: bytes = GUEST_MAC,
    extra_args: Sequence[str] = (),
    *,
    multi_queue: bool = False,
) -> Iterator[DeviceEnv]:
    """Namespace + TAP + daemon + packet port, all removed on the way out.

    On exit the daemon must still be running and stop cleanly on SIGTERM.
    The daemon's log is logged when the block raised.
    """
    workdir = Path(tempfile.mkdtemp(prefix="vnp-"))
    sock = workdir / "dev.sock"
    try:
        with netns() as ns:
            # No IPv6 on the TAP: no router solicitations or MLD reports
            # arriving on the device's rx queue in the middle of a test.
            for conf in ("all", "default"):
                ns.run(["sysctl", "-qw", f"net.ipv6.conf.{conf}.disable_ipv6=1"], check=False)
            tap = ns.add_tap(TAP_NAME, multi_queue=multi_queue)
            server = Server(
                sock, TAP_NAME, netns=ns.name, extra_args=["--mac", mac_str(mac), *extra_args]
            )
            server.start()
            port: TapPort | None = None
            env: DeviceEnv | None = None
            ok = False
            try:
                port = TapPort(ns)
                env = DeviceEnv(ns, tap, server, sock, mac, port)
                yield env
                ok = True
            finally:
                if env is not None:
                    for c in env.clients:
                        c.close()
                if port is not None:
                    port.close()
                stopped = env is not None and env.stopped
                alive = server.alive()
                rc = server.stop(timeout=5)
                text = server.log()
                if env is not None:
                    env.final_log = text
                with contextlib.suppress(OSError):
                    server.log_path.unlink()
                if not ok:
                    log.error("server log:\n%s", text[-6000:])
                if ok and not stopped:
                    assert alive, f"the server died during the test:\n{text[-3000:]}"
                    assert rc == 0, f"server exited {rc} on SIGTERM:\n{text[-12000:]}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------
# The test as a guest
# --------------------------------------------------------------------------


@dataclass
class GuestSession:
    """One vfio-user connection with mapped guest memory and a driver on it."""

    env: DeviceEnv
    client: VfioUserClient
    mem: GuestMemory
    driver: VirtioNetDriver

    def new_driver(self, **kwargs: object) -> VirtioNetDriver:
        """A fresh driver on the same connection and memory (after a reset)."""
        self.driver.transport.close()
        self.mem.reset_allocator()
        kwargs.setdefault("features", GUEST_FEATURES)
        self.driver = VirtioNetDriver(self.client, self.mem, **kwargs)  # type: ignore[arg-type]
        return self.driver

    def close(self) -> None:
        self.driver.transport.close()
        self.client.close()
        self.mem.close()


def open_session(env: DeviceEnv, *, map_memory: bool = True, **kwargs: object) -> GuestSession:
    client = env.connect()
    mem = GuestMemory(GUEST_MEM_SIZE)
    if map_memory:
        mem.map_into(client)
    kwargs.setdefault("features", GUEST_FEATURES)
    driver = VirtioNetDriver(client, mem, **kwargs)  # type: ignore[arg-type]
    return GuestSession(env, client, mem, driver)


def wait_used(drv: VirtioNetDriver, q: SplitQueue, timeout: float = 5.0) -> UsedElem:
    """Poll ``q``'s used ring for one element (no interrupt consumed)."""
    deadline = time.monotonic() + timeout
    while True:
        e = q.get_used()
        if e is not None:
            return e
        drv.client.serve(0)
        if time.monotonic() > deadline:
            raise VirtioTimeout(
                f"queue {q.index}: nothing used in {timeout}s "
                f"(avail {q.published_idx}, used {q.used_idx()}, last {q.last_used_idx})"
            )
        time.sleep(0.001)


def wait_used_idx(q: SplitQueue, target: int, timeout: float = 5.0) -> None:
    """Wait until the device's used->idx reaches ``target`` (not consuming)."""
    deadline = time.monotonic() + timeout
    while q.used_idx() != target & 0xFFFF:
        if time.monotonic() > deadline:
            raise VirtioTimeout(f"queue {q.index}: used idx {q.used_idx()}, wanted {target}")
        time.sleep(0.001)


def recv_tagged(drv: VirtioNetDriver, tag: bytes, timeout: float = 3.0) -> bytes:
    """Receive packets until the test frame carrying ``tag``; returns its frame."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise VirtioTimeout(f"no frame tagged {tag!r} received")
        _, frame = drv.recv_packet(timeout=remaining)
        if has_tag(frame, tag):
            return frame
        log.info("ignoring unrelated frame %s", frame[:34].hex())


def no_frame_tagged(drv: VirtioNetDriver, tag: bytes, wait: float = 0.3) -> bool:
    """True if nothing tagged ``tag`` arrives on rx within ``wait`` seconds."""
    try:
        recv_tagged(drv, tag, wait)
    except VirtioTimeout:
        return True
    return False


def mac_table(unicast: Sequence[bytes], multicast: Sequence[bytes] = ()) -> bytes:
    """VIRTIO_NET_CTRL_MAC_TABLE_SET payload: two {le32 entries; macs} tables."""
    return (
        struct.pack("<I", len(unicast))
        + b"".join(unicast)
        + struct.pack("<I", len(multicast))
        + b"".join(multicast)
    )


__all__ = [
    "BROADCAST",
    "ETH_P_ARP",
    "ETH_P_IP",
    "ETH_P_TEST",
    "GUEST_FEATURES",
    "GUEST_MAC",
    "PEER_MAC",
    "DeviceEnv",
    "GuestSession",
    "TapPort",
    "check_prerequisites",
    "device_env",
    "eth_frame",
    "has_tag",
    "mac_table",
    "no_frame_tagged",
    "open_session",
    "recv_tagged",
    "require",
    "tagged_frame",
    "wait_used",
    "wait_used_idx",
]


def exchange_tagged(env: DeviceEnv, drv: VirtioNetDriver, label: str, frames: int) -> None:
    """``frames`` tagged frames from the guest to the TAP, then as many back,
    each checked byte for byte on arrival (the driver is up and promiscuous)."""
    for i in range(frames):
        tag = f"{label}-tx{i}".encode()
        frame = tagged_frame(BROADCAST, tag, src=GUEST_MAC, size=200)
        drv.send_packet(frame)
        assert env.port.recv(lambda f, t=tag: has_tag(f, t)) == frame
    for i in range(frames):
        tag = f"{label}-rx{i}".encode()
        frame = tagged_frame(GUEST_MAC, tag, size=300)
        env.port.send(frame)
        assert recv_tagged(drv, tag) == frame
