#!/usr/bin/env bash
# Lock extension at scale: API requests and time of one extension pass over
# N objects (default 100000) on radosgw (scripts/s3-lock-server.sh, started
# and stopped by the example itself), after writing them locked.
# Usage: scripts/bench-lock-extend.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run -q -p bulwark-store --example lock_extend -- "${1:-100000}"
