"""BAR0 accesses the datapath hands to Python: the virtio common
configuration (the transport, virtio_pci.py), the ISR status and the
virtio-net device configuration (net_config.py). The doorbells, the steering
state and MSI-X are answered in C (server.c) and never come here.

Runs on the context thread, from the datapath's bar_access hook; offsets and
lengths were checked against BAR0 there.
"""

from __future__ import annotations

import logging
from typing import Any

from vfiouser_net.native import ffi, lib
from vfiouser_net.net_config import NetConfig
from vfiouser_net.virtio_pci import VirtioPciTransport

log = logging.getLogger(__name__)


class Bar0:
    def __init__(self, name: str, dev: Any, transport: VirtioPciTransport, config: NetConfig):
        self.name = name
        self._dev = dev
        self.transport = transport
        self.config = config

    def access(self, offset: int, buf: Any, count: int, is_write: bool) -> int:
        """Read into or write from buf (count bytes at offset); 0."""
        if lib.VN_COMMON_CFG_OFF <= offset < lib.VN_COMMON_CFG_OFF + lib.VN_COMMON_CFG_LEN:
            rel = offset - lib.VN_COMMON_CFG_OFF
            if is_write:
                self.transport.write(rel, ffi.buffer(buf, count)[:])
            else:
                ffi.memmove(buf, self.transport.read(rel, count), count)
            return 0
        data = bytes(count)
        if lib.VN_ISR_OFF <= offset < lib.VN_ISR_OFF + lib.VN_ISR_LEN and not is_write:
            if offset == lib.VN_ISR_OFF:
                data = bytes([self.transport.read_isr()]) + bytes(count - 1)
        elif lib.VN_DEVICE_CFG_OFF <= offset < lib.VN_DEVICE_CFG_OFF + lib.VN_DEVICE_CFG_LEN:
            if is_write:
                log.debug("device %s: write to device config ignored", self.name)
                return 0
            rel = offset - lib.VN_DEVICE_CFG_OFF
            image = self.device_config().ljust(lib.VN_DEVICE_CFG_LEN, b"\0")
            data = image[rel : rel + count].ljust(count, b"\0")
        if not is_write:
            ffi.memmove(buf, data, count)
        return 0

    def device_config(self) -> bytes:
        """The device configuration as the driver reads it now: the MAC and
        the announce bit are the datapath's (CTRL_MAC_ADDR, GUEST_ANNOUNCE)."""
        mac = ffi.new("uint8_t[6]")
        lib.vn_dev_get_mac(self._dev, mac)
        self.config.mac = bytes(mac)
        self.config.announce = bool(lib.vn_dev_get_announce(self._dev))
        return self.config.pack()
