//! `kind = "consul"`: one service followed with blocking queries on `/v1/health/service`.
//!
//! The loop: ask with `index` and `wait`, remember `X-Consul-Index` (restart from 0 if it
//! goes backwards, never block on 0), send a snapshot when the parsed list changed, and on
//! any failure report `Failed` once per outage and retry with capped, jittered backoff
//! (200 ms doubling to 3 s), asking without blocking until an answer comes so that recovery
//! is seen at once. A token bucket (burst 4, then 2/s) with a 100 ms minimum gap keeps a
//! churning index from becoming a busy loop. Every request and every sleep races the
//! shutdown token. The same skipped instance is warned about once, not on every answer.
//!
//! # consulrs
//!
//! The HTTP side is consulrs 0.1.0: [`ConsulClient`] holds the address, the ACL token (sent
//! as `X-Consul-Token` by its middleware) and the CA file (`ca_certs`, a PEM bundle added to
//! the roots of its rustls client); `exec_with_result` returns `X-Consul-Index` with the
//! body. The request type is ours (`api::HealthServiceRequest`). Where consulrs falls
//! short, and what is done instead:
//!
//! - No per-request timeout: the call is wrapped in `tokio::time::timeout` of
//!   `wait + wait/16 + 2s`; dropping the future abandons the connection.
//! - Its settings builder fills unset fields from `CONSUL_*` environment variables, so the
//!   settings are built as a struct literal: only our config reaches the client (the config
//!   loader applies `CONSUL_HTTP_ADDR`/`CONSUL_HTTP_TOKEN` itself).
//! - It panics on a token that is not a valid header value, and on a base URL that cannot
//!   carry a path: both are validated in [`ConsulWatch::new`].
//! - It logs every request at `info` (including the full URL) and every failure at `error`
//!   through `#[instrument(err)]`. Its calls run with tracing switched off; this module logs
//!   one line per outage and per recovery instead. Nothing here prints the client or its
//!   settings, which hold the token.
//! - No client certificates from our config (consulrs supports them, the config has no keys
//!   for them yet).

mod api;
mod blocking;
mod parse;

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use consulrs::api::exec_with_result;
use consulrs::client::{ConsulClient, ConsulClientSettings};
use consulrs::error::ClientError;
use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::instrument::WithSubscriber;
use tracing::subscriber::NoSubscriber;

use api::{HealthServiceRequest, ServiceEntry};
use blocking::{request_timeout, Progress, RateLimit, MAX_WAIT, MIN_WAIT};
use parse::{parse_entries, Skipped};

use super::{until_shutdown, Sink, Source};
use crate::config::ConsulSource;

/// Why a Consul source could not be set up or a request failed. Never carries the token.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    /// `url` is not an absolute `http`/`https` URL without a path.
    #[error("consul url {url:?} {reason}")]
    BadUrl {
        /// The URL as configured.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `service` is empty or holds characters that cannot be one path segment.
    #[error("consul service name {0:?} must be non-empty without '/', '?' or '#'")]
    BadService(String),
    /// The ACL token has characters an HTTP header cannot carry.
    #[error("the consul ACL token must be printable ASCII without spaces")]
    BadToken,
    /// `wait` is outside what a blocking query can use.
    #[error("consul wait {} must be from 100ms to 10m", humantime::format_duration(*.0))]
    BadWait(Duration),
    /// consulrs could not build its HTTP client (for instance an unreadable `ca_file`).
    #[error("failed to set up the consul client: {0}")]
    Client(String),
    /// A request failed: connection, HTTP status, body.
    #[error("consul request failed: {0}")]
    Request(String),
    /// A request got no answer within its timeout.
    #[error("consul did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The answer had no usable `X-Consul-Index` header.
    #[error("consul's answer carried no usable X-Consul-Index header ({0:?})")]
    NoIndex(Option<String>),
}

/// A Consul service followed with blocking queries. Built from a [`ConsulSource`] by
/// [`ConsulWatch::new`]; run through [`Source::run`].
pub struct ConsulWatch {
    client: ConsulClient,
    url: String,
    service: String,
    datacenter: Option<String>,
    tags: Vec<String>,
    wait: Duration,
}

impl fmt::Debug for ConsulWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulWatch")
            .field("url", &self.url)
            .field("service", &self.service)
            .field("datacenter", &self.datacenter)
            .field("tags", &self.tags)
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}

impl ConsulWatch {
    /// Validates the config and builds the consulrs client (reading `ca_file` now).
    pub fn new(cfg: &ConsulSource) -> Result<Self, ConsulError> {
        let url = check_url(&cfg.url)?;
        if cfg.service.is_empty() || cfg.service.contains(['/', '?', '#']) {
            return Err(ConsulError::BadService(cfg.service.clone()));
        }
        if !(MIN_WAIT..=MAX_WAIT).contains(&cfg.wait) {
            return Err(ConsulError::BadWait(cfg.wait));
        }
        let token = match &cfg.token {
            Some(secret) if !secret.0.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(ConsulError::BadToken)
            }
            Some(secret) => Some(secret.0.clone()),
            None => None,
        };
        if let Some(path) = &cfg.ca_file {
            check_ca_file(path)?;
        }
        let settings = ConsulClientSettings {
            address: url.clone(),
            ca_certs: cfg
                .ca_file
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect(),
            client_cert: None,
            client_key: None,
            token,
            verify: true,
            version: 1,
        };
        let client = tracing::subscriber::with_default(NoSubscriber::default(), || {
            ConsulClient::new(settings)
        })
        .map_err(|e| ConsulError::Client(error_chain(&e)))?;
        Ok(Self {
            client,
            url,
            service: cfg.service.clone(),
            datacenter: cfg.datacenter.clone(),
            tags: cfg.tags.clone(),
            wait: cfg.wait,
        })
    }

    /// One blocking round: the answer's index and entries.
    async fn ask(&self, index: u64) -> Result<(u64, Vec<ServiceEntry>), ConsulError> {
        let wait = blocking::wait_param(self.wait);
        let req = HealthServiceRequest::new(
            &self.service,
            self.datacenter.as_deref(),
            &self.tags,
            index,
            &wait,
        );
        let limit = request_timeout(self.wait);
        // consulrs and rustify log each request at info and each failure at error; this
        // module reports outages itself, once.
        let call = exec_with_result(&self.client, req).with_subscriber(NoSubscriber::default());
        let answer = tokio::time::timeout(limit, call)
            .await
            .map_err(|_| ConsulError::Timeout(limit))?
            .map_err(|e| ConsulError::Request(describe(&e)))?;
        let returned = answer
            .index
            .as_deref()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or(ConsulError::NoIndex(answer.index.clone()))?;
        Ok((returned, answer.response))
    }
}

/// Parses one `/v1/health/service` answer body the way the source does: the JSON array
/// decoded leniently, then every instance validated. Returns the valid endpoints and how many
/// instances were skipped. The source itself gets the decoded body from consulrs; this entry
/// point exists so property tests and fuzz targets reach the same parser from raw bytes.
pub fn parse_answer(
    body: &[u8],
    tags: &[String],
) -> Result<(Vec<crate::model::Endpoint>, usize), serde_json::Error> {
    let entries: Vec<ServiceEntry> = serde_json::from_slice(body)?;
    let parsed = parse_entries(&entries, tags);
    Ok((parsed.endpoints, parsed.skipped.len()))
}

fn check_url(raw: &str) -> Result<String, ConsulError> {
    let bad = |reason| ConsulError::BadUrl {
        url: raw.to_owned(),
        reason,
    };
    // `CONSUL_HTTP_ADDR` is often a bare `host:port`; Consul's own clients read it as http.
    let full = if raw.contains("://") {
        raw.to_owned()
    } else {
        format!("http://{raw}")
    };
    let url = reqwest::Url::parse(&full).map_err(|_| bad("is not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("must start with http:// or https://"));
    }
    if url.host_str().is_none() || url.cannot_be_a_base() {
        return Err(bad("has no host"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(bad(
            "must not have a path, query or fragment (consulrs adds /v1/...)",
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("must not carry credentials; use the token"));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// consulrs reads `ca_file` itself, but a file without any certificate would pass silently
/// and fail every TLS handshake later: refuse it now.
fn check_ca_file(path: &std::path::Path) -> Result<(), ConsulError> {
    let text = std::fs::read(path).map_err(|e| {
        ConsulError::Client(format!("failed to read ca_file `{}`: {e}", path.display()))
    })?;
    if !text
        .windows(27)
        .any(|w| w == b"-----BEGIN CERTIFICATE-----")
    {
        return Err(ConsulError::Client(format!(
            "ca_file `{}` holds no PEM certificate",
            path.display()
        )));
    }
    Ok(())
}

/// consulrs errors as one line: the API status and body, or the transport error chain.
fn describe(e: &ClientError) -> String {
    match e {
        ClientError::APIError { code, message } => {
            let body = message
                .as_deref()
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .unwrap_or("no body");
            format!("HTTP {code}: {}", truncate(body, 200))
        }
        other => error_chain(other),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.dedup();
    parts.join(": ")
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl Source for ConsulWatch {
    async fn run(self, sink: Sink, shutdown: CancellationToken) {
        let mut progress = Progress::default();
        let mut limit = RateLimit::new(Instant::now());
        let mut warned: BTreeSet<Skipped> = BTreeSet::new();
        loop {
            let pause = limit.delay(Instant::now());
            if !pause.is_zero() && !sleep_or_shutdown(pause, &shutdown).await {
                return;
            }
            limit.start(Instant::now());
            let index = progress.index();
            tracing::debug!(service = %self.service, index, "Consul blocking query sent.");
            let answer = tokio::select! {
                () = shutdown.cancelled() => return,
                answer = self.ask(index) => answer,
            };
            match answer {
                Ok((returned, entries)) => {
                    let parsed = parse_entries(&entries, &self.tags);
                    let skipped: BTreeSet<Skipped> = parsed.skipped.iter().cloned().collect();
                    for s in skipped.difference(&warned) {
                        tracing::warn!(
                            service = %self.service, service_id = %s.service_id, node = %s.node,
                            "Skipped Consul service ID {} on node {}: {}.", s.service_id, s.node, s.reason
                        );
                    }
                    warned = skipped;
                    let out = progress.on_answer(returned, parsed.endpoints, parsed.skipped.len());
                    if let Some((from, to)) = out.index_went_back {
                        tracing::info!(service = %self.service, from, to, "Consul index went backwards; restarting the blocking query from 0.");
                    }
                    if out.recovered_after > 0 {
                        tracing::info!(service = %self.service, failed_requests = out.recovered_after, "Consul answers again.");
                    }
                    if let Some((endpoints, skipped)) = out.send {
                        if !until_shutdown(sink.snapshot(endpoints, skipped), &shutdown).await {
                            return;
                        }
                    }
                }
                Err(error) => {
                    let (starts_outage, pause) =
                        progress.on_failure(rand::thread_rng().gen::<f64>());
                    if starts_outage {
                        tracing::warn!(service = %self.service, url = %self.url, %error, "Consul source failed; keeping its last snapshot and retrying.");
                        if !until_shutdown(sink.failed(error.to_string()), &shutdown).await {
                            return;
                        }
                    } else {
                        tracing::debug!(service = %self.service, %error, retry_in = ?pause, "Consul still failing.");
                    }
                    if !sleep_or_shutdown(pause, &shutdown).await {
                        return;
                    }
                }
            }
        }
    }
}

/// Sleeps for `d`; false when shutdown came first.
async fn sleep_or_shutdown(d: Duration, shutdown: &CancellationToken) -> bool {
    until_shutdown(
        async {
            tokio::time::sleep(d).await;
            true
        },
        shutdown,
    )
    .await
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::Secret;

    fn cfg() -> ConsulSource {
        ConsulSource {
            url: "http://127.0.0.1:8500".into(),
            service: "kotaemon".into(),
            tags: vec![],
            datacenter: None,
            wait: Duration::from_secs(60),
            token: Some(Secret("s3cr3t-token".into())),
            ca_file: None,
        }
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let w = ConsulWatch::new(&cfg()).unwrap();
        let shown = format!("{w:?}");
        assert!(
            shown.contains("kotaemon") && !shown.contains("s3cr3t"),
            "{shown}"
        );
    }

    #[test]
    fn rejects_what_would_make_consulrs_panic_or_misroute() {
        let mut c = cfg();
        c.token = Some(Secret("bad token\n".into()));
        assert!(matches!(ConsulWatch::new(&c), Err(ConsulError::BadToken)));
        let err = ConsulWatch::new(&ConsulSource {
            token: Some(Secret("x y".into())),
            ..cfg()
        })
        .unwrap_err();
        assert!(
            !err.to_string().contains("x y"),
            "the token stays out of the message"
        );
        for url in [
            "ftp://h",
            "unix:///run/consul.sock",
            "http://",
            "http://h:8500/consul",
            "http://u:p@h",
            "unix:/x",
        ] {
            assert!(
                ConsulWatch::new(&ConsulSource {
                    url: url.into(),
                    ..cfg()
                })
                .is_err(),
                "{url}"
            );
        }
        assert_eq!(
            ConsulWatch::new(&ConsulSource {
                url: "https://c.example:8501/".into(),
                ..cfg()
            })
            .unwrap()
            .url,
            "https://c.example:8501"
        );
        for service in ["", "a/b", "a?b"] {
            assert!(matches!(
                ConsulWatch::new(&ConsulSource {
                    service: service.into(),
                    ..cfg()
                }),
                Err(ConsulError::BadService(_))
            ));
        }
        for wait in [
            Duration::ZERO,
            Duration::from_millis(50),
            Duration::from_secs(601),
        ] {
            assert!(matches!(
                ConsulWatch::new(&ConsulSource { wait, ..cfg() }),
                Err(ConsulError::BadWait(_))
            ));
        }
    }

    #[test]
    fn a_bare_host_and_port_means_http() {
        for (given, used) in [
            ("127.0.0.1:8500", "http://127.0.0.1:8500"),
            ("consul.service:8500", "http://consul.service:8500"),
            ("https://c.example:8501/", "https://c.example:8501"),
        ] {
            let w = ConsulWatch::new(&ConsulSource {
                url: given.into(),
                ..cfg()
            })
            .unwrap();
            assert_eq!(w.url, used);
        }
    }

    #[test]
    fn an_unreadable_ca_file_fails_at_setup_with_its_path() {
        let c = ConsulSource {
            ca_file: Some(PathBuf::from("/nonexistent/ca.pem")),
            ..cfg()
        };
        let err = ConsulWatch::new(&c).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn a_pem_ca_bundle_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, TEST_CA_PEM).unwrap();
        ConsulWatch::new(&ConsulSource {
            ca_file: Some(path),
            ..cfg()
        })
        .unwrap();
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        let err = ConsulWatch::new(&ConsulSource {
            ca_file: Some(path),
            ..cfg()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("holds no PEM certificate"), "{err}");
    }

    #[tokio::test]
    async fn a_source_that_cannot_start_reports_failed_and_waits_for_shutdown() {
        let bad = ConsulSource {
            ca_file: Some(PathBuf::from("/nonexistent/ca.pem")),
            ..cfg()
        };
        let key = crate::sources::SourceKey {
            upstream: crate::model::UpstreamName::new("kotaemon").unwrap(),
            index: 0,
            label: "consul".into(),
            generation: 0,
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let shutdown = CancellationToken::new();
        let task = crate::sources::spawn(
            key,
            &crate::config::SourceConfig::Consul(bad),
            tx,
            shutdown.clone(),
        );
        let update = rx.recv().await.unwrap();
        assert!(
            matches!(update.event, crate::sources::SourceEvent::Failed { error } if error.contains("ca.pem"))
        );
        assert!(!task.is_finished());
        shutdown.cancel();
        task.await.unwrap();
    }

    #[test]
    fn api_errors_show_status_and_body() {
        let e = ClientError::APIError {
            code: 403,
            message: Some("ACL not found\n".into()),
        };
        assert_eq!(describe(&e), "HTTP 403: ACL not found");
    }

    /// A self-signed CA certificate (openssl, P-256), only parsed here.
    const TEST_CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBjTCCATOgAwIBAgIUCUO2+09+Q9qgh4PHF2Aj2wc76tMwCgYIKoZIzj0EAwIw
HDEaMBgGA1UEAwwRdXBzdHJlYW1kLXRlc3QtY2EwHhcNMjYxMTI1MDczMDU3WhcN
MzYxMTIyMDczMDU3WjAcMRowGAYDVQQDDBF1cHN0cmVhbWQtdGVzdC1jYTBZMBMG
ByqGSM49AgEGCCqGSM49AwEHA0IABFS2+8cuZh513EqXAhfNHGDsMbDyfkKOpKrR
mH3+2KXnh/IzswjWXnUrFrAKY40BQMEH4MmYEqep5VFq7EpddcejUzBRMB0GA1Ud
DgQWBBRAMl8S9OuRbsqX8o5ySnNpt4eYTTAfBgNVHSMEGDAWgBRAMl8S9OuRbsqX
8o5ySnNpt4eYTTAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIQD5
/pW/86hdSAsuId/FCRdUpCtPM8rI3AwaxpN2d/yEeQIgEub9UHlcCejyYgXYDwcA
eX0G4/gRB+nSsunRZjq69xE=
-----END CERTIFICATE-----
";
}
