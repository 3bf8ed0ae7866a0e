//! The reconcile loop in process: static sources, probing off, a fake `Nginx` that records
//! when it was asked to test and reload, and tokio's paused clock. Changes arrive as config
//! reloads (a new static list), as a SIGHUP would bring them.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::unistd::Pid;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::schedule::{RETRY_FIRST, RETRY_JITTER};
use super::status::{ControllerHandle, StatusReport};
use super::{Controller, ControllerError, Mode, Outcome};
use crate::config::Config;
use crate::metrics::labels::{RenderLabels, RenderResult};
use crate::metrics::Metrics;
use crate::nginx::{Nginx, NginxError, OldGenerations, ReloadProof};
use crate::render::Renderer;

/// Records calls with the (paused) time they came; fails `test()` while `failing_tests` > 0.
#[derive(Clone, Default)]
struct FakeNginx {
    calls: Arc<Mutex<Vec<(&'static str, Instant)>>>,
    failing_tests: Arc<AtomicUsize>,
    /// Reloads that wait out a 5 s confirm_timeout and fail, as a stopped master makes them.
    unconfirmed_reloads: Arc<AtomicUsize>,
    /// The old worker generations `old_generations()` reports (two workers each).
    old_generations: Arc<AtomicUsize>,
}

impl FakeNginx {
    fn times(&self, call: &str) -> Vec<Instant> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .filter(|(c, _)| *c == call)
            .map(|(_, t)| *t)
            .collect()
    }
}

impl Nginx for FakeNginx {
    async fn test(&self) -> Result<(), NginxError> {
        self.calls.lock().unwrap().push(("test", Instant::now()));
        let failing = self.failing_tests.load(Ordering::SeqCst);
        if failing > 0 {
            self.failing_tests.store(failing - 1, Ordering::SeqCst);
            return Err(NginxError::CommandFailed {
                command: "nginx -t".into(),
                reason: "exited with 1: [emerg] the site config is broken".into(),
            });
        }
        Ok(())
    }

    async fn reload(&self) -> Result<ReloadProof, NginxError> {
        self.calls.lock().unwrap().push(("reload", Instant::now()));
        let failing = self.unconfirmed_reloads.load(Ordering::SeqCst);
        if failing > 0 {
            self.unconfirmed_reloads
                .store(failing - 1, Ordering::SeqCst);
            tokio::time::sleep(CONFIRM_TIMEOUT).await;
            return Err(NginxError::Unconfirmed {
                master: Pid::from_raw(1),
                waited: CONFIRM_TIMEOUT,
            });
        }
        Ok(ReloadProof {
            master: Pid::from_raw(1),
            old_workers: [2].into(),
            new_workers: [3].into(),
        })
    }

    async fn old_generations(&self) -> Result<OldGenerations, NginxError> {
        let generations = self.old_generations.load(Ordering::SeqCst);
        Ok(OldGenerations {
            generations,
            workers: generations * 2,
        })
    }
}

const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

fn config(dir: &Path, servers: &[&str], extra: &str) -> Config {
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    let text = format!(
        "[nginx]\noutput = \"{}\"\ntest_command = []\n{extra}\n\
         [[upstream]]\nname = \"k\"\n[upstream.health]\nenabled = false\n\
         [[upstream.source]]\nkind = \"static\"\nservers = [{}]\n",
        dir.join("upstreams.conf").display(),
        servers.join(", ")
    );
    crate::config::parse(&text, &|_| None).unwrap()
}

/// A running loop and what a test needs to drive and watch it.
struct Loop {
    dir: tempfile::TempDir,
    nginx: FakeNginx,
    reloads: mpsc::Sender<Config>,
    handle: ControllerHandle,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    extra: String,
}

impl Loop {
    fn start(servers: &[&str], extra: &str, failing_tests: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), servers, extra);
        let renderer = Renderer::new(cfg.nginx.template.as_deref()).unwrap();
        let nginx = FakeNginx::default();
        nginx.failing_tests.store(failing_tests, Ordering::SeqCst);
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let c = Controller::new(
            cfg,
            renderer,
            nginx.clone(),
            Arc::clone(&metrics),
            shutdown.clone(),
        );
        let handle = c.handle();
        let (reloads, rx) = mpsc::channel(4);
        tokio::spawn(c.run(Mode::Run, rx));
        Loop {
            dir,
            nginx,
            reloads,
            handle,
            metrics,
            shutdown,
            extra: extra.into(),
        }
    }

    /// Sends a config with `servers` as a SIGHUP would; returns when it was sent.
    async fn set_servers(&self, servers: &[&str]) -> Instant {
        let cfg = config(self.dir.path(), servers, &self.extra);
        self.reloads.send(cfg).await.unwrap();
        Instant::now()
    }

    async fn status(&self) -> StatusReport {
        self.handle.status(Duration::from_secs(5)).await.unwrap()
    }

    /// Waits (in paused time, bounded) until `call` was made `n` times.
    async fn wait_calls(&self, call: &str, n: usize) -> Vec<Instant> {
        for _ in 0..10_000 {
            let times = self.nginx.times(call);
            if times.len() >= n {
                return times;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!(
            "{call} was called {} times, not {n}",
            self.nginx.times(call).len()
        );
    }

    fn file(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("upstreams.conf")).unwrap_or_default()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

const SLOW_SETTLE: &str = "settle = \"5s\"\nmin_reload_interval = \"2s\"";

#[tokio::test(start_paused = true)]
async fn an_addition_waits_for_settle_and_a_removal_does_not() {
    let l = Loop::start(&["127.0.0.2:80", "127.0.0.3:80"], SLOW_SETTLE, 0);
    l.wait_calls("reload", 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let added = l
        .set_servers(&["127.0.0.2:80", "127.0.0.3:80", "127.0.0.4:80"])
        .await;
    let at = l.wait_calls("reload", 2).await[1];
    assert!(
        at >= added + Duration::from_secs(5),
        "an addition coalesces for settle"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    let removed = l.set_servers(&["127.0.0.2:80", "127.0.0.4:80"]).await;
    let at = l.wait_calls("reload", 3).await[2];
    assert!(
        at < removed + Duration::from_secs(1),
        "a removal is applied without settle: {:?}",
        at - removed
    );
    assert!(!l.file().contains("127.0.0.3:80"));
}

#[tokio::test(start_paused = true)]
async fn an_addition_waits_while_old_generations_linger_and_a_removal_goes_at_once() {
    let l = Loop::start(
        &["127.0.0.2:80", "127.0.0.3:80"],
        "settle = \"250ms\"\nmin_reload_interval = \"1s\"\nmax_old_generations = 1",
        0,
    );
    l.wait_calls("reload", 1).await;
    l.nginx.old_generations.store(2, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;

    l.set_servers(&["127.0.0.2:80", "127.0.0.3:80", "127.0.0.4:80"])
        .await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(l.nginx.times("reload").len(), 1, "the addition waits");
    let st = l.status().await;
    assert_eq!(st.apply.state, "held");
    assert!(
        st.apply
            .held
            .as_deref()
            .unwrap()
            .contains("2 old nginx worker generations"),
        "{:?}",
        st.apply
    );
    assert_eq!(st.old_generations.map(|g| g.generations), Some(2));
    assert_eq!(l.metrics.apply_pending.get(), 1);
    assert_eq!(l.metrics.apply_held.get(), 1);
    assert_eq!(l.metrics.nginx_old_generations.get(), 2);
    assert_eq!(l.metrics.nginx_old_workers.get(), 4);

    // A removal (with the held addition in the same file) goes at once.
    let removed = l.set_servers(&["127.0.0.2:80", "127.0.0.4:80"]).await;
    let at = l.wait_calls("reload", 2).await[1];
    assert!(
        at < removed + Duration::from_secs(1),
        "a removal does not wait for old generations: {:?}",
        at - removed
    );
    assert!(l.file().contains("127.0.0.4:80") && !l.file().contains("127.0.0.3:80"));

    // Another addition waits until the generations leave, then goes within a poll.
    tokio::time::sleep(Duration::from_secs(3)).await;
    l.set_servers(&["127.0.0.2:80", "127.0.0.4:80", "127.0.0.5:80"])
        .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        l.nginx.times("reload").len(),
        2,
        "the second addition waits"
    );
    l.nginx.old_generations.store(1, Ordering::SeqCst);
    let left = Instant::now();
    let at = l.wait_calls("reload", 3).await[2];
    assert!(at <= left + super::generations::POLL, "{:?}", at - left);
    let st = l.status().await;
    assert_eq!((st.apply.state, st.apply.held), ("in_sync", None));
    assert_eq!(l.metrics.apply_held.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn without_max_old_generations_an_addition_does_not_wait_for_old_generations() {
    let l = Loop::start(&["127.0.0.2:80"], "settle = \"250ms\"", 0);
    l.wait_calls("reload", 1).await;
    l.nginx.old_generations.store(7, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    l.set_servers(&["127.0.0.2:80", "127.0.0.3:80"]).await;
    l.wait_calls("reload", 2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(l.metrics.nginx_old_generations.get(), 7);
    assert_eq!(l.status().await.max_old_generations, 0);
}

#[tokio::test(start_paused = true)]
async fn two_removals_100ms_apart_cost_two_reloads_spaced_by_min_reload_interval() {
    let l = Loop::start(
        &["127.0.0.2:80", "127.0.0.3:80", "127.0.0.4:80"],
        SLOW_SETTLE,
        0,
    );
    l.wait_calls("reload", 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let first = l.set_servers(&["127.0.0.2:80", "127.0.0.4:80"]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    l.set_servers(&["127.0.0.2:80"]).await;
    let times = l.wait_calls("reload", 3).await;
    assert!(
        times[1] < first + Duration::from_secs(1),
        "the first at once"
    );
    assert!(
        times[2] >= times[1] + Duration::from_secs(2),
        "the second after min_reload_interval"
    );
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(l.nginx.times("reload").len(), 3, "no more reloads");
    assert_eq!(
        super::changes::parse_servers(&l.file())["k"].len(),
        1,
        "{}",
        l.file()
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_apply_is_retried_with_a_growing_backoff_until_it_succeeds() {
    let l = Loop::start(
        &["127.0.0.2:80"],
        "settle = \"10ms\"\nmin_reload_interval = \"10ms\"",
        3,
    );
    let first = l.wait_calls("test", 1).await[0];
    tokio::time::sleep(Duration::from_millis(50)).await;
    let st = l.status().await;
    assert_eq!(st.apply.state, "retrying");
    assert_eq!(st.apply.consecutive_failures, 1);
    assert!(st.change_pending);
    assert!(st
        .apply
        .last_error
        .as_deref()
        .unwrap()
        .contains("site config is broken"));
    assert_eq!(l.metrics.apply_pending.get(), 1);
    assert_eq!(l.metrics.apply_failures.get(), 1);

    let tests = l.wait_calls("test", 4).await;
    let reload = l.wait_calls("reload", 1).await[0];
    assert!(reload >= tests[3]);
    let mut previous = first;
    for (n, t) in tests[1..].iter().enumerate() {
        let ceiling = RETRY_FIRST * (1 << n);
        let gap = *t - previous;
        assert!(
            gap >= ceiling.mul_f64(1.0 - RETRY_JITTER)
                && gap <= ceiling + Duration::from_millis(50),
            "retry {n} came after {gap:?}, not about {ceiling:?}"
        );
        previous = *t;
    }
    let st = l.status().await;
    assert_eq!((st.apply.state, st.apply.on_disk), ("in_sync", "desired"));
    assert!(!st.change_pending && st.ready);
    assert_eq!(l.metrics.apply_pending.get(), 0);
    assert_eq!(l.metrics.apply_failures.get(), 0);
    assert!(l.file().contains("server 127.0.0.2:80;"));
}

#[tokio::test(start_paused = true)]
async fn the_pulse_says_ready_only_once_the_first_file_is_applied() {
    let l = Loop::start(
        &["127.0.0.2:80"],
        "settle = \"10ms\"\nmin_reload_interval = \"10ms\"",
        1,
    );
    l.wait_calls("test", 1).await;
    let pulse = l.handle.pulse(Duration::from_secs(5)).await;
    assert_eq!(
        pulse.map(|p| p.ready),
        Some(false),
        "the first apply failed"
    );
    l.wait_calls("reload", 1).await;
    let pulse = l.handle.pulse(Duration::from_secs(5)).await;
    assert_eq!(pulse.map(|p| p.ready), Some(true));
    assert!(l.status().await.ready, "the report agrees");
}

#[tokio::test(start_paused = true)]
async fn a_retry_counts_its_backoff_from_the_end_of_a_slow_failed_reload() {
    let l = Loop::start(
        &["127.0.0.2:80"],
        "settle = \"10ms\"\nmin_reload_interval = \"10ms\"",
        0,
    );
    l.nginx.unconfirmed_reloads.store(1, Ordering::SeqCst);
    let times = l.wait_calls("reload", 2).await;
    let gap = times[1] - times[0];
    assert!(
        gap >= CONFIRM_TIMEOUT + RETRY_FIRST.mul_f64(1.0 - RETRY_JITTER),
        "retried {gap:?} after the first reload began"
    );
    assert_eq!(l.status().await.apply.state, "in_sync");
}

#[tokio::test(start_paused = true)]
async fn a_config_reload_retries_a_failed_apply_at_once() {
    let l = Loop::start(
        &["127.0.0.2:80"],
        "settle = \"10ms\"\nmin_reload_interval = \"10ms\"",
        100,
    );
    l.wait_calls("test", 1).await;
    // Several backoffs in: the next retry is seconds away.
    let failed = l.wait_calls("test", 5).await[4];
    let sighup = l.set_servers(&["127.0.0.2:80"]).await;
    assert!(sighup < failed + Duration::from_secs(1));
    let at = l.wait_calls("test", 6).await[5];
    assert!(
        at < sighup + Duration::from_millis(100),
        "retried {:?} after the reload",
        at - sighup
    );
}

#[tokio::test(start_paused = true)]
async fn a_render_error_keeps_the_daemon_running_and_the_last_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("t.j2");
    let builtin = include_str!("../../templates/upstream.conf.j2");
    std::fs::write(
        &template,
        format!("{{% for u in upstreams %}}{{% if u.servers|length == 5 %}}{{{{ u.nmae }}}}{{% endif %}}{{% endfor %}}\n{builtin}"),
    )
    .unwrap();
    let extra = format!("settle = \"10ms\"\ntemplate = \"{}\"", template.display());
    let l = Loop::start(&["127.0.0.2:80", "127.0.0.3:80"], &extra, 0);
    l.wait_calls("reload", 1).await;
    let good = l.file();

    // Five servers: a count the trial render never uses (0, 1, 4 and over 100), so the
    // template passes `check` and fails only at run time.
    l.set_servers(&[
        "127.0.0.2:80",
        "127.0.0.3:80",
        "127.0.0.4:80",
        "127.0.0.5:80",
        "127.0.0.6:80",
    ])
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let st = l.status().await;
    assert_eq!(st.apply.state, "render_failed");
    assert!(
        st.apply.render_error.as_deref().unwrap().contains("nmae"),
        "{st:?}"
    );
    assert_eq!(l.file(), good);
    assert_eq!(
        l.metrics
            .renders
            .get_or_create(&RenderLabels {
                result: RenderResult::Error
            })
            .get(),
        1
    );
    assert_eq!(l.metrics.apply_pending.get(), 1);

    // The loop lives: the next change that renders is applied.
    l.set_servers(&["127.0.0.3:80", "127.0.0.4:80"]).await;
    l.wait_calls("reload", 2).await;
    assert!(!l.file().contains("127.0.0.2:80"));
    assert_eq!(l.status().await.apply.state, "in_sync");
}

#[tokio::test(start_paused = true)]
async fn once_gives_up_at_its_deadline_naming_the_source_it_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[nginx]\noutput = \"{}\"\ntest_command = []\n\
         [[upstream]]\nname = \"k\"\n[upstream.health]\nenabled = false\n\
         [[upstream.source]]\nkind = \"consul\"\nurl = \"http://127.0.0.1:1\"\nservice = \"k\"\n",
        dir.path().join("upstreams.conf").display(),
    );
    let cfg = crate::config::parse(&text, &|_| None).unwrap();
    let c = Controller::new(
        cfg,
        Renderer::new(None).unwrap(),
        FakeNginx::default(),
        Arc::new(Metrics::new()),
        CancellationToken::new(),
    );
    let (_keep, rx) = mpsc::channel(1);
    let t0 = Instant::now();
    let deadline = Duration::from_secs(30);
    let result = c
        .run(
            Mode::Once {
                dry_run: true,
                no_reload: false,
                deadline,
            },
            rx,
        )
        .await;
    let took = t0.elapsed();
    match result {
        Err(e @ ControllerError::NotReady(..)) => {
            let said = e.to_string();
            assert!(said.contains("source consul has not delivered"), "{said}");
        }
        Err(e) => panic!("{e}"),
        Ok(Outcome::Rendered(text)) => panic!("rendered without its source: {text}"),
        Ok(_) => panic!("returned without the source"),
    }
    assert!(took <= deadline + Duration::from_secs(1), "waited {took:?}");
}

#[tokio::test(start_paused = true)]
async fn an_upstream_removed_by_a_config_reload_leaves_no_series_behind() {
    let l = Loop::start(
        &["127.0.0.2:80"],
        "settle = \"10ms\"\nmin_reload_interval = \"10ms\"",
        0,
    );
    l.wait_calls("reload", 1).await;
    let before = l.metrics.render();
    assert!(before.contains("upstreamd_probe_duration_seconds_count{upstream=\"k\"} 0\n"));
    assert!(before.contains("upstreamd_source_updates_total{upstream=\"k\",source=\"static\"} 1\n"));

    let mut renamed = config(l.dir.path(), &["127.0.0.2:80"], &l.extra);
    renamed.upstreams[0].name = crate::model::UpstreamName::new("j").unwrap();
    l.reloads.send(renamed).await.unwrap();
    l.wait_calls("reload", 2).await;
    let after = l.metrics.render();
    assert!(!after.contains("upstream=\"k\""), "{after}");
    assert!(after.contains("upstreamd_source_up{upstream=\"j\",source=\"static\"} 1\n"));
}
