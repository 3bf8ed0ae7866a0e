//! Render+diff timing: what the controller does on every wake-up, for N servers, median over
//! runs. Shared by `benches/render.rs` and the scenario harness (`benches/scenarios/`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use upstreamd::config::UpstreamConfig;
use upstreamd::decide::{decide, Desired};
use upstreamd::health::Health;
use upstreamd::model::{Address, Endpoint};
use upstreamd::render::Renderer;

/// Medians of one size, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct RenderTiming {
    pub servers: usize,
    pub runs: usize,
    /// The rendered file's size.
    pub bytes: usize,
    /// `decide` (membership from registry entries and probe verdicts).
    pub decide_ms: f64,
    /// Cloning the decided upstreams into the renderer's input and rendering the template.
    pub render_ms: f64,
    /// Comparing the new bytes with the previous ones (equal: the steady state's full scan).
    pub compare_ms: f64,
    /// decide + render + compare, timed as one (the median of the sums, not the sum of medians).
    pub total_ms: f64,
    /// Reading the current file from disk, which the controller does before comparing.
    pub read_file_ms: f64,
    /// The slowest total.
    pub max_total_ms: f64,
}

/// The upstream of the Kotaemon example: sticky, health on `/queue/status`.
pub fn upstream_config() -> UpstreamConfig {
    let text = r#"
[nginx]
output = "/nonexistent/upstreams.conf"

[[upstream]]
name = "kotaemon"
balance = "sticky"
affinity_cookie = "kh_affinity"

[upstream.health]
path = "/queue/status"

[[upstream.source]]
kind = "static"
servers = ["127.0.0.1:7860"]
"#;
    let config = upstreamd::config::parse(text, &|_| None).expect("the bench config parses");
    config.upstreams.into_iter().next().expect("one upstream")
}

/// `n` endpoints on 10.x addresses, every tenth with a weight.
pub fn endpoints(n: usize) -> BTreeMap<Address, Endpoint> {
    (0..n)
        .map(|i| {
            let host = format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256);
            let address = Address::from_parts(&host, 7860).expect("a valid address");
            let mut endpoint = Endpoint::plain(address.clone(), format!("bench {i}"));
            if i % 10 == 0 {
                endpoint.attrs.weight = Some(2);
            }
            (address, endpoint)
        })
        .collect()
}

/// Every 20th endpoint fails its probe.
fn health(address: &Address) -> Health {
    if address.to_string().ends_with(".7:7860") {
        Health::Down
    } else {
        Health::Up
    }
}

fn decide_all(cfg: &UpstreamConfig, eps: &BTreeMap<Address, Endpoint>) -> Vec<Desired> {
    vec![decide(cfg, eps, health)]
}

fn render_all(renderer: &Renderer, cfg: &UpstreamConfig, desired: &[Desired]) -> String {
    // As the controller does: the decided upstreams are cloned into the renderer's input.
    let pairs: Vec<_> = desired
        .iter()
        .cloned()
        .map(|d| (d, cfg.on_all_unhealthy))
        .collect();
    renderer
        .render(&pairs)
        .expect("the built-in template renders")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times decide + render + compare for `n` servers, `runs` times (at least 1), and a read of
/// the file from `scratch` (a directory to write it in).
pub fn time_render(n: usize, runs: usize, scratch: &Path) -> RenderTiming {
    let runs = runs.max(1);
    let cfg = upstream_config();
    let eps = endpoints(n);
    let renderer = Renderer::new(None).expect("the built-in template compiles");
    let previous = render_all(&renderer, &cfg, &decide_all(&cfg, &eps));
    let file = scratch.join(format!("render-{n}.conf"));
    std::fs::write(&file, &previous).expect("the scratch file is writable");

    let (mut decide_t, mut render_t, mut compare_t, mut total_t, mut read_t) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let t0 = Instant::now();
        let desired = decide_all(&cfg, &eps);
        let t1 = Instant::now();
        let text = render_all(&renderer, &cfg, &desired);
        let t2 = Instant::now();
        let changed = std::hint::black_box(text.as_bytes()) != previous.as_bytes();
        let t3 = Instant::now();
        assert!(!changed, "equal membership renders equal bytes");
        decide_t.push(ms(t1 - t0));
        render_t.push(ms(t2 - t1));
        compare_t.push(ms(t3 - t2));
        total_t.push(ms(t3 - t0));

        let t4 = Instant::now();
        let on_disk = upstreamd::nginx::read_current(&file).expect("the scratch file reads");
        read_t.push(ms(t4.elapsed()));
        assert_eq!(on_disk.as_deref(), Some(previous.as_bytes()));
    }
    let max_total_ms = total_t.iter().copied().fold(0.0, f64::max);
    RenderTiming {
        servers: n,
        runs,
        bytes: previous.len(),
        decide_ms: median(decide_t),
        render_ms: median(render_t),
        compare_ms: median(compare_t),
        total_ms: median(total_t),
        read_file_ms: median(read_t),
        max_total_ms,
    }
}
