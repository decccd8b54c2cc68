"""atheris target: the admin channel's frame and message decoding.

The input is what a client writes to the admin socket (the first byte sets
how many bytes each recv() returns, so frames arrive split anywhere). Every
frame goes through what the server does with it (vfiouser_net.admin.server
._serve/_handle): recv_frame, unpack, parse_request, and the reply is
encoded. The only exceptions allowed are the protocol's own (ProtocolError
and its subclasses); an accepted request is exactly what the command schema
allows; every reply encodes into a frame. Accepted requests of the
commands that need no live device state (help, version, add, remove, link,
steering, log-level) are executed against a fake daemon, where CommandError
is the documented refusal. The client side's parse_reply gets the same
decoded objects (RemoteError is its documented answer to an error reply).

    python tests/fuzz/fuzz_admin_protocol.py [libFuzzer flags] CORPUS_DIR
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import atheris

with atheris.instrument_imports(include=["vfiouser_net"]):
    from vfiouser_net_harness.fake_snapshot import fake_snapshot

    from vfiouser_net.admin import protocol as p
    from vfiouser_net.admin.commands import CommandError, Commands, Peer
    from vfiouser_net.daemon import DaemonError
    from vfiouser_net.device_options import DeviceOptions
    from vfiouser_net.snapshot import DeviceSnapshot, SteeringState

EXECUTED = ("help", "version", "add", "remove", "link", "steering", "log-level")
MAC = bytes([0x52, 0x54, 0, 0, 0, 1])


class FakeDevice:
    def __init__(self, opts: DeviceOptions) -> None:
        opts.validate()
        self.opts = opts
        self.name = opts.name or opts.socket_path.rsplit("/", 1)[-1]
        self.connected = False

    def snapshot(self) -> DeviceSnapshot:
        return fake_snapshot(
            {
                "socket": self.opts.socket_path,
                "tap": self.opts.tap,
                "steering": self.steering().to_dict(),
            }
        )

    def steering(self) -> SteeringState:
        steer = {
            "max_queue_pairs": self.opts.queue_pairs,
            "policy": self.opts.steering,
            "effective": self.opts.steering,
        }
        return fake_snapshot({"steering": steer}).steering

    def set_steering(self, policy: str) -> None:
        assert policy in p.STEERING_POLICIES

    def set_link(self, up: bool) -> None:
        assert isinstance(up, bool)

    def ring_state(self) -> list[dict[str, Any]]:
        return []


class FakeDaemon:
    def __init__(self) -> None:
        self.devs = [FakeDevice(DeviceOptions("/run/vfiouser-net/vm1.sock", "tap-vm1", MAC))]

    def devices(self) -> list[FakeDevice]:
        return self.devs

    def add_device(self, opts: DeviceOptions) -> FakeDevice:
        dev = FakeDevice(opts)
        if any(d.name == dev.name for d in self.devs):
            raise DaemonError(f"a device named {dev.name} exists")
        return dev

    def remove_device(self, name: str) -> None:
        if not any(d.name == name for d in self.devs):
            raise DaemonError(f"no device {name}")

    def set_log_level(self, level: str) -> None:
        assert level in p.LOG_LEVELS


COMMANDS = Commands(FakeDaemon())
PEER = Peer(1, 0, 0)


class StreamSocket:
    """The part of socket.socket that recv_frame uses, over a byte string."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data = data
        self.pos = 0
        self.chunk = chunk

    def settimeout(self, value: float | None) -> None:
        pass

    def recv(self, n: int) -> bytes:
        k = min(n, self.chunk)
        out = self.data[self.pos : self.pos + k]
        self.pos += len(out)
        return out


def check_request(req: p.Request) -> None:
    assert isinstance(req.id, int) and not isinstance(req.id, bool), req.id
    spec = p.COMMANDS[req.cmd]
    names = {a.name: a for a in spec.args}
    assert set(req.args) <= set(names), req.args
    for arg in spec.args:
        if arg.required:
            assert arg.name in req.args, (req.cmd, arg.name)
        if arg.name not in req.args:
            continue
        value = req.args[arg.name]
        if arg.type == "str":
            assert isinstance(value, str) and len(value) <= p.MAX_STRING and "\0" not in value
            assert not arg.choices or value in arg.choices
        elif arg.type == "int":
            assert isinstance(value, int) and not isinstance(value, bool)
        elif arg.type == "number":
            assert isinstance(value, int | float) and not isinstance(value, bool)
        elif arg.type == "bool":
            assert isinstance(value, bool)
        if arg.minimum is not None:
            assert value >= arg.minimum, (arg.name, value)
        if arg.maximum is not None:
            assert value <= arg.maximum, (arg.name, value)
    if spec.one_of:
        assert sum(n in req.args for n in spec.one_of) == 1
    # Validation is idempotent: what was accepted is accepted again as is.
    assert p.validate_args(spec, req.args) == req.args


def check_reply(reply: dict[str, Any]) -> None:
    frame = p.encode_frame(reply)
    assert len(frame) <= p.MAX_FRAME + p.HEADER.size
    back = p.unpack(frame[p.HEADER.size :])
    assert back == reply, (back, reply)


def handle(body: bytes) -> None:
    """What the server does with one frame's body (minus running the command)."""
    try:
        obj = p.unpack(body)
    except p.ProtocolError as exc:
        assert exc.code == p.BAD_REQUEST
        check_reply(p.error_reply(None, exc.code, exc.message))
        return
    try:
        req = p.parse_request(obj)
    except p.ProtocolError as exc:
        assert exc.code in p.ERROR_CODES, exc.code
        rid = exc.request_id
        assert rid is None or (isinstance(rid, int) and not isinstance(rid, bool))
        check_reply(p.error_reply(rid, exc.code, exc.message))
    else:
        check_request(req)
        check_reply(p.ok_reply(req.id, req.args))
        if req.cmd in EXECUTED:
            try:
                result = COMMANDS.execute(req.cmd, req.args, PEER)
            except CommandError as exc:
                assert exc.code in p.ERROR_CODES, exc.code
                check_reply(p.error_reply(req.id, exc.code, exc.message))
            else:
                check_reply(p.ok_reply(req.id, result))
    # The client's side of the same bytes.
    try:
        p.parse_reply(obj, 1)
    except (p.ProtocolError, p.RemoteError) as exc:
        assert isinstance(exc.code, str) and isinstance(exc.message, str)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    sock = StreamSocket(data[1:], 1 + data[0])
    while True:
        try:
            body = p.recv_frame(sock, p.MAX_FRAME)  # type: ignore[arg-type]
        except p.FrameTooLarge as exc:
            assert exc.length > p.MAX_FRAME
            check_reply(p.error_reply(None, p.TOO_LARGE, str(exc)))
            return
        except p.TruncatedFrame:
            return
        if body is None:
            return
        handle(body)


def main() -> None:
    logging.disable(logging.CRITICAL)  # the control plane's warnings, per input
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
