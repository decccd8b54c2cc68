"""The admin channel's wire protocol: frames, messages, the command schema, a client.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack,
at most `MAX_FRAME` (1 MiB). Each frame holds one map:

    request  {"v": 1, "id": int, "cmd": str, "args": map}
    reply    {"v": 1, "id": <the request's id>, "ok": true, "result": ...}
             {"v": 1, "id": <the request's id or nil>, "ok": false,
              "error": {"code": str, "message": str}}

Requests are validated strictly (`parse_request`): a missing or wrong-typed
field, an unknown field or argument, an argument of the wrong type or out of
range is "bad_request" with a message naming the field; another protocol
version is "unsupported_version"; a command not in `COMMANDS` is
"unknown_command". A length prefix over `MAX_FRAME` is "too_large", after
which the server closes the connection (the stream cannot be resynchronised).

`COMMANDS` is the one description of every command and its arguments: the
server validates against it, `help` reports it, and `vfiouser-net ctl` builds
its command line from it. This module needs only the standard library and
msgpack, so the client side never loads the datapath.
"""

from __future__ import annotations

import contextlib
import math
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack  # type: ignore[import-untyped]

from vfiouser_net.options import (
    DEFAULT_BUSY_POLL_US,
    LOG_LEVELS,
    MAX_BUSY_POLL_US,
    MAX_QUEUE_PAIRS,
    MAX_QUEUE_SIZE,
    NOTIFY_MODES,
    STEERING_POLICIES,
    TAP_IO_MODES,
)

PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20
HEADER = struct.Struct(">I")
DEFAULT_ADMIN_SOCKET = "/run/vfiouser-net/admin.sock"
MAX_STRING = 4096
# A capture's file name (NAME_MAX): the daemon creates it in its capture
# directory, never at a path the client chose.
MAX_FILE_NAME = 255

# Error codes.
BAD_REQUEST = "bad_request"  # malformed message, field or argument (the message names it)
TOO_LARGE = "too_large"  # a frame over MAX_FRAME; the connection is closed after the reply
UNSUPPORTED_VERSION = "unsupported_version"
UNKNOWN_COMMAND = "unknown_command"
NO_SUCH_DEVICE = "no_such_device"
FAILED = "failed"  # the daemon or the device refused or failed the operation
UNSUPPORTED = "unsupported"  # a known command this daemon cannot perform
BUSY = "busy"  # too many admin connections; the connection is closed after the reply
INTERNAL = "internal"  # a bug: the daemon logged the details
ERROR_CODES = (
    BAD_REQUEST,
    TOO_LARGE,
    UNSUPPORTED_VERSION,
    UNKNOWN_COMMAND,
    NO_SUCH_DEVICE,
    FAILED,
    UNSUPPORTED,
    BUSY,
    INTERNAL,
)


# -- errors -------------------------------------------------------------------------


class AdminError(Exception):
    """An error with a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


class ProtocolError(AdminError):
    """A message or frame that breaks the protocol (either side)."""

    def __init__(self, code: str, message: str, request_id: int | None = None) -> None:
        super().__init__(code, message)
        self.request_id = request_id


class FrameTooLarge(ProtocolError):
    def __init__(self, length: int, limit: int = MAX_FRAME) -> None:
        super().__init__(TOO_LARGE, f"frame of {length} bytes exceeds the limit of {limit} bytes")
        self.length = length


class TruncatedFrame(ProtocolError):
    def __init__(self, got: int, want: int) -> None:
        super().__init__(BAD_REQUEST, f"connection closed after {got} of {want} bytes of a frame")


class RemoteError(AdminError):
    """An error reply from the daemon."""


class Unreachable(AdminError):
    """The daemon could not be reached, or the connection broke before a reply."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__("unreachable", message)
        self.errno = errno


# -- frames ---------------------------------------------------------------------------


def pack(obj: Any) -> bytes:
    """One msgpack body (strings as str, bytes as bin)."""
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def unpack(body: bytes) -> Any:
    """Decode one msgpack body; anything malformed is a ProtocolError(bad_request)."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types for garbage: all mean the same
        reason = str(exc) or type(exc).__name__
        raise ProtocolError(BAD_REQUEST, f"malformed message: {reason}") from None


def encode_frame(obj: Any, limit: int = MAX_FRAME) -> bytes:
    body = pack(obj)
    if len(body) > limit:
        raise FrameTooLarge(len(body), limit)
    return HEADER.pack(len(body)) + body


def _recv_exact(
    sock: socket.socket,
    n: int,
    deadline: float | None,
    got_before: int = 0,
    total: int | None = None,
) -> bytes | None:
    """n bytes, or None on EOF before the first one; TimeoutError past the deadline."""
    chunks: list[bytes] = []
    got = 0
    while got < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out reading a frame")
            sock.settimeout(remaining)
        chunk = sock.recv(min(n - got, 1 << 16))
        if not chunk:
            if got == 0 and got_before == 0:
                return None
            raise TruncatedFrame(got_before + got, total if total is not None else n)
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_frame(
    sock: socket.socket,
    limit: int = MAX_FRAME,
    idle_timeout: float | None = None,
    frame_timeout: float | None = None,
) -> bytes | None:
    """The body of the next frame, or None on a clean EOF between frames.

    idle_timeout bounds the wait for the first byte, frame_timeout the time to
    read the rest of the frame once it started (so a peer dribbling bytes
    cannot hold the connection). Raises FrameTooLarge before reading a body
    over `limit`, TruncatedFrame on EOF inside a frame, TimeoutError, OSError.
    """
    sock.settimeout(idle_timeout)
    first = sock.recv(1)
    if not first:
        return None
    deadline = None if frame_timeout is None else time.monotonic() + frame_timeout
    rest = _recv_exact(sock, HEADER.size - 1, deadline, 1, HEADER.size)
    assert rest is not None
    (length,) = HEADER.unpack(first + rest)
    if length > limit:
        raise FrameTooLarge(length, limit)
    body = _recv_exact(sock, length, deadline, HEADER.size, HEADER.size + length)
    return body if body is not None else b""


# -- messages --------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    id: int
    cmd: str
    args: dict[str, Any] = field(default_factory=dict)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_name(value: object) -> str:
    if value is None:
        return "nil"
    return {
        bool: "boolean",
        int: "integer",
        float: "float",
        str: "string",
        bytes: "binary",
        list: "array",
        dict: "map",
    }.get(type(value), type(value).__name__)


_REQUEST_FIELDS = ("v", "id", "cmd", "args")


def parse_request(obj: Any) -> Request:
    """Validate a decoded request; ProtocolError names the first bad field."""
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_REQUEST, f"a request must be a map, not {_type_name(obj)}")
    raw_id = obj.get("id")
    request_id = raw_id if _is_int(raw_id) else None

    def bad(message: str) -> ProtocolError:
        return ProtocolError(BAD_REQUEST, message, request_id)

    if "v" not in obj:
        raise bad("missing field 'v' (protocol version)")
    if not _is_int(obj["v"]):
        raise bad(f"field 'v' must be an integer, not {_type_name(obj['v'])}")
    if obj["v"] != PROTOCOL_VERSION:
        raise ProtocolError(
            UNSUPPORTED_VERSION,
            f"protocol version {obj['v']} is not supported (this daemon speaks {PROTOCOL_VERSION})",
            request_id,
        )
    for key in obj:
        if key not in _REQUEST_FIELDS:
            fields = ", ".join(_REQUEST_FIELDS)
            raise bad(f"unknown field {str(key)[:64]!r} (a request has {fields})")
    if "id" not in obj:
        raise bad("missing field 'id'")
    if request_id is None:
        raise bad(f"field 'id' must be an integer, not {_type_name(raw_id)}")
    if "cmd" not in obj:
        raise bad("missing field 'cmd'")
    cmd = obj["cmd"]
    if not isinstance(cmd, str):
        raise bad(f"field 'cmd' must be a string, not {_type_name(cmd)}")
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise bad(f"field 'args' must be a map, not {_type_name(args)}")
    if cmd not in COMMANDS:
        raise ProtocolError(
            UNKNOWN_COMMAND, f"unknown command {cmd[:64]!r} ('help' lists them)", request_id
        )
    try:
        values = validate_args(COMMANDS[cmd], args)
    except ProtocolError as exc:
        raise ProtocolError(exc.code, exc.message, request_id) from None
    return Request(request_id, cmd, values)


def make_request(
    request_id: int, cmd: str, args: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "cmd": cmd, "args": dict(args or {})}


def ok_reply(request_id: int | None, result: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}


def error_reply(request_id: int | None, code: str, message: str) -> dict[str, Any]:
    return {
        "v": PROTOCOL_VERSION,
        "id": request_id,
        "ok": False,
        "error": {"code": code, "message": message},
    }


def parse_reply(obj: Any, request_id: int) -> Any:
    """The result of a reply to request_id; RemoteError for an error reply."""
    if not isinstance(obj, dict) or obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(BAD_REQUEST, "the daemon sent a reply this client cannot read")
    if obj.get("id") != request_id and obj.get("ok") is not False:
        raise ProtocolError(BAD_REQUEST, f"reply for request {obj.get('id')!r}, not {request_id}")
    if obj.get("ok") is True:
        return obj.get("result")
    err = obj.get("error")
    if obj.get("ok") is not False or not isinstance(err, dict):
        raise ProtocolError(BAD_REQUEST, "the daemon sent a malformed reply")
    code, message = err.get("code"), err.get("message")
    raise RemoteError(
        code if isinstance(code, str) else INTERNAL,
        message if isinstance(message, str) else "(no message)",
    )


# -- the command schema ---------------------------------------------------------------


@dataclass(frozen=True)
class ArgSpec:
    """One argument. type: "str", "int", "number" (int or float) or "bool"."""

    name: str
    type: str
    help: str
    required: bool = False
    positional: bool = False  # on the ctl command line: DEVICE rather than --device DEVICE
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    metavar: str = ""
    # A file name without any directory (file_name_problem), for files the
    # daemon creates in a directory of its own.
    file_name: bool = False

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def display(self) -> str:
        if self.metavar:
            return self.metavar
        if self.choices and self.positional:
            return "|".join(self.choices)
        return self.name.upper()

    def usage(self) -> str:
        text = self.display if self.positional else f"{self.option} {self.display}"
        return text if self.required else f"[{text}]"

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "required": self.required,
            "help": self.help,
        }
        if self.choices:
            out["choices"] = list(self.choices)
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        return out


@dataclass(frozen=True)
class CommandSpec:
    name: str
    help: str
    args: tuple[ArgSpec, ...] = ()
    mutates: bool = False  # changes the daemon or a device (logged at info)
    notes: str = ""
    one_of: tuple[str, ...] = ()  # exactly one of these (optional) arguments

    def usage(self) -> str:
        words = [self.name]
        for a in self.args:
            if a.name not in self.one_of:
                words.append(a.usage())
            elif a.name == self.one_of[0]:
                group = [b for b in self.args if b.name in self.one_of]
                words.append("(" + " | ".join(f"{b.option} {b.display}" for b in group) + ")")
        return " ".join(words)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "usage": self.usage(),
            "help": self.help,
            "args": [a.describe() for a in self.args],
            "mutates": self.mutates,
            "notes": self.notes,
            "one_of": list(self.one_of),
        }


def _device_arg(help_text: str = "device name (see 'list')") -> ArgSpec:
    return ArgSpec("device", "str", help_text, required=True, positional=True, metavar="DEVICE")


_ADD_ARGS = (
    ArgSpec("socket", "str", "vfio-user socket path to listen on", required=True, metavar="PATH"),
    ArgSpec(
        "tap", "str", "host TAP interface (attached or created)", required=True, metavar="IFNAME"
    ),
    ArgSpec("name", "str", "device name (default: the socket's file name)", metavar="NAME"),
    ArgSpec(
        "mac",
        "str",
        "guest MAC aa:bb:cc:dd:ee:ff (default: derived from the socket path)",
        metavar="MAC",
    ),
    ArgSpec("mtu", "int", "MTU offered (default 1500)", minimum=68, maximum=65535, metavar="N"),
    ArgSpec(
        "queue_pairs",
        "int",
        "queue pairs offered (default 1)",
        minimum=1,
        maximum=MAX_QUEUE_PAIRS,
        metavar="N",
    ),
    ArgSpec(
        "queue_size",
        "int",
        "maximum virtqueue size, a power of two (default 256)",
        minimum=2,
        maximum=MAX_QUEUE_SIZE,
        metavar="N",
    ),
    ArgSpec(
        "steering",
        "str",
        "receive steering policy (default auto)",
        choices=STEERING_POLICIES,
        metavar="POLICY",
    ),
    ArgSpec(
        "notify_mode",
        "str",
        "doorbells by vfio-user message, or a polled shared page (default message)",
        choices=NOTIFY_MODES,
        metavar="MODE",
    ),
    ArgSpec(
        "tap_io",
        "str",
        "frames to the TAP batched through io_uring, or one writev each (default auto: io_uring"
        " where the kernel allows it)",
        choices=TAP_IO_MODES,
        metavar="MODE",
    ),
    ArgSpec(
        "tx_inline",
        "bool",
        "transmit doorbells of a sleeping worker handled where they arrive (default false)",
    ),
    ArgSpec(
        "busy_poll_us",
        "int",
        f"busy-poll before a worker sleeps, microseconds (default {DEFAULT_BUSY_POLL_US})",
        minimum=0,
        maximum=MAX_BUSY_POLL_US,
        metavar="US",
    ),
    ArgSpec(
        "speed",
        "int",
        "link speed reported in Mbit/s (default 10000)",
        minimum=1,
        maximum=(1 << 32) - 1,
        metavar="MBPS",
    ),
    ArgSpec(
        "nofile",
        "int",
        "open files its process may hold, with isolate (default: the daemon's device_nofile)",
        minimum=16,
        maximum=1 << 20,
        metavar="N",
    ),
    ArgSpec(
        "memory_max",
        "int",
        "private memory its process may use in MiB, with isolate "
        "(default: the daemon's device_memory_max)",
        minimum=16,
        maximum=1 << 20,
        metavar="MIB",
    ),
)

COMMANDS: dict[str, CommandSpec] = {
    spec.name: spec
    for spec in (
        CommandSpec(
            "help",
            "list the commands and their arguments",
            (
                ArgSpec(
                    "command",
                    "str",
                    "describe only this command",
                    positional=True,
                    metavar="COMMAND",
                ),
            ),
        ),
        CommandSpec("version", "the daemon's version, protocol version and process id"),
        CommandSpec(
            "list",
            "devices: name, socket, TAP, client connected, link, driver status, "
            "queue pairs active/max, steering policy",
        ),
        CommandSpec(
            "show",
            "one device in full: client, driver status, negotiated features, MAC (current "
            "and configured), MTU, link, queue pairs, steering (policy, effective, RSS table, "
            "key, hash types), receive filter",
            (_device_arg(),),
        ),
        CommandSpec(
            "queues",
            "the device's virtqueues as the device sees them: indices, descriptors in flight, "
            "flags, ring addresses",
            (_device_arg(),),
        ),
        CommandSpec(
            "stats",
            "the device's counters: per queue pair and direction, control queue, device",
            (_device_arg(),),
        ),
        CommandSpec(
            "snapshot",
            "everything the daemon knows of the device as one map, the metrics' source "
            "(what a supervising daemon reads from a device process)",
            (_device_arg(),),
        ),
        CommandSpec(
            "link",
            "the operator's link switch (the guest gets a config interrupt; the link is up "
            "only while the switch and the TAP are both up)",
            (
                _device_arg(),
                ArgSpec(
                    "state",
                    "str",
                    "up or down",
                    required=True,
                    positional=True,
                    choices=("up", "down"),
                ),
            ),
            mutates=True,
        ),
        CommandSpec(
            "steering",
            "switch the receive steering policy (no reset, no reordering)",
            (
                _device_arg(),
                ArgSpec(
                    "policy",
                    "str",
                    "the policy",
                    required=True,
                    positional=True,
                    choices=STEERING_POLICIES,
                ),
            ),
            mutates=True,
        ),
        CommandSpec(
            "log-level",
            "the daemon's logging threshold",
            (
                ArgSpec(
                    "level",
                    "str",
                    "the threshold",
                    required=True,
                    positional=True,
                    choices=LOG_LEVELS,
                ),
            ),
            mutates=True,
        ),
        CommandSpec(
            "add",
            "create and start a device (the keys of a [[device]] entry in the configuration)",
            _ADD_ARGS,
            mutates=True,
        ),
        CommandSpec(
            "remove",
            "stop a device and remove it (its client is disconnected, its socket removed)",
            (_device_arg(),),
            mutates=True,
        ),
        CommandSpec(
            "capture",
            "capture frames of a device into a pcap file",
            (
                _device_arg(),
                ArgSpec("queue", "int", "queue pair (default: all)", minimum=0, metavar="N"),
                ArgSpec(
                    "count",
                    "int",
                    "stop after this many frames",
                    minimum=1,
                    maximum=1 << 32,
                    metavar="N",
                ),
                ArgSpec(
                    "seconds",
                    "number",
                    "stop after this many seconds",
                    minimum=0.001,
                    maximum=86400,
                    metavar="S",
                ),
                ArgSpec(
                    "file",
                    "str",
                    "name of the pcap file to create in the daemon's capture directory "
                    "(a file name, not a path)",
                    required=True,
                    metavar="NAME",
                    file_name=True,
                ),
            ),
            mutates=True,
            notes="frames both ways, to a new file in the daemon's capture directory "
            "(serve --capture-dir; never overwritten or followed through a link); the reply "
            "names the full path; a capture bounded by count alone ends after 600 s",
            one_of=("count", "seconds"),
        ),
    )
}


def validate_args(spec: CommandSpec, args: Mapping[Any, Any]) -> dict[str, Any]:
    """A copy of args checked against spec; ProtocolError(bad_request) names the argument."""
    known = {a.name: a for a in spec.args}
    for key in args:
        if key not in known:
            names = ", ".join(known) or "none"
            raise ProtocolError(
                BAD_REQUEST,
                f"{spec.name}: unknown argument {str(key)[:64]!r} (arguments: {names})",
            )
    out: dict[str, Any] = {}
    for arg in spec.args:
        if arg.name not in args:
            if arg.required:
                raise ProtocolError(BAD_REQUEST, f"{spec.name}: missing argument {arg.name!r}")
            continue
        out[arg.name] = _check_value(spec.name, arg, args[arg.name])
    if spec.one_of and sum(name in out for name in spec.one_of) != 1:
        names = " and ".join(repr(n) for n in spec.one_of)
        raise ProtocolError(BAD_REQUEST, f"{spec.name}: give exactly one of {names}")
    return out


def file_name_problem(name: str) -> str | None:
    """Why name is not a plain file name for the daemon to create, or None.

    The daemon runs as its own user: a client (a member of the admin group)
    names a file inside the daemon's capture directory, and only that.
    """
    shown = repr(name[:64])
    if not name:
        return "is empty: give a file name, created in the daemon's capture directory"
    if "/" in name:
        return (
            f"must be a file name, not a path: {shown} has a '/' (the file is created "
            "in the daemon's capture directory)"
        )
    if name.startswith("."):
        return f"must not start with '.': {shown}"
    try:
        encoded = name.encode()
    except UnicodeEncodeError:
        return f"is not valid UTF-8: {shown}"
    if len(encoded) > MAX_FILE_NAME:
        return f"is longer than {MAX_FILE_NAME} bytes"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return f"contains a control character: {shown}"
    return None


def _check_value(cmd: str, arg: ArgSpec, value: Any) -> Any:
    where = f"{cmd}: argument {arg.name!r}"
    if arg.type == "str":
        if not isinstance(value, str):
            raise ProtocolError(BAD_REQUEST, f"{where} must be a string, not {_type_name(value)}")
        if len(value) > MAX_STRING:
            raise ProtocolError(BAD_REQUEST, f"{where} is longer than {MAX_STRING} characters")
        if "\0" in value:
            raise ProtocolError(BAD_REQUEST, f"{where} contains a NUL character")
        if arg.choices and value not in arg.choices:
            raise ProtocolError(
                BAD_REQUEST, f"{where} must be one of {', '.join(arg.choices)}, not {value[:64]!r}"
            )
        problem = file_name_problem(value) if arg.file_name else None
        if problem is not None:
            raise ProtocolError(BAD_REQUEST, f"{where} {problem}")
        return value
    if arg.type == "bool":
        if not isinstance(value, bool):
            raise ProtocolError(BAD_REQUEST, f"{where} must be a boolean, not {_type_name(value)}")
        return value
    if arg.type == "int":
        if not _is_int(value):
            raise ProtocolError(BAD_REQUEST, f"{where} must be an integer, not {_type_name(value)}")
    elif arg.type == "number":
        if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
            raise ProtocolError(BAD_REQUEST, f"{where} must be a finite number, not {value!r}")
    else:  # pragma: no cover - a schema mistake
        raise AssertionError(f"unknown argument type {arg.type}")
    if arg.minimum is not None and value < arg.minimum:
        raise ProtocolError(BAD_REQUEST, f"{where} must be at least {arg.minimum:g}, not {value}")
    if arg.maximum is not None and value > arg.maximum:
        raise ProtocolError(BAD_REQUEST, f"{where} must be at most {arg.maximum:g}, not {value}")
    return value


# -- a blocking client --------------------------------------------------------------------


class AdminClient:
    """One connection to the daemon's admin socket; requests one at a time.

        with AdminClient("/run/vfiouser-net/admin.sock") as c:
            devices = c.call("list")["devices"]

    call() returns the result or raises RemoteError (an error reply, with its
    code), Unreachable (cannot connect, closed, timed out) or ProtocolError.
    """

    def __init__(self, path: str = DEFAULT_ADMIN_SOCKET, timeout: float | None = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._next_id = 1

    def connect(self) -> None:
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            reason = exc.strerror or str(exc)
            raise Unreachable(f"cannot connect to {self.path}: {reason}", exc.errno) from exc
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> AdminClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, message: Mapping[str, Any]) -> Any:
        """Send one raw message (any map) and return the decoded reply."""
        self.connect()
        sock = self._sock
        assert sock is not None
        try:
            # The daemon may have replied (busy) and closed before reading the
            # request: its reply is still waiting in our buffer.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(encode_frame(dict(message)))
            body = recv_frame(sock, MAX_FRAME, self.timeout, self.timeout)
        except TimeoutError as exc:
            self.close()
            raise Unreachable(f"no reply from {self.path} within {self.timeout} s") from exc
        except TruncatedFrame as exc:
            self.close()
            raise Unreachable(f"{self.path}: the connection broke during a reply") from exc
        except ProtocolError:
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise Unreachable(
                f"connection to {self.path} failed: {exc.strerror or exc}", exc.errno
            ) from exc
        if body is None:
            self.close()
            raise Unreachable(
                f"{self.path} closed the connection without a reply "
                "(not allowed to use the admin socket, or the daemon is stopping)"
            )
        return unpack(body)

    def call(self, cmd: str, args: Mapping[str, Any] | None = None) -> Any:
        request_id = self._next_id
        self._next_id += 1
        reply = self.request(make_request(request_id, cmd, args))
        try:
            return parse_reply(reply, request_id)
        except RemoteError as exc:
            if exc.code in (TOO_LARGE, BUSY):
                self.close()  # the daemon closes after these
            raise


__all__ = [
    "BAD_REQUEST",
    "BUSY",
    "COMMANDS",
    "DEFAULT_ADMIN_SOCKET",
    "FAILED",
    "INTERNAL",
    "LOG_LEVELS",
    "MAX_FILE_NAME",
    "MAX_FRAME",
    "NO_SUCH_DEVICE",
    "PROTOCOL_VERSION",
    "STEERING_POLICIES",
    "TOO_LARGE",
    "UNKNOWN_COMMAND",
    "UNSUPPORTED",
    "UNSUPPORTED_VERSION",
    "AdminClient",
    "AdminError",
    "ArgSpec",
    "CommandSpec",
    "FrameTooLarge",
    "ProtocolError",
    "RemoteError",
    "Request",
    "TruncatedFrame",
    "Unreachable",
    "encode_frame",
    "error_reply",
    "file_name_problem",
    "make_request",
    "ok_reply",
    "pack",
    "parse_reply",
    "parse_request",
    "recv_frame",
    "unpack",
    "validate_args",
]
