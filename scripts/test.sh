#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what is missing, then checks
# formatting and lints, runs every unit and integration test (real nginx, real etcd), and
# runs the benchmark harness once in quick mode. Tests that need a Docker engine
# (the container_* modules of tests/it/) skip when none answers; CI's host stage runs them (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
step() {
  local start=$SECONDS
  "$@"
  echo "test.sh: \`$*\` took $((SECONDS - start)) s"
}
step bash scripts/install-deps.sh
step cargo fmt --all -- --check
step cargo clippy --all-targets --locked -- -D warnings
# No known-vulnerable dependency: Cargo.lock against the RustSec snapshot beside the clone
# (no network). Exceptions, each with its reason, are listed in the README's Development.
step cargo audit --db "${ADVISORY_DB:-../shared/advisory-db}" --no-fetch --stale
step cargo test --all-targets --locked
# The benchmark harness end to end (real nginx, etcd, stand-ins), tiny sizes, from the debug
# build the tests just made: it fails only if the harness itself breaks, never on a timing.
# Its report goes to bench-out/ (not committed).
step bash scripts/bench.sh --quick --debug-build
