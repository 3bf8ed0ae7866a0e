//! Scenario 3: registry churn under steady load — 100 writes in one second that end where they
//! started, 100 that change the membership once, and a replica whose health flaps faster than
//! rise/fall. Counted: nginx reloads (SIGHUP lines in its error log) and client errors.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use crate::client::{run_load, LoadSpec};
use crate::env::{Env, EtcdStack, Peer};
use crate::stats::{self, Window};

/// The health of the flapping replica flips this often.
pub const FLAP_EVERY: Duration = Duration::from_millis(300);
/// Writes per burst, and the burst's length.
pub const BURST_WRITES: usize = 100;
const BURST: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: &'static str,
    /// Reloads from the start of the phase to the start of the next.
    pub reloads: usize,
    /// Client load over the same span.
    pub load: Window,
    /// How long the writes took (a burst is meant to take 1 s; etcd's fsync may stretch it).
    pub writes_took_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChurnResult {
    pub peer: Peer,
    pub phases: Vec<Phase>,
}

pub async fn run(env: &mut Env, peer: Peer) -> Result<ChurnResult> {
    let plan = env.plan.clone();
    let after = if plan.quick { 2.5 } else { 4.0 };
    let quiet = 2.0;
    let EtcdStack {
        replicas,
        mut etcd,
        prefix,
        mut stack,
    } = EtcdStack::start(env, "churn", "c", peer, &[]).await?;
    let (base, extra) = replicas.split_at(3);
    let extra = &extra[0];

    // Phase starts, in seconds after the load starts.
    let noop_at = quiet;
    let change_at = noop_at + 1.0 + after;
    let flap_at = change_at + 1.0 + after;
    let end = flap_at + plan.flap_s + after;
    let spec = LoadSpec {
        addr: stack.addr(),
        rate: plan.rate,
        duration: Duration::from_secs_f64(end),
        users: plan.users,
        timeout: Duration::from_secs_f64(plan.client_timeout_s),
        replicas: replicas.iter().map(|r| r.name.clone()).collect(),
    };
    let start = Instant::now();
    let load = tokio::spawn(run_load(spec));
    let at = |s: f64| tokio::time::sleep_until((start + Duration::from_secs_f64(s)).into());
    let extra_key = format!("{prefix}{}", extra.name);
    let mut reloads = vec![stack.nginx.reloads()];

    // No-op churn: put and delete the extra replica 50 times; it ends unregistered.
    at(noop_at).await;
    reloads.push(stack.nginx.reloads());
    let noop_took = burst(&mut etcd, &extra_key, &extra.addr, false).await?;

    // A burst that changes the membership once: the same churn, ending with it registered.
    at(change_at).await;
    reloads.push(stack.nginx.reloads());
    let change_took = burst(&mut etcd, &extra_key, &extra.addr, true).await?;

    // The third base replica's health path flaps (503 / 200) every 300 ms.
    at(flap_at).await;
    reloads.push(stack.nginx.reloads());
    let flapper = &base[2];
    let mut sick = false;
    while start.elapsed().as_secs_f64() < flap_at + plan.flap_s {
        sick = !sick;
        flapper
            .set_mode_now(if sick { "error" } else { "healthy" })
            .await?;
        tokio::time::sleep(FLAP_EVERY).await;
    }
    flapper.set_mode_now("healthy").await?;
    let run = load.await?;
    reloads.push(stack.nginx.reloads());
    stack.check_alive()?;

    let bounds = [0.5, noop_at, change_at, flap_at, end];
    let names = ["quiet", "no-op burst", "changing burst", "flapping replica"];
    let took = [None, Some(noop_took), Some(change_took), None];
    let phases = (0..4)
        .map(|i| Phase {
            name: names[i],
            reloads: reloads[i + 1] - reloads[i],
            load: stats::window(&run.recs, bounds[i], bounds[i + 1]),
            writes_took_s: took[i],
        })
        .collect();
    Ok(ChurnResult { peer, phases })
}

/// 100 writes over one second alternating put and delete of `key`: it ends deleted, or (with
/// `end_registered`) put — the last pair's delete is replaced by a second put of the same value.
async fn burst(
    etcd: &mut etcd_client::Client,
    key: &str,
    addr: &str,
    end_registered: bool,
) -> Result<f64> {
    let started = Instant::now();
    let gap = BURST / BURST_WRITES as u32;
    for i in 0..BURST_WRITES {
        tokio::time::sleep_until((started + gap * i as u32).into()).await;
        let last = i == BURST_WRITES - 1;
        if i % 2 == 0 || (last && end_registered) {
            etcd.put(key, addr, None).await?;
        } else {
            etcd.delete(key, None).await?;
        }
    }
    Ok(started.elapsed().as_secs_f64())
}
