//! The operator's surface: admin endpoints over real HTTP, config reload on SIGHUP, and the
//! status page in a real headless browser.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::util::*;
use nix::sys::signal::Signal;

const SHORT: Duration = Duration::from_secs(10);

/// The first `n` of alpha, bravo and charlie behind nginx, with the admin server.
fn setup(n: usize) -> AdminStack {
    AdminStack::start(&["alpha", "bravo", "charlie"][..n], |c| c)
}

fn get(admin: &str, path: &str) -> (u16, String) {
    http_get(admin, path, SHORT).unwrap_or_else(|| panic!("GET {path} failed"))
}

fn status(admin: &str) -> serde_json::Value {
    serde_json::from_str(&get(admin, "/status").1).unwrap()
}

/// Waits for the first source's `error` on `/status` (after `kind`'s registry went away) and
/// returns it.
fn stale_source_error(admin: &str, kind: &str) -> String {
    let error = || status(admin)["upstreams"][0]["sources"][0]["error"].clone();
    wait_for(&format!("the {kind} source to go stale"), SHORT, || {
        error().is_string()
    });
    error().as_str().unwrap().to_owned()
}

#[test]
fn admin_endpoints_report_state_metrics_and_transitions() {
    let s = setup(2);
    let _report = report_on_failure(&s.nginx);
    assert_eq!(get(&s.admin, "/healthz").0, 200);
    let st = status(&s.admin);
    assert_eq!(st["ready"], true);
    let eps = st["upstreams"][0]["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 2);
    for e in eps {
        assert_eq!(e["rendered"], "up");
        assert_eq!(e["health"], "healthy");
        assert_eq!(e["last_probe"]["result"], "ok");
    }
    assert_eq!(st["upstreams"][0]["sources"][0]["label"], "static");
    assert_eq!(st["last_apply"]["result"], "ok");

    let (code, metrics) = get(&s.admin, "/metrics");
    assert_eq!(code, 200);
    for needle in [
        "upstreamd_reloads_total{result=\"ok\"} 1\n",
        "upstreamd_endpoints{upstream=\"kotaemon\",state=\"healthy\"} 2\n",
        "upstreamd_source_up{upstream=\"kotaemon\",source=\"static\"} 1\n",
        "upstreamd_renders_total{result=\"changed\"}",
        "upstreamd_probes_total{upstream=\"kotaemon\",result=\"ok\"}",
        "upstreamd_probe_duration_seconds_bucket{upstream=\"kotaemon\",le=\"0.1\"}",
        "upstreamd_reload_duration_seconds_count 1\n",
        "upstreamd_last_reload_success_timestamp_seconds ",
        "upstreamd_build_info{version=\"",
    ] {
        assert!(metrics.contains(needle), "missing {needle:?} in\n{metrics}");
    }
    for r in &s.replicas {
        assert!(
            !metrics.contains(&r.addr),
            "an address leaked into a label: {}",
            r.addr
        );
    }

    s.replicas[0].set_mode("error");
    wait_for("alpha down in /status", SHORT, || {
        status(&s.admin)["upstreams"][0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["rendered"] == "down")
    });
    let st = status(&s.admin);
    let alpha = st["upstreams"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["rendered"] == "down")
        .unwrap()
        .clone();
    assert_eq!(alpha["address"], s.replicas[0].addr.as_str());
    assert_eq!(alpha["last_probe"]["detail"], "status 503");
    assert_eq!(alpha["why"], "its health probe failed: status 503");
    assert!(
        alpha["last_transition"]["why"]
            .as_str()
            .unwrap()
            .contains("consecutive failed probes"),
        "{alpha}"
    );
    wait_for("the transition metric", SHORT, || {
        get(&s.admin, "/metrics").1.contains(
            "upstreamd_health_transitions_total{upstream=\"kotaemon\",to=\"unhealthy\"} 1\n",
        )
    });
}

#[test]
fn sighup_applies_a_good_config_and_refuses_a_broken_one() {
    let mut s = setup(2);
    let _report = report_on_failure(&s.nginx);
    wait_for("first reload", SHORT, || s.nginx.reloads() == 1);
    // The same config again: sources keep running, nothing is re-probed from scratch, no reload.
    s.daemon.signal(Signal::SIGHUP);
    wait_for("the first config reload", SHORT, || {
        s.daemon.output.text().contains("kept=1 restarted=0")
    });
    s.daemon.wait_loop_ran();
    assert_eq!(s.nginx.reloads(), 1);
    assert_eq!(
        s.daemon
            .output
            .text()
            .matches("Registry membership changed.")
            .count(),
        1
    );

    let third = Replica::start("charlie");
    let servers = vec![
        s.replicas[0].addr.as_str(),
        s.replicas[1].addr.as_str(),
        third.addr.as_str(),
    ];
    let grown = s.config.clone().source("servers", servers);
    std::fs::write(&s.daemon.config, grown.to_toml()).unwrap();
    s.daemon.signal(Signal::SIGHUP);
    wait_for("charlie rendered", SHORT, || {
        s.nginx
            .rendered()
            .contains(&format!("server {};", third.addr))
    });
    wait_for("second reload", SHORT, || s.nginx.reloads() == 2);
    s.daemon.wait_log("kept=0 restarted=1");
    let before = s.nginx.rendered();

    std::fs::write(&s.daemon.config, grown.health("interval", 5).to_toml()).unwrap();
    s.daemon.signal(Signal::SIGHUP);
    wait_for("the refusal", SHORT, || {
        s.daemon.output.text().contains("Refusing the new config")
    });
    s.daemon.wait_log("upstream[0].health.interval");
    s.daemon.wait_loop_ran();
    assert!(s.daemon.alive());
    assert_eq!(s.nginx.rendered(), before);
    assert_eq!(s.nginx.reloads(), 2);
    assert_eq!(
        get(&s.admin, "/readyz").0,
        200,
        "the running config stays in force"
    );
}

fn chromium() -> Option<&'static str> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

fn browser(args: &[&str], url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium().unwrap())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            &format!("--user-data-dir={}", profile.path().display()),
        ])
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_status_page_shows_endpoints_in_a_real_browser() {
    let Some(_) = chromium() else {
        // The test command installs chromium; this only happens when run without it.
        eprintln!("skipped: no chromium on PATH (apt-get install chromium)");
        return;
    };
    let s = setup(3);
    let url = format!("http://{}/", s.admin);
    let dom = browser(&["--dump-dom"], &url);
    for r in &s.replicas {
        assert!(
            dom.contains(&format!("data-address=\"{}\" data-rendered=\"up\"", r.addr)),
            "{dom}"
        );
    }
    assert!(
        dom.contains("http-equiv=\"refresh\""),
        "the page refreshes itself"
    );

    s.replicas[2].set_mode("error");
    wait_for("charlie down", SHORT, || {
        s.nginx.rendered().contains(" down;")
    });
    let dom = browser(&["--dump-dom"], &url);
    assert!(
        dom.contains(&format!(
            "data-address=\"{}\" data-rendered=\"down\"",
            s.replicas[2].addr
        )),
        "{dom}"
    );

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let shot = dir.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    browser(
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,720",
            "--hide-scrollbars",
        ],
        &url,
    );
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "a screenshot was taken ({size} bytes)");
    eprintln!("figure: status page screenshot at {}", shot.display());
}

#[test]
fn systemd_hears_ready_status_watchdog_reloading_and_stopping() {
    let r = Replica::start("alpha");
    let nginx = Nginx::start("kotaemon");
    let _report = report_on_failure(&nginx);
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut heard: Vec<String> = Vec::new();
    let listen = |heard: &mut Vec<String>| {
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    };
    let cfg = Config::static_list(&nginx, "kotaemon", &[&r]).to_toml();
    let mut daemon = Daemon::start_with_env(
        &cfg,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    wait_for("READY=1", SHORT, || {
        listen(&mut heard);
        heard.iter().any(|m| m == "READY=1")
    });
    assert_eq!(
        nginx.reloads(),
        1,
        "READY=1 comes after the first successful apply"
    );
    wait_for("two watchdog pings", SHORT, || {
        listen(&mut heard);
        heard.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2
    });
    assert!(
        heard
            .iter()
            .any(|m| m.starts_with("STATUS=kotaemon: 1 healthy")),
        "{heard:?}"
    );

    heard.clear();
    daemon.signal(Signal::SIGHUP);
    wait_for("RELOADING=1 then READY=1", SHORT, || {
        listen(&mut heard);
        let reloading = heard
            .iter()
            .position(|m| m.starts_with("RELOADING=1\nMONOTONIC_USEC="));
        let ready = heard.iter().rposition(|m| m == "READY=1");
        matches!((reloading, ready), (Some(a), Some(b)) if a < b)
    });

    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(5)), Some(0));
    listen(&mut heard);
    assert!(heard.iter().any(|m| m == "STOPPING=1"), "{heard:?}");
}

/// A Consul instance with a bad weight and a hostile service ID: `/status` and the page name
/// it with why (escaped on the page), the counter counts it once, and a registry that went
/// away reads as a sentence, not hyper's debug text.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn status_names_skipped_entries_and_source_errors_read_as_sentences() {
    use crate::util::consul::{instance, replica_instance, Lane, Registry};
    let Some(mut reg) = Registry::start(Lane::Standin, None).await else {
        return;
    };
    let alpha = Replica::start("alpha");
    reg.register(replica_instance("alpha", &alpha, serde_json::json!({})))
        .await;
    let hostile = "bad<b>one";
    let meta = serde_json::json!({"weight": "3; down"});
    reg.register(instance(hostile, "127.0.0.9", 80, &[], meta))
        .await;
    let nginx = Nginx::start("kotaemon");
    let _report = report_on_failure(&nginx);
    let cfg = Config::new(&nginx)
        .admin_port0()
        .upstream(Upstream::new("kotaemon").consul(&reg.url, "kotaemon", "2s"))
        .to_toml();
    let daemon = Daemon::start(&cfg);
    let admin = daemon.ready_admin();

    let source = status(&admin)["upstreams"][0]["sources"][0].clone();
    assert_eq!(source["skipped"], 1, "{source}");
    let entry = &source["skipped_entries"][0];
    assert_eq!(entry["name"], "service ID bad<b>one on node standin");
    let reason = entry["reason"].as_str().unwrap();
    assert!(reason.contains("weight"), "{reason}");
    let page = get(&admin, "/").1;
    assert!(
        page.contains("<code>service ID bad&lt;b&gt;one on node standin</code>"),
        "the page names the entry, escaped:\n{page}"
    );
    assert!(
        !page.contains(hostile),
        "registry data reached the page raw"
    );
    assert!(!nginx.rendered().contains("127.0.0.9"));
    let skipped_total =
        "upstreamd_registry_entries_skipped_total{upstream=\"kotaemon\",source=\"consul\"}";
    assert_eq!(metric(&admin_metrics(&admin), skipped_total), 1.0);

    reg.kill();
    let error = stale_source_error(&admin, "consul");
    // The blocking query in flight when Consul died may fail first with a closed or reset
    // connection (the error the source reports); a retry after it meets a refused connect.
    assert!(
        error.starts_with("consul request failed: ")
            && ["refused", "closed", "reset"]
                .iter()
                .any(|e| error.contains(e)),
        "{error}"
    );
    for debug in ["(Connect)", "Error(", "{", "Os ", "kind:"] {
        assert!(!error.contains(debug), "debug text {debug:?} in {error:?}");
    }
    let page = get(&admin, "/").1;
    let escaped = minijinja::HtmlEscape(&error).to_string();
    assert!(page.contains(&escaped), "the page shows the same sentence");
}

/// The same through etcd, whose gRPC errors used to show tonic's debug text
/// (`source: tonic::transport::Error(Transport, …)`) on `/status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn an_etcd_key_and_an_etcd_outage_read_as_sentences_on_status() {
    let mut etcd = crate::util::etcd::Etcd::start().await;
    let mut c = etcd.client().await;
    let alpha = Replica::start("alpha");
    let prefix = "/services/kotaemon/";
    c.put(format!("{prefix}alpha"), alpha.addr.as_str(), None)
        .await
        .unwrap();
    c.put(format!("{prefix}<i>x"), "127.0.0.1:80 down", None)
        .await
        .unwrap();
    drop(c);
    let nginx = Nginx::start("kotaemon");
    let _report = report_on_failure(&nginx);
    let cfg = Config::new(&nginx)
        .admin_port0()
        .upstream(Upstream::new("kotaemon").etcd_1s(&etcd.url(), prefix))
        .to_toml();
    let daemon = Daemon::start(&cfg);
    let admin = daemon.ready_admin();
    let source = status(&admin)["upstreams"][0]["sources"][0].clone();
    let entry = &source["skipped_entries"][0];
    assert_eq!(entry["name"], "/services/kotaemon/<i>x", "{source}");
    assert!(entry["reason"].as_str().unwrap().contains("host:port"));
    let page = get(&admin, "/").1;
    assert!(
        page.contains("<code>&#x2f;services&#x2f;kotaemon&#x2f;&lt;i&gt;x</code>"),
        "{page}"
    );

    etcd.kill();
    let error = stale_source_error(&admin, "etcd");
    assert!(error.starts_with("etcd "), "{error}");
    for debug in ["code:", "source:", "Error(", "{", "Kind(", "Os "] {
        assert!(!error.contains(debug), "debug text {debug:?} in {error:?}");
    }
    println!("figure: the etcd outage reads {error:?}");
}
