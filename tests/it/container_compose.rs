//! The docker-compose stack for real: `docker-compose.yml` as users run it, with
//! tests/compose/override.yml standing Debian-built images (tests/compose/Dockerfile) in for
//! the registry images that cannot be pulled here, on the host's Docker engine.
//!
//! One test walks the stack through what a user does and checks what they see: traffic on the
//! published port, nginx's reload count (its error log, on the container's stderr), the
//! include both containers see, and Consul's API.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::docker::{
    compose_available, engine_available, image_from, repo, run, run_ok, Compose,
};
use crate::util::{http_get, http_request, wait_for};

/// nginx's published port (docker-compose.yml: `8080:80`).
const NGINX: &str = "127.0.0.1:8080";
/// upstreamd's admin listener, published on the host's loopback.
const ADMIN: &str = "127.0.0.1:9187";
/// Consul's API (here the stand-in), published on the host's loopback.
const CONSUL: &str = "127.0.0.1:8500";
/// Where upstreamd writes the include, in both the nginx and the upstreamd container.
const INCLUDE: &str = "/etc/nginx/upstreamd/upstreamd.conf";
/// The stand-ins' fixed addresses (docker-compose.yml and deploy/compose/consul/kotaemon.json).
const REPLICAS: [(&str, &str); 3] = [
    ("kotaemon-1", "172.29.57.11:7860"),
    ("kotaemon-2", "172.29.57.12:7860"),
    ("kotaemon-3", "172.29.57.13:7860"),
];
/// Requests per traffic sample, each with its own affinity cookie (as from as many browsers).
const SAMPLE: usize = 60;

/// The stack, up, with the helpers the test reads it through.
struct Stack {
    compose: Compose,
    /// The nginx and upstreamd containers' ids, by service.
    ids: BTreeMap<&'static str, String>,
}

impl Stack {
    /// `up -d` with the test images and the host's debug builds of upstreamd and the stand-ins.
    fn up(image: &str) -> Self {
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_upstreamd"))
            .parent()
            .expect("the binaries' directory")
            .to_str()
            .expect("a UTF-8 target path")
            .to_owned();
        for bin in [
            env!("CARGO_BIN_EXE_kotaemon-standin"),
            env!("CARGO_BIN_EXE_consul-standin"),
        ] {
            assert_eq!(
                Path::new(bin).parent().and_then(Path::to_str),
                Some(bin_dir.as_str()),
                "the override mounts every binary from one directory"
            );
        }
        let compose = Compose::new(
            "upstreamd-compose",
            &["docker-compose.yml", "tests/compose/override.yml"],
            &[
                ("UPSTREAMD_COMPOSE_IMAGE", image),
                ("UPSTREAMD_BIN_DIR", &bin_dir),
            ],
        );
        compose.run_ok(&["up", "-d", "--no-build"]);
        let ids = ["nginx", "upstreamd"]
            .into_iter()
            .map(|service| (service, compose.container(service)))
            .collect();
        Stack { compose, ids }
    }

    /// `docker exec` in `service`'s container (by id: the docker CLI answers in milliseconds,
    /// docker-compose's in a second or more), panicking unless it exits 0; returns stdout.
    fn exec_ok(&self, service: &str, cmd: &[&str]) -> String {
        run_ok(
            Command::new("docker")
                .arg("exec")
                .arg(&self.ids[service])
                .args(cmd),
        )
    }

    /// The include as the `service` container sees it.
    fn include(&self, service: &str) -> String {
        self.exec_ok(service, &["cat", INCLUDE])
    }

    /// The `server` line of `addr` in nginx's include, if any.
    fn server_line(&self, addr: &str) -> Option<String> {
        let needle = format!("server {addr}");
        self.include("nginx")
            .lines()
            .find(|line| line.trim_start().starts_with(&needle))
            .map(str::to_owned)
    }

    /// SIGHUPs nginx's master logged (at `notice`, to the container's stderr).
    fn reloads(&self) -> usize {
        let out = run(Command::new("docker").args(["logs", &self.ids["nginx"]]));
        String::from_utf8_lossy(&out.stderr)
            .matches("signal 1 (SIGHUP) received")
            .count()
    }

    /// Waits for the reload count to reach `n`, then checks it is exactly `n`.
    fn expect_reloads(&self, n: usize, why: &str) {
        wait_for(why, Duration::from_secs(30), || self.reloads() >= n);
        assert_eq!(self.reloads(), n, "{why}: exactly that many reloads");
    }
}

/// `GET /` through nginx's published port with affinity cookie `key`: (status, replica name).
fn get(key: &str) -> Option<(u16, String)> {
    let out = run(Command::new("curl").args([
        "-s",
        "-m",
        "5",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "-H",
        &format!("Cookie: kh_affinity={key}"),
        &format!("http://{NGINX}/"),
    ]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n')?;
    let status = status.trim().parse().ok().filter(|s| *s != 0)?;
    let name = body.split_whitespace().last().unwrap_or("").to_owned();
    Some((status, name))
}

/// Answers per replica over `SAMPLE` requests with distinct cookies; failures count as
/// `status N` or `error`.
fn spread() -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for i in 0..SAMPLE {
        let key = match get(&format!("browser-{i}")) {
            Some((200, name)) => name,
            Some((status, _)) => format!("status {status}"),
            None => "error".to_owned(),
        };
        *seen.entry(key).or_insert(0) += 1;
    }
    seen
}

/// Samples traffic until it reaches exactly the replicas `names` (old nginx workers may answer
/// with the previous membership for a moment after a reload); returns the last sample.
fn wait_traffic(names: &[&str], what: &str) -> BTreeMap<String, usize> {
    let want: BTreeSet<&str> = names.iter().copied().collect();
    let start = Instant::now();
    loop {
        let seen = spread();
        if seen.keys().map(String::as_str).collect::<BTreeSet<_>>() == want {
            return seen;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out after 30s waiting for {what}; the last {SAMPLE} requests: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn compose_stack_serves_fails_over_restarts_quietly_and_follows_consul() {
    let test = "container_compose";
    if !engine_available(test) || !compose_available(test) {
        return;
    }
    let image = image_from(
        "upstreamd-compose-test",
        &repo().join("tests/compose/Dockerfile"),
    );

    let start = Instant::now();
    let stack = Stack::up(&image);
    let up_returned = start.elapsed();
    wait_for(
        "the first request served by a replica through nginx",
        Duration::from_secs(120),
        || matches!(get("first"), Some((200, _))),
    );
    println!(
        "compose: `up -d` returned after {:.1} s; first request served {:.1} s after `up` began",
        up_returned.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );

    // All three registered in Consul, probed healthy, rendered, and reached through nginx.
    wait_for(
        "all three replicas up in the include",
        Duration::from_secs(60),
        || {
            REPLICAS
                .iter()
                .all(|(_, addr)| server_up(stack.server_line(addr).as_deref()))
        },
    );
    let seen = wait_traffic(
        &["kotaemon-1", "kotaemon-2", "kotaemon-3"],
        "traffic to reach all three replicas",
    );
    println!("compose: {SAMPLE} requests with distinct cookies: {seen:?}");
    let base = stack.reloads();
    assert!(base >= 1, "upstreamd's first render reloaded nginx");
    println!("compose: {base} reload(s) to bring all three in");

    // A stopped replica fails its probes and is marked down with one reload.
    let stop = Instant::now();
    stack.compose.run_ok(&["stop", "kotaemon-2"]);
    wait_for("kotaemon-2 marked down", Duration::from_secs(60), || {
        stack
            .server_line(REPLICAS[1].1)
            .is_some_and(|line| line.ends_with("down;"))
    });
    stack.expect_reloads(base + 1, "stopping kotaemon-2");
    println!(
        "compose: `stop kotaemon-2` → rendered down and reloaded: {:.1} s",
        stop.elapsed().as_secs_f64()
    );
    // Its probes keep failing; each is an event, and none may reload nginx again.
    let failed = failed_probes("kotaemon");
    wait_for(
        "two more failed probes of kotaemon-2",
        Duration::from_secs(30),
        || failed_probes("kotaemon") >= failed + 2,
    );
    assert_eq!(
        stack.reloads(),
        base + 1,
        "a stopped replica reloads nginx once, not at each failed probe"
    );
    wait_traffic(&["kotaemon-1", "kotaemon-3"], "traffic to leave kotaemon-2");

    // Restarting upstreamd over an unchanged world renders the same bytes and reloads nothing.
    let before = stack.include("nginx");
    stack.compose.run_ok(&["restart", "-t", "10", "upstreamd"]);
    let ready = wait_for(
        "the restarted upstreamd to be ready",
        Duration::from_secs(60),
        || {
            matches!(
                http_get(ADMIN, "/readyz", Duration::from_secs(2)),
                Some((200, _))
            )
        },
    );
    println!(
        "compose: `restart upstreamd` → ready again: {:.1} s",
        ready.as_secs_f64()
    );
    assert_eq!(
        stack.reloads(),
        base + 1,
        "restarting upstreamd reloaded nginx"
    );
    assert_eq!(
        stack.include("nginx"),
        before,
        "the restart changed the include"
    );
    let metrics = metrics();
    assert!(
        metrics.contains(r#"upstreamd_renders_total{result="unchanged"}"#),
        "the restarted upstreamd rendered and found the file unchanged:\n{metrics}"
    );

    // Deregistered from Consul: dropped from the include, with one reload.
    let deregister = Instant::now();
    let answer = http_request(
        CONSUL,
        "PUT",
        "/v1/agent/service/deregister/kotaemon-3",
        "",
        Duration::from_secs(5),
    );
    assert!(
        matches!(answer, Some((200, _))),
        "Consul deregisters kotaemon-3: {answer:?}"
    );
    wait_for(
        "kotaemon-3 dropped from the include",
        Duration::from_secs(60),
        || stack.server_line(REPLICAS[2].1).is_none(),
    );
    stack.expect_reloads(base + 2, "deregistering kotaemon-3");
    println!(
        "compose: deregistered in Consul → dropped and reloaded: {:.1} s",
        deregister.elapsed().as_secs_f64()
    );
    wait_traffic(&["kotaemon-1"], "traffic to reach kotaemon-1 alone");
    assert_eq!(
        stack.reloads(),
        base + 2,
        "deregistering reloaded nginx once"
    );

    // upstreamd's `nginx -t` checks the config nginx serves: the same include bytes, and the
    // same whole configuration as `nginx -T` prints it, in both containers.
    assert_eq!(
        stack.include("upstreamd"),
        stack.include("nginx"),
        "both containers see one include"
    );
    let checked = stack.exec_ok("upstreamd", &["nginx", "-T"]);
    let served = stack.exec_ok("nginx", &["nginx", "-T"]);
    assert!(
        checked == served,
        "nginx -T differs between the containers: {}",
        first_difference(&checked, &served)
    );
    assert!(
        checked.contains(&format!("server {}", REPLICAS[0].1)),
        "nginx -T shows the rendered include:\n{checked}"
    );
}

/// upstreamd's metrics, or "" when it does not answer.
fn metrics() -> String {
    http_get(ADMIN, "/metrics", Duration::from_secs(5))
        .map(|(_, body)| body)
        .unwrap_or_default()
}

/// Probes of `upstream`'s endpoints that did not pass, from upstreamd's metrics.
fn failed_probes(upstream: &str) -> u64 {
    let label = format!("upstream=\"{upstream}\"");
    metrics()
        .lines()
        .filter(|line| line.starts_with("upstreamd_probes_total{"))
        .filter(|line| line.contains(&label) && !line.contains("result=\"ok\""))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Whether a `server` line is there and not `down`.
fn server_up(line: Option<&str>) -> bool {
    line.is_some_and(|line| !line.ends_with("down;"))
}

/// The first line where `checked` (the upstreamd container's) and `served` (nginx's) differ.
fn first_difference(checked: &str, served: &str) -> String {
    let (mut a, mut b) = (checked.lines(), served.lines());
    for n in 1.. {
        match (a.next(), b.next()) {
            (None, None) => break,
            (x, y) if x != y => return format!("line {n}: upstreamd sees {x:?}, nginx {y:?}"),
            _ => {}
        }
    }
    "none".to_owned()
}
