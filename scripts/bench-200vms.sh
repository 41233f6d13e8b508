#!/usr/bin/env bash
# A fleet on one host: N shut-off libvirt domains (64 MiB qcow2 disks with
# 1 MiB of data each), protected by POLICIES calendar policies that fire
# every PERIOD minutes, staggered (`*:0/2:00`, `*:0/2:30`, `*:1/2:00`, ...:
# a wave of N/POLICIES backups every PERIOD*60/POLICIES s), run by
# `bulwark agent` into a local repository for ROUNDS periods with
# `max_concurrent_backups = LIMIT`.
# Measured end to end, from the agent's log (a line when a backup takes its
# slot and when it ends) and from outside (the qemu-nbd exports seen in
# /proc every 20 ms), while `agent status` is asked once a second:
#   - every (domain, policy) ran once in each of its slots, and how late;
#   - the most backups running at once, never above LIMIT;
#   - `agent status` latency (goal < 1 s) and the agent's peak RSS.
# The last line sums up. Everything made here (domains, files) is removed.
# Usage: scripts/bench-200vms.sh [N]   (root; env: POLICIES=4 PERIOD=2 ROUNDS=2
#   LIMIT=2 KEEP=2 BIN=target/release/bulwark; about ROUNDS+1 periods)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-200}; policies=${POLICIES:-4}; period=$(( ${PERIOD:-2} * 60 )); rounds=${ROUNDS:-2}
limit=${LIMIT:-2}; keep=${KEEP:-2}
virsh -q -c qemu:///system version >/dev/null 2>&1 ||
    { echo "libvirtd does not answer: run scripts/setup-test-host.sh" >&2; exit 1; }
if [ -z "${BIN:-}" ]; then cargo build --release -q -p bulwark; BIN=target/release/bulwark; fi
bw=$(realpath "$BIN")
work=$(mktemp -d /tmp/bw-bench-fleet.XXXXXX); chmod 755 "$work"
tag="bw-fleet-$$"
agent_pid=; sampler_pid=
cleanup() {
    [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null || true
    [ -n "$sampler_pid" ] && kill "$sampler_pid" 2>/dev/null || true
    for i in $(seq "$n"); do echo "undefine $tag-$i --checkpoints-metadata;"; done |
        virsh -q -c qemu:///system >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

# The domains: each disk its own 1 MiB of random data, then defined in one
# virsh session (one connection for all of them).
echo "defining $n domains"
for i in $(seq "$n"); do
    d=$work/vm$i; mkdir -p "$d"
    head -c 1M /dev/urandom > "$d/data.raw"; truncate -s 64M "$d/data.raw"
    qemu-img convert -q -f raw -O qcow2 -o compat=1.1 "$d/data.raw" "$d/disk.qcow2"
    rm "$d/data.raw"
    p=$(( (i - 1) % policies ))
    cat > "$d/domain.xml" <<XML
<domain type='qemu'><name>$tag-$i</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <metadata><bulwark:policies xmlns:bulwark='https://bulwark.dev/xmlns/libvirt/1'>
    <bulwark:policy name='fleet$p'/></bulwark:policies></metadata>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='$d/disk.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <memballoon model='none'/></devices></domain>
XML
    echo "define $d/domain.xml;"
done > "$work/define.cmds"
virsh -q -c qemu:///system < "$work/define.cmds" >/dev/null

export BULWARK_REPO=$work/repo BULWARK_PASSWORD=bench
"$bw" repo init >/dev/null
echo bench > "$work/pw"
{
    printf 'state_dir = "%s"\nsocket = "%s"\nmax_concurrent_backups = %d\n' \
        "$work/state" "$work/agent.sock" "$limit"
    printf '[repositories.main]\npath = "%s"\npassword_file = "%s"\n' "$work/repo" "$work/pw"
    for p in $(seq 0 $((policies - 1))); do
        off=$((p * period / policies))
        printf '[policies.fleet%d]\nrepository = "main"\nschedule = "*:%d/%d:%02d"\nkeep_last = %d\n' \
            "$p" $((off / 60)) $((period / 60)) $((off % 60)) "$keep"
    done
} > "$work/agent.toml"
# Every (domain, policy) ran just now: the first runs are the first slots
# (a policy that never ran would start at once instead).
mkdir -p "$work/state"
python3 - "$work/state/schedule.json" "$n" "$policies" "$tag" <<'EOF'
import json, sys, time
path, n, policies, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
now = int(time.time())
runs = {f"{tag}-{i}/fleet{(i - 1) % policies}": {"at": now, "ok": True} for i in range(1, n + 1)}
json.dump({"runs": runs}, open(path, "w"))
EOF

# The outside view: qemu-nbd processes exporting this run's disks.
python3 - "$work" > "$work/nbd.log" <<'EOF' &
import os, sys, time
work = sys.argv[1].encode()
while True:
    seen = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                continue
            if cmd.startswith(b"qemu-nbd\0") and work in cmd:
                seen += 1
    print(f"{time.time():.3f} {seen}", flush=True)
    time.sleep(0.02)
EOF
sampler_pid=$!

start=$(date +%s.%N)
BULWARK_LOG=info NO_COLOR=1 "$bw" agent run --config "$work/agent.toml" 2> "$work/agent.log" &
agent_pid=$!
end=$(python3 -c "print($start + $rounds * $period)")
echo "agent running for $((rounds * period / 60)) min ($((n * rounds)) backups due, $((n / policies)) per wave every $((period / policies)) s, limit $limit)"
: > "$work/status.ms"
while python3 -c "import sys, time; sys.exit(time.time() >= $end)"; do
    t0=$(date +%s%N)
    "$bw" agent status --json --socket "$work/agent.sock" > "$work/status.json" 2>/dev/null || true
    echo $(( ($(date +%s%N) - t0) / 1000000 )) >> "$work/status.ms"
    sleep 1
done
# The last slots' backups finish: a period past the end every slot before
# it has started (else it counts as missed); then nothing may be running.
sleep "$(python3 -c "print(max(0, $end + $period - $(date +%s.%N)))")"
for _ in $(seq 120); do
    [ "$(grep -c ') started' "$work/agent.log")" = "$(grep -c ') ended: ' "$work/agent.log")" ] && break
    sleep 1
done
rss=$(awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$agent_pid/status")
kill "$agent_pid"; wait "$agent_pid" || true; agent_pid=
kill "$sampler_pid"; sampler_pid=
snaps=$("$bw" snapshots --json | python3 -c "import json, sys; print(len(json.load(sys.stdin)))")

python3 - "$work" "$start" "$end" "$policies" "$limit" "$rss" "$snaps" "$n" "$tag" "$period" <<'EOF'
import re, statistics, sys, time
from datetime import datetime
work, tag, period = sys.argv[1], sys.argv[9], int(sys.argv[10])
start, end = float(sys.argv[2]), float(sys.argv[3])
policies, limit, rss, snaps, n = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7], int(sys.argv[8])
line = re.compile(r"^(\S+Z)\s+INFO\s+\S+ backup of (\S+) \((\S+)\) (started|ended: (\w+))")
starts, events, failed = {}, [], 0
for l in open(f"{work}/agent.log"):
    m = line.match(re.sub(r"\x1b\[[0-9;]*m", "", l))
    if not m:
        continue
    t = datetime.fromisoformat(m[1].replace("Z", "+00:00")).timestamp()
    if m[4] == "started":
        starts.setdefault((m[2], m[3]), []).append(t)
        events.append((t, 1))
    else:
        failed += m[5] != "ok"
        events.append((t, -1))
# Most backups at once (an end before a start at the same instant).
running = peak = 0
for _, d in sorted(events):
    running += d
    peak = max(peak, running)
nbd = max((int(l.split()[1]) for l in open(f"{work}/nbd.log") if l.strip()), default=0)
# Policy p fires p*period/policies s into each period (local time): each
# of its slots in (start, end) is due and gets exactly one run; later slots
# don't count.
late, missed, extra, slots = [], 0, 0, 0
for i in range(1, n + 1):
    p = (i - 1) % policies
    off = p * period // policies - time.localtime(start).tm_gmtoff
    slot = lambda t: int((t - off) // period * period + off)
    due = {s for s in range(slot(start) + period, int(end) + period, period) if s < end}
    ts = [t for t in starts.get((f"{tag}-{i}", f"fleet{p}"), []) if slot(t) < end]
    got = [slot(t) for t in ts]
    late += [t - slot(t) for t in ts]
    extra += len(got) - len(set(got)) + len(set(got) - due)
    missed += len(due - set(got))
    slots += len(due)
ms = [int(l) for l in open(f"{work}/status.ms") if l.strip()]
runs = len(late)
late = late or [0.0]
print(f"backups: {runs} in the measured slots, {failed} failed; {snaps} snapshots kept")
print(f"slot lateness: median {statistics.median(late):.1f} s, max {max(late):.1f} s (a slot lasts {period} s)")
print(f"concurrency: at most {peak} backups at once by the agent's log, {nbd} qemu-nbd exports seen (limit {limit})")
print(f"agent status: {len(ms)} calls, median {statistics.median(ms)} ms, max {max(ms)} ms; agent peak RSS {rss} MiB")
ok = missed == 0 and extra == 0 and failed == 0 and peak <= limit and nbd <= limit and max(ms) < 1000
print(f"fleet {n} VMs: {runs} backups in {slots} slots, {missed} missed, {extra} extra, "
      f"late max {max(late):.1f} s, {peak} at once (limit {limit}), status max {max(ms)} ms (goal 1000), "
      f"RSS {rss} MiB: {'goals met' if ok else 'goals missed'}")
EOF
