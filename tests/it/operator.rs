//! What an operator (or an attacker on the admin port) can do to a running daemon: flood the
//! admin port, send stray signals, reload a template that reads an undefined field, scrape
//! metrics before anything happened; and what `check` and `--help` say.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::util::*;
use nix::sys::signal::Signal;

const SHORT: Duration = Duration::from_secs(10);

/// Two replicas behind a real nginx, with the admin server's `max_connections` and
/// `header_read_timeout` when given.
fn setup(limits: Option<(i64, &str)>) -> AdminStack {
    AdminStack::start(&["alpha", "bravo"], |c| match limits {
        Some((max, timeout)) => c
            .admin("max_connections", max)
            .admin("header_read_timeout", timeout),
        None => c,
    })
}

/// A connection that sent half a request head and then stalls.
fn half_head(admin: &str) -> TcpStream {
    let mut s = TcpStream::connect(admin).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
    s
}

/// Whether the server closed `s` (end of file or reset), without waiting for it.
fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Waits until `want` of `conns` are closed by the server; returns which are.
fn wait_closed(what: &str, conns: &mut [TcpStream], want: usize, within: Duration) -> Vec<bool> {
    let mut done = vec![false; conns.len()];
    wait_for(what, within, || {
        for (c, d) in conns.iter_mut().zip(done.iter_mut()) {
            *d = *d || closed(c);
        }
        done.iter().filter(|d| **d).count() >= want
    });
    done
}

fn open_fds(daemon: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .unwrap()
        .count()
}

#[test]
fn admin_connections_beyond_the_cap_are_closed_at_once_and_applies_go_on() {
    // A head-read timeout far beyond the test's waits: only the cap can close anything.
    let s = setup(Some((8, "10m")));
    let _report = report_on_failure(&s.nginx);
    wait_for("the first reload", SHORT, || s.nginx.reloads() == 1);
    let fds_before = open_fds(&s.daemon);

    let mut conns: Vec<TcpStream> = (0..58).map(|_| half_head(&s.admin)).collect();
    let done = wait_closed("50 connections closed", &mut conns, 50, SHORT);
    let port: u16 = s.admin.rsplit_once(':').unwrap().1.parse().unwrap();
    wait_for("the daemon to accept every connection", SHORT, || {
        accept_queue(port) == Some(0)
    });
    let more = wait_closed("no more closed", &mut conns, 0, SHORT);
    let still_open = done.iter().zip(&more).filter(|(a, b)| !**a && !**b).count();
    // Fewer than 8 when a setup request still held a slot as the flood began.
    assert!(
        (1..=8).contains(&still_open),
        "{still_open} stay open, max_connections = 8"
    );
    let fds = open_fds(&s.daemon);
    assert!(
        fds <= fds_before + 8 + 4,
        "the daemon holds {fds} fds, {fds_before} before the flood"
    );

    // The control loop and nginx are untouched: a replica failing still reaches nginx.
    s.replicas[0].set_mode("error");
    wait_for("alpha rendered down", SHORT, || {
        s.nginx
            .rendered()
            .contains(&format!("server {} down;", s.replicas[0].addr))
    });
    wait_for("the second reload", SHORT, || s.nginx.reloads() == 2);

    drop(conns);
    wait_for("/healthz answers once the flood is gone", SHORT, || {
        matches!(http_get(&s.admin, "/healthz", SHORT), Some((200, _)))
    });
    // 50 or more from the flood, and maybe a /healthz try before the holders' close was seen.
    let metrics = admin_metrics(&s.admin);
    let refused = metric(&metrics, "upstreamd_admin_connections_refused_total");
    assert!(refused >= 50.0, "{metrics}");
}

#[test]
fn a_half_sent_request_head_is_closed_after_the_header_read_timeout() {
    let s = setup(Some((4, "1s")));
    let _report = report_on_failure(&s.nginx);
    let mut conns: Vec<TcpStream> = (0..3).map(|_| half_head(&s.admin)).collect();
    // And one that asked once and then keeps its connection open, sending nothing more.
    let mut idle = TcpStream::connect(&s.admin).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    idle.set_read_timeout(Some(Duration::from_millis(5)))
        .unwrap();
    conns.push(idle);
    // The cap is full of stalled heads; each is closed once its head read times out.
    wait_closed("every stalled head closed", &mut conns, 4, SHORT);
    wait_for("/healthz answers again", SHORT, || {
        matches!(http_get(&s.admin, "/healthz", SHORT), Some((200, _)))
    });
}

#[test]
fn sigusr1_and_sigusr2_are_logged_and_ignored() {
    let mut s = setup(None);
    s.daemon.signal(Signal::SIGUSR1);
    s.daemon.signal(Signal::SIGUSR2);
    wait_for("both signals logged", SHORT, || {
        s.daemon
            .output
            .text()
            .matches("Ignoring the signal")
            .count()
            == 2
    });
    assert!(s.daemon.alive(), "{}", s.daemon.output.text());
    assert_eq!(http_get(&s.admin, "/healthz", SHORT).unwrap().0, 200);
}

#[test]
fn a_fresh_daemon_exports_every_known_series_at_zero() {
    let s = setup(None);
    let metrics = admin_metrics(&s.admin);
    for result in [
        "test_failed",
        "signal_failed",
        "unconfirmed",
        "write_failed",
    ] {
        let series = format!("upstreamd_reloads_total{{result=\"{result}\"}} 0\n");
        assert!(metrics.contains(&series), "{series} missing:\n{metrics}");
    }
    for series in [
        "upstreamd_probes_total{upstream=\"kotaemon\",result=\"timeout\"} 0\n",
        "upstreamd_probes_total{upstream=\"kotaemon\",result=\"error\"} 0\n",
        "upstreamd_health_transitions_total{upstream=\"kotaemon\",to=\"unhealthy\"} 0\n",
        "upstreamd_endpoints{upstream=\"kotaemon\",state=\"unhealthy\"} 0\n",
        "upstreamd_registry_entries_skipped_total{upstream=\"kotaemon\",source=\"static\"} 0\n",
        "upstreamd_registry_entries_skipped{upstream=\"kotaemon\",source=\"static\"} 0\n",
        "upstreamd_admin_connections_refused_total 0\n",
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
}

/// The built-in template with `{{ u.nmae }}` on line 3.
fn misspelt_template(dir: &std::path::Path) -> std::path::PathBuf {
    let builtin = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/templates/upstream.conf.j2"
    ))
    .unwrap();
    let mut lines: Vec<&str> = builtin.lines().collect();
    lines.insert(2, "# {{ u.nmae }}");
    let text = lines.join("\n");
    let path = dir.join("custom.j2");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_template_reading_an_undefined_field_is_refused_by_check_and_by_sighup() {
    let mut s = setup(None);
    let _report = report_on_failure(&s.nginx);
    wait_for("the first reload", SHORT, || s.nginx.reloads() == 1);
    let dir = tempfile::tempdir().unwrap();
    let template = misspelt_template(dir.path());
    let bad = s.config.clone().nginx_path("template", &template).to_toml();
    let (_dir, bad_path) = write_config(&bad);
    let (code, stdout, stderr) = upstreamd(&["check", "--config", bad_path.to_str().unwrap()]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    let says = format!(
        "nginx.template: template `{}` line 3: `u.nmae` is undefined",
        template.display()
    );
    assert!(stderr.contains(&says), "{stderr}");

    std::fs::write(&s.daemon.config, &bad).unwrap();
    s.daemon.signal(Signal::SIGHUP);
    wait_for("the refusal", SHORT, || {
        s.daemon.output.text().contains("Refusing the new config")
    });
    s.daemon.wait_log("`u.nmae` is undefined");
    // The running config stays in force, and the next change still applies.
    s.replicas[1].set_mode("error");
    wait_for("bravo rendered down", SHORT, || {
        s.nginx
            .rendered()
            .contains(&format!("server {} down;", s.replicas[1].addr))
    });
    assert!(s.daemon.alive());
}

fn check(text: &str) -> (i32, String, String) {
    let (_dir, path) = write_config(text);
    upstreamd(&["check", "--config", path.to_str().unwrap()])
}

#[test]
fn check_reports_paths_run_would_fail_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let body = "[[upstream]]\nname = \"k\"\n[[upstream.source]]\nkind = \"static\"\nservers = [\"127.0.0.1:1\"]\n";
    let cfg = |nginx: &str| format!("[nginx]\n{nginx}\n\n{body}");
    // `check` refuses the config (exit 2) and says `why`.
    let refuses = |nginx: &str, why: &str| {
        let (code, _, stderr) = check(&cfg(nginx));
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains(why), "{stderr}");
    };

    refuses(
        &format!(
            "output = \"{d}/missing/u.conf\"\npid_file = \"{d}/nginx.pid\"\ntest_command = []"
        ),
        &format!("nginx.output: the directory `{d}/missing` does not exist"),
    );
    refuses(
        &format!("output = \"{d}\"\npid_file = \"{d}/nginx.pid\"\ntest_command = []"),
        "is a directory",
    );
    refuses(
        "output = \"u.conf\"\ntest_command = []",
        "nginx.output: \"u.conf\" is a relative path",
    );

    let (code, stdout, stderr) = check(&cfg(&format!(
        "output = \"{d}/u.conf\"\npid_file = \"{d}/run/nginx.pid\"\ntest_command = [\"no-such-nginx\", \"-t\"]"
    )));
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "warning: nginx.pid_file: the directory `{d}/run` does not exist yet"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("warning: nginx.test_command: the program `no-such-nginx` is not on PATH"),
        "{stderr}"
    );
    assert!(stdout.ends_with(": ok (1 upstream)\n"), "{stdout}");
}

#[test]
fn check_refuses_an_endless_config_file_at_once() {
    let (code, _, stderr) = upstreamd(&["check", "--config", "/dev/zero"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("failed to read `/dev/zero`: it is larger than 16 MiB"),
        "{stderr}"
    );
}

#[test]
fn the_cli_defaults_its_config_and_documents_exit_codes_signals_and_rust_log() {
    let (code, _, stderr) = upstreamd(&["check"]);
    if !std::path::Path::new("/etc/upstreamd/upstreamd.toml").exists() {
        assert_eq!(code, 2);
        assert!(
            stderr.contains("failed to read `/etc/upstreamd/upstreamd.toml`"),
            "{stderr}"
        );
    }
    let (code, help, _) = upstreamd(&["--help"]);
    assert_eq!(code, 0);
    for needle in ["Exit codes:", "SIGHUP", "SIGUSR1", "RUST_LOG"] {
        assert!(help.contains(needle), "{needle} missing from:\n{help}");
    }
    let (code, help, _) = upstreamd(&["once", "--help"]);
    assert_eq!(code, 0);
    assert!(help.contains("--log-format"), "{help}");
    assert!(
        help.contains("[default: /etc/upstreamd/upstreamd.toml]"),
        "{help}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_forged_consul_service_id_reaches_the_text_log_as_one_escaped_line() {
    use crate::util::consul::{instance, replica_instance, Lane, Registry, SERVICE};
    let Some(reg) = Registry::start(Lane::Standin, None).await else {
        return;
    };
    let replica = Replica::start("alpha");
    let (host, _) = replica.addr.rsplit_once(':').unwrap();
    // A service ID that, printed raw, ends the warning and forges a line of its own.
    let forged = "evil\n2026-01-01T00:00:00.000000Z  INFO upstreamd::controller: Applied the new upstream file and nginx reloaded.\x1b[2K";
    let bad_meta = serde_json::json!({"weight": "heavy"});
    reg.register(instance(forged, host, replica.port(), &[], bad_meta))
        .await;
    reg.register(replica_instance("alpha", &replica, serde_json::json!({})))
        .await;
    let nginx = Nginx::start("kotaemon");
    let _report = report_on_failure(&nginx);
    let cfg = Config::new(&nginx)
        .upstream(Upstream::new("kotaemon").consul(&reg.url, SERVICE, "2s"))
        .to_toml();
    let daemon = Daemon::start(&cfg);
    first_apply(&nginx, &daemon);
    wait_for("the warning about the forged entry", SHORT, || {
        daemon
            .output
            .text()
            .contains("Skipped Consul service ID evil")
    });
    let log = daemon.output.text();
    let applied = log
        .lines()
        .filter(|l| l.contains("Applied the new upstream file"))
        .collect::<Vec<_>>();
    assert_eq!(
        applied.len(),
        2,
        "the real apply and the escaped forgery:\n{log}"
    );
    assert!(
        applied
            .iter()
            .all(|l| !l.starts_with("2026-01-01T00:00:00.000000Z")),
        "a forged line:\n{log}"
    );
    assert!(log.contains(r"evil\n2026-01-01T00:00:00.000000Z"), "{log}");
    assert!(!log.contains('\x1b'), "an escape reached the log:\n{log}");
}
