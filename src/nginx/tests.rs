//! `apply` against a fake `Nginx` that records what it was asked and what the file held.

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Mutex;

use super::*;

/// A call to the fake and the include file's bytes at that moment.
type Call = (&'static str, Option<Vec<u8>>);

/// What the fake answers; `None` means success.
#[derive(Default)]
struct Fake {
    output: PathBuf,
    fail_test: bool,
    fail_reload: Option<fn() -> NginxError>,
    calls: Mutex<Vec<Call>>,
}

impl Fake {
    fn new(output: &Path) -> Self {
        Fake {
            output: output.to_owned(),
            ..Fake::default()
        }
    }

    fn record(&self, call: &'static str) {
        let bytes = fs::read(&self.output).ok();
        self.calls.lock().unwrap().push((call, bytes));
    }

    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap().iter().map(|(c, _)| *c).collect()
    }

    fn file_seen_by(&self, call: &str) -> Option<Vec<u8>> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .find(|(c, _)| *c == call)
            .and_then(|(_, b)| b.clone())
    }
}

impl Nginx for Fake {
    async fn test(&self) -> Result<(), NginxError> {
        self.record("test");
        if self.fail_test {
            return Err(NginxError::TestFailed {
                command: "nginx -t -q".into(),
                status: ExitStatus::from_raw(1 << 8),
                stderr: "nginx: [emerg] unexpected \"}\" in upstreams.conf:3".into(),
            });
        }
        Ok(())
    }

    async fn reload(&self) -> Result<ReloadProof, NginxError> {
        self.record("reload");
        match self.fail_reload {
            Some(make) => Err(make()),
            None => Ok(ReloadProof {
                master: Pid::from_raw(10),
                old_workers: BTreeSet::from([11]),
                new_workers: BTreeSet::from([12]),
            }),
        }
    }
}

fn unconfirmed() -> NginxError {
    NginxError::Unconfirmed {
        master: Pid::from_raw(10),
        waited: Duration::from_secs(5),
    }
}

fn not_master() -> NginxError {
    NginxError::NotNginxMaster {
        pid: Pid::from_raw(10),
        cmdline: "sleep 30".into(),
    }
}

fn setup(old: Option<&[u8]>) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("upstreams.conf");
    if let Some(old) = old {
        fs::write(&output, old).unwrap();
    }
    (dir, output)
}

const OLD: &[u8] = b"upstream u {\n    server 127.0.0.1:1 down;\n}\n\xff";
const NEW: &[u8] = b"upstream u {\n    server 127.0.0.2:80;\n}\n";

#[tokio::test]
async fn unchanged_bytes_are_neither_tested_nor_reloaded() {
    let (_dir, output) = setup(Some(OLD));
    let fake = Fake::new(&output);

    assert_eq!(
        apply(&output, OLD, &fake).await.unwrap(),
        Applied::Unchanged
    );

    assert!(fake.calls().is_empty());
}

#[tokio::test]
async fn changed_bytes_are_written_before_the_test_then_reloaded() {
    let (_dir, output) = setup(Some(OLD));
    let fake = Fake::new(&output);

    let applied = apply(&output, NEW, &fake).await.unwrap();

    assert!(
        matches!(applied, Applied::Reloaded { ref proof, .. } if proof.new_workers == BTreeSet::from([12]))
    );
    assert_eq!(fake.calls(), ["test", "reload"]);
    assert_eq!(fake.file_seen_by("test").as_deref(), Some(NEW));
    assert_eq!(fs::read(&output).unwrap(), NEW);
}

#[tokio::test]
async fn unconfirmed_bytes_already_on_disk_are_tested_and_reloaded_when_asked() {
    let (_dir, output) = setup(Some(NEW));
    let fake = Fake::new(&output);

    let applied = apply_with(&output, NEW, &fake, Reach::Always)
        .await
        .unwrap();

    assert!(matches!(applied, Applied::Reloaded { .. }));
    assert_eq!(fake.calls(), ["test", "reload"]);
    assert_eq!(fs::read(&output).unwrap(), NEW);
}

#[tokio::test]
async fn no_reload_writes_and_tests_but_never_signals() {
    let (_dir, output) = setup(None);
    let fake = Fake::new(&output);

    let applied = apply_with(&output, NEW, &fake, Reach::NoReload)
        .await
        .unwrap();

    assert!(matches!(applied, Applied::Written { .. }));
    assert_eq!(fake.calls(), ["test"]);
    assert_eq!(fs::read(&output).unwrap(), NEW);
}

#[tokio::test]
async fn a_failed_test_restores_the_old_bytes_and_never_reloads() {
    let (_dir, output) = setup(Some(OLD));
    let fake = Fake {
        fail_test: true,
        ..Fake::new(&output)
    };

    let err = apply(&output, NEW, &fake).await.unwrap_err();

    assert_eq!(fake.calls(), ["test"]);
    assert_eq!(fs::read(&output).unwrap(), OLD);
    assert_eq!(err.result_label(), "test_failed");
    assert!(err.file_restored());
    let text = err.to_string();
    assert!(
        text.starts_with("the nginx config test failed and the previous file was restored: "),
        "{text}"
    );
    assert!(text.contains("[emerg] unexpected"), "{text}");
}

#[tokio::test]
async fn a_failed_test_of_a_first_file_removes_it() {
    let (_dir, output) = setup(None);
    let fake = Fake {
        fail_test: true,
        ..Fake::new(&output)
    };

    let err = apply(&output, NEW, &fake).await.unwrap_err();

    assert_eq!(fake.file_seen_by("test").as_deref(), Some(NEW));
    assert!(!output.exists());
    assert!(
        matches!(
            err,
            ApplyError::Failed {
                rollback: Rollback::Removed,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_unconfirmed_reload_restores_the_old_bytes() {
    let (_dir, output) = setup(Some(OLD));
    let fake = Fake {
        fail_reload: Some(unconfirmed),
        ..Fake::new(&output)
    };

    let err = apply(&output, NEW, &fake).await.unwrap_err();

    assert_eq!(fake.calls(), ["test", "reload"]);
    assert_eq!(fs::read(&output).unwrap(), OLD);
    assert_eq!(err.result_label(), "unconfirmed");
    assert!(err
        .to_string()
        .starts_with("the nginx reload failed and the previous file was restored: "));
}

#[tokio::test]
async fn a_refused_signal_restores_the_old_bytes() {
    let (_dir, output) = setup(Some(OLD));
    let fake = Fake {
        fail_reload: Some(not_master),
        ..Fake::new(&output)
    };

    let err = apply(&output, NEW, &fake).await.unwrap_err();

    assert_eq!(fs::read(&output).unwrap(), OLD);
    assert_eq!(err.result_label(), "signal_failed");
    assert!(matches!(
        err.nginx_error(),
        NginxError::NotNginxMaster { .. }
    ));
}

#[tokio::test]
async fn a_failed_write_leaves_the_old_state_and_calls_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("missing-dir").join("upstreams.conf");
    let fake = Fake::new(&output);

    let err = apply(&output, NEW, &fake).await.unwrap_err();

    assert!(fake.calls().is_empty());
    assert_eq!(err.result_label(), "write_failed");
    assert!(err.file_restored());
    assert!(
        err.to_string()
            .contains("the old file is left as it is: failed to create `"),
        "{err}"
    );
}

#[test]
fn a_failed_rollback_says_so() {
    let err = ApplyError::Failed {
        step: Step::Reload,
        error: unconfirmed(),
        rollback: Rollback::Failed(NginxError::io(
            "rename a temp file onto",
            "/etc/x.conf",
            std::io::Error::other("EIO"),
        )),
    };
    assert!(!err.file_restored());
    assert_eq!(err.result_label(), "unconfirmed");
    assert!(
        err.to_string()
            .contains("restoring the previous file ALSO FAILED: failed to rename"),
        "{err}"
    );
}
