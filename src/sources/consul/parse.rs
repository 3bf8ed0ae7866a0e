//! Consul's health entries into endpoints: addresses, `Meta` attributes, the critical verdict.
//!
//! Pure: no I/O, no logging. The caller logs what was skipped.

use std::collections::BTreeMap;

use super::api::{Check, ServiceEntry};
use crate::model::{Address, Endpoint, RegistryState, ServerAttrs};
use crate::sources::SkippedEntry;

/// The `Service.Meta` keys that become server attributes; other keys are ignored.
pub const META_ATTRIBUTES: [&str; 4] = ["weight", "backup", "max_fails", "fail_timeout"];

/// An instance left out because a value would not be safe to render.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Skipped {
    /// `Service.ID`.
    pub service_id: String,
    /// `Node.Node`.
    pub node: String,
    /// What was wrong, as a sentence fragment.
    pub reason: String,
}

/// One registration on an address that another registration also gives: it is not
/// rendered, and its attributes are not used.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duplicate {
    /// The address both give.
    pub address: String,
    /// The instance left out: `Service.ID` and `Node.Node`.
    pub dropped: (String, String),
    /// The instance rendered, whose attributes and checks stand.
    pub kept: (String, String),
    /// Whether the two instances' server attributes (from `Meta`) differ.
    pub attrs_differ: bool,
}

/// The endpoints of one answer and the instances that were left out.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parsed {
    /// Valid endpoints, one per address, sorted by address.
    pub endpoints: Vec<Endpoint>,
    /// Invalid instances, sorted by service ID and node.
    pub skipped: Vec<Skipped>,
    /// Valid instances on an address another instance won, sorted.
    pub duplicates: Vec<Duplicate>,
}

impl Parsed {
    /// How many instances did not become an endpoint: the invalid and the duplicates.
    pub fn left_out(&self) -> usize {
        self.skipped.len() + self.duplicates.len()
    }

    /// Every instance left out, named `service ID <id> on node <node>` (escaped), with why.
    pub fn left_out_entries(&self) -> Vec<SkippedEntry> {
        let invalid = self
            .skipped
            .iter()
            .map(|s| SkippedEntry::new(instance_name(&s.service_id, &s.node), s.reason.clone()));
        let duplicates = self.duplicates.iter().map(|d| {
            SkippedEntry::new(
                instance_name(&d.dropped.0, &d.dropped.1),
                format!(
                    "its address {} is already given by {}",
                    d.address,
                    instance_name(&d.kept.0, &d.kept.1)
                ),
            )
        });
        invalid.chain(duplicates).collect()
    }
}

/// An instance as `/status` and the logs name it: control characters and quotes escaped.
pub fn instance_name(service_id: &str, node: &str) -> String {
    format!(
        "service ID {} on node {}",
        service_id.escape_debug(),
        node.escape_debug()
    )
}

/// Turns one answer into endpoints.
///
/// Instances missing any of `tags` are left out silently (Consul filters on `tag=` already;
/// this guards against an agent that ignored it). When several instances share an address
/// one is rendered, with its own attributes: a passing one if there is any, and among those
/// (or among the critical ones, when none passes) the lowest service ID, then node name.
/// The others are listed in [`Parsed::duplicates`].
pub fn parse_entries(entries: &[ServiceEntry], tags: &[String]) -> Parsed {
    let mut ordered: Vec<&ServiceEntry> = entries
        .iter()
        .filter(|e| tags.iter().all(|t| e.service.tags.contains(t)))
        .collect();
    ordered.sort_by(|a, b| (&a.service.id, &a.node.name).cmp(&(&b.service.id, &b.node.name)));

    let mut by_address: BTreeMap<Address, Vec<(&ServiceEntry, Endpoint)>> = BTreeMap::new();
    let mut skipped = Vec::new();
    for entry in ordered {
        match endpoint(entry) {
            Ok(ep) => by_address
                .entry(ep.address.clone())
                .or_default()
                .push((entry, ep)),
            Err(reason) => skipped.push(Skipped {
                service_id: entry.service.id.clone(),
                node: entry.node.name.clone(),
                reason,
            }),
        }
    }
    skipped.sort();
    let mut endpoints = Vec::with_capacity(by_address.len());
    let mut duplicates = Vec::new();
    for (address, mut same) in by_address {
        // Stable: the passing ones first, each group still in service ID order.
        same.sort_by_key(|(_, ep)| ep.registry != RegistryState::Passing);
        let mut same = same.into_iter();
        let Some((kept_entry, kept)) = same.next() else {
            continue;
        };
        let id = |e: &ServiceEntry| (e.service.id.clone(), e.node.name.clone());
        for (entry, ep) in same {
            duplicates.push(Duplicate {
                address: address.to_string(),
                dropped: id(entry),
                kept: id(kept_entry),
                attrs_differ: ep.attrs != kept.attrs,
            });
        }
        endpoints.push(kept);
    }
    duplicates.sort();
    Parsed {
        endpoints,
        skipped,
        duplicates,
    }
}

/// One instance as an endpoint, or why it cannot be one.
fn endpoint(entry: &ServiceEntry) -> Result<Endpoint, String> {
    let svc = &entry.service;
    let host = if svc.address.is_empty() {
        &entry.node.address
    } else {
        &svc.address
    };
    let port = u16::try_from(svc.port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("port {} must be a number from 1 to 65535", svc.port))?;
    let address = Address::from_parts(host, port).map_err(|e| e.to_string())?;
    let mut attrs = ServerAttrs::default();
    for key in META_ATTRIBUTES {
        if let Some(value) = svc.meta.get(key) {
            attrs.set(key, value).map_err(|e| format!("Meta {e}"))?;
        }
    }
    Ok(Endpoint {
        address,
        attrs,
        registry: registry_state(&entry.checks),
        origin: format!("consul service ID {} on node {}", svc.id, entry.node.name),
    })
}

/// Consul's verdict on an instance: critical when any of its checks is — its own, the node's
/// `serfHealth`, or maintenance mode (`_service_maintenance:<id>`, `_node_maintenance`).
/// `warning` counts as passing; any status Consul does not document counts as critical.
pub fn registry_state(checks: &[Check]) -> RegistryState {
    let mut failing: Vec<&Check> = checks
        .iter()
        .filter(|c| !matches!(c.status.as_str(), "passing" | "warning"))
        .collect();
    if failing.is_empty() {
        return RegistryState::Passing;
    }
    failing.sort_by(|a, b| a.check_id.cmp(&b.check_id));
    let reasons: Vec<String> = failing
        .iter()
        .map(|c| {
            let detail = [&c.output, &c.notes]
                .into_iter()
                .map(|s| s.trim())
                .find(|s| !s.is_empty())
                .unwrap_or("no output");
            format!(
                "check {} ({}) is {}: {detail}",
                c.check_id, c.name, c.status
            )
        })
        .collect();
    RegistryState::Critical(reasons.join("; "))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn check(id: &str, status: &str, output: &str) -> serde_json::Value {
        json!({"Node": "n1", "CheckID": id, "Name": format!("{id} name"), "Status": status,
               "Output": output, "Notes": "", "ServiceID": "", "ServiceName": ""})
    }

    fn entry(
        id: &str,
        node: &str,
        addr: &str,
        port: i64,
        meta: serde_json::Value,
        checks: Vec<serde_json::Value>,
    ) -> ServiceEntry {
        serde_json::from_value(json!({
            "Node": {"ID": "x", "Node": node, "Address": "10.9.9.9", "Datacenter": "dc1"},
            "Service": {"ID": id, "Service": "kotaemon", "Tags": ["prod", "v2"], "Address": addr,
                        "Meta": meta, "Port": port},
            "Checks": checks,
        }))
        .unwrap()
    }

    fn serf() -> serde_json::Value {
        check("serfHealth", "passing", "Agent alive and reachable")
    }

    #[test]
    fn reads_address_port_meta_and_origin() {
        let e = entry(
            "k1",
            "n1",
            "10.0.0.1",
            7860,
            json!({"weight": "3", "backup": "true", "version": "2"}),
            vec![serf()],
        );
        let p = parse_entries(&[e], &[]);
        assert!(p.skipped.is_empty());
        let ep = &p.endpoints[0];
        assert_eq!(ep.address.to_string(), "10.0.0.1:7860");
        assert_eq!((ep.attrs.weight, ep.attrs.backup), (Some(3), true));
        assert_eq!(ep.registry, RegistryState::Passing);
        assert_eq!(ep.origin, "consul service ID k1 on node n1");
    }

    #[test]
    fn empty_service_address_falls_back_to_the_node_address() {
        let p = parse_entries(&[entry("k1", "n1", "", 7860, json!({}), vec![])], &[]);
        assert_eq!(p.endpoints[0].address.to_string(), "10.9.9.9:7860");
    }

    #[test]
    fn bad_meta_or_address_skips_the_entry_and_names_it() {
        let entries = [
            entry(
                "bad-weight",
                "n1",
                "10.0.0.1",
                80,
                json!({"weight": "3; down"}),
                vec![],
            ),
            entry(
                "bad-timeout",
                "n1",
                "10.0.0.2",
                80,
                json!({"fail_timeout": "1.5s"}),
                vec![],
            ),
            entry("bad-host", "n2", "host name", 80, json!({}), vec![]),
            entry("bad-port", "n2", "10.0.0.3", 0, json!({}), vec![]),
            entry(
                "good",
                "n2",
                "10.0.0.4",
                80,
                json!({"down": "yes", "other": {"x": 1}}),
                vec![],
            ),
        ];
        let p = parse_entries(&entries, &[]);
        assert_eq!(
            p.endpoints.len(),
            1,
            "only `good` survives; unknown Meta keys are ignored"
        );
        let ids: Vec<_> = p
            .skipped
            .iter()
            .map(|s| (s.service_id.as_str(), s.node.as_str()))
            .collect();
        assert_eq!(
            ids,
            [
                ("bad-host", "n2"),
                ("bad-port", "n2"),
                ("bad-timeout", "n1"),
                ("bad-weight", "n1")
            ]
        );
        assert!(
            p.skipped[3].reason.contains("weight"),
            "{}",
            p.skipped[3].reason
        );
    }

    #[test]
    fn left_out_entries_name_each_instance_escaped_with_its_reason() {
        let entries = [
            entry(
                "bad\n<b>",
                "n1",
                "10.0.0.1",
                80,
                json!({"weight": "x"}),
                vec![],
            ),
            entry("a", "n1", "10.0.0.2", 80, json!({}), vec![]),
            entry("b", "n2", "10.0.0.2", 80, json!({}), vec![]),
        ];
        let left = parse_entries(&entries, &[]).left_out_entries();
        let names: Vec<&str> = left.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["service ID bad\\n<b> on node n1", "service ID b on node n2"]
        );
        assert!(left[0].reason.contains("weight"), "{}", left[0].reason);
        assert_eq!(
            left[1].reason,
            "its address 10.0.0.2:80 is already given by service ID a on node n1"
        );
    }

    #[test]
    fn any_critical_check_makes_the_instance_critical_and_warning_does_not() {
        let cases = [
            (vec![serf(), check("service:k1", "warning", "slow")], None),
            (
                vec![serf(), check("service:k1", "critical", "HTTP 503")],
                Some("service:k1"),
            ),
            (
                vec![check(
                    "serfHealth",
                    "critical",
                    "Agent not live or unreachable",
                )],
                Some("serfHealth"),
            ),
            (
                vec![serf(), check("_service_maintenance:k1", "critical", "")],
                Some("_service_maintenance:k1"),
            ),
            (
                vec![serf(), check("_node_maintenance", "critical", "")],
                Some("_node_maintenance"),
            ),
            (vec![serf(), check("odd", "maintenance", "")], Some("odd")),
        ];
        for (checks, critical) in cases {
            let p = parse_entries(&[entry("k1", "n1", "10.0.0.1", 80, json!({}), checks)], &[]);
            match (&p.endpoints[0].registry, critical) {
                (RegistryState::Passing, None) => {}
                (RegistryState::Critical(reason), Some(id)) => {
                    assert!(reason.contains(id), "{reason}")
                }
                (got, want) => panic!("got {got:?}, wanted critical {want:?}"),
            }
        }
    }

    #[test]
    fn the_critical_reason_carries_output_or_the_maintenance_notes() {
        let mut maint = check("_service_maintenance:k1", "critical", "");
        maint["Notes"] = json!("deploying v2");
        let state = registry_state(&[serde_json::from_value(maint).unwrap()]);
        let RegistryState::Critical(reason) = state else {
            panic!("not critical")
        };
        assert_eq!(reason, "check _service_maintenance:k1 (_service_maintenance:k1 name) is critical: deploying v2");
    }

    #[test]
    fn every_configured_tag_must_be_on_the_instance() {
        let e = entry("k1", "n1", "10.0.0.1", 80, json!({}), vec![]);
        assert_eq!(
            parse_entries(std::slice::from_ref(&e), &["prod".into(), "v2".into()])
                .endpoints
                .len(),
            1
        );
        assert!(parse_entries(&[e], &["prod".into(), "canary".into()])
            .endpoints
            .is_empty());
    }

    #[test]
    fn duplicate_addresses_keep_a_passing_one_then_the_lowest_service_id() {
        let crit = vec![check("service:x", "critical", "down")];
        let entries = [
            entry(
                "a",
                "n1",
                "10.0.0.1",
                80,
                json!({"weight": "5"}),
                crit.clone(),
            ),
            entry(
                "c",
                "n2",
                "10.0.0.1",
                80,
                json!({"weight": "3"}),
                vec![serf()],
            ),
            entry(
                "b",
                "n3",
                "10.0.0.1",
                80,
                json!({"weight": "2"}),
                vec![serf()],
            ),
        ];
        let p = parse_entries(&entries, &[]);
        assert_eq!(p.endpoints.len(), 1);
        assert_eq!(p.endpoints[0].origin, "consul service ID b on node n3");
        assert_eq!(p.endpoints[0].attrs.weight, Some(2), "b's own Meta");
        let pair = |d: &Duplicate| (d.dropped.0.clone(), d.kept.0.clone(), d.attrs_differ);
        assert_eq!(
            p.duplicates.iter().map(pair).collect::<Vec<_>>(),
            [
                ("a".into(), "b".into(), true),
                ("c".into(), "b".into(), true)
            ]
        );
        assert_eq!(p.duplicates[0].address, "10.0.0.1:80");
        assert_eq!((p.skipped.len(), p.left_out()), (0, 2));

        let both_critical = [
            entry("z", "n0", "10.0.0.1", 80, json!({}), crit.clone()),
            entry("a", "n9", "10.0.0.1", 80, json!({}), crit),
        ];
        let p = parse_entries(&both_critical, &[]);
        assert_eq!(p.endpoints[0].origin, "consul service ID a on node n9");
        assert!(!p.duplicates[0].attrs_differ);
    }

    #[test]
    fn the_winner_does_not_depend_on_the_answer_order() {
        let entries = vec![
            entry(
                "k2",
                "n1",
                "10.0.0.1",
                80,
                json!({"weight": "2"}),
                vec![serf()],
            ),
            entry(
                "k1",
                "n2",
                "10.0.0.1",
                80,
                json!({"weight": "1"}),
                vec![serf()],
            ),
            entry(
                "k1",
                "n1",
                "10.0.0.1",
                80,
                json!({"weight": "9"}),
                vec![serf()],
            ),
        ];
        let mut reversed = entries.clone();
        reversed.reverse();
        let (a, b) = (parse_entries(&entries, &[]), parse_entries(&reversed, &[]));
        assert_eq!(a, b);
        assert_eq!(a.endpoints[0].origin, "consul service ID k1 on node n1");
    }
}
