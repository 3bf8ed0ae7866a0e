#!/usr/bin/env bash
# Installs what upstreamd needs on Debian 12, if missing: the packages listed in
# scripts/deps/build.txt (building) and scripts/deps/test.txt (tests, demo, benchmarks, CI).
#   install-deps.sh          both lists
#   install-deps.sh build    the build list only (the Dockerfile's build stage)
# Runs `apt-get update` once, and only when something is missing. Recommends are not
# installed: every package a fresh machine needs is in the lists, by name.
set -euo pipefail
deps="$(dirname "$0")/deps"
lists=("$deps/build.txt" "$deps/test.txt")
case ${1:-all} in
  all) ;;
  build) lists=("$deps/build.txt") ;;
  *) echo "install-deps.sh: unknown argument: $1 (all | build)" >&2; exit 2 ;;
esac
mapfile -t pkgs < <(sed 's/#.*//' "${lists[@]}" | tr -s ' \t' '\n' | grep .)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)"; exit 1; }
[ "${1:-all}" = all ] || exit 0
# `cargo audit` checks Cargo.lock against the RustSec snapshot (scripts/test.sh).
command -v cargo-audit >/dev/null || cargo install --locked cargo-audit
# `cargo deb` builds the .deb (docs/operations.md, tests/it/container_deb.rs). Pinned: the test
# packages the debug build with `--profile dev`, which cargo-deb 3.8 warns it may refuse later.
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb --version 3.8.0
