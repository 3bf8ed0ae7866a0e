//! The async shell that probes every endpoint on its schedule and sends the results on.
//!
//! One task per endpoint: first probe right away (spread a little when many start at once),
//! then at the pace its own copy of the endpoint's [`HealthState`] asks for: `interval`
//! while the verdict stands, `fast_interval` while it is in doubt, `down_interval` while the
//! endpoint is down and failing. The copy sees exactly the results the controller sees, in the
//! same order, so it agrees with the controller's; it only paces the probes, it decides
//! nothing. A [`ProbeTrigger`] (the nginx error-log feed) can bring a probe forward. A shared
//! semaphore bounds the probes in flight; each task keeps its endpoint's connection alive
//! between probes. Due times fall on a shared 10 ms grid wherever the jitter allows, so the
//! probes of many endpoints share one wake-up of the runtime.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::probe::{Client, ProbeOutcome, ProbeTarget};
use super::state::{HealthState, Pace, Schedule};
use crate::config::HealthConfig;
use crate::model::{Address, UpstreamName};

/// The first probes of endpoints started together are spread over this much per endpoint…
const FIRST_PROBE_SPREAD_PER_ENDPOINT: Duration = Duration::from_millis(2);
/// …but over no more than this (nor than the interval), so startup is not held back.
const MAX_FIRST_PROBE_SPREAD: Duration = Duration::from_millis(200);
/// A floor under every period, so a zero can never turn a task into a busy loop.
const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// Probes are due on a shared grid of this step where one lies within their jitter, so that
/// the probes of many endpoints fire together: one wake-up of the runtime for dozens of
/// probes instead of one each (at 5,000 endpoints, 50 probes per tick).
const TICK: Duration = Duration::from_millis(10);

/// The result of one probe of one endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeReport {
    /// The upstream the endpoint belongs to.
    pub upstream: UpstreamName,
    /// The endpoint probed.
    pub address: Address,
    /// What the probe found.
    pub outcome: ProbeOutcome,
    /// From the start of the probe (connecting included) to its verdict; time spent waiting for
    /// a concurrency slot is not counted.
    pub latency: Duration,
}

/// Runs one probing task per endpoint and sends every result to the controller.
///
/// Must be used inside a tokio runtime. Dropping it aborts every task. Reports already in the
/// channel when an endpoint is removed still arrive: the receiver ignores endpoints it no
/// longer tracks.
pub struct Prober {
    tx: mpsc::Sender<ProbeReport>,
    permits: Arc<Semaphore>,
    upstreams: BTreeMap<UpstreamName, Probed>,
    trigger: ProbeTrigger,
    /// The origin of the [`TICK`] grid every task's probes fall on.
    epoch: Instant,
    #[cfg(test)]
    script: Option<Script>,
}

/// The probing of one upstream.
struct Probed {
    cfg: Arc<HealthConfig>,
    tasks: BTreeMap<Address, Running>,
}

/// One endpoint's task: its handle, and the bell that brings its next probe forward.
struct Running {
    task: AbortOnDrop,
    poke: Arc<Notify>,
}

/// Brings probes forward: the nginx error-log feed rings it when nginx reports an upstream
/// failure. Cheap to clone; a poke never decides anything, the probe it brings does.
///
/// A poke moves the endpoint's next probe to now, but never closer than `fast_interval` to
/// the start of its previous probe, so a flood of log lines costs at most one probe per
/// `fast_interval` per endpoint.
#[derive(Clone, Default)]
pub struct ProbeTrigger {
    bells: Arc<Mutex<BTreeMap<UpstreamName, Bells>>>,
}

/// The bells of one upstream's tasks, by endpoint.
type Bells = BTreeMap<Address, Arc<Notify>>;

impl ProbeTrigger {
    /// Asks for a probe of `address` in every upstream that probes it. Returns how many
    /// endpoints were poked (0 when the address is none of ours).
    pub fn endpoint(&self, address: &Address) -> usize {
        let bells = self.bells.lock().unwrap_or_else(PoisonError::into_inner);
        bells
            .values()
            .filter_map(|tasks| tasks.get(address))
            .map(|bell| bell.notify_one())
            .count()
    }

    /// Asks for a probe of every endpoint of the upstream named `name`. Returns how many.
    pub fn upstream(&self, name: &str) -> usize {
        let bells = self.bells.lock().unwrap_or_else(PoisonError::into_inner);
        bells
            .iter()
            .filter(|(upstream, _)| upstream.as_str() == name)
            .flat_map(|(_, tasks)| tasks.values())
            .map(|bell| bell.notify_one())
            .count()
    }

    fn set(&self, upstream: &UpstreamName, tasks: Option<&BTreeMap<Address, Running>>) {
        let mut bells = self.bells.lock().unwrap_or_else(PoisonError::into_inner);
        match tasks {
            Some(tasks) => {
                let of = tasks
                    .iter()
                    .map(|(a, r)| (a.clone(), Arc::clone(&r.poke)))
                    .collect();
                bells.insert(upstream.clone(), of);
            }
            None => {
                bells.remove(upstream);
            }
        }
    }
}

/// Canned probe results for the schedule tests: no sockets, so time can be paused.
#[cfg(test)]
type Script = Arc<dyn Fn(&Address) -> ProbeOutcome + Send + Sync>;

/// A task handle that aborts its task when dropped, so forgetting an endpoint stops its probes.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Prober {
    /// A prober sending reports to `tx`, with at most `max_concurrent` probes in flight
    /// (at least 1).
    pub fn new(tx: mpsc::Sender<ProbeReport>, max_concurrent: usize) -> Self {
        let permits = max_concurrent.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            tx,
            permits: Arc::new(Semaphore::new(permits)),
            upstreams: BTreeMap::new(),
            trigger: ProbeTrigger::default(),
            epoch: Instant::now(),
            #[cfg(test)]
            script: None,
        }
    }

    /// The trigger that brings this prober's probes forward.
    pub fn trigger(&self) -> ProbeTrigger {
        self.trigger.clone()
    }

    /// Makes the set of probed endpoints of `upstream` equal `addresses`: starts a task for
    /// each new address (first probe right away), aborts tasks of removed ones, restarts all
    /// of the upstream's tasks if `cfg` changed. Idempotent. With `cfg.enabled == false`,
    /// probes nothing.
    pub fn sync(
        &mut self,
        upstream: &UpstreamName,
        cfg: &HealthConfig,
        addresses: &BTreeSet<Address>,
    ) {
        if !cfg.enabled || addresses.is_empty() {
            self.remove_upstream(upstream);
            return;
        }
        let probed = match self.upstreams.entry(upstream.clone()) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(Probed {
                cfg: Arc::new(cfg.clone()),
                tasks: BTreeMap::new(),
            }),
        };

        let restarted = *probed.cfg != *cfg;
        if restarted {
            probed.tasks.clear();
            probed.cfg = Arc::new(cfg.clone());
        }
        let before = probed.tasks.len();
        probed
            .tasks
            .retain(|address, _| addresses.contains(address));
        let stopped = before - probed.tasks.len();

        let new: Vec<&Address> = addresses
            .iter()
            .filter(|a| !probed.tasks.contains_key(*a))
            .collect();
        let spread = first_probe_spread(new.len(), cfg.interval);
        for address in &new {
            let poke = Arc::new(Notify::new());
            let task = Task {
                upstream: upstream.clone(),
                address: (*address).clone(),
                cfg: Arc::clone(&probed.cfg),
                client: Client::new(),
                permits: Arc::clone(&self.permits),
                tx: self.tx.clone(),
                poke: Arc::clone(&poke),
                epoch: self.epoch,
                #[cfg(test)]
                script: self.script.clone(),
            };
            let first = rand::thread_rng().gen_range(Duration::ZERO..=spread);
            let task = AbortOnDrop(tokio::spawn(task.run(first)));
            probed
                .tasks
                .insert((*address).clone(), Running { task, poke });
        }
        if restarted || stopped > 0 || !new.is_empty() {
            self.trigger.set(upstream, Some(&probed.tasks));
        }
        if restarted || stopped > 0 || !new.is_empty() {
            tracing::debug!(
                %upstream, started = new.len(), stopped, restarted, probed = probed.tasks.len(),
                "Health probes synced."
            );
        }
    }

    /// Stops probing every endpoint of `upstream`.
    pub fn remove_upstream(&mut self, upstream: &UpstreamName) {
        self.trigger.set(upstream, None);
        if let Some(probed) = self.upstreams.remove(upstream) {
            tracing::debug!(%upstream, stopped = probed.tasks.len(), "Health probes stopped.");
        }
    }

    /// The number of probing tasks still running.
    pub fn probed(&self) -> usize {
        self.upstreams
            .values()
            .flat_map(|p| p.tasks.values())
            .filter(|t| !t.task.0.is_finished())
            .count()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        // Each task handle aborts its task when dropped.
        self.upstreams.clear();
        self.trigger
            .bells
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// Everything one endpoint's task needs, shared with its siblings where possible.
struct Task {
    upstream: UpstreamName,
    address: Address,
    cfg: Arc<HealthConfig>,
    /// The task's own keep-alive connection.
    client: Client,
    permits: Arc<Semaphore>,
    tx: mpsc::Sender<ProbeReport>,
    /// Rung by the [`ProbeTrigger`].
    poke: Arc<Notify>,
    /// The origin of the [`TICK`] grid.
    epoch: Instant,
    #[cfg(test)]
    script: Option<Script>,
}

impl Task {
    /// Probes after `first`, then at the pace of the endpoint's health, until the receiver is
    /// gone; a poke brings the next probe forward.
    async fn run(self, first: Duration) {
        let target = ProbeTarget::new(&self.address, &self.cfg);
        let schedule = schedule(&self.cfg);
        let mut verdict = HealthState::new();
        let mut last_start: Option<Instant> = None;
        // One timer, re-armed each round: no allocation per probe.
        let sleep = tokio::time::sleep(first);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = sleep.as_mut() => {}
                () = self.poke.notified() => {
                    let at = poked_due(Instant::now(), last_start, schedule.fast_interval);
                    if at < sleep.deadline() {
                        sleep.as_mut().reset(at);
                    }
                    continue;
                }
            }
            let due = sleep.deadline();
            if self.tx.is_closed() {
                return;
            }
            let (outcome, latency) = {
                let Ok(_permit) = self.permits.acquire().await else {
                    return; // Never closed; if it were, no probe could run again.
                };
                let started = Instant::now();
                last_start = Some(started);
                let outcome = self.check(&target).await;
                (outcome, started.elapsed())
            };
            verdict.observe(outcome.is_ok(), self.cfg.rise, self.cfg.fall);
            let report = ProbeReport {
                upstream: self.upstream.clone(),
                address: self.address.clone(),
                outcome,
                latency,
            };
            if self.tx.send(report).await.is_err() {
                return; // The controller is gone; nobody needs probes any more.
            }
            let (pace, period) = verdict.next_delay(&schedule);
            let (shortest, longest) = jitter_range(pace, period);
            let delay = jittered(pace, period);
            let at = next_due(due, Instant::now(), delay);
            let (earliest, latest) = (at - (delay - shortest), at + (longest - delay));
            sleep
                .as_mut()
                .reset(on_tick(at, earliest, latest, self.epoch));
        }
    }

    /// One probe of the endpoint.
    async fn check(&self, target: &Result<ProbeTarget, ProbeOutcome>) -> ProbeOutcome {
        #[cfg(test)]
        if let Some(script) = &self.script {
            return script(&self.address);
        }
        match target {
            // Boxed: the probe's state (a few KiB) exists only while it runs, and the task's
            // future stays small while it sleeps, times 10,000 endpoints.
            Ok(target) => Box::pin(target.probe(&self.client, &self.cfg)).await,
            Err(outcome) => outcome.clone(),
        }
    }
}

/// The three periods of `cfg`, each at least [`MIN_INTERVAL`].
fn schedule(cfg: &HealthConfig) -> Schedule {
    Schedule {
        interval: cfg.interval.max(MIN_INTERVAL),
        fast_interval: cfg.fast_interval.max(MIN_INTERVAL),
        down_interval: cfg.down_interval.max(MIN_INTERVAL),
    }
}

/// When a poked endpoint is probed: now, unless its last probe started less than
/// `fast_interval` ago; then when that much has passed.
fn poked_due(now: Instant, last_start: Option<Instant>, fast_interval: Duration) -> Instant {
    match last_start {
        Some(start) => now.max(start + fast_interval),
        None => now,
    }
}

/// How far apart the first probes of `new` endpoints started at once are spread: a single new
/// endpoint is probed almost at once, ten thousand do not all fire in the same millisecond.
fn first_probe_spread(new: usize, interval: Duration) -> Duration {
    let per_endpoint =
        FIRST_PROBE_SPREAD_PER_ENDPOINT.saturating_mul(u32::try_from(new).unwrap_or(u32::MAX));
    per_endpoint.min(MAX_FIRST_PROBE_SPREAD).min(interval)
}

/// `period` ±10%, so endpoints started together drift apart instead of firing in lockstep. At
/// the fast pace only downwards (−10%…0), so the documented detection bound holds as written.
fn jittered(pace: Pace, period: Duration) -> Duration {
    let (shortest, longest) = jitter_range(pace, period);
    rand::thread_rng().gen_range(shortest..=longest)
}

/// The shortest and longest delay [`jittered`] gives.
fn jitter_range(pace: Pace, period: Duration) -> (Duration, Duration) {
    let most = if pace == Pace::Fast { 1.0 } else { 1.1 };
    (period.mul_f64(0.9), period.mul_f64(most))
}

/// `at` moved onto the [`TICK`] grid counted from `epoch`: the grid point at or before it if
/// that is not before `earliest`, else the next one if that is not after `latest`, else `at`
/// itself (a jitter range narrower than a tick).
fn on_tick(at: Instant, earliest: Instant, latest: Instant, epoch: Instant) -> Instant {
    let Some(since) = at.checked_duration_since(epoch) else {
        return at;
    };
    let ticks = since.as_nanos() / TICK.as_nanos();
    let Ok(ticks) = u32::try_from(ticks) else {
        return at;
    };
    let below = epoch + TICK * ticks;
    if below >= earliest {
        below
    } else if below + TICK <= latest {
        below + TICK
    } else {
        at
    }
}

/// When the next probe is due, `period` after the one `due` at the time; if that moment has
/// already passed (a slow probe, a full channel), `period` from `now`. This is
/// `MissedTickBehavior::Delay`: a late probe pushes the next ones back, never a burst.
fn next_due(due: Instant, now: Instant, period: Duration) -> Instant {
    let next = due + period;
    if next > now {
        next
    } else {
        now + period
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::get;
    use axum::{Json, Router};
    use tokio::sync::mpsc::error::TryRecvError;
    use tokio::time::{sleep, timeout};

    use super::*;
    use crate::health::probe::tests::health;

    fn name(s: &str) -> UpstreamName {
        UpstreamName::new(s).unwrap()
    }

    /// Kotaemon-like backends on 127.0.0.1 that count the probes in flight.
    #[derive(Clone, Default)]
    struct Load {
        in_flight: Arc<AtomicUsize>,
        most: Arc<AtomicUsize>,
        requests: Arc<AtomicUsize>,
        delay: Duration,
    }

    async fn queue_status(State(load): State<Load>) -> Json<serde_json::Value> {
        load.requests.fetch_add(1, Ordering::SeqCst);
        let now = load.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        load.most.fetch_max(now, Ordering::SeqCst);
        sleep(load.delay).await;
        load.in_flight.fetch_sub(1, Ordering::SeqCst);
        Json(serde_json::json!({"msg": "estimation", "queue_size": 0}))
    }

    /// `n` backends, each on its own port, answering `/queue/status` after `delay` and 404
    /// elsewhere.
    async fn backends(n: usize, delay: Duration) -> (BTreeSet<Address>, Load) {
        let load = Load {
            delay,
            ..Load::default()
        };
        let app = Router::new()
            .route("/queue/status", get(queue_status))
            .fallback(|| async {
                (
                    StatusCode::NOT_FOUND,
                    Json(serde_json::json!({"detail": "Not Found"})),
                )
            })
            .with_state(load.clone());
        let mut addresses = BTreeSet::new();
        for _ in 0..n {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            addresses.insert(Address::from_parts("127.0.0.1", port).unwrap());
            let app = app.clone();
            tokio::spawn(async move {
                axum::serve(
                    listener,
                    app.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .await
                .unwrap();
            });
        }
        (addresses, load)
    }

    fn every(interval_ms: u64) -> HealthConfig {
        HealthConfig {
            interval: Duration::from_millis(interval_ms),
            ..health("/queue/status")
        }
    }

    /// A config whose probes fail before any I/O (an invalid Host header), so the schedule
    /// can be tested without backends.
    fn unprobeable(interval: Duration) -> HealthConfig {
        HealthConfig {
            host: Some("bad\nhost".into()),
            interval,
            ..health("/queue/status")
        }
    }

    fn fake_addresses(n: u16) -> BTreeSet<Address> {
        (1..=n)
            .map(|port| Address::from_parts("127.0.0.1", port).unwrap())
            .collect()
    }

    async fn next(rx: &mut mpsc::Receiver<ProbeReport>) -> ProbeReport {
        // A hang guard for a shared machine, not a latency claim.
        timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("a report within 20 s")
            .expect("the prober is alive")
    }

    /// Every report received during `period`, counted per address.
    async fn collect(
        rx: &mut mpsc::Receiver<ProbeReport>,
        period: Duration,
    ) -> BTreeMap<Address, usize> {
        let mut seen = BTreeMap::new();
        let end = Instant::now() + period;
        while let Ok(Some(report)) = tokio::time::timeout_at(end, rx.recv()).await {
            *seen.entry(report.address).or_default() += 1;
        }
        seen
    }

    fn drain_now(rx: &mut mpsc::Receiver<ProbeReport>) {
        while rx.try_recv().is_ok() {}
    }

    #[tokio::test]
    async fn sync_starts_one_task_per_address_and_the_first_reports_arrive_promptly() {
        let (addresses, _) = backends(3, Duration::ZERO).await;
        let (tx, mut rx) = mpsc::channel(64);
        let mut prober = Prober::new(tx, 8);
        let started = Instant::now();
        prober.sync(&name("kotaemon"), &every(10_000), &addresses);
        assert_eq!(prober.probed(), 3);
        let mut reported = BTreeSet::new();
        for _ in 0..3 {
            let report = next(&mut rx).await;
            assert_eq!(report.upstream, name("kotaemon"));
            assert_eq!(report.outcome, ProbeOutcome::Ok);
            reported.insert(report.address);
        }
        assert_eq!(reported, addresses);
        // How prompt is a figure for the log, not an assert: the machine is shared.
        eprintln!("figure: three first reports in {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn sync_with_the_same_arguments_changes_nothing() {
        let (addresses, load) = backends(2, Duration::ZERO).await;
        let (tx, mut rx) = mpsc::channel(64);
        let mut prober = Prober::new(tx, 8);
        prober.sync(&name("kotaemon"), &every(10_000), &addresses);
        next(&mut rx).await;
        next(&mut rx).await;
        prober.sync(&name("kotaemon"), &every(10_000), &addresses);
        assert_eq!(prober.probed(), 2);
        assert!(collect(&mut rx, Duration::from_millis(300))
            .await
            .is_empty());
        assert_eq!(load.requests.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn removing_an_address_stops_its_reports() {
        let (addresses, _) = backends(2, Duration::ZERO).await;
        let (tx, mut rx) = mpsc::channel(64);
        let mut prober = Prober::new(tx, 8);
        prober.sync(&name("kotaemon"), &every(100), &addresses);
        let before = collect(&mut rx, Duration::from_millis(350)).await;
        assert_eq!(before.len(), 2, "{before:?}");

        let kept: BTreeSet<Address> = addresses.iter().take(1).cloned().collect();
        prober.sync(&name("kotaemon"), &every(100), &kept);
        assert_eq!(prober.probed(), 1);
        drain_now(&mut rx);
        let after = collect(&mut rx, Duration::from_millis(500)).await;
        assert_eq!(
            after.keys().cloned().collect::<BTreeSet<_>>(),
            kept,
            "{after:?}"
        );
    }

    #[tokio::test]
    async fn a_config_change_restarts_the_tasks() {
        let (addresses, _) = backends(2, Duration::ZERO).await;
        let (tx, mut rx) = mpsc::channel(64);
        let mut prober = Prober::new(tx, 8);
        prober.sync(&name("kotaemon"), &every(10_000), &addresses);
        assert_eq!(next(&mut rx).await.outcome, ProbeOutcome::Ok);
        assert_eq!(next(&mut rx).await.outcome, ProbeOutcome::Ok);

        // Real Kotaemon has no /health: the restarted tasks probe the new path at once.
        let changed = HealthConfig {
            path: "/health".into(),
            ..every(10_000)
        };
        prober.sync(&name("kotaemon"), &changed, &addresses);
        assert_eq!(prober.probed(), 2);
        let mut reported = BTreeSet::new();
        for _ in 0..2 {
            let report = next(&mut rx).await;
            assert_eq!(report.outcome, ProbeOutcome::BadStatus(404));
            reported.insert(report.address);
        }
        assert_eq!(reported, addresses);
    }

    #[tokio::test]
    async fn reports_keep_flowing_at_about_the_interval() {
        let (addresses, _) = backends(1, Duration::ZERO).await;
        let (tx, mut rx) = mpsc::channel(64);
        let mut prober = Prober::new(tx, 8);
        let synced = Instant::now();
        prober.sync(&name("kotaemon"), &every(100), &addresses);
        let mut at = Vec::new();
        for _ in 0..8 {
            let report = next(&mut rx).await;
            assert_eq!(report.outcome, ProbeOutcome::Ok);
            at.push(Instant::now());
        }
        let mut gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        gaps.sort();
        let median = gaps[gaps.len() / 2];
        // One every 90–110 ms, each due counted from the one before, so the eighth cannot start
        // before 7 × 90 ms: a bound a busy machine cannot break (it only makes probes late),
        // which a task probing in a loop would. How close to 100 ms is a figure for the log.
        eprintln!("figure: median gap between reports at a 100 ms interval: {median:?}");
        let eighth = at[7] - synced;
        assert!(
            eighth >= Duration::from_millis(600),
            "eight reports in {eighth:?}"
        );
    }

    // Paused time: the probes fail before any I/O (an invalid Host), so every report comes at
    // the virtual instant its first delay ends, and the bounds below are exact.
    #[tokio::test(start_paused = true)]
    async fn first_probes_of_many_new_endpoints_are_spread_but_prompt() {
        let (tx, mut rx) = mpsc::channel(1024);
        let mut prober = Prober::new(tx, 1000);
        let started = Instant::now();
        prober.sync(
            &name("kotaemon"),
            &unprobeable(Duration::from_secs(10)),
            &fake_addresses(500),
        );
        assert_eq!(prober.probed(), 500);
        let mut millis = BTreeSet::new();
        for _ in 0..500 {
            let report = next(&mut rx).await;
            assert!(
                matches!(report.outcome, ProbeOutcome::Error(_)),
                "{report:?}"
            );
            millis.insert((Instant::now() - started).as_millis());
        }
        let last = *millis.last().unwrap();
        // 200 ms of spread, in virtual time.
        assert!(last <= 200, "the last first probe came after {last} ms");
        // Without the spread, all 500 would come within a few milliseconds.
        assert!(
            millis.len() > 50,
            "only {} distinct milliseconds",
            millis.len()
        );
    }

    #[tokio::test]
    async fn the_semaphore_bounds_concurrent_probes() {
        let (addresses, load) = backends(12, Duration::from_millis(50)).await;
        let (tx, mut rx) = mpsc::channel(256);
        let mut prober = Prober::new(tx, 3);
        prober.sync(&name("kotaemon"), &every(100), &addresses);
        let seen = collect(&mut rx, Duration::from_millis(800)).await;
        assert_eq!(seen.len(), 12, "every endpoint gets its turn: {seen:?}");
        // Twelve endpoints want to be probed at once; three may be.
        assert_eq!(load.most.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn disabled_health_probes_nothing() {
        let (addresses, load) = backends(2, Duration::ZERO).await;
        let (tx, mut rx) = mpsc::channel(64);
        let mut prober = Prober::new(tx, 8);
        prober.sync(&name("kotaemon"), &every(100), &addresses);
        next(&mut rx).await;

        let disabled = HealthConfig {
            enabled: false,
            ..every(100)
        };
        prober.sync(&name("kotaemon"), &disabled, &addresses);
        assert_eq!(prober.probed(), 0);
        // A request already on the wire when its task was aborted may still reach the server.
        sleep(Duration::from_millis(50)).await;
        drain_now(&mut rx);
        let requests = load.requests.load(Ordering::SeqCst);
        assert!(collect(&mut rx, Duration::from_millis(300))
            .await
            .is_empty());
        assert_eq!(load.requests.load(Ordering::SeqCst), requests);
    }

    #[tokio::test]
    async fn removing_an_upstream_stops_only_its_probes() {
        let (addresses, _) = backends(2, Duration::ZERO).await;
        let (tx, mut rx) = mpsc::channel(64);
        let mut prober = Prober::new(tx, 8);
        prober.sync(&name("kotaemon"), &every(100), &addresses);
        prober.sync(&name("other"), &every(100), &addresses);
        assert_eq!(prober.probed(), 4);
        prober.remove_upstream(&name("kotaemon"));
        assert_eq!(prober.probed(), 2);
        drain_now(&mut rx);
        let end = Instant::now() + Duration::from_millis(300);
        let mut reports = 0;
        while let Ok(Some(report)) = tokio::time::timeout_at(end, rx.recv()).await {
            assert_eq!(report.upstream, name("other"));
            reports += 1;
        }
        assert!(reports >= 2);
    }

    #[tokio::test]
    async fn tasks_end_quietly_when_the_receiver_is_gone() {
        let (addresses, _) = backends(2, Duration::ZERO).await;
        let (tx, rx) = mpsc::channel(64);
        let mut prober = Prober::new(tx, 8);
        prober.sync(&name("kotaemon"), &every(50), &addresses);
        drop(rx);
        timeout(Duration::from_secs(2), async {
            while prober.probed() > 0 {
                sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("every task ends");
    }

    #[tokio::test]
    async fn dropping_the_prober_aborts_every_task() {
        let (addresses, _) = backends(3, Duration::ZERO).await;
        let (tx, mut rx) = mpsc::channel(64);
        let mut prober = Prober::new(tx, 8);
        prober.sync(&name("kotaemon"), &every(50), &addresses);
        next(&mut rx).await;
        drop(prober);
        drain_now(&mut rx);
        // Every sender lived in the prober or its tasks: the channel closes once they are gone.
        let closed = timeout(Duration::from_secs(1), async {
            loop {
                match rx.try_recv() {
                    Err(TryRecvError::Disconnected) => return,
                    Ok(_) | Err(TryRecvError::Empty) => sleep(Duration::from_millis(5)).await,
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a task is still running");
    }

    /// A prober whose probes return the next of `results` (then failures), with no I/O, so
    /// the schedule can be watched under paused time.
    fn scripted(results: &[bool]) -> (Prober, mpsc::Receiver<ProbeReport>) {
        let queue = Arc::new(Mutex::new(results.to_vec()));
        let (tx, rx) = mpsc::channel(64);
        let mut prober = Prober::new(tx, 8);
        prober.script = Some(Arc::new(move |_: &Address| {
            let mut queue = queue.lock().unwrap();
            match (!queue.is_empty()).then(|| queue.remove(0)) {
                Some(true) => ProbeOutcome::Ok,
                _ => ProbeOutcome::Timeout,
            }
        }));
        (prober, rx)
    }

    /// Probes every 1 s, 200 ms in doubt, 4 s while down; rise = fall = 2.
    fn paced() -> HealthConfig {
        HealthConfig {
            interval: Duration::from_secs(1),
            fast_interval: Duration::from_millis(200),
            down_interval: Duration::from_secs(4),
            rise: 2,
            fall: 2,
            ..health("/queue/status")
        }
    }

    /// The gaps between the first `n` reports, in milliseconds.
    async fn gaps_ms(rx: &mut mpsc::Receiver<ProbeReport>, n: usize) -> Vec<u128> {
        let mut at = Vec::new();
        for _ in 0..n {
            next(rx).await;
            at.push(Instant::now());
        }
        at.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect()
    }

    fn within(gap: u128, low: u128, high: u128) -> bool {
        (low..=high).contains(&gap)
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_while_up_brings_the_next_probe_sooner_and_a_dead_endpoint_waits_longer() {
        let (mut prober, mut rx) = scripted(&[true, true, false, false, false]);
        prober.sync(&name("kotaemon"), &paced(), &fake_addresses(1));
        let gaps = gaps_ms(&mut rx, 5).await;
        // up, up (1 s), fail in doubt (1 s), fail → down (200 ms), still down (4 s).
        assert!(within(gaps[0], 900, 1100), "{gaps:?}");
        assert!(within(gaps[1], 900, 1100), "{gaps:?}");
        assert!(within(gaps[2], 180, 200), "{gaps:?}");
        assert!(within(gaps[3], 3600, 4400), "{gaps:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_while_down_brings_the_next_probe_sooner() {
        let (mut prober, mut rx) = scripted(&[false, true, true, true]);
        prober.sync(&name("kotaemon"), &paced(), &fake_addresses(1));
        let gaps = gaps_ms(&mut rx, 4).await;
        // down (4 s), success in doubt (200 ms), success → up (1 s).
        assert!(within(gaps[0], 3600, 4400), "{gaps:?}");
        assert!(within(gaps[1], 180, 200), "{gaps:?}");
        assert!(within(gaps[2], 900, 1100), "{gaps:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_poke_probes_at_once_but_not_twice_within_fast_interval() {
        let (mut prober, mut rx) = scripted(&[true; 10]);
        let slow = HealthConfig {
            interval: Duration::from_secs(60),
            down_interval: Duration::from_secs(60),
            ..paced()
        };
        let address = fake_addresses(1).pop_first().unwrap();
        prober.sync(&name("kotaemon"), &slow, &fake_addresses(1));
        next(&mut rx).await;
        let trigger = prober.trigger();
        sleep(Duration::from_secs(5)).await;

        let poked = Instant::now();
        assert_eq!(trigger.endpoint(&address), 1);
        next(&mut rx).await;
        assert_eq!(Instant::now(), poked, "the poked probe comes at once");

        // A second poke right after waits out fast_interval from the poked probe's start.
        assert_eq!(trigger.upstream("kotaemon"), 1);
        next(&mut rx).await;
        assert_eq!(Instant::now() - poked, Duration::from_millis(200));

        // Pokes for addresses and upstreams that are not ours reach nobody.
        let other = Address::from_parts("127.0.0.9", 1).unwrap();
        assert_eq!(trigger.endpoint(&other), 0);
        assert_eq!(trigger.upstream("other"), 0);
        prober.remove_upstream(&name("kotaemon"));
        assert_eq!(trigger.endpoint(&address), 0);
    }

    #[test]
    fn the_first_probe_of_a_single_new_endpoint_is_prompt() {
        assert!(first_probe_spread(1, Duration::from_secs(2)) <= Duration::from_millis(50));
        assert_eq!(
            first_probe_spread(0, Duration::from_secs(2)),
            Duration::ZERO
        );
    }

    #[test]
    fn first_probes_of_many_spread_over_at_most_200ms_or_the_interval() {
        assert_eq!(
            first_probe_spread(10_000, Duration::from_secs(1)),
            MAX_FIRST_PROBE_SPREAD
        );
        assert_eq!(
            first_probe_spread(10_000, Duration::from_millis(50)),
            Duration::from_millis(50)
        );
        assert_eq!(
            first_probe_spread(usize::MAX, Duration::from_secs(1)),
            MAX_FIRST_PROBE_SPREAD
        );
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let interval = Duration::from_secs(1);
        for pace in [Pace::Steady, Pace::Down] {
            for _ in 0..1000 {
                let j = jittered(pace, interval);
                assert!(
                    (Duration::from_millis(900)..=Duration::from_millis(1100)).contains(&j),
                    "{j:?}"
                );
            }
        }
    }

    #[test]
    fn jitter_at_the_fast_pace_only_shortens() {
        let fast = Duration::from_millis(200);
        for _ in 0..1000 {
            let j = jittered(Pace::Fast, fast);
            assert!((Duration::from_millis(180)..=fast).contains(&j), "{j:?}");
        }
    }

    #[test]
    fn probes_due_within_the_same_tick_fire_together_and_stay_within_their_jitter() {
        let epoch = Instant::now();
        let ms = Duration::from_millis;
        let wide = |at: Instant| on_tick(at, at - ms(100), at + ms(100), epoch);
        // Everything due in (1000, 1010) ms runs at 1000 ms.
        for due in [1000, 1001, 1005, 1009] {
            assert_eq!(wide(epoch + ms(due)), epoch + ms(1000), "due at {due} ms");
        }
        assert_eq!(wide(epoch + ms(1010)), epoch + ms(1010));
        // The tick below is before the earliest allowed moment: the tick above, if allowed.
        let at = epoch + ms(1005);
        assert_eq!(on_tick(at, at, at + ms(5), epoch), epoch + ms(1010));
        // No tick within the range: as asked.
        assert_eq!(on_tick(at, at - ms(2), at + ms(2), epoch), at);
        // Before the epoch: as asked.
        let early = epoch - ms(3);
        assert_eq!(wide(early), early);
    }

    #[test]
    fn a_poke_is_due_now_unless_the_last_probe_started_within_fast_interval() {
        let now = Instant::now();
        let fast = Duration::from_millis(200);
        assert_eq!(poked_due(now, None, fast), now);
        assert_eq!(
            poked_due(now, Some(now - Duration::from_secs(1)), fast),
            now
        );
        let recent = now - Duration::from_millis(50);
        assert_eq!(poked_due(now, Some(recent), fast), recent + fast);
    }

    #[test]
    fn a_late_probe_pushes_the_next_one_back_instead_of_bursting() {
        let due = Instant::now();
        let period = Duration::from_secs(1);
        assert_eq!(
            next_due(due, due + Duration::from_millis(30), period),
            due + period
        );
        let late = due + Duration::from_millis(2500);
        assert_eq!(next_due(due, late, period), late + period);
    }
}
