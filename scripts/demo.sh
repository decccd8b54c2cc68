#!/usr/bin/env bash
# Set everything up (idempotent) and run the demo: the daemon, a Linux guest
# attached over vfio-user, ping and iperf3 both ways.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bash "$HERE/setup.sh"
exec "${VN_CACHE:-/var/cache/vfiouser-net}/venv/bin/python" "$HERE/demo.py"
