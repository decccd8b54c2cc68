"""iperf3 between a guest and the host side of its network namespace.

The server runs on the host side inside the namespace (``iperf3 -s -1 -J``
bound to the TAP's address), the client in the guest (``iperf3 -c ... -J``,
with ``-R`` for guest receive). Both JSON reports are parsed and
cross-checked: the byte counts that the client reports for each side must
equal the ones in the server's own report, and the receiver cannot have
received more than the sender sent (TCP) nor much less (only what was still
in flight when the test ended).

Used by the built-in virtio-net baseline test and, later, by the benchmark
that compares it with the vfio-user device.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from .guest import Guest
from .netns import NetNS

log = logging.getLogger(__name__)

Direction = Literal["guest_tx", "guest_rx"]
DEFAULT_PORT = 5201
IPERF_BLOCK = 128 * 1024  # iperf3's default TCP write size


class IperfError(RuntimeError):
    """iperf3 failed or its reports are inconsistent."""


@dataclass(frozen=True)
class IperfResult:
    """One iperf3 TCP run; bytes and rates as the sender and receiver saw them."""

    direction: Direction
    seconds: float
    streams: int
    sent_bytes: int
    received_bytes: int
    sender_bps: float
    receiver_bps: float
    retransmits: int | None
    client_version: str
    server_version: str
    client_json: dict[str, Any] = field(repr=False)
    server_json: dict[str, Any] = field(repr=False)

    @property
    def receiver_gbps(self) -> float:
        return self.receiver_bps / 1e9

    def inconsistencies(self, min_received_ratio: float = 0.9) -> list[str]:
        """What does not add up between the two reports (empty when fine)."""
        problems = []
        cend, send = self.client_json["end"], self.server_json["end"]
        # The client's report carries both sides (the server's numbers arrive
        # through iperf3's results exchange); its own side must match too.
        if self.direction == "guest_tx":  # client sends, server receives
            if cend["sum_received"]["bytes"] != send["sum_received"]["bytes"]:
                problems.append(
                    f"received bytes: client report {cend['sum_received']['bytes']} "
                    f"!= server report {send['sum_received']['bytes']}"
                )
        else:  # server sends, client receives
            if cend["sum_sent"]["bytes"] != send["sum_sent"]["bytes"]:
                problems.append(
                    f"sent bytes: client report {cend['sum_sent']['bytes']} "
                    f"!= server report {send['sum_sent']['bytes']}"
                )
        if self.sent_bytes <= 0 or self.received_bytes <= 0:
            problems.append(f"no data: sent {self.sent_bytes}, received {self.received_bytes}")
        elif self.received_bytes > self.sent_bytes + self.streams * IPERF_BLOCK:
            # iperf3 (3.18 against 3.12) may report one block per stream more
            # received than sent: its sender stops counting a write that
            # still reaches the receiver. More than that cannot be TCP.
            problems.append(f"received {self.received_bytes} > sent {self.sent_bytes}")
        elif self.received_bytes < min_received_ratio * self.sent_bytes:
            ratio = f"{min_received_ratio:.0%}"
            problems.append(f"received {self.received_bytes} < {ratio} of sent {self.sent_bytes}")
        return problems

    def summary(self) -> dict[str, Any]:
        """Small dict for logs and benchmark records."""
        return {
            "direction": self.direction,
            "seconds": self.seconds,
            "streams": self.streams,
            "sent_bytes": self.sent_bytes,
            "received_bytes": self.received_bytes,
            "sender_gbps": round(self.sender_bps / 1e9, 3),
            "receiver_gbps": round(self.receiver_bps / 1e9, 3),
            "retransmits": self.retransmits,
        }


def _wait_listening(ns: NetNS, port: int, server: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise IperfError(f"iperf3 server exited early ({server.returncode})")
        out = ns.run(["ss", "-Htln", f"sport = :{port}"], check=False).stdout
        if out.strip():
            return
        time.sleep(0.1)
    raise IperfError(f"iperf3 server not listening on port {port} after {timeout:.0f} s")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def _parse(text: str, who: str) -> dict[str, Any]:
    start = text.find("{")
    if start < 0:
        raise IperfError(f"no JSON from the iperf3 {who}:\n{text[-2000:]}")
    try:
        data: dict[str, Any] = json.loads(text[start:])
    except json.JSONDecodeError as exc:
        raise IperfError(f"bad JSON from the iperf3 {who}: {exc}\n{text[-2000:]}") from exc
    if "error" in data:
        raise IperfError(f"iperf3 {who} error: {data['error']}")
    return data


def run_iperf3(
    guest: Guest,
    ns: NetNS,
    *,
    direction: Direction,
    seconds: int = 3,
    streams: int = 1,
    server_addr: str | None = None,
    port: int = DEFAULT_PORT,
    extra_client_args: str = "",
    check: bool = True,
) -> IperfResult:
    """Run one iperf3 TCP test between the guest (client) and the namespace.

    ``direction="guest_tx"``: the guest sends; ``"guest_rx"``: the guest
    receives (``-R``). With ``check`` (default) an inconsistent pair of
    reports raises IperfError.
    """
    addr = server_addr or ns.host_addr
    server = ns.popen(
        ["iperf3", "-s", "-1", "-J", "-B", addr, "-p", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_listening(ns, port, server, timeout=10.0)
        reverse = " -R" if direction == "guest_rx" else ""
        cmd = (
            f"iperf3 -c {addr} -p {port} -t {seconds} -P {streams} -i 0 -J{reverse} "
            f"{extra_client_args}"
        ).strip()
        code, out = guest.run(cmd, timeout=seconds + 60)
        try:
            sout, serr = server.communicate(timeout=30)
        except subprocess.TimeoutExpired as exc:
            raise IperfError("iperf3 server did not finish after the client") from exc
        if code != 0:
            raise IperfError(f"guest iperf3 exited {code}:\n{out[-3000:]}")
        if server.returncode != 0:
            raise IperfError(f"iperf3 server exited {server.returncode}: {serr}\n{sout[-2000:]}")
    finally:
        _stop(server)
    client_json = _parse(out, "client")
    server_json = _parse(sout, "server")
    if direction == "guest_tx":
        sender_end, receiver_end = client_json["end"], server_json["end"]
    else:
        sender_end, receiver_end = server_json["end"], client_json["end"]
    retransmits = sender_end["sum_sent"].get("retransmits")
    result = IperfResult(
        direction=direction,
        seconds=float(client_json["end"]["sum_sent"].get("seconds", seconds)),
        streams=streams,
        sent_bytes=int(sender_end["sum_sent"]["bytes"]),
        received_bytes=int(receiver_end["sum_received"]["bytes"]),
        sender_bps=float(sender_end["sum_sent"]["bits_per_second"]),
        receiver_bps=float(receiver_end["sum_received"]["bits_per_second"]),
        retransmits=None if retransmits is None else int(retransmits),
        client_version=str(client_json["start"].get("version", "?")),
        server_version=str(server_json["start"].get("version", "?")),
        client_json=client_json,
        server_json=server_json,
    )
    log.info("iperf3 %s", result.summary())
    if check:
        problems = result.inconsistencies()
        if problems:
            raise IperfError(f"iperf3 {direction}: " + "; ".join(problems))
    return result
