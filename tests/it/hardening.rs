//! Failure modes through the real daemon, a real nginx and stand-in replicas: a pid file that
//! names the wrong process, a file nginx refuses (by `nginx -t` or by not reloading), a write
//! that fails, file modes, and what the admin server binds. Each test asserts what an
//! operator sees: nginx's reload count, the file's bytes, `/status`, `/metrics`, the log.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::util::*;

const SHORT: Duration = Duration::from_secs(15);

#[test]
fn a_pid_file_that_names_no_nginx_master_is_never_signalled_and_the_file_rolls_back() {
    let replicas = [Replica::start("alpha"), Replica::start("bravo")];
    let nginx = Nginx::start("kotaemon");
    let _report = report_on_failure(&nginx);
    let mut bystander = Bystander::start();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("nginx.pid");
    std::fs::write(&pid_file, format!("{}\n", bystander.0.id())).unwrap();
    let cfg = Config::static_list(&nginx, "kotaemon", &[&replicas[0], &replicas[1]])
        .nginx_path("pid_file", &pid_file)
        .admin_port0()
        .to_toml();
    let original = nginx.rendered();
    let mut daemon = Daemon::start(&cfg);
    let admin = daemon.admin();

    // 1. A running process that is not nginx: refused, alive, nothing reloaded, rolled back.
    wait_reloads(&admin, "signal_failed", 1.0);
    assert!(
        bystander.alive(),
        "the process named by the pid file was signalled"
    );
    assert_eq!(nginx.rendered(), original, "the file is rolled back");
    assert_eq!(nginx.reloads(), 0);
    let st = admin_status(&admin);
    assert_eq!(st["last_apply"]["result"], "signal_failed");
    let error = st["last_apply"]["error"].as_str().unwrap().to_owned();
    assert!(
        error.contains("is not an nginx master") && error.contains("not signalling it"),
        "{error}"
    );
    assert!(error.contains("the previous file was restored"), "{error}");

    // 2–4. Empty, missing, stale: each change tries again, fails, is logged; the daemon lives.
    let stale = {
        let mut gone = Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        gone.id()
    };
    let cases: [(&str, Option<String>, &str); 3] = [
        ("empty", Some(String::new()), "is empty"),
        ("missing", None, "does not exist"),
        ("stale", Some(format!("{stale}\n")), "which is not running"),
    ];
    for (n, (what, content, says)) in cases.iter().enumerate() {
        match content {
            Some(text) => std::fs::write(&pid_file, text).unwrap(),
            None => std::fs::remove_file(&pid_file).unwrap(),
        }
        // A membership change makes a new file to apply.
        replicas[1].set_mode(if n % 2 == 0 { "error" } else { "healthy" });
        // The change, or a retry of the one before, fails on this pid file.
        wait_for(&format!("{what}: the failure in /status"), SHORT, || {
            admin_status(&admin)["last_apply"]["error"]
                .as_str()
                .is_some_and(|e| e.contains(says))
        });
        assert!(reloads_counted(&admin, "signal_failed") >= 2.0 + n as f64);
        // The log line is written before /status changes, but reaches us through a pipe
        // and a reader thread: wait for it rather than race it.
        wait_for(&format!("{what}: the failure is logged"), SHORT, || {
            daemon.output.text().contains(says)
        });
        assert!(daemon.alive(), "{what}: the daemon keeps running");
        assert_eq!(nginx.rendered(), original, "{what}: rolled back");
        assert_eq!(nginx.reloads(), 0, "{what}: nothing reloaded");
    }
    assert!(bystander.alive());

    // The pid file names the real master again: the next change goes through.
    std::fs::write(&pid_file, format!("{}\n", nginx.pid().unwrap())).unwrap();
    replicas[1].set_mode("healthy");
    wait_reloads(&admin, "ok", 1.0);
    assert_eq!(nginx.reloads(), 1);
    assert!(nginx
        .rendered()
        .contains(&format!("server {};", replicas[1].addr)));
    assert!(reloads_counted(&admin, "signal_failed") >= 4.0);
}

/// The built-in template plus an invalid directive whenever exactly one server is down.
fn template_invalid_with_one_down(dir: &Path) -> std::path::PathBuf {
    let builtin = include_str!("../../templates/upstream.conf.j2");
    let marker = "{% if u.keepalive > 0 %}";
    assert!(builtin.contains(marker));
    let text = builtin.replacen(
        marker,
        &format!(
            "{{% if u.servers|selectattr(\"down\")|list|length == 1 %}}\n    no_such_directive on;\n{{% endif %}}\n{marker}"
        ),
        1,
    );
    let path = dir.join("upstream.conf.j2");
    std::fs::write(&path, text).unwrap();
    path
}

/// Three replicas behind nginx, and upstreamd on a static list of them rendered through
/// [`template_invalid_with_one_down`], past its first good reload.
struct OneDownInvalid {
    daemon: Daemon,
    nginx: Nginx,
    replicas: [Replica; 3],
    admin: String,
    _dir: tempfile::TempDir,
}

impl OneDownInvalid {
    /// Starts it with the config as `configure` changes it.
    fn start(configure: impl FnOnce(Config) -> Config) -> Self {
        let replicas = ["alpha", "bravo", "charlie"].map(Replica::start);
        let nginx = Nginx::start("kotaemon");
        let dir = tempfile::tempdir().unwrap();
        let template = template_invalid_with_one_down(dir.path());
        let cfg = Config::static_list(&nginx, "kotaemon", &replicas.iter().collect::<Vec<_>>())
            .nginx_path("template", &template)
            .admin_port0();
        let daemon = Daemon::start(&configure(cfg).to_toml());
        let admin = daemon.admin();
        {
            let _report = report_on_failure(&nginx);
            wait_reloads(&admin, "ok", 1.0);
        }
        OneDownInvalid {
            replicas,
            nginx,
            daemon,
            admin,
            _dir: dir,
        }
    }
}

#[test]
fn a_file_that_fails_nginx_t_is_rolled_back_unsignalled_and_the_next_change_succeeds() {
    let OneDownInvalid {
        replicas,
        nginx,
        daemon,
        admin,
        ..
    } = &OneDownInvalid::start(|cfg| cfg);
    let _report = report_on_failure(nginx);
    let good = nginx.rendered();
    assert!(!good.contains("no_such_directive"));

    // One down: the template renders a directive nginx does not know.
    replicas[1].set_mode("error");
    wait_reloads(admin, "test_failed", 1.0);
    assert_eq!(nginx.rendered(), good, "rolled back to the last good bytes");
    assert_eq!(nginx.reloads(), 1, "nothing signalled with a rejected file");
    let st = admin_status(admin);
    assert_eq!(st["last_apply"]["result"], "test_failed");
    let error = st["last_apply"]["error"].as_str().unwrap();
    assert!(
        error.contains("unknown directive \"no_such_directive\""),
        "nginx -t's stderr is kept: {error}"
    );
    assert!(error.contains("the previous file was restored"), "{error}");
    daemon.wait_log("Could not apply the new upstream file");
    // The rejected text is retried with backoff (the site may be fixed meanwhile), and a
    // failed test signals nothing: no reload storm.
    wait_for("a retry of the rejected text", SHORT, || {
        reloads_counted(admin, "test_failed") >= 2.0
    });
    assert_eq!(nginx.reloads(), 1);
    assert_eq!(nginx.rendered(), good);

    // Two down: valid again, applied.
    replicas[2].set_mode("error");
    wait_reloads(admin, "ok", 2.0);
    assert_eq!(nginx.reloads(), 2);
    let text = nginx.rendered();
    for r in &replicas[1..] {
        assert!(text.contains(&format!("server {} down;", r.addr)), "{text}");
    }
    assert_eq!(admin_status(admin)["last_apply"]["result"], "ok");
}

#[test]
fn a_reload_nginx_refuses_is_unconfirmed_and_rolled_back() {
    // No test command: the bad file reaches nginx, which refuses it on SIGHUP.
    let OneDownInvalid {
        replicas,
        nginx,
        admin,
        ..
    } = &OneDownInvalid::start(|cfg| {
        cfg.nginx("confirm_timeout", "1s")
            .nginx("test_command", Vec::<String>::new())
    });
    let _report = report_on_failure(nginx);
    let good = nginx.rendered();

    replicas[1].set_mode("error");
    wait_reloads(admin, "unconfirmed", 1.0);
    assert_eq!(nginx.rendered(), good, "rolled back to the last good bytes");
    assert_eq!(reloads_counted(admin, "ok"), 1.0);
    assert!(nginx.reloads() >= 2, "the SIGHUP nginx refused");
    assert!(nginx.error_log().contains("no_such_directive"));
    let st = admin_status(admin);
    assert_eq!(st["last_apply"]["result"], "unconfirmed");
    assert!(st["last_apply"]["error"]
        .as_str()
        .unwrap()
        .contains("started no new workers"));
    // nginx still runs the last good configuration.
    assert!(matches!(nginx.get("/"), Some((200, _))));

    replicas[2].set_mode("error");
    wait_reloads(admin, "ok", 2.0);
    assert!(nginx
        .rendered()
        .contains(&format!("server {} down;", replicas[2].addr)));
    assert!(reloads_counted(admin, "unconfirmed") >= 1.0);
}

#[test]
fn a_write_that_fails_keeps_nginx_and_the_daemon_and_recovers() {
    let replicas = [Replica::start("alpha"), Replica::start("bravo")];
    let nginx = Nginx::start("kotaemon");
    let _report = report_on_failure(&nginx);
    let original = nginx.rendered();
    // The output's parent is a regular file: creating the temp file fails (even as root).
    let blocker = nginx.dir.path().join("conf/blocked");
    std::fs::write(&blocker, "a file, not a directory").unwrap();
    let output = blocker.join("upstreams.conf");
    let cfg = Config::static_list(&nginx, "kotaemon", &[&replicas[0], &replicas[1]])
        .nginx_path("output", &output)
        .admin_port0()
        .to_toml();
    let mut daemon = Daemon::start(&cfg);
    let admin = daemon.admin();

    wait_reloads(&admin, "write_failed", 1.0);
    let st = admin_status(&admin);
    assert_eq!(st["last_apply"]["result"], "write_failed");
    let error = st["last_apply"]["error"].as_str().unwrap();
    assert!(error.contains("the old file is left as it is"), "{error}");
    assert!(error.contains("Not a directory"), "{error}");
    assert!(daemon.alive());
    assert_eq!(nginx.reloads(), 0);
    assert_eq!(nginx.rendered(), original, "nginx's own file is untouched");

    // The directory appears; nothing else changes: the retry writes and applies the file.
    std::fs::remove_file(&blocker).unwrap();
    std::fs::create_dir(&blocker).unwrap();
    wait_for("the retry to succeed", SHORT, || {
        reloads_counted(&admin, "ok") >= 1.0
    });
    let text = std::fs::read_to_string(&output).unwrap();
    for r in &replicas {
        assert!(text.contains(&format!("server {};", r.addr)), "{text}");
    }
    assert_eq!(admin_status(&admin)["apply"]["state"], "in_sync");
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn the_file_keeps_its_mode_and_a_new_one_is_0644_whatever_the_umask() {
    let replicas = [Replica::start("alpha")];
    let nginx = Nginx::start("kotaemon");
    let _report = report_on_failure(&nginx);
    std::fs::set_permissions(nginx.output(), std::fs::Permissions::from_mode(0o640)).unwrap();
    let cfg = Config::static_list(&nginx, "kotaemon", &[&replicas[0]]);
    let daemon = Daemon::start(&cfg.clone().admin_port0().to_toml());
    wait_reloads(&daemon.admin(), "ok", 1.0);
    assert!(nginx.rendered().contains(&replicas[0].addr));
    assert_eq!(mode_of(&nginx.output()), 0o640, "the previous mode is kept");
    drop(daemon);

    // A file that does not exist yet, written by `once` under a umask of 077.
    let fresh = nginx.dir.path().join("conf/fresh.conf");
    let (_dir, path) = write_config(&cfg.nginx_path("output", &fresh).to_toml());
    let out = Command::new("sh")
        .args([
            "-c",
            "umask 077; exec \"$0\" once --config \"$1\"",
            env!("CARGO_BIN_EXE_upstreamd"),
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode_of(&fresh), 0o644);
}

#[test]
fn the_admin_server_binds_exactly_its_listen_address() {
    let replicas = [Replica::start("alpha")];
    let nginx = Nginx::start("kotaemon");
    let cfg = Config::static_list(&nginx, "kotaemon", &[&replicas[0]])
        .admin_port0()
        .to_toml();
    let daemon = Daemon::start(&cfg);
    // The port the kernel picked, as the daemon logged it.
    let admin = daemon.admin();
    wait_for("the admin server", SHORT, || {
        http_get(&admin, "/healthz", SHORT).is_some()
    });
    let port: u16 = admin.rsplit_once(':').unwrap().1.parse().unwrap();
    assert_eq!(
        listening_on(port),
        ["0100007F"],
        "only 127.0.0.1 listens on the admin port"
    );

    // Without [admin] there is no admin server at all.
    let nginx2 = Nginx::start("kotaemon");
    let cfg = Config::static_list(&nginx2, "kotaemon", &[&replicas[0]]).to_toml();
    let daemon = Daemon::start(&cfg);
    wait_for("the first reload", SHORT, || nginx2.reloads() == 1);
    assert!(!daemon.output.text().contains("Admin server listening"));
}

#[test]
fn the_shared_memory_zone_fits_large_upstreams() {
    // Found by the crash test: 250 servers overflowed the zone and `nginx -t` refused the file.
    let dir = tempfile::tempdir().unwrap();
    for sub in ["conf", "logs"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
    }
    std::fs::write(
        dir.path().join("conf/nginx.conf"),
        "pid logs/nginx.pid;\nerror_log logs/error.log;\nevents {}\n\
         http { include upstreams.conf; server { listen 127.0.0.1:1; location / { proxy_pass http://kotaemon; } } }\n",
    )
    .unwrap();
    for n in [1usize, 250, 1000, 10_000] {
        let servers: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    "{{ address = \"[ffff:ffff:ffff:ffff:ffff:ffff:{:x}:{:x}]:65535\", weight = 1000, max_fails = 1000, fail_timeout = 86400 }}",
                    0xf000 + i / 65536,
                    i % 65536
                )
            })
            .collect();
        let cfg = format!(
            "[nginx]\noutput = \"{}\"\n[[upstream]]\nname = \"kotaemon\"\n[upstream.health]\nenabled = false\n\
             [[upstream.source]]\nkind = \"static\"\nservers = [{}]\n",
            dir.path().join("conf/upstreams.conf").display(),
            servers.join(", ")
        );
        let (_cfg_dir, path) = write_config(&cfg);
        let (code, out, err) =
            upstreamd(&["once", "--config", path.to_str().unwrap(), "--dry-run"]);
        assert_eq!(code, 0, "{err}");
        std::fs::write(dir.path().join("conf/upstreams.conf"), &out).unwrap();
        let t = Command::new("nginx")
            .args([
                "-p",
                dir.path().to_str().unwrap(),
                "-c",
                "conf/nginx.conf",
                "-t",
                "-q",
            ])
            .output()
            .unwrap();
        assert!(
            t.status.success(),
            "{n} servers: {}",
            String::from_utf8_lossy(&t.stderr)
        );
    }
}
