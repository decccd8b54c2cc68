"""Fixtures for the end-to-end tests: cached QEMU/guest/libvfio-user paths,
network namespaces with a TAP, and guests.

What the tests need comes from scripts/setup.sh (in $VN_CACHE, default
/var/cache/vfiouser-net). When something is missing the tests are skipped
with the reason, except under CI (CI=true), where a missing piece is a
failure: CI must have run the set-up.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vfiouser_net_harness.guest import Guest, GuestPaths
from vfiouser_net_harness.netns import NetNS, Tap, create_netns, netns_with_tap
from vfiouser_net_harness.prereq import require_host_network

from tests.e2e.stack import require

log = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def vn_cache() -> Path:
    return Path(os.environ.get("VN_CACHE", "/var/cache/vfiouser-net"))


@pytest.fixture(scope="session")
def guest_paths(vn_cache: Path) -> GuestPaths:
    paths = GuestPaths.from_cache(vn_cache)
    missing = paths.missing()
    require(not missing, f"missing {', '.join(map(str, missing))}")
    return paths


@pytest.fixture(scope="session")
def qemu_bin(guest_paths: GuestPaths) -> Path:
    return guest_paths.qemu


@pytest.fixture(scope="session")
def guest_kernel_version(vn_cache: Path, guest_paths: GuestPaths) -> str:
    f = vn_cache / "guest" / "KERNEL_VERSION"
    require(f.is_file(), f"missing {f}")
    return f.read_text().strip()


@pytest.fixture(scope="session")
def libvfio_user_prefix(vn_cache: Path) -> Path:
    prefix = vn_cache / "libvfio-user" / "prefix"
    header = prefix / "include" / "vfio-user" / "libvfio-user.h"
    lib = prefix / "lib" / "libvfio-user.so"
    require(header.is_file() and lib.exists(), f"libvfio-user not built in {prefix}")
    return prefix


@pytest.fixture(scope="session")
def libvfio_user_build(vn_cache: Path) -> Path:
    """libvfio-user's build directory (samples/server, samples/gpio-pci-idio-16...)."""
    build = vn_cache / "libvfio-user" / "build"
    require((build / "samples" / "server").exists(), f"libvfio-user samples not built in {build}")
    return build


@pytest.fixture(scope="session")
def netns_capable() -> None:
    """Root and the tools needed for namespaces, TAPs and iperf3."""
    require_host_network("ip", "iperf3", "ss", "ping")


@pytest.fixture
def netns_tap(netns_capable: None) -> Iterator[tuple[NetNS, Tap]]:
    """A fresh namespace (10.201.N.0/24) with TAP vntap0 at 10.201.N.1."""
    with netns_with_tap("vntap0") as (ns, tap):
        yield ns, tap


@pytest.fixture
def guest_factory(guest_paths: GuestPaths, tmp_path: Path) -> Iterator[Callable[..., Guest]]:
    """Start guests that are always stopped at the end of the test.

    Call it with Guest's keyword arguments; it returns a started Guest. The
    console log is under the test's tmp_path and is logged on failure.
    """
    guests: list[Guest] = []

    def start(**kwargs: object) -> Guest:
        name = str(kwargs.pop("name", f"guest{len(guests)}"))
        guest = Guest(paths=guest_paths, workdir=tmp_path / name, name=name, **kwargs)  # type: ignore[arg-type]
        guests.append(guest)
        return guest.start()

    yield start
    for guest in guests:
        guest.close()
        log.info("%s console log: %s", guest.name, guest.console_log)


@pytest.fixture
def ns(netns_capable: None) -> Iterator[NetNS]:
    """A fresh network namespace of the test's own, IPv6 off (no router
    solicitations or DAD in the captures), deleted after it with whatever
    the test put in it."""
    n = create_netns()
    try:
        for conf in ("all", "default"):
            n.run(["sysctl", "-qw", f"net.ipv6.conf.{conf}.disable_ipv6=1"], check=False)
        yield n
    finally:
        n.delete()
