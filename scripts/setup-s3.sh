#!/usr/bin/env bash
# Installs the S3 test server (s3s-fs, a real S3 implementation on a local
# directory) into target/tools/bin, once: skipped when it is there already.
# Also makes sure Debian's restic is there for scripts/bench-s3.sh when
# BULWARK_BENCH=1. Safe to run from several processes at once (flock).
# Usage: scripts/setup-s3.sh    (prints the s3s-fs path)
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/target/tools"
BIN="$TOOLS/bin/s3s-fs"
# 0.14.1: the newest release that builds with this project's toolchain.
VERSION="${S3S_FS_VERSION:-0.14.1}"
mkdir -p "$TOOLS"
exec 9>"$TOOLS/.s3s-fs.lock"
flock 9
if [ ! -x "$BIN" ]; then
    echo "installing s3s-fs $VERSION into $TOOLS (about 2 minutes, once)" >&2
    cargo install "s3s-fs@$VERSION" --features binary --locked --root "$TOOLS" >&2
fi
if [ "${BULWARK_BENCH:-0}" = 1 ] && ! command -v restic >/dev/null; then
    apt-get install -y restic >&2 || { apt-get update >&2 && apt-get install -y restic >&2; }
fi
echo "$BIN"
