//! The etcd source against a real etcd 3.4: layouts, watch latency, leases, hostile values,
//! an outage with restart, a compaction past the watch, auth and TLS.
//!
//! Each test starts its own etcd on free loopback ports with a temporary data dir
//! (`tests/it/util/etcd.rs`), drives an `EtcdWatch` into an mpsc channel and asserts the snapshots.
//! Measured latencies are printed (`cargo test --test it etcd_source:: -- --nocapture`).

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::etcd::Etcd;
use etcd_client::{Client, ConnectOptions, Permission, PutOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use upstreamd::config::{EtcdSource, Secret};
use upstreamd::model::{Endpoint, UpstreamName};
use upstreamd::sources::etcd::EtcdWatch;
use upstreamd::sources::{Sink, Source, SourceEvent, SourceKey, SourceUpdate};

// ---------------------------------------------------------------------------------------
// Harness: one running source and what it reports.
// ---------------------------------------------------------------------------------------

struct Run {
    rx: mpsc::Receiver<SourceUpdate>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
    seen: Vec<SourceEvent>,
}

impl Run {
    fn start(cfg: &EtcdSource) -> Self {
        Self::start_with_capacity(cfg, 64)
    }

    /// `capacity` is the channel's: 1 lets a test make the source block on its sends.
    fn start_with_capacity(cfg: &EtcdSource, capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity);
        let key = SourceKey {
            upstream: UpstreamName::new("kotaemon").unwrap(),
            index: 0,
            label: "etcd".into(),
            generation: 0,
        };
        let shutdown = CancellationToken::new();
        let watch = EtcdWatch::new(cfg).expect("a valid etcd source config");
        let task = tokio::spawn(watch.run(Sink::new(key, tx), shutdown.clone()));
        Self {
            rx,
            shutdown,
            task: Some(task),
            seen: Vec::new(),
        }
    }

    /// The next event within `within`, or None.
    async fn next(&mut self, within: Duration) -> Option<SourceEvent> {
        let update = tokio::time::timeout(within, self.rx.recv()).await.ok()??;
        if let SourceEvent::Snapshot { endpoints, .. } = &update.event {
            assert!(
                !endpoints.is_empty(),
                "the source sent an empty snapshot: {:?}",
                self.seen
            );
        }
        self.seen.push(update.event.clone());
        Some(update.event)
    }

    /// Waits for a snapshot whose addresses are `want`; returns it with the time it took.
    async fn snapshot_of(
        &mut self,
        want: &[&str],
        within: Duration,
    ) -> (Vec<Endpoint>, usize, Duration) {
        let started = Instant::now();
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        loop {
            let left = within.saturating_sub(started.elapsed());
            match self.next(left).await {
                Some(SourceEvent::Snapshot {
                    endpoints, skipped, ..
                }) if addrs(&endpoints) == want => {
                    return (endpoints, skipped.total, started.elapsed())
                }
                Some(_) => {}
                None => panic!(
                    "no snapshot of {want:?} within {within:?}; saw {:#?}",
                    self.seen
                ),
            }
        }
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the source stops within 1s of shutdown")
            .expect("the source task does not panic");
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn addrs(endpoints: &[Endpoint]) -> BTreeSet<String> {
    endpoints.iter().map(|e| e.address.to_string()).collect()
}

fn find<'a>(endpoints: &'a [Endpoint], address: &str) -> &'a Endpoint {
    endpoints
        .iter()
        .find(|e| e.address.to_string() == address)
        .unwrap()
}

const SECOND: Duration = Duration::from_secs(1);
/// How long a wait for an expected snapshot may take before the test fails: a hang guard on a
/// shared machine, not a latency claim (the latencies are printed as figures).
const PROMPT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn lists_all_three_layouts_then_follows_puts_and_deletes() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    c.put("/svc/kotaemon/a", "10.0.0.1:7860", None)
        .await
        .unwrap();
    let json = r#"{"address": "10.0.0.2:7860", "weight": 3, "backup": false, "max_fails": 2, "fail_timeout": "10s", "down": false}"#;
    c.put("/svc/kotaemon/b", json, None).await.unwrap();
    c.put(
        "/svc/kotaemon/10.0.0.3:7860",
        r#"{"weight":1,"max_fails":2,"fail_timeout":10,"down":1}"#,
        None,
    )
    .await
    .unwrap();
    // Outside the prefix, including one that merely starts with the same letters.
    c.put("/svc/kotaemon2/x", "10.0.0.99:7860", None)
        .await
        .unwrap();
    c.put("/other/y", "10.0.0.98:7860", None).await.unwrap();

    let mut run = Run::start(&etcd.source("/svc/kotaemon/"));
    let (eps, skipped, first) = run
        .snapshot_of(
            &["10.0.0.1:7860", "10.0.0.2:7860", "10.0.0.3:7860"],
            5 * SECOND,
        )
        .await;
    assert_eq!(skipped, 0);
    let plain = find(&eps, "10.0.0.1:7860");
    assert_eq!(
        (plain.attrs.weight, plain.attrs.down, plain.origin.as_str()),
        (None, false, "/svc/kotaemon/a")
    );
    let j = &find(&eps, "10.0.0.2:7860").attrs;
    assert_eq!(
        (j.weight, j.max_fails, j.fail_timeout, j.backup, j.down),
        (Some(3), Some(2), Some(10), false, false)
    );
    let u = &find(&eps, "10.0.0.3:7860").attrs;
    assert_eq!(
        (u.weight, u.max_fails, u.fail_timeout, u.down),
        (Some(1), Some(2), Some(10), true)
    );

    let t = Instant::now();
    c.put("/svc/kotaemon/d", "10.0.0.4:7860", None)
        .await
        .unwrap();
    let all4 = [
        "10.0.0.1:7860",
        "10.0.0.2:7860",
        "10.0.0.3:7860",
        "10.0.0.4:7860",
    ];
    run.snapshot_of(&all4, PROMPT).await;
    let put_latency = t.elapsed();

    // Writing the same endpoint again changes nothing: no snapshot.
    c.put("/svc/kotaemon/d", "10.0.0.4:7860\n", None)
        .await
        .unwrap();
    assert_eq!(run.next(Duration::from_millis(300)).await, None);

    let t = Instant::now();
    c.delete("/svc/kotaemon/a", None).await.unwrap();
    run.snapshot_of(&all4[1..], PROMPT).await;
    let delete_latency = t.elapsed();

    let t = Instant::now();
    c.put(
        "/svc/kotaemon/b",
        r#"{"address":"10.0.0.2:7860","weight":7}"#,
        None,
    )
    .await
    .unwrap();
    let (eps, _, _) = run.snapshot_of(&all4[1..], PROMPT).await;
    assert_eq!(find(&eps, "10.0.0.2:7860").attrs.weight, Some(7));
    let attr_latency = t.elapsed();

    println!(
        "etcd: first snapshot {first:?} after start; put → snapshot {put_latency:?}; delete → snapshot {delete_latency:?}; attribute change → snapshot {attr_latency:?}"
    );
    run.stop().await;
}

#[tokio::test]
async fn hostile_values_are_skipped_and_counted() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let p = "/svc/k/";
    c.put(format!("{p}good"), "10.0.0.1:80", None)
        .await
        .unwrap();
    c.put(format!("{p}h1"), "10.0.0.1:80 down", None)
        .await
        .unwrap();
    c.put(format!("{p}h2"), "10.0.0.1:80;\ninclude /etc/passwd", None)
        .await
        .unwrap();
    c.put(
        format!("{p}h3"),
        r#"{"address":"10.0.0.1:80","weight":"1; include x"}"#,
        None,
    )
    .await
    .unwrap();
    c.put(
        format!("{p}10.0.0.1:80 max_fails=0"),
        r#"{"weight":1}"#,
        None,
    )
    .await
    .unwrap();
    c.put(format!("{p}h5"), b"10.0.0.7:80\xff".to_vec(), None)
        .await
        .unwrap();

    let mut run = Run::start(&etcd.source(p));
    let (eps, skipped, _) = run.snapshot_of(&["10.0.0.1:80"], 5 * SECOND).await;
    assert_eq!(skipped, 5, "every hostile entry is counted");
    assert_eq!(
        eps[0].attrs,
        Default::default(),
        "nothing of a hostile entry leaked into the good one"
    );

    // Arriving through the watch: counted, still not an endpoint.
    c.put(
        format!("{p}h6"),
        "10.0.0.2:80 backup; server 6.6.6.6:80",
        None,
    )
    .await
    .unwrap();
    let (_, skipped, _) = run.snapshot_of(&["10.0.0.1:80"], PROMPT).await;
    assert_eq!(skipped, 6);
    // Fixing a hostile entry makes it count.
    c.put(format!("{p}h1"), "10.0.0.3:80", None).await.unwrap();
    let (_, skipped, _) = run
        .snapshot_of(&["10.0.0.1:80", "10.0.0.3:80"], PROMPT)
        .await;
    assert_eq!(skipped, 5);
    run.stop().await;
}

#[tokio::test]
async fn an_expired_lease_removes_its_endpoint() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    c.put("/svc/l/static", "10.0.0.1:80", None).await.unwrap();
    let mut run = Run::start(&etcd.source("/svc/l/"));
    run.snapshot_of(&["10.0.0.1:80"], 5 * SECOND).await;

    // etcd 3.4 raises TTLs below its minimum (1.5 s election-derived, rounded up to 2 s).
    let granted_at = Instant::now();
    let lease = c.lease_grant(1, None).await.unwrap();
    let ttl = Duration::from_secs(lease.ttl() as u64);
    c.put(
        "/svc/l/leased",
        "10.0.0.2:80",
        Some(PutOptions::new().with_lease(lease.id())),
    )
    .await
    .unwrap();
    run.snapshot_of(&["10.0.0.1:80", "10.0.0.2:80"], PROMPT)
        .await;

    // Not kept alive: gone after the TTL, through the same delete path as any other key.
    run.snapshot_of(&["10.0.0.1:80"], ttl + 3 * SECOND).await;
    let since_grant = granted_at.elapsed();
    println!(
        "etcd: lease TTL {ttl:?}; removal seen {since_grant:?} after the grant, {:?} after the TTL ran out",
        since_grant.saturating_sub(ttl)
    );
    assert!(since_grant >= ttl, "removed before its TTL ran out");
    run.stop().await;
}

#[tokio::test]
async fn an_outage_reports_failed_once_sends_no_empty_snapshot_and_resyncs_after_restart() {
    let mut etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    c.put("/svc/o/a", "10.0.0.1:80", None).await.unwrap();
    c.put("/svc/o/b", "10.0.0.2:80", None).await.unwrap();
    drop(c);
    let mut run = Run::start(&etcd.source("/svc/o/"));
    run.snapshot_of(&["10.0.0.1:80", "10.0.0.2:80"], 5 * SECOND)
        .await;

    let killed_at = Instant::now();
    etcd.kill();
    let reported = match run.next(3 * SECOND).await {
        Some(SourceEvent::Failed { error }) => error,
        other => panic!("expected Failed after killing etcd, got {other:?}"),
    };
    let failed_after = killed_at.elapsed();
    // The rest of a ~3 s outage: retries fail quietly; no snapshot at all, empty or not.
    let rest = Duration::from_secs(3).saturating_sub(killed_at.elapsed());
    let during: Vec<SourceEvent> = {
        let mut v = Vec::new();
        let until = Instant::now() + rest;
        while let Some(e) = run
            .next(until.saturating_duration_since(Instant::now()))
            .await
        {
            v.push(e);
        }
        v
    };
    assert!(
        during.is_empty(),
        "only one Failed per outage and no snapshot: {during:?}"
    );

    // Restart on the same ports and data dir; watch the source while etcd comes up.
    let restarted_at = Instant::now();
    etcd.spawn_unchecked();
    let (healthy, (_, _, resync)) = tokio::join!(
        async {
            etcd.wait_healthy(Duration::from_secs(15)).await;
            restarted_at.elapsed()
        },
        run.snapshot_of(&["10.0.0.1:80", "10.0.0.2:80"], 8 * SECOND),
    );
    let mut c = etcd.client().await;
    let t = Instant::now();
    c.put("/svc/o/c", "10.0.0.3:80", None).await.unwrap();
    run.snapshot_of(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], PROMPT)
        .await;
    println!(
        "etcd outage: Failed {failed_after:?} after the kill ({reported}); after the restart etcd answered health \
         checks at {healthy:?} and the source had re-listed at {resync:?}; then put → snapshot {:?}",
        t.elapsed()
    );
    // Expected within 5 s of etcd's recovery (backoff is capped at 3 s, plus at most a 1 s
    // request timeout in flight as etcd returns): the figure above, not an assert.
    run.stop().await;
}

/// Log lines captured for one test (current-thread runtime: the source runs on this thread).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A real trigger of the compacted-watch path: the source is made to stop reading its watch
/// (its sends block on a full channel of capacity 1), enough events are written that etcd's
/// per-stream buffers fill and it sets the watcher aside as slow, membership changes, and the
/// history is compacted; once the source reads again etcd cancels the watch with
/// `compact_revision`, and only a new list can give the right membership.
#[tokio::test]
async fn a_compaction_past_a_slow_watch_relists_to_the_right_membership() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    c.put("/svc/c/a", "10.0.0.1:80", None).await.unwrap();
    c.put("/svc/c/b", "10.0.0.2:80", None).await.unwrap();
    let mut run = Run::start_with_capacity(&etcd.source("/svc/c/"), 1);
    run.snapshot_of(&["10.0.0.1:80", "10.0.0.2:80"], 5 * SECOND)
        .await;
    // Proof that the watch is live before the source is stalled.
    c.put("/svc/c/c", "10.0.0.3:80", None).await.unwrap();
    run.snapshot_of(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], PROMPT)
        .await;

    // Two changes: the first snapshot fills the channel, the second send blocks.
    c.put("/svc/c/d", "10.0.0.4:80", None).await.unwrap();
    c.put("/svc/c/e", "10.0.0.5:80", None).await.unwrap();
    // Once the first is in the channel, the source cannot deliver the second: it stops
    // reading its watch.
    let deadline = Instant::now() + 5 * SECOND;
    while run.rx.is_empty() {
        assert!(
            Instant::now() < deadline,
            "no snapshot in the channel within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ~24 MB of events fill the HTTP/2 window, the sockets and gRPC's buffers; then etcd's
    // watch channel (128 responses) fills and the watcher becomes a slow "victim".
    let pad = format!(
        r#"{{"address":"10.0.0.9:80","pad":"{}"}}"#,
        "x".repeat(1_000_000)
    );
    for _ in 0..24 {
        c.put("/svc/c/pad", pad.as_str(), None).await.unwrap();
    }
    for i in 0..300 {
        c.put(
            "/svc/c/tick",
            format!(r#"{{"address":"10.0.0.8:80","n":{i}}}"#),
            None,
        )
        .await
        .unwrap();
    }
    // Changes that only a new list can show once the history is gone.
    c.delete("/svc/c/a", None).await.unwrap();
    let last = c.put("/svc/c/f", "10.0.0.6:80", None).await.unwrap();
    let revision = last.header().unwrap().revision();
    c.compact(revision, None).await.unwrap();

    let want = [
        "10.0.0.2:80",
        "10.0.0.3:80",
        "10.0.0.4:80",
        "10.0.0.5:80",
        "10.0.0.6:80",
        "10.0.0.8:80",
        "10.0.0.9:80",
    ];
    let (_, skipped, took) = run.snapshot_of(&want, 15 * SECOND).await;
    assert_eq!(skipped, 0);
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        text.contains("etcd compacted history the watch still needed"),
        "the compacted path was not taken (the stall did not make etcd drop the watcher); logs:\n{text}"
    );
    println!("etcd compaction: compacted at revision {revision}; right membership {took:?} after the source read again");
    run.stop().await;
}

#[tokio::test]
async fn authenticates_as_a_read_only_user_and_reports_a_bad_password() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    c.put("/svc/auth/a", "10.0.0.1:80", None).await.unwrap();
    c.user_add("root", "root-pw", None).await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    c.role_add("upstreamd-reader").await.unwrap();
    c.role_grant_permission(
        "upstreamd-reader",
        Permission::read("/svc/auth/").with_prefix(),
    )
    .await
    .unwrap();
    c.user_add("upstreamd", "reader-pw", None).await.unwrap();
    c.user_grant_role("upstreamd", "upstreamd-reader")
        .await
        .unwrap();
    c.auth_enable().await.unwrap();

    let mut cfg = etcd.source("/svc/auth/");
    cfg.username = Some("upstreamd".into());
    cfg.password = Some(Secret("reader-pw".into()));
    let mut run = Run::start(&cfg);
    run.snapshot_of(&["10.0.0.1:80"], 5 * SECOND).await;

    let mut root = Client::connect(
        [etcd.url()],
        Some(ConnectOptions::new().with_user("root", "root-pw")),
    )
    .await
    .unwrap();
    root.put("/svc/auth/b", "10.0.0.2:80", None).await.unwrap();
    run.snapshot_of(&["10.0.0.1:80", "10.0.0.2:80"], PROMPT)
        .await;
    run.stop().await;

    cfg.password = Some(Secret("wrong".into()));
    let mut bad = Run::start(&cfg);
    match bad.next(5 * SECOND).await {
        Some(SourceEvent::Failed { error }) => {
            assert!(error.contains("authentication failed"), "{error}");
            assert!(
                !error.contains("wrong"),
                "the password stays out of the report: {error}"
            );
        }
        other => panic!("expected Failed with a wrong password, got {other:?}"),
    }
    bad.stop().await;
}

#[tokio::test]
async fn connects_over_tls_with_a_client_certificate() {
    let etcd = Etcd::start_tls().await;
    let certs = etcd.certs.as_ref().unwrap();
    let mut c = etcd.client().await;
    c.put("/svc/tls/a", "10.0.0.1:80", None).await.unwrap();

    let mut cfg = etcd.source("/svc/tls/");
    cfg.ca_file = Some(certs.ca.clone());
    cfg.cert_file = Some(certs.client_cert.clone());
    cfg.key_file = Some(certs.client_key.clone());
    let mut run = Run::start(&cfg);
    run.snapshot_of(&["10.0.0.1:80"], 5 * SECOND).await;
    c.put("/svc/tls/b", "10.0.0.2:80", None).await.unwrap();
    run.snapshot_of(&["10.0.0.1:80", "10.0.0.2:80"], PROMPT)
        .await;
    run.stop().await;

    // etcd runs with --client-cert-auth: without a client certificate the handshake fails.
    cfg.cert_file = None;
    cfg.key_file = None;
    let mut anonymous = Run::start(&cfg);
    match anonymous.next(5 * SECOND).await {
        Some(SourceEvent::Failed { .. }) => {}
        other => panic!("expected Failed without a client certificate, got {other:?}"),
    }
    anonymous.stop().await;
}
