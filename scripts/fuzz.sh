#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers and the renderer with cargo-fuzz (libFuzzer), one
# target after another, each for SECONDS (default 300).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     # targets: config_parse etcd_entry consul_answer render
#
# Needs a nightly toolchain (`rustup toolchain install nightly`) and cargo-fuzz
# (`cargo install cargo-fuzz`). The corpus grows in fuzz/corpus/TARGET and the log goes to fuzz/logs/TARGET.log (not committed; the
# hand-written seeds are in fuzz/seeds/TARGET). A crash lands in fuzz/artifacts/TARGET/;
# minimise it with `cargo +nightly fuzz tmin TARGET FILE` (in fuzz/) and turn it into a
# regression test beside the code it broke. Each target checks the rendered file against
# tests/support/shape.rs, so "crash" includes "a registry string shaped the file".
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-300}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(config_parse etcd_entry consul_answer render)

declare -A dict=([config_parse]=dicts/config.dict [consul_answer]=dicts/consul.dict)

cargo +nightly fuzz build -O
mkdir -p logs
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    extra=()
    [ -n "${dict[$t]:-}" ] && extra=("-dict=${dict[$t]}")
    echo "== $t for ${seconds}s"
    cargo +nightly fuzz run -O "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$seconds" -max_len=4096 -rss_limit_mb=2048 -print_final_stats=1 \
        "${extra[@]}" 2>&1 | tee "logs/$t.log" | grep -E '^(#[0-9]+ +DONE|stat::|==[0-9]+==|SUMMARY|Done)' || true
    if ls "artifacts/$t"/crash-* "artifacts/$t"/leak-* "artifacts/$t"/timeout-* >/dev/null 2>&1; then
        echo "!! $t: findings in fuzz/artifacts/$t/" >&2
    fi
done
