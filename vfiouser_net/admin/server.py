"""The admin socket: a UNIX stream socket serving the admin protocol.

    server = start_admin_server("/run/vfiouser-net/admin.sock", daemon, group="kvm")
    ...
    server.close()

- The socket is mode 0600 (0660 and owned by `group` when one is given). A
  stale socket left by a dead daemon is replaced; a live one is refused.
- Each connection's peer is checked with SO_PEERCRED: root, the daemon's own
  uid, or (with a group) a member of the group. Anyone else is closed on
  without a reply, and logged.
- One thread per connection, at most `max_connections` at a time (others get
  a "busy" error and are closed). A connection idle for `read_timeout`, or
  taking longer than that to send one frame, is closed.
- Nothing a client sends reaches the daemon unless it is a well-formed,
  valid request: garbage gets an error reply (or, when the stream cannot be
  trusted any more, a close), and every failure stays in its connection.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import select
import socket
import struct
import threading
from typing import Any

from vfiouser_net.admin import protocol as p
from vfiouser_net.admin.commands import CaptureHook, CommandError, Commands, DaemonLike, Peer
from vfiouser_net.unix_socket import SocketPathError, claim_socket_path

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 16
DEFAULT_READ_TIMEOUT = 30.0
_UCRED = struct.Struct("3i")


class AdminServerError(RuntimeError):
    pass


def _resolve_group(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        pass
    if group.isdigit():
        return int(group)
    raise AdminServerError(f"admin socket: unknown group {group!r}")


def _claim_socket_path(path: str) -> None:
    try:
        claim_socket_path(path)
    except SocketPathError as exc:
        raise AdminServerError(f"admin socket: {exc}") from exc


def _proc_groups(pid: int) -> set[int]:
    """The supplementary groups of a live process (empty if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def _in_group(uid: int, gid: int, pid: int, group_gid: int) -> bool:
    if gid == group_gid or group_gid in _proc_groups(pid):
        return True
    try:
        user = pwd.getpwuid(uid).pw_name
        return user in grp.getgrgid(group_gid).gr_mem
    except KeyError:
        return False


class AdminServer:
    """A listening admin socket and its connection threads; close() stops it all."""

    def __init__(
        self,
        path: str,
        daemon: DaemonLike,
        group: str | None = None,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        capture: CaptureHook | None = None,
        start: bool = True,
    ) -> None:
        self.path = path
        self.commands = Commands(daemon, capture)
        self.max_connections = max_connections
        self.read_timeout = read_timeout
        self.group_gid = _resolve_group(group) if group is not None else None
        self._uid = os.geteuid()
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._closing = False
        self._listener = self._listen()
        self._inode = os.stat(path).st_ino
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._accept_loop, name="admin-accept", daemon=True)
        if start:
            self.start()
        log.info(
            "admin socket: listening on %s (mode %s%s)",
            path,
            "0660" if self.group_gid is not None else "0600",
            f", group {group}" if group is not None else "",
        )

    def start(self) -> None:
        """Accept connections (a server made with start=False listens, but
        answers nobody until this)."""
        if not self._thread.is_alive() and self._thread.ident is None:
            self._thread.start()

    # -- setup -------------------------------------------------------------------------

    def _listen(self) -> socket.socket:
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        _claim_socket_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            # Permissions before listen(): nobody can connect until then.
            try:
                if self.group_gid is not None:
                    os.chown(self.path, -1, self.group_gid)
                    os.chmod(self.path, 0o660)
                else:
                    os.chmod(self.path, 0o600)
                sock.listen(self.max_connections)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
                raise
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise AdminServerError(
                f"admin socket: cannot listen on {self.path}: {exc.strerror or exc}"
            ) from exc
        return sock

    # -- connections -------------------------------------------------------------------

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def _accept_loop(self) -> None:
        # poll, not select: a daemon with many devices has descriptors past FD_SETSIZE.
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            try:
                events = poller.poll()
            except InterruptedError:
                continue
            except OSError as exc:
                log.error("admin socket: poll failed, no longer accepting: %s", exc)
                return
            if self._closing or any(fd == self._wake_r for fd, _ in events):
                return
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:
                # Out of descriptors and such: wait rather than spin.
                log.error("admin socket: accept failed: %s", exc)
                if self._wait_closing(0.5):
                    return
                continue
            try:
                self._admit(conn)
            except Exception:
                log.exception("admin socket: cannot start a connection")
                conn.close()

    def _wait_closing(self, seconds: float) -> bool:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        return bool(poller.poll(seconds * 1000)) or self._closing

    def _admit(self, conn: socket.socket) -> None:
        pid, uid, gid = _UCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        peer = Peer(pid, uid, gid)
        if not self._allowed(peer):
            log.warning(
                "admin socket: refused connection from pid %d uid %d gid %d (not root, uid %d%s)",
                pid,
                uid,
                gid,
                self._uid,
                f" or group {self.group_gid}" if self.group_gid is not None else "",
            )
            conn.close()
            return
        conn.setblocking(True)
        thread = threading.Thread(
            target=self._serve, args=(conn, peer), name=f"admin-{pid}", daemon=True
        )
        with self._lock:
            closing = self._closing
            busy = len(self._conns) >= self.max_connections
            if not (closing or busy):
                self._conns[conn] = thread
        if closing:
            conn.close()
            return
        if busy:
            log.warning(
                "admin socket: %d connections already, refusing %s", self.max_connections, peer
            )
            self._send(conn, p.error_reply(None, p.BUSY, "too many admin connections; retry"), 1.0)
            conn.close()
            return
        log.debug("admin socket: connection from %s", peer)
        thread.start()

    def _allowed(self, peer: Peer) -> bool:
        if peer.uid in (0, self._uid):
            return True
        if self.group_gid is None:
            return False
        return _in_group(peer.uid, peer.gid, peer.pid, self.group_gid)

    def _serve(self, conn: socket.socket, peer: Peer) -> None:
        try:
            while not self._closing:
                try:
                    body = p.recv_frame(conn, p.MAX_FRAME, self.read_timeout, self.read_timeout)
                except p.FrameTooLarge as exc:
                    log.warning("admin socket: %s from %s; closing", exc, peer)
                    self._send(conn, p.error_reply(None, p.TOO_LARGE, str(exc)), 1.0)
                    return
                except p.TruncatedFrame as exc:
                    log.warning("admin socket: %s (%s)", exc, peer)
                    return
                except TimeoutError:
                    log.debug(
                        "admin socket: %s idle or slow for %g s; closing", peer, self.read_timeout
                    )
                    return
                except OSError as exc:
                    log.debug("admin socket: %s: %s", peer, exc)
                    return
                if body is None:
                    return
                reply = self._handle(body, peer)
                if not self._send(conn, reply, self.read_timeout):
                    return
        except Exception:  # never let a connection take anything else down
            log.exception("admin socket: connection from %s failed", peer)
        finally:
            with self._lock:
                self._conns.pop(conn, None)
            conn.close()

    def _handle(self, body: bytes, peer: Peer) -> dict[str, Any]:
        request_id: int | None = None
        try:
            request = p.parse_request(p.unpack(body))
            request_id = request.id
            result = self.commands.execute(request.cmd, request.args, peer)
            reply = p.ok_reply(request_id, result)
        except p.ProtocolError as exc:
            log.info("admin socket: bad request from %s: %s", peer, exc.message)
            return p.error_reply(exc.request_id, exc.code, exc.message)
        except CommandError as exc:
            log.info("admin socket: %s", exc.message)
            return p.error_reply(request_id, exc.code, exc.message)
        except Exception as exc:
            log.exception("admin socket: command from %s failed", peer)
            return p.error_reply(request_id, p.INTERNAL, f"internal error: {exc}")
        return reply

    def _send(self, conn: socket.socket, reply: dict[str, Any], timeout: float) -> bool:
        try:
            frame = p.encode_frame(reply)
        except Exception as exc:  # a result that cannot be encoded or is too large
            log.error("admin socket: cannot encode a reply: %s", exc)
            frame = p.encode_frame(
                p.error_reply(reply.get("id"), p.INTERNAL, f"cannot encode the reply: {exc}")
            )
        try:
            conn.settimeout(timeout)
            conn.sendall(frame)
        except OSError as exc:
            log.debug("admin socket: cannot send a reply: %s", exc)
            return False
        return True

    # -- shutdown ----------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, remove the socket."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            conns = dict(self._conns)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread.ident is not None:
            self._thread.join(timeout)
        self._listener.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in conns.values():
            thread.join(timeout)
        os.close(self._wake_r)
        os.close(self._wake_w)
        log.info("admin socket: closed %s", self.path)

    def __enter__(self) -> AdminServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_admin_server(
    path: str,
    daemon: DaemonLike,
    group: str | None = None,
    *,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    capture: CaptureHook | None = None,
    start: bool = True,
) -> AdminServer:
    """Listen on path and serve the admin protocol on background threads.

    Raises AdminServerError when the socket cannot be set up (a live daemon
    on it, a non-socket file, an unknown group, permissions).
    """
    return AdminServer(
        path,
        daemon,
        group,
        max_connections=max_connections,
        read_timeout=read_timeout,
        capture=capture,
        start=start,
    )


__all__ = ["AdminServer", "AdminServerError", "start_admin_server"]
