//! Events of the daemon's own services: the admin server and the error-log follower.

use super::Event;
use crate::feedback::parse::Signal;
use crate::metrics::labels::{ErrorLogLabels, ErrorLogResult};
use crate::metrics::Metrics;

/// An admin connection was closed at once: `max_connections` were open.
#[derive(Debug)]
pub struct AdminConnectionRefused {
    /// The cap.
    pub max_connections: usize,
    /// Refusals so far, when this one is due a log line (at most one per 10 s).
    pub log_times: Option<u64>,
}

impl Event for AdminConnectionRefused {
    fn emit(&self, metrics: &Metrics) {
        metrics.admin_refused.inc();
        if let Some(times) = self.log_times {
            tracing::warn!(
                max_connections = self.max_connections,
                times,
                "Admin connections are at their cap; closing new ones at once."
            );
        }
    }
}

/// Lines of nginx's error log skipped as too long.
#[derive(Debug)]
pub struct ErrorLogLinesTooLong {
    /// How many.
    pub count: usize,
}

impl Event for ErrorLogLinesTooLong {
    fn emit(&self, metrics: &Metrics) {
        metrics
            .error_log_lines
            .get_or_create(&ErrorLogLabels {
                result: ErrorLogResult::TooLong,
            })
            .inc_by(self.count as u64);
    }
}

/// nginx's error log reported an upstream failure.
#[derive(Debug)]
pub struct ErrorLogLineRead<'a> {
    /// What failed, and the endpoint or upstream it names.
    pub signal: &'a Signal,
    /// Endpoints whose probe was brought forward.
    pub poked: usize,
}

impl Event for ErrorLogLineRead<'_> {
    fn emit(&self, metrics: &Metrics) {
        let result = if self.poked > 0 {
            ErrorLogResult::Probe
        } else {
            ErrorLogResult::NotOurs
        };
        metrics
            .error_log_lines
            .get_or_create(&ErrorLogLabels { result })
            .inc();
        tracing::debug!(failure = ?self.signal.failure, target = ?self.signal.target, poked = self.poked,
            "nginx reported an upstream failure.");
    }
}
