#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers and the renderer with cargo-fuzz (libFuzzer), one
# target after another, each for SECONDS (default 300).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     # targets: config_parse etcd_entry consul_answer render error_log_line
#
# Needs a nightly toolchain (`rustup toolchain install nightly`) and cargo-fuzz
# (`cargo install cargo-fuzz`). The targets are built once, then run one at a time on one
# core. The corpus grows in fuzz/corpus/TARGET and each run's log goes to fuzz/logs/TARGET.log
# (neither is committed; the hand-written seeds are in fuzz/seeds/TARGET). A crash lands in
# fuzz/artifacts/TARGET/; minimise it with `cargo +nightly fuzz tmin -O TARGET FILE` (in
# fuzz/) and turn it into a regression test beside the code it broke. Each target checks the
# rendered file against tests/it/util/shape.rs, so "crash" includes "a registry string
# shaped the file".
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-300}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(config_parse etcd_entry consul_answer render error_log_line)

declare -A dict=([config_parse]=dicts/config.dict [consul_answer]=dicts/consul.dict)

cargo +nightly fuzz build -O
bin="target/$(rustc +nightly -vV | sed -n 's/^host: //p')/release"
mkdir -p logs
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    args=("corpus/$t")
    [ -d "seeds/$t" ] && args+=("seeds/$t")
    [ -n "${dict[$t]:-}" ] && args+=("-dict=${dict[$t]}")
    echo "== $t for ${seconds}s"
    "$bin/$t" -artifact_prefix="artifacts/$t/" -max_total_time="$seconds" -max_len=4096 \
        -rss_limit_mb=2048 -print_final_stats=1 "${args[@]}" 2>&1 | tee "logs/$t.log" |
        grep -E '^(Done|stat::|==[0-9]+==|SUMMARY)' || true
    if ls "artifacts/$t"/crash-* "artifacts/$t"/leak-* "artifacts/$t"/timeout-* "artifacts/$t"/oom-* >/dev/null 2>&1; then
        echo "!! $t: findings in fuzz/artifacts/$t/" >&2
    fi
done
