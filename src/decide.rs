//! Membership: from registry entries and probe verdicts to the servers an upstream renders.
//!
//! Pure: no I/O, no clock. Equal inputs give equal output, sorted by address.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::affinity::{routes, Route};
use crate::config::{AllUnhealthy, Balance, UpstreamConfig};
use crate::health::Health;
use crate::model::{Address, Endpoint, RegistryState, ServerAttrs, UpstreamName};

/// Why a server is rendered the way it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Registered, not critical, and our probe passes (or probing is off).
    Up,
    /// Our probe says unhealthy (or has not answered yet).
    ProbeDown,
    /// The registry says critical, maintenance, or `down`.
    RegistryDown,
    /// Probe-unhealthy but rendered up because every endpoint is unhealthy (`fail_open`).
    FailOpen,
}

/// One `server` line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Server {
    /// The address.
    pub address: Address,
    /// Weight, max_fails, fail_timeout, backup (its `down` is folded into `down` below).
    pub attrs: ServerAttrs,
    /// Rendered `down`.
    pub down: bool,
    /// Why.
    pub verdict: Verdict,
}

/// What one upstream block should say.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Desired {
    /// The upstream name.
    pub name: UpstreamName,
    /// The balancing method.
    pub balance: Balance,
    /// `hash` key, for `balance = "hash"`.
    pub hash_key: Option<String>,
    /// The affinity cookie name, for `balance = "sticky"`.
    pub affinity_cookie: String,
    /// Keep-alive connections; 0 = none.
    pub keepalive: u32,
    /// Servers sorted by address; empty only when `placeholder` is set.
    pub servers: Vec<Server>,
    /// Nothing is registered: render one `server 127.0.0.1:1 down;` (nginx rejects an empty upstream).
    pub placeholder: bool,
    /// Every registered endpoint is unhealthy (the `on_all_unhealthy` policy applied).
    pub all_unhealthy: bool,
    /// `backup` flags dropped because the balancing method forbids them (addresses).
    pub dropped_backup: Vec<Address>,
    /// With `balance = "sticky"`: the replicas an affinity id routes to (every server rendered
    /// up), each with its id; empty with any other balance.
    pub routes: Vec<Route>,
}

impl Desired {
    /// Servers rendered up.
    pub fn up_count(&self) -> usize {
        self.servers.iter().filter(|s| !s.down).count()
    }
}

/// Merges the snapshots of an upstream's sources: the first source that names an address wins.
pub fn merge<'a>(
    snapshots: impl IntoIterator<Item = &'a [Endpoint]>,
) -> BTreeMap<Address, Endpoint> {
    let mut merged = BTreeMap::new();
    for snapshot in snapshots {
        for e in snapshot {
            merged.entry(e.address.clone()).or_insert_with(|| e.clone());
        }
    }
    merged
}

/// Decides the servers of one upstream.
///
/// `health` gives our probe's verdict per address; it is not consulted when probing is off.
/// An endpoint whose probe has not answered yet (`Unknown`) counts as unhealthy: the
/// controller avoids rendering while first probes are pending.
pub fn decide(
    cfg: &UpstreamConfig,
    endpoints: &BTreeMap<Address, Endpoint>,
    health: impl Fn(&Address) -> Health,
) -> Desired {
    let mut dropped_backup = Vec::new();
    let mut servers: Vec<Server> = endpoints
        .values()
        .map(|e| {
            let mut attrs = e.attrs.clone();
            if attrs.backup && cfg.balance.forbids_backup() {
                attrs.backup = false;
                dropped_backup.push(e.address.clone());
            }
            let registry_down = attrs.down || matches!(e.registry, RegistryState::Critical(_));
            attrs.down = false;
            let verdict = if registry_down {
                Verdict::RegistryDown
            } else if cfg.health.enabled && health(&e.address) != Health::Up {
                Verdict::ProbeDown
            } else {
                Verdict::Up
            };
            Server {
                address: e.address.clone(),
                attrs,
                down: verdict != Verdict::Up,
                verdict,
            }
        })
        .collect();

    let candidates = servers
        .iter()
        .filter(|s| s.verdict != Verdict::RegistryDown)
        .count();
    let all_unhealthy = candidates > 0 && servers.iter().all(|s| s.verdict != Verdict::Up);
    if all_unhealthy && cfg.on_all_unhealthy == AllUnhealthy::FailOpen {
        for s in servers
            .iter_mut()
            .filter(|s| s.verdict == Verdict::ProbeDown)
        {
            s.verdict = Verdict::FailOpen;
            s.down = false;
        }
    }
    let mut desired = Desired {
        name: cfg.name.clone(),
        balance: cfg.balance,
        hash_key: cfg.hash_key.clone(),
        affinity_cookie: cfg.affinity_cookie.clone(),
        keepalive: cfg.keepalive,
        placeholder: servers.is_empty(),
        servers,
        all_unhealthy,
        dropped_backup,
        routes: Vec::new(),
    };
    if cfg.balance == Balance::Sticky {
        desired.routes = routes(&desired, &cfg.affinity_key);
    }
    desired
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;

    pub(crate) fn upstream(name: &str, balance: Balance) -> UpstreamConfig {
        UpstreamConfig {
            name: UpstreamName::new(name).unwrap(),
            balance,
            hash_key: (balance == Balance::Hash).then(|| "$cookie_session".to_owned()),
            affinity_cookie: "kh_affinity".into(),
            affinity_key: crate::affinity::AffinityKey::new(
                &UpstreamName::new(name).unwrap(),
                Some(b"a test secret of 32 bytes or so"),
            ),
            keepalive: 32,
            on_all_unhealthy: AllUnhealthy::FailOpen,
            max_shrink: 0.5,
            shrink_hold: Duration::from_secs(30),
            health: crate::health::probe::tests::health("/queue/status"),
            sources: vec![],
        }
    }

    pub(crate) fn ep(addr: &str) -> Endpoint {
        Endpoint::plain(addr.parse().unwrap(), format!("test {addr}"))
    }

    fn endpoints(list: &[Endpoint]) -> BTreeMap<Address, Endpoint> {
        merge([list])
    }

    fn verdicts(d: &Desired) -> Vec<(String, bool, Verdict)> {
        d.servers
            .iter()
            .map(|s| (s.address.to_string(), s.down, s.verdict))
            .collect()
    }

    #[test]
    fn unhealthy_endpoints_render_down_and_stay_in_the_upstream() {
        let cfg = upstream("k", Balance::Sticky);
        let eps = endpoints(&[ep("127.0.0.3:80"), ep("127.0.0.2:80")]);
        let d = decide(&cfg, &eps, |a| {
            if a.to_string() == "127.0.0.3:80" {
                Health::Down
            } else {
                Health::Up
            }
        });
        assert_eq!(
            verdicts(&d),
            vec![
                ("127.0.0.2:80".into(), false, Verdict::Up),
                ("127.0.0.3:80".into(), true, Verdict::ProbeDown)
            ]
        );
        assert!(!d.all_unhealthy && !d.placeholder);
    }

    #[test]
    fn registry_critical_is_down_whatever_the_probe_says() {
        let cfg = upstream("k", Balance::RoundRobin);
        let mut e = ep("127.0.0.2:80");
        e.registry = RegistryState::Critical("maintenance".into());
        let mut f = ep("127.0.0.3:80");
        f.attrs.down = true;
        let d = decide(&cfg, &endpoints(&[e, f, ep("127.0.0.4:80")]), |_| {
            Health::Up
        });
        assert_eq!(
            d.servers.iter().map(|s| s.down).collect::<Vec<_>>(),
            vec![true, true, false]
        );
        assert!(
            d.servers.iter().all(|s| !s.attrs.down),
            "down is carried by Server::down only"
        );
    }

    #[test]
    fn all_unhealthy_fails_open_by_default_and_closed_on_request() {
        let mut cfg = upstream("k", Balance::RoundRobin);
        let eps = endpoints(&[ep("127.0.0.2:80"), ep("127.0.0.3:80")]);
        let open = decide(&cfg, &eps, |_| Health::Down);
        assert!(open.all_unhealthy);
        assert!(open
            .servers
            .iter()
            .all(|s| !s.down && s.verdict == Verdict::FailOpen));
        cfg.on_all_unhealthy = AllUnhealthy::FailClosed;
        let closed = decide(&cfg, &eps, |_| Health::Down);
        assert!(closed.servers.iter().all(|s| s.down));
    }

    #[test]
    fn fail_open_does_not_revive_registry_critical_endpoints() {
        let cfg = upstream("k", Balance::RoundRobin);
        let mut crit = ep("127.0.0.2:80");
        crit.registry = RegistryState::Critical("serfHealth".into());
        let d = decide(&cfg, &endpoints(&[crit, ep("127.0.0.3:80")]), |_| {
            Health::Down
        });
        assert_eq!(verdicts(&d)[0].2, Verdict::RegistryDown);
        assert_eq!(verdicts(&d)[1].2, Verdict::FailOpen);
    }

    #[test]
    fn nothing_registered_asks_for_a_placeholder() {
        let d = decide(
            &upstream("k", Balance::RoundRobin),
            &BTreeMap::new(),
            |_| Health::Up,
        );
        assert!(d.placeholder && d.servers.is_empty() && !d.all_unhealthy);
    }

    #[test]
    fn probing_off_trusts_the_registry() {
        let mut cfg = upstream("k", Balance::RoundRobin);
        cfg.health.enabled = false;
        let d = decide(&cfg, &endpoints(&[ep("127.0.0.2:80")]), |_| Health::Unknown);
        assert_eq!(d.up_count(), 1);
    }

    #[test]
    fn unknown_health_is_not_up() {
        let d = decide(
            &upstream("k", Balance::RoundRobin),
            &endpoints(&[ep("127.0.0.2:80"), ep("127.0.0.3:80")]),
            |a| {
                if a.port == 80 && a.to_string().ends_with("2:80") {
                    Health::Unknown
                } else {
                    Health::Up
                }
            },
        );
        assert_eq!(d.up_count(), 1);
    }

    #[test]
    fn backup_is_dropped_where_nginx_forbids_it() {
        let mut b = ep("127.0.0.2:80");
        b.attrs.backup = true;
        let eps = endpoints(&[b, ep("127.0.0.3:80")]);
        let sticky = decide(&upstream("k", Balance::Sticky), &eps, |_| Health::Up);
        assert!(sticky.servers.iter().all(|s| !s.attrs.backup));
        assert_eq!(sticky.dropped_backup.len(), 1);
        let rr = decide(&upstream("k", Balance::RoundRobin), &eps, |_| Health::Up);
        assert!(rr.servers[0].attrs.backup && rr.dropped_backup.is_empty());
    }

    #[test]
    fn sticky_routes_name_every_server_rendered_up_and_no_down_one() {
        let cfg = upstream("k", Balance::Sticky);
        let eps = endpoints(&[ep("127.0.0.2:80"), ep("127.0.0.3:80"), ep("127.0.0.4:80")]);
        let d = decide(&cfg, &eps, |a| {
            if a.to_string() == "127.0.0.3:80" {
                Health::Down
            } else {
                Health::Up
            }
        });
        let routed: Vec<String> = d.routes.iter().map(|r| r.address.to_string()).collect();
        assert_eq!(routed, vec!["127.0.0.2:80", "127.0.0.4:80"]);
        assert_eq!(d.routes[0].id, cfg.affinity_key.id(&d.routes[0].address));
        let hash = decide(&upstream("k", Balance::Hash), &eps, |_| Health::Up);
        assert!(hash.routes.is_empty());
    }

    #[test]
    fn a_replica_keeps_its_id_whoever_else_joins_or_leaves() {
        let cfg = upstream("k", Balance::Sticky);
        let ids = |list: &[Endpoint]| -> BTreeMap<String, String> {
            decide(&cfg, &endpoints(list), |_| Health::Up)
                .routes
                .iter()
                .map(|r| (r.address.to_string(), r.id.to_string()))
                .collect()
        };
        let three = ids(&[ep("127.0.0.2:80"), ep("127.0.0.3:80"), ep("127.0.0.4:80")]);
        let four = ids(&[
            ep("127.0.0.2:80"),
            ep("127.0.0.3:80"),
            ep("127.0.0.4:80"),
            ep("127.0.0.5:80"),
        ]);
        let two = ids(&[ep("127.0.0.2:80"), ep("127.0.0.4:80")]);
        for (addr, id) in &three {
            assert_eq!(four.get(addr), Some(id));
        }
        assert_eq!(two.get("127.0.0.2:80"), three.get("127.0.0.2:80"));
        assert_eq!(two.get("127.0.0.4:80"), three.get("127.0.0.4:80"));
    }

    #[test]
    fn the_first_source_naming_an_address_wins() {
        let mut a = ep("127.0.0.2:80");
        a.attrs.weight = Some(5);
        let merged = merge([
            std::slice::from_ref(&a),
            &[ep("127.0.0.2:80"), ep("127.0.0.1:80")][..],
        ]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged.values().nth(1).unwrap().attrs.weight, Some(5));
    }
}
