#!/usr/bin/env bash
# Runs the cargo-fuzz (libFuzzer) targets of fuzz/ for a bounded time each.
#
#   FUZZ_SECS=60          seconds per target (libFuzzer -max_total_time)
#   FUZZ_TARGETS="..."    targets to run (default: frame control manifest)
#   FUZZ_SANITIZER=address  cargo-fuzz sanitizer (address, none, ...)
#
# Works on a stable toolchain: RUSTC_BOOTSTRAP=1 lets stable rustc accept the
# -Z flags cargo-fuzz passes. Each target fuzzes a fresh copy of its committed
# seed corpus (fuzz/corpus/<target>) under fuzz/target/fuzz-corpus/, so the
# committed corpus never grows. Crash inputs land in fuzz/artifacts/<target>/.
# Exits non-zero if any target crashed (panic, failed assertion, timeout, OOM).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

SECS=${FUZZ_SECS:-60}
TARGETS=${FUZZ_TARGETS:-"frame control manifest"}
SANITIZER=${FUZZ_SANITIZER:-address}
WORK=fuzz/target/fuzz-corpus
LOGS=fuzz/target/fuzz-logs

export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# Same flags for build and run, so run does not rebuild.
FLAGS=(--sanitizer "$SANITIZER" --debug-assertions)

echo "== building fuzz targets ($SANITIZER sanitizer, debug assertions on)"
cargo fuzz build "${FLAGS[@]}"

mkdir -p "$WORK" "$LOGS"
start_all=$(date +%s)
failed=()
summary=()

for t in $TARGETS; do
    corpus="$WORK/$t"
    rm -rf "$corpus"
    mkdir -p "$corpus" "fuzz/artifacts/$t"
    cp -r "fuzz/corpus/$t/." "$corpus/"
    log="$LOGS/$t.log"
    stamp=$(mktemp)
    echo "== fuzzing $t for ${SECS}s (log: $log)"
    t0=$(date +%s)
    set +e
    cargo fuzz run "${FLAGS[@]}" "$t" "$corpus" -- \
        -max_total_time="$SECS" -print_final_stats=1 -timeout=10 >"$log" 2>&1
    rc=$?
    set -e
    dt=$(( $(date +%s) - t0 ))

    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)
    if [ -z "$execs" ]; then
        execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#' || true)
    fi
    mapfile -t crashes < <(find "fuzz/artifacts/$t" -type f -newer "$stamp" 2>/dev/null)
    rm -f "$stamp"

    if [ "$rc" -ne 0 ] || [ "${#crashes[@]}" -gt 0 ]; then
        failed+=("$t")
        summary+=("$(printf '%-9s CRASH  executions=%-10s time=%ss  exit=%s' "$t" "${execs:-?}" "$dt" "$rc")")
        echo "!! $t failed (exit $rc)"
        { grep -m1 -A4 -E "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer" "$log" || tail -n 40 "$log"; } | cut -c1-400
        for c in "${crashes[@]}"; do
            echo "-- input $c ($(stat -c %s "$c") bytes), hex:"
            od -An -tx1 -v "$c" | tr -d ' \n' | head -c 4096; echo
        done
    else
        summary+=("$(printf '%-9s ok     executions=%-10s time=%ss' "$t" "${execs:-?}" "$dt")")
    fi
done

echo "== summary (total $(( $(date +%s) - start_all ))s of fuzzing)"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "crashed: ${failed[*]} (inputs in fuzz/artifacts/, replay: RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <file>)"
    exit 1
fi
echo "no crash"
