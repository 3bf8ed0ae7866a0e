//! The status page: server-rendered HTML that refreshes itself every two seconds, no script.
//!
//! It renders `templates/status.html.j2` with minijinja, whose auto-escaping (on for `.html`
//! names) escapes every value: registry names, reasons and errors are data from outside.

use std::sync::LazyLock;

use minijinja::Environment;

use crate::controller::status::StatusReport;

/// The template's name: its `.html` tells minijinja to escape for HTML.
const NAME: &str = "status.html.j2";

/// The page template, parsed once.
static PAGE: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.add_filter("ago", ago);
    env.add_filter("fixed", fixed);
    // The template is ours and tested below: a syntax error is a build defect.
    env.add_template(NAME, include_str!("../../templates/status.html.j2"))
        .expect("the status page template parses");
    env
});

/// `{{ secs|ago }}`: seconds ago, in the unit a reader wants; `—` for none.
fn ago(secs: Option<f64>) -> String {
    match secs {
        None => "—".to_owned(),
        Some(s) if s < 1.0 => format!("{:.0} ms ago", s * 1000.0),
        Some(s) if s < 120.0 => format!("{s:.1} s ago"),
        Some(s) if s < 7200.0 => format!("{:.0} min ago", s / 60.0),
        Some(s) => format!("{:.1} h ago", s / 3600.0),
    }
}

/// `{{ x|fixed(n) }}`: `x` with `n` digits after the point.
fn fixed(x: f64, digits: usize) -> String {
    format!("{x:.digits$}")
}

/// The page for a status report.
pub fn render(r: &StatusReport) -> Result<String, minijinja::Error> {
    PAGE.get_template(NAME)?.render(minijinja::context! { r })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Balance;
    use crate::controller::state::LastProbe;
    use crate::controller::status::{
        ApplyState, ApplyStatus, EndpointStatus, SourceStatus, TransitionStatus, UpstreamStatus,
    };
    use crate::decide::Verdict;
    use crate::health::Health;
    use crate::model::RegistryState;
    use crate::sources::SkippedEntry;

    const HOSTILE: &str = "<script>alert(\"x\")</script>'";
    const HOSTILE_ESCAPED: &str = "&lt;script&gt;alert(&quot;x&quot;)&lt;&#x2f;script&gt;&#x27;";

    fn apply(state: &'static str) -> ApplyState {
        ApplyState {
            state,
            on_disk: "missing",
            nginx_confirmed: true,
            urgent: false,
            consecutive_failures: 0,
            next_attempt_secs: None,
            last_error: None,
            render_error: None,
            held: None,
        }
    }

    fn report(upstreams: Vec<UpstreamStatus>) -> StatusReport {
        StatusReport {
            version: "0.1.0",
            ready: true,
            uptime_secs: 1.0,
            upstreams,
            last_apply: None,
            change_pending: false,
            apply: apply("in_sync"),
            old_generations: None,
            max_old_generations: 0,
            apply_mode: crate::config::ApplyMode::Reload,
            lua: None,
        }
    }

    fn source(skipped: usize, entries: Vec<SkippedEntry>) -> SourceStatus {
        SourceStatus {
            label: "etcd".into(),
            kind: "etcd",
            up: true,
            delivered: true,
            error: None,
            last_update_secs_ago: Some(0.25),
            stale_secs: None,
            updates: 1,
            skipped,
            skipped_entries: entries,
            from_saved: false,
            saved_secs_ago: None,
        }
    }

    fn endpoint(address: &str, health: Health, down: bool, origin: &str) -> EndpointStatus {
        EndpointStatus {
            address: address.parse().unwrap(),
            origin: origin.into(),
            registry: RegistryState::Passing,
            health,
            rendered: if down { "down" } else { "up" },
            verdict: if down {
                Verdict::ProbeDown
            } else {
                Verdict::Up
            },
            why: down.then(|| "its health probe failed: status 503".to_owned()),
            last_probe: Some(LastProbe {
                result: "ok",
                detail: "status 200".into(),
                latency_ms: 1.24,
            }),
            last_transition: None,
        }
    }

    fn upstream(sources: Vec<SourceStatus>, endpoints: Vec<EndpointStatus>) -> UpstreamStatus {
        UpstreamStatus {
            name: "kotaemon".into(),
            balance: Balance::LeastConn,
            all_unhealthy: false,
            sources,
            endpoints,
            shrink_held: None,
        }
    }

    #[test]
    fn seconds_ago_read_in_the_unit_a_reader_wants() {
        assert_eq!(ago(None), "—");
        assert_eq!(ago(Some(0.25)), "250 ms ago");
        assert_eq!(ago(Some(12.34)), "12.3 s ago");
        assert_eq!(ago(Some(600.0)), "10 min ago");
        assert_eq!(ago(Some(9000.0)), "2.5 h ago");
    }

    #[test]
    fn an_empty_report_renders_a_page_that_refreshes() {
        let mut r = report(vec![]);
        r.ready = false;
        let html = render(&r).unwrap();
        assert!(html.contains("http-equiv=\"refresh\""), "{html}");
        assert!(html.contains("<span class=\"state unknown\">starting</span>"));
        assert!(html.contains("Nothing applied yet."));
        assert!(html.contains("<p class=\"muted\" id=\"apply\">nginx runs the desired file</p>"));
    }

    #[test]
    fn endpoints_show_how_they_are_rendered_and_why() {
        let mut down = endpoint("127.0.0.3:80", Health::Down, true, "servers[2]");
        down.last_transition = Some(TransitionStatus {
            from: Health::Up,
            to: Health::Down,
            secs_ago: 3.0,
            why: "3 consecutive failed probes (fall = 3)".into(),
        });
        let u = upstream(
            vec![source(0, vec![])],
            vec![
                endpoint("127.0.0.2:80", Health::Up, false, "servers[1]"),
                down,
            ],
        );
        let html = render(&report(vec![u])).unwrap();
        for want in [
            "<h2>upstream <code>kotaemon</code> <span class=\"muted\">least_conn · 1 of 2 up</span></h2>",
            "<tr class=\"endpoint\" data-address=\"127.0.0.2:80\" data-rendered=\"up\"><td><code>127.0.0.2:80</code></td><td><span class=\"state up\">up</span></td><td class=\"why\"></td><td><span class=\"state up\">healthy</span></td><td>passing</td><td>status 200 (1.2 ms)</td><td>—</td><td class=\"muted\">servers[1]</td></tr>",
            "data-address=\"127.0.0.3:80\" data-rendered=\"down\"",
            "<td class=\"why\">its health probe failed: status 503</td><td><span class=\"state down\">unhealthy</span></td>",
            "<td>healthy → unhealthy, 3.0 s ago: 3 consecutive failed probes (fall = 3)</td>",
            "<tr><td>etcd</td><td><span class=\"state up\">up</span></td><td>250 ms ago</td><td>1</td><td>0</td><td></td></tr>",
        ] {
            assert!(html.contains(want), "{want}\nnot in\n{html}");
        }
        assert!(!html.contains("nothing registered"));
        assert!(!html.contains("class=\"skipped\""));
    }

    #[test]
    fn skipped_entries_are_listed_by_name_and_escaped() {
        let entry = SkippedEntry::new("/svc/<script>", "weight = \"x\" must be a number");
        let html = render(&report(vec![upstream(
            vec![source(21, vec![entry])],
            vec![],
        )]))
        .unwrap();
        assert!(
            html.contains("skipped 21 registry entries (the first 1 are listed)"),
            "{html}"
        );
        assert!(
            html.contains("<code>&#x2f;svc&#x2f;&lt;script&gt;</code>: weight = &quot;x&quot;"),
            "{html}"
        );
        assert!(html.contains("nothing registered"));
        assert!(!html.contains("<script>"), "{html}");
    }

    #[test]
    fn a_hostile_registry_value_arrives_escaped_everywhere_on_the_page() {
        let mut e = endpoint("127.0.0.2:80", Health::Down, true, HOSTILE);
        e.registry = RegistryState::Critical(HOSTILE.into());
        e.why = Some(HOSTILE.into());
        e.last_probe.as_mut().unwrap().detail = HOSTILE.into();
        let mut s = source(1, vec![SkippedEntry::new(HOSTILE, HOSTILE)]);
        s.label = HOSTILE.into();
        s.error = Some(HOSTILE.into());
        let mut u = upstream(vec![s], vec![e]);
        u.shrink_held = Some(HOSTILE.into());
        let mut r = report(vec![u]);
        r.last_apply = Some(ApplyStatus {
            result: "test_failed".into(),
            secs_ago: 1.0,
            duration_ms: 7.0,
            changes: HOSTILE.into(),
            error: Some(HOSTILE.into()),
        });
        r.apply = ApplyState {
            last_error: Some(HOSTILE.into()),
            consecutive_failures: 2,
            ..apply("retrying")
        };
        let html = render(&r).unwrap();
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains("alert(\"x\")"), "{html}");
        // Origin, registry, why, probe detail, source label (three times), source error,
        // skipped name and reason, held shrink, last apply error, apply error.
        assert_eq!(html.matches(HOSTILE_ESCAPED).count(), 13, "{html}");
    }

    #[test]
    fn a_failing_apply_says_how_often_and_when_it_is_retried() {
        let mut r = report(vec![]);
        r.apply = ApplyState {
            consecutive_failures: 3,
            on_disk: "previous",
            next_attempt_secs: Some(1.5),
            last_error: Some("nginx -t failed".into()),
            ..apply("retrying")
        };
        let html = render(&r).unwrap();
        assert!(
            html.contains("<p class=\"bad\" id=\"apply\">Applying failed 3 time(s) in a row; the file on disk is the previous one; next attempt in 1.5 s: nginx -t failed</p>"),
            "{html}"
        );
    }

    #[test]
    fn lua_mode_shows_the_confirmed_generation_or_the_escaped_push_error() {
        let mut r = report(vec![]);
        r.apply_mode = crate::config::ApplyMode::Lua;
        r.lua = Some(crate::controller::lua::LuaReport {
            confirmed_generation: None,
            master_pid: None,
            failed_pushes: 2,
            last_push_error: Some("nginx refused the push (401): <bad secret>".into()),
        });
        let html = render(&r).unwrap();
        assert!(
            html.contains("<p class=\"bad\" id=\"lua\">Apply mode lua: no generation confirmed by nginx yet; 2 failed push(es) in a row, last: nginx refused the push (401): &lt;bad secret&gt;</p>"),
            "{html}"
        );
        r.lua = Some(crate::controller::lua::LuaReport {
            confirmed_generation: Some(7),
            master_pid: Some(42),
            failed_pushes: 0,
            last_push_error: None,
        });
        let html = render(&r).unwrap();
        assert!(
            html.contains("<p class=\"muted\" id=\"lua\">Apply mode lua: every worker of nginx master 42 holds generation 7</p>"),
            "{html}"
        );
    }

    #[test]
    fn a_held_change_and_the_old_generations_are_on_the_page() {
        let mut r = report(vec![]);
        r.change_pending = true;
        r.apply = ApplyState {
            on_disk: "previous",
            next_attempt_secs: Some(0.5),
            held: Some("3 old nginx worker generations are still shutting down".into()),
            ..apply("held")
        };
        r.old_generations = Some(crate::nginx::OldGenerations {
            generations: 3,
            workers: 5,
        });
        r.max_old_generations = 2;
        let html = render(&r).unwrap();
        assert!(
            html.contains(
                "<p class=\"bad\" id=\"apply\">3 old nginx worker generations are still shutting down; next attempt in 0.5 s</p>"
            ),
            "{html}"
        );
        assert!(
            html.contains("still shutting down: 3 (5 workers; max_old_generations = 2)</p>"),
            "{html}"
        );
        r.old_generations = None;
        r.max_old_generations = 0;
        let html = render(&r).unwrap();
        assert!(
            html.contains("Old nginx worker generations: not counted yet (no limit)</p>"),
            "{html}"
        );
    }
}
