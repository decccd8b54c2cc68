#!/usr/bin/env bash
# Coverage-guided fuzzing of every guest-facing parser, each target for a
# bounded time (tests/fuzz: libFuzzer targets in C with ASan + UBSan for the
# datapath, atheris targets for the Python-side parsers).
#
#   bash scripts/fuzz.sh [--seconds N] [--json PATH] [--target NAME]... [--coverage] [--keep]
#
# Builds the C targets (tests/fuzz/Makefile, into tests/fuzz/build), then runs
# each target for N seconds (default 30) from a copy of its seed corpus
# (tests/fuzz/corpus/<target>, never modified by a run) in a scratch
# directory. Prints a table per target (executions, exec/s, coverage:
# libFuzzer's cov edges and ft features, corpus size) and writes it as JSON
# with --json. Exit status 1 when any target crashed, leaked, hit a sanitizer
# report or an invariant (the reproducer's path and the report are printed;
# the scratch directory is kept), or could not be built. A missing
# prerequisite (clang with libFuzzer, atheris) skips those targets, except
# with CI=true, where it is a failure. --coverage then replays the C
# targets' final corpora through a source-coverage build (llvm-cov) and
# prints the line, region and branch coverage of the guest-facing C files.
#
# Needs what scripts/setup.sh installs (clang, libclang-rt-*-dev, the venv
# with atheris, libvfio-user's headers).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
VN_CACHE=${VN_CACHE:-/var/cache/vfiouser-net}
VENV=${VN_VENV:-$VN_CACHE/venv}
PYTHON=$VENV/bin/python
LIBVFIO_USER_PREFIX=${LIBVFIO_USER_PREFIX:-$VN_CACHE/libvfio-user/prefix}
CLANG=${CLANG:-clang}
FUZZ_DIR=$REPO/tests/fuzz
BUILD=${VN_FUZZ_BUILD:-$FUZZ_DIR/build}

C_TARGETS=(fuzz_virtq fuzz_worker fuzz_ctrl fuzz_steering fuzz_vfio_user)
PY_TARGETS=(fuzz_admin_protocol fuzz_config fuzz_bar0)

SECS=30
JSON=""
KEEP=0
COVERAGE=0
ONLY=()
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --seconds) SECS=${2:?}; shift 2 ;;
        --seconds=*) SECS=${1#*=}; shift ;;
        --json) JSON=${2:?}; shift 2 ;;
        --json=*) JSON=${1#*=}; shift ;;
        --target) ONLY+=("${2:?}"); shift 2 ;;
        --target=*) ONLY+=("${1#*=}"); shift ;;
        --keep) KEEP=1; shift ;;
        --coverage) COVERAGE=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "fuzz.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
[[ $SECS =~ ^[1-9][0-9]*$ ]] || { echo "fuzz.sh: --seconds needs a positive integer" >&2; exit 2; }

log() { printf '[fuzz] %s\n' "$*" >&2; }
wanted() {
    [[ ${#ONLY[@]} -eq 0 ]] && return 0
    local t
    for t in "${ONLY[@]}"; do [[ $t == "$1" ]] && return 0; done
    return 1
}
for t in "${ONLY[@]}"; do
    [[ " ${C_TARGETS[*]} ${PY_TARGETS[*]} " == *" $t "* ]] || {
        echo "fuzz.sh: unknown target $t (targets: ${C_TARGETS[*]} ${PY_TARGETS[*]})" >&2
        exit 2
    }
done

FAILED=0
declare -a RUN=() SKIPPED=()
# A missing prerequisite: a failure under CI, else those targets are skipped.
missing() {
    local what=$1
    shift
    if [[ ${CI:-} == true ]]; then
        log "FAIL: $what (CI=true: a missing prerequisite is a failure)"
        FAILED=1
    else
        log "SKIP ${*}: $what"
    fi
    SKIPPED+=("$@")
}

# -- prerequisites and build ------------------------------------------------------
declare -a C_RUN=() PY_RUN=()
for t in "${C_TARGETS[@]}"; do wanted "$t" && C_RUN+=("$t"); done
for t in "${PY_TARGETS[@]}"; do wanted "$t" && PY_RUN+=("$t"); done

if [[ ${#C_RUN[@]} -gt 0 ]]; then
    probe=$(mktemp -d)
    printf 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n);\n%s\n' \
        'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { (void)d; (void)n; return 0; }' \
        >"$probe/probe.c"
    if ! command -v "$CLANG" >/dev/null; then
        missing "no $CLANG (apt: clang)" "${C_RUN[@]}"
        C_RUN=()
    elif ! "$CLANG" -fsanitize=fuzzer,address,undefined "$probe/probe.c" -o "$probe/probe" \
        >"$probe/log" 2>&1; then
        missing "$CLANG cannot link libFuzzer + ASan/UBSan (apt: libclang-rt-N-dev): $(tail -n 1 "$probe/log")" \
            "${C_RUN[@]}"
        C_RUN=()
    elif [[ ! -f $LIBVFIO_USER_PREFIX/include/vfio-user/libvfio-user.h ]]; then
        missing "no libvfio-user headers in $LIBVFIO_USER_PREFIX (scripts/setup.sh)" "${C_RUN[@]}"
        C_RUN=()
    elif [[ " ${C_RUN[*]} " == *" fuzz_vfio_user "* &&
        ! -f $LIBVFIO_USER_PREFIX/../src/lib/libvfio-user.c ]]; then
        # fuzz_vfio_user builds libvfio-user's own (patched) source.
        missing "no libvfio-user source next to $LIBVFIO_USER_PREFIX (scripts/setup.sh)" fuzz_vfio_user
        C_RUN=("${C_RUN[@]/fuzz_vfio_user/}")
        read -r -a C_RUN <<<"${C_RUN[*]}"
    fi
    rm -rf "$probe"
fi
if [[ ${#C_RUN[@]} -gt 0 ]]; then
    log "building ${C_RUN[*]} with $("$CLANG" --version | head -n 1) into $BUILD"
    if ! make -C "$FUZZ_DIR" -s -j"$(nproc)" BUILD="$BUILD" CLANG="$CLANG" \
        LIBVFIO_USER_PREFIX="$LIBVFIO_USER_PREFIX" "${C_RUN[@]/#/$BUILD/}" >&2; then
        log "FAIL: building the C targets"
        exit 1
    fi
fi
if [[ ${#PY_RUN[@]} -gt 0 ]]; then
    if [[ ! -x $PYTHON ]]; then
        missing "no venv at $VENV (scripts/setup.sh)" "${PY_RUN[@]}"
        PY_RUN=()
    elif ! "$PYTHON" -c 'import atheris, vfiouser_net.native' 2>/dev/null; then
        missing "atheris or the project is not installed in $VENV (scripts/setup.sh)" "${PY_RUN[@]}"
        PY_RUN=()
    fi
fi
RUN=("${C_RUN[@]}" "${PY_RUN[@]}")
if [[ ${#RUN[@]} -eq 0 ]]; then
    log "nothing to run"
    exit "$FAILED"
fi

# -- runs ---------------------------------------------------------------------------
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/vn-fuzz.XXXXXX")
RESULTS=$SCRATCH/results.tsv
: >"$RESULTS"
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:symbolize=1:handle_abort=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
total=$((${#RUN[@]} * SECS))
log "running ${#RUN[@]} targets for $SECS s each (about $((total / 60)) min $((total % 60)) s); scratch $SCRATCH"

# The last value of "key: N" in a libFuzzer log.
last_field() { grep -oE "(^| )$1: [0-9]+" "$2" | tail -n 1 | grep -oE '[0-9]+$' || echo 0; }
stat_field() { sed -n "s/^stat::$1: *\([0-9]*\).*/\1/p" "$2" | tail -n 1; }

for t in "${RUN[@]}"; do
    dir=$SCRATCH/$t
    mkdir -p "$dir/corpus" "$dir/artifacts"
    seeds=$(find "$FUZZ_DIR/corpus/$t" -type f | wc -l)
    cp -r "$FUZZ_DIR/corpus/$t/." "$dir/corpus/"
    flags=(-max_total_time="$SECS" -print_final_stats=1 -timeout=20 -rss_limit_mb=4096
        -artifact_prefix="$dir/artifacts/")
    if [[ " ${C_TARGETS[*]} " == *" $t "* ]]; then
        cmd=("$BUILD/$t" -use_value_profile=1)
    else
        cmd=("$PYTHON" "$FUZZ_DIR/$t.py")
    fi
    log "$t: ${SECS} s from $seeds seeds"
    set +e
    (cd "$dir" && "${cmd[@]}" "${flags[@]}" "$dir/corpus") >"$dir/log" 2>&1
    rc=$?
    set -e
    execs=$(stat_field number_of_executed_units "$dir/log")
    rate=$(stat_field average_exec_per_sec "$dir/log")
    cov=$(last_field cov "$dir/log")
    ft=$(last_field ft "$dir/log")
    corpus=$(find "$dir/corpus" -type f | wc -l)
    mapfile -t crashes < <(find "$dir/artifacts" -type f | sort)
    result=ok
    if [[ $rc -ne 0 || ${#crashes[@]} -gt 0 ]]; then
        result=FAILED
        FAILED=1
        {
            echo "== $t FAILED (exit $rc)"
            for c in "${crashes[@]}"; do
                echo "   reproducer: $c"
                echo "   rerun:      ${cmd[*]} $c"
            done
            echo "   log:        $dir/log"
            echo "-- report (end of the log):"
            grep -nE 'ERROR: |SUMMARY: |runtime error|invariant failed|check failed|Uncaught Python exception|Traceback|deadly signal|timeout after|out-of-memory' \
                "$dir/log" | head -n 20
            tail -n 60 "$dir/log"
            echo "--"
        } >&2
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "${execs:-0}" "${rate:-0}" "$cov" "$ft" \
        "$seeds" "$corpus" "$result" "$SECS" >>"$RESULTS"
done

# -- source coverage of the C targets' corpora (--coverage) ---------------------------
# The files whose code parses or acts on what the guest writes.
COV_FILES=(virtq.c guest_mem.c worker.c ctrl.c ctrl_stats.c ctrl_coal.c steering.c rss_hash.c
    rx_filter.c capture.c coalesce.h server.c mem_guard.c)
COV_JSON=""
llvm_tool() {
    local major
    major=$("$CLANG" --version | sed -n 's/.*clang version \([0-9]*\).*/\1/p' | head -n 1)
    if command -v "$1-$major" >/dev/null; then
        echo "$1-$major"
    elif command -v "$1" >/dev/null; then
        echo "$1"
    fi
}
if [[ $COVERAGE -eq 1 && ${#C_RUN[@]} -gt 0 ]]; then
    PROFDATA=$(llvm_tool llvm-profdata)
    LLVMCOV=$(llvm_tool llvm-cov)
    if [[ -z $PROFDATA || -z $LLVMCOV ]]; then
        missing "no llvm-profdata/llvm-cov for --coverage (apt: llvm)" coverage
    else
        log "coverage: building ${C_RUN[*]} with -fprofile-instr-generate into $BUILD/cov"
        make -C "$FUZZ_DIR" -s -j"$(nproc)" BUILD="$BUILD/cov" COVERAGE=1 CLANG="$CLANG" \
            LIBVFIO_USER_PREFIX="$LIBVFIO_USER_PREFIX" "${C_RUN[@]/#/$BUILD/cov/}" >&2
        mkdir -p "$SCRATCH/cov"
        objects=()
        for t in "${C_RUN[@]}"; do
            LLVM_PROFILE_FILE="$SCRATCH/cov/$t-%p.profraw" "$BUILD/cov/$t" -runs=0 \
                "$SCRATCH/$t/corpus" >"$SCRATCH/cov/$t.log" 2>&1 || true
            objects+=(-object "$BUILD/cov/$t")
        done
        "$PROFDATA" merge -sparse "$SCRATCH"/cov/*.profraw -o "$SCRATCH/cov/all.profdata"
        (cd "$FUZZ_DIR" && "$LLVMCOV" export -summary-only \
            -instr-profile "$SCRATCH/cov/all.profdata" "${objects[@]:1}") >"$SCRATCH/cov/export.json"
        COV_JSON=$SCRATCH/cov/coverage.json
        python3 - "$SCRATCH/cov/export.json" "$COV_JSON" "${COV_FILES[@]}" <<'EOF'
import json, os, sys
export, out, files = sys.argv[1], sys.argv[2], sys.argv[3:]
data = json.load(open(export))["data"][0]["files"]
kinds = ("lines", "regions", "branches")
rows, tot = {}, {k: [0, 0] for k in kinds}
for f in data:
    name = os.path.basename(f["filename"])
    if name not in files or "vfiouser_net/csrc/" not in f["filename"]:
        continue
    s = f["summary"]
    row = {}
    for k in kinds:
        n, c = s[k]["count"], s[k]["covered"]
        row[k], row[k + "_covered"] = n, c
        row[k + "_percent"] = round(100.0 * c / n, 1) if n else 100.0
        tot[k][0] += n
        tot[k][1] += c
    rows[name] = row
total = {}
for k, (n, c) in tot.items():
    total[k], total[k + "_covered"] = n, c
    total[k + "_percent"] = round(100.0 * c / n, 1) if n else 100.0
json.dump({"files": rows, "total": total}, open(out, "w"), indent=2)


def cell(r, k):
    return f"{r[k + '_covered']}/{r[k]} {r[k + '_percent']:.1f}%".rjust(17)


print(f"\n{'C source (guest-facing)':24}" + "".join(k.rjust(17) for k in kinds))
for name in files:
    if name in rows:
        print(f"{name:24}" + "".join(cell(rows[name], k) for k in kinds))
print(f"{'total':24}" + "".join(cell(total, k) for k in kinds))
print("(every C target's final corpus replayed through a -fprofile-instr-generate build)")
EOF
    fi
fi

# -- summary ------------------------------------------------------------------------
{
    printf '\n%-21s %12s %8s %6s %7s %7s %7s  %s\n' target executions exec/s cov ft seeds corpus result
    while IFS=$'\t' read -r t execs rate cov ft seeds corpus result _; do
        printf '%-21s %12s %8s %6s %7s %7s %7s  %s\n' "$t" "$execs" "$rate" "$cov" "$ft" "$seeds" \
            "$corpus" "$result"
    done <"$RESULTS"
    for t in "${SKIPPED[@]}"; do printf '%-21s %12s %8s %6s %7s %7s %7s  %s\n' "$t" - - - - - - skipped; done
    echo "(cov: libFuzzer's covered edges, for atheris Python bytecode edges; ft: features;"
    echo " corpus: inputs after the run, seeds included; ${SECS} s per target)"
}
if [[ -n $JSON ]]; then
    COV_JSON=$COV_JSON python3 - "$RESULTS" "$JSON" "$SECS" "${SKIPPED[@]}" <<'EOF'
import json, os, sys
rows, path, secs, skipped = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
keys = ["target", "executions", "exec_per_sec", "cov", "ft", "seeds", "corpus", "result", "seconds"]
out = []
for line in open(rows):
    rec = dict(zip(keys, line.rstrip("\n").split("\t")))
    for k in keys[1:7] + ["seconds"]:
        rec[k] = int(rec[k] or 0)
    rec["kind"] = "atheris" if rec["target"] in ("fuzz_admin_protocol", "fuzz_config", "fuzz_bar0") else "libfuzzer"
    out.append(rec)
out += [{"target": t, "result": "skipped"} for t in skipped]
with open(path, "w") as f:
    doc = {"seconds_per_target": secs, "targets": out}
    if os.environ.get("COV_JSON"):
        doc["c_source_coverage"] = json.load(open(os.environ["COV_JSON"]))
    json.dump(doc, f, indent=2)
    f.write("\n")
EOF
    log "summary written to $JSON"
fi
if [[ $FAILED -ne 0 ]]; then
    log "FAILED (scratch directory kept: $SCRATCH)"
    exit 1
fi
if [[ $KEEP -eq 1 ]]; then
    log "scratch directory kept: $SCRATCH"
else
    rm -rf "$SCRATCH"
fi
exit 0
