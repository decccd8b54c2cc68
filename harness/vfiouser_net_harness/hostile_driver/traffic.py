"""Healthy traffic on the other pairs while an attack runs."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING

from vfiouser_net_harness.hostile_driver.attack import AttackFailed, PairCounts
from vfiouser_net_harness.hostile_driver.layout import PACKET_OUTGOING, guest_frame, tag_of
from vfiouser_net_harness.virtio_pci_driver import (
    VirtioNetDriver,
)

if TYPE_CHECKING:
    from vfiouser_net_harness.hostile_driver.driver import HostileDriver

log = logging.getLogger(__name__)


class Traffic:
    """Frames both ways on the healthy pairs, in a thread, until stopped."""

    def __init__(self, hd: HostileDriver, pairs: Sequence[int]) -> None:
        self.hd = hd
        self.pairs = tuple(pairs)
        self.counts = {p: PairCounts() for p in self.pairs}
        self.lock = threading.Lock()
        self.seen: deque[str] = deque(maxlen=20000)
        # Frames from the device that carry no tag of ours (nothing the
        # driver posted: e.g. the daemon's own memory sent out), and the
        # whole frames of the attacks' tags ("x..."), to compare with what
        # was posted.
        self.untagged = 0
        self.untagged_samples: deque[str] = deque(maxlen=4)
        self.frames: dict[str, bytes] = {}
        self.last_error: str | None = None
        self._seq = 0
        self._stop = threading.Event()
        self._want_pause = threading.Event()
        self._paused = threading.Event()
        self._resume = threading.Event()
        self._thread = threading.Thread(target=self._run, name="healthy-traffic", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._resume.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def pause(self) -> None:
        if not self._thread.is_alive():
            return
        self._resume.clear()
        self._want_pause.set()
        if not self._paused.wait(15):
            raise AttackFailed("the healthy traffic thread did not pause (stuck?)")

    def resume(self) -> None:
        self._want_pause.clear()
        self._paused.clear()
        self._resume.set()

    def snapshot(self) -> dict[int, PairCounts]:
        with self.lock:
            return {p: PairCounts(**asdict(c)) for p, c in self.counts.items()}

    def saw(self, prefix: str, *, exact: bool = False) -> bool:
        """Whether a frame tagged ``prefix...`` (or exactly that) reached the TAP."""
        with self.lock:
            if exact:
                return prefix in self.seen
            return any(t.startswith(prefix) for t in self.seen)

    def wait_min(
        self, since: dict[int, PairCounts], n: int, timeout: float
    ) -> dict[int, PairCounts]:
        """Wait until every pair moved ``n`` frames each way since ``since``."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.snapshot()
            if all(
                now[p].rx - since[p].rx >= n and now[p].tx - since[p].tx >= n for p in self.pairs
            ):
                return now
            if time.monotonic() > deadline or not self._thread.is_alive():
                return now
            time.sleep(0.01)

    # -- the thread ---------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._want_pause.is_set():
                self._paused.set()
                self._resume.wait()
                continue
            try:
                self._round()
            except Exception as e:  # counted; the attack decides if it matters
                with self.lock:
                    for p in self.pairs:
                        self.counts[p].errors += 1
                    self.last_error = f"{type(e).__name__}: {e}"
                log.debug("healthy traffic: %s", self.last_error)
                time.sleep(0.02)

    def _round(self) -> None:
        hd = self.hd
        drv = hd.drv
        assert drv is not None
        self._seq += 1
        want: set[str] = set()
        for p in self.pairs:
            drv.reclaim_tx(p)
            if drv.pairs[p].tx.in_flight < 32:
                tag = f"g{p}.{self._seq}"
                drv.send_packet(guest_frame(hd.mac, tag), pair=p, wait=False)
                want.add(tag)
                with self.lock:
                    self.counts[p].sent_tx += 1
            tag = f"h{p}.{self._seq}"
            hd.host_send(hd.host_frame(p, tag))
            want.add(tag)
            with self.lock:
                self.counts[p].sent_rx += 1
        deadline = time.monotonic() + 0.25
        while want and time.monotonic() < deadline and not self._stop.is_set():
            if not self._poll(drv, want):
                time.sleep(0.0005)

    def _poll(self, drv: VirtioNetDriver, want: set[str]) -> bool:
        got = False
        sock = self.hd.packet_sock
        while True:
            try:
                data, addr = sock.recvfrom(65536)
            except BlockingIOError:
                break
            if addr[2] == PACKET_OUTGOING:
                continue
            tag = tag_of(data)
            if tag is None:
                with self.lock:
                    self.untagged += 1
                    self.untagged_samples.append(data[:48].hex())
                continue
            got = True
            with self.lock:
                if tag.startswith("x") and len(self.frames) < 1000:
                    self.frames[tag] = data
                if tag.startswith("g") and tag[1:].split(".")[0].isdigit():
                    p = int(tag[1:].split(".")[0])
                    if p in self.counts:
                        self.counts[p].tx += 1
                else:
                    self.seen.append(tag)
            want.discard(tag)
        for p in self.pairs:
            q = drv.pairs[p].rx
            while q.has_used():
                _, frame = drv.recv_packet(timeout=1, pair=p)
                got = True
                tag = tag_of(frame)
                if tag is None or not tag.startswith("h"):
                    continue
                want.discard(tag)
                target = int(tag[1:].split(".")[0])
                with self.lock:
                    if target == p:
                        self.counts[p].rx += 1
                    elif target in self.counts:
                        self.counts[target].misrouted += 1
        return got
