#!/usr/bin/env bash
# Set everything up (idempotent) and run the whole test suite:
#  1. ruff and mypy;
#  2. pytest over the unit, protocol and end-to-end tests (a real QEMU and
#     Linux guest) with the C datapath built with ASan + UBSan
#     (scripts/test-asan.sh; any sanitizer report fails the run);
#  3. pytest with the production build over what measures or runs long: the
#     C unit tests (plain and sanitized), the 5-minute soak
#     (VN_SOAK_SECONDS), the benchmark smoke runs, the security e2e test
#     again (its memory check means nothing under ASan's quarantine) and the
#     isolation e2e test (a device process sent SIGSEGV makes an ASan report)
#     and the wheel test (a wheel built and run in a fresh venv);
#  4. every fuzz target for VN_FUZZ_SECONDS (default 20) seconds.
# With arguments, only pytest runs, with them, on the production build
# (e.g. -k ping, or tests/unit).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
bash "$HERE/setup.sh"
VENV=${VN_CACHE:-/var/cache/vfiouser-net}/venv
cd "$REPO"
echo "== ruff"
"$VENV/bin/ruff" check vfiouser_net harness tests bench scripts
echo "== mypy"
"$VENV/bin/mypy"
if [[ $# -gt 0 ]]; then
    echo "== pytest $*"
    exec "$VENV/bin/pytest" -ra -p no:cacheprovider "$@"
fi
status=0
echo "== pytest: unit, protocol and end-to-end tests, datapath under ASan + UBSan"
bash "$HERE/test-asan.sh" || status=1
echo "== pytest: C unit tests, soak and benchmark smoke runs, production build"
"$VENV/bin/pytest" -ra -p no:cacheprovider tests/unit/test_c_datapath.py \
    tests/e2e/test_soak_e2e.py tests/e2e/test_bench_smoke.py \
    tests/e2e/test_device_level_bench.py tests/e2e/test_security_e2e.py \
    tests/e2e/test_isolation_e2e.py tests/e2e/test_wheel_e2e.py || status=1
echo "== fuzz"
bash "$HERE/fuzz.sh" --seconds "${VN_FUZZ_SECONDS:-20}" || status=1
exit "$status"
