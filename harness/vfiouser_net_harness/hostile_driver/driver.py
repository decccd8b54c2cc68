"""The hostile driver: brings the device up, keeps healthy traffic going, runs attacks."""

from __future__ import annotations

import contextlib
import errno as errno_mod
import logging
import math
import os
import random
import socket
import struct
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Self

from vfiouser_net_harness import vfio_user_client as vu
from vfiouser_net_harness.hostile_driver.attack import Attack, AttackRun, diff_counts
from vfiouser_net_harness.hostile_driver.catalogue import CATALOGUE
from vfiouser_net_harness.hostile_driver.client import LockedClient
from vfiouser_net_harness.hostile_driver.counters import CounterSource, counter_value
from vfiouser_net_harness.hostile_driver.dma_map import ForeignRegion
from vfiouser_net_harness.hostile_driver.layout import (
    A_END,
    ATTACKED,
    B_END,
    B_START,
    BUF_SIZE,
    C_END,
    C_START,
    CONFIG_VECTOR,
    ETH_P_IP,
    FEATURES,
    FLOW_DPORT,
    FLOW_DST,
    FLOW_SRC,
    HEALTHY,
    LOG_LINES_PER_SEC,
    MEM_SIZE,
    MIN_FRAMES,
    PAIRS,
    PEER_MAC,
    QUEUE_SIZE,
    REGIONS,
    TRAFFIC_WAIT,
    flow_sport,
    guest_frame,
    ipv4_udp,
    rss_config,
    tag_of,
)
from vfiouser_net_harness.hostile_driver.memory import (
    RegionBacking,
    TrackedGuestMemory,
    Violation,
    Zone,
)
from vfiouser_net_harness.hostile_driver.traffic import Traffic
from vfiouser_net_harness.virtio_pci_driver import (
    NET_HDR_SIZE,
    STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_RSS_CONFIG,
    VIRTIO_NET_OK,
    SplitQueue,
    SteerState,
    UsedElem,
    VirtioError,
    VirtioNetDriver,
    read_steer_state,
)

log = logging.getLogger(__name__)


class HostileDriver:
    """Bring a multiqueue device up, keep healthy traffic on pairs 1-3, and
    run attacks from :data:`CATALOGUE` against it (see the module doc)."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        packet_sock: socket.socket,
        *,
        counters: CounterSource,
        ring_state: Callable[[], list[dict[str, Any]]] | None = None,
        daemon_alive: Callable[[], bool] | None = None,
        daemon_pid: int | None = None,
        daemon_log: Callable[[], str] | None = None,
        seed: int | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        self.packet_sock = packet_sock
        self.packet_sock.setblocking(False)
        self.counters = counters
        self.ring_state = ring_state
        self.daemon_alive = daemon_alive
        self.daemon_pid = daemon_pid
        self.daemon_log = daemon_log
        self.seed = random.randrange(2**32) if seed is None else seed
        self.rng = random.Random(self.seed)
        self.timeout = timeout
        self.client: LockedClient | None = None
        self.mem = TrackedGuestMemory(MEM_SIZE)
        self.zone_b = Zone(self.mem, B_START, B_END)
        self.zone_c = Zone(self.mem, C_START, C_END)
        self.drv: VirtioNetDriver | None = None
        self.mac = b"\0" * 6
        self.sports = {p: flow_sport(p) for p in range(PAIRS)}
        self.traffic = Traffic(self, HEALTHY)
        self.violations: list[Violation] = []  # found at re-initialisation
        self.ring_overrides: dict[tuple[int, str], int] = {}
        self.foreign: list[ForeignRegion] = []  # the attacks' own DMA regions
        self._tags = 0

    # -- lifetime -------------------------------------------------------------

    def start(self) -> None:
        self.client = LockedClient(self.socket_path, timeout=self.timeout)
        self.client.negotiate()
        self.mem.fill_canary()
        for start, end in REGIONS.values():
            self.map_region(start, end)
        err = self.reinit()
        if err is not None:
            raise VirtioError(f"the device did not come up: {err}")
        self.traffic.start()
        first = self.traffic.wait_min(self.traffic.snapshot(), 1, 10)
        if any(first[p].rx == 0 or first[p].tx == 0 for p in HEALTHY):
            log.error("healthy traffic does not flow: %s", first)

    def close(self) -> None:
        self.traffic.stop()
        for region in self.foreign:
            region.mem.close()
        self.foreign.clear()
        if self.drv is not None:
            with contextlib.suppress(Exception):
                self.drv.transport.reset()
            self.drv.transport.close()
        if self.client is not None:
            self.client.close()
        self.mem.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- memory ---------------------------------------------------------------

    def map_region(self, start: int, end: int) -> None:
        assert self.client is not None
        self.client.dma_map(
            self.mem.base + start,
            end - start,
            self.mem.fd,
            start,
            backing=RegionBacking(self.mem, start),
        )

    def unmap_region(self, start: int, end: int) -> None:
        assert self.client is not None
        self.client.dma_unmap(self.mem.base + start, end - start)

    @contextlib.contextmanager
    def unmapped(self, start: int, end: int) -> Iterator[None]:
        """DMA-unmap [start, end) of guest memory for the block, then map it again."""
        self.unmap_region(start, end)
        try:
            yield
        finally:
            self.map_region(start, end)

    def addr(self, off: int) -> int:
        return self.mem.base + off

    def _place_queue(self, q: SplitQueue) -> None:
        """Pair 0's rings go to region B (or where an attack wants them)."""
        if q.index not in (2 * ATTACKED, 2 * ATTACKED + 1):
            return
        n = q.size
        self.mem.forget_writable(q.used_addr, 6 + 8 * n)
        q.desc_addr = self.zone_b.alloc(16 * n, 16)
        q.avail_addr = self.zone_b.alloc(6 + 2 * n, 2)
        q.used_addr = self.zone_b.alloc(6 + 8 * n, 4)
        for part in ("desc", "avail", "used"):
            where = self.ring_overrides.get((q.index, part))
            if where is not None:
                setattr(q, f"{part}_addr", where)
        if (q.index, "used") not in self.ring_overrides:
            self.mem.device_writable(q.used_addr, 6 + 8 * n)

    # -- (re)initialisation ----------------------------------------------------

    def reinit(self, pairs: int = PAIRS, features: int = FEATURES) -> str | None:
        """Reset the device and bring it up from scratch (traffic paused
        meanwhile). Returns None, or why the bring-up failed (then the
        traffic stays paused). With fewer than PAIRS ``pairs`` only those are
        set up (VQ_PAIRS_SET ``pairs``, no RSS table) and the traffic stays
        paused."""
        assert self.client is not None
        self.traffic.pause()
        if self.drv is not None:
            self.drv.transport.reset()
            self.drv.transport.close()
        # The device is reset: whatever it wrote is final. Check, then start over.
        self.violations.extend(self.mem.check())
        self.mem.clear_writable()
        self.mem.fill_canary()
        self.mem.reset_allocator()
        self.zone_b.reset()
        self.zone_c.reset()
        drv = VirtioNetDriver(
            self.client,
            self.mem,
            features=features,
            queue_size=QUEUE_SIZE,
            rx_buf_size=BUF_SIZE,
            tx_block_size=BUF_SIZE,
            timeout=self.timeout,
        )
        self.drv = drv
        try:
            drv.bring_up(pairs=pairs, rx_buffers=0, queue_hook=self._place_queue)
        except (VirtioError, TimeoutError, vu.VfioUserError) as e:
            return f"{type(e).__name__}: {e}"
        if self.mem.allocated > A_END:
            raise AssertionError(f"driver allocations ({self.mem.allocated:#x}) overflow region A")
        self.mac = drv.read_config().mac
        if pairs < PAIRS:
            return None
        for p in HEALTHY:
            drv.post_rx_buffers(drv.pairs[p].rx.size, p)
        ack = drv.ctrl_command(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_RSS_CONFIG, rss_config())
        if ack != VIRTIO_NET_OK:
            return f"RSS_CONFIG answered {ack}"
        drv.transport.irq_count(CONFIG_VECTOR)
        self.traffic.resume()
        return None

    # -- helpers for the attacks ----------------------------------------------

    @property
    def d(self) -> VirtioNetDriver:
        assert self.drv is not None
        return self.drv

    @property
    def c(self) -> LockedClient:
        assert self.client is not None
        return self.client

    def tag(self, what: str) -> str:
        self._tags += 1
        return f"{what}{self._tags}"

    def host_frame(self, pair: int, tag: str) -> bytes:
        """A UDP/IPv4 frame from the host side that RSS steers to ``pair``."""
        ip = ipv4_udp(
            FLOW_SRC, FLOW_DST, self.sports[pair], FLOW_DPORT, b"VNT:" + tag.encode() + b":"
        )
        return self.mac + PEER_MAC + struct.pack("!H", ETH_P_IP) + ip

    def host_send(self, frame: bytes) -> None:
        deadline = time.monotonic() + 3
        while True:
            try:
                self.packet_sock.send(frame)
                return
            except (BlockingIOError, OSError) as e:
                retry = isinstance(e, BlockingIOError) or e.errno in (
                    errno_mod.ENETDOWN,
                    errno_mod.ENOBUFS,
                )
                if not retry or time.monotonic() > deadline:
                    raise
                time.sleep(0.002)

    def raw_chain(self, q: SplitQueue, n: int, token: object) -> list[int]:
        """Reserve ``n`` descriptors as one chain (not published); returns their
        ids, head first, for the attack to overwrite with write_desc."""
        scratch = self.zone_c.alloc(16)
        head = q.add_buf([(scratch, 1, False)] * n, token, indirect=False, publish=False)
        return list(q.pending[head].ids)

    def publish_kick(self, q: SplitQueue) -> None:
        q.publish()
        q.kick(force=True)

    def wait_used(self, q: SplitQueue, timeout: float | None = None) -> UsedElem | None:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            e = q.get_used()
            if e is not None:
                return e
            if time.monotonic() > deadline:
                return None
            time.sleep(0.001)

    def wait_used_idx_change(self, q: SplitQueue, timeout: float) -> None:
        """Until the device used more of ``q`` than the driver took (or timeout)."""
        deadline = time.monotonic() + timeout
        while not q.has_used() and time.monotonic() < deadline:
            time.sleep(0.001)

    def expect_returned_empty(self, run: AttackRun, q: SplitQueue, heads: Sequence[int]) -> None:
        """Every chain in ``heads`` comes back unused (length 0)."""
        left = set(heads)
        while left:
            e = self.wait_used(q)
            if not run.check(
                e is not None, f"queue {q.index}: chains {sorted(left)} never returned"
            ):
                return
            assert e is not None
            run.check(e.id in left, f"queue {q.index}: used id {e.id} was not one of ours")
            run.check(e.len == 0, f"queue {q.index}: bad chain {e.id} used with length {e.len}")
            left.discard(e.id)

    def wait_status(self, bits: int, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            s = self.d.transport.status
            if s & bits or time.monotonic() > deadline:
                return s
            time.sleep(0.01)

    def check_needs_reset(self, run: AttackRun) -> None:
        """DEVICE_NEEDS_RESET in the status and a config interrupt."""
        status = self.wait_status(STATUS_DEVICE_NEEDS_RESET)
        run.observed["status"] = hex(status)
        run.check(
            bool(status & STATUS_DEVICE_NEEDS_RESET), f"no DEVICE_NEEDS_RESET (status {status:#x})"
        )
        irq = self.d.transport.wait_irq(CONFIG_VECTOR, 3)
        run.observed["config_interrupt"] = irq
        run.check(irq, "no config interrupt with DEVICE_NEEDS_RESET")
        run.broken = True

    def check_broken(self, run: AttackRun, qidx: int) -> None:
        """The device marks queue ``qidx`` broken (when the ring state is visible)."""
        if self.ring_state is None:
            return
        rows = {int(r["index"]): r for r in self.ring_state()}
        row = rows.get(qidx)
        run.observed[f"queue{qidx}_broken"] = None if row is None else bool(row["broken"])
        run.check(row is not None and bool(row["broken"]), f"queue {qidx} not marked broken: {row}")

    def check_not_on_tap(self, run: AttackRun, prefix: str, wait: float = 0.3) -> None:
        time.sleep(wait)
        run.check(not self.traffic.saw(prefix), f"frame {prefix!r} of a bad chain reached the TAP")

    def wait_counter(self, path: str, base: int, at_least: int, timeout: float = 5.0) -> int:
        """Wait until counter ``path`` moved ``at_least`` past ``base``; returns the delta."""
        deadline = time.monotonic() + timeout
        while True:
            v = counter_value(self.counters(), path)
            delta = -1 if v is None else v - base
            if delta >= at_least or time.monotonic() > deadline:
                return delta
            time.sleep(0.05)

    def pair0_buffers(self, n: int) -> list[int]:
        """Post up to ``n`` receive buffers (in region C) on the attacked pair."""
        rx = self.d.pairs[ATTACKED].rx
        bufs = [self.zone_c.alloc(BUF_SIZE) for _ in range(min(n, rx.num_free))]
        for b in bufs:
            rx.add_buf([(b, BUF_SIZE, True)], ("rx0", b), publish=False)
        self.publish_kick(rx)
        return bufs

    def pair0_recv(self, run: AttackRun, tag: str, timeout: float = 3.0) -> bool:
        """Receive the frame tagged ``tag`` on the attacked pair's ring."""
        rx = self.d.pairs[ATTACKED].rx
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            e = self.wait_used(rx, max(0.0, deadline - time.monotonic()))
            if e is None:
                break
            token = e.token
            if not isinstance(token, tuple) or e.len < NET_HDR_SIZE:
                continue
            data = self.mem.read(int(token[1]), e.len)
            if tag_of(data[NET_HDR_SIZE:]) == tag:
                return True
        return run.check(False, f"pair {ATTACKED} did not receive {tag!r}")

    def pair0_send(self, run: AttackRun, tag: str, timeout: float = 3.0) -> bool:
        """The attacked pair transmits a good frame (from region C) and it reaches the TAP."""
        tx = self.d.pairs[ATTACKED].tx
        frame = bytes(NET_HDR_SIZE) + guest_frame(self.mac, tag)
        buf = self.zone_c.alloc(len(frame))
        self.mem.write(buf, frame)
        head = tx.add_buf([(buf, len(frame), False)], "good", indirect=False)
        tx.kick(force=True)
        e = self.wait_used(tx, timeout)
        if not run.check(
            e is not None and e.id == head, f"pair {ATTACKED} tx: good chain not used"
        ):
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.traffic.saw(tag, exact=True):
                return True
            time.sleep(0.01)
        return run.check(False, f"pair {ATTACKED} tx: {tag!r} did not reach the TAP")

    def pair0_roundtrip(self, run: AttackRun) -> bool:
        self.pair0_buffers(4)
        tag = self.tag("p0rx")
        self.host_send(self.host_frame(ATTACKED, tag))
        ok = self.pair0_recv(run, tag)
        return self.pair0_send(run, self.tag("p0tx")) and ok

    def steering_active_pairs(self) -> int:
        """Active pairs from the steering state in BAR0."""
        return SteerState.parse(read_steer_state(self.c)).active

    def log_mark(self) -> tuple[int, float] | None:
        """Lines in the daemon's log so far (its counter dumps left out), and when."""
        if self.daemon_log is None:
            return None
        n = sum(1 for ln in self.daemon_log().splitlines() if ": counters {" not in ln)
        return n, time.monotonic()

    def check_log_bounded(self, run: AttackRun, mark: tuple[int, float] | None) -> None:
        """Since ``mark`` the daemon logged at most about LOG_LINES_PER_SEC lines a
        second: a hostile client or guest must not be able to flood the host's logs."""
        now = self.log_mark()
        if mark is None or now is None:
            return
        lines = now[0] - mark[0]
        bound = LOG_LINES_PER_SEC * (math.ceil(now[1] - mark[1]) + 1) + 10
        run.observed["log_lines"] = lines
        run.check(lines <= bound, f"the daemon logged {lines} lines (bound {bound})")

    def alive(self) -> bool:
        if self.daemon_alive is not None and not self.daemon_alive():
            return False
        try:
            self.c.device_info()
        except (vu.VfioUserTimeout, vu.VfioUserDisconnected, OSError):
            return False
        return True

    # -- running attacks --------------------------------------------------------

    def run(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        """Run attacks (all by default), each from a freshly initialised
        device; returns the report (JSON-able)."""
        todo = list(CATALOGUE) if names is None else list(names)
        unknown = [n for n in todo if n not in CATALOGUE]
        if unknown:
            raise ValueError(f"unknown attacks: {', '.join(unknown)}")
        t0 = time.monotonic()
        results = []
        for name in todo:
            try:
                results.append(self.run_attack(CATALOGUE[name]))
            except Exception as e:  # the device or the connection is gone
                log.error("attack %s:\n%s", name, traceback.format_exc())
                a = CATALOGUE[name]
                results.append(
                    {
                        "name": name,
                        "description": a.description,
                        "scope": a.scope,
                        "reaction": a.reaction,
                        "ok": False,
                        "failures": [f"{type(e).__name__}: {e}"],
                        "counters": {},
                        "observed": {},
                        "recovered_by_reset": None,
                        "traffic_during": {},
                        "traffic_after": {},
                        "memory_violations": [],
                        "seconds": 0.0,
                    }
                )
            if not self.alive():
                log.error("the device stopped answering after %s", name)
                break
        return {
            "seed": self.seed,
            "pairs": PAIRS,
            "attacked_pair": ATTACKED,
            "healthy_pairs": list(HEALTHY),
            "seconds": round(time.monotonic() - t0, 2),
            "ok": all(r["ok"] for r in results) and len(results) == len(todo),
            "attacks": results,
        }

    def run_attack(self, attack: Attack) -> dict[str, Any]:
        run = AttackRun(attack.name, attack.scope, attack.reaction)
        t_start = time.monotonic()
        log.info("attack %s", attack.name)
        err = self.reinit()
        run.check(err is None, f"bring-up before the attack failed: {err}")
        tr = self.traffic
        warm = tr.wait_min(tr.snapshot(), 1, TRAFFIC_WAIT)
        base = self.counters()
        during0 = tr.snapshot()
        errors0 = {p: c.errors for p, c in warm.items()}
        try:
            attack.fn(self, run)
        except Exception as e:
            run.check(False, f"attack raised {type(e).__name__}: {e}")
            log.error("attack %s raised:\n%s", attack.name, traceback.format_exc())
        during = tr.snapshot()
        if attack.scope == "queue":
            during = tr.wait_min(during0, MIN_FRAMES, TRAFFIC_WAIT)
            for p in HEALTHY:
                moved = (during[p].rx - during0[p].rx, during[p].tx - during0[p].tx)
                run.check(
                    min(moved) >= MIN_FRAMES,
                    f"healthy pair {p} moved only {moved[0]} rx / {moved[1]} tx frames "
                    f"during the attack (want {MIN_FRAMES}; last error {tr.last_error})",
                )
                run.check(
                    during[p].errors == errors0[p],
                    f"healthy pair {p}: traffic errors during the attack ({tr.last_error})",
                )
                run.check(during[p].misrouted == warm[p].misrouted, f"pair {p}: frames misrouted")
        after_counters = self.counters()
        deltas: dict[str, Any] = {}
        for ex in run.expectations:
            b, a = counter_value(base, ex.path), counter_value(after_counters, ex.path)
            if a is None or b is None:
                run.check(False, f"counter {ex.path} missing")
                continue
            delta = a - b
            deltas[ex.path] = {"delta": delta, "expected": ex.describe()}
            if ex.exactly is not None:
                run.check(
                    delta == ex.exactly, f"counter {ex.path} moved {delta}, expected {ex.exactly}"
                )
            elif ex.at_least is not None:
                run.check(
                    delta >= ex.at_least,
                    f"counter {ex.path} moved {delta}, expected >= {ex.at_least}",
                )
        status = self.d.transport.status if self.alive() else -1
        run.check(status >= 0, "the device stopped answering")
        if status >= 0 and status & STATUS_DEVICE_NEEDS_RESET and not run.broken:
            run.check(False, f"unexpected DEVICE_NEEDS_RESET (status {status:#x})")
        violations = self.mem.early + self.mem.check()
        self.mem.early.clear()
        # Recovery: what broke the device is undone by a reset, as a driver would.
        recovered = None
        if (
            run.broken
            or run.reinit
            or attack.scope == "device"
            or (status >= 0 and status & STATUS_DEVICE_NEEDS_RESET)
        ):
            err = self.reinit()
            recovered = err is None
            run.check(recovered, f"re-initialisation after the attack failed: {err}")
        after0 = tr.snapshot()
        after = tr.wait_min(after0, MIN_FRAMES, TRAFFIC_WAIT)
        for p in HEALTHY:
            moved = (after[p].rx - after0[p].rx, after[p].tx - after0[p].tx)
            run.check(
                min(moved) >= MIN_FRAMES,
                f"healthy pair {p} moved only {moved[0]} rx / {moved[1]} tx frames after the "
                f"attack{' and recovery' if recovered else ''} (last error {tr.last_error})",
            )
        try:
            self.pair0_roundtrip(run)
        except Exception as e:
            run.check(False, f"pair {ATTACKED} after the attack: {type(e).__name__}: {e}")
        run.check(self.daemon_alive is None or self.daemon_alive(), "the daemon died")
        violations += self.violations + self.mem.early + self.mem.check()
        self.violations.clear()
        self.mem.early.clear()
        for v in violations:
            run.check(False, str(v))
        return {
            "name": attack.name,
            "description": attack.description,
            "scope": attack.scope,
            "reaction": attack.reaction,
            "ok": not run.failures,
            "failures": run.failures,
            "counters": deltas,
            "observed": run.observed,
            "recovered_by_reset": recovered,
            "traffic_during": diff_counts(during0, during),
            "traffic_after": diff_counts(after0, after),
            "memory_violations": [str(v) for v in violations],
            "seconds": round(time.monotonic() - t_start, 2),
        }
