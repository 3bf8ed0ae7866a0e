//! The controller's state of one upstream: source snapshots and endpoint health.
//!
//! Pure: time comes in as an argument, nothing here does I/O, so the rules for readiness,
//! merging and hysteresis are unit-tested without a runtime.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::UpstreamConfig;
use crate::decide::{decide, merge, Desired};
use crate::health::{Health, HealthState, ProbeOutcome, Transition};
use crate::model::{Address, Endpoint, RegistryState};
use crate::sources::SourceEvent;

/// What is known of one source.
#[derive(Debug, Clone, Serialize)]
pub struct SourceState {
    /// The metric label (`consul`, `static#2`).
    pub label: String,
    /// The kind.
    pub kind: &'static str,
    /// The last good snapshot; `None` until the first one.
    #[serde(skip)]
    pub snapshot: Option<Vec<Endpoint>>,
    /// The error of the last request when the snapshot is stale.
    pub error: Option<String>,
    /// When the last good snapshot arrived.
    #[serde(skip)]
    pub updated: Option<Instant>,
    /// When the source started failing (stale since).
    #[serde(skip)]
    pub failing_since: Option<Instant>,
    /// Snapshots received.
    pub updates: u64,
    /// Entries skipped as invalid in the last snapshot.
    pub skipped: usize,
}

/// The last probe of an endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct LastProbe {
    /// `ok`, `bad_status`, `timeout` or `error`.
    pub result: &'static str,
    /// Detail: the status code, the error text.
    pub detail: String,
    /// How long it took, in milliseconds.
    pub latency_ms: f64,
}

/// One endpoint's health as the controller tracks it.
#[derive(Debug, Clone)]
pub struct EndpointHealth {
    /// The hysteresis state machine.
    pub state: HealthState,
    /// When the endpoint was first seen (first probes are awaited until a grace period after).
    pub since: Instant,
    /// The last probe result.
    pub last: Option<LastProbe>,
    /// The last transition, when, and why.
    pub last_transition: Option<(Transition, Instant, String)>,
}

/// What a source update changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delta {
    /// Addresses that appeared.
    pub added: Vec<Address>,
    /// Addresses that went away.
    pub removed: Vec<Address>,
    /// Whether anything that affects rendering changed (attributes, registry state, membership).
    pub changed: bool,
}

/// One upstream's state.
#[derive(Debug, Clone)]
pub struct UpstreamState {
    /// Its configuration.
    pub cfg: UpstreamConfig,
    /// One entry per configured source.
    pub sources: Vec<SourceState>,
    /// The merged endpoints of every source.
    pub endpoints: BTreeMap<Address, Endpoint>,
    /// Health per endpoint (only while probing is enabled).
    pub health: BTreeMap<Address, EndpointHealth>,
    /// Whether the "Kotaemon has no /health" hint was logged.
    pub hinted_404: bool,
    /// The generation of the running source tasks; updates from other generations are stale.
    pub generation: u64,
}

fn describe(outcome: &ProbeOutcome) -> String {
    match outcome {
        ProbeOutcome::Ok => "ok".into(),
        ProbeOutcome::BadStatus(code) => format!("status {code}"),
        ProbeOutcome::BodyMismatch => "body did not contain expect_body".into(),
        ProbeOutcome::Timeout => "timed out".into(),
        ProbeOutcome::Error(e) => e.clone(),
    }
}

impl UpstreamState {
    /// A fresh state: no snapshots, no health.
    pub fn new(cfg: UpstreamConfig, labels: Vec<String>) -> Self {
        let sources = cfg
            .sources
            .iter()
            .zip(labels)
            .map(|(s, label)| SourceState {
                label,
                kind: s.kind(),
                snapshot: None,
                error: None,
                updated: None,
                failing_since: None,
                updates: 0,
                skipped: 0,
            })
            .collect();
        Self {
            cfg,
            sources,
            endpoints: BTreeMap::new(),
            health: BTreeMap::new(),
            hinted_404: false,
            generation: 0,
        }
    }

    /// Whether every source has delivered a first snapshot.
    pub fn sources_ready(&self) -> bool {
        self.sources.iter().all(|s| s.snapshot.is_some())
    }

    /// The addresses to probe.
    pub fn addresses(&self) -> BTreeSet<Address> {
        self.endpoints.keys().cloned().collect()
    }

    /// Takes a source event. Returns what changed in the merged endpoints.
    pub fn on_source(&mut self, index: usize, event: SourceEvent, now: Instant) -> Delta {
        let Some(src) = self.sources.get_mut(index) else {
            return Delta::default();
        };
        match event {
            SourceEvent::Failed { error } => {
                src.error = Some(error);
                src.failing_since.get_or_insert(now);
                Delta::default()
            }
            SourceEvent::Snapshot {
                mut endpoints,
                skipped,
            } => {
                endpoints.sort_by(|a, b| a.address.cmp(&b.address));
                src.snapshot = Some(endpoints);
                src.error = None;
                src.failing_since = None;
                src.updated = Some(now);
                src.updates += 1;
                src.skipped = skipped;
                self.remerge(now)
            }
        }
    }

    fn remerge(&mut self, now: Instant) -> Delta {
        let merged = merge(self.sources.iter().filter_map(|s| s.snapshot.as_deref()));
        let before: BTreeSet<&Address> = self.endpoints.keys().collect();
        let after: BTreeSet<&Address> = merged.keys().collect();
        let delta = Delta {
            added: after.difference(&before).map(|a| (*a).clone()).collect(),
            removed: before.difference(&after).map(|a| (*a).clone()).collect(),
            changed: merged != self.endpoints,
        };
        for a in &delta.removed {
            self.health.remove(a);
        }
        if self.cfg.health.enabled {
            for a in &delta.added {
                self.health
                    .entry(a.clone())
                    .or_insert_with(|| EndpointHealth {
                        state: HealthState::new(),
                        since: now,
                        last: None,
                        last_transition: None,
                    });
            }
        }
        self.endpoints = merged;
        delta
    }

    /// Forgets every probe verdict (the health config changed): endpoints start over from
    /// `Unknown` and are waited for as new ones are.
    pub fn reset_health(&mut self, now: Instant) {
        self.hinted_404 = false;
        self.health = if self.cfg.health.enabled {
            self.endpoints
                .keys()
                .map(|a| {
                    let fresh = EndpointHealth {
                        state: HealthState::new(),
                        since: now,
                        last: None,
                        last_transition: None,
                    };
                    (a.clone(), fresh)
                })
                .collect()
        } else {
            BTreeMap::new()
        };
    }

    /// Takes a probe result. Returns the transition it caused, with a reason, if any.
    pub fn on_probe(
        &mut self,
        address: &Address,
        outcome: &ProbeOutcome,
        latency: Duration,
        now: Instant,
    ) -> Option<(Transition, String)> {
        let (rise, fall) = (self.cfg.health.rise, self.cfg.health.fall);
        let h = self.health.get_mut(address)?;
        h.last = Some(LastProbe {
            result: outcome.label(),
            detail: describe(outcome),
            latency_ms: latency.as_secs_f64() * 1000.0,
        });
        let t = h.state.observe(outcome.is_ok(), rise, fall)?;
        let (_, streak) = h.state.streak();
        let why = match (t.from, outcome.is_ok()) {
            (Health::Unknown, _) => format!("first probe: {}", describe(outcome)),
            (_, true) => format!("{streak} consecutive successful probes (rise = {rise})"),
            (_, false) => format!(
                "{streak} consecutive failed probes (fall = {fall}), last: {}",
                describe(outcome)
            ),
        };
        h.last_transition = Some((t, now, why.clone()));
        Some((t, why))
    }

    /// Whether every endpoint's last probe answered 404 (the "no /health on Kotaemon" case).
    pub fn all_404(&self) -> bool {
        !self.health.is_empty()
            && self
                .health
                .values()
                .all(|h| h.last.as_ref().is_some_and(|l| l.detail == "status 404"))
    }

    /// The earliest moment a still-unprobed endpoint stops being waited for, if one is pending.
    pub fn pending_first_probe(&self, now: Instant) -> Option<Instant> {
        let grace = self.cfg.health.timeout + Duration::from_millis(500);
        self.health
            .values()
            .filter(|h| h.state.health() == Health::Unknown)
            .map(|h| h.since + grace)
            .filter(|deadline| *deadline > now)
            .min()
    }

    /// The servers this upstream should render now.
    pub fn desired(&self) -> Desired {
        decide(&self.cfg, &self.endpoints, |a| {
            self.health
                .get(a)
                .map_or(Health::Unknown, |h| h.state.health())
        })
    }

    /// Endpoint counts by state for `upstreamd_endpoints`: healthy, unhealthy (our probe or
    /// the registry says so), unknown (not probed yet).
    pub fn counts(&self) -> [(&'static str, usize); 3] {
        let mut c = [0usize; 3];
        for (a, e) in &self.endpoints {
            let registry_down = e.attrs.down || matches!(e.registry, RegistryState::Critical(_));
            let health = match self.health.get(a) {
                _ if !self.cfg.health.enabled => Health::Up,
                Some(h) => h.state.health(),
                None => Health::Unknown,
            };
            let i = match (registry_down, health) {
                (true, _) | (_, Health::Down) => 1,
                (_, Health::Up) => 0,
                (_, Health::Unknown) => 2,
            };
            c[i] += 1;
        }
        [("healthy", c[0]), ("unhealthy", c[1]), ("unknown", c[2])]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Balance;
    use crate::config::{SourceConfig, StaticSource};
    use crate::decide::tests::{ep, upstream};

    fn state() -> UpstreamState {
        let mut cfg = upstream("k", Balance::RoundRobin);
        cfg.sources = vec![
            SourceConfig::Static(StaticSource { servers: vec![] }),
            SourceConfig::Static(StaticSource { servers: vec![] }),
        ];
        UpstreamState::new(cfg, vec!["static#1".into(), "static#2".into()])
    }

    fn snap(list: &[&str]) -> SourceEvent {
        SourceEvent::Snapshot {
            endpoints: list.iter().map(|a| ep(a)).collect(),
            skipped: 0,
        }
    }

    #[test]
    fn ready_only_once_every_source_delivered() {
        let mut s = state();
        let now = Instant::now();
        s.on_source(0, snap(&["127.0.0.2:80"]), now);
        assert!(!s.sources_ready());
        s.on_source(1, snap(&[]), now);
        assert!(s.sources_ready());
    }

    #[test]
    fn a_failure_keeps_the_last_snapshot() {
        let mut s = state();
        let now = Instant::now();
        s.on_source(0, snap(&["127.0.0.2:80"]), now);
        let d = s.on_source(
            0,
            SourceEvent::Failed {
                error: "refused".into(),
            },
            now,
        );
        assert!(!d.changed);
        assert_eq!(s.endpoints.len(), 1);
        assert_eq!(s.sources[0].error.as_deref(), Some("refused"));
    }

    #[test]
    fn an_identical_snapshot_changes_nothing() {
        let mut s = state();
        let now = Instant::now();
        assert!(
            s.on_source(0, snap(&["127.0.0.2:80", "127.0.0.3:80"]), now)
                .changed
        );
        assert!(
            !s.on_source(0, snap(&["127.0.0.3:80", "127.0.0.2:80"]), now)
                .changed
        );
    }

    #[test]
    fn new_endpoints_are_waited_for_until_their_first_probe_or_the_grace() {
        let mut s = state();
        let now = Instant::now();
        let d = s.on_source(0, snap(&["127.0.0.2:80"]), now);
        assert_eq!(d.added.len(), 1);
        let deadline = s.pending_first_probe(now).unwrap();
        assert_eq!(deadline, now + Duration::from_millis(1500));
        assert_eq!(s.pending_first_probe(deadline), None);
        let a: Address = "127.0.0.2:80".parse().unwrap();
        let (t, why) = s
            .on_probe(&a, &ProbeOutcome::Ok, Duration::from_millis(1), now)
            .unwrap();
        assert_eq!(t.to, Health::Up);
        assert!(why.starts_with("first probe"));
        assert_eq!(s.pending_first_probe(now), None);
    }

    #[test]
    fn a_single_failed_probe_below_fall_changes_nothing() {
        let mut s = state();
        let now = Instant::now();
        s.on_source(0, snap(&["127.0.0.2:80"]), now);
        let a: Address = "127.0.0.2:80".parse().unwrap();
        s.on_probe(&a, &ProbeOutcome::Ok, Duration::ZERO, now);
        assert!(s
            .on_probe(&a, &ProbeOutcome::Timeout, Duration::ZERO, now)
            .is_none());
        assert!(s
            .on_probe(&a, &ProbeOutcome::Timeout, Duration::ZERO, now)
            .is_none());
        let (t, why) = s
            .on_probe(&a, &ProbeOutcome::Timeout, Duration::ZERO, now)
            .unwrap();
        assert_eq!(t.to, Health::Down);
        assert_eq!(
            why,
            "3 consecutive failed probes (fall = 3), last: timed out"
        );
    }

    #[test]
    fn removed_endpoints_lose_their_health() {
        let mut s = state();
        let now = Instant::now();
        s.on_source(0, snap(&["127.0.0.2:80"]), now);
        let d = s.on_source(0, snap(&[]), now);
        assert_eq!(d.removed.len(), 1);
        assert!(s.health.is_empty());
    }

    #[test]
    fn every_404_is_noticed() {
        let mut s = state();
        let now = Instant::now();
        s.on_source(0, snap(&["127.0.0.2:80", "127.0.0.3:80"]), now);
        for a in s.addresses() {
            assert!(!s.all_404());
            s.on_probe(&a, &ProbeOutcome::BadStatus(404), Duration::ZERO, now);
        }
        assert!(s.all_404());
    }
}
