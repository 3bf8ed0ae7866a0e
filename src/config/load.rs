//! Parsing TOML into a validated `Config`, collecting every error with its key path.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use toml::Value;

use super::reader::{
    boolean, choice, describe, duration, duration_at_least, f64_in, non_empty, path, string,
    u32_in, Problems, Section,
};
use super::sources::{read_secret, source};
use super::{
    AdminConfig, AllUnhealthy, Balance, Config, HealthConfig, NginxConfig, Secret, UpstreamConfig,
};
use crate::affinity::{is_group_name, AffinityKey};
use crate::model::UpstreamName;

/// One problem in a config file, at a key path such as `upstream[0].health.rise`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The dotted key path, `upstream[1].source[0].servers[2]`; empty for the whole file.
    pub path: String,
    /// What is wrong, as a sentence.
    pub message: String,
}

/// Every problem found in one config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(|e| if e.path.is_empty() { e.message.clone() } else { format!("{}: {}", e.path, e.message) }).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// Parses config text; `env` looks up environment variables (`CONSUL_HTTP_ADDR`,
/// `CONSUL_HTTP_TOKEN`). Files named by `token_file` and `password_file` are read here.
///
/// Either every value is valid, or every problem in the file is returned, in file-walk order.
pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
    let table: toml::Table =
        toml::from_str(text).map_err(|e| ConfigErrors(vec![syntax_error(text, &e)]))?;
    let mut problems = Problems::default();
    let p = &mut problems;
    let mut root = Section::root(&table);

    let nginx = nginx(root.section("nginx", p), p);
    let admin = admin(root.section("admin", p), p);
    let upstreams = upstreams(&mut root, env, p);
    root.finish(p);

    let config = match (nginx, upstreams) {
        (Some(nginx), Some(upstreams)) => Some(Config {
            nginx,
            admin,
            upstreams,
        }),
        _ => None,
    };
    match config {
        Some(config) if problems.is_empty() => Ok(config),
        _ => {
            let mut list = problems.into_vec();
            if list.is_empty() {
                // Every `None` above comes with a recorded problem; this is a safety net.
                list.push(ConfigError {
                    path: String::new(),
                    message: "the configuration is incomplete (an unreported problem: please report this bug)".into(),
                });
            }
            Err(ConfigErrors(list))
        }
    }
}

/// The largest config file read: far above any real one (a static list of 10,000 servers
/// with every attribute is about 1.2 MB), small enough that `--config /dev/zero` fails at once.
pub const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;

/// Reads and parses a config file (at most [`MAX_CONFIG_BYTES`]), with the process
/// environment.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let whole = |message: String| {
        ConfigErrors(vec![ConfigError {
            path: String::new(),
            message,
        }])
    };
    let text = read_bounded(path, MAX_CONFIG_BYTES)
        .map_err(|e| whole(format!("failed to read `{}`: {e}", path.display())))?;
    parse(&text, &|k| std::env::var(k).ok())
}

/// `16 MiB`, `512 KiB` or `100 bytes`.
fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

/// Reads a UTF-8 text file of at most `max` bytes, without reading more than `max + 1`.
pub(crate) fn read_bounded(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("it is larger than {}", human_size(max)),
        ));
    }
    String::from_utf8(bytes)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "it is not UTF-8 text"))
}

/// One line: `TOML syntax error at line L, column C: …`.
fn syntax_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let what = e.message().trim().replace('\n', "; ");
    let message = match e.span() {
        Some(span) => {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            let line = before.iter().filter(|b| **b == b'\n').count() + 1;
            let line_start = before
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(&before[line_start..])
                .chars()
                .count()
                + 1;
            format!("TOML syntax error at line {line}, column {column}: {what}")
        }
        None => format!("TOML syntax error: {what}"),
    };
    ConfigError {
        path: String::new(),
        message,
    }
}

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

pub(super) fn balance_name(b: Balance) -> &'static str {
    BALANCES
        .iter()
        .find(|(_, x)| *x == b)
        .map_or("?", |(name, _)| name)
}

fn nginx(mut s: Section<'_>, p: &mut Problems) -> Option<NginxConfig> {
    let output = s.require("output", p, |v| {
        let output = path(v)?;
        if output.is_relative() {
            return Err(format!(
                "{:?} is a relative path; give the include file's absolute path, such as \"/etc/nginx/conf.d/upstreamd.conf\"",
                output.display().to_string()
            ));
        }
        Ok(output)
    });
    let pid_file = s
        .get("pid_file", p, path)
        .unwrap_or_else(|| "/run/nginx.pid".into());
    let test_command = s
        .list("test_command", p, non_empty)
        .unwrap_or_else(|| vec!["nginx".into(), "-t".into(), "-q".into()]);
    let reload_command = s.list("reload_command", p, non_empty).unwrap_or_default();
    let template = s.get("template", p, path);
    let settle = s
        .get("settle", p, duration)
        .unwrap_or(Duration::from_millis(250));
    let min_reload_interval = s
        .get("min_reload_interval", p, duration)
        .unwrap_or(Duration::from_secs(2));
    let confirm_timeout = s
        .get(
            "confirm_timeout",
            p,
            duration_at_least(Duration::from_millis(1)),
        )
        .unwrap_or(Duration::from_secs(5));
    let state_dir = s.get("state_dir", p, path);
    let error_log = s.get("error_log", p, path);
    let max_old_generations = s
        .get("max_old_generations", p, u32_in(0, 1000))
        .unwrap_or(0);
    let (apply, lua) = super::lua::read(&mut s, output.as_deref(), state_dir.as_deref(), p);
    s.finish(p);
    Some(NginxConfig {
        output: output?,
        pid_file,
        test_command,
        reload_command,
        template,
        settle,
        min_reload_interval,
        confirm_timeout,
        state_dir,
        error_log,
        max_old_generations,
        apply,
        lua,
    })
}

fn admin(mut s: Section<'_>, p: &mut Problems) -> AdminConfig {
    let listen = s.get("listen", p, |v| {
        let text = string(v)?;
        text.parse().map_err(|_| {
            format!("{text:?} is not an IP address and port such as \"127.0.0.1:9187\"")
        })
    });
    let max_connections = s
        .get("max_connections", p, u32_in(1, 10_000))
        .map_or_else(super::default_admin_max_connections, |n| n as usize);
    let header_read_timeout = s
        .get(
            "header_read_timeout",
            p,
            duration_at_least(Duration::from_millis(10)),
        )
        .unwrap_or_else(super::default_admin_header_read_timeout);
    s.finish(p);
    AdminConfig {
        listen,
        max_connections,
        header_read_timeout,
    }
}

fn upstreams(
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

fn health(mut s: Section<'_>, p: &mut Problems) -> HealthConfig {
    let enabled = s.get("enabled", p, boolean).unwrap_or(true);
    let path = s
        .get("path", p, probe_path)
        .unwrap_or_else(|| "/health".into());
    let expect_status = s
        .get("expect_status", p, status_range)
        .unwrap_or((200, 399));
    let expect_body = s.get("expect_body", p, non_empty);
    let host = s.get("host", p, |v| {
        let h = non_empty(v)?;
        if !h.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'[' | b']' | b'_')
        }) {
            return Err(format!("{h:?} is not a host name (with an optional :port)"));
        }
        Ok(h)
    });
    let default_interval = Duration::from_secs(2);
    let default_timeout = Duration::from_secs(1);
    let interval = s.get_or(
        "interval",
        p,
        default_interval,
        duration_at_least(Duration::from_millis(10)),
    );
    let timeout = s.get_or(
        "timeout",
        p,
        default_timeout,
        duration_at_least(Duration::from_millis(1)),
    );
    if let (Some(interval), Some(timeout)) = (interval, timeout) {
        if timeout > interval {
            let default = if s.has("timeout") {
                ""
            } else {
                ", the default"
            };
            p.add(
                &s.key_path("timeout"),
                format!(
                    "timeout ({}{default}) must not be longer than interval ({})",
                    humantime::format_duration(timeout),
                    humantime::format_duration(interval)
                ),
            );
        }
    }
    let (fast_interval, down_interval) = paces(&mut s, p, interval);
    let rise = s.get("rise", p, u32_in(1, 100)).unwrap_or(2);
    let fall = s.get("fall", p, u32_in(1, 100)).unwrap_or(3);
    s.finish(p);
    HealthConfig {
        enabled,
        path,
        expect_status,
        expect_body,
        host,
        interval: interval.unwrap_or(default_interval),
        fast_interval,
        down_interval,
        timeout: timeout.unwrap_or(default_timeout),
        rise,
        fall,
    }
}

/// `fast_interval` (default 500ms, or `interval` when shorter) and `down_interval` (default
/// `interval`), checked so that `fast_interval ≤ interval ≤ down_interval`: doubt is probed no
/// slower, and a dead endpoint no faster, than a healthy one. A bad `interval` (already
/// reported) is not compared against.
fn paces(
    s: &mut Section<'_>,
    p: &mut Problems,
    interval: Option<Duration>,
) -> (Duration, Duration) {
    let base = interval.unwrap_or(Duration::from_secs(2));
    let at_least_10ms = || duration_at_least(Duration::from_millis(10));
    let fast_default = base.min(Duration::from_millis(500));
    let fast = s.get_or("fast_interval", p, fast_default, at_least_10ms());
    let down = s.get_or("down_interval", p, base, at_least_10ms());
    let show = |d: Duration| humantime::format_duration(d).to_string();
    if let (Some(interval), Some(fast)) = (interval, fast) {
        if fast > interval {
            p.add(
                &s.key_path("fast_interval"),
                format!(
                    "fast_interval ({}) must not be longer than interval ({})",
                    show(fast),
                    show(interval)
                ),
            );
        }
    }
    if let (Some(interval), Some(down)) = (interval, down) {
        if down < interval {
            p.add(
                &s.key_path("down_interval"),
                format!(
                    "down_interval ({}) must not be shorter than interval ({})",
                    show(down),
                    show(interval)
                ),
            );
        }
    }
    (fast.unwrap_or(fast_default), down.unwrap_or(base))
}

/// The probe's request target: it goes into the request line as is.
fn probe_path(v: &Value) -> Result<String, String> {
    let path = string(v)?;
    if !path.starts_with('/') {
        return Err(format!("{path:?} must start with `/`"));
    }
    if let Some(c) = path
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '"' | '\'' | ';' | '{' | '}'))
    {
        return Err(format!(
            "{path:?} must not contain {c:?} (percent-encode it)"
        ));
    }
    Ok(path)
}

/// `"200-399"` or `"200"` (or a bare 200).
fn status_range(v: &Value) -> Result<(u16, u16), String> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Integer(i) => i.to_string(),
        other => {
            return Err(format!(
                "expected a status range such as \"200-399\" or \"200\", found {}",
                describe(other)
            ))
        }
    };
    let code = |s: &str| {
        s.trim()
            .parse::<u16>()
            .ok()
            .filter(|c| (100..=599).contains(c))
    };
    let (lo, hi) = match text.split_once('-') {
        Some((lo, hi)) => (code(lo), code(hi)),
        None => (code(&text), code(&text)),
    };
    match (lo, hi) {
        (Some(lo), Some(hi)) if lo <= hi => Ok((lo, hi)),
        _ => Err(format!(
            "{text:?} is not a status range such as \"200-399\" or \"200\" (codes from 100 to 599, low before high)"
        )),
    }
}

#[cfg(test)]
mod tests;
