//! The built-in template's output for large upstreams passes a real `nginx -t`: the shared
//! memory zone is sized from the server count (a fixed or too small zone fails with
//! `ngx_slab_alloc() failed: no memory in upstream zone`).

use std::collections::BTreeMap;
use std::process::Command;

use upstreamd::decide::decide;
use upstreamd::health::Health;
use upstreamd::model::{Address, Endpoint};
use upstreamd::render::Renderer;

fn config(balance: &str) -> upstreamd::config::UpstreamConfig {
    let text = format!(
        "[nginx]\noutput = \"/nonexistent/upstreams.conf\"\n\n[[upstream]]\nname = \"kotaemon\"\n\
         balance = \"{balance}\"\n\n[upstream.health]\npath = \"/queue/status\"\n\n\
         [[upstream.source]]\nkind = \"static\"\nservers = [\"127.0.0.1:7860\"]\n"
    );
    let cfg = upstreamd::config::parse(&text, &|_| None).expect("the test config parses");
    cfg.upstreams.into_iter().next().expect("one upstream")
}

/// `n` endpoints, IPv4 and IPv6 alternately, every one with the attributes that make the
/// longest `server` line.
fn endpoints(n: usize) -> BTreeMap<Address, Endpoint> {
    (0..n)
        .map(|i| {
            let host = if i % 2 == 0 {
                format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)
            } else {
                format!("fd00::{i:x}")
            };
            let address = Address::from_parts(&host, 7860).unwrap();
            let mut e = Endpoint::plain(address.clone(), format!("test {i}"));
            e.attrs.weight = Some(5);
            e.attrs.max_fails = Some(3);
            e.attrs.fail_timeout = Some(30);
            (address, e)
        })
        .collect()
}

/// `nginx -t` on `rendered` included in a site whose location proxies to `target`.
fn nginx_test(rendered: &str, target: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("conf")).unwrap();
    std::fs::create_dir_all(dir.path().join("logs")).unwrap();
    std::fs::write(dir.path().join("conf/upstreams.conf"), rendered).unwrap();
    std::fs::write(
        dir.path().join("conf/nginx.conf"),
        format!(
            "pid logs/nginx.pid;\nerror_log logs/error.log;\nevents {{}}\nhttp {{\n  include upstreams.conf;\n  \
             server {{\n    listen 127.0.0.1:1;\n    location / {{ proxy_pass http://{target}; }}\n  }}\n}}\n"
        ),
    )
    .unwrap();
    Command::new("nginx")
        .arg("-p")
        .arg(dir.path())
        .args(["-c", "conf/nginx.conf", "-t", "-q"])
        .output()
        .expect("nginx must be installed (apt-get install nginx)")
}

#[test]
fn large_upstreams_pass_nginx_t_with_every_balance_that_uses_the_zone() {
    let renderer = Renderer::new(None).unwrap();
    for balance in ["sticky", "round_robin"] {
        let cfg = config(balance);
        for n in [1, 300, 1_000, 10_000] {
            let d = decide(&cfg, &endpoints(n), |_| Health::Up);
            let text = renderer.render(&[(d, cfg.on_all_unhealthy)]).unwrap();
            let out = nginx_test(&text, "kotaemon");
            assert!(
                out.status.success() && out.stderr.is_empty(),
                "{balance}, {n} servers: nginx -t failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The sticky shapes nginx must accept: no replica (the placeholder), one, many; some down,
/// all down (`fail_closed`), registry `backup` flags (dropped: nginx refuses them with
/// `hash`), and keepalive off. Each file also routes through the Kotaemon site's variables.
#[test]
fn every_sticky_shape_passes_nginx_t() {
    let renderer = Renderer::new(None).unwrap();
    let mut cfg = config("sticky");
    for (n, keepalive, fail_closed, health) in [
        (0, 32, false, "up"),
        (1, 32, false, "up"),
        (1, 32, true, "down"),
        (1, 0, false, "down"),
        (3, 32, false, "some down"),
        (300, 32, false, "some down"),
        (300, 0, true, "down"),
        (1_000, 32, false, "up"),
    ] {
        cfg.keepalive = keepalive;
        cfg.on_all_unhealthy = if fail_closed {
            upstreamd::config::AllUnhealthy::FailClosed
        } else {
            upstreamd::config::AllUnhealthy::FailOpen
        };
        let mut eps = endpoints(n);
        for (i, e) in eps.values_mut().enumerate() {
            e.attrs.backup = i % 4 == 1;
        }
        let d = decide(&cfg, &eps, |a| match health {
            "up" => Health::Up,
            "down" => Health::Down,
            _ if a.to_string().ends_with("1:7860") => Health::Down,
            _ => Health::Up,
        });
        let up = d.up_count();
        assert_eq!(d.routes.len(), up, "one route a replica rendered up");
        let text = renderer.render(&[(d, cfg.on_all_unhealthy)]).unwrap();
        let out = nginx_test(&text, "$kotaemon_affinity_route");
        // Not even a warning: many replica ids need a bigger map hash than nginx's default.
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "sticky, {n} servers ({health}, keepalive {keepalive}): nginx -t failed: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
