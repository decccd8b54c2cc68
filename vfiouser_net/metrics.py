"""Prometheus metrics, read at scrape time from the datapath's counters.

Nothing here runs per packet: a scrape takes one lock-free snapshot of each
device's C counters (relaxed atomic loads; the workers never wait for it) and
turns it into metric families. Names follow Prometheus conventions: one
prefix, base units, `_total` for counters; labels `device`, `queue` (queue
pair index) and `direction` (`rx`/`tx`) have bounded values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from vfiouser_net.counters import format_mac
from vfiouser_net.device_options import DeviceOptions
from vfiouser_net.device_process import COMMON_EXIT_REASONS
from vfiouser_net.native import lib
from vfiouser_net.snapshot import DeviceSnapshot

log = logging.getLogger(__name__)

PREFIX = "vfiouser_net"
DEFAULT_METRICS_PORT = 9742

# The datapath's histogram buckets (csrc/stats.h), upper bounds.
BATCH_BOUNDS = [int(lib.vn_batch_bucket_bound(i)) for i in range(lib.VN_BATCH_BUCKETS)]
SIZE_BOUNDS = [int(lib.vn_size_bucket_bound(i)) for i in range(lib.VN_SIZE_BUCKETS)]

CTRL_CLASSES = ["rx", "mac", "vlan", "announce", "mq", "guest_offloads", "notf_coal", "7", "stats"]
CTRL_COMMANDS: dict[str, list[str]] = {
    "rx": ["promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast"],
    "mac": ["table_set", "addr_set"],
    "announce": ["ack"],
    "mq": ["vq_pairs_set", "rss_config", "hash_config"],
    "guest_offloads": ["set"],
    "stats": ["query", "get"],
}


def ctrl_class_name(cls: int) -> str:
    return CTRL_CLASSES[cls] if cls < len(CTRL_CLASSES) else "other"


def ctrl_command_name(cls_name: str, cmd: int) -> str:
    names = CTRL_COMMANDS.get(cls_name, [])
    if cmd >= 7:
        return "other"
    return names[cmd] if cmd < len(names) else str(cmd)


def _cumulative(counts: list[int], bounds: list[int]) -> list[tuple[str, float]]:
    """Prometheus buckets from per-bucket counts (the last slot is +Inf only)."""
    buckets: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip(bounds, counts, strict=False):
        total += n
        buckets.append((str(bound), float(total)))
    total += sum(counts[len(bounds) :])
    buckets.append(("+Inf", float(total)))
    return buckets


class _Transport(Protocol):
    @property
    def driver_resets(self) -> int: ...


class MetricsDevice(Protocol):
    """What a scrape reads of a device, in this process or in its own."""

    @property
    def name(self) -> str: ...
    @property
    def opts(self) -> DeviceOptions: ...
    @property
    def resets(self) -> dict[str, int]: ...
    @property
    def transport(self) -> _Transport: ...
    def snapshot(self) -> DeviceSnapshot: ...


# vn_dev_stats fields exported as vfiouser_net_device_events_total{event=...}.
DEVICE_EVENTS = (
    "needs_reset",
    "doorbells_invalid",
    "irq_errors",
    "dma_maps",
    "dma_unmaps",
    "quiesces",
    "steering_drain_timeouts",
    "tap_failures",
    "tap_replacements",
    "ctrl_budget_exhausted",
    "dma_refused",
    "guest_mem_faults",
    "irqs_msix_off",
    "pci_cfg_invalid",
    "rx_reselected",
    "doorbells_inline",
    "rx_inline",
)


class DeviceCollector(Collector):
    """All devices of this daemon, as metric families."""

    def __init__(self, devices: Callable[[], Iterable[MetricsDevice]]) -> None:
        self.devices = devices

    def describe(self) -> list[Metric]:
        # Families depend on the devices present; let the registry call collect().
        return []

    def collect(self) -> Iterator[Metric]:
        f = _Families()
        for dev in self.devices():
            try:
                f.add_device(dev)
            except Exception:  # a scrape must not fail because one device is closing
                log.exception("metrics: device %s skipped", dev.name)
        yield from f.all()


class _Families:
    def __init__(self) -> None:
        q = ["device", "queue", "direction"]
        d = ["device"]

        def counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)

        def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)

        self.packets = counter("queue_packets", "Frames moved by a queue.", q)
        self.bytes = counter(
            "queue_bytes",
            "Bytes moved by a queue (whole Ethernet frames, without the virtio-net header).",
            q,
        )
        self.drops = counter("queue_drops", "Frames dropped, by reason.", [*q, "reason"])
        self.errors = counter("queue_errors", "Guest errors found, by reason.", [*q, "reason"])
        self.kicks = counter("queue_kicks", "Doorbells (kicks) received from the guest.", q)
        self.interrupts = counter("queue_interrupts", "Interrupts sent to the guest.", q)
        self.suppressed = counter(
            "queue_notifications_suppressed", "Interrupts the guest asked us not to send.", q
        )
        self.coalesced = counter(
            "queue_notifications_coalesced",
            "Interrupts held back by the guest's coalescing settings (ethtool -C) and sent later"
            " as one.",
            q,
        )
        self.coal_packets = gauge(
            "queue_coalesce_max_packets",
            "Interrupt coalescing set by the guest (ethtool -C): packets per interrupt, 0 off.",
            q,
        )
        self.coal_usecs = gauge(
            "queue_coalesce_max_usecs",
            "Interrupt coalescing set by the guest (ethtool -C): longest hold in microseconds,"
            " 0 off.",
            q,
        )
        self.ring_full = counter(
            "queue_ring_full", "Times a frame waited because the guest's ring was empty.", q
        )
        self.steered = counter(
            "queue_steered", "Frames read on this pair and handed to another pair.", q
        )
        self.in_flight = gauge(
            "queue_descriptors_in_flight", "Buffers the guest made available and not yet used.", q
        )
        self.batch = HistogramMetricFamily(
            f"{PREFIX}_queue_batch_size", "Frames per batch (one worker pass).", labels=q
        )
        self.size = HistogramMetricFamily(
            f"{PREFIX}_queue_packet_size_bytes", "Frame sizes.", labels=q
        )
        self.info = InfoMetricFamily(
            f"{PREFIX}_device", "Identity and negotiated features.", labels=d
        )
        self.link = gauge("device_link_up", "1 when the guest sees the link up.", d)
        self.status = gauge("device_driver_status", "virtio device status byte.", d)
        self.driver_ok = gauge("device_driver_ready", "1 once the driver set DRIVER_OK.", d)
        self.needs_reset = gauge(
            "device_needs_reset", "1 while the device is in DEVICE_NEEDS_RESET.", d
        )
        self.connected = gauge(
            "device_client_connected", "1 while a vfio-user client is attached.", d
        )
        self.pairs_active = gauge("device_queue_pairs_active", "Queue pairs the driver uses.", d)
        self.pairs_max = gauge("device_queue_pairs_max", "Queue pairs offered.", d)
        self.steering = gauge(
            "device_steering_policy",
            "1 for the steering policy in force (configured and effective).",
            [*d, "policy", "effective"],
        )
        self.switches = counter("device_steering_switches", "Steering changes applied.", d)
        self.ctrl = counter(
            "device_control_commands",
            "Control queue commands, by class, command and result.",
            [*d, "class", "command", "result"],
        )
        self.resets = counter("device_resets", "Device resets, by origin.", [*d, "type"])
        self.dma = gauge("device_dma_regions", "Guest memory regions mapped.", d)
        self.events = counter(
            "device_events",
            "Device-level events: guest errors that broke the device, doorbells for "
            "missing queues, failed interrupts, DMA maps/unmaps, quiesces, steering "
            "drains that timed out, TAP deletions and re-attachments.",
            [*d, "event"],
        )
        self.process_exits = counter(
            "device_process_exits",
            "Device processes (serve --isolate) that ended without being asked to, by "
            "reason (a signal such as SIGKILL or SIGSEGV, or exit N); each was started again.",
            [*d, "reason"],
        )

    def add_device(self, dev: MetricsDevice) -> None:
        name = dev.name
        # First: a device process that does not answer still has its exits.
        # A device in the daemon's own process has none: its series stay at 0.
        exits = dict.fromkeys(COMMON_EXIT_REASONS, 0)
        process = getattr(dev, "process", None)
        if process is not None:
            exits.update(process.exits)
        for reason, n in exits.items():
            self.process_exits.add_metric([name, reason], n)
        # A device process's last answer to the health check: a scrape never
        # waits for a process.
        snap: DeviceSnapshot = getattr(dev, "cached_snapshot", dev.snapshot)()
        for qp, queue in enumerate(snap.queues):
            for direction, s in (("rx", queue.rx), ("tx", queue.tx)):
                lab = [name, str(qp), direction]
                self.packets.add_metric(lab, s.packets)
                self.bytes.add_metric(lab, s.bytes)
                for reason, n in s.drops.items():
                    self.drops.add_metric([*lab, reason], n)
                for reason, n in s.errors.items():
                    self.errors.add_metric([*lab, reason], n)
                self.kicks.add_metric(lab, s.doorbells)
                self.interrupts.add_metric(lab, s.interrupts)
                self.suppressed.add_metric(lab, s.interrupts_suppressed)
                self.coalesced.add_metric(lab, s.interrupts_coalesced)
                self.coal_packets.add_metric(lab, s.coalesce_max_packets or 0)
                self.coal_usecs.add_metric(lab, s.coalesce_max_usecs or 0)
                self.ring_full.add_metric(lab, s.ring_full)
                if direction == "rx":
                    self.steered.add_metric(lab, s.steered_out)
                self.in_flight.add_metric(lab, s.in_flight)
                self.batch.add_metric(
                    lab, _cumulative(s.batch_hist, BATCH_BOUNDS), sum_value=s.packets
                )
                self.size.add_metric(lab, _cumulative(s.size_hist, SIZE_BOUNDS), sum_value=s.bytes)
        steer = snap.steering
        self.info.add_metric(
            [name],
            {
                "socket": snap.socket,
                "tap": snap.tap,
                "mac": snap.rx_filter.mac,
                "configured_mac": format_mac(dev.opts.mac),
                "mtu": str(snap.mtu),
                "features": ",".join(snap.features),
                "tap_io": snap.tap_io,
            },
        )
        status = snap.status
        self.link.add_metric([name], int(snap.link_up))
        self.status.add_metric([name], status)
        self.driver_ok.add_metric([name], int(bool(status & 4)))
        self.needs_reset.add_metric([name], int(bool(status & 64)))
        self.connected.add_metric([name], int(snap.connected))
        self.pairs_active.add_metric([name], steer.active_queue_pairs)
        self.pairs_max.add_metric([name], steer.max_queue_pairs)
        self.steering.add_metric([name, steer.policy, steer.effective], 1)
        device = snap.device
        self.switches.add_metric([name], device.events["steering_switches"])
        for cls, cmds in device.ctrl_cmds.items():
            cls_name = ctrl_class_name(int(cls))
            for cmd, (ok, err) in cmds.items():
                cmd_name = ctrl_command_name(cls_name, int(cmd))
                self.ctrl.add_metric([name, cls_name, cmd_name, "ok"], ok)
                self.ctrl.add_metric([name, cls_name, cmd_name, "error"], err)
        resets = dict(dev.resets)
        resets["driver"] = dev.transport.driver_resets
        for kind, n in resets.items():
            self.resets.add_metric([name, kind], n)
        self.dma.add_metric([name], max(0, device.events["dma_maps"] - device.events["dma_unmaps"]))
        for event in DEVICE_EVENTS:
            self.events.add_metric([name, event], device.events[event])

    def all(self) -> Iterator[Metric]:
        yield from (v for v in vars(self).values() if isinstance(v, Metric))


def parse_metrics_addr(text: str) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT, or :PORT / PORT (loopback)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError as exc:
        raise ValueError(f"invalid metrics address {text!r}: port must be a number") from exc
    if not 0 <= number <= 65535:
        raise ValueError(f"invalid metrics address {text!r}: port out of range")
    return host, number


def serve_metrics(addr: str, devices: Callable[[], Iterable[MetricsDevice]]) -> CollectorRegistry:
    """Serve /metrics on addr (a thread of prometheus_client)."""
    host, port = parse_metrics_addr(addr)
    registry = CollectorRegistry()
    registry.register(DeviceCollector(devices))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return registry
