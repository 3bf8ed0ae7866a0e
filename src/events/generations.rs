//! Events of the old nginx worker generations that reloads leave behind (reload mode).

use super::{gauge, Event};
use crate::metrics::Metrics;

/// The old generations were counted (every second, and before a change that could wait).
#[derive(Debug)]
pub struct OldGenerationsCounted {
    /// Old worker generations still shutting down.
    pub generations: usize,
    /// Their workers, across those generations.
    pub workers: usize,
    /// The count differs from the last one (only then is it logged).
    pub changed: bool,
}

impl Event for OldGenerationsCounted {
    fn emit(&self, metrics: &Metrics) {
        if self.changed {
            tracing::debug!(
                generations = self.generations,
                workers = self.workers,
                "Old nginx worker generations counted."
            );
        }
        metrics.nginx_old_generations.set(gauge(self.generations));
        metrics.nginx_old_workers.set(gauge(self.workers));
    }
}

/// A due change was held for old generations, or a held one goes ahead.
#[derive(Debug)]
pub struct HoldDecided<'a> {
    /// Why the change waits, while it does.
    pub held: Option<&'a str>,
    /// Whether it waited before this decision.
    pub was_held: bool,
    /// The change takes a server out (why a held change goes now, if it does).
    pub takes_out: bool,
}

impl Event for HoldDecided<'_> {
    fn emit(&self, metrics: &Metrics) {
        match (self.held, self.was_held) {
            (Some(held), false) => tracing::warn!(held, "Holding a reload."),
            (None, true) => {
                let why = if self.takes_out {
                    "the change now takes a server out"
                } else {
                    "few enough old nginx worker generations are left"
                };
                tracing::info!(why, "Applying the held change.");
            }
            _ => {}
        }
        metrics.apply_held.set(i64::from(self.held.is_some()));
    }
}
