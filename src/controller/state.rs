//! The controller's state of one upstream: source snapshots, endpoint health, the shrink
//! guard and snapshots saved by an earlier run.
//!
//! Pure: time comes in as an argument, nothing here does I/O, so the rules for readiness,
//! merging, hysteresis and holding a large shrink are unit-tested without a runtime.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::time::Instant;

use crate::config::UpstreamConfig;
use crate::decide::{decide, merge, Desired};
use crate::health::{Health, HealthState, ProbeOutcome, Transition};
use crate::model::{Address, Endpoint, RegistryState};
use crate::sources::{Skipped, SourceEvent};

mod shrink;

use shrink::too_large_a_shrink;
pub use shrink::{HeldShrink, ShrinkEvent};

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
    /// Entries skipped as invalid in the last snapshot: how many, and the first few by name.
    pub skipped: Skipped,
    /// A snapshot kept from before this state existed: saved on disk by an earlier run
    /// (`state_dir`), or the source's snapshot before a config reload. Used when the source
    /// fails before its first answer, and as the baseline the shrink guard compares against
    /// until then.
    #[serde(skip)]
    pub saved: Option<SavedSnapshot>,
    /// The snapshot in use is `saved`, not an answer of this run: stale until the source answers.
    pub from_saved: bool,
    /// An answer that would drop too many endpoints, held for `shrink_hold`.
    #[serde(skip)]
    pub held: Option<HeldShrink>,
}

/// A snapshot from before this run or this config.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedSnapshot {
    /// The endpoints.
    pub endpoints: Vec<Endpoint>,
    /// When it was saved; `None` for a snapshot carried over a config reload.
    pub saved_at: Option<SystemTime>,
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
    /// The source's snapshot in use changed to an answer of this run: worth saving.
    pub snapshot_changed: bool,
    /// The shrink guard's part.
    pub shrink: ShrinkEvent,
    /// The source failed before answering and its saved snapshot is now in use.
    pub started_from_saved: bool,
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
    /// The addresses the include file on disk served for this upstream when it started: the
    /// shrink guard's baseline for the first full set of answers, so a restart without
    /// `state_dir` (or with an unreadable snapshot) does not forget what nginx serves.
    pub on_disk: BTreeSet<Address>,
    /// No endpoint in `health` is awaited for its first probe after this moment (the latest
    /// grace deadline handed out), so that the loop's check on every wake-up costs nothing
    /// once the first probes are in, instead of a walk over every endpoint per probe result.
    pub(super) first_probe_horizon: Option<Instant>,
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
                skipped: Skipped::none(),
                saved: None,
                from_saved: false,
                held: None,
            })
            .collect();
        Self {
            cfg,
            sources,
            endpoints: BTreeMap::new(),
            health: BTreeMap::new(),
            hinted_404: false,
            generation: 0,
            on_disk: BTreeSet::new(),
            first_probe_horizon: None,
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
    ///
    /// A snapshot that would drop more than `max_shrink` of the upstream's endpoints is held
    /// (see [`HeldShrink`]) instead of applied; [`release_held`](Self::release_held) applies
    /// it once `shrink_hold` has passed. A failure before the first answer starts from the
    /// saved snapshot, if there is one.
    pub fn on_source(&mut self, index: usize, event: SourceEvent, now: Instant) -> Delta {
        if index >= self.sources.len() {
            return Delta::default();
        }
        match event {
            SourceEvent::Failed { error } => {
                let src = &mut self.sources[index];
                src.error = Some(error);
                src.failing_since.get_or_insert(now);
                match (&src.snapshot, &src.saved) {
                    (None, Some(saved)) => {
                        src.snapshot = Some(saved.endpoints.clone());
                        src.from_saved = true;
                        Delta {
                            started_from_saved: true,
                            ..self.remerge(now)
                        }
                    }
                    _ => Delta::default(),
                }
            }
            SourceEvent::Snapshot {
                mut endpoints,
                skipped,
                ..
            } => {
                endpoints.sort_by(|a, b| a.address.cmp(&b.address));
                let (before, after, removed) = self.shrink_of(index, &endpoints);
                let removed_count = removed.len();
                let src = &mut self.sources[index];
                src.error = None;
                src.failing_since = None;
                src.updated = Some(now);
                src.updates += 1;
                // A static list is the operator's own word: only registry answers are guarded.
                if src.kind != "static" && too_large_a_shrink(&self.cfg, before, removed_count) {
                    let shrink = if src.held.is_some() {
                        ShrinkEvent::StillHeld
                    } else {
                        ShrinkEvent::Held
                    };
                    let since = src.held.as_ref().map_or(now, |h| h.since);
                    src.held = Some(HeldShrink {
                        endpoints,
                        skipped,
                        since,
                        before,
                        after,
                        removed,
                    });
                    return Delta {
                        shrink,
                        ..Delta::default()
                    };
                }
                let shrink = match src.held.take() {
                    Some(_) => ShrinkEvent::Dropped,
                    None => ShrinkEvent::None,
                };
                Delta {
                    shrink,
                    ..self.take_snapshot(index, endpoints, skipped, now)
                }
            }
        }
    }

    /// Applies an answer as the source's snapshot.
    fn take_snapshot(
        &mut self,
        index: usize,
        endpoints: Vec<Endpoint>,
        skipped: Skipped,
        now: Instant,
    ) -> Delta {
        let src = &mut self.sources[index];
        let known = src
            .snapshot
            .as_ref()
            .or(src.saved.as_ref().map(|s| &s.endpoints));
        let snapshot_changed = known != Some(&endpoints);
        src.snapshot = Some(endpoints);
        src.from_saved = false;
        src.skipped = skipped;
        Delta {
            snapshot_changed,
            ..self.remerge(now)
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
            ..Delta::default()
        };
        for a in &delta.removed {
            self.health.remove(a);
        }
        if self.cfg.health.enabled && !delta.added.is_empty() {
            self.await_first_probes(now);
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
        self.await_first_probes(now);
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

    /// How long a new endpoint's first probe is waited for.
    fn first_probe_grace(&self) -> Duration {
        self.cfg.health.timeout + Duration::from_millis(500)
    }

    /// Endpoints entering `health` at `now` are awaited until `now` + the grace.
    fn await_first_probes(&mut self, now: Instant) {
        let until = now + self.first_probe_grace();
        self.first_probe_horizon = self.first_probe_horizon.max(Some(until));
    }

    /// The earliest moment a still-unprobed endpoint stops being waited for, if one is pending.
    pub fn pending_first_probe(&self, now: Instant) -> Option<Instant> {
        if !self.first_probe_horizon.is_some_and(|until| until > now) {
            return None;
        }
        let grace = self.first_probe_grace();
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
    pub fn counts(&self) -> [(Health, usize); 3] {
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
        [
            (Health::Up, c[0]),
            (Health::Down, c[1]),
            (Health::Unknown, c[2]),
        ]
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::config::Balance;
    use crate::config::{SourceConfig, StaticSource};
    use crate::decide::tests::{ep, upstream};

    pub(super) fn state() -> UpstreamState {
        let mut cfg = upstream("k", Balance::RoundRobin);
        cfg.sources = vec![
            SourceConfig::Static(StaticSource { servers: vec![] }),
            SourceConfig::Static(StaticSource { servers: vec![] }),
        ];
        UpstreamState::new(cfg, vec!["static#1".into(), "static#2".into()])
    }

    pub(super) fn snap(list: &[&str]) -> SourceEvent {
        SourceEvent::Snapshot {
            endpoints: list.iter().map(|a| ep(a)).collect(),
            skipped: Skipped::none(),
            newly_skipped: 0,
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
    fn an_endpoint_added_after_the_first_probes_is_awaited_for_its_own() {
        let mut s = state();
        let start = Instant::now();
        s.on_source(0, snap(&["127.0.0.2:80"]), start);
        let a: Address = "127.0.0.2:80".parse().unwrap();
        s.on_probe(&a, &ProbeOutcome::Ok, Duration::from_millis(1), start);
        let later = start + Duration::from_secs(10);
        assert_eq!(s.pending_first_probe(later), None);
        s.on_source(0, snap(&["127.0.0.2:80", "127.0.0.3:80"]), later);
        assert_eq!(
            s.pending_first_probe(later),
            Some(later + Duration::from_millis(1500))
        );
        // A health config change starts every endpoint over: each is awaited again.
        let b: Address = "127.0.0.3:80".parse().unwrap();
        s.on_probe(&b, &ProbeOutcome::Ok, Duration::from_millis(1), later);
        let reset = later + Duration::from_secs(10);
        s.reset_health(reset);
        assert_eq!(
            s.pending_first_probe(reset),
            Some(reset + Duration::from_millis(1500))
        );
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

    /// Two registry sources (only registry answers are guarded).
    pub(super) fn guarded(max_shrink: f64, hold: Duration) -> UpstreamState {
        let mut s = state();
        s.cfg.max_shrink = max_shrink;
        s.cfg.shrink_hold = hold;
        for (src, kind) in s.sources.iter_mut().zip(["consul", "etcd"]) {
            src.kind = kind;
            src.label = kind.into();
        }
        s
    }

    pub(super) const FOUR: [&str; 4] = [
        "127.0.0.2:80",
        "127.0.0.3:80",
        "127.0.0.4:80",
        "127.0.0.5:80",
    ];

    pub(super) fn rendered(s: &UpstreamState) -> Vec<String> {
        s.endpoints.keys().map(ToString::to_string).collect()
    }

    fn saved(list: &[&str]) -> Option<SavedSnapshot> {
        Some(SavedSnapshot {
            endpoints: list.iter().map(|a| ep(a)).collect(),
            saved_at: Some(SystemTime::UNIX_EPOCH),
        })
    }

    #[test]
    fn a_source_that_fails_before_answering_starts_from_its_saved_snapshot() {
        let mut s = state();
        s.sources[0].saved = saved(&FOUR[..2]);
        let t0 = Instant::now();
        s.on_source(1, snap(&[]), t0);
        assert!(!s.sources_ready());
        let d = s.on_source(
            0,
            SourceEvent::Failed {
                error: "refused".into(),
            },
            t0,
        );
        assert!(d.started_from_saved && d.changed && !d.snapshot_changed);
        assert!(s.sources_ready(), "rendering does not wait for the outage");
        assert!(s.sources[0].from_saved);
        assert_eq!(s.sources[0].error.as_deref(), Some("refused"));
        assert_eq!(rendered(&s).len(), 2);

        // A second failure changes nothing; the live answer replaces the saved one.
        let failed = SourceEvent::Failed {
            error: "refused".into(),
        };
        assert_eq!(s.on_source(0, failed, t0), Delta::default());
        let d = s.on_source(0, snap(&FOUR[..3]), t0);
        assert!(d.changed && d.snapshot_changed);
        assert!(!s.sources[0].from_saved && s.sources[0].error.is_none());
    }

    #[test]
    fn a_saved_snapshot_is_not_used_when_the_source_answers() {
        let mut s = state();
        s.sources[0].saved = saved(&FOUR[..2]);
        let t0 = Instant::now();
        let d = s.on_source(0, snap(&FOUR[..2]), t0);
        assert!(d.changed, "the first answer of this run");
        assert!(
            !d.snapshot_changed,
            "equal to what is saved: nothing to write"
        );
        assert!(!s.sources[0].from_saved);
        let d = s.on_source(0, snap(&FOUR[..1]), t0);
        assert!(d.snapshot_changed);
    }

    #[test]
    fn the_saved_snapshot_is_the_shrink_baseline_before_the_first_answer() {
        // A restart while the token lost service:read: the first answer is empty.
        let mut s = guarded(0.5, Duration::from_secs(30));
        s.sources[0].saved = saved(&FOUR);
        let t0 = Instant::now();
        s.on_source(1, snap(&[]), t0);
        let d = s.on_source(0, snap(&[]), t0);
        assert_eq!(d.shrink, ShrinkEvent::Held);
        assert!(
            !s.sources_ready(),
            "nothing to render from until the hold ends"
        );
        let (_, d) = s.release_held(t0 + Duration::from_secs(30)).unwrap();
        assert!(d.snapshot_changed);
        assert!(s.sources_ready() && s.endpoints.is_empty());
    }

    #[test]
    fn the_first_full_set_of_answers_is_measured_against_the_file_on_disk() {
        // 11 servers in the file, a restart without state_dir, a registry that came back empty.
        let mut s = guarded(0.5, Duration::from_secs(30));
        s.on_disk = FOUR.iter().map(|a| a.parse().unwrap()).collect();
        let t0 = Instant::now();
        s.on_source(1, snap(&[]), t0);
        let d = s.on_source(0, snap(&[]), t0);
        assert_eq!(d.shrink, ShrinkEvent::Held);
        assert!(!s.sources_ready(), "nothing rendered while held");
        let (_, d) = s.release_held(t0 + Duration::from_secs(30)).unwrap();
        assert_eq!(d.removed.len(), 4, "the log names what leaves nginx");

        // A first answer that keeps most of the file passes at once.
        let mut s = guarded(0.5, Duration::from_secs(30));
        s.on_disk = FOUR.iter().map(|a| a.parse().unwrap()).collect();
        s.on_source(1, snap(&[]), t0);
        assert_eq!(
            s.on_source(0, snap(&FOUR[..2]), t0).shrink,
            ShrinkEvent::None
        );
        assert!(s.sources_ready());
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
