//! Retrying a registry that failed: the one backoff the Consul and etcd sources share, and
//! errors flattened to one line for logs and `/status`.
//!
//! [`backoff`] is pure (randomness comes in as a number); [`delay`] draws the jitter.

use std::time::Duration;

use rand::Rng;

/// The ceiling of the first retry delay.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(200);
/// The largest retry delay.
pub const BACKOFF_CAP: Duration = Duration::from_secs(3);

/// The delay before retry `attempt` (0 for the first retry after a success): a ceiling of
/// `200 ms · 2^attempt`, capped at 3 s, whose upper half is scaled by `jitter` (in `[0, 1]`,
/// clamped; NaN counts as 0), so that daemons which lost the registry together do not come back in step.
/// Never below half of [`BACKOFF_FIRST`]: a failing registry is never hammered.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let ceiling = BACKOFF_FIRST
        .checked_mul(1u32.checked_shl(attempt).unwrap_or(u32::MAX))
        .unwrap_or(BACKOFF_CAP)
        .min(BACKOFF_CAP);
    // `clamp` keeps NaN, which `mul_f64` would panic on.
    let jitter = if jitter.is_nan() {
        0.0
    } else {
        jitter.clamp(0.0, 1.0)
    };
    ceiling / 2 + (ceiling / 2).mul_f64(jitter)
}

/// [`backoff`] with fresh random jitter.
pub fn delay(attempt: u32) -> Duration {
    backoff(attempt, rand::thread_rng().gen::<f64>())
}

/// An error and its causes as one line, `outer: inner: root`, leaving out a cause whose text
/// the line already holds (a wrapper that prints its source; transport errors that repeat
/// "Connection refused").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !line.contains(&text) {
            line = format!("{line}: {text}");
        }
        source = s.source();
    }
    line
}

/// The innermost cause of `e` (`e` itself when it has none): for a connection that failed,
/// the operating system's reason ("Connection refused (os error 111)").
pub fn root_cause<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> &'a (dyn std::error::Error + 'static) {
    let mut root = e;
    while let Some(s) = root.source() {
        root = s;
    }
    root
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn backoff_doubles_from_200ms_to_the_3s_cap() {
        let ceilings: Vec<u128> = (0..7).map(|n| backoff(n, 1.0).as_millis()).collect();
        assert_eq!(ceilings, [200, 400, 800, 1600, 3000, 3000, 3000]);
        assert_eq!(backoff(0, 0.0), Duration::from_millis(100));
        assert_eq!(backoff(u32::MAX, 1.0), BACKOFF_CAP);
        assert_eq!(backoff(31, 0.0), BACKOFF_CAP / 2);
    }

    #[test]
    fn jitter_outside_zero_to_one_or_nan_is_clamped() {
        assert_eq!(backoff(2, -3.0), backoff(2, 0.0));
        assert_eq!(backoff(2, 7.0), backoff(2, 1.0));
        assert_eq!(backoff(2, f64::NAN), backoff(2, 0.0));
    }

    proptest! {
        #[test]
        fn backoff_stays_between_half_and_all_of_its_capped_ceiling(attempt in 0u32..200, jitter in 0.0f64..=1.0) {
            let d = backoff(attempt, jitter);
            let ceiling = backoff(attempt, 1.0);
            prop_assert!(d <= ceiling && d >= ceiling / 2);
            prop_assert!(ceiling <= BACKOFF_CAP && ceiling >= BACKOFF_FIRST);
            prop_assert!(backoff(attempt + 1, 1.0) >= ceiling, "never shrinks with more failures");
        }

        #[test]
        fn a_drawn_delay_is_within_the_bounds_of_its_attempt(attempt in 0u32..40) {
            let d = delay(attempt);
            prop_assert!(d >= backoff(attempt, 0.0) && d <= backoff(attempt, 1.0));
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("{msg}")]
    struct Layer {
        msg: &'static str,
        #[source]
        inner: Option<Box<Layer>>,
    }

    #[test]
    fn an_error_chain_reads_outer_to_root_with_repeats_said_once() {
        let root = Layer {
            msg: "connection refused",
            inner: None,
        };
        let mid = Layer {
            msg: "connection refused",
            inner: Some(Box::new(root)),
        };
        let top = Layer {
            msg: "consul request failed",
            inner: Some(Box::new(mid)),
        };
        assert_eq!(
            error_chain(&top),
            "consul request failed: connection refused"
        );
    }

    #[test]
    fn an_error_chain_leaves_out_a_cause_the_line_already_holds() {
        let refused = Layer {
            msg: "Connection refused (os error 111)",
            inner: None,
        };
        let connect = Layer {
            msg: "tcp connect error: Connection refused (os error 111)",
            inner: Some(Box::new(refused)),
        };
        let outer = Layer {
            msg: "transport error",
            inner: Some(Box::new(connect)),
        };
        assert_eq!(
            error_chain(&outer),
            "transport error: tcp connect error: Connection refused (os error 111)"
        );
    }
}
