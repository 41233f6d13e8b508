#!/usr/bin/env bash
# A bucket 20 ms away: every S3 request waits 20 ms in the test bed's fault
# proxy in front of a loopback s3s-fs. A 4 GiB disk with 629 MiB of data
# (random and text in 37 stripes of 17 MiB spread over the disk, holes
# between): a cold `nbdcopy` from a fresh `bulwark-nbd` export vs a cold
# `bulwark restore image` (no cache) of the same snapshot through the same
# proxy. Default options for both.
# Usage: scripts/bench-latency.sh [DELAY_MS] [WORKDIR]   (default 20)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-rust.sh
DELAY=${1:-20}
W=${2:-/tmp/bulwark-bench-latency}; mkdir -p "$W"
cargo build --release -q -p bulwark -p bulwark-nbd
cargo build --release -q -p testbed --example fault_proxy
BIN=$PWD/target/release
PROXY_BIN=$PWD/target/release/examples/fault_proxy
S3S_FS=$(scripts/setup-s3.sh)
IMG=$W/disk-4g.raw
if [ ! -f "$IMG" ]; then
    python3 - "$IMG" <<'PY'
import random, sys
rnd = random.Random(7)
words = b"the backup of virtual machine disk block chunk restore snapshot INFO\n".split(b" ")
with open(sys.argv[1], "wb") as f:
    f.truncate(4 << 30)
    for i in range(37):                      # 37 x 17 MiB = 629 MiB
        f.seek(i * (110 << 20))
        for j in range(17):
            if (i + j) % 2:
                f.write(rnd.randbytes(1 << 20))
            else:
                b = bytearray()
                while len(b) < 1 << 20:
                    b += rnd.choice(words) + b" "
                f.write(bytes(b[: 1 << 20]))
PY
fi
t() { local s e; s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); echo "$e - $s" | bc; }
export AWS_ACCESS_KEY_ID=AKLATBENCH AWS_SECRET_ACCESS_KEY=latbenchsecret AWS_REGION=us-east-1
export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null BULWARK_PASSWORD=bench
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
rm -rf "$W/s3"; mkdir -p "$W/s3/bench"
"$S3S_FS" --host 127.0.0.1 --port "$PORT" --access-key "$AWS_ACCESS_KEY_ID" \
    --secret-key "$AWS_SECRET_ACCESS_KEY" "$W/s3" >"$W/s3s.log" 2>&1 & S3PID=$!
coproc P { exec "$PROXY_BIN" "$PORT" "$DELAY"; }
cleanup() { kill "$S3PID" "$P_PID" 2>/dev/null || true; }
trap cleanup EXIT
read -r PROXY <&"${P[0]}"
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done
export BULWARK_REPO=s3://bench/lat
# The backup goes straight to the server: only the reads are measured.
AWS_ENDPOINT_URL=http://127.0.0.1:$PORT "$BIN/bulwark" --no-cache repo init >/dev/null
AWS_ENDPOINT_URL=http://127.0.0.1:$PORT "$BIN/bulwark" --no-cache backup image "$IMG" --source lat >/dev/null
export AWS_ENDPOINT_URL=$PROXY
rm -f "$W/s.sock" "$W/r.raw"
coproc S { exec env BULWARK_LOG=info "$BIN/bulwark-nbd" serve --snapshot lat@latest --socket "$W/s.sock" 2>"$W/nbd.log"; }
read -r _ <&"${S[0]}"
export_t=$(t nbdcopy "nbd+unix:///vda?socket=$W/s.sock" null:)
kill "$S_PID"; wait "$S_PID" 2>/dev/null || true
restore_t=$(t "$BIN/bulwark" --no-cache restore image lat@latest --to "$W/r.raw")
cmp "$IMG" "$W/r.raw" || { echo "restore differs"; exit 1; }
stored=$(du -sb "$W/s3/bench/lat/data" | cut -f1)
echo "S3 ${DELAY} ms away (fault proxy), 4 GiB disk, 629 MiB of data, cold, default options:"
printf '%-34s %8s s\n' "bulwark-nbd export, nbdcopy" "$export_t"
printf '%-34s %8s s   export / restore: %s x the time\n' "bulwark restore image" "$restore_t" "$(echo "scale=2; $export_t / $restore_t" | bc)"
fetched=$(sed -n 's/.*fetched \([0-9]*\) B.*/\1/p' "$W/nbd.log" | head -1)
[ -n "$fetched" ] && echo "export fetched $fetched B for $stored B of packs ($(echo "scale=3; $fetched / $stored" | bc) x)"
