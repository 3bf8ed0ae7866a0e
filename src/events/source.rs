//! Events of sources and upstreams: answers, failures, the shrink guard, config changes.

use super::{gauge, Event};
use crate::metrics::{source_labels, upstream_labels, Metrics};
use crate::model::UpstreamName;

/// A source delivered a snapshot.
#[derive(Debug)]
pub struct SourceAnswered<'a> {
    /// The upstream the source feeds.
    pub upstream: &'a UpstreamName,
    /// The source's label.
    pub source: &'a str,
    /// Registry entries the snapshot skipped as invalid.
    pub skipped: usize,
    /// Of those, the ones the previous snapshot did not skip (each counted once).
    pub newly_skipped: usize,
    /// The source had failed before this answer.
    pub recovered: bool,
}

impl Event for SourceAnswered<'_> {
    fn emit(&self, metrics: &Metrics) {
        let labels = source_labels(self.upstream, self.source);
        metrics.source_updates.get_or_create(&labels).inc();
        metrics.source_up.get_or_create(&labels).set(1);
        metrics
            .skipped
            .get_or_create(&labels)
            .set(gauge(self.skipped));
        metrics
            .skipped_total
            .get_or_create(&labels)
            .inc_by(self.newly_skipped as u64);
        if self.recovered {
            tracing::info!(upstream = %self.upstream, source = %self.source, "Source recovered.");
        }
    }
}

/// A source's request failed; its last snapshot stays.
#[derive(Debug)]
pub struct SourceFailed<'a> {
    /// The upstream the source feeds.
    pub upstream: &'a UpstreamName,
    /// The source's label.
    pub source: &'a str,
    /// What went wrong, without secrets.
    pub error: &'a str,
    /// The source was up before this failure (logged once per outage).
    pub first: bool,
}

impl Event for SourceFailed<'_> {
    fn emit(&self, metrics: &Metrics) {
        metrics
            .source_up
            .get_or_create(&source_labels(self.upstream, self.source))
            .set(0);
        if self.first {
            tracing::warn!(upstream = %self.upstream, source = %self.source, error = %self.error,
                "Source failed; keeping its last snapshot and changing nothing in nginx.");
        }
    }
}

/// Whether an upstream holds a large drop of endpoints, measured after a change.
#[derive(Debug)]
pub struct ShrinkHoldMeasured<'a> {
    /// The upstream.
    pub upstream: &'a UpstreamName,
    /// A shrink is held.
    pub held: bool,
}

impl Event for ShrinkHoldMeasured<'_> {
    fn emit(&self, metrics: &Metrics) {
        metrics
            .shrink_held
            .get_or_create(&upstream_labels(self.upstream))
            .set(i64::from(self.held));
    }
}

/// An upstream's sources were started (at start, or by a config reload that changed them).
#[derive(Debug)]
pub struct UpstreamStarted<'a> {
    /// The upstream.
    pub upstream: &'a UpstreamName,
    /// Its sources' labels.
    pub sources: &'a [String],
}

impl Event for UpstreamStarted<'_> {
    fn emit(&self, metrics: &Metrics) {
        metrics.declare_upstream(self.upstream, self.sources);
        for source in self.sources {
            metrics
                .source_up
                .get_or_create(&source_labels(self.upstream, source))
                .set(0);
        }
        metrics
            .shrink_held
            .get_or_create(&upstream_labels(self.upstream))
            .set(0);
    }
}

/// A config reload removed an upstream: its series go.
#[derive(Debug)]
pub struct UpstreamRemoved<'a> {
    /// The upstream.
    pub upstream: &'a UpstreamName,
}

impl Event for UpstreamRemoved<'_> {
    fn emit(&self, metrics: &Metrics) {
        metrics.forget_upstream(self.upstream);
    }
}
