//! Sources: where endpoints come from. Each runs as its own task and sends full snapshots.
//!
//! A source never sends deltas and never sends an empty set because it failed: on error it
//! sends `Failed`, and the controller keeps its last good snapshot, marked stale.

pub mod consul;
pub mod etcd;
pub mod retry;
pub mod skipped;
pub mod static_list;

use std::future::Future;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::SourceConfig;
use crate::model::{Endpoint, UpstreamName};
pub use skipped::{Skipped, SkippedEntry};

/// Which source of which upstream an update comes from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceKey {
    /// The upstream the source feeds.
    pub upstream: UpstreamName,
    /// The source's position in the upstream's `[[upstream.source]]` list.
    pub index: usize,
    /// The metric label: the kind (`consul`), with `#N` appended when an upstream has several
    /// sources of one kind.
    pub label: String,
    /// Bumped each time the source is restarted by a config reload, so that a late message
    /// from a stopped task is recognised and ignored.
    pub generation: u64,
}

/// What a source reports.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    /// The full, validated list of endpoints. Invalid entries are already left out (and
    /// logged by the source with their key); `skipped` says how many and which.
    Snapshot {
        /// Every valid endpoint, in any order.
        endpoints: Vec<Endpoint>,
        /// The entries left out: the total and the first few by name, with why.
        skipped: Skipped,
        /// How many of the left-out entries the source's previous answer did not leave out:
        /// what `upstreamd_registry_entries_skipped_total` grows by.
        newly_skipped: usize,
    },
    /// The source could not get an answer; its last snapshot stands, marked stale.
    Failed {
        /// What went wrong, without secrets.
        error: String,
    },
}

/// One message from a source to the controller.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceUpdate {
    /// Who sent it.
    pub key: SourceKey,
    /// What happened.
    pub event: SourceEvent,
}

/// The sending end a source reports through.
#[derive(Debug, Clone)]
pub struct Sink {
    key: SourceKey,
    tx: mpsc::Sender<SourceUpdate>,
}

impl Sink {
    /// A sink that tags every update with `key`.
    pub fn new(key: SourceKey, tx: mpsc::Sender<SourceUpdate>) -> Self {
        Self { key, tx }
    }

    /// The key this sink reports as.
    pub fn key(&self) -> &SourceKey {
        &self.key
    }

    /// Reports a full snapshot. Returns false when the controller is gone.
    pub async fn snapshot(
        &self,
        endpoints: Vec<Endpoint>,
        skipped: Skipped,
        newly_skipped: usize,
    ) -> bool {
        self.send(SourceEvent::Snapshot {
            endpoints,
            skipped,
            newly_skipped,
        })
        .await
    }

    /// Reports a failure. Returns false when the controller is gone.
    pub async fn failed(&self, error: impl Into<String>) -> bool {
        self.send(SourceEvent::Failed {
            error: error.into(),
        })
        .await
    }

    async fn send(&self, event: SourceEvent) -> bool {
        self.tx
            .send(SourceUpdate {
                key: self.key.clone(),
                event,
            })
            .await
            .is_ok()
    }
}

/// A source of endpoints: runs until `shutdown` is cancelled, reporting through `sink`.
pub trait Source: Send + 'static {
    /// Runs the source to completion.
    fn run(self, sink: Sink, shutdown: CancellationToken) -> impl Future<Output = ()> + Send;
}

/// The metric labels of an upstream's sources, in order: the kind, or `kind#N` (N from 1)
/// when the upstream has several sources of that kind.
pub fn labels(sources: &[SourceConfig]) -> Vec<String> {
    let count =
        |upto: &[SourceConfig], kind: &str| upto.iter().filter(|o| o.kind() == kind).count();
    sources
        .iter()
        .enumerate()
        .map(|(i, s)| match count(sources, s.kind()) {
            1 => s.kind().to_owned(),
            _ => format!("{}#{}", s.kind(), count(&sources[..=i], s.kind())),
        })
        .collect()
}

/// Checks what only a source's own constructor can (TLS files readable and matching the
/// endpoints' scheme, a token usable as a header), without touching the network. Every
/// problem is returned with its key path, for `upstreamd check`.
pub fn check(cfg: &crate::config::Config) -> Vec<String> {
    let mut problems = Vec::new();
    for (u, upstream) in cfg.upstreams.iter().enumerate() {
        for (i, source) in upstream.sources.iter().enumerate() {
            let error = match source {
                SourceConfig::Static(_) => None,
                SourceConfig::Consul(c) => consul::ConsulWatch::new(c).err().map(|e| e.to_string()),
                SourceConfig::Etcd(c) => etcd::EtcdWatch::new(c).err().map(|e| e.to_string()),
            };
            if let Some(e) = error {
                problems.push(format!("upstream[{u}].source[{i}]: {e}"));
            }
        }
    }
    problems
}

/// Runs `step` (a sleep, a send to a busy controller); false when shutdown came first or
/// `step` says to stop (the controller is gone). Every await of a source goes through this.
pub(crate) async fn until_shutdown(
    step: impl std::future::Future<Output = bool>,
    shutdown: &CancellationToken,
) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        go_on = step => go_on,
    }
}

/// Starts the task for one configured source.
pub fn spawn(
    key: SourceKey,
    cfg: &SourceConfig,
    tx: mpsc::Sender<SourceUpdate>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let sink = Sink::new(key, tx);
    match cfg {
        SourceConfig::Static(s) => {
            tokio::spawn(static_list::StaticList::new(s).run(sink, shutdown))
        }
        SourceConfig::Consul(c) => start(consul::ConsulWatch::new(c), sink, shutdown),
        SourceConfig::Etcd(c) => start(etcd::EtcdWatch::new(c), sink, shutdown),
    }
}

/// Runs a source that could be built; otherwise reports why (an unreadable `ca_file` the
/// loader let through) as the source's failure and stays until shutdown, so the controller
/// never renders from a source that never answered.
fn start<S: Source, E: std::fmt::Display>(
    built: Result<S, E>,
    sink: Sink,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    match built {
        Ok(source) => tokio::spawn(source.run(sink, shutdown)),
        Err(e) => {
            let error = e.to_string();
            tokio::spawn(async move {
                let key = sink.key();
                tracing::error!(upstream = %key.upstream, source = %key.label, %error, "Source could not start.");
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    delivered = sink.failed(error) => if delivered {
                        shutdown.cancelled().await;
                    },
                }
            })
        }
    }
}
