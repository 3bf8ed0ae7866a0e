//! The processes a scenario starts: nginx, stand-in replicas, etcd, the Consul stand-in,
//! upstreamd and the naive reloader. Each is killed and reaped when its guard drops, which
//! also happens when the harness fails or is interrupted.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Where the binaries this harness starts live.
#[derive(Debug, Clone)]
pub struct Bins {
    pub upstreamd: PathBuf,
    pub standin: PathBuf,
    pub consul: PathBuf,
    pub naive: PathBuf,
}

/// A port that was free a moment ago on `ip`.
pub fn free_port(ip: &str) -> Result<u16> {
    let listener = TcpListener::bind((ip, 0)).with_context(|| format!("failed to bind {ip}:0"))?;
    Ok(listener.local_addr()?.port())
}

/// Polls `cond` every 10 ms until it holds; fails after `within`.
pub async fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > within {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// A child process, its output in a log file; SIGKILLed (with its process group, when it
/// leads one) and reaped on drop.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
    group: bool,
    reaped: bool,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `logs/<name>.log`. With `group`, the
    /// child leads a new process group and the whole group is killed with it (for scripts
    /// that start their own children).
    pub fn spawn(name: &str, cmd: &mut Command, logs: &Path, group: bool) -> Result<Self> {
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("failed to open `{}`", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        if group {
            cmd.process_group(0);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("failed to start {name}: {cmd:?}"))?;
        Ok(Self {
            name: name.to_owned(),
            log,
            child,
            group,
            reaped: false,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: Signal) -> Result<()> {
        kill(Pid::from_raw(self.pid()), sig)
            .with_context(|| format!("failed to send {sig} to {} ({})", self.name, self.pid()))
    }

    /// Whether it is still running (reaps it when it has exited).
    pub fn running(&mut self) -> bool {
        if self.reaped {
            return false;
        }
        match self.child.try_wait() {
            Ok(None) => true,
            Ok(Some(_)) | Err(_) => {
                self.reaped = true;
                false
            }
        }
    }

    /// The last lines of its log, for error reports.
    pub fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Sends `first`, waits up to `grace` for the exit, then SIGKILLs (the group too) and reaps.
    pub fn stop(&mut self, first: Signal, grace: Duration) {
        if self.reaped {
            return;
        }
        if self.running() {
            // It may exit between the check and the signal; then there is nothing to stop.
            let _gone = self.signal(first);
            let start = Instant::now();
            while start.elapsed() < grace && self.running() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if self.group {
            // The group's other members (a `sleep`, a `curl`) may outlive a killed leader.
            let _none_left = kill(Pid::from_raw(-self.pid()), Signal::SIGKILL);
        }
        if self.running() {
            let _gone = kill(Pid::from_raw(self.pid()), Signal::SIGKILL);
        }
        if !self.reaped {
            // After SIGKILL this returns promptly; an error means it was already reaped.
            let _status = self.child.wait();
            self.reaped = true;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Signal::SIGKILL, Duration::ZERO);
    }
}

/// `(pid, cmdline)` of every process whose parent is `parent`.
pub fn children(parent: i32) -> Vec<(i32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(parent) {
            let cmdline = std::fs::read(e.path().join("cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            out.push((pid, cmdline.trim().to_owned()));
        }
    }
    out
}

/// CPU time (user + system) of a process, in clock ticks, from `/proc/PID/stat`.
pub fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state(0) ppid(1) … utime(11) stime(12).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Resident set size in KiB, from `/proc/PID/status`.
pub fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Open file descriptors of a process.
pub fn fd_count(pid: i32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Clock ticks per second (`getconf CLK_TCK`); 100 on Linux unless proven otherwise.
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Whether we run as root (private nginx then needs `user root;` for its temp dirs).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A private nginx: its own prefix directory, config, pid file and logs.
pub struct Nginx {
    pub dir: PathBuf,
    pub port: u16,
    proc: Proc,
}

impl Nginx {
    /// Writes `conf/nginx.conf` and `conf/upstreams.conf` under `dir` and starts nginx,
    /// waiting until it listens on `port` (127.0.0.1).
    pub async fn start(
        name: &str,
        dir: &Path,
        port: u16,
        conf: &str,
        upstreams: &str,
        logs: &Path,
    ) -> Result<Self> {
        for d in ["conf", "logs", "tmp"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        std::fs::write(dir.join("conf/nginx.conf"), conf)?;
        std::fs::write(dir.join("conf/upstreams.conf"), upstreams)?;
        let mut cmd = Command::new("nginx");
        cmd.arg("-p")
            .arg(dir)
            .args(["-c", "conf/nginx.conf", "-g", "daemon off;"]);
        let proc = Proc::spawn(name, &mut cmd, logs, false)?;
        let mut n = Self {
            dir: dir.to_owned(),
            port,
            proc,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if n.master().is_some() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(n);
            }
            if !n.proc.running() || Instant::now() > deadline {
                bail!(
                    "nginx `{name}` did not start listening on {port}:\n{}\n{}",
                    n.proc.tail(20),
                    n.error_log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn output(&self) -> PathBuf {
        self.dir.join("conf/upstreams.conf")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("logs/nginx.pid")
    }

    pub fn access_log(&self) -> PathBuf {
        self.dir.join("logs/access.log")
    }

    pub fn error_log_path(&self) -> PathBuf {
        self.dir.join("logs/error.log")
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("logs/error.log")).unwrap_or_default()
    }

    fn error_log_tail(&self, lines: usize) -> String {
        let text = self.error_log();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The master's pid, once the pid file is written.
    pub fn master(&self) -> Option<i32> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// `nginx -t` for this prefix, as a command line.
    pub fn test_command(&self) -> Vec<String> {
        vec![
            "nginx".into(),
            "-p".into(),
            self.dir.display().to_string(),
            "-c".into(),
            "conf/nginx.conf".into(),
            "-t".into(),
            "-q".into(),
        ]
    }

    /// Reloads logged so far (`signal 1 (SIGHUP) received` at `notice`).
    pub fn reloads(&self) -> usize {
        self.error_log()
            .matches("signal 1 (SIGHUP) received")
            .count()
    }

    /// Worker processes whose parent is the master: (current generation, shutting down).
    pub fn workers(&self) -> (usize, usize) {
        let Some(master) = self.master() else {
            return (0, 0);
        };
        let kids = children(master);
        let old = kids
            .iter()
            .filter(|(_, c)| c.contains("shutting down"))
            .count();
        let cache = kids.iter().filter(|(_, c)| c.contains("cache")).count();
        (kids.len() - old - cache, old)
    }

    /// The set of worker pids now.
    pub fn worker_pids(&self) -> BTreeSet<i32> {
        self.master()
            .map(|m| children(m).into_iter().map(|(p, _)| p).collect())
            .unwrap_or_default()
    }

    /// Runs `nginx -t` on the current files; its wall time.
    pub fn time_test(&self) -> Result<Duration> {
        let cmd = self.test_command();
        let start = Instant::now();
        let out = Command::new(&cmd[0]).args(&cmd[1..]).output()?;
        let took = start.elapsed();
        if !out.status.success() {
            bail!("nginx -t failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(took)
    }

    /// SIGHUP to the master; the time until a worker pid not seen before appears.
    pub async fn time_reload(&self) -> Result<Duration> {
        let master = self.master().context("nginx has no master pid")?;
        let before = self.worker_pids();
        let start = Instant::now();
        kill(Pid::from_raw(master), Signal::SIGHUP)?;
        loop {
            if self.worker_pids().iter().any(|p| !before.contains(p)) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("no new nginx worker within 20 s of SIGHUP");
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // Workers are found before the master goes: once it is gone they belong to init.
        let workers = self.master().map(children).unwrap_or_default();
        // SIGTERM: nginx's fast shutdown takes the workers down with the master.
        self.proc.stop(Signal::SIGTERM, Duration::from_secs(3));
        for (pid, _) in workers {
            // Already gone in the usual case: then there is nothing to kill.
            let _gone = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// A stand-in Kotaemon replica.
pub struct Replica {
    pub name: String,
    pub addr: String,
    /// The control file its mode is also read from (the only way out of `hang`).
    control: PathBuf,
    /// How it was started, to start it again after a kill.
    cmd: (PathBuf, Vec<String>, PathBuf),
    proc: Proc,
}

impl Replica {
    /// Starts `kotaemon-standin` on `ip:port` (or a free port if that one is taken) and waits
    /// until `/queue/status` answers. A fixed address per role keeps nginx's consistent-hash
    /// ring, and so each replica's share of users, the same for every peer.
    pub async fn start(
        bins: &Bins,
        name: &str,
        ip: &str,
        port: u16,
        extra: &[&str],
        dir: &Path,
        logs: &Path,
    ) -> Result<Self> {
        let port = if TcpListener::bind((ip, port)).is_ok() {
            port
        } else {
            free_port(ip)?
        };
        let addr = format!("{ip}:{port}");
        let control = dir.join(format!("mode-{name}"));
        std::fs::write(&control, "healthy")?;
        let extra: Vec<String> = extra.iter().map(|e| (*e).to_owned()).collect();
        let cmd = (bins.standin.clone(), extra, logs.to_owned());
        let proc = Self::spawn(name, &addr, &control, &cmd)?;
        let mut r = Self {
            name: name.to_owned(),
            addr,
            control,
            cmd,
            proc,
        };
        r.wait_answering().await?;
        Ok(r)
    }

    fn spawn(
        name: &str,
        addr: &str,
        control: &Path,
        (standin, extra, logs): &(PathBuf, Vec<String>, PathBuf),
    ) -> Result<Proc> {
        let mut cmd = Command::new(standin);
        cmd.args(["--listen", addr, "--name", name, "--control-file"])
            .arg(control)
            .args(extra)
            .env("RUST_LOG", "warn");
        Proc::spawn(&format!("replica-{name}"), &mut cmd, logs, false)
    }

    async fn wait_answering(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if crate::client::get_once(&self.addr, "/queue/status", "", Duration::from_secs(1))
                .await
                .is_ok_and(|(status, _)| status == 200)
            {
                return Ok(());
            }
            if !self.proc.running() || Instant::now() > deadline {
                bail!(
                    "replica {} did not start on {}:\n{}",
                    self.name,
                    self.addr,
                    self.proc.tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a killed replica again on the same address, healthy, and waits until it answers.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        std::fs::write(&self.control, "healthy")?;
        self.proc = Self::spawn(&self.name, &self.addr, &self.control, &self.cmd)?;
        self.wait_answering().await
    }

    /// Sets the mode through the control file (read every 100 ms): works while it hangs.
    pub fn set_mode_file(&self, mode: &str) -> Result<()> {
        std::fs::write(&self.control, mode)
            .with_context(|| format!("failed to write `{}`", self.control.display()))
    }

    /// Flips the failure switch at once, through `POST /_standin/mode`.
    pub async fn set_mode_now(&self, mode: &str) -> Result<()> {
        let (status, body) = crate::client::request_once(
            &self.addr,
            "POST",
            "/_standin/mode",
            "",
            mode,
            Duration::from_secs(2),
        )
        .await?;
        if status != 200 {
            bail!(
                "replica {}: mode {mode} refused: {status} {body}",
                self.name
            );
        }
        Ok(())
    }

    /// SIGKILL: the replica dies as a crashed process does.
    pub fn kill(&mut self) {
        self.proc.stop(Signal::SIGKILL, Duration::ZERO);
    }
}

/// A single-node etcd on loopback.
pub struct Etcd {
    pub url: String,
    _proc: Proc,
}

impl Etcd {
    pub async fn start(dir: &Path, logs: &Path) -> Result<Self> {
        let client = free_port("127.0.0.1")?;
        let peer = format!("http://127.0.0.1:{}", free_port("127.0.0.1")?);
        let url = format!("http://127.0.0.1:{client}");
        let mut cmd = Command::new("etcd");
        cmd.arg("--name=default")
            .arg(format!("--data-dir={}", dir.join("etcd-data").display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=default={peer}"))
            .arg("--log-level=warn");
        let mut proc = Proc::spawn("etcd", &mut cmd, logs, false)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let healthy = crate::client::get_once(
                &url["http://".len()..],
                "/health",
                "",
                Duration::from_millis(500),
            )
            .await
            .is_ok_and(|(status, body)| status == 200 && body.contains("true"));
            if healthy {
                return Ok(Self { url, _proc: proc });
            }
            if !proc.running() || Instant::now() > deadline {
                bail!("etcd did not become healthy:\n{}", proc.tail(20));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The Consul agent stand-in.
pub struct Consul {
    pub url: String,
    _proc: Proc,
}

impl Consul {
    pub async fn start(bins: &Bins, logs: &Path) -> Result<Self> {
        let addr = format!("127.0.0.1:{}", free_port("127.0.0.1")?);
        let mut cmd = Command::new(&bins.consul);
        cmd.args(["--listen", &addr]).env("RUST_LOG", "warn");
        let mut proc = Proc::spawn("consul-standin", &mut cmd, logs, false)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if crate::client::get_once(&addr, "/v1/status/leader", "", Duration::from_millis(500))
                .await
                .is_ok_and(|(status, _)| status == 200)
            {
                return Ok(Self {
                    url: format!("http://{addr}"),
                    _proc: proc,
                });
            }
            if !proc.running() || Instant::now() > deadline {
                bail!("consul-standin did not start:\n{}", proc.tail(20));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A running upstreamd.
pub struct Upstreamd {
    pub admin: String,
    proc: Proc,
}

impl Upstreamd {
    /// Writes `config` (which must set `[admin] listen = admin`) and starts `upstreamd run`.
    pub fn start(
        bins: &Bins,
        name: &str,
        config_text: &str,
        admin: &str,
        dir: &Path,
        logs: &Path,
    ) -> Result<Self> {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, config_text)?;
        let mut cmd = Command::new(&bins.upstreamd);
        cmd.arg("run").arg("--config").arg(&config).env(
            "RUST_LOG",
            std::env::var("UPSTREAMD_BENCH_LOG").unwrap_or_else(|_| "info".into()),
        );
        let proc = Proc::spawn(name, &mut cmd, logs, false)?;
        Ok(Self {
            admin: admin.to_owned(),
            proc,
        })
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    pub fn running(&mut self) -> bool {
        self.proc.running()
    }

    pub fn tail(&self, lines: usize) -> String {
        self.proc.tail(lines)
    }

    /// Waits until `/readyz` answers 200 (the first file is applied).
    pub async fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if crate::client::get_once(&self.admin, "/readyz", "", Duration::from_millis(500))
                .await
                .is_ok_and(|(status, _)| status == 200)
            {
                return Ok(());
            }
            if !self.proc.running() || Instant::now() > deadline {
                bail!("upstreamd did not become ready:\n{}", self.proc.tail(30));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The sum of a metric family's samples on `/metrics` (0 when absent).
    pub async fn metric(&self, family: &str) -> Result<f64> {
        self.metric_where(family, "").await
    }

    /// The sum of a metric family's samples whose line contains `label` (e.g. `result="ok"`).
    pub async fn metric_where(&self, family: &str, label: &str) -> Result<f64> {
        let (status, text) =
            crate::client::get_once(&self.admin, "/metrics", "", Duration::from_secs(5)).await?;
        if status != 200 {
            bail!("GET /metrics answered {status}");
        }
        Ok(text
            .lines()
            .filter(|l| {
                l.strip_prefix(family)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                    && l.contains(label)
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum())
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        self.proc.stop(Signal::SIGTERM, Duration::from_secs(5));
    }
}

/// The naive reloader script, running as its own process group.
pub struct Naive {
    proc: Proc,
}

impl Naive {
    /// `naive-reloader.sh OUTPUT NGINX_PREFIX INTERVAL HEALTH_PATH BALANCE -- MEMBERS_COMMAND…`
    pub fn start(
        bins: &Bins,
        nginx: &Nginx,
        interval: &str,
        balance: &str,
        members: &[String],
        logs: &Path,
    ) -> Result<Self> {
        let mut cmd = Command::new("bash");
        cmd.arg(&bins.naive)
            .arg(nginx.output())
            .arg(&nginx.dir)
            .args([interval, "/queue/status", balance, "--"])
            .args(members);
        Ok(Self {
            proc: Proc::spawn("naive-reloader", &mut cmd, logs, true)?,
        })
    }

    pub fn running(&mut self) -> bool {
        self.proc.running()
    }

    pub fn tail(&self, lines: usize) -> String {
        self.proc.tail(lines)
    }
}
