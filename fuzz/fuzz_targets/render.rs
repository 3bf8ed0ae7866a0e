//! The renderer fed from structured input: upstream names, hash keys and cookie names through
//! the config loader, addresses through `Address`'s parser, attributes through
//! `ServerAttrs::set`, several upstreams, every balancing method and health verdict; the
//! file's shape is checked.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use upstreamd::config;
use upstreamd::model::{Address, Endpoint, ServerAttrs};
use upstreamd_fuzz::{render_and_check, static_endpoints, BALANCES};

#[derive(Debug, Arbitrary)]
enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Null,
}

#[derive(Debug, Arbitrary)]
struct Server {
    address: String,
    attrs: Vec<(u8, String, Value)>,
}

#[derive(Debug, Arbitrary)]
struct Upstream {
    name: String,
    balance: u8,
    hash_key: String,
    cookie: String,
    keepalive: u16,
    fail_closed: bool,
    servers: Vec<Server>,
}

const ATTRS: [&str; 5] = ["weight", "max_fails", "fail_timeout", "backup", "down"];

fn json(v: &Value) -> serde_json::Value {
    match v {
        Value::Int(i) => (*i).into(),
        Value::Float(f) => (*f).into(),
        Value::Bool(b) => (*b).into(),
        Value::Str(s) => s.clone().into(),
        Value::Null => serde_json::Value::Null,
    }
}

/// The upstream's settings through the real loader, one placeholder server.
fn load(u: &Upstream) -> Option<config::UpstreamConfig> {
    let mut root = toml::Table::new();
    let mut nginx = toml::Table::new();
    nginx.insert("output".into(), "/tmp/x.conf".into());
    root.insert("nginx".into(), nginx.into());
    let mut t = toml::Table::new();
    t.insert("name".into(), u.name.clone().into());
    t.insert(
        "balance".into(),
        BALANCES[usize::from(u.balance) % BALANCES.len()].into(),
    );
    t.insert("hash_key".into(), u.hash_key.clone().into());
    t.insert("affinity_cookie".into(), u.cookie.clone().into());
    t.insert("keepalive".into(), i64::from(u.keepalive).into());
    t.insert(
        "on_all_unhealthy".into(),
        if u.fail_closed {
            "fail_closed"
        } else {
            "fail_open"
        }
        .into(),
    );
    let mut source = toml::Table::new();
    source.insert("kind".into(), "static".into());
    source.insert(
        "servers".into(),
        vec![toml::Value::from("127.0.0.1:1")].into(),
    );
    t.insert("source".into(), vec![toml::Value::from(source)].into());
    root.insert("upstream".into(), vec![toml::Value::from(t)].into());
    let text = toml::to_string(&root).ok()?;
    config::parse(&text, &|_| None).ok()?.upstreams.pop()
}

fuzz_target!(|input: (u8, Vec<Upstream>)| {
    let (seed, upstreams) = input;
    let mut names = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for u in &upstreams {
        let Some(cfg) = load(u) else { continue };
        if !names.insert(cfg.name.clone()) {
            continue;
        }
        let mut endpoints = if u.servers.is_empty() {
            static_endpoints(&cfg)
        } else {
            Vec::new()
        };
        for s in &u.servers {
            let Ok(address) = s.address.parse::<Address>() else {
                continue;
            };
            let mut attrs = ServerAttrs::default();
            for (pick, other, v) in &s.attrs {
                let key = if pick % 8 < 5 {
                    ATTRS[usize::from(pick % 8)]
                } else {
                    other
                };
                // A refused attribute leaves the rest as they were.
                let _ = attrs.set(key, &json(v));
            }
            endpoints.push(Endpoint {
                attrs,
                ..Endpoint::plain(address, "fuzz")
            });
        }
        out.push((cfg, endpoints));
    }
    render_and_check(&out, seed);
});
