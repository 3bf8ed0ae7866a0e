//! A private etcd 3.4 for tests: free loopback ports, its own data dir (kept across a kill
//! and restart), optionally TLS with client certificates; killed and reaped in `Drop`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};
use upstreamd::config::EtcdSource;

/// Server and client certificates for a TLS etcd, made with the `openssl` command.
pub struct Certs {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// A private etcd: free loopback ports, its own data dir, killed and reaped on drop. On a
/// panicking test, drop prints the command and the tail of etcd's log.
pub struct Etcd {
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// Set for a TLS etcd (`start_tls`).
    pub certs: Option<Certs>,
    /// `root`'s password once `enable_auth` turned auth on: the test client logs in with it.
    root_password: Option<String>,
    child: Option<Child>,
}

fn free_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port")
}

impl Etcd {
    /// Starts a plain-HTTP etcd and waits until it is healthy.
    pub async fn start() -> Self {
        Self::start_with(false).await
    }

    /// Starts an etcd serving TLS with client-certificate auth (certificates made here).
    pub async fn start_tls() -> Self {
        Self::start_with(true).await
    }

    async fn start_with(tls: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        // Both listeners are held until both ports are known, so they differ.
        let (a, b) = (free_listener(), free_listener());
        let (client_port, peer_port) = (
            a.local_addr().unwrap().port(),
            b.local_addr().unwrap().port(),
        );
        drop((a, b));
        let certs = tls.then(|| make_certs(dir.path()));
        let mut etcd = Self {
            dir,
            client_port,
            peer_port,
            certs,
            root_password: None,
            child: None,
        };
        etcd.spawn().await;
        etcd
    }

    /// The client URL.
    pub fn url(&self) -> String {
        let scheme = if self.certs.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn command(&self) -> Command {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.arg("--name=default")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={}", self.url()))
            .arg(format!("--advertise-client-urls={}", self.url()))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=default={peer}"));
        if let Some(c) = &self.certs {
            cmd.arg(format!("--trusted-ca-file={}", c.ca.display()))
                .arg(format!("--cert-file={}", c.server_cert.display()))
                .arg(format!("--key-file={}", c.server_key.display()))
                .arg("--client-cert-auth");
        }
        cmd
    }

    /// Starts etcd (again, on the same ports and data dir) and waits until it is healthy.
    pub async fn spawn(&mut self) {
        self.spawn_unchecked();
        self.wait_healthy(Duration::from_secs(15)).await;
    }

    /// Starts etcd without waiting for it.
    pub fn spawn_unchecked(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = self
            .command()
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("etcd is installed (apt-get install etcd-server)");
        self.child = Some(child);
    }

    /// Polls `etcdctl endpoint health` until it succeeds; panics (with the log) after `within`.
    pub async fn wait_healthy(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let mut cmd = tokio::process::Command::new("etcdctl");
            cmd.env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={}", self.url()))
                .args([
                    "--dial-timeout=500ms",
                    "--command-timeout=1s",
                    "endpoint",
                    "health",
                ]);
            if let Some(c) = &self.certs {
                cmd.arg(format!("--cacert={}", c.ca.display()))
                    .arg(format!("--cert={}", c.client_cert.display()))
                    .arg(format!("--key={}", c.client_key.display()));
            }
            let out = cmd.output().await.expect("etcdctl is installed");
            if out.status.success() {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "etcd exited with {status} before it was healthy\n{}",
                    self.report()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "etcd not healthy within {within:?}: {}\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    self.report()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // An error here means it already exited; `wait` below reaps it either way.
            let _already_gone = child.kill();
            child.wait().expect("reap etcd");
        }
    }

    /// The command and the tail of the log, for failure messages.
    pub fn report(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(25).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "command: {:?}\netcd log (last lines):\n{}",
            self.command(),
            tail.join("\n")
        )
    }

    /// A plain client (the test's own writes).
    pub async fn client(&self) -> Client {
        let opts = match &self.certs {
            Some(c) => ConnectOptions::new().with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(
                        std::fs::read(&c.ca).unwrap(),
                    ))
                    .identity(etcd_client::Identity::from_pem(
                        std::fs::read(&c.client_cert).unwrap(),
                        std::fs::read(&c.client_key).unwrap(),
                    )),
            ),
            None => ConnectOptions::new(),
        };
        let opts = match &self.root_password {
            Some(pw) => opts.with_user("root", pw),
            None => opts,
        };
        Client::connect([self.url()], Some(opts))
            .await
            .expect("connect the test client")
    }

    /// Turns auth on: user `root` (password `root_password`, role `root`), and `user`
    /// (password `user_password`) who may only read keys under `prefix`. The test client
    /// (`client`) logs in as root from then on.
    pub async fn enable_auth(
        &mut self,
        root_password: &str,
        user: &str,
        user_password: &str,
        prefix: &str,
    ) {
        fn step<T>(what: &str, r: Result<T, etcd_client::Error>) {
            if let Err(e) = r {
                panic!("etcd auth setup, {what}: {e}");
            }
        }
        let mut c = self.client().await;
        step("add root", c.user_add("root", root_password, None).await);
        step(
            "grant root the root role",
            c.user_grant_role("root", "root").await,
        );
        step("add role reader", c.role_add("reader").await);
        let read = etcd_client::Permission::read(prefix).with_prefix();
        step(
            "let reader read the prefix",
            c.role_grant_permission("reader", read).await,
        );
        step("add the user", c.user_add(user, user_password, None).await);
        step(
            "grant the user reader",
            c.user_grant_role(user, "reader").await,
        );
        step("enable auth", c.auth_enable().await);
        self.root_password = Some(root_password.to_owned());
    }

    /// The source's config for `prefix`, with short timeouts.
    pub fn source(&self, prefix: &str) -> EtcdSource {
        EtcdSource {
            endpoints: vec![self.url()],
            prefix: prefix.into(),
            username: None,
            password: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.report());
        }
        self.kill();
    }
}

fn make_certs(dir: &Path) -> Certs {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=upstreamd test CA",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, subject) in [("server", "/CN=localhost"), ("client", "/CN=upstreamd")] {
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        openssl(
            &[
                &["req"][..],
                &ec,
                &["-keyout", &key, "-out", &csr, "-subj", subject],
            ]
            .concat(),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
    }
    Certs {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    }
}
