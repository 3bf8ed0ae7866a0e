//! The stand-in's state: one node, its services and checks, and the modify index.
//!
//! Pure: the HTTP layer locks it, calls one method, and wakes blocked queries.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};

/// An error the agent API would answer with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// The plain-text body.
    pub message: String,
}

impl ApiError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// The node every service of the stand-in runs on (an agent is one node).
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// `Node.Node`.
    pub name: String,
    /// `Node.Address`: what an instance without an address of its own resolves to.
    pub address: String,
    /// `Node.Datacenter`; a `dc=` for any other one is refused.
    pub datacenter: String,
}

/// `PUT /v1/agent/service/register` body (the fields the stand-in models).
#[derive(Debug, Clone, Deserialize)]
pub struct Registration {
    /// `Name` (required).
    #[serde(rename = "Name", alias = "name")]
    pub name: String,
    /// `ID`; defaults to `Name`.
    #[serde(rename = "ID", alias = "id", default)]
    pub id: Option<String>,
    /// `Tags`.
    #[serde(rename = "Tags", alias = "tags", default)]
    pub tags: Option<Vec<String>>,
    /// `Address`; empty means the node's.
    #[serde(rename = "Address", alias = "address", default)]
    pub address: Option<String>,
    /// `Port`.
    #[serde(rename = "Port", alias = "port", default)]
    pub port: Option<u16>,
    /// `Meta`: string values only, as in Consul.
    #[serde(rename = "Meta", alias = "meta", default)]
    pub meta: Option<BTreeMap<String, String>>,
    /// `Check`: one check, ID `service:<id>` unless given.
    #[serde(rename = "Check", alias = "check", default)]
    pub check: Option<CheckDef>,
    /// `Checks`: several, IDs `service:<id>:<n>` unless given.
    #[serde(rename = "Checks", alias = "checks", default)]
    pub checks: Option<Vec<CheckDef>>,
}

/// A check definition inside a registration. Only TTL and fixed-status checks are modelled:
/// the stand-in runs no HTTP/TCP/script checks (they keep their initial status), and a TTL
/// does not expire by itself.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CheckDef {
    /// `CheckID`.
    #[serde(rename = "CheckID", alias = "check_id", alias = "CheckId", default)]
    pub check_id: Option<String>,
    /// `Name`.
    #[serde(rename = "Name", alias = "name", default)]
    pub name: Option<String>,
    /// `Status`: the initial status; `critical` when absent, as in Consul.
    #[serde(rename = "Status", alias = "status", default)]
    pub status: Option<String>,
    /// `Notes`.
    #[serde(rename = "Notes", alias = "notes", default)]
    pub notes: Option<String>,
    /// `TTL`: accepted and reported as the check type.
    #[serde(rename = "TTL", alias = "ttl", default)]
    pub ttl: Option<String>,
}

#[derive(Debug, Clone)]
struct ServiceReg {
    id: String,
    name: String,
    tags: Vec<String>,
    address: String,
    port: u16,
    meta: BTreeMap<String, String>,
    create_index: u64,
    modify_index: u64,
}

#[derive(Debug, Clone)]
struct CheckState {
    id: String,
    name: String,
    status: String,
    output: String,
    notes: String,
    kind: String,
    /// Empty for node checks.
    service_id: String,
    create_index: u64,
    modify_index: u64,
}

/// The node's catalog with a global modify index.
#[derive(Debug, Clone)]
pub struct Catalog {
    node: NodeInfo,
    services: BTreeMap<String, ServiceReg>,
    checks: BTreeMap<String, CheckState>,
    index: u64,
    epoch: u64,
}

const SERF_HEALTH: &str = "serfHealth";
const NODE_MAINT: &str = "_node_maintenance";

fn service_maint_id(service_id: &str) -> String {
    format!("_service_maintenance:{service_id}")
}

fn status_ok(status: &str) -> Result<(), ApiError> {
    match status {
        "passing" | "warning" | "critical" => Ok(()),
        other => Err(ApiError::new(
            400,
            format!("Invalid check status: \"{other}\""),
        )),
    }
}

impl Catalog {
    /// A node with its `serfHealth` check passing.
    pub fn new(node: NodeInfo) -> Self {
        let mut c = Self {
            node,
            services: BTreeMap::new(),
            checks: BTreeMap::new(),
            index: 10,
            epoch: 0,
        };
        let idx = c.bump();
        c.checks.insert(
            SERF_HEALTH.into(),
            CheckState {
                id: SERF_HEALTH.into(),
                name: "Serf Health Status".into(),
                status: "passing".into(),
                output: "Agent alive and reachable".into(),
                notes: String::new(),
                kind: String::new(),
                service_id: String::new(),
                create_index: idx,
                modify_index: idx,
            },
        );
        c
    }

    /// The current `X-Consul-Index`.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Bumped when the index is reset, so blocked queries wake as they do after a restore.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The node's datacenter.
    pub fn datacenter(&self) -> &str {
        &self.node.datacenter
    }

    fn bump(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    /// `PUT /v1/agent/service/register`: adds or replaces an instance and its checks.
    pub fn register(&mut self, reg: Registration) -> Result<(), ApiError> {
        if reg.name.is_empty() {
            return Err(ApiError::new(400, "Missing service name"));
        }
        let id = reg
            .id
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| reg.name.clone());
        let mut defs: Vec<(String, CheckDef)> = Vec::new();
        if let Some(def) = reg.check {
            defs.push((format!("service:{id}"), def));
        }
        for (n, def) in reg.checks.unwrap_or_default().into_iter().enumerate() {
            defs.push((format!("service:{id}:{}", n + 1), def));
        }
        for (_, def) in &defs {
            if let Some(s) = &def.status {
                status_ok(s)?;
            }
        }
        let idx = self.bump();
        let create_index = self.services.get(&id).map_or(idx, |s| s.create_index);
        self.checks
            .retain(|_, c| c.service_id != id || c.id == service_maint_id(&id));
        for (default_id, def) in defs {
            let check_id = def.check_id.filter(|s| !s.is_empty()).unwrap_or(default_id);
            self.checks.insert(
                check_id.clone(),
                CheckState {
                    id: check_id,
                    name: def
                        .name
                        .unwrap_or_else(|| format!("Service '{}' check", reg.name)),
                    status: def.status.unwrap_or_else(|| "critical".into()),
                    output: String::new(),
                    notes: def.notes.unwrap_or_default(),
                    kind: if def.ttl.is_some() {
                        "ttl".into()
                    } else {
                        String::new()
                    },
                    service_id: id.clone(),
                    create_index: idx,
                    modify_index: idx,
                },
            );
        }
        self.services.insert(
            id.clone(),
            ServiceReg {
                id,
                name: reg.name,
                tags: reg.tags.unwrap_or_default(),
                address: reg.address.unwrap_or_default(),
                port: reg.port.unwrap_or(0),
                meta: reg.meta.unwrap_or_default(),
                create_index,
                modify_index: idx,
            },
        );
        Ok(())
    }

    fn unknown_service(id: &str) -> ApiError {
        ApiError::new(
            404,
            format!("Unknown service ID \"{id}\". Ensure that the service ID is passed, not the service name."),
        )
    }

    /// `PUT /v1/agent/service/deregister/:id`: the instance and all its checks go.
    pub fn deregister(&mut self, id: &str) -> Result<(), ApiError> {
        if self.services.remove(id).is_none() {
            return Err(Self::unknown_service(id));
        }
        self.checks.retain(|_, c| c.service_id != id);
        self.bump();
        Ok(())
    }

    /// `PUT /v1/agent/service/maintenance/:id?enable=..&reason=..`.
    pub fn service_maintenance(
        &mut self,
        id: &str,
        enable: bool,
        reason: Option<&str>,
    ) -> Result<(), ApiError> {
        if !self.services.contains_key(id) {
            return Err(Self::unknown_service(id));
        }
        let notes = reason.filter(|r| !r.is_empty()).unwrap_or(
            "Maintenance mode is enabled for this service, but no reason was provided. This is a default message.",
        );
        self.maintenance(
            service_maint_id(id),
            "Service Maintenance Mode",
            id,
            enable,
            notes,
        );
        Ok(())
    }

    /// `PUT /v1/agent/maintenance?enable=..&reason=..`.
    pub fn node_maintenance(&mut self, enable: bool, reason: Option<&str>) {
        let notes = reason.filter(|r| !r.is_empty()).unwrap_or(
            "Maintenance mode is enabled for this node, but no reason was provided. This is a default message.",
        );
        self.maintenance(
            NODE_MAINT.into(),
            "Node Maintenance Mode",
            "",
            enable,
            notes,
        );
    }

    fn maintenance(
        &mut self,
        check_id: String,
        name: &str,
        service_id: &str,
        enable: bool,
        notes: &str,
    ) {
        if !enable {
            if self.checks.remove(&check_id).is_some() {
                self.bump();
            }
            return;
        }
        let idx = self.bump();
        self.checks.insert(
            check_id.clone(),
            CheckState {
                id: check_id,
                name: name.into(),
                status: "critical".into(),
                output: String::new(),
                notes: notes.into(),
                kind: "maintenance".into(),
                service_id: service_id.into(),
                create_index: idx,
                modify_index: idx,
            },
        );
    }

    /// `PUT /v1/agent/check/{pass,warn,fail,update}/:check_id`.
    pub fn update_check(
        &mut self,
        check_id: &str,
        status: &str,
        output: Option<&str>,
    ) -> Result<(), ApiError> {
        status_ok(status)?;
        if !self.checks.contains_key(check_id) {
            return Err(ApiError::new(
                404,
                format!("Unknown check ID \"{check_id}\""),
            ));
        }
        let idx = self.bump();
        if let Some(c) = self.checks.get_mut(check_id) {
            c.status = status.into();
            c.output = output.unwrap_or_default().into();
            c.modify_index = idx;
        }
        Ok(())
    }

    /// Drops the index to a low value and wakes every blocked query, as a snapshot restore on
    /// the Consul servers does.
    pub fn reset_index(&mut self) {
        self.index = 2;
        self.epoch += 1;
    }

    /// `GET /v1/health/service/:service`: every instance with every tag, with the node's
    /// checks and its own; with `passing_only`, only instances whose checks all pass.
    pub fn health(&self, service: &str, tags: &[String], passing_only: bool) -> Vec<Value> {
        let node_checks: Vec<&CheckState> = self
            .checks
            .values()
            .filter(|c| c.service_id.is_empty())
            .collect();
        self.services
            .values()
            .filter(|s| s.name == service && tags.iter().all(|t| s.tags.contains(t)))
            .filter_map(|s| {
                let own = self.checks.values().filter(|c| c.service_id == s.id);
                let checks: Vec<&CheckState> = node_checks.iter().copied().chain(own).collect();
                if passing_only && checks.iter().any(|c| c.status != "passing") {
                    return None;
                }
                Some(json!({
                    "Node": self.node_json(),
                    "Service": {
                        "ID": s.id, "Service": s.name, "Tags": s.tags, "Address": s.address,
                        "Meta": s.meta, "Port": s.port,
                        "TaggedAddresses": {}, "Weights": {"Passing": 1, "Warning": 1},
                        "EnableTagOverride": false, "Namespace": "default",
                        "CreateIndex": s.create_index, "ModifyIndex": s.modify_index,
                    },
                    "Checks": checks.iter().map(|c| self.check_json(c, s)).collect::<Vec<_>>(),
                }))
            })
            .collect()
    }

    fn node_json(&self) -> Value {
        json!({
            "ID": "2f7e34a2-6c5e-4b8e-9d3a-000000000001", "Node": self.node.name,
            "Address": self.node.address, "Datacenter": self.node.datacenter,
            "TaggedAddresses": {"lan": self.node.address, "wan": self.node.address},
            "Meta": {"consul-network-segment": ""}, "CreateIndex": 11, "ModifyIndex": 11,
        })
    }

    fn check_json(&self, c: &CheckState, s: &ServiceReg) -> Value {
        let (service_name, service_tags) = if c.service_id.is_empty() {
            (String::new(), Vec::new())
        } else {
            (s.name.clone(), s.tags.clone())
        };
        json!({
            "Node": self.node.name, "CheckID": c.id, "Name": c.name, "Status": c.status,
            "Notes": c.notes, "Output": c.output, "ServiceID": c.service_id,
            "ServiceName": service_name, "ServiceTags": service_tags, "Type": c.kind,
            "Namespace": "default", "CreateIndex": c.create_index, "ModifyIndex": c.modify_index,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        Catalog::new(NodeInfo {
            name: "standin".into(),
            address: "127.0.0.1".into(),
            datacenter: "dc1".into(),
        })
    }

    fn reg(json: Value) -> Registration {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn every_change_bumps_the_index_and_health_lists_node_and_service_checks() {
        let mut c = catalog();
        let i0 = c.index();
        c.register(reg(
            json!({"Name": "web", "ID": "web-1", "Port": 80, "Tags": ["prod"],
            "Check": {"TTL": "10s", "Status": "passing"}}),
        ))
        .unwrap();
        assert!(c.index() > i0);
        let h = c.health("web", &["prod".into()], false);
        let ids: Vec<&str> = h[0]["Checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["CheckID"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["serfHealth", "service:web-1"]);
        assert!(c
            .health("web", &["prod".into(), "canary".into()], false)
            .is_empty());
        assert!(c.health("other", &[], false).is_empty());
    }

    #[test]
    fn maintenance_adds_a_critical_check_that_passing_filters_out() {
        let mut c = catalog();
        c.register(reg(json!({"Name": "web", "ID": "web-1", "Port": 80})))
            .unwrap();
        c.service_maintenance("web-1", true, Some("deploy"))
            .unwrap();
        let h = c.health("web", &[], false);
        assert_eq!(h[0]["Checks"][1]["CheckID"], "_service_maintenance:web-1");
        assert_eq!(h[0]["Checks"][1]["Notes"], "deploy");
        assert!(c.health("web", &[], true).is_empty());
        c.service_maintenance("web-1", false, None).unwrap();
        c.node_maintenance(true, None);
        let checks = &c.health("web", &[], false)[0]["Checks"];
        let ids: Vec<&str> = checks
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["CheckID"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            ["_node_maintenance", "serfHealth"],
            "node checks, no service check left"
        );
        assert_eq!(
            c.service_maintenance("nope", true, None)
                .unwrap_err()
                .status,
            404
        );
    }

    #[test]
    fn ttl_updates_and_deregistration() {
        let mut c = catalog();
        c.register(reg(
            json!({"Name": "web", "ID": "web-1", "Port": 80, "Checks": [{"TTL": "5s"}]}),
        ))
        .unwrap();
        assert_eq!(
            c.health("web", &[], false)[0]["Checks"][1]["Status"],
            "critical",
            "TTL checks start critical"
        );
        c.update_check("service:web-1:1", "passing", Some("ok"))
            .unwrap();
        assert_eq!(c.health("web", &[], true).len(), 1);
        c.deregister("web-1").unwrap();
        assert!(c.health("web", &[], false).is_empty());
        assert_eq!(
            c.update_check("service:web-1:1", "passing", None)
                .unwrap_err()
                .status,
            404
        );
        assert_eq!(c.deregister("web-1").unwrap_err().status, 404);
    }

    #[test]
    fn index_reset_lowers_the_index_and_changes_the_epoch() {
        let mut c = catalog();
        c.register(reg(json!({"Name": "web", "Port": 80}))).unwrap();
        let (i, e) = (c.index(), c.epoch());
        c.reset_index();
        assert!(c.index() < i && c.epoch() != e);
    }
}
