"""UNIX sockets of the device: taking over a socket path (a daemon restarted
after a crash finds its old socket file; it may replace it, but never a live
server's or another file), and checking a socket handed over (--fd, systemd
socket activation)."""

from __future__ import annotations

import logging
import os
import socket
import stat

log = logging.getLogger(__name__)


class SocketPathError(RuntimeError):
    pass


def claim_socket_path(path: str) -> None:
    """Remove a stale socket left by a dead server; refuse a live one or another file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
            log.info("removed stale socket %s", path)
            return
    raise SocketPathError(f"{path} is already served by another process")


def check_listening_socket(fd: int) -> None:
    """--fd / socket activation must hand us a listening UNIX stream socket."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        raise SocketPathError(f"file descriptor {fd}: {exc.strerror}") from exc
    with sock:
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError as exc:
            raise SocketPathError(f"file descriptor {fd} is not a socket") from exc
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
            raise SocketPathError(
                f"file descriptor {fd} is not a listening UNIX stream socket "
                "(a socket unit needs Accept=no and ListenStream=PATH)"
            )


def socket_name(fd: int) -> str:
    """The path a handed-over socket is bound to (for logs, ctl, metrics)."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        name = sock.getsockname()
    return name if isinstance(name, str) else ""
