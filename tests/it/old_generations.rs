//! Reload mode counts the old nginx worker generations it leaves behind: a held-open
//! `/heartbeat` stream (a Kotaemon tab) keeps the generation that accepted it alive, the gauge
//! shows it, and with `max_old_generations` an addition waits while a removal does not.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::util::*;
use nix::sys::signal::Signal;

const SHORT: Duration = Duration::from_secs(15);

/// A browser tab's heartbeat stream through nginx, held open until dropped.
struct Tab {
    _stream: TcpStream,
}

impl Tab {
    /// Opens `/heartbeat/<name>` through nginx and waits for its first `ALIVE`, so the stream
    /// is known to be held by a worker that serves the current file. Right after a reload the
    /// previous generation may still answer for ~100 ms (a 502 from the placeholder file):
    /// such an answer is retried.
    fn open(nginx: &Nginx, name: &str) -> Self {
        let mut last = String::new();
        let mut tab = None;
        wait_for("a heartbeat stream through nginx", SHORT, || {
            match Self::try_open(nginx, name) {
                Ok(t) => tab = Some(t),
                Err(answer) => last = answer,
            }
            tab.is_some()
        });
        tab.unwrap_or_else(|| panic!("no heartbeat stream; the last answer: {last}"))
    }

    fn try_open(nginx: &Nginx, name: &str) -> Result<Self, String> {
        let mut s = TcpStream::connect(("127.0.0.1", nginx.port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(SHORT)).unwrap();
        write!(
            s,
            "GET /heartbeat/{name} HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n"
        )
        .map_err(|e| e.to_string())?;
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let text = String::from_utf8_lossy(&seen).into_owned();
            if text.contains("ALIVE") {
                return Ok(Tab { _stream: s });
            }
            if text.contains("\r\n\r\n") && !text.starts_with("HTTP/1.1 200") {
                return Err(text);
            }
            match s.read(&mut buf) {
                Ok(0) => return Err(format!("closed after {text:?}")),
                Ok(n) => seen.extend_from_slice(&buf[..n]),
                Err(e) => return Err(format!("{e} after {text:?}")),
            }
        }
    }
}

/// Rewrites the static list to `replicas` and tells the daemon (a config reload).
/// The config: `max_old_generations = 1`, and probing off (a probe flapping on a busy machine
/// would reload, as a removal, on its own).
fn config(nginx: &Nginx, replicas: &[&Replica]) -> String {
    Config::static_list(nginx, "kotaemon", replicas)
        .nginx("max_old_generations", 1)
        .health("enabled", false)
        .admin_port0()
        .to_toml()
}

/// Rewrites the static list to `replicas` and tells the daemon (SIGHUP).
fn set_servers(daemon: &Daemon, nginx: &Nginx, replicas: &[&Replica]) {
    std::fs::write(&daemon.config, config(nginx, replicas)).unwrap();
    daemon.signal(Signal::SIGHUP);
}

fn gauge(admin: &str, name: &str) -> f64 {
    metric(&admin_metrics(admin), name)
}

fn wait_gauge(admin: &str, name: &str, value: f64) {
    wait_for(&format!("{name} to be {value}"), SHORT, || {
        gauge(admin, name) == value
    });
}

#[test]
fn a_held_stream_keeps_an_old_generation_that_holds_additions_but_not_removals() {
    let names = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"];
    let r: Vec<Replica> = names
        .iter()
        .map(|n| {
            Replica::start_on(
                n,
                &format!("127.0.0.1:{}", free_port()),
                &["--heartbeat-interval", "200ms"],
            )
        })
        .collect();
    let nginx = Nginx::start("kotaemon");
    let _report = report_on_failure(&nginx);
    let daemon = Daemon::start(&config(&nginx, &[&r[0], &r[1]]));
    let admin = daemon.admin();
    first_apply(&nginx, &daemon);
    assert_eq!(gauge(&admin, "upstreamd_nginx_old_generations"), 0.0);

    // A tab open across a reload keeps the generation that accepted it.
    let first_tab = Tab::open(&nginx, "tab-1");
    set_servers(&daemon, &nginx, &[&r[0], &r[1], &r[2]]);
    wait_for("the second reload", SHORT, || nginx.reloads() == 2);
    wait_gauge(&admin, "upstreamd_nginx_old_generations", 1.0);
    assert_eq!(gauge(&admin, "upstreamd_nginx_old_workers"), 1.0);

    // One old generation is within max_old_generations = 1: the next addition goes.
    let second_tab = Tab::open(&nginx, "tab-2");
    set_servers(&daemon, &nginx, &[&r[0], &r[1], &r[2], &r[3]]);
    wait_for("the third reload", SHORT, || nginx.reloads() == 3);
    wait_gauge(&admin, "upstreamd_nginx_old_generations", 2.0);
    let status = admin_status(&admin);
    assert_eq!(status["old_generations"]["generations"], 2, "{status}");

    // Two are more than one: an addition waits, and says why.
    set_servers(&daemon, &nginx, &[&r[0], &r[1], &r[2], &r[3], &r[4]]);
    wait_gauge(&admin, "upstreamd_apply_held", 1.0);
    let status = admin_status(&admin);
    assert_eq!(status["apply"]["state"], "held", "{status}");
    assert!(
        status["apply"]["held"]
            .as_str()
            .unwrap()
            .contains("2 old nginx worker generations"),
        "{status}"
    );
    assert_eq!(gauge(&admin, "upstreamd_apply_pending"), 1.0);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(nginx.reloads(), 3, "the addition is held");
    assert!(!nginx.rendered().contains(&r[4].addr));

    // A removal goes at once, and takes the held addition with it.
    set_servers(&daemon, &nginx, &[&r[0], &r[2], &r[3], &r[4]]);
    wait_for("the removal's reload", SHORT, || nginx.reloads() == 4);
    let file = nginx.rendered();
    assert!(
        !file.contains(&r[1].addr) && file.contains(&r[4].addr),
        "{file}"
    );

    // Another addition waits until the tabs close, then goes.
    set_servers(&daemon, &nginx, &[&r[0], &r[2], &r[3], &r[4], &r[5]]);
    wait_gauge(&admin, "upstreamd_apply_held", 1.0);
    assert_eq!(nginx.reloads(), 4);
    drop(first_tab);
    drop(second_tab);
    wait_gauge(&admin, "upstreamd_nginx_old_generations", 0.0);
    wait_for("the held addition's reload", SHORT, || nginx.reloads() == 5);
    assert!(nginx.rendered().contains(&r[5].addr));
    wait_gauge(&admin, "upstreamd_apply_held", 0.0);
    assert_eq!(admin_status(&admin)["apply"]["state"], "in_sync");
}
