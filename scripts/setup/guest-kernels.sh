#!/usr/bin/env bash
# More guest kernels for the driver matrix (tests/e2e/test_kernel_matrix_e2e.py):
# Debian bookworm's 6.1 and the newest kernel of trixie-backports, beside the
# 6.12 of the base image (guest-image.sh). Each lands in
# $VN_CACHE/guest/kernels/LABEL/:
#   vmlinuz          the kernel
#   modules.cpio.gz  an initramfs archive appended to base.cpio.gz: the same
#                    modules as the base image (and their dependencies), built
#                    for this kernel, /etc/vn-modules and /etc/vn-kernel-version
#   KERNEL_VERSION   e.g. 6.1.158-1-amd64
#
# Why a separate step: the base image stays one kernel (fast to build); the
# userland (busybox, ethtool, iperf3) is the same for every kernel, only the
# kernel and its modules differ. Idempotent; only downloads what is missing.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
export VN_STEP=guest-kernels
vn_need_root

KERNELS=$VN_CACHE/guest/kernels
# Bump when the layout changes so that caches rebuild.
FORMAT=2
# The modules the base image loads (guest-image.sh MODULES).
MODULES=(failover net_failover virtio_net 8021q)
# Built into some kernels, modules in others (bookworm's 6.1: virtio_pci).
OPTIONAL_MODULES=(virtio_pci)
# label suite: the newest linux-image-*-amd64 that linux-image-amd64 of the
# suite depends on.
MATRIX=("bookworm bookworm" "backports trixie-backports")

for p in cpio gzip xz-utils zstd binutils dpkg-dev; do
    vn_pkgs_installed "$p" || vn_die "package $p missing: run scripts/setup/apt.sh first"
done

build() {
    local label=$1 suite=$2 out=$KERNELS/$1
    if [[ -s $out/vmlinuz && -s $out/modules.cpio.gz && -s $out/KERNEL_VERSION &&
        $(cat "$out/FORMAT" 2>/dev/null) == "$FORMAT" ]]; then
        vn_log "cached: $label kernel $(cat "$out/KERNEL_VERSION")"
        return 0
    fi
    local apt=$KERNELS/.apt-$label
    mkdir -p "$out"
    vn_private_apt "$apt" "$suite"
    local opts=("${VN_APT_OPTS[@]}")
    local kpkg
    # In backports, the newest; elsewhere the one linux-image-amd64 names.
    kpkg=$(apt-cache "${opts[@]}" depends linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | sort -V | tail -n 1)
    [[ -n $kpkg ]] || vn_die "no linux-image-*-amd64 in $suite"
    local kver=${kpkg#linux-image-}
    # The files may be in other packages: linux-image-X-unsigned (backports
    # before the signed build), linux-binary-X and linux-modules-X (the split
    # packaging of newer kernels).
    local pkgs=("$kpkg") dep
    for dep in $(apt-cache "${opts[@]}" depends "$kpkg" 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-[a-z-]*-[0-9][^ ]*\)$/\1/p'); do
        case "$dep" in
            "$kpkg-unsigned" | "linux-binary-$kver" | "linux-modules-$kver") pkgs+=("$dep") ;;
        esac
    done
    vn_log "$label: ${pkgs[*]}"
    (cd "$apt" && apt-get "${opts[@]}" download -q "${pkgs[@]}" >&2)
    local stage=$KERNELS/.stage-$label root=$KERNELS/.root-$label p deb
    rm -rf "$stage" "$root"
    mkdir -p "$stage" "$root/lib/modules/$kver" "$root/etc"
    for p in "${pkgs[@]}"; do
        deb=$(find "$apt" -maxdepth 1 -name "${p}_*.deb" | head -n 1)
        [[ -n $deb ]] || vn_die "download of $p failed"
        dpkg-deb -x "$deb" "$stage"
        rm -f "$deb"
    done
    local vmlinuz
    vmlinuz=$(find "$stage" \( -path "*/boot/vmlinuz-$kver" -o -path "*/modules/$kver/vmlinuz" \) \
        -print -quit)
    [[ -n $vmlinuz ]] || vn_die "$label: no vmlinuz-$kver in ${pkgs[*]}"
    local moddir m
    moddir=$(find "$stage" -type d -path "*/lib/modules/$kver/kernel" -print -quit)
    [[ -n $moddir ]] || vn_die "$label: no modules in ${pkgs[*]}"
    vn_copy_modules "$moddir" "$root/lib/modules/$kver" \
        "${OPTIONAL_MODULES[@]/#/?}" "${MODULES[@]}"
    local order=("${VN_MODULE_ORDER[@]}")
    printf '%s\n' "${order[@]}" >"$root/etc/vn-modules"
    echo "$kver" >"$root/etc/vn-kernel-version"
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) |
        gzip -9n >"$out/modules.cpio.gz"
    cp "$vmlinuz" "$out/vmlinuz"
    echo "$kver" >"$out/KERNEL_VERSION"
    echo "$FORMAT" >"$out/FORMAT"
    rm -rf "$stage" "$root"
    vn_log "$label: $kver, modules ${order[*]}"
}

for entry in "${MATRIX[@]}"; do
    # shellcheck disable=SC2086
    build $entry
done
echo "$KERNELS"
