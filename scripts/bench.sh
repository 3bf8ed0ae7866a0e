#!/usr/bin/env bash
# The benchmark: builds upstreamd and the stand-ins, starts real nginx, real etcd, the Consul
# stand-in and stand-in Kotaemon replicas on loopback, runs every scenario beside its peers
# (nginx alone, a naive reload loop) and writes the report.
#
# usage: scripts/bench.sh [--quick] [--debug-build] [--only fail,discovery,...] [--keep]
#   (full)         release build; writes BENCHMARKS.md and BENCHMARKS.json at the repo root
#                  (about 10 minutes on 2 cores).
#   --quick        tiny sizes; writes bench-out/BENCHMARKS.md and bench-out/results.json only.
#                  Figures are smoke-level: it checks that the harness works, not timings.
#   --debug-build  run the harness from the debug (test profile) build that
#                  `cargo test --all-targets` already made, instead of a release build (CI).
#   --only, --keep, --lua are passed to the harness (`--keep` keeps the work directory and
#                  logs; `--lua`: the `modes` scenario also runs upstreamd with apply = "lua").
#   UPSTREAMD_BENCH_LOG=<filter> sets the RUST_LOG of every upstreamd the harness starts
#                  (default info), e.g. "upstreamd=debug,info" with --keep to read each push.
# Exits non-zero only when the harness itself breaks, never for a missed target.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --debug-build) profile=debug ;;
    --quick | --keep | --lua) args+=("$1") ;;
    --only | --out) args+=("$1" "$2"); shift ;;
    *) echo "bench.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

for tool in nginx etcd etcdctl curl prlimit; do
  command -v "$tool" >/dev/null || { echo "bench.sh: $tool is missing (scripts/install-deps.sh installs it)" >&2; exit 2; }
done

shown="bash scripts/bench.sh${args[*]:+ ${args[*]}}"
export UPSTREAMD_BENCH_COMMAND="$shown"
start=$(date +%s)
if [ "$profile" = release ]; then
  # The bench profile is the release profile: the binaries the harness starts are optimised.
  cargo bench --locked --bench scenarios -- "${args[@]}"
else
  cargo test --locked --bench scenarios -- --bench "${args[@]}"
fi
echo "bench.sh: done in $(( $(date +%s) - start )) s (build included)"
