//! A private real nginx per test: its own prefix, config, pid file and logs; started, restarted
//! and stopped (workers included) by the harness, and reported when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, http_get, kill_and_reap, wait_exit, wait_for};

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

/// Prints nginx's state when the test is failing.
pub(super) fn report_if_panicking(nginx: &Nginx) {
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
