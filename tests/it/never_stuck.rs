//! The loop never stuck, through the real daemon and a real nginx: a failed apply is retried
//! without another change (a broken site fixed later, a stopped nginx master continued), a
//! template that fails at run time leaves the daemon and the last good file, removals go out
//! without waiting for `settle`, and a restart without saved state measures a registry's first
//! answer against the file on disk.

use std::time::Duration;

use crate::util::consul::{Lane, Registry};
use crate::util::*;
use nix::sys::signal::{kill, Signal};

const SHORT: Duration = Duration::from_secs(15);

#[test]
fn a_file_rejected_for_a_broken_site_is_applied_once_the_site_is_fixed_with_no_other_change() {
    let replicas = [Replica::start("alpha"), Replica::start("bravo")];
    let nginx = Nginx::start("kotaemon");
    let _report = report_on_failure(&nginx);
    let cfg = Config::static_list(&nginx, "kotaemon", &[&replicas[0], &replicas[1]])
        .admin_port0()
        .to_toml();
    let daemon = Daemon::start(&cfg);
    let admin = daemon.admin();
    wait_reloads_at_least(&admin, "ok", 1.0);

    // Someone breaks the site: every `nginx -t` fails, whatever upstreamd writes.
    let conf = nginx.dir.path().join("conf/nginx.conf");
    let good_site = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(
        &conf,
        good_site.replacen(
            "access_log off;",
            "access_log off;\n  no_such_directive on;",
            1,
        ),
    )
    .unwrap();
    replicas[1].set_mode("error");
    wait_reloads_at_least(&admin, "test_failed", 1.0);
    // Retried with no other change, and a failed test signals nothing: no reload storm.
    wait_reloads_at_least(&admin, "test_failed", 2.0);
    assert_eq!(nginx.reloads(), 1);
    let st = admin_status(&admin);
    assert_eq!(st["apply"]["state"], "retrying", "{st}");
    assert_eq!(st["apply"]["on_disk"], "previous", "{st}");
    assert_eq!(st["change_pending"], true);
    assert!(
        metric(
            &admin_metrics(&admin),
            "upstreamd_apply_failures_consecutive"
        ) >= 2.0
    );
    assert!(!nginx.rendered().contains("down;"));

    // The site is fixed; nothing else changes. The pending file goes through on its own.
    std::fs::write(&conf, good_site).unwrap();
    wait_reloads_at_least(&admin, "ok", 2.0);
    assert!(nginx
        .rendered()
        .contains(&format!("server {} down;", replicas[1].addr)));
    assert_eq!(nginx.reloads(), 2);
    let st = admin_status(&admin);
    assert_eq!(st["apply"]["state"], "in_sync", "{st}");
    assert_eq!(
        st["last_apply"]["changes"],
        format!("kotaemon: {} down", replicas[1].addr),
        "only the real change against what nginx runs"
    );
    assert_eq!(
        metric(
            &admin_metrics(&admin),
            "upstreamd_apply_failures_consecutive"
        ),
        0.0
    );
    nginx.wait_spread(10, "alpha alone to serve", exactly(&["alpha"]));
    drop(daemon);
}

/// Continues a stopped nginx master when dropped, so a failing test leaves nothing stopped.
struct Stopped(nix::unistd::Pid);

impl Drop for Stopped {
    fn drop(&mut self) {
        // Nothing to do if the master is gone already.
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

#[test]
fn an_unconfirmed_reload_is_retried_once_the_stopped_nginx_master_continues() {
    let replicas = [Replica::start("alpha"), Replica::start("bravo")];
    let nginx = Nginx::start("kotaemon");
    let _report = report_on_failure(&nginx);
    let cfg = Config::static_list(&nginx, "kotaemon", &[&replicas[0], &replicas[1]])
        .nginx("confirm_timeout", "1s")
        .admin_port0()
        .to_toml();
    let daemon = Daemon::start(&cfg);
    let admin = daemon.admin();
    wait_reloads_at_least(&admin, "ok", 1.0);

    let stopped = Stopped(nginx.master());
    kill(stopped.0, Signal::SIGSTOP).unwrap();
    replicas[1].set_mode("error");
    wait_reloads_at_least(&admin, "unconfirmed", 1.0);
    // (The file itself may already hold the retry's bytes: the retry is not confirmed either.)
    let error = admin_status(&admin)["last_apply"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.contains("the previous file was restored"), "{error}");
    drop(stopped);

    // Continued, nothing else changes: the retry gets the file in.
    wait_reloads_at_least(&admin, "ok", 2.0);
    assert!(nginx
        .rendered()
        .contains(&format!("server {} down;", replicas[1].addr)));
    assert_eq!(admin_status(&admin)["apply"]["state"], "in_sync");
    nginx.wait_spread(10, "alpha alone to serve", exactly(&["alpha"]));
}

#[test]
fn a_template_error_at_run_time_keeps_the_daemon_and_the_last_good_file() {
    let replicas = ["alpha", "bravo", "charlie"].map(Replica::start);
    let nginx = Nginx::start("kotaemon");
    let _report = report_on_failure(&nginx);
    // An undefined field read only while exactly one server is down: `check` cannot see it.
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("upstream.conf.j2");
    let builtin = include_str!("../../templates/upstream.conf.j2");
    std::fs::write(
        &template,
        format!("{{% for u in upstreams %}}{{% if u.servers|selectattr(\"down\")|list|length == 1 %}}{{{{ u.nmae }}}}{{% endif %}}{{% endfor %}}\n{builtin}"),
    )
    .unwrap();
    let cfg = Config::static_list(&nginx, "kotaemon", &replicas.iter().collect::<Vec<_>>())
        .nginx_path("template", &template)
        .admin_port0()
        .to_toml();
    let mut daemon = Daemon::start(&cfg);
    let admin = daemon.admin();
    wait_reloads_at_least(&admin, "ok", 1.0);
    let good = nginx.rendered();

    replicas[1].set_mode("error");
    wait_for("the render error in /status", SHORT, || {
        admin_status(&admin)["apply"]["render_error"]
            .as_str()
            .is_some_and(|e| e.contains("nmae"))
    });
    assert!(daemon.alive(), "the daemon keeps running");
    assert_eq!(nginx.rendered(), good, "the last good file stays");
    assert_eq!(nginx.reloads(), 1);
    let metrics = admin_metrics(&admin);
    assert!(metric(&metrics, "upstreamd_renders_total{result=\"error\"}") >= 1.0);
    assert_eq!(metric(&metrics, "upstreamd_apply_pending"), 1.0);
    daemon.wait_log("Could not render the upstream file");

    // Two down: the template renders again, and the file follows.
    replicas[2].set_mode("error");
    wait_reloads_at_least(&admin, "ok", 2.0);
    let text = nginx.rendered();
    for r in &replicas[1..] {
        assert!(text.contains(&format!("server {} down;", r.addr)), "{text}");
    }
    assert!(daemon.alive());
}

#[test]
fn replicas_failing_100ms_apart_cost_at_most_two_reloads_and_skip_settle() {
    let replicas = [
        Replica::start("alpha"),
        Replica::start("bravo"),
        Replica::start("charlie"),
        Replica::start("delta"),
    ];
    let nginx = Nginx::start("kotaemon");
    let _report = report_on_failure(&nginx);
    let cfg = Config::static_list(&nginx, "kotaemon", &replicas.iter().collect::<Vec<_>>())
        .nginx("min_reload_interval", "1s")
        .admin_port0();
    let mut daemon = Daemon::start(&cfg.to_toml());
    let admin = daemon.admin();
    wait_reloads_at_least(&admin, "ok", 1.0);
    assert_eq!(nginx.reloads(), 1);

    // settle of an hour: only a change that skips settle can reach nginx in this test.
    std::fs::write(&daemon.config, cfg.nginx("settle", "1h").to_toml()).unwrap();
    daemon.reload_config();

    // Three failures 100 ms apart: the first goes at once, the others together one
    // min_reload_interval later.
    for r in &replicas[1..] {
        r.set_mode("error");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for("every failure in the file", SHORT, || {
        let text = nginx.rendered();
        replicas[1..]
            .iter()
            .all(|r| text.contains(&format!("server {} down;", r.addr)))
    });
    nginx.wait_spread(10, "alpha alone to serve", exactly(&["alpha"]));
    wait_for("nothing pending", SHORT, || {
        admin_status(&admin)["change_pending"] == false
    });
    let n = nginx.reloads();
    assert!(
        n <= 3,
        "{n} reloads: the first file and at most two for the burst"
    );
    assert_quiet(&nginx, &mut daemon, n);
    let log = daemon.output.text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("to=down") || l.contains("Applied the new upstream file"))
        .collect();
    eprintln!("figure: the burst, as logged:\n{}", lines.join("\n"));
}

/// A file on disk serving `addresses` for upstream `kotaemon`, as an earlier run left it.
fn file_serving(addresses: &[String]) -> String {
    let mut text = String::from("upstream kotaemon {\n    zone kotaemon 64k;\n");
    for a in addresses {
        text.push_str(&format!("    server {a};\n"));
    }
    text.push_str("}\n");
    text
}

fn eleven() -> Vec<String> {
    (2..13).map(|i| format!("127.0.0.{i}:7860")).collect()
}

fn consul_config(nginx: &Nginx, consul: &Registry, hold: &str) -> Config {
    Config::new(nginx).upstream(Upstream::new("kotaemon").set("shrink_hold", hold).consul(
        &consul.url,
        "kotaemon",
        "5s",
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_restart_without_state_dir_holds_an_empty_registry_against_the_file_on_disk() {
    let consul = Registry::start(Lane::Standin, None).await.unwrap();
    let nginx = Nginx::start("kotaemon");
    let _report = report_on_failure(&nginx);
    std::fs::write(nginx.output(), file_serving(&eleven())).unwrap();
    assert!(nginx.test_config().status.success());
    let cfg = consul_config(&nginx, &consul, "3s").admin_port0().to_toml();
    let daemon = Daemon::start(&cfg);
    let admin = daemon.admin();

    wait_for("the shrink to be held", SHORT, || {
        daemon.output.text().contains("SHRINK HELD")
    });
    assert_eq!(nginx.reloads(), 0, "nothing applied at once");
    assert_eq!(server_lines(&nginx.rendered()).len(), 11);
    assert!(admin_status(&admin)["upstreams"][0]["shrink_held"]
        .as_str()
        .unwrap()
        .contains("answered with 0 of the upstream's 11 endpoints"));

    // A deliberate scale-down passes after the hold, and the log names what left.
    wait_for("the placeholder", SHORT, || {
        server_lines(&nginx.rendered()) == ["server 127.0.0.1:1 down;"]
    });
    wait_for("the apply to be logged", SHORT, || {
        daemon
            .output
            .text()
            .contains("Applied the new upstream file")
    });
    assert_eq!(nginx.reloads(), 1);
    let log = daemon.output.text();
    let released = log
        .lines()
        .find(|l| l.contains("The shrink held for shrink_hold is now applied."))
        .unwrap_or_else(|| panic!("{log}"));
    let applied = log
        .lines()
        .find(|l| l.contains("Applied the new upstream file"))
        .unwrap_or_else(|| panic!("{log}"));
    for a in eleven() {
        assert!(released.contains(&a), "{released}");
        assert!(applied.contains(&format!("-{a}")), "{applied}");
    }
    assert!(!applied.contains("first file"), "{applied}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn once_refuses_a_held_shrink_and_leaves_the_file() {
    let consul = Registry::start(Lane::Standin, None).await.unwrap();
    let nginx = Nginx::start("kotaemon");
    let before = file_serving(&eleven());
    std::fs::write(nginx.output(), &before).unwrap();
    let (_dir, path) = write_config(&consul_config(&nginx, &consul, "30s").to_toml());
    let (code, _, err) = upstreamd(&["once", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not applying a held shrink"), "{err}");
    assert!(
        err.contains("answered with 0 of the upstream's 11 endpoints"),
        "{err}"
    );
    assert_eq!(nginx.rendered(), before);
    assert_eq!(nginx.reloads(), 0);
}

#[test]
fn once_no_reload_writes_the_file_atomically_and_signals_nothing() {
    let replicas = [Replica::start("alpha")];
    let nginx = Nginx::start("kotaemon");
    let cfg = Config::static_list(&nginx, "kotaemon", &[&replicas[0]]).to_toml();
    let (_dir, path) = write_config(&cfg);
    let (code, _, err) = upstreamd(&["once", "--config", path.to_str().unwrap(), "--no-reload"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        server_lines(&nginx.rendered()),
        [format!("server {};", replicas[0].addr)]
    );
    assert_eq!(nginx.reloads(), 0, "nginx is not signalled");
    assert!(err.contains("nginx was not signalled"), "{err}");
}
