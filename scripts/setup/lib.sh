# shellcheck shell=bash
# Shared helpers for scripts/setup/*.sh (sourced, not executed).
#
# Why: every setup step needs the same cache location, logging and a way to
# call apt-get that waits for a concurrently running apt/dpkg instead of
# failing on its lock.

VN_CACHE=${VN_CACHE:-/var/cache/vfiouser-net}
export VN_CACHE
# Suite that provides QEMU >= 10.1 (vfio-user-pci) and the guest image parts.
VN_SUITE=${VN_SUITE:-trixie}
VN_MIRROR=${VN_MIRROR:-http://deb.debian.org/debian}
export DEBIAN_FRONTEND=noninteractive

vn_log() { printf '[%s] %s\n' "${VN_STEP:-setup}" "$*" >&2; }
vn_die() { vn_log "ERROR: $*"; exit 1; }

vn_need_root() {
    [[ $(id -u) -eq 0 ]] || vn_die "must run as root"
}

# Debian major version of the host ("12", "13", ...).
vn_debian_major() {
    local v
    v=$(cat /etc/debian_version 2>/dev/null || echo unknown)
    case "$v" in
        trixie*) echo 13 ;;
        bookworm*) echo 12 ;;
        *) echo "${v%%.*}" ;;
    esac
}

# apt-get wrapper: waits for the dpkg/apt locks held by another apt process
# (e.g. an install still running in the background) instead of failing.
vn_apt_get() {
    local try out rc
    out=$(mktemp)
    for try in $(seq 1 120); do
        set +e
        apt-get -o DPkg::Lock::Timeout=600 "$@" 2>&1 | tee "$out"
        rc=${PIPESTATUS[0]}
        set -e
        if [[ $rc -eq 0 ]]; then
            rm -f "$out"
            return 0
        fi
        if grep -qiE 'could not get lock|unable to lock|is another process using it' "$out"; then
            vn_log "apt lock busy, waiting (try $try)"
            sleep 5
            continue
        fi
        rm -f "$out"
        return "$rc"
    done
    rm -f "$out"
    vn_die "gave up waiting for the apt lock"
}

# Returns 0 when all given Debian packages are installed on the host.
vn_pkgs_installed() {
    local p st
    for p in "$@"; do
        st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
        [[ $st == installed ]] || return 1
    done
    return 0
}

# Print the packages from the arguments that are not installed.
vn_pkgs_missing() {
    local p
    for p in "$@"; do
        vn_pkgs_installed "$p" || printf '%s\n' "$p"
    done
}

# Copy kernel modules out of a kernel package's tree for the guest's busybox
# insmod: MODDIR (…/lib/modules/KVER/kernel), OUT (the initramfs's
# lib/modules/KVER), then the module names; a name starting with "?" only if
# this kernel has it as a module (built in elsewhere). Each is decompressed
# (insmod takes plain .ko) and brings its dependencies (the depends= entry of
# its .modinfo). The load order, dependencies first, is left in
# VN_MODULE_ORDER (an array: no subshell, so that vn_die stops the set-up).
vn_copy_modules() {
    local moddir=$1 out=$2 f n m
    shift 2
    declare -A _vn_modfile=() _vn_moddone=()
    VN_MODULE_ORDER=()
    while IFS= read -r f; do
        n=$(basename "$f")
        n=${n%.ko*}
        _vn_modfile[${n//-/_}]=$f
    done < <(find "$moddir" -name '*.ko*')
    _vn_add_module() {
        local m=${1//-/_} src dst dep
        [[ -z ${_vn_moddone[$m]:-} ]] || return 0
        _vn_moddone[$m]=1
        src=${_vn_modfile[$m]:-}
        [[ -n $src ]] || vn_die "module $m not found in $moddir (built in?)"
        dst=$out/$m.ko
        case "$src" in
            *.ko.xz) xz -dc "$src" >"$dst" ;;
            *.ko.zst) zstd -qdc "$src" >"$dst" ;;
            *.ko.gz) gzip -dc "$src" >"$dst" ;;
            *.ko) cp "$src" "$dst" ;;
            *) vn_die "unknown module format: $src" ;;
        esac
        for dep in $(objcopy -O binary --only-section=.modinfo "$dst" /dev/stdout |
            tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' '); do
            _vn_add_module "$dep"
        done
        VN_MODULE_ORDER+=("$m")
    }
    for m in "$@"; do
        if [[ $m == \?* ]]; then
            m=${m#\?}
            [[ -z ${_vn_modfile[$m]:-} ]] || _vn_add_module "$m"
        else
            _vn_add_module "$m"
        fi
    done
}

# A private apt configuration for SUITE's binary packages under DIR (sources
# file, lists, cache; the host's apt is not touched), updated, its options
# left in VN_APT_OPTS for apt-get/apt-cache.
vn_private_apt() {
    local dir=$1 suite=$2 keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [[ -f $keyring ]] || keyring=/usr/share/keyrings/debian-archive-keyring.pgp
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
    echo "deb [arch=amd64 signed-by=$keyring] $VN_MIRROR $suite main" >"$dir/sources.list"
    VN_APT_OPTS=(
        -o "Dir::Etc::SourceList=$dir/sources.list"
        -o "Dir::Etc::SourceParts=$dir/nonexistent.d"
        -o "Dir::State::Lists=$dir/lists"
        -o "Dir::Cache=$dir/cache"
        -o "APT::Sandbox::User=root"
        -o "APT::Architecture=amd64"
        -o "APT::Architectures=amd64"
    )
    vn_log "updating the private $suite package lists"
    apt-get "${VN_APT_OPTS[@]}" update -q >&2
}
