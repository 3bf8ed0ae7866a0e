//! Affinity that names the replica, end to end: a real etcd, stand-in Kotaemon replicas, the
//! real `upstreamd run` with `balance = "sticky"`, a real nginx running the shipped
//! `examples/nginx/kotaemon-site.conf` on the compose bootstrap include, and simulated users
//! holding sessions (`tests/it/util/sessions.rs`) while the membership changes. What a user
//! sees is counted: who lands on a replica other than their own, and which chats fail.
//! Figures print as `figure: …` (`cargo test --test it affinity:: -- --nocapture`).

use std::collections::BTreeSet;
use std::time::Duration;

use crate::util::etcd::Etcd;
use crate::util::sessions::{Tally, Users};
use crate::util::*;
use etcd_client::Client;

const PREFIX: &str = "/services/kotaemon/";
const USERS: usize = 30;
/// Streams of 20 tokens, 25 ms apart: long enough to kill a replica in the middle of them.
const STANDIN: [&str; 4] = ["--tokens", "20", "--token-delay", "25ms"];

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// nginx running the shipped site, first on the compose bootstrap include.
fn site_nginx() -> Nginx {
    let site = repo_file("examples/nginx/kotaemon-site.conf");
    assert!(site.contains("listen 127.0.0.1:8080;"));
    Nginx::start_site(
        &repo_file("deploy/compose/upstreamd-bootstrap.conf"),
        &|port| {
            site.replace(
                "listen 127.0.0.1:8080;",
                &format!("listen 127.0.0.1:{port};"),
            )
        },
    )
}

fn config(nginx: &Nginx, etcd: &Etcd, secret: &std::path::Path) -> String {
    Config::new(nginx)
        .upstream(
            Upstream::new("kotaemon")
                .set("balance", "sticky")
                .set("affinity_cookie", "kh_affinity")
                .set("affinity_secret_file", secret.display().to_string())
                .probe("/queue/status")
                .etcd_1s(&etcd.url(), PREFIX),
        )
        .to_toml()
}

/// The replicas an affinity id routes to in the rendered file (one group each).
fn groups(nginx: &Nginx) -> usize {
    nginx.rendered().matches("\nupstream kotaemon__").count()
}

/// nginx's reload count and workers before a change.
type Before = (usize, BTreeSet<i32>);

fn before(nginx: &Nginx) -> Before {
    (nginx.reloads(), nginx.wait_for_workers())
}

/// Waits until the file routes to `routed` replicas with `server_line` present (or absent),
/// nginx has reloaded since `before`, and every worker of the generation before is leaving.
fn wait_applied(nginx: &Nginx, before: Before, routed: usize, server_line: &str, present: bool) {
    let (reloads, old) = before;
    wait_for("the change in the file", Duration::from_secs(30), || {
        let text = nginx.rendered();
        groups(nginx) == routed && text.contains(server_line) == present
    });
    wait_for("nginx to reload", Duration::from_secs(30), || {
        nginx.reloads() > reloads
    });
    // A worker of the old generation stops accepting once it is shutting down; it may live on
    // while a connection it took drains, which users opening new connections never meet.
    wait_for(
        "the old workers to stop accepting",
        Duration::from_secs(30),
        || {
            nginx.wait_for_workers().iter().all(|pid| {
                !old.contains(pid)
                    || std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                        .map_or(true, |c| c.contains("shutting down"))
            })
        },
    );
}

fn print(event: &str, t: &Tally) {
    eprintln!(
        "figure: sticky, {event}: {} chats, moved {} (+{} whose replica went away), failed {} (+{} whose replica went away)",
        t.chats, t.moved, t.moved_excused, t.failed, t.failed_excused
    );
}

fn none() -> BTreeSet<String> {
    BTreeSet::new()
}

fn only(name: &str) -> BTreeSet<String> {
    BTreeSet::from([name.to_owned()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_stay_on_their_replica_while_others_join_leave_restart_and_die() {
    let etcd = Etcd::start().await;
    let mut c: Client = etcd.client().await;
    let start =
        |name: &str, ip: &str| Replica::start_on(name, &format!("{ip}:{}", free_port()), &STANDIN);
    let alpha = start("alpha", "127.0.0.2");
    let mut bravo = start("bravo", "127.0.0.3");
    let mut charlie = start("charlie", "127.0.0.4");
    let delta = start("delta", "127.0.0.5");
    for r in [&alpha, &bravo, &charlie] {
        c.put(format!("{PREFIX}{}", r.name), r.addr.clone(), None)
            .await
            .unwrap();
    }
    let nginx = site_nginx();
    let _report = report_on_failure(&nginx);
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "0123456789abcdef0123456789abcdef\n").unwrap();
    let was = before(&nginx);
    let daemon = Daemon::start(&config(&nginx, &etcd, secret.path()));
    first_apply(&nginx, &daemon);
    wait_applied(&nginx, was, 3, &alpha.addr, true);

    // A first visit gets a random value (so browsers behind one address spread), the next
    // response the opaque id of the replica that answered: never an address.
    let browser = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap();
    let mut cookies = Vec::new();
    for _ in 0..3 {
        let r = browser
            .get(format!("http://127.0.0.1:{}/", nginx.port))
            .send()
            .await
            .unwrap();
        cookies.extend(r.headers().get_all("set-cookie").iter().map(|v| {
            let v = v.to_str().unwrap();
            let value = v
                .strip_prefix("kh_affinity=")
                .and_then(|c| c.split(';').next());
            value.unwrap_or_else(|| panic!("{v}")).to_owned()
        }));
    }
    assert_eq!(
        cookies.len(),
        2,
        "a random value, then the id, then nothing: {cookies:?}"
    );
    assert_eq!(
        (cookies[0].len(), cookies[1].len()),
        (32, 16),
        "{cookies:?}"
    );
    assert!(
        cookies
            .iter()
            .all(|c| c.bytes().all(|b| b.is_ascii_hexdigit())),
        "{cookies:?}"
    );

    let mut users = Users::new(&format!("http://127.0.0.1:{}", nginx.port), USERS);
    // First visits: every user gets a replica and a cookie naming it; then nobody moves.
    let t = users.chat_all(&none()).await;
    assert_eq!(t.failed, 0, "first chats: {t:?}");
    let t = users.chat_all(&none()).await;
    assert_eq!((t.moved, t.failed), (0, 0), "a quiet round: {t:?}");
    let homes = users.homes();
    eprintln!("figure: sticky, homes after first visits: {homes:?}");
    assert!(
        homes.len() == 3,
        "first visits spread over the three: {homes:?}"
    );

    // 1. A replica is added while every user has a chat in flight.
    users.join_all().await;
    let was = before(&nginx);
    c.put(format!("{PREFIX}delta"), delta.addr.clone(), None)
        .await
        .unwrap();
    wait_applied(&nginx, was, 4, &delta.addr, true);
    let added = users.stream_all(&none(), async {}).await;
    print("replica added", &added);

    // 2. The idle replica (nobody's) is removed, chats in flight.
    assert!(!users.homes().contains_key("delta"), "{:?}", users.homes());
    users.join_all().await;
    let was = before(&nginx);
    c.delete(format!("{PREFIX}delta"), None).await.unwrap();
    wait_applied(&nginx, was, 3, &delta.addr, false);
    let removed = users.stream_all(&only("delta"), async {}).await;
    print("idle replica removed", &removed);

    // 3. A replica restarts: down for a few probes (its users are re-homed), then up again.
    let bravo_users = users.homes().get("bravo").copied().unwrap_or(0);
    let was = before(&nginx);
    bravo.kill();
    wait_applied(&nginx, was, 2, &format!("{} down;", bravo.addr), true);
    let down = users.chat_all(&only("bravo")).await;
    print("replica restarting, down", &down);
    assert_eq!(
        down.moved_excused, bravo_users,
        "bravo's users re-homed: {down:?}"
    );
    users.join_all().await;
    let was = before(&nginx);
    bravo = Replica::start_on("bravo", &bravo.addr.clone(), &STANDIN);
    wait_applied(&nginx, was, 3, &format!("server {};", bravo.addr), true);
    let up = users.stream_all(&none(), async {}).await;
    print("replica restarted, up", &up);

    // 4. A replica is killed while its users' answers stream; the next chats are re-homed
    //    at once (the site's fallback), before or after the probes mark it down.
    let charlie_users = users.homes().get("charlie").copied().unwrap_or(0);
    users.join_all().await;
    let killed = users
        .stream_all(&only("charlie"), async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            charlie.kill();
        })
        .await;
    print("replica killed, streaming", &killed);
    let after = users.chat_all(&only("charlie")).await;
    print("replica killed, next chats", &after);

    for (event, t) in [
        ("added", added),
        ("removed", removed),
        ("down", down),
        ("up", up),
        ("killed", killed),
        ("after the kill", after),
    ] {
        assert_eq!(
            (t.moved, t.failed),
            (0, 0),
            "{event}: users moved or chats failed whose replica is still there: {t:?}"
        );
    }
    assert_eq!(
        killed.failed_excused, charlie_users,
        "exactly the chats streaming from the killed replica fail"
    );
    // Re-homed on their next request: normally the next chat, or already the page request
    // before the stream when the kill came first.
    assert_eq!(killed.moved_excused + after.moved_excused, charlie_users);
    assert_eq!(
        users.homes().values().sum::<usize>(),
        USERS,
        "every user has a replica"
    );
    assert!(!users.homes().contains_key("charlie"));
    drop(daemon);
}
