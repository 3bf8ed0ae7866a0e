//! `apply = "lua"` end to end: upstreamd, Debian's nginx with its Lua modules (two workers)
//! and stand-in replicas. Membership changes reach traffic with no reload past the one that
//! loads the shell; a restarted nginx serves from snapshot.json and gets a new push; a secret
//! rotated on disk behind nginx's back is refused until the fallback reload.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use crate::util::lua::update_status;
use crate::util::*;
use nix::sys::signal::Signal;

const SHORT: Duration = Duration::from_secs(15);

/// nginx with the Lua modules and two workers, proxying `/` to `kotaemon` with retries.
fn lua_nginx() -> Nginx {
    Nginx::start_main(
        &NginxMain {
            lua: true,
            workers: 2,
        },
        "upstream kotaemon { server 127.0.0.1:1 down; }\n",
        &|port| {
            format!(
                "server {{\n    listen 127.0.0.1:{port};\n    location / {{ proxy_pass http://kotaemon; \
                 proxy_next_upstream error timeout http_502 http_503; proxy_connect_timeout 1s; \
                 proxy_read_timeout 5s; proxy_buffering off; proxy_http_version 1.1; \
                 proxy_set_header Connection \"\"; }}\n  }}"
            )
        },
    )
}

/// Everything a test needs: the update server's address and the lua dir.
struct Setup {
    lua_port: u16,
    lua_dir: PathBuf,
}

fn config(nginx: &Nginx, replicas: &[&Replica], s: &Setup) -> String {
    Config::static_list(nginx, "kotaemon", replicas)
        .nginx("apply", "lua")
        .nginx("lua_listen", format!("127.0.0.1:{}", s.lua_port))
        .nginx_path("lua_dir", &s.lua_dir)
        .admin_port0()
        .to_toml()
}

fn setup(nginx: &Nginx) -> Setup {
    Setup {
        lua_port: free_port(),
        lua_dir: nginx.dir.path().join("lua"),
    }
}

/// upstreamd in lua mode over `replicas` on `nginx`, once the shell has loaded and a
/// generation is confirmed: the setup, the daemon and its admin address.
fn start_daemon(nginx: &Nginx, replicas: &[&Replica]) -> (Setup, Daemon, String) {
    let s = setup(nginx);
    let daemon = Daemon::start(&config(nginx, replicas, &s));
    let admin = daemon.admin();
    wait_for("the shell to load", SHORT, || nginx.reloads() == 1);
    wait_for("a confirmed generation", SHORT, || {
        confirmed(&admin).is_some()
    });
    (s, daemon, admin)
}

/// nginx's own `/upstreamd/status`, with the secret on disk: (status code, JSON or text).
fn nginx_status(s: &Setup) -> (u16, serde_json::Value) {
    let secret = std::fs::read_to_string(s.lua_dir.join("lua.secret")).unwrap();
    let (code, text) = update_status(&format!("127.0.0.1:{}", s.lua_port), secret.trim());
    let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (code, value)
}

/// The confirmed generation in upstreamd's `/status`, when there is one.
fn confirmed(admin: &str) -> Option<(u64, i64)> {
    let status = admin_status(admin);
    let lua = &status["lua"];
    Some((
        lua["confirmed_generation"].as_u64()?,
        lua["master_pid"].as_i64()?,
    ))
}

/// The master's current workers, once the old generation (if any) has left.
fn settled_workers(nginx: &Nginx) -> BTreeSet<i32> {
    let mut workers = BTreeSet::new();
    wait_for("two workers", SHORT, || {
        workers = nginx.wait_for_workers();
        workers.len() == 2
    });
    workers
}

#[test]
fn membership_changes_reach_traffic_with_zero_reloads_and_a_restarted_nginx_gets_a_new_push() {
    let (alpha, bravo, charlie) = (
        Replica::start("alpha"),
        Replica::start("bravo"),
        Replica::start("charlie"),
    );
    let mut nginx = lua_nginx();
    let report = report_on_failure(&nginx);
    let (s, daemon, admin) = start_daemon(&nginx, &[&alpha, &bravo]);
    assert!(nginx.rendered().contains("balancer_by_lua_block"));
    assert!(
        !nginx.rendered().contains(&alpha.addr),
        "no server in the shell"
    );
    let shell = nginx.rendered();
    nginx.wait_spread(30, "alpha and bravo to serve", exactly(&["alpha", "bravo"]));
    let workers = settled_workers(&nginx);

    // A failing replica leaves traffic: a push, no reload.
    bravo.set_mode("error");
    nginx.wait_spread(20, "only alpha to serve", exactly(&["alpha"]));

    // A new replica in the source (a SIGHUP re-reads the static list).
    std::fs::write(
        &daemon.config,
        config(&nginx, &[&alpha, &bravo, &charlie], &s),
    )
    .unwrap();
    daemon.signal(Signal::SIGHUP);
    nginx.wait_spread(
        30,
        "alpha and charlie to serve",
        exactly(&["alpha", "charlie"]),
    );

    assert_eq!(nginx.reloads(), 1, "membership changes reload nothing");
    assert_eq!(nginx.wait_for_workers(), workers, "the same workers serve");
    assert_eq!(nginx.rendered(), shell, "the include is unchanged");
    let metrics = admin_metrics(&admin);
    assert_eq!(
        metric(&metrics, "upstreamd_reloads_total{result=\"ok\"}"),
        1.0
    );
    assert!(
        metric(&metrics, "upstreamd_lua_pushes_total{result=\"confirmed\"}") >= 2.0,
        "{metrics}"
    );
    // A probe may still bring a push: compare the gauge with /status once both agree.
    wait_for("the generation gauge to match /status", SHORT, || {
        confirmed(&admin).map(|c| c.0 as f64)
            == Some(metric(&admin_metrics(&admin), "upstreamd_lua_generation"))
    });
    let (before, master) = confirmed(&admin).unwrap();

    // nginx restarts: its dict is gone; it serves snapshot.json at once, then gets a push.
    drop(report);
    nginx.restart();
    let _report = report_on_failure(&nginx);
    nginx.wait_spread(
        20,
        "the snapshot to serve the latest list",
        exactly(&["alpha", "charlie"]),
    );
    let new_master = nginx.master().as_raw() as i64;
    assert_ne!(new_master, master);
    wait_for("a push to the new master", SHORT, || {
        confirmed(&admin).is_some_and(|(g, m)| m == new_master && g > before)
    });
    let (code, status) = nginx_status(&s);
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["source"], "push", "{status}");
    assert_eq!(
        status["generation"].as_u64(),
        confirmed(&admin).map(|c| c.0)
    );
    assert_eq!(nginx.reloads(), 1, "the restart needed no reload");
}

#[test]
fn a_secret_changed_behind_nginx_is_refused_until_the_fallback_reload() {
    let (alpha, bravo) = (Replica::start("alpha"), Replica::start("bravo"));
    let nginx = lua_nginx();
    let _report = report_on_failure(&nginx);
    let (s, daemon, admin) = start_daemon(&nginx, &[&alpha, &bravo]);
    nginx.wait_spread(30, "alpha and bravo to serve", exactly(&["alpha", "bravo"]));

    // nginx keeps the secret it read at its last load.
    std::fs::write(
        s.lua_dir.join("lua.secret"),
        "0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    bravo.set_mode("error");
    wait_for(
        "the refusals and the fallback reload",
        Duration::from_secs(30),
        || nginx.reloads() == 2,
    );
    let metrics = admin_metrics(&admin);
    assert!(
        metric(&metrics, "upstreamd_lua_pushes_total{result=\"rejected\"}") >= 3.0,
        "{metrics}"
    );
    assert!(daemon
        .output
        .text()
        .contains("nginx refused the push (401)"));
    // After the reload nginx reads the new secret: traffic follows, pushes work again.
    nginx.wait_spread(20, "only alpha to serve", exactly(&["alpha"]));
    wait_for("a confirmed push again", SHORT, || {
        confirmed(&admin).is_some() && nginx_status(&s).1["source"] == "push"
    });
}
