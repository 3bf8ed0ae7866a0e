//! `apply = "lua"`: membership reaches nginx without a reload. The include is a shell (upstream
//! blocks with `balancer_by_lua_block`, a shared dict, a local update server) rendered from
//! `templates/upstream-lua.conf.j2`; each membership is written to `snapshot.json`, pushed to
//! `POST /upstreamd/update` under a new generation, and confirmed once every current worker
//! reports it on `GET /upstreamd/status`. Repeated failures fall back to a reload, after which
//! the workers read `snapshot.json`. The contract with the Lua side is issue 13's.

mod client;
#[cfg(test)]
pub(crate) mod fake;
mod files;
mod payload;
mod push;

use std::path::PathBuf;
use std::time::Duration;

pub use client::{HttpEndpoint, LuaEndpoint, LuaStatus};
pub use files::{ensure_secret, write_lua_files, write_snapshot, LUA_FILES, SNAPSHOT};
pub use payload::{body, membership, Membership, Peer, SkippedHost, UpstreamPeers};
pub use push::{Confirmed, LuaPusher, Pushed, CONFIRM_TIMEOUT, FALLBACK_AFTER};

use super::NginxError;

/// Why a push did not end with every worker holding its generation.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The secret file could not be read.
    #[error("failed to read the Lua secret `{}`: {source}", path.display())]
    Secret {
        /// `lua_secret_file`.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No connection to the update server (nginx down, or its include not loaded yet).
    #[error("failed to connect to nginx's Lua update server at {listen}: {source}")]
    Connect {
        /// `lua_listen`.
        listen: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("the exchange with nginx's Lua update server failed: {0}")]
    Http(String),
    /// No answer in time.
    #[error("nginx's Lua update server did not answer within {0:?}")]
    Timeout(Duration),
    /// nginx refused the request: 401 (wrong secret), 400 (invalid membership), 413 ...
    #[error("nginx refused the push ({status}): {error}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// nginx's `error`, or the start of its body.
        error: String,
    },
    /// nginx holds a newer generation (409).
    #[error("nginx holds generation {generation}, newer than the one pushed")]
    Stale {
        /// The generation nginx holds.
        generation: u64,
    },
    /// A reply that is not the contract's JSON.
    #[error("nginx's Lua update server sent an unexpected reply: {0}")]
    BadReply(String),
    /// Not every worker reported the generation in time.
    #[error("not every nginx worker loaded generation {generation} within {within:?}: {detail}")]
    Unconfirmed {
        /// The generation pushed.
        generation: u64,
        /// How long upstreamd waited.
        within: Duration,
        /// What it saw last.
        detail: String,
    },
    /// Reading nginx's workers from /proc failed.
    #[error("failed to list nginx's workers: {0}")]
    Proc(NginxError),
    /// Writing `snapshot.json` or the Lua files failed.
    #[error("{0}")]
    Files(NginxError),
    /// The fallback reload failed.
    #[error("the fallback reload failed: {0}")]
    Reload(NginxError),
    /// The fallback reload took, but the workers did not confirm the snapshot's generation.
    #[error("nginx reloaded to read snapshot.json, but: {0}")]
    AfterReload(Box<PushError>),
}

impl PushError {
    /// The `result` label of `upstreamd_lua_pushes_total` for a push that ended so.
    pub fn result_label(&self) -> &'static str {
        match self {
            PushError::Rejected { .. } | PushError::Stale { .. } => "rejected",
            PushError::Unconfirmed { .. } => "unconfirmed",
            PushError::AfterReload(e) => e.result_label(),
            _ => "failed",
        }
    }
}
