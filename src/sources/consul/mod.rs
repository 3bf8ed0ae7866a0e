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
//! # The HTTP side
//!
//! [`client::Client`] is our own thin client on reqwest 0.12 (rustls): one `GET`, the token
//! as `X-Consul-Token`, the CA file, no redirects, a bounded body. Each request is wrapped in
//! `tokio::time::timeout` of `wait + wait/16 + 2s`; dropping the future abandons the
//! connection. Only our config reaches the client: no `CONSUL_*` variable is read here (the
//! config loader applies `CONSUL_HTTP_ADDR`/`CONSUL_HTTP_TOKEN` itself). Client certificates
//! (mTLS to Consul) have no config keys yet.

mod api;
mod blocking;
mod client;
mod parse;

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use api::ServiceEntry;
use blocking::{request_timeout, Progress, RateLimit, MAX_WAIT, MIN_WAIT};
use client::{Client, HealthQuery};
use parse::{parse_entries, Duplicate, Parsed, Skipped};

use super::skipped::SkipTracker;
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
    /// The HTTP client could not be set up: an unreadable `ca_file`, or one without
    /// certificates.
    #[error("failed to set up the consul client: {0}")]
    Client(String),
    /// A request failed: connection, HTTP status, body.
    #[error("consul request failed: {0}")]
    Request(String),
    /// A request got no answer within its timeout.
    #[error("consul did not answer within {:.1} s", .0.as_secs_f64())]
    Timeout(Duration),
    /// The answer had no usable `X-Consul-Index` header.
    #[error("consul's answer carried no usable X-Consul-Index header ({0:?})")]
    NoIndex(Option<String>),
}

/// A Consul service followed with blocking queries. Built from a [`ConsulSource`] by
/// [`ConsulWatch::new`]; run through [`Source::run`].
pub struct ConsulWatch {
    client: Client,
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
    /// Validates the config and builds the HTTP client (reading `ca_file` now).
    pub fn new(cfg: &ConsulSource) -> Result<Self, ConsulError> {
        let client = Client::new(&cfg.url, cfg.token.as_ref(), cfg.ca_file.as_deref())?;
        if cfg.service.is_empty() || cfg.service.contains(['/', '?', '#']) {
            return Err(ConsulError::BadService(cfg.service.clone()));
        }
        if !(MIN_WAIT..=MAX_WAIT).contains(&cfg.wait) {
            return Err(ConsulError::BadWait(cfg.wait));
        }
        Ok(Self {
            url: client.base().to_owned(),
            client,
            service: cfg.service.clone(),
            datacenter: cfg.datacenter.clone(),
            tags: cfg.tags.clone(),
            wait: cfg.wait,
        })
    }

    /// One blocking round, abandoned past [`request_timeout`]: the answer's index and entries.
    async fn ask(&self, index: u64) -> Result<(u64, Vec<ServiceEntry>), ConsulError> {
        let query = HealthQuery {
            service: &self.service,
            datacenter: self.datacenter.as_deref(),
            tags: &self.tags,
            index,
            wait: self.wait,
        };
        let limit = request_timeout(self.wait);
        tokio::time::timeout(limit, self.client.health_service(&query))
            .await
            .map_err(|_| ConsulError::Timeout(limit))?
    }
}

/// Parses one `/v1/health/service` answer body the way the source does: the JSON array
/// decoded leniently, then every instance validated. Returns the valid endpoints and how many
/// instances were skipped. For property tests and fuzz targets, which start from raw bytes.
pub fn parse_answer(
    body: &[u8],
    tags: &[String],
) -> Result<(Vec<crate::model::Endpoint>, usize), serde_json::Error> {
    let entries: Vec<ServiceEntry> = serde_json::from_slice(body)?;
    let parsed = parse_entries(&entries, tags);
    let left_out = parsed.left_out();
    Ok((parsed.endpoints, left_out))
}

impl Source for ConsulWatch {
    async fn run(self, sink: Sink, shutdown: CancellationToken) {
        let mut progress = Progress::default();
        let mut limit = RateLimit::new(Instant::now());
        let mut warned = Warned::default();
        let mut tracker = SkipTracker::default();
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
                    warned.warn_new(&self.service, &parsed);
                    let (skipped, newly) = tracker.observe(parsed.left_out_entries());
                    let out = progress.on_answer(returned, parsed.endpoints, skipped, newly);
                    if let Some((from, to)) = out.index_went_back {
                        tracing::info!(service = %self.service, from, to, "Consul index went backwards; restarting the blocking query from 0.");
                    }
                    if out.recovered_after > 0 {
                        tracing::info!(service = %self.service, failed_requests = out.recovered_after, "Consul answers again.");
                    }
                    if let Some((endpoints, skipped, newly)) = out.send {
                        if !until_shutdown(sink.snapshot(endpoints, skipped, newly), &shutdown)
                            .await
                        {
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

/// What has been warned about: the same skipped or duplicate instance is warned about once,
/// again only after it went away and came back.
#[derive(Debug, Default)]
struct Warned {
    skipped: BTreeSet<Skipped>,
    duplicates: BTreeSet<Duplicate>,
}

impl Warned {
    /// Warns about what in `parsed` was left out and not warned about in the last answer.
    fn warn_new(&mut self, service: &str, parsed: &Parsed) {
        let skipped: BTreeSet<Skipped> = parsed.skipped.iter().cloned().collect();
        for s in skipped.difference(&self.skipped) {
            let (id, node) = (shown(&s.service_id), shown(&s.node));
            tracing::warn!(
                %service, service_id = %id, %node,
                "Skipped Consul service ID {id} on node {node}: {}.", s.reason
            );
        }
        self.skipped = skipped;
        let duplicates: BTreeSet<Duplicate> = parsed.duplicates.iter().cloned().collect();
        for d in duplicates.difference(&self.duplicates) {
            let (id, node) = (shown(&d.dropped.0), shown(&d.dropped.1));
            let (kept_id, kept_node) = (shown(&d.kept.0), shown(&d.kept.1));
            let attrs = if d.attrs_differ {
                "its different Meta attributes are not used"
            } else {
                "their Meta attributes are the same"
            };
            tracing::warn!(
                %service, service_id = %id, %node, kept_service_id = %kept_id, kept_node = %kept_node,
                address = %d.address,
                "Skipped Consul service ID {id} on node {node}: its address {} is already given by service ID {kept_id} on node {kept_node}, which wins (a passing instance, then the lowest service ID); {attrs}.",
                d.address
            );
        }
        self.duplicates = duplicates;
    }
}

/// A registry-provided name for a text log line: control characters and quotes escaped, so
/// that a service ID cannot forge a line.
fn shown(s: &str) -> String {
    s.escape_debug().to_string()
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
    fn rejects_tokens_urls_services_and_waits_that_cannot_be_sent() {
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
