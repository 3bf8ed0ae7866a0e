//! The push, confirm and fallback logic against a fake update server, under paused time.

use super::super::fake::Fake;
use super::*;

fn setup() -> (tempfile::TempDir, Fake, LuaPusher, Metrics) {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new(dir.path());
    let pusher = LuaPusher::new(Box::new(fake.clone()), dir.path().to_owned());
    (dir, fake, pusher, Metrics::new())
}

fn pushes(m: &Metrics, result: &'static str) -> f64 {
    m.value("upstreamd_lua_pushes_total", &[("result", result)])
}

#[tokio::test(start_paused = true)]
async fn a_push_is_confirmed_once_every_worker_reports_its_generation() {
    let (dir, fake, mut pusher, metrics) = setup();
    fake.with(|w| w.lag = 5);
    let g = pusher.prepare(&Membership::default()).await.unwrap();
    let snapshot = std::fs::read_to_string(dir.path().join("snapshot.json")).unwrap();
    assert_eq!(
        snapshot,
        format!("{{\"generation\":{g},\"upstreams\":{{}}}}")
    );
    assert_eq!(
        pusher
            .push(&Membership::default(), &fake, &metrics)
            .await
            .unwrap(),
        Pushed::Confirmed(g)
    );
    assert_eq!(
        pusher.confirmed(),
        Some(&Confirmed {
            generation: g,
            master_pid: 100
        })
    );
    assert_eq!(pushes(&metrics, "confirmed"), 1.0);
    assert_eq!(metrics.value("upstreamd_lua_generation", &[]), g as f64);
    assert_eq!(fake.with(|w| w.reloads), 0);
}

#[tokio::test(start_paused = true)]
async fn workers_that_never_load_the_generation_leave_the_push_unconfirmed() {
    let (_dir, fake, mut pusher, metrics) = setup();
    fake.with(|w| w.lag = u32::MAX);
    pusher.prepare(&Membership::default()).await.unwrap();
    let e = pusher
        .push(&Membership::default(), &fake, &metrics)
        .await
        .unwrap_err();
    assert!(matches!(e, PushError::Unconfirmed { .. }), "{e}");
    assert!(e.to_string().contains("worker 101 holds 0"), "{e}");
    assert_eq!(pushes(&metrics, "unconfirmed"), 1.0);
    assert_eq!(pusher.confirmed(), None);
}

#[tokio::test(start_paused = true)]
async fn a_stale_generation_moves_past_the_one_nginx_holds_and_pushes_again() {
    let (_dir, fake, mut pusher, metrics) = setup();
    let ahead = u64::MAX / 4;
    fake.with(|w| w.generation = ahead);
    pusher.prepare(&Membership::default()).await.unwrap();
    let pushed = pusher
        .push(&Membership::default(), &fake, &metrics)
        .await
        .unwrap();
    assert_eq!(pushed, Pushed::Confirmed(ahead + 1));
    assert_eq!(pushes(&metrics, "rejected"), 1.0);
    assert_eq!(pushes(&metrics, "confirmed"), 1.0);
    // Later generations keep rising past nginx's.
    assert!(pusher.prepare(&Membership::default()).await.unwrap() > ahead + 1);
}

#[tokio::test(start_paused = true)]
async fn refused_pushes_fall_back_to_a_reload_on_the_third_and_say_why_it_stays_unconfirmed() {
    let (_dir, fake, mut pusher, metrics) = setup();
    fake.with(|w| w.refuse = Some(401));
    for attempt in 1..=FALLBACK_AFTER {
        pusher.prepare(&Membership::default()).await.unwrap();
        let e = pusher
            .push(&Membership::default(), &fake, &metrics)
            .await
            .unwrap_err();
        let reloads = fake.with(|w| w.reloads);
        if attempt < FALLBACK_AFTER {
            assert!(matches!(e, PushError::Rejected { status: 401, .. }), "{e}");
            assert_eq!(reloads, 0, "no reload before the bound");
        } else {
            assert_eq!(reloads, 1, "the third failed push reloads");
            assert!(
                e.to_string().starts_with(
                    "nginx reloaded to read snapshot.json, but: nginx refused the push (401)"
                ),
                "{e}"
            );
        }
    }
    assert_eq!(pushes(&metrics, "rejected"), 3.0);
}

#[tokio::test(start_paused = true)]
async fn a_fallback_reload_is_confirmed_by_the_new_workers_reading_the_snapshot() {
    let (_dir, fake, mut pusher, metrics) = setup();
    fake.with(|w| w.lag = u32::MAX);
    let mut last = None;
    for _ in 0..FALLBACK_AFTER {
        let g = pusher.prepare(&Membership::default()).await.unwrap();
        last = Some((
            g,
            pusher.push(&Membership::default(), &fake, &metrics).await,
        ));
    }
    let (g, result) = last.unwrap();
    assert_eq!(result.unwrap(), Pushed::FellBack(g));
    assert_eq!(fake.with(|w| w.reloads), 1);
    assert_eq!(pusher.failed_pushes(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_new_master_or_a_list_not_from_a_push_asks_for_a_new_push() {
    let (_dir, fake, mut pusher, metrics) = setup();
    assert_eq!(
        pusher.poll().await,
        None,
        "nothing confirmed, nothing to check"
    );
    pusher.prepare(&Membership::default()).await.unwrap();
    pusher
        .push(&Membership::default(), &fake, &metrics)
        .await
        .unwrap();
    assert_eq!(pusher.poll().await, None);
    fake.with(|w| {
        w.master = 200;
        w.source = "snapshot".into();
    });
    let why = pusher.poll().await.unwrap();
    assert!(why.contains("new master (pid 100 → 200)"), "{why}");
    assert_eq!(pusher.confirmed(), None);
    pusher.prepare(&Membership::default()).await.unwrap();
    pusher
        .push(&Membership::default(), &fake, &metrics)
        .await
        .unwrap();
    fake.with(|w| w.source = "snapshot".into());
    assert!(pusher.poll().await.unwrap().contains("came from snapshot"));
}
