//! Stand-in Kotaemon replicas and a bystander process, each killed and reaped in `Drop`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, http_get, kill_and_reap, wait_for, Output};

/// A stand-in Kotaemon replica.
pub struct Replica {
    pub name: String,
    pub addr: String,
    pub control: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Replica {
    /// Starts a replica named `name` on `127.0.0.1:<free port>` and waits until it answers.
    pub fn start(name: &str) -> Self {
        Self::start_on(name, &format!("127.0.0.1:{}", free_port()), &[])
    }

    /// Starts a replica on `addr` with extra arguments, waiting until it answers.
    pub fn start_on(name: &str, addr: &str, extra: &[&str]) -> Self {
        let r = Self::spawn(name, addr, extra);
        wait_for("the replica to listen", Duration::from_secs(10), || {
            http_get(&r.addr, "/queue/status", Duration::from_secs(1)).is_some()
        });
        r
    }

    /// Starts a replica without waiting for it.
    pub fn spawn(name: &str, addr: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let control = dir.path().join("mode");
        std::fs::write(&control, "healthy").unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_kotaemon-standin"))
            .args([
                "--listen",
                addr,
                "--name",
                name,
                "--control-file",
                control.to_str().unwrap(),
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Drained (and shown with UPSTREAMD_TEST_VERBOSE), so a chatty replica never blocks on
        // a full pipe; no test reads it.
        Output::default().capture(&mut child, name);
        Self {
            name: name.to_owned(),
            addr: addr.to_owned(),
            control,
            child,
            _dir: dir,
        }
    }

    /// Switches the failure mode (`healthy`, `error`, `hang`, `slow:<ms>`) via the control file.
    pub fn set_mode(&self, mode: &str) {
        std::fs::write(&self.control, mode).unwrap();
    }

    /// Switches the mode and waits until `/queue/status` answers `status` (200 or 503).
    pub fn set_mode_and_wait(&self, mode: &str, status: u16) {
        self.set_mode(mode);
        wait_for("the replica to switch mode", Duration::from_secs(5), || {
            http_get(&self.addr, "/queue/status", Duration::from_secs(1))
                .is_some_and(|(s, _)| s == status)
        });
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr.rsplit_once(':').unwrap().1.parse().unwrap()
    }

    /// Kills the replica abruptly.
    pub fn kill(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// A process that is not nginx (`sleep 60`), killed and reaped in `Drop`.
pub struct Bystander(pub Child);

impl Bystander {
    /// Starts `sleep 60` and waits until its command line shows it.
    pub fn start() -> Self {
        let b = Self(Command::new("sleep").arg("60").spawn().unwrap());
        wait_for("sleep to exec", Duration::from_secs(5), || {
            std::fs::read(format!("/proc/{}/cmdline", b.0.id()))
                .is_ok_and(|c| c.starts_with(b"sleep"))
        });
        b
    }

    /// Whether it still runs (it has not been signalled to death).
    pub fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        kill_and_reap(&mut self.0);
    }
}
