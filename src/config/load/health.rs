//! `[upstream.health]`: the probe and its paces.

use std::time::Duration;

use toml::Value;

use crate::config::reader::{
    boolean, describe, duration_at_least, non_empty, string, u32_in, Problems, Section,
};
use crate::config::HealthConfig;

/// One `[upstream.health]`; defaults for what it leaves out.
pub(super) fn health(mut s: Section<'_>, p: &mut Problems) -> HealthConfig {
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
