//! Scenario 2: a registry write (etcd put, Consul register) → the first request nginx serves
//! from the new replica, over many trials.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::client::{request_once, Conn};
use crate::env::{Balance, Env, Members, Peer, Source, Stack};
use crate::procs::Replica;
use crate::stats::{percentile, sorted};

/// New replicas added one after another before they are all removed in one go.
const SPARES: usize = 5;
/// Polls through nginx are this far apart while waiting for the new replica.
const POLL_GAP: Duration = Duration::from_millis(2);
/// upstreamd's timing in this scenario.
pub const SETTLE: &str = "250ms";
pub const MIN_RELOAD_INTERVAL: &str = "500ms";

#[derive(Debug, Clone, Serialize)]
pub struct DiscoveryResult {
    pub registry: &'static str,
    pub peer: Peer,
    pub trials: usize,
    /// Trials where the new replica was not served within 10 s.
    pub missed: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub min_ms: f64,
    /// Every trial, in order.
    pub served_ms: Vec<f64>,
    /// Every trial's timeline, in order (missed ones too): to line up with the daemon's log.
    pub timeline: Vec<TrialTimes>,
    pub reloads: usize,
}

/// When one trial's write went out and how long its parts took.
#[derive(Debug, Clone, Serialize)]
pub struct TrialTimes {
    /// The replica written.
    pub replica: String,
    /// Wall clock at the write, ms since the Unix epoch (the daemons log UTC wall clock).
    pub started_unix_ms: u64,
    /// The registry write's own round trip.
    pub write_ms: f64,
    /// Write → first served by the new replica; `None` when missed.
    pub served_ms: Option<f64>,
}

/// The registry under test.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Registry {
    Etcd,
    Consul,
}

struct Writer {
    registry: Registry,
    url: String,
    /// etcd key prefix, or Consul service name.
    scope: String,
    etcd: Option<etcd_client::Client>,
}

impl Writer {
    async fn add(&mut self, r: &Replica) -> Result<()> {
        match self.registry {
            Registry::Etcd => {
                let client = self.etcd.as_mut().expect("etcd client");
                client
                    .put(format!("{}{}", self.scope, r.name), r.addr.as_str(), None)
                    .await?;
            }
            Registry::Consul => {
                let (ip, port) = r.addr.split_once(':').expect("ip:port");
                let body = format!(
                    r#"{{"ID":"{id}","Name":"{svc}","Address":"{ip}","Port":{port}}}"#,
                    id = r.name,
                    svc = self.scope
                );
                let (status, text) = request_once(
                    &self.url["http://".len()..],
                    "PUT",
                    "/v1/agent/service/register",
                    "Content-Type: application/json\r\n",
                    &body,
                    Duration::from_secs(2),
                )
                .await?;
                if status != 200 {
                    bail!("consul register {}: {status} {text}", r.name);
                }
            }
        }
        Ok(())
    }

    async fn remove(&mut self, r: &Replica) -> Result<()> {
        match self.registry {
            Registry::Etcd => {
                let client = self.etcd.as_mut().expect("etcd client");
                client
                    .delete(format!("{}{}", self.scope, r.name), None)
                    .await?;
            }
            Registry::Consul => {
                let (status, text) = request_once(
                    &self.url["http://".len()..],
                    "PUT",
                    &format!("/v1/agent/service/deregister/{}", r.name),
                    "",
                    "",
                    Duration::from_secs(2),
                )
                .await?;
                if status != 200 {
                    bail!("consul deregister {}: {status} {text}", r.name);
                }
            }
        }
        Ok(())
    }
}

pub async fn run(
    env: &mut Env,
    registry: Registry,
    peer: Peer,
    trials: usize,
) -> Result<DiscoveryResult> {
    let base = env.replicas("b", 2, 2, &[]).await?;
    let spares = env.replicas("s", SPARES, 5, &[]).await?;
    let names: Vec<String> = base.iter().map(|r| r.name.clone()).collect();
    let tag = format!(
        "{}-{peer:?}",
        if registry == Registry::Etcd {
            "etcd"
        } else {
            "consul"
        }
    )
    .to_lowercase();
    let mut writer = match registry {
        Registry::Etcd => {
            let url = env.etcd().await?.url.clone();
            let client = etcd_client::Client::connect([url.as_str()], None).await?;
            Writer {
                registry,
                url,
                scope: format!("/bench/discovery-{tag}/"),
                etcd: Some(client),
            }
        }
        Registry::Consul => Writer {
            registry,
            url: env.consul().await?.url.clone(),
            scope: format!("discovery-{tag}"),
            etcd: None,
        },
    };
    for r in &base {
        writer.add(r).await?;
    }
    let (url, scope) = (writer.url.clone(), writer.scope.clone());
    let source = match registry {
        Registry::Etcd => Source::Etcd {
            url: &url,
            prefix: &scope,
        },
        Registry::Consul => Source::Consul {
            url: &url,
            service: &scope,
        },
    };
    let mut stack = Stack::start(
        env,
        &format!("discovery-{tag}"),
        peer,
        Balance::RoundRobin,
        &[],
        &source,
        &Members::Etcd {
            url: &url,
            prefix: &scope,
        },
        SETTLE,
        MIN_RELOAD_INTERVAL,
        &names,
    )
    .await?;
    let reloads_before = stack.nginx.reloads();
    // Enough time after a reload that the next change is not held by min_reload_interval.
    let quiet = Duration::from_millis(600);
    tokio::time::sleep(quiet).await;

    let addr = stack.addr();
    let mut served = Vec::new();
    let mut missed = 0;
    let mut timeline = Vec::new();
    for k in 0..trials {
        if k > 0 && k % SPARES == 0 {
            for r in &spares {
                writer.remove(r).await?;
            }
            let output = stack.nginx.output();
            let gone = |text: &str| {
                spares.iter().all(|r| {
                    !text.contains(&format!("{};", r.addr))
                        && !text.contains(&format!("{} ", r.addr))
                })
            };
            crate::procs::wait_for(
                "the spares to leave the file",
                Duration::from_secs(15),
                || gone(&std::fs::read_to_string(&output).unwrap_or_default()),
            )
            .await?;
            tokio::time::sleep(quiet).await;
        }
        if peer == Peer::Naive {
            // The naive loop's phase would otherwise line up with the trials.
            tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 2000)).await;
        }
        let spare = &spares[k % SPARES];
        // The clock starts before the write: its own round trip counts.
        let started = Instant::now();
        let started_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        writer.add(spare).await?;
        let write_ms = started.elapsed().as_secs_f64() * 1000.0;
        let got = first_served(&addr, &spare.name, started, Duration::from_secs(10))
            .await
            .map(|took| took.as_secs_f64() * 1000.0);
        match got {
            Some(ms) => served.push(ms),
            None => missed += 1,
        }
        timeline.push(TrialTimes {
            replica: spare.name.clone(),
            started_unix_ms,
            write_ms,
            served_ms: got,
        });
        stack.check_alive()?;
        if matches!(peer, Peer::Upstreamd | Peer::UpstreamdLua) {
            tokio::time::sleep(quiet).await;
        }
    }
    let reloads = stack.nginx.reloads() - reloads_before;
    let s = sorted(served.clone());
    Ok(DiscoveryResult {
        registry: if registry == Registry::Etcd {
            "etcd"
        } else {
            "consul"
        },
        peer,
        trials,
        missed,
        p50_ms: percentile(&s, 50.0),
        p90_ms: percentile(&s, 90.0),
        p99_ms: percentile(&s, 99.0),
        max_ms: s.last().copied().unwrap_or(0.0),
        min_ms: s.first().copied().unwrap_or(0.0),
        served_ms: served,
        timeline,
        reloads,
    })
}

/// Polls `GET /` through nginx on a keep-alive connection (reconnecting when nginx closes it)
/// until `name` answers; the time since `started`, or `None` after `within`.
async fn first_served(
    addr: &str,
    name: &str,
    started: Instant,
    within: Duration,
) -> Option<Duration> {
    let request = crate::client::get_request("/", "");
    let mut conn: Option<Conn> = None;
    while started.elapsed() < within {
        if conn.as_mut().map_or(true, |c| c.closed_by_peer()) {
            conn = Conn::connect(addr).await.ok();
        }
        if let Some(c) = conn.as_mut() {
            match tokio::time::timeout(Duration::from_secs(2), c.send(&request)).await {
                Ok(Ok(r)) if r.status == 200 => {
                    let body = String::from_utf8_lossy(&r.body);
                    if body.trim().strip_prefix("kotaemon-standin ") == Some(name) {
                        return Some(started.elapsed());
                    }
                    if r.close {
                        conn = None;
                    }
                }
                _ => conn = None,
            }
        }
        tokio::time::sleep(POLL_GAP).await;
    }
    None
}
