//! The shrink guard of one upstream: a source answer that drops more than `max_shrink` of
//! the endpoints is held for `shrink_hold` before it applies.

use std::collections::BTreeSet;

use tokio::time::Instant;

use super::{Delta, SourceState, UpstreamState};
use crate::config::UpstreamConfig;
use crate::decide::merge;
use crate::model::{Address, Endpoint};
use crate::sources::Skipped;

/// A source answer held by the shrink guard.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldShrink {
    /// The latest answer, applied when the hold ends.
    pub endpoints: Vec<Endpoint>,
    /// Entries it skipped as invalid.
    pub skipped: Skipped,
    /// When the first answer of this hold arrived (later answers that still shrink too much
    /// replace `endpoints` but keep the clock running).
    pub since: Instant,
    /// The upstream's endpoints before, and if the answer were applied.
    pub before: usize,
    /// The upstream's endpoints if the answer were applied.
    pub after: usize,
    /// The addresses the answer would remove, for the log when it is applied.
    pub removed: Vec<Address>,
}

/// What a source update did to a shrink hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ShrinkEvent {
    /// No hold involved.
    #[default]
    None,
    /// The answer drops too much and a hold starts now.
    Held,
    /// The answer still drops too much; the hold that was running goes on.
    StillHeld,
    /// A hold was running and this answer does not drop too much: the hold is dropped.
    Dropped,
}

/// Whether dropping `removed` of `before` endpoints is more than `max_shrink` allows.
/// `shrink_hold = "0s"` turns the guard off; an upstream with no endpoints cannot shrink.
pub(super) fn too_large_a_shrink(cfg: &UpstreamConfig, before: usize, removed: usize) -> bool {
    !cfg.shrink_hold.is_zero() && before > 0 && removed as f64 > cfg.max_shrink * before as f64
}

impl UpstreamState {
    /// For an answer of source `index`: the upstream's endpoint count before, after, and the
    /// addresses it would remove. Before the first answers, "before" counts the saved
    /// snapshots, so a restart or a reload does not reset the guard's baseline; and the answer
    /// that completes the first full set is also measured against the file on disk
    /// (`on_disk`), which is what nginx serves.
    pub(super) fn shrink_of(
        &self,
        index: usize,
        answer: &[Endpoint],
    ) -> (usize, usize, Vec<Address>) {
        fn known(s: &SourceState) -> Option<&[Endpoint]> {
            s.snapshot
                .as_deref()
                .or(s.saved.as_ref().map(|v| v.endpoints.as_slice()))
        }
        let mut before: BTreeSet<Address> = merge(self.sources.iter().filter_map(known))
            .into_keys()
            .collect();
        let completes_first_set = self.sources.iter().any(|s| known(s).is_none())
            && self
                .sources
                .iter()
                .enumerate()
                .all(|(i, s)| i == index || known(s).is_some());
        if completes_first_set {
            before.extend(self.on_disk.iter().cloned());
        }
        let after = merge(self.sources.iter().enumerate().filter_map(|(i, s)| {
            if i == index {
                Some(answer)
            } else {
                known(s)
            }
        }));
        let removed: Vec<Address> = before
            .iter()
            .filter(|a| !after.contains_key(*a))
            .cloned()
            .collect();
        (before.len(), after.len(), removed)
    }

    /// Applies every held answer whose hold has lasted `shrink_hold`; returns the sources
    /// released (by index) and what changed, or `None` when nothing was due.
    pub fn release_held(&mut self, now: Instant) -> Option<(Vec<usize>, Delta)> {
        let hold = self.cfg.shrink_hold;
        let due: Vec<usize> = (0..self.sources.len())
            .filter(|i| {
                self.sources[*i]
                    .held
                    .as_ref()
                    .is_some_and(|h| now >= h.since + hold)
            })
            .collect();
        if due.is_empty() {
            return None;
        }
        let mut delta = Delta::default();
        for &i in &due {
            let Some(h) = self.sources[i].held.take() else {
                continue;
            };
            let d = self.take_snapshot(i, h.endpoints, h.skipped, now);
            delta.added.extend(d.added);
            // What the hold measured against (the endpoints before, or the file on disk),
            // not what this state merged: before a first answer that is nothing.
            delta.removed.extend(h.removed);
            delta.removed.extend(d.removed);
            delta.removed.sort();
            delta.removed.dedup();
            delta.changed |= d.changed;
            delta.snapshot_changed |= d.snapshot_changed;
        }
        Some((due, delta))
    }

    /// When the earliest hold ends, if any source is held.
    pub fn next_release(&self) -> Option<Instant> {
        self.sources
            .iter()
            .filter_map(|s| s.held.as_ref())
            .map(|h| h.since + self.cfg.shrink_hold)
            .min()
    }

    /// A sentence per held source for `/status`, or `None` when nothing is held.
    pub fn shrink_held(&self, now: Instant) -> Option<String> {
        let parts: Vec<String> = self
            .sources
            .iter()
            .filter_map(|s| Some((s, s.held.as_ref()?)))
            .map(|(s, h)| {
                let left = (h.since + self.cfg.shrink_hold).saturating_duration_since(now);
                format!(
                    "source {} answered with {} of the upstream's {} endpoints (max_shrink = {}); held for {:.1}s more unless the endpoints come back",
                    s.label,
                    h.after,
                    h.before,
                    self.cfg.max_shrink,
                    left.as_secs_f64()
                )
            })
            .collect();
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::ShrinkEvent;
    use crate::controller::state::tests::{guarded, rendered, snap, state, FOUR};

    #[test]
    fn a_shrink_beyond_max_shrink_is_held_for_shrink_hold_then_applied() {
        let mut s = guarded(0.5, Duration::from_secs(30));
        let t0 = Instant::now();
        s.on_source(0, snap(&FOUR), t0);
        s.on_source(1, snap(&[]), t0);

        // Three of four gone (75% > 50%): held, nothing changes.
        let d = s.on_source(0, snap(&FOUR[..1]), t0 + Duration::from_secs(1));
        assert_eq!(d.shrink, ShrinkEvent::Held);
        assert!(!d.changed && !d.snapshot_changed);
        assert_eq!(rendered(&s).len(), 4);
        assert_eq!(s.next_release(), Some(t0 + Duration::from_secs(31)));
        let why = s.shrink_held(t0 + Duration::from_secs(11)).unwrap();
        assert!(
            why.starts_with("source consul answered with 1 of the upstream's 4 endpoints (max_shrink = 0.5); held for 20.0s more"),
            "{why}"
        );

        // The same answer again keeps the clock running from the first one.
        let d = s.on_source(0, snap(&FOUR[..1]), t0 + Duration::from_secs(20));
        assert_eq!(d.shrink, ShrinkEvent::StillHeld);
        assert!(s.release_held(t0 + Duration::from_millis(30_999)).is_none());
        assert_eq!(rendered(&s).len(), 4);

        let (released, d) = s.release_held(t0 + Duration::from_secs(31)).unwrap();
        assert_eq!(released, vec![0]);
        assert!(d.changed && d.snapshot_changed);
        assert_eq!(d.removed.len(), 3);
        assert_eq!(rendered(&s), vec!["127.0.0.2:80"]);
        assert_eq!(s.shrink_held(t0 + Duration::from_secs(31)), None);
        assert_eq!(s.next_release(), None);
    }

    #[test]
    fn an_answer_that_restores_the_endpoints_drops_the_hold() {
        let mut s = guarded(0.5, Duration::from_secs(30));
        let t0 = Instant::now();
        s.on_source(0, snap(&FOUR), t0);
        s.on_source(1, snap(&[]), t0);
        // An ACL token that lost service:read: an empty, successful answer.
        assert_eq!(s.on_source(0, snap(&[]), t0).shrink, ShrinkEvent::Held);
        let d = s.on_source(0, snap(&FOUR), t0 + Duration::from_secs(2));
        assert_eq!(d.shrink, ShrinkEvent::Dropped);
        assert!(!d.changed, "the endpoints never left");
        assert_eq!(s.next_release(), None);
        assert!(s.release_held(t0 + Duration::from_secs(60)).is_none());
        assert_eq!(rendered(&s).len(), 4);
    }

    #[test]
    fn a_shrink_within_max_shrink_applies_at_once() {
        let mut s = guarded(0.5, Duration::from_secs(30));
        let t0 = Instant::now();
        s.on_source(0, snap(&FOUR), t0);
        s.on_source(1, snap(&[]), t0);
        // Exactly half: not more than max_shrink.
        let d = s.on_source(0, snap(&FOUR[..2]), t0);
        assert_eq!(d.shrink, ShrinkEvent::None);
        assert!(d.changed);
        assert_eq!(rendered(&s).len(), 2);
        // Growth is never held.
        assert_eq!(s.on_source(0, snap(&FOUR), t0).shrink, ShrinkEvent::None);
    }

    #[test]
    fn a_shrink_is_measured_on_the_merged_upstream_not_the_one_source() {
        let mut s = guarded(0.5, Duration::from_secs(30));
        let t0 = Instant::now();
        s.on_source(0, snap(&FOUR), t0);
        s.on_source(1, snap(&FOUR[..3]), t0);
        // Source 0 empties, but source 1 still names three of the four: one of four removed.
        let d = s.on_source(0, snap(&[]), t0);
        assert_eq!(d.shrink, ShrinkEvent::None);
        assert_eq!(rendered(&s).len(), 3);
    }

    #[test]
    fn a_static_list_is_never_held() {
        let mut s = state();
        let t0 = Instant::now();
        s.on_source(0, snap(&FOUR), t0);
        s.on_source(1, snap(&[]), t0);
        assert_eq!(s.on_source(0, snap(&[]), t0).shrink, ShrinkEvent::None);
        assert!(s.endpoints.is_empty());
    }

    #[test]
    fn a_zero_shrink_hold_or_max_shrink_of_one_turns_the_guard_off() {
        for (max, hold) in [(0.5, Duration::ZERO), (1.0, Duration::from_secs(30))] {
            let mut s = guarded(max, hold);
            let t0 = Instant::now();
            s.on_source(0, snap(&FOUR), t0);
            s.on_source(1, snap(&[]), t0);
            assert_eq!(s.on_source(0, snap(&[]), t0).shrink, ShrinkEvent::None);
            assert!(s.endpoints.is_empty());
        }
    }
}
