"""The virtio-net device configuration structure (virtio 1.x 5.1.4)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vfiouser_net.virtio_spec import DUPLEX_FULL, NetStatus

# mac[6], status le16, max_virtqueue_pairs le16, mtu le16, speed le32, duplex u8,
# rss_max_key_size u8, rss_max_indirection_table_length le16, supported_hash_types le32
_LAYOUT = struct.Struct("<6sHHHIBBHI")
NET_CONFIG_SIZE = _LAYOUT.size


@dataclass
class NetConfig:
    mac: bytes
    mtu: int
    max_queue_pairs: int
    speed_mbps: int
    link_up: bool = True
    announce: bool = False
    rss_max_key_size: int = 0
    rss_max_table_len: int = 0
    supported_hash_types: int = 0

    def pack(self) -> bytes:
        status = NetStatus(0)
        if self.link_up:
            status |= NetStatus.LINK_UP
        if self.announce:
            status |= NetStatus.ANNOUNCE
        return _LAYOUT.pack(
            self.mac,
            int(status),
            self.max_queue_pairs,
            self.mtu,
            self.speed_mbps,
            DUPLEX_FULL,
            self.rss_max_key_size,
            self.rss_max_table_len,
            self.supported_hash_types,
        )
