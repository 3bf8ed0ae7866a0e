//! The Consul source against the in-repo stand-in (`consul-standin`), and the same tests
//! against a real `consul agent -dev` when a `consul` binary is on PATH. Only the
//! fault-injection tests (`/_standin/fault`) are stand-in only.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::consul::{instance, on_every_lane, Lane, Registry, SERVICE};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::instrument::WithSubscriber;
use upstreamd::config::{ConsulSource, Secret};
use upstreamd::model::{Endpoint, RegistryState, UpstreamName};
use upstreamd::sources::consul::ConsulWatch;
use upstreamd::sources::{Sink, Source, SourceEvent, SourceKey};

const SENT: &str = "Consul blocking query sent.";

/// Starts the source under test against `reg`.
fn watch(reg: &Registry, tags: &[&str], wait: Duration, token: Option<&str>) -> Watcher {
    Watcher::start(ConsulSource {
        url: reg.url.clone(),
        service: SERVICE.into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        datacenter: None,
        wait,
        token: token.map(|t| Secret(t.into())),
        ca_file: None,
    })
}

// ---------------------------------------------------------------------------------------------
// The source under test, its sink on a channel, and its log captured.

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
    fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Watcher {
    rx: mpsc::Receiver<upstreamd::sources::SourceUpdate>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    logs: Logs,
}

impl Watcher {
    fn start(cfg: ConsulSource) -> Self {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let (tx, rx) = mpsc::channel(64);
        let key = SourceKey {
            upstream: UpstreamName::new("kotaemon").unwrap(),
            index: 0,
            label: "consul".into(),
            generation: 0,
        };
        let shutdown = CancellationToken::new();
        let source = ConsulWatch::new(&cfg).expect("valid consul source config");
        let task = tokio::spawn(
            source
                .run(Sink::new(key, tx), shutdown.clone())
                .with_subscriber(subscriber),
        );
        Self {
            rx,
            shutdown,
            task,
            logs,
        }
    }

    async fn next(&mut self, within: Duration) -> Option<SourceEvent> {
        tokio::time::timeout(within, self.rx.recv())
            .await
            .ok()
            .flatten()
            .map(|u| u.event)
    }

    #[track_caller]
    fn fail(&self, msg: &str) -> ! {
        panic!("{msg}\n--- source log ---\n{}", self.logs.text());
    }

    /// The first snapshot for which `pred` holds, skipping others; fails after `within`.
    async fn snapshot(
        &mut self,
        within: Duration,
        what: &str,
        pred: impl Fn(&[Endpoint]) -> bool,
    ) -> (Vec<Endpoint>, usize) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(u)) => match u.event {
                    SourceEvent::Snapshot {
                        endpoints, skipped, ..
                    } if pred(&endpoints) => return (endpoints, skipped.total),
                    _ => continue,
                },
                _ => self.fail(&format!("no snapshot with {what} within {within:?}")),
            }
        }
    }

    async fn failed(&mut self, within: Duration) -> String {
        match self.next(within).await {
            Some(SourceEvent::Failed { error }) => error,
            other => self.fail(&format!("expected Failed within {within:?}, got {other:?}")),
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn find<'a>(eps: &'a [Endpoint], addr: &str) -> Option<&'a Endpoint> {
    eps.iter().find(|e| e.address.to_string() == addr)
}

fn has(addr: &'static str) -> impl Fn(&[Endpoint]) -> bool {
    move |eps| find(eps, addr).is_some()
}

fn critical_with(addr: &'static str, needle: &'static str) -> impl Fn(&[Endpoint]) -> bool {
    move |eps| matches!(find(eps, addr).map(|e| &e.registry), Some(RegistryState::Critical(r)) if r.contains(needle))
}

fn passing(addr: &'static str) -> impl Fn(&[Endpoint]) -> bool {
    move |eps| find(eps, addr).is_some_and(|e| e.registry == RegistryState::Passing)
}

const SECOND: Duration = Duration::from_secs(1);
/// How long a wait for an expected snapshot may take before the test fails: a hang guard on a
/// shared machine, not a latency claim (the latencies are printed as figures).
const PROMPT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Tests run on every lane.

on_every_lane!(
    #[tokio::test]
    discovery,
    registration_and_deregistration_arrive_quickly,
    maintenance_and_failing_checks_are_critical,
    token_is_sent_and_never_logged,
    a_quiet_service_costs_few_requests,
    shutdown_ends_a_blocked_query_at_once,
    a_duplicate_address_renders_the_lowest_id_and_warns_once_naming_both,
);

async fn discovery(lane: Lane) {
    let Some(reg) = Registry::start(lane, None).await else {
        return;
    };
    reg.register(instance(
        "k1",
        "10.1.0.1",
        7860,
        &["prod", "v2"],
        json!({"weight": "3", "team": "rag"}),
    ))
    .await;
    // No address of its own: the node's (127.0.0.1) stands in.
    reg.register(instance(
        "k2",
        "",
        7861,
        &["prod"],
        json!({"backup": "true", "max_fails": "2", "fail_timeout": "10s"}),
    ))
    .await;
    reg.register(instance(
        "k3-bad",
        "10.1.0.3",
        7860,
        &["prod"],
        json!({"weight": "heavy"}),
    ))
    .await;
    reg.register(instance(
        "k4-untagged",
        "10.1.0.4",
        7860,
        &["canary"],
        json!({}),
    ))
    .await;

    let mut w = watch(&reg, &["prod"], SECOND, None);
    let (eps, skipped) = w
        .snapshot(5 * SECOND, "k1 and k2", |eps| eps.len() == 2)
        .await;
    let addrs: Vec<String> = eps.iter().map(|e| e.address.to_string()).collect();
    assert_eq!(
        addrs,
        ["10.1.0.1:7860", "127.0.0.1:7861"],
        "sorted by address; k4 lacks the tag"
    );
    assert_eq!(skipped, 1, "k3 has a bad weight");
    let (k1, k2) = (&eps[0], &eps[1]);
    assert_eq!(k1.attrs.weight, Some(3));
    assert_eq!(
        (k2.attrs.backup, k2.attrs.max_fails, k2.attrs.fail_timeout),
        (true, Some(2), Some(10))
    );
    assert_eq!(
        k1.origin,
        format!("consul service ID k1 on node {}", reg.node)
    );
    assert!(eps.iter().all(|e| e.registry == RegistryState::Passing));
    let log = w.logs.text();
    assert!(
        log.contains("k3-bad") && log.contains("weight"),
        "the skip names the service ID:\n{log}"
    );
    if lane == Lane::Standin {
        let query = reg.stats().await["last_health_query"]
            .as_str()
            .unwrap()
            .to_owned();
        for part in ["tag=prod", "wait=1s", "index="] {
            assert!(query.contains(part), "{part} missing from {query}");
        }
    }
}

async fn registration_and_deregistration_arrive_quickly(lane: Lane) {
    let Some(reg) = Registry::start(lane, None).await else {
        return;
    };
    reg.register(instance("k1", "10.2.0.1", 7860, &[], json!({})))
        .await;
    let mut w = watch(&reg, &[], Duration::from_secs(30), None);
    w.snapshot(5 * SECOND, "k1", has("10.2.0.1:7860")).await;

    let mut latencies = Vec::new();
    for (i, addr) in ["10.2.0.2:7860", "10.2.0.3:7860", "10.2.0.4:7860"]
        .into_iter()
        .enumerate()
    {
        // The source blocks on its query first.
        reg.wait_blocked().await;
        let t = Instant::now();
        reg.register(instance(
            &format!("n{i}"),
            addr.split(':').next().unwrap(),
            7860,
            &[],
            json!({}),
        ))
        .await;
        let addr: &'static str = addr;
        w.snapshot(PROMPT, addr, has(addr)).await;
        latencies.push(t.elapsed());
    }
    reg.wait_blocked().await;
    let t = Instant::now();
    reg.deregister("k1").await;
    w.snapshot(PROMPT, "k1 gone", |eps| {
        eps.len() == 3 && find(eps, "10.2.0.1:7860").is_none()
    })
    .await;
    println!(
        "{lane:?}: registration -> snapshot {latencies:?}; deregistration -> snapshot {:?}",
        t.elapsed()
    );
}

async fn maintenance_and_failing_checks_are_critical(lane: Lane) {
    let Some(reg) = Registry::start(lane, None).await else {
        return;
    };
    let mut k1 = instance("k1", "10.3.0.1", 7860, &[], json!({}));
    k1["Check"] = json!({"TTL": "10m", "Status": "passing"});
    reg.register(k1).await;
    let mut w = watch(&reg, &[], SECOND, None);
    w.snapshot(5 * SECOND, "k1 passing", passing("10.3.0.1:7860"))
        .await;

    reg.put(
        "/v1/agent/service/maintenance/k1?enable=true&reason=deploying%20v2",
        None,
    )
    .await;
    let (eps, _) = w
        .snapshot(
            PROMPT,
            "k1 in maintenance",
            critical_with("10.3.0.1:7860", "_service_maintenance:k1"),
        )
        .await;
    assert!(
        matches!(&eps[0].registry, RegistryState::Critical(r) if r.contains("deploying v2")),
        "{eps:?}"
    );
    reg.put("/v1/agent/service/maintenance/k1?enable=false", None)
        .await;
    w.snapshot(PROMPT, "k1 out of maintenance", passing("10.3.0.1:7860"))
        .await;

    reg.put("/v1/agent/check/fail/service:k1?note=HTTP%20503", None)
        .await;
    let (eps, _) = w
        .snapshot(
            PROMPT,
            "k1 failing",
            critical_with("10.3.0.1:7860", "service:k1"),
        )
        .await;
    assert!(
        matches!(&eps[0].registry, RegistryState::Critical(r) if r.contains("HTTP 503")),
        "{eps:?}"
    );
    reg.put("/v1/agent/check/warn/service:k1?note=slow", None)
        .await;
    w.snapshot(
        PROMPT,
        "k1 warning counted as passing",
        passing("10.3.0.1:7860"),
    )
    .await;

    reg.put(
        "/v1/agent/maintenance?enable=true&reason=kernel%20update",
        None,
    )
    .await;
    w.snapshot(
        PROMPT,
        "node maintenance",
        critical_with("10.3.0.1:7860", "_node_maintenance"),
    )
    .await;
    reg.put("/v1/agent/maintenance?enable=false", None).await;
    w.snapshot(PROMPT, "node back", passing("10.3.0.1:7860"))
        .await;
}

async fn token_is_sent_and_never_logged(lane: Lane) {
    const TOKEN: &str = "9b1d7c3e-5f2a-4e8b-a6d0-c41f2e8b7a95";
    const WRONG: &str = "0f0f0f0f-dead-beef-0000-123456789abc";
    let Some(reg) = Registry::start(lane, Some(TOKEN)).await else {
        return;
    };
    reg.register(instance("k1", "10.4.0.1", 7860, &[], json!({})))
        .await;

    let mut w = watch(&reg, &[], SECOND, Some(TOKEN));
    w.snapshot(10 * SECOND, "k1 (needs the token)", has("10.4.0.1:7860"))
        .await;
    if lane == Lane::Standin {
        assert_eq!(
            reg.stats().await["last_health_token"],
            TOKEN,
            "sent as X-Consul-Token"
        );
    }

    let mut denied = watch(&reg, &[], SECOND, Some(WRONG));
    let error = denied.failed(5 * SECOND).await;
    assert!(error.contains("403"), "{error}");
    assert!(
        !error.contains(WRONG),
        "the token leaked into the error: {error}"
    );
    // Both sources ran on: the right one blocks again, the wrong one retried after its backoff.
    let deadline = Instant::now() + 10 * SECOND;
    while w.logs.count(SENT) < 2 || denied.logs.count(SENT) < 2 {
        assert!(Instant::now() < deadline, "no second query within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (name, logs) in [("right", &w.logs), ("wrong", &denied.logs)] {
        let text = logs.text();
        assert!(
            text.contains(SENT),
            "the {name}-token log captured nothing:\n{text}"
        );
        assert!(
            !text.contains(TOKEN) && !text.contains(WRONG),
            "a token leaked into the {name}-token log:\n{text}"
        );
    }
}

async fn a_quiet_service_costs_few_requests(lane: Lane) {
    let Some(reg) = Registry::start(lane, None).await else {
        return;
    };
    reg.register(instance("k1", "10.5.0.1", 7860, &[], json!({})))
        .await;
    let mut w = watch(&reg, &[], SECOND, None);
    w.snapshot(5 * SECOND, "k1", has("10.5.0.1:7860")).await;

    let quiet = Duration::from_secs(3);
    let (logged, served) = (w.logs.count(SENT), reg.health_requests_counted().await);
    let extra = w.next(quiet).await;
    assert!(
        extra.is_none(),
        "nothing changed, nothing is sent: {extra:?}"
    );
    let sent = w.logs.count(SENT) - logged;
    println!(
        "{lane:?}: {sent} requests in {quiet:?} of quiet with wait=1s (~{} per minute)",
        sent * 20
    );
    assert!(
        (2..=6).contains(&sent),
        "blocking queries, not a poll loop: {sent} requests in {quiet:?}"
    );
    reg.assert_served_as_sent(served, sent, "the source").await;
}

async fn shutdown_ends_a_blocked_query_at_once(lane: Lane) {
    let Some(reg) = Registry::start(lane, None).await else {
        return;
    };
    reg.register(instance("k1", "10.9.0.1", 7860, &[], json!({})))
        .await;
    let mut w = watch(&reg, &[], Duration::from_secs(60), None);
    w.snapshot(5 * SECOND, "k1", has("10.9.0.1:7860")).await;
    reg.wait_blocked().await;
    let t = Instant::now();
    w.shutdown.cancel();
    let task = &mut w.task;
    // The hang guard is well short of the 60s wait: only the shutdown can end the query in time.
    match tokio::time::timeout(PROMPT, task).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => w.fail(&format!("the source task failed: {e}")),
        Err(_) => w.fail("the source did not stop within 10s of shutdown (its query waits 60s)"),
    }
    println!(
        "{lane:?}: stopped {:?} after shutdown, mid blocking query",
        t.elapsed()
    );
}

async fn a_duplicate_address_renders_the_lowest_id_and_warns_once_naming_both(lane: Lane) {
    let Some(reg) = Registry::start(lane, None).await else {
        return;
    };
    // Registered first, but "k2" sorts after "k1": its weight must not be the one rendered.
    reg.register(instance(
        "k2-dup",
        "10.10.0.1",
        7860,
        &[],
        json!({"weight": "2"}),
    ))
    .await;
    reg.register(instance(
        "k1-dup",
        "10.10.0.1",
        7860,
        &[],
        json!({"weight": "7"}),
    ))
    .await;
    let mut w = watch(&reg, &[], SECOND, None);
    let (eps, skipped) = w
        .snapshot(5 * SECOND, "the shared address", has("10.10.0.1:7860"))
        .await;
    assert_eq!(eps.len(), 1, "{eps:?}");
    assert_eq!(eps[0].attrs.weight, Some(7), "k1-dup's Meta wins");
    assert_eq!(
        skipped, 1,
        "the duplicate is counted as skipped, as etcd counts it"
    );
    // Another change: the source answers again with the duplicate still there.
    reg.register(instance("k3", "10.10.0.3", 7860, &[], json!({})))
        .await;
    w.snapshot(PROMPT, "k3", has("10.10.0.3:7860")).await;
    let log = w.logs.text();
    let warning = "Skipped Consul service ID k2-dup on node";
    assert_eq!(log.matches(warning).count(), 1, "warned once:\n{log}");
    let line = log.lines().find(|l| l.contains(warning)).unwrap();
    assert!(
        line.contains("already given by service ID k1-dup") && line.contains("10.10.0.1:7860"),
        "the warning names both service IDs and the address: {line}"
    );
}

// ---------------------------------------------------------------------------------------------
// Fault injection: stand-in only.

#[tokio::test]
async fn an_index_reset_restarts_the_loop_and_updates_keep_coming() {
    let reg = Registry::start(Lane::Standin, None).await.unwrap();
    reg.register(instance("k1", "10.6.0.1", 7860, &[], json!({})))
        .await;
    // A long wait: only a working reset, not the wait running out, can deliver in time.
    let mut w = watch(&reg, &[], Duration::from_secs(20), None);
    w.snapshot(5 * SECOND, "k1", has("10.6.0.1:7860")).await;
    reg.wait_blocked().await;
    reg.fault("reset-index").await;
    // The source sees the index go back, asks again from 0 and blocks on the new index.
    reg.wait_blocked().await;
    reg.register(instance("k2", "10.6.0.2", 7860, &[], json!({})))
        .await;
    w.snapshot(PROMPT, "k2 after the reset", has("10.6.0.2:7860"))
        .await;
    reg.wait_blocked().await;
    reg.register(instance("k3", "10.6.0.3", 7860, &[], json!({})))
        .await;
    w.snapshot(
        PROMPT,
        "k3, blocking on the new low index",
        has("10.6.0.3:7860"),
    )
    .await;
    assert!(
        w.logs.text().contains("went backwards"),
        "{}",
        w.logs.text()
    );
}

#[tokio::test]
async fn a_five_second_outage_is_reported_once_and_recovers_quickly() {
    let reg = Registry::start(Lane::Standin, None).await.unwrap();
    reg.register(instance("k1", "10.7.0.1", 7860, &[], json!({})))
        .await;
    let mut w = watch(&reg, &[], SECOND, None);
    w.snapshot(5 * SECOND, "k1", has("10.7.0.1:7860")).await;

    reg.fault("error500").await;
    let outage = Instant::now();
    let before = reg.health_requests().await;
    // The query in flight ends when its wait (1s) does; the next one gets the 500.
    let error = w.failed(3 * SECOND).await;
    assert!(error.contains("500"), "{error}");
    let rest = Duration::from_secs(5).saturating_sub(outage.elapsed());
    let during = w.next(rest).await;
    assert!(
        during.is_none(),
        "one Failed per outage, no snapshot while failing: {during:?}"
    );
    let requests = reg.health_requests().await - before;
    assert!(
        requests <= 10,
        "backoff, not a tight loop: {requests} requests in 5s"
    );

    reg.fault("none").await;
    let back = Instant::now();
    w.snapshot(5 * SECOND, "k1 again", has("10.7.0.1:7860"))
        .await;
    let recovery = back.elapsed();
    println!("recovery after a 5 s outage: {recovery:?} ({requests} requests during the outage)");
    // Expected under 3.5s (backoff is capped at 3s): the figure above, not an assert.
}

#[tokio::test]
async fn a_hanging_request_is_abandoned_and_retried() {
    let reg = Registry::start(Lane::Standin, None).await.unwrap();
    reg.register(instance("k1", "10.8.0.1", 7860, &[], json!({})))
        .await;
    let mut w = watch(&reg, &[], SECOND, None);
    w.snapshot(5 * SECOND, "k1", has("10.8.0.1:7860")).await;

    reg.fault("hang").await;
    let hang = Instant::now();
    let before = reg.health_requests().await;
    // In flight: ends after wait (1s). Next: hangs, abandoned after 1s + 1s/16 + 2s.
    let error = w.failed(6 * SECOND).await;
    assert!(error.contains("did not answer"), "{error}");
    println!("hanging request abandoned after {:?}", hang.elapsed());
    // Abandoned requests are retried: the stand-in sees at least two more.
    let deadline = Instant::now() + 10 * SECOND;
    while reg.health_requests().await - before < 2 {
        assert!(Instant::now() < deadline, "no retry within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    reg.fault("none").await;
    let back = Instant::now();
    // A retry may be hanging already: it is abandoned within ~3s, then backoff, then answered.
    w.snapshot(8 * SECOND, "k1 again", has("10.8.0.1:7860"))
        .await;
    println!("recovered {:?} after the hang ended", back.elapsed());
}
