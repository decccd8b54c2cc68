"""libvfio-user's sample server (``samples/server``, built by the set-up
against the patched library) as a process the protocol tests talk to."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from vfiouser_net_harness.prereq import require

CANDIDATES = [
    "/var/cache/vfiouser-net/libvfio-user/build/samples/server",
    "/tmp/lvu-scratch/B/samples/server",
]


def find_sample_server() -> str | None:
    env = os.environ.get("VFIOUSER_LVU_SAMPLE_SERVER")
    if env:
        return env if os.access(env, os.X_OK) else None
    for c in CANDIDATES:
        if os.access(c, os.X_OK):
            return c
    return shutil.which("libvfio-user-sample-server")


SAMPLE = find_sample_server()


def require_sample() -> str:
    """The binary; a skip when it is missing (a failure under CI=true)."""
    if SAMPLE is None:
        what = (
            "libvfio-user sample server not found (looked at "
            f"$VFIOUSER_LVU_SAMPLE_SERVER and {CANDIDATES})"
        )
        require(False, what)
    assert SAMPLE is not None
    return SAMPLE


class SampleServer:
    def __init__(self, tmp_path: Path) -> None:
        sample = require_sample()
        self.sock = str(tmp_path / "sample.sock")
        self.log_path = tmp_path / "sample-server.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sample, "-v", self.sock],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None:
                raise RuntimeError(f"sample server exited early:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError("sample server did not create its socket")
            time.sleep(0.01)

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
