//! Active health checks: the pure per-endpoint state machine, one HTTP probe, and the prober
//! that runs probes on schedule and reports results to the controller.
//!
//! The prober keeps no health state: the controller feeds each [`ProbeReport`] into the
//! endpoint's [`HealthState`] and acts only on the [`Transition`]s it returns.

mod http1;
pub mod probe;
pub mod prober;
pub mod state;

pub use probe::{build_client, probe_once, Client, ProbeOutcome};
pub use prober::{ProbeReport, ProbeTrigger, Prober};
pub use state::{Health, HealthState, Pace, Schedule, Transition};
