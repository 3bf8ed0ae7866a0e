//! The startup deadline: `READY=1` reaches systemd even when a source cannot be reached.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{startup_status, Controller, Mode};
use crate::metrics::Metrics;
use crate::nginx::{Nginx, NginxError, ReloadProof};
use crate::notify::Notifier;
use crate::render::Renderer;

/// Never called: the source never answers, so nothing is applied.
struct Unreached;

impl Nginx for Unreached {
    async fn test(&self) -> Result<(), NginxError> {
        panic!("nothing may be applied without a source's first snapshot")
    }

    async fn reload(&self) -> Result<ReloadProof, NginxError> {
        panic!("nothing may be applied without a source's first snapshot")
    }
}

/// A config whose one source is a Consul agent on a port nothing listens on.
fn unreachable_consul(dir: &std::path::Path) -> crate::config::Config {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let text = format!(
        r#"
[nginx]
output = "{}/upstreams.conf"
pid_file = "{}/nginx.pid"
[[upstream]]
name = "kotaemon"
[[upstream.source]]
kind = "consul"
url = "http://127.0.0.1:{port}"
service = "kotaemon"
"#,
        dir.display(),
        dir.display()
    );
    crate::config::parse(&text, &|_| None).expect("a valid config")
}

fn receive(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("a datagram within the read timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn systemd_hears_ready_with_what_is_missing_once_the_startup_deadline_passes() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify");
    let systemd = UnixDatagram::bind(&socket_path).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let shutdown = CancellationToken::new();
    let controller = Controller::new(
        unreachable_consul(dir.path()),
        Renderer::new(None).unwrap(),
        Unreached,
        Arc::new(Metrics::new()),
        shutdown.clone(),
    )
    .with_notifier(Notifier::new(socket_path.as_os_str(), None))
    .with_startup_deadline(Duration::from_millis(300));
    let handle = controller.handle();
    let (_keep, reloads) = mpsc::channel(1);
    let task = tokio::spawn(controller.run(Mode::Run, reloads));

    let systemd = tokio::task::spawn_blocking(move || {
        let status = receive(&systemd);
        let ready = receive(&systemd);
        (status, ready)
    });
    let (status, ready) = systemd.await.unwrap();
    assert!(
        status.starts_with("STATUS=Started without a first file after 300ms: still waiting: upstream kotaemon source "),
        "{status}"
    );
    assert!(status.contains("has not delivered"), "{status}");
    assert_eq!(ready, "READY=1");

    let report = handle
        .status(Duration::from_secs(5))
        .await
        .expect("the loop still answers");
    assert!(!report.ready, "/readyz waits for the first file");
    let pulse = handle.pulse(Duration::from_secs(5)).await;
    assert_eq!(pulse.map(|p| p.ready), Some(false), "so does the pulse");
    assert!(!dir.path().join("upstreams.conf").exists());

    shutdown.cancel();
    task.await.unwrap().expect("a clean stop");
}

#[test]
fn the_startup_status_names_the_deadline_and_what_is_missing() {
    assert_eq!(
        startup_status(Duration::from_secs(30), "upstream a source b has not delivered"),
        "Started without a first file after 30s: still waiting: upstream a source b has not delivered. \
         nginx keeps its current file; upstreamd keeps converging."
    );
}
