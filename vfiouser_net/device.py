"""A virtio-net PCI device served over vfio-user: the control plane.

One device's life: created (TAP, datapath, transport), served on its
context thread, stopped. The parts are each in their own module: the
vfio-user context and PCI identity (pci_setup.py), BAR0 outside the
doorbells (bar0.py), the virtio-pci common configuration (virtio_pci.py, to
which this object is the backend), the link following the TAP (tap_link.py),
and the counters read into plain data (counters.py).

Threads: `start()` starts the context thread, which owns the vfio-user
context and calls back into this object for BAR0 accesses outside the
doorbells, resets, logs and events; other threads may change the link and
the steering and read statistics at any time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from vfiouser_net import counters
from vfiouser_net.bar0 import Bar0
from vfiouser_net.counters import format_mac
from vfiouser_net.device_options import DeviceError, DeviceOptions
from vfiouser_net.native import ffi, lib
from vfiouser_net.net_config import NetConfig
from vfiouser_net.options import STEERING_POLICIES
from vfiouser_net.pci_setup import create_context
from vfiouser_net.snapshot import DeviceSnapshot, SteeringState
from vfiouser_net.tap import Tap
from vfiouser_net.tap_link import TapLink
from vfiouser_net.unix_socket import SocketPathError, check_listening_socket, socket_name
from vfiouser_net.virtio_pci import VirtioPciTransport
from vfiouser_net.virtio_spec import NetFeature, feature_mask, feature_names

log = logging.getLogger(__name__)

OFFERED_FEATURES = feature_mask(
    NetFeature.VERSION_1,
    NetFeature.CSUM,
    NetFeature.GUEST_CSUM,
    NetFeature.CTRL_GUEST_OFFLOADS,
    NetFeature.MTU,
    NetFeature.MAC,
    NetFeature.GUEST_TSO4,
    NetFeature.GUEST_TSO6,
    NetFeature.HOST_TSO4,
    NetFeature.HOST_TSO6,
    NetFeature.MRG_RXBUF,
    NetFeature.STATUS,
    NetFeature.CTRL_VQ,
    NetFeature.CTRL_RX,
    NetFeature.CTRL_VLAN,
    NetFeature.GUEST_ANNOUNCE,
    NetFeature.CTRL_MAC_ADDR,
    NetFeature.RING_INDIRECT_DESC,
    NetFeature.RING_EVENT_IDX,
    NetFeature.SPEED_DUPLEX,
    NetFeature.DEVICE_STATS,
    NetFeature.NOTF_COAL,
    NetFeature.VQ_NOTF_COAL,
    NetFeature.RING_RESET,
)
# Offered when the host kernel's TAP takes UDP segmentation offload.
USO_FEATURES = feature_mask(NetFeature.HOST_USO, NetFeature.GUEST_USO4, NetFeature.GUEST_USO6)
# Offered with more than one queue pair.
MULTIQUEUE_FEATURES = feature_mask(NetFeature.MQ, NetFeature.RSS, NetFeature.HASH_REPORT)

_SYSLOG_TO_LOGGING = {0: 50, 1: 50, 2: 50, 3: 40, 4: 30, 5: 20, 6: 20, 7: 10}
_RESET_TYPES = {0: "device", 1: "client lost", 2: "FLR"}


class VirtioNetDevice:
    def __init__(self, opts: DeviceOptions, log_level: int = logging.INFO) -> None:
        opts.validate()
        self.opts = opts
        self.name = opts.name or os.path.basename(opts.socket_path) or f"fd{opts.listen_fd}"
        self.max_qps = opts.queue_pairs
        self.num_queues = 2 * self.max_qps + 1
        self.num_vectors = self.num_queues + 1
        self.connected = False
        self.resets: dict[str, int] = {}
        self._closed = False
        # Operator calls (admin threads, metrics scrapes, signals) may run
        # while another thread stops the device: they hold a use while they
        # touch the C device, and stop() frees it only when none is left.
        self._uses = 0
        self._uses_cond = threading.Condition()
        self._thread: threading.Thread | None = None
        if opts.listen_fd is not None:
            try:
                check_listening_socket(opts.listen_fd)
            except SocketPathError as exc:
                raise DeviceError(str(exc)) from exc
            if not opts.socket_path:
                opts.socket_path = socket_name(opts.listen_fd)
        multiqueue = self.max_qps > 1
        self.offered = OFFERED_FEATURES | (MULTIQUEUE_FEATURES if multiqueue else 0)
        tap = Tap(opts.tap, self.max_qps, opts.mtu)
        # UDP segmentation offload only where the host kernel's TAP has it
        # (Linux 6.2): offered or not, never refused after negotiation.
        uso = lib.vn_tap_probe_uso(tap.fds[0])
        if uso == 1:
            self.offered |= USO_FEATURES
        else:
            log.info(
                "device %s: the host kernel's TAP has no UDP segmentation offload%s: "
                "HOST_USO and GUEST_USO4/6 not offered",
                opts.name or opts.tap,
                f" ({os.strerror(-uso)})" if uso < 0 else "",
            )
        self.config = NetConfig(
            mac=opts.mac,
            mtu=opts.mtu,
            max_queue_pairs=self.max_qps,
            speed_mbps=opts.speed_mbps,
            link_up=tap.is_up(),
            rss_max_key_size=lib.VN_RSS_MAX_KEY_SIZE if multiqueue else 0,
            rss_max_table_len=lib.VN_RSS_MAX_TABLE if multiqueue else 0,
            supported_hash_types=lib.VN_HASH_TYPES_SUPPORTED if multiqueue else 0,
        )
        self._dev: Any = lib.vn_dev_new(self.max_qps, opts.mac, opts.mtu)
        if self._dev == ffi.NULL:
            tap.close()
            raise DeviceError("cannot allocate the datapath")
        lib.vn_dev_set_link(self._dev, self.config.link_up)
        self._handle = ffi.new_handle(self)
        hooks = ffi.new("struct vn_hooks *")
        hooks.py = self._handle
        hooks.bar_access = lib.vn_py_bar_access
        hooks.reset = lib.vn_py_reset
        hooks.log = lib.vn_py_log
        hooks.event = lib.vn_py_event
        lib.vn_dev_set_hooks(self._dev, hooks)
        for qp, fd in enumerate(tap.fds):
            lib.vn_dev_set_tap(self._dev, qp, fd)
        try:
            self._use_tap_io(opts.tap_io)
        except DeviceError:
            lib.vn_dev_free(self._dev)
            tap.close()
            raise
        lib.vn_dev_request_policy(self._dev, STEERING_POLICIES.index(opts.steering))
        self.transport = VirtioPciTransport(
            self.offered, self.num_queues, opts.queue_size, self.num_vectors, backend=self
        )
        self.link = TapLink(
            self.name, self._dev, tap, opts.tap, self.max_qps, opts.mtu, self.config,
            self.transport,
        )  # fmt: skip
        self.bar0 = Bar0(self.name, self._dev, self.transport, self.config)
        try:
            self._vfu = create_context(self._dev, opts, self.num_vectors, log_level)
        except Exception:
            lib.vn_dev_free(self._dev)
            tap.close()
            raise

    # -- lifecycle ------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Serve clients on the context thread until stop()."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._serve, name=f"vfu-{self.name}", daemon=True)
        self._thread.start()
        log.info(
            "device %s: listening on %s, TAP %s, MAC %s, MTU %d",
            self.name,
            self.opts.socket_path,
            self.tap.name,
            format_mac(self.opts.mac),
            self.opts.mtu,
        )

    def _serve(self) -> None:
        rc = lib.vn_server_run(self._dev)
        if rc < 0:
            log.error("device %s: serving failed: %s", self.name, os.strerror(-rc))

    @contextlib.contextmanager
    def _in_use(self) -> Iterator[None]:
        with self._uses_cond:
            if self._closed:
                raise DeviceError(f"device {self.name} is stopped")
            self._uses += 1
        try:
            yield
        finally:
            with self._uses_cond:
                self._uses -= 1
                self._uses_cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def stop(self) -> None:
        with self._uses_cond:
            if self._closed:
                return
            self._closed = True
            # A running capture notices _closed and ends within its poll.
            lib.vn_capture_stop(self._dev)
            while self._uses:
                self._uses_cond.wait()
        lib.vn_server_stop(self._dev)
        if self._thread is not None:
            self._thread.join()
        # The context thread is gone: this thread now owns the context.
        # Destroying it unmaps guest memory without a quiesce, so the
        # workers must be stopped first.
        lib.vn_dev_reset(self._dev)
        self.connected = False
        log.info("device %s: final counters %s", self.name, json.dumps(self._snapshot().to_dict()))
        lib.vfu_destroy_ctx(self._vfu)
        lib.vn_dev_free(self._dev)
        self.tap.close()
        if self.opts.listen_fd is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.opts.socket_path)
        log.info("device %s: stopped", self.name)

    def __enter__(self) -> VirtioNetDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- transport backend (called on the context thread) ---------------------

    def _datapath_queue(self, index: int) -> int | None:
        """The datapath's number for the driver's queue index (None: none)."""
        negotiated = self.transport.driver_features
        # Without MQ and RSS the driver sees one pair and the control queue at 2.
        multi = negotiated & feature_mask(NetFeature.MQ, NetFeature.RSS)
        if not multi and index == 2:
            return 2 * self.max_qps  # the control queue
        if not multi and index > 2:
            return None
        return index

    def configure_queue(
        self, index: int, size: int, desc: int, driver: int, device: int, vector: int
    ) -> None:
        cidx = self._datapath_queue(index)
        if cidx is None:
            return
        if lib.vn_dev_config_queue(self._dev, cidx, size, desc, driver, device, vector) < 0:
            log.warning("device %s: queue %d configuration refused", self.name, index)

    def reset_queue(self, index: int) -> None:
        cidx = self._datapath_queue(index)
        if cidx is not None and lib.vn_dev_queue_reset(self._dev, cidx) == 0:
            # One queue, by the driver (VIRTIO_F_RING_RESET): a reset type.
            self.resets["queue"] = self.resets.get("queue", 0) + 1
            log.info("device %s: queue %d reset by the driver", self.name, index)

    def enable_queue(
        self, index: int, size: int, desc: int, driver: int, device: int, vector: int
    ) -> None:
        cidx = self._datapath_queue(index)
        if cidx is None:
            return
        if lib.vn_dev_queue_enable(self._dev, cidx, size, desc, driver, device, vector) < 0:
            log.warning("device %s: queue %d re-enabled with bad rings", self.name, index)
        else:
            log.info("device %s: queue %d enabled again, %d entries", self.name, index, size)

    def start_datapath(self, features: int) -> bool:
        if lib.vn_dev_start(self._dev, features) < 0:
            lib.vn_dev_fatal(self._dev, b"ring addresses outside guest memory at DRIVER_OK")
            return False
        log.info("device %s: driver ready (%s)", self.name, ", ".join(feature_names(features)))
        if features >> NetFeature.GUEST_ANNOUNCE & 1 and self.config.link_up:
            lib.vn_dev_set_announce(self._dev, True)
            self.link.config_changed()
        return True

    def reset(self) -> None:
        lib.vn_dev_reset(self._dev)

    # -- steering (any thread) ------------------------------------------------

    def set_steering(self, policy: str) -> None:
        """Switch the steering policy at run time (no reset, no reordering)."""
        if policy not in STEERING_POLICIES:
            raise DeviceError(
                f"unknown steering policy {policy!r} (one of {', '.join(STEERING_POLICIES)})"
            )
        with self._in_use():
            self.opts.steering = policy
            lib.vn_dev_request_policy(self._dev, STEERING_POLICIES.index(policy))
            # The context thread applies it between messages: normally at
            # once; wait for it so callers read back what they set.
            deadline = time.monotonic() + 2.0
            while counters.steering(self._dev).policy != policy and time.monotonic() < deadline:
                time.sleep(0.005)

    def steering(self) -> SteeringState:
        with self._in_use():
            return counters.steering(self._dev)

    def set_config_vector(self, vector: int) -> None:
        lib.vn_dev_set_config_vector(self._dev, vector)

    def needs_reset(self) -> bool:
        return bool(lib.vn_dev_get_needs_reset(self._dev))

    def raise_isr(self, bits: int) -> None:
        lib.vn_dev_raise_isr(self._dev, bits)

    def take_isr(self) -> int:
        return int(lib.vn_dev_take_isr(self._dev))

    # -- hooks from C ----------------------------------------------------------

    def on_reset(self, reset_type: int) -> None:
        kind = _RESET_TYPES.get(reset_type, str(reset_type))
        label = kind.replace(" ", "_").lower()
        self.resets[label] = self.resets.get(label, 0) + 1
        log.info("device %s: reset (%s)", self.name, kind)
        self.transport.reset()

    def on_event(self, event: int) -> None:
        if event == lib.VN_EVENT_CONNECTED:
            self.connected = True
            log.info("device %s: client connected", self.name)
        elif event == lib.VN_EVENT_DISCONNECTED:
            self.connected = False
            log.info("device %s: client disconnected, waiting for the next", self.name)

    # -- operator controls (any thread) --------------------------------------------

    def set_link(self, up: bool) -> None:
        with self._in_use():
            self.link.set_operator(up)

    def poll_link(self) -> None:
        """Follow the operator's switch and the TAP's IFF_UP."""
        with self._in_use():
            self.link.poll()

    def announce(self) -> None:
        self.link.announce()

    @property
    def tap(self) -> Tap:
        return self.link.tap

    @property
    def operator_link_up(self) -> bool:
        return self.link.operator_link_up

    @property
    def tap_lost(self) -> bool:
        return self.link.tap_lost

    # -- observation ---------------------------------------------------------------

    def ring_state(self) -> list[dict[str, Any]]:
        """Per virtqueue, as the device sees it (indices, in flight, flags)."""
        with self._in_use():
            return counters.ring_state(self._dev, self.num_queues)

    def capture(
        self,
        directory: str,
        name: str,
        *,
        queue: int = -1,
        count: int = 100,
        seconds: float = 10.0,
    ) -> dict[str, Any]:
        """Capture frames of this device (or one queue pair) to a new pcap file
        name in directory (the daemon's capture directory)."""
        from vfiouser_net.capture import capture_to_pcap

        with self._in_use():
            return capture_to_pcap(
                self._dev,
                directory,
                name,
                queue=queue,
                count=count,
                seconds=seconds,
                stopped=lambda: self._closed,
            )

    def irq_count(self, vector: int) -> int:
        return int(lib.vn_dev_get_irq_count(self._dev, vector))

    def _use_tap_io(self, mode: str) -> None:
        """Batched TAP writes where asked and possible. Here, before the
        sandbox: its seccomp filter has no io_uring_setup."""
        if mode == "writev":
            return
        rc = lib.vn_dev_use_tap_batching(self._dev)
        if rc == 0:
            log.info("device %s: TAP writes batched through io_uring", self.name)
        elif mode == "io_uring":
            raise DeviceError(
                f"io_uring for the TAP: {os.strerror(-rc)} (kernel.io_uring_disabled, or a "
                "kernel without io_uring restrictions); --tap-io writev does without"
            )
        else:
            log.info(
                "device %s: io_uring unavailable (%s): one writev a frame", self.name,
                os.strerror(-rc),
            )  # fmt: skip

    @property
    def tap_io(self) -> str:
        """What the datapath does now ("writev" also after io_uring failed)."""
        return "io_uring" if lib.vn_dev_tap_batching(self._dev) else "writev"

    def snapshot(self) -> DeviceSnapshot:
        with self._in_use():
            return self._snapshot()

    def _snapshot(self) -> DeviceSnapshot:
        t = self.transport
        return DeviceSnapshot(
            name=self.name,
            socket=self.opts.socket_path,
            tap=self.tap.name,
            connected=self.connected,
            status=int(t.device_status()),
            features=feature_names(t.negotiated),
            offered_features=feature_names(self.offered),
            link_up=self.config.link_up,
            tap_lost=self.tap_lost,
            mtu=self.opts.mtu,
            tap_io=self.tap_io,
            queue_pairs=self.max_qps,
            steering=counters.steering(self._dev),
            rx_filter=counters.rx_filter(self._dev),
            queues=[counters.queue_stats(self._dev, i) for i in range(self.max_qps)],
            ctrl=counters.ctrl_stats(self._dev),
            device=counters.device_stats(self._dev),
        )


# Callbacks from C: find the device through the handle and never let an
# exception escape into C (cffi would print it and return 0).


def _callback_error(exc: type[BaseException], value: BaseException, tb: Any) -> None:
    log.error("control plane callback failed", exc_info=(exc, value, tb))


@ffi.def_extern(onerror=_callback_error, error=-1)  # type: ignore[untyped-decorator]
def vn_py_bar_access(py: Any, offset: int, buf: Any, count: int, is_write: int) -> int:
    dev: VirtioNetDevice = ffi.from_handle(py)
    return dev.bar0.access(offset, buf, count, bool(is_write))


@ffi.def_extern(onerror=_callback_error)  # type: ignore[untyped-decorator]
def vn_py_reset(py: Any, reset_type: int) -> None:
    dev: VirtioNetDevice = ffi.from_handle(py)
    dev.on_reset(reset_type)


@ffi.def_extern(onerror=_callback_error)  # type: ignore[untyped-decorator]
def vn_py_log(py: Any, level: int, msg: Any) -> None:
    dev: VirtioNetDevice = ffi.from_handle(py)
    log.log(
        _SYSLOG_TO_LOGGING.get(level, 20),
        "device %s: %s",
        dev.name,
        ffi.string(msg).decode(errors="replace"),
    )


@ffi.def_extern(onerror=_callback_error)  # type: ignore[untyped-decorator]
def vn_py_event(py: Any, event: int) -> None:
    dev: VirtioNetDevice = ffi.from_handle(py)
    dev.on_event(event)


__all__ = ["DeviceError", "DeviceOptions", "VirtioNetDevice"]
