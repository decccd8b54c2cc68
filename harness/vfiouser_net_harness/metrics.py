"""Read a daemon's Prometheus metrics from inside its network namespace.

The daemon serves /metrics on its namespace's 127.0.0.1, so the request is
made by a short Python process started with ``ip netns exec``. The text is
parsed with prometheus_client's parser into :class:`Sample` rows, and
:func:`queue_totals` sums the per-queue counters (packets, bytes, doorbells,
interrupts) by direction. Used by the benchmark's cost part.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from .netns import NetNS

PREFIX = "vfiouser_net_"
_FETCH = (
    "import sys, urllib.request; "
    "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"
)


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def scrape_text(ns: NetNS, url: str) -> str:
    """The /metrics page, fetched from inside ``ns``."""
    return ns.run([sys.executable, "-c", _FETCH, url], timeout=30).stdout


def parse(text: str) -> list[Sample]:
    """Every sample of a Prometheus text page (counters keep their ``_total``)."""
    return [
        Sample(s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def scrape(ns: NetNS, url: str) -> list[Sample]:
    return parse(scrape_text(ns, url))


def value(samples: Iterable[Sample], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` (prefix optional) whose labels match."""
    full = name if name.startswith(PREFIX) else PREFIX + name
    return sum(
        s.value
        for s in samples
        if s.name == full and all(s.labels.get(k) == v for k, v in labels.items())
    )


QUEUE_COUNTERS = {
    "packets": "queue_packets_total",
    "bytes": "queue_bytes_total",
    "doorbells": "queue_kicks_total",
    "interrupts": "queue_interrupts_total",
    "interrupts_suppressed": "queue_notifications_suppressed_total",
}


def queue_totals(samples: Iterable[Sample]) -> dict[str, dict[str, float]]:
    """Per-queue counters summed over queue pairs: ``{direction: {counter: n}}``.

    Direction is the device's: ``tx`` is what the guest transmitted, ``rx``
    what the device delivered to the guest.
    """
    rows = list(samples)
    return {
        direction: {
            key: value(rows, name, direction=direction) for key, name in QUEUE_COUNTERS.items()
        }
        for direction in ("rx", "tx")
    }
