//! Starting upstreams and applying a reloaded config in place: which upstreams keep their
//! source tasks, snapshots and verdicts, and which restart.

use std::path::Path;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::changes::parse_servers;
use super::saved::{self, Saver};
use super::state::{SavedSnapshot, UpstreamState};
use super::Controller;
use crate::config::{Config, NginxConfig, UpstreamConfig};
use crate::events::{Event, UpstreamRemoved, UpstreamStarted};
use crate::nginx::Nginx;
use crate::render::Renderer;
use crate::sources::{self, SourceKey};

impl<N: Nginx> Controller<N> {
    fn start_upstream(&mut self, cfg: UpstreamConfig) -> (UpstreamState, CancellationToken) {
        let labels = sources::labels(&cfg.sources);
        let token = self.shutdown.child_token();
        for (index, (scfg, label)) in cfg.sources.iter().zip(&labels).enumerate() {
            let key = SourceKey {
                upstream: cfg.name.clone(),
                index,
                label: label.clone(),
                generation: self.generation,
            };
            sources::spawn(key, scfg, self.source_tx.clone(), token.clone());
        }
        UpstreamStarted {
            upstream: &cfg.name,
            sources: &labels,
        }
        .emit(&self.metrics);
        let mut state = UpstreamState::new(cfg, labels);
        state.generation = self.generation;
        state.on_disk = self.on_disk_servers(&state.cfg.name);
        self.load_saved(&mut state);
        (state, token)
    }

    /// The addresses the include file on disk holds for `upstream` (none without a file).
    fn on_disk_servers(
        &self,
        upstream: &crate::model::UpstreamName,
    ) -> std::collections::BTreeSet<crate::model::Address> {
        let text = crate::nginx::read_current(&self.cfg.nginx.output)
            .ok()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        parse_servers(&text)
            .remove(upstream.as_str())
            .unwrap_or_default()
            .into_keys()
            .filter_map(|a| a.parse().ok())
            .collect()
    }

    /// Reads the snapshots an earlier run saved for this upstream's registry sources.
    fn load_saved(&self, state: &mut UpstreamState) {
        let Some(saver) = &self.saver else { return };
        for (scfg, src) in state.cfg.sources.iter().zip(&mut state.sources) {
            let Some(identity) = saved::identity(scfg) else {
                continue;
            };
            match saver.load(&state.cfg.name, &src.label, &identity) {
                Ok(Some(saved)) => {
                    tracing::info!(upstream = %state.cfg.name, source = %src.label,
                        endpoints = saved.endpoints.len(),
                        "Found the snapshot an earlier run saved; it is used only if the source fails before its first answer.");
                    src.saved = Some(saved);
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(upstream = %state.cfg.name, source = %src.label, %error,
                    "Could not use the saved snapshot.")
                }
            }
        }
    }

    /// Keeps snapshots in `dir` from now on (read-only in `once --dry-run`); nothing when
    /// that is where they are kept already.
    fn use_state_dir(&mut self, dir: Option<&Path>) {
        if self.saver.as_ref().map(Saver::dir) != dir {
            let open = if self.writes_state {
                Saver::start
            } else {
                Saver::read_only
            };
            self.saver = dir.map(open);
        }
    }

    pub(super) fn start_all(&mut self) {
        let dir = self.cfg.nginx.state_dir.clone();
        self.use_state_dir(dir.as_deref());
        for u in self.cfg.upstreams.clone() {
            let (state, token) = self.start_upstream(u);
            self.upstreams.push(state);
            self.source_tokens.push(token);
        }
    }

    /// Applies a new, validated config in place: upstreams whose sources are unchanged keep
    /// their source tasks and snapshots (and their probe verdicts, unless the health config
    /// changed); others restart. The `[nginx]` paths and commands are bound to the running
    /// nginx edge and take effect on restart; `settle`, `min_reload_interval`, `template`,
    /// `state_dir` and `max_old_generations` apply at once. A failed apply is retried at once. A template that does not
    /// load (`check` refuses it first) keeps the running config whole.
    pub(super) fn reconfigure(&mut self, mut cfg: Config) {
        match Renderer::checked(cfg.nginx.template.as_deref()) {
            Ok(renderer) => self.renderer = renderer,
            Err(error) => {
                tracing::error!(%error, "Refusing the new config: its template does not load; keeping the running one.");
                self.notify("READY", self.notifier.ready());
                return;
            }
        }
        let (old_nginx, new_nginx) = (&self.cfg.nginx, &cfg.nginx);
        if (
            &old_nginx.output,
            &old_nginx.pid_file,
            &old_nginx.test_command,
            &old_nginx.reload_command,
            old_nginx.confirm_timeout,
            old_nginx.apply,
            &old_nginx.lua,
        ) != (
            &new_nginx.output,
            &new_nginx.pid_file,
            &new_nginx.test_command,
            &new_nginx.reload_command,
            new_nginx.confirm_timeout,
            new_nginx.apply,
            &new_nginx.lua,
        ) {
            tracing::warn!("The [nginx] output, pid_file, commands, confirm_timeout, apply and lua_* keys take effect on restart; keeping the running ones.");
            cfg.nginx = NginxConfig {
                settle: cfg.nginx.settle,
                min_reload_interval: cfg.nginx.min_reload_interval,
                template: cfg.nginx.template.clone(),
                state_dir: cfg.nginx.state_dir.clone(),
                error_log: cfg.nginx.error_log.clone(),
                max_old_generations: cfg.nginx.max_old_generations,
                ..self.cfg.nginx.clone()
            };
        }
        self.use_state_dir(cfg.nginx.state_dir.as_deref());
        let now = Instant::now();
        let mut old: Vec<(UpstreamState, CancellationToken)> = self
            .upstreams
            .drain(..)
            .zip(self.source_tokens.drain(..))
            .collect();
        let (mut kept, mut restarted) = (0, 0);
        for ucfg in cfg.upstreams.clone() {
            let found = old.iter().position(|(o, _)| o.cfg.name == ucfg.name);
            let (state, token) = match found {
                Some(i) if old[i].0.cfg.sources == ucfg.sources => {
                    let (mut state, token) = old.remove(i);
                    let health_changed = state.cfg.health != ucfg.health;
                    state.cfg = ucfg;
                    if health_changed {
                        state.reset_health(now);
                    }
                    kept += 1;
                    (state, token)
                }
                found => {
                    let prev = found.map(|i| old.remove(i));
                    self.generation += 1;
                    let (mut state, token) = self.start_upstream(ucfg);
                    if let Some((prev, prev_token)) = prev {
                        prev_token.cancel();
                        // Verdicts of endpoints that stay carry over when probing is unchanged.
                        carry_snapshots(&prev, &mut state);
                        if prev.cfg.health == state.cfg.health {
                            state.health = prev.health;
                            state.first_probe_horizon =
                                state.first_probe_horizon.max(prev.first_probe_horizon);
                            state.hinted_404 = prev.hinted_404;
                        }
                    }
                    restarted += 1;
                    (state, token)
                }
            };
            self.prober
                .sync(&state.cfg.name, &state.cfg.health, &state.addresses());
            self.upstreams.push(state);
            self.source_tokens.push(token);
        }
        for (gone, token) in old {
            token.cancel();
            self.prober.remove_upstream(&gone.cfg.name);
            UpstreamRemoved {
                upstream: &gone.cfg.name,
            }
            .emit(&self.metrics);
        }
        self.schedule
            .set_pacing(cfg.nginx.settle, super::min_interval(&cfg));
        // A SIGHUP is the operator saying "try again now" (the site config may be fixed).
        self.schedule.retry_now();
        self.cfg = cfg;
        self.gauges_stale = true;
        self.dirty = true;
        tracing::info!(kept, restarted, "Configuration reloaded.");
        // Ends the RELOADING=1 that main sent when SIGHUP arrived.
        self.notify("READY", self.notifier.ready());
    }
}

/// When a reload restarts an upstream, each of its sources configured as before keeps its last
/// snapshot as its saved one, so it is the shrink guard's baseline and the fallback if the
/// restarted source fails before answering.
fn carry_snapshots(prev: &UpstreamState, new: &mut UpstreamState) {
    for (i, src) in new.sources.iter_mut().enumerate() {
        let same = prev.cfg.sources.get(i) == new.cfg.sources.get(i);
        if let (true, Some(endpoints)) =
            (same, prev.sources.get(i).and_then(|p| p.snapshot.clone()))
        {
            src.saved = Some(SavedSnapshot {
                endpoints,
                saved_at: None,
            });
        }
    }
}
