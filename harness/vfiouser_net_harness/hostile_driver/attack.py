"""Attack bookkeeping: what an attack expects and what it saw; the counter
paths of the attacked pair."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from vfiouser_net_harness.hostile_driver.layout import ATTACKED

if TYPE_CHECKING:
    from vfiouser_net_harness.hostile_driver.driver import HostileDriver

log = logging.getLogger(__name__)


@dataclass
class Expectation:
    path: str
    exactly: int | None = None
    at_least: int | None = None

    def describe(self) -> str:
        if self.exactly is not None:
            return f"+{self.exactly}"
        return f">= +{self.at_least}"


class AttackFailed(Exception):
    pass


@dataclass
class AttackRun:
    """What one attack expects and what it saw."""

    name: str
    scope: str
    reaction: str
    failures: list[str] = field(default_factory=list)
    expectations: list[Expectation] = field(default_factory=list)
    observed: dict[str, Any] = field(default_factory=dict)
    broken: bool = False  # the device needs a reset afterwards
    reinit: bool = False  # the driver's own bookkeeping is off: bring the device up again

    def check(self, ok: bool, message: str) -> bool:
        if not ok:
            self.failures.append(message)
            log.warning("%s: %s", self.name, message)
        return ok

    def expect(self, path: str, exactly: int | None = None, at_least: int | None = None) -> None:
        self.expectations.append(Expectation(path, exactly, at_least))

    def unchanged(self, path: str) -> None:
        self.expect(path, exactly=0)


@dataclass(frozen=True)
class Attack:
    name: str
    fn: Callable[[HostileDriver, AttackRun], None]
    scope: str  # "queue": the attacked queue only; "device": the whole device (spec)
    reaction: str
    description: str


@dataclass
class PairCounts:
    rx: int = 0  # host -> guest frames received on this pair's ring
    tx: int = 0  # guest -> host frames seen on the TAP
    sent_rx: int = 0
    sent_tx: int = 0
    misrouted: int = 0  # host frames for this pair that arrived on another
    errors: int = 0


def diff_counts(a: dict[int, PairCounts], b: dict[int, PairCounts]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for p, cb in b.items():
        ca = a.get(p, PairCounts())
        out[str(p)] = {k: getattr(cb, k) - getattr(ca, k) for k in asdict(cb)}
    return out


TX = f"queues.{ATTACKED}.tx"
RX = f"queues.{ATTACKED}.rx"
# Frames for a broken queue are dropped by whichever pair's worker read them
# from the TAP (each counts its own): the sum over the pairs.
BROKEN_DROPS = "queues.*.rx.drops.queue_broken"
