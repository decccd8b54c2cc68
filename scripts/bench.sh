#!/usr/bin/env bash
# The benchmark suite in one command: set everything up (idempotent, cached),
# then run bench/run.py: device level (datapath against the TAP ceiling),
# guest level (iperf3 TCP and ICMP echo latency, this device against QEMU's
# virtio-net-pci) and cost (daemon CPU per packet, memory with 1 and 16
# pairs). Prints a table per part and the targets; writes
# bench/results/results.json and results.png. Extra args go to bench/run.py,
# e.g. --quick, --only guest,cost, --pairs 1,4, --out DIR (see --help).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bash "$HERE/setup.sh"
exec "${VN_CACHE:-/var/cache/vfiouser-net}/venv/bin/python" "$HERE/../bench/run.py" "$@"
