#!/usr/bin/env bash
# Set everything up (idempotent) and run the whole test suite: lint and type
# checks, then pytest over unit, C datapath (plain and ASan/UBSan), protocol
# and end-to-end tests with a real QEMU and Linux guest. Extra arguments go to
# pytest (e.g. -k ping, or tests/unit).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
bash "$HERE/setup.sh"
VENV=${VN_CACHE:-/var/cache/vfiouser-net}/venv
cd "$REPO"
echo "== ruff"
"$VENV/bin/ruff" check vfiouser_net tests bench scripts
echo "== mypy"
"$VENV/bin/mypy"
echo "== pytest"
exec "$VENV/bin/pytest" -ra -p no:cacheprovider "${@:-tests}"
