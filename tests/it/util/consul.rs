//! A Consul registry for tests: the in-repo `consul-standin`, or a real `consul agent -dev`
//! when a `consul` binary is on PATH. Either runs as a child process, killed and reaped in
//! `Drop`; the test drives it through Consul's agent HTTP API.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{free_port, Config, Nginx, Replica, Upstream};

/// The service name every test registers under.
pub const SERVICE: &str = "kotaemon";

/// Runs each named `async fn(Lane)` of the calling module (which imports [`Lane`]) as two
/// tests, `NAME::standin` and `NAME::real_consul`, under the test attribute given first.
macro_rules! on_every_lane {
    (#[$test:meta] $($name:ident),* $(,)?) => {$(
        mod $name {
            #[$test]
            async fn standin() {
                super::$name(super::Lane::Standin).await
            }
            #[$test]
            async fn real_consul() {
                super::$name(super::Lane::RealConsul).await
            }
        }
    )*};
}
pub(crate) use on_every_lane;

/// Which registry a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// `consul-standin` (always available; the only lane with fault injection and stats).
    Standin,
    /// A real `consul agent -dev` (only when `consul` is on PATH).
    RealConsul,
}

/// A running registry.
pub struct Registry {
    child: Child,
    /// Its HTTP API, `http://127.0.0.1:PORT`.
    pub url: String,
    /// The node name (`Node.Node`).
    pub node: String,
    /// The node address (`Node.Address`): what an instance registered without an address gets.
    pub node_address: String,
    /// The ACL token it requires, if any.
    pub token: Option<String>,
    /// Which kind it is.
    pub lane: Lane,
    http: reqwest::Client,
    _serial: Option<MutexGuard<'static, ()>>,
}

/// Real agents share well-known ports (grpc_tls, …): one at a time.
static REAL_CONSUL: Mutex<()> = Mutex::new(());

/// `bin` on PATH, if there.
pub fn on_path(bin: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// Copies a child's output into the test log, prefixed; sends the first stdout line back.
fn relay(child: &mut Child, prefix: &'static str) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            // The receiver may be gone after the first line; later lines only go to the log.
            let _ = tx.send(line.clone());
            println!("[{prefix}] {line}");
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            println!("[{prefix}] {line}");
        }
    });
    rx
}

/// Starts `consul-standin` listening on `listen` (port 0: a free one) and waits for it to
/// report its address: (child, `http://ADDR`).
fn spawn_standin(listen: &str, token: Option<&str>, node_address: &str) -> (Child, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_consul-standin"));
    cmd.args([
        "--listen",
        listen,
        "--node-name",
        "standin",
        "--node-address",
        node_address,
    ]);
    if let Some(t) = token {
        cmd.args(["--token", t]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start consul-standin");
    let first = relay(&mut child, "standin").recv_timeout(Duration::from_secs(10));
    match first
        .as_deref()
        .ok()
        .and_then(|l| l.strip_prefix("consul-standin listening on "))
    {
        Some(url) => (child, url.to_owned()),
        None => {
            // Reap it before failing.
            let _ = child.kill();
            let _ = child.wait();
            panic!("consul-standin did not report its address: {first:?}");
        }
    }
}

impl Registry {
    /// A config for upstream `kotaemon` fed by service [`SERVICE`] with blocking queries of
    /// `wait`, and the admin server on port 0; probes on `/queue/status` when `probes`, off
    /// otherwise (Consul alone decides).
    pub fn config(&self, nginx: &Nginx, probes: bool, wait: &str) -> Config {
        let upstream = Upstream::new("kotaemon");
        let upstream = if probes {
            upstream.probe("/queue/status")
        } else {
            upstream
        };
        Config::new(nginx)
            .admin_port0()
            .upstream(upstream.consul(&self.url, SERVICE, wait))
    }

    /// Starts the registry for `lane`; `None` (after saying so) when the lane is unavailable.
    pub async fn start(lane: Lane, token: Option<&str>) -> Option<Self> {
        Self::start_with(lane, token, "127.0.0.1").await
    }

    /// Like `start`, with the stand-in's node at `node_address` (a real agent's node is always
    /// 127.0.0.1, its bind address; `node_address` says which one the test got).
    pub async fn start_with(lane: Lane, token: Option<&str>, node_address: &str) -> Option<Self> {
        let reg = match lane {
            Lane::Standin => Self::standin(token, node_address),
            Lane::RealConsul => Self::real(token)?,
        };
        reg.wait_ready().await;
        Some(reg)
    }

    fn standin(token: Option<&str>, node_address: &str) -> Self {
        let (child, url) = spawn_standin("127.0.0.1:0", token, node_address);
        Self::new(
            child,
            url,
            "standin",
            node_address,
            token,
            Lane::Standin,
            None,
        )
    }

    fn real(token: Option<&str>) -> Option<Self> {
        let Some(consul) = on_path("consul") else {
            println!("skipped: no consul binary on PATH");
            return None;
        };
        let serial = REAL_CONSUL.lock().unwrap_or_else(|e| e.into_inner());
        let http = free_port();
        let mut cmd = Command::new(consul);
        cmd.args([
            "agent",
            "-dev",
            "-bind",
            "127.0.0.1",
            "-client",
            "127.0.0.1",
            "-node",
            "upstreamd-test",
        ]);
        for (flag, port) in [
            ("-http-port", http),
            ("-dns-port", free_port()),
            ("-grpc-port", free_port()),
            ("-serf-lan-port", free_port()),
            ("-serf-wan-port", free_port()),
            ("-server-port", free_port()),
        ] {
            cmd.arg(format!("{flag}={port}"));
        }
        if let Some(t) = token {
            cmd.args([
                "-hcl",
                &format!(
                    r#"acl {{ enabled = true default_policy = "deny" tokens {{ initial_management = "{t}" agent = "{t}" }} }}"#
                ),
            ]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start consul agent -dev");
        drop(relay(&mut child, "consul"));
        let url = format!("http://127.0.0.1:{http}");
        Some(Self::new(
            child,
            url,
            "upstreamd-test",
            "127.0.0.1",
            token,
            Lane::RealConsul,
            Some(serial),
        ))
    }

    fn new(
        child: Child,
        url: String,
        node: &str,
        node_address: &str,
        token: Option<&str>,
        lane: Lane,
        serial: Option<MutexGuard<'static, ()>>,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        Self {
            child,
            url,
            node: node.into(),
            node_address: node_address.into(),
            token: token.map(Into::into),
            lane,
            http,
            _serial: serial,
        }
    }

    /// Waits for a leader (a real agent needs a second or two).
    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(resp) = self
                .http
                .get(format!("{}/v1/status/leader", self.url))
                .send()
                .await
            {
                if resp.text().await.is_ok_and(|t| t.trim().len() > 2) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{:?} at {} never reported a leader", self.lane, self.url);
    }

    /// `PUT path` with an optional JSON body (and the token); panics unless it succeeds.
    pub async fn put(&self, path: &str, body: Option<Value>) {
        let mut req = self.http.put(format!("{}{path}", self.url));
        if let Some(t) = &self.token {
            req = req.header("X-Consul-Token", t);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT {path}: {e}"));
        let status = resp.status();
        assert!(
            status.is_success(),
            "PUT {path}: {status} {}",
            resp.text().await.unwrap_or_default()
        );
    }

    /// Registers a service instance (see [`instance`]).
    pub async fn register(&self, def: Value) {
        self.put("/v1/agent/service/register", Some(def)).await;
    }

    /// Deregisters the instance with this ID.
    pub async fn deregister(&self, id: &str) {
        self.put(&format!("/v1/agent/service/deregister/{id}"), None)
            .await;
    }

    /// Puts the instance with this ID in maintenance mode, or takes it out.
    pub async fn maintenance(&self, id: &str, enable: bool) {
        self.put(
            &format!("/v1/agent/service/maintenance/{id}?enable={enable}&reason=upstreamd%20test"),
            None,
        )
        .await;
    }

    /// Stand-in only: `none`, `error500`, `hang` or `reset-index`.
    pub async fn fault(&self, fault: &str) {
        assert_eq!(self.lane, Lane::Standin, "faults are a stand-in control");
        let resp = self
            .http
            .post(format!("{}/_standin/fault", self.url))
            .body(fault.to_owned())
            .send()
            .await
            .unwrap();
        assert!(
            resp.status().is_success(),
            "fault {fault}: {}",
            resp.status()
        );
    }

    /// Stand-in only: registers instance `id` of another service, `other`. Bumps the index
    /// (waking blocked queries) without changing [`SERVICE`].
    pub async fn register_other(&self, id: &str) {
        assert_eq!(
            self.lane,
            Lane::Standin,
            "register_other is for the stand-in"
        );
        self.register(json!({"Name": "other", "ID": id, "Address": "127.0.0.9", "Port": 9}))
            .await;
    }

    /// Kills the registry abruptly (SIGKILL) and reaps it: its address stops answering.
    pub fn kill(&mut self) {
        // Already exited is fine; wait() reaps it either way.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stand-in only: kills it if it still runs, then starts a new stand-in on the same
    /// address, token and node, and waits until it answers. The new one starts empty, as a
    /// Consul that lost its data; register the instances again.
    pub async fn restart(&mut self) {
        assert_eq!(self.lane, Lane::Standin, "restart is for the stand-in");
        self.kill();
        let listen = self.url.strip_prefix("http://").unwrap().to_owned();
        let (child, url) = spawn_standin(&listen, self.token.as_deref(), &self.node_address);
        assert_eq!(
            url, self.url,
            "the restarted stand-in is on the same address"
        );
        self.child = child;
        self.wait_ready().await;
    }

    /// Stand-in only: request counts and the last token and query seen.
    pub async fn stats(&self) -> Value {
        assert_eq!(self.lane, Lane::Standin, "stats are a stand-in control");
        let resp = self
            .http
            .get(format!("{}/_standin/stats", self.url))
            .send()
            .await
            .unwrap();
        serde_json::from_str(&resp.text().await.unwrap()).unwrap()
    }

    /// Waits until the client blocks on the catalog's current index: the stand-in's last
    /// health query carries the index it answers with now (`?index=N&…`), so the next change
    /// wakes that query. A real agent does not show its held queries: there this pauses
    /// 300 ms instead, the one fixed wait left in the harness.
    pub async fn wait_blocked(&self) {
        if self.lane == Lane::RealConsul {
            tokio::time::sleep(Duration::from_millis(300)).await;
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = self.stats().await;
            let blocked = st["last_health_query"]
                .as_str()
                .is_some_and(|q| q.contains(&format!("index={}&", st["index"])));
            if blocked {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no query blocked on index {} within 10 s: {st}",
                st["index"]
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stand-in only: how many `/v1/health/` requests it has answered or refused.
    pub async fn health_requests(&self) -> u64 {
        self.stats().await["health_requests"].as_u64().unwrap()
    }

    /// The health requests served so far where they are counted (the stand-in), else 0: the
    /// start of a count that [`Registry::assert_served_as_sent`] ends.
    pub async fn health_requests_counted(&self) -> u64 {
        match self.lane {
            Lane::Standin => self.health_requests().await,
            Lane::RealConsul => 0,
        }
    }

    /// Where requests are counted (the stand-in), asserts that it served `sent` (give or take
    /// one in flight) since it had served `before`; `who` names the client that logged them.
    pub async fn assert_served_as_sent(&self, before: u64, sent: usize, who: &str) {
        if self.lane == Lane::Standin {
            let at_server = self.health_requests().await - before;
            assert!(
                at_server.abs_diff(sent as u64) <= 1,
                "the stand-in saw {at_server}, {who} logged {sent}"
            );
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An agent registration body for service [`SERVICE`].
pub fn instance(id: &str, address: &str, port: u16, tags: &[&str], meta: Value) -> Value {
    json!({"Name": SERVICE, "ID": id, "Address": address, "Port": port, "Tags": tags, "Meta": meta})
}

/// A registration of `replica` as instance `id`, at the replica's own address, with `meta`.
pub fn replica_instance(id: &str, replica: &Replica, meta: Value) -> Value {
    let (host, _) = replica.addr.rsplit_once(':').unwrap();
    instance(id, host, replica.port(), &[], meta)
}
