"""End to end: the daemon the way deploy/ runs it.

The daemons here are started with the exact command lines of the units in
deploy/systemd (expanded as systemd would: specifiers, Environment=, an
EnvironmentFile standing in for /etc/vfiouser-net/vm1.env, paths under
/run/vfiouser-net and /etc/vfiouser-net moved to the test's directory) and
with the part of their sandbox that can be reproduced without systemd:
``setpriv`` gives them the unit's capability set (bounding, inheritable,
ambient) and no_new_privs, a small exec wrapper sets the unit's UMask= and
MemoryDenyWriteExecute= (the kernel's PR_SET_MDWE, inherited across exec)
and, for socket activation, puts the listening socket on fd 3 with
LISTEN_FDS=1 and LISTEN_PID set to the daemon's own pid. The user is nobody
(65534) standing in for vfiouser-net when that user can run this venv's
Python, else root with nothing but the unit's capabilities (logged).

- Socket activation (vfiouser-net@.socket + vfiouser-net@.service): the test
  binds and listens on the socket as the socket unit would (its SocketMode=),
  starts QEMU first, and starts the daemon in the network namespace holding
  its TAP only when QEMU's connection is pending, like systemd. The guest
  pings the host side and back; the instance's metrics and its admin socket
  answer for the device. Stopped, the daemon leaves the socket listening, and
  a new connection starts a new daemon on it (systemd's restart on demand).
  Twice: with CAP_NET_ADMIN as the unit has it, and with no capability at all
  on a TAP created beforehand for the service user (the unit's comment).
- The host-wide daemon (vfiouser-net.service) with two devices from a TOML
  file: two TAPs in one namespace (10.201.N.1/25 and 10.201.N.129/25), two
  guests booted at once, one by deploy/qemu/example.sh and one with the
  -device JSON of deploy/libvirt/domain.xml. Sockets get the setgid
  directory's group with the unit's umask (mode 0770). Both move traffic;
  guest 2 keeps pinging while guest 1's QEMU is killed, without a loss, and
  device 1 then answers a new vfio-user client.
- ``--print-capabilities``; bad configuration files and bad flags: exit 2, a
  one-line error naming the file, entry and key, nothing created. Known
  bugs found were fixed.

Everything (daemons, guests, namespaces, TAPs, sockets) is removed at the end,
also on failure. With CI=true a missing prerequisite fails instead of skipping.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import select
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from vfiouser_net_harness.guest import Guest, GuestPaths, vfio_user_pci_args
from vfiouser_net_harness.netns import NetNS, netns
from vfiouser_net_harness.prereq import IN_CI
from vfiouser_net_harness.procstat import proc_status
from vfiouser_net_harness.systemd_unit import (
    UnitFile,
    exec_argv,
    parse_unit,
    service_environment,
)
from vfiouser_net_harness.vfio_user_client import VfioUserClient

import vfiouser_net
from tests.e2e.device_fixtures import PingResult
from tests.e2e.stack import check_prerequisites, require

log = logging.getLogger(__name__)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
INSTANCE_SERVICE = DEPLOY / "systemd" / "vfiouser-net@.service"
INSTANCE_SOCKET = DEPLOY / "systemd" / "vfiouser-net@.socket"
HOST_SERVICE = DEPLOY / "systemd" / "vfiouser-net.service"
QEMU_EXAMPLE = DEPLOY / "qemu" / "example.sh"
LIBVIRT_DOMAIN = DEPLOY / "libvirt" / "domain.xml"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"

RUN_DIR = "/run/vfiouser-net"
ETC_DIR = "/etc/vfiouser-net"
SERVICE_GROUP = "vfiouser-net"  # the units' --admin-group
NOBODY = 65534
CAP_NET_ADMIN = 12
QEMU_GID = 64999  # stands in for kvm: any group the daemon's user is not in
VIRTIO_VENDOR = 0x1AF4
VIRTIO_NET_MODERN = 0x1041
GUEST_MEMORY_MB = 384
SD_LISTEN_FDS_START = 3

# Runs as the daemon's user after setpriv: the unit's UMask= and
# MemoryDenyWriteExecute=, then (socket activation) the listening socket on
# fd 3 with LISTEN_FDS/LISTEN_PID for this very process, which exec keeps.
_WRAPPER = """
import ctypes, os, sys
fd, umask, mdwe = int(sys.argv[1]), int(sys.argv[2], 8), sys.argv[3] == "1"
if umask >= 0:
    os.umask(umask)
if mdwe:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        sys.exit("PR_SET_MDWE: " + os.strerror(ctypes.get_errno()))
if fd >= 0:
    if fd != 3:
        os.dup2(fd, 3)
        os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = "1"
os.execv(sys.argv[4], sys.argv[4:])
"""


def vfiouser_net_binary() -> Path:
    return Path(sys.executable).parent / "vfiouser-net"


@pytest.fixture(scope="module", autouse=True)
def pythonpath_restored() -> Iterator[None]:
    """service_runtime() may point PYTHONPATH at a copy of the package that
    nobody can read, for this module's daemons; the modules after this one
    start theirs from the package the run chose (test-asan.sh checks which)."""
    before = os.environ.get("PYTHONPATH")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before
        service_runtime.cache_clear()


@pytest.fixture(scope="module", autouse=True)
def tun_device_for_everyone() -> Iterator[None]:
    """/dev/net/tun as udev's default rule makes it (0666): opening it is how an
    unprivileged daemon attaches to a TAP it owns. Some machines (this kind of
    sandbox) have it 0600; it is put back as it was."""
    tun = Path("/dev/net/tun")
    mode = stat.S_IMODE(tun.stat().st_mode) if tun.exists() else None
    if mode is not None and mode != 0o666:
        tun.chmod(0o666)
    try:
        yield
    finally:
        if mode is not None and mode != 0o666:
            tun.chmod(mode)


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A directory the service user can reach (pytest's own are 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="vn-ops-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def guest_paths() -> GuestPaths:
    paths = check_prerequisites()
    require(shutil.which("setpriv") is not None, "setpriv not installed (util-linux)")
    require(vfiouser_net_binary().exists(), f"{vfiouser_net_binary()} missing (pip install -e .)")
    return paths


@dataclass(frozen=True)
class ServiceRuntime:
    """Who runs the daemons (standing in for User=/Group=vfiouser-net) and
    with which Python; the package comes from PYTHONPATH when it is set."""

    uid: int
    gid: int
    python: str

    def command(self) -> list[str]:
        """What stands for the units' /usr/bin/vfiouser-net."""
        return [self.python, "-P", "-m", "vfiouser_net"]


def _nobody_runs(python: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # As the daemons start: setpriv execs the wrapper's interpreter while it
    # still holds its capabilities, the wrapper execs the daemon's without
    # any, which must reach the interpreter, its standard library and the
    # package by itself.
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            python,
            "-P",
            "-c",
            "import os, sys; os.execv(sys.argv[1], sys.argv[1:])",
            python,
            "-P",
            "-c",
            "import ctypes, vfiouser_net.cli, vfiouser_net.native; vfiouser_net.cli.main()",
            "--print-capabilities",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd="/",
    )


def _readable_copy(modules: Sequence[Any]) -> Path:
    """The given top-level packages and modules copied where nobody can read them."""
    copy = Path(tempfile.mkdtemp(prefix="vn-nobody-"))
    atexit.register(shutil.rmtree, copy, True)
    for module in modules:
        src = Path(module.__file__)
        if src.name == "__init__.py":
            shutil.copytree(
                src.parent,
                copy / src.parent.name,
                ignore=shutil.ignore_patterns("build", "build-san", "__pycache__"),
            )
        else:
            shutil.copy2(src, copy / src.name)
    for path in [copy, *copy.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return copy


@functools.cache
def service_runtime() -> ServiceRuntime:
    """nobody, with this venv's Python if nobody can run it, else the system's
    Python 3 of the same version on a readable copy of the package and its
    dependencies (a venv made from an interpreter under /root, as pyenv's, is
    out of nobody's reach)."""
    env = dict(os.environ)
    tried = []
    candidates = [sys.executable]
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system is not None:
        probe = subprocess.run(
            [system, "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.stdout.strip() == str(sys.version_info[:2]):
            candidates.append(system)
    copy_env: dict[str, str] | None = None
    for python in candidates:
        proc = _nobody_runs(python, env)
        if proc.returncode == 0:
            return ServiceRuntime(NOBODY, NOBODY, python)
        tried.append(f"{python}: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
        if copy_env is None:
            import _cffi_backend
            import cffi
            import msgpack
            import prometheus_client

            # The package as imported here (test-asan.sh's sanitized build under it).
            deps = [vfiouser_net, cffi, _cffi_backend, msgpack, prometheus_client]
            copy_env = dict(env, PYTHONPATH=str(_readable_copy(deps)))
        proc = _nobody_runs(python, copy_env)
        if proc.returncode == 0:
            os.environ["PYTHONPATH"] = copy_env["PYTHONPATH"]  # the daemons inherit it
            return ServiceRuntime(NOBODY, NOBODY, python)
        tried.append(
            f"{python} on a copy: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}"
        )
    message = f"nobody cannot run the daemon ({'; '.join(tried)})"
    if IN_CI:
        pytest.fail(f"CI=true and {message}: least privilege cannot be shown", pytrace=False)
    log.warning("%s: the daemons run as root with only the units' capabilities", message)
    return ServiceRuntime(0, 0, sys.executable)


# -- the units' sandbox, as far as it goes without systemd -----------------------------


@dataclass(frozen=True)
class Sandbox:
    uid: int
    gid: int
    capabilities: tuple[str, ...]
    no_new_privs: bool
    umask: int | None
    mdwe: bool

    @classmethod
    def from_unit(cls, unit: UnitFile, *, capabilities: Sequence[str] | None = None) -> Sandbox:
        runtime = service_runtime()
        uid, gid = runtime.uid, runtime.gid
        ambient = tuple(w for v in unit.values("Service", "AmbientCapabilities") for w in v.split())
        bounding = {w for v in unit.values("Service", "CapabilityBoundingSet") for w in v.split()}
        assert set(ambient) <= bounding, "an ambient capability outside the bounding set"
        umask = unit.value("Service", "UMask")
        return cls(
            uid=uid,
            gid=gid,
            capabilities=ambient if capabilities is None else tuple(capabilities),
            no_new_privs=unit.value("Service", "NoNewPrivileges") == "yes",
            umask=None if umask is None else int(umask, 8),
            mdwe=unit.value("Service", "MemoryDenyWriteExecute") == "yes",
        )

    def argv(self, command: Sequence[str], listen_fd: int | None = None) -> list[str]:
        caps = ",".join(
            ["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in self.capabilities)]
        )
        out = ["setpriv"]
        if self.uid != 0:
            out += [f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups"]
        out += [f"--inh-caps={caps}", f"--ambient-caps={caps}", f"--bounding-set={caps}"]
        if self.no_new_privs:
            out.append("--no-new-privs")
        umask = -1 if self.umask is None else self.umask
        fd = -1 if listen_fd is None else listen_fd
        return [
            *out,
            service_runtime().python,
            "-P",
            "-c",
            _WRAPPER,
            str(fd),
            f"{umask:o}" if umask >= 0 else "-1",
            "1" if self.mdwe else "0",
            *command,
        ]


def unit_command(
    unit: UnitFile,
    instance: str,
    run_dir: Path,
    *,
    env_file: Path | None = None,
    config: Path | None = None,
    admin_group: str,
) -> list[str]:
    """The unit's ExecStart=, with the service runtime's command for the binary and the
    test's directories."""
    files = {f"{ETC_DIR}/{instance}.env": env_file} if env_file is not None else {}
    env = service_environment(unit, instance, files)
    [argv] = exec_argv(unit, "ExecStart", instance, env)
    out = service_runtime().command()
    for arg in argv[1:]:
        if arg.startswith(f"{RUN_DIR}/"):
            arg = str(run_dir / arg.removeprefix(f"{RUN_DIR}/"))
        elif arg.startswith(f"{ETC_DIR}/") and config is not None:
            arg = str(config)
        elif arg == SERVICE_GROUP:
            arg = admin_group
        out.append(arg)
    return out


def make_run_dir(path: Path, uid: int) -> Path:
    """/run/vfiouser-net as tmpfiles.d makes it: service user, QEMU's group, 2750."""
    path.mkdir()
    os.chown(path, uid, QEMU_GID)
    path.chmod(0o2750)
    return path


# -- processes -------------------------------------------------------------------------


class DaemonProcess:
    """A daemon child in its own process group, logging to a file."""

    def __init__(self, argv: list[str], log_path: Path, pass_fds: Sequence[int] = ()) -> None:
        self.argv = argv
        self.log_path = log_path
        with log_path.open("ab") as out:
            log.info("starting daemon: %s", shlex.join(argv))
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=tuple(pass_fds),
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for(self, check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if not self.alive():
                code = self.proc.returncode
                raise AssertionError(
                    f"daemon exited {code} waiting for {what}:\n{self.log()[-4000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout:.0f} s:\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def metrics_url(self) -> str:
        found: list[str] = []

        def check() -> bool:
            found[:] = re.findall(r"metrics on (http://\S+/metrics)", self.log())
            return bool(found)

        self.wait_for(check, "metrics address in the log")
        return found[0]

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("daemon ignored SIGTERM for %.0f s; killing it", timeout)
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class SocketActivator:
    """What systemd does for a socket unit with Accept=no: it owns the listening
    socket (bound before any service runs, with the unit's SocketMode/User/Group),
    starts the service when a connection is pending and hands it the socket; after
    the service stops the socket keeps listening."""

    def __init__(self, path: Path, mode: int, uid: int, gid: int) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        os.chown(path, uid, gid)
        path.chmod(mode)
        self.sock.listen(socket.SOMAXCONN)
        self._thread: threading.Thread | None = None
        self._result: DaemonProcess | BaseException | None = None
        self.activations = 0

    def arm(self, start: Callable[[int], DaemonProcess], timeout: float = 240.0) -> None:
        """Start the service on the next pending connection (in the background)."""
        assert self._thread is None or not self._thread.is_alive()
        self._result = None

        def run() -> None:
            try:
                poller = select.poll()
                poller.register(self.sock.fileno(), select.POLLIN)
                if not poller.poll(timeout * 1000):
                    raise TimeoutError(f"no connection on {self.path} in {timeout:.0f} s")
                t0 = time.monotonic()
                self._result = start(self.sock.fileno())
                self.activations += 1
                log.info("activated on %s in %.3f s", self.path, time.monotonic() - t0)
            except BaseException as exc:
                self._result = exc

        self._thread = threading.Thread(target=run, name="activator", daemon=True)
        self._thread.start()

    def started(self, timeout: float = 30.0) -> DaemonProcess:
        assert self._thread is not None
        self._thread.join(timeout)
        if isinstance(self._result, BaseException):
            raise AssertionError(f"activation failed: {self._result}") from self._result
        assert isinstance(self._result, DaemonProcess), "the service was not started"
        return self._result

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # RemoveOnStop=yes


class ExampleScriptGuest(Guest):
    """A guest started through deploy/qemu/example.sh (its command line, not the
    harness's), with the test kernel and initramfs appended."""

    def __init__(self, *, vm_name: str, socket_path: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.vm_name = vm_name
        self.socket_path = socket_path

    def argv(self) -> list[str]:
        env = [
            "env",
            f"QEMU={self.paths.qemu}",
            f"NAME={self.vm_name}",
            f"SOCKET={self.socket_path}",
            f"MEMORY={self.memory_mb}M",
            f"CPUS={self.cpus}",
            "DISK=",
            "ACCEL=tcg",
        ]
        tail = [
            "-kernel",
            str(self.paths.kernel),
            "-initrd",
            str(self._initrd()),
            "-append",
            self.cmdline,
            "-no-reboot",
        ]
        if self.qmp_socket is not None:
            tail += ["-qmp", f"unix:{self.qmp_socket},server=on,wait=off"]
        return [*env, "sh", str(QEMU_EXAMPLE), *tail, *self.extra_args]


def libvirt_device_args(socket_path: Path) -> list[str]:
    """The -device argument of deploy/libvirt/domain.xml, pointed at socket_path."""
    domain = ET.parse(LIBVIRT_DOMAIN).getroot()
    [cmdline] = domain.findall(f"{{{QEMU_NS}}}commandline")
    args = [a.get("value", "") for a in cmdline.findall(f"{{{QEMU_NS}}}arg")]
    i = args.index("-device")
    spec = json.loads(args[i + 1])
    assert spec["socket"]["path"] == f"{RUN_DIR}/{domain.findtext('name')}.sock"
    spec["socket"]["path"] = str(socket_path)
    return ["-device", json.dumps(spec)]


# -- guest and host helpers ------------------------------------------------------------


def configure_guest(guest: Guest, addr: str, prefix: int, host: str) -> None:
    guest.check(f"ip addr add {addr}/{prefix} dev eth0 && ip link set eth0 up")
    guest.wait_until("grep -qx 1 /sys/class/net/eth0/carrier", timeout=20)
    guest.wait_until(f"ping -c 1 -W 1 {host}", timeout=30)


def guest_ping(guest: Guest, host: str, count: int = 5) -> PingResult:
    _, out = guest.run(f"ping -c {count} -i 0.2 -W 3 {host}", timeout=60)
    result = PingResult.parse(out)
    log.info("%s ping %s: %d/%d", guest.name, host, result.received, result.transmitted)
    return result


def host_ping(ns: NetNS, addr: str, count: int = 5) -> PingResult:
    proc = ns.run(["ping", "-c", str(count), "-i", "0.2", "-W", "3", addr], check=False)
    # iputils: "5 packets transmitted, 5 received, 0% packet loss"
    m = re.search(r"(\d+) packets transmitted, (\d+) received, .*?(\d+)% packet loss", proc.stdout)
    assert m is not None, proc.stdout + proc.stderr
    return PingResult(int(m.group(1)), int(m.group(2)), int(m.group(3)), proc.stdout)


def scrape(ns: NetNS, url: str) -> str:
    code = (
        "import sys, urllib.request; "
        "print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"
    )
    return ns.run([sys.executable, "-c", code, url]).stdout


def ctl_json(admin_socket: Path, *args: str) -> Any:
    proc = subprocess.run(
        [str(vfiouser_net_binary()), "ctl", "--admin-socket", str(admin_socket), "--json", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, f"ctl {' '.join(args)}: {proc.returncode} {proc.stderr}"
    return json.loads(proc.stdout)


def ctl_devices(admin_socket: Path) -> dict[str, dict[str, Any]]:
    out = ctl_json(admin_socket, "list")
    devices = out["devices"] if isinstance(out, dict) else out
    return {d["name"]: d for d in devices}


def probe_device(socket_path: Path) -> int:
    """Attach a vfio-user client, read the PCI device id, detach."""
    with VfioUserClient(socket_path, timeout=10.0, connect_timeout=10.0) as client:
        client.negotiate()
        vendor = client.config_read16(0)
        device = client.config_read16(2)
    assert vendor == VIRTIO_VENDOR, hex(vendor)
    return device


def wait_path(path: Path, daemon: DaemonProcess, gone: bool = False) -> None:
    daemon.wait_for(lambda: path.exists() != gone, f"{path} {'gone' if gone else 'present'}")


# -- (a) socket activation -------------------------------------------------------------


INSTANCE = "vm1"
INSTANCE_MAC = "52:54:00:0a:c7:01"


@pytest.mark.parametrize("privileges", ["unit-capabilities", "no-capabilities"])
def test_socket_activated_instance(
    guest_paths: GuestPaths, tmp_path: Path, privileges: str
) -> None:
    unit = parse_unit(INSTANCE_SERVICE)
    socket_unit = parse_unit(INSTANCE_SOCKET)
    no_caps = privileges == "no-capabilities"
    sandbox = Sandbox.from_unit(unit, capabilities=[] if no_caps else None)
    if not no_caps:
        assert sandbox.capabilities == ("CAP_NET_ADMIN",)
    env_file = tmp_path / "vm1.env"
    env_file.write_text(
        "# stands in for /etc/vfiouser-net/vm1.env\n"
        "METRICS_ADDR=127.0.0.1:0\n"
        f"OPTIONS=--mac {INSTANCE_MAC} --mtu 1500\n"
    )
    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(netns("vnact"))
        env = service_environment(unit, INSTANCE, {f"{ETC_DIR}/{INSTANCE}.env": env_file})
        # The TAP the unit names (tap-vm1), made beforehand; with no capability the
        # service's user must own it.
        ns.add_tap(env["TAP"], user=sandbox.uid if no_caps else None)
        run_dir = make_run_dir(tmp_path / "run", sandbox.uid)
        [listen] = socket_unit.values("Socket", "ListenStream")
        sock_path = run_dir / Path(listen.replace("%i", INSTANCE)).name
        activator = SocketActivator(
            sock_path,
            int(socket_unit.value("Socket", "SocketMode") or "0666", 8),
            sandbox.uid,
            QEMU_GID,
        )
        stack.callback(activator.close)
        command = unit_command(
            unit, INSTANCE, run_dir, env_file=env_file, admin_group=str(sandbox.gid)
        )
        assert "--socket-path" not in command
        daemons: list[DaemonProcess] = []

        def start(fd: int) -> DaemonProcess:
            daemon = DaemonProcess(
                ns.exec_argv(sandbox.argv(command, listen_fd=fd)),
                tmp_path / f"daemon{len(daemons) + 1}.log",
                pass_fds=[fd],
            )
            daemons.append(daemon)
            stack.callback(daemon.kill)
            return daemon

        # QEMU first: its connection waits in the backlog until the daemon runs.
        activator.arm(start)
        guest = Guest(
            paths=guest_paths,
            cpus=1,
            memory_mb=GUEST_MEMORY_MB,
            extra_args=vfio_user_pci_args(sock_path, "vn0"),
            workdir=tmp_path / "guest",
            name="activated",
        )
        stack.callback(guest.close)
        guest.start()
        daemon = activator.started()
        assert activator.activations == 1
        # Least privilege, as the kernel sees the running daemon: the service's
        # user, and no capability beyond the unit's (none at all on a TAP the
        # user owns); with --sandbox (the per-VM unit's) none at all once it
        # serves, no new privileges and its seccomp filter.
        status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
        uid = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, re.M)
        cap_eff = re.search(r"^CapEff:\s+([0-9a-f]+)$", status, re.M)
        assert uid is not None and cap_eff is not None, status
        assert int(uid.group(1)) == int(uid.group(2)) == sandbox.uid, status
        assert sandbox.uid != 0 or not IN_CI, "the daemon runs as root"
        sandboxed = "--sandbox" in command
        want_caps = 0 if no_caps or sandboxed else 1 << CAP_NET_ADMIN
        assert int(cap_eff.group(1), 16) == want_caps, status
        if sandboxed:
            assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
            assert re.search(r"^Seccomp:\s+2$", status, re.M), status
        configure_guest(guest, ns.guest_addr(), ns.prefix_len, ns.host_addr)
        assert guest.check("cat /sys/class/net/eth0/address").strip() == INSTANCE_MAC
        assert guest_ping(guest, ns.host_addr).lossless
        assert host_ping(ns, ns.guest_addr()).lossless

        # What the operator's guide checks: the admin channel and the metrics.
        admin = run_dir / f"{INSTANCE}.admin.sock"
        st = admin.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == sandbox.gid
        dev = ctl_devices(admin)[INSTANCE]
        assert dev["connected"] and dev["tap"] == env["TAP"]
        metrics = scrape(ns, daemon.metrics_url())
        assert re.search(rf'vfiouser_net_device_info\{{[^}}]*device="{INSTANCE}"', metrics)
        assert re.search(
            rf'vfiouser_net_device_client_connected\{{device="{INSTANCE}"\}} 1(\.0)?$',
            metrics,
            re.M,
        ), metrics

        # The service stops (VM shut down); the socket unit's socket stays.
        guest.close()
        assert daemon.stop() == 0, daemon.log()[-3000:]
        assert "Traceback" not in daemon.log()
        # The allow-list held everything the device did (a refusal is logged).
        assert "sandbox refused" not in daemon.log(), daemon.log()[-3000:]
        assert sock_path.exists() and stat.S_ISSOCK(sock_path.stat().st_mode)
        assert not admin.exists()
        if no_caps:
            return
        # The next client starts the service again on the same socket.
        activator.arm(start)
        assert probe_device(sock_path) == VIRTIO_NET_MODERN
        second = activator.started()
        assert activator.activations == 2
        assert second.stop() == 0, second.log()[-3000:]


# -- (b) the host-wide daemon, two devices ---------------------------------------------


def test_host_daemon_two_devices(guest_paths: GuestPaths, tmp_path: Path) -> None:
    unit = parse_unit(HOST_SERVICE)
    sandbox = Sandbox.from_unit(unit)
    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(netns("vnhost"))
        n = ns.index
        nets = {
            "vm1": {"host": f"10.201.{n}.1", "guest": f"10.201.{n}.2", "tap": "tap-vm1"},
            "vm2": {"host": f"10.201.{n}.129", "guest": f"10.201.{n}.130", "tap": "tap-vm2"},
        }
        ns.add_tap("tap-vm1", address=f"{nets['vm1']['host']}/25")
        ns.add_tap("tap-vm2", address=f"{nets['vm2']['host']}/25", multi_queue=True)
        run_dir = make_run_dir(tmp_path / "run", sandbox.uid)
        sockets = {name: run_dir / f"{name}.sock" for name in nets}
        config = tmp_path / "vfiouser-net.toml"
        config.write_text(
            '[daemon]\nmetrics_addr = "127.0.0.1:0"\nlog_level = "info"\n\n'
            f'[[device]]\nname = "vm1"\nsocket = "{sockets["vm1"]}"\ntap = "tap-vm1"\n'
            'mac = "52:54:00:0a:c7:11"\n\n'
            f'[[device]]\nname = "vm2"\nsocket = "{sockets["vm2"]}"\ntap = "tap-vm2"\n'
            'mac = "52:54:00:0a:c7:12"\nqueue_pairs = 2\n'
        )
        command = unit_command(unit, "", run_dir, config=config, admin_group=str(sandbox.gid))
        daemon = DaemonProcess(ns.exec_argv(sandbox.argv(command)), tmp_path / "daemon.log")
        stack.callback(daemon.kill)
        for path in sockets.values():
            wait_path(path, daemon)
        admin = run_dir / "admin.sock"
        wait_path(admin, daemon)
        # The setgid directory gives the sockets QEMU's group; UMask=0007 keeps others out.
        for path in sockets.values():
            st = path.stat()
            assert st.st_gid == QEMU_GID, (path, st.st_gid)
            assert stat.S_IMODE(st.st_mode) & 0o007 == 0, oct(st.st_mode)
            assert stat.S_IMODE(st.st_mode) & 0o060 == 0o060, oct(st.st_mode)
        assert stat.S_IMODE(admin.stat().st_mode) == 0o660
        assert admin.stat().st_gid == sandbox.gid

        guests = {
            "vm1": ExampleScriptGuest(
                vm_name="vm1",
                socket_path=sockets["vm1"],
                paths=guest_paths,
                cpus=1,
                memory_mb=GUEST_MEMORY_MB,
                workdir=tmp_path / "guest-vm1",
                name="example-sh",
            ),
            "vm2": Guest(
                paths=guest_paths,
                cpus=1,
                memory_mb=GUEST_MEMORY_MB,
                extra_args=libvirt_device_args(sockets["vm2"]),
                workdir=tmp_path / "guest-vm2",
                name="libvirt-device",
            ),
        }
        for guest in guests.values():
            stack.callback(guest.close)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(g.start) for g in guests.values()]:
                future.result()
        for name, guest in guests.items():
            configure_guest(guest, nets[name]["guest"], 25, nets[name]["host"])
        for name, guest in guests.items():
            assert guest_ping(guest, nets[name]["host"]).lossless, name
            assert host_ping(ns, nets[name]["guest"]).lossless, name
        devices = ctl_devices(admin)
        assert set(devices) == {"vm1", "vm2"}
        assert all(d["connected"] for d in devices.values()), devices
        assert devices["vm2"]["max_queue_pairs"] == 2
        # isolate is the default: each device in a sandboxed process of its own,
        # under the unit's user, started by the daemon.
        for name, d in devices.items():
            pid = d["process"]["pid"]
            assert pid != daemon.pid and proc_status(pid)["PPid"] == str(daemon.pid), (name, d)
            st = proc_status(pid)
            assert st["Seccomp"] == "2" and int(st["CapEff"], 16) == 0, (name, st)
            assert st["Uid"].split()[0] == str(sandbox.uid), (name, st)
        metrics = scrape(ns, daemon.metrics_url())
        for name in nets:
            assert re.search(rf'vfiouser_net_device_info\{{[^}}]*device="{name}"', metrics)

        # Guest 2 pings every 0.2 s while guest 1's QEMU is killed.
        g1, g2 = guests["vm1"], guests["vm2"]
        g2.check(f"ping -c 30 -i 0.2 -W 3 {nets['vm2']['host']} >/tmp/ping.log 2>&1 &")
        time.sleep(1.5)
        g1.kill()
        daemon.wait_for(
            lambda: not ctl_devices(admin)["vm1"]["connected"], "device vm1 to lose its client"
        )
        g2.wait_until("grep -q 'packets transmitted' /tmp/ping.log", timeout=30)
        during = PingResult.parse(g2.check("cat /tmp/ping.log"))
        assert during.transmitted == 30 and during.lossless, during.output
        assert daemon.alive()
        # Device 1 serves the next client; device 2 still carries traffic.
        assert probe_device(sockets["vm1"]) == VIRTIO_NET_MODERN
        assert guest_ping(g2, nets["vm2"]["host"]).lossless
        assert ctl_devices(admin)["vm2"]["connected"]

        g2.close()
        assert daemon.stop() == 0, daemon.log()[-3000:]
        log_text = daemon.log()
        assert "Traceback" not in log_text
        for path in [*sockets.values(), admin]:
            assert not path.exists(), path


@pytest.mark.parametrize("extra", [(), ("CAP_BPF",)], ids=["unit", "with-cap-bpf"])
def test_multiqueue_steering_program_capability(
    guest_paths: GuestPaths, tmp_path: Path, extra: tuple[str, ...]
) -> None:
    """What the units' comment says: where unprivileged eBPF is off, the multiqueue
    flow-steering program needs CAP_BPF besides CAP_NET_ADMIN (else a warning and
    the kernel's queue selection); with CAP_BPF added it loads."""
    unit = parse_unit(HOST_SERVICE)
    base = Sandbox.from_unit(unit)
    sandbox = dataclasses.replace(base, capabilities=(*base.capabilities, *extra))
    restricted = Path("/proc/sys/kernel/unprivileged_bpf_disabled").read_text().strip() != "0"
    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(netns("vnbpf"))
        ns.add_tap("tap-mq", multi_queue=True)
        run_dir = make_run_dir(tmp_path / "run", sandbox.uid)
        config = tmp_path / "vfiouser-net.toml"
        config.write_text(
            '[daemon]\nmetrics_addr = "none"\n\n'
            f'[[device]]\nname = "mq"\nsocket = "{run_dir}/mq.sock"\ntap = "tap-mq"\n'
            "queue_pairs = 2\n"
        )
        command = unit_command(unit, "", run_dir, config=config, admin_group=str(sandbox.gid))
        daemon = DaemonProcess(ns.exec_argv(sandbox.argv(command)), tmp_path / "daemon.log")
        stack.callback(daemon.kill)
        daemon.wait_for(lambda: "attached to TAP tap-mq" in daemon.log(), "the TAP attached")
        warned = "flow-hash queue selection unavailable" in daemon.log()
        assert warned == (restricted and not extra), daemon.log()[-2000:]
        assert daemon.stop() == 0, daemon.log()[-2000:]


# -- (c) capabilities ------------------------------------------------------------------


def test_print_capabilities() -> None:
    proc = subprocess.run(
        [str(vfiouser_net_binary()), "--print-capabilities"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    caps = json.loads(proc.stdout)
    assert caps["type"] == "net" and caps["transport"] == "vfio-user"
    assert caps["device"] == {"vendor": "0x1af4", "device": "0x1041"}
    assert {"VERSION_1", "MAC", "MRG_RXBUF", "CTRL_VQ"} <= set(caps["features"])
    assert {"MQ", "RSS", "HASH_REPORT"} <= set(caps["multiqueue_features"])
    assert caps["max_queue_pairs"] >= 2
    assert caps["max_queue_size"] == 4096
    assert "RING_RESET" in caps["features"]
    assert caps["pci"]["pci_cfg_access"] and not caps["pci"]["intx"]
    assert set(caps["steering"]) == {"auto", "single", "rss", "rx-follows-tx"}
    assert caps["socket_activation"] is True
    assert caps["tap_io"]["modes"] == ["auto", "io_uring", "writev"]
    # After the README's set-up the command is on PATH (scripts/setup.sh
    # links it into /usr/local/bin), also where the venv is not.
    venv_bin = vfiouser_net_binary().parent.resolve()
    path = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p).resolve() != venv_bin
    )
    on_path = shutil.which("vfiouser-net", path=path)
    assert on_path is not None, "vfiouser-net is not on PATH"
    assert Path(on_path).resolve() == vfiouser_net_binary().resolve(), on_path


# -- (d) refused configurations and flags ----------------------------------------------


GOOD_DEVICE = '[[device]]\nname = "ok"\nsocket = "{dir}/ok.sock"\ntap = "vnbad0"\n\n'
BAD_CONFIGS = {
    "unknown-device-key": (
        GOOD_DEVICE + '[[device]]\nsocket = "{dir}/b.sock"\ntap = "vnbad1"\ncolour = "red"\n',
        "device #2: unknown key 'colour'",
    ),
    "unknown-daemon-key": (
        "[daemon]\nverbose = true\n\n" + GOOD_DEVICE,
        "[daemon]: unknown key 'verbose'",
    ),
    "unknown-section": (GOOD_DEVICE + "[devices]\n", "unknown section(s) devices"),
    "duplicate-name": (
        GOOD_DEVICE + '[[device]]\nname = "ok"\nsocket = "{dir}/b.sock"\ntap = "vnbad1"\n',
        "device #2: duplicate device name 'ok'",
    ),
    "bad-mac": (
        GOOD_DEVICE
        + '[[device]]\nsocket = "{dir}/b.sock"\ntap = "vnbad1"\nmac = "52:54:00:zz:00:01"\n',
        "device #2: invalid MAC address '52:54:00:zz:00:01'",
    ),
    "multicast-mac": (
        GOOD_DEVICE
        + '[[device]]\nsocket = "{dir}/b.sock"\ntap = "vnbad1"\nmac = "01:00:5e:00:00:01"\n',
        "device #2: the MAC address must be a unicast address",
    ),
    "missing-tap": (
        GOOD_DEVICE + '[[device]]\nsocket = "{dir}/b.sock"\n',
        "device #2: tap is required",
    ),
    "wrong-type": (
        GOOD_DEVICE + '[[device]]\nsocket = "{dir}/b.sock"\ntap = "vnbad1"\nmtu = "9000"\n',
        "device #2: mtu must be a int",
    ),
    "queue-size": (
        GOOD_DEVICE + '[[device]]\nsocket = "{dir}/b.sock"\ntap = "vnbad1"\nqueue_size = 300\n',
        "device #2: queue size must be a power of two",
    ),
    "toml-syntax": (GOOD_DEVICE + "[[device]\n", ""),
}


@pytest.fixture(scope="module")
def bad_ns(guest_paths: GuestPaths) -> Iterator[NetNS]:
    """A namespace to run refused daemons in (so no TAP they might make escapes)."""
    with netns("vnbad") as ns:
        yield ns


def links(ns: NetNS) -> set[str]:
    out = ns.ip("-o", "link", "show").stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def run_refused(
    ns: NetNS,
    args: Sequence[str],
    tmp_path: Path,
    env: dict[str, str] | None = None,
    timeout: float = 15.0,
) -> tuple[int, str]:
    """Run the daemon in ns expecting a quick refusal; returns (exit code, stderr)."""
    before = links(ns)
    out = tmp_path / "out.log"
    with out.open("wb") as f:
        proc = subprocess.Popen(
            ns.exec_argv([str(vfiouser_net_binary()), *args]),
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise AssertionError(
                f"{shlex.join(args)} still running after {timeout:.0f} s:\n"
                + out.read_text(errors="replace")[-2000:]
            ) from None
    text = out.read_text(errors="replace")
    assert links(ns) == before, f"{shlex.join(args)} left interfaces behind"
    assert not list(tmp_path.glob("*.sock")), "a socket was left behind"
    return proc.returncode, text


def assert_clean_error(code: int, output: str, *expected: str) -> None:
    assert code == 2, f"exit {code}:\n{output}"
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("vfiouser-net: error:")]
    assert len(errors) == 1, output
    for text in expected:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_file(bad_ns: NetNS, tmp_path: Path, case: str) -> None:
    text, expected = BAD_CONFIGS[case]
    config = tmp_path / f"{case}.toml"
    config.write_text(text.replace("{dir}", str(tmp_path)))
    code, output = run_refused(
        bad_ns, ["serve", "--config", str(config), "--metrics-addr", "none"], tmp_path
    )
    assert_clean_error(code, output, f"{config}:", expected)


def test_missing_config_file(bad_ns: NetNS, tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    code, output = run_refused(bad_ns, ["serve", "--config", str(missing)], tmp_path)
    assert_clean_error(code, output, str(missing), "No such file")


BAD_FLAGS: dict[str, tuple[list[str], str]] = {
    "no-socket": (["serve", "--tap", "vnbad0"], "serve needs --socket-path, --fd"),
    "no-tap": (["serve", "--socket-path", "{dir}/x.sock"], "serve needs --tap"),
    "config-and-flags": (
        ["serve", "--config", "{dir}/x.toml", "--tap", "vnbad0"],
        "cannot be combined",
    ),
    "mtu-not-a-number": (
        ["serve", "--socket-path", "{dir}/x.sock", "--tap", "vnbad0", "--mtu", "big"],
        "--mtu",
    ),
    "queue-pairs-zero": (
        ["serve", "--socket-path", "{dir}/x.sock", "--tap", "vnbad0", "--queue-pairs", "0"],
        "must be positive",
    ),
    "queue-pairs-too-many": (
        ["serve", "--socket-path", "{dir}/x.sock", "--tap", "vnbad0", "--queue-pairs", "99"],
        "queue pairs must be 1..",
    ),
    "steering": (
        ["serve", "--socket-path", "{dir}/x.sock", "--tap", "vnbad0", "--steering", "random"],
        "invalid choice: 'random'",
    ),
    "mac": (
        ["serve", "--socket-path", "{dir}/x.sock", "--tap", "vnbad0", "--mac", "52:54:00:00:01"],
        "invalid MAC address",
    ),
    "metrics-addr": (
        [
            "serve",
            "--socket-path",
            "{dir}/x.sock",
            "--tap",
            "vnbad0",
            "--metrics-addr",
            "localhost",
        ],
        "invalid metrics address",
    ),
    "tap-name": (
        [
            "serve",
            "--socket-path",
            "{dir}/x.sock",
            "--tap",
            "a tap with spaces",
            "--metrics-addr",
            "none",
        ],
        "invalid interface name",
    ),
    "fd-negative": (["serve", "--fd", "-1", "--tap", "vnbad0"], "--fd"),
    "unknown-flag": (
        ["serve", "--socket-path", "{dir}/x.sock", "--tap", "vnbad0", "--colour"],
        "unrecognized arguments: --colour",
    ),
    "no-command": ([], "a command is required"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags(bad_ns: NetNS, tmp_path: Path, case: str) -> None:
    args, expected = BAD_FLAGS[case]
    code, output = run_refused(bad_ns, [a.replace("{dir}", str(tmp_path)) for a in args], tmp_path)
    # argparse prints "vfiouser-net serve: error: ..." after its usage.
    assert code == 2, output
    assert "Traceback" not in output, output
    assert expected in output, output
    assert re.search(r"^vfiouser-net( serve)?: error: ", output, re.M), output


def test_activation_for_another_process(bad_ns: NetNS, tmp_path: Path) -> None:
    """LISTEN_FDS meant for another pid (a parent that exec'd without clearing it) is
    not taken: without --socket-path the daemon refuses to start."""
    code, output = run_refused(
        bad_ns, ["serve", "--tap", "vnbad0"], tmp_path, env={"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    )
    assert_clean_error(code, output, "serve needs --socket-path")


def test_fd_not_listening(bad_ns: NetNS, tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unbound:
        fd = unbound.fileno()
        os.set_inheritable(fd, True)
        before = links(bad_ns)
        out = tmp_path / "out.log"
        with out.open("wb") as f:
            proc = subprocess.Popen(
                bad_ns.exec_argv(
                    [
                        str(vfiouser_net_binary()),
                        "serve",
                        "--fd",
                        str(fd),
                        "--tap",
                        "vnbad0",
                        "--metrics-addr",
                        "none",
                    ]
                ),
                stdout=f,
                stderr=subprocess.STDOUT,
                pass_fds=[fd],
                start_new_session=True,
            )
            try:
                code = proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
                code = None
        with out.open("rb") as f:
            tail = f.read(600).decode(errors="replace")
        out.unlink()
        assert links(bad_ns) == before
        assert code == 2, tail


def test_fd_closed(bad_ns: NetNS, tmp_path: Path) -> None:
    code, output = run_refused(
        bad_ns, ["serve", "--fd", "987", "--tap", "vnbad0", "--metrics-addr", "none"], tmp_path
    )
    assert_clean_error(code, output, "987")


def test_config_log_level(bad_ns: NetNS, tmp_path: Path) -> None:
    config = tmp_path / "loud.toml"
    config.write_text(
        '[daemon]\nlog_level = "loud"\n\n' + GOOD_DEVICE.replace("{dir}", str(tmp_path))
    )
    code, output = run_refused(
        bad_ns, ["serve", "--config", str(config), "--metrics-addr", "none"], tmp_path, timeout=5
    )
    assert_clean_error(code, output, f"{config}:", "log_level")
