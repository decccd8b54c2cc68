"""Fixtures for the protocol tests (see support.py).

Also attaches the daemon's log to the report of a failed test.
"""

import contextlib
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest
from vfiouser_net_harness import vfio_user_client as vu

from tests.protocol.lvu_sample import SampleServer
from tests.protocol.support import (
    DeviceEnv,
    GuestSession,
    check_prerequisites,
    device_env,
    open_session,
)

_ENV_KEY = pytest.StashKey[DeviceEnv]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    rep = outcome.get_result()
    env = item.stash.get(_ENV_KEY, None)
    if env is not None and rep.failed and call.when in ("call", "teardown"):
        rep.sections.append(("vfiouser-net server log", env.log()[-8000:]))


@pytest.fixture
def env(request: pytest.FixtureRequest) -> Iterator[DeviceEnv]:
    """A daemon serving a TAP in a fresh namespace (see support.device_env)."""
    check_prerequisites()
    with device_env() as e:
        request.node.stash[_ENV_KEY] = e
        yield e


@pytest.fixture
def env_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., DeviceEnv]]:
    """Start daemons with other options:
    ``env_factory("--queue-pairs", "4", multi_queue=True)``."""
    check_prerequisites()
    with contextlib.ExitStack() as stack:

        def make(*extra_args: str, multi_queue: bool = False) -> DeviceEnv:
            e = stack.enter_context(device_env(extra_args=extra_args, multi_queue=multi_queue))
            request.node.stash[_ENV_KEY] = e
            return e

        yield make


@pytest.fixture
def session(env: DeviceEnv) -> Iterator[GuestSession]:
    """A connected client with 8 MiB of mapped guest memory and a driver (not yet up)."""
    s = open_session(env)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def sample_server(tmp_path: Path) -> Iterator[SampleServer]:
    """libvfio-user's sample server (tests/protocol/lvu_sample.py)."""
    s = SampleServer(tmp_path)
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            s.proc.terminate()
        s.stop()


@pytest.fixture
def sample_client(sample_server: SampleServer) -> Iterator[vu.VfioUserClient]:
    """A negotiated client of the sample server."""
    c = vu.VfioUserClient(sample_server.sock, timeout=5)
    try:
        c.negotiate()
        yield c
    finally:
        c.close()
