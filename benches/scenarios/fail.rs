//! Scenario 1: one replica of three fails under steady load — it dies (fail-stop), it accepts
//! and never answers (fail-slow), or its health path says 503 while it answers slowly (sick)
//! — and is then made healthy again. Peers: upstreamd (as before, and with its detection
//! tuning), nginx alone (passive `max_fails`/`fail_timeout`), the naive reloader, and HAProxy
//! in nginx's place (same probe settings, and its best tuning).

use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use crate::client::{run_load, LoadSpec};
use crate::env::{members_file, Balance, Env, Members, Peer, Source, Stack};
use crate::haproxy::Haproxy;
use crate::stats::{self, Access, Window};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Event {
    /// SIGKILL.
    FailStop,
    /// `hang`: accepts, never answers.
    FailSlow,
    /// `sick:<ms>`: `/queue/status` answers 503; everything else answers after the delay.
    Sick,
}

impl Event {
    pub fn label(self) -> &'static str {
        match self {
            Event::FailStop => "fail-stop",
            Event::FailSlow => "fail-slow",
            Event::Sick => "sick",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FailResult {
    pub event: Event,
    pub peer: Peer,
    /// The steady load before the event.
    pub before: Window,
    /// The event window: from the event for `fail_window_s`.
    pub during: Window,
    /// Share of answers the victim gave before the event.
    pub victim_share_before: f64,
    /// Requests the front sent to the victim (nginx: retries included) after the event, per
    /// its log.
    pub sent_to_victim: usize,
    /// When the last of those started, in seconds after the event; `null` when none.
    pub last_sent_s: Option<f64>,
    /// The last request the victim answered, in seconds after the event (sick: it still does).
    pub last_answered_s: Option<f64>,
    /// From the victim being healthy again (restarted, or its mode back to `healthy`) to the
    /// first request it answered; `null` when it answered none in `recover_window_s`.
    pub recovered_s: Option<f64>,
    /// nginx reloads during the load (HAProxy: none).
    pub reloads: usize,
    /// Idle keep-alive connections the front had closed, found before reuse (no user impact).
    pub stale_connections: u64,
}

/// Who serves the load: nginx with whoever keeps its file, or HAProxy.
enum Front {
    Nginx(Stack),
    Haproxy(Haproxy),
}

impl Front {
    fn addr(&self) -> String {
        match self {
            Front::Nginx(s) => s.addr(),
            Front::Haproxy(h) => h.addr(),
        }
    }

    fn reloads(&self) -> usize {
        match self {
            Front::Nginx(s) => s.nginx.reloads(),
            Front::Haproxy(_) => 0,
        }
    }

    fn check_alive(&mut self) -> Result<()> {
        match self {
            Front::Nginx(s) => s.check_alive(),
            Front::Haproxy(h) => h.check_alive(),
        }
    }

    fn access(&self) -> Vec<Access> {
        match self {
            Front::Nginx(s) => stats::read_access_log(&s.nginx.access_log()),
            Front::Haproxy(h) => h.access(),
        }
    }
}

pub async fn run(env: &mut Env, event: Event, peer: Peer) -> Result<FailResult> {
    let plan = env.plan.clone();
    let mut replicas = env.replicas("r", 3, 2, &[]).await?;
    let addrs: Vec<String> = replicas.iter().map(|r| r.addr.clone()).collect();
    let names: Vec<String> = replicas.iter().map(|r| r.name.clone()).collect();
    let mut front = if peer.is_haproxy() {
        let tuned = peer == Peer::HaproxyTuned;
        Front::Haproxy(Haproxy::start(env, event.label(), tuned, &addrs, &names).await?)
    } else {
        let dir = env.dir("fail-members")?;
        let members = members_file(&dir, &addrs)?;
        Front::Nginx(
            Stack::start(
                env,
                event.label(),
                peer,
                Balance::Sticky,
                &addrs,
                &Source::Static(&addrs),
                &Members::File(&members),
                "250ms",
                "2s",
                &names,
            )
            .await?,
        )
    };
    // Let the first reloads and connections settle.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let victim = 1;
    let spec = LoadSpec {
        addr: front.addr(),
        rate: plan.rate,
        duration: Duration::from_secs_f64(
            plan.fail_before_s + plan.fail_window_s + plan.recover_window_s,
        ),
        users: plan.users,
        timeout: Duration::from_secs_f64(plan.client_timeout_s),
        replicas: names.clone(),
    };
    let reloads_before = front.reloads();
    let load = tokio::spawn(run_load(spec));
    tokio::time::sleep(Duration::from_secs_f64(plan.fail_before_s)).await;
    match event {
        Event::FailStop => replicas[victim].kill(),
        Event::FailSlow => replicas[victim].set_mode_now("hang").await?,
        Event::Sick => {
            replicas[victim]
                .set_mode_now(&format!("sick:{}", plan.sick_ms))
                .await?
        }
    }
    tokio::time::sleep(Duration::from_secs_f64(plan.fail_window_s)).await;
    // Healthy again: the load's clock says when (the restart takes a moment).
    match event {
        Event::FailStop => replicas[victim].restart().await?,
        // Only the control file ends `hang`; the stand-in reads it every 100 ms.
        Event::FailSlow | Event::Sick => replicas[victim].set_mode_file("healthy")?,
    }
    let healthy_unix = crate::client::unix_now();
    let run = load.await?;
    let reloads = front.reloads() - reloads_before;
    front.check_alive()?;

    let (t0, t1) = (plan.fail_before_s, plan.fail_before_s + plan.fail_window_s);
    let log = front.access();
    let event_unix = run.started_unix + t0;
    let (sent_to_victim, last_sent_s) = stats::sent_to(
        &log,
        &addrs[victim],
        event_unix,
        event_unix + plan.fail_window_s,
    );
    let healthy_at = healthy_unix - run.started_unix;
    let recovered_s = run
        .recs
        .iter()
        .filter(|r| r.due >= healthy_at && r.replica == Some(victim))
        .map(|r| r.due - healthy_at)
        .reduce(f64::min);
    Ok(FailResult {
        event,
        peer,
        before: stats::window(&run.recs, 0.5, t0),
        during: stats::window(&run.recs, t0, t1),
        victim_share_before: stats::share(&run.recs, victim, 0.5, t0),
        sent_to_victim,
        last_sent_s,
        last_answered_s: stats::last_answered_by(&run.recs, victim, t0, t1),
        recovered_s,
        reloads,
        stale_connections: run.stale_dropped,
    })
}
