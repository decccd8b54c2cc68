"""The common-configuration state machine against a recording fake backend."""

from __future__ import annotations

import struct

from vfiouser_net.virtio_pci import NO_VECTOR, VirtioPciTransport
from vfiouser_net.virtio_spec import CommonCfg, DeviceStatus, NetFeature, feature_mask

OFFERED = feature_mask(NetFeature.VERSION_1, NetFeature.MAC, NetFeature.CTRL_VQ)
ACK_DRIVER = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER


class FakeBackend:
    def __init__(self, start_ok: bool = True) -> None:
        self.queues: dict[int, tuple[int, int, int, int, int]] = {}
        self.started: list[int] = []
        self.resets = 0
        self.config_vector = NO_VECTOR
        self.start_ok = start_ok
        self.broken = False
        self.isr_bits = 0
        self.queue_resets: list[int] = []

    def configure_queue(
        self, index: int, size: int, desc: int, driver: int, device: int, vector: int
    ) -> None:
        self.queues[index] = (size, desc, driver, device, vector)

    def start_datapath(self, features: int) -> bool:
        self.started.append(features)
        if not self.start_ok:
            self.broken = True
        return self.start_ok

    def reset(self) -> None:
        self.resets += 1
        self.broken = False
        self.isr_bits = 0

    def set_config_vector(self, vector: int) -> None:
        self.config_vector = vector

    def reset_queue(self, index: int) -> None:
        self.queue_resets.append(index)
        self.queues.pop(index, None)

    def enable_queue(
        self, index: int, size: int, desc: int, driver: int, device: int, vector: int
    ) -> None:
        self.queues[index] = (size, desc, driver, device, vector)

    def raise_isr(self, bits: int) -> None:
        self.isr_bits |= bits

    def take_isr(self) -> int:
        bits, self.isr_bits = self.isr_bits, 0
        return bits

    def needs_reset(self) -> bool:
        return self.broken


def make(backend: FakeBackend | None = None) -> tuple[VirtioPciTransport, FakeBackend]:
    be = backend or FakeBackend()
    return VirtioPciTransport(
        OFFERED, num_queues=3, max_queue_size=256, num_vectors=4, backend=be
    ), be


def w(t: VirtioPciTransport, field: CommonCfg, fmt: str, value: int) -> None:
    t.write(field, struct.pack("<" + fmt, value))


def r(t: VirtioPciTransport, field: CommonCfg, fmt: str) -> int:
    return int(struct.unpack("<" + fmt, t.read(field, struct.calcsize(fmt)))[0])


def negotiate(t: VirtioPciTransport, features: int) -> int:
    w(t, CommonCfg.DEVICE_STATUS, "B", DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
    for sel in (0, 1):
        w(t, CommonCfg.DRIVER_FEATURE_SELECT, "I", sel)
        w(t, CommonCfg.DRIVER_FEATURE, "I", (features >> (32 * sel)) & 0xFFFFFFFF)
    w(
        t,
        CommonCfg.DEVICE_STATUS,
        "B",
        DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK,
    )
    return r(t, CommonCfg.DEVICE_STATUS, "B")


def test_device_features_by_select() -> None:
    t, _ = make()
    w(t, CommonCfg.DEVICE_FEATURE_SELECT, "I", 0)
    lo = r(t, CommonCfg.DEVICE_FEATURE, "I")
    w(t, CommonCfg.DEVICE_FEATURE_SELECT, "I", 1)
    hi = r(t, CommonCfg.DEVICE_FEATURE, "I")
    w(t, CommonCfg.DEVICE_FEATURE_SELECT, "I", 7)
    assert r(t, CommonCfg.DEVICE_FEATURE, "I") == 0
    assert lo | hi << 32 == OFFERED
    assert r(t, CommonCfg.NUM_QUEUES, "H") == 3


def test_features_ok_refused_for_unoffered_feature() -> None:
    t, _ = make()
    status = negotiate(t, OFFERED | 1 << NetFeature.MQ)
    assert not status & DeviceStatus.FEATURES_OK
    assert t.negotiated == 0


def test_features_ok_refused_without_version_1() -> None:
    t, _ = make()
    status = negotiate(t, 1 << NetFeature.MAC)
    assert not status & DeviceStatus.FEATURES_OK


def test_features_ok_refused_for_an_invalid_subset() -> None:
    """5.1.3.1 dependencies (2.2.2: an invalid subset MUST fail FEATURES_OK),
    and every valid subset of these accepted."""
    offered = feature_mask(
        NetFeature.VERSION_1, NetFeature.CSUM, NetFeature.GUEST_CSUM, NetFeature.GUEST_TSO4,
        NetFeature.HOST_TSO4, NetFeature.CTRL_VQ, NetFeature.CTRL_RX, NetFeature.MQ,
    )  # fmt: skip
    be = FakeBackend()
    for without, feature in (
        (NetFeature.GUEST_CSUM, NetFeature.GUEST_TSO4),
        (NetFeature.CSUM, NetFeature.HOST_TSO4),
        (NetFeature.CTRL_VQ, NetFeature.CTRL_RX),
        (NetFeature.CTRL_VQ, NetFeature.MQ),
    ):
        t = VirtioPciTransport(offered, num_queues=3, max_queue_size=256, num_vectors=4, backend=be)
        status = negotiate(t, offered & ~(1 << without))
        assert not status & DeviceStatus.FEATURES_OK, (feature.name, without.name)
        t = VirtioPciTransport(offered, num_queues=3, max_queue_size=256, num_vectors=4, backend=be)
        valid = offered & ~(1 << without) & ~(1 << feature)
        if without == NetFeature.CTRL_VQ:
            valid &= ~feature_mask(NetFeature.CTRL_RX, NetFeature.MQ)
        assert negotiate(t, valid) & DeviceStatus.FEATURES_OK, (feature.name, without.name)


def test_features_frozen_after_features_ok() -> None:
    t, _ = make()
    assert negotiate(t, OFFERED) & DeviceStatus.FEATURES_OK
    w(t, CommonCfg.DRIVER_FEATURE_SELECT, "I", 0)
    w(t, CommonCfg.DRIVER_FEATURE, "I", 0)
    assert t.negotiated == OFFERED


def test_queue_setup_with_split_64bit_writes_and_driver_ok() -> None:
    t, be = make()
    negotiate(t, OFFERED)
    w(t, CommonCfg.QUEUE_SELECT, "H", 1)
    assert r(t, CommonCfg.QUEUE_SIZE, "H") == 256
    assert r(t, CommonCfg.QUEUE_NOTIFY_OFF, "H") == 1
    w(t, CommonCfg.QUEUE_SIZE, "H", 128)
    w(t, CommonCfg.QUEUE_MSIX_VECTOR, "H", 2)
    # 64-bit fields written as two 32-bit halves, as Linux does.
    t.write(CommonCfg.QUEUE_DESC, struct.pack("<I", 0x1000))
    t.write(CommonCfg.QUEUE_DESC + 4, struct.pack("<I", 0x1))
    w(t, CommonCfg.QUEUE_DRIVER, "Q", 0x2000)
    w(t, CommonCfg.QUEUE_DEVICE, "Q", 0x3000)
    w(t, CommonCfg.QUEUE_ENABLE, "H", 1)
    assert r(t, CommonCfg.QUEUE_DESC, "Q") == 0x1_0000_1000
    w(t, CommonCfg.DEVICE_STATUS, "B", 0x0F)
    assert be.started == [OFFERED]
    assert be.queues == {1: (128, 0x1_0000_1000, 0x2000, 0x3000, 2)}
    assert r(t, CommonCfg.DEVICE_STATUS, "B") == 0x0F


def test_vector_out_of_range_reads_back_no_vector() -> None:
    t, be = make()
    w(t, CommonCfg.CONFIG_MSIX_VECTOR, "H", 9)
    assert r(t, CommonCfg.CONFIG_MSIX_VECTOR, "H") == NO_VECTOR
    w(t, CommonCfg.CONFIG_MSIX_VECTOR, "H", 0)
    assert be.config_vector == 0
    w(t, CommonCfg.QUEUE_SELECT, "H", 0)
    w(t, CommonCfg.QUEUE_MSIX_VECTOR, "H", 4)
    assert r(t, CommonCfg.QUEUE_MSIX_VECTOR, "H") == NO_VECTOR


def test_queue_select_past_the_end_reads_zero_and_ignores_writes() -> None:
    t, _be = make()
    w(t, CommonCfg.QUEUE_SELECT, "H", 3)
    assert r(t, CommonCfg.QUEUE_SIZE, "H") == 0
    w(t, CommonCfg.QUEUE_ENABLE, "H", 1)
    w(t, CommonCfg.QUEUE_SELECT, "H", 0)
    assert r(t, CommonCfg.QUEUE_ENABLE, "H") == 0


def test_driver_ok_without_features_ok_is_ignored() -> None:
    t, be = make()
    w(
        t,
        CommonCfg.DEVICE_STATUS,
        "B",
        DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.DRIVER_OK,
    )
    assert not r(t, CommonCfg.DEVICE_STATUS, "B") & DeviceStatus.DRIVER_OK
    assert be.started == []


def test_failed_start_shows_needs_reset_and_reset_clears_everything() -> None:
    t, be = make(FakeBackend(start_ok=False))
    negotiate(t, OFFERED)
    w(t, CommonCfg.QUEUE_SELECT, "H", 0)
    w(t, CommonCfg.QUEUE_ENABLE, "H", 1)
    w(t, CommonCfg.DEVICE_STATUS, "B", 0x0F)
    assert r(t, CommonCfg.DEVICE_STATUS, "B") & DeviceStatus.DEVICE_NEEDS_RESET
    w(t, CommonCfg.DEVICE_STATUS, "B", 0)
    assert be.resets == 1
    assert r(t, CommonCfg.DEVICE_STATUS, "B") == 0
    w(t, CommonCfg.QUEUE_SELECT, "H", 0)
    assert r(t, CommonCfg.QUEUE_ENABLE, "H") == 0
    assert t.negotiated == 0


def test_queue_config_after_driver_ok_is_ignored() -> None:
    t, _be = make()
    negotiate(t, OFFERED)
    w(t, CommonCfg.DEVICE_STATUS, "B", 0x0F)
    w(t, CommonCfg.QUEUE_SELECT, "H", 0)
    w(t, CommonCfg.QUEUE_SIZE, "H", 16)
    assert r(t, CommonCfg.QUEUE_SIZE, "H") == 256


def test_config_change_bumps_generation_and_isr() -> None:
    t, _ = make()
    w(t, CommonCfg.CONFIG_MSIX_VECTOR, "H", 0)
    assert t.config_changed() == NO_VECTOR  # driver not ready yet
    negotiate(t, OFFERED)
    w(t, CommonCfg.DEVICE_STATUS, "B", 0x0F)
    gen = r(t, CommonCfg.CONFIG_GENERATION, "B")
    assert t.config_changed() == 0
    assert r(t, CommonCfg.CONFIG_GENERATION, "B") == (gen + 1) & 0xFF
    assert t.read_isr() == 2
    assert t.read_isr() == 0


def test_out_of_range_access_is_harmless() -> None:
    t, _ = make()
    assert t.read(0x36, 4) == bytes(4)
    t.write(0x37, b"\xff\xff")
    assert r(t, CommonCfg.DEVICE_STATUS, "B") == 0


def test_queue_reset_and_reenable_after_driver_ok() -> None:
    """VIRTIO_F_RING_RESET (2.6.1, 4.1.4.3.1): after DRIVER_OK the driver resets
    one queue, lays it out anew (a new size) and enables it again; without the
    feature the same writes are ignored."""
    offered = OFFERED | 1 << NetFeature.RING_RESET
    for negotiated in (offered, OFFERED):
        be = FakeBackend()
        t = VirtioPciTransport(offered, num_queues=3, max_queue_size=256, num_vectors=4, backend=be)
        assert negotiate(t, negotiated) & DeviceStatus.FEATURES_OK
        w(t, CommonCfg.QUEUE_SELECT, "H", 1)
        w(t, CommonCfg.QUEUE_DESC, "Q", 0x10000)
        w(t, CommonCfg.QUEUE_ENABLE, "H", 1)
        w(t, CommonCfg.DEVICE_STATUS, "B", ACK_DRIVER | DeviceStatus.FEATURES_OK
          | DeviceStatus.DRIVER_OK)  # fmt: skip
        assert be.queues[1][1] == 0x10000
        w(t, CommonCfg.QUEUE_RESET, "H", 1)
        if negotiated == OFFERED:
            assert be.queue_resets == [] and r(t, CommonCfg.QUEUE_ENABLE, "H") == 1
            continue
        assert be.queue_resets == [1]
        # Done at once: queue_reset and queue_enable read 0, the layout is the default.
        assert r(t, CommonCfg.QUEUE_RESET, "H") == 0
        assert r(t, CommonCfg.QUEUE_ENABLE, "H") == 0
        assert r(t, CommonCfg.QUEUE_SIZE, "H") == 256
        assert r(t, CommonCfg.QUEUE_MSIX_VECTOR, "H") == NO_VECTOR
        w(t, CommonCfg.QUEUE_SIZE, "H", 64)
        w(t, CommonCfg.QUEUE_DESC, "Q", 0x20000)
        w(t, CommonCfg.QUEUE_MSIX_VECTOR, "H", 2)
        w(t, CommonCfg.QUEUE_ENABLE, "H", 1)
        assert be.queues[1] == (64, 0x20000, 0, 0, 2)
        assert r(t, CommonCfg.QUEUE_ENABLE, "H") == 1
        # An enabled queue's layout stays fixed.
        w(t, CommonCfg.QUEUE_SIZE, "H", 32)
        assert r(t, CommonCfg.QUEUE_SIZE, "H") == 64
