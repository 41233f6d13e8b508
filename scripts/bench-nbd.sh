#!/usr/bin/env bash
# nbdcopy reading a 1 GiB mixed image over a Unix socket: from bulwark-nbd
# (a snapshot in a local repository; cold = fresh server, warm = second
# pass on the same server, with a cache that holds the image and with the
# default one that does not) vs qemu-nbd serving the same raw file from the
# page cache (best of three); then the
# same warm export over loopback TCP in plain text and inside TLS
# (NBD_OPT_STARTTLS, one server with --tls allow serving both).
# Usage: scripts/bench-nbd.sh [WORKDIR]   (BIN=DIR: binaries to measure,
# e.g. an older build, instead of this tree's release build)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${BIN:-}" ]; then
    . scripts/ensure-rust.sh
    cargo build --release -q -p bulwark -p bulwark-nbd
    BIN=$PWD/target/release
fi
# Test certificates (rcgen, the tests' PKI): examples are not in BIN.
cargo build --release -q -p nbd-server --example tls_certs
TLS_CERTS=$PWD/target/release/examples/tls_certs
W=${1:-/tmp/bulwark-bench-nbd}; mkdir -p "$W"
export BULWARK_REPO=$W/repo BULWARK_PASSWORD=bench
scripts/mixed-image.sh "$W/mixed.raw" 1024
if [ ! -e "$W/repo/config" ]; then
    "$BIN/bulwark" repo init >/dev/null
    "$BIN/bulwark" backup image "$W/mixed.raw" --source mixed >/dev/null
fi
t() { local s e; s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); echo "$e - $s" | bc; }
rate() { echo "scale=0; 1024 / $1" | bc; }

rm -f "$W/q.sock"
qemu-nbd -r -f raw -t --socket "$W/q.sock" -x vda "$W/mixed.raw" & QPID=$!
while [ ! -S "$W/q.sock" ]; do sleep 0.05; done
nbdcopy "nbd+unix:///vda?socket=$W/q.sock" null: # page cache warm
# The peer at its best: the fastest of three warm passes.
q=$(t nbdcopy "nbd+unix:///vda?socket=$W/q.sock" null:)
for _ in 2 3; do
    q2=$(t nbdcopy "nbd+unix:///vda?socket=$W/q.sock" null:)
    q=$(echo "if ($q2 < $q) $q2 else $q" | bc)
done
kill $QPID; wait $QPID 2>/dev/null || true

rm -f "$W/b.sock"
coproc B { exec "$BIN/bulwark-nbd" serve --snapshot mixed@latest --socket "$W/b.sock" --cache-mib 2048 2>/dev/null; }
read -r _ <&"${B[0]}"
cold=$(t nbdcopy "nbd+unix:///vda?socket=$W/b.sock" null:)
warm=$(t nbdcopy "nbd+unix:///vda?socket=$W/b.sock" null:)
kill "$B_PID"; wait "$B_PID" 2>/dev/null || true
# Default options (a local repository: cache 128 MiB, smaller than the image's data): a first
# and a second pass, as a user meets them.
rm -f "$W/d.sock"
coproc D { exec "$BIN/bulwark-nbd" serve --snapshot mixed@latest --socket "$W/d.sock" 2>/dev/null; }
read -r _ <&"${D[0]}"
dfirst=$(t nbdcopy "nbd+unix:///vda?socket=$W/d.sock" null:)
dsecond=$(t nbdcopy "nbd+unix:///vda?socket=$W/d.sock" null:)
kill "$D_PID"; wait "$D_PID" 2>/dev/null || true

# Plain vs TLS on one warm export: loopback TCP, the same server process.
rm -rf "$W/pki"; "$TLS_CERTS" "$W/pki" >/dev/null
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
coproc T { exec "$BIN/bulwark-nbd" serve --snapshot mixed@latest --listen "127.0.0.1:$PORT" --tls-creds "$W/pki/server" --tls allow --cache-mib 2048 2>/dev/null; }
read -r _ <&"${T[0]}"
PLAIN_URI="nbd://127.0.0.1:$PORT/vda"
TLS_URI="nbds://127.0.0.1:$PORT/vda?tls-certificates=$W/pki/client"
nbdcopy "$PLAIN_URI" null: # warm the cache
tcp_plain=$(t nbdcopy "$PLAIN_URI" null:)
tcp_tls=$(t nbdcopy "$TLS_URI" null:)
tcp_plain2=$(t nbdcopy "$PLAIN_URI" null:)
tcp_tls2=$(t nbdcopy "$TLS_URI" null:)
kill "$T_PID"; wait "$T_PID" 2>/dev/null || true
best() { echo "if ($1 < $2) $1 else $2" | bc; }
tcp_plain=$(best "$tcp_plain" "$tcp_plain2"); tcp_tls=$(best "$tcp_tls" "$tcp_tls2")
# Fresh process, repository files in the page cache (as the export row).
rm -f "$W/r.raw"
rlocal=$(t "$BIN/bulwark" restore image mixed@latest --to "$W/r.raw" --force)
printf '%-31s %8s s %8s MiB/s\n' "qemu-nbd (raw file, warm)" "$q" "$(rate "$q")"
printf '%-31s %8s s %8s MiB/s  %s x qemu-nbd\n' "bulwark restore image, local" "$rlocal" "$(rate "$rlocal")" "$(echo "scale=2; $q / $rlocal" | bc)"
printf '%-31s %8s s %8s MiB/s  %s x qemu-nbd\n' "bulwark-nbd cold (cache 2 GiB)" "$cold" "$(rate "$cold")" "$(echo "scale=2; $q / $cold" | bc)"
printf '%-31s %8s s %8s MiB/s  %s x qemu-nbd\n' "bulwark-nbd warm (cache 2 GiB)" "$warm" "$(rate "$warm")" "$(echo "scale=2; $q / $warm" | bc)"
printf '%-31s %8s s %8s MiB/s  %s x qemu-nbd\n' "bulwark-nbd default, 1st" "$dfirst" "$(rate "$dfirst")" "$(echo "scale=2; $q / $dfirst" | bc)"
printf '%-31s %8s s %8s MiB/s  %s x qemu-nbd\n' "bulwark-nbd default, 2nd" "$dsecond" "$(rate "$dsecond")" "$(echo "scale=2; $q / $dsecond" | bc)"
printf '%-31s %8s s %8s MiB/s\n' "bulwark-nbd warm, TCP plain" "$tcp_plain" "$(rate "$tcp_plain")"
printf '%-31s %8s s %8s MiB/s  %s x plain\n' "bulwark-nbd warm, TCP TLS" "$tcp_tls" "$(rate "$tcp_tls")" "$(echo "scale=2; $tcp_plain / $tcp_tls" | bc)"

# Cold from S3: the same image in a bucket on a loopback s3s-fs
# (scripts/setup-s3.sh installs it), read once by a fresh server.
S3S_FS=$PWD/target/tools/bin/s3s-fs
if [ -x "$S3S_FS" ]; then
    PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    export AWS_ACCESS_KEY_ID=AKNBDBENCH AWS_SECRET_ACCESS_KEY=nbdbenchsecret AWS_REGION=us-east-1
    export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null
    rm -rf "$W/s3"; mkdir -p "$W/s3/bench"
    "$S3S_FS" --host 127.0.0.1 --port "$PORT" --access-key "$AWS_ACCESS_KEY_ID" \
        --secret-key "$AWS_SECRET_ACCESS_KEY" "$W/s3" >"$W/s3s.log" 2>&1 & S3PID=$!
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done
    export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT BULWARK_REPO=s3://bench/nbd
    "$BIN/bulwark" --no-cache repo init >/dev/null
    "$BIN/bulwark" --no-cache backup image "$W/mixed.raw" --source mixed >/dev/null
    rm -f "$W/s.sock"
    # Default options (an S3 repository: cache 512 MiB), as a user meets them.
    coproc S { exec env BULWARK_LOG=info "$BIN/bulwark-nbd" serve --repo s3://bench/nbd --snapshot mixed@latest --socket "$W/s.sock" 2>"$W/nbd-s3.log"; }
    read -r _ <&"${S[0]}"
    s3cold=$(t nbdcopy "nbd+unix:///vda?socket=$W/s.sock" null:)
    kill "$S_PID"; wait "$S_PID" 2>/dev/null || true
    rm -f "$W/r.raw"
    s3restore=$(t "$BIN/bulwark" --no-cache restore image mixed@latest --to "$W/r.raw" --force)
    stored=$(du -sb "$W/s3/bench/nbd/data" | cut -f1)
    kill $S3PID; wait $S3PID 2>/dev/null || true
    printf '%-31s %8s s %8s MiB/s  %s x qemu-nbd\n' "bulwark-nbd cold, S3" "$s3cold" "$(rate "$s3cold")" "$(echo "scale=2; $q / $s3cold" | bc)"
    printf '%-31s %8s s %8s MiB/s  %s x qemu-nbd\n' "bulwark restore image, S3" "$s3restore" "$(rate "$s3restore")" "$(echo "scale=2; $q / $s3restore" | bc)"
    fetched=$(sed -n 's/.*fetched \([0-9]*\) B.*/\1/p' "$W/nbd-s3.log" | head -1)
    [ -n "$fetched" ] && echo "bulwark-nbd S3: fetched $fetched B for $stored B of packs ($(echo "scale=3; $fetched / $stored" | bc) x)"
fi
