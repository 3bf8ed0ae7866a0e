//! The membership nginx's Lua balancer is given: the body of `POST /upstreamd/update` and of
//! `snapshot.json` (issue 13's contract). Pure: equal membership gives equal bytes.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::affinity::AffinityKey;
use crate::config::Balance;
use crate::decide::Desired;
use crate::model::{Address, Host};

/// One server as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Peer {
    /// An IP literal and port: `127.0.0.1:8001`, `[::1]:8001`.
    pub address: String,
    /// 1..=1000 (nginx's default 1 when the registry gives none).
    pub weight: u32,
    /// Used only when no primary is usable.
    pub backup: bool,
    /// Never chosen.
    pub down: bool,
    /// Passive failure marking; nginx's default (1) when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_fails: Option<u32>,
    /// Seconds; nginx's default (10) when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fail_timeout: Option<u64>,
    /// With `balance = "sticky"`: the replica's affinity id (16 lower-case hex digits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// One upstream's membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamPeers {
    /// The balancing method.
    pub balance: Balance,
    /// Servers sorted by address (empty when nothing is registered: nginx then answers 502).
    pub servers: Vec<Peer>,
}

/// Every upstream's membership, by name: what one generation carries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Membership(pub BTreeMap<String, UpstreamPeers>);

/// A server left out of the membership because the balancer takes IP literals only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedHost {
    /// The upstream.
    pub upstream: String,
    /// The hostname and port.
    pub address: String,
}

/// The membership of `upstreams` (each with its affinity key), and the servers named by a
/// hostname, which are left out (the contract accepts IP literals only).
pub fn membership(upstreams: &[(&Desired, &AffinityKey)]) -> (Membership, Vec<SkippedHost>) {
    let mut skipped = Vec::new();
    let mut all = BTreeMap::new();
    for (d, key) in upstreams {
        let mut servers = Vec::with_capacity(d.servers.len());
        for s in &d.servers {
            if let Host::Name(_) = s.address.host {
                skipped.push(SkippedHost {
                    upstream: d.name.to_string(),
                    address: s.address.to_string(),
                });
                continue;
            }
            servers.push(Peer {
                address: s.address.to_string(),
                weight: s.attrs.weight.unwrap_or(1),
                backup: s.attrs.backup,
                down: s.down,
                max_fails: s.attrs.max_fails,
                fail_timeout: s.attrs.fail_timeout,
                id: (d.balance == Balance::Sticky).then(|| id(key, &s.address)),
            });
        }
        all.insert(
            d.name.to_string(),
            UpstreamPeers {
                balance: d.balance,
                servers,
            },
        );
    }
    (Membership(all), skipped)
}

fn id(key: &AffinityKey, address: &Address) -> String {
    key.id(address).to_string()
}

#[derive(Serialize)]
struct Body<'a> {
    generation: u64,
    upstreams: &'a Membership,
}

/// The JSON of one generation: the push body and the bytes of `snapshot.json`.
pub fn body(generation: u64, membership: &Membership) -> String {
    serde_json::to_string(&Body {
        generation,
        upstreams: membership,
    })
    // Only strings, numbers and booleans with string keys: serialization cannot fail.
    .unwrap_or_else(|e| unreachable!("membership JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::tests::{ep, upstream};
    use crate::decide::{decide, merge};
    use crate::health::Health;

    fn one(
        balance: Balance,
        eps: &[crate::model::Endpoint],
        health: Health,
    ) -> (Membership, Vec<SkippedHost>) {
        let cfg = upstream("kotaemon", balance);
        let d = decide(&cfg, &merge([eps]), |_| health);
        membership(&[(&d, &cfg.affinity_key)])
    }

    #[test]
    fn a_generation_renders_the_contract_json_with_defaults_filled_in() {
        let mut a = ep("127.0.0.3:8001");
        a.attrs.weight = Some(3);
        a.attrs.max_fails = Some(2);
        a.attrs.fail_timeout = Some(5);
        let mut b = ep("[::1]:8002");
        b.attrs.backup = true;
        let (m, skipped) = one(Balance::RoundRobin, &[a, b], Health::Up);
        assert!(skipped.is_empty());
        assert_eq!(
            body(7, &m),
            r#"{"generation":7,"upstreams":{"kotaemon":{"balance":"round_robin","servers":[{"address":"127.0.0.3:8001","weight":3,"backup":false,"down":false,"max_fails":2,"fail_timeout":5},{"address":"[::1]:8002","weight":1,"backup":true,"down":false}]}}}"#
        );
    }

    #[test]
    fn sticky_servers_carry_the_same_replica_id_reload_mode_renders() {
        let cfg = upstream("kotaemon", Balance::Sticky);
        let d = decide(&cfg, &merge([&[ep("127.0.0.2:7860")][..]]), |_| Health::Up);
        let (m, _) = membership(&[(&d, &cfg.affinity_key)]);
        let want = cfg.affinity_key.id(&"127.0.0.2:7860".parse().unwrap());
        assert_eq!(m.0["kotaemon"].servers[0].id, Some(want.to_string()));
        let (m, _) = one(Balance::Hash, &[ep("127.0.0.2:7860")], Health::Up);
        assert_eq!(m.0["kotaemon"].servers[0].id, None, "ids only for sticky");
    }

    #[test]
    fn unhealthy_servers_are_sent_down_and_hostnames_are_skipped_by_name() {
        let (m, skipped) = one(
            Balance::RoundRobin,
            &[
                ep("127.0.0.2:1"),
                ep("127.0.0.3:1"),
                ep("kotaemon.internal:7860"),
            ],
            Health::Up,
        );
        assert_eq!(
            skipped,
            vec![SkippedHost {
                upstream: "kotaemon".into(),
                address: "kotaemon.internal:7860".into()
            }]
        );
        assert_eq!(m.0["kotaemon"].servers.len(), 2);
        let cfg = upstream("kotaemon", Balance::RoundRobin);
        let eps = [ep("127.0.0.2:1"), ep("127.0.0.3:1")];
        let d = decide(&cfg, &merge([&eps[..]]), |a| {
            if a.to_string() == "127.0.0.3:1" {
                Health::Down
            } else {
                Health::Up
            }
        });
        let (m, _) = membership(&[(&d, &cfg.affinity_key)]);
        let downs: Vec<bool> = m.0["kotaemon"].servers.iter().map(|s| s.down).collect();
        assert_eq!(downs, vec![false, true]);
    }

    #[test]
    fn hostile_registry_values_cannot_reach_the_json_as_anything_but_typed_data() {
        // Addresses are parsed types: a value that would be Lua or JSON never becomes one.
        assert!("127.0.0.1:1\"}],\"x\":{".parse::<Address>().is_err());
        assert!("os.execute('x'):1".parse::<Address>().is_err());
        let (m, _) = one(Balance::RoundRobin, &[], Health::Up);
        assert_eq!(
            body(1, &m),
            r#"{"generation":1,"upstreams":{"kotaemon":{"balance":"round_robin","servers":[]}}}"#
        );
    }
}
