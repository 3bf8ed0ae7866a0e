//! Scenario 5: 1,000 and 10,000 endpoints probed every second. One private nginx listening
//! on that many ports of 127.0.77.1 stands in for the fleet (`/queue/status` answers like
//! Kotaemon's); upstreamd keeps the include of a second nginx. Measured in steady state:
//! upstreamd's CPU share and RSS, probes per second, renders and reloads (there should be
//! none); and for the file: render+diff, `nginx -t` and reload times. Its peers
//! ([`crate::probe_cost`]: HAProxy, a baseline upstreamd) check the same fleet over the same
//! window.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::env::{front_conf, placeholder, upstreamd_toml, Balance, Env, Source};
use crate::probe_cost::{PeerCost, Peers};
use crate::procs::{self, Nginx, Upstreamd};
use crate::render_timing::{time_render, RenderTiming};
use crate::stats::{percentile, sorted};

/// The fleet's address and first port.
pub const FLEET_IP: &str = "127.0.77.1";
pub const FLEET_FIRST_PORT: u16 = 20_000;
/// Ports per fleet nginx: each worker holds a listening socket per port and a connection per
/// probed endpoint and prober (upstreamd, its baseline; HAProxy's are short-lived), and the
/// open-file limit here may not be raised above 20,000.
const PORTS_PER_FLEET_NGINX: usize = 5_000;

#[derive(Debug, Clone, Serialize)]
pub struct ScaleResult {
    pub endpoints: usize,
    /// From start to the first file applied (every first probe in, rendered, tested, reloaded).
    pub ready_s: f64,
    pub window_s: f64,
    /// upstreamd's CPU time over the window, as a share of one core.
    pub cpu_share: f64,
    pub rss_mib_max: f64,
    pub rss_mib_mean: f64,
    pub open_fds: usize,
    pub probes_per_s: f64,
    /// Share of those probes that passed.
    pub probes_ok_share: f64,
    /// Endpoints upstreamd reports healthy at the end of the window.
    pub healthy: f64,
    pub renders_in_window: f64,
    pub reloads_in_window: usize,
    /// The fleet nginx's CPU share over the window (it answers every probe).
    pub fleet_cpu_share: f64,
    pub file_bytes: usize,
    /// `nginx -t` of the front nginx with this file: median of 5.
    pub nginx_test_ms: f64,
    /// SIGHUP to a new worker generation: median of 3.
    pub reload_ms: f64,
    /// upstreamd's own apply (write, `nginx -t`, SIGHUP, new generation confirmed), mean.
    pub apply_ms: f64,
    pub render: RenderTiming,
    /// HAProxy and the baseline upstreamd over the same window.
    pub peers: Vec<PeerCost>,
}

/// A fleet nginx answering on `ports` of [`FLEET_IP`].
fn fleet_conf(ports: std::ops::Range<usize>, ctl_port: u16) -> String {
    let user = if procs::is_root() { "user root;" } else { "" };
    let n = ports.len();
    let mut listens = String::new();
    for port in ports {
        listens.push_str(&format!("    listen {FLEET_IP}:{port};\n"));
    }
    format!(
        "{user}\nworker_processes 1;\npid logs/nginx.pid;\nerror_log logs/error.log warn;\n\
         events {{ worker_connections {conns}; }}\n\
         http {{\n  access_log off;\n  keepalive_timeout 300s;\n  keepalive_requests 1000000;\n\
         client_body_temp_path tmp/client;\n  proxy_temp_path tmp/proxy;\n  fastcgi_temp_path tmp/fastcgi;\n  \
         uwsgi_temp_path tmp/uwsgi;\n  scgi_temp_path tmp/scgi;\n\
         server {{\n    listen 127.0.0.1:{ctl_port};\n{listens}\
         location = /queue/status {{\n      default_type application/json;\n      \
         return 200 '{{\"msg\":\"estimation\",\"event_id\":null,\"rank\":null,\"queue_size\":0,\"rank_eta\":null}}';\n    }}\n    \
         location / {{ return 404 '{{\"detail\":\"Not Found\"}}'; }}\n  }}\n}}\n",
        conns = 3 * n + 2048,
    )
}

/// The front nginx (sticky, its include owned by upstreamd) in a new work dir named after
/// `label`, and the upstreamd config over the static list `addrs`: (nginx, config, admin
/// address, work dir). The scale run and its baseline peer start the same front.
pub async fn start_front(
    env: &mut Env,
    label: &str,
    addrs: &[String],
) -> Result<(Nginx, String, String, PathBuf)> {
    let dir = env.dir(&format!("scale-{label}-front"))?;
    let port = procs::free_port("127.0.0.1")?;
    let (conf, site) = front_conf(port, Balance::Sticky, 1, None)?;
    std::fs::create_dir_all(dir.join("conf"))?;
    std::fs::write(dir.join("conf/site.conf"), site)?;
    let front = Nginx::start(
        &format!("nginx-scale-{label}"),
        &dir,
        port,
        &conf,
        &placeholder(Balance::Sticky),
        &env.logs,
    )
    .await?;
    let admin = format!("127.0.0.1:{}", procs::free_port("127.0.0.1")?);
    let toml = upstreamd_toml(
        &front,
        &admin,
        Balance::Sticky,
        "250ms",
        "2s",
        &Source::Static(addrs),
        false,
    );
    Ok((front, toml, admin, dir))
}

pub async fn run(env: &mut Env, n: usize) -> Result<ScaleResult> {
    let plan = env.plan.clone();
    crate::probe_cost::wait_for_conntrack().await;
    // The fleet.
    let mut fleet = Vec::new();
    let first = FLEET_FIRST_PORT as usize;
    for (k, from) in (first..first + n)
        .step_by(PORTS_PER_FLEET_NGINX)
        .enumerate()
    {
        let ports = from..(from + PORTS_PER_FLEET_NGINX).min(first + n);
        let dir = env.dir(&format!("scale-{n}-fleet-{k}"))?;
        let ctl = procs::free_port("127.0.0.1")?;
        fleet.push(
            Nginx::start(
                &format!("nginx-fleet-{n}-{k}"),
                &dir,
                ctl,
                &fleet_conf(ports, ctl),
                "",
                &env.logs,
            )
            .await?,
        );
    }
    let addrs: Vec<String> = (0..n)
        .map(|i| format!("{FLEET_IP}:{}", FLEET_FIRST_PORT as usize + i))
        .collect();

    // The front nginx whose include upstreamd owns.
    let (front, toml, admin, dir) = start_front(env, &format!("{n}"), &addrs).await?;
    let started = Instant::now();
    let mut u = Upstreamd::start(
        &env.bins,
        &format!("upstreamd-scale-{n}"),
        &toml,
        &admin,
        &dir,
        &env.logs,
    )?;
    u.wait_ready(Duration::from_secs(90)).await?;
    let ready_s = started.elapsed().as_secs_f64();
    let mut running_peers = Peers::start(env, &addrs).await?;
    let peer_pids = running_peers.pids();
    tokio::time::sleep(Duration::from_secs_f64(plan.scale_warmup_s)).await;

    // Steady state.
    let pid = u.pid();
    let fleet_workers: Vec<i32> = fleet
        .iter()
        .filter_map(|f| f.master())
        .flat_map(procs::children)
        .map(|(p, _)| p)
        .collect();
    let fleet_ticks =
        || -> Option<u64> { fleet_workers.iter().map(|p| procs::cpu_ticks(*p)).sum() };
    let ticks = procs::clock_ticks();
    let (cpu0, fleet0) = (procs::cpu_ticks(pid), fleet_ticks());
    let peer_cpu0: Vec<Option<u64>> = peer_pids
        .iter()
        .map(|(_, p)| procs::cpu_ticks(*p))
        .collect();
    let mut peer_rss = vec![0.0f64; peer_pids.len()];
    let probes0 = u.metric("upstreamd_probes_total").await?;
    let ok0 = u
        .metric_where("upstreamd_probes_total", "result=\"ok\"")
        .await?;
    let renders0 = u.metric("upstreamd_renders_total").await?;
    let reloads0 = front.reloads();
    let t0 = Instant::now();
    let mut rss = Vec::new();
    while t0.elapsed().as_secs_f64() < plan.scale_window_s {
        if let Some(kib) = procs::rss_kib(pid) {
            rss.push(kib as f64 / 1024.0);
        }
        for ((_, p), max) in peer_pids.iter().zip(&mut peer_rss) {
            if let Some(kib) = procs::rss_kib(*p) {
                *max = max.max(kib as f64 / 1024.0);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let window = t0.elapsed().as_secs_f64();
    let (cpu1, fleet1) = (procs::cpu_ticks(pid), fleet_ticks());
    let peer_cpu1: Vec<Option<u64>> = peer_pids
        .iter()
        .map(|(_, p)| procs::cpu_ticks(*p))
        .collect();
    let peer_up = running_peers.up().await?;
    let probes = u.metric("upstreamd_probes_total").await? - probes0;
    let ok = u
        .metric_where("upstreamd_probes_total", "result=\"ok\"")
        .await?
        - ok0;
    let renders = u.metric("upstreamd_renders_total").await? - renders0;
    let reloads = front.reloads() - reloads0;
    let healthy = u
        .metric_where("upstreamd_endpoints", "state=\"healthy\"")
        .await?;
    let open_fds = procs::fd_count(pid).unwrap_or(0);
    let apply_sum = u.metric("upstreamd_reload_duration_seconds_sum").await?;
    let apply_count = u.metric("upstreamd_reload_duration_seconds_count").await?;
    if !u.running() {
        bail!("upstreamd exited during the scale run:\n{}", u.tail(30));
    }
    let share = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => (b - a) as f64 / ticks / window,
        _ => f64::NAN,
    };

    let peers: Vec<PeerCost> = peer_pids
        .iter()
        .enumerate()
        .map(|(i, (name, _))| PeerCost {
            peer: name.clone(),
            cpu_share: share(peer_cpu0[i], peer_cpu1[i]),
            rss_mib_max: peer_rss[i],
            up: peer_up[i],
        })
        .collect();
    // Stopped before timing the file, so they do not share the CPU with `nginx -t`.
    drop(running_peers);

    // The file's own costs, with upstreamd stopped so it does not react to our reloads.
    u.stop();
    let file_bytes = std::fs::metadata(front.output())
        .map(|m| m.len() as usize)
        .unwrap_or(0);
    let mut tests = Vec::new();
    for _ in 0..5 {
        tests.push(front.time_test()?.as_secs_f64() * 1000.0);
    }
    let mut reload_times = Vec::new();
    for _ in 0..3 {
        reload_times.push(front.time_reload().await?.as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let scratch = env.dir(&format!("scale-{n}-render"))?;
    let render = time_render(n, plan.render_runs, &scratch);
    drop(fleet);
    Ok(ScaleResult {
        endpoints: n,
        ready_s,
        window_s: window,
        cpu_share: share(cpu0, cpu1),
        rss_mib_max: rss.iter().copied().fold(0.0, f64::max),
        rss_mib_mean: rss.iter().sum::<f64>() / rss.len().max(1) as f64,
        open_fds,
        probes_per_s: probes / window,
        probes_ok_share: if probes > 0.0 { ok / probes } else { 0.0 },
        healthy,
        renders_in_window: renders,
        reloads_in_window: reloads,
        fleet_cpu_share: share(fleet0, fleet1),
        file_bytes,
        nginx_test_ms: percentile(&sorted(tests), 50.0),
        reload_ms: percentile(&sorted(reload_times), 50.0),
        apply_ms: if apply_count > 0.0 {
            apply_sum / apply_count * 1000.0
        } else {
            f64::NAN
        },
        render,
        peers,
    })
}
