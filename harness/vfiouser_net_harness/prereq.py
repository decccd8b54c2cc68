"""The rule for a missing prerequisite, in one place: the test is skipped,
except under CI=true, where it fails (CI must run everything)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
VN_CACHE = Path(os.environ.get("VN_CACHE", "/var/cache/vfiouser-net"))
SETUP_HINT = "run: sudo bash scripts/setup.sh"


def require(ok: bool, what: str, hint: str = "") -> None:
    """Skip the test when ok is false (fail it under CI=true); hint says how
    to get what is missing."""
    if ok:
        return
    message = f"{what} ({hint})" if hint else what
    if IN_CI:
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def require_host_network(*tools: str) -> None:
    """Root, /dev/net/tun and these tools: what network namespaces and TAPs
    of a test need."""
    require(os.geteuid() == 0, "needs root (network namespaces, TAP devices)", SETUP_HINT)
    for tool in tools:
        require(shutil.which(tool) is not None, f"{tool} not installed", SETUP_HINT)
    require(Path("/dev/net/tun").exists(), "/dev/net/tun missing", SETUP_HINT)
