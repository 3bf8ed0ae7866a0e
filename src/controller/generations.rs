//! Old nginx worker generations: counted every [`POLL`], and the hold that makes a change
//! that takes no server out wait while more than `max_old_generations` linger.
//!
//! Each reload while a stream is open (a Kotaemon tab's endless `/heartbeat`) leaves a
//! generation of workers alive until that stream ends. Removals of dead replicas still go at
//! once: serving from a dead server costs more than one more generation.

use std::time::Duration;

use tokio::time::Instant;

use super::changes::{parse_servers, takes_any_out};
use super::Controller;
use crate::events::{Event, HoldDecided, OldGenerationsCounted};
use crate::nginx::{Nginx, OldGenerations};

/// How often the old generations are counted, and how often a held change looks again.
pub const POLL: Duration = Duration::from_secs(1);

/// Whether a due change must wait: pure, so the rule reads in one place. `limit` 0 is no
/// limit; a change that takes a server out never waits; an uncounted nginx never holds.
pub fn must_wait(limit: u32, takes_out: bool, counted: Option<OldGenerations>) -> bool {
    limit > 0 && !takes_out && counted.is_some_and(|g| g.generations > limit as usize)
}

impl<N: Nginx> Controller<N> {
    /// Counts the old generations and sets the gauges. A failure (nginx not running, no pid
    /// file yet) leaves the count unknown and is logged at debug: the apply reports it.
    pub(super) async fn count_generations(&mut self) {
        match self.nginx.old_generations().await {
            Ok(g) => {
                OldGenerationsCounted {
                    generations: g.generations,
                    workers: g.workers,
                    changed: self.old_generations != Some(g),
                }
                .emit(&self.metrics);
                self.old_generations = Some(g);
            }
            Err(error) => {
                tracing::debug!(%error, "Could not count old nginx worker generations.");
                self.old_generations = None;
            }
        }
    }

    /// Decides, for a change that is due now, whether it waits for old generations to leave.
    /// When it does, the schedule looks again after [`POLL`] and `/status` says why.
    pub(super) async fn hold_for_generations(&mut self, now: Instant) -> bool {
        // A push to the Lua balancer leaves no generation behind: nothing to wait for.
        let limit = match self.lua {
            Some(_) => 0,
            None => self.cfg.nginx.max_old_generations,
        };
        let takes_out = match (&self.on_disk, &self.rendered) {
            (Some(disk), Some(text)) => takes_any_out(&parse_servers(disk), &parse_servers(text)),
            // A first file, or nothing to apply: never held.
            _ => true,
        };
        // Unconfirmed bytes on disk are a repair, not a change: never held.
        let takes_out = takes_out || !self.confirmed;
        let counted = if limit > 0 && !takes_out {
            self.count_generations().await;
            self.old_generations
        } else {
            None
        };
        let wait = must_wait(limit, takes_out, counted);
        let held = wait.then(|| {
            format!(
                "{} old nginx worker generations are still shutting down (max_old_generations = {limit}): a change that takes no server out waits for them to leave",
                counted.map_or(0, |g| g.generations)
            )
        });
        HoldDecided {
            held: held.as_deref(),
            was_held: self.held.is_some(),
            takes_out,
        }
        .emit(&self.metrics);
        self.held = held;
        if wait {
            self.schedule.hold(now + POLL);
        }
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counted(generations: usize) -> Option<OldGenerations> {
        Some(OldGenerations {
            generations,
            workers: generations * 2,
        })
    }

    #[test]
    fn a_change_waits_only_above_the_limit() {
        assert!(!must_wait(2, false, counted(2)));
        assert!(must_wait(2, false, counted(3)));
    }

    #[test]
    fn a_removal_never_waits() {
        assert!(!must_wait(1, true, counted(9)));
    }

    #[test]
    fn no_limit_or_no_count_never_holds() {
        assert!(!must_wait(0, false, counted(9)));
        assert!(!must_wait(1, false, None));
    }
}
