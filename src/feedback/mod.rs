//! nginx's own signals fed back: following its error log, an upstream failure it reports for
//! one of our endpoints brings that endpoint's next probe forward. The log never marks anything
//! down; the probe it brings decides.

pub mod parse;
pub mod tail;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::events::{ErrorLogLineRead, ErrorLogLinesTooLong, Event};
use crate::health::ProbeTrigger;
use crate::metrics::Metrics;
use parse::{parse_line, Target, MAX_LINE};
use tail::{Polled, Tail};

/// How often the log is looked at: the most a log line waits before its probe.
pub const POLL: Duration = Duration::from_millis(100);

/// The error-log follower, restartable when the config names another file.
pub struct Feedback {
    trigger: ProbeTrigger,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    running: Option<(PathBuf, JoinHandle<()>)>,
}

impl Feedback {
    /// A follower that pokes `trigger`, counts into `metrics` and stops on `shutdown`. It
    /// follows nothing until [`Feedback::follow`].
    pub fn new(trigger: ProbeTrigger, metrics: Arc<Metrics>, shutdown: CancellationToken) -> Self {
        Self {
            trigger,
            metrics,
            shutdown,
            running: None,
        }
    }

    /// Follows `path` (`[nginx] error_log`), or nothing when `None`. Following the same path
    /// again changes nothing; another path stops the old follower first. Must be called
    /// inside a tokio runtime.
    pub fn follow(&mut self, path: Option<&Path>) {
        if self.running.as_ref().map(|(p, _)| p.as_path()) == path {
            return;
        }
        if let Some((old, task)) = self.running.take() {
            task.abort();
            tracing::info!(error_log = %old.display(), "Stopped following nginx's error log.");
        }
        let Some(path) = path else {
            return;
        };
        tracing::info!(error_log = %path.display(), "Following nginx's error log for upstream failures.");
        let task = tokio::spawn(run(
            Tail::new(path, MAX_LINE),
            self.trigger.clone(),
            Arc::clone(&self.metrics),
            self.shutdown.clone(),
        ));
        self.running = Some((path.to_owned(), task));
    }
}

impl Drop for Feedback {
    fn drop(&mut self) {
        if let Some((_, task)) = self.running.take() {
            task.abort();
        }
    }
}

/// Polls the log every [`POLL`] until shutdown, poking the trigger for each failure line.
async fn run(
    mut tail: Tail,
    trigger: ProbeTrigger,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut failing = false;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // File reads may block (a slow disk, NFS): off the runtime's threads.
        let polled = tokio::task::spawn_blocking(move || {
            let result = tail.poll();
            (tail, result)
        })
        .await;
        let result = match polled {
            Ok((back, result)) => {
                tail = back;
                result
            }
            Err(error) => {
                tracing::error!(%error, "The error-log follower failed; nginx's error log is no longer followed.");
                return;
            }
        };
        match result {
            Ok(polled) => {
                if failing {
                    failing = false;
                    tracing::info!(error_log = %tail.path().display(), "Reading nginx's error log again.");
                }
                act(&polled, &trigger, &metrics);
            }
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(error_log = %tail.path().display(), %error,
                    "Could not read nginx's error log; probes go on at their own pace.");
            }
            Err(_) => {}
        }
    }
}

/// Pokes the trigger for every upstream failure in `polled`, and counts the lines.
fn act(polled: &Polled, trigger: &ProbeTrigger, metrics: &Metrics) {
    if polled.too_long > 0 {
        ErrorLogLinesTooLong {
            count: polled.too_long,
        }
        .emit(metrics);
    }
    for line in &polled.lines {
        let Some(signal) = parse_line(line) else {
            continue;
        };
        let poked = match &signal.target {
            Target::Endpoint(address) => trigger.endpoint(address),
            Target::Upstream(name) => trigger.upstream(name),
        };
        ErrorLogLineRead {
            signal: &signal,
            poked,
        }
        .emit(metrics);
    }
}
