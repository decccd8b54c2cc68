"""Host side of the device: a Linux TAP interface with one queue per pair.

The fds are opened by the C datapath's vn_tap_open (IFF_VNET_HDR with a
12-byte header, non-blocking); this module owns their lifetime and the
interface's state (existence, IFF_UP, MTU) through plain ioctls.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct

from vfiouser_net.native import ffi, lib

log = logging.getLogger(__name__)

TUNGETIFF = 0x800454D2
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
IFF_UP = 0x1
IFNAMSIZ = 16


class TapError(RuntimeError):
    pass


def _ifreq(name: str, payload: bytes = b"") -> bytes:
    return struct.pack("16s", name.encode()) + payload.ljust(24, b"\0")


def _ioctl(name: str, request: int, payload: bytes = b"") -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return fcntl.ioctl(s.fileno(), request, _ifreq(name, payload))


def interface_exists(name: str) -> bool:
    try:
        _ioctl(name, SIOCGIFFLAGS)
    except OSError:
        return False
    return True


def validate_ifname(name: str) -> None:
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise TapError(f"invalid interface name {name!r} (1-15 characters, no '/' or spaces)")


class Tap:
    """A TAP interface opened with `queues` queues; with ``create=False`` only
    an existing one."""

    def __init__(
        self, name: str, queues: int = 1, mtu: int | None = None, *, create: bool = True
    ) -> None:
        validate_ifname(name)
        self.created = not interface_exists(name)
        if self.created and not create:
            raise TapError(f"no interface named {name}")
        self.fds: list[int] = []
        self.steering_prog_fd = -1
        multi = queues > 1
        out = ffi.new("char[16]")
        for _ in range(queues):
            fd = lib.vn_tap_open(name.encode(), multi, out)
            if fd < 0 and not multi and -fd == 22:
                # An existing TAP made with multi_queue only accepts multi-queue opens.
                multi = True
                fd = lib.vn_tap_open(name.encode(), multi, out)
            if fd < 0:
                self.close()
                hint = ""
                if -fd == 22 and multi and not self.created:
                    hint = (
                        f" ({name} exists without multi_queue: recreate it with "
                        f"'ip tuntap add dev {name} mode tap multi_queue' for {queues} queue pairs)"
                    )
                raise TapError(f"cannot open TAP {name}: {os.strerror(-fd)}{hint}")
            self.fds.append(fd)
        self.name = ffi.string(out).decode()
        if queues > 1:
            # One reader per flow (see vn_tap_set_flow_steering); without it
            # the kernel follows the guest's transmit queue, which can move a
            # flow between readers mid-stream.
            prog = lib.vn_tap_set_flow_steering(self.fds[0])
            if prog < 0:
                log.warning(
                    "TAP %s: flow-hash queue selection unavailable (%s); the kernel's "
                    "default applies and a flow may move between queues",
                    self.name,
                    os.strerror(-prog),
                )
            else:
                self.steering_prog_fd = prog
        if self.created:
            log.info("created TAP %s with %d queue(s)", self.name, queues)
            if mtu is not None:
                self.set_mtu(mtu)
            self.set_up(True)
        else:
            log.info("attached to TAP %s with %d queue(s)", self.name, queues)
            if mtu is not None and self.mtu() < mtu:
                log.warning(
                    "TAP %s has MTU %d, smaller than the device MTU %d: large frames will drop",
                    self.name,
                    self.mtu(),
                    mtu,
                )

    def lost(self) -> bool:
        """The interface was deleted: our queues answer EBADFD (a new
        interface of the same name does not bring them back)."""
        if not self.fds:
            return True
        try:
            fcntl.ioctl(self.fds[0], TUNGETIFF, bytes(40))
        except OSError as exc:
            return exc.errno == errno.EBADFD
        return False

    def flags(self) -> int:
        res = _ioctl(self.name, SIOCGIFFLAGS)
        return int(struct.unpack_from("H", res, 16)[0])

    def is_up(self) -> bool:
        try:
            return bool(self.flags() & IFF_UP)
        except OSError:
            return False

    def set_up(self, up: bool) -> None:
        flags = self.flags()
        flags = flags | IFF_UP if up else flags & ~IFF_UP
        _ioctl(self.name, SIOCSIFFLAGS, struct.pack("H", flags))

    def mtu(self) -> int:
        res = _ioctl(self.name, SIOCGIFMTU)
        return int(struct.unpack_from("i", res, 16)[0])

    def set_mtu(self, mtu: int) -> None:
        _ioctl(self.name, SIOCSIFMTU, struct.pack("i", mtu))

    def close(self) -> None:
        if self.steering_prog_fd >= 0 and self.fds and not self.created:
            # A TAP that outlives us must not keep our queue selection.
            lib.vn_tap_clear_flow_steering(self.fds[0])
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        if self.steering_prog_fd >= 0:
            os.close(self.steering_prog_fd)
            self.steering_prog_fd = -1
