"""A virtio-net PCI device served over vfio-user: the control plane.

Ties together the libvfio-user context (PCI identity, capabilities, regions),
the virtio-pci transport (common configuration), the virtio-net device
configuration, the TAP and the C datapath. Threads: `run()` starts the
context thread, which owns the vfio-user context and calls back into this
object for BAR0 accesses outside the doorbells, resets, logs and events; the
caller's thread may change the link and read statistics at any time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vfiouser_net import counters, pci_config
from vfiouser_net.counters import format_mac
from vfiouser_net.native import ffi, lib, vfu_check, vn_check
from vfiouser_net.net_config import NET_CONFIG_SIZE, NetConfig
from vfiouser_net.options import (
    DEFAULT_BUSY_POLL_US,
    DEFAULT_TAP_IO,
    MAX_BUSY_POLL_US,
    NOTIFY_MODES,
    STEERING_POLICIES,
    TAP_IO_MODES,
)
from vfiouser_net.tap import Tap, TapError, interface_exists
from vfiouser_net.unix_socket import SocketPathError, claim_socket_path
from vfiouser_net.virtio_pci import NO_VECTOR, VirtioPciTransport
from vfiouser_net.virtio_spec import (
    PCI_CLASS_NETWORK_ETHERNET,
    VIRTIO_NET_PCI_DEVICE,
    VIRTIO_PCI_SUBSYS_DEVICE,
    VIRTIO_PCI_VENDOR,
    NetFeature,
    feature_mask,
    feature_names,
)

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

# How long the operator thread waits for the context thread to swap TAP queues.
TAP_REPLACE_TIMEOUT_MS = 5000

_SYSLOG_TO_LOGGING = {0: 50, 1: 50, 2: 50, 3: 40, 4: 30, 5: 20, 6: 20, 7: 10}
_RESET_TYPES = {0: "device", 1: "client lost", 2: "FLR"}


class DeviceError(RuntimeError):
    pass


@dataclass
class DeviceOptions:
    socket_path: str
    tap: str
    mac: bytes
    mtu: int = 1500
    queue_pairs: int = 1
    queue_size: int = 256
    speed_mbps: int = 10000
    steering: str = "auto"
    # Doorbells: "message" (vfio-user region writes, workers sleep between
    # batches) or "poll" (a shared notify page the workers poll: a core each).
    notify_mode: str = "message"
    # Bounded busy-poll before a worker sleeps, in microseconds (0: off).
    busy_poll_us: int = DEFAULT_BUSY_POLL_US
    # Not yet the default: see the README's limits.
    tap_io: str = DEFAULT_TAP_IO
    # Transmit doorbells handled on the context thread while the pair's
    # worker sleeps (one thread wake-up less per request/response). Off by
    # default: its gain was within the noise of this project's measurements.
    tx_inline: bool = False
    name: str = field(default="")
    # A listening socket handed to us (--fd, systemd socket activation)
    # instead of a path to bind.
    listen_fd: int | None = None
    # Its process's budget when it runs in one of its own (isolate); 0: the
    # daemon's default (budget.py).
    nofile: int = 0
    memory_max_mib: int = 0

    def validate(self) -> None:
        if not self.socket_path and self.listen_fd is None:
            raise DeviceError("a device needs a socket path or a listening socket (--fd)")
        if len(self.mac) != 6 or self.mac[0] & 1:
            raise DeviceError("the MAC address must be a unicast address of 6 bytes")
        if not 68 <= self.mtu <= 65535:
            raise DeviceError(f"MTU {self.mtu} out of range 68..65535")
        if not 1 <= self.queue_pairs <= lib.VN_MAX_QUEUE_PAIRS:
            raise DeviceError(f"queue pairs must be 1..{lib.VN_MAX_QUEUE_PAIRS}")
        if self.steering not in STEERING_POLICIES:
            raise DeviceError(
                f"unknown steering policy {self.steering!r} (one of {', '.join(STEERING_POLICIES)})"
            )
        if self.notify_mode not in NOTIFY_MODES:
            raise DeviceError(
                f"unknown notify mode {self.notify_mode!r} (one of {', '.join(NOTIFY_MODES)})"
            )
        if self.tap_io not in TAP_IO_MODES:
            raise DeviceError(
                f"unknown TAP I/O mode {self.tap_io!r} (one of {', '.join(TAP_IO_MODES)})"
            )
        if not 0 <= self.busy_poll_us <= MAX_BUSY_POLL_US:
            raise DeviceError(f"busy-poll time must be 0..{MAX_BUSY_POLL_US} microseconds")
        qs = self.queue_size
        if not 2 <= qs <= lib.VN_VQ_MAX_SIZE or qs & (qs - 1):
            raise DeviceError(f"queue size must be a power of two in 2..{lib.VN_VQ_MAX_SIZE}")


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def parse_mac(text: str) -> bytes:
    # Exactly six pairs of ASCII hex digits: int(x, 16) alone also takes
    # " 1", "+1" or non-ASCII digits.
    parts = text.split(":")
    if len(parts) != 6 or any(len(p) != 2 or not set(p) <= _HEX_DIGITS for p in parts):
        raise DeviceError(
            f"invalid MAC address {text!r} (expected six hex pairs, aa:bb:cc:dd:ee:ff)"
        )
    return bytes(int(p, 16) for p in parts)


def _check_listening_socket(fd: int) -> None:
    """--fd / socket activation must hand us a listening UNIX stream socket."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        raise DeviceError(f"file descriptor {fd}: {exc.strerror}") from exc
    with sock:
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError as exc:
            raise DeviceError(f"file descriptor {fd} is not a socket") from exc
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
            raise DeviceError(
                f"file descriptor {fd} is not a listening UNIX stream socket "
                "(a socket unit needs Accept=no and ListenStream=PATH)"
            )


def _socket_name(fd: int) -> str:
    """The path a handed-over socket is bound to (for logs, ctl, metrics)."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        name = sock.getsockname()
    return name if isinstance(name, str) else ""


def _claim_socket_path(path: str) -> None:
    try:
        claim_socket_path(path)
    except SocketPathError as exc:
        raise DeviceError(str(exc)) from exc


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
        self.operator_link_up = True
        # The TAP was deleted; re-attached when an interface of its name
        # exists again (the daemon does not re-create what an operator deleted).
        self.tap_lost = False
        self._link_lock = threading.Lock()
        self._closed = False
        # Operator calls (admin threads, metrics scrapes, signals) may run
        # while another thread stops the device: they hold a use while they
        # touch the C device, and stop() frees it only when none is left.
        self._uses = 0
        self._uses_cond = threading.Condition()
        self._thread: threading.Thread | None = None
        if opts.listen_fd is not None:
            _check_listening_socket(opts.listen_fd)
            if not opts.socket_path:
                opts.socket_path = _socket_name(opts.listen_fd)
        multiqueue = self.max_qps > 1
        self.offered = OFFERED_FEATURES | (MULTIQUEUE_FEATURES if multiqueue else 0)
        self.tap = Tap(opts.tap, self.max_qps, opts.mtu)
        # UDP segmentation offload only where the host kernel's TAP has it
        # (Linux 6.2): offered or not, never refused after negotiation.
        uso = lib.vn_tap_probe_uso(self.tap.fds[0])
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
            link_up=self.tap.is_up(),
            rss_max_key_size=lib.VN_RSS_MAX_KEY_SIZE if multiqueue else 0,
            rss_max_table_len=lib.VN_RSS_MAX_TABLE if multiqueue else 0,
            supported_hash_types=lib.VN_HASH_TYPES_SUPPORTED if multiqueue else 0,
        )
        self._dev: Any = lib.vn_dev_new(self.max_qps, opts.mac, opts.mtu)
        if self._dev == ffi.NULL:
            self.tap.close()
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
        for qp, fd in enumerate(self.tap.fds):
            lib.vn_dev_set_tap(self._dev, qp, fd)
        try:
            self._use_tap_io(opts.tap_io)
        except DeviceError:
            lib.vn_dev_free(self._dev)
            self.tap.close()
            raise
        lib.vn_dev_request_policy(self._dev, STEERING_POLICIES.index(opts.steering))
        self.transport = VirtioPciTransport(
            self.offered, self.num_queues, opts.queue_size, self.num_vectors, backend=self
        )
        try:
            self._vfu = self._create_context(log_level)
        except Exception:
            lib.vn_dev_free(self._dev)
            self.tap.close()
            raise

    # -- vfio-user context --------------------------------------------------

    def _create_context(self, log_level: int) -> Any:
        fd = self.opts.listen_fd
        if fd is None:
            path = self.opts.socket_path
            _claim_socket_path(path)
        else:
            # libvfio-user (this revision) only binds paths: let it bind a
            # throw-away one, then put the socket we were given in its place.
            tmpdir = tempfile.mkdtemp(prefix="vfiouser-net-")
            path = os.path.join(tmpdir, "unused.sock")
        ctx = lib.vfu_create_ctx(
            lib.VFU_TRANS_SOCK,
            path.encode(),
            lib.LIBVFIO_USER_FLAG_ATTACH_NB,
            self._dev,
            lib.VFU_DEV_TYPE_PCI,
        )
        if ctx == ffi.NULL:
            raise DeviceError(f"cannot listen on {path}: {os.strerror(ffi.errno)}")
        if fd is not None:
            listen_fd = lib.vfu_get_poll_fd(ctx)
            os.dup2(fd, listen_fd)
            os.set_blocking(listen_fd, False)
            if fd != listen_fd:
                os.close(fd)
            os.unlink(path)
            os.rmdir(os.path.dirname(path))
        try:
            self._setup_pci(ctx, log_level)
        except Exception:
            lib.vfu_destroy_ctx(ctx)
            raise
        return ctx

    def _setup_pci(self, ctx: Any, log_level: int) -> None:
        def check(rc: int, what: str) -> None:
            vfu_check(rc, what, DeviceError)

        check(
            lib.vfu_pci_init(ctx, lib.VFU_PCI_TYPE_CONVENTIONAL, lib.PCI_HEADER_TYPE_NORMAL, 0),
            "PCI init",
        )
        lib.vfu_pci_set_id(
            ctx,
            VIRTIO_PCI_VENDOR,
            VIRTIO_NET_PCI_DEVICE,
            VIRTIO_PCI_VENDOR,
            VIRTIO_PCI_SUBSYS_DEVICE,
        )
        lib.vfu_pci_set_class(ctx, *PCI_CLASS_NETWORK_ETHERNET)
        # libvfio-user ignores its revision argument; virtio 1.x wants >= 1.
        cfg = ffi.cast("uint8_t *", lib.vfu_pci_get_config_space(ctx))
        cfg[pci_config.PCI_REVISION_ID_OFFSET] = pci_config.VIRTIO_PCI_REVISION
        caps = pci_config.virtio_caps(
            bar=0,
            common=(lib.VN_COMMON_CFG_OFF, lib.VN_COMMON_CFG_LEN),
            isr=(lib.VN_ISR_OFF, lib.VN_ISR_LEN),
            device=(lib.VN_DEVICE_CFG_OFF, NET_CONFIG_SIZE),
            notify=(lib.VN_NOTIFY_OFF, lib.VN_NOTIFY_LEN),
            notify_multiplier=lib.VN_NOTIFY_MULTIPLIER,
        )
        for cap in caps:
            check(
                lib.vfu_pci_add_capability(ctx, 0, lib.VFU_CAP_FLAG_READONLY, ffi.from_buffer(cap)),
                "adding a virtio capability",
            )
        msix = pci_config.msix_cap(
            self.num_vectors, lib.VN_MSIX_BAR, lib.VN_MSIX_TABLE_OFF, lib.VN_MSIX_PBA_OFF
        )
        check(lib.vfu_pci_add_capability(ctx, 0, 0, ffi.from_buffer(msix)), "adding MSI-X")
        lib.vn_dev_set_busy_poll(self._dev, self.opts.busy_poll_us)
        lib.vn_dev_set_tx_inline(self._dev, self.opts.tx_inline)
        if self.opts.notify_mode == "poll":
            vn_check(
                lib.vn_dev_enable_notify_polling(self._dev), "doorbell polling page", DeviceError
            )
        syslog_level = {10: 7, 20: 6, 30: 4, 40: 3, 50: 2}.get(log_level, 6)
        vn_check(lib.vn_server_setup(self._dev, ctx, syslog_level), "device setup", DeviceError)
        check(lib.vfu_realize_ctx(ctx), "realizing the device")

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
        log.info("device %s: final counters %s", self.name, json.dumps(self._snapshot()))
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
            self._config_changed()
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
            while self._steering()["policy"] != policy and time.monotonic() < deadline:
                time.sleep(0.005)

    def steering(self) -> dict[str, Any]:
        with self._in_use():
            return self._steering()

    def _steering(self) -> dict[str, Any]:
        info = ffi.new("struct vn_steer_info *")
        lib.vn_dev_get_steering(self._dev, info)
        return {
            "policy": ffi.string(lib.vn_policy_name(info.policy)).decode(),
            "effective": ffi.string(lib.vn_policy_name(info.effective)).decode(),
            "active_queue_pairs": int(info.active_qps),
            "max_queue_pairs": int(info.max_qps),
            "switches": int(info.epoch),
            "rss": {
                "configured": bool(info.rss_configured),
                "hash_types": int(info.hash_types),
                "table": [int(info.table[i]) for i in range(info.table_len)]
                if info.rss_configured
                else [],
                "unclassified_queue": int(info.unclassified),
                "key": bytes(info.key[0 : info.key_len]).hex(),
            },
        }

    def set_config_vector(self, vector: int) -> None:
        lib.vn_dev_set_config_vector(self._dev, vector)

    def needs_reset(self) -> bool:
        return bool(lib.vn_dev_get_needs_reset(self._dev))

    def raise_isr(self, bits: int) -> None:
        lib.vn_dev_raise_isr(self._dev, bits)

    def take_isr(self) -> int:
        return int(lib.vn_dev_take_isr(self._dev))

    # -- hooks from C ----------------------------------------------------------

    def bar_access(self, offset: int, buf: Any, count: int, is_write: bool) -> int:
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
            image = self._device_config().ljust(lib.VN_DEVICE_CFG_LEN, b"\0")
            data = image[rel : rel + count].ljust(count, b"\0")
        if not is_write:
            ffi.memmove(buf, data, count)
        return 0

    def _device_config(self) -> bytes:
        mac = ffi.new("uint8_t[6]")
        lib.vn_dev_get_mac(self._dev, mac)
        self.config.mac = bytes(mac)
        self.config.announce = bool(lib.vn_dev_get_announce(self._dev))
        return self.config.pack()

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
        self.operator_link_up = up
        self.poll_link()

    def poll_link(self) -> None:
        """Follow the operator's switch and the TAP's IFF_UP."""
        with self._in_use():
            self._poll_link()

    def _poll_link(self) -> None:
        with self._link_lock:
            self._follow_tap()
            self._apply_link()

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
        if not interface_exists(self.opts.tap):
            return
        try:
            new = Tap(self.opts.tap, self.max_qps, self.opts.mtu, create=False)
        except TapError as exc:
            log.warning("device %s: cannot re-attach TAP %s yet: %s", self.name, self.opts.tap, exc)
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

    def _apply_link(self) -> None:
        up = self.operator_link_up and not self.tap_lost and self.tap.is_up()
        if up == self.config.link_up:
            return
        log.info("device %s: link %s", self.name, "up" if up else "down")
        self.config.link_up = up
        lib.vn_dev_set_link(self._dev, up)
        if up and self.transport.negotiated >> NetFeature.GUEST_ANNOUNCE & 1:
            lib.vn_dev_set_announce(self._dev, True)
        self._config_changed()

    def announce(self) -> None:
        lib.vn_dev_set_announce(self._dev, True)
        self._config_changed()

    def _config_changed(self) -> None:
        vector = self.transport.config_changed()
        if vector != NO_VECTOR:
            lib.vn_irq_raise(self._dev, vector)

    # -- observation ---------------------------------------------------------------

    def queue_stats(self, qp: int) -> dict[str, dict[str, Any]]:
        return counters.queue_stats(self._dev, qp)

    def ctrl_stats(self) -> dict[str, Any]:
        return counters.ctrl_stats(self._dev)

    def device_stats(self) -> dict[str, Any]:
        return counters.device_stats(self._dev)

    def rx_filter(self) -> dict[str, Any]:
        return counters.rx_filter(self._dev)

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

    def snapshot(self) -> dict[str, Any]:
        with self._in_use():
            return self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        t = self.transport
        return {
            "name": self.name,
            "socket": self.opts.socket_path,
            "tap": self.tap.name,
            "connected": self.connected,
            "status": int(t.device_status()),
            "features": feature_names(t.negotiated),
            "offered_features": feature_names(self.offered),
            "link_up": self.config.link_up,
            "tap_lost": self.tap_lost,
            "mtu": self.opts.mtu,
            "tap_io": self.tap_io,
            "queue_pairs": self.max_qps,
            "steering": self._steering(),
            "rx_filter": self.rx_filter(),
            "queues": [self.queue_stats(i) for i in range(self.max_qps)],
            "ctrl": self.ctrl_stats(),
            "device": self.device_stats(),
        }


# Callbacks from C: find the device through the handle and never let an
# exception escape into C (cffi would print it and return 0).


def _callback_error(exc: type[BaseException], value: BaseException, tb: Any) -> None:
    log.error("control plane callback failed", exc_info=(exc, value, tb))


@ffi.def_extern(onerror=_callback_error, error=-1)  # type: ignore[untyped-decorator]
def vn_py_bar_access(py: Any, offset: int, buf: Any, count: int, is_write: int) -> int:
    dev: VirtioNetDevice = ffi.from_handle(py)
    return dev.bar_access(offset, buf, count, bool(is_write))


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


__all__ = ["DeviceError", "DeviceOptions", "VirtioNetDevice", "format_mac", "parse_mac"]
