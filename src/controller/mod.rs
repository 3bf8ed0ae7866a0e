//! The reconcile loop: the one stateful task. Sources and probes feed it events; every
//! wake-up recomputes the whole file from current state, and a changed file is applied after
//! `settle` (at once when it only takes servers out), at most once per
//! `min_reload_interval`; a failed apply is retried with backoff until nginx runs the file.
//!
//! The loop itself is here; what it does with events (`events`), how it renders and applies
//! (`apply`), when (`schedule`), and how it describes a change (`changes`) each have a file.

mod apply;
pub mod changes;
mod events;
mod generations;
pub mod lua;
#[cfg(test)]
mod lua_tests;
mod reconfigure;
pub mod saved;
pub mod schedule;
#[cfg(test)]
mod startup_tests;
pub mod state;
pub mod status;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use crate::config::{ApplyMode, Config};
use crate::health::{ProbeReport, Prober};
use crate::metrics::Metrics;
use crate::nginx::{ApplyError, Nginx};
use crate::notify::Notifier;
use crate::render::{RenderError, Renderer};
use crate::sources::SourceUpdate;
use saved::Saver;
use schedule::Schedule;
use state::UpstreamState;
use status::{ControllerHandle, LastApply, Pulse, StatusReport, StatusRequest};

/// How many probes may be in flight at once, across every upstream.
const MAX_CONCURRENT_PROBES: usize = 512;

/// How long `run` waits for its first file before it tells systemd `READY=1` anyway: well
/// inside systemd's default `TimeoutStartSec=` (90 s), so a source that cannot be reached at
/// boot (a Consul agent that starts later) does not fail the unit and loop its restarts.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(30);

/// What the loop is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The daemon: run until shutdown.
    Run,
    /// One full cycle, then return; with `dry_run` the file is only rendered.
    Once {
        /// Render and return the text; write nothing, signal nothing.
        dry_run: bool,
        /// Write and test the file but do not signal nginx.
        no_reload: bool,
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
    #[error("gave up after {0:?} waiting for: {1}")]
    NotReady(Duration, String),
    /// `once` found a shrink the guard holds: it neither applies nor waits it out.
    #[error("not applying a held shrink: {0}; `upstreamd run` applies it after shrink_hold if it persists (or set shrink_hold = \"0s\")")]
    ShrinkHeld(String),
    /// `once` could not apply the file.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// `once` in lua mode could not apply the include or push the membership.
    #[error(transparent)]
    Lua(#[from] lua::LuaApplyError),
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
    /// When the pending change is due, and the retry backoff.
    schedule: Schedule,
    /// The include file's bytes as last read or written; `None` when there is none.
    on_disk: Option<String>,
    /// nginx confirmed (or was never told otherwise about) the bytes on disk. False after a
    /// failed apply whose rollback also failed: the file then holds bytes nginx never took.
    confirmed: bool,
    /// The text whose apply failed last; retried after the backoff.
    failed: Option<String>,
    /// The last render error, until a render succeeds.
    render_error: Option<String>,
    /// Whether the first apply succeeded.
    ready: bool,
    /// Whether systemd was told `READY=1`: at the first apply, or at `startup_deadline`.
    told_ready: bool,
    /// `run` tells systemd `READY=1` by then even without a first file.
    startup_deadline: Duration,
    last_apply: Option<LastApply>,
    started: Instant,
    handle: ControllerHandle,
    status_rx: mpsc::Receiver<StatusRequest>,
    notifier: Notifier,
    /// Endpoint counts changed since the gauges were last set.
    gauges_stale: bool,
    /// Keeps each registry source's last good snapshot in `state_dir`, when set.
    saver: Option<Saver>,
    /// nginx's old worker generations as last counted; `None` before the first count or
    /// while nginx cannot be inspected.
    old_generations: Option<crate::nginx::OldGenerations>,
    /// Why the pending change waits for old generations to leave, while it does.
    held: Option<String>,
    /// With `apply = "lua"`: the shell, the pusher and what nginx confirmed.
    lua: Option<lua::LuaState>,
    /// Whether `state_dir` may be written (not in `once --dry-run`).
    writes_state: bool,
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
            schedule: Schedule::new(cfg.nginx.settle, min_interval(&cfg)),
            rendered: None,
            dirty: true,
            on_disk: None,
            confirmed: true,
            failed: None,
            render_error: None,
            ready: false,
            told_ready: false,
            startup_deadline: STARTUP_DEADLINE,
            last_apply: None,
            started: Instant::now(),
            handle,
            status_rx,
            notifier: Notifier::disabled(),
            gauges_stale: true,
            saver: None,
            old_generations: None,
            held: None,
            lua: (cfg.nginx.apply == ApplyMode::Lua).then(|| lua::LuaState::new(&cfg.nginx, None)),
            writes_state: true,
            cfg,
        }
    }

    /// Pushes to `endpoint` instead of nginx's update server (lua mode; tests use a fake).
    pub fn with_lua_endpoint(mut self, endpoint: Box<dyn crate::nginx::lua::LuaEndpoint>) -> Self {
        if self.lua.is_some() {
            self.lua = Some(lua::LuaState::new(&self.cfg.nginx, Some(endpoint)));
        }
        self
    }

    /// Sends systemd notifications (readiness, status, watchdog) through `notifier`.
    pub fn with_notifier(mut self, notifier: Notifier) -> Self {
        self.notifier = notifier;
        self
    }

    /// Tells systemd `READY=1` after `deadline` even without a first file (default
    /// [`STARTUP_DEADLINE`]); the loop keeps converging, and `/readyz` waits for the file.
    pub fn with_startup_deadline(mut self, deadline: Duration) -> Self {
        self.startup_deadline = deadline;
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
            change_pending: self.schedule.is_pending(),
            apply: self.apply_state(now),
            old_generations: self.old_generations,
            max_old_generations: self.cfg.nginx.max_old_generations,
            apply_mode: self.cfg.nginx.apply,
            lua: self.lua.as_ref().map(lua::LuaState::report),
        }
    }

    /// Answers a status question; the pulse costs nothing, only a report walks the state.
    fn answer(&self, request: StatusRequest) {
        // The asker may have given up waiting; nothing to do then.
        let _ = match request {
            StatusRequest::Report(tx) => tx.send(self.status_report()).map(drop).map_err(drop),
            StatusRequest::Pulse(tx) => tx.send(Pulse { ready: self.ready }).map_err(drop),
        };
    }

    /// Runs until shutdown (`Mode::Run`) or one cycle is done (`Mode::Once`). Config reloads
    /// arrive on `reloads`, already validated.
    pub async fn run(
        mut self,
        mode: Mode,
        mut reloads: mpsc::Receiver<Config>,
    ) -> Result<Outcome, ControllerError> {
        let started = Instant::now();
        self.writes_state = !matches!(mode, Mode::Once { dry_run: true, .. });
        self.start_all();
        self.set_apply_gauges();
        let mut reloads_open = true;
        // The watchdog is fed from this loop itself, so a stuck loop stops feeding it.
        let watchdog_every = self
            .notifier
            .watchdog_interval()
            .unwrap_or(Duration::from_secs(3600));
        let mut watchdog = tokio::time::interval(watchdog_every);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut count_generations = tokio::time::interval(generations::POLL);
        count_generations.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let polling = mode == Mode::Run && self.lua.is_some();
        let mut lua_poll = tokio::time::interval(lua::POLL_EVERY);
        lua_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let now = Instant::now();
            let mut wake = self
                .next_wake(now)
                .unwrap_or(now + Duration::from_secs(3600));
            if let Mode::Once { deadline, .. } = mode {
                if now >= started + deadline {
                    return Err(ControllerError::NotReady(deadline, self.waiting_for(now)));
                }
                // Nothing else may wake the loop (a source that keeps failing sends once).
                wake = wake.min(started + deadline);
            }
            let startup =
                (mode == Mode::Run && !self.told_ready).then_some(started + self.startup_deadline);
            if let Some(at) = startup {
                wake = wake.min(at);
            }
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
                    self.answer(request);
                    continue;
                }
                _ = count_generations.tick(), if mode == Mode::Run => self.count_generations().await,
                Some(update) = self.source_rx.recv() => self.on_source(update),
                Some(report) = self.probe_rx.recv() => {
                    self.on_probe(report);
                    // Take whatever else is queued before recomputing, so a burst of probe
                    // results costs one render.
                    while let Ok(more) = self.probe_rx.try_recv() {
                        self.on_probe(more);
                    }
                }
                _ = lua_poll.tick(), if polling => self.poll_lua().await,
                cfg = reloads.recv(), if reloads_open => match cfg {
                    Some(cfg) => self.reconfigure(cfg),
                    None => reloads_open = false,
                },
                _ = sleep_until(wake) => {}
            }
            self.release_holds(Instant::now());
            if startup.is_some_and(|deadline| Instant::now() >= deadline) {
                self.ready_without_file();
            }
            if let Some(done) = self.step(Instant::now(), mode).await? {
                return Ok(done);
            }
        }
    }

    /// The startup deadline passed without a first file: tell systemd `READY=1` so the boot
    /// goes on, and say in `STATUS=` what is still missing. The loop keeps converging.
    fn ready_without_file(&mut self) {
        let waiting = self.waiting_for(Instant::now());
        tracing::warn!(deadline = %humantime::format_duration(self.startup_deadline), %waiting,
            "No upstream file yet; telling systemd the service started, and still converging.");
        self.notify(
            "STATUS",
            self.notifier
                .status(&startup_status(self.startup_deadline, &waiting)),
        );
        self.told_ready = true;
        self.notify("READY", self.notifier.ready());
    }

    /// What the loop is still waiting for, as a sentence naming each upstream and source.
    fn waiting_for(&self, now: Instant) -> String {
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
            if let Some(held) = u.shrink_held(now) {
                waiting.push(format!("upstream {}: {held}", u.cfg.name));
            }
            let unprobed = u
                .health
                .values()
                .filter(|h| h.state.health() == crate::health::Health::Unknown)
                .count();
            if unprobed > 0 {
                waiting.push(format!(
                    "upstream {}: {unprobed} endpoint(s) not probed yet",
                    u.cfg.name
                ));
            }
        }
        if !waiting.is_empty() {
            waiting.join("; ")
        } else if let Some(error) = self.last_apply.as_ref().and_then(|a| a.error.as_deref()) {
            format!("the first file has not been applied ({error})")
        } else if !self.ready {
            "the first file has not been applied".into()
        } else {
            "the apply to finish".into()
        }
    }

    fn next_wake(&self, now: Instant) -> Option<Instant> {
        let probes = self
            .upstreams
            .iter()
            .filter_map(|u| u.pending_first_probe(now))
            .min();
        let apply = self.schedule.due();
        let holds = self.upstreams.iter().filter_map(|u| u.next_release()).min();
        probes.into_iter().chain(apply).chain(holds).min()
    }
}

/// The least time between applies: `min_reload_interval` in reload mode; none in lua mode,
/// where an apply is a push (the rare reload of a changed shell is paced by `settle`).
pub(super) fn min_interval(cfg: &Config) -> Duration {
    match cfg.nginx.apply {
        ApplyMode::Reload => cfg.nginx.min_reload_interval,
        ApplyMode::Lua => Duration::ZERO,
    }
}

/// The `STATUS=` line sent with `READY=1` when the startup deadline passed without a file.
fn startup_status(deadline: Duration, waiting: &str) -> String {
    format!(
        "Started without a first file after {}: still waiting: {waiting}. nginx keeps its current file; upstreamd keeps converging.",
        humantime::format_duration(deadline)
    )
}
