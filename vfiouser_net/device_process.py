"""A device in a process of its own, under the daemon that serves many
(``serve --config`` with ``isolate = true``, or ``serve --isolate``).

Why: every device of one process shares its fate; a hole found in a parser,
in libvfio-user or a race would reach every VM the daemon serves. Here the
supervising daemon keeps each device's listening vfio-user socket and runs the
device as a child ``serve --fd N --sandbox`` on it: the child opens its TAP,
drops every capability and enters its seccomp allow-list before it starts a
thread (vfiouser_net/sandbox.py). A child that dies (a crash, a signal, its
limits) is reported (log, ``ctl list``, the restarts metric) and started again
on the same socket for the next client; the other devices never notice.

The supervisor talks to each child over the child's own admin socket (the
admin protocol, ``snapshot`` for the metrics); nothing a guest or client can
reach runs in the supervisor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from vfiouser_net.admin.protocol import AdminClient, ProtocolError, RemoteError, Unreachable
from vfiouser_net.budget import EXIT_REASONS, Budget
from vfiouser_net.capture import CAPTURE_MAX_FRAMES
from vfiouser_net.counters import format_mac
from vfiouser_net.device_options import DeviceError, DeviceOptions
from vfiouser_net.snapshot import DeviceSnapshot, SnapshotError, SteeringState

log = logging.getLogger(__name__)

# A child that keeps dying is started again after a delay that doubles with
# each death that follows a short life, up to the maximum; one that lived
# RESTART_RESET_SECONDS starts the count again.
RESTART_DELAY_SECONDS = 0.5
RESTART_DELAY_MAX_SECONDS = 30.0
RESTART_RESET_SECONDS = 60.0
START_TIMEOUT_SECONDS = 30.0
CALL_TIMEOUT_SECONDS = 10.0
# The health check: a snapshot asked every HEALTH_SECONDS; a process that
# answers none for HANG_SECONDS is killed as hung ("hang"). Scrapes read the
# last answer, so a hung child never holds a scrape.
HEALTH_SECONDS = 1.0
HEALTH_TIMEOUT_SECONDS = 2.0
HANG_SECONDS = 6.0
STALE_SECONDS = 5.0
# Exported at 0 for every device until one happens (Prometheus sees a series
# start at 0, so an increase over any window is right, also the first one).
COMMON_EXIT_REASONS = (
    "SIGKILL",
    "SIGSEGV",
    "SIGBUS",
    "SIGABRT",
    "SIGSYS",
    "hang",
    *EXIT_REASONS.values(),
)


@dataclass
class _Driver:
    """What metrics read as ``dev.transport.driver_resets``."""

    driver_resets: int = 0


@dataclass
class ProcessInfo:
    pid: int | None = None
    starts: int = 0
    exits: dict[str, int] = field(default_factory=dict)
    last_exit: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "restarts": max(0, self.starts - 1),
            "exits": dict(self.exits),
            "last_exit": self.last_exit,
        }


def exit_reason(returncode: int) -> str:
    """ "SIGKILL", "SIGSEGV", ... for a signal, "nofile" or "memory" for a
    process over its budget, "exit N" otherwise."""
    if returncode in EXIT_REASONS:
        return EXIT_REASONS[returncode]
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"


class DeviceProcess:
    """The supervisor's view of one device process (the interface the admin
    commands and the metrics use, as VirtioNetDevice's)."""

    def __init__(
        self,
        opts: DeviceOptions,
        *,
        run_dir: str,
        capture_dir: str,
        log_level: int = logging.INFO,
        budget: Budget | None = None,
    ) -> None:
        if not opts.socket_path and opts.listen_fd is None:
            raise DeviceError(f"device {opts.name}: a process needs a socket path or fd")
        self.opts = opts
        self.name = opts.name
        self.capture_dir = capture_dir
        self.log_level = log_level
        self.budget = budget or Budget()
        self.admin_path = os.path.join(run_dir, f"{self.name}.device.sock")
        self.process = ProcessInfo()
        self.transport = _Driver()
        self.resets: dict[str, int] = {}
        self.operator_link_up = True
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._health: threading.Thread | None = None
        self._started_at = 0.0
        self._restart_delay = RESTART_DELAY_SECONDS
        # What the health check killed the process for (its exit's reason).
        self._kill_reason: str | None = None
        self._last_reply: tuple[float, DeviceSnapshot] | None = None
        self._listener: socket.socket | None = None
        if opts.listen_fd is not None:
            self._listen_fd = opts.listen_fd
        else:
            self._listener = self._listen(opts.socket_path)
            self._listen_fd = self._listener.fileno()

    @staticmethod
    def _listen(path: str) -> socket.socket:
        # Kept here, not in the child: it outlives every child, so QEMU's next
        # connection waits in its backlog while a dead child is replaced.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(path)
            s.listen(16)
        except OSError as exc:
            s.close()
            raise DeviceError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
        return s

    # -- the child ----------------------------------------------------------------

    def _argv(self) -> list[str]:
        o = self.opts
        level = logging.getLevelName(self.log_level).lower()
        return [
            sys.executable, "-P", "-m", "vfiouser_net", "--log-level", level,
            "serve", "--fd", str(self._listen_fd), "--name", self.name, "--tap", o.tap,
            "--mac", format_mac(o.mac), "--mtu", str(o.mtu), "--queue-size", str(o.queue_size),
            "--queue-pairs", str(o.queue_pairs), "--steering", o.steering,
            "--notify-mode", o.notify_mode, "--busy-poll-us", str(o.busy_poll_us),
            "--tap-io", o.tap_io, *(["--tx-inline"] if o.tx_inline else []),
            "--speed", str(o.speed_mbps), "--metrics-addr", "none",
            "--admin-socket", self.admin_path, "--capture-dir", self.capture_dir, "--sandbox",
            "--sandbox-nofile", str(self.budget.nofile),
            "--sandbox-memory", str(self.budget.memory_mib),
        ]  # fmt: skip

    def _spawn(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.admin_path)
        proc = subprocess.Popen(self._argv(), pass_fds=[self._listen_fd], stdin=subprocess.DEVNULL)
        with self._lock:
            self._proc = proc
            self._kill_reason = None
            self._last_reply = None
            self._started_at = time.monotonic()
            self.process.pid = proc.pid
            self.process.starts += 1
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not os.path.exists(self.admin_path):
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        log.info("device %s: process %d serves it", self.name, proc.pid)

    def start(self) -> None:
        self._spawn()
        proc = self._proc
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            self.stop()
            raise DeviceError(f"device {self.name}: its process did not start (exit {code})")
        self._watcher = threading.Thread(target=self._watch, name=f"watch-{self.name}", daemon=True)
        self._watcher.start()
        self._health = threading.Thread(
            target=self._check_health, name=f"health-{self.name}", daemon=True
        )
        self._health.start()

    def _watch(self) -> None:
        while not self._stopping.is_set():
            proc = self._proc
            if proc is None:
                return
            rc = proc.wait()
            if self._stopping.is_set():
                return
            with self._lock:
                reason = self._kill_reason or exit_reason(rc)
                self.process.exits[reason] = self.process.exits.get(reason, 0) + 1
                self.process.last_exit = reason
                lived = time.monotonic() - self._started_at
            if lived >= RESTART_RESET_SECONDS:
                self._restart_delay = RESTART_DELAY_SECONDS
            delay = self._restart_delay
            self._restart_delay = min(delay * 2, RESTART_DELAY_MAX_SECONDS)
            log.error(
                "device %s: its process %d ended (%s) after %.1f s; starting a new one on %s "
                "in %.1f s",
                self.name,
                proc.pid,
                reason,
                lived,
                self.opts.socket_path or f"fd {self._listen_fd}",
                delay,
            )
            if self._stopping.wait(delay):
                return
            try:
                self._spawn()
            except OSError:
                log.exception("device %s: starting its process failed", self.name)
                self._stopping.wait(RESTART_DELAY_SECONDS)

    def _check_health(self) -> None:
        silent_since: float | None = None
        while not self._stopping.wait(HEALTH_SECONDS):
            proc = self._proc
            if proc is None or proc.poll() is not None:
                silent_since = None
                continue
            try:
                self._snapshot_call(HEALTH_TIMEOUT_SECONDS)
                silent_since = None
                continue
            except DeviceError as exc:
                now = time.monotonic()
                if now - self._started_at < START_TIMEOUT_SECONDS and self._last_reply is None:
                    continue  # still starting
                if silent_since is None:
                    silent_since = now
                    log.warning("%s", exc)
                if now - silent_since < HANG_SECONDS:
                    continue
            log.error(
                "device %s: its process %d answered nothing for %.0f s: killing it as hung",
                self.name,
                proc.pid,
                HANG_SECONDS,
            )
            with self._lock:
                if self._proc is proc:
                    self._kill_reason = "hang"
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            silent_since = None

    def stop(self) -> None:
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for t in (self._watcher, self._health):
            if t is not None and t is not threading.current_thread():
                t.join(5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.opts.socket_path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.admin_path)

    # -- what the admin commands and the metrics call -------------------------------

    def _call(self, cmd: str, timeout: float = CALL_TIMEOUT_SECONDS, **args: Any) -> Any:
        try:
            with AdminClient(self.admin_path, timeout=timeout) as c:
                return c.call(cmd, args)
        except (Unreachable, RemoteError, ProtocolError) as exc:
            raise DeviceError(f"device {self.name}: its process did not answer: {exc}") from exc

    @property
    def connected(self) -> bool:
        return self.snapshot().connected

    def snapshot(self) -> DeviceSnapshot:
        return self._snapshot_call(CALL_TIMEOUT_SECONDS)

    def cached_snapshot(self) -> DeviceSnapshot:
        """The health check's last snapshot (at most STALE_SECONDS old): what a
        scrape reads, never waiting for the process."""
        with self._lock:
            last = self._last_reply
        if last is None or time.monotonic() - last[0] > STALE_SECONDS:
            raise DeviceError(f"device {self.name}: its process has not answered lately")
        return last[1]

    def _snapshot_call(self, timeout: float) -> DeviceSnapshot:
        reply = self._call("snapshot", timeout=timeout, device=self.name)
        # The process serves a guest: what it answers is checked, field by field.
        try:
            snap = DeviceSnapshot.from_dict(reply["snapshot"])
        except (SnapshotError, KeyError, TypeError) as exc:
            raise DeviceError(
                f"device {self.name}: its process answered a bad snapshot: {exc}"
            ) from exc
        self.resets = {k: v for k, v in reply["resets"].items() if k != "driver"}
        self.transport.driver_resets = int(reply["resets"].get("driver", 0))
        self.operator_link_up = bool(reply["operator_link_up"])
        with self._lock:
            self._last_reply = (time.monotonic(), snap)
        return snap

    def steering(self) -> SteeringState:
        return self.snapshot().steering

    def set_steering(self, policy: str) -> None:
        self._call("steering", device=self.name, policy=policy)
        self.opts.steering = policy

    def set_link(self, up: bool) -> None:
        self._call("link", device=self.name, state="up" if up else "down")
        self.operator_link_up = up

    def ring_state(self) -> list[dict[str, Any]]:
        queues: list[dict[str, Any]] = self._call("queues", device=self.name)["queues"]
        return queues

    def capture(
        self, directory: str, name: str, *, queue: int, count: int, seconds: float
    ) -> dict[str, Any]:
        # The child writes the file itself, in the same capture directory.
        # The admin protocol takes one of count and seconds; the other is the
        # default maximum, as the child's own hook would fill it.
        args: dict[str, Any] = {"device": self.name, "file": name}
        if count < CAPTURE_MAX_FRAMES:
            args["count"] = count
        else:
            args["seconds"] = seconds
        if queue >= 0:
            args["queue"] = queue
        result: dict[str, Any] = self._call("capture", timeout=seconds + 30, **args)
        return result

    def set_log_level(self, level: str) -> None:
        self._call("log-level", level=level)

    def poll_link(self) -> None:
        """The child follows its own TAP's link."""
