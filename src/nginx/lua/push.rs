//! One push: a new generation, `snapshot.json`, `POST /upstreamd/update`, and confirmation
//! that every current worker of the master loaded it; after [`FALLBACK_AFTER`] failed pushes
//! in a row, a reload (the new workers read `snapshot.json`). Also the once-a-second check that
//! nginx still holds what was confirmed (a restarted nginx has only the snapshot).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tokio::time::{sleep, Instant};

use super::{body, write_lua_files, write_snapshot, LuaEndpoint, LuaStatus, Membership, PushError};
use crate::metrics::Metrics;
use crate::nginx::Nginx;

/// How long a push waits for every worker to report its generation.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);

/// Failed pushes in a row after which an apply reloads nginx instead.
pub const FALLBACK_AFTER: u32 = 3;

/// Between two reads of `/upstreamd/status` while confirming (workers refresh every 50 ms).
const CONFIRM_POLL: Duration = Duration::from_millis(20);

/// What nginx confirmed last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmed {
    /// The generation every worker held.
    pub generation: u64,
    /// The master they belong to.
    pub master_pid: i32,
}

/// How a membership reached nginx.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Pushed and confirmed by every worker.
    Confirmed(u64),
    /// Pushes kept failing; nginx reloaded and every new worker read `snapshot.json`.
    FellBack(u64),
}

/// The Lua apply edge: generations, pushes, confirmation, fallback.
pub struct LuaPusher {
    endpoint: Box<dyn LuaEndpoint>,
    dir: PathBuf,
    /// The last generation written or pushed.
    generation: u64,
    confirmed: Option<Confirmed>,
    failed_pushes: u32,
}

impl LuaPusher {
    /// A pusher to `endpoint`, writing into `lua_dir`.
    pub fn new(endpoint: Box<dyn LuaEndpoint>, dir: PathBuf) -> Self {
        Self {
            endpoint,
            dir,
            generation: 0,
            confirmed: None,
            failed_pushes: 0,
        }
    }

    /// What nginx confirmed last, while it still holds it.
    pub fn confirmed(&self) -> Option<&Confirmed> {
        self.confirmed.as_ref()
    }

    /// Failed pushes since the last confirmed one.
    pub fn failed_pushes(&self) -> u32 {
        self.failed_pushes
    }

    /// The next generation: above every earlier one, and the time in ms, so that it also
    /// rises across restarts of upstreamd.
    fn next_generation(&mut self) -> u64 {
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.generation = (self.generation + 1).max(now_ms);
        self.generation
    }

    /// Takes a new generation for `membership` and writes it to `snapshot.json`, with the Lua
    /// files: before any `nginx -t`, so that whatever nginx starts next serves it.
    pub async fn prepare(&mut self, membership: &Membership) -> Result<u64, PushError> {
        let generation = self.next_generation();
        self.write(generation, membership).await?;
        Ok(generation)
    }

    async fn write(&self, generation: u64, membership: &Membership) -> Result<(), PushError> {
        let (dir, json) = (self.dir.clone(), body(generation, membership));
        let written = tokio::task::spawn_blocking(move || {
            write_lua_files(&dir).and_then(|()| write_snapshot(&dir, &json))
        })
        .await;
        match written {
            Ok(result) => result.map_err(PushError::Files),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(PushError::Http(format!(
                "the runtime is shutting down: {e}"
            ))),
        }
    }

    /// Pushes the prepared `membership` and confirms it; a stale generation moves past
    /// nginx's and pushes once more; after [`FALLBACK_AFTER`] failed pushes in a row, reloads
    /// `nginx` and confirms the snapshot's generation instead. Counts every push in
    /// `upstreamd_lua_pushes_total`.
    pub async fn push<N: Nginx>(
        &mut self,
        membership: &Membership,
        nginx: &N,
        metrics: &Metrics,
    ) -> Result<Pushed, PushError> {
        let mut result = self.push_once(metrics).await;
        if let Err(PushError::Stale { generation }) = result {
            // nginx outlived an upstreamd whose clock ran ahead: continue from its generation.
            self.generation = self.generation.max(generation);
            let next = self.next_generation();
            self.write(next, membership).await?;
            result = self.push_once(metrics).await;
        }
        let error = match result {
            Ok(generation) => {
                self.failed_pushes = 0;
                return Ok(Pushed::Confirmed(generation));
            }
            Err(e) => e,
        };
        self.confirmed = None;
        self.failed_pushes += 1;
        if self.failed_pushes < FALLBACK_AFTER {
            return Err(error);
        }
        tracing::warn!(%error, pushes = self.failed_pushes,
            "Pushes to nginx keep failing; reloading nginx so that its workers read snapshot.json.");
        nginx.reload().await.map_err(PushError::Reload)?;
        let generation = self.generation;
        match self.confirm(generation).await {
            Ok(status) => {
                self.failed_pushes = 0;
                self.confirmed = Some(Confirmed {
                    generation,
                    master_pid: status.master_pid,
                });
                Ok(Pushed::FellBack(generation))
            }
            Err(e) => Err(PushError::AfterReload(Box::new(e))),
        }
    }

    /// One `POST` of the current generation and its confirmation.
    async fn push_once(&mut self, metrics: &Metrics) -> Result<u64, PushError> {
        let generation = self.generation;
        let json = tokio::fs::read_to_string(self.dir.join(super::SNAPSHOT))
            .await
            .map_err(|e| {
                PushError::Files(crate::nginx::NginxError::io(
                    "read",
                    self.dir.join(super::SNAPSHOT),
                    e,
                ))
            })?;
        let result = match self.endpoint.update(json).await {
            Ok(_) => self.confirm(generation).await,
            Err(e) => Err(e),
        };
        let label = match &result {
            Ok(_) => "confirmed",
            Err(e) => e.result_label(),
        };
        metrics.inc("upstreamd_lua_pushes_total", &[("result", label)]);
        let status = result?;
        self.confirmed = Some(Confirmed {
            generation,
            master_pid: status.master_pid,
        });
        metrics.set("upstreamd_lua_generation", &[], generation as f64);
        Ok(generation)
    }

    /// Reads `/upstreamd/status` until every current worker of the master holds `generation`,
    /// for at most [`CONFIRM_TIMEOUT`]. A refusal is retried too (right after a reload, an old
    /// worker with the previous secret may still answer), and is the error if it was the last
    /// answer.
    async fn confirm(&self, generation: u64) -> Result<LuaStatus, PushError> {
        let deadline = Instant::now() + CONFIRM_TIMEOUT;
        loop {
            let detail = match self.endpoint.status().await {
                Ok(status) => match self.behind(&status, generation) {
                    Ok(()) => return Ok(status),
                    Err(detail) => detail,
                },
                Err(e @ PushError::Rejected { .. }) if Instant::now() >= deadline => return Err(e),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(PushError::Unconfirmed {
                    generation,
                    within: CONFIRM_TIMEOUT,
                    detail,
                });
            }
            sleep(CONFIRM_POLL).await;
        }
    }

    /// `Ok` when every current worker of the status's master holds `generation`; otherwise
    /// which ones do not. Without a view of the master's workers (nginx in another pid
    /// namespace), the workers nginx reports must all hold it.
    fn behind(&self, status: &LuaStatus, generation: u64) -> Result<(), String> {
        if status.generation < generation {
            return Err(format!(
                "nginx holds generation {} (source {})",
                status.generation, status.source
            ));
        }
        let current: Vec<String> = match self.endpoint.workers(status.master_pid) {
            Ok(pids) if !pids.is_empty() => pids.iter().map(i32::to_string).collect(),
            _ => status.workers.keys().cloned().collect(),
        };
        let behind: Vec<String> = current
            .iter()
            .filter(|pid| status.workers.get(*pid).map_or(true, |g| *g < generation))
            .map(|pid| match status.workers.get(pid) {
                Some(g) => format!("worker {pid} holds {g}"),
                None => format!("worker {pid} has not reported"),
            })
            .collect();
        if current.is_empty() {
            Err("nginx reports no workers".into())
        } else if behind.is_empty() {
            Ok(())
        } else {
            Err(behind.join(", "))
        }
    }

    /// Whether nginx still holds what was confirmed: `Some(why not)` after a new master (an
    /// nginx restart), a generation behind the confirmed one, or a list that did not come from
    /// a push. Forgets the confirmation then, so the next apply pushes again.
    pub async fn poll(&mut self) -> Option<String> {
        let confirmed = self.confirmed.clone()?;
        let why = match self.endpoint.status().await {
            Err(e) => format!("reading nginx's Lua status failed: {e}"),
            Ok(s) if s.master_pid != confirmed.master_pid => format!(
                "nginx has a new master (pid {} → {})",
                confirmed.master_pid, s.master_pid
            ),
            Ok(s) if s.generation < confirmed.generation => format!(
                "nginx holds generation {}, behind the confirmed {}",
                s.generation, confirmed.generation
            ),
            Ok(s) if s.source != "push" => format!("nginx's list came from {}", s.source),
            Ok(_) => return None,
        };
        self.confirmed = None;
        Some(why)
    }
}

#[cfg(test)]
mod tests;
