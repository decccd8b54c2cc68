"""Run the vfiouser-net daemon for a test: in a network namespace, logging to
a file, stopped with SIGTERM (and killed if that fails) on the way out."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    pass


class Server:
    """`vfiouser-net serve` as a child process (optionally inside a netns)."""

    def __init__(
        self,
        socket_path: str | Path,
        tap: str,
        *,
        netns: str | None = None,
        extra_args: Sequence[str] = (),
        log_level: str = "info",
        env: dict[str, str] | None = None,
        python: str | Path = sys.executable,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.tap = tap
        self.netns = netns
        self.log_path = Path(tempfile.mkstemp(prefix="vn-server-", suffix=".log")[1])
        if "--metrics-addr" not in extra_args:
            # Tests run several daemons at once: no fixed port.
            extra_args = [*extra_args, "--metrics-addr", "127.0.0.1:0"]
        # -P: not the working directory first on sys.path, so that PYTHONPATH
        # (scripts/test-asan.sh's sanitized build) decides which package runs.
        self.argv = [
            str(python),
            "-P",
            "-m",
            "vfiouser_net",
            "--log-level",
            log_level,
            "serve",
            "--socket-path",
            str(self.socket_path),
            "--tap",
            tap,
            *extra_args,
        ]
        if netns is not None:
            self.argv = ["ip", "netns", "exec", netns, *self.argv]
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def start(self, timeout: float = 20.0) -> Server:
        # Appending: dump_stacks() adds to the log while the daemon writes it.
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=None if self.env is None else {**os.environ, **self.env},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if self.socket_path.exists():
                self._check_datapath()
                return self
            time.sleep(0.05)
        self.kill()
        raise ServerError(f"server did not listen on {self.socket_path}:\n{self.log()}")

    def _check_datapath(self) -> None:
        """Under scripts/test-asan.sh the daemon must run the sanitized build."""
        want = os.environ.get("VN_EXPECT_NATIVE_IN")
        if not want or self.proc is None:
            return
        maps = Path(f"/proc/{self.proc.pid}/maps").read_text()
        if f"{want}/vfiouser_net/_native" not in maps:
            self.kill()
            raise ServerError(f"the daemon's datapath is not the one in {want}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics_url(self, timeout: float = 10.0) -> str:
        """Where the daemon serves /metrics (from its log line)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"metrics on (http://\S+/metrics)", self.log())
            if m:
                return m.group(1)
            time.sleep(0.05)
        raise ServerError(f"no metrics address in the log:\n{self.log()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def thread_names(self) -> list[str]:
        """The names of the daemon's threads (/proc/PID/task/*/comm)."""
        assert self.proc is not None
        names = []
        for comm in Path(f"/proc/{self.proc.pid}/task").glob("*/comm"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                names.append(comm.read_text().strip())
        return sorted(names)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code (kills on timeout)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("server ignored SIGTERM for %.0f s; killing", timeout)
                self.dump_stacks()
                self.kill()
        self.returncode = self.proc.returncode
        return self.returncode

    def dump_stacks(self) -> None:
        """Append every thread's stacks to the log: Python's (the daemon's
        SIGQUIT handler) and C's (gdb, where installed). For a hang."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGQUIT)
        time.sleep(0.5)
        try:
            gdb = subprocess.run(
                ["gdb", "-p", str(self.proc.pid), "-batch", "-nx", "-ex", "thread apply all bt"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            text = f"gdb: {exc}\n"
        else:
            text = gdb.stdout + gdb.stderr[-2000:]
        with self.log_path.open("a") as out:
            out.write("\n== C stacks (gdb) ==\n" + text)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if exc[0] is not None:
            log.error("server log (%s):\n%s", self.log_path, self.log()[-4000:])
        else:
            # Kept only when something failed.
            self.log_path.unlink(missing_ok=True)


@contextlib.contextmanager
def running_server(*args: object, **kwargs: object) -> Iterator[Server]:
    server = Server(*args, **kwargs)  # type: ignore[arg-type]
    with server:
        yield server
