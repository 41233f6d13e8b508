#!/usr/bin/env bash
# The main job, on the embedded local datastore: make a test disk image,
# back it up twice (the second run stores almost nothing), change it, back
# it up again, restore the latest snapshot, compare bit for bit, verify.
# Usage: scripts/demo.sh [WORKDIR]     (from a fresh Debian 12 machine)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-rust.sh
cargo build --release -q -p bulwark
BW="$PWD/target/release/bulwark"
WORK="${1:-$(mktemp -d /tmp/bulwark-demo.XXXXXX)}"
mkdir -p "$WORK"
export BULWARK_REPO="$WORK/repo"
export BULWARK_PASSWORD="${BULWARK_PASSWORD:-demo passphrase}"
IMG="$WORK/tiny.raw"

echo "== test image $IMG (256 MiB: random, text, zeros and holes)"
rm -f "$IMG"; truncate -s 256M "$IMG"
head -c 64M /dev/urandom | dd of="$IMG" bs=1M seek=0 conv=notrunc status=none
# (yes dies of SIGPIPE once head has enough: not an error)
{ yes "bulwark demo: the quick brown fox jumps over the lazy dog" || true; } | head -c 64M \
    | dd of="$IMG" bs=1M seek=96 conv=notrunc status=none
dd if=/dev/zero of="$IMG" bs=1M seek=160 count=32 conv=notrunc status=none

[ -e "$BULWARK_REPO/config" ] || "$BW" repo init
echo "== backup 1 (full)";            "$BW" backup image "$IMG" --source tiny
echo "== backup 2 (unchanged)";       "$BW" backup image "$IMG" --source tiny
head -c 4M /dev/urandom | dd of="$IMG" bs=1M seek=200 conv=notrunc status=none
echo "== backup 3 (4 MiB changed)";   "$BW" backup image "$IMG" --source tiny
"$BW" snapshots
echo "== restore tiny@latest"
rm -f "$WORK/restored.raw"
"$BW" restore image tiny@latest --to "$WORK/restored.raw"
cmp "$IMG" "$WORK/restored.raw" && echo "restored image is bit-identical"
echo "== verify"; "$BW" verify
echo "demo done: repository at $BULWARK_REPO"
