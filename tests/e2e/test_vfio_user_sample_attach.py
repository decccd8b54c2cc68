"""The harness's vfio-user path, with libvfio-user's own sample device.

Starts ``samples/gpio-pci-idio-16`` (PCI id 494f:0dc8) on a UNIX socket and
boots the guest with ``-device vfio-user-pci`` pointing at it: the guest must
enumerate the device. This checks the cached QEMU's vfio-user client, the
shared memfd guest RAM and :func:`vfio_user_pci_args`, independently of our
own device.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from vfiouser_net_harness.guest import Guest, vfio_user_pci_args


@pytest.mark.e2e
def test_libvfio_user_sample_attaches(
    libvfio_user_build: Path,
    guest_factory: Callable[..., Guest],
    tmp_path: Path,
) -> None:
    sample = libvfio_user_build / "samples" / "gpio-pci-idio-16"
    sock = tmp_path / "gpio.sock"
    log_path = tmp_path / "gpio.log"
    with log_path.open("wb") as log_file:
        server = subprocess.Popen(
            [str(sample), str(sock)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert server.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "sample server did not create its socket"
            time.sleep(0.05)
        guest = guest_factory(cpus=1, extra_args=vfio_user_pci_args(sock, "gpio0"))
        ids = guest.check(
            "for d in /sys/bus/pci/devices/*; do echo $(cat $d/vendor):$(cat $d/device); done"
        )
        assert "0x494f:0x0dc8" in ids.split(), ids
    finally:
        if server.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
