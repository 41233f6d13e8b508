#!/usr/bin/env bash
# Replication speed: `bulwark sync` of a 1 GiB mixed image's backup between
# two buckets of one s3s-fs server on loopback, against `restic copy` of the
# same image's backup between two buckets (restic's defaults, chunker
# parameters copied so it deduplicates as it would), and against the raw
# object copy rate (bulwark's packs read and written whole with the same S3
# SDK, as many at once as sync uses: `bulwark benchmark --copy-from`).
# Both replicas are restored and compared with the image.
# Usage: scripts/bench-sync.sh [SIZE_MIB]     (default 1024)
# Env:   BENCH_DIR (default /var/tmp/bulwark-bench), BENCH_RUNS (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
SIZE_MIB="${1:-1024}"
BENCH_DIR="${BENCH_DIR:-/var/tmp/bulwark-bench}"
mkdir -p "$BENCH_DIR"

S3S_FS="$(BULWARK_BENCH=1 scripts/setup-s3.sh)"
command -v restic >/dev/null || { echo "restic missing" >&2; exit 1; }
. scripts/ensure-rust.sh
cargo build --release -q -p bulwark
BULWARK="$ROOT/target/release/bulwark"
IMG="$BENCH_DIR/mixed-${SIZE_MIB}M.raw"
scripts/mixed-image.sh "$IMG" "$SIZE_MIB"

WORK="$(mktemp -d "$BENCH_DIR/sync-XXXXXX")"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
export AWS_ACCESS_KEY_ID="AKBENCH$RANDOM" AWS_SECRET_ACCESS_KEY="secret$RANDOM$RANDOM"
export AWS_REGION=us-east-1 AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null
mkdir -p "$WORK/s3"
"$S3S_FS" --host 127.0.0.1 --port "$PORT" --access-key "$AWS_ACCESS_KEY_ID" \
    --secret-key "$AWS_SECRET_ACCESS_KEY" "$WORK/s3" >"$WORK/s3s.log" 2>&1 &
S3PID=$!
cleanup() { kill "$S3PID" 2>/dev/null || true; wait "$S3PID" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.05
done
ENDPOINT="http://127.0.0.1:$PORT"
export AWS_ENDPOINT_URL="$ENDPOINT"
export BULWARK_PASSWORD=bench RESTIC_PASSWORD=bench RESTIC_FROM_PASSWORD=bench
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }
timed() { sync; local t0; t0=$(now); "$@" >/dev/null; secs "$t0" "$(now)"; }

RUNS="${BENCH_RUNS:-2}"
echo "== bulwark $(git rev-parse --short HEAD) sync vs $(restic version | cut -d' ' -f1-2) copy, image $SIZE_MIB MiB, s3s-fs on $ENDPOINT, best of $RUNS"
echo "   (load before: $(cut -d' ' -f1-3 /proc/loadavg))"

# The sources, once: one backup of the image each.
mkdir -p "$WORK/s3/bwsrc" "$WORK/s3/rsrc"
SRC="s3://bwsrc/repo"
RSRC="s3:$ENDPOINT/rsrc"
BULWARK_REPO="$SRC" "$BULWARK" repo init >/dev/null
BULWARK_REPO="$SRC" "$BULWARK" backup image "$IMG" --source bench --no-cache >/dev/null
RESTIC_CACHE_DIR="$WORK/rc" restic -r "$RSRC" init -q >/dev/null
RESTIC_CACHE_DIR="$WORK/rc" restic -r "$RSRC" backup -q "$IMG" >/dev/null
PACK_BYTES=$(du -sb "$WORK/s3/bwsrc/repo/data" | cut -f1)

: >"$WORK/times"
for run in $(seq "$RUNS"); do
    mkdir -p "$WORK/s3/bwdst$run" "$WORK/s3/raw$run" "$WORK/s3/rdst$run"
    DST="s3://bwdst$run/repo"
    BULWARK_REPO="$DST" "$BULWARK" repo init --replica-of "$SRC" >/dev/null
    # The sync runs without the passphrase, as an off-site host would. The
    # raw copy and the sync take turns going first; each starts after a
    # global `sync` (the other's writes are on disk).
    raw_copy() {
        sync
        "$BULWARK" benchmark --copy-from "$SRC" --copy-to "s3://raw$run/repo" --json \
            | python3 -c "import json,sys; print('%.2f' % json.load(sys.stdin)['seconds'])"
    }
    if [ $((run % 2)) -eq 0 ]; then RAW=$(raw_copy); fi
    BS=$(timed env -u BULWARK_PASSWORD "$BULWARK" sync --from "$SRC" --to "$DST")
    if [ $((run % 2)) -eq 1 ]; then RAW=$(raw_copy); fi
    RDST="s3:$ENDPOINT/rdst$run"
    RESTIC_CACHE_DIR="$WORK/rcd$run" restic -r "$RDST" init -q --from-repo "$RSRC" --copy-chunker-params >/dev/null
    # restic copy with its defaults (a cold cache on both sides).
    rm -rf "$WORK/rc-copy$run"
    RC=$(RESTIC_CACHE_DIR="$WORK/rc-copy$run" timed restic -r "$RDST" copy -q --from-repo "$RSRC")
    # Both copies restore what was backed up.
    BULWARK_REPO="$DST" "$BULWARK" restore image bench@latest --to "$WORK/out.raw" --force --no-cache >/dev/null
    cmp "$IMG" "$WORK/out.raw" && echo "round $run: bulwark replica restores bit-identical"
    RESTIC_CACHE_DIR="$WORK/rcd$run" restic -r "$RDST" restore -q latest --target "$WORK/rout" >/dev/null
    cmp "$IMG" "$WORK/rout$IMG" && echo "round $run: restic copy restores bit-identical"
    rm -rf "$WORK/out.raw" "$WORK/rout"
    echo "$BS $RAW $RC" >>"$WORK/times"
done
python3 - "$SIZE_MIB" "$PACK_BYTES" "$WORK/times" <<'EOF'
import sys
mib, pack_bytes = float(sys.argv[1]), float(sys.argv[2])
rows = [[float(x) for x in l.split()] for l in open(sys.argv[3]) if l.strip()]
for r in rows:
    print("round: " + " ".join(f"{k}={v:.2f}s" for k, v in zip(["sync", "raw-copy", "restic-copy"], r)))
bs, raw, rc = (min(r[i] for r in rows) for i in range(3))
stored = pack_bytes / (1 << 20)
print(f"stored packs: {stored:.0f} MiB of a {mib:.0f} MiB image")
print(f"bulwark sync      {bs:>7.2f} s  {stored/bs:>6.1f} MiB/s of packs")
print(f"raw object copy   {raw:>7.2f} s  {stored/raw:>6.1f} MiB/s   sync at {raw/bs:.2f}x the raw rate (goal >= 0.8x)")
print(f"restic copy       {rc:>7.2f} s                 sync {rc/bs:.2f}x faster (goal >= 3x)")
print(f"summary: sync {bs:.2f}s, {raw/bs:.2f}x raw copy, {rc/bs:.2f}x restic copy")
EOF
