#!/usr/bin/env bash
# Installs what upstreamd's build, tests, demo and benchmarks need on Debian 12, if missing.
# (systemd: only for `systemd-analyze`, which tests/deploy.rs runs on the unit file.)
# Runs `apt-get update` once, and only when something is missing.
set -euo pipefail
pkgs=(build-essential nginx etcd-server etcd-client haproxy protobuf-compiler libprotobuf-dev libssl-dev pkg-config docker-compose systemd chromium wrk curl)
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
command -v cargo-audit >/dev/null || cargo install --locked cargo-audit
# `cargo deb` builds the .deb (docs/operations.md, tests/container_deb.rs). Pinned: the test
# packages the debug build with `--profile dev`, which cargo-deb 3.8 warns it may refuse later.
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb --version 3.8.0
