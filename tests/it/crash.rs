//! Crash-safe writes: `kill -9` of upstreamd at any moment leaves nginx's include file either
//! the old or the new complete file, never a torn one, and the next start sweeps the temp
//! files a killed run left.
//!
//! Hundreds of rounds, each starting upstreamd on one of four configs whose files differ in
//! size and content (so writes take a while and every round changes the file), sometimes
//! rewriting the config and sending SIGHUP, and killing it with SIGKILL after a random
//! delay. After each kill: `nginx -t` passes and the file is byte-for-byte one of the known
//! renders.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::util::*;
use nix::sys::signal::Signal;
use rand::Rng;

const ROUNDS: usize = 300;

fn variant(nginx: &Nginx, i: usize) -> String {
    let servers: Vec<toml::Value> = match i {
        0 => (1..=150)
            .map(|n| format!("127.0.1.{n}:7860").into())
            .collect(),
        1 => (1..=250)
            .map(|n| {
                let mut server = toml::Table::new();
                server.insert("address".into(), format!("127.0.2.{n}:7861").into());
                server.insert("weight".into(), (n % 7 + 1).into());
                server.into()
            })
            .collect(),
        2 => (1..=40)
            .map(|n| format!("127.0.3.{n}:7862").into())
            .collect(),
        _ => vec!["127.0.4.1:7863".into()],
    };
    Config::new(nginx)
        .nginx("settle", "0ms")
        .nginx("min_reload_interval", "0ms")
        .upstream(Upstream::new("kotaemon").static_servers(&[]))
        .source("servers", servers)
        .to_toml()
}

fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains(".upstreamd-tmp."))
        .collect()
}

#[test]
fn kill_9_at_any_moment_leaves_the_old_or_the_new_complete_file() {
    let nginx = Nginx::start("kotaemon");
    let _report = report_on_failure(&nginx);
    let conf_dir = nginx.output().parent().unwrap().to_owned();
    let configs: Vec<String> = (0..4).map(|i| variant(&nginx, i)).collect();

    // The known renders: nginx's starting file and each config's, from `once --dry-run`.
    let mut known: BTreeMap<Vec<u8>, String> = BTreeMap::new();
    known.insert(std::fs::read(nginx.output()).unwrap(), "initial".into());
    for (i, cfg) in configs.iter().enumerate() {
        let (_dir, path) = write_config(cfg);
        let (code, out, err) =
            upstreamd(&["once", "--config", path.to_str().unwrap(), "--dry-run"]);
        assert_eq!(code, 0, "{err}");
        known.insert(out.into_bytes(), format!("config {i}"));
    }
    assert_eq!(known.len(), 5);

    let mut rng = rand::thread_rng();
    let mut landed: BTreeMap<String, usize> = BTreeMap::new();
    let mut leftovers_seen = 0;
    let mut current = 0;
    for round in 0..ROUNDS {
        let before = std::fs::read(nginx.output()).unwrap();
        let next = (current + 1 + rng.gen_range(0..3)) % 4;
        let mut daemon = Daemon::start(&configs[next]);
        std::thread::sleep(Duration::from_micros(rng.gen_range(0..60_000)));
        if rng.gen_bool(0.3) {
            // Churn within one run: a config reload to yet another file.
            let other = (next + 1 + rng.gen_range(0..3)) % 4;
            std::fs::write(&daemon.config, &configs[other]).unwrap();
            daemon.signal(Signal::SIGHUP);
            std::thread::sleep(Duration::from_micros(rng.gen_range(0..40_000)));
        }
        daemon.signal(Signal::SIGKILL);
        daemon.wait_exit(Duration::from_secs(5));
        drop(daemon);

        let after = std::fs::read(nginx.output()).unwrap();
        let Some(name) = known.get(&after) else {
            panic!(
                "round {round}: the file is none of the known renders ({} bytes):\n{}",
                after.len(),
                String::from_utf8_lossy(&after)
            );
        };
        let t = nginx.test_config();
        assert!(
            t.status.success(),
            "round {round}: nginx -t: {}",
            String::from_utf8_lossy(&t.stderr)
        );
        let what = if after == before {
            "old file"
        } else {
            "new file"
        };
        *landed.entry(what.to_owned()).or_default() += 1;
        leftovers_seen += temp_files(&conf_dir).len();
        if let Some(n) = name.strip_prefix("config ") {
            current = n.parse().unwrap();
        }
    }
    eprintln!(
        "figure: {ROUNDS} SIGKILLs: {landed:?}; temp files seen right after a kill: {leftovers_seen}; nginx reloads: {}",
        nginx.reloads()
    );

    // A clean start sweeps every leftover before writing (one planted, to be sure there is one).
    std::fs::write(
        conf_dir.join(".upstreams.conf.upstreamd-tmp.99999.0"),
        "torn",
    )
    .unwrap();
    let daemon = Daemon::start(&configs[0]);
    wait_for(
        "a clean run to be up to date",
        Duration::from_secs(15),
        || {
            daemon
                .output
                .text()
                .contains("Upstream file is up to date.")
        },
    );
    assert!(
        daemon
            .output
            .text()
            .contains("Removed temp files left by an earlier run."),
        "{}",
        daemon.output.text()
    );
    assert_eq!(temp_files(&conf_dir), Vec::<String>::new());
    assert_eq!(
        known
            .get(&std::fs::read(nginx.output()).unwrap())
            .map(String::as_str),
        Some("config 0")
    );
    assert!(
        landed.len() == 2,
        "kills should land both before and after the rename: {landed:?}"
    );
}
