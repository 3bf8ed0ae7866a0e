//! Named events: each thing that happens is one struct whose [`Event::emit`] writes its log
//! line and bumps its metrics together, so the two never drift (vector's internal events).
//!
//! Call sites build an event and emit it; nothing else writes to [`Metrics`]. Adding a metric:
//! register its family in [`crate::metrics`] (a label-set type in `metrics::labels`), then write
//! it from the event that reports what happened.

mod apply;
mod generations;
mod health;
mod lua;
mod service;
mod source;

pub use apply::{ApplyFailed, ApplyProgress, FileWritten, Reloaded, RenderFailed, Rendered};
pub use generations::{HoldDecided, OldGenerationsCounted};
pub use health::{EndpointsCounted, HealthChanged, ProbeFinished};
pub use lua::LuaPushed;
pub use service::{AdminConnectionRefused, ErrorLogLineRead, ErrorLogLinesTooLong};
pub use source::{
    ShrinkHoldMeasured, SourceAnswered, SourceFailed, UpstreamRemoved, UpstreamStarted,
};

use crate::metrics::Metrics;

/// Something that happened, reported once: its log line (if any) and its metrics.
pub trait Event {
    /// Writes the log line and updates the metrics.
    fn emit(&self, metrics: &Metrics);
}

/// A count as a gauge value, saturating at `i64::MAX` (gauges are signed).
fn gauge<T: TryInto<i64>>(n: T) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}
