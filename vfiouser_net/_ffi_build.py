"""cffi (API mode) build of vfiouser_net._native: the C datapath plus the
libvfio-user calls the control plane makes.

The datapath is compiled by csrc/Makefile (strict C11 flags, -Werror) into a
static library; this script only links it with cffi's generated glue, which
is not held to -Werror. LIBVFIO_USER_PREFIX points at the libvfio-user build
(scripts/setup/libvfio-user.sh): its static, position-independent library is
linked into the extension, so the extension needs nothing of that build at
run time (no rpath into the cache; a wheel runs on any host with json-c and
liburing, Debian's libjson-c5 and liburing2). VN_SANITIZE=1 builds with ASan
and UBSan.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"
PREFIX = Path(os.environ.get("LIBVFIO_USER_PREFIX", "/var/cache/vfiouser-net/libvfio-user/prefix"))
SANITIZE = os.environ.get("VN_SANITIZE") == "1"


def _decls() -> str:
    return "\n".join(
        (HERE / "decl" / name).read_text() for name in ("libvfio_user.h", "datapath.h", "sandbox.h")
    )


LIBVFIO_USER_STATIC = PREFIX / "lib" / "libvfio-user.a"


def _build_datapath() -> Path:
    if not (PREFIX / "include" / "vfio-user" / "libvfio-user.h").exists():
        raise SystemExit(
            f"libvfio-user not found under {PREFIX}: run scripts/setup.sh "
            "or set LIBVFIO_USER_PREFIX"
        )
    if not LIBVFIO_USER_STATIC.exists():
        raise SystemExit(
            f"{LIBVFIO_USER_STATIC} missing (a build from before the static library): "
            "run scripts/setup.sh"
        )
    args = ["make", "-s", "-C", str(CSRC), f"LIBVFIO_USER_PREFIX={PREFIX}"]
    if SANITIZE:
        args.append("SAN=1")
    subprocess.run(args, check=True)
    return CSRC / ("build-san" if SANITIZE else "build") / "libvndp.a"


ffibuilder = FFI()
ffibuilder.cdef(_decls())

_san_flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"] if SANITIZE else []
ffibuilder.set_source(
    "vfiouser_net._native",
    """
    #include <stdbool.h>
    #include <linux/pci_regs.h>
    #include "libvfio-user.h"
    #include "capture.h"
    #include "device_api.h"
    #include "irq.h"
    #include "layout.h"
    #include "server.h"
    #include "rss_hash.h"
    #include "sandbox.h"
    #include "steering.h"
    #include "tap.h"
    #include "tap_batch.h"
    #include "virtq.h"
    """,
    include_dirs=[str(CSRC), str(PREFIX / "include"), str(PREFIX / "include" / "vfio-user")],
    # The datapath first: it takes from libvfio-user, which takes from json-c.
    extra_objects=[str(_build_datapath()), str(LIBVFIO_USER_STATIC)],
    # liburing: batched TAP writes (csrc/tap_batch.c).
    libraries=["json-c", "uring", "pthread"],
    extra_compile_args=["-std=gnu11", "-D_GNU_SOURCE", *_san_flags],
    # libvfio-user stays private to the extension: none of its symbols exported.
    extra_link_args=["-Wl,--exclude-libs,ALL", *_san_flags],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
