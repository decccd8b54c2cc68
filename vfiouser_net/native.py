"""The compiled extension (C datapath + libvfio-user), imported in one place."""

from __future__ import annotations

from vfiouser_net._native import ffi, lib

__all__ = ["ffi", "lib"]
