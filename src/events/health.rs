//! Events of health probes: a probe's result, a health change, the endpoint counts.

use std::time::Duration;

use super::{gauge, Event};
use crate::health::Health;
use crate::metrics::labels::ProbeResult;
use crate::metrics::{endpoint_labels, probe_labels, transition_labels, upstream_labels, Metrics};
use crate::model::{Address, UpstreamName};

/// A health probe ended.
#[derive(Debug)]
pub struct ProbeFinished<'a> {
    /// The endpoint's upstream.
    pub upstream: &'a UpstreamName,
    /// What the probe found.
    pub result: ProbeResult,
    /// How long it took.
    pub latency: Duration,
}

impl Event for ProbeFinished<'_> {
    fn emit(&self, metrics: &Metrics) {
        metrics
            .probes
            .get_or_create(&probe_labels(self.upstream, self.result))
            .inc();
        metrics
            .probe_duration
            .get_or_create(&upstream_labels(self.upstream))
            .observe(self.latency.as_secs_f64());
    }
}

/// An endpoint's health changed.
#[derive(Debug)]
pub struct HealthChanged<'a> {
    /// The endpoint's upstream.
    pub upstream: &'a UpstreamName,
    /// The endpoint.
    pub endpoint: &'a Address,
    /// Its health before.
    pub from: Health,
    /// Its health now.
    pub to: Health,
    /// Why, as a sentence (`2 consecutive failed probes (fall = 2), last: status 503`).
    pub why: &'a str,
}

impl Event for HealthChanged<'_> {
    fn emit(&self, metrics: &Metrics) {
        tracing::info!(upstream = %self.upstream, endpoint = %self.endpoint, from = %self.from,
            to = %self.to, why = %self.why, "Endpoint health changed.");
        metrics
            .health_transitions
            .get_or_create(&transition_labels(self.upstream, self.to))
            .inc();
    }
}

/// An upstream's endpoints counted by health.
#[derive(Debug)]
pub struct EndpointsCounted<'a> {
    /// The upstream.
    pub upstream: &'a UpstreamName,
    /// How many endpoints are in each state.
    pub counts: [(Health, usize); 3],
}

impl Event for EndpointsCounted<'_> {
    fn emit(&self, metrics: &Metrics) {
        for (state, n) in self.counts {
            metrics
                .endpoints
                .get_or_create(&endpoint_labels(self.upstream, state))
                .set(gauge(n));
        }
    }
}
