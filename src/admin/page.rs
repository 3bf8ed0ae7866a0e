//! The status page: server-rendered HTML that refreshes itself every two seconds, no script.

use crate::controller::status::{
    ApplyState, EndpointStatus, SourceStatus, StatusReport, UpstreamStatus,
};

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn secs(s: f64) -> String {
    match s {
        s if s < 1.0 => format!("{:.0} ms ago", s * 1000.0),
        s if s < 120.0 => format!("{s:.1} s ago"),
        s if s < 7200.0 => format!("{:.0} min ago", s / 60.0),
        s => format!("{:.1} h ago", s / 3600.0),
    }
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.5em}\
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:left}\
th{background:#f4f4f4}.state{font-weight:600;border-radius:3px;padding:.1em .5em;color:#fff}\
.up{background:#2e7d32}.down{background:#c62828}.unknown{background:#757575}.stale{background:#ef6c00}\
.muted{color:#777}.banner{padding:.5em 1em;border-radius:4px;margin:.5em 0}\
.bad{background:#ffebee;border:1px solid #c62828}.ok{background:#e8f5e9;border:1px solid #2e7d32}";

fn endpoint_row(e: &EndpointStatus) -> String {
    let health = e.health.to_string();
    let probe = e.last_probe.as_ref().map_or("—".to_owned(), |p| {
        format!("{} ({:.1} ms)", esc(&p.detail), p.latency_ms)
    });
    let transition = e.last_transition.as_ref().map_or("—".to_owned(), |t| {
        format!(
            "{} → {}, {}: {}",
            t.from,
            t.to,
            secs(t.secs_ago),
            esc(&t.why)
        )
    });
    let registry = match &e.registry {
        crate::model::RegistryState::Passing => "passing".to_owned(),
        crate::model::RegistryState::Critical(why) => format!("critical: {}", esc(why)),
    };
    let why = e.why.as_deref().map(esc).unwrap_or_default();
    format!(
        "<tr class=\"endpoint\" data-address=\"{addr}\" data-rendered=\"{r}\"><td><code>{addr}</code></td>\
         <td><span class=\"state {r}\">{r}</span></td><td class=\"why\">{why}</td><td><span class=\"state {hc}\">{health}</span></td>\
         <td>{registry}</td><td>{probe}</td><td>{transition}</td><td class=\"muted\">{origin}</td></tr>",
        addr = esc(&e.address.to_string()),
        r = e.rendered,
        hc = match e.health {
            crate::health::Health::Up => "up",
            crate::health::Health::Down => "down",
            crate::health::Health::Unknown => "unknown",
        },
        origin = esc(&e.origin),
    )
}

fn source_row(s: &SourceStatus) -> String {
    let (class, state) = match (s.delivered, s.up) {
        (false, _) => ("unknown", "waiting"),
        (true, true) => ("up", "up"),
        (true, false) => ("stale", "stale"),
    };
    format!(
        "<tr><td>{}</td><td><span class=\"state {class}\">{state}</span></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        esc(&s.label),
        s.last_update_secs_ago.map_or("—".to_owned(), secs),
        s.updates,
        s.skipped,
        s.error.as_deref().map(esc).unwrap_or_default(),
    )
}

/// The entries a source refused, each with why; `None` when it refused none.
fn skipped_list(s: &SourceStatus) -> Option<String> {
    if s.skipped == 0 {
        return None;
    }
    let mut out = format!(
        "<div class=\"skipped\" data-source=\"{label}\">Source {label} skipped {n} registry {entries}",
        label = esc(&s.label),
        n = s.skipped,
        entries = if s.skipped == 1 { "entry" } else { "entries" },
    );
    if s.skipped > s.skipped_entries.len() {
        out.push_str(&format!(
            " (the first {} are listed)",
            s.skipped_entries.len()
        ));
    }
    out.push_str(":<ul>");
    for e in &s.skipped_entries {
        out.push_str(&format!(
            "<li><code>{}</code>: {}</li>",
            esc(&e.name),
            esc(&e.reason)
        ));
    }
    out.push_str("</ul></div>");
    Some(out)
}

fn upstream_section(u: &UpstreamStatus) -> String {
    let up = u.endpoints.iter().filter(|e| e.rendered == "up").count();
    let balance = serde_json::to_value(u.balance)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let mut out = format!(
        "<h2>upstream <code>{}</code> <span class=\"muted\">{balance} · {up} of {} up</span></h2>",
        esc(&u.name),
        u.endpoints.len()
    );
    if u.all_unhealthy {
        out.push_str("<div class=\"banner bad\">Every endpoint fails its health check: on_all_unhealthy applies.</div>");
    }
    if let Some(held) = &u.shrink_held {
        out.push_str(&format!(
            "<div class=\"banner bad\">Held: {}</div>",
            esc(held)
        ));
    }
    out.push_str("<table><tr><th>source</th><th>state</th><th>last update</th><th>updates</th><th>skipped</th><th>error</th></tr>");
    for s in &u.sources {
        out.push_str(&source_row(s));
    }
    out.push_str("</table>");
    for list in u.sources.iter().filter_map(skipped_list) {
        out.push_str(&list);
    }
    out.push_str("<table><tr><th>endpoint</th><th>rendered</th><th>why</th><th>probe</th><th>registry</th><th>last probe</th><th>last transition</th><th>origin</th></tr>");
    for e in &u.endpoints {
        out.push_str(&endpoint_row(e));
    }
    if u.endpoints.is_empty() {
        out.push_str("<tr><td colspan=\"8\" class=\"muted\">nothing registered</td></tr>");
    }
    out.push_str("</table>");
    out
}

/// Where the desired file stands: on disk, confirmed by nginx, retried.
fn apply_line(a: &ApplyState) -> String {
    let next = a
        .next_attempt_secs
        .map(|s| format!("; next attempt in {s:.1} s"))
        .unwrap_or_default();
    let (class, what) = match a.state {
        "in_sync" => ("muted", "nginx runs the desired file".to_owned()),
        "held" => (
            "bad",
            format!("{}{next}", a.held.as_deref().unwrap_or("A change is held")),
        ),
        "pending" if a.urgent => ("muted", format!("A removal is being applied{next}")),
        "pending" => (
            "muted",
            format!("A change is waiting for settle / min_reload_interval{next}"),
        ),
        "render_failed" => (
            "bad",
            format!(
                "The template fails; the last good file stays: {}",
                a.render_error.as_deref().unwrap_or_default()
            ),
        ),
        _ => (
            "bad",
            format!(
                "Applying failed {} time(s) in a row; the file on disk is the {} one{next}: {}",
                a.consecutive_failures,
                a.on_disk,
                a.last_error.as_deref().unwrap_or_default()
            ),
        ),
    };
    format!("<p class=\"{class}\" id=\"apply\">{}</p>", esc(&what))
}

/// The old nginx worker generations still shutting down, and the limit.
fn generations_line(r: &StatusReport) -> String {
    let limit = match r.max_old_generations {
        0 => "no limit".to_owned(),
        n => format!("max_old_generations = {n}"),
    };
    let what = match r.old_generations {
        Some(g) => format!(
            "Old nginx worker generations still shutting down: {} ({} workers; {limit})",
            g.generations, g.workers
        ),
        None => format!("Old nginx worker generations: not counted yet ({limit})"),
    };
    let class = match r.old_generations {
        Some(g) if g.generations > 0 => "",
        _ => "muted",
    };
    format!(
        "<p class=\"{class}\" id=\"old-generations\">{}</p>",
        esc(&what)
    )
}

/// `apply = "lua"`: the generation nginx confirmed and the last push error.
fn lua_line(l: &crate::controller::lua::LuaReport) -> String {
    let confirmed = match (l.confirmed_generation, l.master_pid) {
        (Some(g), Some(pid)) => format!("every worker of nginx master {pid} holds generation {g}"),
        _ => "no generation confirmed by nginx yet".to_owned(),
    };
    let (class, error) = match &l.last_push_error {
        Some(e) => (
            "bad",
            format!("; {} failed push(es) in a row, last: {e}", l.failed_pushes),
        ),
        None => ("muted", String::new()),
    };
    format!(
        "<p class=\"{class}\" id=\"lua\">Apply mode lua: {}{}</p>",
        esc(&confirmed),
        esc(&error)
    )
}

/// The page for a status report.
pub fn render(r: &StatusReport) -> String {
    let mut body = String::new();
    let ready = if r.ready {
        "<span class=\"state up\">ready</span>"
    } else {
        "<span class=\"state unknown\">starting</span>"
    };
    body.push_str(&format!("<h1>upstreamd {} {ready}</h1>", esc(r.version)));
    match &r.last_apply {
        Some(a) if a.error.is_some() => body.push_str(&format!(
            "<div class=\"banner bad\" id=\"last-apply\">Last apply <b>{}</b> {}: {}</div>",
            esc(&a.result),
            secs(a.secs_ago),
            esc(a.error.as_deref().unwrap_or_default())
        )),
        Some(a) => body.push_str(&format!(
            "<div class=\"banner ok\" id=\"last-apply\">Last apply <b>{}</b> {} in {:.0} ms: {}</div>",
            esc(&a.result),
            secs(a.secs_ago),
            a.duration_ms,
            esc(&a.changes)
        )),
        None => body.push_str("<div class=\"banner\" id=\"last-apply\">Nothing applied yet.</div>"),
    }
    body.push_str(&apply_line(&r.apply));
    body.push_str(&generations_line(r));
    if let Some(lua) = &r.lua {
        body.push_str(&lua_line(lua));
    }
    for u in &r.upstreams {
        body.push_str(&upstream_section(u));
    }
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"2\">\
         <title>upstreamd</title><style>{STYLE}</style></head><body>{body}\
         <p class=\"muted\">Refreshes every 2 s · <a href=\"/status\">/status</a> · <a href=\"/metrics\">/metrics</a></p></body></html>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_everything_a_registry_could_put_in_an_origin() {
        assert_eq!(esc("<script>\"'&"), "&lt;script&gt;&quot;&#39;&amp;");
    }

    #[test]
    fn skipped_entries_are_listed_by_name_and_escaped() {
        let mut s = SourceStatus {
            label: "etcd".into(),
            kind: "etcd",
            up: true,
            delivered: true,
            error: None,
            last_update_secs_ago: None,
            stale_secs: None,
            updates: 1,
            skipped: 0,
            skipped_entries: vec![],
            from_saved: false,
            saved_secs_ago: None,
        };
        assert_eq!(skipped_list(&s), None);
        s.skipped = 21;
        s.skipped_entries = vec![crate::sources::SkippedEntry::new(
            "/svc/<script>",
            "weight = \"x\" must be a number",
        )];
        let html = skipped_list(&s).unwrap();
        assert!(
            html.contains("skipped 21 registry entries (the first 1 are listed)"),
            "{html}"
        );
        assert!(
            html.contains("<code>/svc/&lt;script&gt;</code>: weight = &quot;x&quot;"),
            "{html}"
        );
        assert!(!html.contains("<script>"), "{html}");
    }

    #[test]
    fn an_empty_report_renders_a_page_that_refreshes() {
        let r = StatusReport {
            version: "0.1.0",
            ready: false,
            uptime_secs: 1.0,
            upstreams: vec![],
            last_apply: None,
            change_pending: false,
            apply: ApplyState {
                state: "in_sync",
                on_disk: "missing",
                nginx_confirmed: true,
                urgent: false,
                consecutive_failures: 0,
                next_attempt_secs: None,
                last_error: None,
                render_error: None,
                held: None,
            },
            old_generations: None,
            max_old_generations: 0,
            apply_mode: crate::config::ApplyMode::Lua,
            lua: Some(crate::controller::lua::LuaReport {
                confirmed_generation: None,
                master_pid: None,
                failed_pushes: 2,
                last_push_error: Some("nginx refused the push (401): <bad secret>".into()),
            }),
        };
        let html = render(&r);
        assert!(html.contains("http-equiv=\"refresh\""));
        assert!(html.contains("starting"));
        assert!(html.contains("Old nginx worker generations: not counted yet (no limit)"));
        assert!(
            html.contains("Apply mode lua: no generation confirmed by nginx yet; 2 failed push(es) in a row, last: nginx refused the push (401): &lt;bad secret&gt;"),
            "{html}"
        );
    }

    #[test]
    fn a_held_change_and_the_old_generations_are_on_the_page() {
        let apply = ApplyState {
            state: "held",
            on_disk: "previous",
            nginx_confirmed: true,
            urgent: false,
            consecutive_failures: 0,
            next_attempt_secs: Some(0.5),
            last_error: None,
            render_error: None,
            held: Some("3 old nginx worker generations are still shutting down".into()),
        };
        let r = StatusReport {
            version: "0.1.0",
            ready: true,
            uptime_secs: 1.0,
            upstreams: vec![],
            last_apply: None,
            change_pending: true,
            apply,
            old_generations: Some(crate::nginx::OldGenerations {
                generations: 3,
                workers: 5,
            }),
            max_old_generations: 2,
            apply_mode: crate::config::ApplyMode::Reload,
            lua: None,
        };
        let html = render(&r);
        assert!(
            html.contains(
                "3 old nginx worker generations are still shutting down; next attempt in 0.5 s"
            ),
            "{html}"
        );
        assert!(
            html.contains("still shutting down: 3 (5 workers; max_old_generations = 2)"),
            "{html}"
        );
    }
}
