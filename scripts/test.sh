#!/usr/bin/env bash
# Sets up this machine (idempotently) and runs every check and test.
# Usage: scripts/test.sh            (from a fresh Debian 12 machine, as root)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-rust.sh
if [ -x scripts/setup-test-host.sh ]; then
    scripts/setup-test-host.sh
fi
# The S3 test server (s3s-fs), built once into target/tools.
scripts/setup-s3.sh >/dev/null
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
# CI and test hosts are dedicated: let the test that restarts libvirtd (one
# this script started) run there.
if [ "${CI:-}" = true ]; then export BULWARK_TEST_RESTART_LIBVIRTD=1; fi
echo "== cargo test"
cargo test --workspace --no-fail-fast 2>&1 | tee target/test.log
# One plain closing line: tests counted over every test binary.
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "%d passed, %d failed, %d skipped\n", p, f, i }' target/test.log
