#!/usr/bin/env bash
# Build the test guest: a Debian trixie kernel and a tiny busybox initramfs.
#
# Why: the end-to-end tests boot a real Linux virtio-net driver (the 6.12
# kernel the project targets) under TCG in a few seconds. A busybox
# initramfs boots fastest and is easy to drive over the serial console.
#
# Packages come from Debian trixie through a private apt configuration
# (sources file and lists under $VN_CACHE/guest/apt; the host's apt is not
# touched) with `apt-get download`, and are only unpacked (dpkg-deb -x), never
# installed. Shared libraries are resolved from the binaries' DT_NEEDED
# entries, so a missing one fails the build instead of the guest.
#
# Output in $VN_CACHE/guest/:
#   vmlinuz          linux-image-6.12.*-amd64 (zstd bzImage)
#   base.cpio.gz     busybox-static, ethtool, iperf3 (+ libs and loader), the
#                    modules failover, net_failover, virtio_net, 8021q (and its
#                    dependencies; decompressed)
#                    and /init (see below)
#   KERNEL_VERSION   e.g. 6.12.48+deb13-amd64
#
# The /init mounts proc/sys/dev/devpts/tmpfs, sets `dmesg -n 1`, loads the
# modules, brings up lo, runs /etc/vn-init.d/* (hooks that extra archives can
# add), then starts `sh -i` on the console with echo off and an empty prompt
# and prints the ready marker VN-GUEST-READY. The shell is restarted if it
# exits.
#
# Per-test files: the kernel accepts several cpio archives concatenated into
# one initrd, so a test appends a small archive (compressed or not) to
# base.cpio.gz. harness/vfiouser_net_harness/guest.py has `make_cpio()` for that, and
# `guest-image.sh extra DIR OUT.cpio` packs a directory with cpio.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
VN_STEP=guest-image

if [[ ${1:-} == extra ]]; then
    # guest-image.sh extra DIR OUT: pack DIR (as the guest's /) into a newc cpio.
    [[ $# -eq 3 ]] || vn_die "usage: $0 extra DIR OUT.cpio"
    out=$(realpath -m "$3")
    (cd "$2" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$out"
    echo "$out"
    exit 0
fi
vn_need_root

GUEST=$VN_CACHE/guest
APTDIR=$GUEST/apt
DEBS=$GUEST/debs
# Bump when the image layout or /init changes so that caches rebuild.
IMAGE_FORMAT=5
# 8021q: the VLAN filter test (vconfig in the guest).
MODULES=(failover net_failover virtio_net 8021q)
BINARIES=(usr/sbin/ethtool usr/bin/iperf3)
# Libraries loaded with dlopen (not in DT_NEEDED): glibc needs libgcc_s for
# pthread_cancel, which iperf3 uses.
DLOPEN_LIBS=(libgcc_s.so.1)

cached_ok() {
    [[ -s $GUEST/vmlinuz && -s $GUEST/base.cpio.gz && -s $GUEST/KERNEL_VERSION ]] || return 1
    [[ -f $GUEST/FORMAT && $(cat "$GUEST/FORMAT") == "$IMAGE_FORMAT" ]] || return 1
    gzip -t "$GUEST/base.cpio.gz" 2>/dev/null
}

if cached_ok; then
    vn_log "cached: kernel $(cat "$GUEST/KERNEL_VERSION"), $GUEST/base.cpio.gz ($(du -h "$GUEST/base.cpio.gz" | cut -f1))"
    echo "$GUEST"
    exit 0
fi

for p in cpio gzip xz-utils zstd binutils; do
    vn_pkgs_installed "$p" || vn_die "package $p missing: run scripts/setup/apt.sh first"
done

# --- private apt configuration for trixie binary packages -------------------
mkdir -p "$DEBS"
vn_private_apt "$APTDIR" "$VN_SUITE"
APT_OPTS=("${VN_APT_OPTS[@]}")

# Direct Depends/PreDepends of a package (real package names only).
pkg_deps() {
    apt-cache "${APT_OPTS[@]}" depends --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances "$1" 2>/dev/null |
        sed -n 's/^ *|\{0,1\}\(Pre\)\{0,1\}Depends: \([^<][^ ]*\)$/\2/p' | sort -u
}

KPKG=$(pkg_deps linux-image-amd64 | grep -E '^linux-image-6\.12\.[^ ]*-amd64$' | head -n 1 || true)
[[ -n $KPKG ]] || vn_die "linux-image-amd64 in $VN_SUITE does not depend on a linux-image-6.12.*-amd64"
KVER=${KPKG#linux-image-}

# Packages: the kernel, busybox, the tools and the closure of their library
# dependencies (packages named lib* or zlib*; others such as debconf are not
# needed).
WANT=("$KPKG" busybox-static ethtool iperf3)
declare -A SEEN=()
queue=(ethtool iperf3)
while ((${#queue[@]})); do
    p=${queue[0]}
    queue=("${queue[@]:1}")
    for d in $(pkg_deps "$p"); do
        [[ ($d == lib* || $d == zlib*) && -z ${SEEN[$d]:-} ]] || continue
        SEEN[$d]=1
        WANT+=("$d")
        queue+=("$d")
    done
done
vn_log "packages: ${WANT[*]}"
(cd "$DEBS" && apt-get "${APT_OPTS[@]}" download -q "${WANT[@]}" >&2)

STAGE=$GUEST/stage
ROOTFS=$GUEST/rootfs
rm -rf "$STAGE" "$ROOTFS"
mkdir -p "$STAGE"
for p in "${WANT[@]}"; do
    deb=$(ls -t "$DEBS/${p}_"*.deb 2>/dev/null | head -n 1 || true)
    [[ -n $deb ]] || vn_die "download of $p failed"
    if [[ $p == "$KPKG" ]]; then
        # Only the bzImage and the modules we need from the (large) kernel.
        dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$STAGE" --wildcards \
            "./boot/vmlinuz-$KVER" "./*lib/modules/$KVER/kernel/*"
    else
        dpkg-deb -x "$deb" "$STAGE"
    fi
done

# --- kernel ------------------------------------------------------------------
cp "$STAGE/boot/vmlinuz-$KVER" "$GUEST/vmlinuz.tmp"

# --- root filesystem -----------------------------------------------------------
mkdir -p "$ROOTFS"/{bin,sbin,usr/bin,usr/sbin,lib/x86_64-linux-gnu,lib64,proc,sys,dev,tmp,run,root,etc/vn-init.d}
mkdir -p "$ROOTFS/lib/modules/$KVER"
chmod 1777 "$ROOTFS/tmp"
BB=$(find "$STAGE" -path '*/bin/busybox' -type f -print -quit)
[[ -n $BB ]] || vn_die "busybox binary not found in busybox-static"
cp "$BB" "$ROOTFS/bin/busybox"
ln -s busybox "$ROOTFS/bin/sh"
APPLETS=$("$ROOTFS/bin/busybox" --list)
for applet in cttyhack setsid stty insmod ip ping base64; do
    grep -qx "$applet" <<<"$APPLETS" || vn_die "busybox lacks the applet $applet"
done

# Modules (merged-/usr layout or not), with their dependencies, decompressed
# and in load order (lib.sh vn_copy_modules).
MODDIR=$(find "$STAGE" -type d -path "*/lib/modules/$KVER/kernel" -print -quit)
[[ -n $MODDIR ]] || vn_die "no modules in the kernel package"
vn_copy_modules "$MODDIR" "$ROOTFS/lib/modules/$KVER" "${MODULES[@]}"
ORDER=("${VN_MODULE_ORDER[@]}")
printf '%s\n' "${ORDER[@]}" >"$ROOTFS/etc/vn-modules"
vn_log "modules (load order): ${ORDER[*]}"

# Binaries and the closure of their shared libraries, resolved in the stage.
LIBDIRS=("$STAGE/usr/lib/x86_64-linux-gnu" "$STAGE/lib/x86_64-linux-gnu" "$STAGE/usr/lib64" "$STAGE/lib64")
find_lib() {
    local d
    for d in "${LIBDIRS[@]}"; do
        if [[ -e $d/$1 ]]; then
            echo "$d/$1"
            return 0
        fi
    done
    return 1
}
declare -A LIBDONE=()
copy_needed() {
    local elf=$1 so path
    for so in $(readelf -d "$elf" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        [[ -z ${LIBDONE[$so]:-} ]] || continue
        LIBDONE[$so]=1
        path=$(find_lib "$so") || vn_die "$(basename "$elf") needs $so, not found in the downloaded packages"
        cp -L "$path" "$ROOTFS/lib/x86_64-linux-gnu/$so"
        copy_needed "$ROOTFS/lib/x86_64-linux-gnu/$so"
    done
}
for b in "${BINARIES[@]}"; do
    [[ -f $STAGE/$b ]] || vn_die "$b not found in the downloaded packages"
    cp "$STAGE/$b" "$ROOTFS/$b"
    copy_needed "$ROOTFS/$b"
done
for so in "${DLOPEN_LIBS[@]}"; do
    path=$(find_lib "$so") || vn_die "$so not found in the downloaded packages"
    cp -L "$path" "$ROOTFS/lib/x86_64-linux-gnu/$so"
    copy_needed "$ROOTFS/lib/x86_64-linux-gnu/$so"
done
LDSO=$(find_lib ld-linux-x86-64.so.2) || vn_die "dynamic loader not found (libc6)"
cp -L "$LDSO" "$ROOTFS/lib64/ld-linux-x86-64.so.2"
echo /lib/x86_64-linux-gnu >"$ROOTFS/etc/ld.so.conf"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$ROOTFS/etc/passwd"
printf 'root:x:0:\n' >"$ROOTFS/etc/group"
printf '127.0.0.1 localhost\n' >"$ROOTFS/etc/hosts"
echo "$KVER" >"$ROOTFS/etc/vn-kernel-version"

# Startup file of the console shell: echo off (busybox line editing falls
# back to plain reads then), no prompt, then the ready marker.
cat >"$ROOTFS/etc/vn-profile" <<'EOF'
stty -echo 2>/dev/null
PS1=''
PS2=''
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
echo VN-GUEST-READY
EOF

cat >"$ROOTFS/init" <<'EOF'
#!/bin/sh
# vfiouser-net test guest init (generated by scripts/setup/guest-image.sh)
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
dmesg -n 1
hostname guest
KVER=$(cat /etc/vn-kernel-version)
for m in $(cat /etc/vn-modules); do
    insmod "/lib/modules/$KVER/$m.ko" || echo "VN-INIT: insmod $m failed"
done
ip link set lo up
for f in /etc/vn-init.d/*; do
    [ -f "$f" ] && . "$f"
done
export ENV=/etc/vn-profile HOME=/root
cd /root
while :; do
    setsid cttyhack /bin/sh -i
    echo "VN-SHELL-EXITED"
    sleep 1
done
EOF
chmod +x "$ROOTFS/init"

(cd "$ROOTFS" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) |
    gzip -9n >"$GUEST/base.cpio.gz.tmp"
mv "$GUEST/vmlinuz.tmp" "$GUEST/vmlinuz"
mv "$GUEST/base.cpio.gz.tmp" "$GUEST/base.cpio.gz"
echo "$KVER" >"$GUEST/KERNEL_VERSION"
echo "$IMAGE_FORMAT" >"$GUEST/FORMAT"
rm -rf "$STAGE"
cached_ok || vn_die "guest image incomplete"
vn_log "kernel $KVER; $GUEST/vmlinuz, $GUEST/base.cpio.gz ($(du -h "$GUEST/base.cpio.gz" | cut -f1))"
echo "$GUEST"
