#!/usr/bin/env bash
# Makes sure a Rust toolchain (cargo, rustc >= 1.85) is on PATH.
set -euo pipefail
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
if ! command -v cargo >/dev/null 2>&1; then
    echo "== installing Rust with rustup"
    export DEBIAN_FRONTEND=noninteractive
    command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl ca-certificates; }
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
    . "$HOME/.cargo/env"
fi
# The store's build needs a C compiler (zstd, ring).
if ! command -v cc >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential
fi
