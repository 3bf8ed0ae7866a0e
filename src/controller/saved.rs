//! Saved snapshots (`[nginx] state_dir`): the last good answer of each registry source, one
//! JSON file per upstream and source, so a restart during a registry outage starts from it.
//!
//! A file is written (atomically, in order, off the controller loop) when a source's snapshot
//! in use changes, and read when the upstream starts. It names the source's identity (kind,
//! address, service or prefix): a file left by a differently configured source is not used.
//! Its content is parsed through the same typed values as a registry answer, so a tampered
//! file cannot reach the include file either; a file that does not parse is refused whole.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::state::SavedSnapshot;
use crate::config::SourceConfig;
use crate::model::{Address, Endpoint, RegistryState, ServerAttrs, UpstreamName};
use crate::nginx::{read_current, write_atomic};

/// The `version` of the file format written here.
const VERSION: u32 = 1;

/// Why a saved snapshot could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SavedError {
    /// Reading the file failed.
    #[error("{0}")]
    Read(crate::nginx::NginxError),
    /// The file is not a snapshot of this format.
    #[error("`{}` is not a saved snapshot upstreamd can read: {reason}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file was saved for a source configured differently.
    #[error("`{}` was saved for {found:?}, not {expected:?}; not used", path.display())]
    OtherSource {
        /// The file.
        path: PathBuf,
        /// The identity in the file.
        found: String,
        /// The identity of the configured source.
        expected: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedFile {
    version: u32,
    upstream: String,
    source: String,
    identity: String,
    saved_at_unix_secs: f64,
    endpoints: Vec<SavedEndpoint>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedEndpoint {
    address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_fails: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fail_timeout: Option<u64>,
    #[serde(default)]
    backup: bool,
    #[serde(default)]
    down: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    critical: Option<String>,
    #[serde(default)]
    origin: String,
}

/// What identifies a registry source across runs: a file saved for another identity is not
/// used. `None` for a static list, which is never saved (the config file holds it).
pub fn identity(cfg: &SourceConfig) -> Option<String> {
    match cfg {
        SourceConfig::Static(_) => None,
        SourceConfig::Consul(c) => Some(format!(
            "consul {} service={} tags={:?} datacenter={}",
            c.url,
            c.service,
            c.tags,
            c.datacenter.as_deref().unwrap_or("-")
        )),
        SourceConfig::Etcd(e) => Some(format!(
            "etcd {} prefix={:?}",
            e.endpoints.join(","),
            e.prefix
        )),
    }
}

/// The file of an upstream's source: `<upstream>.<label>.json`, `#` in the label read as `-`.
pub fn file_name(upstream: &UpstreamName, label: &str) -> String {
    format!("{upstream}.{}.json", label.replace('#', "-"))
}

/// The bytes of a saved snapshot.
pub fn encode(
    upstream: &UpstreamName,
    label: &str,
    identity: &str,
    endpoints: &[Endpoint],
    saved_at: SystemTime,
) -> Vec<u8> {
    let file = SavedFile {
        version: VERSION,
        upstream: upstream.to_string(),
        source: label.to_owned(),
        identity: identity.to_owned(),
        saved_at_unix_secs: saved_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64(),
        endpoints: endpoints
            .iter()
            .map(|e| SavedEndpoint {
                address: e.address.to_string(),
                weight: e.attrs.weight,
                max_fails: e.attrs.max_fails,
                fail_timeout: e.attrs.fail_timeout,
                backup: e.attrs.backup,
                down: e.attrs.down,
                critical: match &e.registry {
                    RegistryState::Passing => None,
                    RegistryState::Critical(why) => Some(why.clone()),
                },
                origin: e.origin.clone(),
            })
            .collect(),
    };
    let mut bytes = serde_json::to_vec_pretty(&file).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// Parses a saved snapshot, checking it belongs to the source `identity` and that every
/// value is one the registry parsers would accept.
pub fn decode(path: &Path, bytes: &[u8], identity: &str) -> Result<SavedSnapshot, SavedError> {
    let format = |reason: String| SavedError::Format {
        path: path.to_owned(),
        reason,
    };
    let file: SavedFile = serde_json::from_slice(bytes).map_err(|e| format(e.to_string()))?;
    if file.version != VERSION {
        return Err(format(format!("version {} is not {VERSION}", file.version)));
    }
    if file.identity != identity {
        return Err(SavedError::OtherSource {
            path: path.to_owned(),
            found: file.identity,
            expected: identity.to_owned(),
        });
    }
    let mut endpoints = Vec::with_capacity(file.endpoints.len());
    for (i, e) in file.endpoints.into_iter().enumerate() {
        let bad = |what: String| format(format!("endpoints[{i}]: {what}"));
        let address = e
            .address
            .parse::<Address>()
            .map_err(|err| bad(err.to_string()))?;
        let mut attrs = ServerAttrs::default();
        let numbers = [
            ("weight", e.weight.map(u64::from)),
            ("max_fails", e.max_fails.map(u64::from)),
            ("fail_timeout", e.fail_timeout),
        ];
        for (key, value) in numbers {
            if let Some(v) = value {
                attrs
                    .set(key, &v.into())
                    .map_err(|err| bad(err.to_string()))?;
            }
        }
        attrs.backup = e.backup;
        attrs.down = e.down;
        endpoints.push(Endpoint {
            address,
            attrs,
            registry: e
                .critical
                .map_or(RegistryState::Passing, RegistryState::Critical),
            // Not rendered, but logged and shown: no control characters from a file.
            origin: if e.origin.chars().any(char::is_control) {
                e.origin.escape_debug().to_string()
            } else {
                e.origin
            },
        });
    }
    let saved_at = (file.saved_at_unix_secs.is_finite() && file.saved_at_unix_secs >= 0.0)
        .then(|| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(file.saved_at_unix_secs));
    Ok(SavedSnapshot {
        endpoints,
        saved_at,
    })
}

/// Where snapshots are kept, and the task that writes them in order.
#[derive(Debug, Clone)]
pub struct Saver {
    dir: PathBuf,
    /// `None` when read-only ([`Saver::read_only`]): saving does nothing.
    tx: Option<mpsc::UnboundedSender<(PathBuf, Vec<u8>)>>,
}

impl Saver {
    /// Creates `dir` when missing and starts the writer task (call inside the runtime).
    pub fn start(dir: &Path) -> Self {
        if let Err(error) = std::fs::create_dir_all(dir) {
            tracing::warn!(state_dir = %dir.display(), %error,
                "Could not create the state directory; snapshots will not be saved.");
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<(PathBuf, Vec<u8>)>();
        tokio::spawn(async move {
            // One write at a time, in arrival order: a later snapshot never loses to an earlier.
            while let Some((path, bytes)) = rx.recv().await {
                let target = path.clone();
                let written =
                    tokio::task::spawn_blocking(move || write_atomic(&target, &bytes)).await;
                match written {
                    Ok(Ok(())) => {
                        tracing::debug!(path = %path.display(), "Saved a source snapshot.")
                    }
                    Ok(Err(error)) => tracing::warn!(%error,
                        "Could not save a source snapshot; a restart during an outage would start from an older one."),
                    Err(error) => tracing::warn!(%error, "The snapshot writer stopped."),
                }
            }
        });
        Self {
            dir: dir.to_owned(),
            tx: Some(tx),
        }
    }

    /// Reads the snapshots in `dir` and never writes, nor creates `dir` (`once --dry-run`).
    pub fn read_only(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            tx: None,
        }
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The saved snapshot of a source, if there is one for this identity.
    pub fn load(
        &self,
        upstream: &UpstreamName,
        label: &str,
        identity: &str,
    ) -> Result<Option<SavedSnapshot>, SavedError> {
        let path = self.dir.join(file_name(upstream, label));
        match read_current(&path).map_err(SavedError::Read)? {
            None => Ok(None),
            Some(bytes) => decode(&path, &bytes, identity).map(Some),
        }
    }

    /// Queues a write of a source's snapshot; nothing when read-only.
    pub fn save(
        &self,
        upstream: &UpstreamName,
        label: &str,
        identity: &str,
        endpoints: &[Endpoint],
    ) {
        let Some(tx) = &self.tx else { return };
        let path = self.dir.join(file_name(upstream, label));
        let bytes = encode(upstream, label, identity, endpoints, SystemTime::now());
        if tx.send((path, bytes)).is_err() {
            tracing::warn!("The snapshot writer is gone; the snapshot was not saved.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name() -> UpstreamName {
        UpstreamName::new("kotaemon").unwrap()
    }

    fn endpoints() -> Vec<Endpoint> {
        let mut a = Endpoint::plain("10.0.0.1:7860".parse().unwrap(), "/services/k/a");
        a.attrs.weight = Some(3);
        a.attrs.fail_timeout = Some(10);
        a.attrs.backup = true;
        let mut b = Endpoint::plain("[::1]:7861".parse().unwrap(), "consul service ID b");
        b.registry = RegistryState::Critical("check c is critical".into());
        b.attrs.down = true;
        vec![a, b]
    }

    #[test]
    fn a_snapshot_survives_encoding_and_decoding() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let bytes = encode(&name(), "consul", "id", &endpoints(), at);
        let back = decode(Path::new("x.json"), &bytes, "id").unwrap();
        assert_eq!(back.endpoints, endpoints());
        assert_eq!(back.saved_at, Some(at));
    }

    #[test]
    fn a_file_of_another_source_identity_is_refused() {
        let bytes = encode(
            &name(),
            "etcd",
            "etcd a prefix=\"/x/\"",
            &endpoints(),
            SystemTime::now(),
        );
        let err = decode(Path::new("k.etcd.json"), &bytes, "etcd a prefix=\"/y/\"").unwrap_err();
        assert!(matches!(err, SavedError::OtherSource { .. }), "{err}");
    }

    #[test]
    fn a_tampered_file_cannot_carry_an_injection() {
        let bytes = encode(&name(), "consul", "id", &endpoints(), SystemTime::now());
        let text = String::from_utf8(bytes).unwrap();
        for (from, to) in [
            ("10.0.0.1:7860", "10.0.0.1:7860; include /etc/passwd"),
            ("10.0.0.1:7860", "10.0.0.1:7860\\n    server 6.6.6.6:80"),
            ("\"weight\": 3", "\"weight\": 0"),
            ("\"fail_timeout\": 10", "\"fail_timeout\": 999999999"),
            ("\"backup\": true", "\"backup\": true, \"zone\": 1"),
            ("\"version\": 1", "\"version\": 2"),
        ] {
            let bad = text.replacen(from, to, 1);
            assert_ne!(bad, text, "{from:?} not found");
            assert!(
                decode(Path::new("x.json"), bad.as_bytes(), "id").is_err(),
                "accepted {to:?}"
            );
        }
        assert!(decode(Path::new("x.json"), b"not json", "id").is_err());
    }

    #[test]
    fn file_names_keep_upstream_and_label_apart() {
        assert_eq!(file_name(&name(), "etcd#2"), "kotaemon.etcd-2.json");
        assert_eq!(file_name(&name(), "consul"), "kotaemon.consul.json");
    }

    #[tokio::test]
    async fn a_saved_snapshot_is_written_atomically_and_loaded_back() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let saver = Saver::start(&state);
        assert!(saver.load(&name(), "consul", "id").unwrap().is_none());
        saver.save(&name(), "consul", "id", &endpoints()[..1]);
        saver.save(&name(), "consul", "id", &endpoints());
        let path = state.join("kotaemon.consul.json");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(s)) = saver.load(&name(), "consul", "id") {
                if s.endpoints.len() == 2 {
                    break;
                }
            }
            assert!(std::time::Instant::now() < deadline, "never saved");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let names: Vec<_> = std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["kotaemon.consul.json"], "no temp file left");
        assert!(path.exists());
    }

    #[tokio::test]
    async fn a_read_only_saver_loads_what_a_run_saved_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let path = state.join("kotaemon.consul.json");
        std::fs::create_dir(&state).unwrap();
        std::fs::write(
            &path,
            encode(&name(), "consul", "id", &endpoints(), SystemTime::now()),
        )
        .unwrap();
        let before = std::fs::read(&path).unwrap();
        let saver = Saver::read_only(&state);
        let loaded = saver.load(&name(), "consul", "id").unwrap().unwrap();
        assert_eq!(loaded.endpoints.len(), 2);
        saver.save(&name(), "consul", "id", &endpoints()[..1]);
        saver.save(&name(), "other", "id", &endpoints()[..1]);
        tokio::task::yield_now().await;
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(std::fs::read_dir(&state).unwrap().count(), 1);
        let missing = dir.path().join("missing");
        Saver::read_only(&missing);
        assert!(!missing.exists());
    }
}
