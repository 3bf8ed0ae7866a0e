//! The stand-in's HTTP API: the Consul endpoints upstreamd and its tests use, plus `/_standin/`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use rand::Rng;
use serde_json::json;
use tokio::sync::watch;

use crate::catalog::{ApiError, Catalog, Registration};

/// Consul's default and maximum blocking `wait`.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);

/// What `/v1/health/*` does instead of answering (set through `POST /_standin/fault`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Error500,
    Hang,
}

#[derive(Debug, Default)]
struct Stats {
    requests: BTreeMap<String, u64>,
    last_token: Option<String>,
    last_health_token: Option<String>,
    last_health_query: Option<String>,
}

/// Everything the handlers share.
pub struct Shared {
    catalog: watch::Sender<Catalog>,
    token: Option<String>,
    fault: Mutex<Fault>,
    stats: Mutex<Stats>,
}

impl Shared {
    /// A stand-in over `catalog`, enforcing `token` on `/v1/` when given.
    pub fn new(catalog: Catalog, token: Option<String>) -> Arc<Self> {
        Arc::new(Self {
            catalog: watch::Sender::new(catalog),
            token,
            fault: Mutex::new(Fault::None),
            stats: Mutex::new(Stats::default()),
        })
    }
}

/// A poisoned lock only means another handler panicked mid-update of counters; keep going.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The router.
pub fn router(shared: Arc<Shared>) -> Router {
    let v1 = Router::new()
        .route("/v1/health/service/{service}", get(health_service))
        .route("/v1/agent/service/register", put(register))
        .route("/v1/agent/service/deregister/{id}", put(deregister))
        .route(
            "/v1/agent/service/maintenance/{id}",
            put(service_maintenance),
        )
        .route("/v1/agent/maintenance", put(node_maintenance))
        .route("/v1/agent/check/{verb}/{id}", put(check_update))
        .route(
            "/v1/status/leader",
            get(|| async { Json("127.0.0.1:8300") }),
        )
        .route_layer(middleware::from_fn_with_state(
            shared.clone(),
            acl_and_count,
        ));
    Router::new()
        .merge(v1)
        .route("/_standin/fault", post(set_fault))
        .route("/_standin/stats", get(stats))
        .with_state(shared)
}

fn token_of(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    let header = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    header("x-consul-token")
        .map(str::to_owned)
        .or_else(|| {
            header("authorization")
                .and_then(|a| a.strip_prefix("Bearer "))
                .map(str::to_owned)
        })
        .or_else(|| {
            query_pairs(query)
                .into_iter()
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v)
        })
}

/// Counts every `/v1/` request, records the token it carried, and enforces `--token`.
async fn acl_and_count(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let token = token_of(req.headers(), req.uri().query());
    {
        let mut st = lock(&s.stats);
        *st.requests.entry(path.clone()).or_default() += 1;
        if token.is_some() {
            st.last_token.clone_from(&token);
        }
        if path.starts_with("/v1/health/") {
            st.last_health_token.clone_from(&token);
            st.last_health_query = Some(req.uri().query().unwrap_or_default().to_owned());
        }
    }
    match (&s.token, token) {
        (None, _) => next.run(req).await,
        (Some(want), Some(got)) if *want == got => next.run(req).await,
        (Some(_), Some(_)) => (StatusCode::FORBIDDEN, "ACL not found").into_response(),
        (Some(_), None) => (StatusCode::FORBIDDEN, "Permission denied").into_response(),
    }
}

fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    let url = format!("http://standin/?{}", query.unwrap_or_default());
    url::Url::parse(&url)
        .map(|u| {
            u.query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn param<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Go's `strconv.ParseBool`, with a bare `?flag` meaning true as in Consul.
fn flag(pairs: &[(String, String)], key: &str) -> Result<bool, ApiError> {
    match param(pairs, key) {
        None => Ok(false),
        Some("" | "1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
        Some(other) => Err(ApiError {
            status: 400,
            message: format!("Invalid value for {key}: {other:?}"),
        }),
    }
}

/// A maintenance call's query: its required `enable`, as Consul reads it, and its `reason`.
fn maintenance_args(query: Option<&str>) -> Result<(bool, Option<String>), ApiError> {
    let pairs = query_pairs(query);
    if param(&pairs, "enable").is_none() {
        return Err(ApiError {
            status: 400,
            message: "Missing value for enable".into(),
        });
    }
    let enable = flag(&pairs, "enable")?;
    Ok((enable, param(&pairs, "reason").map(str::to_owned)))
}

/// A Go duration (`"5s"`, `"100ms"`, `"1m30s"`, `"1.5s"`).
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    Duration::try_from_secs_f64(total).ok()
}

fn api_error(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, e.message).into_response()
}

/// `GET /v1/health/service/:service` with `index`, `wait`, `tag` (repeatable), `dc`, `passing`.
async fn health_service(
    State(s): State<Arc<Shared>>,
    Path(service): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let fault = *lock(&s.fault);
    match fault {
        Fault::Error500 => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "standin: injected error").into_response()
        }
        Fault::Hang => std::future::pending::<()>().await,
        Fault::None => {}
    }
    let pairs = query_pairs(q.as_deref());
    let index = match param(&pairs, "index").map(str::parse::<u64>) {
        None => 0,
        Some(Ok(i)) => i,
        Some(Err(_)) => return (StatusCode::BAD_REQUEST, "Invalid index").into_response(),
    };
    let wait = match param(&pairs, "wait").map(parse_go_duration) {
        None => DEFAULT_WAIT,
        Some(Some(w)) => w.min(MAX_WAIT),
        Some(None) => return (StatusCode::BAD_REQUEST, "Invalid wait time").into_response(),
    };
    let passing = match flag(&pairs, "passing") {
        Ok(p) => p,
        Err(e) => return api_error(e),
    };
    let tags: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "tag")
        .map(|(_, v)| v.clone())
        .collect();
    if let Some(dc) = param(&pairs, "dc").filter(|dc| !dc.is_empty()) {
        if dc != s.catalog.borrow().datacenter() {
            return (StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter").into_response();
        }
    }
    if index > 0 {
        let mut rx = s.catalog.subscribe();
        let epoch = rx.borrow().epoch();
        // Consul adds up to wait/16 of jitter to spread wake-ups.
        let jitter = wait.mul_f64(rand::thread_rng().gen_range(0.0..1.0) / 16.0);
        // Both outcomes — a change, or the wait running out (or the sender gone, which cannot
        // happen while `s` lives) — end in the same answer: the current state.
        let _ = tokio::time::timeout(
            wait + jitter,
            rx.wait_for(|c| c.epoch() != epoch || c.index() > index),
        )
        .await;
    }
    let (index, body) = {
        let c = s.catalog.borrow();
        (c.index(), c.health(&service, &tags, passing))
    };
    let mut resp = Json(body).into_response();
    let h = resp.headers_mut();
    h.insert("x-consul-index", HeaderValue::from(index));
    h.insert("x-consul-knownleader", HeaderValue::from_static("true"));
    h.insert("x-consul-lastcontact", HeaderValue::from_static("0"));
    resp
}

/// Applies one catalog change and wakes blocked queries if it succeeded.
fn change(
    s: &Shared,
    what: String,
    f: impl FnOnce(&mut Catalog) -> Result<(), ApiError>,
) -> Response {
    let mut result = Ok(());
    s.catalog.send_if_modified(|c| {
        let before = (c.index(), c.epoch());
        result = f(c);
        (c.index(), c.epoch()) != before
    });
    match result {
        Ok(()) => {
            eprintln!(
                "consul-standin: {what} (index {})",
                s.catalog.borrow().index()
            );
            StatusCode::OK.into_response()
        }
        Err(e) => api_error(e),
    }
}

async fn register(State(s): State<Arc<Shared>>, body: String) -> Response {
    match serde_json::from_str::<Registration>(&body) {
        Ok(reg) => change(
            &s,
            format!("registered {:?}", reg.id.as_deref().unwrap_or(&reg.name)),
            |c| c.register(reg),
        ),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            format!("Request decode failed: {e}"),
        )
            .into_response(),
    }
}

async fn deregister(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    change(&s, format!("deregistered {id:?}"), |c| c.deregister(&id))
}

async fn service_maintenance(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let (enable, reason) = match maintenance_args(q.as_deref()) {
        Ok(args) => args,
        Err(e) => return api_error(e),
    };
    change(&s, format!("service {id:?} maintenance {enable}"), |c| {
        c.service_maintenance(&id, enable, reason.as_deref())
    })
}

async fn node_maintenance(State(s): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    let (enable, reason) = match maintenance_args(q.as_deref()) {
        Ok(args) => args,
        Err(e) => return api_error(e),
    };
    change(&s, format!("node maintenance {enable}"), |c| {
        c.node_maintenance(enable, reason.as_deref());
        Ok(())
    })
}

/// `PUT /v1/agent/check/{pass,warn,fail}/:id?note=..` and `/update/:id` with `{Status, Output}`.
async fn check_update(
    State(s): State<Arc<Shared>>,
    Path((verb, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    body: String,
) -> Response {
    let pairs = query_pairs(q.as_deref());
    let (status, output) = match verb.as_str() {
        "pass" => (
            "passing".to_owned(),
            param(&pairs, "note").map(str::to_owned),
        ),
        "warn" => (
            "warning".to_owned(),
            param(&pairs, "note").map(str::to_owned),
        ),
        "fail" => (
            "critical".to_owned(),
            param(&pairs, "note").map(str::to_owned),
        ),
        "update" => match serde_json::from_str::<serde_json::Value>(&body) {
            Ok(v) => (
                v["Status"].as_str().unwrap_or_default().to_owned(),
                v["Output"].as_str().map(str::to_owned),
            ),
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("Request decode failed: {e}"),
                )
                    .into_response()
            }
        },
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    change(&s, format!("check {id:?} {status}"), |c| {
        c.update_check(&id, &status, output.as_deref())
    })
}

/// `POST /_standin/fault` with `none`, `error500`, `hang` or `reset-index`.
async fn set_fault(State(s): State<Arc<Shared>>, body: String) -> Response {
    let fault = match body.trim() {
        "none" => Fault::None,
        "error500" => Fault::Error500,
        "hang" => Fault::Hang,
        "reset-index" => {
            s.catalog.send_modify(Catalog::reset_index);
            eprintln!(
                "consul-standin: index reset to {}",
                s.catalog.borrow().index()
            );
            return (StatusCode::OK, "ok").into_response();
        }
        other => {
            return (StatusCode::BAD_REQUEST, format!("unknown fault {other:?}")).into_response()
        }
    };
    *lock(&s.fault) = fault;
    eprintln!("consul-standin: fault {fault:?}");
    (StatusCode::OK, "ok").into_response()
}

/// `GET /_standin/stats`: request counts per path and the last tokens seen.
async fn stats(State(s): State<Arc<Shared>>) -> Response {
    let st = lock(&s.stats);
    let health_requests: u64 = st
        .requests
        .iter()
        .filter(|(p, _)| p.starts_with("/v1/health/"))
        .map(|(_, n)| n)
        .sum();
    Json(json!({
        "requests": st.requests,
        "health_requests": health_requests,
        "last_token": st.last_token,
        "last_health_token": st.last_health_token,
        "last_health_query": st.last_health_query,
        "index": s.catalog.borrow().index(),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_go_durations() {
        assert_eq!(parse_go_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_go_duration("100ms"), Some(Duration::from_millis(100)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        for bad in ["", "5", "s", "5x", "-1s"] {
            assert_eq!(parse_go_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn repeated_tags_and_bare_flags_are_read_from_the_query() {
        let pairs = query_pairs(Some("tag=a&tag=b%20c&passing&index=3"));
        let tags: Vec<&str> = pairs
            .iter()
            .filter(|(k, _)| k == "tag")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(tags, ["a", "b c"]);
        assert_eq!(flag(&pairs, "passing"), Ok(true));
        assert_eq!(flag(&pairs, "stale"), Ok(false));
    }
}
