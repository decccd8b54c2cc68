"""atheris target: the guest's BAR0 accesses that Python handles.

vfiouser_net.bar0.Bar0.access (common configuration through
the VirtioPciTransport state machine, ISR, the virtio-net device
configuration of net_config.py) gets what server.c's bar0_access passes on:
any offset outside the notify area, 1 to 8 bytes, any value. The transport's
backend is a checker in place of the datapath; the device's MAC and
announce state come from a real C device (vn_dev_new), no TAP, no
vfio-user context.

Input: operations to the end, each one byte `op` and then:
    op % 8 in 0..3  read:  le16 where, size 1 + (op >> 3) % 8
    op % 8 in 4..5  write: le16 where, size 1 + (op >> 3) % 8, the value
    op % 8 == 6     the host changes the configuration (link, announce)
    op % 8 == 7     bit 3: the datapath breaks (DEVICE_NEEDS_RESET) or
                    recovers; bit 4: the client resets the device (FLR)
`where`: bits 14-15 pick common config (bits 0-5), ISR (0-1), device
config (0-7), or anywhere in BAR0 (0-13).

Checked after every access: no exception; a read fills its buffer; the
status never has DRIVER_OK without FEATURES_OK, nor FEATURES_OK with
features that were not offered or without VERSION_1; the datapath starts
once per DRIVER_OK with the negotiated features and the enabled queues,
whose configuration no write changes until the next reset; vectors are
valid or NO_VECTOR; a status write of 0 resets everything.

    python tests/fuzz/fuzz_bar0.py [libFuzzer flags] CORPUS_DIR
"""

from __future__ import annotations

import logging
import struct
import sys
from typing import Any

import atheris

with atheris.instrument_imports(include=["vfiouser_net"]):
    from vfiouser_net import device as devmod
    from vfiouser_net.bar0 import Bar0
    from vfiouser_net.native import ffi, lib
    from vfiouser_net.net_config import NetConfig
    from vfiouser_net.virtio_pci import NO_VECTOR, QueueConfig, VirtioPciTransport
    from vfiouser_net.virtio_spec import CommonCfg, DeviceStatus, NetFeature

MAX_QPS = 2
NUM_QUEUES = 2 * MAX_QPS + 1
NUM_VECTORS = NUM_QUEUES + 1
QUEUE_SIZE = 256
OFFERED = devmod.OFFERED_FEATURES | devmod.MULTIQUEUE_FEATURES
MAC = bytes([0x52, 0x54, 0x00, 0xAB, 0xCD, 0xEF])
NOTIFY = (lib.VN_NOTIFY_OFF, lib.VN_NOTIFY_OFF + lib.VN_NOTIFY_LEN)


class CheckingBackend:
    """The datapath as the transport sees it, checking what it is asked."""

    def __init__(self) -> None:
        self.transport: VirtioPciTransport | None = None
        self.configured: dict[int, tuple[int, int, int, int, int]] = {}
        self.starts = 0
        self.resets = 0
        self.broken = False
        self.config_vector = NO_VECTOR
        self.isr_bits = 0

    def configure_queue(
        self, index: int, size: int, desc: int, driver: int, device: int, vector: int
    ) -> None:
        t = self.transport
        assert t is not None
        assert 0 <= index < NUM_QUEUES, index
        assert 0 <= size <= 0xFFFF, size
        assert vector < NUM_VECTORS or vector == NO_VECTOR, vector
        for addr in (desc, driver, device):
            assert 0 <= addr < 1 << 64
        assert t.queues[index].enabled
        self.configured[index] = (size, desc, driver, device, vector)

    def start_datapath(self, features: int) -> bool:
        t = self.transport
        assert t is not None
        assert features & ~OFFERED == 0, hex(features)
        assert features >> NetFeature.VERSION_1 & 1
        assert t.status & DeviceStatus.FEATURES_OK and t.status & DeviceStatus.DRIVER_OK
        assert features == t.driver_features
        assert set(self.configured) == {i for i, q in enumerate(t.queues) if q.enabled}
        self.starts += 1
        return not self.broken

    def reset(self) -> None:
        self.resets += 1
        self.configured.clear()
        self.broken = False
        self.isr_bits = 0

    def set_config_vector(self, vector: int) -> None:
        assert vector < NUM_VECTORS or vector == NO_VECTOR, vector
        self.config_vector = vector

    def needs_reset(self) -> bool:
        return self.broken

    def reset_queue(self, index: int) -> None:
        assert self.transport is not None and self.transport.driver_ok, "reset before DRIVER_OK"
        assert index < NUM_QUEUES, index
        self.configured.pop(index, None)

    def enable_queue(
        self, index: int, size: int, desc: int, driver: int, device: int, vector: int
    ) -> None:
        assert self.transport is not None and self.transport.driver_ok
        assert vector < NUM_VECTORS or vector == NO_VECTOR, vector
        self.configured[index] = (size, desc, driver, device, vector)

    def raise_isr(self, bits: int) -> None:
        self.isr_bits |= bits

    def take_isr(self) -> int:
        bits, self.isr_bits = self.isr_bits, 0
        return bits


def make_bar0() -> tuple[Bar0, Any, CheckingBackend]:
    """BAR0 as a device has it, over a real C device (no TAP, no context)."""
    config = NetConfig(
        mac=MAC,
        mtu=1500,
        max_queue_pairs=MAX_QPS,
        speed_mbps=10000,
        rss_max_key_size=lib.VN_RSS_MAX_KEY_SIZE,
        rss_max_table_len=lib.VN_RSS_MAX_TABLE,
        supported_hash_types=lib.VN_HASH_TYPES_SUPPORTED,
    )
    dp = lib.vn_dev_new(MAX_QPS, MAC, 1500)
    assert dp != ffi.NULL
    backend = CheckingBackend()
    transport = VirtioPciTransport(OFFERED, NUM_QUEUES, QUEUE_SIZE, NUM_VECTORS, backend)
    backend.transport = transport
    return Bar0("fuzz", dp, transport, config), dp, backend


DEV, DP, BACKEND = make_bar0()


def access(where: int, size: int) -> int | None:
    """The BAR0 offset for `where`, or None when bar0_access refuses it."""
    region = where >> 14
    if region == 0:
        off = lib.VN_COMMON_CFG_OFF + (where & 0x3F)
    elif region == 1:
        off = lib.VN_ISR_OFF + (where & 3)
    elif region == 2:
        off = lib.VN_DEVICE_CFG_OFF + (where & 0xFF)
    else:
        off = where & 0x3FFF
    if off + size > lib.VN_BAR0_SIZE or NOTIFY[0] <= off < NOTIFY[1]:
        return None
    return int(off)


def queues_of(t: VirtioPciTransport) -> list[tuple[int, int, bool, int, int, int]]:
    return [(q.size, q.vector, q.enabled, q.desc, q.driver, q.device) for q in t.queues]


def check_state(t: VirtioPciTransport, frozen: list[Any] | None) -> None:
    s = t.status
    assert not s & DeviceStatus.DEVICE_NEEDS_RESET
    if s & DeviceStatus.DRIVER_OK:
        assert s & DeviceStatus.FEATURES_OK
    if s & DeviceStatus.FEATURES_OK:
        assert t.driver_features & ~OFFERED == 0
        assert t.driver_features >> NetFeature.VERSION_1 & 1
    assert t.negotiated & ~OFFERED == 0
    assert t.config_vector < NUM_VECTORS or t.config_vector == NO_VECTOR
    assert len(t.queues) == NUM_QUEUES
    for q in t.queues:
        assert q.vector < NUM_VECTORS or q.vector == NO_VECTOR
    if frozen is not None:
        assert queues_of(t) == frozen, "queue configuration changed after DRIVER_OK"


def do_read(off: int, size: int) -> bytes:
    buf = ffi.new("uint8_t[]", size)
    for i in range(size):
        buf[i] = 0xA5
    assert DEV.access(off, buf, size, False) == 0
    return bytes(ffi.buffer(buf, size))


def do_write(off: int, value: bytes) -> None:
    buf = ffi.new("uint8_t[]", value)
    assert DEV.access(off, buf, len(value), True) == 0


def test_one_input(data: bytes) -> None:
    t = DEV.transport
    t.reset()
    BACKEND.broken = False
    BACKEND.starts = BACKEND.resets = 0
    lib.vn_dev_set_announce(DP, False)
    fdp = atheris.FuzzedDataProvider(data)
    frozen: list[Any] | None = None
    while fdp.remaining_bytes() > 0:
        op = fdp.ConsumeInt(1)
        kind = op % 8
        size = 1 + (op >> 3) % 8
        if kind <= 5:
            off = access(fdp.ConsumeInt(2), size)
            value = fdp.ConsumeBytes(size) if kind >= 4 else b""
            if off is None or len(value) < (size if kind >= 4 else 0):
                continue
            was_ok = t.driver_ok
            starts = BACKEND.starts
            if kind <= 3:
                got = do_read(off, size)
                assert len(got) == size
                if off == CommonCfg.DEVICE_STATUS and size == 1:
                    assert got[0] == int(t.device_status()) & 0xFF
                if off == CommonCfg.QUEUE_SELECT and size == 2:
                    assert struct.unpack("<H", got)[0] == t.queue_select
                if off >= lib.VN_DEVICE_CFG_OFF and off + size <= lib.VN_DEVICE_CFG_OFF + 6:
                    rel = off - lib.VN_DEVICE_CFG_OFF
                    assert got == MAC[rel : rel + size]
            else:
                do_write(off, value)
                # A write whose last field is device_status (config_generation
                # after it is read-only); a wider one also writes queue_select
                # and the queue fields after the reset.
                status_write = off <= CommonCfg.DEVICE_STATUS < off + size <= CommonCfg.QUEUE_SELECT
                if status_write and value[CommonCfg.DEVICE_STATUS - off] == 0:
                    assert t.status == 0 and not t.driver_ok
                    assert all(q == QueueConfig(size=QUEUE_SIZE) for q in t.queues), (
                        "reset left queue state"
                    )
            if t.driver_ok and not was_ok:
                assert BACKEND.starts == starts + 1
                frozen = queues_of(t)
            elif not t.driver_ok:
                frozen = None
                assert BACKEND.starts == starts
        elif kind == 6:
            lib.vn_dev_set_announce(DP, bool(op & 8))
            vector = t.config_changed()
            assert vector == NO_VECTOR or (t.driver_ok and vector == t.config_vector)
        else:
            if op & 8:
                BACKEND.broken = not BACKEND.broken
            if op & 16:
                t.reset()
                frozen = None
            isr = t.read_isr()
            assert 0 <= isr <= 3
        check_state(t, frozen)


def main() -> None:
    logging.disable(logging.CRITICAL)  # the control plane's warnings, per input
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
