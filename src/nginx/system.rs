//! `SystemNginx`: the real nginx, reached through its test command, pid file and SIGHUP.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use tokio::process::Command;
use tokio::time::Instant;

use super::process::{read_cmdline, read_pid, worker_pids};
use super::{looks_like_nginx_master, Nginx, NginxError, OldGenerations, ReloadProof};
use crate::config::NginxConfig;

/// How long the test and reload commands may run before they are killed.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// How often `/proc` is scanned for a new worker generation after a reload.
const CONFIRM_POLL: Duration = Duration::from_millis(10);

/// The nginx of this machine, as `[nginx]` describes it.
#[derive(Debug, Clone)]
pub struct SystemNginx {
    pid_file: PathBuf,
    test_command: Vec<String>,
    reload_command: Vec<String>,
    confirm_timeout: Duration,
    command_timeout: Duration,
}

impl SystemNginx {
    /// From `[nginx]`: `pid_file`, `test_command`, `reload_command`, `confirm_timeout`; the
    /// commands get `DEFAULT_COMMAND_TIMEOUT`.
    pub fn new(config: &NginxConfig) -> Self {
        Self {
            pid_file: config.pid_file.clone(),
            test_command: config.test_command.clone(),
            reload_command: config.reload_command.clone(),
            confirm_timeout: config.confirm_timeout,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
        }
    }

    /// Sets how long the test and reload commands may run before they are killed.
    pub fn with_command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Sends SIGHUP, or runs `reload_command` and reads the (perhaps new) master from the pid
    /// file again.
    async fn tell(&self, master: nix::unistd::Pid) -> Result<nix::unistd::Pid, NginxError> {
        if self.reload_command.is_empty() {
            kill(master, Signal::SIGHUP)
                .map_err(|errno| NginxError::Signal { pid: master, errno })?;
            return Ok(master);
        }
        let output = run(&self.reload_command, self.command_timeout).await?;
        if !output.status.success() {
            let reason = format!("exited with {}: {}", output.status, printed(&output));
            return Err(NginxError::CommandFailed {
                command: self.reload_command.join(" "),
                reason,
            });
        }
        read_pid(&self.pid_file)
    }

    /// The master named by the pid file, checked to be an nginx master.
    fn master(&self) -> Result<nix::unistd::Pid, NginxError> {
        let master = read_pid(&self.pid_file)?;
        let cmdline = match read_cmdline(master) {
            Ok(cmdline) => cmdline,
            // It exited since `read_pid` looked; whatever the pid is now, it is not ours to signal.
            Err(_) => String::from("<gone>"),
        };
        if !looks_like_nginx_master(&cmdline) {
            return Err(NginxError::NotNginxMaster {
                pid: master,
                cmdline,
            });
        }
        Ok(master)
    }
}

impl Nginx for SystemNginx {
    async fn test(&self) -> Result<(), NginxError> {
        if self.test_command.is_empty() {
            return Ok(());
        }
        let output = run(&self.test_command, self.command_timeout).await?;
        if output.status.success() {
            return Ok(());
        }
        Err(NginxError::TestFailed {
            command: self.test_command.join(" "),
            status: output.status,
            stderr: printed(&output),
        })
    }

    async fn reload(&self) -> Result<ReloadProof, NginxError> {
        let master = self.master()?;
        // Recorded before the signal: any child not in this set is of the new generation.
        let old_workers = worker_pids(master)?;
        let started = Instant::now();
        let master = self.tell(master).await?;
        loop {
            let new_workers: BTreeSet<i32> = worker_pids(master)?
                .difference(&old_workers)
                .copied()
                .collect();
            if !new_workers.is_empty() {
                return Ok(ReloadProof {
                    master,
                    old_workers,
                    new_workers,
                });
            }
            if started.elapsed() >= self.confirm_timeout {
                return Err(NginxError::Unconfirmed {
                    master,
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(CONFIRM_POLL).await;
        }
    }

    async fn old_generations(&self) -> Result<OldGenerations, NginxError> {
        super::old_generations(self.master()?)
    }
}

/// Runs `argv` with no stdin and both outputs captured, killing it after `timeout`.
async fn run(argv: &[String], timeout: Duration) -> Result<Output, NginxError> {
    let failed = |reason: String| NginxError::CommandFailed {
        command: argv.join(" "),
        reason,
    };
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| failed("is empty".into()))?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Dropping the output future at the timeout kills the child rather than orphaning it.
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed(format!("could not be started: {e}")))?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(output)) => Ok(output),
        Ok(Err(e)) => Err(failed(format!("could not be waited for: {e}"))),
        Err(_) => Err(failed(format!(
            "timed out after {timeout:?} and was killed"
        ))),
    }
}

/// What a command printed: stderr, or stdout when stderr is empty; trimmed.
fn printed(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let text = if stderr.trim().is_empty() {
        String::from_utf8_lossy(&output.stdout)
    } else {
        stderr
    };
    text.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::Pid;

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    fn with_commands(test: &[&str], reload: &[&str], pid_file: PathBuf) -> SystemNginx {
        SystemNginx {
            pid_file,
            test_command: argv(test),
            reload_command: argv(reload),
            confirm_timeout: Duration::from_millis(200),
            command_timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn an_empty_test_command_passes_without_running_anything() {
        let nginx = with_commands(&[], &[], PathBuf::from("/nonexistent.pid"));
        nginx.test().await.unwrap();
    }

    #[tokio::test]
    async fn a_failing_test_command_carries_its_stderr_and_status() {
        let nginx = with_commands(
            &["sh", "-c", "echo '[emerg] bad' >&2; exit 1"],
            &[],
            PathBuf::from("/x"),
        );
        match nginx.test().await {
            Err(NginxError::TestFailed {
                command,
                status,
                stderr,
            }) => {
                assert!(command.starts_with("sh -c"));
                assert_eq!(status.code(), Some(1));
                assert_eq!(stderr, "[emerg] bad");
            }
            other => panic!("expected TestFailed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_test_command_that_cannot_start_is_a_command_failure() {
        let nginx = with_commands(&["/nonexistent/nginx", "-t"], &[], PathBuf::from("/x"));
        let err = nginx.test().await.unwrap_err();
        assert!(matches!(err, NginxError::CommandFailed { .. }), "{err:?}");
        assert!(err.to_string().contains("could not be started"), "{err}");
    }

    #[tokio::test]
    async fn a_test_command_that_hangs_is_killed_at_the_timeout() {
        let nginx = with_commands(&["sleep", "30"], &[], PathBuf::from("/x"))
            .with_command_timeout(Duration::from_millis(100));
        let started = std::time::Instant::now();
        // `sleep 30` would outlast the guard (a hang guard, not a latency claim) unless killed.
        let err = tokio::time::timeout(Duration::from_secs(20), nginx.test())
            .await
            .expect("the test command was not waited on past its timeout")
            .unwrap_err();
        assert!(err.to_string().contains("timed out after 100ms"), "{err}");
        eprintln!(
            "figure: a 100ms command timeout returned after {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn reload_refuses_a_process_that_is_not_an_nginx_master_and_leaves_it_alive() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("nginx.pid");
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(sleeper.id() as i32);
        // Right after exec the kernel may still show an empty command line for a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while read_cmdline(pid).unwrap() != "sleep 30" && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::fs::write(&pid_file, format!("{pid}\n")).unwrap();
        let nginx = with_commands(&[], &[], pid_file);

        let err = nginx.reload().await.unwrap_err();

        let alive = sleeper.try_wait().unwrap().is_none();
        // Best effort cleanup; the assertions below do not depend on it.
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        match err {
            NginxError::NotNginxMaster { pid, cmdline } => {
                assert_eq!(pid.as_raw() as u32, sleeper.id());
                assert_eq!(cmdline, "sleep 30");
            }
            other => panic!("expected NotNginxMaster, got {other:?}"),
        }
        assert!(alive, "the non-nginx process was signalled");
    }
}
