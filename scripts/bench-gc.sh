#!/usr/bin/env bash
# GC on a large repository: time and peak memory of `bulwark prune` and two
# `bulwark gc --grace 0s` runs over ROUNDS snapshots of a SIZE_MIB random
# image (default 50 x 2 GiB = 100 GiB of logical data), each round with
# CHANGE_MIB rewritten at a random place and a snapshot time one day later.
# Usage: scripts/bench-gc.sh [WORKDIR]   (env: ROUNDS, SIZE_MIB, CHANGE_MIB)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/bulwark-bench-gc}
rounds=${ROUNDS:-50}; size=${SIZE_MIB:-2048}; change=${CHANGE_MIB:-32}
command -v /usr/bin/time >/dev/null || apt-get install -y -qq time >/dev/null
cargo build --release -q -p bulwark
bw=$PWD/target/release/bulwark
rm -rf "$work"; mkdir -p "$work"
export BULWARK_REPO=$work/repo BULWARK_PASSWORD=bench
"$bw" repo init >/dev/null
img=$work/disk.raw
head -c $((size << 20)) /dev/urandom > "$img"
start=$(date -u -d '2026-01-01' +%s)
for i in $(seq 0 $((rounds - 1))); do
    off=$(( (RANDOM * 32768 + RANDOM) % (size - change) ))
    head -c $((change << 20)) /dev/urandom | dd of="$img" bs=1M seek="$off" conv=notrunc status=none
    t=$(date -u -d "@$((start + i * 86400))" +%Y-%m-%dT%H:%M:%SZ)
    "$bw" backup image "$img" --source bench --time "$t" --json >/dev/null
done
logical=$("$bw" snapshots --json | python3 -c 'import json,sys; print(sum(s["size"] for s in json.load(sys.stdin)))')
before=$(du -sb "$work/repo" | cut -f1)
measure() { /usr/bin/time -f "%e s, peak RSS %M KiB" "$@" 2>&1 >/dev/null | tail -1; }
echo "repository: $rounds snapshots, $((logical >> 30)) GiB logical, $((before >> 20)) MiB stored"
echo "prune (keep-daily 7, keep-weekly 4): $(measure "$bw" prune --source bench --keep-daily 7 --keep-weekly 4)"
echo "gc 1 (condemn):  $(measure "$bw" gc --grace 0s)"
echo "gc 2 (delete):   $(measure "$bw" gc --grace 0s)"
after=$(du -sb "$work/repo" | cut -f1)
echo "stored after: $((after >> 20)) MiB (freed $(((before - after) >> 20)) MiB)"
echo "verify: $(measure "$bw" verify)"
