"""Ready-made set-ups shared by the demo and the benchmark: a guest whose
eth0 is either this project's device or QEMU's built-in virtio-net-pci, on a
TAP in a fresh network namespace, with addresses configured."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .guest import Guest, vfio_user_pci_args
from .netns import NetNS, netns
from .server import Server

TAP_NAME = "vntap0"
GUEST_MAC = "52:54:00:c0:ff:01"


def configure_guest_ip(guest: Guest, ns: NetNS, queues: int = 1) -> None:
    guest.check(f"ip addr add {ns.guest_addr()}/{ns.prefix_len} dev eth0 && ip link set eth0 up")
    if queues > 1:
        # Linux starts with min(queues, CPUs) pairs: use them all.
        guest.check(f"ethtool -L eth0 combined {queues}")
    guest.wait_until("grep -qx 1 /sys/class/net/eth0/carrier", timeout=20)
    guest.wait_until(f"ping -c 1 -W 1 {ns.host_addr}", timeout=30)


def builtin_virtio_net_args(tap: str, queues: int = 1) -> list[str]:
    netdev = f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off"
    device = f"virtio-net-pci,netdev=n0,mac={GUEST_MAC},romfile="
    if queues > 1:
        netdev += f",queues={queues}"
        device += f",mq=on,vectors={2 * queues + 2}"
    return ["-netdev", netdev, "-device", device]


@contextlib.contextmanager
def guest_on_vfiouser_net(
    *, cpus: int = 2, server_args: Sequence[str] = (), log_level: str = "info"
) -> Iterator[tuple[Guest, NetNS, Server]]:
    """Daemon in a namespace serving its TAP; QEMU (outside) attached to it."""
    queues = 1
    if "--queue-pairs" in server_args:
        queues = int(server_args[list(server_args).index("--queue-pairs") + 1])
    multi_queue = queues > 1
    with netns() as ns, tempfile.TemporaryDirectory(prefix="vn-") as tmp:
        ns.add_tap(TAP_NAME, multi_queue=multi_queue)
        sock = Path(tmp) / "vn.sock"
        args = ["--mac", GUEST_MAC, *server_args]
        server = Server(sock, TAP_NAME, netns=ns.name, extra_args=args, log_level=log_level)
        guest = Guest(cpus=cpus, extra_args=vfio_user_pci_args(sock), name="vn-guest")
        with server, guest:
            configure_guest_ip(guest, ns, queues)
            yield guest, ns, server


@contextlib.contextmanager
def guest_on_builtin_virtio_net(*, cpus: int = 2, queues: int = 1) -> Iterator[tuple[Guest, NetNS]]:
    """QEMU's own virtio-net-pci (userspace datapath) on the same kind of TAP."""
    with netns() as ns:
        ns.add_tap(TAP_NAME, multi_queue=queues > 1)
        args = builtin_virtio_net_args(TAP_NAME, queues)
        with Guest(cpus=cpus, netns=ns.name, extra_args=args, name="qemu-guest") as guest:
            configure_guest_ip(guest, ns, queues)
            yield guest, ns
