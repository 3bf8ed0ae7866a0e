//! The HTTP surface: Gradio 4.39's routes as Kotaemon exposes them, plus `/_standin/mode`.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::middleware::{self, Next as Middleware};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::{IntervalStream, ReceiverStream};
use tokio_stream::StreamExt;

use crate::chat::{Chats, Next, ServerMessage};
use crate::mode::{Mode, ModeSwitch};

/// Starlette's media type for `StreamingResponse(media_type="text/event-stream")`.
const EVENT_STREAM: &str = "text/event-stream; charset=utf-8";

/// How long an aborted `/queue/data` body waits after its error event before
/// dropping the connection, so the event reaches the client first.
const ABORT_GRACE: Duration = Duration::from_millis(20);

/// Everything the handlers share.
pub struct AppState {
    pub replica: Arc<str>,
    pub mode: ModeSwitch,
    pub chats: Arc<Chats>,
    /// Period of `data: ALIVE` on `/heartbeat/*`, and of `{"msg":"heartbeat"}`
    /// on an idle `/queue/data` stream (Gradio uses 15 s for both).
    pub heartbeat: Duration,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/queue/status", get(queue_status))
        .route("/queue/join", post(queue_join))
        .route("/queue/data", get(queue_data))
        .route("/heartbeat/{session_hash}", get(heartbeat))
        .route("/_standin/mode", get(get_mode).post(set_mode))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Outermost, so it also covers the fallbacks and the control route.
        .layer(middleware::from_fn_with_state(Arc::clone(&state), gate))
        .with_state(state)
}

/// Logs each request; in `hang` mode swallows it without an answer, and in `sick` mode
/// delays it (but the health path and the control route) before answering.
async fn gate(State(state): State<Arc<AppState>>, request: Request, next: Middleware) -> Response {
    let method = request.method().clone();
    let uri = request.uri().clone();
    let started = Instant::now();
    match state.mode.get() {
        Mode::Hang => {
            tracing::debug!(replica = %state.replica, %method, %uri, "Hanging the request as asked.");
            // Never resolves; hyper drops it when the client goes away.
            return std::future::pending().await;
        }
        Mode::Sick(delay) if !matches!(uri.path(), "/queue/status" | "/_standin/mode") => {
            tokio::time::sleep(delay).await;
        }
        _ => {}
    }
    let response = next.run(request).await;
    tracing::debug!(
        replica = %state.replica,
        %method,
        %uri,
        status = response.status().as_u16(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "Answered a request."
    );
    response
}

/// A tiny stand-in for Kotaemon's 545 KB page; tests count traffic by name.
async fn root(State(state): State<Arc<AppState>>) -> String {
    format!("kotaemon-standin {}\n", state.replica)
}

async fn queue_status(State(state): State<Arc<AppState>>) -> Response {
    match state.mode.get() {
        mode @ (Mode::Error | Mode::Sick(_)) => {
            let detail = format!("kotaemon-standin {} is in {mode} mode", state.replica);
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "detail": detail })),
            )
                .into_response();
        }
        Mode::Slow(delay) => tokio::time::sleep(delay).await,
        Mode::Healthy | Mode::Hang | Mode::Exit => {}
    }
    Json(ServerMessage::Estimation {
        event_id: None,
        rank: None,
        queue_size: state.chats.in_progress(),
        rank_eta: None,
    })
    .into_response()
}

/// The parts of Gradio's `PredictBody` the stand-in reads; the rest
/// (`event_data`, `trigger_id`, …) is accepted and ignored.
#[derive(Deserialize)]
struct JoinBody {
    session_hash: String,
    #[serde(default)]
    fn_index: Option<i64>,
    data: Vec<serde::de::IgnoredAny>,
}

async fn queue_join(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let body: JoinBody = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(error) => {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({ "detail": format!("invalid queue join body: {error}") })),
            )
                .into_response()
        }
    };
    let event_id = state.chats.join(&body.session_hash);
    tracing::debug!(
        replica = %state.replica,
        session_hash = %body.session_hash,
        fn_index = ?body.fn_index,
        inputs = body.data.len(),
        %event_id,
        "Joined the queue."
    );
    Json(json!({ "event_id": event_id })).into_response()
}

#[derive(Deserialize)]
struct DataQuery {
    session_hash: Option<String>,
}

type Frame = Result<Bytes, io::Error>;

async fn queue_data(
    State(state): State<Arc<AppState>>,
    Query(query): Query<DataQuery>,
) -> Response {
    let Some(session_hash) = query.session_hash else {
        // FastAPI's validation error for a missing query parameter.
        let detail = json!([{
            "type": "missing",
            "loc": ["query", "session_hash"],
            "msg": "Field required",
            "input": null,
        }]);
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "detail": detail })),
        )
            .into_response();
    };
    let (tx, rx) = mpsc::channel::<Frame>(32);
    tokio::spawn(stream_session(
        Arc::clone(&state.chats),
        session_hash,
        state.heartbeat,
        tx,
    ));
    event_stream(Body::from_stream(ReceiverStream::new(rx)))
}

fn event_stream(body: Body) -> Response {
    ([(CONTENT_TYPE, EVENT_STREAM)], body).into_response()
}

/// Feeds one `/queue/data` response until its session's last event completes.
/// An unknown session gets one `unexpected_error` event and then a body error,
/// which makes hyper drop the connection without the final chunk, as Gradio's
/// re-raised `HTTPException` does.
async fn stream_session(
    chats: Arc<Chats>,
    session_hash: String,
    heartbeat: Duration,
    tx: mpsc::Sender<Frame>,
) {
    let mut quiet_since = Instant::now();
    loop {
        let Some(arrived) = chats.notifier(&session_hash) else {
            return abort(&tx).await;
        };
        // Registered before looking at the mailbox, so no wake-up is lost.
        let notified = arrived.notified_owned();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match chats.next(&session_hash) {
            Next::Unknown => return abort(&tx).await,
            Next::Send { message, close } => {
                if !send(&tx, &message).await {
                    return chats.forget(&session_hash);
                }
                quiet_since = Instant::now();
                if close {
                    // The session is already gone; a lost close_stream changes nothing.
                    let _delivered = send(&tx, &ServerMessage::CloseStream).await;
                    return;
                }
            }
            Next::Wait => tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(quiet_since + heartbeat) => {
                    if !send(&tx, &ServerMessage::Heartbeat).await {
                        return chats.forget(&session_hash);
                    }
                    quiet_since = Instant::now();
                }
                () = tx.closed() => return chats.forget(&session_hash),
            },
        }
    }
}

/// `false` once the client has gone away.
async fn send(tx: &mpsc::Sender<Frame>, message: &ServerMessage) -> bool {
    tx.send(Ok(Bytes::from(message.to_sse()))).await.is_ok()
}

async fn abort(tx: &mpsc::Sender<Frame>) {
    if !send(tx, &ServerMessage::session_not_found()).await {
        return;
    }
    // Let hyper flush the event before the error tears the connection down.
    tokio::time::sleep(ABORT_GRACE).await;
    // If the client already left there is no connection left to abort.
    let _sent = tx
        .send(Err(io::Error::other("404: Session not found.")))
        .await;
}

/// `data: ALIVE` at once and then every heartbeat period, forever.
async fn heartbeat(
    State(state): State<Arc<AppState>>,
    Path(session_hash): Path<String>,
) -> Response {
    tracing::debug!(replica = %state.replica, %session_hash, "Heartbeat stream opened.");
    let mut ticks = tokio::time::interval(state.heartbeat);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let alive = IntervalStream::new(ticks)
        .map(|_| Ok::<_, io::Error>(Bytes::from_static(b"data: ALIVE\n\n")));
    event_stream(Body::from_stream(alive))
}

async fn get_mode(State(state): State<Arc<AppState>>) -> String {
    format!("{}\n", state.mode.get())
}

/// Body: `healthy`, `error`, `hang`, `slow:<ms>`, `sick:<ms>` or `exit` (which
/// exits without answering).
async fn set_mode(State(state): State<Arc<AppState>>, body: String) -> Response {
    match body.parse::<Mode>() {
        Ok(mode) => {
            state.mode.set(mode, "control route");
            format!("{}: mode {mode}\n", state.replica).into_response()
        }
        Err(error) => (StatusCode::BAD_REQUEST, format!("{error}\n")).into_response(),
    }
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "detail": "Not Found" })),
    )
        .into_response()
}

async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(json!({ "detail": "Method Not Allowed" })),
    )
        .into_response()
}
