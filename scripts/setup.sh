#!/usr/bin/env bash
# One-shot, idempotent set-up of everything vfiouser-net needs to build and
# test, in order:
#   1. scripts/setup/apt.sh           host Debian packages
#   2. scripts/setup/libvfio-user.sh  libvfio-user (Debian qemu source) -> $VN_CACHE/libvfio-user/prefix
#   3. scripts/setup/qemu.sh          QEMU 11.1 (vfio-user-pci) -> $VN_CACHE/bin/qemu-system-x86_64
#   4. scripts/setup/guest-image.sh   guest kernel + initramfs -> $VN_CACHE/guest/
#      scripts/setup/guest-kernels.sh more guest kernels (bookworm's 6.1, the newest
#                                     of trixie-backports) -> $VN_CACHE/guest/kernels/
#      scripts/setup/guest-dpdk.sh    DPDK's testpmd and uio_pci_generic for the
#                                     guest, a second driver -> $VN_CACHE/guest/dpdk/
#   5. a Python venv at $VN_CACHE/venv with the tools, and the project
#      installed editable (built against the libvfio-user above) with its
#      `bench` extra (matplotlib, for the benchmark's plot); its
#      `vfiouser-net` command linked into /usr/local/bin (VN_BIN_DIR).
#
# Why: fresh machines and CI must be able to rebuild the whole environment
# from the package registries alone; everything expensive lives in
# $VN_CACHE (default /var/cache/vfiouser-net), never in the repository. Each
# step checks its own output and skips itself when it is valid, so a re-run
# with a warm cache takes a few seconds.
set -euo pipefail
# Steps run in command substitutions (step below): without this a failing
# command there (a pip install that cannot build the project) went unnoticed
# and its stamp was written.
shopt -s inherit_errexit
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=setup/lib.sh
. "$HERE/setup/lib.sh"
VN_STEP=setup
vn_need_root
VN_PYTHON=${VN_PYTHON:-python3}
# atheris: the coverage-guided fuzzer for the Python-side parsers (tests/fuzz,
# scripts/fuzz.sh); binary wheels, or built with the clang from apt.sh.
PY_PKGS=(cffi msgpack prometheus-client pytest mypy ruff atheris)

declare -a SUMMARY=()
step() {
    local name=$1 t0 ms out
    shift
    t0=$(date +%s%N)
    out=$("$@")
    ms=$((($(date +%s%N) - t0) / 1000000))
    SUMMARY+=("$(printf '  %-13s %4d.%03ds  %s' "$name" $((ms / 1000)) $((ms % 1000)) "${out##*$'\n'}")")
}

T0=$(date +%s)
step apt bash "$HERE/setup/apt.sh"
step libvfio-user bash "$HERE/setup/libvfio-user.sh"
step qemu bash "$HERE/setup/qemu.sh"
step guest-image bash "$HERE/setup/guest-image.sh"
step guest-kernels bash "$HERE/setup/guest-kernels.sh"
step guest-dpdk bash "$HERE/setup/guest-dpdk.sh"

setup_venv() {
    local venv=$VN_CACHE/venv stamp want f
    stamp=$venv/.vn-stamp
    # What the venv depends on: the package list, the interpreter, the
    # project's build files and C sources, and the libvfio-user revision.
    want=$(
        echo "${PY_PKGS[*]}"
        "$VN_PYTHON" -c 'import sys; print(sys.version)'
        cat "$VN_CACHE/libvfio-user/REVISION"
        cat "$VN_CACHE/libvfio-user/PATCHES"
        for f in pyproject.toml setup.py setup.cfg harness/pyproject.toml; do
            [[ -f $REPO/$f ]] && echo "$f $(sha256sum <"$REPO/$f")"
        done
        # Inputs of the project's compiled (cffi) extension.
        find "$REPO/vfiouser_net" -maxdepth 2 \( -name '_ffi_build.py' -o -path '*/decl/*' \
            -o -path '*/csrc/*.[ch]' \) -type f 2>/dev/null | LC_ALL=C sort | xargs -r sha256sum
        echo "$REPO"
    )
    if [[ -x $venv/bin/python && -f $stamp && $(cat "$stamp") == "$want" ]] &&
        "$venv/bin/python" -c 'import cffi, msgpack, prometheus_client, pytest, matplotlib, atheris, vfiouser_net_harness' 2>/dev/null; then
        vn_log "cached: $venv"
        echo "$venv (cached)"
        return 0
    fi
    if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
        rm -rf "$venv"
        vn_log "creating venv $venv with $("$VN_PYTHON" --version 2>&1)"
        "$VN_PYTHON" -m venv "$venv" >&2
    fi
    vn_log "pip install ${PY_PKGS[*]}"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "${PY_PKGS[@]}" >&2
    local what="tools"
    if [[ -f $REPO/pyproject.toml ]]; then
        vn_log "pip install -e $REPO (LIBVFIO_USER_PREFIX=$VN_CACHE/libvfio-user/prefix)"
        LIBVFIO_USER_PREFIX=$VN_CACHE/libvfio-user/prefix \
            PKG_CONFIG_PATH=$VN_CACHE/libvfio-user/prefix/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH} \
            "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "${REPO}[bench]" \
            -e "$REPO/harness" >&2
        what="tools + project and its test harness (editable, bench extra)"
    else
        vn_log "no $REPO/pyproject.toml: project not installed"
    fi
    echo "$want" >"$stamp"
    echo "$venv ($what)"
}
step venv setup_venv

# The daemon on PATH for operators (README's first commands, systemd units
# that name it): a link to the venv's console script, replaced each time.
link_command() {
    local target=$VN_CACHE/venv/bin/vfiouser-net link=${VN_BIN_DIR:-/usr/local/bin}/vfiouser-net
    [[ -x $target ]] || { echo "no $target: not linked"; return 0; }
    mkdir -p "$(dirname "$link")"
    ln -sfn "$target" "$link"
    echo "$link -> $target"
}
step command link_command

vn_log "done in $(($(date +%s) - T0)) s (cache: $VN_CACHE)"
printf '%s\n' "${SUMMARY[@]}" >&2
cat >&2 <<EOF
  libvfio-user: $VN_CACHE/libvfio-user/prefix (revision $(cat "$VN_CACHE/libvfio-user/REVISION"))
  qemu:         $VN_CACHE/bin/qemu-system-x86_64 ($("$VN_CACHE/bin/qemu-system-x86_64" -version | head -n 1))
  guest:        $VN_CACHE/guest (kernel $(cat "$VN_CACHE/guest/KERNEL_VERSION"))
  venv:         $VN_CACHE/venv
EOF
