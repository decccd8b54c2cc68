#!/usr/bin/env bash
# A second driver for the test guest: DPDK's virtio PMD (dpdk-testpmd) over
# uio_pci_generic, for tests/e2e/test_dpdk_guest_e2e.py.
#
# Why: Linux's virtio_net always enables MSI-X. DPDK's PMD over
# uio_pci_generic leaves it disabled and polls, maps BAR0 itself and writes
# the Command register byte by byte: the paths a device tuned to one driver
# gets wrong (issue "Conformance and interoperability").
#
# Output in $VN_CACHE/guest/dpdk/:
#   dpdk.cpio.gz   an initramfs archive appended to base.cpio.gz: dpdk-testpmd,
#                  the closure of its shared libraries, the PMDs it loads with
#                  -d (net_virtio, mempool_ring, bus_pci; see PMDS) and the
#                  modules uio and uio_pci_generic for the base image's kernel
#                  (not loaded at boot: the test loads them)
#   KERNEL_VERSION the base image's kernel they were built for
#
# Packages come from the base image's private apt configuration
# (guest-image.sh), only unpacked, never installed. Idempotent.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
export VN_STEP=guest-dpdk
vn_need_root

GUEST=$VN_CACHE/guest
OUT=$GUEST/dpdk
# Bump when the layout changes so that caches rebuild.
FORMAT=1
MODULES=(uio uio_pci_generic)
# Loaded by testpmd at run time (-d), so not in its DT_NEEDED.
PMDS=(librte_net_virtio.so librte_mempool_ring.so librte_bus_pci.so)

KVER=$(cat "$GUEST/KERNEL_VERSION" 2>/dev/null) || vn_die "no guest image: run guest-image.sh first"
if [[ -s $OUT/dpdk.cpio.gz && $(cat "$OUT/FORMAT" 2>/dev/null) == "$FORMAT" &&
    $(cat "$OUT/KERNEL_VERSION" 2>/dev/null) == "$KVER" ]]; then
    vn_log "cached: $OUT/dpdk.cpio.gz ($(du -h "$OUT/dpdk.cpio.gz" | cut -f1))"
    echo "$OUT"
    exit 0
fi
for p in cpio gzip xz-utils zstd binutils; do
    vn_pkgs_installed "$p" || vn_die "package $p missing: run scripts/setup/apt.sh first"
done

vn_private_apt "$GUEST/apt" "$VN_SUITE"
DEBS=$OUT/debs
STAGE=$OUT/stage
ROOT=$OUT/root
rm -rf "$STAGE" "$ROOT"
mkdir -p "$DEBS" "$STAGE" "$ROOT/usr/bin" "$ROOT/lib/x86_64-linux-gnu" "$ROOT/lib/modules/$KVER"

declare -A FETCHED=()
# Download and unpack packages (once each) into the stage.
fetch() {
    local p deb want=()
    for p in "$@"; do
        [[ -z ${FETCHED[$p]:-} ]] || continue
        FETCHED[$p]=1
        want+=("$p")
    done
    ((${#want[@]})) || return 0
    (cd "$DEBS" && apt-get "${VN_APT_OPTS[@]}" download -q "${want[@]}" >&2)
    for p in "${want[@]}"; do
        deb=$(ls -t "$DEBS/${p}_"*.deb 2>/dev/null | head -n 1 || true)
        [[ -n $deb ]] || vn_die "download of $p failed"
        dpkg-deb -x "$deb" "$STAGE"
    done
}

# The Debian package of a DPDK library: librte_net_virtio.so.25 ->
# librte-net-virtio25. Other libraries come from those packages' lib*
# dependencies (pkg_lib_deps).
rte_package() {
    local so=$1 base ver
    base=${so%%.so*}
    ver=${so##*.so.}
    base=${base//_/-}
    # Debian policy: a hyphen between a name ending in a digit and the
    # version (librte_net_mlx5.so.25 -> librte-net-mlx5-25).
    [[ $base == *[0-9] ]] && base+=-
    echo "$base${ver%%.*}"
}

# dpdk-testpmd is in dpdk-dev (Debian 12 and 13).
fetch dpdk-dev
TESTPMD=$STAGE/usr/bin/dpdk-testpmd
[[ -x $TESTPMD ]] || vn_die "dpdk-dev has no usr/bin/dpdk-testpmd"
RTE_VER=$(readelf -d "$TESTPMD" | sed -n 's/.*(NEEDED).*\[librte_eal\.so\.\([0-9]*\)\].*/\1/p')
[[ -n $RTE_VER ]] || vn_die "dpdk-testpmd does not link librte_eal"

# The packages: those of the librte libraries testpmd links and of the PMDs,
# and the closure of their lib* dependencies (as guest-image.sh does).
declare -A SEEN=()
queue=()
for so in $(readelf -d "$TESTPMD" | sed -n 's/.*(NEEDED).*\[\(librte_[^]]*\)\].*/\1/p') \
    "${PMDS[@]/%/.$RTE_VER}"; do
    p=$(rte_package "$so")
    [[ -z ${SEEN[$p]:-} ]] || continue
    SEEN[$p]=1
    queue+=("$p")
done
PKGS=("${queue[@]}")
# Level by level, one apt-cache call each. ibverbs-providers: libmlx5, which
# the mlx5 PMD testpmd links needs.
while ((${#queue[@]})); do
    next=()
    for d in $(apt-cache "${VN_APT_OPTS[@]}" depends --no-recommends --no-suggests \
        --no-conflicts --no-breaks --no-replaces --no-enhances "${queue[@]}" 2>/dev/null |
        sed -n 's/^ *|\{0,1\}\(Pre\)\{0,1\}Depends: \(z\{0,1\}lib[^<][^ ]*\|ibverbs-providers\)$/\2/p' |
        sort -u); do
        [[ -z ${SEEN[$d]:-} && $d != libc6 ]] || continue
        SEEN[$d]=1
        PKGS+=("$d")
        next+=("$d")
    done
    queue=("${next[@]}")
done
vn_log "packages: ${PKGS[*]}"
fetch "${PKGS[@]}"

# The libraries: testpmd's and the PMDs' DT_NEEDED closure, from the stage.
declare -A LIBDONE=()
LIBDIRS=("$STAGE/usr/lib/x86_64-linux-gnu" "$STAGE/lib/x86_64-linux-gnu")
find_lib() {
    local d
    for d in "${LIBDIRS[@]}"; do
        [[ -e $d/$1 ]] && { echo "$d/$1"; return 0; }
    done
    return 1
}
copy_lib() {
    local so=$1 path
    [[ -z ${LIBDONE[$so]:-} ]] || return 0
    LIBDONE[$so]=1
    path=$(find_lib "$so") || vn_die "$so: not in the unpacked packages"
    cp -L "$path" "$ROOT/lib/x86_64-linux-gnu/$so"
    copy_needed "$ROOT/lib/x86_64-linux-gnu/$so"
}
copy_needed() {
    local so
    for so in $(readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        # The base image has glibc and its loader.
        case "$so" in
            libc.so.* | libm.so.* | ld-linux-x86-64.so.*) continue ;;
        esac
        copy_lib "$so"
    done
}
cp "$TESTPMD" "$ROOT/usr/bin/dpdk-testpmd"
copy_needed "$ROOT/usr/bin/dpdk-testpmd"
for pmd in "${PMDS[@]}"; do
    copy_lib "$pmd.$RTE_VER"
done

# uio and uio_pci_generic for the base image's kernel, from its package.
KDEB=$(ls -t "$GUEST/debs/linux-image-${KVER}_"*.deb 2>/dev/null | head -n 1 || true)
[[ -n $KDEB ]] || vn_die "the base image's kernel package is gone from $GUEST/debs"
dpkg-deb --fsys-tarfile "$KDEB" | tar -x -C "$STAGE" --wildcards "./*lib/modules/$KVER/kernel/drivers/uio/*"
MODDIR=$(find "$STAGE" -type d -path "*/lib/modules/$KVER/kernel" -print -quit)
vn_copy_modules "$MODDIR" "$ROOT/lib/modules/$KVER" "${MODULES[@]}"
printf '%s\n' "${VN_MODULE_ORDER[@]}" >"$ROOT/lib/modules/$KVER/vn-dpdk-modules"

(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) |
    gzip -9n >"$OUT/dpdk.cpio.gz.tmp"
mv "$OUT/dpdk.cpio.gz.tmp" "$OUT/dpdk.cpio.gz"
echo "$KVER" >"$OUT/KERNEL_VERSION"
echo "$FORMAT" >"$OUT/FORMAT"
rm -rf "$STAGE" "$ROOT" "$DEBS"
vn_log "dpdk-testpmd (librte .so.$RTE_VER), ${#LIBDONE[@]} libraries, modules ${VN_MODULE_ORDER[*]}:" \
    "$OUT/dpdk.cpio.gz ($(du -h "$OUT/dpdk.cpio.gz" | cut -f1))"
echo "$OUT"
