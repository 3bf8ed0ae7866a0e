//! The arithmetic of a blocking-query loop: index bookkeeping, rate limit, timeouts (the
//! backoff is [`crate::sources::retry`]'s).
//!
//! Pure: time comes in as arguments, randomness as a number in `[0, 1)`.

use std::time::Duration;

use tokio::time::Instant;

use crate::model::Endpoint;
use crate::sources::retry::backoff;
use crate::sources::Skipped;

/// Consul caps `wait` at 10 minutes.
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// Below this a blocking query is a poll loop.
pub const MIN_WAIT: Duration = Duration::from_millis(100);
/// Slack past `wait + wait/16` before a silent request is abandoned.
pub const TIMEOUT_MARGIN: Duration = Duration::from_secs(2);
/// Requests never start closer together than this.
pub const MIN_GAP: Duration = Duration::from_millis(100);
/// Requests allowed back to back before the rate limit bites.
pub const BURST: u32 = 4;
/// The sustained rate once the burst is spent: one request per this interval.
pub const REFILL: Duration = Duration::from_millis(500);

/// The index for the next request after an answer carrying `returned`, per Consul's
/// "Blocking Queries — Implementation Details": an index lower than the last one means the
/// servers' state went back (a snapshot restore), so restart from 0 (one non-blocking read);
/// otherwise use it, but never below 1, because index 0 would not block and would busy-loop.
pub fn next_index(previous: u64, returned: u64) -> u64 {
    if returned < previous {
        0
    } else {
        returned.max(1)
    }
}

/// How long a request may take before it is abandoned: Consul may hold it `wait` plus up to
/// `wait/16` of jitter; past that plus a margin, the connection is presumed dead.
pub fn request_timeout(wait: Duration) -> Duration {
    wait + wait / 16 + TIMEOUT_MARGIN
}

/// `wait` as Consul reads it (a Go duration): whole seconds when exact, else milliseconds.
pub fn wait_param(wait: Duration) -> String {
    if wait.subsec_nanos() == 0 {
        format!("{}s", wait.as_secs())
    } else {
        format!("{}ms", wait.as_millis().max(1))
    }
}

/// A token bucket with a minimum gap: quick successive answers (a change right after a
/// change) go through at once, a churning index degrades to one request per [`REFILL`].
#[derive(Debug, Clone)]
pub struct RateLimit {
    tokens: f64,
    updated: Instant,
    last_start: Option<Instant>,
}

impl RateLimit {
    /// A full bucket.
    pub fn new(now: Instant) -> Self {
        Self {
            tokens: f64::from(BURST),
            updated: now,
            last_start: None,
        }
    }

    fn tokens_at(&self, now: Instant) -> f64 {
        let refilled =
            now.saturating_duration_since(self.updated).as_secs_f64() / REFILL.as_secs_f64();
        (self.tokens + refilled).min(f64::from(BURST))
    }

    /// How long to wait before the next request may start.
    pub fn delay(&self, now: Instant) -> Duration {
        let gap = self
            .last_start
            .map(|last| (last + MIN_GAP).saturating_duration_since(now))
            .unwrap_or_default();
        let missing = 1.0 - self.tokens_at(now);
        let refill = if missing > 0.0 {
            REFILL.mul_f64(missing)
        } else {
            Duration::ZERO
        };
        gap.max(refill)
    }

    /// Records a request starting at `now` (after waiting [`RateLimit::delay`]).
    pub fn start(&mut self, now: Instant) {
        self.tokens = (self.tokens_at(now) - 1.0).max(0.0);
        self.updated = now;
        self.last_start = Some(now);
    }
}

/// What the loop remembers between rounds: the index, the failure streak, what was last sent.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    index: u64,
    failures: u32,
    in_outage: bool,
    last_sent: Option<(Vec<Endpoint>, Skipped)>,
}

/// What to do with an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerOutcome {
    /// The snapshot to send (endpoints, skipped, newly skipped), when it differs from the
    /// last one sent, left out an entry the previous answer did not, or an outage just ended.
    pub send: Option<(Vec<Endpoint>, Skipped, usize)>,
    /// The answer's index was lower than the last one: the loop restarted from 0.
    pub index_went_back: Option<(u64, u64)>,
    /// The number of failed requests that preceded this answer (0 when there was no outage).
    pub recovered_after: u32,
}

impl Progress {
    /// The `index` for the next request: 0 (answer at once) while failing, so that the first
    /// request after an outage confirms recovery now instead of blocking for `wait`.
    pub fn index(&self) -> u64 {
        if self.in_outage {
            0
        } else {
            self.index
        }
    }

    /// Records a good answer with index `returned`, its parsed endpoints, the entries it left
    /// out and how many of those the previous answer did not leave out.
    pub fn on_answer(
        &mut self,
        returned: u64,
        endpoints: Vec<Endpoint>,
        skipped: Skipped,
        newly_skipped: usize,
    ) -> AnswerOutcome {
        let next = next_index(self.index, returned);
        let index_went_back = (returned < self.index).then_some((self.index, returned));
        self.index = next;
        let recovered_after = std::mem::take(&mut self.failures);
        let was_out = std::mem::take(&mut self.in_outage);
        let snapshot = (endpoints, skipped);
        // A new invalid entry is always sent, even in place of another one beyond the listed
        // few: the counter must see it.
        let send = if was_out || newly_skipped > 0 || self.last_sent.as_ref() != Some(&snapshot) {
            self.last_sent = Some(snapshot.clone());
            Some((snapshot.0, snapshot.1, newly_skipped))
        } else {
            None
        };
        AnswerOutcome {
            send,
            index_went_back,
            recovered_after,
        }
    }

    /// Records a failed request. Returns whether this failure starts an outage (report it
    /// once) and the delay before the retry.
    pub fn on_failure(&mut self, jitter: f64) -> (bool, Duration) {
        let attempt = self.failures;
        self.failures = self.failures.saturating_add(1);
        let starts_outage = !std::mem::replace(&mut self.in_outage, true);
        (starts_outage, backoff(attempt, jitter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Endpoint;

    fn ep(addr: &str) -> Endpoint {
        Endpoint::plain(addr.parse().unwrap(), "test")
    }

    fn skipped(total: usize) -> Skipped {
        Skipped {
            total,
            listed: vec![],
        }
    }

    #[test]
    fn index_that_goes_backwards_restarts_from_zero() {
        assert_eq!(next_index(100, 7), 0);
        assert_eq!(next_index(0, 7), 7);
        assert_eq!(next_index(7, 7), 7);
        assert_eq!(next_index(7, 9), 9);
    }

    #[test]
    fn index_zero_from_consul_is_treated_as_one() {
        assert_eq!(next_index(0, 0), 1);
        assert_eq!(next_index(1, 0), 0, "backwards first: restart");
        assert_eq!(next_index(0, 0), 1, "then clamp");
    }

    #[test]
    fn timeout_is_wait_plus_a_sixteenth_plus_margin() {
        assert_eq!(
            request_timeout(Duration::from_secs(16)),
            Duration::from_secs(19)
        );
        assert_eq!(
            request_timeout(Duration::from_secs(60)),
            Duration::from_millis(65_750)
        );
    }

    #[test]
    fn wait_is_written_as_a_go_duration() {
        assert_eq!(wait_param(Duration::from_secs(60)), "60s");
        assert_eq!(wait_param(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn rate_limit_lets_a_burst_through_then_spaces_requests() {
        let t0 = Instant::now();
        let mut rl = RateLimit::new(t0);
        assert_eq!(rl.delay(t0), Duration::ZERO);
        rl.start(t0);
        assert_eq!(
            rl.delay(t0),
            MIN_GAP,
            "never two requests within the minimum gap"
        );
        let mut now = t0;
        for _ in 1..BURST {
            now += rl.delay(now);
            rl.start(now);
        }
        assert_eq!(
            now - t0,
            MIN_GAP * (BURST - 1),
            "the burst only pays the minimum gap"
        );
        let d = rl.delay(now);
        assert!(
            d > MIN_GAP && d <= REFILL,
            "an empty bucket waits for a refill: {d:?}"
        );
        // After a quiet minute the bucket is full again.
        assert_eq!(rl.delay(now + Duration::from_secs(60)), Duration::ZERO);
    }

    #[test]
    fn sends_only_changes_and_always_after_an_outage() {
        let mut p = Progress::default();
        assert_eq!(p.index(), 0);
        let first = p.on_answer(5, vec![ep("10.0.0.1:80")], skipped(0), 0);
        assert!(first.send.is_some());
        assert_eq!(p.index(), 5);
        assert_eq!(
            p.on_answer(6, vec![ep("10.0.0.1:80")], skipped(0), 0).send,
            None,
            "same list, no send"
        );
        assert!(
            p.on_answer(7, vec![ep("10.0.0.1:80")], skipped(1), 0)
                .send
                .is_some(),
            "skipped count changed"
        );

        let (starts, d1) = p.on_failure(0.0);
        let (again, d2) = p.on_failure(0.0);
        assert!(starts && !again, "an outage is reported once");
        assert!(d2 > d1);
        assert_eq!(
            p.index(),
            0,
            "the first request after a failure does not block"
        );
        let back = p.on_answer(7, vec![ep("10.0.0.1:80")], skipped(1), 0);
        assert_eq!(back.recovered_after, 2);
        assert!(
            back.send.is_some(),
            "an unchanged list is re-sent after an outage"
        );
        assert_eq!(p.index(), 7, "and blocking resumes on the remembered index");
        assert!(p.on_failure(0.0).0, "a new outage is reported again");
    }

    #[test]
    fn a_newly_skipped_entry_is_sent_even_when_the_list_looks_the_same() {
        let mut p = Progress::default();
        p.on_answer(5, vec![], skipped(30), 30);
        assert_eq!(p.on_answer(6, vec![], skipped(30), 0).send, None);
        let out = p.on_answer(7, vec![], skipped(30), 1);
        assert_eq!(out.send, Some((vec![], skipped(30), 1)));
    }

    #[test]
    fn an_index_reset_is_reported_and_restarts_the_loop() {
        let mut p = Progress::default();
        p.on_answer(100, vec![], skipped(0), 0);
        let out = p.on_answer(3, vec![], skipped(0), 0);
        assert_eq!(out.index_went_back, Some((100, 3)));
        assert_eq!(p.index(), 0);
        p.on_answer(3, vec![], skipped(0), 0);
        assert_eq!(p.index(), 3);
    }
}
