//! `apply = "lua"` end to end: upstreamd, Debian's nginx with its Lua modules (two workers)
//! and stand-in replicas. Membership changes reach traffic with no reload past the one that
//! loads the shell; a restarted nginx serves from snapshot.json and gets a new push; a secret
//! rotated on disk behind nginx's back is refused until the fallback reload.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
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

/// Everything a test needs: the update server's address, the admin's, and the lua dir.
struct Setup {
    lua_port: u16,
    admin: String,
    lua_dir: PathBuf,
}

fn config(nginx: &Nginx, replicas: &[&Replica], s: &Setup) -> String {
    static_config(
        nginx,
        "kotaemon",
        replicas,
        &format!(
            "apply = \"lua\"\nlua_listen = \"127.0.0.1:{}\"\nlua_dir = \"{}\"\n\n[admin]\nlisten = \"{}\"",
            s.lua_port,
            s.lua_dir.display(),
            s.admin
        ),
        "",
    )
}

fn setup(nginx: &Nginx) -> Setup {
    Setup {
        lua_port: free_port(),
        admin: format!("127.0.0.1:{}", free_port()),
        lua_dir: nginx.dir.path().join("lua"),
    }
}

/// nginx's own `/upstreamd/status`, with the secret on disk.
fn nginx_status(s: &Setup) -> serde_json::Value {
    let secret = std::fs::read_to_string(s.lua_dir.join("lua.secret")).unwrap();
    let (code, body) = http_exchange_status(s, secret.trim());
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn http_exchange_status(s: &Setup, secret: &str) -> (u16, String) {
    let request = format!(
        "GET /upstreamd/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\nConnection: close\r\n\r\n"
    );
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", s.lua_port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    std::io::Write::write_all(&mut stream, request.as_bytes()).unwrap();
    let mut reply = String::new();
    // The server closes the connection: read to the end.
    let _ = std::io::Read::read_to_string(&mut stream, &mut reply);
    let code = reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    // nginx answers chunked when the Lua side gives no length: keep the JSON object only.
    let body = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) => body[a..=b].to_owned(),
        _ => body.to_owned(),
    };
    (code, body)
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
    let s = setup(&nginx);
    let daemon = Daemon::start(&config(&nginx, &[&alpha, &bravo], &s));

    wait_for("the shell to load", SHORT, || nginx.reloads() == 1);
    wait_for("a confirmed generation", SHORT, || {
        confirmed(&s.admin).is_some()
    });
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
    let metrics = admin_metrics(&s.admin);
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
        confirmed(&s.admin).map(|c| c.0 as f64)
            == Some(metric(&admin_metrics(&s.admin), "upstreamd_lua_generation"))
    });
    let (before, master) = confirmed(&s.admin).unwrap();

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
        confirmed(&s.admin).is_some_and(|(g, m)| m == new_master && g > before)
    });
    let status = nginx_status(&s);
    assert_eq!(status["source"], "push", "{status}");
    assert_eq!(
        status["generation"].as_u64(),
        confirmed(&s.admin).map(|c| c.0)
    );
    assert_eq!(nginx.reloads(), 1, "the restart needed no reload");
}

#[test]
fn a_secret_changed_behind_nginx_is_refused_until_the_fallback_reload() {
    let (alpha, bravo) = (Replica::start("alpha"), Replica::start("bravo"));
    let nginx = lua_nginx();
    let _report = report_on_failure(&nginx);
    let s = setup(&nginx);
    let daemon = Daemon::start(&config(&nginx, &[&alpha, &bravo], &s));
    wait_for("the shell to load", SHORT, || nginx.reloads() == 1);
    wait_for("a confirmed generation", SHORT, || {
        confirmed(&s.admin).is_some()
    });
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
    let metrics = admin_metrics(&s.admin);
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
        confirmed(&s.admin).is_some() && nginx_status(&s)["source"] == "push"
    });
}
