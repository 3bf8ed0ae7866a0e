//! Affinity that names the replica: opaque, keyed ids of replica addresses (`balance = "sticky"`).
//!
//! An id is HMAC-SHA256 (ring) of the address under a key derived from the per-deployment
//! secret and the upstream name, truncated to 64 bits and printed as 16 lower-case hex digits.
//! So a cookie never shows a backend address, equal inputs give equal ids on every edge and
//! across restarts, and one replica's id does not depend on any other replica. Pure.

use std::fmt;

use ring::hmac;
use serde::Serialize;

use crate::decide::Desired;
use crate::model::{Address, UpstreamName};

/// The domain separator of the key derivation: a new scheme gets a new string.
const CONTEXT: &[u8] = b"upstreamd affinity id v1";

/// The key that turns addresses into affinity ids, for one upstream.
///
/// Derived from the secret (`affinity_secret_file`, or none) and the upstream's name, so two
/// upstreams never share ids. Never printed.
#[derive(Clone)]
pub struct AffinityKey {
    /// The derived key's bytes: what equality compares.
    bytes: [u8; 32],
    /// The same key, with its HMAC state computed once (an id is then one `sign`).
    hmac: hmac::Key,
}

impl PartialEq for AffinityKey {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for AffinityKey {}

impl AffinityKey {
    /// The key for `upstream` with `secret`; without a secret the ids are still stable but an
    /// observer who guesses the address range can reproduce them.
    pub fn new(upstream: &UpstreamName, secret: Option<&[u8]>) -> Self {
        let outer = hmac::Key::new(hmac::HMAC_SHA256, secret.unwrap_or_default());
        let mut ctx = hmac::Context::with_key(&outer);
        ctx.update(CONTEXT);
        ctx.update(&[0]);
        ctx.update(upstream.as_str().as_bytes());
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(ctx.sign().as_ref());
        Self {
            bytes,
            hmac: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
        }
    }

    /// The id of the replica at `address`.
    pub fn id(&self, address: &Address) -> AffinityId {
        let tag = hmac::sign(&self.hmac, address.to_string().as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&tag.as_ref()[..8]);
        AffinityId(u64::from_be_bytes(id))
    }
}

impl fmt::Debug for AffinityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AffinityKey(<redacted>)")
    }
}

/// A replica's affinity id: 64 bits, printed as 16 lower-case hex digits (cookie-safe,
/// map-key-safe, and a valid part of an upstream name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AffinityId(u64);

impl fmt::Display for AffinityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl Serialize for AffinityId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The separator between an upstream's name and an id in a per-replica group's name.
pub const GROUP_SEPARATOR: &str = "__";

/// Whether `name` has the shape of a per-replica group name of the upstream `of`
/// (`<of>__<16 hex digits>`): such a name would collide with a rendered group.
pub fn is_group_name(name: &str, of: &str) -> bool {
    name.strip_prefix(of)
        .and_then(|rest| rest.strip_prefix(GROUP_SEPARATOR))
        .is_some_and(|id| id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// One pinned replica: its id routes to a group holding only it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    /// The replica's id, as the cookie carries it.
    pub id: AffinityId,
    /// The replica's address, as `$upstream_addr` reports it for an IP address.
    pub address: Address,
}

/// The replicas of a sticky upstream that an id may route to: every server rendered up (a
/// `down` one is left out, so its id falls back to the consistent hash), sorted by address.
/// Should two addresses ever share an id (a 2⁻⁶⁴ chance a pair), the later one is left out
/// and reached through the hash only, so the rendered maps never hold a key twice.
pub fn routes(desired: &Desired, key: &AffinityKey) -> Vec<Route> {
    let mut seen = std::collections::BTreeSet::new();
    desired
        .servers
        .iter()
        .filter(|s| !s.down)
        .map(|s| Route {
            id: key.id(&s.address),
            address: s.address.clone(),
        })
        .filter(|r| seen.insert(r.id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, secret: Option<&[u8]>) -> AffinityKey {
        AffinityKey::new(&UpstreamName::new(name).unwrap(), secret)
    }

    fn addr(s: &str) -> Address {
        s.parse().unwrap()
    }

    #[test]
    fn an_id_is_sixteen_hex_digits_that_do_not_show_the_address() {
        let id = key("kotaemon", Some(b"s3cret-s3cret-s3cret")).id(&addr("10.0.0.11:7860"));
        let text = id.to_string();
        assert_eq!(text.len(), 16);
        assert!(text
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert!(!text.contains("7860") && !text.contains("0a00000b"));
    }

    #[test]
    fn ids_are_stable_and_depend_on_secret_upstream_and_address_only() {
        let a = addr("10.0.0.11:7860");
        let k = key("kotaemon", Some(b"one secret that is long"));
        assert_eq!(
            k.id(&a),
            key("kotaemon", Some(b"one secret that is long")).id(&a)
        );
        assert_ne!(
            k.id(&a),
            key("kotaemon", Some(b"another secret, as long")).id(&a)
        );
        assert_ne!(k.id(&a), key("kotaemon", None).id(&a));
        assert_ne!(
            k.id(&a),
            key("other", Some(b"one secret that is long")).id(&a)
        );
        assert_ne!(k.id(&a), k.id(&addr("10.0.0.11:7861")));
    }

    #[test]
    fn the_key_is_never_printed() {
        assert_eq!(
            format!("{:?}", key("k", Some(b"hunter2hunter2hunter2"))),
            "AffinityKey(<redacted>)"
        );
    }

    #[test]
    fn group_names_are_recognised_only_with_a_full_hex_id() {
        assert!(is_group_name("kotaemon__0123456789abcdef", "kotaemon"));
        assert!(!is_group_name("kotaemon__0123456789abcde", "kotaemon"));
        assert!(!is_group_name("kotaemon__0123456789abcdeg", "kotaemon"));
        assert!(!is_group_name("kotaemon_2", "kotaemon"));
        assert!(!is_group_name("other__0123456789abcdef", "kotaemon"));
    }
}
