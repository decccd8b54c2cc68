"""What one device is asked to be (socket, TAP, MAC, queues, steering,
doorbells, TAP I/O), checked before anything is created. The configuration
file, the command line and the admin channel build these; nothing here needs
the datapath (the bounds are options.py's, which the datapath's own are
checked against)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vfiouser_net.options import (
    DEFAULT_BUSY_POLL_US,
    DEFAULT_TAP_IO,
    MAX_BUSY_POLL_US,
    MAX_QUEUE_PAIRS,
    MAX_QUEUE_SIZE,
    NOTIFY_MODES,
    STEERING_POLICIES,
    TAP_IO_MODES,
)


class DeviceError(RuntimeError):
    pass


@dataclass
class DeviceOptions:
    socket_path: str
    tap: str
    mac: bytes
    mtu: int = 1500
    queue_pairs: int = 1
    queue_size: int = 256
    speed_mbps: int = 10000
    steering: str = "auto"
    # Doorbells: "message" (vfio-user region writes, workers sleep between
    # batches) or "poll" (a shared notify page the workers poll: a core each).
    notify_mode: str = "message"
    # Bounded busy-poll before a worker sleeps, in microseconds (0: off).
    busy_poll_us: int = DEFAULT_BUSY_POLL_US
    # Not yet the default: see the README's limits.
    tap_io: str = DEFAULT_TAP_IO
    # Transmit doorbells handled on the context thread while the pair's
    # worker sleeps (one thread wake-up less per request/response). Off by
    # default: its gain was within the noise of this project's measurements.
    tx_inline: bool = False
    name: str = field(default="")
    # A listening socket handed to us (--fd, systemd socket activation)
    # instead of a path to bind.
    listen_fd: int | None = None
    # Its process's budget when it runs in one of its own (isolate); 0: the
    # daemon's default (budget.py).
    nofile: int = 0
    memory_max_mib: int = 0

    def validate(self) -> None:
        if not self.socket_path and self.listen_fd is None:
            raise DeviceError("a device needs a socket path or a listening socket (--fd)")
        if len(self.mac) != 6 or self.mac[0] & 1:
            raise DeviceError("the MAC address must be a unicast address of 6 bytes")
        if not 68 <= self.mtu <= 65535:
            raise DeviceError(f"MTU {self.mtu} out of range 68..65535")
        if not 1 <= self.queue_pairs <= MAX_QUEUE_PAIRS:
            raise DeviceError(f"queue pairs must be 1..{MAX_QUEUE_PAIRS}")
        if self.steering not in STEERING_POLICIES:
            raise DeviceError(
                f"unknown steering policy {self.steering!r} (one of {', '.join(STEERING_POLICIES)})"
            )
        if self.notify_mode not in NOTIFY_MODES:
            raise DeviceError(
                f"unknown notify mode {self.notify_mode!r} (one of {', '.join(NOTIFY_MODES)})"
            )
        if self.tap_io not in TAP_IO_MODES:
            raise DeviceError(
                f"unknown TAP I/O mode {self.tap_io!r} (one of {', '.join(TAP_IO_MODES)})"
            )
        if not 0 <= self.busy_poll_us <= MAX_BUSY_POLL_US:
            raise DeviceError(f"busy-poll time must be 0..{MAX_BUSY_POLL_US} microseconds")
        qs = self.queue_size
        if not 2 <= qs <= MAX_QUEUE_SIZE or qs & (qs - 1):
            raise DeviceError(f"queue size must be a power of two in 2..{MAX_QUEUE_SIZE}")


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def parse_mac(text: str) -> bytes:
    # Exactly six pairs of ASCII hex digits: int(x, 16) alone also takes
    # " 1", "+1" or non-ASCII digits.
    parts = text.split(":")
    if len(parts) != 6 or any(len(p) != 2 or not set(p) <= _HEX_DIGITS for p in parts):
        raise DeviceError(
            f"invalid MAC address {text!r} (expected six hex pairs, aa:bb:cc:dd:ee:ff)"
        )
    return bytes(int(p, 16) for p in parts)
