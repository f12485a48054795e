#!/usr/bin/env bash
# `make bench`: loopback throughput of mftd against nginx + curl / aria2c.
#
# One mftd with 4 TLS listeners (the default) and 4 plain ones, and one nginx
# with 4 server blocks serve the same export dir on 127.0.0.1. mftd-4 and
# mftd-1 go over TLS; mftd-4-plain is the same download over plain TCP. The
# CPU seconds mftd spends per GiB (one daemon serves and downloads, so both
# ends of every connection) are reported for both. Each case downloads the same file into each output
# target (tmpfs and a disk directory) BENCH_RUNS times; the median wall time
# is reported, every result is checked against the source's sha256. A second,
# capped case puts 4/8/16/32 MiB/s limits on the mftd listeners and compares
# the download time with the ideal size / 60 MiB/s.
#
# Environment:
#   BENCH_SIZE_MIB      size of the test file (default 1024)
#   BENCH_RUNS          runs per case, median taken (default 3)
#   BENCH_CAP_SIZE_MIB  size of the capped-case file (default 240: ideal 4 s)
#   BENCH_COLD_SIZE_MIB size of the cold-start file (default 2048)
#   BENCH_DISK_DIR      parent of the on-disk output dir (default /var/tmp)
#   BENCH_SHM_DIR       parent of the tmpfs output dir (default /dev/shm)
#   BIN                 where mftd/mftctl are (default target/release)
#
# MB/s here are decimal: 1 MB = 1,000,000 bytes.
# Timing covers the download command only: mftd's includes its piece
# verification, fsync and whole-file hash; curl's and aria2c's do not fsync.
# Between runs the output is deleted and `sync` is run; page caches are not
# dropped (the source files stay cached, as on a warm server).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$ROOT/target/release}"
SIZE_MIB="${BENCH_SIZE_MIB:-1024}"
RUNS="${BENCH_RUNS:-3}"
CAP_SIZE_MIB="${BENCH_CAP_SIZE_MIB:-240}"
COLD_SIZE_MIB="${BENCH_COLD_SIZE_MIB:-2048}"
DISK_PARENT="${BENCH_DISK_DIR:-/var/tmp}"
SHM_PARENT="${BENCH_SHM_DIR:-/dev/shm}"
FILE="bench.bin"
CAP_FILE="bench-capped.bin"
CAP_RATES=(4M 8M 16M 32M) # MiB/s, 60 MiB/s in total
CAP_TOTAL_MIB=60

# aria2c at its best on loopback with 4 mirrors of one file (several URIs
# for one file on the command line are mirrors): 16 connections spread over
# the 4 mirrors, 1 MiB pieces. Measured on a 2-core VM against -x4 -s4,
# -x2 -s8, -x1 -s4 -k16M and --enable-mmap: this was the fastest. The file
# allocation is chosen per target (probe_alloc below).
ARIA2_FLAGS=(-q -x 16 -s 16 -j 1 -k 1M --min-split-size=1M
    --allow-overwrite=true --auto-file-renaming=false)

case "$SIZE_MIB$RUNS$CAP_SIZE_MIB$COLD_SIZE_MIB" in
    *[!0-9]*) echo "bench: BENCH_SIZE_MIB, BENCH_RUNS and BENCH_CAP_SIZE_MIB must be integers" >&2; exit 2 ;;
esac
[ "$RUNS" -ge 1 ] || { echo "bench: BENCH_RUNS must be >= 1" >&2; exit 2; }

die() { echo "bench FAILED: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }

# ---------------------------------------------------------------- cleanup
tmp=""
out_shm=""
out_disk=""
mftd_pid=""
cold_pid=""
nginx_pid=""

stop_pid() { # PID: TERM, wait up to 5 s, then KILL
    local p="$1" i
    [ -n "$p" ] || return 0
    kill -0 "$p" 2>/dev/null || return 0
    kill -TERM "$p" 2>/dev/null || true
    for i in $(seq 1 50); do
        kill -0 "$p" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pid "$mftd_pid"
    stop_pid "$cold_pid"
    stop_pid "$nginx_pid"
    for d in "$out_shm" "$out_disk" "$tmp"; do
        [ -n "$d" ] && rm -rf "$d"
    done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- tools
ensure_tools() {
    local missing=() sudo=()
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
    command -v aria2c >/dev/null 2>&1 || missing+=(aria2)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    [ "${#missing[@]}" -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}" >"${tmp}/apt.log" 2>&1; then
        "${sudo[@]}" apt-get update >>"${tmp}/apt.log" 2>&1 || true
        "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}" >>"${tmp}/apt.log" 2>&1 ||
            { tail -20 "${tmp}/apt.log" >&2; die "could not install ${missing[*]}"; }
    fi
}

# ---------------------------------------------------------------- helpers
now() { echo "${EPOCHREALTIME:-$(date +%s.%N)}"; }

median() { # numbers as arguments
    printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END {
        if (NR % 2) printf "%.3f", a[(NR + 1) / 2];
        else printf "%.3f", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

mbps() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.1f", b / 1e6 / s }'; }

sha() { sha256sum < "$1" | cut -d' ' -f1; }

# Ports (decimal) of every TCP socket, any state, from /proc.
used_ports() {
    awk 'NR > 1 { split($2, a, ":"); print strtonum("0x" a[2]) }' /proc/net/tcp /proc/net/tcp6 2>/dev/null | sort -un
}

# N ports below the ephemeral range that no socket uses right now.
pick_ports() {
    local n="$1" used p got=() lo
    used=" $(used_ports | tr '\n' ' ') "
    lo=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
    [ "$lo" -gt 12000 ] || lo=32768
    while [ "${#got[@]}" -lt "$n" ]; do
        p=$((10000 + RANDOM % (lo - 10000)))
        case "$used ${got[*]} " in *" $p "*) continue ;; esac
        got+=("$p")
    done
    echo "${got[*]}"
}

# aria2c --file-allocation per output dir, set up before any timing: none on
# tmpfs (measured no slower than falloc there), falloc on disk if
# fallocate(2) works in that dir (as mftd preallocates), else none.
declare -A ALLOC=()
probe_alloc() { # DIR
    local d="$1"
    ALLOC[$d]=none
    if command -v fallocate >/dev/null 2>&1 && fallocate -l 1M "$d/.falloc-probe" 2>/dev/null; then
        ALLOC[$d]=falloc
    fi
    rm -f "$d/.falloc-probe"
}

ctl() { "$BIN/mftctl" --socket "$tmp/mftd.sock" "$@"; }

# ---------------------------------------------------------------- setup
[ -x "$BIN/mftd" ] && [ -x "$BIN/mftctl" ] || die "$BIN/mftd or mftctl missing: run \`make release\` first"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/mftd-bench.XXXXXX")"
out_shm="$(mktemp -d "$SHM_PARENT/mftd-bench.XXXXXX")"
out_disk="$(mktemp -d "$DISK_PARENT/mftd-bench.XXXXXX")"
ensure_tools
ALLOC[$out_shm]=none
probe_alloc "$out_disk"
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

start_all="$(now)"
load_start="$(cut -d' ' -f1-3 /proc/loadavg)"
mkdir -p "$tmp/export" "$tmp/state" "$tmp/dl" "$tmp/nginx/logs"
SIZE=$((SIZE_MIB * 1024 * 1024))
CAP_SIZE=$((CAP_SIZE_MIB * 1024 * 1024))
log "generating $FILE ($SIZE_MIB MiB) and $CAP_FILE ($CAP_SIZE_MIB MiB)"
head -c "$SIZE" /dev/urandom > "$tmp/export/$FILE"
head -c "$CAP_SIZE" /dev/urandom > "$tmp/export/$CAP_FILE"
want="$(sha "$tmp/export/$FILE")"
want_cap="$(sha "$tmp/export/$CAP_FILE")"

# ---------------------------------------------------------------- nginx
start_nginx() {
    local ports=("$@") conf="$tmp/nginx/nginx.conf" p i
    {
        [ "$(id -u)" -eq 0 ] && echo "user root;"
        echo "worker_processes auto;"
        echo "pid $tmp/nginx/nginx.pid;"
        echo "error_log $tmp/nginx/logs/error.log warn;"
        echo "events { worker_connections 1024; }"
        echo "http {"
        echo "    access_log off;"
        echo "    sendfile on;"
        echo "    tcp_nopush on;"
        echo "    keepalive_timeout 30;"
        echo "    default_type application/octet-stream;"
        for t in client_body proxy fastcgi uwsgi scgi; do
            mkdir -p "$tmp/nginx/$t"
            echo "    ${t}_temp_path $tmp/nginx/$t;"
        done
        for p in "${ports[@]}"; do
            echo "    server { listen 127.0.0.1:$p; root $tmp/export; }"
        done
        echo "}"
    } > "$conf"
    "$NGINX" -p "$tmp/nginx" -c "$conf" -e "$tmp/nginx/logs/error.log" -g 'daemon off;' \
        >"$tmp/nginx/logs/stdout.log" 2>&1 &
    nginx_pid=$!
    for i in $(seq 1 100); do
        kill -0 "$nginx_pid" 2>/dev/null || break
        if curl -sf -o /dev/null -r 0-0 "http://127.0.0.1:${ports[3]}/$FILE" &&
            curl -sf -o /dev/null -r 0-0 "http://127.0.0.1:${ports[0]}/$FILE"; then
            return 0
        fi
        sleep 0.05
    done
    stop_pid "$nginx_pid"
    nginx_pid=""
    return 1
}

log "starting nginx (4 server blocks)"
ok=""
for attempt in 1 2 3; do
    read -r -a NPORTS <<< "$(pick_ports 4)"
    if start_nginx "${NPORTS[@]}"; then ok=1; break; fi
done
[ -n "$ok" ] || { cat "$tmp/nginx/logs/"*.log >&2; die "nginx did not start"; }

# ---------------------------------------------------------------- mftd
log "starting mftd (4 TLS and 4 plain listeners), log in $tmp/mftd.log"
read -r -a ALLPORTS <<< "$(pick_ports 8)"
MPORTS=("${ALLPORTS[@]:0:4}")
PPORTS=("${ALLPORTS[@]:4:4}")
for p in "${PPORTS[@]}"; do printf '[listener.%s]\ntransport = "plain"\n' "$p"; done > "$tmp/mftd.toml"
MFTD_CONFIG="$tmp/mftd.toml" "$BIN/mftd" --export "$tmp/export" --ports "$(IFS=,; echo "${ALLPORTS[*]}")" \
    --socket "$tmp/mftd.sock" --state-dir "$tmp/state" --download-dir "$tmp/dl" 2> "$tmp/mftd.log" &
mftd_pid=$!
for _ in $(seq 1 200); do
    ctl servers list >/dev/null 2>&1 && break
    kill -0 "$mftd_pid" 2>/dev/null || { cat "$tmp/mftd.log" >&2; die "mftd exited"; }
    sleep 0.05
done
[ "$(ctl servers list | grep -c running)" -eq 8 ] || { ctl servers list >&2 || true; die "expected 8 mftd listeners"; }
[ "$(ctl servers list | grep -c unencrypted)" -eq 4 ] || { ctl servers list >&2 || true; die "expected 4 plain listeners"; }
FROM1="127.0.0.1:${MPORTS[0]}"
FROM4="$(printf '127.0.0.1:%s,' "${MPORTS[@]}")"
FROM4="${FROM4%,}"
FROM4P="$(printf 'plain://127.0.0.1:%s,' "${PPORTS[@]}")"
FROM4P="${FROM4P%,}"
log "mftd TLS ports ${MPORTS[*]}, plain ports ${PPORTS[*]}, nginx ports ${NPORTS[*]}"

# CPU time of a process in seconds (user + system).
cpu_of() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$1/stat"; }

# ---------------------------------------------------------------- cases
# run_case CASE FILE OUTDIR: download FILE into OUTDIR, print seconds; the
# CPU seconds mftd spent meanwhile go to $tmp/case.cpu.
run_case() {
    local c="$1" f="$2" out="$3" t0 t1 rc=0 urls=() p c0
    rm -f "$out/$f" "$out/$f.mftpart" "$out/$f.aria2"
    c0="$(cpu_of "$mftd_pid")"
    t0="$(now)"
    case "$c" in
        mftd-1) ctl get "$f" --from "$FROM1" -o "$out" --force --interval 60 >"$tmp/case.log" 2>&1 || rc=$? ;;
        mftd-4) ctl get "$f" --from "$FROM4" -o "$out" --force --interval 60 >"$tmp/case.log" 2>&1 || rc=$? ;;
        mftd-4-plain) ctl get "$f" --from "$FROM4P" -o "$out" --force --interval 60 >"$tmp/case.log" 2>&1 || rc=$? ;;
        curl-1) curl -sS -f -o "$out/$f" "http://127.0.0.1:${NPORTS[0]}/$f" >"$tmp/case.log" 2>&1 || rc=$? ;;
        aria2c-4)
            for p in "${NPORTS[@]}"; do urls+=("http://127.0.0.1:$p/$f"); done
            aria2c "${ARIA2_FLAGS[@]}" --file-allocation="${ALLOC[$out]:-none}" -d "$out" -o "$f" "${urls[@]}" >"$tmp/case.log" 2>&1 || rc=$?
            ;;
        *) die "unknown case $c" ;;
    esac
    t1="$(now)"
    awk -v a="$c0" -v b="$(cpu_of "$mftd_pid")" 'BEGIN { printf "%.3f", b - a }' > "$tmp/case.cpu"
    if [ "$rc" -ne 0 ]; then
        cat "$tmp/case.log" >&2
        die "$c into $out exited $rc"
    fi
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }'
}

verify() { # FILE PATH WANT
    local got
    [ -f "$2" ] || die "$1: no file at $2"
    got="$(sha "$2")"
    [ "$got" = "$3" ] || die "$1: sha256 of $2 is $got, want $3"
}

log "warming mftd's hash cache (untimed downloads)"
run_case mftd-4 "$FILE" "$tmp/dl" >/dev/null
verify warmup "$tmp/dl/$FILE" "$want"
run_case mftd-4 "$CAP_FILE" "$tmp/dl" >/dev/null
verify warmup "$tmp/dl/$CAP_FILE" "$want_cap"
rm -f "$tmp/dl/$FILE" "$tmp/dl/$CAP_FILE"

CASES=(mftd-1 mftd-4 mftd-4-plain curl-1 aria2c-4)
TARGETS=(shm disk)
declare -A OUTDIR=([shm]="$out_shm" [disk]="$out_disk")
declare -A TIMES MED RATE CPUS CPU

for tg in "${TARGETS[@]}"; do
    out="${OUTDIR[$tg]}"
    # Rounds interleave the cases so drift hits them all alike, and each round
    # starts with the next case so none always follows the same one.
    for r in $(seq 1 "$RUNS"); do
        for k in $(seq 0 $((${#CASES[@]} - 1))); do
            c="${CASES[$(((r - 1 + k) % ${#CASES[@]}))]}"
            sync
            s="$(run_case "$c" "$FILE" "$out")"
            verify "$c/$tg" "$out/$FILE" "$want"
            rm -f "$out/$FILE"
            TIMES[$c/$tg]="${TIMES[$c/$tg]:-} $s"
            CPUS[$c/$tg]="${CPUS[$c/$tg]:-} $(cat "$tmp/case.cpu")"
            log "$tg run $r/$RUNS $c: ${s}s ($(mbps "$SIZE" "$s") MB/s)"
        done
    done
    for c in "${CASES[@]}"; do
        # shellcheck disable=SC2086
        MED[$c/$tg]="$(median ${TIMES[$c/$tg]})"
        RATE[$c/$tg]="$(mbps "$SIZE" "${MED[$c/$tg]}")"
        # shellcheck disable=SC2086
        CPU[$c/$tg]="$(awk -v c="$(median ${CPUS[$c/$tg]})" -v m="$SIZE_MIB" 'BEGIN { printf "%.2f", c * 1024 / m }')"
    done
done
sync

# ---------------------------------------------------------------- capped
log "capped case: mftd listeners at ${CAP_RATES[*]} (MiB/s), $CAP_SIZE_MIB MiB into $SHM_PARENT"
for i in 0 1 2 3; do ctl servers limit "${MPORTS[$i]}" "${CAP_RATES[$i]}" >/dev/null; done
cap_times=()
for r in $(seq 1 "$RUNS"); do
    s="$(run_case mftd-4 "$CAP_FILE" "$out_shm")"
    verify capped "$out_shm/$CAP_FILE" "$want_cap"
    rm -f "$out_shm/$CAP_FILE"
    cap_times+=("$s")
    log "capped run $r/$RUNS: ${s}s"
done
for p in "${MPORTS[@]}"; do ctl servers limit "$p" 0 >/dev/null; done
cap_med="$(median "${cap_times[@]}")"
cap_ideal="$(awk -v m="$CAP_SIZE_MIB" -v t="$CAP_TOTAL_MIB" 'BEGIN { printf "%.3f", m / t }')"
cap_ratio="$(awk -v a="$cap_med" -v b="$cap_ideal" 'BEGIN { printf "%.3f", a / b }')"

# ---------------------------------------------------------------- many
# Many downloads at once from the same 4 listeners (default server settings:
# 16 connections per client address): 10 and then 100 concurrent 8 MiB
# files into tmpfs. Aggregate throughput and the daemon's peak descriptors.
MANY_MAX=100
log "many downloads: writing $MANY_MAX files of 8 MiB"
for i in $(seq 1 "$MANY_MAX"); do head -c $((8 << 20)) /dev/urandom >"$tmp/export/many-$i.bin"; done
many_run() { # N: seconds for N concurrent downloads; peak fds into $tmp/many.fds
    local n="$1" pids=() t0 t1 i fds=0 f
    rm -f "$out_shm"/many-*.bin
    t0="$(now)"
    for i in $(seq 1 "$n"); do
        ctl get "many-$i.bin" --from "$FROM4" -o "$out_shm" --force --interval 60 >"$tmp/many-$i.log" 2>&1 &
        pids+=($!)
    done
    while :; do
        f="$(ls "/proc/$mftd_pid/fd" 2>/dev/null | wc -l)"
        [ "$f" -gt "$fds" ] && fds="$f"
        local running=0
        for i in "${pids[@]}"; do kill -0 "$i" 2>/dev/null && running=1 && break; done
        [ "$running" = 1 ] || break
        sleep 0.05
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || { cat "$tmp/many-$((i + 1)).log" >&2; die "many: download $((i + 1)) of $n failed"; }
    done
    t1="$(now)"
    for i in $(seq 1 "$n"); do
        cmp -s "$out_shm/many-$i.bin" "$tmp/export/many-$i.bin" || die "many: many-$i.bin differs from the source"
    done
    rm -f "$out_shm"/many-*.bin
    echo "$fds" >"$tmp/many.fds"
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }'
}
log "many downloads: warming the server's hash cache"
many_run "$MANY_MAX" >/dev/null
declare -A MANY_T MANY_F
for n in 10 "$MANY_MAX"; do
    ts=()
    for r in $(seq 1 "$RUNS"); do
        ts+=("$(many_run "$n")")
        f="$(cat "$tmp/many.fds")"
        [ "$f" -gt "${MANY_F[$n]:-0}" ] && MANY_F[$n]="$f"
        log "many: $n at once, run $r/$RUNS: ${ts[-1]}s, peak fds $f"
    done
    MANY_T[$n]="$(median "${ts[@]}")"
done

# ---------------------------------------------------------------- cold start
# A file the server has never hashed: a fresh mftd (empty hash cache) serves
# it on 4 listeners, the bench's mftd downloads it into tmpfs twice: cold
# (the server hashes while it sends) and warm. Time to the first byte (the
# first progress line with bytes, polled every 50 ms) and total time.
COLD_FILE="bench-cold.bin"
log "cold start: writing $COLD_FILE ($COLD_SIZE_MIB MiB)"
head -c $((COLD_SIZE_MIB * 1024 * 1024)) /dev/urandom > "$tmp/export/$COLD_FILE"
want_cold="$(sha "$tmp/export/$COLD_FILE")"
cold_get() { # FROM: prints "TTFB TOTAL" in seconds
    local t0 t1 ttfb="" line
    rm -f "$out_shm/$COLD_FILE"
    t0="$(now)"
    while IFS= read -r line; do
        if [ -z "$ttfb" ] && [[ $line == *'"type":"progress"'* ]] && [[ $line =~ \"bytes_done\":([0-9]+) ]] &&
            [ "${BASH_REMATCH[1]}" -gt 0 ]; then
            ttfb="$(now)"
        fi
    done < <(ctl --json get "$COLD_FILE" --from "$1" -o "$out_shm" --force --interval 0.05 2>"$tmp/cold.log")
    t1="$(now)"
    verify cold "$out_shm/$COLD_FILE" "$want_cold"
    rm -f "$out_shm/$COLD_FILE"
    [ -n "$ttfb" ] || die "cold start: no progress line with bytes"
    awk -v a="$t0" -v f="$ttfb" -v b="$t1" 'BEGIN { printf "%.3f %.3f", f - a, b - a }'
}
cold_ttfb=() cold_total=() warm_ttfb=() warm_total=()
for r in $(seq 1 "$RUNS"); do
    "$BIN/mftd" --export "$tmp/export" --ports 0,0,0,0 --socket "$tmp/cold.sock" \
        --state-dir "$tmp/cold-state" --download-dir "$tmp/dl" 2> "$tmp/cold-mftd.log" &
    cold_pid=$!
    for _ in $(seq 1 200); do
        "$BIN/mftctl" --socket "$tmp/cold.sock" servers list >/dev/null 2>&1 && break
        kill -0 "$cold_pid" 2>/dev/null || { cat "$tmp/cold-mftd.log" >&2; die "cold mftd exited"; }
        sleep 0.05
    done
    read -r -a CPORTS <<< "$("$BIN/mftctl" --socket "$tmp/cold.sock" servers list | awk 'NR > 1 { print $1 }' | tr '\n' ' ')"
    FROMC="$(printf '127.0.0.1:%s,' "${CPORTS[@]}")"
    read -r a b <<< "$(cold_get "${FROMC%,}")"
    cold_ttfb+=("$a") cold_total+=("$b")
    read -r a b <<< "$(cold_get "${FROMC%,}")"
    warm_ttfb+=("$a") warm_total+=("$b")
    stop_pid "$cold_pid"
    cold_pid=""
    log "cold start run $r/$RUNS: cold ttfb ${cold_ttfb[-1]}s total ${cold_total[-1]}s; warm ttfb ${warm_ttfb[-1]}s total ${warm_total[-1]}s"
done
rm -f "$tmp/export/$COLD_FILE"

# ---------------------------------------------------------------- report
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
elapsed="$(awk -v a="$start_all" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }')"

echo
echo "mftd loopback benchmark: $SIZE_MIB MiB file, median of $RUNS runs, MB = 1e6 bytes"
echo "targets: shm = $SHM_PARENT ($(df --output=fstype "$SHM_PARENT" 2>/dev/null | tail -1 | tr -d ' ')), disk = $DISK_PARENT ($(df --output=fstype "$DISK_PARENT" 2>/dev/null | tail -1 | tr -d ' '))"
echo "aria2c ${ARIA2_FLAGS[*]} --file-allocation=(shm: ${ALLOC[$out_shm]}, disk: ${ALLOC[$out_disk]})"
echo
printf '%-13s %-6s %10s %10s %14s   %s\n' CASE TARGET MEDIAN_S MB/S "MFTD_CPU_S/GiB" "ALL RUNS (s)"
for tg in "${TARGETS[@]}"; do
    for c in "${CASES[@]}"; do
        cpu="${CPU[$c/$tg]}"
        case "$c" in curl-1 | aria2c-4) cpu="-" ;; esac
        printf '%-13s %-6s %10s %10s %14s  %s\n' "$c" "$tg" "${MED[$c/$tg]}" "${RATE[$c/$tg]}" "$cpu" "${TIMES[$c/$tg]}"
    done
done
echo "(mftd CPU: the one daemon serves and downloads, so both ends of every connection)"
echo
printf '%-6s %18s %18s %18s\n' TARGET "mftd-4/aria2c-4" "mftd-1/curl-1" "mftd-4 tls/plain"
for tg in "${TARGETS[@]}"; do
    printf '%-6s %18s %18s %18s\n' "$tg" \
        "$(ratio "${RATE[mftd-4/$tg]}" "${RATE[aria2c-4/$tg]}")" \
        "$(ratio "${RATE[mftd-1/$tg]}" "${RATE[curl-1/$tg]}")" \
        "$(ratio "${RATE[mftd-4/$tg]}" "${RATE[mftd-4-plain/$tg]}")"
done
echo "(throughput ratios: > 1 means the first is faster; mftd-4 and mftd-1 use TLS, curl and aria2c plain HTTP)"
echo
echo "capped: listeners at 4/8/16/32 MiB/s, $CAP_SIZE_MIB MiB: median ${cap_med}s, ideal ${cap_ideal}s, time/ideal ${cap_ratio} (runs:$(printf ' %s' "${cap_times[@]}"))"
many_mb() { awk -v n="$1" -v s="$2" 'BEGIN { printf "%.0f", n * 8 * 1048576 / 1e6 / s }'; }
echo "many: 10 concurrent 8 MiB downloads: ${MANY_T[10]}s, $(many_mb 10 "${MANY_T[10]}") MB/s aggregate, peak ${MANY_F[10]} fds; $MANY_MAX concurrent: ${MANY_T[$MANY_MAX]}s, $(many_mb "$MANY_MAX" "${MANY_T[$MANY_MAX]}") MB/s, peak ${MANY_F[$MANY_MAX]} fds; $MANY_MAX / 10 aggregate: $(awk -v a="${MANY_T[10]}" -v b="${MANY_T[$MANY_MAX]}" -v m="$MANY_MAX" 'BEGIN { printf "%.2f", (m / b) / (10 / a) }')"
echo "cold start, $COLD_SIZE_MIB MiB from 4 listeners of a fresh mftd into tmpfs: cold (never hashed) time to first byte $(median "${cold_ttfb[@]}")s, total $(median "${cold_total[@]}")s; warm $(median "${warm_ttfb[@]}")s, $(median "${warm_total[@]}")s"
echo "total bench time ${elapsed}s; load average at start: $load_start, at end: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) CPUs; other load skews the numbers)"
echo
summary="BENCH-SUMMARY: size_mib=$SIZE_MIB runs=$RUNS"
for tg in "${TARGETS[@]}"; do
    for c in "${CASES[@]}"; do summary+=" $c/$tg=${RATE[$c/$tg]}MB/s"; done
    summary+=" mftd4_vs_aria2c4/$tg=$(ratio "${RATE[mftd-4/$tg]}" "${RATE[aria2c-4/$tg]}")"
    summary+=" mftd1_vs_curl1/$tg=$(ratio "${RATE[mftd-1/$tg]}" "${RATE[curl-1/$tg]}")"
    summary+=" tls_vs_plain/$tg=$(ratio "${RATE[mftd-4/$tg]}" "${RATE[mftd-4-plain/$tg]}")"
    summary+=" cpu_s_per_gib_tls/$tg=${CPU[mftd-4/$tg]} cpu_s_per_gib_plain/$tg=${CPU[mftd-4-plain/$tg]}"
done
summary+=" capped_s=$cap_med capped_ideal_s=$cap_ideal capped_ratio=$cap_ratio"
summary+=" cold_ttfb_s=$(median "${cold_ttfb[@]}") cold_total_s=$(median "${cold_total[@]}") warm_ttfb_s=$(median "${warm_ttfb[@]}") warm_total_s=$(median "${warm_total[@]}") total_s=$elapsed"
echo "$summary"
