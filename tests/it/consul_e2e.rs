//! Consul → upstreamd → a real nginx, end to end: stand-in Kotaemon replicas registered in
//! Consul, the real `upstreamd run`, and what a user sees — traffic through nginx, the reload
//! count, the bytes of the include file, the daemon still running.
//!
//! Every test runs against `consul-standin`; those that need no fault injection also run
//! against a real `consul agent -dev` when `consul` is on PATH (otherwise that lane prints
//! `skipped: …` and passes). Measured figures are printed as `figure: …`
//! (`cargo test --test it consul_e2e:: -- --nocapture`).
//!
//! The test bodies are async for the registry client; waits on nginx and the daemon block the
//! test's own thread (the runtime's worker drives the client's connections meanwhile).

use std::time::{Duration, Instant};

use crate::util::consul::{
    instance, on_every_lane, replica_instance as registration, Lane, Registry,
};
use crate::util::*;
use serde_json::json;

const SHORT: Duration = Duration::from_secs(10);

/// The daemon's config: upstream `kotaemon` from `reg`'s service, probed fast (or not at all),
/// with the admin server on port 0.
fn config(nginx: &Nginx, reg: &Registry, probes: bool) -> Config {
    reg.config(nginx, probes, "2s")
}

const SENT: &str = "Consul blocking query sent.";

/// How many blocking queries the daemon has sent.
fn queries(daemon: &Daemon) -> usize {
    daemon.output.text().matches(SENT).count()
}

/// Registers each of `replicas` under its own name, with no meta.
async fn register_plain(reg: &Registry, replicas: &[Replica]) {
    for r in replicas {
        reg.register(registration(&r.name, r, json!({}))).await;
    }
}

/// `lane`'s registry and `names` started as replicas, the first `registered` of them
/// registered plainly; `None` when the lane is skipped (before any replica starts).
async fn registered<const N: usize>(
    lane: Lane,
    names: [&str; N],
    registered: usize,
) -> Option<(Registry, [Replica; N])> {
    let reg = Registry::start(lane, None).await?;
    let replicas = names.map(Replica::start);
    register_plain(&reg, &replicas[..registered]).await;
    Some((reg, replicas))
}

fn server(replica: &Replica, attrs: &str) -> String {
    format!("server {}{attrs};", replica.addr)
}

on_every_lane!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    three_registered_replicas_serve_after_one_reload,
    a_registration_is_served_and_a_deregistration_leaves,
    maintenance_renders_down_and_back,
    with_probes_off_consul_alone_decides,
    an_instance_without_an_address_gets_the_node_address,
    a_bad_meta_weight_is_skipped_with_a_warning_and_never_rendered,
    the_token_is_sent_and_never_logged,
    a_quiet_service_costs_a_handful_of_requests,
    a_config_reload_over_an_unchanged_registry_reloads_nothing,
    an_empty_service_renders_the_placeholder_until_the_first_registration,
);

async fn three_registered_replicas_serve_after_one_reload(lane: Lane) {
    let Some(reg) = Registry::start(lane, None).await else {
        return;
    };
    let replicas = ["alpha", "bravo", "charlie"].map(Replica::start);
    reg.register(registration("alpha", &replicas[0], json!({"weight": "3"})))
        .await;
    reg.register(registration(
        "bravo",
        &replicas[1],
        json!({"max_fails": "2", "fail_timeout": "10s"}),
    ))
    .await;
    reg.register(registration("charlie", &replicas[2], json!({})))
        .await;
    let mut run = Running::start("kotaemon", |n| config(n, &reg, true).to_toml());
    let (nginx, daemon) = (&run.nginx, &mut run.daemon);
    let want = in_render_order(vec![
        server(&replicas[0], " weight=3"),
        server(&replicas[1], " max_fails=2 fail_timeout=10s"),
        server(&replicas[2], ""),
    ]);
    assert_eq!(server_lines(&nginx.rendered()), want);
    nginx.wait_spread(
        30,
        "all three replicas to serve",
        exactly(&["alpha", "bravo", "charlie"]),
    );
    assert_quiet(nginx, daemon, 1);
}

async fn a_registration_is_served_and_a_deregistration_leaves(lane: Lane) {
    let Some((reg, replicas)) = registered(lane, ["alpha", "bravo", "charlie"], 2).await else {
        return;
    };
    let mut run = Running::start("kotaemon", |n| config(n, &reg, true).to_toml());
    let (nginx, daemon) = (&run.nginx, &mut run.daemon);
    nginx.wait_spread(20, "alpha and bravo to serve", exactly(&["alpha", "bravo"]));
    // The daemon blocks on its next query (the first answered with alpha and bravo).
    reg.wait_blocked().await;

    let t = Instant::now();
    reg.register(registration("charlie", &replicas[2], json!({})))
        .await;
    nginx.wait_spread(9, "charlie to serve", |s| s.contains_key("charlie"));
    let served = t.elapsed();
    println!(
        "figure: consul registration → served: {} ms ({lane:?})",
        served.as_millis()
    );
    wait_for("the second reload", SHORT, || nginx.reloads() == 2);
    nginx.wait_spread(
        30,
        "all three to serve",
        exactly(&["alpha", "bravo", "charlie"]),
    );

    reg.wait_blocked().await;
    let t = Instant::now();
    reg.deregister("alpha").await;
    wait_for("alpha to leave the file", SHORT, || {
        !nginx.rendered().contains(&replicas[0].addr)
    });
    nginx.wait_spread(
        30,
        "only bravo and charlie to serve",
        exactly(&["bravo", "charlie"]),
    );
    println!(
        "figure: consul deregistration → out of traffic: {} ms ({lane:?})",
        t.elapsed().as_millis()
    );
    assert_eq!(
        server_lines(&nginx.rendered()).len(),
        2,
        "{}",
        nginx.rendered()
    );
    settles_at(nginx, daemon, 3);
}

async fn maintenance_renders_down_and_back(lane: Lane) {
    let Some((reg, replicas)) = registered(lane, ["alpha", "bravo", "charlie"], 3).await else {
        return;
    };
    let mut run = Running::start("kotaemon", |n| config(n, &reg, true).to_toml());
    let (nginx, daemon) = (&run.nginx, &mut run.daemon);
    nginx.wait_spread(
        30,
        "all three to serve",
        exactly(&["alpha", "bravo", "charlie"]),
    );

    reg.maintenance("bravo", true).await;
    wait_for("bravo rendered down", SHORT, || {
        nginx.rendered().contains(&server(&replicas[1], " down"))
    });
    nginx.wait_spread(30, "bravo out of traffic", exactly(&["alpha", "charlie"]));
    wait_for("the second reload", SHORT, || nginx.reloads() == 2);
    // Still listed (so hash distribution stays put), only marked down.
    assert_eq!(server_lines(&nginx.rendered()).len(), 3);

    reg.maintenance("bravo", false).await;
    wait_for("bravo rendered up", SHORT, || {
        nginx.rendered().contains(&server(&replicas[1], ""))
    });
    nginx.wait_spread(
        30,
        "bravo back in traffic",
        exactly(&["alpha", "bravo", "charlie"]),
    );
    settles_at(nginx, daemon, 3);
}

async fn with_probes_off_consul_alone_decides(lane: Lane) {
    let Some(reg) = Registry::start(lane, None).await else {
        return;
    };
    let replicas = [Replica::start("alpha"), Replica::start("bravo")];
    // bravo fails its health path, which nobody asks: Consul says passing, so it serves.
    replicas[1].set_mode_and_wait("error", 503);
    register_plain(&reg, &replicas).await;
    let mut run = Running::start("kotaemon", |n| config(n, &reg, false).to_toml());
    let (nginx, daemon) = (&run.nginx, &mut run.daemon);
    assert_eq!(
        server_lines(&nginx.rendered()),
        in_render_order(vec![server(&replicas[0], ""), server(&replicas[1], "")]),
        "both rendered up"
    );
    nginx.wait_spread(20, "both to serve", exactly(&["alpha", "bravo"]));

    reg.maintenance("bravo", true).await;
    wait_for("bravo rendered down", SHORT, || {
        nginx.rendered().contains(&server(&replicas[1], " down"))
    });
    nginx.wait_spread(20, "only alpha to serve", exactly(&["alpha"]));
    settles_at(nginx, daemon, 2);
    assert!(
        !daemon.output.text().contains("Endpoint health changed."),
        "nothing was probed:\n{}",
        daemon.output.text()
    );
}

async fn an_instance_without_an_address_gets_the_node_address(lane: Lane) {
    // The stand-in's node sits on 127.0.0.2, so only the node's address can reach that replica.
    let Some(reg) = Registry::start_with(lane, None, "127.0.0.2").await else {
        return;
    };
    let alpha = Replica::start("alpha");
    let nodal = Replica::start_on(
        "nodal",
        &format!("{}:{}", reg.node_address, free_port()),
        &[],
    );
    reg.register(registration("alpha", &alpha, json!({}))).await;
    reg.register(instance("nodal", "", nodal.port(), &[], json!({})))
        .await;
    let mut run = Running::start("kotaemon", |n| config(n, &reg, true).to_toml());
    let (nginx, daemon) = (&run.nginx, &mut run.daemon);
    assert!(
        server_lines(&nginx.rendered()).contains(&server(&nodal, "")),
        "{} rendered",
        nodal.addr
    );
    nginx.wait_spread(20, "both to serve", exactly(&["alpha", "nodal"]));
    assert_quiet(nginx, daemon, 1);
}

async fn a_bad_meta_weight_is_skipped_with_a_warning_and_never_rendered(lane: Lane) {
    let Some(reg) = Registry::start(lane, None).await else {
        return;
    };
    let replicas = ["alpha", "bravo", "charlie"].map(Replica::start);
    reg.register(registration("alpha", &replicas[0], json!({})))
        .await;
    reg.register(registration(
        "bravo-heavy",
        &replicas[1],
        json!({"weight": "heavy"}),
    ))
    .await;
    let mut run = Running::start("kotaemon", |n| config(n, &reg, true).to_toml());
    let (nginx, daemon) = (&run.nginx, &mut run.daemon);
    assert_eq!(server_lines(&nginx.rendered()), [server(&replicas[0], "")]);
    nginx.wait_spread(20, "alpha alone to serve", exactly(&["alpha"]));

    // Another change re-renders; the bad entry still stays out, and is not warned about again.
    reg.register(registration("charlie", &replicas[2], json!({})))
        .await;
    nginx.wait_spread(
        20,
        "alpha and charlie to serve",
        exactly(&["alpha", "charlie"]),
    );
    wait_for("the second reload", SHORT, || nginx.reloads() == 2);
    assert!(!nginx.rendered().contains(&replicas[1].addr));
    let log = daemon.output.text();
    let warning = "Skipped Consul service ID bravo-heavy";
    assert_eq!(log.matches(warning).count(), 1, "warned once:\n{log}");
    assert!(
        log.lines()
            .any(|l| l.contains(warning) && l.contains("weight")),
        "the warning says why:\n{log}"
    );
    assert_quiet(nginx, daemon, 2);
}

async fn the_token_is_sent_and_never_logged(lane: Lane) {
    const TOKEN: &str = "5c0ffee5-7a1e-4b1d-9e3a-0dd5ca1ab1e5";
    let Some(reg) = Registry::start(lane, Some(TOKEN)).await else {
        return;
    };
    let replicas = [Replica::start("alpha"), Replica::start("bravo")];
    reg.register(registration("alpha", &replicas[0], json!({})))
        .await;
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("consul.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let token = token_file.display().to_string();
    let mut run = Running::start("kotaemon", |n| {
        config(n, &reg, true).source("token_file", token).to_toml()
    });
    let (nginx, daemon) = (&run.nginx, &mut run.daemon);
    reg.register(registration("bravo", &replicas[1], json!({})))
        .await;
    nginx.wait_spread(20, "both to serve", exactly(&["alpha", "bravo"]));
    if lane == Lane::Standin {
        assert_eq!(reg.stats().await["last_health_token"], TOKEN);
    }
    let log = daemon.output.text();
    assert!(log.contains("Consul blocking query sent."), "{log}");
    assert!(
        !log.contains(TOKEN),
        "the token leaked into the log:\n{log}"
    );
    assert!(daemon.alive());
}

async fn a_quiet_service_costs_a_handful_of_requests(lane: Lane) {
    let Some((reg, _replicas)) = registered(lane, ["alpha", "bravo"], 2).await else {
        return;
    };
    let mut run = Running::start("kotaemon", |n| config(n, &reg, true).to_toml());
    let (nginx, daemon) = (&run.nginx, &mut run.daemon);
    nginx.wait_spread(20, "both to serve", exactly(&["alpha", "bravo"]));

    // The daemon's own probes are the clock: 30 of them at 200 ms over two replicas are
    // about 3 s of its time, one or two blocking queries' wait.
    let logged = queries(daemon);
    let served = reg.health_requests_counted().await;
    let (probes, _) = daemon.activity();
    wait_for("30 more probes", SHORT, || {
        daemon.activity().0 >= probes + 30.0
    });
    let sent = queries(daemon) - logged;
    assert_quiet(nginx, daemon, 1);
    println!("figure: consul quiet service: {sent} requests in 30 probe rounds with wait = 2s ({lane:?})");
    // One blocking query per wait (2s, plus up to wait/16 of server jitter).
    assert!(
        (1..=3).contains(&sent),
        "blocking queries, not a poll loop: {sent} in 30 probe rounds"
    );
    reg.assert_served_as_sent(served, sent, "the daemon").await;
}

async fn a_config_reload_over_an_unchanged_registry_reloads_nothing(lane: Lane) {
    let Some((reg, _replicas)) = registered(lane, ["alpha", "bravo", "charlie"], 3).await else {
        return;
    };
    let mut run = Running::start("kotaemon", |n| config(n, &reg, true).to_toml());
    let (nginx, daemon) = (&run.nginx, &mut run.daemon);

    // SIGHUP restarts the source; it lists the same service again.
    daemon.reload_config();
    assert_quiet(nginx, daemon, 1);

    // The restarted source still follows the service.
    reg.deregister("alpha").await;
    nginx.wait_spread(
        20,
        "bravo and charlie to serve",
        exactly(&["bravo", "charlie"]),
    );
    settles_at(nginx, daemon, 2);
}

async fn an_empty_service_renders_the_placeholder_until_the_first_registration(lane: Lane) {
    let Some(reg) = Registry::start(lane, None).await else {
        return;
    };
    let alpha = Replica::start("alpha");
    let mut run = Running::start("kotaemon", |n| config(n, &reg, true).to_toml());
    let (nginx, daemon) = (&run.nginx, &mut run.daemon);
    assert_placeholder(nginx);

    reg.register(registration("alpha", &alpha, json!({}))).await;
    nginx.wait_spread(10, "alpha to serve", exactly(&["alpha"]));
    assert_eq!(server_lines(&nginx.rendered()), [server(&alpha, "")]);
    settles_at(nginx, daemon, 2);
}

// ---------------------------------------------------------------------------------------------
// Fault injection: stand-in only.

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn after_an_index_reset_changes_still_arrive() {
    let reg = Registry::start(Lane::Standin, None).await.unwrap();
    let replicas = ["alpha", "bravo", "charlie"].map(Replica::start);
    reg.register(registration("alpha", &replicas[0], json!({})))
        .await;
    let mut run = Running::start("kotaemon", |n| config(n, &reg, true).to_toml());
    let (nginx, daemon) = (&run.nginx, &mut run.daemon);
    reg.wait_blocked().await;

    // The index drops below the one the daemon blocks on, as after a snapshot restore.
    reg.fault("reset-index").await;
    // It sees the index go back, asks again from 0, and blocks on the new index.
    wait_for("the index to go back", SHORT, || {
        daemon.output.text().contains("went backwards")
    });
    reg.wait_blocked().await;
    let t = Instant::now();
    reg.register(registration("bravo", &replicas[1], json!({})))
        .await;
    nginx.wait_spread(
        20,
        "bravo to serve after the reset",
        exactly(&["alpha", "bravo"]),
    );
    let first = t.elapsed();
    reg.wait_blocked().await;
    let t = Instant::now();
    reg.register(registration("charlie", &replicas[2], json!({})))
        .await;
    nginx.wait_spread(
        30,
        "charlie to serve, blocking on the new low index",
        exactly(&["alpha", "bravo", "charlie"]),
    );
    let second = t.elapsed();
    println!(
        "figure: consul index reset → next registrations served in {} ms and {} ms",
        first.as_millis(),
        second.as_millis()
    );
    // Expected sooner than the 2s wait (a woken query, not one that timed out): a figure for
    // the log, not an assert, as the machine is shared.
    daemon.wait_log("went backwards");
    settles_at(nginx, daemon, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_five_second_outage_changes_nothing_and_recovery_is_prompt() {
    let reg = Registry::start(Lane::Standin, None).await.unwrap();
    let replicas = ["alpha", "bravo", "charlie"].map(Replica::start);
    register_plain(&reg, &replicas[..2]).await;
    let mut run = Running::start("kotaemon", |n| config(n, &reg, true).to_toml());
    let (nginx, daemon) = (&run.nginx, &mut run.daemon);
    nginx.wait_spread(20, "alpha and bravo to serve", exactly(&["alpha", "bravo"]));
    let bytes = std::fs::read(nginx.output()).unwrap();

    let outage = Instant::now();
    reg.fault("error500").await;
    // The query in flight ends with its wait (2s); the next one gets the 500.
    assert_outage_changes_nothing(
        nginx,
        daemon,
        &bytes,
        outage + Duration::from_secs(5),
        &["alpha", "bravo"],
    );
    assert_eq!(
        daemon
            .output
            .text()
            .matches("Source failed; keeping its last snapshot")
            .count(),
        1,
        "reported once per outage"
    );

    reg.fault("none").await;
    let back = Instant::now();
    reg.register(registration("charlie", &replicas[2], json!({})))
        .await;
    nginx.wait_spread(
        30,
        "charlie to serve after the outage",
        exactly(&["alpha", "bravo", "charlie"]),
    );
    let recovery = back.elapsed();
    println!(
        "figure: consul recovery after a 5 s outage: {} ms (a registration made as Consul came back → served)",
        recovery.as_millis()
    );
    // Expected under 4s (retry backoff is capped at 3s; then one blocking query and one
    // reload): a figure for the log, not an assert.
    daemon.wait_log("Source recovered.");
    settles_at(nginx, daemon, 2);
}
