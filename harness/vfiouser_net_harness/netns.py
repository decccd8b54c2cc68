"""Network namespaces and TAP devices for the end-to-end tests.

Every test gets its own namespace, so the TAP, its host-side address and all
traffic stay inside it: nothing reaches the machine's real interfaces.
Addressing: namespace N uses 10.201.N.0/24, the host side (the TAP) is
10.201.N.1 and guests are 10.201.N.2 (and up).

Everything is a context manager that removes what it created, also when the
body raises. Namespaces are named ``<prefix><N>-<pid>`` so that
:func:`cleanup_stale` can remove those left behind by a killed test run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ProcFile = int | IO[Any] | None

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
DEFAULT_PREFIX = "vn"
SUBNET_FMT = "10.201.{n}.{host}"
PREFIX_LEN = 24
_NAME_RE = re.compile(r"^(?P<prefix>[a-z]+)(?P<n>\d+)-(?P<pid>\d+)$")
_alloc_lock = threading.Lock()


class NetnsError(RuntimeError):
    """An ip(8) command failed."""


def run_cmd(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60.0,
    input_text: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, log it, raise NetnsError on failure."""
    log.debug("run: %s", shlex.join(argv))
    proc = subprocess.run(
        list(argv),
        input=input_text,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=None if env is None else dict(env),
    )
    if check and proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip()
        raise NetnsError(f"{shlex.join(argv)} exited {proc.returncode}: {detail}")
    return proc


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_cmd(["ip", *args], check=check)


def list_netns() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Delete namespaces named by this module whose creating process is gone."""
    removed = []
    for name in list_netns():
        m = _NAME_RE.match(name)
        if not m or m.group("prefix") != prefix or _pid_alive(int(m.group("pid"))):
            continue
        log.info("removing stale netns %s", name)
        _ip("netns", "del", name, check=False)
        removed.append(name)
    return removed


def _allocate_index(prefix: str) -> int:
    """Smallest N in 1..254 not used by a live namespace of this prefix."""
    used = set()
    for name in list_netns():
        m = _NAME_RE.match(name)
        if m and m.group("prefix") == prefix:
            used.add(int(m.group("n")))
    for n in range(1, 255):
        if n not in used:
            return n
    raise NetnsError("no free 10.201.N.0/24 subnet (254 namespaces in use)")


@dataclass
class Tap:
    """A TAP device inside a namespace."""

    netns: NetNS
    name: str
    multi_queue: bool
    address: str | None

    def delete(self) -> None:
        self.netns.ip("link", "del", self.name, check=False)

    def stats(self) -> dict[str, int]:
        """Kernel counters of the TAP (rx_packets, tx_bytes, ...)."""
        base = f"/sys/class/net/{self.name}/statistics"
        out = self.netns.run(
            ["sh", "-c", f"cd {base} && for f in *; do echo $f $(cat $f); done"]
        ).stdout
        stats = {}
        for line in out.splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                stats[key] = int(value)
        return stats


@dataclass
class NetNS:
    """A named network namespace with the subnet 10.201.<index>.0/24."""

    name: str
    index: int
    taps: list[Tap] = field(default_factory=list)

    # --- addressing -------------------------------------------------------
    @property
    def host_addr(self) -> str:
        """Host-side address (assigned to the first TAP by default)."""
        return SUBNET_FMT.format(n=self.index, host=1)

    def guest_addr(self, k: int = 0) -> str:
        """Address for guest number k (10.201.N.2 for the first one)."""
        if not 0 <= k < 253:
            raise ValueError(f"guest index {k} out of range")
        return SUBNET_FMT.format(n=self.index, host=2 + k)

    @property
    def prefix_len(self) -> int:
        return PREFIX_LEN

    # --- commands inside the namespace -----------------------------------
    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs argv inside the namespace (``ip netns exec``)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        input_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace and wait for it."""
        return run_cmd(self.exec_argv(argv), check=check, timeout=timeout, input_text=input_text)

    def popen(
        self,
        argv: Sequence[str],
        *,
        stdin: ProcFile = None,
        stdout: ProcFile = None,
        stderr: ProcFile = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[str]:
        """Start a command inside the namespace, in its own process group."""
        log.debug("popen in %s: %s", self.name, shlex.join(argv))
        return subprocess.Popen(
            self.exec_argv(argv),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=None if env is None else dict(env),
            text=True,
            start_new_session=True,
        )

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip -n NAME ARGS``."""
        return _ip("-n", self.name, *args, check=check)

    # --- devices ------------------------------------------------------------
    def add_tap(
        self,
        name: str = "vntap0",
        *,
        multi_queue: bool = False,
        user: str | int | None = None,
        group: str | int | None = None,
        address: str | None = "host",
        up: bool = True,
    ) -> Tap:
        """Create a persistent TAP in the namespace.

        ``address="host"`` assigns the host-side address (10.201.N.1/24);
        pass another "a.b.c.d/len" or None for none. ``user``/``group`` let an
        unprivileged process attach to it.
        """
        if len(name) > 15:
            raise ValueError(f"interface name too long: {name!r}")
        args = ["tuntap", "add", "dev", name, "mode", "tap"]
        if multi_queue:
            args.append("multi_queue")
        if user is not None:
            args += ["user", str(user)]
        if group is not None:
            args += ["group", str(group)]
        self.ip(*args)
        tap = Tap(self, name, multi_queue, None)
        self.taps.append(tap)
        if address == "host":
            address = f"{self.host_addr}/{PREFIX_LEN}"
        if address is not None:
            self.ip("addr", "add", address, "dev", name)
            tap.address = address
        if up:
            self.ip("link", "set", name, "up")
        log.info(
            "netns %s: tap %s%s addr %s",
            self.name,
            name,
            " (multi_queue)" if multi_queue else "",
            address,
        )
        return tap

    @contextlib.contextmanager
    def tap(
        self,
        name: str = "vntap0",
        *,
        multi_queue: bool = False,
        user: str | int | None = None,
        group: str | int | None = None,
        address: str | None = "host",
    ) -> Iterator[Tap]:
        """Context manager around :meth:`add_tap` that deletes the TAP."""
        tap = self.add_tap(name, multi_queue=multi_queue, user=user, group=group, address=address)
        try:
            yield tap
        finally:
            tap.delete()
            if tap in self.taps:
                self.taps.remove(tap)

    def delete(self) -> None:
        """Delete the TAPs and the namespace (processes inside should be gone)."""
        for tap in list(self.taps):
            tap.delete()
        self.taps.clear()
        proc = _ip("netns", "del", self.name, check=False)
        if proc.returncode != 0:
            log.warning("ip netns del %s: %s", self.name, proc.stderr.strip())
        else:
            log.info("netns %s deleted", self.name)


def create_netns(prefix: str = DEFAULT_PREFIX) -> NetNS:
    """Create a uniquely named namespace with lo up. Prefer :func:`netns`."""
    if not re.fullmatch(r"[a-z]+", prefix):
        raise ValueError(f"prefix must be lowercase letters: {prefix!r}")
    with _alloc_lock:
        cleanup_stale(prefix)
        for _ in range(10):
            n = _allocate_index(prefix)
            name = f"{prefix}{n}-{os.getpid()}"
            proc = _ip("netns", "add", name, check=False)
            if proc.returncode == 0:
                break
            log.debug("ip netns add %s failed (%s), retrying", name, proc.stderr.strip())
        else:
            raise NetnsError(f"could not create a namespace with prefix {prefix!r}")
    ns = NetNS(name, n)
    try:
        ns.ip("link", "set", "lo", "up")
    except Exception:
        ns.delete()
        raise
    log.info("netns %s created (10.201.%d.0/24)", name, n)
    return ns


@contextlib.contextmanager
def netns(prefix: str = DEFAULT_PREFIX) -> Iterator[NetNS]:
    """A fresh namespace for the duration of the block; always deleted."""
    ns = create_netns(prefix)
    try:
        yield ns
    finally:
        ns.delete()


@contextlib.contextmanager
def netns_with_tap(
    tap_name: str = "vntap0",
    *,
    prefix: str = DEFAULT_PREFIX,
    multi_queue: bool = False,
    user: str | int | None = None,
    group: str | int | None = None,
) -> Iterator[tuple[NetNS, Tap]]:
    """A fresh namespace holding one TAP with the host-side address."""
    with netns(prefix) as ns:
        tap = ns.add_tap(tap_name, multi_queue=multi_queue, user=user, group=group)
        yield ns, tap
