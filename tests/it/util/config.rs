//! A typed builder for test configs: a test says which sections and keys it sets, and
//! [`Config::to_toml`] writes the file, instead of editing TOML text with `.replace`.
//!
//! ```ignore
//! let cfg = Config::static_list(&nginx, "kotaemon", &[&alpha, &bravo])
//!     .nginx("confirm_timeout", "1s")
//!     .health("fall", 6)
//!     .admin_port0()
//!     .to_toml();
//! ```

use std::path::Path;

use toml::Value;

use super::{Nginx, Replica};

/// The `key = value` lines of one TOML table, in the order first set.
#[derive(Clone, Debug, Default)]
struct Table(Vec<(String, Value)>);

impl Table {
    /// Sets `key`, in place when already set.
    fn set(&mut self, key: &str, value: Value) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.0.push((key.to_owned(), value)),
        }
    }

    /// Appends `header` and the table's lines to `out`.
    fn write(&self, header: &str, out: &mut String) {
        out.push_str(header);
        out.push('\n');
        for (key, value) in &self.0 {
            out.push_str(&format!("{key} = {value}\n"));
        }
        out.push('\n');
    }
}

/// A path as a TOML string.
fn path(p: &Path) -> Value {
    Value::String(p.display().to_string())
}

/// A whole upstreamd config: `[nginx]`, an optional `[admin]`, and the upstreams.
#[derive(Clone, Debug)]
pub struct Config {
    nginx: Table,
    admin: Option<Table>,
    upstreams: Vec<Upstream>,
}

impl Config {
    /// `[nginx]` for the harness's private `nginx` (its output, pid file and `nginx -t`), with
    /// the fast `settle = "50ms"` and `min_reload_interval = "100ms"`, and no upstream yet.
    pub fn new(nginx: &Nginx) -> Self {
        let mut t = Table::default();
        t.set("output", path(&nginx.output()));
        t.set("pid_file", path(&nginx.pid_file()));
        let test: Vec<Value> = nginx
            .command(&["-t", "-q"])
            .into_iter()
            .map(Value::String)
            .collect();
        t.set("test_command", Value::Array(test));
        t.set("settle", "50ms".into());
        t.set("min_reload_interval", "100ms".into());
        Self {
            nginx: t,
            admin: None,
            upstreams: Vec::new(),
        }
    }

    /// [`Config::new`] with one upstream `name` over `replicas` (a static list), probed fast
    /// on `/queue/status` ([`Upstream::probe`]).
    pub fn static_list(nginx: &Nginx, name: &str, replicas: &[&Replica]) -> Self {
        let addrs: Vec<&str> = replicas.iter().map(|r| r.addr.as_str()).collect();
        Self::new(nginx).upstream(
            Upstream::new(name)
                .probe("/queue/status")
                .static_servers(&addrs),
        )
    }

    /// Sets `key` under `[nginx]`.
    pub fn nginx(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.nginx.set(key, value.into());
        self
    }

    /// Sets a path (`template`, `state_dir`, `error_log`, …) under `[nginx]`.
    pub fn nginx_path(self, key: &str, value: &Path) -> Self {
        self.nginx(key, path(value))
    }

    /// `[admin] listen = "127.0.0.1:0"`: the kernel picks the port, [`super::Daemon::admin`]
    /// reads it from the daemon's log.
    pub fn admin_port0(self) -> Self {
        self.admin("listen", "127.0.0.1:0")
    }

    /// Sets `key` under `[admin]`.
    pub fn admin(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.admin
            .get_or_insert_with(Table::default)
            .set(key, value.into());
        self
    }

    /// Adds an upstream.
    pub fn upstream(mut self, upstream: Upstream) -> Self {
        self.upstreams.push(upstream);
        self
    }

    /// Changes the last upstream added.
    fn last(&mut self) -> &mut Upstream {
        self.upstreams.last_mut().expect("an upstream to change")
    }

    /// Sets `key` of the last upstream (`balance`, `shrink_hold`, …).
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.last().top.set(key, value.into());
        self
    }

    /// Sets `key` under the last upstream's `[upstream.health]`.
    pub fn health(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.last().health.set(key, value.into());
        self
    }

    /// Sets `key` of the last upstream's last source.
    pub fn source(mut self, key: &str, value: impl Into<Value>) -> Self {
        let u = std::mem::replace(self.last(), Upstream::new(""));
        *self.last() = u.source_key(key, value);
        self
    }

    /// The config file's text.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        self.nginx.write("[nginx]", &mut out);
        if let Some(admin) = &self.admin {
            admin.write("[admin]", &mut out);
        }
        for u in &self.upstreams {
            u.top.write("[[upstream]]", &mut out);
            u.health.write("[upstream.health]", &mut out);
            for s in &u.sources {
                s.write("[[upstream.source]]", &mut out);
            }
        }
        out
    }
}

/// One `[[upstream]]` with its health section and sources.
#[derive(Clone, Debug)]
pub struct Upstream {
    top: Table,
    health: Table,
    sources: Vec<Table>,
}

impl Upstream {
    /// Upstream `name`, health checks off until [`Upstream::probe`], no source yet.
    pub fn new(name: &str) -> Self {
        let mut top = Table::default();
        top.set("name", name.into());
        let mut health = Table::default();
        health.set("enabled", false.into());
        Self {
            top,
            health,
            sources: Vec::new(),
        }
    }

    /// Fast probes on `path`: every 200 ms, 150 ms timeout, rise 2, fall 2.
    pub fn probe(mut self, path: &str) -> Self {
        self.health = Table::default();
        self.health.set("path", path.into());
        self.health.set("interval", "200ms".into());
        self.health.set("timeout", "150ms".into());
        self.health.set("rise", 2.into());
        self.health.set("fall", 2.into());
        self
    }

    /// Sets `key` of the upstream.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.top.set(key, value.into());
        self
    }

    /// Adds a static source listing `servers`.
    pub fn static_servers(self, servers: &[&str]) -> Self {
        let list: Vec<Value> = servers.iter().map(|s| (*s).into()).collect();
        self.source(&[("kind", "static".into()), ("servers", Value::Array(list))])
    }

    /// Adds a Consul source for `service` at `url`, blocking queries of `wait`.
    pub fn consul(self, url: &str, service: &str, wait: &str) -> Self {
        self.source(&[
            ("kind", "consul".into()),
            ("url", url.into()),
            ("service", service.into()),
            ("wait", wait.into()),
        ])
    }

    /// Adds an etcd source for the keys under `prefix` at `endpoint`.
    pub fn etcd(self, endpoint: &str, prefix: &str) -> Self {
        self.source(&[
            ("kind", "etcd".into()),
            ("endpoints", Value::Array(vec![endpoint.into()])),
            ("prefix", prefix.into()),
        ])
    }

    /// Adds an etcd source as [`Upstream::etcd`], with 1 s connect and request timeouts (a
    /// killed etcd is noticed fast).
    pub fn etcd_1s(self, endpoint: &str, prefix: &str) -> Self {
        let u = self.etcd(endpoint, prefix);
        u.source_key("connect_timeout", "1s")
            .source_key("request_timeout", "1s")
    }

    /// Sets `key` of the last source added.
    pub fn source_key(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.sources
            .last_mut()
            .expect("a source to change")
            .set(key, value.into());
        self
    }

    /// Adds a source with these keys.
    fn source(mut self, keys: &[(&str, Value)]) -> Self {
        let mut t = Table::default();
        for (k, v) in keys {
            t.set(k, v.clone());
        }
        self.sources.push(t);
        self
    }
}
