"""Numbers from the virtio 1.x specification that the control plane uses.

Only what the device needs: feature bits by name (for negotiation, logs and
operators), device status bits, and the virtio-net config layout.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


class NetFeature(IntEnum):
    """Feature bit numbers (virtio 1.x 5.1.3 and 6)."""

    CSUM = 0
    GUEST_CSUM = 1
    CTRL_GUEST_OFFLOADS = 2
    MTU = 3
    MAC = 5
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_ECN = 9
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_ECN = 13
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17
    CTRL_RX = 18
    CTRL_VLAN = 19
    CTRL_RX_EXTRA = 20
    GUEST_ANNOUNCE = 21
    MQ = 22
    CTRL_MAC_ADDR = 23
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    RING_RESET = 40
    DEVICE_STATS = 50
    GUEST_USO4 = 54
    GUEST_USO6 = 55
    HOST_USO = 56
    VQ_NOTF_COAL = 52
    NOTF_COAL = 53
    HASH_REPORT = 57
    RSS = 60
    SPEED_DUPLEX = 63


# virtio 1.x 5.1.3.1: a feature and what it requires (any one of them). A
# driver accepting one without what it requires accepts an invalid subset,
# and the device MUST then fail FEATURES_OK (2.2.2).
F = NetFeature
FEATURE_REQUIRES: dict[NetFeature, tuple[NetFeature, ...]] = {
    F.GUEST_TSO4: (F.GUEST_CSUM,),
    F.GUEST_TSO6: (F.GUEST_CSUM,),
    F.GUEST_ECN: (F.GUEST_TSO4, F.GUEST_TSO6),
    F.GUEST_UFO: (F.GUEST_CSUM,),
    F.HOST_TSO4: (F.CSUM,),
    F.HOST_TSO6: (F.CSUM,),
    F.HOST_ECN: (F.HOST_TSO4, F.HOST_TSO6),
    F.HOST_UFO: (F.CSUM,),
    F.GUEST_USO4: (F.GUEST_CSUM,),
    F.GUEST_USO6: (F.GUEST_CSUM,),
    F.HOST_USO: (F.CSUM,),
    F.CTRL_RX: (F.CTRL_VQ,),
    F.CTRL_VLAN: (F.CTRL_VQ,),
    F.CTRL_RX_EXTRA: (F.CTRL_RX,),
    F.GUEST_ANNOUNCE: (F.CTRL_VQ,),
    F.MQ: (F.CTRL_VQ,),
    F.CTRL_MAC_ADDR: (F.CTRL_VQ,),
    F.NOTF_COAL: (F.CTRL_VQ,),
    F.VQ_NOTF_COAL: (F.CTRL_VQ,),
    F.DEVICE_STATS: (F.CTRL_VQ,),
    F.RSS: (F.CTRL_VQ,),
    F.HASH_REPORT: (F.CTRL_VQ,),
}
del F


def unmet_requirements(features: int) -> list[tuple[NetFeature, tuple[NetFeature, ...]]]:
    """The features in ``features`` whose requirement is not in it."""
    return [
        (f, needs)
        for f, needs in FEATURE_REQUIRES.items()
        if features >> f & 1 and not any(features >> n & 1 for n in needs)
    ]


def feature_mask(*bits: NetFeature) -> int:
    mask = 0
    for bit in bits:
        mask |= 1 << bit
    return mask


def feature_names(mask: int) -> list[str]:
    """Names of the bits set in mask; unknown bits as BIT_n."""
    names = []
    for bit in range(64):
        if mask >> bit & 1:
            try:
                names.append(NetFeature(bit).name)
            except ValueError:
                names.append(f"BIT_{bit}")
    return names


class DeviceStatus(IntFlag):
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class NetStatus(IntFlag):
    """virtio_net_config.status."""

    LINK_UP = 1
    ANNOUNCE = 2


# struct virtio_pci_common_cfg (4.1.4.3), offsets within the structure.
class CommonCfg(IntEnum):
    DEVICE_FEATURE_SELECT = 0x00
    DEVICE_FEATURE = 0x04
    DRIVER_FEATURE_SELECT = 0x08
    DRIVER_FEATURE = 0x0C
    CONFIG_MSIX_VECTOR = 0x10
    NUM_QUEUES = 0x12
    DEVICE_STATUS = 0x14
    CONFIG_GENERATION = 0x15
    QUEUE_SELECT = 0x16
    QUEUE_SIZE = 0x18
    QUEUE_MSIX_VECTOR = 0x1A
    QUEUE_ENABLE = 0x1C
    QUEUE_NOTIFY_OFF = 0x1E
    QUEUE_DESC = 0x20
    QUEUE_DRIVER = 0x28
    QUEUE_DEVICE = 0x30
    QUEUE_NOTIFY_DATA = 0x38
    QUEUE_RESET = 0x3A


COMMON_CFG_SIZE = 0x3C

# virtio_pci_cap.cfg_type (4.1.4).
PCI_CAP_COMMON_CFG = 1
PCI_CAP_NOTIFY_CFG = 2
PCI_CAP_ISR_CFG = 3
PCI_CAP_DEVICE_CFG = 4

NO_VECTOR = 0xFFFF

VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_NET_PCI_DEVICE = 0x1041  # 0x1040 + device type 1
VIRTIO_PCI_SUBSYS_DEVICE = 0x1100
PCI_CLASS_NETWORK_ETHERNET = (0x02, 0x00, 0x00)

DUPLEX_FULL = 1
