#!/usr/bin/env bash
# The datapath built with ASan and UBSan under the protocol and end-to-end
# tests (the C unit tests already run sanitized in scripts/test.sh). Builds a
# sanitized copy of the package in a scratch directory, puts it first on
# PYTHONPATH and preloads the ASan runtime into every process the tests start
# (daemons included). Extra arguments go to pytest (default: the unit,
# protocol and end-to-end tests but the soak and the benchmark smoke runs,
# whose figures mean nothing under the sanitizers; scripts/test.sh runs those
# against the production build).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
bash "$HERE/setup.sh"
VN_CACHE=${VN_CACHE:-/var/cache/vfiouser-net}
VENV=$VN_CACHE/venv
WORK=$(mktemp -d /tmp/vn-asan.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
cp -r "$REPO/vfiouser_net" "$WORK/"
rm -f "$WORK"/vfiouser_net/_native*.so
rm -rf "$WORK"/vfiouser_net/csrc/build "$WORK"/vfiouser_net/csrc/build-san
(cd "$WORK" && VN_SANITIZE=1 LIBVFIO_USER_PREFIX=$VN_CACHE/libvfio-user/prefix \
    "$VENV/bin/python" -c 'from vfiouser_net._ffi_build import ffibuilder; ffibuilder.compile(tmpdir=".")' >/dev/null)
LOGS=$WORK/logs
mkdir -p "$LOGS"
# The least-privilege tests run daemons as nobody: they must read the
# sanitized package and write their reports.
chmod -R a+rX "$WORK"
chmod 1777 "$LOGS"
cd "$REPO"
status=0
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(tests/unit tests/protocol tests/e2e
    --ignore=tests/e2e/test_soak_e2e.py --ignore=tests/e2e/test_bench_smoke.py
    --ignore=tests/e2e/test_device_level_bench.py --ignore=tests/unit/test_c_datapath.py
    --ignore=tests/e2e/test_isolation_e2e.py --ignore=tests/e2e/test_wheel_e2e.py)
PYTHONPATH=$WORK VN_EXPECT_NATIVE_IN=$WORK LD_PRELOAD=$(gcc -print-file-name=libasan.so) \
    ASAN_OPTIONS=detect_leaks=0:log_path=$LOGS/asan \
    UBSAN_OPTIONS=print_stacktrace=1:log_path=$LOGS/ubsan \
    "$VENV/bin/pytest" -ra -p no:cacheprovider "${targets[@]}" || status=$?
# QEMU (coroutines) makes ASan print warnings only; any real report fails.
if grep -lE "ERROR: AddressSanitizer|runtime error" "$LOGS"/* 2>/dev/null; then
    cat "$LOGS"/*
    exit 1
fi
exit "$status"
