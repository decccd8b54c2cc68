"""The admin protocol alone: frames, message validation, the command schema."""

from __future__ import annotations

import math
import socket
import struct
import threading
import time
from typing import Any

import msgpack
import pytest

from vfiouser_net.admin import protocol as p
from vfiouser_net.admin.commands import _HANDLERS, hash_type_names, status_names


def frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


@pytest.fixture
def pair() -> Any:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


# -- frames ----------------------------------------------------------------------------


def test_frame_is_big_endian_length_and_msgpack() -> None:
    data = p.encode_frame({"a": 1})
    assert data[:4] == struct.pack(">I", len(data) - 4)
    assert msgpack.unpackb(data[4:]) == {"a": 1}
    assert p.unpack(data[4:]) == {"a": 1}


def test_encode_refuses_frames_over_the_limit() -> None:
    with pytest.raises(p.FrameTooLarge) as exc:
        p.encode_frame({"x": "a" * p.MAX_FRAME})
    assert exc.value.code == p.TOO_LARGE


def test_recv_frame_reads_frames_and_clean_eof(pair: Any) -> None:
    a, b = pair
    a.sendall(frame({"n": 1}) + frame({"n": 2}))
    a.shutdown(socket.SHUT_WR)
    assert p.unpack(p.recv_frame(b) or b"") == {"n": 1}
    assert p.unpack(p.recv_frame(b) or b"") == {"n": 2}
    assert p.recv_frame(b) is None


def test_recv_frame_zero_length_body(pair: Any) -> None:
    a, b = pair
    a.sendall(b"\0\0\0\0")
    assert p.recv_frame(b) == b""


@pytest.mark.parametrize("data", [b"\0", b"\0\0\0", b"\0\0\0\x10", b"\0\0\0\x10abc"])
def test_recv_frame_truncated(pair: Any, data: bytes) -> None:
    a, b = pair
    a.sendall(data)
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(p.TruncatedFrame):
        p.recv_frame(b)


def test_recv_frame_too_large_before_reading_the_body(pair: Any) -> None:
    a, b = pair
    a.sendall(struct.pack(">I", 100 * 1024 * 1024))
    with pytest.raises(p.FrameTooLarge) as exc:
        p.recv_frame(b, idle_timeout=1, frame_timeout=1)
    assert exc.value.length == 100 * 1024 * 1024
    a.sendall(struct.pack(">I", p.MAX_FRAME + 1))
    with pytest.raises(p.FrameTooLarge):
        p.recv_frame(b, idle_timeout=1, frame_timeout=1)


def test_recv_frame_at_the_limit(pair: Any) -> None:
    a, b = pair
    body = b"\xc4" + b"x" * (p.MAX_FRAME - 1)  # any bytes: the frame layer does not decode
    t = threading.Thread(target=a.sendall, args=(struct.pack(">I", len(body)) + body,))
    t.start()
    assert p.recv_frame(b, idle_timeout=5, frame_timeout=5) == body
    t.join()


def test_recv_frame_idle_timeout(pair: Any) -> None:
    _, b = pair
    with pytest.raises(TimeoutError):
        p.recv_frame(b, idle_timeout=0.1, frame_timeout=5)


def test_recv_frame_deadline_against_a_dribbling_peer(pair: Any) -> None:
    a, b = pair

    def dribble() -> None:
        for byte in b"\0\0\0\x08abcdefgh":
            try:
                a.send(bytes([byte]))
            except OSError:
                return
            time.sleep(0.05)

    t = threading.Thread(target=dribble)
    t.start()
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        p.recv_frame(b, idle_timeout=5, frame_timeout=0.2)
    assert time.monotonic() - start < 1
    t.join()


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",  # never used
        b"\x82\xa1a",  # map cut short
        b"\xa2\xff\xfe",  # invalid UTF-8
        b"\x01\x02",  # extra data
        b"\x91" * 100_000,  # nesting too deep
        b"\xdd\xff\xff\xff\xff",  # an array claiming 4G elements
        b"\x81\x01\x02",  # int map key
        b"\x81\x91\x01\x02",  # array map key
    ],
)
def test_unpack_garbage_is_bad_request(body: bytes) -> None:
    with pytest.raises(p.ProtocolError) as exc:
        p.unpack(body)
    assert exc.value.code == p.BAD_REQUEST


# -- requests -----------------------------------------------------------------------------


def test_parse_request() -> None:
    req = p.parse_request({"v": 1, "id": 7, "cmd": "show", "args": {"device": "vm1"}})
    assert req == p.Request(7, "show", {"device": "vm1"})
    assert p.parse_request({"v": 1, "id": 0, "cmd": "list"}).args == {}


@pytest.mark.parametrize(
    ("obj", "code", "names", "rid"),
    [
        ([1, 2], p.BAD_REQUEST, "map", None),
        ("list", p.BAD_REQUEST, "map", None),
        ({"id": 1, "cmd": "list"}, p.BAD_REQUEST, "'v'", 1),
        ({"v": "1", "id": 1, "cmd": "list"}, p.BAD_REQUEST, "'v'", 1),
        ({"v": True, "id": 1, "cmd": "list"}, p.BAD_REQUEST, "'v'", 1),
        ({"v": 2, "id": 1, "cmd": "list"}, p.UNSUPPORTED_VERSION, "version 2", 1),
        ({"v": 0, "id": 1, "cmd": "nope"}, p.UNSUPPORTED_VERSION, "version 0", 1),
        ({"v": 1, "cmd": "list"}, p.BAD_REQUEST, "'id'", None),
        ({"v": 1, "id": "1", "cmd": "list"}, p.BAD_REQUEST, "'id'", None),
        ({"v": 1, "id": True, "cmd": "list"}, p.BAD_REQUEST, "'id'", None),
        ({"v": 1, "id": 1.5, "cmd": "list"}, p.BAD_REQUEST, "'id'", None),
        ({"v": 1, "id": 1}, p.BAD_REQUEST, "'cmd'", 1),
        ({"v": 1, "id": 1, "cmd": 5}, p.BAD_REQUEST, "'cmd'", 1),
        ({"v": 1, "id": 1, "cmd": b"list"}, p.BAD_REQUEST, "'cmd'", 1),
        ({"v": 1, "id": 1, "cmd": "list", "args": []}, p.BAD_REQUEST, "'args'", 1),
        ({"v": 1, "id": 1, "cmd": "list", "args": None}, p.BAD_REQUEST, "'args'", 1),
        ({"v": 1, "id": 1, "cmd": "list", "extra": 1}, p.BAD_REQUEST, "'extra'", 1),
        ({"v": 1, "id": 1, "cmd": "reboot"}, p.UNKNOWN_COMMAND, "'reboot'", 1),
        ({"v": 1, "id": 1, "cmd": "show", "args": {}}, p.BAD_REQUEST, "'device'", 1),
        ({"v": 1, "id": 1, "cmd": "show", "args": {"device": 1}}, p.BAD_REQUEST, "'device'", 1),
        (
            {"v": 1, "id": 1, "cmd": "list", "args": {"device": "x"}},
            p.BAD_REQUEST,
            "'device'",
            1,
        ),
        (
            {"v": 1, "id": 3, "cmd": "add", "args": {"socket": "/s", "tap": "t", "mtu": "1500"}},
            p.BAD_REQUEST,
            "'mtu'",
            3,
        ),
    ],
)
def test_parse_request_errors(obj: Any, code: str, names: str, rid: int | None) -> None:
    with pytest.raises(p.ProtocolError) as exc:
        p.parse_request(obj)
    assert exc.value.code == code
    assert names in exc.value.message
    assert exc.value.request_id == rid


def test_replies() -> None:
    assert p.ok_reply(3, {"a": 1}) == {"v": 1, "id": 3, "ok": True, "result": {"a": 1}}
    err = p.error_reply(None, p.TOO_LARGE, "big")
    assert err == {
        "v": 1,
        "id": None,
        "ok": False,
        "error": {"code": "too_large", "message": "big"},
    }
    assert p.parse_reply(p.ok_reply(3, [1]), 3) == [1]
    with pytest.raises(p.RemoteError) as exc:
        p.parse_reply(p.error_reply(3, p.FAILED, "no"), 3)
    assert (exc.value.code, exc.value.message) == (p.FAILED, "no")
    with pytest.raises(p.RemoteError):  # errors for unreadable requests carry no id
        p.parse_reply(err, 3)
    with pytest.raises(p.ProtocolError):
        p.parse_reply(p.ok_reply(4, None), 3)
    with pytest.raises(p.ProtocolError):
        p.parse_reply({"v": 2, "id": 3, "ok": True}, 3)
    with pytest.raises(p.ProtocolError):
        p.parse_reply({"v": 1, "id": 3, "ok": False, "error": "x"}, 3)


# -- arguments ------------------------------------------------------------------------------


def _spec(*args: p.ArgSpec, one_of: tuple[str, ...] = ()) -> p.CommandSpec:
    return p.CommandSpec("t", "test", args, one_of=one_of)


@pytest.mark.parametrize(
    ("arg", "value", "ok"),
    [
        (p.ArgSpec("x", "str", ""), "a", True),
        (p.ArgSpec("x", "str", ""), b"a", False),
        (p.ArgSpec("x", "str", ""), 1, False),
        (p.ArgSpec("x", "str", ""), "a" * (p.MAX_STRING + 1), False),
        (p.ArgSpec("x", "str", ""), "a\0b", False),
        (p.ArgSpec("x", "str", "", choices=("a", "b")), "b", True),
        (p.ArgSpec("x", "str", "", choices=("a", "b")), "c", False),
        (p.ArgSpec("x", "int", ""), 5, True),
        (p.ArgSpec("x", "int", ""), True, False),
        (p.ArgSpec("x", "int", ""), 5.0, False),
        (p.ArgSpec("x", "int", ""), "5", False),
        (p.ArgSpec("x", "int", "", minimum=1), 0, False),
        (p.ArgSpec("x", "int", "", maximum=10), 11, False),
        (p.ArgSpec("x", "int", "", maximum=10), 2**64 - 1, False),
        (p.ArgSpec("x", "int", "", minimum=0), -(2**63), False),
        (p.ArgSpec("x", "number", ""), 1.5, True),
        (p.ArgSpec("x", "number", ""), 2, True),
        (p.ArgSpec("x", "number", ""), math.nan, False),
        (p.ArgSpec("x", "number", ""), math.inf, False),
        (p.ArgSpec("x", "number", ""), False, False),
        (p.ArgSpec("x", "bool", ""), True, True),
        (p.ArgSpec("x", "bool", ""), 1, False),
    ],
)
def test_argument_types(arg: p.ArgSpec, value: Any, ok: bool) -> None:
    spec = _spec(arg)
    if ok:
        assert p.validate_args(spec, {"x": value}) == {"x": value}
    else:
        with pytest.raises(p.ProtocolError) as exc:
            p.validate_args(spec, {"x": value})
        assert exc.value.code == p.BAD_REQUEST
        assert "'x'" in exc.value.message


def test_required_unknown_and_one_of() -> None:
    spec = _spec(
        p.ArgSpec("a", "int", "", required=True),
        p.ArgSpec("b", "int", ""),
        p.ArgSpec("c", "int", ""),
        one_of=("b", "c"),
    )
    assert p.validate_args(spec, {"a": 1, "b": 2}) == {"a": 1, "b": 2}
    for args, name in [
        ({"b": 2}, "'a'"),
        ({"a": 1, "b": 2, "z": 0}, "'z'"),
        ({"a": 1}, "exactly one"),
        ({"a": 1, "b": 2, "c": 3}, "exactly one"),
    ]:
        with pytest.raises(p.ProtocolError, match=name):
            p.validate_args(spec, args)


# -- the schema -----------------------------------------------------------------------------


def test_every_command_has_a_handler_and_help() -> None:
    expected = {
        "help",
        "version",
        "list",
        "show",
        "queues",
        "stats",
        "snapshot",
        "link",
        "steering",
        "log-level",
        "add",
        "remove",
        "capture",
    }
    assert set(p.COMMANDS) == expected == set(_HANDLERS)
    for spec in p.COMMANDS.values():
        assert spec.help
        assert all(a.help for a in spec.args)
        assert spec.describe()["usage"].startswith(spec.name)


def test_usage_strings() -> None:
    assert p.COMMANDS["show"].usage() == "show DEVICE"
    assert p.COMMANDS["link"].usage() == "link DEVICE up|down"
    assert p.COMMANDS["steering"].usage() == "steering DEVICE auto|single|rss|rx-follows-tx"
    assert (
        p.COMMANDS["capture"].usage()
        == "capture DEVICE [--queue N] (--count N | --seconds S) --file NAME"
    )
    assert p.COMMANDS["help"].usage() == "help [COMMAND]"


def test_add_takes_the_config_device_keys() -> None:
    from vfiouser_net.config import _DEVICE_KEYS

    spec = p.COMMANDS["add"]
    assert {a.name for a in spec.args} == set(_DEVICE_KEYS)
    types = {"str": str, "int": int, "bool": bool}
    assert {a.name: types[a.type] for a in spec.args} == _DEVICE_KEYS


def test_option_names_and_limits_have_one_source() -> None:
    from vfiouser_net import daemon, device_options, options
    from vfiouser_net.native import ffi, lib

    # The schema and the device take them from options, not from copies.
    for name in (
        "STEERING_POLICIES",
        "NOTIFY_MODES",
        "TAP_IO_MODES",
        "MAX_QUEUE_PAIRS",
        "MAX_QUEUE_SIZE",
        "DEFAULT_BUSY_POLL_US",
        "MAX_BUSY_POLL_US",
        "LOG_LEVELS",
    ):
        assert getattr(p, name) is getattr(options, name), name
    for name in (
        "STEERING_POLICIES",
        "NOTIFY_MODES",
        "TAP_IO_MODES",
        "MAX_QUEUE_PAIRS",
        "MAX_QUEUE_SIZE",
        "DEFAULT_BUSY_POLL_US",
        "MAX_BUSY_POLL_US",
    ):
        assert getattr(device_options, name) is getattr(options, name), name
    assert tuple(daemon.LOG_LEVELS) == options.LOG_LEVELS
    # What the datapath defines: the policies in enum order, and the schema
    # refuses what the datapath cannot do.
    names = [ffi.string(lib.vn_policy_name(i)).decode() for i in range(lib.VN_POLICY__COUNT)]
    assert tuple(names) == options.STEERING_POLICIES
    assert options.MAX_QUEUE_PAIRS == lib.VN_MAX_QUEUE_PAIRS
    assert options.MAX_QUEUE_SIZE == lib.VN_VQ_MAX_SIZE


def test_status_and_hash_type_names() -> None:
    assert status_names(0) == []
    assert status_names(0x0F) == ["ACKNOWLEDGE", "DRIVER", "FEATURES_OK", "DRIVER_OK"]
    assert status_names(0x4F)[-1] == "NEEDS_RESET"
    assert status_names(0x80 | 0x10) == ["FAILED", "BIT_4"]
    assert hash_type_names(0) == []
    assert hash_type_names(0b111111) == ["IPv4", "TCPv4", "UDPv4", "IPv6", "TCPv6", "UDPv6"]
    assert hash_type_names(1 << 10) == ["BIT_10"]
