//! Scenario 6: affinity across membership changes, `hash` against `sticky`, side by side.
//!
//! For each mode: four replicas (three registered under an etcd prefix), upstreamd, a front
//! nginx running the Kotaemon site, and simulated users holding sessions
//! (`tests/it/util/sessions.rs`: cookie jar, `GET /`, `POST /queue/join`, SSE
//! `GET /queue/data`). Chats are split around each change (join, change applied, stream) as a
//! reload splits chats in flight. Events: a replica added; the replica just added removed
//! (idle under `sticky`); a replica restarting (down, then up on the same address); a replica
//! killed while answers stream, then the next chats. Counted per event: users answered by a
//! replica other than their own, and failed chats, apart from users whose own replica went
//! away. `hash` is `balance = "hash"` on the cookie with the cookie issued by the site (the
//! old `sticky`); `sticky` names the replica. Also: `nginx -t` on 1,000 replicas in each mode.

// The integration tests' module: they use all of it, this scenario only part.
#[allow(dead_code)]
#[path = "../../tests/it/util/sessions.rs"]
mod sessions;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::env::{front_conf, Balance, Env};
use crate::procs::{self, Nginx, Replica, Upstreamd};
use sessions::{Tally, Users};

/// The two modes compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// `balance = "hash"` on the affinity cookie (what `sticky` rendered before).
    Hash,
    /// `balance = "sticky"`: the cookie names the replica.
    Sticky,
}

impl Mode {
    pub fn word(self) -> &'static str {
        match self {
            Mode::Hash => "hash",
            Mode::Sticky => "sticky",
        }
    }
}

/// One event's count.
#[derive(Debug, Clone, Serialize)]
pub struct EventCount {
    pub event: String,
    pub chats: usize,
    /// Users answered elsewhere whose own replica is still there.
    pub moved: usize,
    /// Users answered elsewhere because their own replica went away.
    pub moved_excused: usize,
    pub failed: usize,
    pub failed_excused: usize,
    /// nginx reloads during the event (one for each change; more means a probe flapped).
    pub reloads: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct AffinityResult {
    pub mode: Mode,
    pub users: usize,
    pub events: Vec<EventCount>,
}

/// `nginx -t` on one upstream of 1,000 replicas, medians in ms.
#[derive(Debug, Clone, Serialize)]
pub struct TestCost {
    pub replicas: usize,
    pub runs: usize,
    pub hash_ms: f64,
    pub sticky_ms: f64,
    pub hash_bytes: usize,
    pub sticky_bytes: usize,
}

const PREFIX_ROOT: &str = "/bench/affinity-";
/// The maps a `hash` site adds itself: the cookie issued once, the key, no replica routes.
const HASH_SITE_MAPS: &str = "map $uri $kotaemon_affinity_route { default kotaemon; }\n\
     map $cookie_kh_affinity $kotaemon_affinity_key {\n    \"\"      $remote_addr;\n    default $cookie_kh_affinity;\n}\n\
     map $cookie_kh_affinity $kotaemon_affinity_cookie {\n    \"\"      \"kh_affinity=$request_id; Path=/; HttpOnly; SameSite=Lax\";\n    default \"\";\n}\n";

struct Front {
    nginx: Nginx,
    upstreamd: Upstreamd,
    /// nginx's workers on the bootstrap include, before upstreamd's first file.
    bootstrap_workers: BTreeSet<i32>,
}

impl Front {
    fn rendered(&self) -> String {
        std::fs::read_to_string(self.nginx.output()).unwrap_or_default()
    }

    /// Every worker of `old` is gone or shutting down (it no longer accepts connections).
    fn old_generation_leaving(&self, old: &BTreeSet<i32>) -> bool {
        let Some(master) = self.nginx.master() else {
            return false;
        };
        procs::children(master)
            .iter()
            .all(|(pid, cmdline)| !old.contains(pid) || cmdline.contains("shutting down"))
    }

    /// Waits until `ok(file)`, a reload after `reloads`, and the old workers leaving.
    async fn applied(
        &mut self,
        reloads: usize,
        old: &BTreeSet<i32>,
        ok: impl Fn(&str) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(ok(&self.rendered())
            && self.nginx.reloads() > reloads
            && self.old_generation_leaving(old))
        {
            if Instant::now() > deadline {
                bail!(
                    "the change never applied:\n{}\nupstreamd:\n{}",
                    self.rendered(),
                    self.upstreamd.tail(30)
                );
            }
            if !self.upstreamd.running() {
                bail!("upstreamd exited:\n{}", self.upstreamd.tail(30));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

async fn front(env: &mut Env, mode: Mode, prefix: &str, secret: &std::path::Path) -> Result<Front> {
    let dir = env.dir(&format!("affinity-{}", mode.word()))?;
    let port = procs::free_port("127.0.0.1")?;
    let (conf, mut site) = front_conf(port, Balance::Sticky, 1, None)?;
    let initial = match mode {
        Mode::Sticky => crate::env::placeholder(Balance::Sticky),
        Mode::Hash => {
            site = format!("{HASH_SITE_MAPS}{site}");
            "upstream kotaemon { server 127.0.0.1:1 down; }\n".to_owned()
        }
    };
    std::fs::create_dir_all(dir.join("conf"))?;
    std::fs::write(dir.join("conf/site.conf"), site)?;
    let nginx = Nginx::start(
        &format!("nginx-affinity-{}", mode.word()),
        &dir,
        port,
        &conf,
        &initial,
        &env.logs,
    )
    .await?;
    let bootstrap_workers = nginx.worker_pids();
    let admin = format!("127.0.0.1:{}", procs::free_port("127.0.0.1")?);
    let test = nginx
        .test_command()
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let balance = match mode {
        Mode::Hash => "balance = \"hash\"\nhash_key = \"$kotaemon_affinity_key\"\n".to_owned(),
        Mode::Sticky => format!(
            "balance = \"sticky\"\naffinity_cookie = \"kh_affinity\"\naffinity_secret_file = \"{}\"\n",
            secret.display()
        ),
    };
    let h = crate::env::HEALTH;
    let etcd = env.etcd().await?.url.clone();
    let toml = format!(
        "[nginx]\noutput = \"{}\"\npid_file = \"{}\"\ntest_command = [{test}]\n\
         settle = \"250ms\"\nmin_reload_interval = \"1s\"\n\n[admin]\nlisten = \"{admin}\"\n\n\
         [[upstream]]\nname = \"kotaemon\"\n{balance}\n\
         [upstream.health]\npath = \"/queue/status\"\ninterval = \"{}\"\ntimeout = \"{}\"\nrise = {}\nfall = {}\n\n\
         [[upstream.source]]\nkind = \"etcd\"\nendpoints = [\"{etcd}\"]\nprefix = \"{prefix}\"\n",
        nginx.output().display(),
        nginx.pid_file().display(),
        h.interval,
        h.timeout,
        h.rise,
        h.fall,
    );
    let mut upstreamd = Upstreamd::start(
        &env.bins,
        &format!("upstreamd-affinity-{}", mode.word()),
        &toml,
        &admin,
        &dir,
        &env.logs,
    )?;
    upstreamd.wait_ready(Duration::from_secs(30)).await?;
    Ok(Front {
        nginx,
        upstreamd,
        bootstrap_workers,
    })
}

fn count(event: &str, t: Tally, reloads: usize) -> EventCount {
    EventCount {
        event: event.to_owned(),
        chats: t.chats,
        moved: t.moved,
        moved_excused: t.moved_excused,
        failed: t.failed,
        failed_excused: t.failed_excused,
        reloads,
    }
}

fn gone(name: &str) -> BTreeSet<String> {
    BTreeSet::from([name.to_owned()])
}

/// One mode through every event.
pub async fn run(env: &mut Env, mode: Mode) -> Result<AffinityResult> {
    let plan = env.plan.clone();
    let users_n = plan.users.min(120);
    let extra = ["--tokens", "20", "--token-delay", "50ms"];
    let mut replicas = env.replicas("a", 4, 2, &extra).await?;
    let prefix = format!("{PREFIX_ROOT}{}/", mode.word());
    let url = env.etcd().await?.url.clone();
    let mut etcd = etcd_client::Client::connect([url.as_str()], None).await?;
    for r in &replicas[..3] {
        etcd.put(format!("{prefix}{}", r.name), r.addr.as_str(), None)
            .await?;
    }
    let secret = env.dir("affinity-secret")?.join("affinity.secret");
    std::fs::write(&secret, "bench-affinity-secret-0123456789abcdef\n")?;
    let mut f = front(env, mode, &prefix, &secret).await?;
    let addrs: Vec<String> = replicas.iter().map(|r| r.addr.clone()).collect();
    let line = |a: &str, down: bool| {
        if down {
            format!("    server {a} down;\n")
        } else {
            format!("    server {a};\n")
        }
    };
    let (l0, l1, l2) = (
        line(&addrs[0], false),
        line(&addrs[1], false),
        line(&addrs[2], false),
    );
    let bootstrap = f.bootstrap_workers.clone();
    // Every user starts on upstreamd's file, none on a bootstrap worker that is leaving.
    f.applied(0, &bootstrap, |t| {
        t.contains(&l0) && t.contains(&l1) && t.contains(&l2)
    })
    .await?;
    let mut users = Users::new(&format!("http://127.0.0.1:{}", f.nginx.port), users_n);
    let none = BTreeSet::new();
    let mut events = Vec::new();
    users.chat_all(&none).await;
    let mut mark = f.nginx.reloads();
    let mut since = |f: &Front| {
        let now = f.nginx.reloads();
        std::mem::replace(&mut mark, now).abs_diff(now)
    };
    let t = users.chat_all(&none).await;
    events.push(count("quiet (cookies set)", t, since(&f)));

    // A replica is added, chats in flight.
    let spare = replicas[3].name.clone();
    users.join_all().await;
    let (r, w) = (f.nginx.reloads(), f.nginx.worker_pids());
    etcd.put(format!("{prefix}{spare}"), addrs[3].as_str(), None)
        .await?;
    let l3 = line(&addrs[3], false);
    f.applied(r, &w, |t| t.contains(&l3)).await?;
    let t = users.stream_all(&none, async {}).await;
    events.push(count("replica added", t, since(&f)));

    // The replica just added is removed, chats in flight.
    users.join_all().await;
    let (r, w) = (f.nginx.reloads(), f.nginx.worker_pids());
    etcd.delete(format!("{prefix}{spare}"), None).await?;
    f.applied(r, &w, |t| !t.contains(&addrs[3])).await?;
    let t = users.stream_all(&gone(&spare), async {}).await;
    events.push(count("added replica removed", t, since(&f)));

    // A replica restarts: killed, rendered down; chats; started again, chats in flight.
    let b = replicas[1].name.clone();
    let (r, w) = (f.nginx.reloads(), f.nginx.worker_pids());
    replicas[1].kill();
    let down = line(&addrs[1], true);
    f.applied(r, &w, |t| t.contains(&down)).await?;
    let t = users.chat_all(&gone(&b)).await;
    events.push(count("restart: down", t, since(&f)));
    users.join_all().await;
    let (r, w) = (f.nginx.reloads(), f.nginx.worker_pids());
    let dir = env.dir("affinity-restart")?;
    let (ip, port) = addrs[1].rsplit_once(':').context("an address")?;
    let port: u16 = port.parse()?;
    // The killed replica's socket may take a moment to go.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpListener::bind((ip, port)).is_err() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    replicas[1] = Replica::start(&env.bins, &b, ip, port, &extra, &dir, &env.logs).await?;
    if replicas[1].addr != addrs[1] {
        bail!("the restarted replica could not take its address back");
    }
    f.applied(r, &w, |t| t.contains(&l1)).await?;
    let t = users.stream_all(&none, async {}).await;
    events.push(count("restart: up", t, since(&f)));

    // A replica is killed while answers stream; then the next chats.
    let c = replicas[2].name.clone();
    users.join_all().await;
    let victim = &mut replicas[2];
    let killed = users
        .stream_all(&gone(&c), async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            victim.kill();
        })
        .await;
    events.push(count("killed: streaming", killed, since(&f)));
    let t = users.chat_all(&gone(&c)).await;
    events.push(count("killed: next chats", t, since(&f)));
    Ok(AffinityResult {
        mode,
        users: users_n,
        events,
    })
}

/// `nginx -t` on 1,000 replicas rendered by upstreamd in each mode (all up), median of `runs`.
pub fn test_cost(scratch: &std::path::Path, runs: usize) -> Result<TestCost> {
    let n = 1_000;
    let eps = crate::render_timing::endpoints(n);
    let renderer = upstreamd::render::Renderer::new(None)?;
    let mut times = Vec::new();
    let mut sizes = Vec::new();
    for (mode, balance) in [
        (
            Mode::Hash,
            "balance = \"hash\"\nhash_key = \"$kotaemon_affinity_key\"",
        ),
        (Mode::Sticky, "balance = \"sticky\""),
    ] {
        let text = format!(
            "[nginx]\noutput = \"/nonexistent\"\n[[upstream]]\nname = \"kotaemon\"\n{balance}\n\
             [[upstream.source]]\nkind = \"static\"\nservers = [\"127.0.0.1:1\"]\n"
        );
        let cfg = upstreamd::config::parse(&text, &|_| None)?
            .upstreams
            .remove(0);
        let d = upstreamd::decide::decide(&cfg, &eps, |_| upstreamd::health::Health::Up);
        let mut file = renderer.render(&[(d, cfg.on_all_unhealthy)])?;
        let (target, extra) = match mode {
            Mode::Hash => ("kotaemon", HASH_SITE_MAPS),
            Mode::Sticky => ("$kotaemon_affinity_route", ""),
        };
        file.push_str(extra);
        let dir = scratch.join(format!("nginx-t-{}", mode.word()));
        for d in ["conf", "logs"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        std::fs::write(dir.join("conf/upstreams.conf"), &file)?;
        std::fs::write(
            dir.join("conf/nginx.conf"),
            format!(
                "pid logs/nginx.pid;\nerror_log logs/error.log;\nevents {{}}\nhttp {{\n  include upstreams.conf;\n  \
                 server {{\n    listen 127.0.0.1:1;\n    add_header Set-Cookie $kotaemon_affinity_cookie always;\n    \
                 location / {{ proxy_pass http://{target}; }}\n  }}\n}}\n"
            ),
        )?;
        let mut t = Vec::new();
        for _ in 0..runs.max(1) {
            let start = Instant::now();
            let out = std::process::Command::new("nginx")
                .arg("-p")
                .arg(&dir)
                .args(["-c", "conf/nginx.conf", "-t", "-q"])
                .output()?;
            t.push(start.elapsed().as_secs_f64() * 1000.0);
            if !out.status.success() {
                bail!(
                    "nginx -t ({}): {}",
                    mode.word(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        t.sort_by(f64::total_cmp);
        times.push(t[t.len() / 2]);
        sizes.push(file.len());
    }
    Ok(TestCost {
        replicas: n,
        runs: runs.max(1),
        hash_ms: times[0],
        sticky_ms: times[1],
        hash_bytes: sizes[0],
        sticky_bytes: sizes[1],
    })
}

/// The side-by-side table: per event, users moved and chats failed in each mode.
pub fn markdown(md: &mut String, results: &[AffinityResult], cost: Option<&TestCost>) {
    use std::fmt::Write as _;
    if results.is_empty() && cost.is_none() {
        return;
    }
    let _ = writeln!(
        md,
        "## Affinity across membership changes (`hash` vs `sticky`)\n"
    );
    let _ = writeln!(
        md,
        "Simulated users (own cookie jar and client address; `GET /`, `POST /queue/join`, SSE \
         `GET /queue/data`, as `tests/it/util/sessions.rs` does) chat through the Kotaemon site \
         while the membership changes under upstreamd (etcd source). A chat is split around \
         each change: every user joins, the change is applied (file, reload, old workers gone), \
         every user reads its stream. *moved*: answered by a replica other than the user's own \
         while their own is still there; *failed*: chats that did not complete while their \
         replica is still there. In brackets: the same for users whose own replica went away \
         (removed, restarted, killed), which no mode can keep. `hash` is `balance = \"hash\"` on \
         the cookie (what `sticky` rendered before); `sticky` names the replica.\n"
    );
    let get = |mode: Mode| results.iter().find(|r| r.mode == mode);
    let (hash, sticky) = (get(Mode::Hash), get(Mode::Sticky));
    if let Some(base) = sticky.or(hash) {
        let _ = writeln!(
            md,
            "| event | chats | hash: moved | hash: failed | hash: reloads | sticky: moved | sticky: failed | sticky: reloads |\n|---|---|---|---|---|---|---|---|"
        );
        let cell = |r: Option<&AffinityResult>, i: usize, what: usize| {
            r.and_then(|r| r.events.get(i))
                .map_or("—".to_owned(), |e| match what {
                    0 => format!("{} ({})", e.moved, e.moved_excused),
                    1 => format!("{} ({})", e.failed, e.failed_excused),
                    _ => e.reloads.to_string(),
                })
        };
        for (i, e) in base.events.iter().enumerate() {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                e.event,
                e.chats,
                cell(hash, i, 0),
                cell(hash, i, 1),
                cell(hash, i, 2),
                cell(sticky, i, 0),
                cell(sticky, i, 1),
                cell(sticky, i, 2)
            );
        }
        let _ = writeln!(md);
    }
    if let Some(c) = cost {
        let _ = writeln!(
            md,
            "`nginx -t` on one upstream of {} replicas, median of {} runs: `hash` {:.1} ms ({} KiB \
             file), `sticky` {:.1} ms ({} KiB: the route, served and cookie maps and one \
             upstream group a replica).\n",
            c.replicas,
            c.runs,
            c.hash_ms,
            c.hash_bytes / 1024,
            c.sticky_ms,
            c.sticky_bytes / 1024
        );
    }
}
