"""A guest driver that leaves MSI-X disabled and polls (issue #13): DPDK's
virtio PMD in ``dpdk-testpmd`` over ``uio_pci_generic`` inside the guest
(scripts/setup/guest-dpdk.sh), in ``icmpecho`` mode, answering the host's
pings through the device.

What it proves, beside Linux's virtio_net (which always enables MSI-X):
- with MSI-X disabled the device sends no MSI-X message (the configuration
  change at DRIVER_OK, the GUEST_ANNOUNCE, goes to the ISR instead:
  ``irqs_msix_off``), so QEMU's error notifier never fires and the VM runs on;
- a driver that maps BAR0 itself (sysfs resource0) and writes the Command
  register a byte at a time gets through with no ERROR in the daemon's log;
- the rings work for a second, unrelated driver: every ping is answered.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from vfiouser_net_harness import metrics
from vfiouser_net_harness.guest import Guest, vfio_user_pci_args
from vfiouser_net_harness.netns import NetNS
from vfiouser_net_harness.prereq import VN_CACHE
from vfiouser_net_harness.server import Server

from tests.e2e.stack import check_prerequisites, require

log = logging.getLogger(__name__)

DPDK = VN_CACHE / "guest" / "dpdk"
MAC = "52:54:00:d9:d1:01"
PINGS = 20
LIB = "/lib/x86_64-linux-gnu"


def test_dpdk_pmd_polls_with_msix_disabled(ns: NetNS, tmp_path: Path) -> None:
    check_prerequisites()
    archive = DPDK / "dpdk.cpio.gz"
    require(archive.exists(), f"{archive} missing (scripts/setup/guest-dpdk.sh)")
    tap = ns.add_tap("vntap0")
    sock = tmp_path / "dev.sock"
    server = Server(sock, tap.name, netns=ns.name, extra_args=["--mac", MAC])
    server.start()
    guest = Guest(
        cpus=2,
        memory_mb=768,
        extra_args=vfio_user_pci_args(sock, "vn0"),
        extra_initrds=[archive],
        workdir=tmp_path / "guest",
        name="dpdk",
    )
    try:
        guest.start()
        kver = guest.check("uname -r").strip()
        for mod in guest.check(f"cat /lib/modules/{kver}/vn-dpdk-modules").split():
            guest.check(f"insmod /lib/modules/{kver}/{mod}.ko")
        bdf = guest.check(
            "for d in /sys/bus/pci/devices/*; do "
            '[ "$(cat $d/vendor)$(cat $d/device)" = 0x1af40x1041 ] && basename $d; done; true'
        ).strip()
        assert re.fullmatch(r"[0-9a-f:.]+", bdf), bdf
        # From virtio-pci (Linux's driver, which enabled MSI-X) to uio.
        guest.check(f"echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind")
        guest.check(f"echo uio_pci_generic > /sys/bus/pci/devices/{bdf}/driver_override")
        guest.check(f"echo {bdf} > /sys/bus/pci/drivers_probe")
        driver = guest.check(f"basename $(readlink /sys/bus/pci/devices/{bdf}/driver)").strip()
        assert driver == "uio_pci_generic", driver
        guest.check(
            "echo 64 > /proc/sys/vm/nr_hugepages && mkdir -p /dev/hugepages && "
            "mount -t hugetlbfs none /dev/hugepages && mkdir -p /var/run && chmod 755 /"
        )
        pmds = " ".join(
            f"-d {LIB}/{so}.25"
            for so in ("librte_mempool_ring.so", "librte_bus_pci.so", "librte_net_virtio.so")
        )
        # --stats-period: without it testpmd reads stdin and exits on EOF.
        guest.check(
            f"dpdk-testpmd -l 0-1 -n 1 {pmds} -a {bdf} --iova-mode=pa -m 96 -- "
            "--forward-mode=icmpecho --auto-start --stats-period 3600 "
            "--total-num-mbufs=2048 </dev/null >/tmp/testpmd.log 2>&1 &"
        )
        # testpmd's stdout is a file (fully buffered): its last lines show up
        # late. Wait for the port to be configured, then for the first echo.
        guest.wait_until("grep -q 'Checking link statuses' /tmp/testpmd.log "
                         "|| ! pidof dpdk-testpmd", timeout=120)  # fmt: skip
        pmd_log = guest.check("cat /tmp/testpmd.log")
        log.info("testpmd:\n%s", pmd_log)
        assert guest.run("pidof dpdk-testpmd")[0] == 0, pmd_log
        deadline = time.monotonic() + 60
        while ns.run(["ping", "-c", "1", "-W", "1", ns.guest_addr()], check=False).returncode:
            assert time.monotonic() < deadline, "testpmd never answered a ping"
        # MSI-X stays disabled: the Message Control enable bit (lspci's
        # "Enable-") is clear in config space.
        msix = guest.check(f"od -v -A n -t x1 -N 256 /sys/bus/pci/devices/{bdf}/config").split()
        cfg = bytes(int(b, 16) for b in msix)
        pos = cfg[0x34]
        while pos and cfg[pos] != 0x11:
            pos = cfg[pos + 1]
        assert pos, "no MSI-X capability"
        assert not cfg[pos + 3] & 0x80, f"MSI-X enabled: control 0x{cfg[pos + 3]:02x}"
        out = ns.run(["ping", "-c", str(PINGS), "-i", "0.2", "-W", "5", ns.guest_addr()],
                     check=False).stdout  # fmt: skip
        log.info("ping through testpmd:\n%s", out)
        assert f"{PINGS} received" in out, out + guest.check("cat /tmp/testpmd.log")
        assert guest.alive and server.alive()
        samples = metrics.scrape(ns, server.metrics_url())
        msix_off = metrics.value(samples, "vfiouser_net_device_events_total", event="irqs_msix_off")
        assert msix_off >= 1, "the DRIVER_OK configuration change should have gone to the ISR"
        errors = [ln for ln in server.log().splitlines() if "ERROR" in ln]
        assert not errors, "\n".join(errors)
        qemu_out = guest.console_text
        assert "Unrecoverable error" not in qemu_out and "vfio_err" not in qemu_out
        print(f"dpdk-testpmd (Linux {kver}): {PINGS}/{PINGS} pings answered, MSI-X off, "
              f"{msix_off:.0f} interrupt(s) to the ISR instead")  # fmt: skip
    finally:
        guest.close()
        server.stop()
