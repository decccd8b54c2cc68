"""`vfiouser-net ctl` against an admin server with a fake daemon: output and exit codes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit.test_admin_server import FakeDaemon, make_daemon
from vfiouser_net import ctl
from vfiouser_net.admin import protocol as p
from vfiouser_net.admin.server import AdminServer, start_admin_server


@pytest.fixture
def daemon() -> FakeDaemon:
    return make_daemon()


@pytest.fixture
def server(daemon: FakeDaemon) -> Iterator[AdminServer]:
    d = tempfile.mkdtemp(prefix="vn-ctl-")
    srv = start_admin_server(os.path.join(d, "admin.sock"), daemon)
    yield srv
    srv.close()
    shutil.rmtree(d, ignore_errors=True)


class Run:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def run(server: AdminServer, capsys: pytest.CaptureFixture[str]) -> Any:
    def _run(*argv: str, socket_path: str | None = None) -> Run:
        path = socket_path if socket_path is not None else server.path
        code = ctl.main(["--admin-socket", path, *argv])
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return _run


def lines(text: str) -> list[list[str]]:
    return [line.split() for line in text.strip().splitlines()]


# -- tables -----------------------------------------------------------------------------------


def test_list_table(run: Any) -> None:
    r = run("list")
    assert r.code == 0 and r.err == ""
    rows = lines(r.out)
    assert rows[0] == ["NAME", "SOCKET", "TAP", "CLIENT", "LINK", "DRIVER", "PAIRS", "STEERING"]
    assert rows[1] == [
        "vm1",
        "/run/vfiouser-net/vm1.sock",
        "tap-vm1",
        "yes",
        "up",
        "DRIVER_OK",
        "2/4",
        "auto",
        "(rss)",
    ]
    assert rows[2] == [
        "vm2.sock",
        "/run/vfiouser-net/vm2.sock",
        "tap-vm2",
        "no",
        "up",
        "reset",
        "0/1",
        "auto",
        "(rx-follows-tx)",
    ]
    # Columns line up.
    header, first = r.out.splitlines()[:2]
    assert header.index("SOCKET") == first.index("/run")


def test_list_json(run: Any) -> None:
    r = run("--json", "list")
    assert r.code == 0
    devices = r.json()["devices"]
    assert [d["name"] for d in devices] == ["vm1", "vm2.sock"]
    assert devices[0]["status_names"] == ["ACKNOWLEDGE", "DRIVER", "FEATURES_OK", "DRIVER_OK"]


def test_list_empty(capsys: pytest.CaptureFixture[str]) -> None:
    d = tempfile.mkdtemp(prefix="vn-ctl-")
    try:
        with start_admin_server(os.path.join(d, "a.sock"), FakeDaemon()) as srv:
            assert ctl.main(["--admin-socket", srv.path, "list"]) == 0
            assert capsys.readouterr().out.strip() == "no devices"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_show(run: Any, daemon: FakeDaemon) -> None:
    r = run("show", "vm1")
    assert r.code == 0
    out = r.out
    assert out.startswith("device vm1\n")
    assert "driver status: 0x0f ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK" in out
    assert "features:      CSUM MAC MQ VERSION_1 RSS" in out
    assert "mac:           52:54:00:aa:bb:cc (configured 52:54:00:12:34:56)" in out
    assert "queue pairs:   2 active of 4 (queue size 256)" in out
    assert "steering:      auto, effective rss, 0 switches" in out
    assert "hash types IPv4|TCPv4|UDPv4|IPv6|TCPv6|UDPv6" in out
    assert "rss key:       " + "6d5a56da" * 5 in out
    assert "rss table:     128 entries" in out
    assert "  0: 0 1 2 3 0 1 2 3 0 1 2 3 0 1 2 3" in out
    assert "112: 0 1 2 3" in out
    assert "link:          up" in out
    assert "tap i/o:       io_uring (a ring pass's frames in one system call)" in out
    daemon.get("vm1").set_link(False)
    assert "link:          down (operator switch down)" in run("show", "vm1").out
    daemon.get("vm1").set_link(True)
    daemon.get("vm1").tap_up = False
    assert "link:          down (TAP down)" in run("show", "vm1").out
    daemon.get("vm1").status = 0x4F
    assert "0x4f ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK|NEEDS_RESET" in run("show", "vm1").out
    r = run("show", "vm2.sock")
    assert "driver status: 0x00 reset" in r.out
    assert "rss:           not configured by the guest" in r.out
    assert "(none negotiated)" in r.out


def test_show_json(run: Any) -> None:
    d = run("--json", "show", "vm1").json()
    assert d["configured_mac"] == "52:54:00:12:34:56"
    assert d["steering"]["rss"]["table"][:4] == [0, 1, 2, 3]


def test_queues_table(run: Any) -> None:
    r = run("queues", "vm1")
    assert r.code == 0
    rows = lines(r.out)
    assert rows[0][:4] == ["QUEUE", "KIND", "PAIR", "STATE"]
    assert rows[1] == ["0", "rx", "0", "ready", "256", "1", "300", "300", "290", "10", "yes"]
    assert rows[-1][:4] == ["8", "ctrl", "-", "ready"]
    assert len(rows) == 10
    assert lines(run("queues", "vm2.sock").out)[1][3] == "off"
    assert run("--json", "queues", "vm1").json()["queues"][2]["kind"] == "rx"


def test_stats_table(run: Any) -> None:
    r = run("stats", "vm1")
    assert r.code == 0
    out = r.out
    rows = lines(out)
    assert rows[0] == ["device", "vm1"]
    assert rows[1][:4] == ["PAIR", "DIR", "PACKETS", "BYTES"]
    assert rows[1][-2:] == ["DROPS", "ERRORS"]
    assert rows[2][:4] == ["0", "rx", "1000", "100000"]
    assert rows[8][:4] == ["3", "rx", "4000", "400000"] and rows[8][-2] == "3"
    assert rows[10][:2] == ["-", "ctrl"]
    assert "  3 rx drop mac_filter: 3" in out
    assert "  ctrl_ok: 7" in out
    assert "control command 4.0: 1 ok, 0 failed" in out
    assert "resets: device 1" in out


def test_stats_json(run: Any) -> None:
    d = run("--json", "stats", "vm1").json()
    assert d["queues"][0]["rx"]["packets"] == 1000
    assert d["counters"]["ctrl_err"] == 1


def test_link(run: Any, daemon: FakeDaemon) -> None:
    r = run("link", "vm1", "down")
    assert (r.code, r.out.strip()) == (0, "vm1: link down")
    assert not daemon.get("vm1").operator_link_up
    assert run("link", "vm1", "up").out.strip() == "vm1: link up"
    daemon.get("vm1").tap_up = False
    r = run("link", "vm1", "up")
    assert "link switch up, but the link stays down while TAP tap-vm1 is down" in r.out
    assert run("--json", "link", "vm1", "down").json()["operator_link_up"] is False


def test_steering(run: Any, daemon: FakeDaemon) -> None:
    r = run("steering", "vm1", "rx-follows-tx")
    assert (r.code, r.out.strip()) == (
        0,
        "vm1: steering rx-follows-tx (effective rx-follows-tx, 1 switch)",
    )
    assert daemon.get("vm1").opts.steering == "rx-follows-tx"
    assert run("--json", "steering", "vm1", "single").json()["switches"] == 2


def test_log_level(run: Any, daemon: FakeDaemon) -> None:
    assert run("log-level", "warning").out.strip() == "log level warning"
    assert daemon.log_level == "warning"


def test_add_and_remove(run: Any, daemon: FakeDaemon) -> None:
    r = run(
        "add",
        "--socket",
        "/run/vfiouser-net/vm3.sock",
        "--tap",
        "tap-vm3",
        "--queue-pairs",
        "2",
        "--mtu",
        "9000",
        "--mac",
        "52:54:00:00:00:03",
        "--steering",
        "rss",
        "--name",
        "vm3",
        "--queue-size",
        "0x200",
        "--speed",
        "1000",
    )
    assert r.code == 0, r.err
    assert r.out.strip() == (
        "added vm3: socket /run/vfiouser-net/vm3.sock, TAP tap-vm3, 2 queue pair(s), steering rss"
    )
    opts = daemon.added[-1]
    assert (opts.mtu, opts.queue_pairs, opts.queue_size, opts.speed_mbps) == (9000, 2, 512, 1000)
    assert opts.mac == bytes.fromhex("525400000003")
    r = run("remove", "vm3")
    assert (r.code, r.out.strip()) == (0, "removed vm3")
    r = run("--json", "remove", "vm2.sock")
    assert r.json() == {"removed": "vm2.sock"}


def test_version_and_help(run: Any) -> None:
    r = run("version")
    assert r.out.strip() == f"vfiouser-net 0.1.0 (admin protocol 1), pid {os.getpid()}"
    r = run("help")
    assert r.code == 0
    for spec in p.COMMANDS.values():
        assert spec.usage() in r.out
    assert "capture DEVICE [--queue N] (--count N | --seconds S) --file NAME" in r.out
    r = run("help", "link")
    assert r.out.splitlines()[0] == "link DEVICE up|down"
    assert "state: str: up or down (up, down)" in r.out


# -- errors and exit codes ------------------------------------------------------------------


def test_daemon_errors_exit_1(run: Any) -> None:
    r = run("show", "vm9")
    assert r.code == 1 and r.out == ""
    assert "no device named 'vm9'" in r.err and "[no_such_device]" in r.err
    r = run("--json", "show", "vm9")
    assert r.code == 1
    assert r.json() == {
        "error": {"code": "no_such_device", "message": r.json()["error"]["message"]}
    }
    r = run("add", "--socket", "/x/vm1", "--tap", "tap-vm1")
    assert r.code == 1 and "already" in r.err
    r = run("add", "--socket", "/x/vm7", "--tap", "tap-vm7", "--mac", "zz")
    assert r.code == 1 and "invalid MAC" in r.err and "[bad_request]" in r.err


def test_capture_is_unsupported(run: Any, tmp_path: Any) -> None:
    r = run("capture", "vm1", "--count", "10", "--file", "out.pcap")
    assert r.code == 1
    assert "[unsupported]" in r.err and "capture" in r.err
    r = run("--json", "capture", "vm1", "--queue", "1", "--seconds", "2.5", "--file", "x")
    assert r.code == 1 and r.json()["error"]["code"] == "unsupported"


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        ([], "required"),
        (["frobnicate"], "invalid choice"),
        (["show"], "DEVICE"),
        (["show", "vm1", "extra"], "unrecognized"),
        (["link", "vm1", "sideways"], "invalid choice"),
        (["steering", "vm1", "random"], "invalid choice"),
        (["log-level", "loud"], "invalid choice"),
        (["add", "--tap", "t"], "--socket"),
        (["add", "--socket", "/s", "--tap", "t", "--mtu", "big"], "not an integer"),
        (["add", "--socket", "/s", "--tap", "t", "--mtu", "10"], "'mtu' must be at least 68"),
        (["add", "--socket", "/s", "--tap", "t", "--color", "red"], "unrecognized"),
        (["capture", "vm1", "--file", "x"], "exactly one of 'count' and 'seconds'"),
        (["capture", "vm1", "--count", "1", "--seconds", "1", "--file", "x"], "exactly one"),
        (["capture", "vm1", "--count", "1"], "--file"),
        (["capture", "vm1", "--seconds", "soon", "--file", "x"], "not a number"),
        # The daemon creates the file in its capture directory: a name, never a path.
        (["capture", "vm1", "--count", "1", "--file", "/tmp/x.pcap"], "not a path"),
        (["capture", "vm1", "--count", "1", "--file", "../x"], "not a path"),
        (["capture", "vm1", "--count", "1", "--file", "a/b"], "not a path"),
        (["capture", "vm1", "--count", "1", "--file", ""], "is empty"),
        (["capture", "vm1", "--count", "1", "--file", ".."], "must not start with '.'"),
        (["--timeout", "0", "version"], "--timeout"),
    ],
)
def test_usage_errors_exit_2(run: Any, daemon: FakeDaemon, argv: list[str], text: str) -> None:
    r = run(*argv)
    assert r.code == 2, r.err
    assert r.out == ""
    assert text in r.err
    assert "usage:" in r.err or "--timeout" in text


def test_help_option_exits_0(run: Any) -> None:
    r = run("--help")
    assert r.code == 0 and "COMMAND" in r.out
    r = run("capture", "--help")
    assert r.code == 0 and "--seconds" in r.out
    text = " ".join(r.out.split())
    assert "--file NAME" in text and "capture directory" in text and "not a path" in text


def test_capture_into_the_capture_directory(daemon: FakeDaemon, run: Any, tmp_path: Any) -> None:
    """The reply names the full path the daemon wrote; names that exist or are links
    in the directory are refused by the daemon (exit 1), and nothing is written."""
    from vfiouser_net.cli import capture_hook

    captures = tmp_path / "captures"
    captures.mkdir()
    (captures / "old.pcap").write_bytes(b"precious")
    (captures / "link.pcap").symlink_to(tmp_path / "victim")
    d = tempfile.mkdtemp(prefix="vn-ctl-")
    path = os.path.join(d, "cap.sock")
    try:
        with start_admin_server(path, daemon, capture=capture_hook(str(captures))):
            r = run("capture", "vm1", "--count", "2", "--file", "vm1.pcap", socket_path=path)
            assert r.code == 0, r.err
            assert r.out.splitlines() == [
                f"file: {captures / 'vm1.pcap'}",
                "frames: 0",
                "missed: 0",
            ]
            assert (captures / "vm1.pcap").read_bytes()[:4] == bytes.fromhex("4d3cb2a1")
            r = run("capture", "vm1", "--count", "1", "--file", "old.pcap", socket_path=path)
            assert r.code == 1 and "File exists" in r.err and "[failed]" in r.err, r.err
            r = run("capture", "vm1", "--count", "1", "--file", "link.pcap", socket_path=path)
            assert r.code == 1 and "cannot create" in r.err, r.err
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert (captures / "old.pcap").read_bytes() == b"precious"
    assert not (tmp_path / "victim").exists()
    assert sorted(os.listdir(captures)) == ["link.pcap", "old.pcap", "vm1.pcap"]


def test_unreachable_exits_3(run: Any, tmp_path: Any) -> None:
    r = run("list", socket_path=str(tmp_path / "nope.sock"))
    assert r.code == 3
    assert "cannot connect" in r.err and "is the daemon running" in r.err
    # A socket nobody listens on.
    dead = str(tmp_path / "dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(dead)
    s.close()
    assert run("list", socket_path=dead).code == 3


def test_closed_without_reply_exits_3(run: Any, tmp_path: Any) -> None:
    """What a refused peer sees: the daemon closes without replying."""
    path = str(tmp_path / "closer.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen()

    def closer() -> None:
        conn, _ = lsock.accept()
        conn.close()

    t = threading.Thread(target=closer)
    t.start()
    r = run("version", socket_path=path)
    t.join()
    lsock.close()
    assert r.code == 3
    assert "without a reply" in r.err or "failed" in r.err


def test_garbage_reply_exits_1(run: Any, tmp_path: Any) -> None:
    path = str(tmp_path / "liar.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen()

    def liar() -> None:
        conn, _ = lsock.accept()
        p.recv_frame(conn, p.MAX_FRAME, 5, 5)
        conn.sendall(p.encode_frame({"hello": "world"}))
        conn.close()

    t = threading.Thread(target=liar)
    t.start()
    r = run("version", socket_path=path)
    t.join()
    lsock.close()
    assert r.code == 1 and "unexpected reply" in r.err


def test_format_result_survives_unexpected_shapes() -> None:
    assert json.loads(ctl.format_result("list", {"devices": [{"name": "x"}]})) == {
        "devices": [{"name": "x"}]
    }
    assert ctl.format_result("capture", {"frames": 3}) == "frames: 3"
    assert ctl.format_result("version", None) == "None"
