//! A trial render against representative data, so a template that reads an undefined field is
//! refused by `check` and by a SIGHUP reload instead of failing on the first real change.

use crate::config::{AllUnhealthy, Balance};
use crate::decide::{Desired, Server, Verdict};
use crate::model::{Address, ServerAttrs, UpstreamName};

use super::{RenderError, Renderer};

const BALANCES: [(Balance, &str); 6] = [
    (Balance::RoundRobin, "round_robin"),
    (Balance::LeastConn, "least_conn"),
    (Balance::IpHash, "ip_hash"),
    (Balance::Hash, "hash"),
    (Balance::Random, "random"),
    (Balance::Sticky, "sticky"),
];

fn server(last_octet: u8, attrs: ServerAttrs, verdict: Verdict) -> Server {
    let address = Address::from_parts(&format!("10.0.0.{last_octet}"), 7860)
        .expect("a literal IPv4 address is valid");
    Server {
        address,
        attrs,
        down: matches!(verdict, Verdict::ProbeDown | Verdict::RegistryDown),
        verdict,
    }
}

/// The servers of one case: none, one plain one, or many covering every attribute and verdict.
fn servers(count: usize, balance: Balance) -> Vec<Server> {
    match count {
        0 => Vec::new(),
        1 => vec![server(1, ServerAttrs::default(), Verdict::Up)],
        _ => vec![
            server(
                1,
                ServerAttrs {
                    weight: Some(3),
                    max_fails: Some(2),
                    fail_timeout: Some(10),
                    ..ServerAttrs::default()
                },
                Verdict::Up,
            ),
            server(2, ServerAttrs::default(), Verdict::ProbeDown),
            server(3, ServerAttrs::default(), Verdict::RegistryDown),
            server(
                4,
                ServerAttrs {
                    backup: !balance.forbids_backup(),
                    ..ServerAttrs::default()
                },
                Verdict::FailOpen,
            ),
        ],
    }
}

/// Every representative case: a description and the upstreams to render.
pub(super) fn cases() -> Vec<(String, Vec<(Desired, AllUnhealthy)>)> {
    let mut out = Vec::new();
    for (balance, label) in BALANCES {
        for count in [0, 1, 4] {
            for (all_unhealthy, policy) in [
                (false, AllUnhealthy::FailOpen),
                (true, AllUnhealthy::FailOpen),
                (true, AllUnhealthy::FailClosed),
            ] {
                let servers = servers(count, balance);
                let name = UpstreamName::new("trial").expect("a literal name is valid");
                let key = crate::affinity::AffinityKey::new(&name, None);
                let mut desired = Desired {
                    name,
                    balance,
                    hash_key: (balance == Balance::Hash).then(|| "$cookie_session".to_owned()),
                    affinity_cookie: "upstreamd_affinity".into(),
                    keepalive: if count == 1 { 0 } else { 32 },
                    placeholder: servers.is_empty(),
                    all_unhealthy: all_unhealthy && !servers.is_empty(),
                    servers,
                    dropped_backup: Vec::new(),
                    routes: Vec::new(),
                };
                if balance == Balance::Sticky {
                    desired.routes = crate::affinity::routes(&desired, &key);
                }
                let noun = if count == 1 { "server" } else { "servers" };
                out.push((
                    format!("{count} {noun}, balance \"{label}\""),
                    vec![(desired, policy)],
                ));
            }
        }
    }
    out.push(("no upstreams".into(), Vec::new()));
    out.push(many_sticky_routes());
    out
}

/// A sticky upstream with more routes than nginx's default map hash holds, so the template's
/// branch for them is rendered too.
fn many_sticky_routes() -> (String, Vec<(Desired, AllUnhealthy)>) {
    let count = super::MAP_HASH_ROUTES + 1;
    let name = UpstreamName::new("trial").expect("a literal name is valid");
    let key = crate::affinity::AffinityKey::new(&name, None);
    let servers = (0..count)
        .map(|i| Server {
            address: Address::from_parts(&format!("10.1.{}.{}", i / 250, i % 250 + 1), 7860)
                .expect("a generated IPv4 address is valid"),
            attrs: ServerAttrs::default(),
            down: false,
            verdict: Verdict::Up,
        })
        .collect();
    let mut desired = Desired {
        name,
        balance: Balance::Sticky,
        hash_key: None,
        affinity_cookie: "upstreamd_affinity".into(),
        keepalive: 32,
        placeholder: false,
        all_unhealthy: false,
        servers,
        dropped_backup: Vec::new(),
        routes: Vec::new(),
    };
    desired.routes = crate::affinity::routes(&desired, &key);
    (
        format!("{count} servers, balance \"sticky\""),
        vec![(desired, AllUnhealthy::FailOpen)],
    )
}

/// Renders every case; the first failure names its case.
pub(super) fn try_render(renderer: &Renderer) -> Result<(), RenderError> {
    for (case, upstreams) in cases() {
        if let Err(e) = renderer.render(&upstreams) {
            return Err(match e {
                RenderError::Template(error) => RenderError::Trial { case, error },
                other => other,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(source: &str) -> Result<Renderer, RenderError> {
        let r = Renderer::named("/etc/upstreamd/custom.j2".into(), source.into())?;
        try_render(&r)?;
        Ok(r)
    }

    #[test]
    fn the_builtin_template_renders_every_case() {
        Renderer::checked(None).unwrap();
    }

    #[test]
    fn a_misspelt_field_is_refused_naming_the_file_line_and_expression() {
        let source = "{% for u in upstreams %}\nupstream {{ u.name }} {\n    # {{ u.nmae }}\n}\n{% endfor %}\n";
        let e = checked(source).unwrap_err().to_string();
        assert!(
            e.starts_with("template `/etc/upstreamd/custom.j2` line 3: `u.nmae` is undefined"),
            "{e}"
        );
        assert!(
            e.contains("rendering 0 servers, balance \"round_robin\""),
            "{e}"
        );
    }

    #[test]
    fn a_field_read_only_for_some_balance_is_refused_too() {
        let source = "{% for u in upstreams %}{% if u.balance == \"hash\" %}{{ u.hash_kye }}{% endif %}{% endfor %}";
        let e = checked(source).unwrap_err().to_string();
        assert!(e.contains("`u.hash_kye` is undefined"), "{e}");
        assert!(e.contains("balance \"hash\""), "{e}");
    }

    #[test]
    fn a_field_read_only_for_down_servers_is_refused_too() {
        let source = "{% for u in upstreams %}{% for s in u.servers %}{% if s.down %}{{ s.why }}{% endif %}{% endfor %}{% endfor %}";
        let e = checked(source).unwrap_err().to_string();
        assert!(e.contains("`s.why` is undefined"), "{e}");
    }

    #[test]
    fn every_documented_field_is_defined() {
        let source = "{% for u in upstreams %}{{ u.name }}{{ u.balance }}{{ u.hash_key }}{{ u.affinity_cookie }}{{ u.keepalive }}{{ u.zone_size }}{{ u.placeholder }}{{ u.all_unhealthy }}{{ u.on_all_unhealthy }}{% for s in u.servers %}{{ s.address }}{{ s.weight }}{{ s.max_fails }}{{ s.fail_timeout }}{{ s.backup }}{{ s.down }}{{ s.verdict }}{% endfor %}{% endfor %}{{ version }}";
        checked(source).unwrap();
    }
}
