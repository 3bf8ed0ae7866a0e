//! Typed values that may reach the rendered file: names, addresses, server attributes, endpoints.
//!
//! Every string from a config file or a registry is parsed into one of these types before
//! it can be rendered, so no registry value can add a directive, a server or a brace.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

/// Why a value could not become one of the typed values of this module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// An upstream name outside `[A-Za-z0-9_]+`.
    #[error("upstream name {0:?} must match [A-Za-z0-9_]+")]
    BadName(String),
    /// An address that is not `IPv4:port`, `[IPv6]:port` or `hostname:port`.
    #[error("address {0:?} must be IPv4:port, [IPv6]:port or hostname:port")]
    BadAddress(String),
    /// A port outside 1–65535.
    #[error("port in {0:?} must be a number from 1 to 65535")]
    BadPort(String),
    /// A number outside its allowed range.
    #[error("{field} = {value:?} must be {}", expected_number(.field, *.min, *.max))]
    OutOfRange {
        /// The attribute's name.
        field: &'static str,
        /// The value as given.
        value: String,
        /// The smallest value allowed.
        min: u64,
        /// The largest value allowed.
        max: u64,
    },
    /// A value of the wrong JSON/TOML type.
    #[error("{field} has the wrong type: {detail}")]
    WrongType {
        /// The attribute's name.
        field: &'static str,
        /// What was expected and found.
        detail: String,
    },
    /// An attribute name that is not known.
    #[error("unknown server attribute {0:?} (known: address, weight, backup, max_fails, fail_timeout, down)")]
    UnknownAttribute(String),
}

/// An nginx upstream name: `[A-Za-z0-9_]+`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct UpstreamName(String);

impl UpstreamName {
    /// Validates `s` as an upstream name.
    pub fn new(s: &str) -> Result<Self, ValueError> {
        if !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            Ok(Self(s.to_owned()))
        } else {
            Err(ValueError::BadName(s.to_owned()))
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UpstreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The host part of an address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Host {
    /// An IPv4 address.
    V4(Ipv4Addr),
    /// An IPv6 address (rendered in brackets).
    V6(Ipv6Addr),
    /// An RFC 1123 hostname, lower-cased.
    Name(String),
}

/// A backend address: the identity of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address {
    /// The host.
    pub host: Host,
    /// The port, 1–65535.
    pub port: u16,
}

fn is_rfc1123_hostname(s: &str) -> bool {
    if s.is_empty() || s.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = s.split('.').collect();
    // A name made only of digits and dots would be read by nginx as a (bad) IPv4 address.
    if labels.iter().all(|l| l.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    labels.iter().all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    })
}

/// What an [`ValueError::OutOfRange`] value should have been.
fn expected_number(field: &str, min: u64, max: u64) -> String {
    match field {
        "fail_timeout" => format!(
            "whole seconds from {min} to {max}, or a duration in whole seconds such as \"10s\""
        ),
        _ => format!("a whole number from {min} to {max}"),
    }
}

/// A JSON value as the user wrote it: a string without its quotes, anything else as JSON.
fn json_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn parse_port(s: &str, whole: &str) -> Result<u16, ValueError> {
    // Anything after the colon that is not digits (`7860 down`) is not a port at all.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ValueError::BadAddress(whole.to_owned()));
    }
    if s.len() > 5 {
        return Err(ValueError::BadPort(whole.to_owned()));
    }
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(ValueError::BadPort(whole.to_owned())),
    }
}

impl Address {
    /// Builds an address from a host string (IPv4, bare or bracketed IPv6, hostname) and a port.
    pub fn from_parts(host: &str, port: u16) -> Result<Self, ValueError> {
        let whole = format!("{host}:{port}");
        if port == 0 {
            return Err(ValueError::BadPort(whole));
        }
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let host = if let Ok(v4) = bare.parse::<Ipv4Addr>() {
            Host::V4(v4)
        } else if let Ok(v6) = bare.parse::<Ipv6Addr>() {
            Host::V6(v6)
        } else if bare == host && is_rfc1123_hostname(host) {
            Host::Name(host.to_ascii_lowercase())
        } else {
            return Err(ValueError::BadAddress(whole));
        };
        Ok(Self { host, port })
    }

    /// The address to connect to for probes, as `host:port` (IPv6 bracketed).
    pub fn authority(&self) -> String {
        self.to_string()
    }
}

impl FromStr for Address {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix('[') {
            let (v6, port) = rest
                .split_once("]:")
                .ok_or_else(|| ValueError::BadAddress(s.to_owned()))?;
            let ip = v6
                .parse::<Ipv6Addr>()
                .map_err(|_| ValueError::BadAddress(s.to_owned()))?;
            return Ok(Self {
                host: Host::V6(ip),
                port: parse_port(port, s)?,
            });
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| ValueError::BadAddress(s.to_owned()))?;
        let port = parse_port(port, s)?;
        if host.contains(':') {
            return Err(ValueError::BadAddress(s.to_owned()));
        }
        Self::from_parts(host, port).map_err(|_| ValueError::BadAddress(s.to_owned()))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::V4(ip) => write!(f, "{ip}:{}", self.port),
            Host::V6(ip) => write!(f, "[{ip}]:{}", self.port),
            Host::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

impl Serialize for Address {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The largest `weight` nginx accepts is far above this; we cap at a sane value.
pub const MAX_WEIGHT: u32 = 1000;
/// The largest `max_fails` accepted.
pub const MAX_FAILS: u32 = 1000;
/// The largest `fail_timeout` accepted, in seconds.
pub const MAX_FAIL_TIMEOUT_SECS: u64 = 86_400;

/// Per-server attributes, all optional; absent values are not rendered (nginx defaults apply).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ServerAttrs {
    /// `weight=N`, 1–1000.
    pub weight: Option<u32>,
    /// `max_fails=N`, 0–1000.
    pub max_fails: Option<u32>,
    /// `fail_timeout=Ns`, whole seconds, 0–86400.
    pub fail_timeout: Option<u64>,
    /// `backup`.
    pub backup: bool,
    /// Marked down by the registry or config (`down`).
    pub down: bool,
}

/// Checks a number against its range, returning it as `u32`.
pub fn check_range(field: &'static str, value: i64, min: u64, max: u64) -> Result<u64, ValueError> {
    if value < 0 || (value as u64) < min || (value as u64) > max {
        return Err(ValueError::OutOfRange {
            field,
            value: value.to_string(),
            min,
            max,
        });
    }
    Ok(value as u64)
}

impl ServerAttrs {
    /// Sets one attribute from a JSON value, validating type and range.
    ///
    /// `fail_timeout` takes a number of seconds or a duration string (`"10s"`); `backup` and
    /// `down` take booleans or 0/1 (the nginx-upsync layout); numbers may be given as strings
    /// (Consul `Meta` values are always strings).
    pub fn set(&mut self, key: &str, v: &serde_json::Value) -> Result<(), ValueError> {
        match key {
            "weight" => self.weight = Some(json_u64("weight", v, 1, MAX_WEIGHT as u64)? as u32),
            "max_fails" => {
                self.max_fails = Some(json_u64("max_fails", v, 0, MAX_FAILS as u64)? as u32)
            }
            "fail_timeout" => self.fail_timeout = Some(json_secs(v)?),
            "backup" => self.backup = json_bool("backup", v)?,
            "down" => self.down = json_bool("down", v)?,
            other => return Err(ValueError::UnknownAttribute(other.to_owned())),
        }
        Ok(())
    }
}

fn json_u64(
    field: &'static str,
    v: &serde_json::Value,
    min: u64,
    max: u64,
) -> Result<u64, ValueError> {
    let n = match v {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<i64>().ok()
        }
        _ => None,
    };
    match n {
        Some(n) => check_range(field, n, min, max),
        None => Err(ValueError::OutOfRange {
            field,
            value: json_text(v),
            min,
            max,
        }),
    }
}

fn json_secs(v: &serde_json::Value) -> Result<u64, ValueError> {
    if let serde_json::Value::String(s) = v {
        if let Ok(d) = humantime::parse_duration(s) {
            return check_secs(d, v);
        }
    }
    json_u64("fail_timeout", v, 0, MAX_FAIL_TIMEOUT_SECS)
}

fn check_secs(d: Duration, v: &serde_json::Value) -> Result<u64, ValueError> {
    let secs = d.as_secs();
    if secs > MAX_FAIL_TIMEOUT_SECS || d.subsec_nanos() != 0 {
        return Err(ValueError::OutOfRange {
            field: "fail_timeout",
            value: json_text(v),
            min: 0,
            max: MAX_FAIL_TIMEOUT_SECS,
        });
    }
    Ok(secs)
}

fn json_bool(field: &'static str, v: &serde_json::Value) -> Result<bool, ValueError> {
    match v {
        serde_json::Value::Bool(b) => Ok(*b),
        serde_json::Value::Number(n) if n.as_u64() == Some(0) => Ok(false),
        serde_json::Value::Number(n) if n.as_u64() == Some(1) => Ok(true),
        serde_json::Value::String(s) if matches!(s.as_str(), "true" | "1") => Ok(true),
        serde_json::Value::String(s) if matches!(s.as_str(), "false" | "0") => Ok(false),
        other => Err(ValueError::WrongType {
            field,
            detail: format!("expected true/false or 0/1, found {other}"),
        }),
    }
}

/// What the registry says about an endpoint, apart from our own probes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum RegistryState {
    /// Registered and not critical.
    Passing,
    /// Registered but critical (a failing check, maintenance mode): rendered `down`.
    Critical(String),
}

/// One backend as a source reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// The identity of the endpoint.
    pub address: Address,
    /// Rendering attributes.
    pub attrs: ServerAttrs,
    /// The registry's own verdict.
    pub registry: RegistryState,
    /// Where the entry came from (a registry key or service ID), for logs and /status.
    pub origin: String,
}

impl Endpoint {
    /// A passing endpoint with no attributes.
    pub fn plain(address: Address, origin: impl Into<String>) -> Self {
        Self {
            address,
            attrs: ServerAttrs::default(),
            registry: RegistryState::Passing,
            origin: origin.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_three_address_forms() {
        for s in ["10.0.0.1:7860", "[::1]:80", "kotaemon-1.internal:7860"] {
            assert_eq!(s.parse::<Address>().unwrap().to_string(), s);
        }
        assert_eq!(
            "[fe80:0:0::1]:80".parse::<Address>().unwrap().to_string(),
            "[fe80::1]:80"
        );
    }

    #[test]
    fn rejects_anything_but_host_and_port() {
        for s in [
            "10.0.0.1:7860 down",
            "10.0.0.1:7860;include /etc/passwd",
            "10.0.0.1",
            "10.0.0.1:0",
            "10.0.0.1:65536",
            "10.0.0.1:+80",
            "a b:80",
            "host}:80",
            "::1:80",
            "-lead.example:80",
            "999.1.1.1:80",
            "x.example:80\nserver 6.6.6.6:80",
            "unix:/tmp/sock",
            "",
        ] {
            assert!(s.parse::<Address>().is_err(), "{s:?} should be rejected");
        }
    }

    #[test]
    fn upstream_names_are_word_characters_only() {
        assert!(UpstreamName::new("kotaemon_2").is_ok());
        for bad in ["", "a-b", "a b", "a;", "a{"] {
            assert!(UpstreamName::new(bad).is_err());
        }
    }

    #[test]
    fn attributes_accept_strings_and_upsync_numbers_in_range() {
        let mut a = ServerAttrs::default();
        a.set("weight", &serde_json::json!("3")).unwrap();
        a.set("down", &serde_json::json!(1)).unwrap();
        a.set("fail_timeout", &serde_json::json!("10s")).unwrap();
        a.set("max_fails", &serde_json::json!(2)).unwrap();
        assert_eq!(
            (a.weight, a.down, a.fail_timeout, a.max_fails),
            (Some(3), true, Some(10), Some(2))
        );
        assert!(a.set("weight", &serde_json::json!("3; include x")).is_err());
        assert!(a.set("weight", &serde_json::json!(0)).is_err());
        assert!(a.set("weight", &serde_json::json!(-1)).is_err());
        assert!(a.set("fail_timeout", &serde_json::json!("1.5s")).is_err());
        assert!(a.set("zone", &serde_json::json!(1)).is_err());
    }
}
