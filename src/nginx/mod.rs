//! The nginx edge: write the include file atomically, `nginx -t`, SIGHUP, confirm, roll back.
//!
//! `apply` is the one entry point the controller needs. It touches nothing when the bytes are
//! unchanged, never signals after a failed test, and puts the previous file back after any
//! failure that follows the write, so when it returns the file holds either bytes nginx took
//! or the bytes it held before. What nginx is and how it is told sits behind the `Nginx` trait,
//! so the controller's tests use a fake and `tests/it/nginx_apply.rs` a real private nginx.

mod error;
mod generations;
pub mod lua;
mod process;
mod system;
mod write;

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::unistd::Pid;
use tokio::time::Instant;

pub use error::{NginxError, PidFileProblem};
pub use generations::{old_generations, OldGenerations, GENERATION_GAP, SHUTTING_DOWN_TITLE};
pub use process::{
    is_nginx_master, looks_like_nginx_master, parse_pid, parse_stat, read_cmdline, read_pid,
    worker_pids, Stat,
};
pub use system::{SystemNginx, DEFAULT_COMMAND_TIMEOUT};
pub use write::{clean_temp_files, read_current, restore, write_atomic};

/// Validating and reloading nginx. `SystemNginx` is the real one.
pub trait Nginx: Send + Sync {
    /// Runs the test command (no-op Ok when empty). Err carries nginx's stderr.
    fn test(&self) -> impl Future<Output = Result<(), NginxError>> + Send;
    /// Signals (or runs reload_command) and waits for a new worker generation.
    fn reload(&self) -> impl Future<Output = Result<ReloadProof, NginxError>> + Send;
    /// Counts the old worker generations still shutting down (streams keep them alive).
    /// The default, for an nginx that cannot be inspected, reports none.
    fn old_generations(&self) -> impl Future<Output = Result<OldGenerations, NginxError>> + Send {
        async { Ok(OldGenerations::default()) }
    }
}

/// Evidence that nginx took a reload: its master started workers that were not there before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadProof {
    /// The master that reloaded.
    pub master: Pid,
    /// Its children just before it was told to reload.
    pub old_workers: BTreeSet<i32>,
    /// Its children afterwards that were not among `old_workers` (at least one).
    pub new_workers: BTreeSet<i32>,
}

/// What `apply` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The file already held these bytes: nothing written, tested or signalled.
    Unchanged,
    /// The file was replaced and passed the test; nginx was not signalled (`Reach::NoReload`).
    Written {
        /// How long the test command took.
        test: Duration,
    },
    /// The file was replaced (or already held the bytes, with `Reach::Always`), passed the
    /// test and nginx reloaded.
    Reloaded {
        /// How long the test command took.
        test: Duration,
        /// From telling nginx to seeing its new workers.
        reload: Duration,
        /// The worker generations.
        proof: ReloadProof,
    },
}

/// The step of `apply` that failed after the new file was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The test command.
    Test,
    /// Checking the master, signalling it (or running the reload command) and confirming.
    Reload,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Test => "the nginx config test",
            Step::Reload => "the nginx reload",
        })
    }
}

/// What became of the previous file after a failed step.
#[derive(Debug)]
pub enum Rollback {
    /// The previous bytes are back in place.
    Restored,
    /// There was no file before, and the new one was removed.
    Removed,
    /// Putting the previous file back failed too: the new, failed bytes may still be on disk.
    Failed(NginxError),
}

impl fmt::Display for Rollback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rollback::Restored => f.write_str("the previous file was restored"),
            Rollback::Removed => f.write_str("the new file was removed (there was none before)"),
            Rollback::Failed(e) => write!(f, "restoring the previous file ALSO FAILED: {e}"),
        }
    }
}

/// Why `apply` did not end in a confirmed reload. Messages are complete on their own.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Reading the current file or writing the new one failed; the old file is left as it is.
    #[error("failed to replace `{}`, the old file is left as it is: {error}", path.display())]
    Write {
        /// The include file.
        path: PathBuf,
        /// The failed file operation.
        error: NginxError,
    },
    /// The new file was written but a later step failed; the previous file was put back.
    #[error("{step} failed and {rollback}: {error}")]
    Failed {
        /// Which step failed.
        step: Step,
        /// How it failed (nginx's stderr inside for a failed test).
        error: NginxError,
        /// Whether the previous file is back.
        rollback: Rollback,
    },
}

impl ApplyError {
    /// The `result` label of `upstreamd_reloads_total`: `write_failed`, `test_failed`,
    /// `signal_failed` or `unconfirmed`.
    pub fn result_label(&self) -> &'static str {
        crate::metrics::labels::ReloadResult::from(self).as_str()
    }

    /// The underlying failure.
    pub fn nginx_error(&self) -> &NginxError {
        match self {
            ApplyError::Write { error, .. } | ApplyError::Failed { error, .. } => error,
        }
    }

    /// Whether the file on disk is what it was before `apply` (true for a failed write).
    pub fn file_restored(&self) -> bool {
        !matches!(
            self,
            ApplyError::Failed {
                rollback: Rollback::Failed(_),
                ..
            }
        )
    }
}

/// How far [`apply_with`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Nothing when the file already holds the bytes; else write, test, reload.
    IfChanged,
    /// Test and reload even when the file already holds the bytes: nginx has not confirmed
    /// them (an earlier apply failed and could not put the previous file back).
    Always,
    /// Write and test, never signal (`once --no-reload`).
    NoReload,
}

/// Makes `output` hold `new` and nginx run it: [`apply_with`] and [`Reach::IfChanged`].
pub async fn apply<N: Nginx>(output: &Path, new: &[u8], nginx: &N) -> Result<Applied, ApplyError> {
    apply_with(output, new, nginx, Reach::IfChanged).await
}

/// Makes `output` hold `new` and nginx run it, as far as `reach` says.
///
/// Unchanged bytes → `Applied::Unchanged`, nothing else done. Otherwise: write atomically →
/// `test()` → `reload()`. After a failure past the write the previous bytes are restored (or
/// the file removed when there was none) and nginx is not signalled again; after a failed
/// test it is not signalled at all.
///
/// Not cancel-safe: dropped between the write and the end, it leaves the new file untested
/// or unconfirmed on disk. Let it finish; it is bounded by the command timeout plus
/// `confirm_timeout`.
pub async fn apply_with<N: Nginx>(
    output: &Path,
    new: &[u8],
    nginx: &N,
    reach: Reach,
) -> Result<Applied, ApplyError> {
    let write_failed = |error| ApplyError::Write {
        path: output.to_owned(),
        error,
    };
    let previous = blocking(output, {
        let output = output.to_owned();
        move || read_current(&output)
    })
    .await
    .map_err(write_failed)?;
    let unchanged = previous.as_deref() == Some(new);
    if unchanged && reach != Reach::Always {
        return Ok(Applied::Unchanged);
    }
    if !unchanged {
        blocking(output, {
            let (output, new) = (output.to_owned(), new.to_vec());
            move || write_atomic(&output, &new)
        })
        .await
        .map_err(write_failed)?;
    }

    let started = Instant::now();
    if let Err(error) = nginx.test().await {
        return Err(roll_back(output, previous, Step::Test, error).await);
    }
    let test = started.elapsed();
    if reach == Reach::NoReload {
        return Ok(Applied::Written { test });
    }

    let started = Instant::now();
    match nginx.reload().await {
        Ok(proof) => Ok(Applied::Reloaded {
            test,
            reload: started.elapsed(),
            proof,
        }),
        Err(error) => Err(roll_back(output, previous, Step::Reload, error).await),
    }
}

async fn roll_back(
    output: &Path,
    previous: Option<Vec<u8>>,
    step: Step,
    error: NginxError,
) -> ApplyError {
    let had_file = previous.is_some();
    let path = output.to_owned();
    let rollback = match blocking(output, move || restore(&path, previous.as_deref())).await {
        Ok(()) if had_file => Rollback::Restored,
        Ok(()) => Rollback::Removed,
        Err(e) => Rollback::Failed(e),
    };
    ApplyError::Failed {
        step,
        error,
        rollback,
    }
}

/// Runs file I/O on `path` (with its fsyncs) off the async workers.
async fn blocking<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T, NginxError> + Send + 'static,
) -> Result<T, NginxError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Only when the runtime shuts down under us.
        Err(e) => Err(NginxError::io(
            "finish a file operation on",
            path,
            std::io::Error::other(e),
        )),
    }
}

#[cfg(test)]
mod tests;
