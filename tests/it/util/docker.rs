//! Containers for the deployment tests: the Debian 12 base image (scripts/docker-base.sh),
//! images built from it and cached by tag, containers removed in `Drop`, and docker-compose
//! projects taken down in `Drop`.
//!
//! Without a Docker engine a test prints `skipped: …` and returns, unless
//! `UPSTREAMD_REQUIRE_DOCKER=1` is set (CI's host stage sets it): then a missing engine fails.

use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether the Docker engine answers. Without one, prints why the test is skipped, or panics
/// when `UPSTREAMD_REQUIRE_DOCKER=1`.
pub fn engine_available(test: &str) -> bool {
    available(
        test,
        Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]),
        "no Docker engine answers",
        "CI's host stage runs it",
    )
}

/// Whether `probe` runs and succeeds. When not, prints `skipped: TEST: MISSING (WHERE)`, or
/// panics when `UPSTREAMD_REQUIRE_DOCKER=1`.
fn available(test: &str, probe: &mut Command, missing: &str, where_: &str) -> bool {
    let ok = probe.output().map(|o| o.status.success()).unwrap_or(false);
    if !ok {
        if std::env::var("UPSTREAMD_REQUIRE_DOCKER").as_deref() == Ok("1") {
            panic!("{test}: {missing}, and UPSTREAMD_REQUIRE_DOCKER=1");
        }
        println!("skipped: {test}: {missing} ({where_})");
    }
    ok
}

/// Runs `cmd`, panicking with its output if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"))
}

/// Runs `cmd` and panics with its output unless it exits 0; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{}",
        describe(&format!("{cmd:?}"), &out)
    );
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
    run_ok(Command::new("bash").arg(script)).trim().to_owned()
}

/// The image with systemd as PID 1 and Debian's nginx (scripts/docker-systemd.sh), made from
/// the base image if missing.
pub fn systemd_image() -> String {
    let script = repo().join("scripts/docker-systemd.sh");
    run_ok(Command::new("bash").arg(script)).trim().to_owned()
}

/// An image built from `dockerfile` (its directory is the context) `FROM` the base image,
/// passed as the build argument `BASE`. Tagged `NAME:HASH`, a hash of the Dockerfile and the
/// base image's id, so a rerun with neither changed reuses it without building.
pub fn image_from(name: &str, dockerfile: &Path) -> String {
    let base = base_image();
    let base_id =
        run_ok(Command::new("docker").args(["image", "inspect", "--format", "{{.Id}}", &base]));
    let text = std::fs::read(dockerfile)
        .unwrap_or_else(|e| panic!("failed to read {}: {e}", dockerfile.display()));
    // SipHash with fixed keys: stable from run to run (a cache key, not a checksum).
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (base_id.trim(), text).hash(&mut hasher);
    let tag = format!("{name}:{:016x}", hasher.finish());
    let present = run(Command::new("docker").args(["image", "inspect", &tag]))
        .status
        .success();
    if !present {
        let context = dockerfile.parent().expect("a Dockerfile in a directory");
        run_ok(
            Command::new("docker")
                .args(["build", "-q", "--build-arg"])
                .arg(format!("BASE={base}"))
                .arg("-t")
                .arg(&tag)
                .arg("-f")
                .arg(dockerfile)
                .arg(context),
        );
    }
    tag
}

/// Whether `docker-compose` (v1) runs; like [`engine_available`], prints why the test is
/// skipped, or panics when `UPSTREAMD_REQUIRE_DOCKER=1`.
pub fn compose_available(test: &str) -> bool {
    available(
        test,
        Command::new("docker-compose").arg("version"),
        "docker-compose does not run",
        "scripts/install-deps.sh installs it",
    )
}

/// A docker-compose project under a unique name, run from the repository root with the given
/// files and environment. `Drop` prints every service's log if the test is failing, then runs
/// `down -v` (containers, network and volumes).
pub struct Compose {
    /// The project name (`-p`).
    pub project: String,
    files: Vec<String>,
    env: Vec<(String, String)>,
}

impl Compose {
    /// A project named `PREFIX-PID-NANOS`; nothing runs until [`Compose::run_ok`] says `up`.
    pub fn new(prefix: &str, files: &[&str], env: &[(&str, &str)]) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        Compose {
            project: format!("{prefix}-{}-{nanos}", std::process::id()),
            files: files.iter().map(|f| (*f).to_owned()).collect(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    /// `docker-compose -p PROJECT -f FILE… ARGS…`, not yet run.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.current_dir(repo()).arg("-p").arg(&self.project);
        for file in &self.files {
            cmd.arg("-f").arg(file);
        }
        cmd.args(args).envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Runs `docker-compose … ARGS…`, panicking unless it exits 0; returns stdout.
    pub fn run_ok(&self, args: &[&str]) -> String {
        run_ok(&mut self.command(args))
    }

    /// The id of `service`'s container (`docker-compose ps -q`); it stays the same across
    /// `stop`, `start` and `restart`.
    pub fn container(&self, service: &str) -> String {
        let id = self.run_ok(&["ps", "-q", service]).trim().to_owned();
        assert!(
            !id.is_empty(),
            "{}: no container for {service}",
            self.project
        );
        id
    }

    /// What `docker-compose logs SERVICE…` prints (every service's when `services` is empty).
    pub fn logs(&self, services: &[&str]) -> String {
        let mut args = vec!["logs", "--no-color"];
        args.extend_from_slice(services);
        let out = run(&mut self.command(&args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- docker-compose logs of {}\n{}",
                self.project,
                self.logs(&[])
            );
        }
        // Best effort, like Container's: a failure here must not hide the test's own panic.
        let _ = self
            .command(&["down", "-v", "--remove-orphans", "-t", "5"])
            .output();
    }
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

    /// A container of `image` running systemd as PID 1, the way that works on this engine
    /// (`--privileged` does not: CAP_SYS_RESOURCE cannot be granted), once systemd says the
    /// boot finished (`running`, or `degraded` with a failed unit the test does not use).
    pub fn systemd(image: &str) -> Self {
        let c = Container::run(&[
            "--cap-add",
            "SYS_ADMIN",
            "--cap-add",
            "NET_ADMIN",
            "--security-opt",
            "seccomp=unconfined",
            "--tmpfs",
            "/run",
            "--tmpfs",
            "/run/lock",
            "-v",
            "/sys/fs/cgroup:/sys/fs/cgroup:rw",
            image,
            "/lib/systemd/systemd",
        ]);
        // The bus socket appears a moment after the container starts.
        let out = c.sh(
            "timeout 120 sh -c 'until [ -S /run/systemd/private ]; do sleep 0.1; done; \
             systemctl is-system-running --wait'",
        );
        let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            state == "running" || state == "degraded",
            "systemd did not finish booting: {}",
            describe("systemctl is-system-running --wait", &out)
        );
        c
    }

    /// `docker cp HOST_PATH ID:PATH`.
    pub fn copy_in(&self, host: &Path, path: &str) {
        run_ok(
            Command::new("docker")
                .arg("cp")
                .arg(host)
                .arg(format!("{}:{path}", self.id)),
        );
    }

    /// Writes `text` to `path` inside the container (mode 0644, directories created).
    pub fn write(&self, path: &str, text: &str) {
        let script = format!("mkdir -p \"$(dirname '{path}')\" && cat > '{path}'");
        let mut child = Command::new("docker")
            .args(["exec", "-i", &self.id, "sh", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start docker exec");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write to docker exec");
        let out = child.wait_with_output().expect("wait for docker exec");
        assert!(out.status.success(), "{}", describe(&script, &out));
    }

    /// Runs `sh -c SCRIPT` inside the container until it exits 0, every 200 ms, for at most
    /// `within`; panics with its last output after that.
    pub fn wait_until(&self, what: &str, within: Duration, script: &str) {
        let start = std::time::Instant::now();
        loop {
            let out = self.sh(script);
            if out.status.success() {
                return;
            }
            if start.elapsed() > within {
                panic!(
                    "timed out after {within:?} waiting for {what}: {}",
                    describe(script, &out)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
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
