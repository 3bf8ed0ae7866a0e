//! A Lua-mode nginx for the tests of `apply = "lua"`: templates/upstream-lua.conf.j2 rendered
//! as the daemon renders it, lua/upstreamd/*.lua and a secret in their own directory, the
//! update server on a free loopback port, and tiny backends in the same nginx.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::{free_port, http_exchange, wait_for, Nginx, NginxMain};

/// The shared secret of every test nginx.
pub const SECRET: &str = "5f3c0a9d2b7e41c8a6f0e3d9b2c7a1e4";

/// One upstream shell as the template reads it.
pub fn shell(name: &str, balance: &str, hash_key: &str) -> Value {
    json!({"name": name, "balance": balance, "hash_key": hash_key, "keepalive": 4,
           "affinity_cookie": "aff"})
}

/// A Lua-mode nginx: the rendered include, the Lua files and secret in their own directory,
/// the update server on a free loopback port, and tiny backends (server blocks of the same
/// nginx answering `backend NAME`) on free ports.
pub struct Lua {
    /// The nginx.
    pub nginx: Nginx,
    /// Holds `lua/` (lua_dir) and `lua.secret`.
    pub files: tempfile::TempDir,
    /// The update server's address.
    pub update: String,
    /// Backend name → address.
    pub backends: BTreeMap<String, String>,
}

impl Lua {
    /// Starts it with `shells` (see [`shell`]), backends named `names`, `workers` workers and
    /// `locations` (the site's location blocks); `snapshot`, if any, as snapshot.json.
    pub fn start(
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
        let include = render(shells, &settings(files.path(), &update));
        let backends: BTreeMap<String, String> = names
            .iter()
            .map(|n| (n.to_string(), format!("127.0.0.1:{}", free_port())))
            .collect();
        let servers: String = backends
            .iter()
            .map(|(n, a)| {
                // The connection's request count first: keepalive shows as counts above 1.
                format!(
                    "server {{ listen {a}; location / {{ return 200 \"$connection_requests backend {n}\\n\"; }} }}\n  "
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

    /// Renders the include again for `shells` (same settings) into nginx's include file.
    pub fn reshell(&self, shells: &[Value]) {
        let text = render(shells, &settings(self.files.path(), &self.update));
        std::fs::write(self.nginx.output(), text).unwrap();
    }

    /// `lua_dir`: the Lua modules and snapshot.json.
    pub fn lua_dir(&self) -> PathBuf {
        self.files.path().join("lua")
    }

    /// A backend's address.
    pub fn addr(&self, name: &str) -> &str {
        &self.backends[name]
    }

    /// POST /upstreamd/update with `auth` (a whole header line, or none): (status, JSON body).
    pub fn push_with(&self, auth: Option<&str>, body: &str) -> (u16, Value) {
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
    pub fn push(&self, body: &Value) -> (u16, Value) {
        self.push_with(
            Some(&format!("Authorization: Bearer {SECRET}")),
            &body.to_string(),
        )
    }

    /// GET /upstreamd/status with the right secret.
    pub fn status(&self) -> Value {
        let (code, text) = update_status(&self.update, SECRET);
        assert_eq!(code, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    /// Waits until every current worker reports generation `gen` or later.
    pub fn wait_generation(&self, gen: u64) {
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
    pub fn served(&self, path: &str) -> String {
        match self.nginx.get(path) {
            Some((200, body)) => body.split_whitespace().last().unwrap_or("").to_owned(),
            Some((status, _)) => format!("status {status}"),
            None => "error".to_owned(),
        }
    }
}

/// The template's `lua` settings for files in `dir` and the update server on `listen`.
fn settings(dir: &Path, listen: &str) -> Value {
    json!({"listen": listen, "secret_file": dir.join("lua.secret"), "lua_dir": dir.join("lua"),
           "dict_size": "4m"})
}

/// Renders templates/upstream-lua.conf.j2 as the daemon does (minijinja, trim and lstrip
/// blocks, undefined is an error).
pub fn render(upstreams: &[Value], lua: &Value) -> String {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.add_template(
        "upstream-lua.conf.j2",
        include_str!("../../../templates/upstream-lua.conf.j2"),
    )
    .unwrap();
    env.get_template("upstream-lua.conf.j2")
        .unwrap()
        .render(minijinja::context! { upstreams => upstreams, lua => lua })
        .unwrap()
}

/// A push body for one upstream `app` with `balance` and `servers`.
pub fn body(generation: u64, name: &str, balance: &str, servers: Value) -> Value {
    json!({"generation": generation, "upstreams": {name: {"balance": balance, "servers": servers}}})
}

/// Servers at these addresses, weight 1.
pub fn servers(addrs: &[&str]) -> Value {
    Value::Array(
        addrs
            .iter()
            .map(|a| json!({"address": a, "weight": 1}))
            .collect(),
    )
}

/// The site of [`round_robin`]: `/` through upstream `app`, keepalive, retries on errors.
pub const APP: &str = "location / { proxy_pass http://app; proxy_http_version 1.1; \
                   proxy_set_header Connection \"\"; proxy_next_upstream error timeout; \
                   proxy_connect_timeout 1s; proxy_read_timeout 5s; }";

/// A Lua nginx with one round-robin upstream `app` and backends `names`.
pub fn round_robin(names: &[&str], workers: u32) -> Lua {
    Lua::start(
        &[shell("app", "round_robin", "")],
        names,
        workers,
        APP,
        None,
    )
}

/// Sends `path` with `X-Real-IP: ip` (both nginxes take the client address from it).
pub fn served_for(port: u16, path: &str, ip: &str) -> String {
    let header = format!("X-Real-IP: {ip}");
    match http_exchange(
        &format!("127.0.0.1:{port}"),
        "GET",
        path,
        &[&header],
        "",
        Duration::from_secs(5),
    ) {
        Some((200, _, text)) => text.split_whitespace().last().unwrap().to_owned(),
        other => panic!("{other:?}"),
    }
}

/// GET /upstreamd/status from the update server at `update` with `secret`: (status code, body).
pub fn update_status(update: &str, secret: &str) -> (u16, String) {
    let auth = format!("Authorization: Bearer {secret}");
    let (code, _, text) = http_exchange(
        update,
        "GET",
        "/upstreamd/status",
        &[&auth],
        "",
        Duration::from_secs(5),
    )
    .expect("the status location answers");
    (code, text)
}
