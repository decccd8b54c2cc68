"""Device-side MUSTs of virtio 1.x PCI (4.1) and of PCI configuration space
that drivers other than Linux's depend on (docs/CONFORMANCE.md):

- the VIRTIO_PCI_CAP_PCI_CFG capability (4.1.4.9): present, its bar, offset
  and length writable, pci_cfg_data reaching BAR0 with the spec's widths, and
  a window against the driver rules refused and counted;
- configuration space writes of any width at any offset PCI allows (a byte
  of a register alone, reserved bytes, read-only registers, a ROM-less
  expansion ROM BAR sized by firmware): accepted, read-only bits kept, no
  ERROR line;
- with MSI-X disabled (a polling driver such as DPDK's virtio PMD over
  uio_pci_generic): no MSI-X message, the ISR status instead (4.1.5.3/4), and
  the client's error eventfd never signalled.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable

from vfiouser_net_harness import vfio_user_client as vu
from vfiouser_net_harness.virtio_pci_driver import (
    CfgType,
    VirtioPciTransport,
    parse_virtio_caps,
    walk_capabilities,
)

from tests.protocol.support import (
    GUEST_MAC,
    DeviceEnv,
    open_session,
    tagged_frame,
    wait_used_idx,
)

VIRTIO_MSI_NO_VECTOR = 0xFFFF
COMMON_DFSELECT = 0x00
COMMON_DF = 0x04
COMMON_NUM_QUEUES = 0x12
COMMON_STATUS = 0x14
COMMON_MSIX = 0x10
COMMON_Q_SELECT = 0x16
COMMON_Q_MSIX = 0x1A
ISR_QUEUE = 0x1
PCI_STATUS = 0x6
PCI_STATUS_INTERRUPT = 0x8


def pci_cfg_cap(c: vu.VfioUserClient) -> int:
    cfg = c.config_read(0, 256)
    caps = [v for v in parse_virtio_caps(cfg)[0] if v.cfg_type == CfgType.PCI]
    assert len(caps) == 1, "the device MUST present a VIRTIO_PCI_CAP_PCI_CFG capability"
    pos = caps[0].cap_offset
    assert cfg[pos + 2] == 20, "struct virtio_pci_cfg_cap is 20 bytes"
    return pos


def common_offset(c: vu.VfioUserClient) -> int:
    caps = parse_virtio_caps(c.config_read(0, 256))[0]
    return next(v.offset for v in caps if v.cfg_type == CfgType.COMMON)


def window(c: vu.VfioUserClient, cap: int, offset: int, length: int, bar: int = 0) -> None:
    c.config_write8(cap + 4, bar)
    c.config_write32(cap + 8, offset)
    c.config_write32(cap + 12, length)


def test_pci_cfg_capability_reaches_bar0(env: DeviceEnv) -> None:
    c = env.connect()
    cap = pci_cfg_cap(c)
    common = common_offset(c)
    # A window never set up (length 0) reads 0 and counts nothing: a dump of
    # configuration space reads pci_cfg_data too.
    before = env.counters()["device"]["pci_cfg_invalid"]
    assert c.config_read32(cap + 12) == 0 and c.config_read32(cap + 16) == 0
    c.config_read(0, 256)
    # Reads of each width match BAR0's.
    window(c, cap, common + COMMON_NUM_QUEUES, 2)
    assert c.config_read16(cap + 16) == struct.unpack("<H", c.region_read(0, common + 0x12, 2))[0]
    assert c.config_read16(cap + 16) >= 3
    window(c, cap, common + COMMON_STATUS, 1)
    assert c.config_read8(cap + 16) == 0
    # A write through the window reaches the register: device_feature_select 1,
    # then device_feature reads VERSION_1 (bit 32) both ways.
    window(c, cap, common + COMMON_DFSELECT, 4)
    c.config_write32(cap + 16, 1)
    assert c.region_read(0, common + COMMON_DFSELECT, 4) == b"\x01\0\0\0"
    window(c, cap, common + COMMON_DF, 4)
    high = c.config_read32(cap + 16)
    assert high & 1, f"device_feature[63:32] {high:#x} through PCI_CFG lacks VERSION_1"
    assert high == struct.unpack("<I", c.region_read(0, common + COMMON_DF, 4))[0]
    # bar, offset and length read back as written; the header is read-only.
    header = c.config_read(cap, 4)
    c.config_write8(cap + 3, 0x7)
    assert c.config_read(cap, 4) == header
    assert c.config_read32(cap + 8) == common + COMMON_DF
    assert c.config_read32(cap + 12) == 4

    for bar, offset, length in (
        (0, common, 3),  # length not 1, 2 or 4
        (0, common + 1, 2),  # unaligned
        (4, 0, 4),  # not BAR0
        (0, 0xFFFFFFFC, 4),  # outside the BAR
    ):
        window(c, cap, offset, length, bar)
        assert c.config_read32(cap + 16) == 0, (bar, offset, length)
        c.config_write32(cap + 16, 0xFFFFFFFF)
    assert env.counters()["device"]["pci_cfg_invalid"] - before == 8
    env.wait_log("PCI_CFG write refused: BAR 0 offset 0x")
    # Nothing of that reached the device: it still negotiates.
    assert c.region_read(0, common + COMMON_DFSELECT, 4) == b"\x01\0\0\0"
    env.assert_alive()


def test_configuration_space_takes_every_write_pci_allows(env: DeviceEnv) -> None:
    c = env.connect()
    before = c.config_read(0, 256)
    # A byte of the command register alone: the high byte at 0x5 (INTx
    # disable, as DPDK writes it), then the low byte; the other keeps.
    c.config_write16(0x4, 0x0006)
    c.config_write8(0x5, 0x04)
    assert c.config_read16(0x4) == 0x0406
    c.config_write8(0x4, 0x02)
    assert c.config_read16(0x4) == 0x0402
    # The expansion ROM BAR of a device without ROM, as firmware sizes it.
    for value in (0xFFFFF800, 0xFEB80001, 0xFFFFFFFF, 0):
        c.config_write32(0x30, value)
        assert c.config_read32(0x30) == 0
    # Read-only registers and reserved bytes: writes ignored.
    c.config_write32(0x0, 0xDEADBEEF)
    c.config_write8(0x35, 0xAA)
    c.config_write16(0x2C, 0x1234)
    after = c.config_read(0, 256)
    for off, n in ((0x0, 4), (0x8, 4), (0x2C, 4), (0x34, 8)):
        assert after[off : off + n] == before[off : off + n], hex(off)
    # The virtio structure capabilities are read-only: ignored, kept.
    structures = [v.cap_offset for v in parse_virtio_caps(before)[0] if v.cfg_type != CfgType.PCI]
    for pos in structures:
        c.config_write32(pos + 8, 0x12345678)
    assert walk_capabilities(c.config_read(0, 256)) == walk_capabilities(before)
    for pos in structures:
        assert c.config_read32(pos + 8) == struct.unpack_from("<I", before, pos + 8)[0]
    time.sleep(0.1)
    errors = [ln for ln in env.log().splitlines() if " ERROR " in ln or "error" in ln.lower()]
    assert not errors, errors


def test_msix_disabled_means_isr_not_messages(env: DeviceEnv) -> None:
    """A polling driver without MSI-X that still names vector 0 (as DPDK's
    virtio PMD does): frames move, the ISR shows them, no MSI-X message goes
    out and the client's error eventfd stays quiet."""
    s = open_session(env, use_msix=False)
    error = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        s.client.set_irqs(vu.VFIO_PCI_ERR_IRQ_INDEX, 0, [error])
        msix_fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4)]
        # Eventfds for the vectors exist (QEMU keeps them), yet MSI-X is off.
        s.client.set_irqs(vu.VFIO_PCI_MSIX_IRQ_INDEX, 0, msix_fds)
        drv = s.driver
        drv.bring_up()
        t: VirtioPciTransport = drv.transport
        t.common_write(COMMON_MSIX, 2, 0)
        for q in (0, 1):
            t.common_write(COMMON_Q_SELECT, 2, q)
            t.common_write(COMMON_Q_MSIX, 2, 0)
        before = env.counters()["device"]["irqs_msix_off"]
        rx = drv.pairs[0].rx
        start = rx.last_used_idx
        t.read_isr()
        for i in range(3):
            env.port.send(tagged_frame(GUEST_MAC, f"nomsix{i}".encode()))
        wait_used_idx(rx, start + 3)
        # PCI Status: Interrupt Status is the OR of the ISR bits (4.1.4.5).
        assert s.client.config_read16(PCI_STATUS) & PCI_STATUS_INTERRUPT
        assert t.read_isr() & ISR_QUEUE, "ISR queue bit not set with MSI-X disabled"
        assert t.read_isr() == 0, "reading the ISR must clear it"
        assert not s.client.config_read16(PCI_STATUS) & PCI_STATUS_INTERRUPT
        assert env.counters()["device"]["irqs_msix_off"] > before
        for fd in [error, *msix_fds]:
            try:
                n = os.eventfd_read(fd)
            except BlockingIOError:
                n = 0
            assert n == 0, "an interrupt was sent while MSI-X was disabled"
        for fd in msix_fds:
            os.close(fd)
    finally:
        os.close(error)
        s.close()


def test_received_frames_past_the_mtu_are_dropped(env_factory: Callable[..., DeviceEnv]) -> None:
    """5.1.4.1: with MTU negotiated, no received frame past mtu (plus the
    Ethernet header and a VLAN tag) unless segmented. The TAP (MTU 1500)
    hands the device a 1514-byte frame; the device's MTU is 1400."""
    env = env_factory("--mtu", "1400")
    s = open_session(env)
    try:
        drv = s.driver
        drv.bring_up()
        before = env.counters()["queues"][0]["rx"]["drops"]["frame_too_big"]
        env.port.send(tagged_frame(GUEST_MAC, b"too-big", size=1514))
        fits = tagged_frame(GUEST_MAC, b"fits", size=1418)
        env.port.send(fits)
        while True:
            _, got = drv.recv_packet(timeout=5)
            assert b"too-big" not in got, "a frame past the MTU reached the driver"
            if b"fits" in got:
                break
        assert got == fits
        assert env.counters()["queues"][0]["rx"]["drops"]["frame_too_big"] == before + 1
    finally:
        s.close()
