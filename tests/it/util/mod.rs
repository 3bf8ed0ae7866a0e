//! The integration-test harness: a private real nginx, stand-in Kotaemon replicas, and the
//! real `upstreamd` binary, each a child process killed and reaped in `Drop`; typed configs
//! ([`Config`]); and waits on events (a log line, a metric, a `/status` field), not on the
//! clock.

pub mod config;
pub mod consul;
pub mod docker;
pub mod etcd;
pub mod lua;
pub mod sessions;
pub mod shape;
pub mod vm;

pub use config::{Config, Upstream};

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `cond` every 20 ms until it holds or `within` passes; returns the elapsed time.
pub fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        if start.elapsed() > within {
            panic!("timed out after {within:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Output of a child, kept for failure reports and assertions.
#[derive(Clone, Default)]
pub struct Output(Arc<Mutex<String>>);

impl Output {
    fn capture(&self, child: &mut Child, prefix: &str) {
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let buf = self.0.clone();
            let prefix = prefix.to_owned();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if std::env::var_os("UPSTREAMD_TEST_VERBOSE").is_some() {
                        eprintln!("[{prefix}] {line}");
                    }
                    let mut b = buf.lock().unwrap();
                    b.push_str(&line);
                    b.push('\n');
                }
            });
        }
    }

    /// Everything printed so far.
    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }
}

/// Waits up to `within` for `child` to exit: its status, or None if it still runs.
pub fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if start.elapsed() > within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn kill_and_reap(child: &mut Child) {
    // The child may have exited already; both calls are then harmless no-ops with errors we
    // have no use for.
    if child.try_wait().ok().flatten().is_none() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::SIGKILL,
        );
    }
    let _ = child.wait();
}

/// The `load_module` lines of Debian's Lua modules (`libnginx-mod-http-lua`): NDK, then Lua.
pub const LUA_MODULES: &str = "load_module /usr/lib/nginx/modules/ndk_http_module.so;\n\
     load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;\n";

/// Main-context settings of a private nginx.
#[derive(Clone, Debug, Default)]
pub struct NginxMain {
    /// Load the NDK and Lua modules ([`LUA_MODULES`]).
    pub lua: bool,
    /// `worker_processes` (0 means 1).
    pub workers: u32,
}

/// A private nginx: its own prefix directory, config, pid file and logs.
pub struct Nginx {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
}

impl Nginx {
    /// Starts nginx proxying `127.0.0.1:<port>/` to upstream `upstream`, whose block comes from
    /// `conf/upstreams.conf` (initially a single `down` placeholder server).
    pub fn start(upstream: &str) -> Self {
        Self::start_with(upstream, &format!("location / {{ proxy_pass http://{upstream}; proxy_next_upstream error timeout http_502 http_503; proxy_connect_timeout 1s; proxy_read_timeout 5s; proxy_buffering off; }}"))
    }

    /// Starts nginx with a custom `location` block text inside the server.
    pub fn start_with(upstream: &str, locations: &str) -> Self {
        Self::start_site(
            &format!("upstream {upstream} {{ server 127.0.0.1:1 down; }}\n"),
            &|port| format!("server {{\n    listen 127.0.0.1:{port};\n    {locations}\n  }}"),
        )
    }

    /// Starts nginx with `include` as the first `conf/upstreams.conf` and `site(port)` (server
    /// blocks, e.g. a shipped site file listening on `port`) in the http context after it.
    pub fn start_site(include: &str, site: &dyn Fn(u16) -> String) -> Self {
        Self::start_main(&NginxMain::default(), include, site)
    }

    /// [`Nginx::start_site`] with main-context settings: modules to load, worker count.
    pub fn start_main(main: &NginxMain, include: &str, site: &dyn Fn(u16) -> String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for d in ["conf", "logs", "tmp"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let port = free_port();
        let user = if nix::unistd::geteuid().is_root() {
            "user root;"
        } else {
            ""
        };
        let site = site(port);
        let modules = if main.lua { LUA_MODULES } else { "" };
        let workers = main.workers.max(1);
        let conf = format!(
            "{modules}{user}\nworker_processes {workers};\npid logs/nginx.pid;\nerror_log logs/error.log notice;\n\
             events {{ worker_connections 512; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path tmp/client;\n  proxy_temp_path tmp/proxy;\n  \
             fastcgi_temp_path tmp/fastcgi;\n  uwsgi_temp_path tmp/uwsgi;\n  scgi_temp_path tmp/scgi;\n  \
             include upstreams.conf;\n  {site}\n}}\n"
        );
        std::fs::write(dir.path().join("conf/nginx.conf"), conf).unwrap();
        std::fs::write(dir.path().join("conf/upstreams.conf"), include).unwrap();
        let child = Self::spawn(dir.path());
        let n = Self { dir, port, child };
        n.wait_listening();
        n
    }

    fn spawn(dir: &Path) -> Child {
        Command::new("nginx")
            .args([
                "-p",
                dir.to_str().unwrap(),
                "-c",
                "conf/nginx.conf",
                "-g",
                "daemon off;",
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("nginx must be installed (apt-get install nginx)")
    }

    fn wait_listening(&self) {
        wait_for("nginx to listen", Duration::from_secs(10), || {
            self.pid().is_some() && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }

    /// Stops nginx (SIGTERM: its shared memory goes with it) and starts it again on the same
    /// prefix and files, waiting until it listens.
    pub fn restart(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(self.pid_file()); // absent once nginx exited cleanly
        self.child = Self::spawn(self.dir.path());
        self.wait_listening();
    }

    /// Stops the master and its workers: SIGTERM, then SIGKILL after 2 s.
    fn stop(&mut self) {
        // Workers are found before the master goes: once it is gone they belong to init.
        let workers = children(self.child.id());
        let master = self.master();
        // SIGTERM: nginx's fast shutdown takes the workers down with the master.
        if nix::sys::signal::kill(master, nix::sys::signal::SIGTERM).is_ok() {
            // Gone within the wait or not, it is killed and reaped next.
            let _ = wait_exit(&mut self.child, Duration::from_secs(2));
        }
        kill_and_reap(&mut self.child);
        for pid in workers {
            // Already gone in the usual case: then there is nothing to kill.
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
    }

    /// The include file upstreamd owns.
    pub fn output(&self) -> PathBuf {
        self.dir.path().join("conf/upstreams.conf")
    }

    /// The pid file.
    pub fn pid_file(&self) -> PathBuf {
        self.dir.path().join("logs/nginx.pid")
    }

    /// The master's pid, once written.
    pub fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The master's pid (the child this harness started).
    pub fn master(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    /// The master's children (workers, old generations still draining included), once it
    /// has at least one.
    pub fn wait_for_workers(&self) -> std::collections::BTreeSet<i32> {
        let mut workers = std::collections::BTreeSet::new();
        wait_for("nginx workers", Duration::from_secs(5), || {
            workers = children(self.child.id()).into_iter().collect();
            !workers.is_empty()
        });
        workers
    }

    /// `nginx -p DIR -c conf/nginx.conf` followed by `extra`: a command line for this nginx.
    pub fn command(&self, extra: &[&str]) -> Vec<String> {
        let dir = self.dir.path().display().to_string();
        ["nginx", "-p", &dir, "-c", "conf/nginx.conf"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    }

    /// The library's `[nginx]` for this nginx: the given test command, SIGHUP (no reload
    /// command), settle 250 ms, min_reload_interval 2 s, confirm_timeout 2 s.
    pub fn config(&self, test_command: Vec<String>) -> upstreamd::config::NginxConfig {
        upstreamd::config::NginxConfig {
            output: self.output(),
            pid_file: self.pid_file(),
            test_command,
            reload_command: vec![],
            template: None,
            settle: Duration::from_millis(250),
            min_reload_interval: Duration::from_secs(2),
            confirm_timeout: Duration::from_secs(2),
            state_dir: None,
            error_log: None,
            max_old_generations: 0,
            apply: upstreamd::config::ApplyMode::Reload,
            lua: upstreamd::config::LuaConfig::defaults(&self.output(), None),
        }
    }

    /// How many reloads nginx has logged.
    pub fn reloads(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("logs/error.log"))
            .unwrap_or_default()
            .matches("signal 1 (SIGHUP) received")
            .count()
    }

    /// The error log.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("logs/error.log")).unwrap_or_default()
    }

    /// Runs `nginx -t` against the current files.
    pub fn test_config(&self) -> std::process::Output {
        let argv = self.command(&["-t", "-q"]);
        Command::new(&argv[0]).args(&argv[1..]).output().unwrap()
    }

    /// The rendered include file.
    pub fn rendered(&self) -> String {
        std::fs::read_to_string(self.output()).unwrap_or_default()
    }

    /// GET `path` through nginx on a fresh connection: (status, body), or None on a transport error.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(
            &format!("127.0.0.1:{}", self.port),
            path,
            Duration::from_secs(5),
        )
    }

    /// Polls until `n` requests spread as `ok` says (old worker generations may answer for a
    /// moment after a reload), returning that spread.
    pub fn wait_spread(
        &self,
        n: usize,
        what: &str,
        ok: impl Fn(&std::collections::BTreeMap<String, usize>) -> bool,
    ) -> std::collections::BTreeMap<String, usize> {
        let mut last = Default::default();
        wait_for(what, Duration::from_secs(10), || {
            last = self.spread(n);
            ok(&last)
        });
        last
    }

    /// Sends `n` requests for `/` and counts answers per replica name (the stand-in's `GET /`
    /// names its replica); failures count under "error".
    pub fn spread(&self, n: usize) -> std::collections::BTreeMap<String, usize> {
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..n {
            let key = match self.get("/") {
                Some((200, body)) => body.split_whitespace().last().unwrap_or("").to_owned(),
                Some((status, _)) => format!("status {status}"),
                None => "error".to_owned(),
            };
            *seen.entry(key).or_insert(0) += 1;
        }
        seen
    }
}

/// The pids of `parent`'s children, from /proc.
pub fn children(parent: u32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parent = parent.to_string();
    entries
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .to_owned();
            (ppid == parent).then_some(pid)
        })
        .collect()
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A minimal HTTP/1.1 GET on a new connection (so nginx balances each request anew).
pub fn http_get(authority: &str, path: &str, timeout: Duration) -> Option<(u16, String)> {
    http_request(authority, "GET", path, "", timeout)
}

/// A minimal HTTP/1.1 request with a body on a new connection: (status, body).
pub fn http_request(
    authority: &str,
    method: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> Option<(u16, String)> {
    http_exchange(authority, method, path, &[], body, timeout).map(|(s, _, b)| (s, b))
}

/// A minimal HTTP/1.1 request with extra header lines (`"Name: value"`) and a body, on a new
/// connection: (status, response head, body).
pub fn http_exchange(
    authority: &str,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
    timeout: Duration,
) -> Option<(u16, String, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(authority).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .map(|(h, b)| (h.to_owned(), b.to_owned()))
        .unwrap_or_default();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(&body)
    } else {
        body
    };
    Some((status, head, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

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

/// Waits for a daemon's first apply: nginx's first reload, and the daemon saying the file is
/// current.
pub fn first_apply(nginx: &Nginx, daemon: &Daemon) {
    wait_for("the first reload", Duration::from_secs(10), || {
        nginx.reloads() == 1
    });
    wait_for(
        "the daemon to report the file current",
        Duration::from_secs(10),
        || {
            daemon
                .output
                .text()
                .contains("Upstream file is up to date.")
        },
    );
}

/// Asserts that nothing happens on its own once the loop has run on
/// ([`Daemon::wait_loop_ran`]): still `reloads` reloads, the same file, the daemon running.
/// The daemon needs its admin server ([`Config::admin_port0`]).
pub fn assert_quiet(nginx: &Nginx, daemon: &mut Daemon, reloads: usize) {
    let before = nginx.rendered();
    daemon.wait_loop_ran();
    assert_eq!(nginx.reloads(), reloads, "no reload without a change");
    assert_eq!(nginx.rendered(), before, "the file did not change");
    assert!(daemon.alive(), "the daemon runs");
}

/// Asserts that the file holds only the placeholder server (an upstream with no endpoint),
/// that nginx accepts it, and that nginx answers 502.
pub fn assert_placeholder(nginx: &Nginx) {
    assert_eq!(
        server_lines(&nginx.rendered()),
        ["server 127.0.0.1:1 down;"]
    );
    assert!(nginx.test_config().status.success());
    nginx.wait_spread(3, "nginx to answer 502", exactly(&["status 502"]));
}

/// Waits for nginx's `reloads`-th reload, then asserts that nothing more happens on its own
/// ([`assert_quiet`]).
pub fn settles_at(nginx: &Nginx, daemon: &mut Daemon, reloads: usize) {
    wait_for(
        &format!("reload {reloads}"),
        Duration::from_secs(10),
        || nginx.reloads() == reloads,
    );
    assert_quiet(nginx, daemon, reloads);
}

/// Waits for the daemon to report its source failed, then keeps the outage going until
/// `until` (a moment measured from its start: how long the outage lasts is the scenario, not
/// a wait for something) and, once the loop has run on ([`Daemon::wait_loop_ran`]), asserts
/// the outage changed nothing: no reload past the first, the file's `bytes`, the daemon
/// running, nginx serving exactly `serving`. Returns when the failure was noticed.
pub fn assert_outage_changes_nothing(
    nginx: &Nginx,
    daemon: &mut Daemon,
    bytes: &[u8],
    until: Instant,
    serving: &[&str],
) -> Instant {
    wait_for(
        "the daemon to notice the outage",
        Duration::from_secs(10),
        || {
            daemon
                .output
                .text()
                .contains("Source failed; keeping its last snapshot")
        },
    );
    let noticed = Instant::now();
    std::thread::sleep(until.saturating_duration_since(noticed));
    daemon.wait_loop_ran();
    assert_eq!(nginx.reloads(), 1, "no reload during the outage");
    assert_eq!(
        std::fs::read(nginx.output()).unwrap(),
        bytes,
        "the file is untouched"
    );
    assert!(daemon.alive());
    nginx.wait_spread(
        20,
        "nginx to keep serving the last good list",
        exactly(serving),
    );
    noticed
}

/// Prints nginx's state when the test is failing.
fn report_if_panicking(nginx: &Nginx) {
    if std::thread::panicking() {
        eprintln!(
            "---- rendered {}:\n{}",
            nginx.output().display(),
            nginx.rendered()
        );
        eprintln!("---- nginx error.log:\n{}", nginx.error_log());
    }
}

/// Prints nginx's state when a test fails.
pub fn report_on_failure(nginx: &Nginx) -> impl Drop + '_ {
    struct Report<'a>(&'a Nginx);
    impl Drop for Report<'_> {
        fn drop(&mut self) {
            report_if_panicking(self.0);
        }
    }
    Report(nginx)
}

/// A private nginx for `upstream` and upstreamd on it, past its first apply
/// ([`first_apply`]); nginx's state is printed if the test fails. The start most end-to-end
/// tests share: borrow the two as `let (nginx, daemon) = (&run.nginx, &mut run.daemon);`.
pub struct Running {
    /// upstreamd (stopped before nginx).
    pub daemon: Daemon,
    /// The private nginx.
    pub nginx: Nginx,
}

impl Running {
    /// Starts nginx, then upstreamd with the config `config` writes for it, and waits for the
    /// first apply.
    pub fn start(upstream: &str, config: impl FnOnce(&Nginx) -> String) -> Self {
        let nginx = Nginx::start(upstream);
        let daemon = Daemon::start(&config(&nginx));
        let run = Running { daemon, nginx };
        first_apply(&run.nginx, &run.daemon);
        run
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        report_if_panicking(&self.nginx);
    }
}

/// The `server …;` lines of a rendered file, trimmed, in file order.
pub fn server_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("server "))
        .map(str::to_owned)
        .collect()
}

/// `server ADDR …;` lines in the order upstreamd renders them: by address (IP, then port).
pub fn in_render_order(mut lines: Vec<String>) -> Vec<String> {
    lines.sort_by_key(|l| {
        l.split_whitespace()
            .nth(1)
            .and_then(|a| a.trim_end_matches(';').parse::<std::net::SocketAddr>().ok())
    });
    lines
}

/// A `wait_spread` predicate: exactly these replicas answered, and nothing failed.
pub fn exactly(names: &[&str]) -> impl Fn(&std::collections::BTreeMap<String, usize>) -> bool {
    let want: std::collections::BTreeSet<String> = names.iter().map(|n| n.to_string()).collect();
    move |seen| {
        seen.keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            == want
    }
}

/// `GET /status` from the admin server, as JSON.
pub fn admin_status(admin: &str) -> serde_json::Value {
    let (code, body) = http_get(admin, "/status", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("GET http://{admin}/status failed"));
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// `GET /metrics` from the admin server.
pub fn admin_metrics(admin: &str) -> String {
    http_get(admin, "/metrics", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("GET http://{admin}/metrics failed"))
        .1
}

/// The value of one series in Prometheus text, e.g. `upstreamd_reloads_total{result="ok"}`;
/// 0 when absent (a counter never bumped is not exposed).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// `upstreamd_reloads_total{result="RESULT"}` from the daemon's `/metrics`; 0 while the admin
/// server is not up yet.
pub fn reloads_counted(admin: &str, result: &str) -> f64 {
    let text = http_get(admin, "/metrics", Duration::from_secs(15))
        .map(|(_, body)| body)
        .unwrap_or_default();
    metric(
        &text,
        &format!("upstreamd_reloads_total{{result=\"{result}\"}}"),
    )
}

/// Waits until `upstreamd_reloads_total{result="RESULT"}` is exactly `n`.
pub fn wait_reloads(admin: &str, result: &str, n: f64) {
    wait_reloads_until(admin, result, &format!("= {n}"), |v| v == n);
}

/// Waits until `upstreamd_reloads_total{result="RESULT"}` is `n` or more.
pub fn wait_reloads_at_least(admin: &str, result: &str, n: f64) {
    wait_reloads_until(admin, result, &format!(">= {n}"), |v| v >= n);
}

fn wait_reloads_until(admin: &str, result: &str, what: &str, ok: impl Fn(f64) -> bool) {
    wait_for(
        &format!("upstreamd_reloads_total{{result=\"{result}\"}} {what}"),
        Duration::from_secs(15),
        || ok(reloads_counted(admin, result)),
    );
}

/// The local addresses listening on TCP `port`, from /proc/net/tcp and tcp6 (hex as the
/// kernel prints them, e.g. `0100007F` for 127.0.0.1).
pub fn listening_on(port: u16) -> Vec<String> {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else {
                continue;
            };
            let Some((addr, p)) = local.split_once(':') else {
                continue;
            };
            if *state == "0A" && u16::from_str_radix(p, 16) == Ok(port) {
                found.push(addr.to_owned());
            }
        }
    }
    found
}

/// How many connections wait in the accept queue of the socket listening on 127.0.0.1:`port`
/// (`rx_queue` of a listening socket in /proc/net/tcp); None when nothing listens there.
pub fn accept_queue(port: u16) -> Option<u32> {
    std::fs::read_to_string("/proc/net/tcp")
        .ok()?
        .lines()
        .skip(1)
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state, queues) = (fields.get(1)?, fields.get(3)?, fields.get(4)?);
            let (addr, p) = local.split_once(':')?;
            let listening = *state == "0A" && addr == "0100007F";
            (listening && u16::from_str_radix(p, 16) == Ok(port))
                .then(|| u32::from_str_radix(queues.split_once(':')?.1, 16).ok())
                .flatten()
        })
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

/// Replicas behind a real nginx and a daemon with its admin server: what the admin and
/// operator tests start from.
pub struct AdminStack {
    /// The stand-in replicas, in the order named.
    pub replicas: Vec<Replica>,
    /// The private nginx in front of them.
    pub nginx: Nginx,
    /// upstreamd, ready (its `/readyz` answered 200).
    pub daemon: Daemon,
    /// The admin server's address.
    pub admin: String,
    /// The daemon's config, as started.
    pub config: Config,
}

impl AdminStack {
    /// Starts `names` as replicas, nginx, and upstreamd with a static list of them and its
    /// admin server on port 0, the config as `configure` changes it; returns once `/readyz`
    /// says 200.
    pub fn start(names: &[&str], configure: impl FnOnce(Config) -> Config) -> Self {
        let replicas: Vec<Replica> = names.iter().map(|name| Replica::start(name)).collect();
        let nginx = Nginx::start("kotaemon");
        let cfg = Config::static_list(&nginx, "kotaemon", &replicas.iter().collect::<Vec<_>>())
            .admin_port0();
        let config = configure(cfg);
        let daemon = Daemon::start(&config.to_toml());
        let admin = daemon.ready_admin();
        AdminStack {
            replicas,
            nginx,
            daemon,
            admin,
            config,
        }
    }
}
