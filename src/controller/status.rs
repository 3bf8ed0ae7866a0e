//! What `/status` and the status page show: a snapshot of the controller's state, built on
//! request (so a large fleet costs nothing between requests).

use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::state::{LastProbe, UpstreamState};
use crate::config::Balance;
use crate::decide::Verdict;
use crate::health::Health;
use crate::model::{Address, RegistryState};
use crate::nginx::OldGenerations;
use crate::sources::SkippedEntry;

/// The whole status report.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// upstreamd's version.
    pub version: &'static str,
    /// Every source delivered and the first apply succeeded.
    pub ready: bool,
    /// Seconds since start.
    pub uptime_secs: f64,
    /// Per upstream, in config order.
    pub upstreams: Vec<UpstreamStatus>,
    /// The last render and apply.
    pub last_apply: Option<ApplyStatus>,
    /// The desired file is not what nginx runs yet: a change waits for `settle` or
    /// `min_reload_interval`, or a failed apply waits for its retry.
    pub change_pending: bool,
    /// Where the desired file stands: on disk, confirmed by nginx, retried.
    pub apply: ApplyState,
    /// Old nginx worker generations still shutting down, as last counted (`null` before the
    /// first count or while nginx cannot be inspected).
    pub old_generations: Option<OldGenerations>,
    /// `[nginx] max_old_generations` (0: no limit).
    pub max_old_generations: u32,
    /// `[nginx] apply`: `reload` or `lua`.
    pub apply_mode: crate::config::ApplyMode,
    /// With `apply = "lua"`: the generation nginx confirmed and the last push error.
    pub lua: Option<super::lua::LuaReport>,
}

/// Where the desired file stands between the render and nginx.
#[derive(Debug, Clone, Serialize)]
pub struct ApplyState {
    /// `in_sync` (nginx runs the desired file), `pending` (waiting for `settle` or
    /// `min_reload_interval`), `held` (waiting for old nginx generations to leave), `retrying` (an apply failed; retried with backoff) or
    /// `render_failed` (the template failed; the last good file stays).
    pub state: &'static str,
    /// What the include file holds: `desired`, `previous` (an older text, still what nginx
    /// runs after a failed apply), `missing`, or `unknown` (nothing rendered yet).
    pub on_disk: &'static str,
    /// nginx confirmed the bytes on disk (false only when a failed apply could not put the
    /// previous file back).
    pub nginx_confirmed: bool,
    /// The pending change only takes servers out of rotation: it does not wait for `settle`.
    pub urgent: bool,
    /// Failed applies in a row.
    pub consecutive_failures: u32,
    /// Seconds until the next attempt, while a change is pending.
    pub next_attempt_secs: Option<f64>,
    /// The error of the last failed apply, while failing.
    pub last_error: Option<String>,
    /// The last render error, while the template fails.
    pub render_error: Option<String>,
    /// Why the pending change is held, while it is.
    pub held: Option<String>,
}

/// One upstream.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamStatus {
    /// Its name.
    pub name: String,
    /// Its balancing method.
    pub balance: Balance,
    /// Every registered endpoint is unhealthy (the `on_all_unhealthy` policy applies).
    pub all_unhealthy: bool,
    /// Its sources.
    pub sources: Vec<SourceStatus>,
    /// Its endpoints, sorted by address.
    pub endpoints: Vec<EndpointStatus>,
    /// A large shrink being held for confirmation, if any.
    pub shrink_held: Option<String>,
}

/// One source.
#[derive(Debug, Clone, Serialize)]
pub struct SourceStatus {
    /// The metric label.
    pub label: String,
    /// The kind.
    pub kind: &'static str,
    /// The last request succeeded.
    pub up: bool,
    /// A snapshot has been delivered.
    pub delivered: bool,
    /// The last error, while stale.
    pub error: Option<String>,
    /// Seconds since the last good snapshot.
    pub last_update_secs_ago: Option<f64>,
    /// Seconds the snapshot has been stale.
    pub stale_secs: Option<f64>,
    /// Snapshots received.
    pub updates: u64,
    /// Entries skipped as invalid in the last snapshot (a second entry for an address
    /// counts too).
    pub skipped: usize,
    /// The first 20 of them by name, each with why it was refused. Names are registry data.
    pub skipped_entries: Vec<SkippedEntry>,
    /// The snapshot in use was saved by an earlier run (or before a config reload), because
    /// the source failed before its first answer: stale until it answers.
    pub from_saved: bool,
    /// With `from_saved`: seconds since that snapshot was saved (`None` when carried over a
    /// config reload).
    pub saved_secs_ago: Option<f64>,
}

/// One endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointStatus {
    /// Its address.
    pub address: Address,
    /// Where it came from (a registry key, a service ID, `servers[1]`).
    pub origin: String,
    /// What the registry says.
    pub registry: RegistryState,
    /// What our probes say: `healthy`, `unhealthy` or `unknown` (`healthy` when probing is off).
    pub health: Health,
    /// How it is rendered: `up` or `down`.
    pub rendered: &'static str,
    /// Why.
    pub verdict: Verdict,
    /// Why it is rendered `down` (or up despite failing probes), as a sentence; `None` for a
    /// server that is up because it is healthy.
    pub why: Option<String>,
    /// The last probe.
    pub last_probe: Option<LastProbe>,
    /// The last health transition.
    pub last_transition: Option<TransitionStatus>,
}

/// A health transition.
#[derive(Debug, Clone, Serialize)]
pub struct TransitionStatus {
    /// The state before.
    pub from: Health,
    /// The state after.
    pub to: Health,
    /// Seconds ago.
    pub secs_ago: f64,
    /// Why, as a sentence.
    pub why: String,
}

/// The outcome of the last apply.
#[derive(Debug, Clone, Serialize)]
pub struct ApplyStatus {
    /// `ok`, `unchanged`, `written` (`once --no-reload`), or a failure label (`test_failed`,
    /// `signal_failed`, `unconfirmed`, `write_failed`).
    pub result: String,
    /// Seconds ago.
    pub secs_ago: f64,
    /// How long it took, in milliseconds.
    pub duration_ms: f64,
    /// What changed, as logged.
    pub changes: String,
    /// The error, with nginx's output, when it failed.
    pub error: Option<String>,
}

/// The last apply, as the controller remembers it.
#[derive(Debug, Clone)]
pub(crate) struct LastApply {
    pub result: String,
    pub at: Instant,
    pub duration: Duration,
    pub changes: String,
    pub error: Option<String>,
}

/// Why a server is rendered as it is, as a sentence: who marked it down and with what.
pub fn why(
    verdict: Verdict,
    registry: &RegistryState,
    health: Health,
    last_probe: Option<&LastProbe>,
) -> Option<String> {
    let probe = || match last_probe {
        Some(p) => format!("its health probe failed: {}", p.detail),
        None => "its health probe has not answered yet".to_owned(),
    };
    match verdict {
        Verdict::Up => None,
        Verdict::RegistryDown => Some(match registry {
            RegistryState::Critical(reason) => format!("the registry marks it critical: {reason}"),
            RegistryState::Passing => "the registry entry sets `down`".to_owned(),
        }),
        Verdict::ProbeDown if health == Health::Unknown => {
            Some("its health probe has not answered yet".to_owned())
        }
        Verdict::ProbeDown => Some(probe()),
        Verdict::FailOpen => Some(format!(
            "{}; rendered up because every endpoint is unhealthy (on_all_unhealthy = fail_open)",
            probe()
        )),
    }
}

fn ago(now: Instant, then: Instant) -> f64 {
    now.saturating_duration_since(then).as_secs_f64()
}

/// Builds the report of one upstream.
pub(crate) fn upstream_status(
    u: &UpstreamState,
    now: Instant,
    shrink_held: Option<String>,
) -> UpstreamStatus {
    let desired = u.desired();
    let endpoints = desired
        .servers
        .iter()
        .filter_map(|s| {
            let e = u.endpoints.get(&s.address)?;
            let h = u.health.get(&s.address);
            let health = match h {
                _ if !u.cfg.health.enabled => Health::Up,
                Some(h) => h.state.health(),
                None => Health::Unknown,
            };
            let last_probe = h.and_then(|h| h.last.clone());
            Some(EndpointStatus {
                address: s.address.clone(),
                origin: e.origin.clone(),
                registry: e.registry.clone(),
                health,
                rendered: if s.down { "down" } else { "up" },
                verdict: s.verdict,
                why: why(s.verdict, &e.registry, health, last_probe.as_ref()),
                last_probe,
                last_transition: h
                    .and_then(|h| h.last_transition.as_ref())
                    .map(|(t, at, why)| TransitionStatus {
                        from: t.from,
                        to: t.to,
                        secs_ago: ago(now, *at),
                        why: why.clone(),
                    }),
            })
        })
        .collect();
    UpstreamStatus {
        name: u.cfg.name.to_string(),
        balance: u.cfg.balance,
        all_unhealthy: desired.all_unhealthy,
        sources: u
            .sources
            .iter()
            .map(|s| SourceStatus {
                label: s.label.clone(),
                kind: s.kind,
                up: s.error.is_none() && s.snapshot.is_some(),
                delivered: s.snapshot.is_some(),
                error: s.error.clone(),
                last_update_secs_ago: s.updated.map(|t| ago(now, t)),
                stale_secs: s.failing_since.map(|t| ago(now, t)),
                updates: s.updates,
                skipped: s.skipped.total,
                skipped_entries: s.skipped.listed.clone(),
                from_saved: s.from_saved,
                saved_secs_ago: s
                    .saved
                    .as_ref()
                    .filter(|_| s.from_saved)
                    .and_then(|saved| saved.saved_at)
                    .and_then(|at| std::time::SystemTime::now().duration_since(at).ok())
                    .map(|d| d.as_secs_f64()),
            })
            .collect(),
        endpoints,
        shrink_held,
    }
}

impl LastApply {
    /// The attempt at `now` that took `took` and ended in `result`, `label` its `/status`
    /// result.
    pub(crate) fn new<T, E: std::fmt::Display>(
        label: &str,
        (now, took): (Instant, Duration),
        changes: &str,
        result: &Result<T, E>,
    ) -> Self {
        LastApply {
            result: label.into(),
            at: now,
            duration: took,
            changes: changes.into(),
            error: result.as_ref().err().map(|e| e.to_string()),
        }
    }

    pub(crate) fn report(&self, now: Instant) -> ApplyStatus {
        ApplyStatus {
            result: self.result.clone(),
            secs_ago: ago(now, self.at),
            duration_ms: self.duration.as_secs_f64() * 1000.0,
            changes: self.changes.clone(),
            error: self.error.clone(),
        }
    }
}

/// What `/healthz` and `/readyz` need: that the loop answers, and whether it is ready. The
/// loop answers it without building a [`StatusReport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pulse {
    /// Every source delivered and the first apply succeeded.
    pub ready: bool,
}

/// A question for the controller loop, answered on its oneshot.
#[derive(Debug)]
pub enum StatusRequest {
    /// The whole report (`/status`, the page).
    Report(oneshot::Sender<StatusReport>),
    /// Only the pulse (`/healthz`, `/readyz`).
    Pulse(oneshot::Sender<Pulse>),
}

/// Asks the running controller for its status; a clone per consumer (admin server, notifier).
#[derive(Debug, Clone)]
pub struct ControllerHandle {
    pub(crate) tx: mpsc::Sender<StatusRequest>,
}

impl ControllerHandle {
    /// A handle and the receiving end the controller answers on.
    pub fn new() -> (Self, mpsc::Receiver<StatusRequest>) {
        let (tx, rx) = mpsc::channel(16);
        (Self { tx }, rx)
    }

    /// The controller's status, or `None` when it does not answer within `timeout` (the loop
    /// is stuck or gone).
    pub async fn status(&self, timeout: Duration) -> Option<StatusReport> {
        self.ask(timeout, StatusRequest::Report).await
    }

    /// The controller's pulse, or `None` when it does not answer within `timeout` (the loop
    /// is stuck or gone: that is what `/healthz` reports).
    pub async fn pulse(&self, timeout: Duration) -> Option<Pulse> {
        self.ask(timeout, StatusRequest::Pulse).await
    }

    async fn ask<T>(
        &self,
        timeout: Duration,
        request: impl FnOnce(oneshot::Sender<T>) -> StatusRequest,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        tokio::time::timeout(timeout, async {
            self.tx.send(request(tx)).await.ok()?;
            rx.await.ok()
        })
        .await
        .ok()
        .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(detail: &str) -> LastProbe {
        LastProbe {
            result: "bad_status",
            detail: detail.into(),
            latency_ms: 1.0,
        }
    }

    #[test]
    fn a_healthy_server_needs_no_reason() {
        assert_eq!(
            why(Verdict::Up, &RegistryState::Passing, Health::Up, None),
            None
        );
    }

    #[test]
    fn a_critical_registry_entry_says_what_the_registry_said() {
        let r = RegistryState::Critical("maintenance: deploying v2".into());
        assert_eq!(
            why(Verdict::RegistryDown, &r, Health::Up, None).unwrap(),
            "the registry marks it critical: maintenance: deploying v2"
        );
        assert_eq!(
            why(
                Verdict::RegistryDown,
                &RegistryState::Passing,
                Health::Up,
                None
            )
            .unwrap(),
            "the registry entry sets `down`"
        );
    }

    #[test]
    fn a_failing_probe_says_how_it_failed() {
        let p = probe("status 503");
        assert_eq!(
            why(
                Verdict::ProbeDown,
                &RegistryState::Passing,
                Health::Down,
                Some(&p)
            )
            .unwrap(),
            "its health probe failed: status 503"
        );
        assert_eq!(
            why(
                Verdict::ProbeDown,
                &RegistryState::Passing,
                Health::Unknown,
                None
            )
            .unwrap(),
            "its health probe has not answered yet"
        );
        assert!(why(
            Verdict::FailOpen,
            &RegistryState::Passing,
            Health::Down,
            Some(&p)
        )
        .unwrap()
        .contains("on_all_unhealthy = fail_open"));
    }
}
