//! One HTTP probe of one endpoint: GET the health path, judge status and body, within a deadline.

use std::fmt;
use std::time::Duration;

use reqwest::header::{HeaderValue, HOST};
use tokio::time::{timeout_at, Instant};

use crate::config::HealthConfig;
use crate::model::Address;

/// The most body read while looking for `expect_body`; a body without the substring in its
/// first 64 KiB is a [`ProbeOutcome::BodyMismatch`].
pub const MAX_BODY_SCAN: usize = 64 * 1024;

/// How long an idle connection stays in the pool: below uvicorn's default 5 s keep-alive
/// timeout (Gradio, so Kotaemon, serves on uvicorn), so that a probe does not pick a
/// connection the server is about to close and fail for no fault of the endpoint.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// The `User-Agent` of every probe.
pub const USER_AGENT: &str = concat!("upstreamd/", env!("CARGO_PKG_VERSION"));

/// The result of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The status was in `expect_status` and the body held `expect_body`, if set.
    Ok,
    /// The status was outside `expect_status` (redirects are not followed).
    BadStatus(u16),
    /// The status was fine but the first 64 KiB of the body lacked `expect_body`.
    BodyMismatch,
    /// No verdict within `timeout` (connect to last byte read).
    Timeout,
    /// Connecting, sending or reading failed (refused, reset, bad response, …).
    Error(String),
}

impl ProbeOutcome {
    /// Whether the probe passed.
    pub fn is_ok(&self) -> bool {
        matches!(self, ProbeOutcome::Ok)
    }

    /// The `result` label of `upstreamd_probes_total`: `ok`, `bad_status` (also a body
    /// mismatch), `timeout` or `error`.
    pub fn label(&self) -> &'static str {
        match self {
            ProbeOutcome::Ok => "ok",
            ProbeOutcome::BadStatus(_) | ProbeOutcome::BodyMismatch => "bad_status",
            ProbeOutcome::Timeout => "timeout",
            ProbeOutcome::Error(_) => "error",
        }
    }
}

impl fmt::Display for ProbeOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeOutcome::Ok => f.write_str("ok"),
            ProbeOutcome::BadStatus(s) => write!(f, "unexpected status {s}"),
            ProbeOutcome::BodyMismatch => f.write_str("body lacks the expected text"),
            ProbeOutcome::Timeout => f.write_str("timed out"),
            ProbeOutcome::Error(e) => write!(f, "failed: {e}"),
        }
    }
}

/// Builds the HTTP client of probes: keep-alive pool of `max_idle_per_host` idle connections
/// per endpoint, no proxy from the environment, no redirects followed, `User-Agent:
/// upstreamd/<version>`. Share one per upstream; never build one per probe.
pub fn build_client(max_idle_per_host: usize) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(USER_AGENT)
        .pool_max_idle_per_host(max_idle_per_host)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build()
}

/// Probes `http://{address}{cfg.path}` once.
///
/// The whole probe, connect to the last byte read, is bounded by `cfg.timeout`. The status
/// must be within `cfg.expect_status`; with `cfg.expect_body`, at most 64 KiB of body is
/// read, stopping as soon as the substring is seen. `cfg.host`, if set, is sent as `Host`.
pub async fn probe_once(
    client: &reqwest::Client,
    address: &Address,
    cfg: &HealthConfig,
) -> ProbeOutcome {
    match ProbeTarget::new(address, cfg) {
        Ok(target) => target.probe(client, cfg).await,
        Err(outcome) => outcome,
    }
}

/// What a probe sends, built once per endpoint task so a probe only clones it.
#[derive(Debug, Clone)]
pub(crate) struct ProbeTarget {
    url: reqwest::Url,
    host: Option<HeaderValue>,
}

impl ProbeTarget {
    /// The URL and Host header for `address`; the error is the outcome every probe would have.
    pub(crate) fn new(address: &Address, cfg: &HealthConfig) -> Result<Self, ProbeOutcome> {
        let slash = if cfg.path.starts_with('/') { "" } else { "/" };
        let url = format!("http://{address}{slash}{}", cfg.path);
        let url = reqwest::Url::parse(&url)
            .map_err(|e| ProbeOutcome::Error(format!("invalid probe URL `{url}`: {e}")))?;
        let host = match &cfg.host {
            None => None,
            Some(h) => Some(
                HeaderValue::from_str(h)
                    .map_err(|e| ProbeOutcome::Error(format!("invalid Host header {h:?}: {e}")))?,
            ),
        };
        Ok(Self { url, host })
    }

    /// One probe; see [`probe_once`].
    pub(crate) async fn probe(&self, client: &reqwest::Client, cfg: &HealthConfig) -> ProbeOutcome {
        let deadline = Instant::now() + cfg.timeout;
        let mut request = client.get(self.url.clone());
        if let Some(host) = &self.host {
            request = request.header(HOST, host.clone());
        }
        // Dropping a response with body left unread is cheap: hyper drains what has already
        // arrived and keeps the connection, or closes it if more is still on its way.
        timeout_at(deadline, judge(request, cfg))
            .await
            .unwrap_or(ProbeOutcome::Timeout)
    }
}

/// Sends the request and judges the response, reading no more body than the verdict needs.
async fn judge(request: reqwest::RequestBuilder, cfg: &HealthConfig) -> ProbeOutcome {
    let mut response = match request.send().await {
        Ok(r) => r,
        Err(e) => return from_reqwest(e),
    };
    let status = response.status().as_u16();
    let (lo, hi) = cfg.expect_status;
    if !(lo..=hi).contains(&status) {
        return ProbeOutcome::BadStatus(status);
    }
    let Some(needle) = cfg.expect_body.as_deref() else {
        return ProbeOutcome::Ok;
    };
    let mut scan = Scan::new(needle.as_bytes());
    while !scan.found() {
        if scan.exhausted() {
            return ProbeOutcome::BodyMismatch;
        }
        match response.chunk().await {
            Ok(Some(chunk)) => scan.feed(&chunk),
            Ok(None) => return ProbeOutcome::BodyMismatch,
            Err(e) => return from_reqwest(e),
        }
    }
    ProbeOutcome::Ok
}

fn from_reqwest(e: reqwest::Error) -> ProbeOutcome {
    if e.is_timeout() {
        return ProbeOutcome::Timeout;
    }
    // The URL is known to whoever reads the outcome; the causes are what is worth saying.
    let e = e.without_url();
    let mut message = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = c.source();
    }
    ProbeOutcome::Error(message)
}

/// Looks for a substring in a body that arrives in chunks, within the first [`MAX_BODY_SCAN`]
/// bytes. Keeps only the last `needle.len() - 1` bytes between chunks.
struct Scan<'a> {
    needle: &'a [u8],
    /// The end of what was seen so far (at most `needle.len() - 1` bytes) and, while
    /// searching, the chunk appended to it.
    window: Vec<u8>,
    seen: usize,
    found: bool,
}

impl<'a> Scan<'a> {
    fn new(needle: &'a [u8]) -> Self {
        Self {
            needle,
            window: Vec::new(),
            seen: 0,
            found: needle.is_empty(),
        }
    }

    fn found(&self) -> bool {
        self.found
    }

    fn exhausted(&self) -> bool {
        self.seen >= MAX_BODY_SCAN
    }

    fn feed(&mut self, chunk: &[u8]) {
        let chunk = &chunk[..chunk.len().min(MAX_BODY_SCAN - self.seen)];
        self.seen += chunk.len();
        let keep = self.needle.len().saturating_sub(1);
        if self.window.is_empty() {
            // The common case, a body in one chunk, is searched in place.
            self.found = contains(chunk, self.needle);
            self.window
                .extend_from_slice(&chunk[chunk.len().saturating_sub(keep)..]);
        } else {
            self.window.extend_from_slice(chunk);
            self.found = contains(&self.window, self.needle);
            let cut = self.window.len().saturating_sub(keep);
            self.window.drain(..cut);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeSet;
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use axum::body::{Body, Bytes};
    use axum::extract::{ConnectInfo, State};
    use axum::http::{header, HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::get;
    use axum::{Json, Router};
    use futures::stream::{self, StreamExt};
    use proptest::prelude::*;

    use super::*;

    pub(crate) const ESTIMATION: &str = r#""msg":"estimation""#;

    /// A health config as the defaults would make it, probing `path`.
    pub(crate) fn health(path: &str) -> HealthConfig {
        HealthConfig {
            enabled: true,
            path: path.to_owned(),
            expect_status: (200, 399),
            expect_body: None,
            host: None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }

    /// The client peers (one per TCP connection) seen by the server.
    #[derive(Clone, Default)]
    struct Peers(Arc<Mutex<BTreeSet<SocketAddr>>>);

    impl Peers {
        fn record(&self, peer: SocketAddr) {
            self.0.lock().unwrap().insert(peer);
        }
        fn count(&self) -> usize {
            self.0.lock().unwrap().len()
        }
    }

    async fn queue_status(
        State(peers): State<Peers>,
        ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ) -> impl IntoResponse {
        peers.record(peer);
        Json(serde_json::json!({
            "msg": "estimation", "event_id": null, "rank": null, "queue_size": 0, "rank_eta": null
        }))
    }

    async fn not_found(
        State(peers): State<Peers>,
        ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ) -> impl IntoResponse {
        peers.record(peer);
        (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"detail": "Not Found"})),
        )
    }

    async fn echo(headers: HeaderMap) -> String {
        let get = |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        format!("host={};ua={}", get(header::HOST), get(header::USER_AGENT))
    }

    fn chunks<S>(s: S) -> Body
    where
        S: futures::Stream<Item = Vec<u8>> + Send + 'static,
    {
        Body::from_stream(s.map(|c| Ok::<_, Infallible>(Bytes::from(c))))
    }

    /// A Kotaemon-like backend on 127.0.0.1 with a few misbehaving routes.
    async fn serve() -> (Address, Peers) {
        let peers = Peers::default();
        let app = Router::new()
            .route("/queue/status", get(queue_status))
            .route(
                "/fail",
                get(|| async { (StatusCode::SERVICE_UNAVAILABLE, "overloaded") }),
            )
            .route(
                "/hang",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late"
                }),
            )
            .route(
                "/protected",
                get(|| async {
                    (
                        StatusCode::TEMPORARY_REDIRECT,
                        [(header::LOCATION, "/login")],
                    )
                }),
            )
            // Following the redirect would turn a 307 into this 500.
            .route(
                "/login",
                get(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
            )
            .route("/echo", get(echo))
            .route(
                "/big",
                get(|| async {
                    let mut body = vec![b'x'; MAX_BODY_SCAN + 100];
                    body.extend_from_slice(ESTIMATION.as_bytes());
                    body
                }),
            )
            .route(
                "/endless",
                get(|| async {
                    let first = stream::iter([ESTIMATION.as_bytes().to_vec()]);
                    chunks(first.chain(stream::repeat(vec![b'x'; 8192])))
                }),
            )
            .route(
                "/stall",
                get(|| async {
                    chunks(stream::iter([b"{\"msg\":".to_vec()]).chain(stream::pending()))
                }),
            )
            .fallback(not_found)
            .with_state(peers.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
            .unwrap();
        });
        (Address::from_parts("127.0.0.1", port).unwrap(), peers)
    }

    async fn probe(address: &Address, cfg: &HealthConfig) -> ProbeOutcome {
        probe_once(&build_client(1).unwrap(), address, cfg).await
    }

    #[tokio::test]
    async fn ok_when_queue_status_answers_200_with_the_expected_body() {
        let (address, _) = serve().await;
        let cfg = HealthConfig {
            expect_body: Some(ESTIMATION.into()),
            ..health("/queue/status")
        };
        assert_eq!(probe(&address, &cfg).await, ProbeOutcome::Ok);
    }

    #[tokio::test]
    async fn bad_status_404_on_health_as_real_kotaemon_answers() {
        let (address, _) = serve().await;
        let outcome = probe(&address, &health("/health")).await;
        assert_eq!(outcome, ProbeOutcome::BadStatus(404));
        assert_eq!(outcome.label(), "bad_status");
    }

    #[tokio::test]
    async fn bad_status_503_when_the_backend_is_overloaded() {
        let (address, _) = serve().await;
        assert_eq!(
            probe(&address, &health("/fail")).await,
            ProbeOutcome::BadStatus(503)
        );
    }

    #[tokio::test]
    async fn timeout_when_the_handler_sleeps_past_the_timeout() {
        let (address, _) = serve().await;
        let cfg = HealthConfig {
            timeout: Duration::from_millis(200),
            ..health("/hang")
        };
        let started = Instant::now();
        assert_eq!(probe(&address, &cfg).await, ProbeOutcome::Timeout);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn timeout_covers_the_body_up_to_the_expected_text() {
        let (address, _) = serve().await;
        let cfg = HealthConfig {
            timeout: Duration::from_millis(200),
            expect_body: Some(ESTIMATION.into()),
            ..health("/stall")
        };
        assert_eq!(probe(&address, &cfg).await, ProbeOutcome::Timeout);
    }

    #[tokio::test]
    async fn body_mismatch_when_the_expected_text_is_missing() {
        let (address, _) = serve().await;
        let cfg = HealthConfig {
            expect_body: Some("\"msg\":\"ready\"".into()),
            ..health("/queue/status")
        };
        let outcome = probe(&address, &cfg).await;
        assert_eq!(outcome, ProbeOutcome::BodyMismatch);
        assert_eq!(outcome.label(), "bad_status");
    }

    #[tokio::test]
    async fn body_mismatch_when_the_expected_text_lies_beyond_64_kib() {
        let (address, _) = serve().await;
        let cfg = HealthConfig {
            expect_body: Some(ESTIMATION.into()),
            ..health("/big")
        };
        assert_eq!(probe(&address, &cfg).await, ProbeOutcome::BodyMismatch);
    }

    #[tokio::test]
    async fn stops_reading_once_the_expected_text_is_found() {
        let (address, _) = serve().await;
        let cfg = HealthConfig {
            expect_body: Some(ESTIMATION.into()),
            ..health("/endless")
        };
        assert_eq!(probe(&address, &cfg).await, ProbeOutcome::Ok);
    }

    #[tokio::test]
    async fn without_expected_text_an_endless_body_is_not_read() {
        let (address, _) = serve().await;
        assert_eq!(probe(&address, &health("/endless")).await, ProbeOutcome::Ok);
    }

    #[tokio::test]
    async fn error_when_the_connection_is_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let address = Address::from_parts("127.0.0.1", port).unwrap();
        let outcome = probe(&address, &health("/health")).await;
        assert!(
            matches!(&outcome, ProbeOutcome::Error(m) if m.contains("refused")),
            "{outcome:?}"
        );
        assert_eq!(outcome.label(), "error");
    }

    #[tokio::test]
    async fn a_redirect_is_a_status_like_any_other_and_is_not_followed() {
        let (address, _) = serve().await;
        let only_200 = HealthConfig {
            expect_status: (200, 200),
            ..health("/protected")
        };
        assert_eq!(
            probe(&address, &only_200).await,
            ProbeOutcome::BadStatus(307)
        );
        let up_to_399 = HealthConfig {
            expect_status: (200, 399),
            ..health("/protected")
        };
        assert_eq!(probe(&address, &up_to_399).await, ProbeOutcome::Ok);
    }

    #[tokio::test]
    async fn sends_the_configured_host_and_our_user_agent() {
        let (address, _) = serve().await;
        let default_host = HealthConfig {
            expect_body: Some(format!(
                "host={address};ua=upstreamd/{}",
                env!("CARGO_PKG_VERSION")
            )),
            ..health("/echo")
        };
        assert_eq!(probe(&address, &default_host).await, ProbeOutcome::Ok);
        let custom_host = HealthConfig {
            host: Some("kotaemon.internal".into()),
            expect_body: Some("host=kotaemon.internal;".into()),
            ..health("/echo")
        };
        assert_eq!(probe(&address, &custom_host).await, ProbeOutcome::Ok);
    }

    #[tokio::test]
    async fn probes_reuse_one_keep_alive_connection() {
        let (address, peers) = serve().await;
        let client = build_client(1).unwrap();
        let with_body = HealthConfig {
            expect_body: Some(ESTIMATION.into()),
            ..health("/queue/status")
        };
        for cfg in [health("/queue/status"), with_body, health("/health")] {
            for _ in 0..3 {
                probe_once(&client, &address, &cfg).await;
                // Give the client a moment to put the connection back into its pool, as the
                // interval between two probes would.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        assert_eq!(peers.count(), 1);
    }

    #[test]
    fn a_bad_host_header_is_an_error_outcome() {
        let address = Address::from_parts("127.0.0.1", 80).unwrap();
        let cfg = HealthConfig {
            host: Some("bad\nhost".into()),
            ..health("/health")
        };
        assert!(matches!(
            ProbeTarget::new(&address, &cfg),
            Err(ProbeOutcome::Error(_))
        ));
    }

    #[test]
    fn probe_urls_bracket_ipv6_and_keep_the_query() {
        let address: Address = "[::1]:7860".parse().unwrap();
        let target = ProbeTarget::new(&address, &health("/queue/status?x=1")).unwrap();
        assert_eq!(target.url.as_str(), "http://[::1]:7860/queue/status?x=1");
    }

    #[test]
    fn labels_follow_the_metrics_contract() {
        let labels: Vec<_> = [
            ProbeOutcome::Ok,
            ProbeOutcome::BadStatus(404),
            ProbeOutcome::BodyMismatch,
            ProbeOutcome::Timeout,
            ProbeOutcome::Error("refused".into()),
        ]
        .iter()
        .map(|o| (o.is_ok(), o.label()))
        .collect();
        assert_eq!(
            labels,
            [
                (true, "ok"),
                (false, "bad_status"),
                (false, "bad_status"),
                (false, "timeout"),
                (false, "error")
            ]
        );
    }

    #[test]
    fn finds_text_split_across_chunks() {
        let mut scan = Scan::new(b"estimation");
        for chunk in [&b"{\"msg\":\"es"[..], b"ti", b"mat", b"ion\"}"] {
            scan.feed(chunk);
        }
        assert!(scan.found());
    }

    proptest! {
        #[test]
        fn chunked_search_agrees_with_a_search_of_the_first_64_kib(
            body in proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b')], 0..300),
            needle in proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b')], 1..6),
            cuts in proptest::collection::vec(0usize..300, 0..10),
            padding in prop_oneof![Just(0usize), Just(MAX_BODY_SCAN - 150)],
        ) {
            let mut body_padded = vec![b'x'; padding];
            body_padded.extend_from_slice(&body);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| padding + c.min(body.len())).collect();
            cuts.push(0);
            cuts.push(body_padded.len());
            cuts.sort_unstable();
            let mut scan = Scan::new(&needle);
            for pair in cuts.windows(2) {
                if scan.found() || scan.exhausted() {
                    break;
                }
                scan.feed(&body_padded[pair[0]..pair[1]]);
            }
            let limit = body_padded.len().min(MAX_BODY_SCAN);
            prop_assert_eq!(scan.found(), contains(&body_padded[..limit], &needle));
        }
    }
}
