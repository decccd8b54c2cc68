"""A device process's budget (vfiouser_net/budget.py): the watchdog ends a
real child process over its file or memory budget with the exit code the
supervisor names; the budget's keys in the configuration and their errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vfiouser_net.budget import EXIT_MEMORY, EXIT_NOFILE, Budget, over_budget
from vfiouser_net.config import ConfigError, load
from vfiouser_net.device_process import COMMON_EXIT_REASONS, exit_reason

CHILD = textwrap.dedent(
    """
    import logging, os, sys, time
    from vfiouser_net import budget

    logging.basicConfig(level=logging.INFO)
    budget.watch(budget.Budget(nofile=64, memory_mib=64), "device t")
    if sys.argv[1] == "files":
        held = [os.open("/dev/null", os.O_RDONLY) for _ in range(80)]
    else:
        held = bytearray(96 << 20)  # written: resident
        held[::4096] = b"x" * len(held[::4096])
    time.sleep(5)
    sys.exit(0)
    """
)


def run_child(what: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-c", CHILD, what], capture_output=True, text=True, timeout=60
    )


def test_a_process_over_its_file_budget_ends() -> None:
    out = run_child("files")
    assert out.returncode == EXIT_NOFILE, out.stderr
    assert "device t: over its budget (" in out.stderr
    assert "open files, budget 64): ending the process" in out.stderr


def test_a_process_over_its_memory_budget_ends() -> None:
    out = run_child("memory")
    assert out.returncode == EXIT_MEMORY, out.stderr
    assert "MiB of private memory, budget 64 MiB): ending the process" in out.stderr


def test_within_budget_nothing_happens() -> None:
    assert over_budget(Budget(nofile=1 << 20, memory_mib=1 << 20)) is None
    code, why = over_budget(Budget(nofile=1 << 20, memory_mib=1)) or (0, "")
    assert code == EXIT_MEMORY and "budget 1 MiB" in why
    code, why = over_budget(Budget(nofile=1, memory_mib=1 << 20)) or (0, "")
    assert code == EXIT_NOFILE and "budget 1" in why


def test_exit_reasons_name_the_budget() -> None:
    assert exit_reason(EXIT_NOFILE) == "nofile"
    assert exit_reason(EXIT_MEMORY) == "memory"
    assert exit_reason(-9) == "SIGKILL"
    assert exit_reason(3) == "exit 3"
    # Exported at 0 from the start, as every reason the supervisor itself gives.
    assert {"nofile", "memory", "hang"} <= set(COMMON_EXIT_REASONS)


def test_budget_keys_in_the_configuration(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(
        "[daemon]\nisolate = true\ndevice_nofile = 200\ndevice_memory_max = 128\n"
        '[[device]]\nsocket = "/run/a.sock"\ntap = "ta"\nnofile = 50\nmemory_max = 40\n'
        '[[device]]\nsocket = "/run/b.sock"\ntap = "tb"\n'
    )
    cfg = load(cfg_file)
    assert (cfg.device_nofile, cfg.device_memory_max) == (200, 128)
    a, b = cfg.devices
    assert (a.nofile, a.memory_max_mib) == (50, 40)
    assert (b.nofile, b.memory_max_mib) == (0, 0)  # the daemon's


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[daemon]\ndevice_nofile = 3\n", "[daemon] file budget 3 out of range 16.."),
        ("[daemon]\ndevice_memory_max = 0\n", "[daemon] memory budget 0 MiB out of range"),
        (
            '[[device]]\nsocket = "/run/a.sock"\ntap = "ta"\nmemory_max = 2\n',
            "device #1: memory budget 2 MiB out of range",
        ),
        (
            '[[device]]\nsocket = "/run/a.sock"\ntap = "ta"\nnofile = "many"\n',
            "device #1: nofile must be a int",
        ),
    ],
)
def test_budget_errors_name_the_entry(tmp_path: Path, text: str, message: str) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(cfg_file)
    assert message in str(err.value)
