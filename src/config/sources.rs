//! Parsing `[[upstream.source]]` tables: `static`, `consul` and `etcd`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use toml::Value;

use super::load::balance_name;
use super::reader::{
    choice, describe, duration_at_least, non_empty, path, string, Problems, Section,
};
use super::{Balance, ConsulSource, EtcdSource, Secret, SourceConfig, StaticSource};
use crate::model::{Address, Endpoint, ServerAttrs};

#[derive(Clone, Copy)]
enum Kind {
    Static,
    Consul,
    Etcd,
}

const KINDS: &[(&str, Kind)] = &[
    ("static", Kind::Static),
    ("consul", Kind::Consul),
    ("etcd", Kind::Etcd),
];

/// The keys of each kind, to explain a key written on a source of another kind.
pub(super) const KIND_KEYS: &[(&str, &[&str])] = &[
    ("static", &["servers"]),
    (
        "consul",
        &[
            "url",
            "service",
            "tags",
            "datacenter",
            "wait",
            "token_file",
            "ca_file",
        ],
    ),
    (
        "etcd",
        &[
            "endpoints",
            "prefix",
            "username",
            "password_file",
            "ca_file",
            "cert_file",
            "key_file",
            "connect_timeout",
            "request_timeout",
        ],
    ),
];

/// One `[[upstream.source]]`; `balance` (when valid) decides whether `backup` servers are allowed.
pub(super) fn source(
    mut s: Section<'_>,
    balance: Option<Balance>,
    env: &dyn Fn(&str) -> Option<String>,
    p: &mut Problems,
) -> Option<SourceConfig> {
    // Without a valid kind the other keys cannot be judged: report the kind alone.
    let kind = s.require("kind", p, choice(KINDS))?;
    let (config, kind_name) = match kind {
        Kind::Static => (
            static_source(&mut s, balance, p).map(SourceConfig::Static),
            "static",
        ),
        Kind::Consul => (
            consul_source(&mut s, env, p).map(SourceConfig::Consul),
            "consul",
        ),
        Kind::Etcd => (etcd_source(&mut s, p).map(SourceConfig::Etcd), "etcd"),
    };
    s.finish_with(p, |key| {
        let owners: Vec<String> = KIND_KEYS
            .iter()
            .filter(|(k, keys)| *k != kind_name && keys.contains(&key))
            .map(|(k, _)| format!("\"{k}\""))
            .collect();
        (!owners.is_empty()).then(|| {
            format!(
                "it belongs to kind = {}, not \"{kind_name}\"",
                owners.join(" or ")
            )
        })
    });
    config
}

fn static_source(
    s: &mut Section<'_>,
    balance: Option<Balance>,
    p: &mut Problems,
) -> Option<StaticSource> {
    s.expect("servers", p);
    let items = s.items("servers", p)?;
    if items.is_empty() {
        p.add(&s.key_path("servers"), "must list at least one server");
    }
    let mut servers = Vec::with_capacity(items.len());
    let mut first_seen: BTreeMap<Address, String> = BTreeMap::new();
    let mut complete = true;
    for (i, (item_path, v)) in items.into_iter().enumerate() {
        let origin = format!("servers[{i}]");
        let endpoint = match v {
            Value::String(text) => match text.parse::<Address>() {
                Ok(address) => Some(Endpoint::plain(address, origin)),
                Err(e) => {
                    p.add(&item_path, e.to_string());
                    None
                }
            },
            Value::Table(t) => {
                server_table(Section::nested(t, item_path.clone()), origin, balance, p)
            }
            other => {
                p.add(
                    &item_path,
                    format!(
                        "expected \"host:port\" or a table with `address`, found {}",
                        describe(other)
                    ),
                );
                None
            }
        };
        let Some(endpoint) = endpoint else {
            complete = false;
            continue;
        };
        match first_seen.get(&endpoint.address) {
            Some(first) => p.add(
                &item_path,
                format!("address {} is already listed at {first}", endpoint.address),
            ),
            None => {
                first_seen.insert(endpoint.address.clone(), endpoint.origin.clone());
            }
        }
        servers.push(endpoint);
    }
    complete.then_some(StaticSource { servers })
}

/// `{ address = "…", weight = 3, backup = true, … }`.
fn server_table(
    mut s: Section<'_>,
    origin: String,
    balance: Option<Balance>,
    p: &mut Problems,
) -> Option<Endpoint> {
    let address = s.require("address", p, |v| {
        string(v)?.parse::<Address>().map_err(|e| e.to_string())
    });
    let mut attrs = ServerAttrs::default();
    let mut valid = true;
    for key in ["weight", "max_fails", "fail_timeout", "backup", "down"] {
        if let Some(v) = s.value(key) {
            if let Err(e) = attrs.set(key, &to_json(v)) {
                p.add(&s.key_path(key), e.to_string());
                valid = false;
            }
        }
    }
    if let Some(b) = balance.filter(|b| attrs.backup && b.forbids_backup()) {
        p.add(
            &s.key_path("backup"),
            format!(
                "nginx refuses backup servers with balance = \"{}\"",
                balance_name(b)
            ),
        );
    }
    s.finish(p);
    let address = address?;
    valid.then(|| Endpoint {
        attrs,
        ..Endpoint::plain(address, origin)
    })
}

/// The JSON form `ServerAttrs::set` validates (it also reads Consul and etcd values).
fn to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::String(s) => serde_json::Value::String(s.clone()),
        Value::Integer(i) => serde_json::Value::from(*i),
        Value::Float(f) => serde_json::Value::from(*f),
        Value::Boolean(b) => serde_json::Value::Bool(*b),
        Value::Datetime(d) => serde_json::Value::String(d.to_string()),
        Value::Array(a) => serde_json::Value::Array(a.iter().map(to_json).collect()),
        Value::Table(t) => {
            serde_json::Value::Object(t.iter().map(|(k, v)| (k.clone(), to_json(v))).collect())
        }
    }
}

fn consul_source(
    s: &mut Section<'_>,
    env: &dyn Fn(&str) -> Option<String>,
    p: &mut Problems,
) -> Option<ConsulSource> {
    let url_given = s.has("url");
    let url = s.get("url", p, |v| consul_url(&string(v)?));
    let url = if url_given {
        url
    } else {
        consul_url_from_env(env, &s.key_path("url"), p)
    };
    let service = s.require("service", p, registry_name);
    let tags = s.list("tags", p, registry_name).unwrap_or_default();
    let datacenter = s.get("datacenter", p, registry_name);
    let wait = s
        .get("wait", p, |v| {
            let d = duration_at_least(Duration::from_secs(1))(v)?;
            if d > Duration::from_secs(600) {
                return Err(
                    "must be at most 10m (Consul caps blocking queries at 10 minutes)".into(),
                );
            }
            Ok(d)
        })
        .unwrap_or(Duration::from_secs(60));
    let token = if s.has("token_file") {
        let file = s.get("token_file", p, path);
        file.and_then(|f| {
            read_secret(&f)
                .map_err(|e| p.add(&s.key_path("token_file"), e))
                .ok()
        })
    } else {
        s.value("token_file");
        env("CONSUL_HTTP_TOKEN")
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .map(Secret)
    };
    let ca_file = s.get("ca_file", p, path);
    Some(ConsulSource {
        url: url?,
        service: service?,
        tags,
        datacenter,
        wait,
        token,
        ca_file,
    })
}

/// `$CONSUL_HTTP_ADDR` (`http://` added when it has no scheme), else the local agent.
fn consul_url_from_env(
    env: &dyn Fn(&str) -> Option<String>,
    key_path: &str,
    p: &mut Problems,
) -> Option<String> {
    let Some(addr) = env("CONSUL_HTTP_ADDR")
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty())
    else {
        return Some("http://127.0.0.1:8500".into());
    };
    consul_url(&addr)
        .map_err(|e| p.add(key_path, format!("from $CONSUL_HTTP_ADDR ({addr:?}): {e}")))
        .ok()
}

/// A Consul address: a base URL, or a bare `host:port` (the usual `CONSUL_HTTP_ADDR` form),
/// which means `http://`.
fn consul_url(addr: &str) -> Result<String, String> {
    if addr.contains("://") {
        http_url(addr)
    } else {
        http_url(&format!("http://{addr}"))
    }
}

/// An `http://` or `https://` base URL, without a trailing `/`.
fn http_url(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("{url:?} must start with http:// or https://"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{url:?} has no host"));
    }
    if url
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '?' | '#'))
    {
        return Err(format!(
            "{url:?} must be a plain base URL (no spaces, query or fragment)"
        ));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// A Consul service, tag or datacenter name: it goes into a URL.
fn registry_name(v: &Value) -> Result<String, String> {
    let name = non_empty(v)?;
    if name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '?' | '#' | '%' | '&'))
    {
        return Err(format!(
            "{name:?} must not contain whitespace, `/`, `?`, `#`, `%` or `&`"
        ));
    }
    Ok(name)
}

fn etcd_source(s: &mut Section<'_>, p: &mut Problems) -> Option<EtcdSource> {
    let endpoints = s.list("endpoints", p, |v| http_url(&string(v)?));
    if endpoints.as_ref().is_some_and(Vec::is_empty) {
        p.add(
            &s.key_path("endpoints"),
            "must list at least one endpoint (default: [\"http://127.0.0.1:2379\"])",
        );
    }
    let endpoints = endpoints.unwrap_or_else(|| vec!["http://127.0.0.1:2379".into()]);
    let prefix = s.require("prefix", p, non_empty);
    both_or_neither(s, "username", "password_file", p);
    let username = s.get("username", p, non_empty);
    let password = s.get("password_file", p, path).and_then(|f| {
        read_secret(&f)
            .map_err(|e| p.add(&s.key_path("password_file"), e))
            .ok()
    });
    both_or_neither(s, "cert_file", "key_file", p);
    let ca_file = s.get("ca_file", p, path);
    let cert_file = s.get("cert_file", p, path);
    let key_file = s.get("key_file", p, path);
    let at_least_1ms = || duration_at_least(Duration::from_millis(1));
    let connect_timeout = s
        .get("connect_timeout", p, at_least_1ms())
        .unwrap_or(Duration::from_secs(5));
    let request_timeout = s
        .get("request_timeout", p, at_least_1ms())
        .unwrap_or(Duration::from_secs(5));
    Some(EtcdSource {
        endpoints,
        prefix: prefix?,
        username,
        password,
        ca_file,
        cert_file,
        key_file,
        connect_timeout,
        request_timeout,
    })
}

fn both_or_neither(s: &Section<'_>, a: &str, b: &str, p: &mut Problems) {
    match (s.has(a), s.has(b)) {
        (true, false) => p.add(&s.key_path(a), format!("needs `{b}` too")),
        (false, true) => p.add(&s.key_path(b), format!("needs `{a}` too")),
        _ => {}
    }
}

/// The largest secret file read; a token is far shorter, so anything bigger is the wrong file.
const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// Reads a token or password file, trimmed. Errors never quote the file's content.
pub(super) fn read_secret(file: &Path) -> Result<Secret, String> {
    let failed = |e: std::io::Error| format!("failed to read `{}`: {e}", file.display());
    let mut text = String::new();
    std::fs::File::open(file)
        .map_err(failed)?
        .take(MAX_SECRET_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(failed)?;
    if text.len() as u64 > MAX_SECRET_BYTES {
        return Err(format!(
            "`{}` is larger than 64 KiB; is it the right file?",
            file.display()
        ));
    }
    let secret = text.trim();
    if secret.is_empty() {
        return Err(format!("`{}` is empty", file.display()));
    }
    if secret.chars().any(char::is_control) {
        return Err(format!(
            "`{}` must hold the secret on one line",
            file.display()
        ));
    }
    Ok(Secret(secret.to_owned()))
}
