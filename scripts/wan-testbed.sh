#!/usr/bin/env bash
# An emulated wide-area network in network namespaces, for `make bench-wan`
# and the latency regression test. Needs root, iproute2, tc (tbf) and
# /dev/net/tun; it creates and removes everything it uses itself.
#
#   wan-testbed.sh up    build it     wan-testbed.sh down   remove it
#   wan-testbed.sh set-delay MS       restart the delay line with a new delay
#
# Layout (P = $WAN_PREFIX, short: interface names are at most 15 bytes):
#
#   ${P}c (client, 10.X.0.100) --TAP ${P}tc-- mftd-delayline --TAP ${P}tw-- bridge in ${P}w
#                                                                            |  veth
#                                           ${P}s1 (10.X.0.1) ... ${P}sN (10.X.0.N)
#
# mftd-delayline (tests crate) delays every frame by WAN_DELAY_MS in each
# direction, so RTT = 2 x WAN_DELAY_MS. Each server's egress (the data
# direction) is capped with tbf at its rate from WAN_RATES. The client
# namespace has no default route: nothing can leave the testbed.
#
# Environment:
#   WAN_PREFIX    name prefix (default mw)       WAN_SERVERS  server hosts (default 4)
#   WAN_NET       first two/three octets, e.g. 10.77.0 (default 10.77.0)
#   WAN_DELAY_MS  one-way delay in ms (default 10) WAN_RATES   comma list of tbf rates
#                 (default 400mbit for every server; the last one repeats)
#   DELAYLINE     path to the mftd-delayline binary (default target/release, then debug)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
P="${WAN_PREFIX:-mw}"
N="${WAN_SERVERS:-4}"
NET="${WAN_NET:-10.77.0}"
DELAY="${WAN_DELAY_MS:-10}"
RATES="${WAN_RATES:-400mbit}"
STATE="/run/mftd-wan-$P"

die() { echo "wan-testbed: $*" >&2; exit 1; }

delayline_bin() {
    if [ -n "${DELAYLINE:-}" ]; then echo "$DELAYLINE"; return; fi
    for p in "$ROOT/target/release/mftd-delayline" "$ROOT/target/debug/mftd-delayline"; do
        [ -x "$p" ] && { echo "$p"; return; }
    done
    die "mftd-delayline not built: run 'cargo build --release -p mftd-tests --bins'"
}

rate_of() { # rate for server $1 (1-based)
    local IFS=,
    local -a r=($RATES)
    local i=$(( $1 - 1 ))
    [ "$i" -lt "${#r[@]}" ] || i=$(( ${#r[@]} - 1 ))
    echo "${r[$i]}"
}

start_delayline() {
    local bin log
    bin="$(delayline_bin)"
    log="$STATE/delayline.log"
    # The TAPs are created in the core namespace; the client end is moved
    # into the client namespace afterwards (the open fd stays attached).
    ip netns exec "${P}w" "$bin" --tap-a "${P}tc" --tap-b "${P}tw" --delay-ms "$DELAY" >"$STATE/delayline.out" 2>"$log" &
    echo $! >"$STATE/delayline.pid"
    for _ in $(seq 1 100); do
        grep -q ready "$STATE/delayline.out" 2>/dev/null && return 0
        kill -0 "$(cat "$STATE/delayline.pid")" 2>/dev/null || die "delay line exited: $(cat "$log")"
        sleep 0.05
    done
    die "delay line did not come up"
}

stop_delayline() {
    [ -f "$STATE/delayline.pid" ] || return 0
    local pid
    pid="$(cat "$STATE/delayline.pid")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/delayline.pid"
}

# Whether $1 answers from the client namespace: a refused connection to
# port 9 (discard) proves the path works both ways; a timeout does not.
reachable() {
    local err
    err="$(ip netns exec "${P}c" timeout 5 bash -c "exec 3<>/dev/tcp/$1/9" 2>&1 || true)"
    case "$err" in *refused*) return 0 ;; *) return 1 ;; esac
}

wire_taps() {
    ip -n "${P}w" link set "${P}tc" netns "${P}c"
    ip -n "${P}c" addr add "$NET.100/24" dev "${P}tc"
    ip -n "${P}c" link set "${P}tc" up
    ip -n "${P}w" link set "${P}tw" master br0
    ip -n "${P}w" link set "${P}tw" up
}

up() {
    [ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
    [ -c /dev/net/tun ] || die "no /dev/net/tun"
    case "$DELAY" in ''|*[!0-9.]*) die "WAN_DELAY_MS must be a number";; esac
    down >/dev/null 2>&1 || true
    mkdir -p "$STATE"
    ip netns add "${P}w"
    ip netns add "${P}c"
    ip -n "${P}w" link set lo up
    ip -n "${P}c" link set lo up
    ip -n "${P}w" link add br0 type bridge
    ip -n "${P}w" link set br0 up
    for i in $(seq 1 "$N"); do
        local ns="${P}s$i"
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        ip link add "${P}v$i" netns "${P}w" type veth peer name eth0 netns "$ns"
        ip -n "${P}w" link set "${P}v$i" master br0
        ip -n "${P}w" link set "${P}v$i" up
        ip -n "$ns" addr add "$NET.$i/24" dev eth0
        ip -n "$ns" link set eth0 up
        # A burst of 256 KiB keeps 64 KiB GSO frames whole (smaller bursts
        # drop them and look like loss).
        ip netns exec "$ns" tc qdisc replace dev eth0 root tbf rate "$(rate_of "$i")" burst 256kb latency 50ms
    done
    start_delayline
    wire_taps
    # Wait until every server answers through the line.
    for i in $(seq 1 "$N"); do
        reachable "$NET.$i" || die "server $NET.$i unreachable through the delay line"
    done
    echo "wan-testbed: up: client ${P}c ($NET.100), servers ${P}s1..${P}s$N ($NET.1..$NET.$N), one-way delay ${DELAY} ms"
}

set_delay() {
    [ -d "$STATE" ] || die "testbed $P is not up"
    DELAY="$1"
    stop_delayline
    start_delayline
    wire_taps
    reachable "$NET.1" || die "server $NET.1 unreachable after changing the delay"
}

down() {
    stop_delayline
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^${P}(c|w|s[0-9]+)$" || true); do
        ip netns del "$ns" || true
    done
    rm -rf "$STATE"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    set-delay) set_delay "${2:?set-delay needs a delay in ms}" ;;
    *) echo "usage: $0 up|down|set-delay MS" >&2; exit 2 ;;
esac
