"""Issue #15's packaging proof: ``pip wheel .`` gives a wheel that installs
into a fresh venv and runs there, on its own.

- The extension has libvfio-user linked in: no RUNPATH or RPATH into the
  set-up's cache, none of the libraries it loads lives there, and none of
  libvfio-user's symbols is exported (json-c, liburing and
  libc come from the system, as Debian's libjson-c5 and liburing2).
- ``vfiouser-net --print-capabilities`` from the fresh venv works.
- A daemon run by the fresh venv's interpreter serves a real guest (QEMU,
  Linux) that pings the host side of its TAP, and its process maps the
  wheel's extension, not the set-up's.

The wheel is built from a copy of the project's files (not in the checkout,
which the editable install owns) by pip with build isolation (its build
requirements from PyPI, as anyone building the wheel gets them); the fresh
venv gets cffi, msgpack and prometheus-client from PyPI. Runs in the production phase of
scripts/test.sh (a sanitized daemon would need ASan preloaded).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from vfiouser_net_harness.prereq import VN_CACHE
from vfiouser_net_harness.scenarios import guest_on_vfiouser_net

from tests.e2e.stack import check_prerequisites

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]

# What a wheel is built from: the package metadata and the package itself.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "vfiouser_net")
# Build products of the checkout's own (editable, maybe sanitized) builds.
NOT_SOURCES = shutil.ignore_patterns("*.so", "build", "build-san", "__pycache__", "_native.c")


def _run(argv: list[str | Path], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, check=False, env=env
    )
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return str(proc.stdout)


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=NOT_SOURCES)
        else:
            shutil.copy2(path, src / name)
    env = {**os.environ, "LIBVFIO_USER_PREFIX": str(VN_CACHE / "libvfio-user" / "prefix")}
    env.pop("VN_SANITIZE", None)
    out = tmp / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, src], env=env)
    wheels = sorted(out.glob("vfiouser_net-*.whl"))
    assert len(wheels) == 1, wheels
    log.info("built %s (%d KiB)", wheels[0].name, wheels[0].stat().st_size // 1024)
    return wheels[0]


def _fresh_venv(tmp: Path, wheel: Path) -> Path:
    venv = tmp / "venv"
    # The interpreter the set-up uses, but none of its venv's packages.
    base = Path(sys.base_prefix) / "bin" / "python3"
    _run([base, "-m", "venv", venv])
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, wheel])
    return venv


def _extension(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages/vfiouser_net/_native*.so"))
    assert len(found) == 1, found
    return found[0]


def test_wheel_installs_and_runs_on_its_own(tmp_path: Path) -> None:
    check_prerequisites()
    wheel = _build_wheel(tmp_path)
    venv = _fresh_venv(tmp_path, wheel)
    ext = _extension(venv)

    # Linked in, not looked up: no run-time search path into the cache (an
    # interpreter built with an rpath, as pyenv's, passes its own libdir on
    # to extensions: that one is not ours), no library of the cache.
    dynamic = _run(["readelf", "-d", ext])
    assert str(VN_CACHE) not in dynamic, dynamic
    assert "libvfio-user" not in dynamic, dynamic
    ldd = _run(["ldd", ext])
    log.info("ldd %s:\n%s", ext.name, ldd)
    assert "not found" not in ldd, ldd
    assert str(VN_CACHE) not in ldd, ldd
    symbols = _run(["nm", "-D", "--defined-only", ext])
    assert "vfu_create_ctx" not in symbols, "libvfio-user's API is exported from the extension"

    # The console script of the fresh venv.
    caps = json.loads(_run([venv / "bin" / "vfiouser-net", "--print-capabilities"]))
    log.info("capabilities from the wheel: %s", caps)
    assert caps["device"] == {"vendor": "0x1af4", "device": "0x1041"}, caps

    # A daemon from the fresh venv, a real guest on it.
    python = venv / "bin" / "python"
    with guest_on_vfiouser_net(python=python, server_env={"PYTHONPATH": ""}) as (
        guest,
        ns,
        server,
    ):
        assert server.proc is not None
        maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
        assert str(ext) in maps, f"the daemon does not run {ext}"
        assert str(VN_CACHE / "libvfio-user") not in maps, "the daemon maps the cache's library"
        out = guest.check(f"ping -c 10 -i 0.1 -W 2 {ns.host_addr}")
        assert " 0% packet loss" in out, out
