//! The health state machine of one endpoint: pure hysteresis and the pace of its probes, no
//! I/O and no clock.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// What upstreamd believes about an endpoint, from its own probes: `healthy`, `unhealthy`
/// or `unknown` in logs, `/status`, the page and metrics alike (`up` and `down` are reserved
/// for how a server is rendered: nginx's `down` flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Health {
    /// No probe result yet. Never treated as healthy by default.
    #[serde(rename = "unknown")]
    Unknown,
    /// Probes pass.
    #[serde(rename = "healthy")]
    Up,
    /// Probes fail.
    #[serde(rename = "unhealthy")]
    Down,
}

impl Health {
    /// The name, as serialized: `unknown`, `healthy` or `unhealthy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Up => "healthy",
            Health::Down => "unhealthy",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change of [`Health`]; the only thing that should be logged or counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Transition {
    /// The health before the observation.
    pub from: Health,
    /// The health after it; never `Unknown`, never equal to `from`.
    pub to: Health,
}

/// How soon an endpoint is probed again, by how sure its verdict is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pace {
    /// The verdict stands (up and passing, or no verdict yet): every `interval`.
    Steady,
    /// The verdict is in doubt (a failure while up, a success while down): every
    /// `fast_interval`, so the flip, if it comes, comes soon.
    Fast,
    /// Down and still failing: every `down_interval`, so dead endpoints cost less.
    Down,
}

/// The three probe periods of an upstream, one per [`Pace`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// The period at [`Pace::Steady`].
    pub interval: Duration,
    /// The period at [`Pace::Fast`].
    pub fast_interval: Duration,
    /// The period at [`Pace::Down`].
    pub down_interval: Duration,
}

impl Schedule {
    /// The period at `pace`, before jitter.
    pub fn period(&self, pace: Pace) -> Duration {
        match pace {
            Pace::Steady => self.interval,
            Pace::Fast => self.fast_interval,
            Pace::Down => self.down_interval,
        }
    }
}

/// Hysteresis over the probe results of one endpoint. Starts [`Health::Unknown`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    health: Health,
    last_ok: bool,
    streak: u32,
}

impl Default for HealthState {
    fn default() -> Self {
        Self::new()
    }
}

impl HealthState {
    /// A state with no observation yet: `Unknown`, empty streak.
    pub fn new() -> Self {
        Self {
            health: Health::Unknown,
            last_ok: false,
            streak: 0,
        }
    }

    /// The current health.
    pub fn health(&self) -> Health {
        self.health
    }

    /// Feeds one probe result.
    ///
    /// The first result decides Unknown → Up/Down; afterwards `rise` consecutive successes
    /// flip Down → Up and `fall` consecutive failures flip Up → Down. Returns the transition,
    /// if any. A `rise` or `fall` of 0 counts as 1.
    pub fn observe(&mut self, ok: bool, rise: u32, fall: u32) -> Option<Transition> {
        if self.streak > 0 && self.last_ok == ok {
            self.streak = self.streak.saturating_add(1);
        } else {
            self.last_ok = ok;
            self.streak = 1;
        }
        let to = match (self.health, ok) {
            (Health::Unknown, true) => Health::Up,
            (Health::Unknown, false) => Health::Down,
            (Health::Down, true) if self.streak >= rise.max(1) => Health::Up,
            (Health::Up, false) if self.streak >= fall.max(1) => Health::Down,
            (same, _) => same,
        };
        if to == self.health {
            return None;
        }
        let from = std::mem::replace(&mut self.health, to);
        Some(Transition { from, to })
    }

    /// How soon the next probe should come, from the verdict and the last result: an endpoint
    /// whose last result disagrees with its health is in doubt and probed fast; one that is
    /// down and failing is probed at the down pace; anything else at the steady pace.
    pub fn pace(&self) -> Pace {
        match (self.health, self.last_ok) {
            (Health::Unknown, _) => Pace::Steady,
            (Health::Up, true) => Pace::Steady,
            (Health::Up, false) | (Health::Down, true) => Pace::Fast,
            (Health::Down, false) => Pace::Down,
        }
    }

    /// The delay before the next probe under `schedule`, before jitter, and its pace.
    pub fn next_delay(&self, schedule: &Schedule) -> (Pace, Duration) {
        let pace = self.pace();
        (pace, schedule.period(pace))
    }

    /// The last result and how many results in a row were the same, for /status and logs.
    /// `(false, 0)` before the first observation.
    pub fn streak(&self) -> (bool, u32) {
        (self.last_ok, self.streak)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RISE: u32 = 2;
    const FALL: u32 = 3;

    fn after(results: &[bool]) -> HealthState {
        let mut s = HealthState::new();
        for &ok in results {
            s.observe(ok, RISE, FALL);
        }
        s
    }

    #[test]
    fn starts_unknown_with_an_empty_streak() {
        let s = HealthState::new();
        assert_eq!(s.health(), Health::Unknown);
        assert_eq!(s.streak(), (false, 0));
    }

    #[test]
    fn first_result_decides_unknown() {
        let mut up = HealthState::new();
        assert_eq!(
            up.observe(true, RISE, FALL),
            Some(Transition {
                from: Health::Unknown,
                to: Health::Up
            })
        );
        let mut down = HealthState::new();
        assert_eq!(
            down.observe(false, RISE, FALL),
            Some(Transition {
                from: Health::Unknown,
                to: Health::Down
            })
        );
    }

    #[test]
    fn flips_down_after_fall_consecutive_failures() {
        let mut s = after(&[true, false, false]);
        assert_eq!(s.health(), Health::Up);
        assert_eq!(
            s.observe(false, RISE, FALL),
            Some(Transition {
                from: Health::Up,
                to: Health::Down
            })
        );
        assert_eq!(s.streak(), (false, 3));
    }

    #[test]
    fn flips_up_after_rise_consecutive_successes() {
        let mut s = after(&[false, true]);
        assert_eq!(s.health(), Health::Down);
        assert_eq!(
            s.observe(true, RISE, FALL),
            Some(Transition {
                from: Health::Down,
                to: Health::Up
            })
        );
    }

    #[test]
    fn a_single_failure_below_fall_changes_nothing() {
        let mut s = after(&[true, true]);
        assert_eq!(s.observe(false, RISE, FALL), None);
        assert_eq!(s.health(), Health::Up);
        assert_eq!(s.streak(), (false, 1));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let s = after(&[true, false, false, true, false, false]);
        assert_eq!(s.health(), Health::Up);
        assert_eq!(s.streak(), (false, 2));
    }

    #[test]
    fn further_failures_after_the_flip_report_nothing() {
        let mut s = after(&[true, false, false, false]);
        assert_eq!(s.observe(false, RISE, FALL), None);
        assert_eq!(s.health(), Health::Down);
        assert_eq!(s.streak(), (false, 4));
    }

    #[test]
    fn rise_and_fall_of_zero_act_as_one() {
        let mut s = HealthState::new();
        s.observe(true, 0, 0);
        assert_eq!(s.observe(false, 0, 0).map(|t| t.to), Some(Health::Down));
        assert_eq!(s.observe(true, 0, 0).map(|t| t.to), Some(Health::Up));
    }

    #[test]
    fn displays_and_serializes_as_healthy_unhealthy_unknown() {
        assert_eq!(Health::Unknown.to_string(), "unknown");
        assert_eq!(Health::Up.to_string(), "healthy");
        assert_eq!(
            serde_json::to_string(&Health::Down).unwrap(),
            "\"unhealthy\""
        );
        let t = Transition {
            from: Health::Up,
            to: Health::Down,
        };
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#"{"from":"healthy","to":"unhealthy"}"#
        );
    }

    const SCHEDULE: Schedule = Schedule {
        interval: Duration::from_secs(2),
        fast_interval: Duration::from_millis(500),
        down_interval: Duration::from_secs(4),
    };

    fn delay_after(results: &[bool]) -> (Pace, Duration) {
        after(results).next_delay(&SCHEDULE)
    }

    #[test]
    fn an_endpoint_with_no_result_yet_waits_the_steady_interval() {
        assert_eq!(
            HealthState::new().next_delay(&SCHEDULE),
            (Pace::Steady, Duration::from_secs(2))
        );
    }

    #[test]
    fn an_endpoint_up_and_passing_waits_the_steady_interval() {
        assert_eq!(delay_after(&[true]), (Pace::Steady, Duration::from_secs(2)));
        assert_eq!(
            delay_after(&[true, false, true]),
            (Pace::Steady, Duration::from_secs(2))
        );
    }

    #[test]
    fn a_failure_while_up_brings_the_next_probe_sooner() {
        assert_eq!(
            delay_after(&[true, false]),
            (Pace::Fast, Duration::from_millis(500))
        );
        assert_eq!(
            delay_after(&[true, false, false]),
            (Pace::Fast, Duration::from_millis(500))
        );
    }

    #[test]
    fn a_success_while_down_brings_the_next_probe_sooner() {
        assert_eq!(
            delay_after(&[false, true]),
            (Pace::Fast, Duration::from_millis(500))
        );
    }

    #[test]
    fn a_down_endpoint_still_failing_waits_the_down_interval() {
        assert_eq!(delay_after(&[false]), (Pace::Down, Duration::from_secs(4)));
        // The flip itself ends the doubt: the next probe is at the down pace.
        assert_eq!(
            delay_after(&[true, false, false, false]),
            (Pace::Down, Duration::from_secs(4))
        );
        assert_eq!(
            delay_after(&[false, true, false]),
            (Pace::Down, Duration::from_secs(4))
        );
    }

    #[test]
    fn rising_back_up_returns_to_the_steady_interval() {
        assert_eq!(
            delay_after(&[false, true, true]),
            (Pace::Steady, Duration::from_secs(2))
        );
    }

    /// How many results at the end of `results` equal its last one.
    fn trailing_run(results: &[bool]) -> u32 {
        match results.last() {
            None => 0,
            Some(&last) => results.iter().rev().take_while(|&&r| r == last).count() as u32,
        }
    }

    proptest! {
        #[test]
        fn transitions_follow_the_hysteresis_rules(
            rise in 1u32..6,
            fall in 1u32..6,
            results in proptest::collection::vec(any::<bool>(), 0..80),
        ) {
            let mut s = HealthState::new();
            for (i, &ok) in results.iter().enumerate() {
                let before = s.health();
                let seen = &results[..=i];
                let run = trailing_run(seen);
                let t = s.observe(ok, rise, fall);
                let now = s.health();

                // The step reports exactly the change it made, and never returns to Unknown.
                prop_assert_eq!(t.is_some(), before != now);
                prop_assert_ne!(now, Health::Unknown);
                if let Some(t) = t {
                    prop_assert_eq!((t.from, t.to), (before, now));
                }
                prop_assert_eq!(s.streak(), (ok, run));

                match t {
                    Some(Transition { from: Health::Unknown, to }) => {
                        prop_assert_eq!(i, 0);
                        prop_assert_eq!(to == Health::Up, ok);
                    }
                    // Down only at the end of at least `fall` consecutive failures.
                    Some(Transition { to: Health::Down, .. }) => {
                        prop_assert!(!ok && run >= fall);
                    }
                    // Up only after at least `rise` consecutive successes.
                    Some(Transition { to: Health::Up, .. }) => {
                        prop_assert!(ok && run >= rise);
                    }
                    _ => {}
                }

                // Doubt, and only doubt, is probed fast.
                let doubt = matches!((now, ok), (Health::Up, false) | (Health::Down, true));
                prop_assert_eq!(s.pace() == Pace::Fast, doubt);

                // And the flips are not late: a full run always decides.
                if !ok && run >= fall {
                    prop_assert_eq!(now, Health::Down);
                }
                if ok && run >= rise {
                    prop_assert_eq!(now, Health::Up);
                }
            }
        }
    }
}
