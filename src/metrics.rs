//! Prometheus metrics: a small registry of counters, gauges and histograms, rendered as text.
//!
//! The metric names and labels are a contract (README, "Metrics"). Label values are bounded:
//! upstream and source names, states and results — never an endpoint address. Every known
//! label value is exported at 0 from the start (global ones by [`Metrics::new`], an
//! upstream's by [`Metrics::declare_upstream`]), so `increase(...) > 0` sees the first event.

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
        "Registry entries skipped as invalid, each counted when it first appears.",
    ),
    (
        "upstreamd_registry_entries_skipped",
        "gauge",
        "Registry entries skipped as invalid in the source's latest snapshot.",
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
        "upstreamd_apply_pending",
        "gauge",
        "1 while the desired file is not what nginx runs: waiting for settle, min_reload_interval or a retry, or the template fails.",
    ),
    (
        "upstreamd_apply_held",
        "gauge",
        "1 while a change that takes no server out waits because more old nginx worker generations linger than max_old_generations.",
    ),
    (
        "upstreamd_nginx_old_generations",
        "gauge",
        "Old nginx worker generations still shutting down (streams keep them alive), as last counted.",
    ),
    (
        "upstreamd_nginx_old_workers",
        "gauge",
        "nginx workers still shutting down, across the old generations.",
    ),
    (
        "upstreamd_apply_failures_consecutive",
        "gauge",
        "Failed applies in a row; 0 after a success.",
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
    (
        "upstreamd_admin_connections_refused_total",
        "counter",
        "Admin connections closed at once because max_connections were open.",
    ),
    (
        "upstreamd_lua_pushes_total",
        "counter",
        "Membership pushes to nginx's Lua update endpoint (apply = \"lua\"), by result.",
    ),
    (
        "upstreamd_lua_generation",
        "gauge",
        "The membership generation every nginx worker last confirmed (apply = \"lua\").",
    ),
];

/// Every `result` of `upstreamd_lua_pushes_total`.
pub const LUA_PUSH_RESULTS: &[&str] = &["confirmed", "rejected", "unconfirmed", "failed"];

/// Every `result` of `upstreamd_reloads_total`.
pub const RELOAD_RESULTS: &[&str] = &[
    "ok",
    "test_failed",
    "signal_failed",
    "unconfirmed",
    "write_failed",
];
/// Every `result` of `upstreamd_probes_total`.
pub const PROBE_RESULTS: &[&str] = &["ok", "bad_status", "timeout", "error"];
/// Every `state` of `upstreamd_endpoints`, the words used everywhere for probe health.
pub const HEALTH_STATES: &[&str] = &["healthy", "unhealthy", "unknown"];

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
    /// A registry with `upstreamd_build_info` set and every global series at 0.
    pub fn new() -> Self {
        let m = Self::default();
        m.set(
            "upstreamd_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1.0,
        );
        for result in RELOAD_RESULTS {
            m.add("upstreamd_reloads_total", &[("result", result)], 0.0);
        }
        for result in ["changed", "unchanged", "error"] {
            m.add("upstreamd_renders_total", &[("result", result)], 0.0);
        }
        for result in ["probe", "not_ours", "too_long"] {
            m.add(
                "upstreamd_error_log_lines_total",
                &[("result", result)],
                0.0,
            );
        }
        for result in LUA_PUSH_RESULTS {
            m.add("upstreamd_lua_pushes_total", &[("result", result)], 0.0);
        }
        m.set("upstreamd_apply_pending", &[], 0.0);
        m.set("upstreamd_apply_failures_consecutive", &[], 0.0);
        m.set("upstreamd_apply_held", &[], 0.0);
        m.set("upstreamd_nginx_old_generations", &[], 0.0);
        m.set("upstreamd_nginx_old_workers", &[], 0.0);
        m.add("upstreamd_admin_connections_refused_total", &[], 0.0);
        m.declare_histogram("upstreamd_reload_duration_seconds", &[]);
        m
    }

    /// Exports every series of an upstream and its sources (labelled `sources`) at 0 unless
    /// it already has a value, so a restarted upstream keeps its counts.
    pub fn declare_upstream(&self, upstream: &str, sources: &[String]) {
        let u = ("upstream", upstream);
        for state in HEALTH_STATES {
            self.add("upstreamd_endpoints", &[u, ("state", state)], 0.0);
        }
        for to in ["healthy", "unhealthy"] {
            self.add("upstreamd_health_transitions_total", &[u, ("to", to)], 0.0);
        }
        for result in PROBE_RESULTS {
            self.add("upstreamd_probes_total", &[u, ("result", result)], 0.0);
        }
        self.declare_histogram("upstreamd_probe_duration_seconds", &[u]);
        self.add("upstreamd_shrink_held", &[u], 0.0);
        for source in sources {
            let labels = [u, ("source", source.as_str())];
            for name in [
                "upstreamd_source_up",
                "upstreamd_source_updates_total",
                "upstreamd_registry_entries_skipped_total",
                "upstreamd_registry_entries_skipped",
            ] {
                self.add(name, &labels, 0.0);
            }
        }
    }

    /// Records a source's latest snapshot: the gauge says how many entries it skipped, and
    /// the counter grows by `newly`, the skipped entries its previous answer did not skip (the
    /// source tracks them by name), so an entry that stays invalid is counted once and one
    /// replaced by another invalid entry is counted too.
    pub fn skipped_now(&self, pairs: &[(&'static str, &str)], skipped: usize, newly: usize) {
        self.set("upstreamd_registry_entries_skipped", pairs, skipped as f64);
        self.add(
            "upstreamd_registry_entries_skipped_total",
            pairs,
            newly as f64,
        );
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
        let matches =
            |n: &&str, l: &Labels| *n == name && l.iter().any(|(k, v)| *k == pair.0 && v == pair.1);
        self.with(|i| {
            i.values.retain(|(n, l), _| !matches(n, l));
            i.histograms.retain(|(n, l), _| !matches(n, l));
        });
    }

    fn histogram<'i>(
        i: &'i mut Inner,
        name: &'static str,
        pairs: &[(&'static str, &str)],
    ) -> &'i mut Histogram {
        let buckets = if name == "upstreamd_probe_duration_seconds" {
            PROBE_BUCKETS
        } else {
            RELOAD_BUCKETS
        };
        i.histograms
            .entry((name, labels(pairs)))
            .or_insert_with(|| Histogram {
                buckets,
                counts: vec![0; buckets.len()],
                sum: 0.0,
                count: 0,
            })
    }

    /// Exports a histogram with no observations (every bucket 0) unless it has some.
    fn declare_histogram(&self, name: &'static str, pairs: &[(&'static str, &str)]) {
        self.with(|i| {
            Self::histogram(i, name, pairs);
        });
    }

    /// Records one observation in a histogram, in seconds.
    pub fn observe(&self, name: &'static str, pairs: &[(&'static str, &str)], secs: f64) {
        self.with(|i| {
            let h = Self::histogram(i, name, pairs);
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
    fn a_fresh_registry_exports_every_reload_result_at_zero() {
        let text = Metrics::new().render();
        for result in RELOAD_RESULTS {
            assert!(
                text.contains(&format!(
                    "upstreamd_reloads_total{{result=\"{result}\"}} 0\n"
                )),
                "{text}"
            );
        }
        assert!(text.contains("upstreamd_renders_total{result=\"changed\"} 0\n"));
        assert!(text.contains("upstreamd_reload_duration_seconds_count 0\n"));
    }

    #[test]
    fn a_declared_upstream_exports_every_series_at_zero() {
        let m = Metrics::new();
        m.declare_upstream("k", &["consul".into()]);
        let text = m.render();
        for series in [
            "upstreamd_endpoints{upstream=\"k\",state=\"unhealthy\"} 0\n",
            "upstreamd_health_transitions_total{upstream=\"k\",to=\"unhealthy\"} 0\n",
            "upstreamd_probes_total{upstream=\"k\",result=\"timeout\"} 0\n",
            "upstreamd_probe_duration_seconds_count{upstream=\"k\"} 0\n",
            "upstreamd_source_up{upstream=\"k\",source=\"consul\"} 0\n",
            "upstreamd_registry_entries_skipped_total{upstream=\"k\",source=\"consul\"} 0\n",
            "upstreamd_registry_entries_skipped{upstream=\"k\",source=\"consul\"} 0\n",
            "upstreamd_shrink_held{upstream=\"k\"} 0\n",
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
    }

    #[test]
    fn declaring_an_upstream_again_keeps_its_counts() {
        let m = Metrics::new();
        m.declare_upstream("k", &[]);
        m.inc(
            "upstreamd_probes_total",
            &[("upstream", "k"), ("result", "ok")],
        );
        m.declare_upstream("k", &[]);
        assert_eq!(
            m.value(
                "upstreamd_probes_total",
                &[("upstream", "k"), ("result", "ok")]
            ),
            1.0
        );
    }

    #[test]
    fn the_skipped_counter_grows_by_the_new_entries_and_the_gauge_is_the_count() {
        let m = Metrics::new();
        let l = [("upstream", "k"), ("source", "consul")];
        m.skipped_now(&l, 15, 15);
        m.skipped_now(&l, 15, 0);
        m.skipped_now(&l, 15, 1);
        assert_eq!(
            m.value("upstreamd_registry_entries_skipped_total", &l),
            16.0
        );
        assert_eq!(m.value("upstreamd_registry_entries_skipped", &l), 15.0);
        m.skipped_now(&l, 2, 0);
        m.skipped_now(&l, 4, 2);
        assert_eq!(
            m.value("upstreamd_registry_entries_skipped_total", &l),
            18.0
        );
        assert_eq!(m.value("upstreamd_registry_entries_skipped", &l), 4.0);
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
