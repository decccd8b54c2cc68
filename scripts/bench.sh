#!/usr/bin/env bash
# The benchmark suite in one command: set everything up (idempotent, cached),
# then run bench/run.py: device level (datapath against the TAP ceiling),
# guest level (iperf3 TCP and ICMP echo latency, this device against QEMU's
# virtio-net-pci) and cost (daemon CPU per packet, memory with 1 and 16
# pairs). Prints a table per part and the targets; writes
# bench/results/results.json and results.png. Extra args go to bench/run.py,
# e.g. --quick, --only guest,cost, --pairs 1,4, --out DIR (see --help).
#
# The guest level also boots on a DPDK vhost-user back end (dpdk-testpmd with
# net_vhost and net_tap) when Debian's dpdk-dev is installed: installed here,
# not by setup.sh, because only the benchmark needs it (VN_BENCH_DPDK=0 skips it).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bash "$HERE/setup.sh"
if [[ ${VN_BENCH_DPDK:-1} == 1 ]] && ! command -v dpdk-testpmd >/dev/null; then
    # shellcheck source-path=SCRIPTDIR source=setup/lib.sh
    . "$HERE/setup/lib.sh"
    VN_STEP=bench
    vn_apt_get install -y -q --no-install-recommends dpdk-dev >&2 ||
        vn_log "dpdk-dev not installed: the guest level runs without the DPDK back end"
fi
exec "${VN_CACHE:-/var/cache/vfiouser-net}/venv/bin/python" "$HERE/../bench/run.py" "$@"
