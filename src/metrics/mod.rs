//! Prometheus metrics: typed `prometheus-client` families, written only by [`crate::events`].
//!
//! The metric names, types, labels and help texts are a contract (README, "Metrics"); each is
//! registered once in [`Metrics::new`], and each family takes one label-set type from
//! [`labels`], so a misspelled label or value does not compile. Every known label value is
//! exported at 0 from the start (global ones by [`Metrics::new`], an upstream's by
//! [`Metrics::declare_upstream`]), so `increase(...) > 0` sees the first event.

pub mod labels;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::health::Health;
use crate::model::UpstreamName;
use labels::{
    BuildLabels, EndpointStateLabels, ErrorLogLabels, ErrorLogResult, LuaPushLabels, LuaPushResult,
    ProbeLabels, ProbeResult, ReloadLabels, ReloadResult, RenderLabels, RenderResult, SourceLabels,
    TransitionLabels, UpstreamLabels,
};

/// The `Content-Type` of [`Metrics::render`]: the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The buckets of `upstreamd_probe_duration_seconds`, in seconds.
const PROBE_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// The buckets of `upstreamd_reload_duration_seconds`, in seconds.
const RELOAD_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn probe_histogram() -> Histogram {
    Histogram::new(PROBE_BUCKETS)
}

/// The label set of a series with no labels, for a family that starts empty.
pub type Unlabelled = [(&'static str, &'static str); 0];

/// A family of histograms that share one set of buckets.
pub type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric upstreamd exports. Cheap to share behind an `Arc`; the families are written
/// by the events in [`crate::events`] and read by tests.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The sources each declared upstream was declared with, so forgetting it finds every
    /// series.
    declared: Mutex<BTreeMap<UpstreamName, Vec<String>>>,
    /// `upstreamd_endpoints`.
    pub(crate) endpoints: Family<EndpointStateLabels, Gauge>,
    /// `upstreamd_health_transitions_total`.
    pub(crate) health_transitions: Family<TransitionLabels, Counter>,
    /// `upstreamd_probe_duration_seconds`.
    pub(crate) probe_duration: HistogramFamily<UpstreamLabels>,
    /// `upstreamd_probes_total`.
    pub(crate) probes: Family<ProbeLabels, Counter>,
    /// `upstreamd_source_up`.
    pub(crate) source_up: Family<SourceLabels, Gauge>,
    /// `upstreamd_source_updates_total`.
    pub(crate) source_updates: Family<SourceLabels, Counter>,
    /// `upstreamd_registry_entries_skipped_total`.
    pub(crate) skipped_total: Family<SourceLabels, Counter>,
    /// `upstreamd_registry_entries_skipped`.
    pub(crate) skipped: Family<SourceLabels, Gauge>,
    /// `upstreamd_renders_total`.
    pub(crate) renders: Family<RenderLabels, Counter>,
    /// `upstreamd_reloads_total`.
    pub(crate) reloads: Family<ReloadLabels, Counter>,
    /// `upstreamd_reload_duration_seconds`.
    pub(crate) reload_duration: Histogram,
    /// `upstreamd_last_reload_success_timestamp_seconds`: a family of its one unlabelled
    /// series, so it is absent until the first successful reload (0 would read as 1970).
    pub(crate) last_reload_success: Family<Unlabelled, Gauge<f64, AtomicU64>>,
    /// `upstreamd_apply_pending`.
    pub(crate) apply_pending: Gauge,
    /// `upstreamd_apply_failures_consecutive`.
    pub(crate) apply_failures: Gauge,
    /// `upstreamd_error_log_lines_total`.
    pub(crate) error_log_lines: Family<ErrorLogLabels, Counter>,
    /// `upstreamd_shrink_held`.
    pub(crate) shrink_held: Family<UpstreamLabels, Gauge>,
    /// `upstreamd_admin_connections_refused_total`.
    pub(crate) admin_refused: Counter,
    /// `upstreamd_apply_held`.
    pub(crate) apply_held: Gauge,
    /// `upstreamd_nginx_old_generations`.
    pub(crate) nginx_old_generations: Gauge,
    /// `upstreamd_nginx_old_workers`.
    pub(crate) nginx_old_workers: Gauge,
    /// `upstreamd_lua_pushes_total`.
    pub(crate) lua_pushes: Family<LuaPushLabels, Counter>,
    /// `upstreamd_lua_generation`.
    pub(crate) lua_generation: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every family registered, `upstreamd_build_info` set and every global series at 0.
    pub fn new() -> Self {
        let m = Metrics {
            registry: Registry::default(),
            declared: Mutex::default(),
            endpoints: Family::default(),
            health_transitions: Family::default(),
            probe_duration: Family::new_with_constructor(probe_histogram),
            probes: Family::default(),
            source_up: Family::default(),
            source_updates: Family::default(),
            skipped_total: Family::default(),
            skipped: Family::default(),
            renders: Family::default(),
            reloads: Family::default(),
            reload_duration: Histogram::new(RELOAD_BUCKETS),
            last_reload_success: Family::default(),
            apply_pending: Gauge::default(),
            apply_failures: Gauge::default(),
            error_log_lines: Family::default(),
            shrink_held: Family::default(),
            admin_refused: Counter::default(),
            apply_held: Gauge::default(),
            nginx_old_generations: Gauge::default(),
            nginx_old_workers: Gauge::default(),
            lua_pushes: Family::default(),
            lua_generation: Gauge::default(),
        };
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        for &result in ReloadResult::ALL {
            export_at_zero(&m.reloads, &ReloadLabels { result });
        }
        for &result in RenderResult::ALL {
            export_at_zero(&m.renders, &RenderLabels { result });
        }
        for &result in ErrorLogResult::ALL {
            export_at_zero(&m.error_log_lines, &ErrorLogLabels { result });
        }
        for &result in LuaPushResult::ALL {
            export_at_zero(&m.lua_pushes, &LuaPushLabels { result });
        }
        m.register(build_info)
    }

    /// Registers every family, in exposition order. Help texts are written without the final
    /// period, which the registry adds; counters without `_total`, which the encoder adds.
    fn register(mut self, build_info: Family<BuildLabels, Gauge>) -> Self {
        let r = &mut self.registry;
        r.register(
            "upstreamd_build_info",
            "Build information; always 1",
            build_info,
        );
        r.register(
            "upstreamd_endpoints",
            "Endpoints by health state",
            self.endpoints.clone(),
        );
        r.register(
            "upstreamd_health_transitions",
            "Health state changes of endpoints",
            self.health_transitions.clone(),
        );
        r.register(
            "upstreamd_probe_duration_seconds",
            "Time taken by health probes",
            self.probe_duration.clone(),
        );
        r.register(
            "upstreamd_probes",
            "Health probes by result",
            self.probes.clone(),
        );
        r.register(
            "upstreamd_source_up",
            "1 when the source's last request succeeded, 0 when it serves a stale snapshot",
            self.source_up.clone(),
        );
        r.register(
            "upstreamd_source_updates",
            "Snapshots received from a source",
            self.source_updates.clone(),
        );
        r.register(
            "upstreamd_registry_entries_skipped",
            "Registry entries skipped as invalid, each counted when it first appears",
            self.skipped_total.clone(),
        );
        r.register(
            "upstreamd_registry_entries_skipped",
            "Registry entries skipped as invalid in the source's latest snapshot",
            self.skipped.clone(),
        );
        r.register(
            "upstreamd_renders",
            "Renders of the include file, by whether the bytes changed",
            self.renders.clone(),
        );
        r.register(
            "upstreamd_reloads",
            "nginx reload attempts by result",
            self.reloads.clone(),
        );
        r.register(
            "upstreamd_reload_duration_seconds",
            "Time from writing the file to a confirmed new worker generation",
            self.reload_duration.clone(),
        );
        r.register(
            "upstreamd_last_reload_success_timestamp_seconds",
            "Unix time of the last successful reload",
            self.last_reload_success.clone(),
        );
        r.register(
            "upstreamd_apply_pending",
            "1 while the desired file is not what nginx runs: waiting for settle, min_reload_interval or a retry, or the template fails",
            self.apply_pending.clone(),
        );
        r.register(
            "upstreamd_apply_failures_consecutive",
            "Failed applies in a row; 0 after a success",
            self.apply_failures.clone(),
        );
        r.register(
            "upstreamd_error_log_lines",
            "Upstream failures read in nginx's error log, by whether they named an endpoint we probe",
            self.error_log_lines.clone(),
        );
        r.register(
            "upstreamd_shrink_held",
            "1 while a large drop of endpoints is held for confirmation",
            self.shrink_held.clone(),
        );
        r.register(
            "upstreamd_admin_connections_refused",
            "Admin connections closed at once because max_connections were open",
            self.admin_refused.clone(),
        );
        r.register(
            "upstreamd_apply_held",
            "1 while a change that takes no server out waits because more old nginx worker generations linger than max_old_generations",
            self.apply_held.clone(),
        );
        r.register(
            "upstreamd_nginx_old_generations",
            "Old nginx worker generations still shutting down (streams keep them alive), as last counted",
            self.nginx_old_generations.clone(),
        );
        r.register(
            "upstreamd_nginx_old_workers",
            "nginx workers still shutting down, across the old generations",
            self.nginx_old_workers.clone(),
        );
        r.register(
            "upstreamd_lua_pushes",
            "Membership pushes to nginx's Lua update endpoint (apply = \"lua\"), by result",
            self.lua_pushes.clone(),
        );
        r.register(
            "upstreamd_lua_generation",
            "The membership generation every nginx worker last confirmed (apply = \"lua\")",
            self.lua_generation.clone(),
        );
        self
    }

    /// Exports every series of an upstream and its sources at 0 unless it already has a
    /// value, so a restarted upstream keeps its counts; the series of sources it was declared
    /// with before and no longer has are removed.
    pub fn declare_upstream(&self, upstream: &UpstreamName, sources: &[String]) {
        let previous = self
            .declared()
            .insert(upstream.clone(), sources.to_vec())
            .unwrap_or_default();
        for gone in previous.iter().filter(|s| !sources.contains(s)) {
            self.remove_source(upstream, gone);
        }
        for state in [Health::Up, Health::Down, Health::Unknown] {
            export_at_zero(&self.endpoints, &endpoint_labels(upstream, state));
        }
        for to in [Health::Up, Health::Down] {
            export_at_zero(&self.health_transitions, &transition_labels(upstream, to));
        }
        for &result in ProbeResult::ALL {
            export_at_zero(&self.probes, &probe_labels(upstream, result));
        }
        let u = upstream_labels(upstream);
        export_at_zero(&self.probe_duration, &u);
        export_at_zero(&self.shrink_held, &u);
        for source in sources {
            let s = source_labels(upstream, source);
            export_at_zero(&self.source_up, &s);
            export_at_zero(&self.source_updates, &s);
            export_at_zero(&self.skipped_total, &s);
            export_at_zero(&self.skipped, &s);
        }
    }

    /// Removes every series of an upstream that left the config, histograms included.
    pub fn forget_upstream(&self, upstream: &UpstreamName) {
        let sources = self.declared().remove(upstream).unwrap_or_default();
        for source in &sources {
            self.remove_source(upstream, source);
        }
        for state in [Health::Up, Health::Down, Health::Unknown] {
            self.endpoints.remove(&endpoint_labels(upstream, state));
            self.health_transitions
                .remove(&transition_labels(upstream, state));
        }
        for &result in ProbeResult::ALL {
            self.probes.remove(&probe_labels(upstream, result));
        }
        let u = upstream_labels(upstream);
        self.probe_duration.remove(&u);
        self.shrink_held.remove(&u);
    }

    fn remove_source(&self, upstream: &UpstreamName, source: &str) {
        let s = source_labels(upstream, source);
        self.source_up.remove(&s);
        self.source_updates.remove(&s);
        self.skipped_total.remove(&s);
        self.skipped.remove(&s);
    }

    fn declared(&self) -> std::sync::MutexGuard<'_, BTreeMap<UpstreamName, Vec<String>>> {
        // Every update of the map is one insert or remove: a poisoned lock holds a whole map.
        self.declared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The Prometheus text exposition (version 0.0.4) of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would be a bug in a label value.
        if let Err(error) = prometheus_text::encode(&mut out, &self.registry) {
            tracing::error!(%error, "Could not encode the metrics.");
        }
        out
    }
}

/// Creates the series of `labels` unless it exists: a new one is exported at 0.
fn export_at_zero<S, M, C>(family: &Family<S, M, C>, labels: &S)
where
    S: Clone + std::hash::Hash + Eq,
    C: prometheus_client::metrics::family::MetricConstructor<M>,
{
    // Only the series' creation matters; the read guard is released at once.
    drop(family.get_or_create(labels));
}

pub(crate) fn upstream_labels(upstream: &UpstreamName) -> UpstreamLabels {
    UpstreamLabels {
        upstream: upstream.clone(),
    }
}

pub(crate) fn endpoint_labels(upstream: &UpstreamName, state: Health) -> EndpointStateLabels {
    EndpointStateLabels {
        upstream: upstream.clone(),
        state,
    }
}

pub(crate) fn transition_labels(upstream: &UpstreamName, to: Health) -> TransitionLabels {
    TransitionLabels {
        upstream: upstream.clone(),
        to,
    }
}

pub(crate) fn probe_labels(upstream: &UpstreamName, result: ProbeResult) -> ProbeLabels {
    ProbeLabels {
        upstream: upstream.clone(),
        result,
    }
}

pub(crate) fn source_labels(upstream: &UpstreamName, source: &str) -> SourceLabels {
    SourceLabels {
        upstream: upstream.clone(),
        source: source.to_owned(),
    }
}

#[cfg(test)]
mod tests;
