"""The hostile driver (harness/vfiouser_net_harness/hostile_driver/) against a real daemon:
a 4-pair device on a multiqueue TAP in a fresh namespace, the whole attack
catalogue while healthy traffic runs on pairs 1-3, and the command-line form
with its JSON report.

Each attack asserts its own outcome inside the tool (counters moved by the
expected amounts, the virtio-visible reaction, healthy pairs kept flowing,
nothing written outside used rings and offered buffers, traffic works after
recovery); here every attack must have come out right, and the daemon must
have logged no control-plane exception and stop cleanly (the fixture checks).

The attacks of issue #11 (a hostile vfio-user client: DMA_MAP flags, sizes
past the file, truncation, unaligned offsets, repeats, SET_IRQS, region
accesses and region info; a hostile guest: a busy control queue, steering to
pairs without rings) run one per daemon, since before their fixes several
take the daemon down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from vfiouser_net_harness.hostile_driver import (
    CATALOGUE,
    SECURITY_ATTACKS,
    HostileDriver,
    admin_sources,
)

from tests.protocol.support import DeviceEnv

REPO = Path(__file__).resolve().parents[2]
MQ_ARGS = ("--queue-pairs", "4")
QUEUE_ATTACKS = [n for n in CATALOGUE if n not in SECURITY_ATTACKS]


def start_daemon(env_factory: Callable[..., DeviceEnv], tmp_path: Path) -> tuple[DeviceEnv, str]:
    admin = str(tmp_path / "admin.sock")
    env = env_factory(*MQ_ARGS, "--admin-socket", admin, multi_queue=True)
    deadline = time.monotonic() + 10
    while not os.path.exists(admin):
        assert time.monotonic() < deadline, f"no admin socket:\n{env.log()[-2000:]}"
        time.sleep(0.05)
    return env, admin


def failures(report: dict[str, Any]) -> str:
    lines = []
    for r in report["attacks"]:
        for f in r["failures"]:
            lines.append(f"{r['name']}: {f}")
    return "\n".join(lines)


def assert_no_control_plane_errors(env: DeviceEnv) -> None:
    text = env.log()
    assert "Traceback" not in text and "callback failed" not in text, text[-4000:]


# The random values of the fuzz attacks (bar0_writes, config_space_writes)
# come from these seeds, so that a run is repeatable; VN_HOSTILE_SEED=N or
# "random" tries another. With seed 1628325499 frames steered to the
# attacked pair before a switch, which its driver never made room for, held
# back receive on every pair for ever (now dropped after VN_STEER_OLD_MAX_NS).
HOSTILE_SEEDS = (
    [os.environ["VN_HOSTILE_SEED"]]
    if "VN_HOSTILE_SEED" in os.environ
    else [
        "11",
        "1628325499",
    ]
)


@pytest.mark.parametrize("hostile_seed", HOSTILE_SEEDS)
def test_hostile_driver_catalogue(
    env_factory: Callable[..., DeviceEnv], tmp_path: Path, record_property: Any, hostile_seed: str
) -> None:
    env, admin = start_daemon(env_factory, tmp_path)
    seed = None if hostile_seed == "random" else int(hostile_seed)
    _, ring_state = admin_sources(admin, None)
    assert env.server.proc is not None
    with HostileDriver(
        env.socket_path,
        env.port.sock,
        counters=env.counters,
        ring_state=ring_state,
        daemon_alive=env.server.alive,
        daemon_pid=env.server.proc.pid,
        daemon_log=env.log,
        seed=seed,
    ) as hd:
        report = hd.run(QUEUE_ATTACKS)
    record_property("hostile_driver_report", json.dumps(report))
    ran = [r["name"] for r in report["attacks"]]
    assert ran == QUEUE_ATTACKS, f"attacks run: {ran}"
    assert report["ok"], f"seed {report['seed']}:\n{failures(report)}"
    by_name = {r["name"]: r for r in report["attacks"]}
    # A few outcomes spelled out (the tool checked them all).
    assert by_name["desc_loops"]["counters"]["queues.0.tx.errors.desc_loop"]["delta"] == 3
    assert by_name["avail_idx_jump"]["observed"]["config_interrupt"] is True
    assert by_name["avail_idx_jump"]["recovered_by_reset"] is True
    assert by_name["ctrl_malformed_commands"]["observed"]["acks"] == [1] * 6
    for r in report["attacks"]:
        assert r["memory_violations"] == [], r["name"]
        if r["scope"] == "queue":
            for pair, moved in r["traffic_during"].items():
                assert min(moved["rx"], moved["tx"]) >= 5, (r["name"], pair, moved)
    env.assert_alive()
    assert_no_control_plane_errors(env)


def test_hostile_driver_command_line(env_factory: Callable[..., DeviceEnv], tmp_path: Path) -> None:
    env, admin = start_daemon(env_factory, tmp_path)
    assert env.server.proc is not None
    out = tmp_path / "report.json"
    attacks = ["desc_loops", "avail_idx_jump", "doorbells_missing_queues"]
    argv = env.ns.exec_argv(
        [
            sys.executable,
            "-m",
            "vfiouser_net_harness.hostile_driver",
            "--socket",
            str(env.socket_path),
            "--tap",
            env.tap.name,
            "--admin-socket",
            admin,
            "--daemon-pid",
            str(env.server.proc.pid),
            "--attacks",
            ",".join(attacks),
            "--json",
            str(out),
        ]
    )
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    report = json.loads(out.read_text())
    assert report["ok"] is True
    assert [r["name"] for r in report["attacks"]] == attacks
    for r in report["attacks"]:
        assert r["ok"] and r["failures"] == [] and r["memory_violations"] == [], r
        assert f"ok   {r['name']}" in proc.stdout
    loops, jump, doorbells = report["attacks"]
    assert loops["counters"]["queues.0.tx.errors.desc_loop"] == {"delta": 3, "expected": "+3"}
    assert loops["counters"]["queues.0.rx.errors.desc_loop"]["delta"] == 1
    assert jump["counters"]["device.needs_reset"]["delta"] == 1
    assert jump["observed"]["queue1_broken"] is True
    n = doorbells["observed"]["doorbells"]
    assert n > 1000
    assert doorbells["counters"]["device.doorbells_invalid"] == {"delta": n, "expected": f"+{n}"}
    env.assert_alive()
    assert_no_control_plane_errors(env)


@pytest.mark.parametrize("attack", SECURITY_ATTACKS)
def test_hostile_driver_security(
    env_factory: Callable[..., DeviceEnv], tmp_path: Path, record_property: Any, attack: str
) -> None:
    """One attack of issue #11 against its own daemon: the expected reaction
    (checked by the tool), the healthy pairs moving, nothing written outside
    used rings and offered buffers, the daemon alive and its descriptors
    back where they were once the client is gone."""
    env, admin = start_daemon(env_factory, tmp_path)
    _, ring_state = admin_sources(admin, None)
    assert env.server.proc is not None
    pid = env.server.proc.pid
    with HostileDriver(
        env.socket_path,
        env.port.sock,
        counters=env.counters,
        ring_state=ring_state,
        daemon_alive=env.server.alive,
        daemon_pid=pid,
        daemon_log=env.log,
    ) as hd:
        fds_attached = len(os.listdir(f"/proc/{pid}/fd"))
        report = hd.run([attack])
    record_property("hostile_driver_report", json.dumps(report))
    [result] = report["attacks"]
    assert result["ok"], f"seed {report['seed']}:\n{failures(report)}\n{result['observed']}"
    assert result["memory_violations"] == []
    env.assert_alive()
    # The client is gone: whatever it made the daemon hold is given back.
    deadline = time.monotonic() + 5
    while len(os.listdir(f"/proc/{pid}/fd")) >= fds_attached and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(os.listdir(f"/proc/{pid}/fd")) < fds_attached
    # The socket serves the next client.
    with env.connect() as c:
        assert c.config_read16(0) == 0x1AF4
    assert_no_control_plane_errors(env)
