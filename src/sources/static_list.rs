//! `kind = "static"`: a fixed list from the config file, sent once.

use tokio_util::sync::CancellationToken;

use super::{Sink, Source};
use crate::config::StaticSource;
use crate::model::Endpoint;

/// A fixed list of endpoints.
#[derive(Debug, Clone)]
pub struct StaticList {
    servers: Vec<Endpoint>,
}

impl StaticList {
    /// The list from its (already validated) config.
    pub fn new(cfg: &StaticSource) -> Self {
        Self {
            servers: cfg.servers.clone(),
        }
    }
}

impl Source for StaticList {
    async fn run(self, sink: Sink, shutdown: CancellationToken) {
        if sink.snapshot(self.servers, super::Skipped::none(), 0).await {
            shutdown.cancelled().await;
        }
    }
}
