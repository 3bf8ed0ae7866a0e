//! `[[upstream]]`: its name, balancing, affinity, shrink guard and sources.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use toml::Value;

use super::health::health;
use crate::affinity::{is_group_name, AffinityKey};
use crate::config::reader::{
    choice, duration, f64_in, non_empty, path, string, u32_in, Problems, Section,
};
use crate::config::sources::{read_secret, source};
use crate::config::{AllUnhealthy, Balance, Secret, UpstreamConfig};
use crate::model::UpstreamName;

const BALANCES: &[(&str, Balance)] = &[
    ("round_robin", Balance::RoundRobin),
    ("least_conn", Balance::LeastConn),
    ("ip_hash", Balance::IpHash),
    ("hash", Balance::Hash),
    ("random", Balance::Random),
    ("sticky", Balance::Sticky),
];

const ALL_UNHEALTHY: &[(&str, AllUnhealthy)] = &[
    ("fail_open", AllUnhealthy::FailOpen),
    ("fail_closed", AllUnhealthy::FailClosed),
];

pub(in crate::config) fn balance_name(b: Balance) -> &'static str {
    BALANCES
        .iter()
        .find(|(_, x)| *x == b)
        .map_or("?", |(name, _)| name)
}

pub(super) fn upstreams(
    root: &mut Section<'_>,
    env: &dyn Fn(&str) -> Option<String>,
    p: &mut Problems,
) -> Option<Vec<UpstreamConfig>> {
    let present = root.has("upstream");
    let sections = root.sections("upstream", p);
    if !present || sections.as_ref().is_some_and(Vec::is_empty) {
        p.add("upstream", "at least one `[[upstream]]` is required");
    }
    let mut names = BTreeMap::new();
    let mut out = Vec::new();
    let mut complete = sections.is_some();
    for s in sections.unwrap_or_default() {
        match upstream(s, &mut names, env, p) {
            Some(u) => out.push(u),
            None => complete = false,
        }
    }
    refuse_group_names(&out, p);
    complete.then_some(out)
}

/// One `[[upstream]]`; `names` maps the names seen so far to where they were first used.
fn upstream(
    mut s: Section<'_>,
    names: &mut BTreeMap<UpstreamName, String>,
    env: &dyn Fn(&str) -> Option<String>,
    p: &mut Problems,
) -> Option<UpstreamConfig> {
    let name = s.require("name", p, |v| {
        UpstreamName::new(&string(v)?).map_err(|e| e.to_string())
    });
    if let Some(name) = &name {
        match names.get(name) {
            Some(first) => p.add(
                &s.key_path("name"),
                format!("upstream name \"{name}\" is already used by {first}"),
            ),
            None => {
                names.insert(name.clone(), s.path().to_owned());
            }
        }
    }
    let balance = s.get_or("balance", p, Balance::RoundRobin, choice(BALANCES));

    let hash_key = s.get("hash_key", p, hash_key);
    match balance {
        Some(Balance::Hash) if !s.has("hash_key") => p.add(
            &s.key_path("hash_key"),
            "required with balance = \"hash\" (an nginx variable such as \"$cookie_session\" or \"$request_uri\")",
        ),
        _ => {}
    }
    let affinity_cookie = s.get("affinity_cookie", p, |v| {
        let c = string(v)?;
        if c.is_empty() || !c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("cookie name {c:?} must match [A-Za-z0-9_]+"));
        }
        Ok(c)
    });
    let affinity_secret = s.get("affinity_secret_file", p, path).and_then(|f| {
        affinity_secret(&f)
            .map_err(|e| p.add(&s.key_path("affinity_secret_file"), e))
            .ok()
    });
    // `hash_key`, `affinity_cookie` and `affinity_secret_file` are accepted with any balance
    // (the documented example sets them all) and used only by the balance they belong to.
    let keepalive = s.get("keepalive", p, u32_in(0, 10_000)).unwrap_or(32);
    let on_all_unhealthy = s
        .get("on_all_unhealthy", p, choice(ALL_UNHEALTHY))
        .unwrap_or(AllUnhealthy::FailOpen);
    let max_shrink = s.get("max_shrink", p, f64_in(0.0, 1.0)).unwrap_or(0.5);
    let shrink_hold = s
        .get("shrink_hold", p, duration)
        .unwrap_or(Duration::from_secs(30));
    let health = health(s.section("health", p), p);

    let present = s.has("source");
    let sections = s.sections("source", p);
    if !present || sections.as_ref().is_some_and(Vec::is_empty) {
        p.add(
            &s.key_path("source"),
            "at least one `[[upstream.source]]` is required",
        );
    }
    let mut sources = Vec::new();
    let mut complete = sections.is_some();
    for source_section in sections.unwrap_or_default() {
        match source(source_section, balance, env, p) {
            Some(src) => sources.push(src),
            None => complete = false,
        }
    }
    s.finish(p);

    let name = name?;
    let affinity_key = AffinityKey::new(&name, affinity_secret.as_ref().map(|s| s.0.as_bytes()));
    Some(UpstreamConfig {
        name,
        balance: balance?,
        hash_key,
        affinity_cookie: affinity_cookie.unwrap_or_else(|| "upstreamd_affinity".into()),
        affinity_key,
        keepalive,
        on_all_unhealthy,
        max_shrink,
        shrink_hold,
        health,
        sources: complete.then_some(sources)?,
    })
}

/// The fewest bytes an affinity secret may hold: 128 bits of a random secret.
const MIN_AFFINITY_SECRET: usize = 16;

/// `affinity_secret_file`: one line of at least 16 bytes (e.g. `openssl rand -hex 32`).
fn affinity_secret(file: &Path) -> Result<Secret, String> {
    let secret = read_secret(file)?;
    if secret.0.len() < MIN_AFFINITY_SECRET {
        return Err(format!(
            "`{}` holds fewer than {MIN_AFFINITY_SECRET} bytes; write a random secret such as `openssl rand -hex 32`",
            file.display()
        ));
    }
    Ok(secret)
}

/// An upstream named like a sticky upstream's per-replica group (`<name>__<16 hex>`) would
/// make the rendered file define it twice.
fn refuse_group_names(upstreams: &[UpstreamConfig], p: &mut Problems) {
    for (i, u) in upstreams.iter().enumerate() {
        let clash = upstreams.iter().find(|s| {
            s.balance == Balance::Sticky && is_group_name(u.name.as_str(), s.name.as_str())
        });
        if let Some(s) = clash {
            p.add(
                &format!("upstream[{i}].name"),
                format!(
                    "upstream name \"{}\" is reserved for a replica group of the sticky upstream \"{}\"",
                    u.name, s.name
                ),
            );
        }
    }
}

/// `hash KEY consistent;`: a variable expression, never anything that could end the directive.
fn hash_key(v: &Value) -> Result<String, String> {
    let k = non_empty(v)?;
    if !k
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'$' | b'_' | b'-' | b'.' | b':'))
    {
        return Err(format!(
            "{k:?} may only contain `$`, letters, digits, `_`, `-`, `.` and `:`"
        ));
    }
    Ok(k)
}
