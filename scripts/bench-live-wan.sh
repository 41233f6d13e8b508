#!/usr/bin/env bash
# Live restore across a WAN: a loopback s3s-fs behind the test bed's fault
# proxy, every S3 request DELAY ms late. Two parts (root; release build):
#
#   ready [DELAY_MS...]   (default 20 100)
#     For the tiny test guest and scripts/debian-image.sh's Debian 12, per
#     delay: a local boot of the same disk (baseline: a fresh synced copy,
#     warm in the page cache, `virsh start` to the console line; one before
#     and one after, their mean), then two live restores of the snapshot
#     through the proxy, cold (--no-cache): the first with no boot set (its
#     server records one), the second fetching that set first. Each: time
#     from the command to the console line, and `restore status`'s
#     demand_misses and stall_seconds at that moment (the guest's reads that
#     waited for the bucket and how long, whatever the CPU hides), and
#     independent_after (when no disk needed the bucket any more).
#
#   independence [DATA_GIB]   (default 2)
#     A domain whose second disk (raw, twice DATA_GIB) holds DATA_GIB of
#     random data: `restore vm` of its snapshot against a live restore's
#     independent_after, same bucket, 20 ms, both cold, each started from
#     settled memory (see settle); with the host's busy CPU over each, and
#     the share of it the loopback S3 server and the proxy took.
#
# The last line sums up. With BULWARK_PROXY_TRACE=1 the proxy logs each S3
# request's arrival to $BENCH_DIR/proxy-DELAY.out and each live restore's
# start is in NAME.t0: the round trips one after another, step by step.
# Work dir: $BENCH_DIR (default /tmp/bulwark-bench-live);
# $GUESTS picks the guests of `ready` (default "tiny debian"). KEY_FILE=1
# makes the repository with a key file instead of a passphrase: no Argon2
# on a restore's path (its cost beside the round trips, step by step).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-rust.sh
MODE=${1:-ready}
shift || true
W=${BENCH_DIR:-/tmp/bulwark-bench-live}
TIMEOUT=600
mkdir -p "$W"
chmod 755 "$W"

cargo build --release -q -p bulwark -p bulwark-nbd
cargo build --release -q -p testbed --example fault_proxy
BW=$PWD/target/release/bulwark
PROXY_BIN=$PWD/target/release/examples/fault_proxy
S3S_FS=$(scripts/setup-s3.sh)
BULWARK_VM_IMAGES_QUIET=1 vm-images/build target/vm-images
. scripts/lib/bench-vm.sh

export BULWARK_PASSWORD=bench BULWARK_STATE_DIR=$W/state BULWARK_REPO=s3://bench/wan
if [ "${KEY_FILE:-0}" = 1 ]; then
    unset BULWARK_PASSWORD
    rm -f "$W/key"
    printf '#!/bin/sh\nexec %s --key-file %s "$@"\n' "$BW" "$W/key" >"$W/bulwark-key"
    chmod +x "$W/bulwark-key"
    BW=$W/bulwark-key
fi
rm -rf "$W/state" "$W/img"
mkdir -p "$W/img"
trap cleanup EXIT
start_s3
AWS_ENDPOINT_URL=$DIRECT "$BW" --no-cache repo init >/dev/null

# forget NAME: the restored domain and its files.
forget() {
    virsh destroy "$1" >/dev/null 2>&1 || true
    virsh undefine "$1" >/dev/null 2>&1 || true
    rm -f "$W/img/$1"-* "$W/img/.$1"-*
}

# live SNAPSHOT NAME REGEX ENDPOINT: a live restore until the console
# line, then until it is done; one JSON line of figures.
live() {
    local snap=$1 name=$2 re=$3 endpoint=$4 log="$W/img/$2-serial0.log"
    local t0 el ready="" pid st
    DOMAINS+=("$name")
    t0=${EPOCHREALTIME/./}
    # The start, for a timeline beside the proxy's (BULWARK_PROXY_TRACE=1).
    echo "$EPOCHREALTIME" >"$W/$name.t0"
    AWS_ENDPOINT_URL=$endpoint "$BW" --no-cache restore vm "$snap" --as "$name" \
        --storage-dir "$W/img" --live --wait >"$W/$name.out" 2>&1 &
    pid=$!
    while [ -z "$ready" ]; do
        el=$((${EPOCHREALTIME/./} - t0))
        if grep -Eq "$re" "$log" 2>/dev/null; then ready=$(secs "$el"); fi
        if [ "$el" -ge $((TIMEOUT * 1000000)) ]; then
            echo "live restore $name: no '$re' in $TIMEOUT s" >&2
            exit 1
        fi
        [ -n "$ready" ] || sleep 0.25
    done
    st=$("$BW" restore status "$name" --json)
    wait "$pid" || { echo "live restore $name failed:" >&2; cat "$W/$name.out" >&2; exit 1; }
    local done_s
    done_s=$(secs $((${EPOCHREALTIME/./} - t0)))
    jq -c --arg ready "$ready" --arg done "$done_s" --argjson fin "$("$BW" restore status "$name" --json)" \
        '.[0] | {ready: ($ready | tonumber), done: ($done | tonumber),
          boot_set, boot_set_bytes, demand_misses, stall_seconds,
          independent_after: $fin[0].independent_after}' <<<"$st"
    forget "$name"
}

ready_part() {
    local delays=("$@")
    [ ${#delays[@]} -gt 0 ] || delays=(20 100)
    : >"$W/results"
    local guest image mem re name disk snap d l1 l2 a b
    for spec in "tiny target/vm-images/tiny.qcow2 256 bulwark-guest: ready" \
        "debian target/debian-image/debian.qcow2 512 login:"; do
        read -r guest image mem re <<<"$spec"
        [[ " ${GUESTS:-tiny debian} " == *" $guest "* ]] || continue
        [ "$guest" = debian ] && scripts/debian-image.sh target/debian-image
        name="bw-wanbench-$guest-$$"
        disk="$W/$name.qcow2"
        cp --sparse=always "$image" "$disk"
        define_domain "$name" "$disk" "$mem"
        snap=$(AWS_ENDPOINT_URL=$DIRECT "$BW" --no-cache backup vm "$name" --json | jq -r .snapshot)
        for d in "${delays[@]}"; do
            start_proxy "$d"
            l1=$(local_boot "$name" "$image" "$disk" "$re" 0 | cut -d' ' -f1)
            rm -rf "$W/s3/bench/wan/bootsets"
            a=$(live "$snap" "bw-wan-$guest-$d-a-$$" "$re" "$PROXY")
            b=$(live "$snap" "bw-wan-$guest-$d-b-$$" "$re" "$PROXY")
            l2=$(local_boot "$name" "$image" "$disk" "$re" 0 | cut -d' ' -f1)
            jq -cn --arg g "$guest" --arg d "$d" --arg l1 "$l1" --arg l2 "$l2" \
                --argjson a "$a" --argjson b "$b" \
                '{guest: $g, delay: ($d | tonumber), local: ((($l1 | tonumber) + ($l2 | tonumber)) / 2),
                  locals: [$l1, $l2], without: $a, with: $b}' >>"$W/results"
        done
    done
    echo "Live restore, S3 behind the fault proxy, cold (--no-cache); local boot warm; TCG; load $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "| guest | delay | local boot | boot set | ready | ratio | guest reads that waited | waited in all | independent after |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    local summary="" r
    while read -r r; do
        jq -r '. as $r | ["without", "with"][] as $k | $r[$k] as $x |
            "| \($r.guest) | \($r.delay) ms | \($r.local * 10 | round / 10) s | " +
            (if $x.boot_set then "yes (\($x.boot_set_bytes / 1048576 * 10 | round / 10) MiB)" else "no" end) +
            " | \($x.ready * 10 | round / 10) s | \($x.ready / $r.local * 100 | round / 100)x | \($x.demand_misses) | \($x.stall_seconds * 100 | round / 100) s | \($x.independent_after * 10 | round / 10) s |"' <<<"$r"
        summary="$summary $(jq -r '"\(.guest)@\(.delay)ms \(.with.ready / .local * 100 | round / 100)x/\(.with.stall_seconds * 100 | round / 100)s (without \(.without.ready / .local * 100 | round / 100)x/\(.without.stall_seconds * 100 | round / 100)s)"' <<<"$r")"
    done <"$W/results"
    echo "summary: ready / local boot and seconds waited, with a boot set (without):$summary"
}

# settle: both sides of a ratio start from the same memory. The GiBs a run
# writes land in page cache freed by the step before it (the data file,
# the last restore's files); this host hands freed memory back to its own
# host after a few seconds, and writing 2 GiB into such memory took 1.7-1.9 s
# of system time against 0.7 s into memory freed a moment before. Flushed
# and given that time, every run writes into memory handed back, as on a
# host that has been up a while.
settle() {
    sync
    sleep 10
}

independence_part() {
    local gib=${1:-2} name="bw-wanbench-data-$$" disk data snap t0 full live_json
    disk="$W/$name.qcow2"
    data="$W/$name-data.raw"
    cp --sparse=always target/vm-images/tiny.qcow2 "$disk"
    truncate -s $((gib * 2))G "$data"
    dd if=/dev/urandom of="$data" bs=1M count=$((gib * 1024)) seek=$((gib * 512)) \
        conv=notrunc status=none
    define_domain "$name" "$disk" 256 "$data"
    snap=$(AWS_ENDPOINT_URL=$DIRECT "$BW" --no-cache backup vm "$name" --json | jq -r .snapshot)
    rm -f "$data"
    start_proxy 20
    cpu_trace "$W/cpu" "${PIDS[@]}" &
    PIDS+=($!)
    local fname="bw-wan-full-$$" t1 live_name="bw-wan-ind-$$"
    DOMAINS+=("$fname")
    settle
    t0=${EPOCHREALTIME/./}
    AWS_ENDPOINT_URL=$PROXY "$BW" --no-cache restore vm "$snap" --as "$fname" \
        --storage-dir "$W/img" >/dev/null
    t1=${EPOCHREALTIME/./}
    full=$(secs $((t1 - t0)))
    local full_cpu live_cpu ind
    full_cpu=$(cpu_between "$W/cpu" "$t0" "$t1")
    forget "$fname"
    settle
    live_json=$(live "$snap" "$live_name" 'bulwark-guest: ready' "$PROXY")
    ind=$(jq -r .independent_after <<<"$live_json")
    t0=$(tr -d . <"$W/$live_name.t0")
    live_cpu=$(cpu_between "$W/cpu" "$t0" "$(echo "$t0 + $ind * 1000000" | bc | cut -d. -f1)")
    echo "Time to independence, ${gib} GiB of random data on a second disk, S3 20 ms away, cold (--no-cache):"
    printf '  restore vm:                            %6.1f s\n' "$full"
    printf '  live restore, until no disk needs S3:  %6.1f s (%s x)\n' "$ind" "$(ratio "$ind" "$full")"
    # The host's CPU over each span: how much of it was left, and how much
    # the loopback S3 server and the proxy took (a real bucket: none).
    local what busy peers avail
    for what in "restore vm:$full_cpu" "live restore until independent:$live_cpu"; do
        read -r busy peers avail <<<"${what#*:}"
        printf '  host CPU, %-31s %5.1f of %5.1f core-s busy (S3 server and proxy %.1f)\n' \
            "${what%%:*}" "$busy" "$avail" "$peers"
    done
    printf '  live restore, guest ready after:       %6.1f s; all local after %.1f s\n' \
        "$(jq -r .ready <<<"$live_json")" "$(jq -r .done <<<"$live_json")"
    echo "summary: independence $(ratio "$ind" "$full")x restore vm (${gib} GiB, 20 ms)"
}

case "$MODE" in
ready) ready_part "$@" ;;
independence) independence_part "$@" ;;
*)
    echo "usage: $0 ready [DELAY_MS...] | independence [DATA_GIB]" >&2
    exit 2
    ;;
esac
