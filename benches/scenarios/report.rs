//! The results of a run, as `results.json` and as the `BENCHMARKS.md` tables.

use std::fmt::Write as _;

use serde::Serialize;

use crate::affinity::{AffinityResult, TestCost};
use crate::churn::ChurnResult;
use crate::discovery::DiscoveryResult;
use crate::env::{Health, Peer, Plan};
use crate::fail::{Event, FailResult};
use crate::render_timing::RenderTiming;
use crate::scale::ScaleResult;
use crate::streams::StreamsResult;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub kernel: String,
    pub nginx: String,
    pub etcd: String,
    pub date: String,
    /// `/proc/loadavg` when the run started and ended: the machine is shared.
    pub loadavg_start: String,
    pub loadavg_end: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub machine: Machine,
    pub command: String,
    pub plan: Plan,
    pub health: Health,
    pub duration_s: f64,
    pub render: Vec<RenderTiming>,
    pub fail: Vec<FailResult>,
    pub discovery: Vec<DiscoveryResult>,
    pub churn: Vec<ChurnResult>,
    pub streams: Vec<StreamsResult>,
    pub scale: Vec<ScaleResult>,
    /// Affinity across membership changes, `hash` then `sticky`.
    pub affinity: Vec<AffinityResult>,
    /// `nginx -t` on 1,000 replicas in each affinity mode.
    pub affinity_test_cost: Option<TestCost>,
    /// The apply modes side by side: reload, lua (with `--lua`), the naive reloader.
    pub modes: Vec<crate::modes::ModesResult>,
    /// Scenarios the harness could not run, with the reason.
    pub errors: Vec<String>,
    pub targets: Vec<Target>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub target: String,
    pub measured: String,
    /// `None` when the scenario behind it did not run.
    pub met: Option<bool>,
    pub why: String,
}

fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        if a == 0.0 {
            "— (0 and 0)".into()
        } else {
            "∞ (÷0)".into()
        }
    } else {
        format!("{:.2}×", a / b)
    }
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "—".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn secs(v: Option<f64>) -> String {
    v.map(|s| format!("+{s:.2} s"))
        .unwrap_or_else(|| "—".into())
}

fn kinds(k: &std::collections::BTreeMap<String, usize>) -> String {
    if k.is_empty() {
        "—".into()
    } else {
        k.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Computes the targets table from the results.
pub fn targets(r: &Results) -> Vec<Target> {
    let mut out = Vec::new();
    let ten_k = r.scale.iter().find(|s| s.endpoints == 10_000);
    out.push(match ten_k {
        Some(s) => Target {
            target: "10,000 endpoints probed every 1 s within half a core and 64 MB".into(),
            measured: format!(
                "{:.2} of a core, {:.1} MiB RSS (max), {:.0} probes/s",
                s.cpu_share, s.rss_mib_max, s.probes_per_s
            ),
            met: Some(s.cpu_share <= 0.5 && s.rss_mib_max <= 64.0 && s.probes_per_s >= 9_000.0),
            why: String::new(),
        },
        None => Target {
            target: "10,000 endpoints probed every 1 s within half a core and 64 MB".into(),
            measured: "not run (quick mode runs 1,000)".into(),
            met: None,
            why: String::new(),
        },
    });
    let render = r.render.iter().find(|t| t.servers == 10_000);
    out.push(Target {
        target: "render+diff of 10,000 servers under 10 ms".into(),
        measured: render
            .map(|t| format!("{} ms (median of {})", ms(t.total_ms), t.runs))
            .unwrap_or_else(|| "not run".into()),
        met: render.map(|t| t.total_ms < 10.0),
        why: render
            .map(|t| {
                format!(
                    "minijinja's render is {:.0}% of it, `decide` {:.0}%, the byte compare \
                     nothing; the slowest of the runs took {} ms (the machine is shared).",
                    100.0 * t.render_ms / t.total_ms,
                    100.0 * t.decide_ms / t.total_ms,
                    ms(t.max_total_ms)
                )
            })
            .unwrap_or_default(),
    });
    let churn = r.churn.iter().find(|c| c.peer == Peer::Upstreamd);
    let phase = |name: &str| churn.and_then(|c| c.phases.iter().find(|p| p.name == name));
    out.push(Target {
        target: "one reload per membership-changing burst, none for no-op churn".into(),
        measured: match (phase("no-op burst"), phase("changing burst")) {
            (Some(a), Some(b)) => format!(
                "no-op burst: {} reloads; changing burst: {}",
                a.reloads, b.reloads
            ),
            _ => "not run".into(),
        },
        met: match (phase("no-op burst"), phase("changing burst")) {
            (Some(a), Some(b)) => Some(a.reloads == 0 && b.reloads == 1),
            _ => None,
        },
        why: String::new(),
    });
    let slow = |p: Peer| {
        r.fail
            .iter()
            .find(|f| f.event == Event::FailSlow && f.peer == p)
    };
    out.push(match (slow(Peer::Upstreamd), slow(Peer::Passive)) {
        (Some(u), Some(n)) => Target {
            target: "fail-slow client errors at most a tenth of nginx alone".into(),
            measured: format!(
                "{} vs {} errors in the {:.0} s event window ({})",
                u.during.errors,
                n.during.errors,
                r.plan.fail_window_s,
                ratio(u.during.errors as f64, n.during.errors as f64)
            ),
            met: Some((u.during.errors as f64) <= 0.1 * n.during.errors as f64),
            why: format!(
                "nginx alone never stops sending to a replica that accepts and never answers: \
                 with `proxy_read_timeout 3600s` (the SSE answers need it) no request to it fails \
                 within the hour, so its errors grow with the window. upstreamd's stop once it \
                 removes the replica: nginx's last request to it started {} after the event (the \
                 probe timing: a probe times out after 500 ms and fall = 2 needs a second one \
                 1 s later; then the reload, a removal skips `settle`). The ratio is that time \
                 ÷ the \
                 {:.0} s window; a tenth needs removal within {:.1} s, which `interval = \"500ms\"` \
                 or `fall = 1` would give, at the cost of tolerance to a flapping replica.",
                secs(u.last_sent_s),
                r.plan.fail_window_s,
                r.plan.fail_window_s / 10.0
            ),
        },
        _ => Target {
            target: "fail-slow client errors at most a tenth of nginx alone".into(),
            measured: "not run".into(),
            met: None,
            why: String::new(),
        },
    });
    out.extend(haproxy_targets(r));
    for d in r.discovery.iter().filter(|d| d.peer == Peer::Upstreamd) {
        let budget = 250.0 + 50.0;
        out.push(Target {
            target: format!(
                "{} write → served, p99 within settle + 50 ms (300 ms)",
                d.registry
            ),
            measured: format!(
                "p99 {} ms over {} trials (p50 {} ms, max {} ms)",
                ms(d.p99_ms),
                d.trials,
                ms(d.p50_ms),
                ms(d.max_ms)
            ),
            met: Some(d.missed == 0 && d.p99_ms <= budget),
            why: "On SIGHUP nginx's master re-reads the config, starts the new workers and then \
                  sleeps 100 ms before it tells the old ones to stop (`ngx_msleep(100)` in \
                  `ngx_master_process_cycle`); a kept-alive connection stays on its old worker \
                  until then. So the floor is settle + upstreamd's apply (write, `nginx -t`, \
                  SIGHUP) + nginx's re-parse + 100 ms, which is about the p50; the target's \
                  50 ms leaves no room for nginx's own 100 ms. Only a shorter settle lowers it, \
                  and settle is what folds a burst into one reload."
                .into(),
        });
    }
    for s in &r.scale {
        out.push(Target {
            target: format!("no reloads in steady state ({} endpoints)", s.endpoints),
            measured: format!(
                "{} reloads, {} renders in {:.0} s",
                s.reloads_in_window, s.renders_in_window, s.window_s
            ),
            met: Some(s.reloads_in_window == 0),
            why: String::new(),
        });
    }
    out
}

/// Issue 14's targets: upstreamd with its detection tuning against HAProxy's best tuning, at
/// the same base interval, and the bound on the last request to a hung victim.
fn haproxy_targets(r: &Results) -> Vec<Target> {
    let find = |e: Event, p: Peer| r.fail.iter().find(|f| f.event == e && f.peer == p);
    let mut out = Vec::new();
    for (event, strict) in [
        (Event::FailSlow, true),
        (Event::FailStop, false),
        (Event::Sick, false),
    ] {
        let target = format!(
            "{} client errors {} HAProxy tuned's (same base interval)",
            event.label(),
            if strict { "below" } else { "no more than" }
        );
        out.push(
            match (
                find(event, Peer::UpstreamdFast),
                find(event, Peer::HaproxyTuned),
            ) {
                (Some(u), Some(h)) => Target {
                    target,
                    measured: format!(
                        "{} vs {} (HAProxy untuned {}, upstreamd as before {})",
                        u.during.errors,
                        h.during.errors,
                        find(event, Peer::Haproxy)
                            .map_or("—".into(), |f| f.during.errors.to_string()),
                        find(event, Peer::Upstreamd)
                            .map_or("—".into(), |f| f.during.errors.to_string()),
                    ),
                    met: Some(if strict {
                        u.during.errors < h.during.errors
                    } else {
                        u.during.errors <= h.during.errors
                    }),
                    why: "A removal skips `settle`, but still costs a reload (nginx's 100 ms \
                          between new and old workers included); HAProxy tuned also marks a \
                          server down from live traffic errors (`observe layer7`, `on-error \
                          mark-down`), which upstreamd deliberately never does: the error log \
                          only brings a probe forward. The machine is shared and noisy."
                        .into(),
                },
                _ => Target {
                    target,
                    measured: "not run".into(),
                    met: None,
                    why: String::new(),
                },
            },
        );
    }
    let parse = |d: &str| humantime::parse_duration(d).map_or(f64::NAN, |d| d.as_secs_f64());
    let (interval, timeout, fast) = (
        parse(r.health.interval),
        parse(r.health.timeout),
        parse(crate::env::FAST_INTERVAL),
    );
    let bound = interval + timeout + f64::from(r.health.fall - 1) * (fast + timeout) + 0.150;
    let target = format!(
        "last request to a hung victim within interval + timeout + (fall − 1) × (fast_interval + \
         timeout) + 150 ms ({bound:.2} s)"
    );
    out.push(match find(Event::FailSlow, Peer::UpstreamdFast) {
        Some(u) => Target {
            target,
            measured: format!("{} after the hang", secs(u.last_sent_s)),
            met: u.last_sent_s.map(|s| s <= bound),
            why: "Includes the reload; a removal skips `settle`.".into(),
        },
        None => Target {
            target,
            measured: "not run".into(),
            met: None,
            why: String::new(),
        },
    });
    out
}

/// `BENCHMARKS.md`.
/// The targets table, with the targets whose scenario ran; nothing when none did (an
/// `--only modes` run measures no target, and a table of "not run" rows says nothing).
fn targets_section(targets: &[Target]) -> String {
    let mut md = String::new();
    let ran: Vec<&Target> = targets.iter().filter(|t| t.met.is_some()).collect();
    if ran.is_empty() {
        return md;
    }
    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(
        md,
        "| target | measured | | why / what limits it |\n|---|---|---|---|"
    );
    for t in ran {
        let verdict = if t.met == Some(true) {
            "met"
        } else {
            "**missed**"
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            t.target, t.measured, verdict, t.why
        );
    }
    let _ = writeln!(md);
    md
}

pub fn markdown(r: &Results, notes: &str, json: &str) -> String {
    let mut md = String::new();
    let p = &r.plan;
    let m = &r.machine;
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Written by `{}` in {:.0} s{}. Every figure below comes from that one run; each \
         comparison ran in it, one peer after the other, on the same machine.\n",
        r.command,
        r.duration_s,
        match (p.quick, cfg!(debug_assertions)) {
            (true, true) => {
                " (quick mode from a debug build: tiny sizes, unoptimised binaries; the figures \
                 only show that the harness works)"
            }
            (true, false) => " (quick mode: tiny sizes, figures are smoke-level)",
            (false, true) => " (from a debug build: timings are not representative)",
            (false, false) => "",
        }
    );
    let _ = writeln!(
        md,
        "**Machine:** {} cores ({}), Linux {}, {}, {}; {}. Load average at start / end: {} / {} \
         (the machine is shared with other work).\n",
        m.nproc, m.cpu, m.kernel, m.nginx, m.etcd, m.date, m.loadavg_start, m.loadavg_end
    );
    let _ = writeln!(
        md,
        "**Setup:** a private nginx per peer (2 workers, the Kotaemon site of \
         `examples/nginx/kotaemon-site.conf`: `proxy_read_timeout 3600s`, `proxy_buffering off`, \
         sticky cookie hash), three `kotaemon-standin` replicas on 127.0.0.2–4, a paced client \
         (`GET /`, {rate} req/s over {users} users with their own affinity cookie and keep-alive \
         connections; a user gives up after {timeout} s). upstreamd probes `/queue/status` every \
         {interval} (timeout {htimeout}, rise {rise}, fall {fall}), `settle = 250ms`, \
         `min_reload_interval = 2s` unless said otherwise, `shrink_hold = 0s` (the harness \
         scales down on purpose). **Peers:** *nginx alone* has the same \
         file written once, with nginx's passive checks spelled out (`max_fails=1 \
         fail_timeout=10s`, nginx's defaults, also what upstreamd renders here); the *naive \
         reloader* (`benches/scenarios/naive-reloader.sh`) every 2 s lists the members, keeps those \
         whose `/queue/status` answers `curl -f -m 1`, rewrites the file and runs `nginx -t` + \
         SIGHUP, changed or not — the loop popular articles suggest.\n",
        rate = p.rate,
        users = p.users,
        timeout = p.client_timeout_s,
        interval = r.health.interval,
        htimeout = r.health.timeout,
        rise = r.health.rise,
        fall = r.health.fall,
    );
    let _ = writeln!(
        md,
        "Errors are what the client saw: 5xx answers, timeouts ({} s), connections reset or closed \
         before the answer (`reset_on_reuse`: on a kept-alive connection), cut bodies. Ratios are \
         upstreamd ÷ peer (below 1 is better for upstreamd).\n",
        p.client_timeout_s
    );

    if !r.errors.is_empty() {
        let _ = writeln!(md, "## Harness errors\n");
        for e in &r.errors {
            let _ = writeln!(md, "- {}", e.lines().next().unwrap_or(""));
        }
        let _ = writeln!(md);
    }

    md.push_str(&targets_section(&r.targets));

    // 1. Failures.
    if !r.fail.is_empty() {
        let _ = writeln!(md, "## 1. A replica fails under load\n");
        let _ = writeln!(
            md,
            "One replica of three fails {before:.0} s into the load; the event window is the \
             {window:.0} s after it. *fail-stop*: SIGKILL. *fail-slow*: `hang` (accepts, never \
             answers). *sick*: `sick:{sick}` (`/queue/status` answers 503, every other request is \
             answered after {sick} ms). \"Sent to victim\" counts requests the front sent to it \
             after the event (nginx's access log, retries included; HAProxy's log names the last \
             server tried only) and when the last one started. After the window the victim is \
             healthy again (restarted, or its mode back to `healthy`) and the load goes on for \
             {recover:.0} s: \"victim serves again\" is the time from then to the first request it \
             answered. *upstreamd* probes as before (`fast_interval` = `interval`); *upstreamd, \
             fast_interval 200ms + error log* re-probes a doubtful endpoint after 200 ms and \
             follows nginx's error log. *HAProxy 2.6* stands in nginx's place with the same \
             probes (`inter {interval}`, `rise`/`fall`, `timeout check` and `timeout connect` \
             {timeout}, `option redispatch 1`, `balance hash req.cook(kh_affinity)` consistent, \
             `timeout server 3600s`, `option abortonclose` as nginx drops an abandoned request); *tuned* adds `fastinter 200ms`, `observe layer7`, \
             `error-limit 1`, `on-error mark-down`. upstreamd applies a removal without \
             waiting for `settle`.\n",
            before = p.fail_before_s,
            window = p.fail_window_s,
            sick = p.sick_ms,
            recover = p.recover_window_s,
            interval = r.health.interval,
            timeout = r.health.timeout,
        );
        for event in [Event::FailStop, Event::FailSlow, Event::Sick] {
            let rows: Vec<&FailResult> = r.fail.iter().filter(|f| f.event == event).collect();
            if rows.is_empty() {
                continue;
            }
            let up = rows.iter().find(|f| f.peer == Peer::Upstreamd);
            let _ = writeln!(md, "### {}\n", event.label());
            let _ = writeln!(
                md,
                "| peer | requests | errors | error kinds | p50 ms | p90 ms | p99 ms | max ms | > 500 ms | victim's share before | sent to victim after (last) | victim answered until | victim serves again | reloads | errors ratio | > 500 ms ratio | p99 ratio |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
            );
            for f in &rows {
                let (er, sr, pr) = match up {
                    Some(u) if f.peer != Peer::Upstreamd => (
                        ratio(u.during.errors as f64, f.during.errors as f64),
                        ratio(u.during.slow as f64, f.during.slow as f64),
                        ratio(u.during.p99_ms, f.during.p99_ms),
                    ),
                    _ => ("—".into(), "—".into(), "—".into()),
                };
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0}% | {} ({}) | {} | {} | {} | {} | {} | {} |",
                    f.peer.label(),
                    f.during.requests,
                    f.during.errors,
                    kinds(&f.during.error_kinds),
                    ms(f.during.p50_ms),
                    ms(f.during.p90_ms),
                    ms(f.during.p99_ms),
                    ms(f.during.max_ms),
                    f.during.slow,
                    f.victim_share_before * 100.0,
                    f.sent_to_victim,
                    secs(f.last_sent_s),
                    secs(f.last_answered_s),
                    secs(f.recovered_s),
                    f.reloads,
                    er,
                    sr,
                    pr
                );
            }
            let _ = writeln!(md);
        }
        let _ = writeln!(
            md,
            "Before the event (all peers): p99 {} ms.\n",
            r.fail
                .iter()
                .map(|f| ms(f.before.p99_ms))
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }

    // 2. Discovery.
    if !r.discovery.is_empty() {
        let _ = writeln!(
            md,
            "## 2. Discovery: registry write → first request served by the new replica\n"
        );
        let _ = writeln!(
            md,
            "Two registered replicas, round robin; a third is registered (etcd put / Consul \
             agent register) and nginx is polled every 2 ms on a keep-alive connection until it \
             answers; the clock starts before the write. upstreamd here: `settle = {}`, \
             `min_reload_interval = {}`, and trials are spaced so that the interval never holds a \
             change back (every fifth trial the new replicas are removed together). The naive \
             reloader's trials start at a random point of its 2 s loop.\n",
            crate::discovery::SETTLE,
            crate::discovery::MIN_RELOAD_INTERVAL
        );
        let _ = writeln!(md, "| registry | peer | trials | p50 ms | p90 ms | p99 ms | min ms | max ms | missed | reloads | p50 ratio | p99 ratio |\n|---|---|---|---|---|---|---|---|---|---|---|---|");
        for d in &r.discovery {
            let up = r
                .discovery
                .iter()
                .find(|u| u.registry == d.registry && u.peer == Peer::Upstreamd);
            let (a, b) = match up {
                Some(u) if d.peer != Peer::Upstreamd => {
                    (ratio(u.p50_ms, d.p50_ms), ratio(u.p99_ms, d.p99_ms))
                }
                _ => ("—".into(), "—".into()),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                d.registry,
                d.peer.label(),
                d.trials,
                ms(d.p50_ms),
                ms(d.p90_ms),
                ms(d.p99_ms),
                ms(d.min_ms),
                ms(d.max_ms),
                d.missed,
                d.reloads,
                a,
                b
            );
        }
        let _ = writeln!(md);
    }

    // 3. Churn.
    if !r.churn.is_empty() {
        let _ = writeln!(md, "## 3. Registry churn\n");
        let _ = writeln!(
            md,
            "etcd, three registered replicas, steady load. *No-op burst*: {w} writes in 1 s, put \
             and delete of a fourth (live) replica in turn, ending unregistered. *Changing burst*: \
             the same, ending registered. *Flapping replica*: a registered replica's \
             `/queue/status` flips between 503 and 200 every {flap} ms for {fs:.0} s (faster than \
             rise/fall × interval). Reloads are nginx's `signal 1 (SIGHUP) received` lines from \
             the start of a phase to the start of the next.\n",
            w = crate::churn::BURST_WRITES,
            flap = crate::churn::FLAP_EVERY.as_millis(),
            fs = p.flap_s
        );
        let up = r.churn.iter().find(|c| c.peer == Peer::Upstreamd);
        let naive = r.churn.iter().find(|c| c.peer == Peer::Naive);
        let _ = writeln!(md, "| phase | span s | writes took s | upstreamd reloads | naive reloads | reloads ratio | upstreamd errors | naive errors | upstreamd p99 ms | naive p99 ms |\n|---|---|---|---|---|---|---|---|---|---|");
        if let (Some(u), Some(n)) = (up, naive) {
            for (a, b) in u.phases.iter().zip(&n.phases) {
                let _ = writeln!(
                    md,
                    "| {} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    a.name,
                    a.load.to_s - a.load.from_s,
                    a.writes_took_s
                        .map(|t| format!("{t:.2}"))
                        .unwrap_or_else(|| "—".into()),
                    a.reloads,
                    b.reloads,
                    ratio(a.reloads as f64, b.reloads as f64),
                    a.load.errors,
                    b.load.errors,
                    ms(a.load.p99_ms),
                    ms(b.load.p99_ms)
                );
            }
        }
        let _ = writeln!(md);
    }

    // 4. Streams.
    if !r.streams.is_empty() {
        let _ = writeln!(
            md,
            "## 4. Long streamed answers during membership changes\n"
        );
        let _ = writeln!(
            md,
            "{chats} chats (`POST /queue/join`, then the `GET /queue/data` SSE stream; {tokens} \
             tokens, {delay} ms apart: {secs:.1} s answers) and {tabs} open tabs (`/heartbeat` \
             streams that never end), sticky cookies, light `GET /` load. While the answers stream \
             a fourth replica is registered in etcd, then removed 2.5 s later. *Intact*: every \
             token, `process_completed` with the whole answer, `close_stream`, a clean chunked end. \
             Old workers: processes of the nginx master titled `worker process is shutting down` \
             (each generation has {{gen}} workers).\n",
            chats = p.chats,
            tokens = p.tokens,
            delay = p.token_delay_ms,
            secs = p.tokens as f64 * p.token_delay_ms as f64 / 1000.0,
            tabs = p.tabs
        );
        let _ = writeln!(md, "| peer | answers intact | outcomes | reloads | old workers: max | after the changes | after the answers (tabs open) | after the tabs closed | load errors | reloads ratio |\n|---|---|---|---|---|---|---|---|---|---|");
        let up = r.streams.iter().find(|s| s.peer == Peer::Upstreamd);
        for s in &r.streams {
            let rr = match up {
                Some(u) if s.peer != Peer::Upstreamd => ratio(u.reloads as f64, s.reloads as f64),
                _ => "—".into(),
            };
            let _ = writeln!(
                md,
                "| {} | {}/{} | {} | {} | {} | {} | {} | {} | {} of {} | {} |",
                s.peer.label(),
                s.intact,
                s.chats,
                kinds(&s.outcomes),
                s.reloads,
                s.old_workers_max,
                s.old_workers_after_changes,
                s.old_workers_after_answers,
                s.old_workers_after_tabs,
                s.load.errors,
                s.load.requests,
                rr
            );
        }
        let gen = r
            .streams
            .first()
            .map(|s| s.workers_per_generation)
            .unwrap_or(0);
        md = md.replace("{gen}", &gen.to_string());
        let _ = writeln!(md);
    }

    // 5. Scale.
    if !r.scale.is_empty() || !r.render.is_empty() {
        let _ = writeln!(md, "## 5. Scale\n");
        if !r.scale.is_empty() {
            let _ = writeln!(
                md,
                "One private nginx listening on N ports of 127.0.77.1 stands in for the fleet \
                 (`/queue/status` answers like Kotaemon's, keep-alive kept); upstreamd (static \
                 source, health every 1 s) keeps a second nginx's include. Steady state over the \
                 window, after the first apply and a {:.0} s warm-up. CPU share is upstreamd's \
                 user+system time over the window ÷ the window (1.0 = one core), from \
                 `/proc/PID/stat`; RSS from `/proc/PID/status`. `nginx -t` and reload are timed on \
                 the front nginx with upstreamd's file (reload: SIGHUP → a new worker exists); \
                 apply is upstreamd's own write + `nginx -t` + SIGHUP + confirmation.\n",
                p.scale_warmup_s
            );
            let _ = writeln!(md, "| endpoints | window s | CPU share | RSS max MiB | RSS mean MiB | open fds | probes/s | probes ok | healthy | renders | reloads | ready after s | file KiB | nginx -t ms | reload ms | apply ms | fleet nginx CPU |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
            for s in &r.scale {
                let _ = writeln!(
                    md,
                    "| {} | {:.0} | {:.3} | {:.1} | {:.1} | {} | {:.0} | {:.1}% | {:.0} | {:.0} | {} | {:.1} | {:.0} | {} | {} | {} | {:.2} |",
                    s.endpoints,
                    s.window_s,
                    s.cpu_share,
                    s.rss_mib_max,
                    s.rss_mib_mean,
                    s.open_fds,
                    s.probes_per_s,
                    s.probes_ok_share * 100.0,
                    s.healthy,
                    s.renders_in_window,
                    s.reloads_in_window,
                    s.ready_s,
                    s.file_bytes as f64 / 1024.0,
                    ms(s.nginx_test_ms),
                    ms(s.reload_ms),
                    ms(s.apply_ms),
                    s.fleet_cpu_share
                );
            }
            let _ = writeln!(md);
            peers_markdown(&mut md, &r.scale);
        }
        if !r.render.is_empty() {
            let _ = writeln!(
                md,
                "Render+diff (`benches/render.rs`, also run here): `decide` + cloning into the \
                 template context + `Renderer::render` + byte compare with the previous bytes, one \
                 sticky upstream, medians in ms. \"read\" is reading the current file back from \
                 disk, which the controller does before comparing.\n"
            );
            let _ = writeln!(md, "| servers | runs | file bytes | decide | render | compare | total | slowest total | read file |\n|---|---|---|---|---|---|---|---|---|");
            for t in &r.render {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    t.servers,
                    t.runs,
                    t.bytes,
                    ms(t.decide_ms),
                    ms(t.render_ms),
                    ms(t.compare_ms),
                    ms(t.total_ms),
                    ms(t.max_total_ms),
                    ms(t.read_file_ms)
                );
            }
            let _ = writeln!(md);
        }
    }
    crate::affinity::markdown(&mut md, &r.affinity, r.affinity_test_cost.as_ref());
    md.push_str(&crate::modes::section(&r.modes));
    if !notes.is_empty() {
        let _ = writeln!(md, "## Notes\n\n{notes}");
    }
    let _ = writeln!(
        md,
        "Raw figures (every trial, every window, the plan): `{}` of the same run. Reproduce \
         with `bash scripts/bench.sh` (about 10 minutes on 2 cores) or \
         `bash scripts/bench.sh --quick` (a few minutes, smoke-level sizes, writes under \
         `bench-out/` only).",
        json.trim_start_matches('/')
    );
    md
}

/// Section 5's peers: upstreamd beside HAProxy (and a baseline upstreamd), same fleet, same
/// window.
fn peers_markdown(md: &mut String, scale: &[crate::scale::ScaleResult]) {
    if scale.iter().all(|s| s.peers.is_empty()) {
        return;
    }
    let _ = writeln!(
        md,
        "Probe cost beside the peers, measured over the same window against the same fleet: \
         HAProxy 2.6 (`option httpchk GET /queue/status`, `http-check expect string`, `inter 1s`, \
         rise/fall 2, a new connection per check; up to 5,000 servers, the open-file limit) and, \
         when `UPSTREAMD_BENCH_BASELINE` names one, another upstreamd binary (\"baseline\"). \
         Cores = CPU time ÷ window; MiB = RSS max; up = servers held up at the window's end.\n"
    );
    let _ = writeln!(
        md,
        "| endpoints | upstreamd | upstreamd baseline | HAProxy |\n|---|---|---|---|"
    );
    let cell = |cpu: f64, mib: f64, up: f64| format!("{cpu:.3} core, {mib:.1} MiB, {up:.0} up");
    for s in scale {
        let peer = |name: &str| {
            s.peers
                .iter()
                .find(|p| p.peer == name)
                .map(|p| cell(p.cpu_share, p.rss_mib_max, p.up))
                .unwrap_or_else(|| "—".into())
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            s.endpoints,
            cell(s.cpu_share, s.rss_mib_max, s.healthy),
            peer("upstreamd baseline"),
            peer("haproxy")
        );
    }
    let _ = writeln!(md);
}
