#!/usr/bin/env bash
# File backup of a host tree, bulwark against restic (both with defaults,
# both into a local repository on the same disk): a first backup, an
# unchanged second backup, a backup after touching 1% of the files, and a
# full restore. The tree is copied first (the touch must not change the
# host); the copy is in the page cache for every run (warm), unless COLD=1
# (root: caches dropped before each timed run). Prints each step's wall and
# CPU (user + system) seconds and restic/bulwark; the last line sums up
# against the goals (2x first backup and restore, 5x unchanged).
# Usage: scripts/bench-host-files.sh [TREE (default /usr/share)] [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
TREE=$(realpath "${1:-/usr/share}")
W=${2:-$(mktemp -d /tmp/bw-bench-host-files.XXXXXX)}
mkdir -p "$W"
trap 'rm -rf "$W"' EXIT
[ -n "${BIN:-}" ] || { . scripts/ensure-rust.sh; cargo build --release -q -p bulwark; BIN=$PWD/target/release/bulwark; }
command -v restic >/dev/null || { echo "restic not installed" >&2; exit 1; }

cp -a "$TREE" "$W/tree"
export BULWARK_REPO="$W/bw-repo" BULWARK_PASSWORD=bench RESTIC_REPOSITORY="$W/restic-repo" RESTIC_PASSWORD=bench
export RESTIC_CACHE_DIR="$W/restic-cache"
"$BIN" repo init >/dev/null
restic init -q >/dev/null

# Every timed run starts after a sync: none pays for the writeback of the
# run before it (the other tool's, often); with COLD=1 the caches go too.
drop() { sync; if [ "${COLD:-0}" = 1 ]; then echo 3 > /proc/sys/vm/drop_caches; fi; }
# "WALL CPU": seconds a command takes, and the CPU seconds (user + system)
# it used (its output discarded; a failure stops the bench). CPU per byte
# is what a loaded host does not blur.
secs() {
    drop
    local t=$W/time.out
    /usr/bin/time -o "$t" -f '%e %U %S' "$@" >/dev/null
    awk '{printf "%.2f %.2f\n", $1, $2 + $3}' "$t"
}
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }

files=$(find "$W/tree" -type f | wc -l)
bytes=$(du -sb "$W/tree" | cut -f1)
echo "tree: $TREE ($files files, $((bytes >> 20)) MiB), cache: $([ "${COLD:-0}" = 1 ] && echo cold || echo warm)"
declare -A R
step() {  # NAME BULWARK_CMD... -- RESTIC_CMD...
    local name=$1; shift
    local bw=() rs=()
    while [ "$1" != -- ]; do bw+=("$1"); shift; done; shift
    rs=("$@")
    report "$name" "$(secs "${bw[@]}")" "$(secs "${rs[@]}")"
}
report() {  # NAME "BULWARK_WALL CPU" "RESTIC_WALL CPU"
    local b=($2) r=($3)
    R[$1]=$(ratio "${r[0]}" "${b[0]}")
    printf '%-10s bulwark %7ss  restic %7ss  restic/bulwark %sx   cpu: bulwark %6ss  restic %6ss  (%sx)\n' \
        "$1" "${b[0]}" "${r[0]}" "${R[$1]}" "${b[1]}" "${r[1]}" "$(ratio "${r[1]}" "${b[1]}")"
}
step first "$BIN" backup files "$W/tree" --source bench -- restic backup -q "$W/tree"
step unchanged "$BIN" backup files "$W/tree" --source bench -- restic backup -q "$W/tree"
find "$W/tree" -type f | awk 'NR % 100 == 0' | xargs -d '\n' touch
step touched "$BIN" backup files "$W/tree" --source bench -- restic backup -q "$W/tree"
# Restores: each side twice, taking turns, into fresh directories, and
# each side's faster run. Nothing is deleted in between: ext4 without a
# journal (this host's root) skips inodes freed in the last minutes when it
# allocates, so a restore right after an `rm -rf` of a tree spends seconds
# of system time searching (3 s against 17 s measured). Whoever restores
# first after a deletion (the previous run's, on exit) pays most, so the
# turns go bulwark, restic, restic, bulwark: each side has an early and a
# late one.
best() { sort -n -k1,1 | head -1; }
b1=$(secs "$BIN" restore files bench@latest --to "$W/out-bw1")
r1=$(secs restic restore latest --target "$W/out-rs1")
r2=$(secs restic restore latest --target "$W/out-rs2")
b2=$(secs "$BIN" restore files bench@latest --to "$W/out-bw2")
report restore "$(printf '%s\n%s\n' "$b1" "$b2" | best)" "$(printf '%s\n%s\n' "$r1" "$r2" | best)"
echo "bench-host-files: first ${R[first]}x (goal 2x), unchanged ${R[unchanged]}x (goal 5x), touched-1% ${R[touched]}x, restore ${R[restore]}x (goal 2x)"
