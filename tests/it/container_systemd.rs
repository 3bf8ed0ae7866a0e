//! systemd/upstreamd.service under real systemd (PID 1 in a Debian 12 container) beside
//! Debian's own nginx.service, with the host-built upstreamd, the Consul stand-in and three
//! stand-in Kotaemon replicas copied in (tests/it/util/vm.rs). What a VM user sees:
//! `systemctl start` returning on readiness, the `STATUS=` line, reloads, the watchdog,
//! traffic through nginx.
//!
//! Needs the Docker engine (skipped without it, unless `UPSTREAMD_REQUIRE_DOCKER=1`).

use std::time::Duration;

use crate::util::vm::{config, names, replace_once, replica_addr, Vm, CONFIG, INCLUDE};

#[test]
fn the_unit_starts_on_readiness_reports_status_and_applies_through_its_sandbox() {
    let Some(vm) = Vm::with_build("the unit's readiness, status and sandbox") else {
        return;
    };
    vm.serve();
    // `systemctl start` of a Type=notify unit returns once READY=1 arrived.
    assert_eq!(vm.show("Type"), "notify");
    assert_eq!(vm.show("ActiveState"), "active");
    assert_eq!(vm.show("SubState"), "running");
    let status = vm.show("StatusText");
    assert!(
        status.starts_with("kotaemon: 3 healthy, 0 unhealthy, 0 unknown"),
        "STATUS= line: {status:?}"
    );
    vm.c.exec_ok(&["curl", "-sf", "http://127.0.0.1:9187/readyz"]);
    assert_eq!(
        vm.served(),
        names(&["kotaemon-1", "kotaemon-2", "kotaemon-3"])
    );

    // A replica stops: the sandboxed unit writes /etc/nginx/conf.d, runs `nginx -t` and
    // signals Debian's nginx master, which then sends it no more traffic.
    vm.c.exec_ok(&["systemctl", "stop", "kotaemon-2"]);
    vm.wait_include(&format!("server {} down;", replica_addr(2)), true);
    vm.wait_reloads(1);
    assert_eq!(vm.failed_reloads(), Vec::<String>::new());
    assert_eq!(vm.served(), names(&["kotaemon-1", "kotaemon-3"]));
    vm.c.wait_until(
        "the STATUS= line to follow",
        Duration::from_secs(30),
        "systemctl show -p StatusText --value upstreamd | grep -q '^kotaemon: 2 healthy, 1 unhealthy.*last apply ok$'",
    );
}

#[test]
fn systemctl_reload_rereads_the_config_and_refuses_a_broken_one() {
    let Some(vm) = Vm::with_build("systemctl reload upstreamd") else {
        return;
    };
    vm.serve();
    let pid = vm.show("MainPID");
    vm.wait_include("keepalive 32;", true);

    vm.c.write(
        CONFIG,
        &replace_once(&config(), "keepalive = 32", "keepalive = 16"),
    );
    vm.c.exec_ok(&["systemctl", "reload", "upstreamd"]);
    vm.wait_include("keepalive 16;", true);
    vm.wait_reloads(1);
    assert_eq!(vm.served().len(), 3);

    vm.c.write(
        CONFIG,
        &replace_once(&config(), "keepalive = 32", "keepalive = \"many\""),
    );
    let before = vm.c.exec_ok(&["cat", INCLUDE]);
    vm.c.exec_ok(&["systemctl", "reload", "upstreamd"]);
    vm.c.wait_until(
        "the refusal in the journal",
        Duration::from_secs(30),
        "journalctl -u upstreamd --no-pager | grep -q 'Refusing the new config'",
    );
    assert_eq!(vm.show("ActiveState"), "active");
    assert_eq!(vm.show("MainPID"), pid, "the daemon was not restarted");
    assert_eq!(vm.c.exec_ok(&["cat", INCLUDE]), before);
    assert_eq!(vm.served().len(), 3);
}

#[test]
fn the_watchdog_restarts_a_frozen_daemon() {
    let Some(vm) = Vm::with_build("the watchdog") else {
        return;
    };
    vm.c.write(
        "/etc/systemd/system/upstreamd.service.d/watchdog.conf",
        "[Service]\nWatchdogSec=3s\n",
    );
    vm.c.exec_ok(&["systemctl", "daemon-reload"]);
    vm.serve();
    assert_eq!(vm.show("WatchdogUSec"), "3s");
    let frozen = vm.show("MainPID");
    vm.c.exec_ok(&["kill", "-STOP", &frozen]);
    vm.c.wait_until(
        "the watchdog to restart upstreamd",
        Duration::from_secs(60),
        &format!(
            "test \"$(systemctl show -p NRestarts --value upstreamd)\" = 1 && \
             systemctl is-active -q upstreamd && \
             test \"$(systemctl show -p MainPID --value upstreamd)\" != {frozen}"
        ),
    );
    vm.c.exec_ok(&[
        "sh",
        "-c",
        "journalctl -u upstreamd --no-pager | grep -q 'Watchdog timeout'",
    ]);
    // The new process works: a change still reaches nginx.
    vm.deregister(3);
    vm.wait_include(&replica_addr(3), false);
    vm.wait_reloads(1);
    assert_eq!(vm.served(), names(&["kotaemon-1", "kotaemon-2"]));
}

#[test]
fn a_restarted_nginx_gets_the_next_change() {
    let Some(vm) = Vm::with_build("systemctl restart nginx") else {
        return;
    };
    vm.serve();
    let upstreamd = vm.show("MainPID");
    // One change applied to the first master…
    vm.deregister(1);
    vm.wait_include(&replica_addr(1), false);
    vm.wait_reloads(1);
    let old_master = vm.c.exec_ok(&["cat", "/run/nginx.pid"]);
    vm.c.exec_ok(&["systemctl", "restart", "nginx"]);
    let new_master = vm.c.exec_ok(&["cat", "/run/nginx.pid"]);
    assert_ne!(old_master, new_master, "nginx has a new master");

    // …and the next one to the master that replaced it.
    vm.deregister(2);
    vm.wait_include(&replica_addr(2), false);
    vm.wait_reloads(2);
    assert_eq!(vm.failed_reloads(), Vec::<String>::new());
    assert_eq!(vm.served(), names(&["kotaemon-3"]));
    assert_eq!(vm.show("MainPID"), upstreamd, "upstreamd kept running");
    assert_eq!(vm.c.exec_ok(&["cat", "/run/nginx.pid"]), new_master);
}

#[test]
fn a_registry_down_at_boot_does_not_fail_the_start_and_the_file_converges_later() {
    let Some(vm) = Vm::with_build("readiness with the registry down") else {
        return;
    };
    // A start timeout shorter than the default 90 s but above the startup deadline (30 s):
    // without READY=1 at the deadline, this start fails.
    vm.c.write(
        "/etc/systemd/system/upstreamd.service.d/timeout.conf",
        "[Service]\nTimeoutStartSec=50s\n",
    );
    vm.c.exec_ok(&["systemctl", "daemon-reload"]);
    vm.c.exec_ok(&["systemctl", "start", "upstreamd"]);
    assert_eq!(vm.show("ActiveState"), "active");
    assert_eq!(vm.show("NRestarts"), "0");
    let status = vm.show("StatusText");
    assert!(
        status.starts_with(
            "Started without a first file after 30s: still waiting: upstream kotaemon source "
        ) && status.contains("has not delivered"),
        "STATUS= line: {status:?}"
    );
    let readyz = vm.c.exec(&["curl", "-sf", "http://127.0.0.1:9187/readyz"]);
    assert!(!readyz.status.success(), "/readyz waits for the first file");
    assert!(
        !vm.c.exec(&["test", "-e", INCLUDE]).status.success(),
        "no include before the registry answered"
    );

    // The registry comes up: the file converges, and readiness and status follow.
    vm.consul();
    for n in 1..=3 {
        vm.replica(n);
        vm.register(n);
    }
    for n in 1..=3 {
        vm.wait_include(&format!("server {};", replica_addr(n)), true);
    }
    vm.c.wait_until(
        "/readyz",
        Duration::from_secs(30),
        "curl -sf http://127.0.0.1:9187/readyz",
    );
    vm.c.wait_until(
        "the STATUS= line to show the upstream",
        Duration::from_secs(30),
        "systemctl show -p StatusText --value upstreamd | grep -q '^kotaemon: 3 healthy'",
    );
    assert_eq!(vm.show("NRestarts"), "0");
}
