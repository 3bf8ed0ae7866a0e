//! The real `upstreamd` binary: one-shot commands and a running daemon whose output the
//! harness captures, with waits on what it logs and what its admin server says.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{admin_metrics, admin_status, http_get, kill_and_reap, wait_exit, wait_for, Output};

/// A running `upstreamd`.
pub struct Daemon {
    pub config: PathBuf,
    pub output: Output,
    child: Child,
    _dir: tempfile::TempDir,
}

/// Runs `upstreamd ARGS` to completion: (exit code, stdout, stderr).
pub fn upstreamd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_upstreamd"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes `text` to a config file in a new temp dir: (dir, path).
pub fn write_config(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("upstreamd.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

impl Daemon {
    /// Starts `upstreamd run` on this config text.
    pub fn start(config: &str) -> Self {
        Self::start_with_env(config, &[])
    }

    /// Starts `upstreamd run` with extra environment variables.
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Self {
        Self::start_with(config, &[], env)
    }

    /// Starts `upstreamd run` with extra arguments and environment variables.
    pub fn start_with(config: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let (dir, path) = write_config(config);
        let mut child = Command::new(env!("CARGO_BIN_EXE_upstreamd"))
            .args(["run", "--config", path.to_str().unwrap()])
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "upstreamd=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Output::default();
        output.capture(&mut child, "upstreamd");
        Self {
            config: path,
            output,
            child,
            _dir: dir,
        }
    }

    /// The daemon's pid.
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), sig).unwrap();
    }

    /// Waits for the daemon to exit: its exit code, or None if it did not within `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        wait_exit(&mut self.child, within).map(|status| status.code().unwrap_or(-1))
    }

    /// Whether it still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The admin server's address as the daemon logged it on start (`Admin server listening.
    /// address=…`): with `listen = "127.0.0.1:0"` ([`Config::admin_port0`]), the port the
    /// kernel picked. Waits for the line.
    pub fn admin(&self) -> String {
        let mut found = None;
        wait_for(
            "the daemon to log its admin address",
            Duration::from_secs(15),
            || {
                found = admin_address(&self.output.text());
                found.is_some()
            },
        );
        found.unwrap()
    }

    /// Waits until the admin server's `/readyz` answers 200 (every source delivered and the
    /// first apply succeeded); returns the admin server's address.
    pub fn ready_admin(&self) -> String {
        let admin = self.admin();
        wait_for("readyz", Duration::from_secs(15), || {
            matches!(
                http_get(&admin, "/readyz", Duration::from_secs(15)),
                Some((200, _))
            )
        });
        admin
    }

    /// What the daemon's loop has handled so far: probe results (`upstreamd_probes_total`,
    /// every upstream and result) and the Consul blocking queries its sources sent. Both only
    /// grow while the daemon runs.
    pub fn activity(&self) -> (f64, usize) {
        let probes: f64 = admin_metrics(&self.admin())
            .lines()
            .filter(|l| l.starts_with("upstreamd_probes_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
            .sum();
        let queries = self
            .output
            .text()
            .matches("Consul blocking query sent.")
            .count();
        (probes, queries)
    }

    /// Waits until the loop has provably run on after whatever the test did last, then
    /// until nothing is left to apply (`/status`: `apply.state` `in_sync`, no change
    /// pending). "Ran on" is three probe rounds' worth of probe results (three per probed
    /// endpoint: the harness's `rise` and `fall` are at most 2, so a flip under way shows),
    /// or with nothing probed, one more Consul query. After it, a test can assert that
    /// something did not happen.
    pub fn wait_loop_ran(&self) {
        let admin = self.admin();
        let probed = admin_status(&admin)["upstreams"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|u| u["endpoints"].as_array().into_iter().flatten())
            .filter(|e| !e["last_probe"].is_null())
            .count();
        let (probes, queries) = self.activity();
        wait_for(
            "the daemon's loop to run on",
            Duration::from_secs(20),
            || {
                let (p, q) = self.activity();
                if probed > 0 {
                    p >= probes + 3.0 * probed as f64
                } else {
                    q > queries
                }
            },
        );
        wait_for("nothing left to apply", Duration::from_secs(15), || {
            let st = admin_status(&admin);
            st["apply"]["state"] == "in_sync" && st["change_pending"] == false
        });
    }

    /// Sends SIGHUP and waits for the daemon to log that it reloaded its configuration.
    pub fn reload_config(&self) {
        let before = self.output.text().matches(CONFIG_RELOADED).count();
        self.signal(nix::sys::signal::Signal::SIGHUP);
        wait_for("the config reload", Duration::from_secs(15), || {
            self.output.text().matches(CONFIG_RELOADED).count() > before
        });
    }

    /// Waits until the daemon's output shows `needle` (its log reaches the harness through a
    /// pipe and a reader thread, a moment after whatever the line reports).
    pub fn wait_log(&self, needle: &str) {
        wait_for(
            &format!("the daemon to log {needle:?}"),
            Duration::from_secs(10),
            || self.output.text().contains(needle),
        );
    }
}

/// What the daemon logs once a SIGHUP's configuration is in force.
const CONFIG_RELOADED: &str = "Configuration reloaded.";

/// The address in the daemon's `Admin server listening.` line, text or JSON.
fn admin_address(log: &str) -> Option<String> {
    let line = log
        .lines()
        .find(|l| l.contains("Admin server listening."))?;
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(line) {
        return json["address"].as_str().map(str::to_owned);
    }
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("address="))
        .map(str::to_owned)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
        if std::thread::panicking() {
            eprintln!(
                "---- upstreamd config ({}):\n{}",
                self.config.display(),
                std::fs::read_to_string(&self.config).unwrap_or_default()
            );
            eprintln!("---- upstreamd output:\n{}", self.output.text());
        }
    }
}
