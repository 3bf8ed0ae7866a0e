//! The reconcile loop: the one stateful task. Sources and probes feed it events; every
//! wake-up recomputes the whole file from current state, and a changed file is applied after
//! `settle`, at most once per `min_reload_interval`.

mod reconfigure;
pub mod saved;
pub mod state;
pub mod status;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::decide::Desired;
use crate::health::{Health, ProbeReport, Prober};
use crate::metrics::Metrics;
use crate::nginx::{self, Applied, ApplyError, Nginx};
use crate::notify::Notifier;
use crate::render::{RenderError, Renderer};
use crate::sources::{SourceEvent, SourceKey, SourceUpdate};
use saved::Saver;
use state::{ShrinkEvent, UpstreamState};
use status::{ControllerHandle, LastApply, StatusReport, StatusRequest};

/// How many probes may be in flight at once, across every upstream.
const MAX_CONCURRENT_PROBES: usize = 512;

/// What the loop is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The daemon: run until shutdown.
    Run,
    /// One full cycle, then return; with `dry_run` the file is only rendered.
    Once {
        /// Render and return the text; write nothing, signal nothing.
        dry_run: bool,
        /// Give up when sources and first probes are not in by then.
        deadline: Duration,
    },
}

/// How the loop ended.
#[derive(Debug)]
pub enum Outcome {
    /// Shutdown was requested.
    Stopped,
    /// `once`: the file was applied (or already up to date).
    Applied,
    /// `once --dry-run`: the text that would be written.
    Rendered(String),
}

/// Why the loop failed.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// `once` could not gather every source and first probe in time.
    #[error("gave up after {0:?}: {1}")]
    NotReady(Duration, String),
    /// `once` could not apply the file.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The template failed.
    #[error(transparent)]
    Render(#[from] RenderError),
}

/// The controller and everything it owns.
pub struct Controller<N: Nginx> {
    cfg: Config,
    renderer: Renderer,
    nginx: N,
    metrics: Arc<Metrics>,
    prober: Prober,
    upstreams: Vec<UpstreamState>,
    source_tokens: Vec<CancellationToken>,
    generation: u64,
    source_tx: mpsc::Sender<SourceUpdate>,
    source_rx: mpsc::Receiver<SourceUpdate>,
    probe_rx: mpsc::Receiver<ProbeReport>,
    shutdown: CancellationToken,
    /// The latest rendered text (valid when not dirty).
    rendered: Option<String>,
    /// Something changed since `rendered` was computed.
    dirty: bool,
    /// When the first change not yet applied was seen.
    pending_since: Option<Instant>,
    last_reload: Option<Instant>,
    /// A text that failed to apply: not retried until something changes.
    rejected: Option<String>,
    /// What the last applied file said, for logging what changed.
    applied: Option<Vec<Desired>>,
    /// Whether the first apply succeeded.
    ready: bool,
    last_apply: Option<LastApply>,
    started: Instant,
    handle: ControllerHandle,
    status_rx: mpsc::Receiver<StatusRequest>,
    notifier: Notifier,
    /// Endpoint counts changed since the gauges were last set.
    gauges_stale: bool,
    /// Keeps each registry source's last good snapshot in `state_dir`, when set.
    saver: Option<Saver>,
}

impl<N: Nginx> Controller<N> {
    /// A controller for `cfg`; it starts sources and probes when run.
    pub fn new(
        cfg: Config,
        renderer: Renderer,
        nginx: N,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        let (source_tx, source_rx) = mpsc::channel(1024);
        let (probe_tx, probe_rx) = mpsc::channel(4096);
        let (handle, status_rx) = ControllerHandle::new();
        Self {
            cfg,
            renderer,
            nginx,
            metrics,
            prober: Prober::new(probe_tx, MAX_CONCURRENT_PROBES),
            upstreams: Vec::new(),
            source_tokens: Vec::new(),
            generation: 0,
            source_tx,
            source_rx,
            probe_rx,
            shutdown,
            rendered: None,
            dirty: true,
            pending_since: None,
            last_reload: None,
            rejected: None,
            applied: None,
            ready: false,
            last_apply: None,
            started: Instant::now(),
            handle,
            status_rx,
            notifier: Notifier::disabled(),
            gauges_stale: true,
            saver: None,
        }
    }

    /// Sends systemd notifications (readiness, status, watchdog) through `notifier`.
    pub fn with_notifier(mut self, notifier: Notifier) -> Self {
        self.notifier = notifier;
        self
    }

    fn notify(&self, what: &str, result: Result<(), crate::notify::NotifyError>) {
        if let Err(error) = result {
            tracing::warn!(%error, what, "Could not notify systemd.");
        }
    }

    /// A one-line summary for `systemctl status`.
    fn summary(&self) -> String {
        let parts: Vec<String> = self
            .upstreams
            .iter()
            .map(|u| {
                let [(_, up), (_, down), (_, unknown)] = u.counts();
                let stale = u.sources.iter().filter(|s| s.error.is_some()).count();
                let stale = if stale > 0 {
                    format!(", {stale} source(s) stale")
                } else {
                    String::new()
                };
                format!(
                    "{}: {up} healthy, {down} unhealthy, {unknown} unknown{stale}",
                    u.cfg.name
                )
            })
            .collect();
        let last = self
            .last_apply
            .as_ref()
            .map(|a| format!("; last apply {}", a.result))
            .unwrap_or_default();
        format!("{}{last}", parts.join("; "))
    }

    /// The trigger that brings probes forward (nginx's error-log feed rings it).
    pub fn probe_trigger(&self) -> crate::health::ProbeTrigger {
        self.prober.trigger()
    }

    /// A handle that asks this controller for its status once it runs.
    pub fn handle(&self) -> ControllerHandle {
        self.handle.clone()
    }

    /// The current status.
    pub fn status_report(&self) -> StatusReport {
        let now = Instant::now();
        StatusReport {
            version: env!("CARGO_PKG_VERSION"),
            ready: self.ready,
            uptime_secs: now.duration_since(self.started).as_secs_f64(),
            upstreams: self
                .upstreams
                .iter()
                .map(|u| status::upstream_status(u, now, u.shrink_held(now)))
                .collect(),
            last_apply: self.last_apply.as_ref().map(|a| a.report(now)),
            change_pending: self.pending_since.is_some(),
        }
    }

    /// Runs until shutdown (`Mode::Run`) or one cycle is done (`Mode::Once`). Config reloads
    /// arrive on `reloads`, already validated.
    pub async fn run(
        mut self,
        mode: Mode,
        mut reloads: mpsc::Receiver<Config>,
    ) -> Result<Outcome, ControllerError> {
        let started = Instant::now();
        self.start_all();
        let mut reloads_open = true;
        // The watchdog is fed from this loop itself, so a stuck loop stops feeding it.
        let watchdog_every = self
            .notifier
            .watchdog_interval()
            .unwrap_or(Duration::from_secs(3600));
        let mut watchdog = tokio::time::interval(watchdog_every);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let now = Instant::now();
            if let Mode::Once { deadline, .. } = mode {
                if now >= started + deadline {
                    return Err(ControllerError::NotReady(deadline, self.waiting_for()));
                }
            }
            let wake = self
                .next_wake(now)
                .unwrap_or(now + Duration::from_secs(3600));
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    self.notify("STOPPING", self.notifier.stopping());
                    return Ok(Outcome::Stopped);
                }
                _ = watchdog.tick(), if mode == Mode::Run && self.notifier.watchdog_interval().is_some() => {
                    self.notify("WATCHDOG", self.notifier.watchdog());
                    continue;
                }
                Some(request) = self.status_rx.recv() => {
                    // The asker may have given up waiting; nothing to do then.
                    let _ = request.send(self.status_report());
                    continue;
                }
                Some(update) = self.source_rx.recv() => self.on_source(update),
                Some(report) = self.probe_rx.recv() => {
                    self.on_probe(report);
                    // Take whatever else is queued before recomputing, so a burst of probe
                    // results costs one render.
                    while let Ok(more) = self.probe_rx.try_recv() {
                        self.on_probe(more);
                    }
                }
                cfg = reloads.recv(), if reloads_open => match cfg {
                    Some(cfg) => self.reconfigure(cfg)?,
                    None => reloads_open = false,
                },
                _ = sleep_until(wake.into()) => {}
            }
            self.release_holds(Instant::now());
            if let Some(done) = self.step(Instant::now(), mode).await? {
                return Ok(done);
            }
        }
    }

    fn waiting_for(&self) -> String {
        let mut waiting = Vec::new();
        for u in &self.upstreams {
            for s in u.sources.iter().filter(|s| s.snapshot.is_none()) {
                let why = s
                    .error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                waiting.push(format!(
                    "upstream {} source {} has not delivered{why}",
                    u.cfg.name, s.label
                ));
            }
        }
        if waiting.is_empty() {
            "first probes still pending".into()
        } else {
            waiting.join("; ")
        }
    }

    fn next_wake(&self, now: Instant) -> Option<Instant> {
        let probes = self
            .upstreams
            .iter()
            .filter_map(|u| u.pending_first_probe(now))
            .min();
        let apply = self.pending_since.map(|p| self.apply_at(p));
        let holds = self.upstreams.iter().filter_map(|u| u.next_release()).min();
        probes.into_iter().chain(apply).chain(holds).min()
    }

    fn apply_at(&self, pending_since: Instant) -> Instant {
        let settle = pending_since + self.cfg.nginx.settle;
        match self.last_reload {
            Some(last) => settle.max(last + self.cfg.nginx.min_reload_interval),
            None => settle,
        }
    }

    fn upstream_mut(&mut self, key: &SourceKey) -> Option<&mut UpstreamState> {
        self.upstreams
            .iter_mut()
            .find(|u| u.cfg.name == key.upstream && u.generation == key.generation)
    }

    fn on_source(&mut self, update: SourceUpdate) {
        let now = Instant::now();
        let metrics = Arc::clone(&self.metrics);
        let SourceUpdate { key, event } = update;
        let labels = [
            ("upstream", key.upstream.as_str()),
            ("source", key.label.as_str()),
        ];
        let Some(u) = self.upstream_mut(&key) else {
            return;
        };
        match &event {
            SourceEvent::Snapshot { skipped, .. } => {
                metrics.inc("upstreamd_source_updates_total", &labels);
                metrics.set("upstreamd_source_up", &labels, 1.0);
                if *skipped > 0 {
                    metrics.add(
                        "upstreamd_registry_entries_skipped_total",
                        &labels,
                        *skipped as f64,
                    );
                }
                if u.sources.get(key.index).is_some_and(|s| s.error.is_some()) {
                    tracing::info!(upstream = %key.upstream, source = %key.label, "Source recovered.");
                }
            }
            SourceEvent::Failed { error } => {
                metrics.set("upstreamd_source_up", &labels, 0.0);
                if u.sources.get(key.index).is_some_and(|s| s.error.is_none()) {
                    tracing::warn!(upstream = %key.upstream, source = %key.label, %error,
                        "Source failed; keeping its last snapshot and changing nothing in nginx.");
                }
            }
        }
        let delta = u.on_source(key.index, event, now);
        self.after_source(&key, &delta, now);
        let Some(u) = self.upstream_mut(&key) else {
            return;
        };
        if !delta.changed {
            return;
        }
        if !delta.added.is_empty() || !delta.removed.is_empty() {
            tracing::info!(
                upstream = %key.upstream, source = %key.label,
                added = ?delta.added.iter().map(ToString::to_string).collect::<Vec<_>>(),
                removed = ?delta.removed.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "Registry membership changed."
            );
        }
        let (name, health, addresses) = (u.cfg.name.clone(), u.cfg.health.clone(), u.addresses());
        self.prober.sync(&name, &health, &addresses);
        self.gauges_stale = true;
        self.dirty = true;
    }

    /// The shrink guard's log lines and gauge, the saved-snapshot start, and saving a new
    /// snapshot, for one source update.
    fn after_source(&mut self, key: &SourceKey, delta: &state::Delta, now: Instant) {
        let Some(u) = self.upstreams.iter().find(|u| u.cfg.name == key.upstream) else {
            return;
        };
        let (name, label) = (key.upstream.as_str(), key.label.as_str());
        let src = &u.sources[key.index];
        match delta.shrink {
            ShrinkEvent::Held => {
                let held = src.held.as_ref();
                tracing::warn!(
                    upstream = name, source = label,
                    before = held.map_or(0, |h| h.before), after = held.map_or(0, |h| h.after),
                    max_shrink = u.cfg.max_shrink, hold = %humantime::format_duration(u.cfg.shrink_hold),
                    "SHRINK HELD: the source answered without most of the upstream's endpoints; not applying it for shrink_hold (a registry losing data, or an ACL token that lost read access, looks like this). A deliberate scale-down passes when the hold ends."
                );
            }
            ShrinkEvent::Dropped => tracing::info!(
                upstream = name,
                source = label,
                "The held shrink is dropped: the source answered with the endpoints again."
            ),
            ShrinkEvent::StillHeld | ShrinkEvent::None => {}
        }
        if delta.started_from_saved {
            let age = src
                .saved
                .as_ref()
                .and_then(|s| s.saved_at)
                .and_then(|at| SystemTime::now().duration_since(at).ok())
                .map(|d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string());
            tracing::warn!(upstream = name, source = label,
                endpoints = src.snapshot.as_ref().map_or(0, Vec::len),
                saved_ago = age.as_deref().unwrap_or("before the config reload"),
                "The source failed before its first answer; starting from its saved snapshot (stale until it answers).");
        }
        if delta.snapshot_changed {
            self.save_snapshot(key.upstream.clone(), key.index);
        }
        self.update_shrink_gauge(&key.upstream, now);
    }

    fn update_shrink_gauge(&self, upstream: &crate::model::UpstreamName, now: Instant) {
        if let Some(u) = self.upstreams.iter().find(|u| &u.cfg.name == upstream) {
            let held = u.shrink_held(now).is_some();
            self.metrics.set(
                "upstreamd_shrink_held",
                &[("upstream", upstream.as_str())],
                if held { 1.0 } else { 0.0 },
            );
        }
    }

    /// Queues the snapshot of source `index` of `upstream` for `state_dir`.
    fn save_snapshot(&self, upstream: crate::model::UpstreamName, index: usize) {
        let Some(saver) = &self.saver else { return };
        let Some(u) = self.upstreams.iter().find(|u| u.cfg.name == upstream) else {
            return;
        };
        let (Some(scfg), Some(src)) = (u.cfg.sources.get(index), u.sources.get(index)) else {
            return;
        };
        if let (Some(identity), Some(snapshot)) = (saved::identity(scfg), &src.snapshot) {
            saver.save(&upstream, &src.label, &identity, snapshot);
        }
    }

    /// Applies held shrinks whose `shrink_hold` has passed.
    fn release_holds(&mut self, now: Instant) {
        for i in 0..self.upstreams.len() {
            let Some((released, delta)) = self.upstreams[i].release_held(now) else {
                continue;
            };
            let u = &self.upstreams[i];
            let name = u.cfg.name.clone();
            for &index in &released {
                tracing::warn!(upstream = %name, source = %u.sources[index].label,
                    removed = ?delta.removed.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "The shrink held for shrink_hold is now applied.");
            }
            let (health, addresses) = (u.cfg.health.clone(), u.addresses());
            if delta.snapshot_changed {
                for &index in &released {
                    self.save_snapshot(name.clone(), index);
                }
            }
            self.update_shrink_gauge(&name, now);
            if delta.changed {
                self.prober.sync(&name, &health, &addresses);
                self.update_gauges();
                self.dirty = true;
            }
        }
    }

    fn on_probe(&mut self, r: ProbeReport) {
        let now = Instant::now();
        let Some(u) = self.upstreams.iter_mut().find(|u| u.cfg.name == r.upstream) else {
            return;
        };
        let name = r.upstream.as_str();
        self.metrics.inc(
            "upstreamd_probes_total",
            &[("upstream", name), ("result", r.outcome.label())],
        );
        self.metrics.observe(
            "upstreamd_probe_duration_seconds",
            &[("upstream", name)],
            r.latency.as_secs_f64(),
        );
        let transition = u.on_probe(&r.address, &r.outcome, r.latency, now);
        if !u.hinted_404 && u.all_404() {
            u.hinted_404 = true;
            tracing::warn!(upstream = name, path = %u.cfg.health.path,
                "Every endpoint answers 404 on the health path. Kotaemon has no /health: set [upstream.health] path = \"/queue/status\".");
        }
        if let Some((t, why)) = transition {
            let to = match t.to {
                Health::Up => "healthy",
                Health::Down => "unhealthy",
                Health::Unknown => "unknown",
            };
            tracing::info!(upstream = name, endpoint = %r.address, from = %t.from, to = %t.to, %why, "Endpoint health changed.");
            self.metrics.inc(
                "upstreamd_health_transitions_total",
                &[("upstream", name), ("to", to)],
            );
            self.gauges_stale = true;
            self.dirty = true;
        }
    }

    fn update_gauges(&self) {
        for u in &self.upstreams {
            for (state, n) in u.counts() {
                self.metrics.set(
                    "upstreamd_endpoints",
                    &[("upstream", u.cfg.name.as_str()), ("state", state)],
                    n as f64,
                );
            }
        }
    }

    fn render(&self) -> Result<(String, Vec<Desired>), RenderError> {
        let desired: Vec<Desired> = self.upstreams.iter().map(|u| u.desired()).collect();
        let pairs: Vec<(Desired, _)> = desired
            .iter()
            .cloned()
            .zip(self.upstreams.iter().map(|u| u.cfg.on_all_unhealthy))
            .collect();
        Ok((self.renderer.render(&pairs)?, desired))
    }

    /// One level-triggered pass: render when something changed, apply when due.
    async fn step(&mut self, now: Instant, mode: Mode) -> Result<Option<Outcome>, ControllerError> {
        if self.gauges_stale {
            // Once per pass, not per transition: a burst of first probes costs one count.
            self.gauges_stale = false;
            self.update_gauges();
        }
        if !self.upstreams.iter().all(|u| u.sources_ready()) {
            return Ok(None);
        }
        if self
            .upstreams
            .iter()
            .any(|u| u.pending_first_probe(now).is_some())
        {
            return Ok(None);
        }
        if self.dirty {
            self.dirty = false;
            let (text, _) = self.render()?;
            let on_disk = nginx::read_current(&self.cfg.nginx.output).ok().flatten();
            let changed = on_disk.as_deref() != Some(text.as_bytes());
            self.metrics.inc(
                "upstreamd_renders_total",
                &[("result", if changed { "changed" } else { "unchanged" })],
            );
            if !changed {
                self.pending_since = None;
                self.rejected = None;
            } else if self.rejected.as_deref() != Some(text.as_str()) {
                self.pending_since.get_or_insert(now);
            }
            self.rendered = Some(text);
            if !changed && mode == Mode::Run {
                self.mark_ready();
            }
        }
        match mode {
            Mode::Once { dry_run: true, .. } => {
                return Ok(self.rendered.take().map(Outcome::Rendered))
            }
            Mode::Once { dry_run: false, .. } => {
                if self.pending_since.is_some() {
                    self.apply(now).await?;
                }
                return Ok(Some(Outcome::Applied));
            }
            Mode::Run => {}
        }
        if let Some(since) = self.pending_since {
            if now >= self.apply_at(since) {
                // A failure is logged, counted and kept for /status; the daemon goes on and
                // retries on the next change.
                if let Err(e) = self.apply(now).await {
                    tracing::error!(error = %e, "Could not apply the new upstream file; the previous one is back in place.");
                }
            }
        }
        Ok(None)
    }

    fn mark_ready(&mut self) {
        if !self.ready {
            self.ready = true;
            tracing::info!(output = %self.cfg.nginx.output.display(), "Upstream file is up to date.");
            self.notify("READY", self.notifier.ready());
        }
        self.notify("STATUS", self.notifier.status(&self.summary()));
    }

    async fn apply(&mut self, now: Instant) -> Result<(), ApplyError> {
        self.pending_since = None;
        let Some(text) = self.rendered.clone() else {
            return Ok(());
        };
        let desired = self
            .upstreams
            .iter()
            .map(|u| u.desired())
            .collect::<Vec<_>>();
        let t0 = Instant::now();
        let result = nginx::apply(&self.cfg.nginx.output, text.as_bytes(), &self.nginx).await;
        let took = t0.elapsed();
        let changes = describe_changes(self.applied.as_deref(), &desired);
        self.last_apply = Some(LastApply {
            result: match &result {
                Ok(Applied::Unchanged) => "unchanged".into(),
                Ok(Applied::Reloaded { .. }) => "ok".into(),
                Err(e) => e.result_label().into(),
            },
            at: now,
            duration: took,
            changes: changes.clone(),
            error: result.as_ref().err().map(|e| e.to_string()),
        });
        match result {
            Ok(Applied::Unchanged) => {
                self.mark_ready();
                Ok(())
            }
            Ok(Applied::Reloaded { .. }) => {
                self.last_reload = Some(now);
                self.metrics
                    .inc("upstreamd_reloads_total", &[("result", "ok")]);
                self.metrics
                    .observe("upstreamd_reload_duration_seconds", &[], took.as_secs_f64());
                let unix = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default();
                self.metrics.set(
                    "upstreamd_last_reload_success_timestamp_seconds",
                    &[],
                    unix.as_secs_f64(),
                );
                tracing::info!(%changes,
                    took_ms = took.as_millis() as u64, "Applied the new upstream file and nginx reloaded.");
                self.applied = Some(desired);
                self.rejected = None;
                self.mark_ready();
                Ok(())
            }
            Err(e) => {
                self.last_reload = Some(now);
                self.metrics
                    .inc("upstreamd_reloads_total", &[("result", e.result_label())]);
                self.rejected = Some(text);
                Err(e)
            }
        }
    }
}

/// A one-line summary of what changed between two applied states, for the log.
pub fn describe_changes(before: Option<&[Desired]>, after: &[Desired]) -> String {
    let mut parts = Vec::new();
    for d in after {
        let old = before.and_then(|b| b.iter().find(|o| o.name == d.name));
        for s in &d.servers {
            let prev = old.and_then(|o| o.servers.iter().find(|p| p.address == s.address));
            match prev {
                None => parts.push(format!(
                    "{}: +{}{}",
                    d.name,
                    s.address,
                    if s.down { " (down)" } else { "" }
                )),
                Some(p) if p.down != s.down => parts.push(format!(
                    "{}: {} {}",
                    d.name,
                    s.address,
                    if s.down { "down" } else { "up" }
                )),
                Some(_) => {}
            }
        }
        if let Some(o) = old {
            for p in o
                .servers
                .iter()
                .filter(|p| !d.servers.iter().any(|s| s.address == p.address))
            {
                parts.push(format!("{}: -{}", d.name, p.address));
            }
        }
    }
    if parts.is_empty() && before.is_none() {
        "first file".into()
    } else if parts.is_empty() {
        "attributes only".into()
    } else {
        parts.join(", ")
    }
}
