//! The integration-test harness: a private real nginx, stand-in Kotaemon replicas, and the
//! real `upstreamd` binary, each a child process killed and reaped in `Drop`; typed configs
//! ([`Config`]); and waits on events (a log line, a metric, a `/status` field), not on the
//! clock.

pub mod config;
pub mod consul;
pub mod daemon;
pub mod docker;
pub mod etcd;
pub mod http;
pub mod lua;
pub mod nginx;
pub mod replica;
pub mod scenario;
pub mod sessions;
pub mod shape;
pub mod vm;

pub use config::{Config, Upstream};
pub use daemon::*;
pub use http::*;
pub use nginx::*;
pub use replica::*;
pub use scenario::*;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::Child;
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
