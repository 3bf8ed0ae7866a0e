//! What can go wrong between upstreamd and nginx, with nginx's own words kept inside.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use nix::errno::Errno;
use nix::unistd::Pid;

/// A failure of one step at the nginx edge: a file, the pid file, a command or a signal.
///
/// Every message is complete on its own (it includes the underlying OS error), so these
/// errors expose no `source()`: printing one with `{}` or `{:#}` says everything once.
#[derive(Debug, thiserror::Error)]
pub enum NginxError {
    /// The pid file does not name a running process.
    #[error("pid file `{}` {reason}", path.display())]
    PidFile {
        /// The pid file.
        path: PathBuf,
        /// What is wrong with it.
        reason: PidFileProblem,
    },
    /// The pid file names a running process that is not an nginx master; it was not signalled.
    #[error(
        "process {pid} is not an nginx master (its command line is {cmdline:?}); not signalling it"
    )]
    NotNginxMaster {
        /// The process the pid file names.
        pid: Pid,
        /// Its `/proc/PID/cmdline`, NULs read as spaces.
        cmdline: String,
    },
    /// `kill(pid, SIGHUP)` failed.
    #[error("failed to send SIGHUP to nginx master {pid}: {errno}")]
    Signal {
        /// The master.
        pid: Pid,
        /// The errno of `kill`.
        errno: Errno,
    },
    /// The test command (`nginx -t`) exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    TestFailed {
        /// The command line, space separated.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// What it printed on stderr (stdout when stderr was empty), trimmed.
        stderr: String,
    },
    /// A command could not be run, timed out, or (the reload command) exited unsuccessfully.
    #[error("`{command}` {reason}")]
    CommandFailed {
        /// The command line, space separated.
        command: String,
        /// What happened, as a phrase (`timed out after 30s`, `exited with …: stderr`).
        reason: String,
    },
    /// nginx started no new worker generation in time: it most likely refused the file
    /// (its error log then holds an `[emerg]` line) and kept running the old configuration.
    #[error(
        "nginx master {master} started no new workers within {waited:?}; it most likely refused \
         the new file and kept its old configuration (look for [emerg] in its error log)"
    )]
    Unconfirmed {
        /// The master that was told to reload.
        master: Pid,
        /// How long upstreamd waited.
        waited: Duration,
    },
    /// A file system call failed.
    #[error("failed to {what} `{}`: {error}", path.display())]
    Io {
        /// The verb: `read`, `create`, `write`, `fsync`, `set the mode of`, `rename`, …
        what: &'static str,
        /// The path the call was about.
        path: PathBuf,
        /// The error of the call.
        error: io::Error,
    },
}

impl NginxError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, error: io::Error) -> Self {
        NginxError::Io {
            what,
            path: path.into(),
            error,
        }
    }
}

/// Why a pid file does not name a running process.
#[derive(Debug, thiserror::Error)]
pub enum PidFileProblem {
    /// The file does not exist.
    #[error("does not exist (is nginx running?)")]
    Missing,
    /// The file could not be read.
    #[error("could not be read: {0}")]
    Unreadable(io::Error),
    /// The file holds nothing but white space.
    #[error("is empty (is nginx running? nginx writes its pid there once it has started)")]
    Empty,
    /// The file holds something other than one positive process id.
    #[error("does not hold a process id: {0:?}")]
    Garbage(String),
    /// The process id names no running process.
    #[error("names process {0}, which is not running")]
    NotRunning(Pid),
}
