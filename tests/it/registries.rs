//! Registry failure modes through the real daemon and a real nginx: the shrink guard against
//! the Consul stand-in, a restart during a registry outage with `state_dir`, and secrets
//! (a Consul token and an etcd password) kept out of the log, `/status` and `/metrics`.
//!
//! The test bodies are async for the registry clients (`common::consul`, `common::etcd`); waits
//! on nginx and the daemon block the test's own thread, as in `consul_e2e.rs`.

use std::time::{Duration, Instant};

use crate::util::consul::{instance, Lane, Registry};
use crate::util::etcd::Etcd;
use crate::util::*;
use nix::sys::signal::Signal;

const SHORT: Duration = Duration::from_secs(15);

/// A config for upstream `kotaemon` fed by the stand-in's service `kotaemon`, with an admin
/// server on port 0; probes on `/queue/status` when `probe`, off otherwise.
fn consul_config(nginx: &Nginx, consul: &Registry, probe: bool) -> Config {
    consul.config(nginx, probe, "5s")
}

/// Registers instance `id` of service `kotaemon` at `addr` (`host:port`), passing.
async fn register(consul: &Registry, id: &str, addr: &str) {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let def = instance(id, host, port.parse().unwrap(), &[], serde_json::json!({}));
    consul.register(def).await;
}

/// The Consul stand-in, requiring `token` when given.
async fn standin(token: Option<&str>) -> Registry {
    Registry::start(Lane::Standin, token).await.unwrap()
}

fn servers(text: &str) -> usize {
    text.lines()
        .filter(|l| l.starts_with("    server "))
        .count()
}

fn status_of(admin: &str) -> Option<serde_json::Value> {
    let (code, body) = http_get(admin, "/status", SHORT)?;
    (code == 200).then(|| serde_json::from_str(&body).ok())?
}

fn gauge_held(admin: &str) -> f64 {
    metric(
        &admin_metrics(admin),
        "upstreamd_shrink_held{upstream=\"kotaemon\"}",
    )
}

const FOUR: [&str; 4] = [
    "127.0.0.2:7860",
    "127.0.0.3:7860",
    "127.0.0.4:7860",
    "127.0.0.5:7860",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn losing_three_of_four_endpoints_at_once_is_held_for_shrink_hold_then_applied() {
    let consul = standin(None).await;
    for (i, a) in FOUR.iter().enumerate() {
        register(&consul, &format!("k{i}"), a).await;
    }
    let nginx = Nginx::start("kotaemon");
    let _report = report_on_failure(&nginx);
    let cfg = consul_config(&nginx, &consul, false).set("shrink_hold", "1s");
    let daemon = Daemon::start(&cfg.to_toml());
    let admin = daemon.admin();
    wait_for("four servers", SHORT, || servers(&nginx.rendered()) == 4);
    wait_for("the first reload", SHORT, || nginx.reloads() == 1);
    assert_eq!(gauge_held(&admin), 0.0);

    // Take the three away in one answer, as a registry that lost data (or an ACL token that
    // lost service:read) would: make the source fail, change the catalog, let it answer.
    consul.fault("error500").await;
    consul.register_other("wake-the-blocked-query").await;
    wait_for("the source to fail", SHORT, || {
        status_of(&admin).is_some_and(|s| s["upstreams"][0]["sources"][0]["up"] == false)
    });
    for i in 1..4 {
        consul.deregister(&format!("k{i}")).await;
    }
    consul.fault("none").await;

    wait_for("the shrink to be held", SHORT, || {
        status_of(&admin).is_some_and(|s| !s["upstreams"][0]["shrink_held"].is_null())
    });
    let held_at = Instant::now();
    let why = admin_status(&admin)["upstreams"][0]["shrink_held"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        why.contains("answered with 1 of the upstream's 4 endpoints"),
        "{why}"
    );
    assert_eq!(gauge_held(&admin), 1.0);
    daemon.wait_log("SHRINK HELD");
    // Nothing changes during the hold: whatever is seen before the daemon logs the release
    // (which it does before it renders) is the file and nginx as they were.
    let released = "The shrink held for shrink_hold is now applied.";
    wait_for("the hold to end", SHORT, || {
        let seen = (servers(&nginx.rendered()), nginx.reloads());
        let held = !daemon.output.text().contains(released);
        assert!(!held || seen == (4, 1), "nothing changes during the hold");
        !held
    });

    // A deliberate scale-down passes after the hold.
    wait_for("the shrink to be applied", SHORT, || {
        servers(&nginx.rendered()) == 1
    });
    let applied = held_at.elapsed();
    eprintln!("figure: shrink held, seen in /status → applied after {applied:?} (shrink_hold 1s)");
    assert!(nginx.rendered().contains("server 127.0.0.2:7860;"));
    wait_for("the second reload", SHORT, || nginx.reloads() == 2);
    assert_eq!(gauge_held(&admin), 0.0);
    assert!(admin_status(&admin)["upstreams"][0]["shrink_held"].is_null());
    daemon.wait_log("The shrink held for shrink_hold is now applied.");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_held_shrink_is_dropped_when_the_endpoints_come_back() {
    let consul = standin(None).await;
    for (i, a) in FOUR.iter().enumerate() {
        register(&consul, &format!("k{i}"), a).await;
    }
    let nginx = Nginx::start("kotaemon");
    let _report = report_on_failure(&nginx);
    // max_shrink 0.2: losing even one of four is held, so one by one is as good as at once.
    let cfg = consul_config(&nginx, &consul, false)
        .set("shrink_hold", "30s")
        .set("max_shrink", 0.2);
    let daemon = Daemon::start(&cfg.to_toml());
    let admin = daemon.admin();
    wait_for("the first reload", SHORT, || nginx.reloads() == 1);
    let before = nginx.rendered();

    for i in 1..4 {
        consul.deregister(&format!("k{i}")).await;
    }
    wait_for("the shrink to be held", SHORT, || gauge_held(&admin) == 1.0);
    for (i, a) in FOUR.iter().enumerate().skip(1) {
        register(&consul, &format!("k{i}"), a).await;
    }
    wait_for("the hold to be dropped", SHORT, || {
        gauge_held(&admin) == 0.0
    });
    daemon.wait_loop_ran();
    assert_eq!(nginx.rendered(), before);
    assert_eq!(nginx.reloads(), 1, "nothing was ever applied");
    daemon.wait_log("The held shrink is dropped: the source answered with the endpoints again.");
}

/// `once --dry-run` prints the file and writes nothing: not the include, and not `state_dir`
/// (which it does not even create), though the Consul source it read would be saved by a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn once_dry_run_leaves_state_dir_untouched() {
    let consul = standin(None).await;
    register(&consul, "k0", "127.0.0.2:7860").await;
    let nginx = Nginx::start("kotaemon");
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().join("state");
    let cfg = consul_config(&nginx, &consul, false)
        .nginx_path("state_dir", &state_dir)
        .to_toml();
    let (_dir, path) = write_config(&cfg);
    let before = std::fs::read(nginx.output()).unwrap();
    let (code, stdout, stderr) =
        upstreamd(&["once", "--config", path.to_str().unwrap(), "--dry-run"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("server 127.0.0.2:7860;"), "{stdout}");
    assert!(
        !state_dir.exists(),
        "--dry-run created or wrote {state_dir:?}"
    );
    assert_eq!(std::fs::read(nginx.output()).unwrap(), before);
    assert_eq!(nginx.reloads(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_restart_during_a_consul_outage_starts_from_the_saved_snapshot() {
    let replicas = [Replica::start("alpha"), Replica::start("bravo")];
    let mut consul = standin(None).await;
    for (i, r) in replicas.iter().enumerate() {
        register(&consul, &format!("k{i}"), &r.addr).await;
    }
    let nginx = Nginx::start("kotaemon");
    let _report = report_on_failure(&nginx);
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().join("state");
    let no_state = consul_config(&nginx, &consul, true);
    let cfg = no_state
        .clone()
        .nginx_path("state_dir", &state_dir)
        .to_toml();

    // A first run renders both replicas and saves the source's snapshot.
    let mut first = Daemon::start(&cfg);
    wait_for("the first reload", SHORT, || nginx.reloads() == 1);
    let saved = state_dir.join("kotaemon.consul.json");
    wait_for("the saved snapshot", SHORT, || {
        std::fs::read_to_string(&saved).is_ok_and(|t| replicas.iter().all(|r| t.contains(&r.addr)))
    });
    let good = nginx.rendered();
    first.signal(Signal::SIGTERM);
    assert_eq!(first.wait_exit(Duration::from_secs(5)), Some(0));

    // Consul goes down.
    consul.kill();

    // Without state_dir a restart waits for Consul and leaves the file alone.
    let mut blind = Daemon::start(&no_state.to_toml());
    let admin = blind.admin();
    // The loop ran on: the source failed, then asked again.
    wait_for("the source to fail and ask again", SHORT, || {
        blind
            .output
            .text()
            .matches("Consul blocking query sent.")
            .count()
            >= 2
            && status_of(&admin)
                .is_some_and(|s| s["upstreams"][0]["sources"][0]["error"].is_string())
    });
    let st = admin_status(&admin);
    assert_eq!(st["ready"], false, "nothing to render from");
    assert_eq!(nginx.rendered(), good);
    assert_eq!(nginx.reloads(), 1);
    blind.signal(Signal::SIGTERM);
    assert_eq!(blind.wait_exit(Duration::from_secs(5)), Some(0));

    // With it, the restart starts from the saved snapshot: same bytes, no reload, ready.
    let second = Daemon::start(&cfg);
    let admin = second.admin();
    wait_for("ready from the saved snapshot", SHORT, || {
        status_of(&admin).is_some_and(|s| s["ready"] == true)
    });
    let st = admin_status(&admin);
    let source = &st["upstreams"][0]["sources"][0];
    assert_eq!(source["from_saved"], true, "{st:#}");
    assert_eq!(source["up"], false);
    assert!(source["saved_secs_ago"].as_f64().unwrap() < 60.0);
    assert!(source["error"].as_str().is_some());
    assert_eq!(nginx.rendered(), good, "the good file is not replaced");
    assert_eq!(nginx.reloads(), 1, "an unchanged world reloads nothing");
    second.wait_log("starting from its saved snapshot");

    // Rendering is not blocked by the outage: health changes still apply.
    replicas[0].set_mode("error");
    wait_for("alpha marked down", SHORT, || {
        nginx
            .rendered()
            .contains(&format!("server {} down;", replicas[0].addr))
    });
    wait_for("the second reload", SHORT, || nginx.reloads() == 2);

    // Consul comes back (on the same address, empty) with both instances: the source is
    // live again.
    consul.restart().await;
    register(&consul, "k0", &replicas[0].addr).await;
    register(&consul, "k1", &replicas[1].addr).await;
    wait_for("the source to answer again", SHORT, || {
        status_of(&admin).is_some_and(|s| {
            s["upstreams"][0]["sources"][0]["up"] == true
                && s["upstreams"][0]["sources"][0]["from_saved"] == false
        })
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn tokens_and_passwords_never_reach_the_log_status_or_metrics() {
    const TOKEN: &str = "consul-TOKEN-7f3a9c1e";
    const PASSWORD: &str = "etcd-PASSWORD-5b2d8e4f";
    const ROOT_PW: &str = "etcd-ROOT-0c9a";
    let consul = standin(Some(TOKEN)).await;
    register(&consul, "k0", "127.0.0.2:7860").await;
    let mut etcd = Etcd::start().await;
    etcd.client()
        .await
        .put("/services/other/a", "127.0.0.3:7860", None)
        .await
        .unwrap();
    etcd.enable_auth(ROOT_PW, "upstreamd", PASSWORD, "/services/other/")
        .await;
    let nginx = Nginx::start("kotaemon");
    let _report = report_on_failure(&nginx);
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("consul.token");
    let password_file = secrets.path().join("etcd.password");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let cfg = consul_config(&nginx, &consul, false)
        .source("token_file", token_file.display().to_string())
        .upstream(Upstream::new("other").etcd(&etcd.url(), "/services/other/"))
        .source("username", "upstreamd")
        .source("password_file", password_file.display().to_string())
        .to_toml();
    // Good credentials: both render.
    let daemon = Daemon::start(&cfg);
    let admin = daemon.admin();
    wait_for("both upstreams rendered", SHORT, || {
        let t = nginx.rendered();
        t.contains("server 127.0.0.2:7860;") && t.contains("server 127.0.0.3:7860;")
    });
    let mut seen = vec![
        ("log", daemon.output.text()),
        ("status", http_get(&admin, "/status", SHORT).unwrap().1),
        ("metrics", admin_metrics(&admin)),
        ("status page", http_get(&admin, "/", SHORT).unwrap().1),
    ];
    drop(daemon);

    // Wrong ones: the failures are logged and shown, the secrets are not.
    std::fs::write(&token_file, "consul-WRONG-token-1111\n").unwrap();
    std::fs::write(&password_file, "etcd-WRONG-password-2222\n").unwrap();
    let daemon = Daemon::start_with_env(&cfg, &[("CONSUL_HTTP_TOKEN", "env-TOKEN-unused-3333")]);
    let admin = daemon.admin();
    wait_for("both failures reported", SHORT, || {
        status_of(&admin)
            .is_some_and(|s| (0..2).all(|u| s["upstreams"][u]["sources"][0]["error"].is_string()))
    });
    let st = http_get(&admin, "/status", SHORT).unwrap().1;
    assert!(st.contains("403"), "the Consul refusal is shown: {st}");
    assert!(
        st.contains("authentication failed"),
        "the etcd refusal is shown: {st}"
    );
    seen.extend([
        ("log (wrong credentials)", daemon.output.text()),
        ("status (wrong credentials)", st),
        ("metrics (wrong credentials)", admin_metrics(&admin)),
    ]);
    for (what, text) in &seen {
        for secret in [
            TOKEN,
            PASSWORD,
            ROOT_PW,
            "consul-WRONG-token-1111",
            "etcd-WRONG-password-2222",
            "env-TOKEN-unused-3333",
        ] {
            assert!(!text.contains(secret), "{what} shows {secret}:\n{text}");
        }
    }
    // `check` does not print them either.
    let (_dir, path) = write_config(&cfg);
    let (code, out, err) = upstreamd(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("WRONG") && !err.contains("WRONG"));
}
