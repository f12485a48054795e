#!/usr/bin/env bash
# Lints the systemd units with systemd-analyze and holds the system unit to
# an exposure score of at most 2.0 (`systemd-analyze security --offline`).
set -euo pipefail
cd "$(dirname "$0")/.."
MAX_EXPOSURE="${MAX_EXPOSURE:-2.0}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
bindir="$(pwd)/target/debug"
sed "s|@BINDIR@|$bindir|g" systemd/mftd.service.in > "$tmp/mftd.service"
mkdir -p "$tmp/user"
sed "s|@BINDIR@|$bindir|g" systemd/user/mftd.service.in > "$tmp/user/mftd.service"

echo "== systemd-analyze verify"
systemd-analyze verify --man=no "$tmp/mftd.service"
mkdir -p "$tmp/xdg"; XDG_RUNTIME_DIR="$tmp/xdg" systemd-analyze verify --man=no --user "$tmp/user/mftd.service"

echo "== systemd-analyze security --offline (system unit, threshold $MAX_EXPOSURE)"
out="$(systemd-analyze security --offline=yes "$tmp/mftd.service" 2>&1)"
score="$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for mftd.service: \([0-9.]*\).*/\1/p')"
echo "exposure score: ${score:-unknown}"
if [ -z "$score" ]; then
    printf '%s\n' "$out" | tail -20
    echo "could not read the exposure score" >&2
    exit 1
fi
if ! awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s <= m) }'; then
    printf '%s\n' "$out" | grep '✗' || true
    echo "exposure $score is above $MAX_EXPOSURE" >&2
    exit 1
fi
echo "units OK"
