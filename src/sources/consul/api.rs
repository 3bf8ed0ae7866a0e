//! The `/v1/health/service/:service` answer as Consul sends it: entries of node, service and
//! checks, decoded leniently.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

/// One element of the `/v1/health/service` answer: an instance, its node and their checks.
///
/// Lenient on purpose: Go encodes empty slices and maps as `null`, and fields we do not use
/// are ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceEntry {
    /// The node the instance runs on.
    #[serde(default, deserialize_with = "null_as_default")]
    pub node: Node,
    /// The service instance.
    #[serde(default, deserialize_with = "null_as_default")]
    pub service: Service,
    /// The node's checks (`serfHealth`, `_node_maintenance`) and the instance's own.
    #[serde(default, deserialize_with = "null_as_default")]
    pub checks: Vec<Check>,
}

/// `Node` of a health entry.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Node {
    /// `Node`: the node name.
    #[serde(rename = "Node", default, deserialize_with = "null_as_default")]
    pub name: String,
    /// `Address`: used when the instance has no address of its own.
    #[serde(rename = "Address", default, deserialize_with = "null_as_default")]
    pub address: String,
}

/// `Service` of a health entry.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Service {
    /// `ID`: the instance ID, unique per node.
    #[serde(rename = "ID", default, deserialize_with = "null_as_default")]
    pub id: String,
    /// `Service`: the service name.
    #[serde(rename = "Service", default, deserialize_with = "null_as_default")]
    pub name: String,
    /// `Tags`.
    #[serde(rename = "Tags", default, deserialize_with = "null_as_default")]
    pub tags: Vec<String>,
    /// `Address`: empty means "the node's address".
    #[serde(rename = "Address", default, deserialize_with = "null_as_default")]
    pub address: String,
    /// `Port`: kept wide so that a bad value skips one entry instead of failing the answer.
    #[serde(rename = "Port", default, deserialize_with = "null_as_default")]
    pub port: i64,
    /// `Meta`: strings in real Consul; any JSON value is accepted and validated later.
    #[serde(rename = "Meta", default, deserialize_with = "null_as_default")]
    pub meta: BTreeMap<String, serde_json::Value>,
}

/// One check of a health entry.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Check {
    /// `CheckID`, e.g. `serfHealth`, `service:web-1`, `_service_maintenance:web-1`.
    #[serde(rename = "CheckID", default, deserialize_with = "null_as_default")]
    pub check_id: String,
    /// `Name`.
    #[serde(rename = "Name", default, deserialize_with = "null_as_default")]
    pub name: String,
    /// `Status`: `passing`, `warning` or `critical`.
    #[serde(rename = "Status", default, deserialize_with = "null_as_default")]
    pub status: String,
    /// `Output`: what the check last printed.
    #[serde(rename = "Output", default, deserialize_with = "null_as_default")]
    pub output: String,
    /// `Notes`: where maintenance mode puts its reason.
    #[serde(rename = "Notes", default, deserialize_with = "null_as_default")]
    pub notes: String,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_nulls_read_as_empty_values() {
        let json = r#"[{"Node":{"Node":"n1","Address":"10.0.0.1","Meta":null},
            "Service":{"ID":"a","Service":"s","Tags":null,"Address":"","Meta":null,"Port":80},
            "Checks":null}]"#;
        let entries: Vec<ServiceEntry> = serde_json::from_str(json).unwrap();
        assert_eq!(entries[0].service.tags, Vec::<String>::new());
        assert!(entries[0].service.meta.is_empty() && entries[0].checks.is_empty());
        assert_eq!(entries[0].node.address, "10.0.0.1");
    }
}
