//! When the next apply is due: `settle` for ordinary changes, at once for urgent removals,
//! never sooner than `min_reload_interval` after the last attempt, and after a failure a
//! capped, jittered backoff before the same text is tried again.
//!
//! Pure: time comes in as an argument. The controller tells it what each render found and
//! how each attempt ended, and asks when to wake.

use std::time::Duration;

use tokio::time::Instant;

/// The first retry of a failed apply comes about this long after the failure.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Retries of a failed apply double up to this interval.
pub const RETRY_CAP: Duration = Duration::from_secs(30);
/// Each retry delay is shortened by up to this share at random, so daemons that failed
/// together do not retry together.
pub const RETRY_JITTER: f64 = 0.2;

/// The delay before retry number `failures` (1 after the first failure): [`RETRY_FIRST`]
/// doubling to [`RETRY_CAP`], less up to [`RETRY_JITTER`] of it scaled by `jitter` (0–1).
pub fn retry_delay(failures: u32, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    let ceiling = RETRY_FIRST.saturating_mul(1 << doublings).min(RETRY_CAP);
    ceiling - ceiling.mul_f64(RETRY_JITTER * jitter.clamp(0.0, 1.0))
}

/// A change not applied yet: the desired text differs from the file on disk (or nginx has
/// not confirmed the file on disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    since: Instant,
    urgent: bool,
}

/// The apply schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    settle: Duration,
    min_interval: Duration,
    pending: Option<Pending>,
    last_attempt: Option<Instant>,
    failures: u32,
    retry_at: Option<Instant>,
    /// The pending text is the one that failed last: it waits for `retry_at`.
    is_retry: bool,
    /// The pending change waits until then (too many old nginx generations linger).
    held_until: Option<Instant>,
}

impl Schedule {
    /// A schedule with nothing pending.
    pub fn new(settle: Duration, min_reload_interval: Duration) -> Self {
        Self {
            settle,
            min_interval: min_reload_interval,
            pending: None,
            last_attempt: None,
            failures: 0,
            retry_at: None,
            is_retry: false,
            held_until: None,
        }
    }

    /// Takes new `settle` and `min_reload_interval` values (a config reload).
    pub fn set_pacing(&mut self, settle: Duration, min_reload_interval: Duration) {
        self.settle = settle;
        self.min_interval = min_reload_interval;
    }

    /// A render found the desired text: `differs` from what nginx was given, `urgent` when
    /// the change only takes servers out of rotation, `is_retry` when it is the text whose
    /// apply failed last.
    pub fn on_render(&mut self, now: Instant, differs: bool, urgent: bool, is_retry: bool) {
        if !differs {
            self.pending = None;
            self.failures = 0;
            self.retry_at = None;
            self.is_retry = false;
            self.held_until = None;
            return;
        }
        self.is_retry = is_retry;
        match &mut self.pending {
            // Once urgent, the pending change stays urgent: it still holds the removal.
            Some(p) => p.urgent |= urgent,
            None => self.pending = Some(Pending { since: now, urgent }),
        }
    }

    /// An apply was attempted at `now`; `ok` when nginx runs the desired text (or the file
    /// already held it). Returns the delay before the retry after a failure.
    pub fn on_attempt(&mut self, now: Instant, ok: bool, jitter: f64) -> Option<Duration> {
        self.last_attempt = Some(now);
        self.held_until = None;
        if ok {
            self.pending = None;
            self.failures = 0;
            self.retry_at = None;
            self.is_retry = false;
            return None;
        }
        self.failures += 1;
        let delay = retry_delay(self.failures, jitter);
        self.retry_at = Some(now + delay);
        self.is_retry = true;
        if let Some(p) = &mut self.pending {
            // The retry is paced by the backoff, not by settle again.
            p.urgent = true;
        }
        Some(delay)
    }

    /// Holds the pending change until `until`, when the controller looks again (too many old
    /// nginx generations linger). A later `release` or attempt ends the hold.
    pub fn hold(&mut self, until: Instant) {
        self.held_until = Some(until);
    }

    /// Ends a hold: the pending change now takes a server out, or the limit was lifted.
    pub fn release(&mut self) {
        self.held_until = None;
    }

    /// Whether the pending change is held.
    pub fn is_held(&self) -> bool {
        self.pending.is_some() && self.held_until.is_some()
    }

    /// A config reload (SIGHUP): a failed apply is retried without waiting out its backoff.
    pub fn retry_now(&mut self) {
        self.retry_at = None;
    }

    /// Whether a change is waiting to be applied (or retried).
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Whether the pending change is urgent.
    pub fn is_urgent(&self) -> bool {
        self.pending.is_some_and(|p| p.urgent)
    }

    /// Consecutive failed attempts since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// When the pending change is due, if one is pending.
    pub fn due(&self) -> Option<Instant> {
        let p = self.pending?;
        let mut at = if p.urgent {
            p.since
        } else {
            p.since + self.settle
        };
        if let Some(last) = self.last_attempt {
            at = at.max(last + self.min_interval);
        }
        if let (true, Some(retry)) = (self.is_retry, self.retry_at) {
            at = at.max(retry);
        }
        if let Some(held) = self.held_until {
            at = at.max(held);
        }
        Some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SETTLE: Duration = Duration::from_millis(250);
    const MIN: Duration = Duration::from_secs(2);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn an_ordinary_change_waits_for_settle() {
        let t0 = Instant::now();
        let mut s = Schedule::new(SETTLE, MIN);
        assert_eq!(s.due(), None);
        s.on_render(t0, true, false, false);
        s.on_render(t0 + ms(100), true, false, false);
        assert_eq!(
            s.due(),
            Some(t0 + SETTLE),
            "settle counts from the first change"
        );
    }

    #[test]
    fn an_urgent_change_is_due_at_once_but_not_within_min_reload_interval() {
        let t0 = Instant::now();
        let mut s = Schedule::new(SETTLE, MIN);
        s.on_render(t0, true, true, false);
        assert_eq!(s.due(), Some(t0));
        s.on_attempt(t0, true, 0.0);
        // A second failure 100 ms later waits for min_reload_interval: two reloads, not a storm.
        s.on_render(t0 + ms(100), true, true, false);
        assert_eq!(s.due(), Some(t0 + MIN));
    }

    #[test]
    fn an_urgent_change_after_an_ordinary_one_takes_both_at_once() {
        let t0 = Instant::now();
        let mut s = Schedule::new(SETTLE, MIN);
        s.on_render(t0, true, false, false);
        s.on_render(t0 + ms(50), true, true, false);
        assert_eq!(s.due(), Some(t0));
        assert!(s.is_urgent());
    }

    #[test]
    fn a_failed_text_is_retried_after_a_growing_backoff_and_a_success_resets_it() {
        let t0 = Instant::now();
        let mut s = Schedule::new(SETTLE, Duration::ZERO);
        s.on_render(t0, true, false, false);
        assert_eq!(s.on_attempt(t0 + SETTLE, false, 0.0), Some(RETRY_FIRST));
        assert!(s.is_pending(), "level-triggered: the change stays pending");
        assert_eq!(s.due(), Some(t0 + SETTLE + RETRY_FIRST));
        let t1 = t0 + SETTLE + RETRY_FIRST;
        assert_eq!(s.on_attempt(t1, false, 0.0), Some(RETRY_FIRST * 2));
        assert_eq!(s.due(), Some(t1 + RETRY_FIRST * 2));
        assert_eq!(s.failures(), 2);
        s.on_attempt(t1 + RETRY_FIRST * 2, true, 0.0);
        assert_eq!((s.due(), s.failures()), (None, 0));
    }

    #[test]
    fn a_new_text_after_a_failure_is_tried_on_its_own_schedule() {
        let t0 = Instant::now();
        let mut s = Schedule::new(SETTLE, Duration::ZERO);
        s.on_render(t0, true, false, false);
        s.on_attempt(t0, false, 0.0);
        s.on_render(t0 + ms(10), true, false, false);
        assert_eq!(
            s.due(),
            Some(t0),
            "not held back by the backoff of another text"
        );
        s.on_render(t0 + ms(20), true, false, true);
        assert_eq!(s.due(), Some(t0 + RETRY_FIRST));
    }

    #[test]
    fn a_config_reload_retries_at_once_and_a_render_matching_the_file_clears_everything() {
        let t0 = Instant::now();
        let mut s = Schedule::new(SETTLE, Duration::ZERO);
        s.on_render(t0, true, false, false);
        s.on_attempt(t0, false, 0.0);
        s.retry_now();
        assert_eq!(s.due(), Some(t0));
        s.on_render(t0, false, false, false);
        assert_eq!((s.due(), s.failures()), (None, 0));
    }

    #[test]
    fn a_held_change_waits_for_the_hold_and_a_release_or_attempt_ends_it() {
        let t0 = Instant::now();
        let mut s = Schedule::new(SETTLE, Duration::ZERO);
        s.on_render(t0, true, false, false);
        s.hold(t0 + ms(1000));
        assert!(s.is_held());
        assert_eq!(s.due(), Some(t0 + ms(1000)));
        s.release();
        assert_eq!(s.due(), Some(t0 + SETTLE));
        s.hold(t0 + ms(1000));
        s.on_attempt(t0 + ms(1000), true, 0.0);
        s.on_render(t0 + ms(1100), true, false, false);
        assert!(!s.is_held());
        assert_eq!(s.due(), Some(t0 + ms(1100) + SETTLE));
    }

    #[test]
    fn the_backoff_doubles_from_one_second_to_thirty() {
        let secs: Vec<u64> = (1..=7).map(|n| retry_delay(n, 0.0).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(retry_delay(1, 1.0), ms(800));
    }

    proptest! {
        #[test]
        fn the_backoff_stays_within_its_bounds(failures in 0u32..10_000, jitter in 0.0f64..=1.0) {
            let d = retry_delay(failures, jitter);
            prop_assert!(d >= RETRY_FIRST.mul_f64(1.0 - RETRY_JITTER));
            prop_assert!(d <= RETRY_CAP);
        }
    }
}
