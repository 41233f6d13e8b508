#!/usr/bin/env bash
# bulwark vs restic, side by side, against one s3s-fs server on loopback and
# one 1 GiB image (30% random, 40% zeros, 30% text): backup and restore
# times, MiB/s and ratios. Both restores are checked bit-identical.
# Usage: scripts/bench-s3.sh [SIZE_MIB]     (default 1024)
# Env:   BENCH_DIR (default /var/tmp/bulwark-bench: image kept between runs)
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
if [ ! -f "$IMG" ] || [ "$(stat -c %s "$IMG")" != $((SIZE_MIB << 20)) ]; then
    echo "== making $IMG (30% random, 40% zeros, 30% text)"
    python3 - "$IMG" "$SIZE_MIB" <<'EOF'
import os, random, sys
path, mib = sys.argv[1], int(sys.argv[2])
rnd = random.Random(42)
words = [("".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 10)))).encode()
         for _ in range(5000)]
seps = [b" ", b" ", b" ", b", ", b".\n"]
zero = bytes(1 << 20)
with open(path + ".tmp", "wb") as f:
    for i in range(mib):
        k = i % 10
        if k < 3:
            f.write(os.urandom(1 << 20))
        elif k < 7:
            f.write(zero)
        else:
            out = bytearray()
            while len(out) < (1 << 20):
                out += b"".join(w + rnd.choice(seps) for w in rnd.choices(words, k=4096))
            f.write(bytes(out[: 1 << 20]))
os.rename(path + ".tmp", path)
EOF
fi

WORK="$(mktemp -d "$BENCH_DIR/run-XXXXXX")"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
export AWS_ACCESS_KEY_ID="AKBENCH$RANDOM" AWS_SECRET_ACCESS_KEY="secret$RANDOM$RANDOM"
export AWS_REGION=us-east-1 AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null
mkdir -p "$WORK/s3/bulwark" "$WORK/s3/restic"
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

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }

export BULWARK_PASSWORD=bench RESTIC_PASSWORD=bench
export AWS_ENDPOINT_URL="$ENDPOINT"
RUNS="${BENCH_RUNS:-2}"

echo "== bulwark $(git rev-parse --short HEAD) vs $(restic version | cut -d' ' -f1-2), image $SIZE_MIB MiB, s3s-fs on $ENDPOINT, best of $RUNS"
echo "   (load before: $(cut -d' ' -f1-3 /proc/loadavg))"

# Every timed step starts after a global `sync` (a clean page cache). A
# restore is done when its image is on disk: bulwark's restore fsyncs its
# output itself; restic's does not, so its output file is fsynced (`sync
# FILE`) inside its timing. Cache files are not synced by either (a lost
# cache costs nothing). Each round uses fresh buckets.
timed() { sync; local t0; t0=$(now); "$@" >/dev/null; secs "$t0" "$(now)"; }
restic_restore() { restic -r "$R" restore -q latest --target "$WORK/restic-out" && sync "$WORK/restic-out$IMG"; }
: >"$WORK/times"
for run in $(seq "$RUNS"); do
    mkdir -p "$WORK/s3/bulwark$run" "$WORK/s3/restic$run"
    export BULWARK_REPO="s3://bulwark$run/repo" RESTIC_CACHE_DIR="$WORK/restic-cache$run"
    R="s3:$ENDPOINT/restic$run"
    "$BULWARK" repo init >/dev/null
    restic -r "$R" init -q >/dev/null
    RB=$(timed restic -r "$R" backup -q "$IMG")
    BB=$(timed "$BULWARK" backup image "$IMG" --source bench --cache-dir "$WORK/cache-b$run")
    # Restores start from cold caches (each tool's metadata cache emptied).
    rm -rf "$WORK/cache-b$run" "$RESTIC_CACHE_DIR"
    RR=$(timed restic_restore)
    # Without the local cache (nothing written besides the image).
    BRN=$(timed "$BULWARK" restore image bench@latest --to "$WORK/bw-out3.raw" --force --no-cache)
    # Default options: a cold cache (metadata is cached; a restore reads
    # each pack range once and does not cache it).
    BR=$(timed "$BULWARK" restore image bench@latest --to "$WORK/bw-out.raw" --force --cache-dir "$WORK/cache-r$run")
    cmp "$IMG" "$WORK/bw-out.raw" && cmp "$IMG" "$WORK/bw-out3.raw" \
        && echo "round $run: bulwark restores bit-identical"
    cmp "$IMG" "$WORK/restic-out$IMG" && echo "round $run: restic restore bit-identical"
    echo "$BB $RB $BR $RR $BRN" >>"$WORK/times"
    rm -rf "$WORK/restic-out" "$WORK"/bw-out*.raw "$WORK/cache-r$run"
done
BWSTORE=$(du -sm "$WORK/s3/bulwark1" | cut -f1)
RSTORE=$(du -sm "$WORK/s3/restic1" | cut -f1)

python3 - "$SIZE_MIB" "$BWSTORE" "$RSTORE" "$WORK/times" <<'EOF'
import sys
mib, bws, rs = (float(x) for x in sys.argv[1:4])
rows = [[float(x) for x in l.split()] for l in open(sys.argv[4]) if l.strip()]
for r in rows:
    print("round: " + " ".join(f"{k}={v:.2f}" for k, v in zip(
        ["backup", "restic-backup", "restore-cold", "restic-restore", "restore-nocache"], r)))
bb, rb, br, rr, brn = (min(r[i] for r in rows) for i in range(5))
def row(name, b, r=None):
    line = f"{name:22}{b:>8.2f} s {mib/b:>5.0f} MiB/s"
    if r is not None:
        line += f"{r:>8.2f} s {mib/r:>5.0f} MiB/s{r/b:>9.2f}x"
    print(line)
print(f"{'':22}{'bulwark':>18}{'restic':>18}{'ratio':>10}")
row("backup", bb, rb)
row("restore (cold cache)", br, rr)
row("restore (no cache)", brn, rr)
print(f"{'stored':22}{bws:>12.0f} MiB{rs:>14.0f} MiB")
print("ratio = restic time / bulwark time (> 1: bulwark faster); restore times include fsync of the image")
EOF
