"""Capability and configuration byte layouts against the virtio spec."""

from __future__ import annotations

import struct

import pytest

from vfiouser_net import pci_config
from vfiouser_net.cli import build_parser, default_mac
from vfiouser_net.device_options import DeviceError, DeviceOptions, parse_mac
from vfiouser_net.net_config import NET_CONFIG_SIZE, NetConfig


def test_virtio_cap_layout() -> None:
    cap = pci_config.virtio_cap(cfg_type=1, bar=0, offset=0x1000, length=0x38)
    assert len(cap) == 16
    vndr, _next, cap_len, cfg_type, bar, _id = struct.unpack_from("<BBBBBB", cap)
    assert (vndr, cap_len, cfg_type, bar) == (0x09, 16, 1, 0)
    assert struct.unpack_from("<II", cap, 8) == (0x1000, 0x38)


def test_notify_cap_has_multiplier_and_length_20() -> None:
    cap = pci_config.virtio_notify_cap(bar=0, offset=0x3000, length=0x1000, multiplier=4)
    assert len(cap) == 20 and cap[2] == 20 and cap[3] == 2
    assert struct.unpack_from("<I", cap, 16) == (4,)


def test_msix_cap() -> None:
    cap = pci_config.msix_cap(nvectors=4, bar=4, table_off=0, pba_off=0x800)
    assert cap[0] == 0x11
    ctrl, table, pba = struct.unpack_from("<HII", cap, 2)
    assert ctrl == 3 and table == 4 and pba == 0x804
    with pytest.raises(ValueError):
        pci_config.msix_cap(0, 4, 0, 0x800)


def test_net_config_layout() -> None:
    cfg = NetConfig(
        mac=bytes.fromhex("525400123456"), mtu=1400, max_queue_pairs=1, speed_mbps=10000
    )
    raw = cfg.pack()
    assert len(raw) == NET_CONFIG_SIZE == 24
    assert raw[:6] == bytes.fromhex("525400123456")
    status, pairs, mtu, speed, duplex = struct.unpack_from("<HHHIB", raw, 6)
    assert (status, pairs, mtu, speed, duplex) == (1, 1, 1400, 10000, 1)
    cfg.link_up = False
    cfg.announce = True
    assert struct.unpack_from("<H", cfg.pack(), 6) == (2,)


def test_parse_mac() -> None:
    assert parse_mac("52:54:00:AA:bb:01") == bytes.fromhex("525400aabb01")
    for bad in ("52:54:00:aa:bb", "zz:54:00:aa:bb:01", "525400aabb01", "5:54:00:aa:bb:01"):
        with pytest.raises(DeviceError):
            parse_mac(bad)


def test_options_validation() -> None:
    ok = DeviceOptions(socket_path="/tmp/x", tap="t", mac=bytes.fromhex("525400000001"))
    ok.validate()
    for kwargs in (
        {"mac": bytes.fromhex("010000000001")},
        {"mtu": 20},
        {"queue_size": 100},
        {"queue_size": 8192},
        {"queue_pairs": 0},
    ):
        opts = DeviceOptions(socket_path="/tmp/x", tap="t", mac=bytes.fromhex("525400000001"))
        for k, v in kwargs.items():
            setattr(opts, k, v)
        with pytest.raises(DeviceError):
            opts.validate()


def test_default_mac_is_stable_and_local() -> None:
    mac = default_mac("/run/vm1.sock")
    assert mac == default_mac("/run/vm1.sock") != default_mac("/run/vm2.sock")
    assert mac[0] & 0x02 and not mac[0] & 0x01


def test_cli_rejects_bad_numbers() -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--socket-path", "/x", "--tap", "t", "--mtu", "abc"])
    args = parser.parse_args(["serve", "--socket-path", "/x", "--tap", "t"])
    assert args.mtu == 1500 and args.queue_size == 256
