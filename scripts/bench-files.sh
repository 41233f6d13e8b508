#!/usr/bin/env bash
# `bulwark files` on a 4 GiB disk (GPT, one ext4 partition) holding a
# Debian-sized root: this host's /etc, /usr/bin, /usr/sbin,
# /usr/lib/x86_64-linux-gnu, /usr/share and /usr/include (about 2.2 GiB,
# filled with mkfs.ext4 -d). Time to the first listing (`files ls SNAP
# vda/p1/etc`, a new process each time) and bytes fetched, from a local
# repository and from S3 behind the fault proxy's latency, against the
# baseline of the same run: a full `restore image` of the disk.
# Usage (root, for the page-cache drop): scripts/bench-files.sh [DELAY_MS] [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-rust.sh
DELAY=${1:-20}
W=${2:-/tmp/bulwark-bench-files}; mkdir -p "$W"
cargo build --release -q -p bulwark
cargo build --release -q -p testbed --example fault_proxy
BIN=$PWD/target/release
PROXY_BIN=$PWD/target/release/examples/fault_proxy
S3S_FS=$(scripts/setup-s3.sh)
IMG=$W/disk-4g.raw
if [ ! -f "$IMG" ]; then
    R=$W/root; rm -rf "$R"; mkdir -p "$R/usr/lib"
    cp -a /etc "$R/etc"
    for d in bin sbin share include; do cp -a "/usr/$d" "$R/usr/$d"; done
    cp -a /usr/lib/x86_64-linux-gnu "$R/usr/lib/"
    truncate -s 4G "$IMG.tmp"
    echo 'label: gpt
size=4000MiB, type=L' | sfdisk -q "$IMG.tmp"
    START=$(sfdisk -J "$IMG.tmp" | python3 -c 'import json,sys; print(json.load(sys.stdin)["partitiontable"]["partitions"][0]["start"]*512)')
    mkfs.ext4 -q -F -L root -E offset="$START" -d "$R" "$IMG.tmp" 4000M
    rm -rf "$R"; mv "$IMG.tmp" "$IMG"
fi
drop() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
# Seconds and bytes fetched of one `files ls` in a new process.
ls_run() {
    local s e log; drop; s=$(date +%s.%N)
    log=$("$BIN/bulwark" "$@" files ls bench@latest vda/p1/etc -v 2>&1 >/dev/null)
    e=$(date +%s.%N)
    echo "$(echo "$e - $s" | bc) $(sed 's/\x1b\[[0-9;]*m//g' <<<"$log" | sed -n 's/.*bytes_fetched=\([0-9]*\).*/\1/p')"
}
t() { local s e; drop; s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); echo "$e - $s" | bc; }
report() { # name, "seconds bytes", baseline seconds
    set -- "$1" $2 "$3"
    printf '%-32s %7.2f s  %8.1f MiB fetched   %6.3f x the full restore\n' \
        "$1" "$2" "$(echo "scale=1; $3 / 1048576" | bc)" "$(echo "scale=3; $2 / $4" | bc)"
}
export BULWARK_PASSWORD=bench

# Local repository.
export BULWARK_REPO=$W/repo
if [ ! -d "$BULWARK_REPO" ]; then
    "$BIN/bulwark" repo init >/dev/null
    "$BIN/bulwark" backup image "$IMG" --source bench >/dev/null
fi
rm -f "$W/r.raw"; local_restore=$(t "$BIN/bulwark" restore image bench@latest --to "$W/r.raw"); rm -f "$W/r.raw"
local_ls=$(ls_run)
local_ls2=$(ls_run)

# S3 behind the fault proxy.
export AWS_ACCESS_KEY_ID=AKFILESBENCH AWS_SECRET_ACCESS_KEY=filesbenchsecret AWS_REGION=us-east-1
export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
rm -rf "$W/s3"; mkdir -p "$W/s3/bench"
"$S3S_FS" --host 127.0.0.1 --port "$PORT" --access-key "$AWS_ACCESS_KEY_ID" \
    --secret-key "$AWS_SECRET_ACCESS_KEY" "$W/s3" >"$W/s3s.log" 2>&1 & S3PID=$!
coproc P { exec "$PROXY_BIN" "$PORT" "$DELAY"; }
cleanup() { kill "$S3PID" "$P_PID" 2>/dev/null || true; }
trap cleanup EXIT
read -r PROXY <&"${P[0]}"
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done
export BULWARK_REPO=s3://bench/files
AWS_ENDPOINT_URL=http://127.0.0.1:$PORT "$BIN/bulwark" --no-cache repo init >/dev/null
AWS_ENDPOINT_URL=http://127.0.0.1:$PORT "$BIN/bulwark" --no-cache backup image "$IMG" --source bench >/dev/null
export AWS_ENDPOINT_URL=$PROXY
s3_restore=$(t "$BIN/bulwark" --no-cache restore image bench@latest --to "$W/r.raw"); rm -f "$W/r.raw"
s3_ls=$(ls_run --no-cache)

used=$(python3 -c "import os; print(os.stat('$IMG').st_blocks*512)")
echo "4 GiB disk, $(echo "scale=2; $used / 1073741824" | bc) GiB allocated; files ls SNAP vda/p1/etc (first listing, new process):"
printf '%-32s %7.2f s\n' "local: restore image (baseline)" "$local_restore"
report "local: files ls, cold" "$local_ls" "$local_restore"
report "local: files ls, page cache warm" "$local_ls2" "$local_restore"
printf '%-32s %7.2f s\n' "S3 ${DELAY} ms: restore image (baseline)" "$s3_restore"
report "S3 ${DELAY} ms: files ls, cold" "$s3_ls" "$s3_restore"
