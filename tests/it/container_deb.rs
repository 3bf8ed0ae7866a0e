//! The Debian package as a VM user meets it: `apt-get install ./upstreamd_….deb` on Debian 12
//! with systemd and Debian's nginx (tests/it/util/vm.rs), edit the config, start the unit, see
//! traffic through nginx, then `apt-get purge` and find nothing left behind.
//!
//! The package is `$UPSTREAMD_DEB` when set (CI's release .deb); otherwise `cargo deb
//! --no-build --profile dev` packages the debug build this test run made, in seconds rather
//! than a release build's minutes. Needs the Docker engine and cargo-deb.

use std::path::PathBuf;
use std::process::Command;

use crate::util::docker::run_ok;
use crate::util::vm::{fast_probes, names, replica_addr, Vm, CONFIG, INCLUDE};

/// The .deb to test: `$UPSTREAMD_DEB`, or one packaged now from the debug build.
fn package(out: &std::path::Path) -> PathBuf {
    if let Some(deb) = std::env::var_os("UPSTREAMD_DEB") {
        return PathBuf::from(deb);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let printed = run_ok(
        Command::new(cargo)
            .current_dir(crate::util::docker::repo())
            .args([
                "deb",
                "--no-build",
                "--profile",
                "dev",
                "--no-dbgsym",
                "--fast",
            ])
            .arg("--output")
            .arg(out),
    );
    let deb = printed
        .lines()
        .rev()
        .find(|l| l.ends_with(".deb"))
        .unwrap_or_else(|| panic!("cargo deb printed no .deb path:\n{printed}"));
    PathBuf::from(deb.trim())
}

/// What `sh -c SCRIPT` printed, whatever its exit code (`systemctl is-active` exits 3 when
/// the unit is inactive).
fn stdout(vm: &Vm, script: &str) -> String {
    String::from_utf8_lossy(&vm.c.sh(script).stdout).into_owned()
}

/// Every path on the container's root file system but those that churn on their own
/// (logs, caches, apt's and dpkg's books, temp files).
const LIST_FILES: &str = "find / -xdev \\( -path /proc -o -path /sys -o -path /dev -o -path /run \
    -o -path /tmp -o -path /var/log -o -path /var/cache -o -path /var/lib/apt \
    -o -path /var/lib/dpkg -o -path /var/tmp \\) -prune -o -print | sort";

#[test]
fn the_deb_installs_without_starting_runs_once_configured_and_purges_clean() {
    let Some(vm) = Vm::boot("the .deb") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let deb = package(dir.path());
    vm.c.copy_in(&deb, "/tmp/upstreamd.deb");
    let before = vm.c.exec_ok(&["sh", "-c", LIST_FILES]);

    // Installing must not start the daemon: its config still names an unset Consul service.
    vm.c.exec_ok(&[
        "sh",
        "-c",
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -q /tmp/upstreamd.deb",
    ]);
    assert_eq!(stdout(&vm, "systemctl is-enabled upstreamd"), "enabled\n");
    assert_eq!(stdout(&vm, "systemctl is-active upstreamd"), "inactive\n");

    // What the package holds: the daemon only, the unit pointing at it, the conffile, docs.
    let files = vm.c.exec_ok(&["dpkg", "-L", "upstreamd"]);
    for wanted in [
        "/usr/bin/upstreamd",
        "/usr/lib/systemd/system/upstreamd.service",
        "/etc/upstreamd/upstreamd.toml",
        "/usr/share/doc/upstreamd/copyright",
        "/usr/share/doc/upstreamd/README.md",
        "/usr/share/doc/upstreamd/operations.md",
    ] {
        assert!(
            files.lines().any(|l| l == wanted),
            "no {wanted} in\n{files}"
        );
    }
    assert!(!files.contains("standin"), "stand-ins packaged:\n{files}");
    let conffiles =
        vm.c.exec_ok(&["dpkg-query", "-W", "-f", "${Conffiles}", "upstreamd"]);
    assert!(
        conffiles.contains("/etc/upstreamd/upstreamd.toml"),
        "{conffiles:?}"
    );
    let recommends =
        vm.c.exec_ok(&["dpkg-query", "-W", "-f", "${Recommends}", "upstreamd"]);
    assert_eq!(recommends, "nginx");
    assert_eq!(
        stdout(
            &vm,
            "systemctl show -p ExecStart --value upstreamd | grep -o 'path=[^ ]*'"
        ),
        "path=/usr/bin/upstreamd\n"
    );

    // The user's edit: a static list of the three replicas instead of the Consul service.
    let example = vm.c.exec_ok(&["cat", CONFIG]);
    let (head, _consul) = example
        .split_once("[[upstream.source]]")
        .expect("the example has a source");
    let servers: Vec<String> = (1..=3)
        .map(|n| format!("\"{}\"", replica_addr(n)))
        .collect();
    let edited = format!(
        "{}[[upstream.source]]\nkind = \"static\"\nservers = [{}]\n",
        fast_probes(head),
        servers.join(", ")
    );
    vm.c.write(CONFIG, &edited);
    for n in 1..=3 {
        vm.replica(n);
    }
    vm.site();
    vm.c.exec_ok(&["systemctl", "start", "upstreamd"]);
    assert_eq!(
        vm.served(),
        names(&["kotaemon-1", "kotaemon-2", "kotaemon-3"])
    );
    vm.c.exec_ok(&["systemctl", "stop", "kotaemon-1"]);
    vm.wait_include(&format!("server {} down;", replica_addr(1)), true);
    vm.wait_reloads(1);
    assert_eq!(vm.served(), names(&["kotaemon-2", "kotaemon-3"]));
    vm.c.exec_ok(&["test", "-d", "/var/lib/upstreamd"]);

    // Purge: the daemon stops and every file the package or the daemon made goes, but the
    // include, which nginx's config (the user's site) still needs.
    vm.c.exec_ok(&[
        "sh",
        "-c",
        "DEBIAN_FRONTEND=noninteractive apt-get purge -y -q upstreamd",
    ]);
    assert_eq!(stdout(&vm, "systemctl is-active upstreamd"), "inactive\n");
    assert_eq!(
        stdout(&vm, "pgrep -x upstreamd"),
        "",
        "upstreamd still runs"
    );
    let after = vm.c.exec_ok(&["sh", "-c", LIST_FILES]);
    let before: std::collections::BTreeSet<&str> = before.lines().collect();
    let left: Vec<&str> = after
        .lines()
        .filter(|path| !before.contains(path))
        .filter(|path| {
            ![INCLUDE, "/etc/nginx/sites-enabled/kotaemon.conf"]
                .iter()
                .any(|kept| path.starts_with(kept))
        })
        .collect();
    assert!(left.is_empty(), "left after purge:\n{}", left.join("\n"));
    vm.c.exec_ok(&["nginx", "-t", "-q"]);
}
