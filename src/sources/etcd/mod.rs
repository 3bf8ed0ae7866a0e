//! `kind = "etcd"`: every key under a prefix, listed at a revision and then watched from it.
//!
//! The state machine lives in `machine.rs` (pure; see its diagram): `Connect` → `List`
//! (`Get(prefix, with_prefix)` at revision R; send the full snapshot) → `Watch` from R + 1
//! (apply puts and deletes to the parsed entries; send a snapshot whenever the parsed
//! membership changes) → on a compacted watch, `List` again; on any failure, report it once
//! per outage, back off (200 ms doubling to 3 s, jittered), drop the client and connect
//! again, which lists again. The last good snapshot is never replaced by an empty one
//! because of an error. Leases need nothing special: an expired lease deletes its keys, and
//! the watch sees a delete. Entries are parsed by [`parse_entry`] (three layouts).
//!
//! This module is the I/O shell: it performs what the phase names with etcd-client, bounds
//! every request with `request_timeout` (a tonic balanced channel waits, rather than fails,
//! while no endpoint is reachable), races every await against the shutdown token, and logs
//! what the machine reports.
//!
//! Each source has its own client: several upstreams watching prefixes of one cluster open
//! one connection each, which etcd handles easily at this scale.

mod entry;
mod error;
mod machine;

use std::fmt;
use std::path::Path;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, TlsOptions, WatchOptions,
    WatchResponse, WatchStream,
};
use tokio_util::sync::CancellationToken;

pub use entry::{parse_entry, EntryError};
pub use error::EtcdError;
use machine::{Change, Input, Machine, Phase, Step, WatchMsg};

use super::retry;
use super::{until_shutdown, Sink, Source};
use crate::config::EtcdSource;

/// The largest list or watch response accepted (etcd-client's default is 4 MiB, which a
/// batch of large values after a slow moment can exceed).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// HTTP/2 pings on an idle connection, so a silently dead peer breaks the watch. etcd
/// refuses pings more often than every 5 s.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// The keys under one etcd prefix, followed with get + watch. Built from an
/// [`EtcdSource`] by [`EtcdWatch::new`]; run through [`Source::run`].
pub struct EtcdWatch {
    cfg: EtcdSource,
    tls: bool,
}

impl fmt::Debug for EtcdWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `EtcdSource`'s own Debug redacts the password.
        f.debug_struct("EtcdWatch").field("cfg", &self.cfg).finish()
    }
}

impl EtcdWatch {
    /// Validates the config: a non-empty prefix, endpoints of one scheme, TLS files that
    /// match it (read once now, and again at each connect so renewed certificates are
    /// picked up), username and password together.
    pub fn new(cfg: &EtcdSource) -> Result<Self, EtcdError> {
        if cfg.prefix.is_empty() {
            return Err(EtcdError::EmptyPrefix);
        }
        if cfg.endpoints.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }
        let tls = cfg.ca_file.is_some() || cfg.cert_file.is_some() || cfg.key_file.is_some();
        let mut https = false;
        for e in &cfg.endpoints {
            match scheme(e)? {
                Some("https") => https = true,
                Some(_) if tls => {
                    return Err(EtcdError::Tls(
                        "ca_file, cert_file and key_file need https:// endpoints",
                    ))
                }
                _ => {}
            }
        }
        if https && cfg.ca_file.is_none() {
            return Err(EtcdError::Tls(
                "https:// endpoints need ca_file (no system trust roots are built in)",
            ));
        }
        if cfg.cert_file.is_some() != cfg.key_file.is_some() {
            return Err(EtcdError::Tls(
                "cert_file and key_file must be given together",
            ));
        }
        if cfg.username.is_some() != cfg.password.is_some() {
            return Err(EtcdError::Credentials);
        }
        let watch = Self {
            cfg: cfg.clone(),
            tls,
        };
        if tls {
            watch.tls_options()?;
        }
        Ok(watch)
    }

    fn tls_options(&self) -> Result<TlsOptions, EtcdError> {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &self.cfg.ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read_pem("ca_file", ca)?));
        }
        if let (Some(cert), Some(key)) = (&self.cfg.cert_file, &self.cfg.key_file) {
            let cert = read_pem("cert_file", cert)?;
            let key = read_pem("key_file", key)?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Ok(tls)
    }

    /// A new client; with a username this authenticates, otherwise it connects lazily and
    /// the list finds out whether etcd is there.
    async fn connect(&self) -> Result<Client, EtcdError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(self.cfg.connect_timeout)
            .with_keep_alive(KEEPALIVE_INTERVAL, self.cfg.request_timeout)
            // A member cut off from the leader cancels our watch instead of going quiet.
            .with_require_leader(true);
        if let (Some(user), Some(password)) = (&self.cfg.username, &self.cfg.password) {
            // etcd's simple tokens expire after 5 idle minutes and vanish on restart.
            opts = opts
                .with_user(user, password.0.as_str())
                .with_auto_token_refresh(true);
        }
        if self.tls {
            opts = opts.with_tls(self.tls_options()?);
        }
        let limit = self.cfg.connect_timeout + self.cfg.request_timeout;
        bounded(
            "connect",
            limit,
            Client::connect(&self.cfg.endpoints, Some(opts)),
        )
        .await
    }

    /// Every key under the prefix and the store revision of the answer.
    async fn list(&self, client: &Client) -> Result<Input, EtcdError> {
        let mut kv = client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let get = kv.get(
            self.cfg.prefix.as_str(),
            Some(GetOptions::new().with_prefix()),
        );
        let limit = self.cfg.request_timeout;
        let mut answer = bounded("list", limit, get).await?;
        let revision = answer
            .header()
            .map(|h| h.revision())
            .ok_or(EtcdError::Request {
                op: "list",
                detail: "the answer has no header revision".into(),
            })?;
        let kvs = answer
            .take_kvs()
            .into_iter()
            .map(|kv| kv.into_key_value())
            .collect();
        Ok(Input::Listed { revision, kvs })
    }

    async fn start_watch(&self, client: &Client, start: i64) -> Result<WatchStream, EtcdError> {
        let mut watch = client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let opts = WatchOptions::new().with_prefix().with_start_revision(start);
        let limit = self.cfg.request_timeout;
        bounded(
            "watch",
            limit,
            watch.watch(self.cfg.prefix.as_str(), Some(opts)),
        )
        .await
    }

    /// Performs the I/O of `phase` and returns its outcome for the machine.
    async fn perform(
        &self,
        phase: Phase,
        conn: &mut Option<Client>,
        watch: &mut Option<WatchStream>,
    ) -> Input {
        let outcome = match phase {
            Phase::Connect => {
                *watch = None;
                *conn = None;
                self.connect().await.map(|client| {
                    *conn = Some(client);
                    Input::Connected
                })
            }
            Phase::List => {
                *watch = None;
                match conn {
                    Some(client) => self.list(client).await,
                    None => Err(EtcdError::Request {
                        op: "list",
                        detail: "no client".into(),
                    }),
                }
            }
            Phase::Watch { start_revision } => {
                self.next_watch_message(start_revision, conn, watch).await
            }
            Phase::Backoff { attempt } => {
                *watch = None;
                *conn = None;
                tokio::time::sleep(retry::delay(attempt)).await;
                Ok(Input::BackoffElapsed)
            }
        };
        outcome.unwrap_or_else(|e| Input::Failed(e.to_string()))
    }

    async fn next_watch_message(
        &self,
        start_revision: i64,
        conn: &mut Option<Client>,
        watch: &mut Option<WatchStream>,
    ) -> Result<Input, EtcdError> {
        let fresh = watch.is_none();
        if fresh {
            let Some(client) = conn else {
                return Err(EtcdError::Request {
                    op: "watch",
                    detail: "no client".into(),
                });
            };
            *watch = Some(self.start_watch(client, start_revision).await?);
        }
        let Some(stream) = watch.as_mut() else {
            return Err(EtcdError::Request {
                op: "watch",
                detail: "no watch stream".into(),
            });
        };
        let message = if fresh {
            // The creation acknowledgement is due at once; later messages come when
            // something changes, so only this one has a deadline.
            let limit = self.cfg.request_timeout;
            tokio::time::timeout(limit, stream.message())
                .await
                .map_err(|_| EtcdError::Timeout {
                    op: "watch",
                    after: limit,
                })?
        } else {
            stream.message().await
        };
        match message {
            Ok(Some(resp)) => Ok(Input::Watched(watch_msg(&resp))),
            Ok(None) => Err(EtcdError::WatchClosed),
            Err(e) => Err(EtcdError::request("watch", &e)),
        }
    }

    /// Logs and reports what the machine decided; false when the source must stop.
    async fn carry_out(
        &self,
        step: Step,
        revision: i64,
        sink: &Sink,
        shutdown: &CancellationToken,
    ) -> bool {
        let key = sink.key();
        let (upstream, source, prefix) = (&key.upstream, &key.label, &self.cfg.prefix);
        for (etcd_key, error) in &step.refused {
            tracing::warn!(%upstream, %source, key = %etcd_key, %error, "Skipped etcd key {etcd_key}: {error}.");
        }
        for (etcd_key, first) in &step.duplicates {
            tracing::warn!(%upstream, %source, key = %etcd_key, first = %first, "Skipped etcd key {etcd_key}: its address is already given by {first}.");
        }
        if let Some(compact_revision) = step.resync {
            tracing::warn!(%upstream, %source, %prefix, compact_revision, revision, "etcd compacted history the watch still needed; listing the prefix again.");
        }
        if let Some(failures) = step.recovered_after {
            tracing::info!(%upstream, %source, %prefix, failures, "etcd answers again.");
        }
        if let Some(error) = &step.retry_failed {
            tracing::debug!(%upstream, %source, %error, "etcd still failing.");
        }
        if let Some(error) = step.report {
            tracing::warn!(%upstream, %source, endpoints = ?self.cfg.endpoints, %error, "etcd source failed; keeping its last snapshot and retrying.");
            if !until_shutdown(sink.failed(error), shutdown).await {
                return false;
            }
        }
        if let Some(snapshot) = step.send {
            tracing::debug!(%upstream, %source, endpoints = snapshot.endpoints.len(), skipped = snapshot.skipped.total, revision, "etcd membership changed.");
            if !until_shutdown(
                sink.snapshot(snapshot.endpoints, snapshot.skipped, step.newly_skipped),
                shutdown,
            )
            .await
            {
                return false;
            }
        }
        true
    }
}

impl Source for EtcdWatch {
    async fn run(self, sink: Sink, shutdown: CancellationToken) {
        let mut machine = Machine::new(self.cfg.prefix.clone());
        let mut conn: Option<Client> = None;
        let mut watch: Option<WatchStream> = None;
        loop {
            let input = tokio::select! {
                () = shutdown.cancelled() => return,
                input = self.perform(machine.phase(), &mut conn, &mut watch) => input,
            };
            let step = machine.step(input);
            if !self
                .carry_out(step, machine.revision(), &sink, &shutdown)
                .await
            {
                return;
            }
        }
    }
}

/// `request`, given `limit` to answer: its error, or a timeout, as an [`EtcdError`] for `op`.
async fn bounded<T>(
    op: &'static str,
    limit: Duration,
    request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    tokio::time::timeout(limit, request)
        .await
        .map_err(|_| EtcdError::Timeout { op, after: limit })?
        .map_err(|e| EtcdError::request(op, &e))
}

fn watch_msg(resp: &WatchResponse) -> WatchMsg {
    let changes = resp
        .events()
        .iter()
        .filter_map(|ev| {
            let kv = ev.kv()?;
            Some(match ev.event_type() {
                EventType::Put => Change::Put {
                    key: kv.key().to_vec(),
                    value: kv.value().to_vec(),
                },
                EventType::Delete => Change::Delete {
                    key: kv.key().to_vec(),
                },
            })
        })
        .collect();
    WatchMsg {
        created: resp.created(),
        canceled: resp.canceled(),
        compact_revision: resp.compact_revision(),
        cancel_reason: resp.cancel_reason().to_owned(),
        revision: resp.header().map_or(0, |h| h.revision()),
        changes,
    }
}

/// The endpoint's scheme (`None` for a bare `host:port`), or why it is unusable.
fn scheme(endpoint: &str) -> Result<Option<&str>, EtcdError> {
    let bad = || EtcdError::BadEndpoint(endpoint.to_owned());
    let (scheme, rest) = match endpoint.split_once("://") {
        Some((s @ ("http" | "https"), rest)) => (Some(s), rest),
        Some(_) => return Err(bad()),
        None => (None, endpoint),
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty()
        || authority.contains(['/', '?', '#', '@'])
        || authority.contains(|c: char| c.is_whitespace() || c.is_control())
    {
        return Err(bad());
    }
    Ok(scheme)
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, EtcdError> {
    let bytes = std::fs::read(path).map_err(|error| EtcdError::ReadFile {
        what,
        path: path.to_owned(),
        error,
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(EtcdError::NotPem {
            what,
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::config::Secret;

    fn cfg() -> EtcdSource {
        EtcdSource {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/services/kotaemon/".into(),
            username: Some("upstreamd".into()),
            password: Some(Secret("s3cr3t-pw".into())),
            ca_file: None,
            cert_file: None,
            key_file: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
        }
    }

    fn pem_file() -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"
        )
        .unwrap();
        f
    }

    #[test]
    fn debug_output_never_shows_the_password() {
        let shown = format!("{:?}", EtcdWatch::new(&cfg()).unwrap());
        assert!(
            shown.contains("/services/kotaemon/") && !shown.contains("s3cr3t"),
            "{shown}"
        );
    }

    #[test]
    fn accepts_plain_and_bare_endpoints() {
        let c = EtcdSource {
            endpoints: vec!["http://10.0.0.1:2379/".into(), "etcd-2:2379".into()],
            ..cfg()
        };
        assert!(EtcdWatch::new(&c).is_ok());
    }

    #[test]
    fn refuses_settings_that_cannot_work() {
        let refused = |c: EtcdSource| EtcdWatch::new(&c).unwrap_err();
        assert!(matches!(
            refused(EtcdSource {
                prefix: String::new(),
                ..cfg()
            }),
            EtcdError::EmptyPrefix
        ));
        assert!(matches!(
            refused(EtcdSource {
                endpoints: vec![],
                ..cfg()
            }),
            EtcdError::NoEndpoints
        ));
        for e in [
            "unix:///run/etcd.sock",
            "http://",
            "http://h:2379/v3",
            "http://u:p@h:2379",
            "h 1:2379",
        ] {
            assert!(
                matches!(
                    refused(EtcdSource {
                        endpoints: vec![e.into()],
                        ..cfg()
                    }),
                    EtcdError::BadEndpoint(_)
                ),
                "{e}"
            );
        }
        assert!(matches!(
            refused(EtcdSource {
                password: None,
                ..cfg()
            }),
            EtcdError::Credentials
        ));
        let https = vec!["https://etcd:2379".to_owned()];
        assert!(matches!(
            refused(EtcdSource {
                endpoints: https.clone(),
                ..cfg()
            }),
            EtcdError::Tls(_)
        ));
        let ca = pem_file();
        let with_ca = EtcdSource {
            ca_file: Some(ca.path().to_owned()),
            ..cfg()
        };
        assert!(
            matches!(refused(with_ca.clone()), EtcdError::Tls(_)),
            "TLS files with an http:// endpoint"
        );
        let tls = EtcdSource {
            endpoints: https,
            ..with_ca
        };
        assert!(EtcdWatch::new(&tls).is_ok());
        let half = EtcdSource {
            cert_file: Some(ca.path().to_owned()),
            ..tls.clone()
        };
        assert!(matches!(refused(half), EtcdError::Tls(_)));
        let missing = EtcdSource {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..tls.clone()
        };
        assert!(matches!(
            refused(missing),
            EtcdError::ReadFile {
                what: "ca_file",
                ..
            }
        ));
        let not_pem = tempfile::NamedTempFile::new().unwrap();
        let junk = EtcdSource {
            ca_file: Some(not_pem.path().to_owned()),
            ..tls
        };
        assert!(matches!(
            refused(junk),
            EtcdError::NotPem {
                what: "ca_file",
                ..
            }
        ));
    }

    #[tokio::test]
    async fn shutdown_ends_the_source_while_etcd_is_unreachable() {
        // Port 1 on loopback refuses connections: the source fails and backs off.
        let c = EtcdSource {
            endpoints: vec!["http://127.0.0.1:1".into()],
            username: None,
            password: None,
            ..cfg()
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let key = super::super::SourceKey {
            upstream: crate::model::UpstreamName::new("k").unwrap(),
            index: 0,
            label: "etcd".into(),
            generation: 0,
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(
            EtcdWatch::new(&c)
                .unwrap()
                .run(Sink::new(key, tx), shutdown.clone()),
        );
        let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(first.event, super::super::SourceEvent::Failed { .. }),
            "{first:?}"
        );
        shutdown.cancel();
        tokio::time::timeout(Duration::from_millis(500), task)
            .await
            .unwrap()
            .unwrap();
    }
}
