#!/usr/bin/env bash
# Many hosts, one bucket: WRITERS processes, each in a UTS namespace of its
# own (so its own host name: the name session markers, GC locks and
# manifests carry), back up an image of their own (IMAGE_MIB, 1 MiB of it
# rewritten before each backup, PAUSE s at most between backups) into one
# S3 bucket (s3s-fs on loopback) for MINUTES, while a maintenance host
# prunes (keep-last KEEP per source) and runs `gc --grace 0s` in a loop.
# Afterwards GC runs twice more (nothing in flight: it deletes what it
# condemned), then every snapshot must verify (`bulwark verify`: every
# chunk read back and checked) and every kept snapshot restore to the image
# it was taken of (sha256); snapshots written = kept + pruned.
# The last line sums up (snapshots written, verified, failures).
# Usage: scripts/bench-writers.sh [WRITERS] [MINUTES]   (default 8, 10; root;
#   env: IMAGE_MIB=32 KEEP=3 PAUSE=2 BIN=target/release/bulwark)
set -euo pipefail
cd "$(dirname "$0")/.."
writers=${1:-8}; minutes=${2:-10}
image=${IMAGE_MIB:-32}; keep=${KEEP:-3}; pause=${PAUSE:-2}
s3s_fs=$(scripts/setup-s3.sh)
if [ -z "${BIN:-}" ]; then cargo build --release -q -p bulwark; BIN=target/release/bulwark; fi
bw=$(realpath "$BIN")
work=$(mktemp -d /var/tmp/bw-bench-writers.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export AWS_ACCESS_KEY_ID="AKBENCH$RANDOM" AWS_SECRET_ACCESS_KEY="secret$RANDOM$RANDOM"
export AWS_REGION=us-east-1 AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null
export AWS_ENDPOINT_URL="http://127.0.0.1:$port" BULWARK_PASSWORD=bench
bucket="writers$$"
mkdir -p "$work/s3/$bucket"
"$s3s_fs" --host 127.0.0.1 --port "$port" --access-key "$AWS_ACCESS_KEY_ID" \
    --secret-key "$AWS_SECRET_ACCESS_KEY" "$work/s3" > "$work/s3s.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
export BULWARK_REPO="s3://$bucket/repo"
"$bw" repo init >/dev/null
deadline=$(( $(date +%s) + minutes * 60 ))

# One writer: its own host name, cache and image; one line per backup,
# "ok ID SHA256" or "failed".
cat > "$work/writer.sh" <<'EOF'
set -u
w=$1; bw=$2; work=$3; image=$4; pause=$5; deadline=$6
hostname "writer-$w"
img=$work/w$w.raw
head -c $((image << 20)) /dev/urandom > "$img"
while [ "$(date +%s)" -lt "$deadline" ]; do
    dd if=/dev/urandom of="$img" bs=1M count=1 seek=$((RANDOM % image)) conv=notrunc status=none
    sum=$(sha256sum < "$img" | cut -d' ' -f1)
    if id=$(BULWARK_CACHE_DIR=$work/cache$w "$bw" backup image "$img" --source "w$w" --json 2>>"$work/w$w.err" |
            python3 -c 'import json, sys; print(json.load(sys.stdin)["snapshot"])'); then
        echo "ok $id $sum"
    else
        echo "failed"
    fi
    sleep "$(python3 -c "import random; print(random.uniform(0, $pause))")"
done > "$work/w$w.log"
EOF
# The maintenance host: prune, then GC, again and again; one line each,
# "prune REMOVED_IDS..." and the GC's report.
cat > "$work/maint.sh" <<'EOF'
set -u
bw=$1; work=$2; keep=$3; deadline=$4
hostname maint
export BULWARK_CACHE_DIR=$work/cache-maint
while [ "$(date +%s)" -lt "$deadline" ]; do
    if out=$("$bw" prune --keep-last "$keep" --json 2>>"$work/maint.err"); then
        echo "prune $(python3 -c 'import json, sys; print(" ".join(d["id"] for d in json.load(sys.stdin) if not d["keep"]))' <<< "$out")"
    else
        echo "prune-failed"
    fi
    if out=$("$bw" gc --grace 0s --json 2>>"$work/maint.err"); then
        echo "gc $(python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)))' <<< "$out")"
    else
        echo "gc-failed"
    fi
done > "$work/maint.log"
EOF
echo "$writers writers and a maintenance host for $minutes min into s3://$bucket (s3s-fs)"
for w in $(seq "$writers"); do
    unshare --uts bash "$work/writer.sh" "$w" "$bw" "$work" "$image" "$pause" "$deadline" &
    pids+=($!)
done
unshare --uts bash "$work/maint.sh" "$bw" "$work" "$keep" "$deadline" &
pids+=($!)
for p in "${pids[@]:1}"; do wait "$p"; done

# Nothing in flight now: two GCs delete what the runs condemned.
for i in 1 2; do "$bw" gc --grace 0s --json > "$work/gc-final$i.json"; done
"$bw" verify --json > "$work/verify.json" || true
"$bw" snapshots --json > "$work/snapshots.json"
python3 - "$work" "$writers" "$bw" <<'EOF'
import glob, hashlib, json, os, subprocess, sys
work, writers, bw = sys.argv[1], int(sys.argv[2]), sys.argv[3]
written, failed = {}, 0
for w in range(1, writers + 1):
    for l in open(f"{work}/w{w}.log"):
        f = l.split()
        if f[0] == "ok":
            written[f[1]] = f[2]
        else:
            failed += 1
pruned, gcs, maint_failed = set(), [], 0
for l in open(f"{work}/maint.log"):
    kind, _, rest = l.strip().partition(" ")
    if kind == "prune":
        pruned.update(rest.split())
    elif kind == "gc":
        gcs.append(json.loads(rest))
    else:
        maint_failed += 1
kept = {s["id"] for s in json.load(open(f"{work}/snapshots.json"))}
v = json.load(open(f"{work}/verify.json"))
# Every kept snapshot restores to the image it was taken of.
mismatch = 0
for sid in sorted(kept):
    out = f"{work}/restore.raw"
    subprocess.run([bw, "restore", "image", sid, "--to", out, "--force"], check=True,
                   stdout=subprocess.DEVNULL)
    h = hashlib.sha256()
    with open(out, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    os.remove(out)
    mismatch += h.hexdigest() != written.get(sid)
lost = len(set(written) - kept - pruned)
unknown = len(kept - set(written))
final = [json.load(open(f"{work}/gc-final{i}.json")) for i in (1, 2)]
s = lambda k: sum(g.get(k, 0) for g in gcs)
print(f"writers: {len(written)} snapshots written, {failed} backups failed")
print(f"maintenance: {len(gcs)} gc runs, {len(pruned)} snapshots pruned; during the run "
      f"{s('packs_condemned')} packs condemned, {s('packs_deleted')} deleted, "
      f"{s('packs_repacked')} repacked, {s('packs_resurrected')} resurrected; {maint_failed} failed")
print(f"after: {len(kept)} snapshots kept, verify read {v['chunks']} chunks of {v['snapshots']} snapshots, "
      f"{len(v['damaged'])} damaged; {mismatch} restores differ; the final GCs deleted "
      f"{sum(g['packs_deleted'] for g in final)} packs")
failures = failed + maint_failed + len(v["damaged"]) + mismatch + lost + unknown
print(f"writers {writers}: {len(written)} snapshots written, {v['snapshots']} verified "
      f"({len(kept)} kept + {len(pruned)} pruned, {lost} lost), {failures} failures")
EOF
