//! The scale scenario's peers: HAProxy 2.6 checking the same fleet (`option httpchk`, `inter
//! 1s`, as upstreamd probes it), and, when `UPSTREAMD_BENCH_BASELINE` names another upstreamd
//! binary (say, main's release build), that binary keeping its own front nginx's include. They
//! run beside the upstreamd under test and are measured over the same window, so the CPU time
//! of each (utime+stime from `/proc`) meets the same machine load.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::env::Env;
use crate::procs::{self, Nginx, Proc, Upstreamd};

/// HAProxy's file limit is 2 × maxconn + servers, within this machine's hard limit of 20,000:
/// it is started only up to this many servers.
pub const HAPROXY_MAX_SERVERS: usize = 5_000;

/// HAProxy opens a connection per check; each closed one stays in the kernel's connection
/// tracking table for 120 s (TIME_WAIT). At 5,000 servers that fills this machine's table
/// (262,144) in under a minute, and from then on the kernel drops new connections machine-wide
/// (`nf_conntrack: table full, dropping packet`): every peer's probes fail. So each size starts
/// once the table is at most this full, waiting at most [`CONNTRACK_WAIT`].
const CONNTRACK_START_AT_MOST: f64 = 0.25;
const CONNTRACK_WAIT: Duration = Duration::from_secs(150);

/// The connection tracking table's use (entries, capacity), where the kernel tracks.
pub fn conntrack() -> Option<(u64, u64)> {
    let read = |name: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/proc/sys/net/netfilter/{name}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some((read("nf_conntrack_count")?, read("nf_conntrack_max")?))
}

/// Waits (bounded) until the connection tracking table is at most a quarter full.
pub async fn wait_for_conntrack() {
    let started = tokio::time::Instant::now();
    while let Some((count, max)) = conntrack() {
        if count as f64 <= CONNTRACK_START_AT_MOST * max as f64
            || started.elapsed() > CONNTRACK_WAIT
        {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One peer's cost over the window.
#[derive(Debug, Clone, Serialize)]
pub struct PeerCost {
    /// `haproxy` or `upstreamd baseline`.
    pub peer: String,
    /// CPU time over the window ÷ the window (1.0 = one core).
    pub cpu_share: f64,
    pub rss_mib_max: f64,
    /// Servers its checks hold up at the end of the window (HAProxy: `show stat`; upstreamd:
    /// `upstreamd_endpoints{state="healthy"}`).
    pub up: f64,
}

/// A running peer.
enum Peer {
    Haproxy { proc: Proc, socket: PathBuf },
    Baseline { _front: Nginx, u: Upstreamd },
}

/// The peers of one scale run.
pub struct Peers {
    peers: Vec<(String, Peer)>,
}

impl Peers {
    /// Starts HAProxy (up to [`HAPROXY_MAX_SERVERS`]) and the baseline upstreamd (if
    /// configured) over `addrs`, and waits until the baseline applied its first file.
    pub async fn start(env: &mut Env, addrs: &[String]) -> Result<Self> {
        let n = addrs.len();
        let mut peers = Vec::new();
        if n <= HAPROXY_MAX_SERVERS {
            let dir = env.dir(&format!("scale-{n}-haproxy"))?;
            let socket = dir.join("stats.sock");
            let cfg = dir.join("haproxy.cfg");
            std::fs::write(&cfg, haproxy_config(addrs, &socket)?)?;
            let mut cmd = Command::new("haproxy");
            cmd.arg("-db").arg("-f").arg(&cfg);
            let proc = Proc::spawn(&format!("haproxy-scale-{n}"), &mut cmd, &env.logs, false)?;
            peers.push(("haproxy".to_owned(), Peer::Haproxy { proc, socket }));
        }
        if let Some(bin) = std::env::var_os("UPSTREAMD_BENCH_BASELINE") {
            let mut bins = env.bins.clone();
            bins.upstreamd = PathBuf::from(bin);
            let (front, toml, admin, dir) =
                crate::scale::start_front(env, &format!("{n}-baseline"), addrs).await?;
            let name = format!("upstreamd-scale-{n}-baseline");
            let mut u = Upstreamd::start(&bins, &name, &toml, &admin, &dir, &env.logs)?;
            u.wait_ready(Duration::from_secs(90)).await?;
            peers.push((
                "upstreamd baseline".to_owned(),
                Peer::Baseline { _front: front, u },
            ));
        }
        Ok(Self { peers })
    }

    /// Each peer's name and pid.
    pub fn pids(&self) -> Vec<(String, i32)> {
        self.peers
            .iter()
            .map(|(name, p)| {
                let pid = match p {
                    Peer::Haproxy { proc, .. } => proc.pid(),
                    Peer::Baseline { u, .. } => u.pid(),
                };
                (name.clone(), pid)
            })
            .collect()
    }

    /// How many servers each peer holds up now; fails when a peer exited.
    pub async fn up(&mut self) -> Result<Vec<f64>> {
        let mut up = Vec::new();
        for (name, p) in &mut self.peers {
            let n = match p {
                Peer::Haproxy { proc, socket } => {
                    if !proc.running() {
                        bail!("{name} exited during the scale run:\n{}", proc.tail(30));
                    }
                    haproxy_up(socket).await? as f64
                }
                Peer::Baseline { u, .. } => {
                    if !u.running() {
                        bail!("{name} exited during the scale run:\n{}", u.tail(30));
                    }
                    u.metric_where("upstreamd_endpoints", "state=\"healthy\"")
                        .await?
                }
            };
            up.push(n);
        }
        Ok(up)
    }
}

/// HAProxy checking every address in `addrs` as upstreamd probes them (the scenario's health
/// settings: `inter` 1 s, rise/fall, the body expected), `timeout connect` the probe timeout
/// (Debian's 2.6.12 ends a check after min(`inter`, `timeout connect`)). No traffic is sent.
fn haproxy_config(addrs: &[String], socket: &std::path::Path) -> Result<String> {
    let port = procs::free_port("127.0.0.1")?;
    let names: Vec<String> = (0..addrs.len()).map(|i| format!("s{i}")).collect();
    let base = crate::haproxy::config(port, addrs, &names, false);
    let stats = format!(
        "global\n    stats socket {} mode 600 level admin\n",
        socket.display()
    );
    Ok(base.replacen("global\n", &stats, 1))
}

/// The servers `show stat` reports UP.
async fn haproxy_up(socket: &std::path::Path) -> Result<usize> {
    let mut s = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("failed to connect to `{}`", socket.display()))?;
    s.write_all(b"show stat\n").await?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut text))
        .await
        .context("`show stat` took over 5 s")??;
    // Columns: pxname,svname,…,status (18th); the BACKEND line is not a server.
    Ok(text
        .lines()
        .filter(|l| !l.contains(",BACKEND,"))
        .filter(|l| l.split(',').nth(17) == Some("UP"))
        .count())
}
