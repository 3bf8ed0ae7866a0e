//! Events of `apply = "lua"`: pushes of the membership to nginx's Lua update endpoint.

use super::{gauge, Event};
use crate::metrics::labels::{LuaPushLabels, LuaPushResult};
use crate::metrics::Metrics;

/// One push of a membership generation ended (the loop logs what it meant for the apply).
#[derive(Debug)]
pub struct LuaPushed {
    /// How it ended.
    pub result: LuaPushResult,
    /// The generation pushed.
    pub generation: u64,
}

impl Event for LuaPushed {
    fn emit(&self, metrics: &Metrics) {
        metrics
            .lua_pushes
            .get_or_create(&LuaPushLabels {
                result: self.result,
            })
            .inc();
        if self.result == LuaPushResult::Confirmed {
            // Generations are milliseconds since the epoch: far inside i64.
            metrics.lua_generation.set(gauge(self.generation));
        }
        tracing::debug!(
            result = self.result.as_str(),
            generation = self.generation,
            "Pushed the membership to nginx."
        );
    }
}
