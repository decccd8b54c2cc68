"""The device process sandbox (vfiouser_net/sandbox.py, csrc/sandbox.c) in a
real child process: what /proc says of it, a forbidden call refused and
logged, threads and files still usable, the descriptor budget enforced."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import errno, json, os, threading
    from vfiouser_net import sandbox

    sandbox.enter(sandbox.SandboxLimits(nofile=64))
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("NoNewPrivs", "Seccomp", "CapEff", "CapPrm", "CapInh", "CapBnd",
                       "CapAmb"):
                out[key] = value.strip()
    try:
        os.execv("/bin/true", ["true"])
    except OSError as e:
        out["execve"] = e.errno
    try:
        os.mkdir("/proc/self/fd/nope")
    except OSError as e:
        out["mkdir"] = e.errno
    t = threading.Thread(target=lambda: out.__setitem__("thread", "ran"))
    t.start()
    t.join()
    opened = []
    try:
        for _ in range(100):
            opened.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as e:
        out["open_past_budget"] = e.errno
    out["refused"] = sandbox.refused_syscalls()
    print(json.dumps(out), flush=True)
    """
)


def run_child(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60
    )


def test_sandboxed_process() -> None:
    proc = run_child(CHILD)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["NoNewPrivs"] == "1"
    assert out["Seccomp"] == "2"  # filter mode
    for cap in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        assert int(out[cap], 16) == 0, (cap, out[cap])
    if os.geteuid() == 0:  # only a process with CAP_SETPCAP empties its bounding set
        assert int(out["CapBnd"], 16) == 0
    # Forbidden calls fail with EPERM instead of running, and are logged.
    assert out["execve"] == 1
    assert out["mkdir"] == 1
    assert out["refused"] == 2
    refused = [ln for ln in proc.stderr.splitlines() if "sandbox refused system call" in ln]
    assert len(refused) == 2, proc.stderr
    if platform.machine() == "x86_64":
        assert refused[0].endswith(" 59")  # execve
        assert refused[1].endswith(" 83")  # mkdir
    # What a device needs still works; the descriptor budget holds.
    assert out["thread"] == "ran"
    assert out["open_past_budget"] == 24  # EMFILE


def test_sandbox_refuses_a_process_with_threads() -> None:
    code = textwrap.dedent(
        """
        import threading, time
        from vfiouser_net import sandbox
        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
        try:
            sandbox.enter(sandbox.SandboxLimits())
        except sandbox.SandboxError as e:
            print("refused:", e)
        """
    )
    proc = run_child(code)
    assert proc.returncode == 0, proc.stderr
    assert "refused: the sandbox must be entered before the process starts a thread" in (
        proc.stdout
    )


def test_negative_limits_are_refused() -> None:
    from vfiouser_net import sandbox

    with pytest.raises(sandbox.SandboxError, match="must not be negative"):
        sandbox.enter(sandbox.SandboxLimits(nofile=-1))
