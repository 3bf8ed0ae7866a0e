//! Summaries of load records and of nginx's access log.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::client::{Outcome, Rec};

/// Nearest-rank percentile of sorted values (`p` in 0–100); 0 for none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

pub fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Requests due in a window of a load run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Window {
    pub from_s: f64,
    pub to_s: f64,
    pub requests: usize,
    pub errors: usize,
    /// Errors by kind (`status_5xx`, `timeout`, `reset_on_reuse`, …).
    pub error_kinds: BTreeMap<String, usize>,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Requests slower than 500 ms (errors included).
    pub slow: usize,
}

/// Summarises the records due in `[from, to)` seconds after the start of the load. Latency
/// percentiles cover every request, a timeout counting as its full wait.
pub fn window(recs: &[Rec], from: f64, to: f64) -> Window {
    let inside: Vec<&Rec> = recs
        .iter()
        .filter(|r| r.due >= from && r.due < to)
        .collect();
    let mut kinds = BTreeMap::new();
    for r in inside.iter().filter(|r| r.outcome.is_error()) {
        let kind = serde_json::to_value(r.outcome)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        *kinds.entry(kind).or_insert(0) += 1;
    }
    let lat = sorted(inside.iter().map(|r| r.latency * 1000.0).collect());
    Window {
        from_s: from,
        to_s: to,
        requests: inside.len(),
        errors: inside.iter().filter(|r| r.outcome.is_error()).count(),
        error_kinds: kinds,
        p50_ms: percentile(&lat, 50.0),
        p90_ms: percentile(&lat, 90.0),
        p99_ms: percentile(&lat, 99.0),
        max_ms: lat.last().copied().unwrap_or(0.0),
        slow: lat.iter().filter(|l| **l > 500.0).count(),
    }
}

/// The last request due in `[from, to)` answered by `replica`, in seconds after `from`.
pub fn last_answered_by(recs: &[Rec], replica: usize, from: f64, to: f64) -> Option<f64> {
    recs.iter()
        .filter(|r| r.due >= from && r.due < to && r.replica == Some(replica))
        .map(|r| r.due - from)
        .reduce(f64::max)
}

/// Share of successful answers in `[from, to)` that came from `replica`.
pub fn share(recs: &[Rec], replica: usize, from: f64, to: f64) -> f64 {
    let ok: Vec<&Rec> = recs
        .iter()
        .filter(|r| r.due >= from && r.due < to && r.outcome == Outcome::Ok)
        .collect();
    if ok.is_empty() {
        return 0.0;
    }
    ok.iter().filter(|r| r.replica == Some(replica)).count() as f64 / ok.len() as f64
}

/// One line of the bench's access log:
/// `$msec $request_time $status "$upstream_addr" $request_uri`.
#[derive(Debug, Clone)]
pub struct Access {
    /// When nginx started the request (Unix seconds): `$msec - $request_time`.
    pub start: f64,
    /// Every upstream address nginx tried for it (`$upstream_addr`, retries included).
    pub upstreams: Vec<String>,
}

pub const ACCESS_LOG_FORMAT: &str =
    r#"log_format bench '$msec $request_time $status "$upstream_addr" $request_uri';"#;

pub fn read_access_log(path: &Path) -> Vec<Access> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut words = line.splitn(4, ' ');
            let msec: f64 = words.next()?.parse().ok()?;
            let took: f64 = words.next()?.parse().ok()?;
            let _status: u16 = words.next()?.parse().ok()?;
            let rest = words.next()?;
            let quoted = rest.strip_prefix('"')?.split_once('"')?.0;
            // `$upstream_addr` separates tries with ", " (and internal redirects with " : ").
            let upstreams = quoted
                .split([',', ' '])
                .filter(|s| !s.is_empty() && *s != ":")
                .map(str::to_owned)
                .collect::<Vec<_>>();
            Some(Access {
                start: msec - took,
                upstreams,
            })
        })
        .collect()
}

/// Requests nginx sent to `addr` starting at or after `from` (Unix seconds): how many, and
/// when the last one started, in seconds after `from`.
pub fn sent_to(log: &[Access], addr: &str, from: f64, to: f64) -> (usize, Option<f64>) {
    let sent: Vec<f64> = log
        .iter()
        .filter(|a| a.start >= from && a.start < to && a.upstreams.iter().any(|u| u == addr))
        .map(|a| a.start - from)
        .collect();
    (sent.len(), sent.into_iter().reduce(f64::max))
}
