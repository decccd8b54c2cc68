"""A synthetic modern virtio-pci (virtio 1.x) driver over the vfio-user client.

Written only against the virtio 1.x spec (sections 4.1 "Virtio Over PCI Bus",
2.7 "Split Virtqueues", 5.1 "Network Device"): everything is discovered from
PCI config space (capability list from 0x34: vendor capabilities cfg_type
1 common / 2 notify / 3 ISR / 4 device, and the MSI-X capability 0x11), so it
works whatever BAR layout the device chooses.

Layers:

* :class:`VirtioPciTransport` - capability discovery, common config, feature
  negotiation, queue setup, notifications (posted REGION_WRITE of the queue
  index to notify cap offset + queue_notify_off * notify_off_multiplier),
  device config reads with config_generation, MSI-X vectors as eventfds.
* :class:`SplitQueue` - descriptor table / avail ring / used ring in
  :class:`~vfiouser_net_harness.guest_memory.GuestMemory`, direct and indirect
  chains, EVENT_IDX (used_event / avail_event).
* :class:`VirtioNetDriver` - rx/tx queue pairs and the control queue, packet
  send/receive (12-byte virtio_net_hdr_v1, mergeable rx buffers), control
  commands.

Every wait has a timeout.  The driver never trusts the device: used ids and
lengths are validated and a violation raises :class:`VirtqueueError`.
"""

from __future__ import annotations

import collections
import enum
import logging
import mmap
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .guest_memory import GuestMemory
from .vfio_user_client import (
    VFIO_PCI_MSIX_IRQ_INDEX,
    VFU_PCI_DEV_BAR0_REGION_IDX,
    VfioUserClient,
    new_eventfd,
    read_eventfd,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# PCI / virtio-pci constants
# --------------------------------------------------------------------------

PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_CAPABILITY_LIST = 0x34
PCI_STATUS_CAP_LIST = 0x10
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_CAP_ID_MSIX = 0x11
PCI_CAP_ID_VNDR = 0x09
PCI_MSIX_FLAGS_QSIZE = 0x07FF
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_MSIX_FLAGS_ENABLE = 0x8000

VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_MODERN_DEVICE_ID_BASE = 0x1040
VIRTIO_ID_NET = 1


class CfgType(enum.IntEnum):
    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4
    PCI = 5
    SHARED_MEMORY = 8
    VENDOR = 9


# struct virtio_pci_common_cfg field offsets
COMMON_DFSELECT = 0x00
COMMON_DF = 0x04
COMMON_GFSELECT = 0x08
COMMON_GF = 0x0C
COMMON_MSIX = 0x10
COMMON_NUMQ = 0x12
COMMON_STATUS = 0x14
COMMON_CFGGENERATION = 0x15
COMMON_Q_SELECT = 0x16
COMMON_Q_SIZE = 0x18
COMMON_Q_MSIX = 0x1A
COMMON_Q_ENABLE = 0x1C
COMMON_Q_NOFF = 0x1E
COMMON_Q_DESCLO = 0x20
COMMON_Q_DESCHI = 0x24
COMMON_Q_AVAILLO = 0x28
COMMON_Q_AVAILHI = 0x2C
COMMON_Q_USEDLO = 0x30
COMMON_Q_USEDHI = 0x34
COMMON_CFG_MIN_LEN = 0x38

VIRTIO_MSI_NO_VECTOR = 0xFFFF

# Device status
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# Transport feature bits
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_NOTIFICATION_DATA = 38

# virtio-net feature bits
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23
VIRTIO_NET_F_HASH_REPORT = 57
VIRTIO_NET_F_RSS = 60
VIRTIO_NET_F_SPEED_DUPLEX = 63

# Control virtqueue classes / commands / acks
VIRTIO_NET_CTRL_RX = 0
VIRTIO_NET_CTRL_RX_PROMISC = 0
VIRTIO_NET_CTRL_RX_ALLMULTI = 1
VIRTIO_NET_CTRL_MAC = 1
VIRTIO_NET_CTRL_MAC_TABLE_SET = 0
VIRTIO_NET_CTRL_MAC_ADDR_SET = 1
VIRTIO_NET_CTRL_VLAN = 2
VIRTIO_NET_CTRL_ANNOUNCE = 3
VIRTIO_NET_CTRL_ANNOUNCE_ACK = 0
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_CTRL_MQ_RSS_CONFIG = 1
VIRTIO_NET_CTRL_MQ_HASH_CONFIG = 2
VIRTIO_NET_CTRL_GUEST_OFFLOADS = 5
VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET = 0
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1

VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2

# Split ring
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

DESC = struct.Struct("<QIHH")  # addr len flags next
USED_ELEM = struct.Struct("<II")  # id len
NET_HDR = struct.Struct(
    "<BBHHHHH"
)  # flags gso_type hdr_len gso_size csum_start csum_offset num_buffers
NET_HDR_SIZE = NET_HDR.size  # 12 (virtio_net_hdr_v1; always with VERSION_1)

VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4


def bit(n: int) -> int:
    return 1 << n


DEFAULT_NET_FEATURES = (
    bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_F_EVENT_IDX)
    | bit(VIRTIO_F_INDIRECT_DESC)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_NET_F_CTRL_VQ)
    | bit(VIRTIO_NET_F_MQ)
    | bit(VIRTIO_NET_F_MTU)
    | bit(VIRTIO_NET_F_SPEED_DUPLEX)
)


class VirtioError(Exception):
    """The device did something the spec does not allow (or we could not drive it)."""


class VirtqueueError(VirtioError):
    """A used ring entry broke the split-ring rules."""


class VirtioTimeout(TimeoutError):
    pass


_fence_lock = threading.Lock()


def mb() -> None:
    """Full memory barrier (a locked instruction on x86) between ring writes and reads."""
    with _fence_lock:
        pass


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """virtio spec 2.7.10: notify iff event_idx lies in [old_idx, new_idx)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def guest_access_pieces(off: int, size: int) -> list[tuple[int, int]]:
    """Split [off, off+size) into naturally aligned 4/2/1-byte accesses, the
    widths a guest CPU uses for device config (never one wide read)."""
    out = []
    end = off + size
    while off < end:
        for n in (4, 2, 1):
            if off % n == 0 and off + n <= end:
                out.append((off, n))
                off += n
                break
    return out


# --------------------------------------------------------------------------
# PCI capability discovery
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class VirtioCap:
    cap_offset: int
    cfg_type: int
    bar: int
    id: int
    offset: int
    length: int
    notify_off_multiplier: int = 0


@dataclass(frozen=True)
class MsixCap:
    cap_offset: int
    table_size: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int


def walk_capabilities(cfg: bytes) -> list[tuple[int, int]]:
    """[(cap_id, offset)] following the list from 0x34; loop- and range-safe."""
    caps: list[tuple[int, int]] = []
    if len(cfg) < 0x40:
        raise VirtioError("config space shorter than the PCI header")
    status = struct.unpack_from("<H", cfg, PCI_STATUS)[0]
    if not status & PCI_STATUS_CAP_LIST:
        return caps
    ptr = cfg[PCI_CAPABILITY_LIST] & ~3
    seen: set[int] = set()
    while ptr:
        if ptr < 0x40 or ptr + 2 > len(cfg):
            raise VirtioError(f"capability pointer {ptr:#x} out of range")
        if ptr in seen or len(seen) >= 48:
            raise VirtioError(f"capability list loops at {ptr:#x}")
        seen.add(ptr)
        caps.append((cfg[ptr], ptr))
        ptr = cfg[ptr + 1] & ~3
    return caps


def parse_virtio_caps(cfg: bytes) -> tuple[list[VirtioCap], MsixCap | None]:
    vcaps: list[VirtioCap] = []
    msix: MsixCap | None = None
    for cap_id, off in walk_capabilities(cfg):
        if cap_id == PCI_CAP_ID_VNDR:
            if off + 16 > len(cfg):
                raise VirtioError(f"vendor capability at {off:#x} truncated")
            _vndr, _next, cap_len, cfg_type, bar, cid = struct.unpack_from("<BBBBBB", cfg, off)
            offset, length = struct.unpack_from("<II", cfg, off + 8)
            mult = 0
            if cfg_type == CfgType.NOTIFY:
                if cap_len < 20 or off + 20 > len(cfg):
                    raise VirtioError("notify capability without notify_off_multiplier")
                mult = struct.unpack_from("<I", cfg, off + 16)[0]
            if cap_len < 16:
                log.warning("vendor capability at %#x has cap_len %d < 16", off, cap_len)
                continue
            vcaps.append(VirtioCap(off, cfg_type, bar, cid, offset, length, mult))
        elif cap_id == PCI_CAP_ID_MSIX:
            flags, table, pba = struct.unpack_from("<HII", cfg, off + 2)
            msix = MsixCap(
                off,
                (flags & PCI_MSIX_FLAGS_QSIZE) + 1,
                table & 7,
                table & ~7,
                pba & 7,
                pba & ~7,
            )
    return vcaps, msix


# --------------------------------------------------------------------------
# Transport
# --------------------------------------------------------------------------


class VirtioPciTransport:
    """Modern virtio-pci transport driven over vfio-user region accesses."""

    def __init__(
        self,
        client: VfioUserClient,
        *,
        posted_kicks: bool = True,
        split_64bit_writes: bool = True,
        use_mmap: bool = False,
    ) -> None:
        self.client = client
        self.posted_kicks = posted_kicks
        self.split_64bit_writes = split_64bit_writes
        self.use_mmap = use_mmap
        # bar -> [(start, end, mapping)] for sparse-mmap areas (use_mmap)
        self._mmaps: dict[int, list[tuple[int, int, mmap.mmap]]] = {}
        cfg = client.config_read(0, 256)
        self.config_space = cfg
        self.vendor_id: int = struct.unpack_from("<H", cfg, PCI_VENDOR_ID)[0]
        self.device_id: int = struct.unpack_from("<H", cfg, PCI_DEVICE_ID)[0]
        self.revision = cfg[PCI_REVISION_ID]
        self.subsystem_vendor_id: int = struct.unpack_from("<H", cfg, PCI_SUBSYSTEM_VENDOR_ID)[0]
        self.subsystem_id: int = struct.unpack_from("<H", cfg, PCI_SUBSYSTEM_ID)[0]
        caps, self.msix = parse_virtio_caps(cfg)
        self.caps = caps

        def first(t: CfgType) -> VirtioCap | None:
            # The spec: the driver should use the first capability of a type
            # whose BAR it can use.
            for c in caps:
                if c.cfg_type == t and 0 <= c.bar <= 5:
                    return c
            return None

        common, notify, isr = first(CfgType.COMMON), first(CfgType.NOTIFY), first(CfgType.ISR)
        if common is None or notify is None or isr is None:
            raise VirtioError(
                f"missing virtio capabilities (common={common}, notify={notify}, isr={isr})"
            )
        if common.length < COMMON_CFG_MIN_LEN:
            raise VirtioError(f"common cfg too short: {common.length:#x}")
        self.common = common
        self.notify = notify
        self.isr = isr
        self.device = first(CfgType.DEVICE)
        if use_mmap:
            for bar in sorted({c.bar for c in (common, notify, isr, self.device) if c}):
                self._map_bar(bar)
        self.queue_notify_addr: dict[int, tuple[int, int]] = {}
        self.irq_fds: list[int] = []
        self.features = 0
        log.info(
            "virtio-pci %04x:%04x rev %d: common=%s notify=%s isr=%s device=%s msix=%s",
            self.vendor_id,
            self.device_id,
            self.revision,
            common,
            notify,
            isr,
            self.device,
            self.msix,
        )

    @property
    def virtio_device_id(self) -> int:
        if self.device_id >= VIRTIO_PCI_MODERN_DEVICE_ID_BASE:
            return self.device_id - VIRTIO_PCI_MODERN_DEVICE_ID_BASE
        return self.subsystem_id  # transitional

    # -- raw structure access --------------------------------------------------

    def _check(self, cap: VirtioCap, off: int, size: int) -> None:
        if off < 0 or off + size > cap.length:
            raise VirtioError(f"access {off:#x}+{size} beyond cfg_type {cap.cfg_type} length")

    def _map_bar(self, bar: int) -> None:
        """mmap the BAR's sparse-mmap areas, as QEMU maps them into the guest."""
        info = self.client.region_info(bar)
        try:
            if not info.mmappable or not info.fds:
                return
            areas = []
            for i, a in enumerate(info.sparse_areas):
                fd = info.fds[min(i, len(info.fds) - 1)]
                m = mmap.mmap(fd, a.size, mmap.MAP_SHARED, offset=info.offset + a.offset)
                areas.append((a.offset, a.offset + a.size, m))
                log.debug("bar%d: mmapped [%#x, %#x)", bar, a.offset, a.offset + a.size)
            self._mmaps[bar] = areas
        finally:
            info.close_fds()

    def _mapped(self, bar: int, off: int, size: int) -> tuple[mmap.mmap, int] | None:
        for start, end, m in self._mmaps.get(bar, ()):
            if start <= off and off + size <= end:
                return m, off - start
        return None

    def bar_read(self, bar: int, off: int, size: int) -> bytes:
        hit = self._mapped(bar, off, size)
        if hit is not None:
            m, o = hit
            mb()
            return m[o : o + size]
        return self.client.region_read(bar, off, size)

    def bar_write(self, bar: int, off: int, data: bytes, posted: bool = False) -> None:
        hit = self._mapped(bar, off, len(data))
        if hit is not None:
            m, o = hit
            m[o : o + len(data)] = data
            mb()
            return
        self.client.region_write(bar, off, data, posted=posted)

    def cap_read(self, cap: VirtioCap, off: int, size: int) -> int:
        self._check(cap, off, size)
        return int.from_bytes(self.bar_read(cap.bar, cap.offset + off, size), "little")

    def cap_write(self, cap: VirtioCap, off: int, size: int, value: int) -> None:
        self._check(cap, off, size)
        self.bar_write(cap.bar, cap.offset + off, value.to_bytes(size, "little"))

    def common_read(self, off: int, size: int) -> int:
        return self.cap_read(self.common, off, size)

    def common_write(self, off: int, size: int, value: int) -> None:
        self.cap_write(self.common, off, size, value)

    def _common_write64(self, lo: int, value: int) -> None:
        if self.split_64bit_writes:
            self.common_write(lo, 4, value & 0xFFFFFFFF)
            self.common_write(lo + 4, 4, value >> 32)
        else:
            self.common_write(lo, 8, value)

    # -- status / reset / features ---------------------------------------------

    @property
    def status(self) -> int:
        return self.common_read(COMMON_STATUS, 1)

    def set_status(self, value: int) -> None:
        self.common_write(COMMON_STATUS, 1, value)

    def add_status(self, bits: int) -> None:
        self.set_status(self.status | bits)

    def reset(self, timeout: float = 2.0) -> None:
        """Write 0 to device_status and wait until it reads back 0 (spec 4.1.4.3.2)."""
        self.set_status(0)
        deadline = time.monotonic() + timeout
        while self.status != 0:
            if time.monotonic() > deadline:
                raise VirtioTimeout("device did not complete reset")
            time.sleep(0.001)
        self.queue_notify_addr.clear()
        self.features = 0

    def device_features(self) -> int:
        features = 0
        for sel in (0, 1):
            self.common_write(COMMON_DFSELECT, 4, sel)
            features |= self.common_read(COMMON_DF, 4) << (32 * sel)
        return features

    def write_driver_features(self, features: int) -> None:
        for sel in (0, 1):
            self.common_write(COMMON_GFSELECT, 4, sel)
            self.common_write(COMMON_GF, 4, (features >> (32 * sel)) & 0xFFFFFFFF)

    def negotiate(self, wanted: int, *, require: int = bit(VIRTIO_F_VERSION_1)) -> int:
        """reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (checked). Returns them."""
        self.reset()
        self.add_status(STATUS_ACKNOWLEDGE)
        self.add_status(STATUS_DRIVER)
        offered = self.device_features()
        self.offered_features = offered
        missing = require & ~offered
        if missing:
            self.add_status(STATUS_FAILED)
            raise VirtioError(f"device lacks required features {missing:#x}")
        features = offered & wanted
        self.write_driver_features(features)
        self.add_status(STATUS_FEATURES_OK)
        if not self.status & STATUS_FEATURES_OK:
            self.add_status(STATUS_FAILED)
            raise VirtioError(f"device refused features {features:#x}")
        self.features = features
        log.info("features offered %#x, negotiated %#x", offered, features)
        return features

    def has(self, feature_bit: int) -> bool:
        return bool(self.features & bit(feature_bit))

    def driver_ok(self) -> None:
        self.add_status(STATUS_DRIVER_OK)

    # -- queues ----------------------------------------------------------------

    @property
    def num_queues(self) -> int:
        return self.common_read(COMMON_NUMQ, 2)

    def select_queue(self, index: int) -> None:
        self.common_write(COMMON_Q_SELECT, 2, index)

    def queue_max_size(self, index: int) -> int:
        self.select_queue(index)
        return self.common_read(COMMON_Q_SIZE, 2)

    def setup_queue(self, q: SplitQueue, vector: int = VIRTIO_MSI_NO_VECTOR) -> None:
        """Program and enable queue ``q.index`` (spec 4.1.5.1.3)."""
        self.select_queue(q.index)
        max_size = self.common_read(COMMON_Q_SIZE, 2)
        if max_size == 0:
            raise VirtioError(f"queue {q.index} not available")
        if q.size > max_size:
            raise VirtioError(f"queue {q.index}: size {q.size} > device max {max_size}")
        if self.common_read(COMMON_Q_ENABLE, 2):
            raise VirtioError(f"queue {q.index} already enabled")
        self.common_write(COMMON_Q_SIZE, 2, q.size)
        self._common_write64(COMMON_Q_DESCLO, q.desc_addr)
        self._common_write64(COMMON_Q_AVAILLO, q.avail_addr)
        self._common_write64(COMMON_Q_USEDLO, q.used_addr)
        self.common_write(COMMON_Q_MSIX, 2, vector)
        if vector != VIRTIO_MSI_NO_VECTOR:
            got = self.common_read(COMMON_Q_MSIX, 2)
            if got != vector:
                raise VirtioError(f"queue {q.index}: device refused MSI-X vector {vector}")
        q.vector = vector
        noff = self.common_read(COMMON_Q_NOFF, 2)
        addr = self.notify.offset + noff * self.notify.notify_off_multiplier
        if addr + 2 > self.notify.offset + self.notify.length:
            raise VirtioError(f"queue {q.index}: notify address {addr:#x} outside notify cap")
        self.queue_notify_addr[q.index] = (self.notify.bar, addr)
        q.transport = self
        self.common_write(COMMON_Q_ENABLE, 2, 1)
        log.debug(
            "queue %d: size %d desc %#x avail %#x used %#x vector %#x notify bar%d+%#x",
            q.index,
            q.size,
            q.desc_addr,
            q.avail_addr,
            q.used_addr,
            vector,
            self.notify.bar,
            addr,
        )

    def kick(self, index: int, posted: bool | None = None) -> None:
        """Notify queue ``index``: write its index (le16) to its notify address."""
        bar, addr = self.queue_notify_addr[index]
        self.bar_write(
            bar,
            addr,
            index.to_bytes(2, "little"),
            posted=self.posted_kicks if posted is None else posted,
        )

    def read_isr(self) -> int:
        return self.cap_read(self.isr, 0, 1)

    def set_config_msix_vector(self, vector: int) -> None:
        self.common_write(COMMON_MSIX, 2, vector)
        if vector != VIRTIO_MSI_NO_VECTOR and self.common_read(COMMON_MSIX, 2) != vector:
            raise VirtioError(f"device refused config MSI-X vector {vector}")

    # -- device config ---------------------------------------------------------

    def device_config_read(self, off: int, size: int, retries: int = 100) -> bytes:
        """Read device-specific config consistently (config_generation loop)."""
        if self.device is None:
            raise VirtioError("device has no device-specific config capability")
        self._check(self.device, off, size)
        for _ in range(retries):
            gen = self.common_read(COMMON_CFGGENERATION, 1)
            data = b"".join(
                self.bar_read(self.device.bar, self.device.offset + o, n)
                for o, n in guest_access_pieces(off, size)
            )
            if self.common_read(COMMON_CFGGENERATION, 1) == gen:
                return data
        raise VirtioError("config_generation never settled")

    def device_config_read_fields(
        self, fields: Sequence[tuple[int, int]], retries: int = 100
    ) -> list[int]:
        """Read (offset, width) fields one access each, as a guest reads a
        config struct, all within one config_generation."""
        if self.device is None:
            raise VirtioError("device has no device-specific config capability")
        dev = self.device
        for off, n in fields:
            self._check(dev, off, n)
        for _ in range(retries):
            gen = self.common_read(COMMON_CFGGENERATION, 1)
            vals = [
                int.from_bytes(self.bar_read(dev.bar, dev.offset + off, n), "little")
                for off, n in fields
            ]
            if self.common_read(COMMON_CFGGENERATION, 1) == gen:
                return vals
        raise VirtioError("config_generation never settled")

    def device_config_write(self, off: int, data: bytes) -> None:
        if self.device is None:
            raise VirtioError("device has no device-specific config capability")
        self._check(self.device, off, len(data))
        for o, n in guest_access_pieces(off, len(data)):
            self.bar_write(self.device.bar, self.device.offset + o, data[o - off : o - off + n])

    # -- MSI-X -------------------------------------------------------------------------

    def enable_msix(self, nvectors: int) -> list[int]:
        """Enable MSI-X in config space and hand an eventfd per vector to the device."""
        if self.msix is None:
            raise VirtioError("device has no MSI-X capability")
        if not 0 < nvectors <= self.msix.table_size:
            raise VirtioError(f"{nvectors} vectors requested, table has {self.msix.table_size}")
        ctrl_off = self.msix.cap_offset + 2
        ctrl = self.client.config_read16(ctrl_off)
        ctrl = (ctrl | PCI_MSIX_FLAGS_ENABLE) & ~PCI_MSIX_FLAGS_MASKALL
        self.client.config_write16(ctrl_off, ctrl)
        cmd = self.client.config_read16(PCI_COMMAND)
        self.client.config_write16(PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
        self.disable_msix_fds()
        self.irq_fds = [new_eventfd() for _ in range(nvectors)]
        self.client.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, 0, self.irq_fds)
        return self.irq_fds

    def replace_vector_fd(self, vector: int) -> int:
        """Hand the device a fresh eventfd for ``vector`` (as QEMU does when it
        masks/unmasks a vector) and close the old one; returns the new fd."""
        fd = new_eventfd()
        try:
            self.client.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, vector, [fd])
        except BaseException:
            os.close(fd)
            raise
        os.close(self.irq_fds[vector])
        self.irq_fds[vector] = fd
        return fd

    def disable_msix_fds(self) -> None:
        for fd in self.irq_fds:
            os.close(fd)
        self.irq_fds = []

    def irq_count(self, vector: int) -> int:
        """Consume and return the eventfd counter of ``vector`` (0 if none)."""
        return read_eventfd(self.irq_fds[vector])

    def wait_irq(self, vector: int, timeout: float) -> bool:
        """Wait up to ``timeout`` for ``vector``; consume it. True if it fired."""
        fd = self.irq_fds[vector]
        r, _, _ = select.select([fd], [], [], max(0.0, timeout))
        if r:
            read_eventfd(fd)
            return True
        return False

    def close(self) -> None:
        self.disable_msix_fds()
        for areas in self._mmaps.values():
            for _, _, m in areas:
                m.close()
        self._mmaps.clear()


# --------------------------------------------------------------------------
# Split virtqueue
# --------------------------------------------------------------------------


@dataclass
class UsedElem:
    id: int
    len: int
    token: object


@dataclass
class _Pending:
    ids: list[int]
    token: object
    writable_len: int
    chain: list[tuple[int, int, bool]] = field(default_factory=list)


Buffer = tuple[int, int, bool]  # (guest addr, length, device-writable)


class SplitQueue:
    """A split virtqueue laid out in guest memory (spec 2.7).

    Alignment: descriptor table 16, available ring 2, used ring 4 (virtio 1.x);
    ``page_align`` puts each part on its own 4 KiB boundary instead.
    """

    def __init__(
        self,
        mem: GuestMemory,
        index: int,
        size: int,
        *,
        event_idx: bool = False,
        max_indirect: int = 0,
        page_align: bool = False,
    ) -> None:
        if size <= 0 or size > 32768 or size & (size - 1):
            raise ValueError("queue size must be a power of two <= 32768")
        self.mem = mem
        self.index = index
        self.size = size
        self.event_idx = event_idx
        self.max_indirect = max_indirect
        self.vector = VIRTIO_MSI_NO_VECTOR
        self.transport: VirtioPciTransport | None = None
        a = 4096
        self.desc_addr = mem.alloc(16 * size, a if page_align else 16)
        self.avail_addr = mem.alloc(6 + 2 * size, a if page_align else 2)
        self.used_addr = mem.alloc(6 + 8 * size, a if page_align else 4)
        mem.device_writable(self.used_addr, 6 + 8 * size)
        self.indirect_tables: dict[int, int] = {}
        self.free: collections.deque[int] = collections.deque(range(size))
        self.pending: dict[int, _Pending] = {}
        self.avail_idx = 0  # shadow of avail->idx (free-running u16)
        self.published_idx = 0
        self.last_used_idx = 0
        self.kicks = 0
        self.kicks_suppressed = 0
        self._last_kick_idx = 0

    # ring field addresses
    @property
    def avail_flags_addr(self) -> int:
        return self.avail_addr

    @property
    def avail_idx_addr(self) -> int:
        return self.avail_addr + 2

    def avail_ring_addr(self, i: int) -> int:
        return self.avail_addr + 4 + 2 * (i % self.size)

    @property
    def used_event_addr(self) -> int:
        return self.avail_addr + 4 + 2 * self.size

    @property
    def used_flags_addr(self) -> int:
        return self.used_addr

    @property
    def used_idx_addr(self) -> int:
        return self.used_addr + 2

    def used_ring_addr(self, i: int) -> int:
        return self.used_addr + 4 + 8 * (i % self.size)

    @property
    def avail_event_addr(self) -> int:
        return self.used_addr + 4 + 8 * self.size

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    # -- driver side: make buffers available ------------------------------------------

    def write_desc(self, table: int, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(table + 16 * i, DESC.pack(addr, length, flags, nxt))

    def add_buf(
        self,
        chain: Sequence[Buffer],
        token: object = None,
        *,
        indirect: bool | None = None,
        publish: bool = True,
    ) -> int:
        """Put a chain of (addr, len, writable) buffers on the ring; returns the head id.

        Device-readable buffers must precede device-writable ones (spec 2.7.4.2).
        ``indirect`` None uses an indirect table when the queue has one and the
        chain has more than one buffer.
        """
        if not chain:
            raise ValueError("empty chain")
        seen_w = False
        for _, _, w in chain:
            if seen_w and not w:
                raise ValueError("readable buffer after a writable one")
            seen_w = seen_w or w
        use_ind = self.max_indirect > 0 and len(chain) > 1 if indirect is None else indirect
        if use_ind:
            if self.max_indirect <= 0:
                raise ValueError("queue was created without indirect tables")
            if len(chain) > self.max_indirect:
                raise ValueError(f"chain of {len(chain)} > max_indirect {self.max_indirect}")
            if not self.free:
                raise VirtioError(f"queue {self.index} full")
            head = self.free.popleft()
            table = self.indirect_tables.get(head)
            if table is None:
                table = self.mem.alloc(16 * self.max_indirect, 16)
                self.indirect_tables[head] = table
            for i, (addr, length, w) in enumerate(chain):
                flags = (VRING_DESC_F_WRITE if w else 0) | (
                    VRING_DESC_F_NEXT if i + 1 < len(chain) else 0
                )
                self.write_desc(table, i, addr, length, flags, i + 1 if i + 1 < len(chain) else 0)
            self.write_desc(self.desc_addr, head, table, 16 * len(chain), VRING_DESC_F_INDIRECT, 0)
            ids = [head]
        else:
            if len(chain) > len(self.free):
                raise VirtioError(
                    f"queue {self.index}: {len(chain)} descriptors needed, {len(self.free)} free"
                )
            ids = [self.free.popleft() for _ in chain]
            for i, (addr, length, w) in enumerate(chain):
                more = i + 1 < len(chain)
                flags = (VRING_DESC_F_WRITE if w else 0) | (VRING_DESC_F_NEXT if more else 0)
                self.write_desc(
                    self.desc_addr, ids[i], addr, length, flags, ids[i + 1] if more else 0
                )
            head = ids[0]
        for addr, length, w in chain:
            if w:
                self.mem.device_writable(addr, length)
        wlen = sum(length for _, length, w in chain if w)
        self.pending[head] = _Pending(ids, token, wlen, list(chain))
        self.mem.write_u16(self.avail_ring_addr(self.avail_idx), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()
        return head

    def publish(self) -> tuple[int, int]:
        """Write avail->idx; returns (old, new) published index."""
        old = self.published_idx
        mb()  # ring entries before the index
        self.mem.write_u16(self.avail_idx_addr, self.avail_idx)
        self.published_idx = self.avail_idx
        return old, self.avail_idx

    def need_kick(self, old: int, new: int) -> bool:
        mb()  # the index store before reading the device's suppression state
        if self.event_idx:
            return vring_need_event(self.mem.read_u16(self.avail_event_addr), new, old)
        return not self.mem.read_u16(self.used_flags_addr) & VRING_USED_F_NO_NOTIFY

    def kick(self, *, force: bool = False, old: int | None = None) -> bool:
        """Notify the device if it wants to be (or ``force``). True if notified."""
        if self.transport is None:
            raise VirtioError(f"queue {self.index} is not set up")
        o = self._last_kick_idx if old is None else old
        new = self.published_idx
        if not force and not self.need_kick(o, new):
            self.kicks_suppressed += 1
            self._last_kick_idx = new
            return False
        self._last_kick_idx = new
        self.transport.kick(self.index)
        self.kicks += 1
        return True

    # -- interrupt suppression -------------------------------------------------

    def disable_interrupts(self) -> None:
        if not self.event_idx:
            self.mem.write_u16(self.avail_flags_addr, VRING_AVAIL_F_NO_INTERRUPT)
        # With EVENT_IDX, leaving used_event behind is enough.

    def enable_interrupts(self) -> bool:
        """Re-arm; returns True if used entries are already pending (re-check!)."""
        if self.event_idx:
            self.mem.write_u16(self.used_event_addr, self.last_used_idx)
        else:
            self.mem.write_u16(self.avail_flags_addr, 0)
        mb()
        return self.has_used()

    # -- used ring -------------------------------------------------------------

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used_idx_addr)

    def has_used(self) -> bool:
        return self.used_idx() != self.last_used_idx

    def get_used(self) -> UsedElem | None:
        """Pop one used element (validated) or None."""
        idx = self.used_idx()
        if idx == self.last_used_idx:
            return None
        outstanding = (idx - self.last_used_idx) & 0xFFFF
        if outstanding > self.size:
            raise VirtqueueError(
                f"queue {self.index}: used idx {idx} is {outstanding} ahead of {self.last_used_idx}"
            )
        mb()  # read the entry after the index
        uid, ulen = USED_ELEM.unpack(self.mem.read(self.used_ring_addr(self.last_used_idx), 8))
        p = self.pending.pop(uid, None)
        if p is None:
            raise VirtqueueError(f"queue {self.index}: used id {uid} is not in flight")
        if ulen > p.writable_len:
            raise VirtqueueError(
                f"queue {self.index}: used len {ulen} > writable {p.writable_len} (id {uid})"
            )
        self.free.extend(p.ids)
        self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
        if self.event_idx:
            self.mem.write_u16(self.used_event_addr, self.last_used_idx)
        return UsedElem(uid, ulen, p.token)

    def poll_used(self) -> list[UsedElem]:
        out = []
        while (e := self.get_used()) is not None:
            out.append(e)
        return out


# --------------------------------------------------------------------------
# Buffer pool
# --------------------------------------------------------------------------


class BlockPool:
    """Fixed-size blocks of guest memory (for tx/rx/control buffers)."""

    def __init__(self, mem: GuestMemory, block_size: int, count: int, align: int = 64) -> None:
        self.block_size = block_size
        stride = (block_size + align - 1) & ~(align - 1)
        base = mem.alloc(stride * count, max(align, 16))
        self.blocks: collections.deque[int] = collections.deque(
            base + i * stride for i in range(count)
        )

    def get(self) -> int:
        if not self.blocks:
            raise VirtioError("buffer pool exhausted")
        return self.blocks.popleft()

    def put(self, addr: int) -> None:
        self.blocks.append(addr)

    def __len__(self) -> int:
        return len(self.blocks)


# --------------------------------------------------------------------------
# virtio-net
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class NetHdr:
    flags: int = 0
    gso_type: int = 0
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def pack(self) -> bytes:
        return NET_HDR.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        )

    @classmethod
    def unpack(cls, data: bytes) -> NetHdr:
        return cls(*NET_HDR.unpack_from(data))


@dataclass(frozen=True)
class NetConfig:
    mac: bytes
    status: int
    max_virtqueue_pairs: int
    mtu: int
    speed: int
    duplex: int

    @property
    def mac_str(self) -> str:
        return ":".join(f"{b:02x}" for b in self.mac)


@dataclass
class _TxToken:
    blocks: list[int]


@dataclass
class _QueuePair:
    rx: SplitQueue
    tx: SplitQueue


class VirtioNetDriver:
    """Bring a virtio-net device up and move packets through it, like a guest.

    MSI-X vectors: 0 = config, rx of pair N = 1+2N, tx = 2+2N (the control
    queue gets none; like Linux, control commands busy-wait).  If the table
    is too small every queue shares vector 1; without MSI-X the driver polls.
    """

    def __init__(
        self,
        client: VfioUserClient,
        mem: GuestMemory,
        *,
        features: int = DEFAULT_NET_FEATURES,
        queue_size: int = 256,
        rx_buf_size: int = 2048,
        tx_block_size: int = 4096,
        use_msix: bool = True,
        use_indirect: bool = False,
        always_kick: bool = True,
        auto_refill: bool = True,
        timeout: float = 5.0,
        use_mmap: bool = False,
        posted_kicks: bool = True,
    ) -> None:
        self.client = client
        self.mem = mem
        self.wanted_features = features
        self.queue_size = queue_size
        self.rx_buf_size = rx_buf_size
        self.tx_block_size = tx_block_size
        self.use_msix = use_msix
        self.use_indirect = use_indirect
        self.always_kick = always_kick
        self.auto_refill = auto_refill
        self.timeout = timeout
        self.transport = VirtioPciTransport(client, use_mmap=use_mmap, posted_kicks=posted_kicks)
        self.pairs: list[_QueuePair] = []
        self.ctrl: SplitQueue | None = None
        self.features = 0
        self.config_vector = VIRTIO_MSI_NO_VECTOR
        self._rx_pools: list[BlockPool] = []
        self._tx_pools: list[BlockPool] = []
        self._ctrl_pool: BlockPool | None = None
        self.tx_completed = 0

    # -- bring-up --------------------------------------------------------------

    def has(self, feature_bit: int) -> bool:
        return bool(self.features & bit(feature_bit))

    def read_config(self) -> NetConfig:
        # Field by field with natural widths (the MAC byte by byte), like Linux.
        fields = [(i, 1) for i in range(6)] + [(6, 2), (8, 2), (10, 2), (12, 4), (16, 1)]
        length = self.transport.device.length if self.transport.device else 0
        fields = [(o, n) for o, n in fields if o + n <= length]
        vals = self.transport.device_config_read_fields(fields) + [0] * (11 - len(fields))
        mac = bytes(vals[:6])
        status, pairs, mtu, speed, duplex = vals[6:11]
        return NetConfig(mac, status, pairs, mtu, speed, duplex)

    @property
    def max_pairs(self) -> int:
        # virtio 5.1.2: N = max_virtqueue_pairs when MQ or RSS is negotiated.
        if self.has(VIRTIO_NET_F_MQ) or self.has(VIRTIO_NET_F_RSS):
            return self.read_config().max_virtqueue_pairs
        return 1

    @property
    def ctrl_index(self) -> int:
        return 2 * self.max_pairs

    def bring_up(
        self,
        pairs: int = 1,
        rx_buffers: int | None = None,
        *,
        set_pairs: bool = True,
        queue_hook: Callable[[SplitQueue], None] | None = None,
    ) -> int:
        """Full init sequence (spec 3.1.1); returns the negotiated features.

        With MQ and a control queue, ``set_pairs`` sends VQ_PAIRS_SET(pairs)
        after DRIVER_OK, as Linux does at probe (the device starts with 1 pair).
        ``queue_hook`` sees every queue after it is laid out in guest memory
        and before it is programmed into the device (a test may move its
        rings elsewhere).
        """
        t = self.transport
        if t.virtio_device_id != VIRTIO_ID_NET:
            log.warning("device id %#x is not virtio-net", t.device_id)
        self.features = t.negotiate(self.wanted_features)
        event_idx = self.has(VIRTIO_F_EVENT_IDX)
        max_ind = 32 if self.use_indirect and self.has(VIRTIO_F_INDIRECT_DESC) else 0
        if pairs > self.max_pairs:
            raise VirtioError(f"{pairs} pairs requested, device has {self.max_pairs}")

        nvec_wanted = 1 + 2 * pairs
        vec_of: dict[int, int] = {}
        if self.use_msix and t.msix is not None:
            if t.msix.table_size >= nvec_wanted:
                t.enable_msix(nvec_wanted)
                for p in range(pairs):
                    vec_of[2 * p] = 1 + 2 * p
                    vec_of[2 * p + 1] = 2 + 2 * p
            elif t.msix.table_size >= 2:
                t.enable_msix(2)
                for i in range(2 * pairs):
                    vec_of[i] = 1
            else:
                t.enable_msix(1)
            self.config_vector = 0
            t.set_config_msix_vector(0)

        for p in range(pairs):
            qs = []
            for idx in (2 * p, 2 * p + 1):
                size = min(self.queue_size, t.queue_max_size(idx))
                q = SplitQueue(self.mem, idx, size, event_idx=event_idx, max_indirect=max_ind)
                if queue_hook is not None:
                    queue_hook(q)
                t.setup_queue(q, vec_of.get(idx, VIRTIO_MSI_NO_VECTOR))
                qs.append(q)
            self.pairs.append(_QueuePair(qs[0], qs[1]))
            self._rx_pools.append(BlockPool(self.mem, self.rx_buf_size, qs[0].size))
            self._tx_pools.append(BlockPool(self.mem, self.tx_block_size, qs[1].size))
        if self.has(VIRTIO_NET_F_CTRL_VQ):
            idx = self.ctrl_index
            size = min(64, t.queue_max_size(idx))
            self.ctrl = SplitQueue(self.mem, idx, size, event_idx=event_idx)
            if queue_hook is not None:
                queue_hook(self.ctrl)
            t.setup_queue(self.ctrl, VIRTIO_MSI_NO_VECTOR)
            self._ctrl_pool = BlockPool(self.mem, 4096, 4)
        t.driver_ok()
        if t.status & (STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED):
            raise VirtioError(f"device status {t.status:#x} after DRIVER_OK")
        for p in range(pairs):
            self.post_rx_buffers(self.pairs[p].rx.size if rx_buffers is None else rx_buffers, p)
        if set_pairs and self.ctrl is not None and self.has(VIRTIO_NET_F_MQ):
            ack = self.set_queue_pairs(pairs)
            if ack != VIRTIO_NET_OK:
                raise VirtioError(f"VQ_PAIRS_SET({pairs}) answered {ack}")
        return self.features

    def shutdown(self) -> None:
        """Reset the device and release interrupts."""
        try:
            self.transport.reset()
        finally:
            self.transport.close()

    # -- helpers ---------------------------------------------------------------

    def _notify(self, q: SplitQueue) -> None:
        q.kick(force=self.always_kick)

    def _wait(self, q: SplitQueue, timeout: float | None) -> UsedElem:
        """Wait for one used element on ``q`` (interrupt-driven when it has a vector)."""
        t = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        poll = 0.0002
        while True:
            e = q.get_used()
            if e is not None:
                return e
            self.client.serve(0)  # device may DMA by message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VirtioTimeout(
                    f"queue {q.index}: nothing used within {t}s "
                    f"(avail {q.published_idx}, used {q.used_idx()}, last {q.last_used_idx})"
                )
            if q.vector != VIRTIO_MSI_NO_VECTOR and self.transport.irq_fds:
                if q.enable_interrupts():
                    continue
                self.transport.wait_irq(q.vector, min(remaining, 0.05))
            else:
                time.sleep(min(poll, remaining))
                poll = min(poll * 2, 0.01)

    # -- rx --------------------------------------------------------------------

    def post_rx_buffers(self, n: int, pair: int = 0) -> int:
        """Make up to ``n`` receive buffers available; returns how many were added."""
        q = self.pairs[pair].rx
        pool = self._rx_pools[pair]
        added = 0
        while added < n and q.num_free and len(pool):
            addr = pool.get()
            q.add_buf([(addr, self.rx_buf_size, True)], addr, publish=False)
            added += 1
        if added:
            q.publish()
            self._notify(q)
        return added

    def recv_packet(self, timeout: float | None = None, pair: int = 0) -> tuple[bytes, bytes]:
        """Receive one packet: (12-byte virtio_net_hdr_v1, frame)."""
        q = self.pairs[pair].rx
        pool = self._rx_pools[pair]
        first = self._wait(q, timeout)
        addr = first.token
        assert isinstance(addr, int)
        if first.len < NET_HDR_SIZE:
            pool.put(addr)
            raise VirtqueueError(f"rx used len {first.len} < header size")
        data = bytearray(self.mem.read(addr, first.len))
        pool.put(addr)
        hdr = bytes(data[:NET_HDR_SIZE])
        nbufs = NetHdr.unpack(hdr).num_buffers if self.has(VIRTIO_NET_F_MRG_RXBUF) else 1
        if nbufs < 1:
            raise VirtqueueError("num_buffers 0 in mergeable rx header")
        for _ in range(nbufs - 1):
            e = self._wait(q, timeout)
            a = e.token
            assert isinstance(a, int)
            data += self.mem.read(a, e.len)
            pool.put(a)
        if self.auto_refill:
            self.post_rx_buffers(q.size, pair)
        return hdr, bytes(data[NET_HDR_SIZE:])

    def try_recv_packet(self, pair: int = 0) -> tuple[bytes, bytes] | None:
        if not self.pairs[pair].rx.has_used():
            return None
        return self.recv_packet(pair=pair)

    # -- tx --------------------------------------------------------------------

    def reclaim_tx(self, pair: int = 0) -> int:
        q = self.pairs[pair].tx
        pool = self._tx_pools[pair]
        n = 0
        for e in q.poll_used():
            assert isinstance(e.token, _TxToken)
            for b in e.token.blocks:
                pool.put(b)
            n += 1
        self.tx_completed += n
        return n

    def send_packet(
        self,
        frame: bytes,
        hdr: bytes | NetHdr | None = None,
        *,
        pair: int = 0,
        wait: bool = True,
        timeout: float | None = None,
        split_header: bool = False,
    ) -> int:
        """Queue one frame with its 12-byte header; returns the head id.

        The header and frame share the first buffer unless ``split_header``;
        frames longer than a tx block span several descriptors.  With ``wait``
        returns once the device has used the chain.
        """
        h = bytes(NET_HDR_SIZE) if hdr is None else hdr.pack() if isinstance(hdr, NetHdr) else hdr
        q = self.pairs[pair].tx
        pool = self._tx_pools[pair]
        self.reclaim_tx(pair)
        parts = [h, frame] if split_header else [h + frame]
        chain: list[Buffer] = []
        blocks: list[int] = []
        bs = self.tx_block_size
        for part in parts:
            for off in range(0, max(len(part), 1), bs):
                piece = part[off : off + bs]
                b = pool.get()
                blocks.append(b)
                self.mem.write(b, piece)
                chain.append((b, len(piece), False))
        token = _TxToken(blocks)
        try:
            head = q.add_buf(chain, token)
        except BaseException:
            for b in blocks:
                pool.put(b)
            raise
        self._notify(q)
        if wait:
            t = self.timeout if timeout is None else timeout
            deadline = time.monotonic() + t
            while head in q.pending:
                e = self._wait(q, max(0.0, deadline - time.monotonic()))
                assert isinstance(e.token, _TxToken)
                for b in e.token.blocks:
                    pool.put(b)
                self.tx_completed += 1
        return head

    def wait_tx_complete(self, pair: int = 0, timeout: float | None = None) -> None:
        q = self.pairs[pair].tx
        pool = self._tx_pools[pair]
        t = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        self.reclaim_tx(pair)
        while q.pending:
            e = self._wait(q, max(0.0, deadline - time.monotonic()))
            assert isinstance(e.token, _TxToken)
            for b in e.token.blocks:
                pool.put(b)
            self.tx_completed += 1

    # -- control queue ---------------------------------------------------------

    def ctrl_command(
        self,
        cls: int,
        cmd: int,
        data: bytes | Sequence[bytes] = b"",
        timeout: float | None = None,
    ) -> int:
        """Send {class, cmd} + data (one or several readable buffers); return the ack.

        The ack byte is pre-set to 0xFF so a device that completes the command
        without writing it is visible.
        """
        if self.ctrl is None or self._ctrl_pool is None:
            raise VirtioError("control virtqueue not negotiated")
        parts = [data] if isinstance(data, (bytes, bytearray)) else list(data)
        block = self._ctrl_pool.get()
        try:
            chain: list[Buffer] = [(block, 2, False)]
            self.mem.write(block, bytes([cls, cmd]))
            pos = block + 64
            for p in parts:
                if not p:
                    continue
                if pos + len(p) > block + 4096 - 64:
                    raise ValueError("control command data too large")
                self.mem.write(pos, p)
                chain.append((pos, len(p), False))
                pos += (len(p) + 15) & ~15
            ack_addr = block + 4096 - 16
            self.mem.write_u8(ack_addr, 0xFF)
            chain.append((ack_addr, 1, True))
            head = self.ctrl.add_buf(chain, block, indirect=False)
            self.ctrl.kick(force=True)
            t = self.timeout if timeout is None else timeout
            deadline = time.monotonic() + t
            # Like Linux: busy-wait for the control queue (it has no vector).
            while True:
                e = self.ctrl.get_used()
                if e is not None:
                    if e.id != head:
                        raise VirtqueueError(f"ctrl: used id {e.id}, expected {head}")
                    break
                self.client.serve(0)
                if time.monotonic() > deadline:
                    raise VirtioTimeout(f"control command {cls}/{cmd} not completed in {t}s")
                time.sleep(0.0005)
            return self.mem.read_u8(ack_addr)
        finally:
            self._ctrl_pool.put(block)

    def set_queue_pairs(self, n: int, timeout: float | None = None) -> int:
        return self.ctrl_command(
            VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", n), timeout
        )


# The device's steering state in BAR0 (README "Steering"; csrc/layout.h).
STEER_STATE_OFF = 0x2800  # BAR0 (csrc/layout.h VN_STEER_STATE_OFF)
STEER_STATE_LEN = 16
STEER_STATE_MAGIC = b"VNST"


def read_steer_state(c: VfioUserClient) -> bytes:
    """The steering state in BAR0, read 4 bytes at a time as a guest would."""
    return b"".join(
        c.region_read(VFU_PCI_DEV_BAR0_REGION_IDX, STEER_STATE_OFF + o, 4)
        for o in range(0, STEER_STATE_LEN, 4)
    )


@dataclass(frozen=True)
class SteerState:
    version: int
    policy: int
    effective: int
    active: int
    max_pairs: int
    switches: int

    @classmethod
    def parse(cls, raw: bytes) -> SteerState:
        assert raw[:4] == STEER_STATE_MAGIC, raw.hex()
        active, max_pairs, switches = struct.unpack_from("<HHI", raw, 8)
        return cls(raw[4], raw[5], raw[6], active, max_pairs, switches)
