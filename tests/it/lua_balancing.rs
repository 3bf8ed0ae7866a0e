//! How the Lua balancer (`apply = "lua"`) picks peers, in Debian's real nginx: weights, backup,
//! retries and passive failures, keepalive, and nginx's own `hash ... consistent` and `ip_hash`
//! (compared key by key with a reload-mode nginx), sticky affinity and least_conn.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::util::lua::*;
use crate::util::*;
use serde_json::{json, Value};

#[test]
fn backups_serve_only_while_no_primary_can() {
    let lua = round_robin(&["a", "b", "c"], 1);
    let _report = report_on_failure(&lua.nginx);
    let dead = format!("127.0.0.1:{}", free_port());
    let list = |a_down: bool, b_down: bool| {
        json!([
            {"address": lua.addr("a"), "weight": 3, "down": a_down},
            {"address": lua.addr("b"), "weight": 1, "down": b_down},
            {"address": lua.addr("c"), "weight": 1, "backup": true},
        ])
    };
    assert_eq!(
        lua.push(&body(1, "app", "round_robin", list(false, false)))
            .0,
        200
    );
    assert_eq!(
        lua.nginx.spread(40),
        BTreeMap::from([("a".into(), 30), ("b".into(), 10)]),
        "weights as nginx's smooth round robin, no backup"
    );
    assert_eq!(
        lua.push(&body(2, "app", "round_robin", list(true, false)))
            .0,
        200
    );
    assert_eq!(lua.nginx.spread(6), BTreeMap::from([("b".into(), 6)]));
    assert_eq!(
        lua.push(&body(3, "app", "round_robin", list(true, true))).0,
        200
    );
    assert_eq!(lua.nginx.spread(6), BTreeMap::from([("c".into(), 6)]));
    // A primary that refuses connections: each request retries on the backup.
    let refusing = json!([
        {"address": dead, "max_fails": 0},
        {"address": lua.addr("c"), "backup": true},
    ]);
    assert_eq!(lua.push(&body(4, "app", "round_robin", refusing)).0, 200);
    assert_eq!(lua.nginx.spread(6), BTreeMap::from([("c".into(), 6)]));
}

#[test]
fn retries_reach_the_next_peer_when_one_refuses_connections() {
    let lua = round_robin(&["a", "b"], 1);
    let _report = report_on_failure(&lua.nginx);
    let dead1 = format!("127.0.0.1:{}", free_port());
    let dead2 = format!("127.0.0.1:{}", free_port());
    // max_fails = 0: never marked failed, so every round meets the refusing peers again.
    let list = json!([
        {"address": dead1, "max_fails": 0},
        {"address": lua.addr("a"), "max_fails": 0},
        {"address": dead2, "max_fails": 0},
    ]);
    assert_eq!(lua.push(&body(1, "app", "round_robin", list)).0, 200);
    assert_eq!(lua.nginx.spread(12), BTreeMap::from([("a".into(), 12)]));
    let refused = || lua.nginx.error_log().matches("Connection refused").count();
    assert!(refused() >= 12, "both refusing peers were tried");

    // max_fails = 1 (nginx's default): one refusal takes a peer out for fail_timeout.
    let dead3 = format!("127.0.0.1:{}", free_port());
    let list = json!([
        {"address": dead3, "max_fails": 1, "fail_timeout": 60},
        {"address": lua.addr("a")},
    ]);
    assert_eq!(lua.push(&body(2, "app", "round_robin", list)).0, 200);
    let before = refused();
    assert_eq!(lua.nginx.spread(12), BTreeMap::from([("a".into(), 12)]));
    assert_eq!(refused() - before, 1, "tried once, then skipped");
    assert!(lua
        .nginx
        .error_log()
        .contains("upstream server temporarily disabled"));
}

#[test]
fn hash_lands_each_key_where_nginx_hash_consistent_does() {
    let names = ["a", "b", "c", "d", "e"];
    let lua = Lua::start(
        &[shell("h", "hash", "$arg_k")],
        &names,
        1,
        "location / { proxy_pass http://h; }",
        None,
    );
    let _report = report_on_failure(&lua.nginx);
    // Weights and a down server change the ring: both sides must agree on them too.
    let list = json!([
        {"address": lua.addr("a"), "weight": 1},
        {"address": lua.addr("b"), "weight": 2},
        {"address": lua.addr("c"), "weight": 1, "down": true},
        {"address": lua.addr("d"), "weight": 1},
        {"address": lua.addr("e"), "weight": 3},
    ]);
    assert_eq!(lua.push(&body(1, "h", "hash", list)).0, 200);
    let reload_mode = format!(
        "upstream h {{\n  hash $arg_k consistent;\n  server {} weight=1;\n  server {} weight=2;\n  \
         server {} weight=1 down;\n  server {} weight=1;\n  server {} weight=3;\n}}\n",
        lua.addr("a"),
        lua.addr("b"),
        lua.addr("c"),
        lua.addr("d"),
        lua.addr("e")
    );
    let nginx = Nginx::start_site(&reload_mode, &|port| {
        format!("server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://h; }} }}")
    });
    let mut used = BTreeSet::new();
    for k in 0..200 {
        let path = format!("/?k=key-{k}");
        let want = match nginx.get(&path) {
            Some((200, body)) => body.split_whitespace().last().unwrap().to_owned(),
            other => panic!("reload-mode nginx: {other:?}"),
        };
        assert_eq!(lua.served(&path), want, "key-{k}");
        used.insert(want);
    }
    assert_eq!(
        used.len(),
        4,
        "every server that is up takes keys: {used:?}"
    );
}

#[test]
fn sticky_keeps_a_client_on_its_replica_and_moves_it_when_the_replica_leaves() {
    let site = "location / { proxy_pass http://$s_affinity_route; \
                add_header Set-Cookie $s_affinity_cookie always; }";
    let lua = Lua::start(&[shell("s", "sticky", "")], &["a", "b", "c"], 1, site, None);
    let _report = report_on_failure(&lua.nginx);
    let id = |n: &str| format!("{:0>16}", format!("{:x}", n.as_bytes()[0]));
    let list = |names: &[&str]| {
        Value::Array(
            names
                .iter()
                .map(|n| json!({"address": lua.addr(n), "id": id(n)}))
                .collect(),
        )
    };
    assert_eq!(
        lua.push(&body(1, "s", "sticky", list(&["a", "b", "c"]))).0,
        200
    );
    let get = |cookie: Option<&str>| {
        let header = cookie.map(|c| format!("Cookie: aff={c}"));
        let (code, head, text) = http_exchange(
            &format!("127.0.0.1:{}", lua.nginx.port),
            "GET",
            "/",
            &header.iter().map(String::as_str).collect::<Vec<_>>(),
            "",
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(code, 200, "{head}");
        let set: Vec<String> = head
            .lines()
            .filter_map(|l| l.strip_prefix("Set-Cookie: aff="))
            .map(|v| v.split(';').next().unwrap().to_owned())
            .collect();
        assert!(set.len() <= 1, "{head}");
        (
            text.trim().rsplit(' ').next().unwrap().to_owned(),
            set.into_iter().next(),
        )
    };
    // A first response sets a random value; the next one the id of the replica that served.
    let (_, random) = get(None);
    let random = random.expect("a first response sets the cookie");
    let (first, named) = get(Some(&random));
    assert_eq!(named, Some(id(&first)));
    for _ in 0..8 {
        assert_eq!(
            get(Some(&id(&first))),
            (first.clone(), None),
            "kept, cookie unchanged"
        );
    }
    let rest: Vec<&str> = ["a", "b", "c"]
        .into_iter()
        .filter(|n| *n != first)
        .collect();
    assert_eq!(lua.push(&body(2, "s", "sticky", list(&rest))).0, 200);
    let (moved, renamed) = get(Some(&id(&first)));
    assert!(rest.contains(&moved.as_str()), "{moved}");
    assert_eq!(renamed, Some(id(&moved)));
    assert_eq!(get(Some(&id(&moved))), (moved, None));
}

#[test]
fn keepalive_connections_to_the_backends_are_reused() {
    let lua = round_robin(&["a"], 1);
    let _report = report_on_failure(&lua.nginx);
    assert_eq!(
        lua.push(&body(1, "app", "round_robin", servers(&[lua.addr("a")])))
            .0,
        200
    );
    let counts: Vec<u64> = (0..6)
        .map(|_| match lua.nginx.get("/") {
            Some((200, text)) => text.split_whitespace().next().unwrap().parse().unwrap(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(
        counts.iter().any(|&n| n > 1),
        "requests share upstream connections: {counts:?}"
    );
}

#[test]
fn ip_hash_sends_each_client_where_nginx_ip_hash_does() {
    let realip = "set_real_ip_from 127.0.0.1; real_ip_header X-Real-IP;";
    let lua = Lua::start(
        &[shell("ip", "ip_hash", "")],
        &["a", "b", "c", "d"],
        1,
        &format!("{realip} location / {{ proxy_pass http://ip; }}"),
        None,
    );
    let _report = report_on_failure(&lua.nginx);
    let list = json!([
        {"address": lua.addr("a"), "weight": 2},
        {"address": lua.addr("b"), "weight": 1, "down": true},
        {"address": lua.addr("c"), "weight": 1},
        {"address": lua.addr("d"), "weight": 3},
    ]);
    assert_eq!(lua.push(&body(1, "ip", "ip_hash", list)).0, 200);
    let reload_mode = format!(
        "upstream ip {{\n  ip_hash;\n  server {} weight=2;\n  server {} down;\n  \
         server {} weight=1;\n  server {} weight=3;\n}}\n",
        lua.addr("a"),
        lua.addr("b"),
        lua.addr("c"),
        lua.addr("d"),
    );
    let nginx = Nginx::start_site(&reload_mode, &|port| {
        format!(
            "server {{ listen 127.0.0.1:{port}; {realip} location / {{ proxy_pass http://ip; }} }}"
        )
    });
    let mut used = BTreeSet::new();
    for i in 0..100u32 {
        // Addresses that differ in the first three octets (ip_hash ignores the fourth), and
        // some IPv6 ones.
        let ip = if i % 4 == 3 {
            format!("2001:db8:{i:x}::{i:x}")
        } else {
            format!("10.{}.{}.7", i / 7, i * 37 % 256)
        };
        let want = served_for(nginx.port, "/", &ip);
        assert_eq!(served_for(lua.nginx.port, "/", &ip), want, "{ip}");
        used.insert(want);
    }
    assert_eq!(
        used.len(),
        3,
        "every server that is up takes clients: {used:?}"
    );
}

#[test]
fn least_conn_and_random_serve_only_usable_servers() {
    let lua = Lua::start(
        &[shell("lc", "least_conn", ""), shell("rnd", "random", "")],
        &["a", "b", "c"],
        1,
        "location /lc { proxy_pass http://lc; } location /rnd { proxy_pass http://rnd; }",
        None,
    );
    let _report = report_on_failure(&lua.nginx);
    let list = json!([
        {"address": lua.addr("a")},
        {"address": lua.addr("b"), "down": true},
        {"address": lua.addr("c")},
    ]);
    let update = json!({"generation": 1, "upstreams": {
        "lc": {"balance": "least_conn", "servers": list},
        "rnd": {"balance": "random", "servers": list},
    }});
    assert_eq!(lua.push(&update).0, 200);
    for path in ["/lc", "/rnd"] {
        let seen: BTreeSet<String> = (0..20).map(|_| lua.served(path)).collect();
        assert_eq!(seen, BTreeSet::from(["a".into(), "c".into()]), "{path}");
    }
}

#[test]
fn least_conn_avoids_the_replica_holding_a_stream_until_it_ends() {
    let replicas = [Replica::start("r1"), Replica::start("r2")];
    let lua = Lua::start(
        &[shell("lc", "least_conn", "")],
        &[],
        1,
        "location / { proxy_pass http://lc; proxy_buffering off; proxy_read_timeout 60s; }",
        None,
    );
    let _report = report_on_failure(&lua.nginx);
    let list = servers(&[&replicas[0].addr, &replicas[1].addr]);
    assert_eq!(lua.push(&body(1, "lc", "least_conn", list)).0, 200);
    assert_eq!(lua.nginx.spread(4).len(), 2, "both serve while idle");

    // A never-ending heartbeat stream holds one replica's connection.
    let stream = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", lua.nginx.port)).unwrap();
        write!(s, "GET /heartbeat/abc HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut first = [0u8; 64];
        let n = s.read(&mut first).unwrap();
        assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
        s
    };
    let busy = lua.nginx.spread(6);
    assert_eq!(
        busy.len(),
        1,
        "every request goes to the other replica: {busy:?}"
    );

    // The stream ends: its replica takes requests again.
    drop(stream);
    lua.nginx
        .wait_spread(6, "both replicas to serve again", |seen| seen.len() == 2);
}
