#!/usr/bin/env bash
# Install the host (Debian 12 or 13) packages vfiouser-net needs to build,
# run and test: the libvfio-user build deps (meson, ninja, json-c, cmocka),
# debootstrap for the QEMU/guest root, network tools for the netns/TAP tests,
# archivers for the guest initramfs, clang (+ its runtime for sanitizers and
# libFuzzer, and llvm for llvm-cov: scripts/fuzz.sh --coverage) and
# prometheus (promtool); gdb, for the isolation test to make a device
# process allocate or call a forbidden system call, as a bug in it would;
# dnsmasq (DHCP and TFTP), OVMF and iPXE (snponly.efi) for the network boot
# tests.
#
# Why a script: machines are handed over fresh; whatever the project needs
# must be installed by the project's own files. Only calls apt-get when a
# package is missing (dpkg-query), so re-runs take well under a second.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
VN_STEP=apt
vn_need_root

PKGS=(
    build-essential pkg-config git ca-certificates
    meson ninja-build libjson-c-dev libcmocka-dev
    liburing-dev
    python3-venv python3-dev
    debootstrap dpkg-dev
    iproute2 iperf3 ethtool iputils-ping procps psmisc
    cpio xz-utils zstd gzip file binutils patch
    clang llvm
    prometheus
    systemd shellcheck libvirt-clients libxml2-utils
    gdb dnsmasq-base ovmf ipxe
)
# Runtime of the default clang (sanitizers, libFuzzer): clang 14 on Debian 12,
# clang 19 on Debian 13.
case "$(vn_debian_major)" in
    12) PKGS+=(libclang-rt-14-dev) ;;
    13) PKGS+=(libclang-rt-19-dev) ;;
    *) vn_log "unknown Debian release $(cat /etc/debian_version), skipping clang runtime" ;;
esac

mapfile -t MISSING < <(vn_pkgs_missing "${PKGS[@]}")
if [[ ${#MISSING[@]} -eq 0 ]]; then
    vn_log "all ${#PKGS[@]} packages already installed"
    echo "${#PKGS[@]} packages installed (cached)"
    exit 0
fi
vn_log "installing: ${MISSING[*]}"
vn_apt_get update -q
# The prometheus package starts a service through invoke-rc.d; in containers
# without an init that is denied by policy-rc.d, which is fine.
vn_apt_get install -y -q --no-install-recommends "${MISSING[@]}"
mapfile -t STILL < <(vn_pkgs_missing "${PKGS[@]}")
[[ ${#STILL[@]} -eq 0 ]] || vn_die "still missing after install: ${STILL[*]}"
vn_log "done"
echo "${#PKGS[@]} packages installed (${#MISSING[@]} new)"
