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
mkdir -p "$WORK/s3/bw" "$WORK/s3/restic"
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

export BULWARK_PASSWORD=bench RESTIC_PASSWORD=bench RESTIC_CACHE_DIR="$WORK/restic-cache"
export AWS_ENDPOINT_URL="$ENDPOINT"
export BULWARK_REPO="s3://bw/repo"
R="s3:$ENDPOINT/restic"

echo "== bulwark $(git rev-parse --short HEAD) vs $(restic version | cut -d' ' -f1-2), image $SIZE_MIB MiB, s3s-fs on $ENDPOINT"
"$BULWARK" repo init >/dev/null
restic -r "$R" init -q >/dev/null

sync
t0=$(now); restic -r "$R" backup -q "$IMG" >/dev/null; t1=$(now)
RB=$(secs "$t0" "$t1")
t0=$(now); "$BULWARK" backup image "$IMG" --source bench --cache-dir "$WORK/cache-b" >/dev/null; t1=$(now)
BB=$(secs "$t0" "$t1")

# Restores from a cold cache (each tool's own metadata cache emptied).
rm -rf "$WORK/cache-b" "$RESTIC_CACHE_DIR"
t0=$(now); restic -r "$R" restore -q latest --target "$WORK/restic-out" >/dev/null; t1=$(now)
RR=$(secs "$t0" "$t1")
t0=$(now); "$BULWARK" restore image bench@latest --to "$WORK/bw-out.raw" --cache-dir "$WORK/cache-r" >/dev/null; t1=$(now)
BR=$(secs "$t0" "$t1")
# Warm: the same restore again, pack ranges from the local cache.
t0=$(now); "$BULWARK" restore image bench@latest --to "$WORK/bw-out2.raw" --cache-dir "$WORK/cache-r" >/dev/null; t1=$(now)
BRW=$(secs "$t0" "$t1")

cmp "$IMG" "$WORK/bw-out.raw" && cmp "$IMG" "$WORK/bw-out2.raw" && echo "bulwark restore: bit-identical"
cmp "$IMG" "$WORK/restic-out$IMG" && echo "restic restore:  bit-identical"
BWSTORE=$(du -sm "$WORK/s3/bw" | cut -f1)
RSTORE=$(du -sm "$WORK/s3/restic" | cut -f1)

python3 - "$SIZE_MIB" "$BB" "$RB" "$BR" "$RR" "$BRW" "$BWSTORE" "$RSTORE" <<'EOF'
import sys
mib, bb, rb, br, rr, brw, bws, rs = (float(x) for x in sys.argv[1:])
print(f"{'':18}{'bulwark':>18}{'restic':>18}{'ratio':>10}")
print(f"{'backup':18}{bb:>8.2f} s {mib/bb:>5.0f} MiB/s{rb:>8.2f} s {mib/rb:>5.0f} MiB/s{rb/bb:>9.2f}x")
print(f"{'restore (cold)':18}{br:>8.2f} s {mib/br:>5.0f} MiB/s{rr:>8.2f} s {mib/rr:>5.0f} MiB/s{rr/br:>9.2f}x")
print(f"{'restore (warm)':18}{brw:>8.2f} s {mib/brw:>5.0f} MiB/s")
print(f"{'stored':18}{bws:>12.0f} MiB{rs:>14.0f} MiB")
print("ratio = restic time / bulwark time (> 1: bulwark faster)")
EOF
