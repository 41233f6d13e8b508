#!/usr/bin/env bash
# Restore drills from a bucket DELAY_MS away: every S3 request waits DELAY_MS
# in the test bed's fault proxy in front of a loopback s3s-fs. Two guests, each
# backed up as a stopped libvirt domain (straight to the server: only the
# drill's reads go through the proxy):
#   tiny    vm-images/build's busybox guest, console `bulwark-guest: ready`
#   debian  scripts/debian-image.sh's Debian 12, console `login:` + guest agent
# Per guest: `bulwark drill --json --no-cache` (cold: no local cache; the
# server's files are in the page cache) against a baseline in the same run:
# `virsh start` of the same domain on a fresh local copy of its qcow2 (warm in
# the page cache) until the same console line (and guest-ping), once before
# and once after the drill (their mean). Prints the drill's
# total seconds, each check's seconds (from the domain's start), bytes
# fetched, the boot set, the baseline and their ratios; the last line sums up.
# Usage: scripts/bench-drill.sh [DELAY_MS] [WORKDIR]   (default 20; root)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-rust.sh
DELAY=${1:-20}
W=${2:-/tmp/bulwark-bench-drill}
TIMEOUT=600 # seconds a boot may take, drill or local
mkdir -p "$W"
chmod 755 "$W" # libvirt's QEMU must reach the disks

cargo build --release -q -p bulwark -p bulwark-nbd
cargo build --release -q -p testbed --example fault_proxy
BW=$PWD/target/release/bulwark
PROXY_BIN=$PWD/target/release/examples/fault_proxy
S3S_FS=$(scripts/setup-s3.sh)
BULWARK_VM_IMAGES_QUIET=1 vm-images/build target/vm-images
scripts/debian-image.sh target/debian-image

. scripts/lib/bench-vm.sh

# ---- the S3 server, the proxy, the repository --------------------------------
export BULWARK_PASSWORD=bench BULWARK_STATE_DIR=$W/state BULWARK_REPO=s3://bench/drill
rm -rf "$W/state"
trap cleanup EXIT
start_s3
start_proxy "$DELAY"
AWS_ENDPOINT_URL=$DIRECT "$BW" --no-cache repo init >/dev/null

# ---- one guest ---------------------------------------------------------------

# bench GUEST DISK MEMORY_MIB REGEX AGENT(0|1): one line of figures per guest
# into $W/results. The drill runs between two local boots (the baseline is
# their mean: the machine is shared, its load drifts).
bench() {
    local guest=$1 image=$2 mem=$3 re=$4 agent=$5 name="bw-drillbench-$1-$$"
    local disk="$W/$name.qcow2" backup lb1 lb2 drill t0 wall
    cp --sparse=always "$image" "$disk"
    define_domain "$name" "$disk" "$mem"
    backup=$(AWS_ENDPOINT_URL=$DIRECT "$BW" --no-cache backup vm "$name" --json)
    lb1=$(local_boot "$name" "$image" "$disk" "$re" "$agent")
    local args=(drill "$name@latest" --console "$re" --timeout "${TIMEOUT}s" --json)
    [ "$agent" = 1 ] && args+=(--guest-agent)
    t0=$(now)
    drill=$(AWS_ENDPOINT_URL=$PROXY "$BW" --no-cache "${args[@]}") ||
        { echo "$guest: the drill failed: $drill" >&2; exit 1; }
    wall=$(since "$t0")
    echo "$drill" >"$W/$guest.drill.json"
    lb2=$(local_boot "$name" "$image" "$disk" "$re" "$agent")
    jq -cn --arg guest "$guest" --argjson b "$backup" --argjson d "$drill" \
        --arg wall "$wall" --arg l1 "$lb1" --arg l2 "$lb2" '{
        guest: $guest, data: $b.bytes_read, wall: ($wall | tonumber),
        seconds: $d.seconds, fetched: $d.bytes_fetched,
        boot_set: ([$d.boot_set[].bytes] | add),
        console: ($d.checks[] | select(.name == "console") | .seconds),
        agent: ([$d.checks[] | select(.name == "guest-agent") | .seconds] | first),
        locals: [$l1, $l2]
    } | .locals |= map(split(" ") | map(if . == "-" then null else tonumber end))
      | .local_console = ([.locals[][0]] | add / 2)
      | .local_agent = (if .locals[0][1] then ([.locals[][1]] | add / 2) else null end)
    ' >>"$W/results"
}

: >"$W/results"
bench tiny target/vm-images/tiny.qcow2 256 'bulwark-guest: ready' 0
bench debian target/debian-image/debian.qcow2 512 'login:' 1

# ---- the figures ---------------------------------------------------------------
echo "Restore drills, S3 ${DELAY} ms away (fault proxy), drill cold (--no-cache), local boot warm (page cache), TCG, load $(cut -d' ' -f1-3 /proc/loadavg):"
f() { jq -r "$1" <<<"$r"; }
mib() { echo "scale=1; $1 / 1048576" | bc; }
summary=""
while read -r r; do
    g=$(f .guest)
    printf '%-7s drill %6.1f s total (%.1f s wall), console after %.1f s' \
        "$g" "$(f .seconds)" "$(f .wall)" "$(f .console)"
    [ "$(f .agent)" != null ] && printf ', guest agent after %.1f s' "$(f .agent)"
    printf '\n        fetched %s MiB, boot set %s MiB of %s MiB of data (%s x)\n' \
        "$(mib "$(f .fetched)")" "$(mib "$(f .boot_set)")" "$(mib "$(f .data)")" \
        "$(echo "scale=3; $(f .boot_set) / $(f .data)" | bc)"
    printf '        local boot (mean of 2, before and after): console after %.1f s (%s)' \
        "$(f .local_console)" "$(f '[.locals[][0] * 10 | round / 10] | join(", ")')"
    [ "$(f .local_agent)" != null ] && printf ', guest agent after %.1f s (%s)' \
        "$(f .local_agent)" "$(f '[.locals[][1] * 10 | round / 10] | join(", ")')"
    rc=$(ratio "$(f .console)" "$(f .local_console)")
    rt=$(ratio "$(f .seconds)" "$(f .local_console)")
    printf '\n        drill / local: console %s x, drill total %s x' "$rc" "$rt"
    summary="$summary $g ${rc}x"
    if [ "$(f .agent)" != null ]; then
        ra=$(ratio "$(f .agent)" "$(f .local_agent)")
        printf ', guest agent %s x' "$ra"
        summary="$summary (agent ${ra}x)"
    fi
    printf '\n'
done <"$W/results"
echo "summary at ${DELAY} ms: time to the console line, drill / local boot:$summary"
