//! Parsing TOML into a validated `Config`, collecting every error with its key path.
//! `[nginx]` and `[admin]` are read here; `[[upstream]]` in `upstream`, its `health` in `health`.

mod health;
#[cfg(test)]
mod tests;
mod upstream;

use std::path::Path;
use std::time::Duration;

use super::reader::{
    duration, duration_at_least, non_empty, path, string, u32_in, Problems, Section,
};
use super::{AdminConfig, Config, NginxConfig};
pub(super) use upstream::balance_name;
use upstream::upstreams;

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
