//! Scenario `modes` (issue 13): the apply modes side by side under the same stand-in fleet and
//! load — upstreamd reloading nginx (`apply = "reload"`), upstreamd pushing to nginx's Lua
//! balancer (`apply = "lua"`, with `--lua`), and the naive reloader. Per peer: registry write
//! → first request served by the new replica (the `discovery` trials), replica failure → last
//! request sent to it (the `fail` fail-stop run), and membership churn with long answers and
//! open tabs: kept-alive request errors per change, old worker generations left and the RSS
//! of every nginx process before and after. `--quick` runs only the churn, small.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use crate::client::{chat, open_tab, run_load, ChatOutcome, LoadSpec};
use crate::discovery::{self, DiscoveryResult};
use crate::env::{Env, EtcdStack, Peer};
use crate::fail::{self, Event, FailResult};
use crate::procs::{children, rss_kib};
use crate::stats::{self, Window};

/// Membership changes are this far apart: more than `min_reload_interval` (2 s), so each one
/// is a reload of its own in reload mode.
const CHANGE_GAP: Duration = Duration::from_millis(2500);

#[derive(Debug, Clone, Serialize)]
pub struct ModesResult {
    pub peer: Peer,
    /// Registry write → first request served by the new replica (etcd); `None` in quick mode.
    pub discovery: Option<DiscoveryResult>,
    /// A replica killed under load: the last request nginx sent to it; `None` in quick mode.
    pub fail: Option<FailResult>,
    pub churn: Churn,
}

/// Membership changes with long answers streaming and tabs open.
#[derive(Debug, Clone, Serialize)]
pub struct Churn {
    /// Registry changes (the spare joins, leaves, joins…), [`CHANGE_GAP`] apart.
    pub changes: usize,
    /// Chat loops (each runs answers back to back while the changes go on) and tabs (opened
    /// in batches, one before each change, all held to the end).
    pub chats: usize,
    pub tabs: usize,
    pub chat_outcomes: BTreeMap<String, usize>,
    pub reloads: usize,
    /// The kept-alive `GET /` load while the changes go on.
    pub load: Window,
    pub errors_per_change: f64,
    /// Old nginx worker generations (and workers) still alive 1.5 s after the last change,
    /// tabs still open; counted as upstreamd counts them.
    pub old_generations_after: usize,
    pub old_workers_after: usize,
    /// RSS of the master and every child, KiB: before the first change (and tab), and 1.5 s
    /// after the last.
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
}

/// Runs the three measurements for `peer`.
pub async fn run(env: &mut Env, peer: Peer) -> Result<ModesResult> {
    let (discovery, fail) = if env.plan.quick {
        (None, None)
    } else {
        let trials = if peer == Peer::Naive {
            env.plan.discovery_trials_naive
        } else {
            env.plan.discovery_trials
        };
        let d = discovery::run(env, discovery::Registry::Etcd, peer, trials).await?;
        let f = fail::run(env, Event::FailStop, peer).await?;
        (Some(d), Some(f))
    };
    let churn = churn(env, peer).await?;
    Ok(ModesResult {
        peer,
        discovery,
        fail,
        churn,
    })
}

/// Every nginx process's RSS, summed (shared pages count once per process).
fn nginx_rss(master: Option<i32>) -> u64 {
    let Some(master) = master else { return 0 };
    std::iter::once(master)
        .chain(children(master).into_iter().map(|(p, _)| p))
        .filter_map(rss_kib)
        .sum()
}

async fn churn(env: &mut Env, peer: Peer) -> Result<Churn> {
    let plan = env.plan.clone();
    let (changes, tabs) = if plan.quick { (4, 4) } else { (20, 20) };
    let EtcdStack {
        replicas,
        mut etcd,
        prefix,
        mut stack,
    } = EtcdStack::streaming(env, "modes", "m", peer).await?;
    let spare = &replicas[3];
    let addr = stack.addr();
    let answer = Duration::from_millis(plan.token_delay_ms * u64::from(plan.tokens));
    let span = CHANGE_GAP * changes as u32;

    let rss_before_kib = nginx_rss(stack.nginx.master());
    let reloads_before = stack.nginx.reloads();

    let load = tokio::spawn(run_load(LoadSpec {
        addr: addr.clone(),
        rate: plan.rate / 2.0,
        duration: span,
        users: plan.users,
        timeout: Duration::from_secs_f64(plan.client_timeout_s),
        replicas: replicas.iter().map(|r| r.name.clone()).collect(),
    }));
    let started = Instant::now();
    let mut chats = tokio::task::JoinSet::new();
    for k in 0..plan.chats {
        let addr = addr.clone();
        let stagger = answer.mul_f64(k as f64 / plan.chats as f64);
        chats.spawn(async move {
            tokio::time::sleep(stagger).await;
            let mut outcomes = Vec::new();
            let mut n = 0;
            while started.elapsed() < span {
                let session = format!("modes-{k}-{n}");
                outcomes.push(
                    chat(
                        &addr,
                        &session,
                        &session,
                        plan.tokens,
                        answer * 3 + Duration::from_secs(10),
                    )
                    .await,
                );
                n += 1;
            }
            outcomes
        });
    }

    // Users come and go: the tabs open one batch before each change, so each reload finds
    // tabs the generation before it accepted (as N reloads with tabs open leave N).
    let hold = span + answer * 4 + Duration::from_secs(60);
    let mut open = Vec::new();
    let key = format!("{prefix}{}", spare.name);
    for i in 0..changes {
        while open.len() < tabs * (i + 1) / changes {
            open.push(open_tab(addr.clone(), format!("tab-{}", open.len()), hold));
        }
        // Long enough for the batch to reach a worker before the change.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if i % 2 == 0 {
            etcd.put(key.as_str(), spare.addr.as_str(), None).await?;
        } else {
            etcd.delete(key.as_str(), None).await?;
        }
        tokio::time::sleep_until((started + CHANGE_GAP * (i as u32 + 1)).into()).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let old = stack
        .nginx
        .master()
        .and_then(|m| upstreamd::nginx::old_generations(nix::unistd::Pid::from_raw(m)).ok())
        .unwrap_or_default();
    let rss_after_kib = nginx_rss(stack.nginx.master());
    let reloads = stack.nginx.reloads() - reloads_before;

    let mut chat_outcomes = BTreeMap::new();
    while let Some(done) = chats.join_next().await {
        for outcome in done.unwrap_or_else(|_| vec![ChatOutcome::Broken]) {
            let key = serde_json::to_value(outcome)?
                .as_str()
                .unwrap_or_default()
                .to_owned();
            *chat_outcomes.entry(key).or_insert(0) += 1;
        }
    }
    let run = load.await?;
    for tab in &open {
        tab.abort();
    }
    stack.check_alive()?;
    let load = stats::window(&run.recs, 0.0, f64::MAX);
    Ok(Churn {
        changes,
        chats: plan.chats,
        tabs,
        chat_outcomes,
        reloads,
        errors_per_change: load.errors as f64 / changes as f64,
        load,
        old_generations_after: old.generations,
        old_workers_after: old.workers,
        rss_before_kib,
        rss_after_kib,
    })
}

/// The side-by-side table of BENCHMARKS.md.
pub fn section(rows: &[ModesResult]) -> String {
    let mut md = String::new();
    if rows.is_empty() {
        return md;
    }
    let _ = writeln!(md, "## Apply modes side by side (issue 13)\n");
    let _ = writeln!(
        md,
        "A fresh stand-in fleet and nginx (2 workers, the Kotaemon site) per measurement and \
         peer, the same load for each. *Registry write → served*: the discovery trials (etcd, two \
         replicas, round robin, settle 250 ms, min_reload_interval 500 ms): from the etcd put of \
         a new replica until a kept-alive `GET /` poll through nginx (every 2 ms) is answered by \
         it. *Replica killed → last request*: the fail-stop run (a static list of three, sticky, \
         steady load): the last request nginx sent to the killed replica, from its access log. \
         *Churn*: etcd, sticky, settle 250 ms, min_reload_interval 2 s; membership changes \
         {gap:.1} s apart (a spare joins, leaves, joins…) while chat loops stream long answers \
         back to back and tabs open, one batch before each change, and hold their `/heartbeat` \
         streams to the end; errors are those of the kept-alive `GET /` load during the changes; \
         old generations counted as upstreamd counts them, 1.5 s after the last change, tabs \
         still open.\n",
        gap = CHANGE_GAP.as_secs_f64()
    );
    let header: Vec<String> = rows
        .iter()
        .map(|r| match r.peer {
            Peer::Upstreamd => "upstreamd, apply = reload".to_owned(),
            p => p.label().to_owned(),
        })
        .collect();
    let _ = writeln!(md, "| | {} |", header.join(" | "));
    let _ = writeln!(md, "|---|{}", "---|".repeat(rows.len()));
    let line = |md: &mut String, what: &str, f: &dyn Fn(&ModesResult) -> String| {
        let cells: Vec<String> = rows.iter().map(f).collect();
        let _ = writeln!(md, "| {what} | {} |", cells.join(" | "));
    };
    let none = || "—".to_owned();
    line(
        &mut md,
        "registry write → first served, p50 / p99 (trials)",
        &|r| {
            r.discovery.as_ref().map_or_else(none, |d| {
                format!(
                    "{:.0} / {:.0} ms ({}{})",
                    d.p50_ms,
                    d.p99_ms,
                    d.trials,
                    if d.missed > 0 {
                        format!(", {} missed", d.missed)
                    } else {
                        String::new()
                    }
                )
            })
        },
    );
    line(
        &mut md,
        "replica killed → last request sent to it",
        &|r| {
            r.fail.as_ref().map_or_else(none, |f| match f.last_sent_s {
                Some(s) => format!(
                    "{s:.2} s ({} request{})",
                    f.sent_to_victim,
                    if f.sent_to_victim == 1 { "" } else { "s" }
                ),
                None => "none sent".to_owned(),
            })
        },
    );
    line(&mut md, "membership changes / nginx reloads", &|r| {
        format!("{} / {}", r.churn.changes, r.churn.reloads)
    });
    line(&mut md, "kept-alive request errors per change", &|r| {
        let kinds: Vec<String> = r
            .churn
            .load
            .error_kinds
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        format!(
            "{:.2} ({} of {}{})",
            r.churn.errors_per_change,
            r.churn.load.errors,
            r.churn.load.requests,
            if kinds.is_empty() {
                String::new()
            } else {
                format!(": {}", kinds.join(", "))
            }
        )
    });
    line(&mut md, "answers intact (chats × answers)", &|r| {
        let total: usize = r.churn.chat_outcomes.values().sum();
        let intact = r.churn.chat_outcomes.get("intact").copied().unwrap_or(0);
        format!("{intact} of {total} ({} loops)", r.churn.chats)
    });
    line(
        &mut md,
        "old worker generations (workers) after the changes, tabs open",
        &|r| {
            format!(
                "{} ({})",
                r.churn.old_generations_after, r.churn.old_workers_after
            )
        },
    );
    line(
        &mut md,
        "RSS of all nginx processes, before → after",
        &|r| {
            format!(
                "{:.1} → {:.1} MiB",
                r.churn.rss_before_kib as f64 / 1024.0,
                r.churn.rss_after_kib as f64 / 1024.0
            )
        },
    );
    if let Some(r) = rows.first() {
        let _ = writeln!(
            md,
            "\n{} chat loops and {} open tabs during {} changes.\n",
            r.churn.chats, r.churn.tabs, r.churn.changes
        );
    }
    md
}
