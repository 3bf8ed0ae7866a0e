//! The admin HTTP server: `/` (status page), `/healthz`, `/readyz`, `/status`, `/metrics`.
//!
//! Read-only. It binds where `[admin] listen` says (loopback in every example) and takes its
//! listener from the caller, so tests bind `127.0.0.1:0`.
//!
//! It cannot starve the daemon: at most `max_connections` connections are open at once (one
//! more is closed as soon as it is accepted), a request head must arrive within
//! `header_read_timeout`, and the cap leaves [`RESERVED_FDS`] of the process's file
//! descriptors to probes, sources and applies (see [`connection_cap`]).

mod page;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::controller::status::ControllerHandle;
use crate::events::{AdminConnectionRefused, Event};
use crate::metrics::Metrics;

/// How long the controller loop may take to answer before `/healthz` calls it stuck.
const LOOP_DEADLINE: Duration = Duration::from_secs(2);

#[derive(Clone)]
struct AppState {
    controller: ControllerHandle,
    metrics: Arc<Metrics>,
}

/// The admin routes.
pub fn router(controller: ControllerHandle, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status_json))
        .route("/metrics", get(metrics_text))
        .with_state(AppState {
            controller,
            metrics,
        })
}

/// File descriptors the admin server never takes: one probe connection each for the 512
/// probes that may run at once, and 128 for sources, the include file, `nginx -t` and logs.
pub const RESERVED_FDS: u64 = 512 + 128;

/// The fewest admin connections allowed, however low the descriptor limit.
const MIN_CONNECTIONS: usize = 4;

/// How long the accept loop pauses after an accept error (such as "Too many open files").
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How often a refused connection or an accept error is logged at most.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// How many admin connections may be open at once: `configured`, but never so many that
/// they would eat into the [`RESERVED_FDS`] below the process's open-file limit `nofile`.
pub fn connection_cap(configured: usize, nofile: u64) -> usize {
    let spare = nofile.saturating_sub(RESERVED_FDS);
    let spare = usize::try_from(spare).unwrap_or(usize::MAX);
    configured.min(spare).max(MIN_CONNECTIONS)
}

/// Connection limits of the admin server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// A connection that has not sent a whole request head by then is closed.
    pub header_read_timeout: Duration,
}

/// Logs at most once per [`LOG_EVERY`], with how many times it happened in between.
#[derive(Debug, Default)]
struct Throttled {
    last: Option<Instant>,
    count: u64,
}

impl Throttled {
    /// Counts one occurrence; `Some(count)` when it is time to log.
    fn hit(&mut self, now: Instant) -> Option<u64> {
        self.count += 1;
        if self.last.is_some_and(|l| now.duration_since(l) < LOG_EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// Serves the admin routes on `listener` until `shutdown`, within `limits`.
pub async fn serve(
    listener: TcpListener,
    controller: ControllerHandle,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    limits: Limits,
) -> std::io::Result<()> {
    let service = TowerToHyperService::new(router(controller, Arc::clone(&metrics)));
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (mut refused, mut failed) = (Throttled::default(), Throttled::default());
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                if let Some(times) = failed.hit(Instant::now()) {
                    tracing::warn!(%error, times, "The admin server could not accept a connection; pausing briefly.");
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            drop(stream);
            AdminConnectionRefused {
                max_connections: limits.max_connections,
                log_times: refused.hit(Instant::now()),
            }
            .emit(&metrics);
            continue;
        };
        let (service, stop) = (service.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                // A failed connection (a timeout, a reset) concerns only its client.
                _ = connection => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

fn unavailable(what: &str) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, format!("{what}\n")).into_response()
}

async fn healthz(State(s): State<AppState>) -> Response {
    match s.controller.pulse(LOOP_DEADLINE).await {
        Some(_) => (StatusCode::OK, "ok\n").into_response(),
        None => unavailable("the control loop did not answer within 2s"),
    }
}

async fn readyz(State(s): State<AppState>) -> Response {
    match s.controller.pulse(LOOP_DEADLINE).await {
        Some(r) if r.ready => (StatusCode::OK, "ready\n").into_response(),
        Some(_) => unavailable("not ready: waiting for sources, first probes or the first apply"),
        None => unavailable("the control loop did not answer within 2s"),
    }
}

async fn status_json(State(s): State<AppState>) -> Response {
    match s.controller.status(LOOP_DEADLINE).await {
        Some(r) => Json(r).into_response(),
        None => unavailable("the control loop did not answer within 2s"),
    }
}

async fn status_page(State(s): State<AppState>) -> Response {
    match s.controller.status(LOOP_DEADLINE).await {
        Some(r) => match page::render(&r) {
            Ok(html) => Html(html).into_response(),
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "Could not render the status page.");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the status page failed to render\n",
                )
                    .into_response()
            }
        },
        None => unavailable("the control loop did not answer within 2s"),
    }
}

async fn metrics_text(State(s): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        s.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::status::{Pulse, StatusRequest};

    /// An admin state whose controller answers pulses with `ready` and never a full report.
    fn pulse_only(ready: bool) -> AppState {
        let (controller, mut rx) = ControllerHandle::new();
        tokio::spawn(async move {
            while let Some(request) = rx.recv().await {
                if let StatusRequest::Pulse(tx) = request {
                    // The test may have stopped waiting.
                    let _ = tx.send(Pulse { ready });
                }
            }
        });
        AppState {
            controller,
            metrics: Arc::new(Metrics::new()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn healthz_and_readyz_answer_from_the_pulse_without_a_report() {
        assert_eq!(healthz(State(pulse_only(false))).await.status(), 200);
        assert_eq!(readyz(State(pulse_only(false))).await.status(), 503);
        assert_eq!(readyz(State(pulse_only(true))).await.status(), 200);
        // The full report is never answered here: the page waits out the deadline.
        assert_eq!(status_json(State(pulse_only(true))).await.status(), 503);
    }

    #[test]
    fn the_cap_is_the_configured_one_when_descriptors_are_plenty() {
        assert_eq!(connection_cap(64, 1_048_576), 64);
    }

    #[test]
    fn the_cap_leaves_the_reserved_descriptors_to_the_daemon() {
        assert_eq!(connection_cap(1_000, 1024), 1024 - RESERVED_FDS as usize);
        assert_eq!(connection_cap(64, 700), 60);
    }

    #[test]
    fn the_cap_never_drops_below_a_few_connections() {
        assert_eq!(connection_cap(64, 256), MIN_CONNECTIONS);
    }

    #[test]
    fn throttled_logs_the_first_then_once_per_interval_with_the_count() {
        let mut t = Throttled::default();
        let t0 = Instant::now();
        assert_eq!(t.hit(t0), Some(1));
        assert_eq!(t.hit(t0 + Duration::from_secs(1)), None);
        assert_eq!(t.hit(t0 + Duration::from_secs(2)), None);
        assert_eq!(t.hit(t0 + LOG_EVERY + Duration::from_secs(1)), Some(3));
    }
}
