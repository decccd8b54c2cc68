"""End to end: the admin channel (``vfiouser-net ctl``) against a live daemon.

One stack for the module: a fresh network namespace with a ``multi_queue``
TAP (vntap0, 10.201.N.1/24), ``vfiouser-net serve`` inside it with
``--admin-socket`` and a 2-pair device ``vn0`` (MTU 1400), and one QEMU guest
(TCG, 2 vCPUs, Linux 6.12) on it with eth0 at 10.201.N.2/24 and both pairs
in use. The admin socket lives on the shared file system (a 0755 directory
under /tmp), so ``ctl`` runs outside the namespace (and once inside it).

The tests run in file order and each leaves the stack as it found it (link
up, steering auto):

- every read-only command in table and ``--json`` form (list, show, queues,
  stats, help, version) and ``log-level`` (debug lines appear, then stop);
- ``link down``/``up``: the guest's carrier follows, ping works again;
- ``steering single``: host-to-guest UDP flows land on pair 0 only;
  ``steering rss``: they spread over both pairs again; no device reset;
- ``capture``: a pcap file (read by a small reader below) in the daemon's
  ``--capture-dir`` holding the guest's ICMP echo requests and the host's
  replies, ``--queue`` keeping only that pair's frames; existing files,
  links planted in the directory and anything but a file name (absolute
  paths, ``../x``, ``a/b``) are refused (and a refused capture must not
  leave the datapath capturing: fixed bug);
- ``add``/``remove`` at run time: a second device on a second TAP, a second
  guest pinging through it, removed (that QEMU is killed) and added again
  for a third guest; guest 1 answers a host ping every 0.2 s throughout;
- hostile admin input on raw sockets (garbage, truncated frames, a 100 MB
  length prefix, wrong types, unknown command, wrong version, unpacker
  bombs, too many connections), then a peer of another uid (a forked child
  that setuid()s to 65534): refused by the socket's mode 0600 and, with the
  mode opened, by the daemon's SO_PEERCRED check; afterwards the daemon
  and the device are unaffected;
- finally SIGTERM: exit 0, both sockets removed.

Everything (guests, daemon, namespace, TAPs, files) is removed at the end of
the module, also on failure; the daemon's log is kept next to the test's
tmp files. With CI=true a missing prerequisite fails instead of skipping.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from vfiouser_net_harness.guest import Guest, GuestError
from vfiouser_net_harness.netns import NetNS

from tests.e2e.stack import Stack, StackConfig, open_stack, require
from vfiouser_net import __version__
from vfiouser_net.admin import protocol as p

log = logging.getLogger(__name__)

pytestmark = pytest.mark.e2e

DEV = "vn0"
DEV_MAC = "52:54:00:ad:01:01"
DEV_MTU = 1400  # not the default: the guest must read it from the device
PAIRS = 2
TAP0 = "vntap0"
DEV2 = "vn1"
DEV2_MAC = "52:54:00:ad:01:02"
TAP1 = "vntap1"
GUEST_TOOLS = ("ethtool", "taskset", "ping", "arp")
NOBODY = 65534
UDP_FLOWS = 32
UDP_PER_FLOW = 10
PCAP_MAGIC_NS = 0xA1B23C4D
LINKTYPE_ETHERNET = 1
ETH_P_IP = 0x0800
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8
PING_SIZE_CPU0, PING_SIZE_CPU1 = 100, 300  # ICMP payload sizes that tell the pings apart
CTL_TIMEOUT = 90.0

# Sends UDP datagrams from the host side to the guest: argv dst, flows, per flow.
# Every flow is its own socket (its own source port), so RSS spreads them.
_UDP_FLOWS = r"""
import socket, sys, time
dst, flows, per_flow = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
for _ in range(flows):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 0))
    socks.append(s)
for i in range(per_flow):
    for s in socks:
        s.sendto(b"vfiouser-net admin e2e %d" % i, (dst, 9))
    time.sleep(0.01)
"""


# --- ctl ------------------------------------------------------------------------------------


def ctl_argv() -> list[str]:
    """How an operator runs ctl: the installed script, else the module."""
    script = Path(sys.executable).parent / "vfiouser-net"
    if script.exists():
        return [str(script), "ctl"]
    return [sys.executable, "-m", "vfiouser_net", "ctl"]


# --- a small pcap reader --------------------------------------------------------------------


@dataclass(frozen=True)
class PcapRecord:
    ts_ns: int
    orig_len: int
    data: bytes


def read_pcap(path: Path) -> list[PcapRecord]:
    """A classic pcap file with nanosecond timestamps and Ethernet frames."""
    raw = path.read_bytes()
    assert len(raw) >= 24, f"{path}: {len(raw)} bytes, no pcap header"
    magic, major, minor, _zone, _sigfigs, snaplen, linktype = struct.unpack_from("<IHHiIII", raw)
    assert magic == PCAP_MAGIC_NS, f"{path}: magic {magic:#x}"
    assert (major, minor) == (2, 4), f"{path}: version {major}.{minor}"
    assert linktype == LINKTYPE_ETHERNET, f"{path}: link type {linktype}"
    records = []
    off = 24
    while off < len(raw):
        assert off + 16 <= len(raw), f"{path}: truncated record header at {off}"
        sec, nsec, incl, orig = struct.unpack_from("<IIII", raw, off)
        assert nsec < 1_000_000_000, f"{path}: record at {off}: {nsec} ns"
        assert incl <= orig and incl <= snaplen, f"{path}: record at {off}: {incl}/{orig}"
        data = raw[off + 16 : off + 16 + incl]
        assert len(data) == incl, f"{path}: truncated record at {off}"
        records.append(PcapRecord(sec * 1_000_000_000 + nsec, orig, data))
        off += 16 + incl
    return records


@dataclass(frozen=True)
class Icmp:
    """An ICMP echo in an Ethernet frame."""

    eth_src: str
    eth_dst: str
    ip_src: str
    ip_dst: str
    type: int
    payload_len: int


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def parse_icmp_echo(frame: bytes) -> Icmp | None:
    if len(frame) < 14 + 20 + 8 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP:
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    total = struct.unpack_from("!H", ip, 2)[0]
    if ip[0] >> 4 != 4 or ip[9] != 1 or len(ip) < ihl + 8:
        return None
    icmp_type = ip[ihl]
    if icmp_type not in (ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST):
        return None
    return Icmp(
        eth_src=_mac(frame[6:12]),
        eth_dst=_mac(frame[0:6]),
        ip_src=socket.inet_ntoa(ip[12:16]),
        ip_dst=socket.inet_ntoa(ip[16:20]),
        type=icmp_type,
        payload_len=total - ihl - 8,
    )


# --- raw admin connections ------------------------------------------------------------------


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def request_frame(obj: Any) -> bytes:
    return frame(p.pack(obj))


def version_frame(request_id: int = 99) -> bytes:
    return request_frame(p.make_request(request_id, "version"))


def parse_frames(buf: bytes) -> list[Any]:
    out = []
    off = 0
    while off < len(buf):
        assert off + 4 <= len(buf), f"partial length prefix in the reply stream: {buf[off:]!r}"
        (length,) = struct.unpack_from(">I", buf, off)
        assert off + 4 + length <= len(buf), "partial reply frame"
        out.append(p.unpack(buf[off + 4 : off + 4 + length]))
        off += 4 + length
    return out


def raw_session(
    path: str, payload: bytes, *, half_close: bool = True, timeout: float = 10.0
) -> tuple[list[Any], bool]:
    """Send raw bytes to the admin socket and read until the daemon closes.

    Returns the decoded reply frames and whether the daemon closed the
    connection (False: still open when the timeout ran out).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(payload)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        buf = b""
        closed = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            buf += chunk
    return parse_frames(buf), closed


def assert_error(reply: Any, code: str, request_id: int | None, text: str = "") -> None:
    assert isinstance(reply, dict), reply
    assert reply.get("v") == p.PROTOCOL_VERSION and reply.get("ok") is False, reply
    assert reply.get("id") == request_id, reply
    err = reply["error"]
    assert err["code"] == code, reply
    assert text in err["message"], reply


def assert_version_ok(reply: Any, request_id: int = 99) -> None:
    assert isinstance(reply, dict) and reply.get("ok") is True, reply
    assert reply["id"] == request_id and reply["result"]["protocol"] == p.PROTOCOL_VERSION, reply


def connect_as(uid: int, path: str, payload: bytes, timeout: float = 10.0) -> dict[str, Any]:
    """Fork a child that drops to uid (and its group, no supplementary groups),
    connects to path, sends payload and reads until EOF; its findings come
    back over a pipe: connect errno (0: connected), the bytes read, eof."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out: dict[str, Any] = {"uid": os.getuid(), "euid": os.geteuid()}
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            try:
                s.connect(path)
            except OSError as exc:
                out["connect"] = exc.errno
            else:
                out["connect"] = 0
                data = b""
                try:
                    s.sendall(payload)
                    while True:
                        chunk = s.recv(65536)
                        if not chunk:
                            out["eof"] = True
                            break
                        data += chunk
                except OSError as exc:
                    out["error"] = exc.errno
                out["reply"] = data.hex()
            os.write(w, json.dumps(out).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        text = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and text, f"child failed: {status} {text!r}"
    result: dict[str, Any] = json.loads(text)
    return result


# --- host-side ping in the background ---------------------------------------------------------


@dataclass(frozen=True)
class PingLog:
    transmitted: int
    received: int
    seqs: list[int]
    output: str

    def max_gap(self) -> int:
        """The longest run of unanswered sequence numbers (from 1 to transmitted)."""
        answered = sorted(set(self.seqs))
        edges = [0, *answered, self.transmitted + 1]
        return max(b - a - 1 for a, b in itertools.pairwise(edges))


class BackgroundPing:
    """``ping -i interval addr`` in the namespace until stop()."""

    def __init__(self, ns: NetNS, addr: str, interval: float = 0.2) -> None:
        self.ns = ns
        self.addr = addr
        self.interval = interval
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> BackgroundPing:
        self.proc = self.ns.popen(
            ["ping", "-n", "-i", str(self.interval), "-W", "2", self.addr],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        return self

    def stop(self) -> PingLog:
        assert self.proc is not None
        assert self.proc.poll() is None, f"ping exited early: {self.proc.communicate()[0]}"
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=15)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert m is not None, f"no ping summary:\n{out[-2000:]}"
        seqs = [int(s) for s in re.findall(r"icmp_seq=(\d+)", out)]
        return PingLog(int(m.group(1)), int(m.group(2)), seqs, out)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.communicate(timeout=10)


# --- the stack ----------------------------------------------------------------------------


ADMIN_CONFIG = StackConfig(
    mac=DEV_MAC, mtu=DEV_MTU, queue_pairs=PAIRS, name=DEV, socket_name="vn0.sock", admin=True,
    tap_name=TAP0,
)  # fmt: skip


class AdminStack(Stack):
    """The stack of ADMIN_CONFIG: a daemon with an admin socket, one guest,
    and the operator's ctl."""

    def log(self) -> str:
        return self.require_server().log()

    def log_count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for line in self.log().splitlines() if rx.search(line))

    # --- ctl ---------------------------------------------------------------------------------
    def ctl_run(
        self,
        *args: str,
        json_out: bool = False,
        in_netns: bool = False,
        cwd: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv = [*ctl_argv(), "--admin-socket", self.admin_socket]
        if json_out:
            argv.append("--json")
        argv += args
        if in_netns:
            argv = self.ns.exec_argv(argv)
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=CTL_TIMEOUT, check=False, cwd=cwd
        )

    def ctl(
        self, *args: str, expect: int = 0, in_netns: bool = False, cwd: str | None = None
    ) -> str:
        """ctl's table output (asserting its exit status)."""
        proc = self.ctl_run(*args, in_netns=in_netns, cwd=cwd)
        assert proc.returncode == expect, (
            f"ctl {' '.join(args)} exited {proc.returncode} (want {expect}):\n"
            f"{proc.stdout}\n{proc.stderr}"
        )
        return proc.stdout if expect == 0 else proc.stderr

    def ctl_json(self, *args: str) -> Any:
        proc = self.ctl_run(*args, json_out=True)
        assert proc.returncode == 0, (
            f"ctl --json {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
        return json.loads(proc.stdout)

    def stats(self, device: str = DEV) -> dict[str, Any]:
        result: dict[str, Any] = self.ctl_json("stats", device)
        return result

    def show(self, device: str = DEV) -> dict[str, Any]:
        result: dict[str, Any] = self.ctl_json("show", device)
        return result

    def remove_quietly(self, device: str) -> None:
        if self.server is not None and self.server.alive():
            proc = self.ctl_run("remove", device)
            log.info("cleanup: ctl remove %s exited %d", device, proc.returncode)

    # --- guest -------------------------------------------------------------------------------
    def boot_guest(self, name: str, socket_path: Path, cpus: int, addr: str, host: str) -> Guest:
        """Boot a guest on socket_path, eth0 at addr/24, pinging host."""
        guest = self.start_guest(name, socket_path=socket_path, cpus=cpus)
        guest.run("sysctl -qw net.ipv6.conf.all.disable_ipv6=1", timeout=30)
        guest.check(f"ip addr add {addr}/24 dev eth0 && ip link set eth0 up")
        wait_carrier(guest, True)
        guest.wait_until(f"ping -c 1 -W 2 {host}", timeout=30)
        return guest

    def guest_ping(self, count: int = 5, guest: Guest | None = None, host: str = "") -> str:
        g = guest or self.require_guest()
        return g.check(f"ping -c {count} -i 0.2 -W 2 {host or self.host_addr}", timeout=60)

    def ensure_ready(self) -> None:
        """The known state: daemon and guest alive, link up, steering auto."""
        self.require_server()
        self.require_guest()
        self.ns.ip("link", "set", TAP0, "up")
        show = self.show()
        if not show["operator_link_up"]:
            self.ctl("link", DEV, "up")
        if show["policy"] != "auto":
            self.ctl("steering", DEV, "auto")
        wait_carrier(self.require_guest(), True)
        self.guest_ping(1)


def wait_carrier(guest: Guest, up: bool, timeout: float = 20.0) -> None:
    want = "1" if up else "0"
    guest.wait_until(
        f'[ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" = {want} ]',
        timeout=timeout,
        interval=0.2,
    )


def rx_packets(stats: dict[str, Any]) -> list[int]:
    return [int(q["rx"]["packets"]) for q in stats["queues"]]


def tx_packets(stats: dict[str, Any]) -> list[int]:
    return [int(q["tx"]["packets"]) for q in stats["queues"]]


def deltas(before: Sequence[int], after: Sequence[int]) -> list[int]:
    return [a - b for a, b in zip(after, before, strict=True)]


@pytest.fixture(scope="module", name="admin_stack")
def admin_stack_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminStack]:
    workdir = tmp_path_factory.mktemp("vn-admin")
    with open_stack(AdminStack, ADMIN_CONFIG, workdir) as stack:
        ns = stack.ns
        stack.start_server()
        guest = stack.boot_guest("adm-guest1", stack.socket_path, 2, ns.guest_addr(), ns.host_addr)
        stack.guest = guest
        missing = [t for t in GUEST_TOOLS if guest.run(f"command -v {t}", timeout=30)[0] != 0]
        require(not missing, f"guest image lacks {', '.join(missing)}")
        guest.check(f"ethtool -L eth0 combined {PAIRS}")
        tap_mac = ns.run(["cat", f"/sys/class/net/{TAP0}/address"]).stdout.strip()
        guest.check(f"arp -s {ns.host_addr} {tap_mac}")
        ns.ip(
            "neigh", "replace", ns.guest_addr(), "lladdr", DEV_MAC, "dev", TAP0, "nud", "permanent"
        )
        stack.guest_ping(1)
        yield stack


@pytest.fixture(name="stack")
def stack_fixture(admin_stack: AdminStack) -> AdminStack:
    admin_stack.ensure_ready()
    return admin_stack


# --- 1. every command against the live daemon ---------------------------------------------------


def test_read_commands_tables_and_json(stack: AdminStack) -> None:
    """version, help, list, show, queues, stats: exit 0, tables and JSON agree with the
    live device (client connected, DRIVER_OK, features, MAC, MTU, both pairs' rings)."""
    pid = stack.daemon_pid()

    out = stack.ctl("version")
    assert out.strip() == f"vfiouser-net {__version__} (admin protocol 1), pid {pid}", out
    assert stack.ctl_json("version") == {"version": __version__, "protocol": 1, "pid": pid}

    out = stack.ctl("help")
    for spec in p.COMMANDS.values():
        assert spec.usage() in out, f"help lacks {spec.usage()!r}:\n{out}"
    described = stack.ctl_json("help")["commands"]
    assert [c["name"] for c in described] == list(p.COMMANDS)
    one = stack.ctl_json("help", "steering")["commands"]
    assert len(one) == 1 and one[0]["name"] == "steering", one
    assert one[0]["args"][1]["choices"] == list(p.STEERING_POLICIES), one

    # list: the table (from outside and inside the namespace) and JSON.
    for in_netns in (False, True):
        out = stack.ctl("list", in_netns=in_netns)
        lines = out.splitlines()
        assert lines[0].split() == [
            "NAME", "SOCKET", "TAP", "CLIENT", "LINK", "DRIVER", "PAIRS", "STEERING",
        ], out  # fmt: skip
        assert len(lines) == 2, out
        assert lines[1].split() == [
            DEV, str(stack.socket_path), TAP0, "yes", "up", "DRIVER_OK", "2/2", "auto", "(rss)",
        ], out  # fmt: skip
    devices = stack.ctl_json("list")["devices"]
    assert len(devices) == 1, devices
    d = devices[0]
    assert (d["name"], d["socket"], d["tap"]) == (DEV, str(stack.socket_path), TAP0), d
    assert d["connected"] is True and d["link_up"] is True, d
    assert d["status_names"] == ["ACKNOWLEDGE", "DRIVER", "FEATURES_OK", "DRIVER_OK"], d
    assert (d["active_queue_pairs"], d["max_queue_pairs"]) == (PAIRS, PAIRS), d
    assert (d["policy"], d["effective"]) == ("auto", "rss"), d

    # show
    out = stack.ctl("show", DEV)
    for pattern in (
        rf"^device {DEV}$",
        r"^\s+client:\s+connected$",
        r"^\s+driver status:\s+0x0f ACKNOWLEDGE\|DRIVER\|FEATURES_OK\|DRIVER_OK$",
        rf"^\s+mac:\s+{DEV_MAC}$",
        rf"^\s+mtu:\s+{DEV_MTU}$",
        r"^\s+link:\s+up$",
        rf"^\s+queue pairs:\s+{PAIRS} active of {PAIRS} \(queue size 256\)$",
        r"^\s+steering:\s+auto, effective rss, \d+ switch(es)?$",
        r"^\s+rss:\s+hash types \S*UDPv4\S*, unclassified queue 0$",
        r"^\s+rss table:\s+128 entries$",
    ):
        assert re.search(pattern, out, re.M), f"show lacks {pattern!r}:\n{out}"
    features_text = out.split("features:", 1)[1].split("offered:", 1)[0].split()
    offered_text = out.split("offered:", 1)[1].split("mac:", 1)[0].split()
    show = stack.show()
    assert offered_text == show["offered_features"], (offered_text, show["offered_features"])
    assert set(show["features"]) <= set(show["offered_features"])
    assert features_text == show["features"], (features_text, show["features"])
    assert show["connected"] is True and show["driver_ok"] is True, show
    assert show["needs_reset"] is False, show
    for feature in ("VERSION_1", "MAC", "MTU", "STATUS", "CTRL_VQ", "MQ", "RSS", "MRG_RXBUF"):
        assert feature in show["features"], (feature, show["features"])
    assert show["mac"] == show["configured_mac"] == show["rx_filter"]["mac"] == DEV_MAC, show
    assert show["mtu"] == DEV_MTU and show["max_queue_pairs"] == PAIRS, show
    rss = show["steering"]["rss"]
    assert rss["configured"] is True and len(rss["table"]) == 128, rss
    assert set(rss["table"]) == {0, 1}, rss
    guest = stack.require_guest()
    mac, mtu = guest.check("cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu").split()
    assert (mac, int(mtu)) == (DEV_MAC, DEV_MTU)

    # queues: ring state before and after some guest traffic.
    before = stack.ctl_json("queues", DEV)
    stack.guest_ping(5)
    out = stack.ctl("queues", DEV)
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["QUEUE", "KIND", "PAIR", "STATE"], out
    rows = [line.split() for line in lines[1:]]
    assert [r[:4] for r in rows] == [
        ["0", "rx", "0", "ready"], ["1", "tx", "0", "ready"],
        ["2", "rx", "1", "ready"], ["3", "tx", "1", "ready"],
        ["4", "ctrl", "-", "ready"],
    ], out  # fmt: skip
    after = stack.ctl_json("queues", DEV)
    assert after["device"] == DEV
    queues = after["queues"]
    assert [(q["index"], q["kind"], q["pair"]) for q in queues] == [
        (0, "rx", 0), (1, "tx", 0), (2, "rx", 1), (3, "tx", 1), (4, "ctrl", None),
    ], queues  # fmt: skip
    for q in queues:
        assert q["configured"] and q["ready"] and not q["broken"], q
        assert q["size"] == 256 and q["event_idx"] is True, q
        avail, last, used = q["avail_idx"], q["last_avail_idx"], q["used_idx"]
        assert q["in_flight"] == (avail - used) & 0xFFFF, q
        # The device has consumed no more than the driver made available.
        assert (last - used) & 0xFFFF <= (avail - used) & 0xFFFF, q
        if q["kind"] == "rx":
            assert q["in_flight"] > 0, f"no receive buffers posted: {q}"
    vectors = [q["msix_vector"] for q in queues if q["kind"] != "ctrl"]
    assert len(set(vectors)) == len(vectors), vectors
    grown = sum(
        (a["used_idx"] - b["used_idx"]) & 0xFFFF
        for a, b in zip(queues, before["queues"], strict=True)
        if a["kind"] == "tx"
    )
    assert grown >= 5, f"5 echo requests moved the tx used indices by {grown}"

    # stats: counters grow with a ping.
    s0 = stack.stats()
    stack.guest_ping(5)
    s1 = stack.stats()
    assert s1["device"] == DEV and len(s1["queues"]) == PAIRS, s1
    assert sum(deltas(tx_packets(s0), tx_packets(s1))) >= 5, (s0["queues"], s1["queues"])
    assert sum(deltas(rx_packets(s0), rx_packets(s1))) >= 5, (s0["queues"], s1["queues"])
    assert s1["counters"]["needs_reset"] == 0, s1
    out = stack.ctl("stats", DEV)
    assert out.splitlines()[0] == f"device {DEV}", out
    table = [line.split() for line in out.splitlines()[1:7]]
    assert table[0][:4] == ["PAIR", "DIR", "PACKETS", "BYTES"], out
    assert [r[:2] for r in table[1:]] == [
        ["0", "rx"], ["0", "tx"], ["1", "rx"], ["1", "tx"], ["-", "ctrl"],
    ], out  # fmt: skip
    assert "device counters:" in out, out


def test_log_level(stack: AdminStack) -> None:
    """log-level debug makes read-only commands show up in the daemon's log; info stops it."""
    marker = r"admin: list .*\(from pid \d+ uid 0\)"
    base = stack.log_count(marker)
    set_debug, set_info = r"INFO .*: log level debug$", r"INFO .*: log level info$"
    levels = stack.log_count(set_debug), stack.log_count(set_info)
    try:
        assert stack.ctl("log-level", "debug").strip() == "log level debug"
        stack.ctl("list")
        stack.ctl("list")
        assert stack.log_count(marker) == base + 2, stack.log()[-2000:]
    finally:
        assert stack.ctl_json("log-level", "info") == {"level": "info"}
    now = stack.log_count(marker)
    stack.ctl("list")
    assert stack.log_count(marker) == now, "list still logged at level info"
    assert (stack.log_count(set_debug), stack.log_count(set_info)) == (levels[0] + 1, levels[1] + 1)


# --- 2. link ------------------------------------------------------------------------------------


def test_link_down_and_up(stack: AdminStack) -> None:
    guest = stack.require_guest()
    try:
        assert stack.ctl("link", DEV, "down").strip() == f"{DEV}: link down"
        wait_carrier(guest, False)
        assert "NO-CARRIER" in guest.check("ip link show eth0")
        code, _ = guest.run(f"ping -c 2 -W 1 {stack.host_addr}", timeout=30)
        assert code != 0, "ping went through with the link down"
        show = stack.show()
        assert show["link_up"] is False and show["operator_link_up"] is False, show
        assert re.search(
            r"^\s+link:\s+down \(operator switch down\)$", stack.ctl("show", DEV), re.M
        )
        assert stack.ctl_json("list")["devices"][0]["link_up"] is False
    finally:
        up = stack.ctl_json("link", DEV, "up")
    assert up == {"device": DEV, "operator_link_up": True, "link_up": True, "tap": TAP0}, up
    wait_carrier(guest, True)
    assert "NO-CARRIER" not in guest.check("ip link show eth0")
    stack.guest_ping(3)
    assert stack.show()["link_up"] is True


# --- 3. steering --------------------------------------------------------------------------------


def send_udp_flows(stack: AdminStack) -> None:
    stack.ns.run(
        [sys.executable, "-c", _UDP_FLOWS, stack.guest_addr, str(UDP_FLOWS), str(UDP_PER_FLOW)]
    )


def rx_after_flows(stack: AdminStack) -> list[int]:
    """Per-pair rx packets the device placed for the guest during one burst of flows."""
    before = rx_packets(stack.stats())
    send_udp_flows(stack)
    want = UDP_FLOWS * UDP_PER_FLOW
    deadline = time.monotonic() + 15
    last: list[int] | None = None
    while True:
        now = rx_packets(stack.stats())
        got = deltas(before, now)
        if (sum(got) >= want and now == last) or time.monotonic() > deadline:
            log.info("rx per pair for %d datagrams: %s", want, got)
            return got
        last = now
        time.sleep(0.3)


def reset_lines(stack: AdminStack) -> int:
    return stack.log_count(rf"device {DEV}: .*reset") + stack.log_count(r": driver ready \(")


def test_steering_single_then_rss(stack: AdminStack) -> None:
    guest = stack.require_guest()
    resets = stack.stats()["resets"]
    lines = reset_lines(stack)
    switches = stack.show()["steering"]["switches"]
    try:
        out = stack.ctl("steering", DEV, "single").strip()
        assert re.fullmatch(rf"{DEV}: steering single \(effective single, \d+ switches\)", out), out
        show = stack.show()
        assert (show["policy"], show["effective"]) == ("single", "single"), show
        assert show["steering"]["switches"] > switches, show["steering"]
        got = rx_after_flows(stack)
        assert got[1] == 0, f"steering single: pair 1 received {got[1]} frames ({got})"
        assert got[0] >= UDP_FLOWS * UDP_PER_FLOW * 0.9, got

        result = stack.ctl_json("steering", DEV, "rss")
        assert (result["device"], result["policy"], result["effective"]) == (DEV, "rss", "rss")
        assert result["switches"] > show["steering"]["switches"], result
        got = rx_after_flows(stack)
        total = sum(got)
        assert total >= UDP_FLOWS * UDP_PER_FLOW * 0.9, got
        assert min(got) >= total // 8, f"steering rss: {UDP_FLOWS} flows not spread: {got}"
    finally:
        stack.ctl("steering", DEV, "auto")
    # No reset: not in the device's counters, not in the log, not in the guest.
    assert stack.stats()["resets"] == resets
    assert reset_lines(stack) == lines, stack.log()[-3000:]
    assert guest.check("cat /sys/class/net/eth0/operstate /sys/class/net/eth0/carrier").split() == [
        "up",
        "1",
    ]
    assert re.findall(r"^Combined:\s+(\d+)", guest.check("ethtool -l eth0"), re.M) == ["2", "2"]
    show = stack.show()
    assert show["driver_ok"] and (show["policy"], show["effective"]) == ("auto", "rss"), show


# --- 4. capture ---------------------------------------------------------------------------------


@contextlib.contextmanager
def guest_pinging(
    stack: AdminStack, *, cpu: int | None = None, size: int = 56, count: int = 400
) -> Iterator[None]:
    """The guest pings the host every 50 ms in the background (optionally pinned)."""
    guest = stack.require_guest()
    pin = f"taskset -c {cpu} " if cpu is not None else ""
    out = guest.check(
        f"{pin}ping -c {count} -i 0.05 -s {size} {stack.host_addr} >/dev/null 2>&1 & echo $!"
    )
    pid = re.findall(r"^(\d+)$", out, re.M)[-1]
    try:
        yield
    finally:
        guest.run(f"kill {pid}", timeout=30)


def echoes(records: Sequence[PcapRecord]) -> list[Icmp]:
    return [e for r in records if (e := parse_icmp_echo(r.data)) is not None]


def test_capture(stack: AdminStack, tmp_path: Path) -> None:
    guest_ip, host_ip = stack.guest_addr, stack.host_addr
    tap_mac = stack.ns.run(["cat", f"/sys/class/net/{TAP0}/address"]).stdout.strip()

    # All pairs, 10 frames, while the guest pings the host.
    captures = stack.capture_dir
    path = captures / "all.pcap"
    with guest_pinging(stack):
        t0 = time.time_ns()
        out = stack.ctl("capture", DEV, "--count", "10", "--file", "all.pcap")
        t1 = time.time_ns()
    assert out.splitlines() == [f"file: {path}", "frames: 10", "missed: 0"], out
    st = path.stat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) & ~0o640 == 0, oct(st.st_mode)
    records = read_pcap(path)
    assert len(records) == 10, records
    for r in records:
        assert t0 - 1_000_000_000 <= r.ts_ns <= t1 + 1_000_000_000, (t0, r.ts_ns, t1)
        assert r.orig_len == len(r.data) and len(r.data) >= 14, r
    icmp = echoes(records)
    requests = [e for e in icmp if e.type == ICMP_ECHO_REQUEST]
    replies = [e for e in icmp if e.type == ICMP_ECHO_REPLY]
    assert requests and replies, f"no echo request/reply pair in {icmp}"
    for e in requests:
        assert (e.eth_src, e.eth_dst, e.ip_src, e.ip_dst) == (DEV_MAC, tap_mac, guest_ip, host_ip)
    for e in replies:
        assert (e.eth_src, e.eth_dst, e.ip_src, e.ip_dst) == (tap_mac, DEV_MAC, host_ip, guest_ip)

    # One pair: the guest pings from both CPUs (XPS: CPU k sends on pair k), with
    # payload sizes that tell the two apart; only that pair's requests are kept.
    for queue, size, other in (
        (1, PING_SIZE_CPU1, PING_SIZE_CPU0),
        (0, PING_SIZE_CPU0, PING_SIZE_CPU1),
    ):
        path = captures / f"queue{queue}.pcap"
        with (
            guest_pinging(stack, cpu=0, size=PING_SIZE_CPU0),
            guest_pinging(stack, cpu=1, size=PING_SIZE_CPU1),
        ):
            result = stack.ctl_json(
                "capture", DEV, "--queue", str(queue), "--count", "12", "--file", path.name
            )
        assert result == {"file": str(path), "frames": 12, "missed": 0}, result
        sizes = {e.payload_len for e in echoes(read_pcap(path)) if e.type == ICMP_ECHO_REQUEST}
        assert size in sizes, f"--queue {queue}: no echo request of {size} bytes ({sizes})"
        assert other not in sizes, f"--queue {queue} captured the other CPU's requests: {sizes}"
    err = stack.ctl("capture", DEV, "--queue", "2", "--count", "1", "--file", "q2.pcap", expect=1)
    assert "queue pairs 0..1" in err and "[bad_request]" in err, err

    # Refused: an existing file (left as it was), a link planted in the capture
    # directory (its target not created).
    existing = captures / "existing.pcap"
    existing.write_bytes(b"precious")
    err = stack.ctl("capture", DEV, "--count", "1", "--file", existing.name, expect=1)
    assert "File exists" in err, err
    assert existing.read_bytes() == b"precious"
    proc = stack.ctl_run("capture", DEV, "--count", "1", "--file", existing.name, json_out=True)
    assert proc.returncode == 1 and "File exists" in json.loads(proc.stdout)["error"]["message"]
    link, target = captures / "link.pcap", tmp_path / "target"
    link.symlink_to(target)
    err = stack.ctl("capture", DEV, "--count", "1", "--file", link.name, expect=1)
    assert not target.exists() and link.is_symlink(), err

    # Anything but a file name: ctl refuses it (usage, exit 2), and so does the
    # daemon when a client sends it; nothing is created anywhere.
    for name in (str(tmp_path / "abs.pcap"), "../up.pcap", "sub/x.pcap", ""):
        err = stack.ctl("capture", DEV, "--count", "1", "--file", name, expect=2)
        assert "argument 'file'" in err, err
    with p.AdminClient(stack.admin_socket) as client:
        for name in (str(tmp_path / "abs.pcap"), "../up.pcap", "sub/x.pcap", ".."):
            with pytest.raises(p.RemoteError) as info:
                client.call("capture", {"device": DEV, "count": 1, "file": name})
            assert info.value.code == p.BAD_REQUEST and "'file'" in info.value.message
        with pytest.raises(p.RemoteError) as info:
            client.call("capture", {"device": DEV, "count": 1, "file": "x.pcap", "seconds": 1})
        assert info.value.code == p.BAD_REQUEST, info.value
    assert not (tmp_path / "abs.pcap").exists() and not (captures.parent / "up.pcap").exists()
    # ctl's working directory plays no part: the file lands in the capture directory.
    with guest_pinging(stack):
        out = stack.ctl("capture", DEV, "--count", "2", "--file", "cwd.pcap", cwd=str(tmp_path))
    assert f"file: {captures / 'cwd.pcap'}" in out and len(read_pcap(captures / "cwd.pcap")) == 2
    assert not (tmp_path / "cwd.pcap").exists()
    assert sorted(f.name for f in captures.iterdir()) == [
        "all.pcap", "cwd.pcap", "existing.pcap", "link.pcap", "queue0.pcap", "queue1.pcap"
    ]  # fmt: skip


def capture_backlog(stack: AdminStack) -> int:
    """Bytes queued on the daemon's datagram UNIX sockets (the capture socket pair)."""
    out = stack.ns.run(["ss", "-xpH"]).stdout
    total = 0
    for line in out.splitlines():
        fields = line.split()
        if fields[0] == "u_dgr" and f"pid={stack.daemon_pid()}," in line:
            total += int(fields[2]) + int(fields[3])
    return total


def test_refused_capture_leaves_no_capture_running(stack: AdminStack) -> None:
    existing = stack.capture_dir / "refused.pcap"
    existing.write_bytes(b"precious")
    with guest_pinging(stack):
        assert capture_backlog(stack) == 0
        stack.ctl("capture", DEV, "--seconds", "1", "--file", existing.name, expect=1)
        time.sleep(2)
        backlog = capture_backlog(stack)
    assert backlog == 0, f"{backlog} bytes of frames captured after the capture was refused"


# --- 5. add and remove at run time --------------------------------------------------------------


def test_add_remove_readd(stack: AdminStack) -> None:
    ns = stack.ns
    sock = stack.run_dir / "vn1.sock"
    host1, guest1 = f"10.202.{ns.index}.1", f"10.202.{ns.index}.2"
    add_args = ("add", "--socket", str(sock), "--tap", TAP1, "--name", DEV2, "--mac", DEV2_MAC)
    dev_rx0 = sum(rx_packets(stack.stats()))
    with (
        ns.tap(TAP1, address=f"{host1}/24"),
        BackgroundPing(ns, stack.guest_addr) as bg,
        contextlib.ExitStack() as cleanup,
    ):
        cleanup.callback(stack.remove_quietly, DEV2)
        out = stack.ctl(*add_args).strip()
        assert out == f"added {DEV2}: socket {sock}, TAP {TAP1}, 1 queue pair(s), steering auto"
        assert sock.exists()
        # What cannot be added.
        err = stack.ctl(*add_args, expect=1)
        assert "already exists" in err, err
        other = ("--socket", str(stack.run_dir / "vn9.sock"), "--name", "vn9")
        assert f"already used by {DEV}" in stack.ctl("add", *other, "--tap", TAP0, expect=1)
        err = stack.ctl("add", "--socket", str(sock), "--tap", "vntap9", "--name", "vn9", expect=1)
        assert f"already served by {DEV2}" in err, err
        assert "no device named" in stack.ctl("remove", "vn9", expect=1)
        devices = {d["name"]: d for d in stack.ctl_json("list")["devices"]}
        assert set(devices) == {DEV, DEV2} and devices[DEV2]["connected"] is False, devices

        for round_ in (1, 2):
            guest = stack.boot_guest(f"adm-guest{round_ + 1}", sock, 1, guest1, host1)
            try:
                show = stack.show(DEV2)
                assert show["connected"] and show["driver_ok"], show
                assert (show["mac"], show["max_queue_pairs"], show["tap"]) == (DEV2_MAC, 1, TAP1)
                s0 = stack.stats(DEV2)
                stack.guest_ping(5, guest, host1)
                s1 = stack.stats(DEV2)
                assert sum(deltas(rx_packets(s0), rx_packets(s1))) >= 5, (s0, s1)
                assert sum(deltas(tx_packets(s0), tx_packets(s1))) >= 5, (s0, s1)
                assert stack.ctl("remove", DEV2).strip() == f"removed {DEV2}"
                assert [d["name"] for d in stack.ctl_json("list")["devices"]] == [DEV]
                assert not sock.exists()
                # Its QEMU lost the device: no traffic goes through any more.
                with contextlib.suppress(GuestError):
                    code, _ = guest.run(f"ping -c 1 -W 1 {host1}", timeout=15)
                    assert code != 0, "the removed device still carries traffic"
            finally:
                guest.kill()
                guest.close()
            if round_ == 1:
                out = stack.ctl(*add_args).strip()
                assert out.startswith(f"added {DEV2}: socket {sock}"), out
        cleanup.pop_all()
        pings = bg.stop()
    log.info(
        "guest 1 answered %d of %d pings, longest gap %d",
        pings.received,
        pings.transmitted,
        pings.max_gap(),
    )
    assert pings.transmitted >= 20, pings.output[-2000:]
    assert pings.received >= pings.transmitted * 0.95, pings.output[-2000:]
    assert pings.max_gap() <= 10, f"guest 1 stopped answering:\n{pings.output[-3000:]}"
    assert sum(rx_packets(stack.stats())) - dev_rx0 >= pings.received
    assert [d["name"] for d in stack.ctl_json("list")["devices"]] == [DEV]
    stack.guest_ping(3)


# --- 6. hostile admin input -----------------------------------------------------------------


def test_hostile_frames(stack: AdminStack) -> None:
    """Malformed input gets an error reply (the connection stays usable) or, where the
    stream cannot be trusted, a close; none of it reaches the device."""
    path = stack.admin_socket
    resets = stack.stats()["resets"]

    def bad_then_good(body: bytes, code: str, request_id: int | None, text: str = "") -> None:
        replies, closed = raw_session(path, frame(body) + version_frame())
        assert len(replies) == 2 and closed, (replies, closed)
        assert_error(replies[0], code, request_id, text)
        assert_version_ok(replies[1])

    req = p.make_request
    # Bodies that are not msgpack, or not a request.
    bad_then_good(b"\xc1\xc1\xc1", p.BAD_REQUEST, None, "malformed message")
    bad_then_good(b"", p.BAD_REQUEST, None, "malformed message")
    bad_then_good(b"\x91" * 200_000 + b"\xc0", p.BAD_REQUEST, None, "malformed message")
    bad_then_good(b"\xdd\xff\xff\xff\xff", p.BAD_REQUEST, None, "malformed message")
    bad_then_good(b"\xa3\xff\xfe\xfd", p.BAD_REQUEST, None, "malformed message")
    bad_then_good(b"\x81\x01\x02", p.BAD_REQUEST, None, "malformed message")  # {1: 2}
    bad_then_good(p.pack([1, "list", {}]), p.BAD_REQUEST, None, "must be a map")
    bad_then_good(os.urandom(512) + b"\xc1", p.BAD_REQUEST, None)
    # Wrong types and values.
    bad_then_good(p.pack({"v": 1, "id": "1", "cmd": "list"}), p.BAD_REQUEST, None, "'id'")
    bad_then_good(p.pack({"v": 1, "id": True, "cmd": "list"}), p.BAD_REQUEST, None, "'id'")
    bad_then_good(p.pack({"v": 1, "id": 1.0, "cmd": "list"}), p.BAD_REQUEST, None, "'id'")
    bad_then_good(p.pack({"v": 1, "id": 3, "cmd": 5}), p.BAD_REQUEST, 3, "'cmd'")
    bad_then_good(p.pack({"v": 1, "id": 4, "cmd": "list", "args": []}), p.BAD_REQUEST, 4, "'args'")
    bad_then_good(p.pack({"v": 1, "id": 5}), p.BAD_REQUEST, 5, "missing field 'cmd'")
    bad_then_good(p.pack({**req(6, "list"), "x": 1}), p.BAD_REQUEST, 6, "unknown field")
    bad_then_good(p.pack(req(7, "show", {"device": 5})), p.BAD_REQUEST, 7, "must be a string")
    bad_then_good(p.pack(req(8, "show", {})), p.BAD_REQUEST, 8, "missing argument")
    bad_then_good(
        p.pack(req(9, "link", {"device": DEV, "state": "sideways"})), p.BAD_REQUEST, 9, "one of"
    )
    bad_then_good(p.pack(req(10, "show", {"device": "x" * 5000})), p.BAD_REQUEST, 10, "longer than")
    bad_then_good(p.pack(req(11, "show", {"device": "vn0\0"})), p.BAD_REQUEST, 11, "NUL")
    bad_then_good(
        p.pack(req(12, "capture", {"device": DEV, "count": True, "file": "/tmp/x.pcap"})),
        p.BAD_REQUEST, 12, "must be an integer",
    )  # fmt: skip
    bad_then_good(
        p.pack(req(13, "capture", {"device": DEV, "seconds": float("nan"), "file": "/x"})),
        p.BAD_REQUEST, 13, "finite",
    )  # fmt: skip
    bad_then_good(
        p.pack(req(14, "add", {"socket": "/tmp/s", "tap": "t", "queue_pairs": 10**6})),
        p.BAD_REQUEST, 14, "at most",
    )  # fmt: skip
    bad_then_good(
        p.pack(req(15, "list", {str(i): i for i in range(20_000)})), p.BAD_REQUEST, 15, "unknown"
    )
    bad_then_good(p.pack(req(16, "show", {"device": "nope"})), p.NO_SUCH_DEVICE, 16)
    # Unknown command, other protocol versions.
    bad_then_good(p.pack(req(17, "reboot")), p.UNKNOWN_COMMAND, 17, "'reboot'")
    bad_then_good(p.pack({**req(18, "list"), "v": 2}), p.UNSUPPORTED_VERSION, 18)
    bad_then_good(p.pack({**req(19, "list"), "v": "1"}), p.BAD_REQUEST, 19, "'v'")
    bad_then_good(p.pack({"id": 20, "cmd": "list"}), p.BAD_REQUEST, 20, "missing field 'v'")

    # A 100 MB length prefix: too_large, then the daemon closes (we keep our side open).
    replies, closed = raw_session(path, struct.pack(">I", 100 << 20) + b"\0" * 64, half_close=False)
    assert closed and len(replies) == 1, (replies, closed)
    assert_error(replies[0], p.TOO_LARGE, None, "exceeds the limit")
    # Text where a frame should be: "GET " is a length of 1.2 GB.
    replies, closed = raw_session(path, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", half_close=False)
    assert closed and len(replies) == 1, (replies, closed)
    assert_error(replies[0], p.TOO_LARGE, None)
    # Truncated frames: closed without a reply (nothing was executed).
    for payload in (b"\x00\x00", struct.pack(">I", 100) + b"x" * 10, version_frame()[:-1]):
        replies, closed = raw_session(path, payload)
        assert closed and replies == [], (payload, replies)
    # Several requests in one write, answered in order.
    replies, closed = raw_session(path, version_frame(1) + version_frame(2) + version_frame(3))
    assert closed and [r["id"] for r in replies] == [1, 2, 3], replies

    assert stack.log_count(r"Traceback|internal error") == 0, stack.log()[-4000:]
    assert stack.ctl_json("list")["devices"][0]["connected"] is True
    assert stack.stats()["resets"] == resets
    stack.guest_ping(3)


def test_too_many_connections(stack: AdminStack) -> None:
    """The 17th concurrent connection gets 'busy' and is closed; the others are unharmed."""
    conns: list[socket.socket] = []
    try:
        for i in range(16):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conns.append(s)
            s.settimeout(10)
            s.connect(stack.admin_socket)
            s.sendall(version_frame(i))
            body = p.recv_frame(s, p.MAX_FRAME, 10, 10)
            assert body is not None
            assert_version_ok(p.unpack(body), i)
        replies, closed = raw_session(stack.admin_socket, version_frame(), half_close=False)
        assert closed and len(replies) == 1, (replies, closed)
        assert_error(replies[0], p.BUSY, None)
        proc = stack.ctl_run("list")
        assert proc.returncode == 1 and "[busy]" in proc.stderr, (proc.stdout, proc.stderr)
        # An admitted connection still works.
        conns[0].sendall(version_frame(42))
        body = p.recv_frame(conns[0], p.MAX_FRAME, 10, 10)
        assert body is not None
        assert_version_ok(p.unpack(body), 42)
    finally:
        for s in conns:
            s.close()
    deadline = time.monotonic() + 10
    while (proc := stack.ctl_run("list")).returncode != 0:
        assert time.monotonic() < deadline, proc.stderr
        time.sleep(0.1)


def test_other_users_refused(stack: AdminStack) -> None:
    """mode 0600: uid 65534 cannot connect; with the mode opened, the daemon's own
    SO_PEERCRED check closes on it without a reply (and without running anything)."""
    path = stack.admin_socket
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    assert st.st_uid == 0
    assert stat.S_IMODE(os.stat(stack.run_dir).st_mode) & 0o001, "test set-up: dir not 0755"
    link_down = request_frame(p.make_request(1, "link", {"device": DEV, "state": "down"}))

    child = connect_as(NOBODY, path, link_down)
    assert child["uid"] == child["euid"] == NOBODY, child
    assert child["connect"] == errno.EACCES, child

    refused = r"admin socket: refused connection from pid \d+ uid 65534"
    base = stack.log_count(refused)
    links = stack.log_count(r"admin: link ")
    os.chmod(path, 0o666)
    try:
        child = connect_as(NOBODY, path, link_down)
    finally:
        os.chmod(path, 0o600)
    assert child["connect"] == 0 and child.get("reply") == "", child
    assert child.get("eof") or child.get("error") in (errno.ECONNRESET, errno.EPIPE), child
    assert stack.log_count(refused) == base + 1, stack.log()[-2000:]
    show = stack.show()
    assert show["operator_link_up"] is True and show["link_up"] is True, show
    assert stack.log_count(r"admin: link ") == links, "a refused peer's request was executed"
    stack.guest_ping(3)


# --- 7. the end -----------------------------------------------------------------------------------


def test_sigterm_stops_cleanly(admin_stack: AdminStack) -> None:
    stack = admin_stack
    stack.require_server()
    assert stack.server is not None
    assert stack.server.stop() == 0, stack.server.log()[-3000:]
    log_text = stack.server.log()
    assert not os.path.exists(stack.admin_socket) and not stack.socket_path.exists()
    assert "admin socket: closed" in log_text and "Traceback" not in log_text, log_text[-3000:]
    proc = stack.ctl_run("list")
    assert proc.returncode == 3, (proc.returncode, proc.stderr)
