"""One daemon, many devices: the set of devices served, added and removed at
run time, each independent of the others.

A fault in one device (its QEMU killed, a hostile guest, its TAP removed)
stays in that device: each has its own context thread and workers, and the
daemon's own loop only polls links, catching whatever one device raises.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable

from vfiouser_net import options
from vfiouser_net.budget import Budget
from vfiouser_net.device import VirtioNetDevice
from vfiouser_net.device_options import DeviceError, DeviceOptions
from vfiouser_net.device_process import DeviceProcess

# A device served in this process, or in a process of its own.
Device = VirtioNetDevice | DeviceProcess

log = logging.getLogger(__name__)

LINK_POLL_SECONDS = 0.2
SignalHandler = Callable[[signal.Signals], None]
# Level names (options.LOG_LEVELS) to logging's numbers.
LOG_LEVELS = {name: logging.getLevelNamesMapping()[name.upper()] for name in options.LOG_LEVELS}


class DaemonError(RuntimeError):
    pass


class Daemon:
    def __init__(
        self,
        log_level: int = logging.INFO,
        *,
        isolate: bool = False,
        capture_dir: str = "",
        device_budget: Budget | None = None,
    ) -> None:
        self.log_level = log_level
        self.isolate = isolate
        self.capture_dir = capture_dir
        self.device_budget = device_budget or Budget()
        # stop() and the signals wake run() through this pipe. A Python signal
        # handler runs between two bytecodes of the main thread, maybe while
        # that thread holds a lock (threading.Event.set() there deadlocks on
        # the event's own lock, as a SIGTERM that lands inside Event.wait()
        # once did): handlers take no lock, they leave a byte here.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._on_signal: dict[int, SignalHandler] = {}
        self._lock = threading.RLock()
        self._devices: dict[str, Device] = {}
        # The device processes' admin sockets: the supervisor's alone.
        self._run_dir = tempfile.mkdtemp(prefix="vfiouser-net-devices-") if isolate else ""

    def devices(self) -> list[Device]:
        with self._lock:
            return list(self._devices.values())

    def get(self, name: str) -> Device:
        with self._lock:
            dev = self._devices.get(name)
        if dev is None:
            raise DaemonError(f"no device named {name!r}")
        return dev

    def add_device(self, opts: DeviceOptions, *, start: bool = True) -> Device:
        """Create and (unless start=False: see start_devices) start a device;
        its name and socket must be new."""
        with self._lock:
            name = opts.name or opts.socket_path.rsplit("/", 1)[-1] or f"fd{opts.listen_fd}"
            if name in self._devices:
                raise DaemonError(f"a device named {name!r} already exists")
            for other in self._devices.values():
                if opts.socket_path and other.opts.socket_path == opts.socket_path:
                    raise DaemonError(
                        f"socket {opts.socket_path} is already served by {other.name}"
                    )
                if other.opts.tap == opts.tap:
                    raise DaemonError(f"TAP {opts.tap} is already used by {other.name}")
            opts.name = name
            dev: Device
            if self.isolate:
                dev = DeviceProcess(
                    opts,
                    run_dir=self._run_dir,
                    capture_dir=self.capture_dir,
                    log_level=self.log_level,
                    budget=Budget(
                        opts.nofile or self.device_budget.nofile,
                        opts.memory_max_mib or self.device_budget.memory_mib,
                    ),
                )
            else:
                dev = VirtioNetDevice(opts, log_level=self.log_level)
            try:
                if start:
                    dev.start()
            except Exception:
                dev.stop()
                raise
            self._devices[name] = dev
            return dev

    def start_devices(self) -> None:
        """Start the devices added with start=False (their context threads)."""
        for dev in self.devices():
            dev.start()

    def remove_device(self, name: str) -> None:
        with self._lock:
            dev = self._devices.pop(name, None)
        if dev is None:
            raise DaemonError(f"no device named {name!r}")
        dev.stop()

    def set_log_level(self, level: str) -> None:
        if level not in LOG_LEVELS:
            raise DaemonError(f"unknown log level {level!r} (one of {', '.join(LOG_LEVELS)})")
        logging.getLogger().setLevel(LOG_LEVELS[level])
        self.log_level = LOG_LEVELS[level]
        log.info("log level %s", level)
        for dev in self.devices():
            if isinstance(dev, DeviceProcess):
                try:
                    dev.set_log_level(level)
                except DeviceError as exc:
                    log.warning("%s", exc)

    def handle_signals(self, handlers: dict[signal.Signals, SignalHandler]) -> None:
        """Run handlers[sig] on the main thread, in run(), when sig arrives.

        Python's own handler only lets the interpreter note the signal;
        set_wakeup_fd has its number written to the wake pipe (from C), and
        run() reads it there and calls the handler outside any lock."""
        for sig in handlers:
            signal.signal(sig, _noted)
        self._on_signal = {int(sig): fn for sig, fn in handlers.items()}
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def run(self) -> None:
        """Until stop(): follow every device's link (the TAP's IFF_UP) and
        handle the signals of handle_signals()."""
        while not self._stopping:
            ready, _, _ = select.select([self._wake_r], [], [], LINK_POLL_SECONDS)
            if ready:
                self._dispatch_signals()
            if self._stopping:
                break
            for dev in self.devices():
                try:
                    dev.poll_link()
                except Exception:
                    log.exception("device %s: link poll failed", dev.name)

    def _dispatch_signals(self) -> None:
        with contextlib.suppress(BlockingIOError):
            for signum in os.read(self._wake_r, 256):
                handler = self._on_signal.get(signum)
                if handler is None:
                    continue
                try:
                    handler(signal.Signals(signum))
                except Exception:
                    log.exception("handling %s failed", signal.Signals(signum).name)

    def stop(self) -> None:
        """Make run() return. Any thread, also a signal handler: no lock."""
        self._stopping = True
        with contextlib.suppress(BlockingIOError):
            if self._wake_w >= 0:  # not yet shut down
                os.write(self._wake_w, b"\0")

    def shutdown(self) -> None:
        """Stop every device (workers, guest memory, sockets)."""
        for dev in self.devices():
            try:
                self.remove_device(dev.name)
            except (DaemonError, DeviceError):
                log.exception("device %s: stop failed", dev.name)
        if self._run_dir:
            shutil.rmtree(self._run_dir, ignore_errors=True)
        if self._on_signal:
            signal.set_wakeup_fd(-1)
        wake_r, wake_w = self._wake_r, self._wake_w
        self._wake_r = self._wake_w = -1
        os.close(wake_r)
        os.close(wake_w)


def _noted(signum: int, frame: object) -> None:
    """Python's handler for the signals of Daemon.handle_signals: nothing to
    do here, set_wakeup_fd has told run()."""
