"""`serve --sandbox`: the daemon enters its sandbox (no new privileges, no
capabilities, the seccomp allow-list) before any thread starts, and then
serves as before: traffic both ways, control commands, a reconnect, the admin
channel, counters and metrics; the allow-list refuses none of the calls
that takes (a refusal is logged as "sandbox refused system call N")."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from vfiouser_net_harness.metrics import scrape_text
from vfiouser_net_harness.procstat import proc_status
from vfiouser_net_harness.virtio_pci_driver import VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC

from tests.protocol.support import (
    DeviceEnv,
    exchange_tagged,
    open_session,
)


def traffic(env: DeviceEnv, label: str, frames: int = 10) -> None:
    s = open_session(env)
    try:
        drv = s.driver
        drv.bring_up()
        assert drv.ctrl_command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\1") == 0
        exchange_tagged(env, drv, label, frames)
    finally:
        s.close()


@pytest.mark.parametrize("tap_io", ["writev", "io_uring"])
def test_sandboxed_daemon_serves_and_refuses_nothing(
    env_factory: Callable[..., DeviceEnv], tap_io: str
) -> None:
    """Also with batched TAP writes: the seccomp filter lets the device use
    the rings it made before it (io_uring_enter), nothing more."""
    with tempfile.TemporaryDirectory(prefix="vn-sb-") as d:
        admin = Path(d) / "admin.sock"
        env = env_factory("--sandbox", "--admin-socket", str(admin), "--tap-io", tap_io)
        assert env.server.proc is not None
        pid = env.server.proc.pid
        st = proc_status(pid)
        assert st["NoNewPrivs"] == "1"
        assert st["Seccomp"] == "2"
        assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0
        assert int(st["CapBnd"], 16) == 0

        traffic(env, "first")
        traffic(env, "again")  # the device reset and a new client
        ctl = subprocess.run(
            [sys.executable, "-P", "-m", "vfiouser_net", "ctl", "--admin-socket", str(admin),
             "--json", "list"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert ctl.returncode == 0, ctl.stderr
        assert env.counters()["queues"][0]["tx"]["packets"] >= 20
        assert env.counters()["tap_io"] == tap_io
        page = scrape_text(env.ns, env.server.metrics_url())
        assert "vfiouser_net_queue_packets_total" in page
        env.assert_alive()
        assert env.log_count("sandbox refused") == 0, env.log()[-3000:]
        assert "sandbox entered" in env.log()
