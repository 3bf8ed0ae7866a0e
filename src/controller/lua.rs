//! The apply edge of `apply = "lua"`: the same decided membership, pushed instead of reloaded.
//!
//! The controller still renders the reload-mode text (it describes the change and tells a
//! removal from an addition), but compares it with the text whose push nginx confirmed
//! rather than with the file on disk. An apply writes `snapshot.json`, makes the include hold
//! the shell (a reload only when the shell's bytes change: names and settings), then pushes
//! and confirms. Once a second the status endpoint is read: a restarted nginx (new master),
//! a generation behind, or a list not from a push makes the next pass push again.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::changes::{describe, parse_servers};
use super::status::LastApply;
use super::Controller;
use crate::decide::Desired;
use crate::events::{ApplyFailed, Event, Reloaded};
use crate::metrics::Metrics;
use crate::nginx::lua::{
    membership, HttpEndpoint, LuaEndpoint, LuaPusher, Membership, PushError, Pushed,
};
use crate::nginx::{self, Applied, ApplyError, Nginx};
use crate::render::lua::LuaShell;
use crate::render::RenderError;

/// How long one request to the update server may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How often nginx's Lua status is read to notice a restart.
pub(super) const POLL_EVERY: Duration = Duration::from_secs(1);

/// Why a lua-mode apply failed.
#[derive(Debug, thiserror::Error)]
pub enum LuaApplyError {
    /// The shell template failed.
    #[error("the lua include did not render: {0}")]
    Render(#[from] RenderError),
    /// Writing, testing or reloading the shell failed.
    #[error("the lua include: {0}")]
    Shell(#[from] ApplyError),
    /// The push failed.
    #[error("{0}")]
    Push(#[from] PushError),
}

impl LuaApplyError {
    /// The `result` of the last apply on `/status`.
    pub fn result_label(&self) -> &'static str {
        match self {
            LuaApplyError::Render(_) => "render_failed",
            LuaApplyError::Shell(e) => e.result_label(),
            LuaApplyError::Push(e) => e.result_label().as_str(),
        }
    }
}

/// The lua part of `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct LuaReport {
    /// The generation every current worker confirmed, while nginx holds it.
    pub confirmed_generation: Option<u64>,
    /// The nginx master that confirmed it.
    pub master_pid: Option<i32>,
    /// Failed pushes in a row (a reload follows the third).
    pub failed_pushes: u32,
    /// The last push error, until a push is confirmed.
    pub last_push_error: Option<String>,
}

/// What the controller keeps in lua mode.
pub(super) struct LuaState {
    shell: LuaShell,
    pusher: LuaPusher,
    /// The reload-mode text whose membership nginx confirmed; `None` when a push is due.
    pub(super) applied: Option<String>,
    last_error: Option<String>,
    /// Servers named by a hostname already warned about.
    skipped: BTreeSet<String>,
}

impl LuaState {
    /// The state for `cfg`, pushing to `endpoint` (the real update server by default).
    pub(super) fn new(
        cfg: &crate::config::NginxConfig,
        endpoint: Option<Box<dyn LuaEndpoint>>,
    ) -> Self {
        let endpoint =
            endpoint.unwrap_or_else(|| Box::new(HttpEndpoint::new(&cfg.lua, REQUEST_TIMEOUT)));
        Self {
            shell: LuaShell::new().expect("the built-in lua template compiles (unit-tested)"),
            pusher: LuaPusher::new(endpoint, cfg.lua.dir.clone()),
            applied: None,
            last_error: None,
            skipped: BTreeSet::new(),
        }
    }

    pub(super) fn report(&self) -> LuaReport {
        let confirmed = self.pusher.confirmed();
        LuaReport {
            confirmed_generation: confirmed.map(|c| c.generation),
            master_pid: confirmed.map(|c| c.master_pid),
            failed_pushes: self.pusher.failed_pushes(),
            last_push_error: self.last_error.clone(),
        }
    }

    /// Prepare (snapshot before any `nginx -t`), the shell, the push.
    async fn steps<N: Nginx>(
        &mut self,
        output: &std::path::Path,
        shell: &str,
        membership: &Membership,
        nginx: &N,
        metrics: &Metrics,
    ) -> Result<(Applied, Pushed), LuaApplyError> {
        self.pusher.prepare(membership).await?;
        let applied = nginx::apply(output, shell.as_bytes(), nginx).await?;
        if let Applied::Reloaded { .. } = applied {
            // The new workers read the snapshot's generation: a push of the same one would be
            // refused as stale, so it goes out under the next.
            self.pusher.prepare(membership).await?;
        }
        let pushed = self.pusher.push(membership, nginx, metrics).await?;
        Ok((applied, pushed))
    }
}

impl<N: Nginx> Controller<N> {
    /// Reads nginx's Lua status; when nginx no longer holds what it confirmed, the next pass
    /// pushes again.
    pub(super) async fn poll_lua(&mut self) {
        let Some(lua) = self.lua.as_mut() else { return };
        if let Some(why) = lua.pusher.poll().await {
            if lua.applied.take().is_some() {
                tracing::info!(%why, "nginx no longer holds the confirmed membership; pushing it again.");
            }
            self.dirty = true;
        }
    }

    /// The servers named by hostnames, left out in lua mode: warned about once each.
    fn warn_skipped(lua: &mut LuaState, skipped: Vec<crate::nginx::lua::SkippedHost>) {
        for s in skipped {
            let key = format!("{} {}", s.upstream, s.address);
            if lua.skipped.insert(key) {
                tracing::warn!(upstream = %s.upstream, address = %s.address,
                    "Leaving out a server named by a hostname: apply = \"lua\" takes IP addresses only.");
            }
        }
    }

    /// One lua-mode apply of the rendered membership.
    pub(super) async fn apply_lua(&mut self, now: Instant) -> Result<(), LuaApplyError> {
        let Some(text) = self.rendered.clone() else {
            return Ok(());
        };
        let Some(lua) = self.lua.as_mut() else {
            return Ok(());
        };
        let desired: Vec<Desired> = self.upstreams.iter().map(|u| u.desired()).collect();
        let pairs: Vec<_> = desired
            .iter()
            .zip(&self.upstreams)
            .map(|(d, u)| (d, &u.cfg.affinity_key))
            .collect();
        let (membership, skipped) = membership(&pairs);
        Self::warn_skipped(lua, skipped);
        let changes = describe(
            lua.applied.as_deref().map(parse_servers).as_ref(),
            &parse_servers(&text),
        );
        let t0 = Instant::now();
        let shell = lua
            .shell
            .render(&desired.iter().collect::<Vec<_>>(), &self.cfg.nginx.lua);
        let result = match shell {
            Ok(shell) => {
                lua.steps(
                    &self.cfg.nginx.output,
                    &shell,
                    &membership,
                    &self.nginx,
                    &self.metrics,
                )
                .await
            }
            Err(e) => Err(e.into()),
        };
        let took = t0.elapsed();
        let retry_in =
            self.schedule
                .on_attempt(Instant::now(), result.is_ok(), rand::random::<f64>());
        let label = match &result {
            Ok((_, Pushed::Confirmed(_))) => "pushed",
            Ok((_, Pushed::FellBack(_))) => "fell_back",
            Err(e) => e.result_label(),
        };
        self.last_apply = Some(LastApply::new(label, (now, took), &changes, &result));
        match &result {
            Ok((Applied::Reloaded { reload, .. }, _)) => Reloaded {
                changes: "the lua include changed",
                took: *reload,
            }
            .emit(&self.metrics),
            Err(LuaApplyError::Shell(error)) => ApplyFailed {
                error,
                failures: self.schedule.failures(),
                retry_in,
            }
            .emit(&self.metrics),
            _ => {}
        }
        match result {
            Ok((applied, pushed)) => {
                let generation = match pushed {
                    Pushed::Confirmed(g) | Pushed::FellBack(g) => g,
                };
                tracing::info!(%changes, generation, took_ms = took.as_millis() as u64,
                    include_reloaded = matches!(applied, Applied::Reloaded { .. }),
                    fell_back = matches!(pushed, Pushed::FellBack(_)),
                    "nginx's workers confirmed the new membership.");
                lua.applied = Some(text.clone());
                lua.last_error = None;
                self.on_disk = Some(text);
                self.confirmed = true;
                self.failed = None;
                self.mark_ready();
                Ok(())
            }
            Err(e) => {
                if !matches!(e, LuaApplyError::Shell(_)) {
                    let retry = retry_in
                        .map(|d| format!("{:.1}s", d.as_secs_f64()))
                        .unwrap_or_default();
                    tracing::error!(error = %e, failures = self.schedule.failures(), retry_in = %retry,
                        "Could not push the new membership to nginx. Retrying with backoff.");
                }
                lua.last_error = Some(e.to_string());
                self.failed = Some(text);
                Err(e)
            }
        }
    }
}
