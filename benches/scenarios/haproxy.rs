//! HAProxy 2.6 (Debian's) as a peer: in nginx's place, in front of the same replicas, with the
//! same probe settings as upstreamd, or with its best detection tuning.
//!
//! Fairness (shared/ARCHITECTURE.md, measured here): Debian's 2.6.12 ignores `timeout check`
//! once a check's connection is up and times the check out after min(`inter`, `timeout
//! connect`), so `timeout connect` is the probe timeout; `option redispatch 1` sends a refused
//! connection to another server, as nginx's `proxy_next_upstream error` does. Affinity is
//! the same cookie-or-nothing consistent hash (`balance hash req.cook(kh_affinity)`), and
//! `timeout server` is the site's `proxy_read_timeout` (3600 s: the SSE answers need it).
//! `option abortonclose` drops the server side of a request whose client gave up, as nginx
//! does by default (`proxy_ignore_client_abort off`); it also makes HAProxy log such a request
//! when the client leaves (checked here), instead of never (a hung server's requests would
//! otherwise stay active, and unlogged, until HAProxy stops).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::env::{Env, FAST_INTERVAL, HEALTH};
use crate::procs::{self, Proc};
use crate::stats::Access;

/// A running HAProxy, logging one line per request to its stdout (the proc's log file).
pub struct Haproxy {
    pub port: u16,
    pub log: PathBuf,
    proc: Proc,
}

/// The config: one frontend on `port`, one backend over `addrs` (named `names`).
pub fn config(port: u16, addrs: &[String], names: &[String], tuned: bool) -> String {
    let check = if tuned {
        format!(
            "inter {i} fastinter {FAST_INTERVAL} downinter {i} rise {r} fall {f} \
             observe layer7 error-limit 1 on-error mark-down",
            i = HEALTH.interval,
            r = HEALTH.rise,
            f = HEALTH.fall,
        )
    } else {
        format!(
            "inter {i} rise {r} fall {f}",
            i = HEALTH.interval,
            r = HEALTH.rise,
            f = HEALTH.fall,
        )
    };
    let servers: String = names
        .iter()
        .zip(addrs)
        .map(|(n, a)| format!("    server {n} {a} check\n"))
        .collect();
    format!(
        "global\n    log stdout format raw local0\n    maxconn 4000\n\n\
         defaults\n    mode http\n    log global\n    option dontlognull\n    \
         log-format \"%[date(0,ms)] %Ta %ST \\\"%si:%sp\\\" %r\"\n    \
         option redispatch 1\n    option abortonclose\n    retries 3\n    timeout connect {t}\n    timeout check {t}\n    \
         timeout client 3600s\n    timeout server 3600s\n    timeout http-keep-alive 75s\n\n\
         frontend front\n    bind 127.0.0.1:{port}\n    default_backend kotaemon\n\n\
         backend kotaemon\n    balance hash req.cook(kh_affinity)\n    hash-type consistent\n    \
         option httpchk GET /queue/status\n    http-check expect string '\"msg\":\"estimation\"'\n    \
         default-server {check}\n{servers}",
        t = HEALTH.timeout,
    )
}

impl Haproxy {
    /// Starts HAProxy for scenario `what` and waits until it serves from every replica.
    pub async fn start(
        env: &mut Env,
        what: &str,
        tuned: bool,
        addrs: &[String],
        names: &[String],
    ) -> Result<Self> {
        let dir = env.dir(&format!(
            "{what}-haproxy{}",
            if tuned { "-tuned" } else { "" }
        ))?;
        let port = procs::free_port("127.0.0.1")?;
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, config(port, addrs, names, tuned))?;
        let name = format!("haproxy-{what}{}", if tuned { "-tuned" } else { "" });
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db").arg("-f").arg(&cfg);
        let proc = Proc::spawn(&name, &mut cmd, &env.logs, false)?;
        let mut h = Self {
            port,
            log: proc.log.clone(),
            proc,
        };
        h.wait_serving(names, Duration::from_secs(30)).await?;
        Ok(h)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Waits until requests (with varied cookies) were answered by every replica in `names`.
    async fn wait_serving(&mut self, names: &[String], within: Duration) -> Result<()> {
        let addr = self.addr();
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = std::collections::BTreeSet::new();
        let mut k = 0u64;
        while names.iter().any(|n| !seen.contains(n)) {
            if tokio::time::Instant::now() > deadline || !self.proc.running() {
                bail!(
                    "HAProxy never served {names:?} (saw {seen:?}):\n{}",
                    self.proc.tail(30)
                );
            }
            k += 1;
            if let Some(name) = crate::client::served_by(&addr, k).await {
                seen.insert(name);
            }
        }
        Ok(())
    }

    pub fn check_alive(&mut self) -> Result<()> {
        if !self.proc.running() {
            bail!(
                "HAProxy exited during the scenario:\n{}",
                self.proc.tail(30)
            );
        }
        Ok(())
    }

    /// Its request log: each request's start and the server that answered it (HAProxy logs
    /// the last server tried, not every retry).
    pub fn access(&self) -> Vec<Access> {
        parse_log(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }
}

/// Lines of `%[date(0,ms)] %Ta %ST "%si:%sp" %r`: logged when the request ends, so it started
/// `%Ta` ms earlier.
fn parse_log(text: &str) -> Vec<Access> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.splitn(4, ' ');
            let end_ms: f64 = words.next()?.parse().ok()?;
            let active_ms: f64 = words.next()?.parse().ok()?;
            let _status = words.next()?;
            let server = words.next()?.strip_prefix('"')?.split_once('"')?.0;
            Some(Access {
                start: (end_ms - active_ms.max(0.0)) / 1000.0,
                upstreams: vec![server.to_owned()],
            })
        })
        .collect()
}
