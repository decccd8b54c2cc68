"""Network boot through the device (issue #13), end to end: QEMU's own iPXE
option ROM for virtio-net on the ``vfio-user-pci`` device (``romfile=``,
``bootindex=1``), under SeaBIOS (``pxe-virtio.rom``) and under OVMF
(``efi-virtio.rom``). dnsmasq in the test's namespace answers DHCP and serves
an iPXE script, the guest kernel and its initrd over TFTP; iPXE drives the
device through its VIRTIO_PCI_CAP_PCI_CFG window and its rings, loads both,
boots Linux, whose virtio_net then takes the same device over and pings the
host. The daemon logs no ERROR line on the way (the firmware sizes the
expansion ROM BAR, iPXE writes configuration bytes, resets the device).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vfiouser_net_harness.guest import DEFAULT_CMDLINE, Guest, vfio_user_pci_args
from vfiouser_net_harness.netns import NetNS
from vfiouser_net_harness.prereq import VN_CACHE
from vfiouser_net_harness.server import Server

from tests.e2e.stack import check_prerequisites, require

log = logging.getLogger(__name__)

QEMU_SHARE = VN_CACHE / "qemu-root/usr/share/qemu"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# UEFI's PXE loads an EFI program, not a script: iPXE built to drive the
# network through the firmware's own driver for the device (SNP), which then
# asks DHCP again (as iPXE) and runs the script.
SNPONLY = Path("/usr/lib/ipxe/snponly.efi")
TAP = "tap-boot"
BOOT_TIMEOUT = 300.0


def ipxe_script(host: str) -> str:
    # The guest's Linux must not wait for a network to come up: the test
    # addresses eth0 itself.
    return (
        "#!ipxe\n"
        f"kernel tftp://{host}/vmlinuz initrd=initrd.img {DEFAULT_CMDLINE}\n"
        f"initrd --name initrd.img tftp://{host}/initrd.img\n"
        "boot\n"
    )


@contextlib.contextmanager
def dnsmasq(ns: NetNS, root: Path, host: str, net: str, log_path: Path) -> Iterator[Path]:
    binary = shutil.which("dnsmasq")
    require(binary is not None, "dnsmasq not installed (apt: dnsmasq-base)")
    assert binary is not None
    argv = [
        binary, "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
        f"--interface={TAP}", "--bind-interfaces", "--user=root", "--group=root",
        f"--dhcp-range={net}.50,{net}.60,255.255.255.0,1h", "--dhcp-authoritative",
        f"--dhcp-leasefile={root.parent / 'leases'}", "--enable-tftp",
        f"--tftp-root={root}", "--dhcp-userclass=set:ipxe,iPXE",
        "--dhcp-boot=tag:ipxe,boot.ipxe", "--dhcp-boot=tag:!ipxe,snponly.efi", "--log-dhcp",
        f"--log-facility={log_path}", "--pid-file",
    ]  # fmt: skip
    # Not the sanitizer the test suite may preload for the daemon's datapath.
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS")}
    proc = subprocess.Popen(
        ns.exec_argv(argv), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True
    )
    try:
        deadline = time.monotonic() + 10
        while not log_path.exists() or "started" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None:
                raise AssertionError(f"dnsmasq exited {proc.returncode}: {proc.communicate()[1]}")
            assert time.monotonic() < deadline, "dnsmasq did not start"
            time.sleep(0.05)
        yield log_path
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_network_boot(ns: NetNS, tmp_path: Path, firmware: str) -> None:
    paths = check_prerequisites()
    rom = QEMU_SHARE / ("pxe-virtio.rom" if firmware == "bios" else "efi-virtio.rom")
    require(rom.exists(), f"{rom} missing (scripts/setup/qemu.sh)")
    if firmware == "uefi":
        require(OVMF_CODE.exists(), f"{OVMF_CODE} missing (apt: ovmf)")
        require(SNPONLY.exists(), f"{SNPONLY} missing (apt: ipxe)")
    n = ns.index
    net = f"10.203.{n}"
    host, guest_addr = f"{net}.1", f"{net}.2"
    ns.add_tap(TAP, address=f"{host}/24")
    root = tmp_path / "tftp"
    root.mkdir()
    shutil.copy(paths.kernel, root / "vmlinuz")
    shutil.copy(paths.initrd, root / "initrd.img")
    (root / "boot.ipxe").write_text(ipxe_script(host))
    if firmware == "uefi":
        shutil.copy(SNPONLY, root / "snponly.efi")

    sock = tmp_path / "boot.sock"
    extra = vfio_user_pci_args(sock, "vn0", romfile=str(rom), bootindex=1)
    if firmware == "uefi":
        vars_copy = tmp_path / "OVMF_VARS.fd"
        shutil.copy(OVMF_VARS, vars_copy)
        extra += [
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
        ]  # fmt: skip
    with contextlib.ExitStack() as stack:
        leases = stack.enter_context(dnsmasq(ns, root, host, net, tmp_path / "dnsmasq.log"))
        server = Server(sock, TAP, netns=ns.name, log_level="info")
        server.start()
        stack.callback(server.stop)
        guest = Guest(
            paths=paths,
            cpus=1,
            memory_mb=512,
            extra_args=extra,
            direct_boot=False,
            boot_timeout=BOOT_TIMEOUT,
            workdir=tmp_path / "guest",
            name=f"netboot-{firmware}",
        )
        t0 = time.monotonic()
        guest.start()
        stack.callback(guest.close)
        booted = time.monotonic() - t0
        served = leases.read_text(errors="replace")
        assert "DHCPACK" in served, served[-3000:]
        names = ["boot.ipxe", "vmlinuz", "initrd.img"]
        if firmware == "uefi":
            names.append("snponly.efi")
        for name in names:
            assert f"sent {root / name}" in served, (name, served[-3000:])
        # The same device, now Linux's.
        guest.check(f"ip link set eth0 up && ip addr add {guest_addr}/24 dev eth0")
        driver = guest.check("basename $(readlink /sys/class/net/eth0/device/driver)").strip()
        assert driver == "virtio_net", driver
        out = guest.check(f"ping -c 5 -i 0.2 -W 2 {host}")
        assert " 0% packet loss" in out, out
        log.info("%s network boot: %.1f s to the guest's shell", firmware, booted)
        print(f"{firmware} network boot through the device: {booted:.1f} s to the shell")
        text = server.log()
        errors = [ln for ln in text.splitlines() if " ERROR " in ln]
        assert not errors, errors[:20]
