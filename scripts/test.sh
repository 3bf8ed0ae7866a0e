#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what is missing, then checks
# formatting and lints, and runs every unit and integration test (real nginx, real etcd).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
