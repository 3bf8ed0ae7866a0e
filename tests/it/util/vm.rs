//! A Debian 12 "VM" for the systemd and .deb tests: a container running systemd as PID 1
//! with Debian's nginx.service (scripts/docker-systemd.sh), the Consul stand-in on the agent's
//! usual address and stand-in Kotaemon replicas as transient units, following the README's
//! VM steps. On a failing test it prints upstreamd's journal before the container goes.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use super::docker::{self, describe, Container};

/// Where the unit is installed (where the .deb puts it).
pub const UNIT: &str = "/lib/systemd/system/upstreamd.service";
/// The config the unit runs.
pub const CONFIG: &str = "/etc/upstreamd/upstreamd.toml";
/// The include upstreamd writes (the example config's `output`).
pub const INCLUDE: &str = "/etc/nginx/conf.d/upstreamd.conf";
/// The Consul stand-in, where the example config looks for the agent.
pub const CONSUL: &str = "127.0.0.1:8500";
/// upstreamd's metrics, on the example config's admin address.
pub const METRICS: &str = "http://127.0.0.1:9187/metrics";

/// Replica `n` (1–3) listens on 127.0.0.1n:7860 inside the container.
pub fn replica_addr(n: u8) -> String {
    format!("127.0.0.1{n}:7860")
}

/// Replaces the one occurrence of `from`; panics if the shipped file changed shape.
pub fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "`{from}` once in:\n{text}");
    text.replacen(from, to, 1)
}

/// The shipped example config, with faster probes so the tests do not wait on them.
pub fn config() -> String {
    let text = std::fs::read_to_string(docker::repo().join("systemd/upstreamd.toml.example"))
        .expect("read systemd/upstreamd.toml.example");
    fast_probes(&text)
}

/// `text` (the example config or a copy of it) with 500 ms probes and `fall = 1`.
pub fn fast_probes(text: &str) -> String {
    let text = replace_once(text, "\ninterval = \"2s\"", "\ninterval = \"500ms\"");
    let text = replace_once(&text, "\ntimeout = \"1s\"", "\ntimeout = \"400ms\"");
    replace_once(&text, "\nfall = 3", "\nfall = 1")
}

/// The names of `list`, as [`Vm::served`] reports them.
pub fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// One systemd container set up as a VM.
pub struct Vm {
    /// The container.
    pub c: Container,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let out = self.c.sh(
                "systemctl status --no-pager upstreamd nginx; journalctl --no-pager -n 150 -u upstreamd; \
                 echo '--- include'; cat /etc/nginx/conf.d/upstreamd.conf",
            );
            eprintln!("{}", describe("the VM's state", &out));
        }
    }
}

impl Vm {
    /// A booted container with the stand-ins copied in and nothing of upstreamd; `None`
    /// when there is no Docker engine.
    pub fn boot(test: &str) -> Option<Vm> {
        if !docker::engine_available(test) {
            return None;
        }
        let c = Container::systemd(&docker::systemd_image());
        c.copy_in(
            Path::new(env!("CARGO_BIN_EXE_kotaemon-standin")),
            "/usr/local/bin/kotaemon-standin",
        );
        c.copy_in(
            Path::new(env!("CARGO_BIN_EXE_consul-standin")),
            "/usr/local/bin/consul-standin",
        );
        Some(Vm { c })
    }

    /// [`Vm::boot`], then the host-built upstreamd as /usr/bin/upstreamd, the repository's
    /// unit and the example config (faster probes), as the .deb would lay them out.
    pub fn with_build(test: &str) -> Option<Vm> {
        let vm = Vm::boot(test)?;
        vm.c.copy_in(
            Path::new(env!("CARGO_BIN_EXE_upstreamd")),
            "/usr/bin/upstreamd",
        );
        vm.c.copy_in(&docker::repo().join("systemd/upstreamd.service"), UNIT);
        vm.c.write(CONFIG, &config());
        vm.c.exec_ok(&["systemctl", "daemon-reload"]);
        Some(vm)
    }

    /// Starts the Consul stand-in on the agent's usual address, as a transient unit.
    pub fn consul(&self) {
        self.c.exec_ok(&[
            "systemd-run",
            "--unit=consul",
            "/usr/local/bin/consul-standin",
            "--listen",
            CONSUL,
        ]);
        self.c.wait_until(
            "the Consul stand-in",
            Duration::from_secs(20),
            &format!("curl -sf http://{CONSUL}/v1/health/service/kotaemon"),
        );
    }

    /// Starts replica `n` as the transient unit `kotaemon-n`, waiting until it answers.
    pub fn replica(&self, n: u8) {
        let addr = replica_addr(n);
        self.c.exec_ok(&[
            "systemd-run",
            &format!("--unit=kotaemon-{n}"),
            "/usr/local/bin/kotaemon-standin",
            "--listen",
            &addr,
            "--name",
            &format!("kotaemon-{n}"),
        ]);
        self.c.wait_until(
            "the replica",
            Duration::from_secs(20),
            &format!("curl -sf http://{addr}/queue/status"),
        );
    }

    /// Registers replica `n` in Consul as service `kotaemon`.
    pub fn register(&self, n: u8) {
        let addr = replica_addr(n);
        let (ip, port) = addr.split_once(':').unwrap();
        let body =
            format!(r#"{{"ID":"kotaemon-{n}","Name":"kotaemon","Address":"{ip}","Port":{port}}}"#);
        self.c.exec_ok(&[
            "curl",
            "-sf",
            "-X",
            "PUT",
            &format!("http://{CONSUL}/v1/agent/service/register"),
            "-d",
            &body,
        ]);
    }

    /// Deregisters replica `n` from Consul.
    pub fn deregister(&self, n: u8) {
        self.c.exec_ok(&[
            "curl",
            "-sf",
            "-X",
            "PUT",
            &format!("http://{CONSUL}/v1/agent/service/deregister/kotaemon-{n}"),
        ]);
    }

    /// The README's step 3: the first include written by `once --no-reload`, then the
    /// Kotaemon site, and nginx reloaded.
    pub fn site(&self) {
        self.c.exec_ok(&[
            "sh",
            "-c",
            &format!("upstreamd once --config {CONFIG} --no-reload && test -s {INCLUDE}"),
        ]);
        self.c.copy_in(
            &docker::repo().join("examples/nginx/kotaemon-site.conf"),
            "/etc/nginx/sites-enabled/kotaemon.conf",
        );
        self.c
            .exec_ok(&["sh", "-c", "nginx -t -q && systemctl reload nginx"]);
    }

    /// Consul, three registered replicas, the site, and `systemctl start upstreamd`.
    pub fn serve(&self) {
        self.consul();
        for n in 1..=3 {
            self.replica(n);
            self.register(n);
        }
        self.site();
        self.c.exec_ok(&["systemctl", "start", "upstreamd"]);
    }

    /// `systemctl show -p PROP --value upstreamd`.
    pub fn show(&self, prop: &str) -> String {
        self.c
            .exec_ok(&["systemctl", "show", "-p", prop, "--value", "upstreamd"])
            .trim()
            .to_owned()
    }

    /// Which replicas answer through nginx on 127.0.0.1:8080, asked once per affinity cookie
    /// `u1`..`u30` (one cookie sticks to one replica; thirty reach every replica that is up).
    /// A failed request shows as `FAILED`.
    pub fn served(&self) -> BTreeSet<String> {
        let out = self.c.exec_ok(&[
            "sh",
            "-c",
            "for i in $(seq 30); do curl -sf -b kh_affinity=u$i http://127.0.0.1:8080/ || echo FAILED; done",
        ]);
        out.lines()
            .map(|l| l.trim_start_matches("kotaemon-standin ").to_owned())
            .collect()
    }

    /// Waits until `upstreamd_reloads_total{result="ok"}` is `n`.
    pub fn wait_reloads(&self, n: u32) {
        self.c.wait_until(
            &format!("{n} good reloads"),
            Duration::from_secs(30),
            &format!(
                "curl -sf {METRICS} | grep -qx 'upstreamd_reloads_total{{result=\"ok\"}} {n}'"
            ),
        );
    }

    /// Whether `/metrics` has a line for a failed reload.
    pub fn failed_reloads(&self) -> Vec<String> {
        let text = self.c.exec_ok(&["curl", "-sf", METRICS]);
        text.lines()
            .filter(|l| l.starts_with("upstreamd_reloads_total{") && !l.contains("\"ok\""))
            .filter(|l| !l.ends_with(" 0"))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until the include contains `wanted` (or, with `present` false, no longer does).
    pub fn wait_include(&self, wanted: &str, present: bool) {
        let not = if present { "" } else { "!" };
        self.c.wait_until(
            &format!("`{wanted}` in the include (present: {present})"),
            Duration::from_secs(30),
            &format!("{not} grep -qF '{wanted}' {INCLUDE}"),
        );
    }
}
