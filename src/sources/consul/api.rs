//! The one Consul call the source makes, declared for consulrs: `GET /v1/health/service/:service`.
//!
//! consulrs 0.1.0 ships no health endpoints and its `QueryEndpoint` derive only compiles inside
//! consulrs, so the request is our own `rustify_derive::Endpoint` with `FeaturedEndpoint`
//! implemented by hand (that is what carries the blocking-query `index` and `wait`).

use std::collections::BTreeMap;

use consulrs::api::features::{Blocking, FeaturedEndpoint, Features};
use derive_builder::Builder;
use rustify_derive::Endpoint;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `GET /v1/health/service/:service?dc=..&tag=..&tag=..` with the blocking-query features.
///
/// consulrs's middleware prepends `/v1`, adds `X-Consul-Token` and appends `index`/`wait`.
#[derive(Builder, Debug, Default, Endpoint, Serialize)]
#[endpoint(
    path = "health/service/{self.service}",
    response = "Vec<ServiceEntry>",
    builder = "true"
)]
#[builder(setter(into, strip_option), default)]
pub struct HealthServiceRequest {
    /// The blocking-query index and wait.
    #[endpoint(skip)]
    #[serde(skip)]
    pub features: Option<Features>,
    /// The service name (a path segment, percent-encoded by rustify).
    #[endpoint(skip)]
    #[serde(skip)]
    pub service: String,
    /// `dc=`: the datacenter; the agent's own when absent.
    #[endpoint(query)]
    pub dc: Option<String>,
    /// `tag=` once per tag: Consul returns only instances carrying every one.
    #[endpoint(query)]
    #[serde(flatten)]
    pub tag: TagParams,
}

impl HealthServiceRequest {
    /// The request for one blocking round: `index` 0 asks without blocking.
    pub fn new(service: &str, dc: Option<&str>, tags: &[String], index: u64, wait: &str) -> Self {
        Self {
            features: Some(Features {
                blocking: Some(Blocking {
                    index,
                    wait: Some(wait.to_owned()),
                }),
                ..Features::default()
            }),
            service: service.to_owned(),
            dc: dc.map(str::to_owned),
            tag: TagParams(tags.to_vec()),
        }
    }
}

impl FeaturedEndpoint for HealthServiceRequest {
    fn features(&self) -> Option<Features> {
        self.features.clone()
    }
}

/// Tags serialised as repeated `tag=` query pairs (`serde_urlencoded` has no sequences, but a
/// flattened map may repeat a key).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TagParams(pub Vec<String>);

impl Serialize for TagParams {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for tag in &self.0 {
            map.serialize_entry("tag", tag)?;
        }
        map.end()
    }
}

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
    use rustify::endpoint::Endpoint as _;

    use super::*;

    #[test]
    fn tags_become_repeated_query_pairs_next_to_the_datacenter() {
        let tags = vec!["prod".to_owned(), "v2".to_owned()];
        let req = HealthServiceRequest::new("kotaemon", Some("dc2"), &tags, 7, "1s");
        assert_eq!(req.path(), "health/service/kotaemon");
        assert_eq!(
            req.query().unwrap().as_deref(),
            Some("dc=dc2&tag=prod&tag=v2")
        );
        let plain = HealthServiceRequest::new("kotaemon", None, &[], 0, "1s");
        assert_eq!(plain.query().unwrap().as_deref(), Some(""));
    }

    #[test]
    fn blocking_features_carry_index_and_wait() {
        let req = HealthServiceRequest::new("kotaemon", None, &[], 42, "60s");
        let blocking = req.features().and_then(|f| f.blocking).unwrap();
        assert_eq!(
            (blocking.index, blocking.wait.as_deref()),
            (42, Some("60s"))
        );
    }

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
