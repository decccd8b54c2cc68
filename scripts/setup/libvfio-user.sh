#!/usr/bin/env bash
# Build libvfio-user (the vfio-user server library our C datapath links
# against) from Debian's own sources, and install it into the cache.
#
# Why this way: libvfio-user is neither packaged in Debian nor on PyPI, and
# only Debian's registry is reachable. Debian's `qemu` source package carries
# a copy under subprojects/libvfio-user in its orig tarball. We fetch it with
# `apt-get source --download-only` through a private apt configuration (its
# own deb-src sources file and lists under $VN_CACHE, so the host's apt setup
# is untouched), extract only that subproject, verify it is the revision the
# project is written against, and build it with meson (release: the debug
# build adds -Werror and aborts on asserts).
#
# Output:
#   $VN_CACHE/libvfio-user/prefix      installed headers, libvfio-user.a (static, PIC:
#                                      the extension links it) and libvfio-user.so
#   $VN_CACHE/libvfio-user/build       build dir (samples/server, samples/gpio-pci-idio-16, ...)
#   $VN_CACHE/libvfio-user/REVISION    the verified upstream git revision
#   $VN_CACHE/libvfio-user/SOURCE      the Debian source package version used
#   $VN_CACHE/libvfio-user/PATCHES     sha256 of the project's patches applied
#
# Patches: the revision Debian carries (2022) cannot be upgraded here, so the
# fixes we need in it are carried as our own patches in
# scripts/setup/libvfio-user-patches/NNNN-*.patch (first line: `Why: ...`),
# applied in order with `patch -p1` to the extracted source before the build;
# each has a test (tests/protocol/test_libvfio_user_patches.py).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
VN_STEP=libvfio-user
vn_need_root

EXPECTED_REV=0b28d205572c80b568a1003db2c8f37ca333e4d7
PATCH_DIR=$HERE/libvfio-user-patches
BASE=$VN_CACHE/libvfio-user
APTDIR=$BASE/apt
PKGDIR=$BASE/srcpkg
SRC=$BASE/src
BUILD=$BASE/build
PREFIX=$BASE/prefix

header_path() { find "$PREFIX/include" -name libvfio-user.h -print -quit 2>/dev/null; }
lib_path() { find "$PREFIX" -name 'libvfio-user.so' \( -type f -o -type l \) -print -quit 2>/dev/null; }
patches_hash() { cat "$PATCH_DIR"/*.patch 2>/dev/null | sha256sum | cut -d' ' -f1; }

cached_ok() {
    [[ -f $BASE/REVISION && $(cat "$BASE/REVISION") == "$EXPECTED_REV" ]] || return 1
    [[ -f $BASE/PATCHES && $(cat "$BASE/PATCHES") == "$(patches_hash)" ]] || return 1
    [[ -n $(header_path) && -n $(lib_path) ]] || return 1
    # The static, position-independent library the extension links (no
    # runtime path into this cache); the shared one serves the samples.
    [[ -f $PREFIX/lib/libvfio-user.a ]] || return 1
    [[ -f $PREFIX/lib/pkgconfig/libvfio-user.pc ]] || return 1
    [[ -x $BUILD/samples/server && -x $BUILD/samples/gpio-pci-idio-16 ]] || return 1
}

if cached_ok; then
    vn_log "cached: revision $EXPECTED_REV ($(cat "$BASE/SOURCE" 2>/dev/null || echo '?'))"
    vn_log "header: $(header_path)"
    vn_log "library: $(lib_path)"
    echo "$PREFIX"
    exit 0
fi

for p in meson ninja-build libjson-c-dev libcmocka-dev pkg-config dpkg-dev xz-utils; do
    vn_pkgs_installed "$p" || vn_die "package $p missing: run scripts/setup/apt.sh first"
done

mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial" "$PKGDIR"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -f $KEYRING ]] || KEYRING=/usr/share/keyrings/debian-archive-keyring.pgp
[[ -f $KEYRING ]] || vn_die "debian-archive-keyring not found"
# A separate, private sources file: trixie first (10.0.x, known to pin the
# expected revision), sid as a fallback (10.2.x pins it too).
cat >"$APTDIR/sources.list" <<EOF
deb-src [signed-by=$KEYRING] $VN_MIRROR trixie main
deb-src [signed-by=$KEYRING] $VN_MIRROR sid main
EOF
APT_OPTS=(
    -o "Dir::Etc::SourceList=$APTDIR/sources.list"
    -o "Dir::Etc::SourceParts=$APTDIR/nonexistent.d"
    -o "Dir::State::Lists=$APTDIR/lists"
    -o "Dir::Cache=$APTDIR/cache"
    -o "APT::Sandbox::User=root"
)

# Extract subprojects/libvfio-user{,.wrap} of an orig tarball into $2 (the
# tarball's top directory is not known in advance: use wildcards).
extract_subproject() {
    local tarball=$1 dest=$2
    rm -rf "$dest"
    mkdir -p "$dest"
    tar -xJf "$tarball" -C "$dest" --wildcards \
        '*/subprojects/libvfio-user' '*/subprojects/libvfio-user.wrap' 2>/dev/null || return 1
    [[ -f $(echo "$dest"/*/subprojects/libvfio-user.wrap) ]]
}

# Print the libvfio-user revision pinned by an extracted tree, after checking
# that the subproject directory really came from that wrap file (meson
# records the sha256 of the .wrap it checked out in
# .meson-subproject-wrap-hash.txt).
tree_revision() {
    local sp want got
    sp=$(echo "$1"/*/subprojects)
    [[ -f $sp/libvfio-user.wrap && -f $sp/libvfio-user/.meson-subproject-wrap-hash.txt ]] || return 1
    want=$(tr -d '[:space:]' <"$sp/libvfio-user/.meson-subproject-wrap-hash.txt")
    got=$(sha256sum "$sp/libvfio-user.wrap" | cut -d' ' -f1)
    if [[ $want != "$got" ]]; then
        vn_log "wrap hash mismatch (tree $want, wrap $got)"
        return 1
    fi
    sed -n 's/^[[:space:]]*revision[[:space:]]*=[[:space:]]*//p' "$sp/libvfio-user.wrap" | tr -d '[:space:]'
}

# Find a downloaded tarball with the expected revision; leaves its
# subproject extracted in $BASE/extract.
find_good_tarball() {
    local t rev
    for t in "$PKGDIR"/qemu_*.orig.tar.xz; do
        [[ -f $t ]] || continue
        rev=
        if extract_subproject "$t" "$BASE/extract"; then
            rev=$(tree_revision "$BASE/extract" || true)
        fi
        if [[ $rev == "$EXPECTED_REV" ]]; then
            echo "$t"
            return 0
        fi
        vn_log "$(basename "$t"): libvfio-user revision '${rev:-unknown}', expected $EXPECTED_REV"
    done
    return 1
}

TARBALL=$(find_good_tarball || true)
if [[ -z $TARBALL ]]; then
    vn_log "fetching Debian qemu source package (deb-src: trixie, sid)"
    apt-get "${APT_OPTS[@]}" update -q >&2 || vn_die "apt-get update of the deb-src lists failed"
    mapfile -t VERSIONS < <(apt-cache "${APT_OPTS[@]}" showsrc qemu | sed -n 's/^Version: //p')
    # trixie's current version first, then every listed version.
    CANDIDATES=(qemu/trixie)
    for v in "${VERSIONS[@]}"; do CANDIDATES+=("qemu=$v"); done
    for c in "${CANDIDATES[@]}"; do
        vn_log "trying $c"
        rm -f "$PKGDIR"/*.partial
        if ! (cd "$PKGDIR" && apt-get "${APT_OPTS[@]}" source --download-only -q "$c" >&2); then
            vn_log "$c did not download"
            continue
        fi
        if TARBALL=$(find_good_tarball); then
            break
        fi
        TARBALL=
    done
    [[ -n $TARBALL ]] || vn_die "no qemu source package with libvfio-user revision $EXPECTED_REV could be downloaded"
fi
DEBVER=$(basename "$TARBALL" .orig.tar.xz)
vn_log "using $DEBVER (libvfio-user $EXPECTED_REV)"

# Keep only the verified subproject.
rm -rf "$SRC"
mv "$BASE"/extract/*/subprojects/libvfio-user "$SRC"
cp "$BASE"/extract/*/subprojects/libvfio-user.wrap "$SRC/.libvfio-user.wrap"
rm -rf "$BASE/extract"
REV=$(sed -n 's/^[[:space:]]*revision[[:space:]]*=[[:space:]]*//p' "$SRC/.libvfio-user.wrap" | tr -d '[:space:]')
[[ $REV == "$EXPECTED_REV" ]] || vn_die "extracted revision $REV != expected $EXPECTED_REV"
for p in "$PATCH_DIR"/*.patch; do
    [[ -f $p ]] || continue
    vn_log "applying $(basename "$p"): $(sed -n '1s/^Why: //p' "$p")"
    patch -p1 --no-backup-if-mismatch -d "$SRC" <"$p" >&2 || vn_die "patch $(basename "$p") does not apply"
done

# Build (release) and install.
rm -rf "$BUILD" "$PREFIX"
meson setup "$BUILD" "$SRC" -Dbuildtype=release --prefix="$PREFIX" --libdir=lib \
    -Ddefault_library=both -Db_staticpic=true >&2
ninja -C "$BUILD" >&2
ninja -C "$BUILD" install >&2

# The project does not install a pkg-config file: provide one so that
# consumers can use `pkg-config --cflags --libs libvfio-user` with
# PKG_CONFIG_PATH=$PREFIX/lib/pkgconfig.
mkdir -p "$PREFIX/lib/pkgconfig"
cat >"$PREFIX/lib/pkgconfig/libvfio-user.pc" <<EOF
prefix=$PREFIX
includedir=\${prefix}/include
libdir=\${prefix}/lib

Name: libvfio-user
Description: vfio-user server library (revision $REV, from Debian $DEBVER)
Version: 0.0.1
Cflags: -I\${includedir} -I\${includedir}/vfio-user
Libs: -L\${libdir} -Wl,-rpath,\${libdir} -lvfio-user
EOF

echo "$REV" >"$BASE/REVISION"
echo "$DEBVER" >"$BASE/SOURCE"
patches_hash >"$BASE/PATCHES"
cached_ok || vn_die "build finished but the expected outputs are missing (header, library, samples)"
vn_log "header: $(header_path)"
vn_log "library: $(lib_path)"
echo "$PREFIX"
