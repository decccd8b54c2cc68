"""UDP segmentation offload (HOST_USO, GUEST_USO4), through a real TAP.

Guest to host: one 3000-byte UDP payload with gso_type UDP_L4 and gso_size
1000 leaves the device as one frame; the host kernel cuts it into three
datagrams that a UDP socket in the namespace receives. Host to guest: a
socket with UDP_SEGMENT sends 3000 bytes; the TAP (TUN_F_USO4) hands the
device one frame, which reaches the driver whole, marked UDP_L4 with its
segment size.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import textwrap

from vfiouser_net_harness.virtio_pci_driver import NetHdr, bit

from tests.protocol.support import GUEST_FEATURES, GUEST_MAC, DeviceEnv, open_session

VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_GUEST_USO4 = 54
VIRTIO_NET_F_GUEST_USO6 = 55
VIRTIO_NET_F_HOST_USO = 56
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
SEGMENT = 1000
PAYLOAD = 3000
PORT = 5999
GUEST_IP = "10.201.{n}.50"

# A UDP socket in the namespace: prints the sizes of the datagrams it gets.
RECEIVER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(sys.argv[1])))
    s.settimeout(5)
    print("ready", flush=True)
    sizes = []
    try:
        while sum(sizes) < int(sys.argv[2]):
            sizes.append(len(s.recv(65536)))
    except socket.timeout:
        pass
    print(" ".join(map(str, sizes)), flush=True)
    """
)
SENDER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_UDP, 103, int(sys.argv[3]))  # UDP_SEGMENT
    s.sendto(b"u" * int(sys.argv[4]), (sys.argv[1], int(sys.argv[2])))
    """
)


def _csum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def udp_frame(src_mac: bytes, dst_mac: bytes, src: str, dst: str, payload: bytes) -> bytes:
    """IPv4/UDP with the UDP checksum holding the pseudo-header sum only
    (CHECKSUM_PARTIAL, as a driver hands it with NEEDS_CSUM)."""
    udp_len = 8 + len(payload)
    sa, da = socket.inet_aton(src), socket.inet_aton(dst)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0x4000, 64, 17, 0, sa, da)
    ip = ip[:10] + struct.pack("!H", ~_csum16(ip) & 0xFFFF) + ip[12:]
    pseudo = _csum16(sa + da + struct.pack("!BBH", 0, 17, udp_len))
    udp = struct.pack("!HHHH", 40000, PORT, udp_len, pseudo)
    return dst_mac + src_mac + b"\x08\x00" + ip + udp + payload


def test_udp_segmentation_offload_both_ways(env: DeviceEnv) -> None:
    features = GUEST_FEATURES | bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM)
    features |= bit(VIRTIO_NET_F_HOST_USO) | bit(VIRTIO_NET_F_GUEST_USO4)
    features |= bit(VIRTIO_NET_F_GUEST_USO6)
    s = open_session(env, features=features)
    try:
        drv = s.driver
        drv.bring_up()
        if tuple(int(x) for x in os.uname().release.split(".")[:2]) < (6, 2):
            # The host kernel's TAP has no USO before Linux 6.2: not offered.
            assert not drv.has(VIRTIO_NET_F_HOST_USO) and not drv.has(VIRTIO_NET_F_GUEST_USO4)
            return
        assert drv.has(VIRTIO_NET_F_HOST_USO) and drv.has(VIRTIO_NET_F_GUEST_USO4)
        # The TAP segments UDP for the guest no more: the device does not.
        offloads = env.ns.run(["ethtool", "-k", env.tap.name]).stdout
        assert "tx-udp-segmentation: on" in offloads, offloads
        ns = env.ns
        host = ns.host_addr
        guest_ip = GUEST_IP.format(n=ns.index)
        tap_mac = bytes.fromhex(
            ns.run(["cat", f"/sys/class/net/{env.tap.name}/address"])
            .stdout.strip()
            .replace(":", "")
        )

        # Guest to host: one GSO frame, three datagrams at the socket.
        recv = subprocess.Popen(
            ns.exec_argv([sys.executable, "-c", RECEIVER, str(PORT), str(PAYLOAD)]),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert recv.stdout is not None and recv.stdout.readline().strip() == "ready"
            frame = udp_frame(GUEST_MAC, tap_mac, guest_ip, host, b"g" * PAYLOAD)
            hdr = NetHdr(
                flags=VIRTIO_NET_HDR_F_NEEDS_CSUM,
                gso_type=VIRTIO_NET_HDR_GSO_UDP_L4,
                hdr_len=42,
                gso_size=SEGMENT,
                csum_start=34,
                csum_offset=6,
            )
            drv.send_packet(frame, hdr)
            out, _ = recv.communicate(timeout=15)
        finally:
            if recv.poll() is None:
                recv.kill()
        sizes = [int(x) for x in out.split()]
        assert sizes == [SEGMENT] * (PAYLOAD // SEGMENT), sizes

        # Host to guest: UDP_SEGMENT on the host, one UDP_L4 frame in the ring.
        ns.run(["ip", "neigh", "replace", guest_ip, "lladdr", GUEST_MAC.hex(":"), "dev",
                env.tap.name])  # fmt: skip
        ns.run([sys.executable, "-c", SENDER, guest_ip, str(PORT), str(SEGMENT), str(PAYLOAD)])
        while True:
            raw, got = drv.recv_packet(timeout=5)
            if got[12:14] == b"\x08\x00" and got[23] == 17:
                break
        h = NetHdr.unpack(raw)
        assert h.gso_type == VIRTIO_NET_HDR_GSO_UDP_L4, h
        assert h.gso_size == SEGMENT, h
        assert len(got) == 14 + 20 + 8 + PAYLOAD, len(got)
        env.assert_alive()
    finally:
        s.close()
