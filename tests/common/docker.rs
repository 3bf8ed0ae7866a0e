//! Containers for the deployment tests: the Debian 12 base image (scripts/docker-base.sh)
//! and containers removed in `Drop`.
//!
//! Without a Docker engine a test prints `skipped: …` and returns, unless
//! `UPSTREAMD_REQUIRE_DOCKER=1` is set (CI's host stage sets it): then a missing engine fails.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether the Docker engine answers. Without one, prints why the test is skipped, or panics
/// when `UPSTREAMD_REQUIRE_DOCKER=1`.
pub fn engine_available(test: &str) -> bool {
    let up = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !up {
        if std::env::var("UPSTREAMD_REQUIRE_DOCKER").as_deref() == Ok("1") {
            panic!("{test}: no Docker engine answers, and UPSTREAMD_REQUIRE_DOCKER=1");
        }
        println!("skipped: {test}: no Docker engine answers (CI's host stage runs it)");
    }
    up
}

/// Runs `cmd`, panicking with its output if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"))
}

/// Runs `cmd` and panics with its output unless it exits 0; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{}", describe(&format!("{cmd:?}"), &out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command's status and output, for failure messages.
pub fn describe(cmd: &str, out: &Output) -> String {
    format!(
        "{cmd}: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The Debian 12 base image's name, made by scripts/docker-base.sh if missing.
pub fn base_image() -> String {
    let script = repo().join("scripts/docker-base.sh");
    run_ok(Command::new("bash").arg(script))
        .trim()
        .to_owned()
}

/// A running container, removed (with its anonymous volumes) in `Drop`.
pub struct Container {
    /// The container id.
    pub id: String,
}

impl Container {
    /// `docker run -d ARGS…`: `args` holds the options, the image and its command.
    pub fn run(args: &[&str]) -> Self {
        let id = run_ok(Command::new("docker").arg("run").arg("-d").args(args))
            .trim()
            .to_owned();
        Container { id }
    }

    /// `docker exec ID CMD…`, whatever its exit code.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        run(Command::new("docker").arg("exec").arg(&self.id).args(cmd))
    }

    /// `docker exec ID CMD…`, panicking unless it exits 0; returns stdout.
    pub fn exec_ok(&self, cmd: &[&str]) -> String {
        let out = self.exec(cmd);
        assert!(
            out.status.success(),
            "{}",
            describe(&format!("docker exec {} {cmd:?}", self.id), &out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `sh -c SCRIPT` inside the container, whatever its exit code.
    pub fn sh(&self, script: &str) -> Output {
        self.exec(&["sh", "-c", script])
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // Best effort: the container may be gone already; a failure here must not hide the
        // test's own panic.
        let _ = Command::new("docker")
            .args(["rm", "-f", "-v", &self.id])
            .output();
    }
}
