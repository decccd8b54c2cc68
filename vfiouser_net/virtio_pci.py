"""The virtio-over-PCI transport's common configuration (virtio 1.x 4.1.4.3).

Owns the device status state machine, feature negotiation and per-queue
configuration. It knows nothing of networking: what happens at DRIVER_OK and at
reset is delegated to a backend (the C datapath in production, a fake in unit
tests). Accesses of any width and alignment are applied to a composed image of
the structure, so a driver that splits 64-bit fields into halves works.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from vfiouser_net.virtio_spec import (
    COMMON_CFG_SIZE,
    CommonCfg,
    DeviceStatus,
    NetFeature,
    feature_names,
    unmet_requirements,
)

log = logging.getLogger(__name__)

# ISR status bits (virtio 1.x 4.1.4.5); the datapath owns the register.
ISR_QUEUE = 0x1
ISR_CONFIG = 0x2
NO_VECTOR = 0xFFFF


class TransportBackend(Protocol):
    def configure_queue(
        self, index: int, size: int, desc: int, driver: int, device: int, vector: int
    ) -> None: ...

    def start_datapath(self, features: int) -> bool: ...

    def reset(self) -> None: ...

    def set_config_vector(self, vector: int) -> None: ...

    def needs_reset(self) -> bool: ...
    def reset_queue(self, index: int) -> None:
        """VIRTIO_F_RING_RESET: stop one queue and forget its rings."""
        ...

    def enable_queue(
        self, index: int, size: int, desc: int, driver: int, device: int, vector: int
    ) -> None:
        """VIRTIO_F_RING_RESET: start a reset queue again with these rings."""
        ...

    def raise_isr(self, bits: int) -> None:
        """Set ISR status bits (the datapath sets the queue bit itself)."""
        ...

    def take_isr(self) -> int:
        """The ISR status, cleared (a driver's read)."""
        ...


@dataclass
class QueueConfig:
    size: int
    vector: int = NO_VECTOR
    enabled: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0


_FIELDS: dict[CommonCfg, str] = {
    CommonCfg.DEVICE_FEATURE_SELECT: "I",
    CommonCfg.DEVICE_FEATURE: "I",
    CommonCfg.DRIVER_FEATURE_SELECT: "I",
    CommonCfg.DRIVER_FEATURE: "I",
    CommonCfg.CONFIG_MSIX_VECTOR: "H",
    CommonCfg.NUM_QUEUES: "H",
    CommonCfg.DEVICE_STATUS: "B",
    CommonCfg.CONFIG_GENERATION: "B",
    CommonCfg.QUEUE_SELECT: "H",
    CommonCfg.QUEUE_SIZE: "H",
    CommonCfg.QUEUE_MSIX_VECTOR: "H",
    CommonCfg.QUEUE_ENABLE: "H",
    CommonCfg.QUEUE_NOTIFY_OFF: "H",
    CommonCfg.QUEUE_DESC: "Q",
    CommonCfg.QUEUE_DRIVER: "Q",
    CommonCfg.QUEUE_DEVICE: "Q",
    CommonCfg.QUEUE_NOTIFY_DATA: "H",
    CommonCfg.QUEUE_RESET: "H",
}


# The driver's misuses are warned about at most this many times a second (a
# guest can repeat one with every register write), then how many were not.
WARNINGS_PER_SEC = 10


class VirtioPciTransport:
    def __init__(
        self,
        offered_features: int,
        num_queues: int,
        max_queue_size: int,
        num_vectors: int,
        backend: TransportBackend,
    ) -> None:
        if not offered_features >> NetFeature.VERSION_1 & 1:
            raise ValueError("a modern device must offer VERSION_1")
        self.offered = offered_features
        self.num_queues = num_queues
        self.max_queue_size = max_queue_size
        self.num_vectors = num_vectors
        self.backend = backend
        self.lock = threading.RLock()
        self.driver_resets = 0
        self._warn_second = 0
        self._warn_budget = 0
        self._warn_suppressed = 0
        self._reset_state()

    def _reset_state(self) -> None:
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_vector = NO_VECTOR
        self.status = DeviceStatus(0)
        self.config_generation = 0
        self.queue_select = 0
        self._needs_reset_signalled = False
        self.queues = [QueueConfig(size=self.max_queue_size) for _ in range(self.num_queues)]

    def _warn(self, msg: str, *args: object) -> None:
        """A warning about the driver's doing, rate limited (WARNINGS_PER_SEC)."""
        second = int(time.monotonic())
        if second != self._warn_second:
            if self._warn_suppressed:
                log.warning(
                    "%d warnings about the driver not logged (more than %d a second)",
                    self._warn_suppressed,
                    WARNINGS_PER_SEC,
                )
            self._warn_second, self._warn_budget, self._warn_suppressed = (
                second,
                WARNINGS_PER_SEC,
                0,
            )
        if self._warn_budget <= 0:
            self._warn_suppressed += 1
            return
        self._warn_budget -= 1
        log.warning(msg, *args)

    @property
    def negotiated(self) -> int:
        return self.driver_features if self.status & DeviceStatus.FEATURES_OK else 0

    @property
    def driver_ok(self) -> bool:
        return bool(self.status & DeviceStatus.DRIVER_OK)

    def device_status(self) -> DeviceStatus:
        status = self.status
        if self.backend.needs_reset():
            status |= DeviceStatus.DEVICE_NEEDS_RESET
        return status

    # -- register image ---------------------------------------------------

    def _selected(self) -> QueueConfig | None:
        if self.queue_select < self.num_queues:
            return self.queues[self.queue_select]
        return None

    def _compose(self) -> bytearray:
        img = bytearray(COMMON_CFG_SIZE)
        sel = self.device_feature_select
        dev_feat = (self.offered >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
        drv_sel = self.driver_feature_select
        drv_feat = (self.driver_features >> (32 * drv_sel)) & 0xFFFFFFFF if drv_sel < 2 else 0
        q = self._selected()
        values: dict[CommonCfg, int] = {
            CommonCfg.DEVICE_FEATURE_SELECT: sel,
            CommonCfg.DEVICE_FEATURE: dev_feat,
            CommonCfg.DRIVER_FEATURE_SELECT: drv_sel,
            CommonCfg.DRIVER_FEATURE: drv_feat,
            CommonCfg.CONFIG_MSIX_VECTOR: self.config_vector,
            CommonCfg.NUM_QUEUES: self.num_queues,
            CommonCfg.DEVICE_STATUS: int(self.device_status()),
            CommonCfg.CONFIG_GENERATION: self.config_generation & 0xFF,
            CommonCfg.QUEUE_SELECT: self.queue_select,
            CommonCfg.QUEUE_SIZE: q.size if q else 0,
            CommonCfg.QUEUE_MSIX_VECTOR: q.vector if q else NO_VECTOR,
            CommonCfg.QUEUE_ENABLE: int(q.enabled) if q else 0,
            CommonCfg.QUEUE_NOTIFY_OFF: self.queue_select if q else 0,
            CommonCfg.QUEUE_DESC: q.desc if q else 0,
            CommonCfg.QUEUE_DRIVER: q.driver if q else 0,
            CommonCfg.QUEUE_DEVICE: q.device if q else 0,
            # Only with VIRTIO_F_NOTIF_CONFIG_DATA, never offered.
            CommonCfg.QUEUE_NOTIFY_DATA: 0,
            # A queue reset completes before the write that asks for it is
            # answered: 1 is never seen (2.6.1).
            CommonCfg.QUEUE_RESET: 0,
        }
        for field, fmt in _FIELDS.items():
            struct.pack_into("<" + fmt, img, field, values[field])
        return img

    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            if offset < 0 or offset + size > COMMON_CFG_SIZE:
                return bytes(size)
            return bytes(self._compose()[offset : offset + size])

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            if offset < 0 or offset + len(data) > COMMON_CFG_SIZE:
                self._warn("common config write outside the structure at 0x%x ignored", offset)
                return
            img = self._compose()
            img[offset : offset + len(data)] = data
            end = offset + len(data)
            for field, fmt in _FIELDS.items():
                width = struct.calcsize(fmt)
                if field < end and offset < field + width:
                    (value,) = struct.unpack_from("<" + fmt, img, field)
                    self._write_field(field, value)

    # -- field semantics ----------------------------------------------------

    def _write_field(self, field: CommonCfg, value: int) -> None:
        if field == CommonCfg.DEVICE_FEATURE_SELECT:
            self.device_feature_select = value
        elif field == CommonCfg.DRIVER_FEATURE_SELECT:
            self.driver_feature_select = value
        elif field == CommonCfg.DRIVER_FEATURE:
            self._write_driver_features(value)
        elif field == CommonCfg.CONFIG_MSIX_VECTOR:
            self.config_vector = value if value < self.num_vectors else NO_VECTOR
            self.backend.set_config_vector(self.config_vector)
        elif field == CommonCfg.DEVICE_STATUS:
            self._write_status(value)
        elif field == CommonCfg.QUEUE_SELECT:
            self.queue_select = value
        elif field in (
            CommonCfg.QUEUE_SIZE,
            CommonCfg.QUEUE_MSIX_VECTOR,
            CommonCfg.QUEUE_ENABLE,
            CommonCfg.QUEUE_DESC,
            CommonCfg.QUEUE_DRIVER,
            CommonCfg.QUEUE_DEVICE,
        ):
            self._write_queue_field(field, value)
        elif field == CommonCfg.QUEUE_RESET:
            self._write_queue_reset(value)
        # Read-only fields (device_feature, num_queues, config_generation,
        # queue_notify_off) ignore writes.

    def _write_driver_features(self, value: int) -> None:
        if self.status & DeviceStatus.FEATURES_OK:
            self._warn("driver features written after FEATURES_OK: ignored")
            return
        sel = self.driver_feature_select
        if sel > 1:
            return
        shift = 32 * sel
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    @property
    def ring_reset(self) -> bool:
        return bool(self.negotiated >> NetFeature.RING_RESET & 1)

    def _write_queue_reset(self, value: int) -> None:
        q = self._selected()
        if q is None or value != 1:
            return
        if not self.ring_reset or not self.driver_ok:
            self._warn("queue_reset written without VIRTIO_F_RING_RESET and DRIVER_OK: ignored")
            return
        index = self.queue_select
        self.backend.reset_queue(index)
        # Back to the default state (2.6.1): the driver may lay it out anew.
        self.queues[index] = QueueConfig(size=self.max_queue_size)
        log.debug("queue %d reset", index)

    def _write_queue_field(self, field: CommonCfg, value: int) -> None:
        q = self._selected()
        if q is None:
            return
        if self.driver_ok and (q.enabled or not self.ring_reset):
            # With RING_RESET a queue reset after DRIVER_OK takes a new layout
            # until it is enabled again.
            self._warn("queue %d configuration changed after DRIVER_OK: ignored", self.queue_select)
            return
        if field == CommonCfg.QUEUE_SIZE:
            q.size = value
        elif field == CommonCfg.QUEUE_MSIX_VECTOR:
            q.vector = value if value < self.num_vectors else NO_VECTOR
        elif field == CommonCfg.QUEUE_ENABLE:
            if value == 1:
                q.enabled = True
                if self.driver_ok:  # re-enabled after a queue reset
                    self.backend.enable_queue(
                        self.queue_select, q.size, q.desc, q.driver, q.device, q.vector
                    )
        elif field == CommonCfg.QUEUE_DESC:
            q.desc = value
        elif field == CommonCfg.QUEUE_DRIVER:
            q.driver = value
        elif field == CommonCfg.QUEUE_DEVICE:
            q.device = value

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.driver_resets += 1
            self.reset()
            return
        new = DeviceStatus(value & ~DeviceStatus.DEVICE_NEEDS_RESET)
        old = self.status
        if old & ~new:
            self._warn("driver cleared status bits %s without reset: ignored", old & ~new)
            new |= old
        newly_features_ok = new & DeviceStatus.FEATURES_OK and not old & DeviceStatus.FEATURES_OK
        if newly_features_ok and not self._features_acceptable():
            new &= ~DeviceStatus.FEATURES_OK
        if new & DeviceStatus.DRIVER_OK and not old & DeviceStatus.DRIVER_OK:
            if not new & DeviceStatus.FEATURES_OK:
                self._warn("DRIVER_OK without FEATURES_OK: ignored")
                new &= ~DeviceStatus.DRIVER_OK
            else:
                self.status = new
                self._start()
                return
        if new & DeviceStatus.FAILED and not old & DeviceStatus.FAILED:
            self._warn("driver reported FAILED")
        self.status = new

    def _features_acceptable(self) -> bool:
        extra = self.driver_features & ~self.offered
        if extra:
            self._warn(
                "FEATURES_OK refused: driver asked for features not offered: %s",
                ", ".join(feature_names(extra)),
            )
            return False
        if not self.driver_features >> NetFeature.VERSION_1 & 1:
            self._warn("FEATURES_OK refused: VERSION_1 not accepted (legacy drivers unsupported)")
            return False
        unmet = unmet_requirements(self.driver_features)
        if unmet:
            self._warn(
                "FEATURES_OK refused: %s",
                "; ".join(
                    f"{f.name} without {' or '.join(n.name for n in needs)}" for f, needs in unmet
                ),
            )
            return False
        log.info("features negotiated: %s", ", ".join(feature_names(self.driver_features)))
        return True

    def _start(self) -> None:
        for index, q in enumerate(self.queues):
            if q.enabled:
                self.backend.configure_queue(index, q.size, q.desc, q.driver, q.device, q.vector)
        if not self.backend.start_datapath(self.driver_features):
            log.error("device start failed: DEVICE_NEEDS_RESET")

    def reset(self) -> None:
        with self.lock:
            self.backend.reset()
            self._reset_state()

    def read_isr(self) -> int:
        with self.lock:
            # DEVICE_NEEDS_RESET is raised by the datapath with a config
            # interrupt; the ISR must show it as a configuration change too.
            if self.backend.needs_reset() and not self._needs_reset_signalled:
                self._needs_reset_signalled = True
                self.backend.raise_isr(ISR_CONFIG)
            return self.backend.take_isr()

    def config_changed(self) -> int:
        """Note a device configuration change; returns the vector to raise."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
            self.backend.raise_isr(ISR_CONFIG)
            return self.config_vector if self.driver_ok else NO_VECTOR
