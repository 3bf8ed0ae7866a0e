//! Scenario 4: long streamed answers (SSE) in flight while the membership changes, with open
//! tabs holding `/heartbeat` streams, under steady load. Counted: answers that completed
//! intact, and old nginx worker generations (workers of the master that are shutting down).

use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use crate::client::{chat, open_tab, run_load, ChatOutcome, LoadSpec};
use crate::env::{Env, EtcdStack, Peer, Stack};
use crate::stats::{self, Window};

#[derive(Debug, Clone, Serialize)]
pub struct StreamsResult {
    pub peer: Peer,
    pub chats: usize,
    pub intact: usize,
    /// Chats by outcome.
    pub outcomes: std::collections::BTreeMap<String, usize>,
    /// Registry changes made while the answers streamed.
    pub membership_changes: usize,
    pub reloads: usize,
    /// Old-generation worker processes: most seen at once, right after the last change, once
    /// every answer ended (tabs still open), and after the tabs closed.
    pub old_workers_max: usize,
    pub old_workers_after_changes: usize,
    pub old_workers_after_answers: usize,
    pub old_workers_after_tabs: usize,
    /// The current generation's size (`worker_processes`).
    pub workers_per_generation: usize,
    pub load: Window,
}

pub async fn run(env: &mut Env, peer: Peer) -> Result<StreamsResult> {
    let plan = env.plan.clone();
    let EtcdStack {
        replicas,
        mut etcd,
        prefix,
        mut stack,
    } = EtcdStack::streaming(env, "streams", "t", peer).await?;
    let spare = &replicas[3];

    let answer = Duration::from_millis(plan.token_delay_ms * u64::from(plan.tokens));
    let addr = stack.addr();
    let tabs: Vec<_> = (0..plan.tabs)
        .map(|k| {
            open_tab(
                addr.clone(),
                format!("tab-{k}"),
                answer * 4 + Duration::from_secs(30),
            )
        })
        .collect();
    let reloads_before = stack.nginx.reloads();
    let start = Instant::now();
    let load = tokio::spawn(run_load(LoadSpec {
        addr: addr.clone(),
        rate: plan.rate / 2.0,
        duration: answer + Duration::from_secs(1),
        users: plan.users,
        timeout: Duration::from_secs_f64(plan.client_timeout_s),
        replicas: replicas.iter().map(|r| r.name.clone()).collect(),
    }));
    let mut chats = tokio::task::JoinSet::new();
    for k in 0..plan.chats {
        let addr = addr.clone();
        let stagger = Duration::from_millis(500 * k as u64 / plan.chats as u64);
        chats.spawn(async move {
            tokio::time::sleep(stagger).await;
            chat(
                &addr,
                &format!("chat-{k}"),
                &format!("session-{k}"),
                plan.tokens,
                answer * 3 + Duration::from_secs(10),
            )
            .await
        });
    }

    // Two membership changes while the answers stream, as far apart as min_reload_interval
    // allows: the spare joins, then leaves.
    let key = format!("{prefix}{}", spare.name);
    let mut old_max = 0;
    let sample = |stack: &Stack, old_max: &mut usize| {
        let (_, old) = stack.nginx.workers();
        *old_max = (*old_max).max(old);
    };
    let first = answer.mul_f64(0.2).max(Duration::from_millis(500));
    let second = first + Duration::from_millis(2500);
    let until = |t: Duration| tokio::time::sleep_until((start + t).into());
    until(first).await;
    etcd.put(key.as_str(), spare.addr.as_str(), None).await?;
    until(second).await;
    etcd.delete(key.as_str(), None).await?;
    let changes_done = second + Duration::from_millis(1000);
    while start.elapsed() < changes_done {
        sample(&stack, &mut old_max);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old_after_changes = stack.nginx.workers().1;

    let mut outcomes = std::collections::BTreeMap::new();
    while let Some(done) = chats.join_next().await {
        sample(&stack, &mut old_max);
        let outcome = done.unwrap_or(ChatOutcome::Broken);
        let key = serde_json::to_value(&outcome)?
            .as_str()
            .unwrap_or_default()
            .to_owned();
        *outcomes.entry(key).or_insert(0) += 1;
    }
    let run = load.await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    sample(&stack, &mut old_max);
    let old_after_answers = stack.nginx.workers().1;
    for tab in &tabs {
        tab.abort();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (current, old_after_tabs) = stack.nginx.workers();
    let reloads = stack.nginx.reloads() - reloads_before;
    stack.check_alive()?;
    Ok(StreamsResult {
        peer,
        chats: plan.chats,
        intact: outcomes.get("intact").copied().unwrap_or(0),
        outcomes,
        membership_changes: 2,
        reloads,
        old_workers_max: old_max,
        old_workers_after_changes: old_after_changes,
        old_workers_after_answers: old_after_answers,
        old_workers_after_tabs: old_after_tabs,
        workers_per_generation: current,
        load: stats::window(&run.recs, 0.0, f64::MAX),
    })
}
