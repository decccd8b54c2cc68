"""One vfio-user socket shared by the attacks and the healthy traffic."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

from vfiouser_net_harness import vfio_user_client as vu


class LockedClient(vu.VfioUserClient):
    """The vfio-user client with every exchange on the socket under one lock
    (the attacks and the healthy traffic share the connection)."""

    def __init__(self, path: str | os.PathLike[str], **kwargs: Any) -> None:
        self.lock = threading.RLock()
        super().__init__(path, **kwargs)

    def send_raw(self, data: bytes, fds: Sequence[int] = (), timeout: float | None = None) -> None:
        with self.lock:
            super().send_raw(data, fds, timeout)

    def request(
        self,
        cmd: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        no_reply: bool = False,
        msg_id: int | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> vu.Message | None:
        with self.lock:
            return super().request(
                cmd, payload, fds, no_reply=no_reply, msg_id=msg_id, timeout=timeout, check=check
            )

    def serve(self, timeout: float = 0.0, max_requests: int | None = None) -> int:
        with self.lock:
            return super().serve(timeout, max_requests)
