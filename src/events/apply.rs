//! Events of the apply path: renders, reloads, failed applies, and where the apply stands.

use std::path::Path;
use std::time::{Duration, SystemTime};

use super::Event;
use crate::metrics::labels::{ReloadLabels, ReloadResult, RenderLabels, RenderResult};
use crate::metrics::Metrics;
use crate::nginx::ApplyError;

/// Counts one render in `upstreamd_renders_total`.
fn count_render(metrics: &Metrics, result: RenderResult) {
    metrics
        .renders
        .get_or_create(&RenderLabels { result })
        .inc();
}

/// Counts one apply in `upstreamd_reloads_total`.
fn count_reload(metrics: &Metrics, result: ReloadResult) {
    metrics
        .reloads
        .get_or_create(&ReloadLabels { result })
        .inc();
}

/// The include file rendered; `changed` when the bytes differ from what nginx runs.
#[derive(Debug)]
pub struct Rendered {
    /// The bytes differ from what nginx runs (or nginx has not confirmed them).
    pub changed: bool,
}

impl Event for Rendered {
    fn emit(&self, metrics: &Metrics) {
        count_render(
            metrics,
            if self.changed {
                RenderResult::Changed
            } else {
                RenderResult::Unchanged
            },
        );
    }
}

/// The template failed; the last good file stays.
#[derive(Debug)]
pub struct RenderFailed<'a> {
    /// The render error.
    pub error: &'a str,
    /// The include file.
    pub output: &'a Path,
    /// The error differs from the previous render's (logged once while it repeats).
    pub new: bool,
}

impl Event for RenderFailed<'_> {
    fn emit(&self, metrics: &Metrics) {
        count_render(metrics, RenderResult::Error);
        if self.new {
            tracing::error!(error = %self.error, output = %self.output.display(),
                "Could not render the upstream file; keeping the last good one and running on.");
        }
    }
}

/// nginx reloaded with the new file and confirmed a new worker generation.
#[derive(Debug)]
pub struct Reloaded<'a> {
    /// What changed, as a sentence (`kotaemon: 127.0.0.3:7860 down`).
    pub changes: &'a str,
    /// From writing the file to the confirmed generation.
    pub took: Duration,
}

impl Event for Reloaded<'_> {
    fn emit(&self, metrics: &Metrics) {
        count_reload(metrics, ReloadResult::Ok);
        metrics.reload_duration.observe(self.took.as_secs_f64());
        let unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        metrics
            .last_reload_success
            .get_or_create(&[])
            .set(unix.as_secs_f64());
        tracing::info!(changes = %self.changes, took_ms = self.took.as_millis() as u64,
            "Applied the new upstream file and nginx reloaded.");
    }
}

/// The file was written and nginx not signalled (`once --no-reload`).
#[derive(Debug)]
pub struct FileWritten<'a> {
    /// What changed, as a sentence.
    pub changes: &'a str,
    /// The include file.
    pub output: &'a Path,
}

impl Event for FileWritten<'_> {
    fn emit(&self, _metrics: &Metrics) {
        tracing::info!(changes = %self.changes, output = %self.output.display(),
            "Wrote the upstream file; nginx was not signalled.");
    }
}

/// An apply failed; the change stays pending and is retried with backoff.
#[derive(Debug)]
pub struct ApplyFailed<'a> {
    /// What failed.
    pub error: &'a ApplyError,
    /// Failed applies in a row, this one included.
    pub failures: u32,
    /// When the next attempt is due.
    pub retry_in: Option<Duration>,
}

impl Event for ApplyFailed<'_> {
    fn emit(&self, metrics: &Metrics) {
        count_reload(metrics, ReloadResult::from(self.error));
        let state = if self.error.file_restored() {
            "the file nginx runs is unchanged"
        } else {
            "the file on disk may not be what nginx runs"
        };
        let retry = self
            .retry_in
            .map(|d| format!("{:.1}s", d.as_secs_f64()))
            .unwrap_or_default();
        tracing::error!(error = %self.error, failures = self.failures, retry_in = %retry,
            "Could not apply the new upstream file; {state}. Retrying with backoff.");
    }
}

/// Where the apply stands after a pass of the loop.
#[derive(Debug)]
pub struct ApplyProgress {
    /// The desired file is not what nginx runs (waiting, retrying, or the template fails).
    pub pending: bool,
    /// Failed applies in a row; 0 after a success.
    pub failures: u32,
    /// A due change waits for old nginx generations (`max_old_generations`).
    pub held: bool,
}

impl Event for ApplyProgress {
    fn emit(&self, metrics: &Metrics) {
        metrics.apply_pending.set(i64::from(self.pending));
        metrics.apply_held.set(i64::from(self.held));
        metrics.apply_failures.set(i64::from(self.failures));
    }
}
