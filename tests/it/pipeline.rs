//! The core pipeline end to end: static source → probes → render → nginx -t → SIGHUP,
//! against a real nginx and stand-in Kotaemon replicas.

use std::time::{Duration, Instant};

use crate::util::*;
use nix::sys::signal::Signal;

const SHORT: Duration = Duration::from_secs(10);

fn server_line(r: &Replica, down: bool) -> String {
    format!(
        "    server {}{};\n",
        r.addr,
        if down { " down" } else { "" }
    )
}

#[test]
fn serves_only_healthy_replicas_and_reloads_once_per_change() {
    let replicas = ["alpha", "bravo", "charlie"].map(Replica::start);
    let nginx = Nginx::start("kotaemon");
    let _report = report_on_failure(&nginx);
    let cfg = Config::static_list(&nginx, "kotaemon", &replicas.iter().collect::<Vec<_>>())
        .admin_port0()
        .to_toml();
    let mut daemon = Daemon::start(&cfg);

    wait_for("the first render", SHORT, || {
        replicas
            .iter()
            .all(|r| nginx.rendered().contains(&server_line(r, false)))
    });
    wait_for("the first reload", SHORT, || nginx.reloads() == 1);
    nginx.wait_spread(30, "all three replicas to serve and nothing else", |s| {
        s.len() == 3
            && ["alpha", "bravo", "charlie"]
                .iter()
                .all(|r| s.contains_key(*r))
    });

    // bravo fails its health path: it must be marked down and get no traffic.
    let failed_at = Instant::now();
    replicas[1].set_mode("error");
    wait_for("bravo marked down", SHORT, || {
        nginx.rendered().contains(&server_line(&replicas[1], true))
    });
    let marked = failed_at.elapsed();
    wait_for("two reloads", SHORT, || nginx.reloads() == 2);
    nginx.wait_spread(30, "only alpha and charlie to serve", |s| {
        s.keys().collect::<Vec<_>>() == ["alpha", "charlie"]
    });
    let gone = failed_at.elapsed();
    eprintln!("figure: bravo failing → marked down in the file {marked:?}, → nginx serving without it {gone:?} (interval 200ms, fall 2)");

    replicas[1].set_mode("healthy");
    wait_for("bravo back up", SHORT, || {
        nginx.rendered().contains(&server_line(&replicas[1], false))
    });
    wait_for("three reloads", SHORT, || nginx.reloads() == 3);

    // Quiet world: no more reloads while probes keep running.
    assert_quiet(&nginx, &mut daemon, 3);
    daemon.wait_log("Endpoint health changed.");
}

#[test]
fn a_single_failed_probe_below_fall_reloads_nothing() {
    let replicas = [Replica::start("alpha"), Replica::start("bravo")];
    let nginx = Nginx::start("kotaemon");
    let _report = report_on_failure(&nginx);
    let cfg = Config::static_list(&nginx, "kotaemon", &replicas.iter().collect::<Vec<_>>())
        .health("fall", 6)
        .admin_port0()
        .to_toml();
    let daemon = Daemon::start(&cfg);
    wait_for("the first reload", SHORT, || nginx.reloads() == 1);
    // A failed probe or two, far below fall = 6.
    let admin = daemon.admin();
    replicas[0].set_mode_and_wait("error", 503);
    wait_for("a failed probe", SHORT, || {
        metric(
            &admin_metrics(&admin),
            "upstreamd_probes_total{upstream=\"kotaemon\",result=\"bad_status\"}",
        ) >= 1.0
    });
    replicas[0].set_mode_and_wait("healthy", 200);
    daemon.wait_loop_ran();
    assert_eq!(nginx.reloads(), 1);
    assert!(!nginx.rendered().contains(" down;"));
    assert!(
        !daemon.output.text().contains("to=unhealthy"),
        "no endpoint went down:\n{}",
        daemon.output.text()
    );
}

#[test]
fn a_restart_over_an_unchanged_world_reloads_nothing_and_sigterm_leaves_the_file() {
    let replicas = [Replica::start("alpha"), Replica::start("bravo")];
    let nginx = Nginx::start("kotaemon");
    let _report = report_on_failure(&nginx);
    let cfg = Config::static_list(&nginx, "kotaemon", &replicas.iter().collect::<Vec<_>>())
        .admin_port0()
        .to_toml();
    let mut first = Daemon::start(&cfg);
    wait_for("the first reload", SHORT, || nginx.reloads() == 1);
    wait_for("ready", SHORT, || {
        first.output.text().contains("Upstream file is up to date.")
    });
    let before = std::fs::read(nginx.output()).unwrap();

    let stop = Instant::now();
    first.signal(Signal::SIGTERM);
    assert_eq!(
        first.wait_exit(Duration::from_secs(5)),
        Some(0),
        "SIGTERM stops within 5 s with exit 0"
    );
    eprintln!("figure: SIGTERM → exit in {:?}", stop.elapsed());
    assert_eq!(
        std::fs::read(nginx.output()).unwrap(),
        before,
        "the file is left as it is"
    );

    let second = Daemon::start(&cfg);
    wait_for("ready again", SHORT, || {
        second
            .output
            .text()
            .contains("Upstream file is up to date.")
    });
    second.wait_loop_ran();
    assert_eq!(
        nginx.reloads(),
        1,
        "a restart over an unchanged world reloads nothing"
    );
    assert_eq!(std::fs::read(nginx.output()).unwrap(), before);
}

#[test]
fn every_replica_unhealthy_still_renders_a_file_nginx_accepts() {
    for (policy, down) in [("fail_closed", true), ("fail_open", false)] {
        let replicas = [Replica::start("alpha"), Replica::start("bravo")];
        for r in &replicas {
            r.set_mode_and_wait("error", 503);
        }
        let nginx = Nginx::start("kotaemon");
        let _report = report_on_failure(&nginx);
        let cfg = Config::static_list(&nginx, "kotaemon", &replicas.iter().collect::<Vec<_>>())
            .set("on_all_unhealthy", policy)
            .to_toml();
        let _daemon = Daemon::start(&cfg);
        wait_for("the first reload", SHORT, || nginx.reloads() == 1);
        let text = nginx.rendered();
        for r in &replicas {
            assert!(text.contains(&server_line(r, down)), "{policy}: {text}");
        }
        assert!(text.contains(&format!("on_all_unhealthy = {policy}")));
        let t = nginx.test_config();
        assert!(
            t.status.success(),
            "nginx -t: {}",
            String::from_utf8_lossy(&t.stderr)
        );
    }
}

#[test]
fn once_dry_run_prints_the_file_and_touches_nothing() {
    let replicas = [Replica::start("alpha")];
    let nginx = Nginx::start("kotaemon");
    let cfg =
        Config::static_list(&nginx, "kotaemon", &replicas.iter().collect::<Vec<_>>()).to_toml();
    let (_dir, path) = write_config(&cfg);
    let before = std::fs::read(nginx.output()).unwrap();
    let mtime = std::fs::metadata(nginx.output())
        .unwrap()
        .modified()
        .unwrap();
    let (code, stdout, stderr) =
        upstreamd(&["once", "--config", path.to_str().unwrap(), "--dry-run"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&server_line(&replicas[0], false)),
        "{stdout}"
    );
    assert!(stdout.contains("upstream kotaemon {"));
    assert_eq!(std::fs::read(nginx.output()).unwrap(), before);
    assert_eq!(
        std::fs::metadata(nginx.output())
            .unwrap()
            .modified()
            .unwrap(),
        mtime
    );
    assert_eq!(nginx.reloads(), 0);

    // Without --dry-run: written and reloaded once, then a second run changes nothing.
    let (code, _, stderr) = upstreamd(&["once", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(nginx.rendered(), stdout);
    wait_for("one reload", SHORT, || nginx.reloads() == 1);
    // `once` exits after nginx confirmed a reload, so one would be in the log by now.
    let (code, _, _) = upstreamd(&["once", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert_eq!(nginx.reloads(), 1);
}

#[test]
fn check_reports_every_problem_at_once_with_exit_2() {
    let (_dir, path) = write_config(
        r#"
[nginx]
settle = 5

[[upstream]]
name = "kot-aemon"
balance = "sticky"
keepalive = -1

[upstream.health]
intervall = "2s"

[[upstream.source]]
kind = "static"
servers = ["10.0.0.1:7860 down", { address = "10.0.0.2:7860", backup = true }]
"#,
    );
    let (code, stdout, stderr) = upstreamd(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    for needle in [
        "nginx.output",
        "nginx.settle",
        "upstream[0].name",
        "intervall",
        "did you mean `interval`",
        "servers[0]",
        "backup",
        "keepalive",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
    let (code, _, _) = upstreamd(&["check", "--config", "/nonexistent/upstreamd.toml"]);
    assert_eq!(code, 2);
    let (code, _, _) = upstreamd(&["frobnicate"]);
    assert_eq!(code, 2, "usage errors exit 2");
}

#[test]
fn check_accepts_a_good_config() {
    let nginx = Nginx::start("kotaemon");
    let r = Replica::start("alpha");
    let (_dir, path) = write_config(
        &Config::static_list(&nginx, "kotaemon", &[&r])
            .set("balance", "sticky")
            .to_toml(),
    );
    let (code, stdout, stderr) = upstreamd(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ok"));
}

#[test]
fn json_logs_are_one_object_per_line_naming_what_changed() {
    let replicas = [Replica::start("alpha"), Replica::start("bravo")];
    let nginx = Nginx::start("kotaemon");
    let cfg =
        Config::static_list(&nginx, "kotaemon", &replicas.iter().collect::<Vec<_>>()).to_toml();
    let daemon = Daemon::start_with(&cfg, &["--log-format", "json"], &[]);
    wait_for("the first reload", SHORT, || nginx.reloads() == 1);
    replicas[1].set_mode("error");
    wait_for("the change logged", SHORT, || {
        daemon.output.text().contains("consecutive failed probes")
    });
    let text = daemon.output.text();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let flip = lines
        .iter()
        .find(|l| l["message"] == "Endpoint health changed." && l["to"] == "unhealthy")
        .expect("a health flip line");
    assert_eq!(flip["endpoint"], replicas[1].addr.as_str());
    assert_eq!(flip["upstream"], "kotaemon");
    assert!(
        flip["why"]
            .as_str()
            .unwrap()
            .starts_with("2 consecutive failed probes (fall = 2)"),
        "{flip}"
    );
    assert!(lines
        .iter()
        .all(|l| l["level"].is_string() && l["timestamp"].is_string()));
}

#[test]
fn probing_health_on_kotaemon_logs_the_queue_status_hint_once() {
    let replicas = [Replica::start("alpha"), Replica::start("bravo")];
    let nginx = Nginx::start("kotaemon");
    let cfg = Config::static_list(&nginx, "kotaemon", &replicas.iter().collect::<Vec<_>>())
        .health("path", "/health")
        .admin_port0()
        .to_toml();
    let daemon = Daemon::start(&cfg);
    wait_for("the hint", SHORT, || {
        daemon.output.text().contains("Kotaemon has no /health")
    });
    // Several more probe rounds: the hint is not repeated.
    daemon.wait_loop_ran();
    assert_eq!(
        daemon
            .output
            .text()
            .matches("Kotaemon has no /health")
            .count(),
        1
    );
    assert!(
        daemon.output.text().contains("path = \"/queue/status\""),
        "{}",
        daemon.output.text()
    );
    // Every endpoint unhealthy, fail_open: nginx keeps sending traffic as it would alone.
    wait_for("the first reload", SHORT, || nginx.reloads() == 1);
    assert!(nginx.rendered().contains("on_all_unhealthy = fail_open"));
}

#[test]
fn check_runs_the_sources_own_checks_and_the_template() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("bad.j2");
    std::fs::write(&template, "{% for u in upstreams %}").unwrap();
    let (_cfg_dir, path) = write_config(&format!(
        r#"
[nginx]
output = "/tmp/never-written.conf"
template = "{}"

[[upstream]]
name = "kotaemon"

[[upstream.source]]
kind = "etcd"
endpoints = ["https://127.0.0.1:2379"]
prefix = "/services/kotaemon/"
"#,
        template.display()
    ));
    let (code, _, stderr) = upstreamd(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("upstream[0].source[0]: "), "{stderr}");
    assert!(stderr.contains("nginx.template: "), "{stderr}");
}
