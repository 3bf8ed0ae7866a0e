//! The operator's surface: the systemd unit, the compose stack, and the nginx config it ships,
//! checked with the real tools (`systemd-analyze`, `docker-compose`, `nginx -t`).
//!
//! Each test prints `skipped: …` and returns if its tool is not installed; CI installs them
//! (scripts/install-deps.sh), so there they run.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use upstreamd::decide::{decide, merge};
use upstreamd::health::Health;
use upstreamd::model::{Address, Endpoint};
use upstreamd::render::Renderer;

/// The highest `systemd-analyze security` exposure the unit may have (0 best, 10 worst):
/// today's 2.1, so a loosened sandbox fails here.
const MAX_EXPOSURE: f64 = 2.1;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn write(path: &Path, text: &str) {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    }
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// The tool's path on `PATH`, or `None` after printing why the test is skipped.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        println!("skipped: `{name}` is not installed (scripts/install-deps.sh installs it)");
    }
    found
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"))
}

fn describe(cmd: &str, out: &Output) -> String {
    format!(
        "{cmd}: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Replaces the one occurrence of `from` in `text`; panics if it is not there exactly once,
/// so the tests notice when a shipped file changes shape.
fn replace_once(text: &str, from: &str, to: &str, what: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "{what}: expected `{from}` exactly once in:\n{text}"
    );
    text.replacen(from, to, 1)
}

// ---------------------------------------------------------------- systemd

/// A copy of the unit whose ExecStart names the freshly built binary, so `verify` (which
/// checks that ExecStart is executable) does not depend on an installed upstreamd.
fn unit_copy(dir: &Path, edit: impl FnOnce(String) -> String) -> PathBuf {
    let unit = read(&repo().join("systemd/upstreamd.service"));
    let unit = replace_once(
        &unit,
        "ExecStart=/usr/bin/upstreamd run",
        &format!("ExecStart={} run", env!("CARGO_BIN_EXE_upstreamd")),
        "systemd/upstreamd.service",
    );
    let path = dir.join("upstreamd.service");
    write(&path, &edit(unit));
    path
}

/// `systemd-analyze verify`'s complaints about the unit: it exits 0 on unknown keys and
/// bad values, and reports them on stderr naming the unit.
fn verify_complaints(systemd_analyze: &Path, unit: &Path) -> Vec<String> {
    let out = run(Command::new(systemd_analyze).arg("verify").arg(unit));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let mut complaints: Vec<String> = stderr
        .lines()
        .filter(|line| line.contains("upstreamd.service") || line.contains("upstreamd"))
        .map(str::to_owned)
        .collect();
    if !out.status.success() {
        complaints.push(describe("systemd-analyze verify", &out));
    }
    complaints
}

#[test]
fn systemd_unit_passes_verify() {
    let Some(systemd_analyze) = tool("systemd-analyze") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path(), |unit| unit);
    let complaints = verify_complaints(&systemd_analyze, &unit);
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify complains about {}:\n{}",
        unit.display(),
        complaints.join("\n")
    );

    // The check above can fail: a misspelt key is reported.
    let typo = tempfile::tempdir().unwrap();
    let unit = unit_copy(typo.path(), |unit| {
        replace_once(&unit, "ProtectSystem=", "ProtectSystm=", "typo")
    });
    assert!(
        !verify_complaints(&systemd_analyze, &unit).is_empty(),
        "a misspelt key went unnoticed"
    );
}

/// The figure from `→ Overall exposure level for upstreamd.service: 2.1 OK 🙂`.
fn exposure(report: &str) -> Option<f64> {
    let line = report
        .lines()
        .find(|line| line.contains("Overall exposure level"))?;
    let (_, rest) = line.rsplit_once(": ")?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn systemd_unit_exposure_is_at_most_2_1() {
    let Some(systemd_analyze) = tool("systemd-analyze") else {
        return;
    };
    let unit = repo().join("systemd/upstreamd.service");
    let out = run(Command::new(&systemd_analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit));
    let report = String::from_utf8_lossy(&out.stdout);
    let figure = exposure(&report)
        .unwrap_or_else(|| panic!("no exposure figure in\n{}", describe("security", &out)));
    println!("systemd-analyze security --offline=yes: overall exposure {figure}");
    assert!(
        figure <= MAX_EXPOSURE,
        "exposure {figure} > {MAX_EXPOSURE}:\n{report}"
    );
}

#[test]
fn the_deb_ships_the_daemon_where_the_unit_runs_it_and_the_example_as_conffile() {
    let manifest: toml::Value = toml::from_str(&read(&repo().join("Cargo.toml"))).unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    let assets: Vec<(&str, &str)> = deb["assets"]
        .as_array()
        .expect("assets")
        .iter()
        .map(|a| (a[0].as_str().unwrap(), a[1].as_str().unwrap()))
        .collect();
    let unit = read(&repo().join("systemd/upstreamd.service"));
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart=");
    let binary = exec.split_whitespace().next().unwrap();
    assert_eq!(binary, "/usr/bin/upstreamd");
    assert!(
        assets.contains(&("target/release/upstreamd", "usr/bin/")),
        "the package installs {binary}: {assets:?}"
    );
    assert!(
        !assets.iter().any(|(from, _)| from.contains("standin")),
        "stand-ins are test tools: {assets:?}"
    );
    assert!(assets.contains(&(
        "systemd/upstreamd.toml.example",
        "etc/upstreamd/upstreamd.toml"
    )));
    assert_eq!(
        deb["conf-files"].as_array().unwrap()[0].as_str(),
        Some("/etc/upstreamd/upstreamd.toml")
    );
    // The unit comes from systemd/ and is enabled, not started, at installation.
    let units = &deb["systemd-units"];
    assert_eq!(units["unit-scripts"].as_str(), Some("systemd/"));
    assert_eq!(units["start"].as_bool(), Some(false));
    assert_eq!(deb["recommends"].as_str(), Some("nginx"));
    let postrm = read(&repo().join("debian/postrm"));
    assert!(postrm.contains("#DEBHELPER#") && postrm.contains("rm -rf /var/lib/upstreamd"));
    for (from, _) in &assets {
        if !from.starts_with("target/") {
            assert!(repo().join(from).is_file(), "asset {from} is missing");
        }
    }
}

#[test]
fn exposure_figure_is_read_from_the_report_line() {
    let line = "→ Overall exposure level for upstreamd.service: 2.1 OK \u{1f642}";
    assert_eq!(exposure(line), Some(2.1));
    assert_eq!(exposure("no such line"), None);
}

// ---------------------------------------------------------------- configs

#[test]
fn shipped_upstreamd_configs_load() {
    let vm = upstreamd::config::load_file(&repo().join("systemd/upstreamd.toml.example"))
        .unwrap_or_else(|e| panic!("systemd/upstreamd.toml.example:\n{e}"));
    assert_eq!(
        vm.nginx.output,
        Path::new("/etc/nginx/conf.d/upstreamd.conf")
    );
    assert_eq!(vm.nginx.pid_file, Path::new("/run/nginx.pid"));
    assert_eq!(
        vm.nginx.state_dir.as_deref(),
        Some(Path::new("/var/lib/upstreamd"))
    );
    assert_eq!(
        vm.admin.listen,
        Some("127.0.0.1:9187".parse().unwrap()),
        "the VM's admin listens on loopback"
    );

    // The unit lets upstreamd write where the example config points.
    let unit = read(&repo().join("systemd/upstreamd.service"));
    assert!(unit.contains("ReadWritePaths=/etc/nginx/conf.d\n"));
    assert!(unit.contains("StateDirectory=upstreamd\n"));

    let compose = upstreamd::config::load_file(&repo().join("deploy/compose/upstreamd.toml"))
        .unwrap_or_else(|e| panic!("deploy/compose/upstreamd.toml:\n{e}"));
    assert_eq!(
        compose.nginx.pid_file,
        Path::new("/run/nginx/nginx.pid"),
        "nginx.conf's pid, on the shared volume"
    );
    let nginx_conf = read(&repo().join("deploy/compose/nginx.conf"));
    assert!(nginx_conf.contains("pid /run/nginx/nginx.pid;"));
    assert!(nginx_conf.contains(&format!("include {};", compose.nginx.output.display())));
}

#[test]
fn dockerfile_builds_on_the_compose_nginx_image() {
    let dockerfile = read(&repo().join("Dockerfile"));
    let compose = read(&repo().join("docker-compose.yml"));
    let tag = dockerfile
        .lines()
        .find_map(|line| line.strip_prefix("ARG NGINX_IMAGE="))
        .expect("Dockerfile: ARG NGINX_IMAGE=…");
    assert!(
        compose.contains(&format!("    image: {tag}\n")),
        "docker-compose.yml's nginx service must run {tag}, the nginx that upstreamd's `nginx -t` uses"
    );
}

// ---------------------------------------------------------------- compose

#[test]
fn compose_file_is_valid() {
    let root = repo();
    // Every file the stack mounts exists (docker-compose does not check bind sources).
    let compose = read(&root.join("docker-compose.yml"));
    let sources: Vec<&str> = compose
        .split(|c: char| c.is_whitespace() || c == '"' || c == '[' || c == ']')
        .filter_map(|word| word.trim_start_matches("- ").split(':').next())
        .filter(|source| source.starts_with("./"))
        .collect();
    assert!(sources.len() >= 5, "bind sources found: {sources:?}");
    for source in sources {
        assert!(
            root.join(source).exists(),
            "docker-compose.yml mounts {source}, which does not exist"
        );
    }

    let Some(docker_compose) = tool("docker-compose") else {
        return;
    };
    let out = run(Command::new(&docker_compose).current_dir(&root).args([
        "-f",
        "docker-compose.yml",
        "config",
        "-q",
    ]));
    assert!(
        out.status.success(),
        "{}",
        describe("docker-compose config -q", &out)
    );

    let out = run(Command::new(&docker_compose).current_dir(&root).args([
        "-f",
        "docker-compose.yml",
        "config",
        "--services",
    ]));
    assert!(
        out.status.success(),
        "{}",
        describe("config --services", &out)
    );
    let services = String::from_utf8_lossy(&out.stdout);
    let services: Vec<&str> = services.lines().collect();
    for wanted in [
        "nginx",
        "upstreamd",
        "consul",
        "kotaemon-1",
        "kotaemon-2",
        "kotaemon-3",
        "kotaemon-real-1",
        "kotaemon-real-2",
        "kotaemon-real-3",
    ] {
        assert!(services.contains(&wanted), "no {wanted} in {services:?}");
    }
}

// ---------------------------------------------------------------- nginx -t

/// The Consul service definitions the stack registers, as upstreamd's Consul source would
/// report them: address and `Meta` attributes.
fn registered(file: &str) -> Vec<Endpoint> {
    let path = repo().join("deploy/compose/consul").join(file);
    let json: serde_json::Value =
        serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let services = json["services"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no \"services\" list", path.display()));
    services
        .iter()
        .map(|s| {
            let address = Address::from_parts(
                s["address"].as_str().expect("address"),
                s["port"].as_u64().expect("port") as u16,
            )
            .expect("a valid address");
            let mut endpoint = Endpoint::plain(address, s["id"].as_str().expect("id"));
            for (key, value) in s["meta"].as_object().into_iter().flatten() {
                endpoint
                    .attrs
                    .set(key, value)
                    .unwrap_or_else(|e| panic!("{file}: meta {key}: {e}"));
            }
            endpoint
        })
        .collect()
}

/// upstreamd's include for the compose stack, rendered by upstreamd itself from
/// deploy/compose/upstreamd.toml and the registered replicas: the stand-ins healthy but
/// kotaemon-3 (which renders `down`), real Kotaemon not running (fail_closed: all `down`).
fn rendered_include() -> String {
    let config = upstreamd::config::load_file(&repo().join("deploy/compose/upstreamd.toml"))
        .unwrap_or_else(|e| panic!("deploy/compose/upstreamd.toml:\n{e}"));
    let registry: BTreeMap<&str, Vec<Endpoint>> = [
        ("kotaemon", registered("kotaemon.json")),
        ("kotaemon_real", registered("kotaemon-real.json")),
    ]
    .into();
    let down: Address = "172.29.57.13:7860".parse().unwrap();
    let desired: Vec<_> = config
        .upstreams
        .iter()
        .map(|upstream| {
            let name = upstream.name.as_str();
            let endpoints = &registry[name];
            let health = |address: &Address| {
                if name == "kotaemon" && *address != down {
                    Health::Up
                } else {
                    Health::Down
                }
            };
            let d = decide(upstream, &merge([endpoints.as_slice()]), health);
            (d, upstream.on_all_unhealthy)
        })
        .collect();
    Renderer::new(None).unwrap().render(&desired).unwrap()
}

/// A private copy of the compose stack's nginx config: paths that must be private (pid,
/// logs, temp dirs, the include, the site) moved into `dir`, the ports made free ones, and
/// `user nginx;` dropped (no such user outside the nginx image). Nothing else changes.
fn private_nginx(dir: &Path, include: &str) -> PathBuf {
    let d = dir.display();
    let compose = repo().join("deploy/compose");
    let mut conf = read(&compose.join("nginx.conf"));
    for (from, to) in [
        ("user nginx;\n", String::new()),
        (
            "pid /run/nginx/nginx.pid;",
            format!("pid {d}/logs/nginx.pid;"),
        ),
        (
            "error_log /var/log/nginx/error.log",
            format!("error_log {d}/logs/error.log"),
        ),
        (
            "access_log /var/log/nginx/access.log;",
            format!("access_log {d}/logs/access.log;"),
        ),
        (
            "include /etc/nginx/upstreamd/upstreamd.conf;",
            format!("include {d}/upstreamd/upstreamd.conf;"),
        ),
        (
            "include /etc/nginx/sites/*.conf;",
            format!("include {d}/sites/*.conf;"),
        ),
        (
            "http {\n",
            format!(
                "http {{\n    client_body_temp_path {d}/tmp/client; proxy_temp_path {d}/tmp/proxy;\n    \
                 fastcgi_temp_path {d}/tmp/fastcgi; uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;\n"
            ),
        ),
    ] {
        conf = replace_once(&conf, from, &to, "deploy/compose/nginx.conf");
    }
    let mut site = read(&compose.join("kotaemon-site.conf"));
    for from in ["listen 80;", "listen 81;"] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        site = replace_once(
            &site,
            from,
            &format!("listen 127.0.0.1:{port};"),
            "kotaemon-site.conf",
        );
    }
    let conf_path = dir.join("conf/nginx.conf");
    write(&conf_path, &conf);
    write(&dir.join("sites/kotaemon.conf"), &site);
    write(&dir.join("upstreamd/upstreamd.conf"), include);
    fs::create_dir_all(dir.join("logs")).unwrap();
    fs::create_dir_all(dir.join("tmp")).unwrap();
    conf_path
}

/// Runs `nginx -t` on the private copy; the output on failure.
fn nginx_test(nginx: &Path, include: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let conf = private_nginx(dir.path(), include);
    let out = run(Command::new(nginx)
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&conf)
        .arg("-t"));
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}\n--- nginx.conf\n{}\n--- site\n{}\n--- include\n{include}",
            describe("nginx -t", &out),
            read(&conf),
            read(&dir.path().join("sites/kotaemon.conf")),
        ))
    }
}

#[test]
fn compose_nginx_config_passes_nginx_t_with_upstreamds_include() {
    let Some(nginx) = tool("nginx").or_else(|| {
        let sbin = PathBuf::from("/usr/sbin/nginx");
        sbin.is_file().then_some(sbin)
    }) else {
        return;
    };
    let include = rendered_include();
    for wanted in [
        "map \"$cookie_kh_affinity:$kotaemon_affinity_served\" $kotaemon_affinity_cookie {",
        "map $cookie_kh_affinity $kotaemon_affinity_route {",
        "upstream kotaemon {",
        "    hash $kotaemon_affinity_key consistent;\n",
        "    server 172.29.57.11:7860 weight=2;\n",
        "    server 172.29.57.13:7860 weight=1 down;\n",
        "    keepalive 32;\n",
        "map \"$cookie_kh_real_affinity:$kotaemon_real_affinity_served\" $kotaemon_real_affinity_cookie {",
        "\nupstream kotaemon__",
        "    server 172.29.57.21:7860 weight=1 down;\n",
    ] {
        assert!(include.contains(wanted), "no `{wanted}` in\n{include}");
    }
    if let Err(report) = nginx_test(&nginx, &include) {
        panic!("the compose nginx config fails with upstreamd's include:\n{report}");
    }

    // nginx starts on the placeholder before upstreamd has written anything.
    let bootstrap = read(&repo().join("deploy/compose/upstreamd-bootstrap.conf"));
    if let Err(report) = nginx_test(&nginx, &bootstrap) {
        panic!("the compose nginx config fails with the bootstrap include:\n{report}");
    }

    // And the check can fail: without the include the site's upstreams are unknown.
    assert!(
        nginx_test(&nginx, "").is_err(),
        "nginx -t accepted the site without the upstreams it uses"
    );
}
