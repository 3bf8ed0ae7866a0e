//! What the end-to-end tests share: nginx and upstreamd started together, waits for the first
//! apply and for quiet, the outage check, and predicates on rendered files and traffic.

use std::time::{Duration, Instant};

use super::nginx::report_if_panicking;
use super::{wait_for, Config, Daemon, Nginx, Replica};

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
