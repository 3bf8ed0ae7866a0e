//! The Consul HTTP client: `GET /v1/health/service/<name>` as a blocking query, on reqwest.
//!
//! Thin on purpose: one call, so no general Consul SDK. It sends the ACL token as
//! `X-Consul-Token` (marked sensitive, never in a URL or a message), trusts the `ca_file`
//! PEM bundle on top of the system's and webpki's roots, follows no redirects (the token
//! would go along), reads at most [`MAX_BODY`] of an answer, and reads the blocking-query
//! index from `X-Consul-Index`. The caller bounds each request with its own timeout.
//! `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY` apply as reqwest reads them, as they do for
//! Consul's own CLI.

use std::path::Path;

use reqwest::header::{HeaderValue, ACCEPT};
use reqwest::redirect::Policy;
use reqwest::{Certificate, StatusCode};
use url::Url;

use super::api::ServiceEntry;
use super::blocking::wait_param;
use super::ConsulError;
use crate::config::Secret;
use crate::sources::retry::{error_chain, root_cause};

/// The largest answer read: a few thousand instances with checks are far below this, so
/// anything larger is not a Consul answer we can use.
pub const MAX_BODY: usize = 32 << 20;

/// The header that carries the ACL token.
const TOKEN_HEADER: &str = "X-Consul-Token";

/// One blocking round of `/v1/health/service/<service>`.
#[derive(Debug, Clone, Copy)]
pub struct HealthQuery<'a> {
    /// The service name, one path segment.
    pub service: &'a str,
    /// `dc=`: the datacenter; the agent's own when absent.
    pub datacenter: Option<&'a str>,
    /// `tag=` once per tag: Consul returns only instances carrying every one.
    pub tags: &'a [String],
    /// `index=`: 0 asks without blocking.
    pub index: u64,
    /// `wait=`: how long Consul may hold the request.
    pub wait: std::time::Duration,
}

/// A Consul agent's HTTP API, as the source uses it. Its `Debug` never shows the token.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<HeaderValue>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Validates `url` and the token, reads `ca_file`, and builds the HTTP client.
    pub fn new(
        url: &str,
        token: Option<&Secret>,
        ca_file: Option<&Path>,
    ) -> Result<Self, ConsulError> {
        let base = check_url(url)?;
        let token = token
            .map(|secret| {
                if !secret.0.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(ConsulError::BadToken);
                }
                let mut value =
                    HeaderValue::from_str(&secret.0).map_err(|_| ConsulError::BadToken)?;
                value.set_sensitive(true);
                Ok(value)
            })
            .transpose()?;
        let mut builder = reqwest::Client::builder()
            .redirect(Policy::none())
            .user_agent(concat!("upstreamd/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = ca_file {
            for cert in read_ca_file(path)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| ConsulError::Client(error_chain(&e)))?;
        Ok(Self { http, base, token })
    }

    /// The agent's address as used: scheme, host and port, no trailing slash.
    pub fn base(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    /// One blocking round: the answer's `X-Consul-Index` and its entries. Not bounded in
    /// time: the caller races it against its own timeout and shutdown.
    pub async fn health_service(
        &self,
        query: &HealthQuery<'_>,
    ) -> Result<(u64, Vec<ServiceEntry>), ConsulError> {
        let mut request = self
            .http
            .get(health_url(&self.base, query))
            .header(ACCEPT, "application/json");
        if let Some(token) = &self.token {
            request = request.header(TOKEN_HEADER, token.clone());
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| ConsulError::Request(describe_send_error(e)))?;
        let status = response.status();
        let index = response.headers().get("X-Consul-Index").cloned();
        let body = read_body(&mut response).await?;
        if !status.is_success() {
            return Err(ConsulError::Request(describe_status(status, &body)));
        }
        let index = parse_index(index.as_ref())?;
        let entries = serde_json::from_slice(&body)
            .map_err(|e| ConsulError::Request(format!("the answer is not health entries: {e}")))?;
        Ok((index, entries))
    }
}

/// The request URL for `query` under `base`: the service name percent-encoded as one path
/// segment, then `dc`, each `tag`, `index` and `wait`.
pub fn health_url(base: &Url, query: &HealthQuery<'_>) -> Url {
    let mut url = base.clone();
    url.path_segments_mut()
        // `check_url` refuses URLs that cannot be a base.
        .expect("an http(s) URL has path segments")
        .clear()
        .extend(["v1", "health", "service", query.service]);
    {
        let mut pairs = url.query_pairs_mut();
        if let Some(dc) = query.datacenter {
            pairs.append_pair("dc", dc);
        }
        for tag in query.tags {
            pairs.append_pair("tag", tag);
        }
        pairs.append_pair("index", &query.index.to_string());
        pairs.append_pair("wait", &wait_param(query.wait));
    }
    url
}

/// `X-Consul-Index` as a number: every blocking endpoint sends it, so its absence means the
/// answer did not come from Consul (a proxy's page, say).
pub fn parse_index(header: Option<&HeaderValue>) -> Result<u64, ConsulError> {
    header
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or_else(|| {
            ConsulError::NoIndex(header.map(|v| String::from_utf8_lossy(v.as_bytes()).into()))
        })
}

/// A non-2xx answer as one line: the status and the start of the body Consul explains it in
/// (`ACL not found`, `Permission denied`, …).
fn describe_status(status: StatusCode, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let text = if text.is_empty() { "no body" } else { text };
    let shown: String = text.chars().take(200).collect();
    let hint = match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            " (the ACL token is missing, unknown, or lacks service:read and node:read)"
        }
        _ => "",
    };
    format!("HTTP {}{hint}: {}", status.as_u16(), shown.escape_debug())
}

/// A request that got no answer, as a sentence: a connection that failed says so with the
/// operating system's reason, not hyper's `client error (Connect)` layers.
fn describe_send_error(e: reqwest::Error) -> String {
    let e = e.without_url();
    if e.is_connect() {
        format!("could not connect: {}", root_cause(&e))
    } else {
        error_chain(&e)
    }
}

/// The body, refused past [`MAX_BODY`] without reading the rest.
async fn read_body(response: &mut reqwest::Response) -> Result<Vec<u8>, ConsulError> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| ConsulError::Request(error_chain(&e.without_url())))?
    {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(ConsulError::Request(format!(
                "the answer is larger than {} MiB",
                MAX_BODY >> 20
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `url` as the agent's base: `http`/`https` with a host and nothing after the port; a bare
/// `host:port` (the usual `CONSUL_HTTP_ADDR` form) means `http://`, as Consul's own CLI reads it.
fn check_url(raw: &str) -> Result<Url, ConsulError> {
    let bad = |reason| ConsulError::BadUrl {
        url: raw.to_owned(),
        reason,
    };
    let full = if raw.contains("://") {
        raw.to_owned()
    } else {
        format!("http://{raw}")
    };
    let url = Url::parse(&full).map_err(|_| bad("is not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("must start with http:// or https://"));
    }
    if url.host_str().is_none() || url.cannot_be_a_base() {
        return Err(bad("has no host"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(bad(
            "must not have a path, query or fragment (upstreamd adds /v1/...)",
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("must not carry credentials; use the token"));
    }
    Ok(url)
}

/// The certificates of a PEM bundle. A file without any would pass silently and fail every
/// TLS handshake later: refuse it now.
fn read_ca_file(path: &Path) -> Result<Vec<Certificate>, ConsulError> {
    let shown = path.display();
    let bytes = std::fs::read(path)
        .map_err(|e| ConsulError::Client(format!("failed to read ca_file `{shown}`: {e}")))?;
    if !bytes
        .windows(27)
        .any(|w| w == b"-----BEGIN CERTIFICATE-----")
    {
        return Err(ConsulError::Client(format!(
            "ca_file `{shown}` holds no PEM certificate"
        )));
    }
    Certificate::from_pem_bundle(&bytes).map_err(|e| {
        ConsulError::Client(format!(
            "failed to read the certificates in ca_file `{shown}`: {}",
            error_chain(&e)
        ))
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn query<'a>(tags: &'a [String], datacenter: Option<&'a str>, index: u64) -> HealthQuery<'a> {
        HealthQuery {
            service: "kotaemon",
            datacenter,
            tags,
            index,
            wait: Duration::from_secs(60),
        }
    }

    #[test]
    fn tags_become_repeated_query_pairs_after_the_datacenter() {
        let base = check_url("http://127.0.0.1:8500").unwrap();
        let tags = vec!["prod".to_owned(), "v2".to_owned()];
        assert_eq!(
            health_url(&base, &query(&tags, Some("dc2"), 7)).as_str(),
            "http://127.0.0.1:8500/v1/health/service/kotaemon?dc=dc2&tag=prod&tag=v2&index=7&wait=60s"
        );
        assert_eq!(
            health_url(&base, &query(&[], None, 0)).as_str(),
            "http://127.0.0.1:8500/v1/health/service/kotaemon?index=0&wait=60s"
        );
    }

    #[test]
    fn the_service_name_and_tags_are_percent_encoded() {
        let base = check_url("https://c.example:8501/").unwrap();
        let tags = vec!["a&b=c".to_owned()];
        let q = HealthQuery {
            service: "k otaemon%",
            ..query(&tags, None, 1)
        };
        assert_eq!(
            health_url(&base, &q).as_str(),
            "https://c.example:8501/v1/health/service/k%20otaemon%25?tag=a%26b%3Dc&index=1&wait=60s"
        );
    }

    #[test]
    fn the_index_header_must_be_a_number() {
        let v = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(parse_index(Some(&v(" 42 "))).unwrap(), 42);
        for bad in [Some(v("x")), Some(v("-1")), None] {
            assert!(matches!(
                parse_index(bad.as_ref()),
                Err(ConsulError::NoIndex(_))
            ));
        }
    }

    #[test]
    fn an_error_status_shows_its_code_and_the_start_of_the_body_escaped() {
        assert_eq!(
            describe_status(StatusCode::FORBIDDEN, b"ACL not found\n"),
            "HTTP 403 (the ACL token is missing, unknown, or lacks service:read and node:read): ACL not found"
        );
        assert_eq!(
            describe_status(StatusCode::INTERNAL_SERVER_ERROR, b""),
            "HTTP 500: no body"
        );
        let long = describe_status(
            StatusCode::BAD_GATEWAY,
            "x\u{1b}[2J\ny".repeat(100).as_bytes(),
        );
        assert!(long.starts_with("HTTP 502: x\\u{1b}[2J\\ny"), "{long}");
        assert!(!long.contains('\n') && !long.contains('\u{1b}'), "{long}");
    }

    #[test]
    fn debug_output_redacts_the_token() {
        let c = Client::new("127.0.0.1:8500", Some(&Secret("s3cr3t".into())), None).unwrap();
        let shown = format!("{c:?}");
        assert!(
            shown.contains("redacted") && !shown.contains("s3cr3t"),
            "{shown}"
        );
        assert_eq!(c.base(), "http://127.0.0.1:8500");
    }
}
