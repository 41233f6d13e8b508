#!/usr/bin/env bash
# Scale: wall time and peak RSS of each command over a repository of CHUNKS
# chunks. The history is synthetic (`bulwark benchmark --synthetic`: index
# objects, chunk lists and manifests written through the store's formats,
# SOURCES disks x SNAPSHOTS snapshots, no chunk data), plus one real image
# (IMAGE_MIB of random data) whose backups, restore, verify and sync read
# real chunks. Each command but the first backup works on little data, so
# its time is its start-up: loading what it needs of the index, manifests
# and chunk lists. Goals (issue 32, at 25M chunks): a command that reads
# the index < 5 s and < 1 GiB; gc < 15 min and < 2 GiB.
# Usage: scripts/bench-scale.sh CHUNKS [WORKDIR]
#   (env: SOURCES=30 SNAPSHOTS=10 IMAGE_MIB=64; the page cache is warm:
#   every object was just written)
set -euo pipefail
cd "$(dirname "$0")/.."
chunks=${1:?usage: scripts/bench-scale.sh CHUNKS [WORKDIR]}
work=${2:-/tmp/bulwark-bench-scale}
sources=${SOURCES:-30}; snapshots=${SNAPSHOTS:-10}; image=${IMAGE_MIB:-64}
command -v /usr/bin/time >/dev/null || apt-get install -y -qq time >/dev/null
cargo build --release -q -p bulwark
bw=$PWD/target/release/bulwark
rm -rf "$work"; mkdir -p "$work"
export BULWARK_REPO=$work/repo BULWARK_PASSWORD=bench
"$bw" repo init >/dev/null
results=$work/results
: > "$results"
# measure NAME CMD...: one line "NAME  wall  CPU (user+sys)  peak RSS", and
# the figures kept (CPU time tells more than wall time on a busy host).
measure() {
    local name=$1; shift
    /usr/bin/time -f "%e %U %S %M" -o "$work/time" "$@" >"$work/out" 2>"$work/err" || {
        echo "$name failed:"; cat "$work/err"; exit 1; }
    read -r secs user sys kib < "$work/time"
    cpu=$(python3 -c "print($user + $sys)")
    printf '%-34s %8.2f s wall %8.2f s CPU %6d MiB\n' "$name" "$secs" "$cpu" $((kib >> 10))
    echo "$name|$secs|$kib|$cpu" >> "$results"
}

measure "synthesize ($chunks chunks)" "$bw" benchmark --synthetic "$chunks" \
    --synthetic-sources "$sources" --synthetic-snapshots "$snapshots"
echo "repository: $(du -sh "$work/repo" | cut -f1), $((sources * snapshots)) synthetic snapshots"
img=$work/disk.raw
head -c $((image << 20)) /dev/urandom > "$img"
measure "backup image (first, $image MiB)" "$bw" backup image "$img" --source real
dd if=/dev/urandom of="$img" bs=1M count=1 seek=$((image / 2)) conv=notrunc status=none
measure "backup image (1 MiB changed)" "$bw" backup image "$img" --source real
measure "restore image" "$bw" restore image real@latest --to "$work/out.raw"
cmp "$img" "$work/out.raw"
measure "snapshots" "$bw" snapshots --json
measure "verify real@latest" "$bw" verify real@latest
measure "prune --keep-last 5" "$bw" prune --keep-last 5
measure "gc --dry-run" "$bw" gc --dry-run --grace 0s
measure "gc" "$bw" gc --grace 0s
BULWARK_REPO=$work/replica "$bw" repo init --replica-of "$work/repo" >/dev/null
measure "sync --source real" env -u BULWARK_PASSWORD "$bw" sync --from "$work/repo" \
    --to "$work/replica" --source real
python3 - "$results" "$chunks" <<'EOF'
import sys
rows = [l.strip().split("|") for l in open(sys.argv[1]) if l.strip()]
fig = {n: (float(s), int(k) / 1024) for n, s, k, _ in rows}
index = [n for n in fig if not n.startswith(("synthesize", "backup image (first", "gc", "snapshots", "prune"))]
worst_t = max(fig[n][0] for n in index); worst_m = max(fig[n][1] for n in index)
gc_t = max(fig[n][0] for n in fig if n.startswith("gc")); gc_m = max(fig[n][1] for n in fig if n.startswith("gc"))
ok = worst_t < 5 and worst_m < 1024 and gc_t < 900 and gc_m < 2048
load = open("/proc/loadavg").read().split()[0]
print(f"scale {sys.argv[2]} chunks (load {load}): index commands worst {worst_t:.1f} s / {worst_m:.0f} MiB "
      f"(goal 5 s / 1024 MiB), gc worst {gc_t:.1f} s / {gc_m:.0f} MiB (goal 900 s / 2048 MiB): "
      f"{'goals met' if ok else 'goals missed'}")
EOF
