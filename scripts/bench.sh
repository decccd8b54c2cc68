#!/usr/bin/env bash
# Set everything up (idempotent) and run the guest TCP benchmark: this device
# against QEMU's built-in virtio-net-pci, in one run. Extra args go to
# bench/guest_tcp.py (e.g. --seconds 8 --json results.json).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bash "$HERE/setup.sh"
exec "${VN_CACHE:-/var/cache/vfiouser-net}/venv/bin/python" "$HERE/../bench/guest_tcp.py" "$@"
