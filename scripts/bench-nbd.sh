#!/usr/bin/env bash
# nbdcopy reading a 1 GiB mixed image over a Unix socket: from bulwark-nbd
# (a snapshot in a local repository; cold = fresh server, warm = second
# pass on the same server) vs qemu-nbd serving the same raw file.
# Usage: scripts/bench-nbd.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-rust.sh
cargo build --release -q -p bulwark -p nbd-server
BIN=$PWD/target/release
W=${1:-/tmp/bulwark-bench-nbd}; mkdir -p "$W"
export BULWARK_REPO=$W/repo BULWARK_PASSWORD=bench
scripts/mixed-image.sh "$W/mixed.raw" 1024
if [ ! -e "$W/repo/config" ]; then
    "$BIN/bulwark" repo init >/dev/null
    "$BIN/bulwark" backup image "$W/mixed.raw" --source mixed >/dev/null
fi
t() { local s e; s=$(date +%s.%N); "$@"; e=$(date +%s.%N); echo "$e - $s" | bc; }
rate() { echo "scale=0; 1024 / $1" | bc; }

rm -f "$W/q.sock"
qemu-nbd -r -f raw -t --socket "$W/q.sock" -x vda "$W/mixed.raw" & QPID=$!
while [ ! -S "$W/q.sock" ]; do sleep 0.05; done
nbdcopy "nbd+unix:///vda?socket=$W/q.sock" null: # page cache warm
q=$(t nbdcopy "nbd+unix:///vda?socket=$W/q.sock" null:)
kill $QPID; wait $QPID 2>/dev/null || true

rm -f "$W/b.sock"
coproc B { exec "$BIN/bulwark-nbd" serve --snapshot mixed@latest --socket "$W/b.sock" --cache-mib 2048 2>/dev/null; }
read -r _ <&"${B[0]}"
cold=$(t nbdcopy "nbd+unix:///vda?socket=$W/b.sock" null:)
warm=$(t nbdcopy "nbd+unix:///vda?socket=$W/b.sock" null:)
kill "$B_PID"; wait "$B_PID" 2>/dev/null || true
printf '%-28s %8s s %8s MiB/s\n' "qemu-nbd (raw file, warm)" "$q" "$(rate "$q")"
printf '%-28s %8s s %8s MiB/s  %s x qemu-nbd\n' "bulwark-nbd cold" "$cold" "$(rate "$cold")" "$(echo "scale=2; $q / $cold" | bc)"
printf '%-28s %8s s %8s MiB/s  %s x qemu-nbd\n' "bulwark-nbd warm" "$warm" "$(rate "$warm")" "$(echo "scale=2; $q / $warm" | bc)"
