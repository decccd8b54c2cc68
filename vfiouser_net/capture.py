"""Packet capture to a pcap file: the datapath copies frames of a device (or of
one queue pair) to a datagram socket; this module reads them and writes a
classic pcap file (Ethernet link type), bounded by a count and a time.

Files are created only in the daemon's capture directory, under a plain file
name from the client: the daemon's user may write where the client may not."""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vfiouser_net.admin.protocol import file_name_problem
from vfiouser_net.native import ffi, lib

# The capture directory without --capture-dir or capture_dir: systemd's
# StateDirectory= when it set one ($STATE_DIRECTORY), else this.
DEFAULT_CAPTURE_DIR = "/var/lib/vfiouser-net"
# A capture asked for by count alone still ends; one asked by time alone
# takes whatever arrives.
CAPTURE_MAX_SECONDS = 600.0
CAPTURE_MAX_FRAMES = 10_000_000
PCAP_MAGIC_NS = 0xA1B23C4D  # nanosecond timestamps
LINKTYPE_ETHERNET = 1
_HDR = struct.Struct("<IIQII")


class CaptureError(RuntimeError):
    pass


def default_capture_dir() -> str:
    state = os.environ.get("STATE_DIRECTORY", "")
    return state.split(":")[0] if state else DEFAULT_CAPTURE_DIR


def create_capture_file(directory: str | Path, name: str) -> tuple[int, str]:
    """Create the new file name in directory: (a write fd, its full path).

    The name is one component (checked again here, whoever called), opened
    relative to the directory's fd with O_CREAT|O_EXCL|O_NOFOLLOW: never a
    file outside it, never through a link planted in it, never one that
    exists already. Mode 0640.
    """
    problem = file_name_problem(name)
    if problem is not None:
        raise CaptureError(f"file {problem}")
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise CaptureError(
            f"capture directory {directory}: {exc.strerror} (see serve --capture-dir)"
        ) from exc
    path = os.path.join(directory, name)
    try:
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o640,
            dir_fd=dir_fd,
        )
    except OSError as exc:
        raise CaptureError(f"cannot create {path}: {exc.strerror}") from exc
    finally:
        os.close(dir_fd)
    return fd, path


_busy: set[int] = set()
_busy_lock = threading.Lock()


def capture_to_pcap(
    dev_handle: Any,
    directory: str | Path,
    name: str,
    *,
    queue: int = -1,
    count: int = 100,
    seconds: float = 10.0,
    stopped: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Capture up to `count` frames or for `seconds`, whichever ends first.

    dev_handle is the C device (VirtioNetDevice._dev); the pcap file is the
    new file name in directory (create_capture_file). Returns counts and the
    full path written.
    """
    if count <= 0 or seconds <= 0:
        raise CaptureError("capture needs a positive count and duration")
    key = int(ffi.cast("uintptr_t", dev_handle))
    with _busy_lock:
        if key in _busy:
            raise CaptureError("a capture is already running on this device")
        _busy.add(key)
    fd = lib.vn_capture_recv_fd(dev_handle)
    try:
        if fd < 0:
            raise CaptureError("capture is unavailable on this device")
        _drain(fd)
        before = ffi.new("uint64_t[2]")
        lib.vn_capture_counts(dev_handle, before, before + 1)
        # Before the capture starts: a refused file leaves nothing capturing.
        fd_out, path = create_capture_file(directory, name)
        written = 0
        deadline = time.monotonic() + seconds
        # poll, not select: a daemon with many devices has fds past FD_SETSIZE.
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        with os.fdopen(fd_out, "wb") as out:
            out.write(
                struct.pack(
                    "<IHHiIII",
                    PCAP_MAGIC_NS,
                    2,
                    4,
                    0,
                    0,
                    int(lib.VN_CAPTURE_SNAPLEN),
                    LINKTYPE_ETHERNET,
                )
            )
            if lib.vn_capture_start(dev_handle, queue, count) < 0:
                raise CaptureError(f"no queue pair {queue}")
            try:
                while written < count and not stopped():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    if not poller.poll(int(min(left, 0.2) * 1000)):
                        continue
                    data = _recv(fd)
                    if len(data) < _HDR.size:
                        continue
                    _qp, _direction, ts, orig_len, _ = _HDR.unpack_from(data)
                    frame = data[_HDR.size :]
                    out.write(
                        struct.pack(
                            "<IIII", ts // 1_000_000_000, ts % 1_000_000_000, len(frame), orig_len
                        )
                    )
                    out.write(frame)
                    written += 1
            finally:
                lib.vn_capture_stop(dev_handle)
        after = ffi.new("uint64_t[2]")
        lib.vn_capture_counts(dev_handle, after, after + 1)
        return {
            "file": path,
            "frames": written,
            "missed": int(after[1] - before[1]),
        }
    finally:
        with _busy_lock:
            _busy.discard(key)


def _recv(fd: int) -> bytes:
    # The fd stays the device's: read it through a duplicate.
    with socket.socket(fileno=os.dup(fd)) as s:
        return s.recv(256 * 1024)


def _drain(fd: int) -> None:
    """Forget frames left from an earlier capture."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while poller.poll(0):
        _recv(fd)
