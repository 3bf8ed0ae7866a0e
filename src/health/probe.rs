//! One HTTP probe of one endpoint: GET the health path, judge status and body, within a deadline.

use std::fmt;
use std::time::Duration;

use std::sync::{Arc, Mutex};

use http::HeaderValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use super::http1::{parse_head, Body, Framing, Scan};
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
        crate::metrics::labels::ProbeResult::from(self).as_str()
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

/// The connection a probe keeps for the next probe of the same endpoint: at most one idle
/// keep-alive connection, dropped after 4 s idle.
///
/// Probes speak just enough HTTP/1.1 themselves (a GET, then a head parsed by `httparse`, a
/// Content-Length or chunked body) instead of going through a general client: an idle
/// connection then costs its socket and a few dozen bytes, where a pooled hyper connection
/// held a dispatch task, a channel and its buffers, some 20 KiB each — 300 MB for 10,000
/// endpoints. One per endpoint task; cloning shares the slot.
#[derive(Debug, Clone, Default)]
pub struct Client {
    idle: Arc<Mutex<Option<Idle>>>,
}

#[derive(Debug)]
struct Idle {
    /// Where it is connected (`host:port`), so a shared slot never crosses endpoints.
    to: Arc<str>,
    stream: TcpStream,
    since: Instant,
}

impl Client {
    /// An empty slot.
    pub fn new() -> Self {
        Self::default()
    }

    /// The idle connection to `to`, if there is one that is young enough and still open.
    fn take(&self, to: &str) -> Option<TcpStream> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        if *idle.to != *to || idle.since.elapsed() >= POOL_IDLE_TIMEOUT {
            return None;
        }
        // An idle connection has nothing to say: end of stream or bytes both mean it is
        // unusable. (A close racing the next request is retried once, below.)
        let mut probe = [0u8; 1];
        match idle.stream.try_read(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Some(idle.stream),
            _ => None,
        }
    }

    fn put(&self, to: &Arc<str>, stream: TcpStream) {
        *self.idle.lock().unwrap_or_else(|e| e.into_inner()) = Some(Idle {
            to: Arc::clone(to),
            stream,
            since: Instant::now(),
        });
    }
}

/// A probe client; kept for callers that built one per upstream. `max_idle_per_host` is
/// ignored: a [`Client`] holds one idle connection.
pub fn build_client(_max_idle_per_host: usize) -> Result<Client, std::convert::Infallible> {
    Ok(Client::new())
}

/// Probes `http://{address}{cfg.path}` once.
///
/// The whole probe, connect to the last byte read, is bounded by `cfg.timeout`. The status
/// must be within `cfg.expect_status` (redirects are not followed); with `cfg.expect_body`,
/// at most 64 KiB of body is read, stopping as soon as the substring is seen. `cfg.host`, if
/// set, is sent as `Host`. The connection is kept in `client` for the next probe when the
/// answer ended cleanly.
pub async fn probe_once(client: &Client, address: &Address, cfg: &HealthConfig) -> ProbeOutcome {
    match ProbeTarget::new(address, cfg) {
        Ok(target) => target.probe(client, cfg).await,
        Err(outcome) => outcome,
    }
}

/// What a probe sends, built once per endpoint task so a probe only writes it.
#[derive(Debug, Clone)]
pub(crate) struct ProbeTarget {
    /// `host:port` to connect to (shared with the idle connection's label, so keeping a
    /// connection allocates nothing).
    connect_to: Arc<str>,
    /// The request's bytes.
    request: Vec<u8>,
}

/// How a probe's exchange failed below HTTP.
enum Failure {
    /// Nothing came back on a connection that had served before: the server closed it as we
    /// sent. Worth one more try on a new connection.
    Stale(String),
    Other(String),
}

impl ProbeTarget {
    /// The URL and request for `address`; the error is the outcome every probe would have.
    pub(crate) fn new(address: &Address, cfg: &HealthConfig) -> Result<Self, ProbeOutcome> {
        let slash = if cfg.path.starts_with('/') { "" } else { "/" };
        let url = format!("http://{address}{slash}{}", cfg.path);
        let url = url::Url::parse(&url)
            .map_err(|e| ProbeOutcome::Error(format!("invalid probe URL `{url}`: {e}")))?;
        let host_name = url.host_str().unwrap_or_default().to_owned();
        let port = url.port_or_known_default().unwrap_or(80);
        let connect_to: Arc<str> = format!("{host_name}:{port}").into();
        let host = match &cfg.host {
            None => match url.port() {
                Some(p) => format!("{host_name}:{p}"),
                None => host_name,
            },
            Some(h) => {
                HeaderValue::from_str(h)
                    .map_err(|e| ProbeOutcome::Error(format!("invalid Host header {h:?}: {e}")))?;
                h.clone()
            }
        };
        let mut target = url.path().to_owned();
        if let Some(q) = url.query() {
            target.push('?');
            target.push_str(q);
        }
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\nAccept: */*\r\n\r\n"
        )
        .into_bytes();
        Ok(Self {
            connect_to,
            request,
        })
    }

    /// One probe; see [`probe_once`].
    pub(crate) async fn probe(&self, client: &Client, cfg: &HealthConfig) -> ProbeOutcome {
        let deadline = Instant::now() + cfg.timeout;
        let exchange = async {
            let idle = client.take(&self.connect_to);
            let reused = idle.is_some();
            let stream = match idle {
                Some(s) => s,
                None => match self.connect().await {
                    Ok(s) => s,
                    Err(outcome) => return (outcome, None),
                },
            };
            match self.exchange(stream, cfg, reused).await {
                Ok(done) => done,
                Err(Failure::Stale(_)) => match self.connect().await {
                    Ok(s) => match self.exchange(s, cfg, false).await {
                        Ok(done) => done,
                        Err(Failure::Stale(m) | Failure::Other(m)) => {
                            (ProbeOutcome::Error(m), None)
                        }
                    },
                    Err(outcome) => (outcome, None),
                },
                Err(Failure::Other(m)) => (ProbeOutcome::Error(m), None),
            }
        };
        let Ok((outcome, rest)) = timeout_at(deadline, exchange).await else {
            // The connection went with the exchange: a late answer cannot be told from the next.
            return ProbeOutcome::Timeout;
        };
        if let Some(mut rest) = rest {
            // The verdict is in; what is left of the body is read only if it comes promptly,
            // to keep the connection. Otherwise it is closed, never the verdict changed. The
            // usual answer is already whole: kept without arming a timer.
            let kept = match rest.whole() {
                Some(whole) => whole.is_ok(),
                None => {
                    let until = deadline.min(Instant::now() + DRAIN_GRACE);
                    matches!(timeout_at(until, rest.drain()).await, Ok(Ok(())))
                }
            };
            if kept {
                client.put(&self.connect_to, rest.stream);
            }
        }
        outcome
    }

    async fn connect(&self) -> Result<TcpStream, ProbeOutcome> {
        let stream = TcpStream::connect(&*self.connect_to)
            .await
            .map_err(|e| ProbeOutcome::Error(format!("connect: {e}")))?;
        // A failure here only costs latency; the probe still works.
        let _nagle = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Sends the request on `stream` and judges the answer: the outcome and, when the
    /// connection may carry the next probe, what is left to read of this answer.
    async fn exchange(
        &self,
        mut stream: TcpStream,
        cfg: &HealthConfig,
        reused: bool,
    ) -> Result<(ProbeOutcome, Option<Rest>), Failure> {
        let early = |what: String| {
            if reused {
                Failure::Stale(what)
            } else {
                Failure::Other(what)
            }
        };
        if let Err(e) = stream.write_all(&self.request).await {
            return Err(early(format!("send: {e}")));
        }
        // Small enough for the allocator's per-thread cache (a whole health answer usually
        // fits); grown only when a read finds it nearly full.
        let mut buf: Vec<u8> = Vec::with_capacity(HEAD_BUF);
        // The head, skipping interim (1xx) answers.
        let (status, framing, keep_alive) = loop {
            match parse_head(&mut buf).map_err(Failure::Other)? {
                Some(head) => break head,
                None => {
                    if buf.len() >= MAX_HEAD {
                        return Err(Failure::Other("response head over 64 KiB".into()));
                    }
                    if buf.capacity() - buf.len() < HEAD_BUF / 4 {
                        buf.reserve(HEAD_BUF);
                    }
                    match stream.read_buf(&mut buf).await {
                        Ok(0) if buf.is_empty() => {
                            return Err(early("connection closed before the answer".into()))
                        }
                        Ok(0) => return Err(Failure::Other("connection closed mid-answer".into())),
                        Ok(_) => {}
                        Err(e) if buf.is_empty() => return Err(early(format!("receive: {e}"))),
                        Err(e) => return Err(Failure::Other(format!("receive: {e}"))),
                    }
                }
            }
        };
        let mut rest = Rest {
            stream,
            buf,
            body: Body::new(framing),
        };
        let (lo, hi) = cfg.expect_status;
        let outcome = if !(lo..=hi).contains(&status) {
            ProbeOutcome::BadStatus(status)
        } else if let Some(needle) = cfg.expect_body.as_deref() {
            let mut scan = Scan::new(needle.as_bytes());
            loop {
                rest.decode(|data| {
                    // Chunks after the one with the text must not reset the verdict.
                    if !scan.found() && !scan.exhausted() {
                        scan.feed(data);
                    }
                })
                .map_err(|e| Failure::Other(format!("invalid body: {e}")))?;
                if scan.found() {
                    break ProbeOutcome::Ok;
                }
                if rest.body.done() || scan.exhausted() {
                    break ProbeOutcome::BodyMismatch;
                }
                match rest.fill().await {
                    Ok(0) if rest.body.framing() == Framing::UntilClose => {
                        rest.body.closed();
                    }
                    Ok(0) => return Err(Failure::Other("connection closed mid-body".into())),
                    Ok(_) => {}
                    Err(e) => return Err(Failure::Other(format!("receive: {e}"))),
                }
            }
        } else {
            ProbeOutcome::Ok
        };
        let reusable = keep_alive && rest.body.framing() != Framing::UntilClose;
        Ok((outcome, reusable.then_some(rest)))
    }
}

/// How long a probe waits, after its verdict, for the rest of a body to keep the connection.
const DRAIN_GRACE: Duration = Duration::from_millis(50);
/// The longest response head read.
const MAX_HEAD: usize = 64 * 1024;
/// The first read buffer of an answer.
const HEAD_BUF: usize = 512;

/// A connection whose answer has been judged, with what is left of the body.
struct Rest {
    stream: TcpStream,
    buf: Vec<u8>,
    body: Body,
}

impl Rest {
    fn decode(&mut self, data: impl FnMut(&[u8])) -> Result<(), String> {
        self.body.decode(&mut self.buf, data)
    }

    async fn fill(&mut self) -> std::io::Result<usize> {
        self.buf.reserve(4096);
        self.stream.read_buf(&mut self.buf).await
    }

    /// Whether the answer is already read to its end with nothing after it, without reading:
    /// `None` when more of the body is still to come.
    fn whole(&mut self) -> Option<Result<(), String>> {
        if let Err(e) = self.decode(|_| {}) {
            return Some(Err(e));
        }
        if !self.body.done() {
            return None;
        }
        Some(if self.buf.is_empty() {
            Ok(())
        } else {
            Err("bytes after the answer".into())
        })
    }

    /// Reads the rest of the body (at most [`MAX_BODY_SCAN`] more bytes) so that the
    /// connection can carry the next probe; an error when it cannot.
    async fn drain(&mut self) -> Result<(), String> {
        let mut read = 0usize;
        loop {
            if let Some(whole) = self.whole() {
                return whole;
            }
            if read > MAX_BODY_SCAN {
                return Err("body too long to drain".into());
            }
            match self.fill().await {
                Ok(0) => return Err("closed".into()),
                Ok(n) => read += n,
                Err(e) => return Err(e.to_string()),
            }
        }
    }
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
            fast_interval: Duration::from_millis(500),
            down_interval: Duration::from_secs(2),
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
                "/chunked",
                get(|| async {
                    let (a, b) = ESTIMATION.as_bytes().split_at(5);
                    chunks(stream::iter([a.to_vec(), b.to_vec()]))
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
        probe_once(&Client::new(), address, cfg).await
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
        // The handler answers after 30 s; the guard (a hang guard, not a latency claim) fails
        // the test only if the probe waited for it.
        let outcome = tokio::time::timeout(Duration::from_secs(20), probe(&address, &cfg))
            .await
            .expect("the probe gave up long before the handler answered");
        assert_eq!(outcome, ProbeOutcome::Timeout);
        eprintln!(
            "figure: a 200 ms probe timeout returned after {:?}",
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
        let client = Client::new();
        let with_body = HealthConfig {
            expect_body: Some(ESTIMATION.into()),
            ..health("/queue/status")
        };
        let chunked = HealthConfig {
            expect_body: Some(ESTIMATION.into()),
            ..health("/chunked")
        };
        for cfg in [
            health("/queue/status"),
            with_body,
            health("/health"),
            chunked,
            health("/chunked"),
        ] {
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
        assert_eq!(&*target.connect_to, "[::1]:7860");
        assert!(
            target
                .request
                .starts_with(b"GET /queue/status?x=1 HTTP/1.1\r\nHost: [::1]:7860\r\n"),
            "{}",
            String::from_utf8_lossy(&target.request)
        );
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

    #[tokio::test]
    async fn a_connection_the_server_closed_while_idle_is_replaced() {
        // A server that answers one request per connection, then closes it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                // Keep-alive was promised; close anyway after a moment, as servers do.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let address = Address::from_parts("127.0.0.1", port).unwrap();
        let client = Client::new();
        for _ in 0..3 {
            assert_eq!(
                probe_once(&client, &address, &health("/x")).await,
                ProbeOutcome::Ok
            );
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
}
