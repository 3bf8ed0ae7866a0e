#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what is missing, then checks
# formatting and lints, runs every unit and integration test (real nginx, real etcd), and
# runs the benchmark harness once in quick mode.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# No known-vulnerable dependency: Cargo.lock against the RustSec snapshot beside the clone
# (no network). Exceptions, each with its reason, are listed in the README's Development.
cargo audit --db "${ADVISORY_DB:-../shared/advisory-db}" --no-fetch --stale
cargo test --all-targets --locked
# The benchmark harness end to end (real nginx, etcd, stand-ins), tiny sizes, from the debug
# build the tests just made: it fails only if the harness itself breaks, never on a timing.
# Its report goes to bench-out/ (not committed).
bash scripts/bench.sh --quick --debug-build
