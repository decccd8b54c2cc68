"""Ready-made set-ups shared by the demo and the benchmark: a guest whose
eth0 is this project's device, QEMU's built-in virtio-net-pci, or
virtio-net-pci on a DPDK vhost-user back end, on a TAP in a fresh network
namespace, with addresses configured."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
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
    *,
    cpus: int = 2,
    server_args: Sequence[str] = (),
    log_level: str = "info",
    python: str | Path = sys.executable,
    server_env: dict[str, str] | None = None,
) -> Iterator[tuple[Guest, NetNS, Server]]:
    """Daemon in a namespace serving its TAP; QEMU (outside) attached to it.
    ``python``: the interpreter that runs it (another venv's, for a wheel)."""
    queues = 1
    if "--queue-pairs" in server_args:
        queues = int(server_args[list(server_args).index("--queue-pairs") + 1])
    multi_queue = queues > 1
    with netns() as ns, tempfile.TemporaryDirectory(prefix="vn-") as tmp:
        ns.add_tap(TAP_NAME, multi_queue=multi_queue)
        sock = Path(tmp) / "vn.sock"
        args = ["--mac", GUEST_MAC, *server_args]
        server = Server(
            sock,
            TAP_NAME,
            netns=ns.name,
            extra_args=args,
            log_level=log_level,
            env=server_env,
            python=python,
        )
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


DPDK_TESTPMD = "dpdk-testpmd"
DPDK_TAP = "dtap0"


def dpdk_testpmd() -> str | None:
    """Debian's dpdk-testpmd (package dpdk-dev), if this host has it."""
    return shutil.which(DPDK_TESTPMD)


@contextlib.contextmanager
def guest_on_dpdk_vhost_user(
    *, cpus: int = 2, queues: int = 1
) -> Iterator[tuple[Guest, NetNS, subprocess.Popen[str]]]:
    """virtio-net-pci on a vhost-user back end: dpdk-testpmd in the namespace
    forwarding between its vhost-user port and a TAP of its own (net_tap),
    without hugepages (../shared/FINDINGS.md). It busy-polls a core, and
    net_tap has no TSO: the guest's TCP is segmented in the guest."""
    testpmd = dpdk_testpmd()
    if testpmd is None:
        raise FileNotFoundError("dpdk-testpmd not found (Debian package dpdk-dev)")
    with netns() as ns, tempfile.TemporaryDirectory(prefix="vn-dpdk-") as tmp:
        sock = Path(tmp) / "vhost.sock"
        log_path = Path(tmp) / "testpmd.log"
        argv = [
            testpmd, "-l", "0-1", "--no-huge", "-m", "1024", "--no-pci",
            "--file-prefix", f"vn{os.getpid()}-{ns.index}",
            "--vdev", f"net_vhost0,iface={sock},queues={queues}",
            "--vdev", f"net_tap0,iface={DPDK_TAP}",
            "--", "--forward-mode=io", "--auto-start", "--stats-period", "3600",
            "--total-num-mbufs=16384", f"--rxq={queues}", f"--txq={queues}",
        ]  # fmt: skip
        with log_path.open("w") as out:
            proc = ns.popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not (
                sock.exists() and ns.ip("link", "show", DPDK_TAP, check=False).returncode == 0
            ):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dpdk-testpmd did not come up:\n{log_path.read_text()}")
                time.sleep(0.2)
            ns.ip("addr", "add", f"{ns.host_addr}/{ns.prefix_len}", "dev", DPDK_TAP)
            ns.ip("link", "set", DPDK_TAP, "up")
            netdev = f"vhost-user,id=n0,chardev=c0,queues={queues}"
            device = f"virtio-net-pci,netdev=n0,mac={GUEST_MAC},romfile="
            if queues > 1:
                device += f",mq=on,vectors={2 * queues + 2}"
            args = ["-chardev", f"socket,id=c0,path={sock}", "-netdev", netdev, "-device", device]
            with Guest(cpus=cpus, extra_args=args, name="dpdk-guest") as guest:
                configure_guest_ip(guest, ns, queues)
                yield guest, ns, proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
