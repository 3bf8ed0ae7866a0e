//! What the loop does with each event: a source update (membership, the shrink guard, saved
//! snapshots), a held shrink coming due, a probe result. Each marks the state dirty when the
//! file may change; none renders or applies.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::state::{self, ShrinkEvent, UpstreamState};
use super::{saved, Controller};
use crate::events::{
    EndpointsCounted, Event, HealthChanged, ProbeFinished, ShrinkHoldMeasured, SourceAnswered,
    SourceFailed,
};
use crate::health::ProbeReport;
use crate::metrics::labels::ProbeResult;
use crate::nginx::Nginx;
use crate::sources::{SourceEvent, SourceKey, SourceUpdate};

impl<N: Nginx> Controller<N> {
    fn upstream_mut(&mut self, key: &SourceKey) -> Option<&mut UpstreamState> {
        self.upstreams
            .iter_mut()
            .find(|u| u.cfg.name == key.upstream && u.generation == key.generation)
    }

    pub(super) fn on_source(&mut self, update: SourceUpdate) {
        let now = Instant::now();
        let metrics = Arc::clone(&self.metrics);
        let SourceUpdate { key, event } = update;
        let Some(u) = self.upstream_mut(&key) else {
            return;
        };
        let was_failing = u.sources.get(key.index).map(|s| s.error.is_some());
        match &event {
            SourceEvent::Snapshot {
                skipped,
                newly_skipped,
                ..
            } => SourceAnswered {
                upstream: &key.upstream,
                source: &key.label,
                skipped: skipped.total,
                newly_skipped: *newly_skipped,
                recovered: was_failing == Some(true),
            }
            .emit(&metrics),
            SourceEvent::Failed { error } => SourceFailed {
                upstream: &key.upstream,
                source: &key.label,
                error,
                first: was_failing == Some(false),
            }
            .emit(&metrics),
        }
        let delta = u.on_source(key.index, event, now);
        self.after_source(&key, &delta, now);
        let Some(u) = self.upstream_mut(&key) else {
            return;
        };
        if !delta.changed {
            return;
        }
        if !delta.added.is_empty() || !delta.removed.is_empty() {
            tracing::info!(
                upstream = %key.upstream, source = %key.label,
                added = ?delta.added.iter().map(ToString::to_string).collect::<Vec<_>>(),
                removed = ?delta.removed.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "Registry membership changed."
            );
        }
        let (name, health, addresses) = (u.cfg.name.clone(), u.cfg.health.clone(), u.addresses());
        self.prober.sync(&name, &health, &addresses);
        self.gauges_stale = true;
        self.dirty = true;
    }

    /// The shrink guard's log lines and gauge, the saved-snapshot start, and saving a new
    /// snapshot, for one source update.
    fn after_source(&mut self, key: &SourceKey, delta: &state::Delta, now: Instant) {
        let Some(u) = self.upstreams.iter().find(|u| u.cfg.name == key.upstream) else {
            return;
        };
        let (name, label) = (key.upstream.as_str(), key.label.as_str());
        let src = &u.sources[key.index];
        match delta.shrink {
            ShrinkEvent::Held => {
                let held = src.held.as_ref();
                tracing::warn!(
                    upstream = name, source = label,
                    before = held.map_or(0, |h| h.before), after = held.map_or(0, |h| h.after),
                    max_shrink = u.cfg.max_shrink, hold = %humantime::format_duration(u.cfg.shrink_hold),
                    "SHRINK HELD: the source answered without most of the upstream's endpoints; not applying it for shrink_hold (a registry losing data, or an ACL token that lost read access, looks like this). A deliberate scale-down passes when the hold ends."
                );
            }
            ShrinkEvent::Dropped => tracing::info!(
                upstream = name,
                source = label,
                "The held shrink is dropped: the source answered with the endpoints again."
            ),
            ShrinkEvent::StillHeld | ShrinkEvent::None => {}
        }
        if delta.started_from_saved {
            let age = src
                .saved
                .as_ref()
                .and_then(|s| s.saved_at)
                .and_then(|at| SystemTime::now().duration_since(at).ok())
                .map(|d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string());
            tracing::warn!(upstream = name, source = label,
                endpoints = src.snapshot.as_ref().map_or(0, Vec::len),
                saved_ago = age.as_deref().unwrap_or("before the config reload"),
                "The source failed before its first answer; starting from its saved snapshot (stale until it answers).");
        }
        if delta.snapshot_changed {
            self.save_snapshot(key.upstream.clone(), key.index);
        }
        self.update_shrink_gauge(&key.upstream, now);
    }

    pub(super) fn update_shrink_gauge(&self, upstream: &crate::model::UpstreamName, now: Instant) {
        if let Some(u) = self.upstreams.iter().find(|u| &u.cfg.name == upstream) {
            ShrinkHoldMeasured {
                upstream,
                held: u.shrink_held(now).is_some(),
            }
            .emit(&self.metrics);
        }
    }

    /// Queues the snapshot of source `index` of `upstream` for `state_dir`.
    fn save_snapshot(&self, upstream: crate::model::UpstreamName, index: usize) {
        let Some(saver) = &self.saver else { return };
        let Some(u) = self.upstreams.iter().find(|u| u.cfg.name == upstream) else {
            return;
        };
        let (Some(scfg), Some(src)) = (u.cfg.sources.get(index), u.sources.get(index)) else {
            return;
        };
        if let (Some(identity), Some(snapshot)) = (saved::identity(scfg), &src.snapshot) {
            saver.save(&upstream, &src.label, &identity, snapshot);
        }
    }

    /// Applies held shrinks whose `shrink_hold` has passed.
    pub(super) fn release_holds(&mut self, now: Instant) {
        for i in 0..self.upstreams.len() {
            let Some((released, delta)) = self.upstreams[i].release_held(now) else {
                continue;
            };
            let u = &self.upstreams[i];
            let name = u.cfg.name.clone();
            for &index in &released {
                tracing::warn!(upstream = %name, source = %u.sources[index].label,
                    removed = ?delta.removed.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "The shrink held for shrink_hold is now applied.");
            }
            let (health, addresses) = (u.cfg.health.clone(), u.addresses());
            if delta.snapshot_changed {
                for &index in &released {
                    self.save_snapshot(name.clone(), index);
                }
            }
            self.update_shrink_gauge(&name, now);
            if delta.changed {
                self.prober.sync(&name, &health, &addresses);
                self.update_gauges();
                self.dirty = true;
            }
        }
    }

    pub(super) fn on_probe(&mut self, r: ProbeReport) {
        let now = Instant::now();
        let Some(u) = self.upstreams.iter_mut().find(|u| u.cfg.name == r.upstream) else {
            return;
        };
        ProbeFinished {
            upstream: &r.upstream,
            result: ProbeResult::from(&r.outcome),
            latency: r.latency,
        }
        .emit(&self.metrics);
        let name = r.upstream.as_str();
        let transition = u.on_probe(&r.address, &r.outcome, r.latency, now);
        if !u.hinted_404 && u.all_404() {
            u.hinted_404 = true;
            tracing::warn!(upstream = name, path = %u.cfg.health.path,
                "Every endpoint answers 404 on the health path. Kotaemon has no /health: set [upstream.health] path = \"/queue/status\".");
        }
        if let Some((t, why)) = transition {
            HealthChanged {
                upstream: &r.upstream,
                endpoint: &r.address,
                from: t.from,
                to: t.to,
                why: &why,
            }
            .emit(&self.metrics);
            self.gauges_stale = true;
            self.dirty = true;
        }
    }

    pub(super) fn update_gauges(&self) {
        for u in &self.upstreams {
            EndpointsCounted {
                upstream: &u.cfg.name,
                counts: u.counts(),
            }
            .emit(&self.metrics);
        }
    }
}
