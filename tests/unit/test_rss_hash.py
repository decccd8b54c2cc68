"""The datapath's Toeplitz hash and frame parsing against the standard RSS
verification vectors (IPv4 and IPv6, with and without ports)."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from vfiouser_net.native import ffi, lib

KEY = bytes.fromhex(
    "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa"
)
TYPES_ALL = 0x3F
TYPE_IPV4, TYPE_TCPV4, TYPE_IPV6, TYPE_TCPV6 = 1, 2, 8, 16
REPORT_IPV4, REPORT_TCPV4, REPORT_UDPV4, REPORT_IPV6, REPORT_TCPV6 = 1, 2, 3, 4, 5

# (destination, destination port, source, source port, hash IP only, hash with TCP)
IPV4_VECTORS = [
    ("161.142.100.80", 1766, "66.9.149.187", 2794, 0x323E8FC2, 0x51CCC178),
    ("65.69.140.83", 4739, "199.92.111.2", 14230, 0xD718262A, 0xC626B0EA),
    ("12.22.207.184", 38024, "24.19.198.95", 12898, 0xD2D0A5DE, 0x5C2B394A),
    ("209.142.163.6", 2217, "38.27.205.30", 48228, 0x82989176, 0xAFC7327F),
    ("202.188.127.2", 1303, "153.39.163.191", 44251, 0x5D1809C5, 0x10E828A2),
]
IPV6_VECTORS = [
    ("3ffe:2501:200:3::1", 1766, "3ffe:2501:200:1fff::7", 2794, 0x2CC18CD5, 0x40207D3D),
    ("ff02::1", 4739, "3ffe:501:8::260:97ff:fe40:efab", 14230, 0x0F0C461C, 0xDDE51BBF),
    (
        "fe80::200:f8ff:fe21:67cf",
        38024,
        "3ffe:1900:4545:3:200:f8ff:fe21:67cf",
        44251,
        0x4B61E985,
        0x02D1FEEF,
    ),
]


def toeplitz(data: bytes) -> int:
    return int(lib.vn_toeplitz(KEY, len(KEY), data, len(data)))


def frame(src: str, dst: str, sport: int, dport: int, proto: int = 6, vlan: bool = False) -> bytes:
    """An Ethernet frame with an IP header and the first bytes of TCP/UDP."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    l4 = struct.pack("!HH", sport, dport) + bytes(16)
    if s.version == 4:
        ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0)
        ip += s.packed + d.packed
        ethertype = 0x0800
    else:
        ip = struct.pack("!IHBB", 6 << 28, len(l4), proto, 64) + s.packed + d.packed
        ethertype = 0x86DD
    eth = bytes(12)
    if vlan:
        eth += struct.pack("!HH", 0x8100, 42)
    return eth + struct.pack("!H", ethertype) + ip + l4


def rss(raw: bytes, types: int) -> tuple[int, int]:
    t = ffi.new("struct vn_flow_tuple *")
    lib.vn_flow_parse(raw, len(raw), t)
    report = ffi.new("uint8_t *")
    h = lib.vn_rss_hash(t, types, KEY, len(KEY), report)
    return int(h), int(report[0])


@pytest.mark.parametrize("dst,dport,src,sport,ip_only,with_tcp", IPV4_VECTORS + IPV6_VECTORS)
def test_toeplitz_verification_vectors(
    dst: str, dport: int, src: str, sport: int, ip_only: int, with_tcp: int
) -> None:
    addrs = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
    ports = struct.pack("!HH", sport, dport)
    assert toeplitz(addrs) == ip_only
    assert toeplitz(addrs + ports) == with_tcp


@pytest.mark.parametrize("dst,dport,src,sport,ip_only,with_tcp", IPV4_VECTORS + IPV6_VECTORS)
def test_frames_hash_by_enabled_types(
    dst: str, dport: int, src: str, sport: int, ip_only: int, with_tcp: int
) -> None:
    v4 = ipaddress.ip_address(src).version == 4
    tcp_type, ip_type = (TYPE_TCPV4, TYPE_IPV4) if v4 else (TYPE_TCPV6, TYPE_IPV6)
    raw = frame(src, dst, sport, dport)
    assert rss(raw, TYPES_ALL) == (with_tcp, REPORT_TCPV4 if v4 else REPORT_TCPV6)
    assert rss(raw, ip_type) == (ip_only, REPORT_IPV4 if v4 else REPORT_IPV6)
    assert rss(frame(src, dst, sport, dport, vlan=True), tcp_type)[0] == with_tcp
    # Neither type enabled: unclassified.
    assert rss(raw, 0) == (0, 0)


def test_udp_and_fragments() -> None:
    raw = frame("66.9.149.187", "161.142.100.80", 2794, 1766, proto=17)
    assert rss(raw, TYPES_ALL) == (0x51CCC178, REPORT_UDPV4)
    # A fragment carries no usable ports: IP hash only.
    frag = bytearray(raw)
    frag[14 + 6] = 0x20  # more fragments
    assert rss(bytes(frag), TYPES_ALL) == (0x323E8FC2, REPORT_IPV4)


def test_truncated_and_foreign_frames_are_unclassified() -> None:
    raw = frame("66.9.149.187", "161.142.100.80", 2794, 1766)
    for cut in (0, 13, 14, 20, 33):
        assert rss(raw[:cut], TYPES_ALL) == (0, 0)
    # Ports cut off: IP hash.
    assert rss(raw[: 14 + 20 + 2], TYPES_ALL) == (0x323E8FC2, REPORT_IPV4)
    arp = bytes(12) + b"\x08\x06" + bytes(28)
    assert rss(arp, TYPES_ALL) == (0, 0)
