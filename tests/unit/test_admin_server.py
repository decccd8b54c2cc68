"""The admin socket against a fake daemon: every command, hostile clients, permissions.

No QEMU and no datapath: FakeDaemon/FakeDevice stand in for Daemon and
VirtioNetDevice with the same methods and result shapes. The tests run as
root; peers with other credentials are child processes started with another
uid (subprocess's user=/group=, i.e. setuid/setgid before exec).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import re
import resource
import shutil
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
from vfiouser_net_harness.fake_snapshot import fake_snapshot
from vfiouser_net_harness.prereq import require

from vfiouser_net import cli
from vfiouser_net.admin import protocol as p
from vfiouser_net.admin.commands import CaptureRequest, CommandError
from vfiouser_net.admin.server import AdminServer, AdminServerError, start_admin_server
from vfiouser_net.capture import DEFAULT_CAPTURE_DIR, CaptureError, create_capture_file
from vfiouser_net.cli import capture_hook
from vfiouser_net.config import ConfigError, DaemonConfig
from vfiouser_net.counters import format_mac
from vfiouser_net.daemon import DaemonError
from vfiouser_net.device_options import DeviceError, DeviceOptions, parse_mac
from vfiouser_net.snapshot import DeviceSnapshot, SteeringState

NOBODY = 65534
PCAP_HEADER = b"\x4d\x3c\xb2\xa1" + bytes(20)

# -- fakes ------------------------------------------------------------------------------


def dir_stats(packets: int = 0, drops: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "packets": packets,
        "bytes": packets * 100,
        "doorbells": packets // 2,
        "interrupts": packets // 4,
        "interrupts_suppressed": 1,
        "interrupts_coalesced": 1,
        "ring_full": 0,
        "batches": packets // 8,
        "bounced": 0,
        "steered_out": 0,
        "avail_seen": packets & 0xFFFF,
        "used_idx": packets & 0xFFFF,
        "batch_hist": [0] * 10,
        "size_hist": [0] * 11,
        "drops": {"mac_filter": 0, "link_down": 0, **(drops or {})},
        "errors": {"desc_addr": 0, "desc_loop": 0},
    }


@dataclass
class FakeDevice:
    opts: DeviceOptions
    name: str = ""
    connected: bool = False
    status: int = 0
    features: list[str] = field(default_factory=list)
    tap_up: bool = True
    operator_link_up: bool = True
    active_qps: int = 0
    switches: int = 0
    rss_configured: bool = False
    fail: Exception | None = None  # raised by snapshot()
    calls: list[tuple[str, Any]] = field(default_factory=list)
    resets: dict[str, int] = field(default_factory=dict)
    config_interrupts: int = 0
    stopped: bool = False

    def __post_init__(self) -> None:
        self.name = self.name or self.opts.name or os.path.basename(self.opts.socket_path)

    def capture(
        self, directory: str, name: str, *, queue: int, count: int, seconds: float
    ) -> dict[str, Any]:
        """VirtioNetDevice.capture without a datapath: the file, a pcap header, no frames."""
        fd, path = create_capture_file(directory, name)
        with os.fdopen(fd, "wb") as out:
            out.write(PCAP_HEADER)
        self.calls.append(("capture", (queue, count, seconds)))
        return {"file": path, "frames": 0, "missed": 0}

    @property
    def link_up(self) -> bool:
        return self.operator_link_up and self.tap_up

    def steering(self) -> SteeringState:
        policy = self.opts.steering
        effective = policy
        if policy == "auto":
            effective = "rss" if self.rss_configured else "rx-follows-tx"
        return SteeringState.from_dict(
            {
                "policy": policy,
                "effective": effective,
                "active_queue_pairs": self.active_qps,
                "max_queue_pairs": self.opts.queue_pairs,
                "switches": self.switches,
                "rss": {
                    "configured": self.rss_configured,
                    "hash_types": 0b111111 if self.rss_configured else 0,
                    "table": [i % self.opts.queue_pairs for i in range(128)]
                    if self.rss_configured
                    else [],
                    "unclassified_queue": 0,
                    "key": "6d5a56da" * 5 if self.rss_configured else "",
                },
            }
        )

    def snapshot(self) -> DeviceSnapshot:
        if self.fail is not None:
            raise self.fail
        return fake_snapshot(
            {
                "name": self.name,
                "socket": self.opts.socket_path,
                "tap": self.opts.tap,
                "connected": self.connected,
                "status": self.status,
                "features": list(self.features),
                "link_up": self.link_up,
                "mtu": self.opts.mtu,
                "tap_io": "io_uring",
                "queue_pairs": self.opts.queue_pairs,
                "steering": self.steering().to_dict(),
                "rx_filter": {
                    "mac": "52:54:00:aa:bb:cc" if self.connected else format_mac(self.opts.mac),
                    "promisc": False,
                    "allmulti": True,
                    "unicast": [],
                    "multicast": ["33:33:00:00:00:01"],
                    "uni_overflow": False,
                    "multi_overflow": False,
                },
                "queues": [
                    {"rx": dir_stats(1000 * (i + 1), {"mac_filter": i}), "tx": dir_stats(500)}
                    for i in range(self.opts.queue_pairs)
                ],
                "ctrl": dir_stats(7),
                "device": {
                    "ctrl_ok": 7,
                    "ctrl_err": 1,
                    "needs_reset": 0,
                    "steering_switches": self.switches,
                    "ctrl_cmds": {"4": {"0": [1, 0]}},
                },
            }
        )

    def set_steering(self, policy: str) -> None:
        if policy not in p.STEERING_POLICIES:
            raise DeviceError(f"unknown steering policy {policy!r}")
        self.calls.append(("set_steering", policy))
        self.opts.steering = policy
        self.switches += 1

    def set_link(self, up: bool) -> None:
        self.calls.append(("set_link", up))
        before = self.link_up
        self.operator_link_up = up
        if self.link_up != before:
            self.config_interrupts += 1

    def ring_state(self) -> list[dict[str, Any]]:
        out = []
        n = 2 * self.opts.queue_pairs + 1
        for q in range(n):
            kind = "ctrl" if q == n - 1 else ("rx" if q % 2 == 0 else "tx")
            out.append(
                {
                    "index": q,
                    "kind": kind,
                    "pair": None if kind == "ctrl" else q // 2,
                    "configured": self.connected,
                    "ready": self.connected,
                    "broken": False,
                    "event_idx": True,
                    "size": 256,
                    "msix_vector": q + 1,
                    "avail_idx": 300,
                    "last_avail_idx": 300,
                    "used_idx": 290 if kind == "rx" else 300,
                    "in_flight": 10 if kind == "rx" else 0,
                    "desc": hex(0x100000 * (q + 1)),
                    "driver": hex(0x100000 * (q + 1) + 0x1000),
                    "device": hex(0x100000 * (q + 1) + 0x2000),
                }
            )
        return out

    def queue_stats(self, qp: int) -> dict[str, dict[str, Any]]:
        return self.snapshot().queues[qp].to_dict()


class FakeDaemon:
    def __init__(self) -> None:
        self._devices: dict[str, FakeDevice] = {}
        self.log_level = "info"
        self.added: list[DeviceOptions] = []

    def devices(self) -> list[FakeDevice]:
        return list(self._devices.values())

    def get(self, name: str) -> FakeDevice:
        if name not in self._devices:
            raise DaemonError(f"no device named {name!r}")
        return self._devices[name]

    def add_device(self, opts: DeviceOptions) -> FakeDevice:
        name = opts.name or opts.socket_path.rsplit("/", 1)[-1]
        if name in self._devices:
            raise DaemonError(f"a device named {name!r} already exists")
        for other in self._devices.values():
            if other.opts.tap == opts.tap:
                raise DaemonError(f"TAP {opts.tap} is already used by {other.name}")
        opts.name = name
        dev = FakeDevice(opts)
        self._devices[name] = dev
        self.added.append(opts)
        return dev

    def remove_device(self, name: str) -> None:
        dev = self._devices.pop(name, None)
        if dev is None:
            raise DaemonError(f"no device named {name!r}")
        dev.stopped = True

    def set_log_level(self, level: str) -> None:
        if level not in p.LOG_LEVELS:
            raise DaemonError(f"unknown log level {level!r}")
        self.log_level = level


def make_daemon() -> FakeDaemon:
    """vm1: 4 pairs, a driver up with RSS; vm2: 1 pair, nobody attached."""
    daemon = FakeDaemon()
    vm1 = daemon.add_device(
        DeviceOptions(
            "/run/vfiouser-net/vm1.sock",
            "tap-vm1",
            parse_mac("52:54:00:12:34:56"),
            queue_pairs=4,
            name="vm1",
        )
    )
    vm1.connected = True
    vm1.status = 0x0F
    vm1.features = ["CSUM", "MAC", "MQ", "VERSION_1", "RSS"]
    vm1.active_qps = 2
    vm1.rss_configured = True
    vm1.resets = {"device": 1}
    daemon.add_device(
        DeviceOptions("/run/vfiouser-net/vm2.sock", "tap-vm2", parse_mac("02:00:00:00:00:02"))
    )
    return daemon


# -- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A directory other uids can traverse (pytest's tmp_path is 0700)."""
    path = tempfile.mkdtemp(prefix="vn-admin-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon() -> FakeDaemon:
    return make_daemon()


@pytest.fixture
def server(sockdir: str, daemon: FakeDaemon) -> Iterator[AdminServer]:
    srv = start_admin_server(os.path.join(sockdir, "admin.sock"), daemon, read_timeout=2.0)
    yield srv
    srv.close()


def call(server: AdminServer, cmd: str, args: dict[str, Any] | None = None) -> Any:
    with p.AdminClient(server.path, timeout=5) as client:
        return client.call(cmd, args)


def call_error(server: AdminServer, cmd: str, args: dict[str, Any] | None = None) -> p.RemoteError:
    with pytest.raises(p.RemoteError) as exc:
        call(server, cmd, args)
    return exc.value


def raw(server: AdminServer) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(server.path)
    return s


def read_reply(s: socket.socket) -> Any:
    body = p.recv_frame(s, p.MAX_FRAME, 5, 5)
    assert body is not None, "closed without a reply"
    return msgpack.unpackb(body)


def send_msg(s: socket.socket, obj: Any) -> None:
    body = msgpack.packb(obj, use_bin_type=True)
    s.sendall(struct.pack(">I", len(body)) + body)


def closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def still_serving(server: AdminServer) -> None:
    assert call(server, "version")["protocol"] == 1


# -- commands -------------------------------------------------------------------------------


def test_help_lists_every_command_with_its_arguments(server: AdminServer) -> None:
    result = call(server, "help")
    names = [c["name"] for c in result["commands"]]
    assert names == list(p.COMMANDS)
    show = next(c for c in result["commands"] if c["name"] == "show")
    assert show["usage"] == "show DEVICE"
    assert show["args"][0]["name"] == "device" and show["args"][0]["required"]
    one = call(server, "help", {"command": "steering"})["commands"]
    assert len(one) == 1
    assert one[0]["args"][1]["choices"] == list(p.STEERING_POLICIES)
    assert call_error(server, "help", {"command": "nope"}).code == p.UNKNOWN_COMMAND


def test_version(server: AdminServer) -> None:
    result = call(server, "version")
    assert result == {"version": "0.1.0", "protocol": 1, "pid": os.getpid()}


def test_list(server: AdminServer) -> None:
    devices = call(server, "list")["devices"]
    assert [d["name"] for d in devices] == ["vm1", "vm2.sock"]
    vm1, vm2 = devices
    assert vm1 == {
        "name": "vm1",
        "socket": "/run/vfiouser-net/vm1.sock",
        "tap": "tap-vm1",
        "connected": True,
        "link_up": True,
        "status": 0x0F,
        "status_names": ["ACKNOWLEDGE", "DRIVER", "FEATURES_OK", "DRIVER_OK"],
        "active_queue_pairs": 2,
        "max_queue_pairs": 4,
        "policy": "auto",
        "effective": "rss",
    }
    assert vm2["name"] == "vm2.sock" and not vm2["connected"] and vm2["status_names"] == []


def test_list_empty(sockdir: str) -> None:
    with start_admin_server(os.path.join(sockdir, "a.sock"), FakeDaemon()) as srv:
        assert call(srv, "list") == {"devices": []}


def test_show(server: AdminServer, daemon: FakeDaemon) -> None:
    d = call(server, "show", {"device": "vm1"})
    assert d["connected"] and d["driver_ok"] and not d["needs_reset"]
    assert d["status_names"] == ["ACKNOWLEDGE", "DRIVER", "FEATURES_OK", "DRIVER_OK"]
    assert d["features"] == ["CSUM", "MAC", "MQ", "VERSION_1", "RSS"]
    assert d["mac"] == "52:54:00:aa:bb:cc"
    assert d["configured_mac"] == "52:54:00:12:34:56"
    assert (d["mtu"], d["speed_mbps"], d["queue_size"]) == (1500, 10000, 256)
    assert d["link_up"] and d["operator_link_up"]
    assert (d["active_queue_pairs"], d["max_queue_pairs"]) == (2, 4)
    steer = d["steering"]
    assert (steer["policy"], steer["effective"], steer["switches"]) == ("auto", "rss", 0)
    assert steer["rss"]["table"] == [i % 4 for i in range(128)]
    assert steer["rss"]["key"] == "6d5a56da" * 5
    assert steer["rss"]["hash_type_names"] == ["IPv4", "TCPv4", "UDPv4", "IPv6", "TCPv6", "UDPv6"]
    assert d["rx_filter"]["multicast"] == ["33:33:00:00:00:01"]
    daemon.get("vm1").status = 0x4F
    assert call(server, "show", {"device": "vm1"})["needs_reset"]


def test_unknown_device(server: AdminServer) -> None:
    for cmd, extra in [
        ("show", {}),
        ("queues", {}),
        ("stats", {}),
        ("link", {"state": "up"}),
        ("steering", {"policy": "rss"}),
        ("remove", {}),
        ("capture", {"count": 1, "file": "x.pcap"}),
    ]:
        err = call_error(server, cmd, {"device": "vm9", **extra})
        assert err.code == p.NO_SUCH_DEVICE, cmd
        assert "vm9" in err.message and "vm1" in err.message


def test_queues(server: AdminServer) -> None:
    result = call(server, "queues", {"device": "vm1"})
    assert result["device"] == "vm1"
    queues = result["queues"]
    assert len(queues) == 9
    assert queues[0]["kind"] == "rx" and queues[0]["in_flight"] == 10
    assert queues[-1]["kind"] == "ctrl" and queues[-1]["pair"] is None


def test_stats(server: AdminServer) -> None:
    result = call(server, "stats", {"device": "vm1"})
    assert result["device"] == "vm1"
    assert len(result["queues"]) == 4
    assert result["queues"][1]["rx"]["packets"] == 2000
    assert result["queues"][3]["rx"]["drops"]["mac_filter"] == 3
    assert result["ctrl"]["packets"] == 7
    assert result["counters"]["ctrl_ok"] == 7
    assert result["resets"] == {"device": 1}


def test_link(server: AdminServer, daemon: FakeDaemon) -> None:
    dev = daemon.get("vm1")
    result = call(server, "link", {"device": "vm1", "state": "down"})
    assert result == {
        "device": "vm1",
        "operator_link_up": False,
        "link_up": False,
        "tap": "tap-vm1",
    }
    assert dev.calls[-1] == ("set_link", False) and dev.config_interrupts == 1
    assert call(server, "link", {"device": "vm1", "state": "up"})["link_up"]
    assert dev.config_interrupts == 2
    dev.tap_up = False
    result = call(server, "link", {"device": "vm1", "state": "up"})
    assert result["operator_link_up"] and not result["link_up"]
    err = call_error(server, "link", {"device": "vm1", "state": "sideways"})
    assert err.code == p.BAD_REQUEST and "'state'" in err.message


def test_steering(server: AdminServer, daemon: FakeDaemon) -> None:
    dev = daemon.get("vm1")
    for n, policy in enumerate(("single", "rss", "rx-follows-tx", "auto"), 1):
        result = call(server, "steering", {"device": "vm1", "policy": policy})
        assert result["device"] == "vm1" and result["policy"] == policy
        assert result["switches"] == n
        assert dev.calls[-1] == ("set_steering", policy)
    err = call_error(server, "steering", {"device": "vm1", "policy": "random"})
    assert err.code == p.BAD_REQUEST and "'policy'" in err.message
    assert dev.opts.steering == "auto"


def test_log_level(server: AdminServer, daemon: FakeDaemon) -> None:
    assert call(server, "log-level", {"level": "debug"}) == {"level": "debug"}
    assert daemon.log_level == "debug"
    assert call_error(server, "log-level", {"level": "loud"}).code == p.BAD_REQUEST
    assert call_error(server, "log-level", {}).code == p.BAD_REQUEST


def test_add(server: AdminServer, daemon: FakeDaemon) -> None:
    args = {
        "socket": "/run/vfiouser-net/vm3.sock",
        "tap": "tap-vm3",
        "mac": "52:54:00:00:00:03",
        "mtu": 9000,
        "queue_pairs": 2,
        "queue_size": 512,
        "steering": "single",
        "speed": 25000,
    }
    result = call(server, "add", args)
    assert result["name"] == "vm3.sock" and result["max_queue_pairs"] == 2
    assert result["policy"] == "single"
    opts = daemon.added[-1]
    assert (opts.socket_path, opts.tap, opts.mac) == (
        args["socket"],
        "tap-vm3",
        bytes.fromhex("525400000003"),
    )
    assert (opts.mtu, opts.queue_pairs, opts.queue_size, opts.speed_mbps) == (9000, 2, 512, 25000)
    assert [d["name"] for d in call(server, "list")["devices"]] == ["vm1", "vm2.sock", "vm3.sock"]
    # A name, and a default MAC derived from the socket.
    result = call(server, "add", {"socket": "/run/x/vm4.sock", "tap": "tap-vm4", "name": "four"})
    assert result["name"] == "four"
    assert daemon.added[-1].mac[0] == 0x02


def test_add_refusals(server: AdminServer) -> None:
    base = {"socket": "/run/vfiouser-net/vm5.sock", "tap": "tap-vm5"}
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"tap": "t"}, p.BAD_REQUEST, "'socket'"),
        ({"socket": "/s"}, p.BAD_REQUEST, "'tap'"),
        ({**base, "mtu": "9000"}, p.BAD_REQUEST, "'mtu'"),
        ({**base, "mtu": 9000.0}, p.BAD_REQUEST, "'mtu'"),
        ({**base, "mtu": 10}, p.BAD_REQUEST, "'mtu'"),
        ({**base, "queue_pairs": True}, p.BAD_REQUEST, "'queue_pairs'"),
        ({**base, "color": "red"}, p.BAD_REQUEST, "'color'"),
        ({**base, "mac": "52:54:00"}, p.BAD_REQUEST, "MAC"),  # from config.device_options
        ({**base, "mac": "01:00:00:00:00:01"}, p.BAD_REQUEST, "unicast"),
        ({**base, "queue_size": 300}, p.BAD_REQUEST, "power of two"),
        ({**base, "queue_pairs": 200}, p.BAD_REQUEST, "at most 16"),
        ({**base, "tap": "tap-vm1"}, p.FAILED, "already used"),
        ({**base, "socket": "/x/vm1", "tap": "t9"}, p.FAILED, "already exists"),
    ]
    for args, code, text in cases:
        err = call_error(server, "add", args)
        assert (err.code, text in err.message) == (code, True), (args, err.message)


def test_remove(server: AdminServer, daemon: FakeDaemon) -> None:
    dev = daemon.get("vm1")
    assert call(server, "remove", {"device": "vm1"}) == {"removed": "vm1"}
    assert dev.stopped
    assert [d["name"] for d in call(server, "list")["devices"]] == ["vm2.sock"]
    assert call_error(server, "remove", {"device": "vm1"}).code == p.NO_SUCH_DEVICE


def test_capture_is_unsupported_for_now(server: AdminServer) -> None:
    err = call_error(server, "capture", {"device": "vm1", "count": 10, "file": "x.pcap"})
    assert err.code == p.UNSUPPORTED and "capture" in err.message
    err = call_error(server, "capture", {"device": "vm1", "seconds": 2.5, "file": "x.pcap"})
    assert err.code == p.UNSUPPORTED


@pytest.mark.parametrize(
    ("args", "text"),
    [
        ({"device": "vm1", "file": "x"}, "exactly one"),
        ({"device": "vm1", "count": 1, "seconds": 1, "file": "x"}, "exactly one"),
        ({"device": "vm1", "count": 0, "file": "x"}, "'count'"),
        ({"device": "vm1", "seconds": 0, "file": "x"}, "'seconds'"),
        ({"device": "vm1", "count": 1}, "'file'"),
        ({"device": "vm1", "count": 1, "file": "x", "queue": 4}, "queue pairs 0..3"),
        ({"device": "vm1", "count": 1, "file": "x", "queue": -1}, "'queue'"),
    ],
)
def test_capture_arguments(server: AdminServer, args: dict[str, Any], text: str) -> None:
    err = call_error(server, "capture", args)
    assert err.code == p.BAD_REQUEST and text in err.message


def test_capture_hook(sockdir: str, daemon: FakeDaemon) -> None:
    seen: list[CaptureRequest] = []

    def hook(dev: Any, req: CaptureRequest) -> dict[str, Any]:
        seen.append(req)
        if req.count == 13:
            raise CommandError(p.FAILED, "unlucky")
        return {"frames": req.count, "file": req.file}

    path = os.path.join(sockdir, "a.sock")
    with start_admin_server(path, daemon, capture=hook) as srv:
        args = {"device": "vm1", "queue": 1, "count": 5, "file": "c.pcap"}
        assert call(srv, "capture", args) == {"frames": 5, "file": "c.pcap"}
        assert seen == [CaptureRequest("vm1", "c.pcap", queue=1, count=5)]
        assert call_error(srv, "capture", {**args, "count": 13}).code == p.FAILED


# Names a client may not give: a path anywhere (absolute, climbing out, into a
# subdirectory), the directory itself, hidden or over-long names, control
# characters. Each is refused before the device or the file system is touched.
BAD_CAPTURE_NAMES = [
    ("/etc/cron.d/x", "not a path"),
    ("/tmp/x.pcap", "not a path"),
    ("../x", "not a path"),
    ("a/b", "not a path"),
    ("x/", "not a path"),
    ("", "is empty"),
    (".", "must not start with '.'"),
    ("..", "must not start with '.'"),
    (".hidden", "must not start with '.'"),
    ("x" * 256, "longer than 255 bytes"),
    ("\u00e9" * 128, "longer than 255 bytes"),
    ("a\nb", "control character"),
]


@pytest.fixture
def capture_dir(tmp_path: Any) -> str:
    path = tmp_path / "captures"
    path.mkdir(mode=0o750)
    return str(path)


@pytest.fixture
def capture_server(sockdir: str, daemon: FakeDaemon, capture_dir: str) -> Iterator[AdminServer]:
    """The admin server with the daemon's capture hook (cli.capture_hook) on capture_dir."""
    path = os.path.join(sockdir, "cap.sock")
    with start_admin_server(path, daemon, capture=capture_hook(capture_dir)) as srv:
        yield srv


def test_capture_writes_in_the_capture_directory(
    capture_server: AdminServer, capture_dir: str
) -> None:
    reply = call(capture_server, "capture", {"device": "vm1", "count": 3, "file": "vm1.pcap"})
    path = os.path.join(capture_dir, "vm1.pcap")
    assert reply == {"file": path, "frames": 0, "missed": 0}
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) & ~0o640 == 0, oct(st.st_mode)
    with open(path, "rb") as f:
        assert f.read() == PCAP_HEADER
    assert sorted(os.listdir(capture_dir)) == ["vm1.pcap"]


@pytest.mark.parametrize(("name", "text"), BAD_CAPTURE_NAMES, ids=repr)
def test_capture_refuses_names_that_are_not_file_names(
    capture_server: AdminServer, daemon: FakeDaemon, capture_dir: str, name: str, text: str
) -> None:
    err = call_error(capture_server, "capture", {"device": "vm1", "count": 1, "file": name})
    assert err.code == p.BAD_REQUEST and "'file'" in err.message and text in err.message, err
    assert os.listdir(capture_dir) == []
    assert not daemon.get("vm1").calls


def test_capture_refuses_an_existing_file(capture_server: AdminServer, capture_dir: str) -> None:
    path = os.path.join(capture_dir, "old.pcap")
    with open(path, "wb") as f:
        f.write(b"precious")
    err = call_error(capture_server, "capture", {"device": "vm1", "count": 1, "file": "old.pcap"})
    assert err.code == p.FAILED and "File exists" in err.message, err
    with open(path, "rb") as f:
        assert f.read() == b"precious"


@pytest.mark.parametrize("target", ["outside", "inside", "dir"])
def test_capture_refuses_a_link_planted_in_the_capture_directory(
    capture_server: AdminServer, capture_dir: str, tmp_path: Any, target: str
) -> None:
    """Someone who can write the directory plants a link: nothing is created or
    written through it, wherever it points (dangling or not)."""
    dest = {
        "outside": str(tmp_path / "victim"),
        "inside": os.path.join(capture_dir, "victim"),
        "dir": str(tmp_path),
    }[target]
    link = os.path.join(capture_dir, "trap.pcap")
    os.symlink(dest, link)
    err = call_error(capture_server, "capture", {"device": "vm1", "count": 1, "file": "trap.pcap"})
    assert err.code == p.FAILED and "cannot create" in err.message, err
    assert os.readlink(link) == dest
    assert not os.path.lexists(tmp_path / "victim")
    assert sorted(os.listdir(capture_dir)) == ["trap.pcap"]


def test_capture_without_its_directory(sockdir: str, daemon: FakeDaemon, tmp_path: Any) -> None:
    missing = str(tmp_path / "nope")
    with start_admin_server(
        os.path.join(sockdir, "c.sock"), daemon, capture=capture_hook(missing)
    ) as srv:
        err = call_error(srv, "capture", {"device": "vm1", "count": 1, "file": "x.pcap"})
    assert err.code == p.FAILED and missing in err.message and "--capture-dir" in err.message
    assert not os.path.exists(missing)


def test_create_capture_file_checks_the_name_itself(capture_dir: str, tmp_path: Any) -> None:
    """Whoever calls it (not only the admin channel): one component, inside the directory."""
    for name, text in BAD_CAPTURE_NAMES:
        with pytest.raises(CaptureError, match=re.escape(text)):
            create_capture_file(capture_dir, name)
    assert os.listdir(capture_dir) == []
    fd, path = create_capture_file(capture_dir, "ok.pcap")
    os.close(fd)
    assert path == os.path.join(capture_dir, "ok.pcap")
    with pytest.raises(CaptureError, match="File exists"):
        create_capture_file(capture_dir, "ok.pcap")


def test_capture_directory_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """--capture-dir over the file's capture_dir over systemd's $STATE_DIRECTORY over the
    default; always absolute (the reply names the full path)."""
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert cli.capture_dir(DaemonConfig()) == DEFAULT_CAPTURE_DIR
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/a:/var/lib/b")
    assert cli.capture_dir(DaemonConfig()) == "/var/lib/a"
    toml = tmp_path / "d.toml"
    toml.write_text('[daemon]\ncapture_dir = "/srv/pcap"\n')
    args = cli.build_parser().parse_args(["serve", "--config", str(toml)])
    assert cli.capture_dir(cli.daemon_config(args)) == "/srv/pcap"
    args = cli.build_parser().parse_args(
        ["serve", "--config", str(toml), "--capture-dir", "rel/dir"]
    )
    assert cli.capture_dir(cli.daemon_config(args)) == os.path.abspath("rel/dir")
    toml.write_text("[daemon]\ncapture_dir = 1\n")
    with pytest.raises(ConfigError, match="capture_dir"):
        cli.daemon_config(cli.build_parser().parse_args(["serve", "--config", str(toml)]))


def test_several_requests_on_one_connection(server: AdminServer) -> None:
    with p.AdminClient(server.path, timeout=5) as client:
        for _ in range(20):
            assert client.call("version")["protocol"] == 1
        assert client.call("list")["devices"][0]["name"] == "vm1"
        with pytest.raises(p.RemoteError):
            client.call("show", {"device": "nope"})
        assert client.call("show", {"device": "vm1"})["name"] == "vm1"


# -- failures inside the daemon -------------------------------------------------------------


def test_device_exception_is_an_internal_error(server: AdminServer, daemon: FakeDaemon) -> None:
    daemon.get("vm1").fail = RuntimeError("datapath exploded")
    err = call_error(server, "show", {"device": "vm1"})
    assert err.code == p.INTERNAL and "datapath exploded" in err.message
    assert call_error(server, "list").code == p.INTERNAL
    daemon.get("vm1").fail = DeviceError("gone")
    assert call_error(server, "stats", {"device": "vm1"}).code == p.FAILED
    daemon.get("vm1").fail = None
    still_serving(server)
    assert call(server, "show", {"device": "vm1"})["name"] == "vm1"


def test_unencodable_result_is_an_internal_error(server: AdminServer, daemon: FakeDaemon) -> None:
    dev = daemon.get("vm2.sock")
    dev.features = [object()]  # type: ignore[list-item]
    err = call_error(server, "show", {"device": "vm2.sock"})
    assert err.code == p.INTERNAL
    still_serving(server)


# -- hostile and broken clients ---------------------------------------------------------------


def test_garbage_bytes_get_an_error_and_a_close(server: AdminServer) -> None:
    with raw(server) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = read_reply(s)
        assert reply["ok"] is False and reply["error"]["code"] == p.TOO_LARGE
        assert reply["id"] is None
        assert closed(s)
    still_serving(server)


def test_random_garbage_never_hurts(server: AdminServer) -> None:
    rng = __import__("random").Random(1234)
    for _ in range(30):
        with raw(server) as s:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):
                    pass
            except OSError:
                pass
    still_serving(server)
    assert server.connections <= 1


def test_malformed_msgpack_in_a_good_frame_keeps_the_connection(server: AdminServer) -> None:
    with raw(server) as s:
        for body in (b"\xc1", b"", b"\x82\xa1v", b"\xa2\xff\xfe", b"\x91" * 5000):
            s.sendall(struct.pack(">I", len(body)) + body)
            reply = read_reply(s)
            assert reply["error"]["code"] == p.BAD_REQUEST, body[:4]
        send_msg(s, p.make_request(9, "version"))
        assert read_reply(s) == {
            "v": 1,
            "id": 9,
            "ok": True,
            "result": call(server, "version"),
        }


@pytest.mark.parametrize(
    "data",
    [b"\0", b"\0\0\0", b"\0\0\0\x40", b"\0\0\0\x40" + b"\x85" + b"a" * 10],
    ids=["1-byte-header", "3-byte-header", "header-only", "short-body"],
)
def test_truncated_frames_close_and_the_server_keeps_serving(
    server: AdminServer, data: bytes
) -> None:
    with raw(server) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        assert closed(s)
    still_serving(server)


def test_100_megabyte_length_prefix(server: AdminServer) -> None:
    with raw(server) as s:
        s.sendall(struct.pack(">I", 100 * 1024 * 1024) + b"\x80" * 1000)
        reply = read_reply(s)
        assert reply["error"]["code"] == p.TOO_LARGE
        assert "104857600" in reply["error"]["message"]
        assert closed(s)
    still_serving(server)


def test_just_over_the_limit(server: AdminServer) -> None:
    with p.AdminClient(server.path, timeout=5) as client:
        body = msgpack.packb(p.make_request(1, "help", {"command": "x" * p.MAX_FRAME}))
        assert len(body) > p.MAX_FRAME
        client.connect()
        sock = client._sock
        assert sock is not None
        with contextlib.suppress(OSError):  # the daemon may close before taking it all
            sock.sendall(struct.pack(">I", len(body)) + body)
        reply = read_reply(sock)
        assert reply["error"]["code"] == p.TOO_LARGE


@pytest.mark.parametrize(
    ("msg", "code", "field_name"),
    [
        ({"v": 1, "id": 1, "cmd": 42, "args": {}}, p.BAD_REQUEST, "'cmd'"),
        ({"v": 1, "id": "one", "cmd": "list", "args": {}}, p.BAD_REQUEST, "'id'"),
        ({"v": "1", "id": 1, "cmd": "list", "args": {}}, p.BAD_REQUEST, "'v'"),
        ({"v": 1, "id": 1, "cmd": "list", "args": "all"}, p.BAD_REQUEST, "'args'"),
        ({"v": 1, "id": 1, "cmd": "show", "args": {"device": ["vm1"]}}, p.BAD_REQUEST, "'device'"),
        (
            {"v": 1, "id": 1, "cmd": "link", "args": {"device": "vm1", "state": True}},
            p.BAD_REQUEST,
            "'state'",
        ),
        ({"v": 1, "id": 1, "cmd": "list", "args": {}, "x": 1}, p.BAD_REQUEST, "'x'"),
        (["v", 1], p.BAD_REQUEST, "map"),
        ({"v": 1, "id": 1, "cmd": "format-disk", "args": {}}, p.UNKNOWN_COMMAND, "format-disk"),
        ({"v": 2, "id": 1, "cmd": "list", "args": {}}, p.UNSUPPORTED_VERSION, "version 2"),
        ({"v": 99, "id": 1, "cmd": "list", "args": {}}, p.UNSUPPORTED_VERSION, "version 99"),
    ],
)
def test_bad_requests_get_error_replies(
    server: AdminServer, daemon: FakeDaemon, msg: Any, code: str, field_name: str
) -> None:
    with raw(server) as s:
        send_msg(s, msg)
        reply = read_reply(s)
        assert reply["v"] == 1 and reply["ok"] is False
        assert reply["error"]["code"] == code
        assert field_name in reply["error"]["message"]
        if isinstance(msg, dict) and isinstance(msg.get("id"), int):
            assert reply["id"] == msg["id"]
        # The same connection still works.
        send_msg(s, p.make_request(2, "list"))
        assert read_reply(s)["ok"] is True
    assert daemon.get("vm1").calls == []
    still_serving(server)


def test_idle_connection_times_out(sockdir: str, daemon: FakeDaemon) -> None:
    path = os.path.join(sockdir, "a.sock")
    with start_admin_server(path, daemon, read_timeout=0.3) as srv:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(path)
        start = time.monotonic()
        assert closed(s)
        assert time.monotonic() - start < 3
        s.close()
        # A peer dribbling a frame one byte at a time is cut off too.
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        start = time.monotonic()
        with pytest.raises(OSError):
            for byte in b"\0\0\0\x10" + b"a" * 16:
                s.send(bytes([byte]))
                time.sleep(0.1)
        s.close()
        assert time.monotonic() - start < 3
        still_serving(srv)


def test_connection_cap(sockdir: str, daemon: FakeDaemon) -> None:
    path = os.path.join(sockdir, "a.sock")
    with start_admin_server(path, daemon, max_connections=2) as srv:
        clients = [p.AdminClient(path, timeout=5) for _ in range(2)]
        for c in clients:
            c.call("version")
        assert srv.connections == 2
        with pytest.raises(p.RemoteError) as exc:
            p.AdminClient(path, timeout=5).call("version")
        assert exc.value.code == p.BUSY
        clients[0].close()
        deadline = time.monotonic() + 5
        while srv.connections > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert call(srv, "version")["protocol"] == 1
        clients[1].close()


def test_concurrent_clients(server: AdminServer) -> None:
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with p.AdminClient(server.path, timeout=10) as c:
                for _ in range(25):
                    assert c.call("show", {"device": "vm1"})["name"] == "vm1"
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# -- the socket -------------------------------------------------------------------------------


def test_socket_mode_0600(server: AdminServer) -> None:
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())


def test_socket_group_mode_0660(sockdir: str, daemon: FakeDaemon) -> None:
    path = os.path.join(sockdir, "a.sock")
    with start_admin_server(path, daemon, group="nogroup") as srv:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == grp.getgrnam("nogroup").gr_gid
        still_serving(srv)
    with start_admin_server(path, daemon, group="65534"):
        assert os.stat(path).st_gid == 65534


def test_unknown_group(sockdir: str, daemon: FakeDaemon) -> None:
    with pytest.raises(AdminServerError, match="unknown group"):
        start_admin_server(os.path.join(sockdir, "a.sock"), daemon, group="no-such-group-xyz")


def test_creates_the_directory(sockdir: str, daemon: FakeDaemon) -> None:
    path = os.path.join(sockdir, "run", "vfiouser-net", "admin.sock")
    with start_admin_server(path, daemon) as srv:
        still_serving(srv)


def test_stale_socket_replaced_live_refused_file_refused(sockdir: str, daemon: FakeDaemon) -> None:
    path = os.path.join(sockdir, "a.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # bound, never listening: what a killed daemon leaves
    with start_admin_server(path, daemon) as srv:
        still_serving(srv)
        with pytest.raises(AdminServerError, match="already served"):
            start_admin_server(path, daemon)
        still_serving(srv)
    assert not os.path.exists(path)
    with open(path, "w") as f:
        f.write("not a socket")
    with pytest.raises(AdminServerError, match="not a socket"):
        start_admin_server(path, daemon)
    assert os.path.isfile(path)


def test_descriptors_past_fd_setsize(sockdir: str, daemon: FakeDaemon) -> None:
    """A daemon with many devices holds many descriptors: no select() limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1400:
        # Root may raise the hard limit too; anyone else needs one that allows it.
        if hard != resource.RLIM_INFINITY and hard < 1400 and os.geteuid() == 0:
            hard = 1400
        require(
            hard == resource.RLIM_INFINITY or hard >= 1400,
            f"RLIMIT_NOFILE hard limit {hard} < 1400 (raise it, or run as root)",
        )
        resource.setrlimit(resource.RLIMIT_NOFILE, (1400, hard))
    fillers = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        with start_admin_server(os.path.join(sockdir, "a.sock"), daemon) as srv:
            assert srv._listener.fileno() > 1024
            still_serving(srv)
            still_serving(srv)
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_close_stops_everything(sockdir: str, daemon: FakeDaemon) -> None:
    path = os.path.join(sockdir, "a.sock")
    before = threading.active_count()
    srv = start_admin_server(path, daemon)
    client = p.AdminClient(path, timeout=5)
    client.call("version")
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.settimeout(5)
    idle.connect(path)
    srv.close()
    srv.close()  # idempotent
    assert not os.path.exists(path)
    assert closed(idle)
    with pytest.raises(p.Unreachable):
        client.call("version")
    with pytest.raises(p.Unreachable):
        p.AdminClient(path, timeout=5).call("version")
    idle.close()
    assert threading.active_count() <= before


def test_close_leaves_a_socket_someone_else_bound(sockdir: str, daemon: FakeDaemon) -> None:
    path = os.path.join(sockdir, "a.sock")
    srv = start_admin_server(path, daemon)
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)
    srv.close()
    assert os.path.exists(path)
    other.close()


# -- peer credentials -------------------------------------------------------------------------


def run_as(uid: int, gid: int, path: str) -> str:
    """In a forked child that drops to uid/gid: connect, send a version request.

    Returns the errno name of a failed connect, "EOF" (closed without a
    reply), "RESET", "TIMEOUT" or "REPLY <hex>". The child touches nothing
    but its own socket and pipe, then _exits.
    """
    frame = p.encode_frame(p.make_request(1, "version"))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        outcome = "CHILD-ERROR"
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(path)
            except OSError as exc:
                outcome = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            else:
                try:
                    with contextlib.suppress(BrokenPipeError):  # closed before we sent
                        s.sendall(frame)
                    data = s.recv(1 << 20)
                    outcome = "REPLY " + data.hex() if data else "EOF"
                except ConnectionResetError:
                    outcome = "RESET"
                except TimeoutError:
                    outcome = "TIMEOUT"
        except BaseException as exc:
            outcome = f"CHILD-ERROR {exc!r}"
        finally:
            os.write(w, outcome.encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def test_other_uid_cannot_even_connect_to_0600(server: AdminServer) -> None:
    assert run_as(NOBODY, NOBODY, server.path) == "EACCES"
    still_serving(server)


def test_other_uid_is_refused_by_peer_credentials(
    server: AdminServer, caplog: pytest.LogCaptureFixture
) -> None:
    os.chmod(server.path, 0o666)  # let the kernel pass it: SO_PEERCRED must stop it
    with caplog.at_level(logging.WARNING, logger="vfiouser_net.admin.server"):
        outcome = run_as(NOBODY, NOBODY, server.path)
    assert outcome in ("EOF", "RESET")
    assert any(
        "refused connection" in r.getMessage() and f"uid {NOBODY}" in r.getMessage()
        for r in caplog.records
    )
    still_serving(server)


def test_group_member_is_allowed(sockdir: str, daemon: FakeDaemon) -> None:
    path = os.path.join(sockdir, "a.sock")
    with start_admin_server(path, daemon, group="nogroup"):
        outcome = run_as(NOBODY, grp.getgrnam("nogroup").gr_gid, path)
        assert outcome.startswith("REPLY ")
        body = bytes.fromhex(outcome.split()[1])[4:]
        reply = msgpack.unpackb(body)
        assert reply["ok"] and reply["result"]["protocol"] == 1


def test_non_member_is_refused_with_a_group(sockdir: str, daemon: FakeDaemon) -> None:
    path = os.path.join(sockdir, "a.sock")
    with start_admin_server(path, daemon, group="nogroup"):
        assert run_as(NOBODY - 1, NOBODY - 1, path) == "EACCES"
        os.chmod(path, 0o666)
        assert run_as(NOBODY - 1, NOBODY - 1, path) in ("EOF", "RESET")
