//! Render+diff micro benchmark: `decide` + `Renderer::render` + a byte compare for 1,000 and
//! 10,000 servers, median over N runs. `cargo bench --bench render` (`-- --runs N`).
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it renders each size once, as a
//! smoke test, and prints no timings.

#[path = "scenarios/render_timing.rs"]
mod render_timing;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bench = args.iter().any(|a| a == "--bench");
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse::<usize>().expect("--runs takes a number"))
        .unwrap_or(51);
    let scratch =
        std::env::temp_dir().join(format!("upstreamd-render-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("a scratch directory");
    if !bench {
        for n in [1_000, 10_000] {
            let t = render_timing::time_render(n, 1, &scratch);
            assert!(
                t.bytes > n * 20,
                "{n} servers rendered into {} bytes",
                t.bytes
            );
        }
        println!("render bench: smoke test passed (run `cargo bench --bench render` for timings)");
    } else {
        println!(
            "{:>7} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "servers", "runs", "bytes", "decide", "render", "compare", "total", "max", "read"
        );
        for n in [1_000, 10_000] {
            let t = render_timing::time_render(n, runs, &scratch);
            println!(
                "{:>7} {:>5} {:>9} {:>7.3}ms {:>7.3}ms {:>7.3}ms {:>7.3}ms {:>7.3}ms {:>7.3}ms",
                t.servers,
                t.runs,
                t.bytes,
                t.decide_ms,
                t.render_ms,
                t.compare_ms,
                t.total_ms,
                t.max_total_ms,
                t.read_file_ms
            );
        }
    }
    // A leftover scratch directory in the temp dir is harmless; say so if it stays.
    if let Err(e) = std::fs::remove_dir_all(&scratch) {
        eprintln!("could not remove `{}`: {e}", scratch.display());
    }
}
