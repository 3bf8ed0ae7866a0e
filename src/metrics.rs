//! Prometheus metrics: a small registry of counters, gauges and histograms, rendered as text.
//!
//! The metric names and labels are a contract (README, "Metrics"). Label values are bounded:
//! upstream and source names, states and results — never an endpoint address.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Help text and type of every metric, in exposition order.
const FAMILIES: &[(&str, &str, &str)] = &[
    (
        "upstreamd_build_info",
        "gauge",
        "Build information; always 1.",
    ),
    ("upstreamd_endpoints", "gauge", "Endpoints by health state."),
    (
        "upstreamd_health_transitions_total",
        "counter",
        "Health state changes of endpoints.",
    ),
    (
        "upstreamd_probe_duration_seconds",
        "histogram",
        "Time taken by health probes.",
    ),
    (
        "upstreamd_probes_total",
        "counter",
        "Health probes by result.",
    ),
    (
        "upstreamd_source_up",
        "gauge",
        "1 when the source's last request succeeded, 0 when it serves a stale snapshot.",
    ),
    (
        "upstreamd_source_updates_total",
        "counter",
        "Snapshots received from a source.",
    ),
    (
        "upstreamd_registry_entries_skipped_total",
        "counter",
        "Registry entries skipped as invalid.",
    ),
    (
        "upstreamd_renders_total",
        "counter",
        "Renders of the include file, by whether the bytes changed.",
    ),
    (
        "upstreamd_reloads_total",
        "counter",
        "nginx reload attempts by result.",
    ),
    (
        "upstreamd_reload_duration_seconds",
        "histogram",
        "Time from writing the file to a confirmed new worker generation.",
    ),
    (
        "upstreamd_last_reload_success_timestamp_seconds",
        "gauge",
        "Unix time of the last successful reload.",
    ),
    (
        "upstreamd_error_log_lines_total",
        "counter",
        "Upstream failures read in nginx's error log, by whether they named an endpoint we probe.",
    ),
    (
        "upstreamd_shrink_held",
        "gauge",
        "1 while a large drop of endpoints is held for confirmation.",
    ),
];

const PROBE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
const RELOAD_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Clone)]
struct Histogram {
    buckets: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Debug, Default)]
struct Inner {
    values: BTreeMap<(&'static str, Labels), f64>,
    histograms: BTreeMap<(&'static str, Labels), Histogram>,
}

/// The metrics registry; cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

impl Metrics {
    /// A registry with `upstreamd_build_info` set.
    pub fn new() -> Self {
        let m = Self::default();
        m.set(
            "upstreamd_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1.0,
        );
        m
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A panic while holding the lock cannot leave a half-written number behind, so a
        // poisoned lock is still safe to use.
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Adds `by` to a counter.
    pub fn add(&self, name: &'static str, pairs: &[(&'static str, &str)], by: f64) {
        self.with(|i| *i.values.entry((name, labels(pairs))).or_insert(0.0) += by);
    }

    /// Adds one to a counter.
    pub fn inc(&self, name: &'static str, pairs: &[(&'static str, &str)]) {
        self.add(name, pairs, 1.0);
    }

    /// Sets a gauge.
    pub fn set(&self, name: &'static str, pairs: &[(&'static str, &str)], value: f64) {
        self.with(|i| i.values.insert((name, labels(pairs)), value));
    }

    /// Removes every series of `name` whose labels include `pair` (for a removed upstream).
    pub fn forget(&self, name: &'static str, pair: (&'static str, &str)) {
        self.with(|i| {
            i.values.retain(|(n, l), _| {
                !(*n == name && l.iter().any(|(k, v)| *k == pair.0 && v == pair.1))
            })
        });
    }

    /// Records one observation in a histogram, in seconds.
    pub fn observe(&self, name: &'static str, pairs: &[(&'static str, &str)], secs: f64) {
        let buckets = if name == "upstreamd_probe_duration_seconds" {
            PROBE_BUCKETS
        } else {
            RELOAD_BUCKETS
        };
        self.with(|i| {
            let h = i
                .histograms
                .entry((name, labels(pairs)))
                .or_insert_with(|| Histogram {
                    buckets,
                    counts: vec![0; buckets.len()],
                    sum: 0.0,
                    count: 0,
                });
            for (b, c) in h.buckets.iter().zip(h.counts.iter_mut()) {
                if secs <= *b {
                    *c += 1;
                }
            }
            h.sum += secs;
            h.count += 1;
        });
    }

    /// The current value of a counter or gauge (0 when never set), for tests and /status.
    pub fn value(&self, name: &'static str, pairs: &[(&'static str, &str)]) -> f64 {
        self.with(|i| i.values.get(&(name, labels(pairs))).copied().unwrap_or(0.0))
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.with(|i| {
            let mut out = String::new();
            for (name, kind, help) in FAMILIES {
                out += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
                for ((n, l), v) in i.values.range((*name, Vec::new())..) {
                    if n != name {
                        break;
                    }
                    out += &format!("{name}{} {v}\n", fmt_labels(l, None));
                }
                for ((n, l), h) in i.histograms.range((*name, Vec::new())..) {
                    if n != name {
                        break;
                    }
                    for (b, c) in h.buckets.iter().zip(&h.counts) {
                        out +=
                            &format!("{name}_bucket{} {c}\n", fmt_labels(l, Some(&b.to_string())));
                    }
                    out += &format!("{name}_bucket{} {}\n", fmt_labels(l, Some("+Inf")), h.count);
                    out += &format!("{name}_sum{} {}\n", fmt_labels(l, None), h.sum);
                    out += &format!("{name}_count{} {}\n", fmt_labels(l, None), h.count);
                }
            }
            out
        })
    }
}

fn fmt_labels(l: &Labels, le: Option<&str>) -> String {
    let mut parts: Vec<String> = l
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms_in_prometheus_text() {
        let m = Metrics::new();
        m.inc("upstreamd_reloads_total", &[("result", "ok")]);
        m.inc("upstreamd_reloads_total", &[("result", "ok")]);
        m.set(
            "upstreamd_endpoints",
            &[("upstream", "k"), ("state", "healthy")],
            3.0,
        );
        m.observe("upstreamd_reload_duration_seconds", &[], 0.02);
        let text = m.render();
        assert!(
            text.contains("upstreamd_reloads_total{result=\"ok\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("upstreamd_endpoints{upstream=\"k\",state=\"healthy\"} 3\n"));
        assert!(text.contains("upstreamd_reload_duration_seconds_bucket{le=\"0.025\"} 1\n"));
        assert!(text.contains("upstreamd_reload_duration_seconds_bucket{le=\"0.01\"} 0\n"));
        assert!(text.contains("upstreamd_reload_duration_seconds_count 1\n"));
        assert!(text.contains("upstreamd_build_info{version=\""));
        assert!(text.contains("# TYPE upstreamd_probes_total counter\n"));
    }

    #[test]
    fn forget_drops_only_the_named_upstream() {
        let m = Metrics::new();
        m.set(
            "upstreamd_endpoints",
            &[("upstream", "a"), ("state", "healthy")],
            1.0,
        );
        m.set(
            "upstreamd_endpoints",
            &[("upstream", "b"), ("state", "healthy")],
            1.0,
        );
        m.forget("upstreamd_endpoints", ("upstream", "a"));
        assert_eq!(
            m.value(
                "upstreamd_endpoints",
                &[("upstream", "a"), ("state", "healthy")]
            ),
            0.0
        );
        assert_eq!(
            m.value(
                "upstreamd_endpoints",
                &[("upstream", "b"), ("state", "healthy")]
            ),
            1.0
        );
    }
}
