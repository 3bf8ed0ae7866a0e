//! A private nginx for integration tests: its own prefix dir, port, pid file and error log.
//!
//! Include it with `#[path = "support/nginx.rs"] mod nginx_support;`. The master runs as a
//! child (`daemon off`); `Drop` stops it and its workers and reaps it, and when the test is
//! panicking prints the command, nginx.conf, the include file and the error log.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use std::{fs, thread};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use upstreamd::config::NginxConfig;
use upstreamd::nginx::{read_pid, worker_pids};

pub const NGINX: &str = "/usr/sbin/nginx";

/// The line nginx logs at `notice` for every SIGHUP it receives.
pub const SIGHUP_LINE: &str = "signal 1 (SIGHUP) received";

/// Polls `check` every 5 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// Polls `check` every 5 ms until it is true (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct PrivateNginx {
    pub dir: tempfile::TempDir,
    /// Where nginx listens, proxying `/` to `upstream u`.
    pub port: u16,
    command: String,
    child: Child,
}

impl PrivateNginx {
    /// Starts nginx with `upstreams` as `conf/upstreams.conf` (it must define `upstream u`)
    /// and waits until the master wrote its pid file and has a worker.
    pub fn start(upstreams: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let root = dir.path();
        for sub in ["conf", "logs", "tmp"] {
            fs::create_dir(root.join(sub)).unwrap();
        }
        let running_as_root = fs::metadata("/proc/self").unwrap().uid() == 0;
        let mut conf = String::new();
        if running_as_root {
            // Workers would otherwise run as nobody and could not use the root-owned temp dirs.
            conf.push_str("user root;\n");
        }
        let r = root.display();
        write!(
            conf,
            "worker_processes 1;
pid {r}/logs/nginx.pid;
error_log {r}/logs/error.log notice;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {r}/tmp/client_body;
    proxy_temp_path {r}/tmp/proxy;
    fastcgi_temp_path {r}/tmp/fastcgi;
    uwsgi_temp_path {r}/tmp/uwsgi;
    scgi_temp_path {r}/tmp/scgi;
    include upstreams.conf;
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://u; }}
    }}
}}
"
        )
        .unwrap();
        fs::write(root.join("conf/nginx.conf"), conf).unwrap();
        fs::write(root.join("conf/upstreams.conf"), upstreams).unwrap();

        let args = [
            "-p",
            &format!("{r}"),
            "-c",
            "conf/nginx.conf",
            "-g",
            "daemon off;",
        ];
        let command = format!("{NGINX} {}", args.join(" "));
        let mut child = Command::new(NGINX)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("could not start `{command}`: {e}"));
        prefix_lines(
            format!("[nginx :{port} stdout]"),
            child.stdout.take().unwrap(),
        );
        prefix_lines(
            format!("[nginx :{port} stderr]"),
            child.stderr.take().unwrap(),
        );
        let nginx = PrivateNginx {
            dir,
            port,
            command,
            child,
        };
        let master = wait_for("the nginx pid file", Duration::from_secs(5), || {
            read_pid(&nginx.pid_file()).ok()
        });
        assert_eq!(master.as_raw() as u32, nginx.child.id(), "{}", nginx.dump());
        nginx.wait_for_workers();
        nginx
    }

    /// The include file, `conf/upstreams.conf`.
    pub fn output(&self) -> PathBuf {
        self.dir.path().join("conf/upstreams.conf")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.dir.path().join("logs/nginx.pid")
    }

    pub fn master(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// The master's current children; waits until there is at least one.
    pub fn wait_for_workers(&self) -> std::collections::BTreeSet<i32> {
        wait_for("nginx workers", Duration::from_secs(5), || {
            Some(worker_pids(self.master()).unwrap()).filter(|w| !w.is_empty())
        })
    }

    pub fn error_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("logs/error.log")).unwrap_or_default()
    }

    /// How many SIGHUPs the master has logged.
    pub fn sighups(&self) -> usize {
        self.error_log()
            .lines()
            .filter(|l| l.contains(SIGHUP_LINE))
            .count()
    }

    /// `nginx -p DIR -c conf/nginx.conf` followed by `extra`.
    pub fn command(&self, extra: &[&str]) -> Vec<String> {
        let mut argv = vec![
            NGINX.to_owned(),
            "-p".into(),
            self.dir.path().display().to_string(),
        ];
        argv.extend(
            ["-c", "conf/nginx.conf"]
                .iter()
                .chain(extra)
                .map(|s| s.to_string()),
        );
        argv
    }

    /// `[nginx]` for this nginx: the given test command, SIGHUP, `confirm_timeout` 2 s.
    pub fn config(&self, test_command: Vec<String>) -> NginxConfig {
        NginxConfig {
            output: self.output(),
            pid_file: self.pid_file(),
            test_command,
            reload_command: vec![],
            template: None,
            settle: Duration::from_millis(250),
            min_reload_interval: Duration::from_secs(2),
            confirm_timeout: Duration::from_secs(2),
            state_dir: None,
        }
    }

    /// GET `path` through nginx: (status code, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        std::io::Write::write_all(
            &mut stream,
            format!("GET {path} HTTP/1.0\r\nHost: t\r\n\r\n").as_bytes(),
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// Polls `/` until it answers 200 with `body`: an old worker generation may still accept
    /// a connection or two for some milliseconds after the new one started.
    pub fn wait_for_body(&self, body: &str) {
        let mut last = (0, String::new());
        let found = wait_until(Duration::from_secs(5), || {
            last = self.get("/");
            last.0 == 200 && last.1 == body
        });
        assert!(
            found,
            "`/` still answers {last:?}, not 200 {body:?}\n{}",
            self.dump()
        );
    }

    /// The command, config, include file and error log, for failure messages.
    pub fn dump(&self) -> String {
        let read = |p: &Path| fs::read_to_string(p).unwrap_or_else(|e| format!("<{e}>"));
        format!(
            "command: {}\n--- conf/nginx.conf\n{}--- conf/upstreams.conf\n{}--- logs/error.log\n{}",
            self.command,
            read(&self.dir.path().join("conf/nginx.conf")),
            read(&self.output()),
            self.error_log()
        )
    }
}

impl Drop for PrivateNginx {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.dump());
        }
        let workers = worker_pids(self.master()).unwrap_or_default();
        // SIGTERM is nginx's fast shutdown: the master stops its workers, then exits.
        // Errors are fine here: the master may be gone already, and SIGKILL follows anyway.
        let _ = kill(self.master(), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            thread::sleep(Duration::from_millis(5));
        }
        // No-ops (ESRCH) when the fast shutdown worked; they only matter when it did not.
        let _ = self.child.kill();
        for worker in workers {
            let _ = kill(Pid::from_raw(worker), Signal::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Copies each line of `from` to the test's stderr, prefixed.
fn prefix_lines(prefix: String, from: impl Read + Send + 'static) {
    thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            eprintln!("{prefix} {line}");
        }
    });
}

/// A one-response-per-connection HTTP backend on `ip`, answering every request with `body`.
pub struct Backend {
    pub address: String,
}

impl Backend {
    pub fn start(ip: &str, body: &'static str) -> Self {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let address = listener.local_addr().unwrap().to_string();
        thread::spawn(move || {
            for mut stream in listener.incoming().map_while(Result::ok) {
                let mut request = [0u8; 4096];
                // The request's content does not matter; a read error just ends this response.
                let _ = stream.read(&mut request);
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = std::io::Write::write_all(&mut stream, response.as_bytes());
            }
        });
        Backend { address }
    }
}
