use super::labels::{ProbeLabels, ProbeResult, ReloadResult, RenderResult};
use super::*;
use crate::events::{
    Event, ProbeFinished, Reloaded, SourceAnswered, UpstreamRemoved, UpstreamStarted,
};
use std::time::Duration;

fn name(s: &str) -> UpstreamName {
    UpstreamName::new(s).unwrap()
}

fn series_of<'t>(text: &'t str, upstream: &str) -> Vec<&'t str> {
    let label = format!("upstream=\"{upstream}\"");
    text.lines().filter(|l| l.contains(&label)).collect()
}

#[test]
fn renders_counters_gauges_and_histograms_in_prometheus_text() {
    let m = Metrics::new();
    let k = name("k");
    m.declare_upstream(&k, &[]);
    for _ in 0..2 {
        Reloaded {
            changes: "first file",
            took: Duration::from_millis(20),
        }
        .emit(&m);
    }
    m.endpoints
        .get_or_create(&endpoint_labels(&k, Health::Up))
        .set(3);
    let text = m.render();
    for line in [
        "upstreamd_reloads_total{result=\"ok\"} 2\n",
        "upstreamd_endpoints{upstream=\"k\",state=\"healthy\"} 3\n",
        "upstreamd_reload_duration_seconds_bucket{le=\"0.025\"} 2\n",
        "upstreamd_reload_duration_seconds_bucket{le=\"0.01\"} 0\n",
        "upstreamd_reload_duration_seconds_count 2\n",
        "upstreamd_build_info{version=\"",
        "# TYPE upstreamd_probes_total counter\n",
        "# HELP upstreamd_reloads_total nginx reload attempts by result.\n",
        "# TYPE upstreamd_reload_duration_seconds histogram\n",
        "\nupstreamd_last_reload_success_timestamp_seconds 1",
    ] {
        assert!(text.contains(line), "{line:?} missing from\n{text}");
    }
}

#[test]
fn a_fresh_registry_exports_every_global_series_at_zero() {
    let text = Metrics::new().render();
    for result in ReloadResult::ALL {
        let series = format!(
            "upstreamd_reloads_total{{result=\"{}\"}} 0\n",
            result.as_str()
        );
        assert!(text.contains(&series), "{series} missing from\n{text}");
    }
    for result in RenderResult::ALL {
        let series = format!(
            "upstreamd_renders_total{{result=\"{}\"}} 0\n",
            result.as_str()
        );
        assert!(text.contains(&series), "{series} missing from\n{text}");
    }
    for series in [
        "upstreamd_error_log_lines_total{result=\"too_long\"} 0\n",
        "upstreamd_reload_duration_seconds_count 0\n",
        "upstreamd_apply_pending 0\n",
        "upstreamd_apply_failures_consecutive 0\n",
        "upstreamd_admin_connections_refused_total 0\n",
    ] {
        assert!(text.contains(series), "{series} missing from\n{text}");
    }
    // Absent until the first reload: 0 would say "last reloaded in 1970" to an alert.
    assert!(!text.contains("upstreamd_last_reload_success_timestamp_seconds "));
}

#[test]
fn a_started_upstream_exports_every_series_at_zero() {
    let m = Metrics::new();
    UpstreamStarted {
        upstream: &name("k"),
        sources: &["consul".into()],
    }
    .emit(&m);
    let text = m.render();
    for series in [
        "upstreamd_endpoints{upstream=\"k\",state=\"unhealthy\"} 0\n",
        "upstreamd_health_transitions_total{upstream=\"k\",to=\"unhealthy\"} 0\n",
        "upstreamd_probes_total{upstream=\"k\",result=\"timeout\"} 0\n",
        "upstreamd_probe_duration_seconds_count{upstream=\"k\"} 0\n",
        "upstreamd_source_up{upstream=\"k\",source=\"consul\"} 0\n",
        "upstreamd_source_updates_total{upstream=\"k\",source=\"consul\"} 0\n",
        "upstreamd_registry_entries_skipped_total{upstream=\"k\",source=\"consul\"} 0\n",
        "upstreamd_registry_entries_skipped{upstream=\"k\",source=\"consul\"} 0\n",
        "upstreamd_shrink_held{upstream=\"k\"} 0\n",
    ] {
        assert!(text.contains(series), "{series} missing from\n{text}");
    }
}

#[test]
fn declaring_an_upstream_again_keeps_its_counts() {
    let (m, k) = (Metrics::new(), name("k"));
    m.declare_upstream(&k, &[]);
    let ok = ProbeLabels {
        upstream: k.clone(),
        result: ProbeResult::Ok,
    };
    m.probes.get_or_create(&ok).inc();
    m.declare_upstream(&k, &[]);
    assert_eq!(m.probes.get_or_create(&ok).get(), 1);
}

#[test]
fn the_skipped_counter_grows_by_the_new_entries_and_the_gauge_is_the_count() {
    let (m, k) = (Metrics::new(), name("k"));
    let answer = |skipped, newly_skipped| {
        SourceAnswered {
            upstream: &k,
            source: "consul",
            skipped,
            newly_skipped,
            recovered: false,
        }
        .emit(&m)
    };
    let l = source_labels(&k, "consul");
    for (skipped, newly) in [(15, 15), (15, 0), (15, 1)] {
        answer(skipped, newly);
    }
    assert_eq!(m.skipped_total.get_or_create(&l).get(), 16);
    assert_eq!(m.skipped.get_or_create(&l).get(), 15);
    answer(2, 0);
    answer(4, 2);
    assert_eq!(m.skipped_total.get_or_create(&l).get(), 18);
    assert_eq!(m.skipped.get_or_create(&l).get(), 4);
    assert_eq!(m.source_updates.get_or_create(&l).get(), 5);
}

#[test]
fn forgetting_an_upstream_removes_every_series_of_it_histograms_included() {
    let m = Metrics::new();
    let (a, b) = (name("a"), name("b"));
    for u in [&a, &b] {
        UpstreamStarted {
            upstream: u,
            sources: &["static".into(), "consul".into()],
        }
        .emit(&m);
        ProbeFinished {
            upstream: u,
            result: ProbeResult::Ok,
            latency: Duration::from_millis(3),
        }
        .emit(&m);
    }
    assert!(series_of(&m.render(), "a")
        .iter()
        .any(|l| l.starts_with("upstreamd_probe_duration_seconds_bucket")));

    UpstreamRemoved { upstream: &a }.emit(&m);
    let text = m.render();
    assert_eq!(series_of(&text, "a"), Vec::<&str>::new(), "{text}");
    assert!(m.probe_duration.get(&upstream_labels(&a)).is_none());
    assert!(text.contains("upstreamd_probe_duration_seconds_count{upstream=\"b\"} 1\n"));
    assert!(text.contains("upstreamd_source_up{upstream=\"b\",source=\"consul\"} 0\n"));
}

#[test]
fn a_source_dropped_from_an_upstream_loses_its_series() {
    let (m, k) = (Metrics::new(), name("k"));
    m.declare_upstream(&k, &["static".into(), "consul".into()]);
    m.declare_upstream(&k, &["static".into()]);
    let text = m.render();
    assert!(!text.contains("source=\"consul\""), "{text}");
    assert!(text.contains("upstreamd_source_up{upstream=\"k\",source=\"static\"} 0\n"));
}

#[test]
fn label_values_are_the_readme_words() {
    let words = |all: &[&'static str]| all.join(",");
    let reload: Vec<_> = ReloadResult::ALL.iter().map(|r| r.as_str()).collect();
    let probe: Vec<_> = ProbeResult::ALL.iter().map(|r| r.as_str()).collect();
    let render: Vec<_> = RenderResult::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        words(&reload),
        "ok,test_failed,signal_failed,unconfirmed,write_failed"
    );
    assert_eq!(words(&probe), "ok,bad_status,timeout,error");
    assert_eq!(words(&render), "changed,unchanged,error");
    let m = Metrics::new();
    m.endpoints
        .get_or_create(&endpoint_labels(&name("k"), Health::Down))
        .set(1);
    assert!(m
        .render()
        .contains("upstreamd_endpoints{upstream=\"k\",state=\"unhealthy\"} 1\n"));
}
