#!/usr/bin/env bash
# A 1 TiB disk: peak RSS (and wall time) of `backup image` of a sparse
# 1 TiB raw image holding DATA_MIB of random data (64 extents spread over
# the disk), of its second backup after CHANGE_MIB of it were rewritten,
# of `restore image` of that snapshot (compared extent by extent with the
# image: sha256), and of `bulwark-nbd` serving it while nbdcopy reads the
# whole export (the server's VmHWM; NBD_CACHE_MIB sets --cache-mib, default
# the server's own). Several DATA_MIB in one run show whether memory grows
# with the data; goal (issue 32): < 256 MiB for each.
# Needs 2 x DATA_MIB + 1 GiB free (image + repository, then repository +
# restore: the image is removed before the restore). The issue's size is
# 65536 (64 GiB, CHANGE_MIB 1024).
# Usage: scripts/bench-1tib.sh [DATA_MIB...]   (default 65536; env:
#   CHANGE_MIB=DATA_MIB/64 SIZE_GIB=1024 NBD_CACHE_MIB WORKDIR BIN=DIR
#   DATA=random|bits S3=1: the repository in a loopback s3s-fs bucket
#   under WORKDIR instead of a directory)
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=("${@:-65536}")
disk_gib=${SIZE_GIB:-1024}
command -v /usr/bin/time >/dev/null || apt-get install -y -qq time >/dev/null
if [ -z "${BIN:-}" ]; then
    cargo build --release -q -p bulwark -p bulwark-nbd
    BIN=$PWD/target/release
fi
work=$(mktemp -d "${WORKDIR:-/var/tmp}/bw-bench-1tib.XXXXXX")
nbd_pid= s3_pid=
cleanup() {
    [ -n "$nbd_pid" ] && kill "$nbd_pid" 2>/dev/null
    [ -n "$s3_pid" ] && kill "$s3_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
if [ -n "${S3:-}" ]; then
    s3s_fs=$(scripts/setup-s3.sh)
    export AWS_ACCESS_KEY_ID=AKBENCH1TIB AWS_SECRET_ACCESS_KEY=bench1tibsecret AWS_REGION=us-east-1
    export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    mkdir -p "$work/s3/bench"
    "$s3s_fs" --host 127.0.0.1 --port "$port" --access-key "$AWS_ACCESS_KEY_ID" \
        --secret-key "$AWS_SECRET_ACCESS_KEY" "$work/s3" > "$work/s3s.log" 2>&1 &
    s3_pid=$!
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
    export AWS_ENDPOINT_URL=http://127.0.0.1:$port
fi
export BULWARK_PASSWORD=bench
results=$work/results; : > "$results"

# measure DATA STEP LABEL CMD...: wall s and peak RSS of CMD, one line.
measure() {
    local data=$1 step=$2 label=$3; shift 3
    /usr/bin/time -f "%e %M" -o "$work/time" "$@" > "$work/out" 2> "$work/err" ||
        { echo "$label failed:"; cat "$work/err"; exit 1; }
    read -r secs kib < "$work/time"
    report "$data" "$step" "$label" "$secs" "$kib"
}
report() {
    printf '%6s MiB  %-32s %8.1f s %6d MiB\n' "$1" "$3" "$4" $(($5 >> 10))
    echo "$1|$2|$5" >> "$results"
}
# extents DATA: "OFFSET_MIB LENGTH_MIB" of each data extent.
extents() {
    local n=64 len=$(($1 / 64)) stride=$((disk_gib * 1024 / 64))
    for k in $(seq 0 $((n - 1))); do echo "$((k * stride)) $len"; done
}
# fill FILE OFFSET_MIB LENGTH_MIB: random data there. DATA=bits writes
# random '0'/'1' bytes instead: unique and chunked like random data, but
# compressible about 7x, so 64 GiB of it fits a small disk when WORKDIR is
# on a compressing file system (btrfs -o compress-force=zstd on a loop file).
fill() {
    if [ "${DATA:-random}" = bits ]; then
        head -c $(($3 << 20)) /dev/urandom | tr '\000-\377' "$(printf '01%.0s' $(seq 128))" |
            dd of="$1" bs=1M seek="$2" conv=notrunc iflag=fullblock status=none
    else
        dd if=/dev/urandom of="$1" bs=1M seek="$2" count="$3" conv=notrunc status=none
    fi
}
# sums FILE DATA: sha256 of each data extent of FILE.
sums() {
    extents "$2" | while read -r off len; do
        dd if="$1" bs=1M skip="$off" count="$len" status=none | sha256sum
    done
}

for data in "${sizes[@]}"; do
    need=$(( (2 * data + 1024) << 10 ))
    free=$(df --output=avail -k "$work" | tail -1)
    [ "$free" -gt "$need" ] ||
        { echo "$data MiB needs $((need >> 20)) GiB free here, $((free >> 20)) GiB are: skipped"; continue; }
    change=${CHANGE_MIB:-$((data / 64))}
    img=$work/disk.raw
    if [ -n "${S3:-}" ]; then
        export BULWARK_REPO=s3://bench/big-$data BULWARK_CACHE_DIR=$work/cache
        rm -rf "$work/s3/bench/big-$data" "$img"
    else
        export BULWARK_REPO=$work/repo
        rm -rf "$BULWARK_REPO" "$img"
    fi
    "$BIN/bulwark" repo init >/dev/null
    truncate -s "${disk_gib}G" "$img"
    extents "$data" | while read -r off len; do
        fill "$img" "$off" "$len"
    done
    measure "$data" backup "backup image (first)" "$BIN/bulwark" backup image "$img" --source big
    extents "$data" | while read -r off len; do
        fill "$img" "$off" $((change / 64))
    done
    measure "$data" incremental "backup image ($change MiB changed)" "$BIN/bulwark" backup image "$img" --source big
    sums "$img" "$data" > "$work/image.sums"
    rm "$img"
    measure "$data" restore "restore image" "$BIN/bulwark" restore image big@latest --to "$work/restored.raw"
    sums "$work/restored.raw" "$data" | cmp -s - "$work/image.sums" ||
        { echo "the restore differs from the image"; exit 1; }
    alloc=$(du -k "$work/restored.raw" | cut -f1)
    [ "$alloc" -le $(( (data + 64) << 10 )) ] ||
        { echo "the restore is not sparse: $alloc KiB allocated"; exit 1; }
    rm "$work/restored.raw"
    rm -f "$work/nbd.sock"
    "$BIN/bulwark-nbd" serve --snapshot big@latest --socket "$work/nbd.sock" \
        ${NBD_CACHE_MIB:+--cache-mib "$NBD_CACHE_MIB"} > "$work/nbd.out" 2> "$work/nbd.err" &
    nbd_pid=$!
    for _ in $(seq 200); do [ -S "$work/nbd.sock" ] && break; sleep 0.05; done
    t0=$(date +%s.%N)
    nbdcopy "nbd+unix:///vda?socket=$work/nbd.sock" null:
    secs=$(python3 -c "print($(date +%s.%N) - $t0)")
    echo "        export read at $(python3 -c "print(round($data / $secs))") MiB/s of data"
    kib=$(awk '/VmHWM/ {print $2}' "/proc/$nbd_pid/status")
    kill "$nbd_pid"; wait "$nbd_pid" 2>/dev/null || true; nbd_pid=
    report "$data" export "bulwark-nbd, nbdcopy reads all" "$secs" "$kib"
done

python3 - "$results" "$disk_gib" <<'EOF'
import sys
rss = {}
for data, step, kib in (l.strip().split("|") for l in open(sys.argv[1]) if l.strip()):
    rss.setdefault(step, {})[int(data)] = int(kib) >> 10
sizes = sorted({d for v in rss.values() for d in v})
worst = max((m for v in rss.values() for m in v.values()), default=0)
parts = ", ".join(f"{step} " + "/".join(str(v[d]) for d in sizes) for step, v in rss.items())
print(f"1 TiB disk ({sys.argv[2]} GiB) with {'/'.join(map(str, sizes))} MiB of data, peak RSS in MiB: "
      f"{parts}; worst {worst} MiB (goal 256): {'goal met' if 0 < worst < 256 else 'goal missed'}")
EOF
