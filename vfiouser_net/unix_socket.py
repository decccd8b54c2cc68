"""Taking over a UNIX socket path: a daemon restarted after a crash finds its
old socket file; it may replace it, but never a live server's or another file."""

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
