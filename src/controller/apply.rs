//! One level-triggered pass: render when something changed, compare with the file on disk,
//! and apply when the schedule says so. A failed apply or render is reported and the loop goes
//! on: the change stays pending and is retried with backoff until nginx runs the file.

use tokio::time::Instant;

use super::changes::{describe, is_urgent, parse_servers};
use super::status::{ApplyState, LastApply};
use super::{Controller, ControllerError, Mode, Outcome};
use crate::decide::Desired;
use crate::events::{
    ApplyFailed, ApplyProgress, Event, FileWritten, Reloaded, RenderFailed, Rendered,
};
use crate::nginx::{self, Applied, ApplyError, Nginx, Reach};
use crate::render::RenderError;

impl<N: Nginx> Controller<N> {
    fn render(&self) -> Result<String, RenderError> {
        let pairs: Vec<(Desired, _)> = self
            .upstreams
            .iter()
            .map(|u| (u.desired(), u.cfg.on_all_unhealthy))
            .collect();
        self.renderer.render(&pairs)
    }

    /// Reads the include file: `None` when it does not exist or cannot be read (an apply then
    /// reports why).
    fn read_on_disk(&self) -> Option<String> {
        nginx::read_current(&self.cfg.nginx.output)
            .ok()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    /// Renders and records what the render found. A render error is reported and the last
    /// good text kept; in `once` it ends the run.
    fn render_and_compare(&mut self, now: Instant, mode: Mode) -> Result<(), ControllerError> {
        let text = match self.render() {
            Ok(text) => text,
            Err(e) if mode == Mode::Run => {
                let error = e.to_string();
                RenderFailed {
                    error: &error,
                    output: &self.cfg.nginx.output,
                    new: self.render_error.as_deref() != Some(error.as_str()),
                }
                .emit(&self.metrics);
                self.render_error = Some(error);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        if self.render_error.take().is_some() {
            tracing::info!("The upstream file renders again.");
        }
        // In lua mode the include is a shell: what counts is the membership nginx confirmed.
        self.on_disk = match &self.lua {
            Some(lua) => lua.applied.clone(),
            None => self.read_on_disk(),
        };
        let differs = self.on_disk.as_deref() != Some(text.as_str()) || !self.confirmed;
        Rendered { changed: differs }.emit(&self.metrics);
        let urgent = differs && {
            let new = parse_servers(&text);
            let against_disk = self
                .on_disk
                .as_deref()
                .is_some_and(|d| is_urgent(&parse_servers(d), &new));
            let against_last = self
                .rendered
                .as_deref()
                .is_some_and(|r| r != text && is_urgent(&parse_servers(r), &new));
            against_disk || against_last
        };
        let is_retry = self.failed.as_deref() == Some(text.as_str());
        if self.rendered.as_deref() != Some(text.as_str()) {
            // A new text is judged afresh when due: it may take a server out.
            self.schedule.release();
        }
        self.schedule.on_render(now, differs, urgent, is_retry);
        if !differs {
            self.failed = None;
            if mode == Mode::Run {
                self.mark_ready();
            }
        }
        self.rendered = Some(text);
        Ok(())
    }

    /// One level-triggered pass: render when something changed, apply when due.
    pub(super) async fn step(
        &mut self,
        now: Instant,
        mode: Mode,
    ) -> Result<Option<Outcome>, ControllerError> {
        if self.gauges_stale {
            // Once per pass, not per transition: a burst of first probes costs one count.
            self.gauges_stale = false;
            self.update_gauges();
        }
        if let Mode::Once { .. } = mode {
            let held: Vec<String> = self
                .upstreams
                .iter()
                .filter_map(|u| Some(format!("upstream {}: {}", u.cfg.name, u.shrink_held(now)?)))
                .collect();
            if !held.is_empty() {
                return Err(ControllerError::ShrinkHeld(held.join("; ")));
            }
        }
        if !self.upstreams.iter().all(|u| u.sources_ready())
            || self
                .upstreams
                .iter()
                .any(|u| u.pending_first_probe(now).is_some())
        {
            return Ok(None);
        }
        if self.dirty {
            self.dirty = false;
            self.render_and_compare(now, mode)?;
        }
        let outcome = match mode {
            Mode::Once { dry_run: true, .. } => self.rendered.take().map(Outcome::Rendered),
            Mode::Once { no_reload, .. } => {
                if self.schedule.is_pending() {
                    if self.lua.is_some() {
                        self.apply_lua(now).await?;
                    } else {
                        self.apply(now, no_reload).await?;
                    }
                }
                Some(Outcome::Applied)
            }
            Mode::Run => {
                if self.schedule.due().is_some_and(|due| now >= due)
                    && !self.hold_for_generations(now).await
                {
                    // Reported, counted and kept for /status inside; the change stays pending
                    // and the schedule says when it is retried.
                    if self.lua.is_some() {
                        let _ = self.apply_lua(now).await;
                    } else {
                        let _ = self.apply(now, false).await;
                    }
                }
                None
            }
        };
        self.set_apply_gauges();
        Ok(outcome)
    }

    pub(super) fn set_apply_gauges(&self) {
        ApplyProgress {
            pending: self.schedule.is_pending() || self.render_error.is_some(),
            failures: self.schedule.failures(),
            held: self.schedule.is_held(),
        }
        .emit(&self.metrics);
    }

    pub(super) fn mark_ready(&mut self) {
        if !self.ready {
            self.ready = true;
            tracing::info!(output = %self.cfg.nginx.output.display(), "Upstream file is up to date.");
            if !self.told_ready {
                self.told_ready = true;
                self.notify("READY", self.notifier.ready());
            }
        }
        self.notify("STATUS", self.notifier.status(&self.summary()));
    }

    async fn apply(&mut self, now: Instant, no_reload: bool) -> Result<(), ApplyError> {
        let Some(text) = self.rendered.clone() else {
            return Ok(());
        };
        let reach = if no_reload {
            Reach::NoReload
        } else if !self.confirmed && self.on_disk.as_deref() == Some(text.as_str()) {
            Reach::Always
        } else {
            Reach::IfChanged
        };
        // Against the file on disk: what nginx runs, whatever failed in between.
        let changes = describe(
            self.on_disk.as_deref().map(parse_servers).as_ref(),
            &parse_servers(&text),
        );
        let t0 = Instant::now();
        let result =
            nginx::apply_with(&self.cfg.nginx.output, text.as_bytes(), &self.nginx, reach).await;
        let took = t0.elapsed();
        // Backoff and min_reload_interval count from the end of the attempt: a reload that
        // waited out confirm_timeout must not be retried the moment it returns.
        let retry_in =
            self.schedule
                .on_attempt(Instant::now(), result.is_ok(), rand::random::<f64>());
        let label = match &result {
            Ok(Applied::Unchanged) => "unchanged",
            Ok(Applied::Reloaded { .. }) => "ok",
            Ok(Applied::Written { .. }) => "written",
            Err(e) => e.result_label(),
        };
        self.last_apply = Some(LastApply::new(label, (now, took), &changes, &result));
        match result {
            Ok(applied) => {
                if let Applied::Reloaded { .. } = applied {
                    Reloaded {
                        changes: &changes,
                        took,
                    }
                    .emit(&self.metrics);
                } else if let Applied::Written { .. } = applied {
                    FileWritten {
                        changes: &changes,
                        output: &self.cfg.nginx.output,
                    }
                    .emit(&self.metrics);
                }
                if !matches!(applied, Applied::Written { .. }) {
                    self.confirmed = true;
                }
                self.on_disk = Some(text);
                self.failed = None;
                self.mark_ready();
                Ok(())
            }
            Err(e) => {
                if !e.file_restored() {
                    // The failed bytes may be on disk: nginx must confirm them before the
                    // file counts as applied.
                    self.confirmed = false;
                }
                self.on_disk = self.read_on_disk();
                ApplyFailed {
                    error: &e,
                    failures: self.schedule.failures(),
                    retry_in,
                }
                .emit(&self.metrics);
                self.failed = Some(text);
                Err(e)
            }
        }
    }

    /// The apply part of `/status`.
    pub(super) fn apply_state(&self, now: Instant) -> ApplyState {
        let on_disk = match (&self.on_disk, &self.rendered) {
            (None, _) => "missing",
            (Some(d), Some(r)) if d == r => "desired",
            (Some(_), None) => "unknown",
            (Some(_), Some(_)) => "previous",
        };
        let state = if self.render_error.is_some() {
            "render_failed"
        } else if self.schedule.failures() > 0 {
            "retrying"
        } else if self.schedule.is_held() {
            "held"
        } else if self.schedule.is_pending() {
            "pending"
        } else {
            "in_sync"
        };
        ApplyState {
            state,
            on_disk,
            nginx_confirmed: self.confirmed,
            urgent: self.schedule.is_urgent(),
            consecutive_failures: self.schedule.failures(),
            next_attempt_secs: self
                .schedule
                .due()
                .map(|d| d.saturating_duration_since(now).as_secs_f64()),
            last_error: self
                .last_apply
                .as_ref()
                .filter(|_| self.schedule.failures() > 0)
                .and_then(|a| a.error.clone()),
            render_error: self.render_error.clone(),
            held: self.held.clone().filter(|_| self.schedule.is_held()),
        }
    }
}
