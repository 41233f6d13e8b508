#!/usr/bin/env bash
# A real S3 server that enforces Object Lock, for tests and for people:
# Ceph's radosgw (Debian 12, Ceph 16) on a single-node cluster (one monitor,
# one OSD, no manager, no systemd), all state in DIR, listening on loopback.
# Starts in about 1.5 s.
#
#   scripts/s3-lock-server.sh start DIR [--owner-pid PID]
#       Starts the cluster in the background, makes an owner user and a
#       bucket with Object Lock enabled, and prints shell `export` lines:
#       AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (the
#       owner's), AWS_REGION and BULWARK_LOCK_BUCKET:
#           eval "$(scripts/s3-lock-server.sh start /tmp/rgw)"
#       With --owner-pid, everything stops and DIR is removed once process
#       PID is gone (tests pass their own pid). The OSD keeps objects in memory (memstore):
#       data is gone when the server stops.
#   scripts/s3-lock-server.sh stop DIR
#       Stops what `start` started in DIR (by its pid files) and removes the
#       cluster's state; logs stay in DIR/log.
#   scripts/s3-lock-server.sh bucket DIR [--no-lock]
#       Makes another bucket (owned by the owner; Object Lock enabled unless
#       --no-lock) and prints its name.
#   scripts/s3-lock-server.sh user DIR NAME
#       Makes S3 user NAME and prints its AWS_ACCESS_KEY_ID and
#       AWS_SECRET_ACCESS_KEY `export` lines. In a policy it is
#       arn:aws:iam:::user/NAME.
#   scripts/s3-lock-server.sh policy DIR BUCKET FILE
#       Sets BUCKET's bucket policy to the JSON in FILE (as the owner).
#
# Needs Debian's radosgw ceph-mon ceph-osd ceph-common curl
# (scripts/setup-test-host.sh installs them). Root is not needed.
# S3_LOCK_SERVER_TIMES=1 prints how long each step of `start` took.
set -euo pipefail

log() { printf 's3-lock-server: %s\n' "$*" >&2; }
die() {
    log "$*"
    exit 1
}
usage() {
    die "usage: $0 start DIR [--owner-pid PID] | stop DIR | bucket DIR [--no-lock] | user DIR NAME | policy DIR BUCKET FILE"
}

[ $# -ge 2 ] || usage
cmd=$1
dir=$(realpath -m "$2")
shift 2
self=$(realpath "$0")
conf="$dir/ceph.conf"
t0=$(date +%s.%N)

# Elapsed time per step of `start`, with S3_LOCK_SERVER_TIMES=1.
phase() {
    if [ "${S3_LOCK_SERVER_TIMES:-0}" = 1 ]; then
        log "$(awk -v t0="$t0" -v t="$(date +%s.%N)" 'BEGIN {printf "%.2f s", t - t0}'): $*"
    fi
}

# Debian's python3 (the one first on PATH may be another); only to find a
# free loopback port.
free_port() {
    /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

rand_hex() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }

# A zombie (exited, not yet reaped by whoever adopted it) counts as gone.
proc_alive() {
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}
pid_alive() { [ -f "$1" ] && proc_alive "$(cat "$1")"; }

# Not as client.rgw: that name's admin socket belongs to the gateway.
admin() { radosgw-admin -c "$conf" -n client.admin "$@"; }

# The owner's keys and the endpoint, from a started server.
load_env() {
    [ -f "$dir/env" ] || die "no server started in $dir"
    # shellcheck disable=SC1091
    . "$dir/env"
}

# An S3 request signed by curl (SigV4) with the owner's keys; radosgw wants
# the payload hash header, which curl 7.88 does not add by itself.
owner_curl() {
    curl -fsS --aws-sigv4 "aws:amz:us-east-1:s3" \
        --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" \
        -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$@"
}

# Prints "ACCESS SECRET" of a new user NAME.
make_user() {
    local ak sk
    ak="BW$(rand_hex 9 | tr a-f A-F)"
    sk=$(rand_hex 20)
    admin user create --uid "$1" --display-name "$1" --access-key "$ak" --secret "$sk" >/dev/null
    echo "$ak $sk"
}

# Prints the name of a new bucket; $1 = lock | no-lock.
make_bucket() {
    local name lock=()
    name="bw-lock-$(rand_hex 6)"
    [ "$1" = lock ] && lock=(-H "x-amz-bucket-object-lock-enabled: true")
    owner_curl -X PUT "${lock[@]}" -o /dev/null "$AWS_ENDPOINT_URL/$name" ||
        die "creating bucket $name failed"
    echo "$name"
}

stop_all() {
    local p name
    # Gateway first, then OSD, then monitor.
    for name in client.rgw osd.0 mon.a; do
        p="$dir/run/$name.pid"
        if pid_alive "$p"; then
            kill "$(cat "$p")" 2>/dev/null || true
            for _ in $(seq 1 50); do
                pid_alive "$p" || break
                sleep 0.1
            done
            if pid_alive "$p"; then kill -9 "$(cat "$p")" 2>/dev/null || true; fi
        fi
    done
    p="$dir/run/watchdog.pid"
    if pid_alive "$p"; then kill "$(cat "$p")" 2>/dev/null || true; fi
    rm -rf "$dir/mon" "$dir/osd" "$dir/run" "$dir/monmap" "$dir/env"
}

# A daemon did not start: say which, with the end of what it printed.
failed() {
    die "$* failed: $(tail -n 5 "$dir/log/daemons.out" 2>/dev/null)"
}

write_conf() {
    local fsid=$1 mon_port=$2 rgw_port=$3
    cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$mon_port
public addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = none
auth service required = none
auth client required = none
# radosgw asks for secure connections by default, which auth none cannot give.
ms client mode = crc secure
ms mon client mode = crc secure
run dir = $dir/run
pid file = $dir/run/\$name.pid
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
mon cluster log file = $dir/log/cluster.log
crash dir = $dir/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 1
osd pool default pgp num = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
# The monitor's store is tiny; a shared, nearly full disk must not stop it.
mon data avail crit = 0
mon data avail warn = 0
# radosgw makes its pools one by one as it starts: each is a map change,
# proposed at once rather than after the default second of batching
# (12 s -> 1.5 s to a ready gateway).
paxos propose interval = 0.01
paxos min wait = 0.01
[mon]
mon data = $dir/mon
[osd]
osd data = $dir/osd
osd objectstore = memstore
memstore device bytes = 8589934592
[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:$rgw_port
EOF
}

start() {
    local owner_pid=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --owner-pid)
                [ $# -ge 2 ] || usage
                owner_pid=$2
                shift 2
                ;;
            *) usage ;;
        esac
    done
    mkdir -p "$dir"
    if pid_alive "$dir/run/client.rgw.pid"; then die "already running in $dir (stop it first)"; fi
    stop_all
    mkdir -p "$dir/run" "$dir/log" "$dir/mon" "$dir/osd" "$dir/crash"
    local fsid mon_port rgw_port uuid keys
    fsid=$(cat /proc/sys/kernel/random/uuid)
    mon_port=$(free_port)
    rgw_port=$(free_port)
    write_conf "$fsid" "$mon_port" "$rgw_port"
    local out="$dir/log/daemons.out"

    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon_port]" "$dir/monmap" >>"$out" 2>&1
    ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" >>"$out" 2>&1 || failed ceph-mon --mkfs
    ceph-mon -c "$conf" -i a >>"$out" 2>&1 || failed ceph-mon
    phase "monitor up"

    uuid=$(cat /proc/sys/kernel/random/uuid)
    ceph -c "$conf" --connect-timeout 30 osd new "$uuid" >>"$out" 2>&1 ||
        die "the monitor did not take an OSD; see $dir/log"
    ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$uuid" >>"$out" 2>&1 || failed ceph-osd --mkfs
    ceph-osd -c "$conf" -i 0 >>"$out" 2>&1 || failed ceph-osd
    phase "osd started"

    radosgw -c "$conf" -n client.rgw >>"$out" 2>&1 || failed radosgw
    # Makes the gateway's pools too, so it is quick once the OSD is up.
    keys=$(make_user owner)
    phase "owner user made"
    local endpoint="http://127.0.0.1:$rgw_port"
    local up=0
    for _ in $(seq 1 300); do
        if curl -fs -o /dev/null "$endpoint"; then
            up=1
            break
        fi
        pid_alive "$dir/run/client.rgw.pid" || die "radosgw exited; see $dir/log/client.rgw.log"
        sleep 0.1
    done
    [ "$up" = 1 ] || die "radosgw did not answer on $endpoint within 30 s; see $dir/log"
    phase "radosgw answers"

    cat >"$dir/env" <<EOF
export AWS_ENDPOINT_URL=$endpoint
export AWS_ACCESS_KEY_ID=${keys% *}
export AWS_SECRET_ACCESS_KEY=${keys#* }
export AWS_REGION=us-east-1
EOF
    load_env
    local bucket
    bucket=$(make_bucket lock)
    echo "export BULWARK_LOCK_BUCKET=$bucket" >>"$dir/env"

    if [ -n "$owner_pid" ]; then
        # Stops everything and removes DIR once the owner is gone; holds
        # none of our pipes.
        (
            while proc_alive "$owner_pid"; do sleep 1; done
            rm -f "$dir/run/watchdog.pid"
            "$self" stop "$dir"
            rm -rf "$dir"
        ) </dev/null >/dev/null 2>&1 &
        echo $! >"$dir/run/watchdog.pid"
    fi
    cat "$dir/env"
    phase "ready"
}

case "$cmd" in
    start) start "$@" ;;
    stop) stop_all ;;
    bucket)
        load_env
        case "${1:-}" in
            "") make_bucket lock ;;
            --no-lock) make_bucket no-lock ;;
            *) usage ;;
        esac
        ;;
    user)
        [ $# -eq 1 ] || usage
        keys=$(make_user "$1")
        printf 'export AWS_ACCESS_KEY_ID=%s\nexport AWS_SECRET_ACCESS_KEY=%s\n' "${keys% *}" "${keys#* }"
        ;;
    policy)
        [ $# -eq 2 ] || usage
        load_env
        owner_curl -X PUT --data-binary "@$2" -o /dev/null "$AWS_ENDPOINT_URL/$1?policy=" ||
            die "setting the policy of bucket $1 failed"
        ;;
    *) usage ;;
esac
