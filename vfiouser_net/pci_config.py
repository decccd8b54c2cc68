"""PCI identity and capabilities of the device, as bytes for libvfio-user.

The virtio vendor capabilities (virtio 1.x 4.1.4) point into BAR0 at the
offsets fixed in csrc/layout.h; MSI-X points into BAR4. Layout decisions are
explained in the README ("PCI layout").
"""

from __future__ import annotations

import struct

from vfiouser_net.virtio_spec import (
    PCI_CAP_COMMON_CFG,
    PCI_CAP_DEVICE_CFG,
    PCI_CAP_ISR_CFG,
    PCI_CAP_NOTIFY_CFG,
)

PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_MSIX = 0x11
PCI_REVISION_ID_OFFSET = 0x08
PCI_COMMAND_OFFSET = 0x04
VIRTIO_PCI_REVISION = 1


def virtio_cap(cfg_type: int, bar: int, offset: int, length: int) -> bytes:
    """struct virtio_pci_cap: vndr, next, len, cfg_type, bar, id, pad[2], offset, length."""
    return struct.pack("<BBBBBBxxII", PCI_CAP_ID_VNDR, 0, 16, cfg_type, bar, 0, offset, length)


def virtio_notify_cap(bar: int, offset: int, length: int, multiplier: int) -> bytes:
    """struct virtio_pci_notify_cap: virtio_pci_cap plus notify_off_multiplier."""
    body = virtio_cap(PCI_CAP_NOTIFY_CFG, bar, offset, length) + struct.pack("<I", multiplier)
    return body[:2] + bytes([len(body)]) + body[3:]


def msix_cap(nvectors: int, bar: int, table_off: int, pba_off: int) -> bytes:
    """MSI-X capability: id, next, message control (table size - 1), table, PBA."""
    if not 1 <= nvectors <= 2048:
        raise ValueError(f"MSI-X vector count {nvectors} out of range")
    return struct.pack("<BBHII", PCI_CAP_ID_MSIX, 0, nvectors - 1, table_off | bar, pba_off | bar)


def virtio_caps(
    bar: int,
    common: tuple[int, int],
    isr: tuple[int, int],
    device: tuple[int, int],
    notify: tuple[int, int],
    notify_multiplier: int,
) -> list[bytes]:
    return [
        virtio_cap(PCI_CAP_COMMON_CFG, bar, *common),
        virtio_notify_cap(bar, *notify, notify_multiplier),
        virtio_cap(PCI_CAP_ISR_CFG, bar, *isr),
        virtio_cap(PCI_CAP_DEVICE_CFG, bar, *device),
    ]
