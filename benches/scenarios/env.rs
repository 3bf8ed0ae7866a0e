//! What every scenario shares: the plan (sizes and durations, full or quick), the work
//! directory, the binaries, the registries, and the configs of nginx, upstreamd and the peers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::procs::{self, Bins, Consul, Etcd, Naive, Nginx, Replica, Upstreamd};

/// Sizes and durations of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub quick: bool,
    /// Client requests per second through nginx (`GET /`), in every scenario with load.
    pub rate: f64,
    /// Virtual users (affinity cookies) the load is spread over.
    pub users: usize,
    /// A user gives up on a request after this long.
    pub client_timeout_s: f64,
    /// Fail scenarios: steady load before the event, the event window after it, and the
    /// recovery window after the victim is healthy again.
    pub fail_before_s: f64,
    pub fail_window_s: f64,
    pub recover_window_s: f64,
    /// The `sick:<ms>` delay.
    pub sick_ms: u64,
    /// Discovery trials per upstreamd source, and for the naive reloader.
    pub discovery_trials: usize,
    pub discovery_trials_naive: usize,
    /// Churn: how long the flapping replica flaps.
    pub flap_s: f64,
    /// Streams: concurrent chats, tokens per answer and the delay before each token, open tabs.
    pub chats: usize,
    pub tokens: u32,
    pub token_delay_ms: u64,
    pub tabs: usize,
    /// Scale: endpoint counts, warm-up and measurement window.
    pub scale: Vec<usize>,
    pub scale_warmup_s: f64,
    pub scale_window_s: f64,
    /// Runs of the render+diff timing.
    pub render_runs: usize,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                rate: 100.0,
                users: 60,
                client_timeout_s: 2.0,
                fail_before_s: 1.0,
                fail_window_s: 4.0,
                recover_window_s: 4.0,
                sick_ms: 800,
                discovery_trials: 5,
                discovery_trials_naive: 3,
                flap_s: 4.0,
                chats: 6,
                tokens: 40,
                token_delay_ms: 100,
                tabs: 2,
                scale: vec![1_000],
                scale_warmup_s: 2.0,
                scale_window_s: 4.0,
                render_runs: 5,
            }
        } else {
            Self {
                quick,
                rate: 200.0,
                users: 120,
                client_timeout_s: 2.0,
                fail_before_s: 3.0,
                fail_window_s: 15.0,
                recover_window_s: 12.0,
                sick_ms: 800,
                discovery_trials: 50,
                discovery_trials_naive: 15,
                flap_s: 10.0,
                chats: 12,
                tokens: 80,
                token_delay_ms: 100,
                tabs: 2,
                scale: vec![1_000, 2_000, 5_000, 10_000],
                scale_warmup_s: 15.0,
                scale_window_s: 20.0,
                render_runs: 51,
            }
        }
    }
}

/// The health check every upstreamd of the benchmark uses (and reports).
pub const HEALTH: Health = Health {
    interval: "1s",
    timeout: "500ms",
    rise: 2,
    fall: 2,
};

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Health {
    pub interval: &'static str,
    pub timeout: &'static str,
    pub rise: u32,
    pub fall: u32,
}

/// The fast re-probe of the tuned peers: upstreamd's `fast_interval`, HAProxy's `fastinter`.
pub const FAST_INTERVAL: &str = "200ms";

/// The replicas' port (below the ephemeral range, so nothing else takes it by chance).
pub const REPLICA_PORT: u16 = 17_860;

/// How the naive reloader is run.
pub const NAIVE_INTERVAL: &str = "2";

/// Shared state of a run.
pub struct Env {
    pub plan: Plan,
    pub bins: Bins,
    pub root: PathBuf,
    pub logs: PathBuf,
    etcd: Option<Etcd>,
    consul: Option<Consul>,
    seq: usize,
}

impl Env {
    pub fn new(plan: Plan, bins: Bins, root: &Path) -> Result<Self> {
        let logs = root.join("logs");
        std::fs::create_dir_all(&logs)?;
        Ok(Self {
            plan,
            bins,
            root: root.to_owned(),
            logs,
            etcd: None,
            consul: None,
            seq: 0,
        })
    }

    /// A fresh directory for one stack.
    pub fn dir(&mut self, what: &str) -> Result<PathBuf> {
        self.seq += 1;
        let dir = self.root.join(format!("{:02}-{what}", self.seq));
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// The shared etcd, started on first use.
    pub async fn etcd(&mut self) -> Result<&Etcd> {
        if self.etcd.is_none() {
            self.etcd = Some(Etcd::start(&self.root, &self.logs).await?);
        }
        Ok(self.etcd.as_ref().expect("just started"))
    }

    /// The shared Consul stand-in, started on first use.
    pub async fn consul(&mut self) -> Result<&Consul> {
        if self.consul.is_none() {
            self.consul = Some(Consul::start(&self.bins, &self.logs).await?);
        }
        Ok(self.consul.as_ref().expect("just started"))
    }

    /// Starts replicas named `prefix1…prefixN` on 127.0.0.(first_ip…):17860.
    pub async fn replicas(
        &mut self,
        prefix: &str,
        n: usize,
        first_ip: u8,
        extra: &[&str],
    ) -> Result<Vec<Replica>> {
        let dir = self.dir(&format!("replicas-{prefix}"))?;
        let mut out = Vec::new();
        for i in 0..n {
            let ip = format!("127.0.0.{}", first_ip as usize + i);
            let name = format!("{prefix}{}", i + 1);
            out.push(
                Replica::start(
                    &self.bins,
                    &name,
                    &ip,
                    REPLICA_PORT,
                    extra,
                    &dir,
                    &self.logs,
                )
                .await?,
            );
        }
        Ok(out)
    }
}

/// How nginx picks a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// The Kotaemon setup: cookie-or-address consistent hash.
    Sticky,
    RoundRobin,
}

impl Balance {
    pub fn word(self) -> &'static str {
        match self {
            Balance::Sticky => "sticky",
            Balance::RoundRobin => "round_robin",
        }
    }
}

/// The front nginx's main config: the Kotaemon site of `examples/nginx/kotaemon-site.conf`
/// on `port`, the include upstreamd owns, a per-request access log, reloads logged.
pub fn front_conf(
    port: u16,
    balance: Balance,
    workers: usize,
    nofile: Option<u64>,
) -> Result<(String, String)> {
    let example = include_str!("../../examples/nginx/kotaemon-site.conf");
    let mut site = example.replace(
        "listen 127.0.0.1:8080;",
        &format!("listen 127.0.0.1:{port};"),
    );
    if !site.contains(&format!("127.0.0.1:{port}")) {
        anyhow::bail!("examples/nginx/kotaemon-site.conf no longer listens on 127.0.0.1:8080");
    }
    if balance != Balance::Sticky {
        site = site
            .replace("http://$kotaemon_affinity_route;", "http://kotaemon;")
            .lines()
            .filter(|l| !l.contains("$kotaemon_affinity_cookie"))
            .collect::<Vec<_>>()
            .join("\n");
    }
    let user = if procs::is_root() { "user root;" } else { "" };
    let rlimit = nofile
        .map(|n| format!("worker_rlimit_nofile {n};"))
        .unwrap_or_default();
    let connections = nofile.map(|n| n / 2).unwrap_or(4096);
    let conf = format!(
        "{user}\nworker_processes {workers};\n{rlimit}\npid logs/nginx.pid;\nerror_log logs/error.log notice;\n\
         events {{ worker_connections {connections}; }}\n\
         http {{\n  {fmt}\n  access_log logs/access.log bench;\n\
         client_body_temp_path tmp/client;\n  proxy_temp_path tmp/proxy;\n  fastcgi_temp_path tmp/fastcgi;\n  \
         uwsgi_temp_path tmp/uwsgi;\n  scgi_temp_path tmp/scgi;\n  include upstreams.conf;\n  include site.conf;\n}}\n",
        fmt = crate::stats::ACCESS_LOG_FORMAT,
    );
    Ok((conf, site))
}

/// The include before anyone renders it: one `down` placeholder, and the variables the
/// sticky site's `proxy_pass` and `add_header` need.
pub fn placeholder(balance: Balance) -> String {
    let mut text = "upstream kotaemon { server 127.0.0.1:1 down; }\n".to_owned();
    if balance == Balance::Sticky {
        text.push_str("map $uri $kotaemon_affinity_route { default kotaemon; }\n");
        text.push_str("map $uri $kotaemon_affinity_cookie { default \"\"; }\n");
    }
    text
}

/// The file "nginx alone" runs with: every replica, nginx's passive checks spelled out
/// (`max_fails=1 fail_timeout=10s`, nginx's defaults), in upstreamd's own layout.
pub fn static_upstream(balance: Balance, addrs: &[String]) -> String {
    let mut text = String::new();
    if balance == Balance::Sticky {
        // nginx alone has no replica ids: every id-less request takes the consistent hash.
        text.push_str(
            "map $uri $kotaemon_affinity_route {\n    default kotaemon;\n}\n\
             map $cookie_kh_affinity $kotaemon_affinity_key {\n    \"\"      $remote_addr;\n    default $cookie_kh_affinity;\n}\n\
             map $cookie_kh_affinity $kotaemon_affinity_cookie {\n    \"\"      \"kh_affinity=$request_id; Path=/; HttpOnly; SameSite=Lax\";\n    default \"\";\n}\n",
        );
    }
    text.push_str("upstream kotaemon {\n    zone kotaemon 64k;\n");
    if balance == Balance::Sticky {
        text.push_str("    hash $kotaemon_affinity_key consistent;\n");
    }
    for a in addrs {
        text.push_str(&format!("    server {a} max_fails=1 fail_timeout=10s;\n"));
    }
    text.push_str("    keepalive 32;\n}\n");
    text
}

/// Where upstreamd's endpoints come from.
pub enum Source<'a> {
    /// Static servers with nginx's passive-check attributes spelled out.
    Static(&'a [String]),
    Etcd {
        url: &'a str,
        prefix: &'a str,
    },
    Consul {
        url: &'a str,
        service: &'a str,
    },
}

/// upstreamd's config for `nginx`. The shrink guard is off: the discovery trials remove their
/// spare replicas together on purpose, which the guard would hold for 30 s (it has its own
/// tests in `tests/it/registries.rs`). `fast` adds the re-probe in doubt ([`FAST_INTERVAL`]) and
/// follows nginx's error log; without it `fast_interval` equals `interval`, which is how
/// upstreamd probed before it had one (the earlier benchmarks' settings).
pub fn upstreamd_toml(
    nginx: &Nginx,
    admin: &str,
    balance: Balance,
    settle: &str,
    min_reload_interval: &str,
    source: &Source<'_>,
    fast: bool,
) -> String {
    let test = nginx
        .test_command()
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let source = match source {
        Source::Static(addrs) => format!(
            "kind = \"static\"\nservers = [\n{}]\n",
            addrs
                .iter()
                .map(|a| format!(
                    "  {{ address = \"{a}\", max_fails = 1, fail_timeout = \"10s\" }},\n"
                ))
                .collect::<String>()
        ),
        Source::Etcd { url, prefix } => {
            format!("kind = \"etcd\"\nendpoints = [\"{url}\"]\nprefix = \"{prefix}\"\n")
        }
        Source::Consul { url, service } => {
            format!("kind = \"consul\"\nurl = \"{url}\"\nservice = \"{service}\"\nwait = \"60s\"\n")
        }
    };
    let affinity = if balance == Balance::Sticky {
        "affinity_cookie = \"kh_affinity\"\n"
    } else {
        ""
    };
    let (fast_interval, error_log) = if fast {
        (
            FAST_INTERVAL,
            format!("error_log = \"{}\"\n", nginx.error_log_path().display()),
        )
    } else {
        (HEALTH.interval, String::new())
    };
    format!(
        "[nginx]\noutput = \"{output}\"\npid_file = \"{pid}\"\ntest_command = [{test}]\n\
         settle = \"{settle}\"\nmin_reload_interval = \"{min_reload_interval}\"\n{error_log}\n\
         [admin]\nlisten = \"{admin}\"\n\n\
         [[upstream]]\nname = \"kotaemon\"\nbalance = \"{balance}\"\n{affinity}\
         shrink_hold = \"0s\"\n\n\
         [upstream.health]\npath = \"/queue/status\"\nexpect_body = '\"msg\":\"estimation\"'\n\
         interval = \"{interval}\"\nfast_interval = \"{fast_interval}\"\ntimeout = \"{timeout}\"\n\
         rise = {rise}\nfall = {fall}\n\n\
         [[upstream.source]]\n{source}",
        output = nginx.output().display(),
        pid = nginx.pid_file().display(),
        balance = balance.word(),
        interval = HEALTH.interval,
        timeout = HEALTH.timeout,
        rise = HEALTH.rise,
        fall = HEALTH.fall,
    )
}

/// The main-context lines that load Debian's Lua module (`libnginx-mod-http-lua`).
pub const LUA_MODULES: &str = "load_module /usr/lib/nginx/modules/ndk_http_module.so;\n\
     load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;";

/// Who keeps the upstream file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Peer {
    /// upstreamd as the earlier benchmarks ran it: `fast_interval = interval`, no error log.
    Upstreamd,
    /// upstreamd with its detection tuning: `fast_interval` [`FAST_INTERVAL`], following
    /// nginx's error log.
    UpstreamdFast,
    /// nginx alone with its passive checks, the file written once.
    Passive,
    /// upstreamd with `apply = "lua"`: membership pushed to nginx's Lua balancer, no reload
    /// (nginx loads Debian's Lua module).
    UpstreamdLua,
    /// The naive reloader script.
    Naive,
    /// HAProxy in nginx's place, with upstreamd's probe settings.
    Haproxy,
    /// HAProxy with its best detection tuning: `fastinter`, `observe layer7`,
    /// `on-error mark-down`.
    HaproxyTuned,
}

impl Peer {
    pub fn label(self) -> &'static str {
        match self {
            Peer::Upstreamd => "upstreamd",
            Peer::UpstreamdFast => "upstreamd, fast_interval 200ms + error log",
            Peer::Passive => "nginx alone (passive)",
            Peer::UpstreamdLua => "upstreamd, apply = lua",
            Peer::Naive => "naive reloader",
            Peer::Haproxy => "HAProxy 2.6",
            Peer::HaproxyTuned => "HAProxy 2.6 tuned",
        }
    }

    /// Whether HAProxy, not nginx, is the front.
    pub fn is_haproxy(self) -> bool {
        matches!(self, Peer::Haproxy | Peer::HaproxyTuned)
    }
}

/// A front nginx and whoever keeps its upstream file.
pub struct Stack {
    pub nginx: Nginx,
    pub upstreamd: Option<Upstreamd>,
    pub naive: Option<Naive>,
}

/// Four replicas, the first three registered under an etcd prefix of their own, and a stack
/// (front nginx and `peer`) following that prefix with a sticky balance, settle 250 ms and
/// min_reload_interval 2 s; the fourth is the spare a scenario registers itself. Returns
/// once nginx serves from the three and the first reload's old workers had 2 s to leave.
pub struct EtcdStack {
    /// The three registered replicas, then the spare.
    pub replicas: Vec<Replica>,
    /// A client of the scenario's etcd.
    pub etcd: etcd_client::Client,
    /// The key prefix, ending in `/`.
    pub prefix: String,
    /// The front nginx and its peer.
    pub stack: Stack,
}

impl EtcdStack {
    /// [`EtcdStack::start`] with replicas that stream the plan's long answers (`--tokens`,
    /// `--token-delay`), as the stream and churn scenarios need.
    pub async fn streaming(env: &mut Env, what: &str, name: &str, peer: Peer) -> Result<Self> {
        let tokens = env.plan.tokens.to_string();
        let delay = format!("{}ms", env.plan.token_delay_ms);
        let extra = ["--tokens", tokens.as_str(), "--token-delay", delay.as_str()];
        Self::start(env, what, name, peer, &extra).await
    }

    /// Starts it for scenario `what`, naming the replicas `{name}1…{name}4`; `extra` goes to
    /// every replica's command line.
    pub async fn start(
        env: &mut Env,
        what: &str,
        name: &str,
        peer: Peer,
        extra: &[&str],
    ) -> Result<Self> {
        let replicas = env.replicas(name, 4, 2, extra).await?;
        let names: Vec<String> = replicas[..3].iter().map(|r| r.name.clone()).collect();
        let url = env.etcd().await?.url.clone();
        let prefix = format!("/bench/{what}-{peer:?}/").to_lowercase();
        let mut etcd = etcd_client::Client::connect([url.as_str()], None).await?;
        for r in &replicas[..3] {
            etcd.put(format!("{prefix}{}", r.name), r.addr.as_str(), None)
                .await?;
        }
        let (source, members) = (
            Source::Etcd {
                url: &url,
                prefix: &prefix,
            },
            Members::Etcd {
                url: &url,
                prefix: &prefix,
            },
        );
        let stack = Stack::start(
            env,
            what,
            peer,
            Balance::Sticky,
            &[],
            &source,
            &members,
            "250ms",
            "2s",
            &names,
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok(Self {
            replicas,
            etcd,
            prefix,
            stack,
        })
    }
}

/// Members of the naive reloader.
pub enum Members<'a> {
    /// A file listing host:port lines.
    File(&'a Path),
    /// An etcd prefix whose values are host:port.
    Etcd { url: &'a str, prefix: &'a str },
}

impl Stack {
    /// Starts the front nginx and the peer; returns once nginx serves from `expect` (replica
    /// names) or fails.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        env: &mut Env,
        what: &str,
        peer: Peer,
        balance: Balance,
        static_addrs: &[String],
        source: &Source<'_>,
        members: &Members<'_>,
        settle: &str,
        min_reload_interval: &str,
        expect: &[String],
    ) -> Result<Self> {
        let dir = env.dir(&format!("{what}-{peer:?}").to_lowercase())?;
        let port = procs::free_port("127.0.0.1")?;
        let (mut conf, site) = front_conf(port, balance, 2, None)?;
        if peer == Peer::UpstreamdLua {
            conf = format!("{LUA_MODULES}\n{conf}");
        }
        std::fs::create_dir_all(dir.join("conf"))?;
        std::fs::write(dir.join("conf/site.conf"), site)?;
        if peer.is_haproxy() {
            anyhow::bail!("HAProxy is its own front: see `haproxy::Haproxy`");
        }
        let initial = match peer {
            Peer::Passive => static_upstream(balance, static_addrs),
            _ => placeholder(balance),
        };
        let nginx = Nginx::start(
            &format!("nginx-{what}-{peer:?}").to_lowercase(),
            &dir,
            port,
            &conf,
            &initial,
            &env.logs,
        )
        .await?;
        let mut stack = Self {
            nginx,
            upstreamd: None,
            naive: None,
        };
        match peer {
            Peer::Passive | Peer::Haproxy | Peer::HaproxyTuned => {}
            Peer::Upstreamd | Peer::UpstreamdFast | Peer::UpstreamdLua => {
                let admin = format!("127.0.0.1:{}", procs::free_port("127.0.0.1")?);
                let mut toml = upstreamd_toml(
                    &stack.nginx,
                    &admin,
                    balance,
                    settle,
                    min_reload_interval,
                    source,
                    peer == Peer::UpstreamdFast,
                );
                if peer == Peer::UpstreamdLua {
                    let lua = format!(
                        "[nginx]\napply = \"lua\"\nlua_listen = \"127.0.0.1:{}\"\nlua_secret_file = \"{}\"\n",
                        procs::free_port("127.0.0.1")?,
                        dir.join("lua.secret").display()
                    );
                    toml = toml.replacen("[nginx]\n", &lua, 1);
                }
                let mut u = Upstreamd::start(
                    &env.bins,
                    &format!("upstreamd-{what}-{peer:?}").to_lowercase(),
                    &toml,
                    &admin,
                    &dir,
                    &env.logs,
                )?;
                u.wait_ready(Duration::from_secs(30)).await?;
                stack.upstreamd = Some(u);
            }
            Peer::Naive => {
                let cmd: Vec<String> = match members {
                    Members::File(path) => vec!["cat".into(), path.display().to_string()],
                    Members::Etcd { url, prefix } => vec![
                        "etcdctl".into(),
                        format!("--endpoints={url}"),
                        "get".into(),
                        "--prefix".into(),
                        (*prefix).to_owned(),
                        "--print-value-only".into(),
                    ],
                };
                stack.naive = Some(Naive::start(
                    &env.bins,
                    &stack.nginx,
                    NAIVE_INTERVAL,
                    balance.word(),
                    &cmd,
                    &env.logs,
                )?);
            }
        }
        stack.wait_serving(expect, Duration::from_secs(30)).await?;
        Ok(stack)
    }

    /// Waits until requests through nginx (with varied cookies) have been answered by every
    /// replica in `names`.
    pub async fn wait_serving(&mut self, names: &[String], within: Duration) -> Result<()> {
        let addr = format!("127.0.0.1:{}", self.nginx.port);
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = std::collections::BTreeSet::new();
        let mut k = 0u64;
        while names.iter().any(|n| !seen.contains(n)) {
            if tokio::time::Instant::now() > deadline {
                let mut why = format!("nginx never served {names:?} (saw {seen:?})");
                if let Some(u) = &self.upstreamd {
                    why.push_str(&format!("\nupstreamd:\n{}", u.tail(30)));
                }
                if let Some(n) = &self.naive {
                    why.push_str(&format!("\nnaive reloader:\n{}", n.tail(30)));
                }
                why.push_str(&format!(
                    "\nfile:\n{}",
                    std::fs::read_to_string(self.nginx.output()).unwrap_or_default()
                ));
                anyhow::bail!(why);
            }
            k += 1;
            if let Some(name) = crate::client::served_by(&addr, k).await {
                seen.insert(name);
            }
        }
        Ok(())
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.nginx.port)
    }

    /// Checks the peer is still alive (a crashed daemon would make every figure meaningless).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(u) = &mut self.upstreamd {
            if !u.running() {
                anyhow::bail!("upstreamd exited during the scenario:\n{}", u.tail(30));
            }
        }
        if let Some(n) = &mut self.naive {
            if !n.running() {
                anyhow::bail!(
                    "the naive reloader exited during the scenario:\n{}",
                    n.tail(30)
                );
            }
        }
        Ok(())
    }
}

/// Writes a members file for the naive reloader.
pub fn members_file(dir: &Path, addrs: &[String]) -> Result<PathBuf> {
    let path = dir.join("members.txt");
    std::fs::write(&path, addrs.join("\n") + "\n")
        .with_context(|| format!("failed to write `{}`", path.display()))?;
    Ok(path)
}
