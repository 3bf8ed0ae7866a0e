//! The Lua balancer of `apply = "lua"` (lua/upstreamd/*.lua, templates/upstream-lua.conf.j2)
//! in Debian's real nginx with its Lua modules, driven by hand-built pushes: traffic moves with
//! no reload; wrong secrets, stale generations and hostile values change nothing; a restarted
//! nginx serves from snapshot.json; backup, retries, nginx's consistent hash and sticky
//! affinity behave as in reload mode.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const SECRET: &str = "5f3c0a9d2b7e41c8a6f0e3d9b2c7a1e4";

/// One upstream shell as the template reads it.
fn shell(name: &str, balance: &str, hash_key: &str) -> Value {
    json!({"name": name, "balance": balance, "hash_key": hash_key, "keepalive": 4,
           "affinity_cookie": "aff"})
}

/// A Lua-mode nginx: the rendered include, the Lua files and secret in their own directory,
/// the update server on a free loopback port, and tiny backends (server blocks of the same
/// nginx answering `backend NAME`) on free ports.
struct Lua {
    nginx: Nginx,
    files: tempfile::TempDir,
    update: String,
    backends: BTreeMap<String, String>,
}

impl Lua {
    /// Starts it with `shells` (see [`shell`]), backends named `names`, `workers` workers and
    /// `locations` (the site's location blocks); `snapshot`, if any, as snapshot.json.
    fn start(
        shells: &[Value],
        names: &[&str],
        workers: u32,
        locations: &str,
        snapshot: Option<&Value>,
    ) -> Self {
        let files = tempfile::tempdir().unwrap();
        let lua_dir = files.path().join("lua");
        std::fs::create_dir_all(lua_dir.join("upstreamd")).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("lua/upstreamd");
        for entry in std::fs::read_dir(src).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(
                &path,
                lua_dir.join("upstreamd").join(path.file_name().unwrap()),
            )
            .unwrap();
        }
        let secret_file = files.path().join("lua.secret");
        std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
        if let Some(s) = snapshot {
            std::fs::write(lua_dir.join("snapshot.json"), s.to_string()).unwrap();
        }
        let update = format!("127.0.0.1:{}", free_port());
        let include = render(
            shells,
            &json!({"listen": update, "secret_file": secret_file, "lua_dir": lua_dir,
                    "dict_size": "4m"}),
        );
        let backends: BTreeMap<String, String> = names
            .iter()
            .map(|n| (n.to_string(), format!("127.0.0.1:{}", free_port())))
            .collect();
        let servers: String = backends
            .iter()
            .map(|(n, a)| {
                format!(
                    "server {{ listen {a}; location / {{ return 200 \"backend {n}\\n\"; }} }}\n  "
                )
            })
            .collect();
        let locations = locations.to_owned();
        let nginx = Nginx::start_main(&NginxMain { lua: true, workers }, &include, &move |port| {
            format!("server {{\n    listen 127.0.0.1:{port};\n    {locations}\n  }}\n  {servers}")
        });
        let lua = Lua {
            nginx,
            files,
            update,
            backends,
        };
        wait_for("the update server", Duration::from_secs(5), || {
            std::net::TcpStream::connect(&lua.update).is_ok()
        });
        lua
    }

    fn lua_dir(&self) -> PathBuf {
        self.files.path().join("lua")
    }

    /// A backend's address.
    fn addr(&self, name: &str) -> &str {
        &self.backends[name]
    }

    /// POST /upstreamd/update with `auth` (a whole header line, or none): (status, JSON body).
    fn push_with(&self, auth: Option<&str>, body: &str) -> (u16, Value) {
        let headers: Vec<&str> = auth.into_iter().collect();
        let (status, _, text) = http_exchange(
            &self.update,
            "POST",
            "/upstreamd/update",
            &headers,
            body,
            Duration::from_secs(5),
        )
        .expect("the update server answers");
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    /// Pushes `body` with the right secret.
    fn push(&self, body: &Value) -> (u16, Value) {
        self.push_with(
            Some(&format!("Authorization: Bearer {SECRET}")),
            &body.to_string(),
        )
    }

    /// GET /upstreamd/status with the right secret.
    fn status(&self) -> Value {
        let auth = format!("Authorization: Bearer {SECRET}");
        let (code, _, text) = http_exchange(
            &self.update,
            "GET",
            "/upstreamd/status",
            &[&auth],
            "",
            Duration::from_secs(5),
        )
        .expect("the status location answers");
        assert_eq!(code, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    /// Waits until every current worker reports generation `gen` or later.
    fn wait_generation(&self, gen: u64) {
        wait_for(
            &format!("every worker to hold generation {gen}"),
            Duration::from_secs(5),
            || {
                let status = self.status();
                let workers: BTreeSet<String> = self
                    .nginx
                    .wait_for_workers()
                    .iter()
                    .map(|p| p.to_string())
                    .collect();
                workers.iter().all(|pid| {
                    status["workers"][pid]
                        .as_u64()
                        .is_some_and(|held| held >= gen)
                })
            },
        );
    }

    /// Which backend answers `path` (its name, or `status N`, or `error`).
    fn served(&self, path: &str) -> String {
        match self.nginx.get(path) {
            Some((200, body)) => body.split_whitespace().last().unwrap_or("").to_owned(),
            Some((status, _)) => format!("status {status}"),
            None => "error".to_owned(),
        }
    }
}

/// Renders templates/upstream-lua.conf.j2 as the daemon does (minijinja, trim and lstrip
/// blocks, undefined is an error).
fn render(upstreams: &[Value], lua: &Value) -> String {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.add_template(
        "upstream-lua.conf.j2",
        include_str!("../templates/upstream-lua.conf.j2"),
    )
    .unwrap();
    env.get_template("upstream-lua.conf.j2")
        .unwrap()
        .render(minijinja::context! { upstreams => upstreams, lua => lua })
        .unwrap()
}

/// A push body for one upstream `app` with `balance` and `servers`.
fn body(generation: u64, name: &str, balance: &str, servers: Value) -> Value {
    json!({"generation": generation, "upstreams": {name: {"balance": balance, "servers": servers}}})
}

/// Servers at these addresses, weight 1.
fn servers(addrs: &[&str]) -> Value {
    Value::Array(
        addrs
            .iter()
            .map(|a| json!({"address": a, "weight": 1}))
            .collect(),
    )
}

const APP: &str = "location / { proxy_pass http://app; proxy_http_version 1.1; \
                   proxy_set_header Connection \"\"; proxy_next_upstream error timeout; \
                   proxy_connect_timeout 1s; proxy_read_timeout 5s; }";

fn round_robin(names: &[&str], workers: u32) -> Lua {
    Lua::start(
        &[shell("app", "round_robin", "")],
        names,
        workers,
        APP,
        None,
    )
}

#[test]
fn pushes_move_traffic_between_workers_without_a_reload() {
    let lua = round_robin(&["a", "b", "c"], 2);
    let _report = report_on_failure(&lua.nginx);
    let workers = lua.nginx.wait_for_workers();
    assert_eq!(lua.status()["source"], "none");
    assert_eq!(
        lua.nginx.spread(4),
        BTreeMap::from([("status 502".into(), 4)])
    );

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
    let lua = round_robin(&["a", "b"], 1);
    let _report = report_on_failure(&lua.nginx);
    assert_eq!(
        lua.push(&body(1, "app", "round_robin", servers(&[lua.addr("a")])))
            .0,
        200
    );
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
    let lua = round_robin(&["a", "b"], 1);
    let _report = report_on_failure(&lua.nginx);
    assert_eq!(
        lua.push(&body(1, "app", "round_robin", servers(&[lua.addr("a")])))
            .0,
        200
    );
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
    assert!(lua.nginx.error_log().contains("Connection refused"));
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
