//! nginx's error log fed back (`[nginx] error_log`): an upstream failure nginx reports brings
//! a probe at once, so a hung replica goes down long before its next scheduled probe; and
//! nothing a client sends, nor a log line alone, drains a replica.

use std::io::Write as _;
use std::time::Duration;

use crate::util::*;

/// nginx proxying to `kotaemon` with a short read timeout (so a hung replica shows up in its
/// error log within a second) and retries on the other replica.
fn nginx() -> Nginx {
    Nginx::start_with(
        "kotaemon",
        "location / { proxy_pass http://kotaemon; proxy_next_upstream error timeout; \
         proxy_connect_timeout 1s; proxy_read_timeout 500ms; proxy_buffering off; }",
    )
}

/// upstreamd over `replicas` following nginx's error log, probing every minute (anything
/// sooner than that was brought forward by the log), with the admin server on port 0.
fn config(nginx: &Nginx, replicas: &[&Replica]) -> String {
    Config::static_list(nginx, "kotaemon", replicas)
        .nginx_path("error_log", &nginx.dir.path().join("logs/error.log"))
        .health("interval", "60s")
        .health("down_interval", "60s")
        .health("fast_interval", "200ms")
        .health("timeout", "300ms")
        .admin_port0()
        .to_toml()
}

fn probes(admin: &str, result: &str) -> f64 {
    metric(
        &admin_metrics(admin),
        &format!("upstreamd_probes_total{{upstream=\"kotaemon\",result=\"{result}\"}}"),
    )
}

fn log_lines(admin: &str, result: &str) -> f64 {
    metric(
        &admin_metrics(admin),
        &format!("upstreamd_error_log_lines_total{{result=\"{result}\"}}"),
    )
}

#[test]
fn a_hung_replica_seen_in_nginxs_error_log_is_probed_at_once_and_goes_down() {
    let nginx = nginx();
    let _report = report_on_failure(&nginx);
    let (a, b) = (Replica::start("a"), Replica::start("b"));
    let daemon = Daemon::start(&config(&nginx, &[&a, &b]));
    let admin = daemon.admin();
    first_apply(&nginx, &daemon);
    assert!(!nginx.rendered().contains("down"), "{}", nginx.rendered());

    a.set_mode("hang");
    // Round robin: every other request reaches `a`, times out after 500 ms in nginx (which
    // logs it and retries on `b`).
    wait_for(
        "nginx to log a timeout from the hung replica",
        Duration::from_secs(20),
        || {
            nginx.get("/");
            nginx.error_log().contains("upstream timed out")
        },
    );
    // Two failed probes (300 ms timeout, 200 ms apart) and a reload: seconds, where the
    // schedule alone would not probe again for a minute.
    wait_for(
        "the hung replica to be rendered down",
        Duration::from_secs(20),
        || {
            nginx
                .rendered()
                .contains(&format!("server {} down;", a.addr))
        },
    );
    assert!(log_lines(&admin, "probe") >= 1.0);
    assert!(probes(&admin, "timeout") >= 2.0);
    // The probes decided.
    daemon.wait_log("consecutive failed probes (fall = 2)");
    nginx.wait_spread(10, "nginx to serve from b only", exactly(&["b"]));
}

#[test]
fn a_clients_bad_requests_and_a_log_line_alone_drain_nobody() {
    let nginx = nginx();
    let _report = report_on_failure(&nginx);
    let (a, b) = (Replica::start("a"), Replica::start("b"));
    let placeholder_workers = nginx.wait_for_workers();
    let mut daemon = Daemon::start(&config(&nginx, &[&a, &b]));
    let admin = daemon.admin();
    first_apply(&nginx, &daemon);
    // A request the placeholder's workers still took would fail for real ("no live
    // upstreams") and bring probes: start once they are gone.
    wait_for(
        "the placeholder's nginx workers to leave",
        Duration::from_secs(10),
        || nginx.wait_for_workers().is_disjoint(&placeholder_workers),
    );
    let file = nginx.rendered();
    let ok_before = probes(&admin, "ok");

    // 4xx answers from the replicas, a request nginx itself refuses, and failure words in a
    // request line.
    let front = format!("127.0.0.1:{}", nginx.port);
    for _ in 0..10 {
        assert_eq!(nginx.get("/no-such-page").map(|(s, _)| s), Some(404));
    }
    assert_eq!(
        http_request(&front, "GET", "/a b", "", Duration::from_secs(5)).map(|(s, _)| s),
        Some(400)
    );
    let forged = format!(
        "/upstream%20timed%20out,%20upstream:%20%22http://{}/%22",
        a.addr
    );
    nginx.get(&forged);

    // Then nginx "reports" a failure of `b`, which is healthy. Lines are read in order, so
    // once this one is acted on, every request above has been read too.
    let line = format!(
        "2026/11/30 12:00:00 [error] 1#1: *1 upstream timed out (110: Connection timed out) while reading response header from upstream, client: 127.0.0.1, server: , request: \"GET / HTTP/1.1\", upstream: \"http://{}/\", host: \"x\"\n",
        b.addr
    );
    std::fs::OpenOptions::new()
        .append(true)
        .open(nginx.dir.path().join("logs/error.log"))
        .unwrap()
        .write_all(line.as_bytes())
        .unwrap();
    wait_for(
        "the log line to bring b's probe",
        Duration::from_secs(10),
        || probes(&admin, "ok") > ok_before,
    );

    // Exactly one probe was brought forward (b's, which passed); nothing else moved.
    assert_eq!(log_lines(&admin, "probe"), 1.0);
    assert_eq!(probes(&admin, "ok"), ok_before + 1.0);
    assert_eq!(nginx.reloads(), 1, "no reload");
    assert_eq!(nginx.rendered(), file, "nobody drained");
    assert!(daemon.alive());
    nginx.wait_spread(10, "nginx to serve from both", exactly(&["a", "b"]));
}
