"""The compiled extension (C datapath + libvfio-user), imported in one place,
and the one place where its return codes become Python exceptions."""

from __future__ import annotations

import os

from vfiouser_net._native import ffi, lib

__all__ = ["ffi", "lib", "vfu_check", "vn_check"]


def vn_check(rc: int, what: str, error: type[Exception] = OSError) -> int:
    """A datapath call (vn_*): 0 or more, or -errno raised as error."""
    if rc < 0:
        raise error(f"{what}: {os.strerror(-rc)}")
    return rc


def vfu_check(rc: int, what: str, error: type[Exception] = OSError) -> int:
    """A libvfio-user call (vfu_*): 0 or more, or -1 with errno, raised as error."""
    if rc < 0:
        raise error(f"{what} failed: {os.strerror(ffi.errno)}")
    return rc
