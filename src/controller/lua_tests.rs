//! The reconcile loop in lua mode: static sources, probing off, a fake nginx that is both the
//! `Nginx` (test, reload) and the Lua update server, under tokio's paused clock.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Controller, Mode};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::nginx::lua::fake::Fake;
use crate::render::Renderer;

fn config(dir: &std::path::Path, servers: &[&str]) -> Config {
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    let text = format!(
        "[nginx]\noutput = \"{}\"\ntest_command = []\napply = \"lua\"\nsettle = \"100ms\"\n\
         [[upstream]]\nname = \"k\"\n[upstream.health]\nenabled = false\n\
         [[upstream.source]]\nkind = \"static\"\nservers = [{}]\n",
        dir.join("upstreams.conf").display(),
        servers.join(", ")
    );
    crate::config::parse(&text, &|_| None).unwrap()
}

/// Waits in paused time (bounded) until `done` holds for the fake.
async fn until(fake: &Fake, what: &str, done: impl Fn(&crate::nginx::lua::fake::World) -> bool) {
    for _ in 0..2_000 {
        if fake.with(|w| done(w)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never saw {what}: {:?}", fake.with(|w| format!("{w:?}")));
}

#[tokio::test(start_paused = true)]
async fn membership_changes_are_pushed_without_a_reload_and_a_new_master_gets_a_new_push() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &["127.0.0.2:80"]);
    let fake = Fake::new(&cfg.nginx.lua.dir);
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let c = Controller::new(
        cfg,
        Renderer::new(None).unwrap(),
        fake.clone(),
        Arc::clone(&metrics),
        shutdown.clone(),
    )
    .with_lua_endpoint(Box::new(fake.clone()));
    let (reloads, rx) = mpsc::channel(4);
    let handle = c.handle();
    tokio::spawn(c.run(Mode::Run, rx));

    until(&fake, "the first push", |w| w.pushes.len() == 1).await;
    let shell = std::fs::read_to_string(dir.path().join("upstreams.conf")).unwrap();
    assert!(shell.contains("balancer_by_lua_block"), "{shell}");
    assert!(
        !shell.contains("127.0.0.2"),
        "membership stays out of the shell"
    );
    assert_eq!(fake.with(|w| w.reloads), 1, "the new shell is loaded once");
    let snapshot = std::fs::read_to_string(dir.path().join("upstreamd-lua/snapshot.json")).unwrap();
    assert_eq!(snapshot, fake.with(|w| w.last_body.clone()));

    reloads
        .send(config(dir.path(), &["127.0.0.2:80", "127.0.0.3:80"]))
        .await
        .unwrap();
    until(&fake, "the second push", |w| w.pushes.len() == 2).await;
    assert!(fake.with(|w| w.last_body.contains("\"127.0.0.3:80\"")));
    assert_eq!(
        fake.with(|w| w.reloads),
        1,
        "a membership change reloads nothing"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("upstreams.conf")).unwrap(),
        shell
    );
    let status = handle.status(Duration::from_secs(5)).await.unwrap();
    let confirmed = fake.with(|w| w.pushes[1]);
    assert_eq!(status.lua.unwrap().confirmed_generation, Some(confirmed));
    assert_eq!(status.apply.state, "in_sync");

    // nginx restarted: a new master serving the snapshot.
    fake.with(|w| {
        w.master = 300;
        w.source = "snapshot".into();
    });
    until(&fake, "a push to the new master", |w| w.pushes.len() == 3).await;
    assert!(fake.with(|w| w.pushes[2] > confirmed));
    assert_eq!(fake.with(|w| w.reloads), 1);
    assert_eq!(
        metrics.value("upstreamd_lua_pushes_total", &[("result", "confirmed")]),
        3.0
    );
    shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_wrong_secret_ends_in_a_fallback_reload_and_an_error_on_status() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &["127.0.0.2:80"]);
    let fake = Fake::new(&cfg.nginx.lua.dir);
    fake.with(|w| w.refuse = Some(401));
    let shutdown = CancellationToken::new();
    let c = Controller::new(
        cfg,
        Renderer::new(None).unwrap(),
        fake.clone(),
        Arc::new(Metrics::new()),
        shutdown.clone(),
    )
    .with_lua_endpoint(Box::new(fake.clone()));
    let handle = c.handle();
    let (_reloads, rx) = mpsc::channel(4);
    tokio::spawn(c.run(Mode::Run, rx));
    // The shell's own reload, then one fallback reload after the third refused push.
    until(&fake, "a fallback reload", |w| {
        w.pushes.len() >= 3 && w.reloads == 2
    })
    .await;
    let status = handle.status(Duration::from_secs(5)).await.unwrap();
    assert_eq!(status.apply.state, "retrying");
    let error = status.lua.unwrap().last_push_error.unwrap();
    assert!(
        error
            .starts_with("nginx reloaded to read snapshot.json, but: nginx refused the push (401)"),
        "{error}"
    );
    shutdown.cancel();
}
