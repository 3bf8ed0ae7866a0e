//! Soak: a long churn run through the real daemon and a real nginx, watching the daemon's
//! resident memory and open file descriptors. Ignored by default because it runs for minutes
//! (`UPSTREAMD_SOAK_SECS`, default 180); run it with
//!
//! ```sh
//! UPSTREAMD_SOAK_SECS=600 cargo test --test it soak:: -- --ignored --nocapture
//! ```
//!
//! The churn: a Consul registration added and removed every 150 ms, a replica flapping its
//! health every second (probes every 100 ms, rise = fall = 1), and a SIGHUP config reload every
//! 10 s — each a membership change that nginx reloads for. After a warm-up fifth of the run,
//! RSS and the fd count must stay flat: a leak per change (a task, a connection, a buffer per
//! reload) shows up as steady growth over thousands of changes.

use std::time::{Duration, Instant};

use crate::util::consul::{replica_instance, Lane, Registry, SERVICE};
use crate::util::*;
use nix::sys::signal::Signal;
use serde_json::json;

/// (resident KiB, open fds) of a process.
fn sample(pid: i32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (rss, fds)
}

fn mean(xs: &[u64]) -> f64 {
    xs.iter().sum::<u64>() as f64 / xs.len().max(1) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore = "a soak runs for minutes; run with --ignored (see the module doc)"]
async fn rss_and_open_fds_stay_flat_through_thousands_of_membership_changes() {
    let secs: u64 = std::env::var("UPSTREAMD_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    let reg = Registry::start(Lane::Standin, None).await.unwrap();
    let replicas: Vec<Replica> = (0..4).map(|i| Replica::start(&format!("r{i}"))).collect();
    let registration = |i: usize| replica_instance(&format!("r{i}"), &replicas[i], json!({}));
    for i in 0..3 {
        reg.register(registration(i)).await;
    }
    let nginx = Nginx::start("kotaemon");
    let _report = report_on_failure(&nginx);
    let cfg = Config::new(&nginx)
        .nginx("settle", "20ms")
        .nginx("min_reload_interval", "50ms")
        .admin_port0()
        .upstream(
            Upstream::new("kotaemon")
                .set("max_shrink", 0.9)
                .probe("/queue/status")
                .consul(&reg.url, SERVICE, "5s"),
        )
        .health("interval", "100ms")
        .health("timeout", "80ms")
        .health("rise", 1)
        .health("fall", 1)
        .to_toml();
    let mut daemon = Daemon::start(&cfg);
    let admin = daemon.admin();
    first_apply(&nginx, &daemon);
    let pid = daemon.pid().as_raw();

    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let (mut registered, mut sick) = (false, false);
    let (mut next_flap, mut next_sample, mut next_sighup) = (started, started, started);
    let mut samples: Vec<(Duration, u64, usize)> = Vec::new();
    let mut changes = 0u64;
    while Instant::now() < deadline {
        if registered {
            reg.deregister("r3").await;
        } else {
            reg.register(registration(3)).await;
        }
        registered = !registered;
        changes += 1;
        let now = Instant::now();
        if now >= next_flap {
            sick = !sick;
            replicas[2].set_mode(if sick { "error" } else { "healthy" });
            next_flap = now + Duration::from_secs(1);
        }
        if now >= next_sighup {
            daemon.signal(Signal::SIGHUP);
            next_sighup = now + Duration::from_secs(10);
        }
        if now >= next_sample {
            let (rss, fds) = sample(pid);
            samples.push((now - started, rss, fds));
            next_sample = now + Duration::from_secs(1);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(daemon.alive(), "the daemon survived the churn");
    let reloads = nginx.reloads();
    let status = admin_status(&admin);

    let warm = samples.len() / 5;
    let rss: Vec<u64> = samples[warm..].iter().map(|s| s.1).collect();
    let fds: Vec<usize> = samples[warm..].iter().map(|s| s.2).collect();
    let quarter = rss.len() / 4;
    let (early, late) = (
        mean(&rss[..quarter.max(1)]),
        mean(&rss[rss.len() - quarter.max(1)..]),
    );
    eprintln!(
        "figure: soak {secs}s: {changes} registry writes, {reloads} nginx reloads; \
         RSS after warm-up {}–{} KiB (first quarter mean {early:.0}, last {late:.0}); \
         open fds {}–{} (transient: nginx -t pipes, probe reconnects); last apply {}",
        rss.iter().min().unwrap(),
        rss.iter().max().unwrap(),
        fds.iter().min().unwrap(),
        fds.iter().max().unwrap(),
        status["last_apply"]
    );
    for (t, r, f) in samples.iter().step_by((samples.len() / 20).max(1)) {
        eprintln!("  t={:>4}s rss={r} KiB fds={f}", t.as_secs());
    }
    assert!(
        reloads as u64 > changes / 4,
        "the churn reached nginx: {reloads} reloads for {changes} writes"
    );
    assert!(
        late - early < 4096.0,
        "RSS grew {:.0} KiB between the first and last quarter after warm-up",
        late - early
    );
    // A sample can land while `nginx -t` runs (its pipes) or a probe reconnects: compare the
    // typical count early and late, not single samples.
    let median = |xs: &[usize]| {
        let mut v = xs.to_vec();
        v.sort_unstable();
        v[v.len() / 2]
    };
    let (fds_early, fds_late) = (
        median(&fds[..quarter.max(1)]),
        median(&fds[fds.len() - quarter.max(1)..]),
    );
    assert!(
        fds_late <= fds_early + 2,
        "open fds drifted from {fds_early} to {fds_late}: {fds:?}"
    );
}
