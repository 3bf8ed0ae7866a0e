//! The admin HTTP server: `/` (status page), `/healthz`, `/readyz`, `/status`, `/metrics`.
//!
//! Read-only. It binds where `[admin] listen` says (loopback in every example) and takes its
//! listener from the caller, so tests bind `127.0.0.1:0`.

mod page;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::controller::status::ControllerHandle;
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

/// Serves the admin routes on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    controller: ControllerHandle,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(controller, metrics))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

fn unavailable(what: &str) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, format!("{what}\n")).into_response()
}

async fn healthz(State(s): State<AppState>) -> Response {
    match s.controller.status(LOOP_DEADLINE).await {
        Some(_) => (StatusCode::OK, "ok\n").into_response(),
        None => unavailable("the control loop did not answer within 2s"),
    }
}

async fn readyz(State(s): State<AppState>) -> Response {
    match s.controller.status(LOOP_DEADLINE).await {
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
        Some(r) => Html(page::render(&r)).into_response(),
        None => unavailable("the control loop did not answer within 2s"),
    }
}

async fn metrics_text(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}
