//! `nginx::apply` against a real private nginx: reload only on change, never signal after a
//! failed test, restore the file after any failure, never signal something that is not nginx.

use std::fs;
use std::time::Duration;

use crate::util::*;
use upstreamd::nginx::{apply, Applied, ApplyError, NginxError, SystemNginx};

/// Missing `;` after the server: `nginx -t` says `[emerg] unexpected "}"`.
const SYNTAX_ERROR: &str = "upstream u {\n    server 127.0.0.3:8080\n}\n";

fn upstream_of(address: &str) -> String {
    format!("upstream u {{\n    server {address};\n}}\n")
}

/// Polls `/` until replica `name` answers it (200 and its body): an old worker generation may
/// still accept a connection or two for some milliseconds after the new one started.
fn wait_for_replica(nginx: &Nginx, name: &str) {
    let body = format!("kotaemon-standin {name}\n");
    wait_for(
        &format!("`/` to answer 200 {body:?}"),
        Duration::from_secs(5),
        || nginx.get("/").is_some_and(|(s, b)| s == 200 && b == body),
    );
}

#[tokio::test]
async fn a_changed_file_is_tested_and_reloaded_and_the_same_bytes_are_left_alone() {
    let nginx = Nginx::start("u");
    let _report = report_on_failure(&nginx);
    let backend = Replica::start("backend-a");
    let system = SystemNginx::new(&nginx.config(nginx.command(&["-t", "-q"])));
    let before = nginx.wait_for_workers();
    assert_eq!(nginx.get("/").map(|(status, _)| status), Some(502));
    let good = upstream_of(&backend.addr);

    let applied = apply(&nginx.output(), good.as_bytes(), &system)
        .await
        .unwrap();

    let Applied::Reloaded {
        test,
        reload,
        proof,
    } = applied
    else {
        panic!("expected Reloaded, got {applied:?}")
    };
    eprintln!("measured: test command {test:?}, reload confirmed after {reload:?}");
    assert_eq!(proof.master, nginx.master());
    assert_eq!(proof.old_workers, before);
    assert!(proof.new_workers.is_disjoint(&before), "{proof:?}");
    assert_eq!(nginx.reloads(), 1);
    assert_eq!(fs::read_to_string(nginx.output()).unwrap(), good);
    wait_for_replica(&nginx, "backend-a");

    let again = apply(&nginx.output(), good.as_bytes(), &system)
        .await
        .unwrap();

    assert_eq!(again, Applied::Unchanged);
    assert_eq!(nginx.reloads(), 1);
}

#[tokio::test]
async fn a_file_that_fails_the_test_is_restored_and_nginx_is_not_signalled() {
    let nginx = Nginx::start("u");
    let _report = report_on_failure(&nginx);
    let initial = fs::read(nginx.output()).unwrap();
    let system = SystemNginx::new(&nginx.config(nginx.command(&["-t", "-q"])));
    let before = nginx.wait_for_workers();

    let err = apply(&nginx.output(), SYNTAX_ERROR.as_bytes(), &system)
        .await
        .unwrap_err();

    assert_eq!(err.result_label(), "test_failed", "{err}");
    match err.nginx_error() {
        NginxError::TestFailed { stderr, .. } => {
            assert!(stderr.contains("[emerg]"), "{stderr}");
            assert!(stderr.contains("unexpected \"}\""), "{stderr}");
            assert!(stderr.contains("upstreams.conf:3"), "{stderr}");
        }
        other => panic!("expected TestFailed, got {other:?}"),
    }
    assert!(err.file_restored());
    assert_eq!(fs::read(nginx.output()).unwrap(), initial);
    assert_eq!(nginx.reloads(), 0);
    assert_eq!(nginx.wait_for_workers(), before);
}

#[tokio::test]
async fn without_a_test_command_a_bad_file_is_unconfirmed_and_restored() {
    let nginx = Nginx::start("u");
    let _report = report_on_failure(&nginx);
    let initial = fs::read(nginx.output()).unwrap();
    let mut config = nginx.config(vec![]);
    config.confirm_timeout = Duration::from_millis(800);
    let system = SystemNginx::new(&config);
    let before = nginx.wait_for_workers();

    let err = apply(&nginx.output(), SYNTAX_ERROR.as_bytes(), &system)
        .await
        .unwrap_err();

    assert_eq!(err.result_label(), "unconfirmed", "{err}");
    assert!(matches!(err, ApplyError::Failed { .. }));
    assert!(err.file_restored());
    assert_eq!(fs::read(nginx.output()).unwrap(), initial);
    // nginx got the signal, refused the file and kept its workers.
    assert_eq!(nginx.reloads(), 1);
    assert!(nginx.error_log().contains("[emerg]"));
    assert_eq!(nginx.wait_for_workers(), before);
}

#[tokio::test]
async fn a_pid_file_naming_another_process_is_signal_failed_and_that_process_is_left_alone() {
    let nginx = Nginx::start("u");
    let _report = report_on_failure(&nginx);
    let initial = fs::read(nginx.output()).unwrap();
    // `sleep 60`, waited for until the kernel shows its command line.
    let mut bystander = Bystander::start();
    let pid_file = nginx.dir.path().join("not-nginx.pid");
    fs::write(&pid_file, format!("{}\n", bystander.0.id())).unwrap();
    let mut config = nginx.config(nginx.command(&["-t", "-q"]));
    config.pid_file = pid_file;
    let system = SystemNginx::new(&config);
    let backend = Replica::start("unused");

    let result = apply(
        &nginx.output(),
        upstream_of(&backend.addr).as_bytes(),
        &system,
    )
    .await;

    let err = result.unwrap_err();
    assert_eq!(err.result_label(), "signal_failed", "{err}");
    assert!(
        matches!(err.nginx_error(), NginxError::NotNginxMaster { cmdline, .. } if cmdline == "sleep 60"),
        "{err}"
    );
    assert!(
        bystander.alive(),
        "the process named by the pid file was signalled"
    );
    assert_eq!(fs::read(nginx.output()).unwrap(), initial);
    assert_eq!(nginx.reloads(), 0);
}

#[tokio::test]
async fn a_reload_command_reloads_instead_of_a_signal_from_upstreamd() {
    let nginx = Nginx::start("u");
    let _report = report_on_failure(&nginx);
    let backend = Replica::start("backend-b");
    let mut config = nginx.config(nginx.command(&["-t", "-q"]));
    config.reload_command = nginx.command(&["-s", "reload"]);
    let system = SystemNginx::new(&config);

    let applied = apply(
        &nginx.output(),
        upstream_of(&backend.addr).as_bytes(),
        &system,
    )
    .await
    .unwrap();

    assert!(matches!(applied, Applied::Reloaded { .. }), "{applied:?}");
    assert_eq!(nginx.reloads(), 1);
    wait_for_replica(&nginx, "backend-b");
}
