//! The update server of the Lua balancer (`apply = "lua"`) in Debian's real nginx with its Lua
//! modules, driven by hand-built pushes: traffic moves with no reload; wrong secrets, stale
//! generations and hostile values change nothing; a restarted nginx serves from snapshot.json.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use crate::util::lua::*;
use crate::util::*;
use serde_json::{json, Value};

/// Replicas `a` and `b` behind one worker, `a` pushed as generation 1.
fn serving_a() -> Lua {
    let lua = round_robin(&["a", "b"], 1);
    let (code, reply) = lua.push(&body(1, "app", "round_robin", servers(&[lua.addr("a")])));
    assert_eq!(code, 200, "{reply}");
    lua
}

#[test]
fn pushes_move_traffic_between_workers_without_a_reload() {
    let lua = round_robin(&["a", "b", "c"], 2);
    let _report = report_on_failure(&lua.nginx);
    let mut workers = BTreeSet::new();
    wait_for("both workers", Duration::from_secs(5), || {
        workers = lua.nginx.wait_for_workers();
        workers.len() == 2
    });
    assert_eq!(lua.status()["source"], "none");
    assert_eq!(
        lua.nginx.spread(4),
        BTreeMap::from([("status 502".into(), 4)])
    );
    assert!(lua
        .nginx
        .error_log()
        .contains("no usable server in upstream app (no list yet)"));

    let (code, reply) = lua.push(&body(1, "app", "round_robin", servers(&[lua.addr("a")])));
    assert_eq!((code, reply), (200, json!({"generation": 1})));
    lua.wait_generation(1);
    assert_eq!(lua.nginx.spread(10), BTreeMap::from([("a".into(), 10)]));

    let two = servers(&[lua.addr("b"), lua.addr("c")]);
    assert_eq!(lua.push(&body(2, "app", "round_robin", two)).0, 200);
    // The push reached one worker; the other picks it up from the dict on its own.
    lua.wait_generation(2);
    let seen = lua.nginx.spread(20);
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["b", "c"], "{seen:?}");

    let status = lua.status();
    assert_eq!(status["source"], "push");
    assert_eq!(status["generation"], 2);
    assert_eq!(status["master_pid"], lua.nginx.master().as_raw());
    assert_eq!(lua.nginx.wait_for_workers(), workers, "the same workers");
    assert_eq!(lua.nginx.reloads(), 0);
    assert!(
        !lua.nginx.error_log().contains("signal"),
        "no signal at all"
    );
}

#[test]
fn a_wrong_or_missing_secret_changes_nothing() {
    let lua = serving_a();
    let _report = report_on_failure(&lua.nginx);
    let other = body(2, "app", "round_robin", servers(&[lua.addr("b")])).to_string();
    for auth in [
        None,
        Some("Authorization: Bearer wrong"),
        Some(&*format!("Authorization: Bearer {SECRET}x")),
        Some(&*format!("Authorization: Basic {SECRET}")),
    ] {
        let (code, reply) = lua.push_with(auth, &other);
        assert_eq!(code, 401, "{auth:?}: {reply}");
        assert!(reply["error"].is_string(), "{reply}");
    }
    let (code, _, _) = http_exchange(
        &lua.update,
        "GET",
        "/upstreamd/status",
        &["Authorization: Bearer nope"],
        "",
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(code, 401);
    assert_eq!(lua.status()["generation"], 1);
    assert_eq!(lua.nginx.spread(6), BTreeMap::from([("a".into(), 6)]));
}

#[test]
fn stale_and_equal_generations_are_refused() {
    let lua = round_robin(&["a", "b"], 1);
    let _report = report_on_failure(&lua.nginx);
    let a = servers(&[lua.addr("a")]);
    let b = servers(&[lua.addr("b")]);
    assert_eq!(lua.push(&body(10, "app", "round_robin", a)).0, 200);
    for gen in [10, 9, 1] {
        let (code, reply) = lua.push(&body(gen, "app", "round_robin", b.clone()));
        assert_eq!(
            (code, reply),
            (409, json!({"error": "stale generation", "generation": 10}))
        );
    }
    assert_eq!(lua.nginx.spread(6), BTreeMap::from([("a".into(), 6)]));
    assert_eq!(lua.push(&body(11, "app", "round_robin", b)).0, 200);
    assert_eq!(lua.nginx.spread(6), BTreeMap::from([("b".into(), 6)]));
}

#[test]
fn hostile_values_are_refused_as_data_and_change_nothing() {
    let lua = serving_a();
    let _report = report_on_failure(&lua.nginx);
    let b = lua.addr("b").to_owned();
    let server = |field: &str, value: Value| {
        let mut s = json!({"address": b, "weight": 1});
        s[field] = value;
        body(2, "app", "round_robin", json!([s])).to_string()
    };
    let cases: Vec<(String, &str)> = vec![
        (
            server(
                "address",
                json!("1.2.3.4:80; } os.execute('touch /tmp/pwned') --"),
            ),
            "upstreams.app.servers[0].address: not an IP literal with a port",
        ),
        (
            server("address", json!("\"]==] os.exit(1) --[==[\"")),
            "servers[0].address",
        ),
        (server("address", json!("%d+%.%d:80")), "servers[0].address"),
        (
            server("address", json!("127.0.0.1:99999")),
            "servers[0].address",
        ),
        (
            server("address", json!("localhost:80")),
            "servers[0].address",
        ),
        (server("address", json!(80)), "servers[0].address"),
        (server("weight", json!(1e300)), "servers[0].weight"),
        (server("weight", json!(0)), "servers[0].weight"),
        (server("weight", json!("1")), "servers[0].weight"),
        (server("weight", json!(1.5)), "servers[0].weight"),
        (server("down", json!("false")), "servers[0].down"),
        (server("max_fails", json!(-1)), "servers[0].max_fails"),
        (server("id", json!("../../etc/passwd")), "servers[0].id"),
        (server("evil", json!(1)), "unknown field"),
        (
            json!({"generation": 2, "upstreams": {"app": {"balance": "round_robin",
                   "servers": []}, "os.execute('id')": {"balance": "round_robin", "servers": []}}})
            .to_string(),
            "unknown upstream",
        ),
        (
            json!({"generation": 2, "upstreams": {}}).to_string(),
            "missing",
        ),
        (
            json!({"generation": 2, "upstreams": {"app": {"balance": "hash", "servers": []}}})
                .to_string(),
            "balance",
        ),
        (
            json!({"generation": 1e300, "upstreams": {"app": {"balance": "round_robin",
                   "servers": []}}})
            .to_string(),
            "generation",
        ),
        (
            json!({"generation": 9007199254740993_u64, "upstreams": {}}).to_string(),
            "generation",
        ),
        (
            json!({"generation": "3", "upstreams": {}}).to_string(),
            "generation",
        ),
        (json!([1, 2]).to_string(), "body"),
        ("{\"generation\": 2,".to_owned(), "invalid JSON"),
        ("[".repeat(100_000), "invalid JSON"),
        (
            format!(
                "{{\"generation\": 2, \"upstreams\": {{}}, \"pad\": \"{}\"}}",
                "x".repeat(9 << 20)
            ),
            "larger than",
        ),
    ];
    for (text, want) in &cases {
        let (code, reply) = lua.push_with(Some(&format!("Authorization: Bearer {SECRET}")), text);
        let shown = &text[..text.len().min(120)];
        assert_eq!(code, 400, "{shown}: {reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(want),
            "{shown}: {error:?} should say {want:?}"
        );
    }
    assert!(!Path::new("/tmp/pwned").exists());
    assert_eq!(lua.status()["generation"], 1);
    assert_eq!(lua.nginx.spread(6), BTreeMap::from([("a".into(), 6)]));
    assert!(lua.nginx.test_config().status.success());
}

#[test]
fn a_restarted_nginx_serves_from_the_snapshot_and_a_reload_keeps_a_newer_push() {
    let mut lua = round_robin(&["a", "b", "c"], 1);
    let snapshot = body(6, "app", "round_robin", servers(&[lua.addr("b")]));
    // What the daemon does: the snapshot first, then the push.
    std::fs::write(lua.lua_dir().join("snapshot.json"), snapshot.to_string()).unwrap();
    assert_eq!(lua.push(&snapshot).0, 200, "{}", lua.nginx.error_log());

    lua.nginx.restart();
    let _report = report_on_failure(&lua.nginx);
    let status = lua.status();
    assert_eq!(
        (&status["source"], &status["generation"]),
        (&json!("snapshot"), &json!(6))
    );
    assert_eq!(lua.nginx.spread(6), BTreeMap::from([("b".into(), 6)]));

    // A reload keeps the shared dict: a newer push survives an older snapshot.
    assert_eq!(
        lua.push(&body(7, "app", "round_robin", servers(&[lua.addr("c")])))
            .0,
        200
    );
    let before = lua.nginx.wait_for_workers();
    nix::sys::signal::kill(lua.nginx.master(), nix::sys::signal::SIGHUP).unwrap();
    wait_for("new workers", Duration::from_secs(5), || {
        lua.nginx.wait_for_workers().is_disjoint(&before)
    });
    assert_eq!(lua.status()["source"], "push");
    assert_eq!(lua.nginx.spread(6), BTreeMap::from([("c".into(), 6)]));

    // An invalid snapshot: nginx refuses to start on it, and says why.
    std::fs::write(lua.lua_dir().join("snapshot.json"), "{\"generation\": 8}").unwrap();
    nix::sys::signal::kill(lua.nginx.master(), nix::sys::signal::SIGHUP).unwrap();
    wait_for("the refusal in the log", Duration::from_secs(5), || {
        lua.nginx
            .error_log()
            .contains("upstreamd: invalid snapshot")
    });
    assert_eq!(lua.nginx.spread(4), BTreeMap::from([("c".into(), 4)]));
}

#[test]
fn a_request_right_after_a_push_is_served_from_the_new_list_by_any_worker() {
    let lua = round_robin(&["a", "b"], 2);
    let _report = report_on_failure(&lua.nginx);
    for generation in 1..=20 {
        let name = if generation % 2 == 0 { "a" } else { "b" };
        let list = servers(&[lua.addr(name)]);
        assert_eq!(
            lua.push(&body(generation, "app", "round_robin", list)).0,
            200
        );
        // No wait: whichever worker takes this request must already use the new list.
        assert_eq!(lua.served("/"), name, "generation {generation}");
    }
}

#[test]
fn a_new_upstream_needs_a_snapshot_that_names_it_before_nginx_takes_the_include() {
    let site = "location / { proxy_pass http://app; } \
                location /two { set $two app2; proxy_pass http://$two; }";
    let lua = Lua::start(
        &[shell("app", "round_robin", "")],
        &["a", "b"],
        1,
        site,
        None,
    );
    let _report = report_on_failure(&lua.nginx);
    let one = body(1, "app", "round_robin", servers(&[lua.addr("a")]));
    std::fs::write(lua.lua_dir().join("snapshot.json"), one.to_string()).unwrap();
    assert_eq!(lua.push(&one).0, 200);
    let workers = lua.nginx.wait_for_workers();

    // The include gains `app2` while snapshot.json still describes `app` alone: refused.
    let shells = [
        shell("app", "round_robin", ""),
        shell("app2", "round_robin", ""),
    ];
    lua.reshell(&shells);
    nix::sys::signal::kill(lua.nginx.master(), nix::sys::signal::SIGHUP).unwrap();
    wait_for("the refusal in the log", Duration::from_secs(5), || {
        lua.nginx.error_log().contains("\"app2\" is missing")
    });
    assert_eq!(
        lua.nginx.wait_for_workers(),
        workers,
        "the old workers stay"
    );
    assert_eq!(lua.served("/"), "a");

    // With a snapshot for the new include, the reload takes and both upstreams serve from it.
    let two = json!({"generation": 2, "upstreams": {
        "app": {"balance": "round_robin", "servers": servers(&[lua.addr("a")])},
        "app2": {"balance": "round_robin", "servers": servers(&[lua.addr("b")])},
    }});
    std::fs::write(lua.lua_dir().join("snapshot.json"), two.to_string()).unwrap();
    nix::sys::signal::kill(lua.nginx.master(), nix::sys::signal::SIGHUP).unwrap();
    wait_for("new workers", Duration::from_secs(5), || {
        lua.nginx.wait_for_workers().is_disjoint(&workers)
    });
    let status = lua.status();
    assert_eq!(
        (&status["source"], &status["generation"]),
        (&json!("snapshot"), &json!(2))
    );
    assert_eq!(
        (lua.served("/"), lua.served("/two")),
        ("a".into(), "b".into())
    );
}
