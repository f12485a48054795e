#!/usr/bin/env bash
# `make bench-wan`: mftd against aria2c, curl and iperf3 on an emulated WAN.
#
# Builds the testbed of scripts/wan-testbed.sh (network namespaces, one
# client host and BENCH_WAN_SERVERS server hosts, per-host tbf caps, a
# userspace delay line for the round-trip time), runs one mftd listener and
# one nginx on every server host and a downloading mftd on the client host,
# and times, for every RTT and rate mix, in the same run:
#   mftd from all hosts vs aria2c from the nginx mirrors of all hosts,
#   mftd from one host vs curl from that host's nginx,
#   iperf3 from every host at once, each sending its ideal share of the
#   file over 4 streams (what TCP itself achieves, ramp-up included: the
#   floor for any tool), and iperf3 from one host, 1 stream and 8 streams
#   (the path's own capacity),
# and, at the RTTs in BENCH_WAN_FAIL_RTTS, mftd with the fastest host killed
# mid-download, with its link going silently dead mid-download, and with
# every host unreachable for BENCH_WAN_OUTAGE seconds.
# Every output is sha256-checked. Times are medians of BENCH_WAN_RUNS runs.
# "ideal" = size / sum of caps x 1514/1448 (the best TCP can do through tbf,
# which counts Ethernet/IP/TCP headers).
#
# Needs root. Installs nginx-light, aria2, iperf3 and curl if missing. The
# test file lives outside the repo (BENCH_WAN_DIR) and is reused.
#
# Environment:
#   BENCH_WAN_SIZE_MIB   file size (default 1024)
#   BENCH_WAN_SINGLE_MIB file size for the one-source cases (default 256:
#                        one curl connection at 200 ms RTT is slow)
#   BENCH_WAN_RUNS       runs per case, median taken (default 3)
#   BENCH_WAN_RTTS       round-trip times in ms (default "2 20 100 200")
#   BENCH_WAN_FAIL_RTTS  RTTs at which the failure cases run (default "20 100")
#   BENCH_WAN_MIXES      rate mixes (default "equal unequal"): equal is
#                        400mbit on every host, unequal 800/400/200/100mbit
#   BENCH_WAN_CASES      which cases (default "multi plain single iperf fail"; plain
#                        adds, after each multi case, mftd over plain TCP: the
#                        TLS row's peer is then mftd without TLS)
#   BENCH_WAN_OUTAGE     seconds of total outage (default 5)
#   BENCH_WAN_DIR        where the file and outputs live (default /var/tmp/mftd-bench-wan;
#                        outputs go to /dev/shm, as aria2c and curl do not fsync)
#   BIN                  where mftd/mftctl are (default target/release)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$ROOT/target/release}"
SIZE_MIB="${BENCH_WAN_SIZE_MIB:-1024}"
SINGLE_MIB="${BENCH_WAN_SINGLE_MIB:-256}"
RUNS="${BENCH_WAN_RUNS:-3}"
RTTS="${BENCH_WAN_RTTS:-2 20 100 200}"
FAIL_RTTS="${BENCH_WAN_FAIL_RTTS:-20 100}"
MIXES="${BENCH_WAN_MIXES:-equal unequal}"
CASES="${BENCH_WAN_CASES:-multi plain single iperf fail}"
OUTAGE="${BENCH_WAN_OUTAGE:-5}"
DIR="${BENCH_WAN_DIR:-/var/tmp/mftd-bench-wan}"
N=4
export WAN_PREFIX="${WAN_PREFIX:-bw}"
export WAN_NET="${WAN_NET:-10.79.0}"
export WAN_SERVERS=$N
export DELAYLINE="${DELAYLINE:-$ROOT/target/release/mftd-delayline}"
P="$WAN_PREFIX"
NET="$WAN_NET"
FILE="wan.bin"
declare -A MIX_RATES=([equal]="400 400 400 400" [unequal]="800 400 200 100")
# aria2c with several mirrors of one file: 4 connections per mirror, up to
# 16 in all, 1 MiB pieces (the better of -s4 -x1 and -s16 -x4 in trials).
ARIA2_FLAGS=(-q -s 16 -x 4 -j 1 -k 1M --min-split-size=1M --file-allocation=none
    --allow-overwrite=true --auto-file-renaming=false --check-certificate=false)

die() { echo "bench-wan FAILED: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }

[ "$(id -u)" = 0 ] || die "needs root (network namespaces, tc)"
for v in "$SIZE_MIB" "$SINGLE_MIB" "$RUNS" "$OUTAGE"; do
    case "$v" in ''|*[!0-9]*) die "BENCH_WAN_SIZE_MIB, BENCH_WAN_RUNS and BENCH_WAN_OUTAGE must be integers";; esac
done
[ -x "$BIN/mftd" ] && [ -x "$BIN/mftctl" ] || die "no mftd/mftctl in $BIN: run 'make release'"
[ -x "$DELAYLINE" ] || die "no $DELAYLINE: run 'cargo build --release -p mftd-tests --bins'"

missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v aria2c >/dev/null || missing+=(aria2)
command -v iperf3 >/dev/null || missing+=(iperf3)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
        { apt-get update >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; } ||
        die "could not install ${missing[*]}"
fi

# ---------------------------------------------------------------- state
tmp="$(mktemp -d /tmp/mftd-bench-wan.XXXXXX)"
out="$(mktemp -d /dev/shm/mftd-bench-wan.XXXXXX)"
declare -a SERVER_PIDS NGINX_PIDS
CLIENT_PID=""

cleanup() {
    set +e
    [ -n "$CLIENT_PID" ] && kill "$CLIENT_PID" 2>/dev/null
    for p in "${SERVER_PIDS[@]}" "${NGINX_PIDS[@]}"; do [ -n "$p" ] && kill "$p" 2>/dev/null; done
    sleep 0.3
    bash "$ROOT/scripts/wan-testbed.sh" down >/dev/null 2>&1
    rm -rf "$tmp" "$out"
}
trap cleanup EXIT INT TERM

mkdir -p "$DIR/export"
SIZE=$((SIZE_MIB * 1024 * 1024))
if [ "$(stat -c %s "$DIR/export/$FILE" 2>/dev/null || echo 0)" != "$SIZE" ]; then
    log "writing a ${SIZE_MIB} MiB test file to $DIR/export"
    head -c "$SIZE" /dev/urandom >"$DIR/export/$FILE"
fi
SINGLE_SIZE=$((SINGLE_MIB * 1024 * 1024))
if [ "$(stat -c %s "$DIR/export/single.bin" 2>/dev/null || echo 0)" != "$SINGLE_SIZE" ]; then
    head -c "$SINGLE_SIZE" /dev/urandom >"$DIR/export/single.bin"
fi
declare -A SHAS
SHAS[$FILE]="$(sha256sum "$DIR/export/$FILE" | cut -d' ' -f1)"
SHAS[single.bin]="$(sha256sum "$DIR/export/single.bin" | cut -d' ' -f1)"

# ---------------------------------------------------------------- hosts
start_servers() {
    for i in $(seq 1 $N); do
        local d="$tmp/s$i"
        # nginx hands its temp directories to its worker user (nobody):
        # they must not be mftd's socket directory, which mftd refuses to
        # use when another user owns it.
        mkdir -p "$d" "$d/ngx"
        cat >"$d/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
error_log $d/nginx.err;
pid $d/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    client_body_temp_path $d/ngx; proxy_temp_path $d/ngx; fastcgi_temp_path $d/ngx; uwsgi_temp_path $d/ngx; scgi_temp_path $d/ngx;
    server { listen $NET.$i:8080; root $DIR/export; }
}
EOF
        ip netns exec "${P}s$i" nginx -c "$d/nginx.conf" >/dev/null 2>&1 &
        NGINX_PIDS[$i]=$!
        start_mftd_server "$i"
    done
    for i in $(seq 1 $N); do
        wait_for "$BIN/mftctl" --socket "$tmp/s$i/sock" servers list ||
            { tail -20 "$tmp/s$i/mftd.log" >&2; die "mftd on server host $i did not start"; }
    done
}

start_mftd_server() {
    local i=$1 d="$tmp/s$1"
    # 5001 speaks TLS (the default), 5002 plain TCP.
    printf '[listener.5002]\ntransport = "plain"\n' >"$d/mftd.toml"
    MFTD_CONFIG="$d/mftd.toml" ip netns exec "${P}s$i" "$BIN/mftd" --export "$DIR/export" --listen "$NET.$i" --ports 5001,5002 \
        --socket "$d/sock" --state-dir "$d/state" --download-dir "$d/dl" --max-connections-per-ip 64 \
        >"$d/mftd.log" 2>&1 &
    SERVER_PIDS[$i]=$!
}

wait_for() { # up to 30 s: four daemons start at once on two cores
    for _ in $(seq 1 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "not ready: $*" >&2
    return 1
}

start_client() {
    mkdir -p "$tmp/c"
    ip netns exec "${P}c" "$BIN/mftd" --export "$tmp/c" --ports 0 --socket "$tmp/c/sock" \
        --state-dir "$tmp/c/state" --download-dir "$out" --idle-timeout "${BENCH_WAN_IDLE:-10}" >"$tmp/c/mftd.log" 2>&1 &
    CLIENT_PID=$!
    wait_for "$BIN/mftctl" --socket "$tmp/c/sock" status || { tail -20 "$tmp/c/mftd.log" >&2; die "client mftd did not start"; }
}

# ---------------------------------------------------------------- tools
now() { date +%s.%N; }
ctl() { "$BIN/mftctl" --socket "$tmp/c/sock" "$@"; }

check() { # check OUTPUT: sha256 against the exported file of the same name
    local got want
    got="$(sha256sum "$1" | cut -d' ' -f1)"
    want="${SHAS[$(basename "$1")]}"
    [ "$got" = "$want" ] || die "$1: sha256 $got, expected $want"
    rm -f "$1"
}

mftd_get() { # mftd_get HOST_INDEXES...: prints seconds (file: $NAME, default $FILE; PLAIN=1: plain TCP)
    local from=() t0 t1 FILE="${NAME:-$FILE}"
    for i in "$@"; do
        if [ -n "${PLAIN:-}" ]; then from+=("plain://$NET.$i:5002"); else from+=("$NET.$i:5001"); fi
    done
    rm -f "$out/$FILE"
    t0=$(now)
    ctl get "$FILE" --from "$(IFS=,; echo "${from[*]}")" -o "$out" --no-resume >"$tmp/get.log" 2>&1 ||
        die "mftctl get failed: $(tail -3 "$tmp/get.log")"
    t1=$(now)
    check "$out/$FILE"
    echo "$t1 - $t0" | bc -l
}

aria2_get() {
    local urls=() t0 t1 FILE="${NAME:-$FILE}"
    for i in "$@"; do urls+=("http://$NET.$i:8080/$FILE"); done
    rm -f "$out/$FILE"
    t0=$(now)
    ip netns exec "${P}c" aria2c "${ARIA2_FLAGS[@]}" -d "$out" -o "$FILE" "${urls[@]}" || die "aria2c failed"
    t1=$(now)
    check "$out/$FILE"
    echo "$t1 - $t0" | bc -l
}

curl_get() {
    local t0 t1 FILE="${NAME:-$FILE}"
    rm -f "$out/$FILE"
    t0=$(now)
    ip netns exec "${P}c" curl -sf -o "$out/$FILE" "http://$NET.$1:8080/$FILE" || die "curl failed"
    t1=$(now)
    check "$out/$FILE"
    echo "$t1 - $t0" | bc -l
}

# iperf3 from every host at once, host i sending SIZE x rate_i / total
# bytes over 4 streams: prints the seconds until the last one finished.
iperf_floor() { # iperf_floor MIX
    local total i=1 pids=() t0 t1 share
    total=$(sum_rates "$1")
    for r in ${MIX_RATES[$1]}; do
        ip netns exec "${P}s$i" iperf3 -s -1 -B "$NET.$i" >/dev/null 2>&1 &
        i=$((i + 1))
    done
    sleep 0.5
    t0=$(now)
    i=1
    for r in ${MIX_RATES[$1]}; do
        share=$(( SIZE / total * r ))
        ip netns exec "${P}c" iperf3 -c "$NET.$i" -R -P 4 -n "$share" >/dev/null 2>&1 &
        pids+=($!)
        i=$((i + 1))
    done
    for p in "${pids[@]}"; do wait "$p" || die "iperf3 failed"; done
    t1=$(now)
    sleep 0.3
    echo "$t1 - $t0" | bc -l
}

iperf() { # iperf HOST STREAMS: prints Mbit/s of goodput, server -> client
    ip netns exec "${P}s$1" iperf3 -s -1 -B "$NET.$1" >/dev/null 2>&1 &
    local sp=$! r
    sleep 0.3
    r="$(ip netns exec "${P}c" iperf3 -c "$NET.$1" -R -t 8 -O 2 -P "$2" -J 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6)')" || r=0
    wait "$sp" 2>/dev/null || true
    echo "$r"
}

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
fmt() { printf '%.2f' "$1"; }

ideal() { # ideal MBIT_SUM: seconds
    echo "$SIZE * 8 / ($1 * 1000000) * 1514 / 1448" | bc -l
}

set_rates() { # set_rates MIX
    local i=1
    for r in ${MIX_RATES[$1]}; do
        ip netns exec "${P}s$i" tc qdisc replace dev eth0 root tbf rate "${r}mbit" burst 256kb latency 50ms
        i=$((i + 1))
    done
}

sum_rates() { local s=0; for r in ${MIX_RATES[$1]}; do s=$((s + r)); done; echo $s; }

runs() { # runs CMD...: median seconds of RUNS runs
    local t=()
    for _ in $(seq 1 "$RUNS"); do t+=("$("$@")"); done
    log "  $* -> ${t[*]}"
    median "${t[@]}"
}

# Failure runs: the download runs in the background; at a fraction of the
# ideal time something breaks. Sets FAIL_T (seconds) and FAIL_AT (when the
# failure happened). Runs in this shell (not a subshell) so the PIDs of
# hosts it restarts stay known to cleanup.
fail_run() { # fail_run KIND MIX
    local kind=$1 mix=$2 t0 t1 at from pid
    from="$NET.1:5001,$NET.2:5001,$NET.3:5001,$NET.4:5001"
    rm -f "$out/$FILE"
    at=$(echo "$(ideal "$(sum_rates "$mix")") * 0.4" | bc -l)
    t0=$(now)
    ctl get "$FILE" --from "$from" -o "$out" --no-resume >"$tmp/get.log" 2>&1 &
    pid=$!
    sleep "$at"
    local fa
    fa=$(echo "$(now) - $t0" | bc -l)
    case "$kind" in
        kill) kill -KILL "${SERVER_PIDS[1]}"; kill -KILL "${NGINX_PIDS[1]}" ;;
        dead) ip -n "${P}s1" link set eth0 down ;;
        outage) for i in $(seq 1 $N); do ip -n "${P}s$i" link set eth0 down; done
            sleep "$OUTAGE"
            for i in $(seq 1 $N); do ip -n "${P}s$i" link set eth0 up; done ;;
    esac
    wait "$pid" || die "mftctl get failed in the $kind case: $(tail -3 "$tmp/get.log")"
    t1=$(now)
    check "$out/$FILE"
    # Bring the host back for the next run.
    case "$kind" in
        kill) wait "${SERVER_PIDS[1]}" 2>/dev/null || true; start_mftd_server 1
            ip netns exec "${P}s1" nginx -c "$tmp/s1/nginx.conf" >/dev/null 2>&1 &
            NGINX_PIDS[1]=$!
            wait_for "$BIN/mftctl" --socket "$tmp/s1/sock" servers list || die "mftd on host 1 did not come back" ;;
        dead) ip -n "${P}s1" link set eth0 up ;;
    esac
    sleep 1
    FAIL_T=$(echo "$t1 - $t0" | bc -l)
    FAIL_AT=$fa
}

# ---------------------------------------------------------------- run
log "testbed: $N servers, RTTs ${RTTS} ms, ${SIZE_MIB} MiB, ${RUNS} runs per case"
first_delay=$(echo "$(echo "$RTTS" | awk '{print $1}') / 2" | bc -l)
WAN_DELAY_MS=$(fmt "$first_delay") bash "$ROOT/scripts/wan-testbed.sh" up >&2
start_servers
start_client
# Servers hash the file once; time transfers, not the first STAT.
set_rates equal
mftd_get 1 2 3 4 >/dev/null

results="$tmp/results"
: >"$results"
for rtt in $RTTS; do
    bash "$ROOT/scripts/wan-testbed.sh" set-delay "$(fmt "$(echo "$rtt / 2" | bc -l)")" >&2
    for mix in $MIXES; do
        set_rates "$mix"
        total=$(sum_rates "$mix")
        id4=$(ideal "$total")
        first=$(echo "${MIX_RATES[$mix]}" | awk '{print $1}')
        id1=$(ideal "$first")
        if [[ " $CASES " == *" multi "* ]]; then
            log "RTT $rtt ms, $mix, 4 sources"
            m=$(runs mftd_get 1 2 3 4)
            a=$(runs aria2_get 1 2 3 4)
            f=$(runs iperf_floor "$mix")
            echo "$rtt|$mix|4 sources|$(fmt "$(echo "$m / $id4" | bc -l)")|$(fmt "$(echo "$a / $id4" | bc -l)")|$(fmt "$(echo "$a / $m" | bc -l)")|$(fmt "$(echo "$f / $id4" | bc -l)")|$(fmt "$m") s|$(fmt "$a") s|$(fmt "$id4") s" >>"$results"
            if [[ " $CASES " == *" plain "* ]]; then
                log "RTT $rtt ms, $mix, 4 sources over plain TCP"
                p=$(PLAIN=1 runs mftd_get 1 2 3 4)
                echo "$rtt|$mix|4 sources, mftd TLS vs mftd plain TCP|$(fmt "$(echo "$m / $id4" | bc -l)")|$(fmt "$(echo "$p / $id4" | bc -l)")|$(fmt "$(echo "$p / $m" | bc -l)")||$(fmt "$m") s|$(fmt "$p") s|$(fmt "$id4") s" >>"$results"
            fi
        fi
        if [[ " $CASES " == *" single "* ]] && [ "$mix" = equal ]; then
            log "RTT $rtt ms, 1 source ($first mbit)"
            m=$(NAME=single.bin runs mftd_get 1)
            c=$(NAME=single.bin runs curl_get 1)
            id1=$(echo "$SINGLE_SIZE * 8 / ($first * 1000000) * 1514 / 1448" | bc -l)
            echo "$rtt|${first}mbit|1 source, ${SINGLE_MIB} MiB (vs curl)|$(fmt "$(echo "$m / $id1" | bc -l)")|$(fmt "$(echo "$c / $id1" | bc -l)")|$(fmt "$(echo "$c / $m" | bc -l)")||$(fmt "$m") s|$(fmt "$c") s|$(fmt "$id1") s" >>"$results"
        fi
        if [[ " $CASES " == *" iperf "* ]] && [ "$mix" = equal ]; then
            log "RTT $rtt ms, iperf3 to one host ($first mbit)"
            i1=$(iperf 1 1)
            i8=$(iperf 1 8)
            echo "$rtt|${first}mbit|path capacity, iperf3 1 / 8 streams|$(fmt "$i1") / $(fmt "$i8") Mbit/s|(cap $first Mbit/s, goodput max $(fmt "$(echo "$first * 1448 / 1514" | bc -l)"))|||||" >>"$results"
        fi
        if [[ " $CASES " == *" fail "* ]] && [[ " $FAIL_RTTS " == *" $rtt "* ]] && [ "$mix" = unequal ]; then
            for kind in kill dead outage; do
                log "RTT $rtt ms, $mix, fastest host $kind"
                ts=()
                ts_abs=()
                ideals=()
                for _ in $(seq 1 "$RUNS"); do
                    fail_run "$kind" "$mix"
                    t=$FAIL_T
                    fa=$FAIL_AT
                    if [ "$kind" = outage ]; then
                        idf=$(echo "$id4 + $OUTAGE" | bc -l)
                    else
                        # All hosts at full rate until the failure, the rest after it.
                        rest=$(echo "$total - $first" | bc -l)
                        done_bytes=$(echo "$fa * $total * 1000000 / 8 * 1448 / 1514" | bc -l)
                        idf=$(echo "$fa + ($SIZE - $done_bytes) * 8 / ($rest * 1000000) * 1514 / 1448" | bc -l)
                    fi
                    ts+=("$(echo "$t / $idf" | bc -l)")
                    ts_abs+=("$t")
                    ideals+=("$idf")
                    log "  $kind: $(fmt "$t") s, failure at $(fmt "$fa") s, ideal with failure $(fmt "$idf") s"
                done
                r=$(median "${ts[@]}")
                echo "$rtt|$mix|fastest host $kind at 40 % of ideal|$(fmt "$r") x ideal-with-failure||||$(fmt "$(median "${ts_abs[@]}")") s||$(fmt "$(median "${ideals[@]}")") s" >>"$results"
            done
        fi
    done
done

echo
echo "mftd vs aria2c/curl on an emulated WAN: ${SIZE_MIB} MiB, median of ${RUNS} runs, sha256 checked"
echo "(equal: 4 x 400 Mbit/s; unequal: 800/400/200/100 Mbit/s; 1 source: host 1)"
echo
echo "(peer: aria2c ${ARIA2_FLAGS[*]:1:4} for 4 sources, curl for 1, mftd over plain TCP in the TLS rows; mftd uses TLS elsewhere; TCP floor: iperf3 from every host at once, ideal shares, 4 streams each)"
echo
echo "| RTT ms | rates | case | mftd time/ideal | peer time/ideal | mftd speed / peer | TCP floor time/ideal | mftd | peer | ideal |"
echo "|---|---|---|---|---|---|---|---|---|---|"
while IFS='|' read -r a b c d e f g h i j; do
    echo "| $a | $b | $c | $d | $e | $f | $g | $h | $i | $j |"
done <"$results"
