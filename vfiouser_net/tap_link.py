"""The guest's link, following the host: up while the operator's switch is on
(`ctl link`, set_link) and the TAP is up (IFF_UP); a TAP deleted and created
again under its name re-attached to the same device. Each change reaches the
driver as a configuration-change interrupt (and a GUEST_ANNOUNCE request when
the link comes up).

Runs on the daemon's loop (every LINK_POLL_SECONDS) and on operator threads;
one lock orders them. The new TAP's queues are handed to the context thread,
which swaps them between messages (vn_dev_replace_taps).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from vfiouser_net.native import ffi, lib
from vfiouser_net.net_config import NetConfig
from vfiouser_net.tap import Tap, TapError, interface_exists
from vfiouser_net.virtio_pci import NO_VECTOR, VirtioPciTransport
from vfiouser_net.virtio_spec import NetFeature

log = logging.getLogger(__name__)

# How long the operator thread waits for the context thread to swap TAP queues.
TAP_REPLACE_TIMEOUT_MS = 5000


class TapLink:
    def __init__(
        self,
        name: str,
        dev: Any,
        tap: Tap,
        tap_name: str,
        queue_pairs: int,
        mtu: int,
        config: NetConfig,
        transport: VirtioPciTransport,
    ) -> None:
        self.name = name
        self._dev = dev
        self.tap = tap
        # As the operator named it: what re-attaching looks for.
        self._tap_name = tap_name
        self._queue_pairs = queue_pairs
        self._mtu = mtu
        self.config = config
        self.transport = transport
        self.operator_link_up = True
        # The TAP was deleted; re-attached when an interface of its name
        # exists again (the daemon does not re-create what an operator deleted).
        self.tap_lost = False
        self._lock = threading.Lock()

    def set_operator(self, up: bool) -> None:
        self.operator_link_up = up
        self.poll()

    def poll(self) -> None:
        """Follow the operator's switch and the TAP's IFF_UP."""
        with self._lock:
            self._follow_tap()
            self._apply()

    def _follow_tap(self) -> None:
        if not self.tap_lost:
            if not self.tap.lost():
                return
            self.tap_lost = True
            log.warning(
                "device %s: TAP %s was deleted: link down until an interface of that name "
                "exists again",
                self.name,
                self.tap.name,
            )
        if not interface_exists(self._tap_name):
            return
        try:
            new = Tap(self._tap_name, self._queue_pairs, self._mtu, create=False)
        except TapError as exc:
            log.warning(
                "device %s: cannot re-attach TAP %s yet: %s", self.name, self._tap_name, exc
            )
            return
        fds = ffi.new("int[]", new.fds)
        r = lib.vn_dev_replace_taps(self._dev, fds, len(new.fds), TAP_REPLACE_TIMEOUT_MS)
        if r < 0:
            # Safe to close: a request that failed (timed out) was withdrawn,
            # the context thread never installs these fds afterwards.
            new.close()
            log.error(
                "device %s: re-attaching TAP %s failed: %s", self.name, new.name, os.strerror(-r)
            )
            return
        old, self.tap = self.tap, new
        old.close()
        self.tap_lost = False
        log.info("device %s: TAP %s re-attached (%d queues)", self.name, new.name, len(new.fds))

    def _apply(self) -> None:
        up = self.operator_link_up and not self.tap_lost and self.tap.is_up()
        if up == self.config.link_up:
            return
        log.info("device %s: link %s", self.name, "up" if up else "down")
        self.config.link_up = up
        lib.vn_dev_set_link(self._dev, up)
        if up and self.transport.negotiated >> NetFeature.GUEST_ANNOUNCE & 1:
            lib.vn_dev_set_announce(self._dev, True)
        self.config_changed()

    def announce(self) -> None:
        """Ask the driver to announce itself (GUEST_ANNOUNCE)."""
        lib.vn_dev_set_announce(self._dev, True)
        self.config_changed()

    def config_changed(self) -> None:
        """The device configuration changed: the driver's config interrupt."""
        vector = self.transport.config_changed()
        if vector != NO_VECTOR:
            lib.vn_irq_raise(self._dev, vector)
