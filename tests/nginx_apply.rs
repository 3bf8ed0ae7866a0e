//! `nginx::apply` against a real private nginx: reload only on change, never signal after a
//! failed test, restore the file after any failure, never signal something that is not nginx.

#[path = "support/nginx.rs"]
mod nginx_support;

use std::fs;
use std::process::Command;
use std::time::Duration;

use nginx_support::{wait_until, Backend, PrivateNginx};
use nix::unistd::Pid;
use upstreamd::nginx::{apply, read_cmdline, Applied, ApplyError, NginxError, SystemNginx};

const INITIAL: &str = "upstream u {\n    server 127.0.0.1:1 down;\n}\n";
/// Missing `;` after the server: `nginx -t` says `[emerg] unexpected "}"`.
const SYNTAX_ERROR: &str = "upstream u {\n    server 127.0.0.3:8080\n}\n";

fn upstream_of(address: &str) -> String {
    format!("upstream u {{\n    server {address};\n}}\n")
}

#[tokio::test]
async fn a_changed_file_is_tested_and_reloaded_and_the_same_bytes_are_left_alone() {
    let nginx = PrivateNginx::start(INITIAL);
    let backend = Backend::start("127.0.0.2", "backend-a");
    let system = SystemNginx::new(&nginx.config(nginx.command(&["-t", "-q"])));
    let before = nginx.wait_for_workers();
    assert_eq!(nginx.get("/").0, 502, "{}", nginx.dump());
    let good = upstream_of(&backend.address);

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
    assert_eq!(nginx.sighups(), 1, "{}", nginx.dump());
    assert_eq!(fs::read_to_string(nginx.output()).unwrap(), good);
    nginx.wait_for_body("backend-a");

    let again = apply(&nginx.output(), good.as_bytes(), &system)
        .await
        .unwrap();

    assert_eq!(again, Applied::Unchanged);
    assert_eq!(nginx.sighups(), 1, "{}", nginx.dump());
}

#[tokio::test]
async fn a_file_that_fails_the_test_is_restored_and_nginx_is_not_signalled() {
    let nginx = PrivateNginx::start(INITIAL);
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
    assert_eq!(fs::read(nginx.output()).unwrap(), INITIAL.as_bytes());
    assert_eq!(nginx.sighups(), 0, "{}", nginx.dump());
    assert_eq!(nginx.wait_for_workers(), before);
}

#[tokio::test]
async fn without_a_test_command_a_bad_file_is_unconfirmed_and_restored() {
    let nginx = PrivateNginx::start(INITIAL);
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
    assert_eq!(fs::read(nginx.output()).unwrap(), INITIAL.as_bytes());
    // nginx got the signal, refused the file and kept its workers.
    assert_eq!(nginx.sighups(), 1, "{}", nginx.dump());
    assert!(nginx.error_log().contains("[emerg]"), "{}", nginx.dump());
    assert_eq!(nginx.wait_for_workers(), before);
}

#[tokio::test]
async fn a_pid_file_naming_another_process_is_signal_failed_and_that_process_is_left_alone() {
    let nginx = PrivateNginx::start(INITIAL);
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    // Right after exec the kernel may still show an empty command line for a moment.
    let pid = Pid::from_raw(sleeper.id() as i32);
    let exec_done = wait_until(Duration::from_secs(5), || {
        read_cmdline(pid).is_ok_and(|c| c == "sleep 30")
    });
    assert!(exec_done, "`sleep 30` never showed its command line");
    let pid_file = nginx.dir.path().join("not-nginx.pid");
    fs::write(&pid_file, format!("{}\n", sleeper.id())).unwrap();
    let mut config = nginx.config(nginx.command(&["-t", "-q"]));
    config.pid_file = pid_file;
    let system = SystemNginx::new(&config);
    let backend = Backend::start("127.0.0.2", "unused");

    let result = apply(
        &nginx.output(),
        upstream_of(&backend.address).as_bytes(),
        &system,
    )
    .await;

    let alive = sleeper.try_wait().unwrap().is_none();
    // Cleanup only; the assertions below decide the test.
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let err = result.unwrap_err();
    assert_eq!(err.result_label(), "signal_failed", "{err}");
    assert!(
        matches!(err.nginx_error(), NginxError::NotNginxMaster { cmdline, .. } if cmdline == "sleep 30"),
        "{err}"
    );
    assert!(alive, "the process named by the pid file was signalled");
    assert_eq!(fs::read(nginx.output()).unwrap(), INITIAL.as_bytes());
    assert_eq!(nginx.sighups(), 0, "{}", nginx.dump());
}

#[tokio::test]
async fn a_reload_command_reloads_instead_of_a_signal_from_upstreamd() {
    let nginx = PrivateNginx::start(INITIAL);
    let backend = Backend::start("127.0.0.2", "backend-b");
    let mut config = nginx.config(nginx.command(&["-t", "-q"]));
    config.reload_command = nginx.command(&["-s", "reload"]);
    let system = SystemNginx::new(&config);

    let applied = apply(
        &nginx.output(),
        upstream_of(&backend.address).as_bytes(),
        &system,
    )
    .await
    .unwrap();

    assert!(matches!(applied, Applied::Reloaded { .. }), "{applied:?}");
    assert_eq!(nginx.sighups(), 1, "{}", nginx.dump());
    nginx.wait_for_body("backend-b");
}
