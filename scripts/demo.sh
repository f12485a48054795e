#!/usr/bin/env bash
# `make demo`: start mftd with 4 listeners over a generated sample file,
# download it from all four at once with live per-server progress, verify
# it, stop mftd and clean up. Everything lives in a temp dir.
set -euo pipefail

BIN="${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release}"
SIZE_MIB="${DEMO_SIZE_MIB:-128}"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/mftd-demo.XXXXXX")"
pid=""

cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

ctl() { "$BIN/mftctl" --socket "$tmp/mftd.sock" "$@"; }

mkdir -p "$tmp/export" "$tmp/downloads"
echo "== generating a ${SIZE_MIB} MiB sample file"
head -c "$((SIZE_MIB * 1024 * 1024))" /dev/urandom > "$tmp/export/sample.bin"

echo "== starting mftd with 4 listeners (free ports), log in $tmp/mftd.log"
"$BIN/mftd" --export "$tmp/export" --download-dir "$tmp/downloads" --state-dir "$tmp/state" \
    --socket "$tmp/mftd.sock" --ports 0,0,0,0 2> "$tmp/mftd.log" &
pid=$!
for _ in $(seq 1 100); do
    ctl servers list >/dev/null 2>&1 && break
    sleep 0.05
done
ports=$(ctl servers list | awk 'NR > 1 { print $1 }' | paste -sd, -)

# Different caps per listener, as if the servers were on different links:
# the download should take more from the faster ones.
i=0
for p in ${ports//,/ }; do
    i=$((i + 1))
    ctl servers limit "$p" "$((i * 8))M" >/dev/null
done
ctl servers list

echo
echo "== mftctl get sample.bin --host 127.0.0.1 --ports $ports"
ctl get sample.bin --host 127.0.0.1 --ports "$ports" -o "$tmp/downloads"

echo
echo "== listeners after the download"
ctl servers list

echo
want=$(sha256sum < "$tmp/export/sample.bin" | cut -d' ' -f1)
got=$(sha256sum < "$tmp/downloads/sample.bin" | cut -d' ' -f1)
echo "source     sha256 $want"
echo "downloaded sha256 $got"
if [ "$want" != "$got" ]; then
    echo "demo FAILED: checksums differ" >&2
    exit 1
fi
echo "sha256 OK"

ctl shutdown
wait "$pid"
pid=""
echo "mftd stopped; cleaned up $tmp"
