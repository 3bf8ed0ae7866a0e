//! One etcd key/value under the prefix, parsed into an endpoint or refused.
//!
//! Three layouts are accepted (see `docs/etcd.md`):
//!
//! 1. a plain `host:port` value;
//! 2. a JSON object with `address` and optional server attributes;
//! 3. the nginx-upsync layout: the key's last path segment is `host:port` and the value is a
//!    JSON object of attributes (or empty, for nginx defaults).
//!
//! Every address goes through [`Address`]'s parser and every attribute through
//! [`ServerAttrs::set`], so nothing from the registry reaches the rendered file unparsed.

use crate::model::{Address, Endpoint, RegistryState, ServerAttrs, ValueError};

/// The JSON fields that are server attributes; other fields are ignored.
const ATTRIBUTES: [&str; 5] = ["weight", "max_fails", "fail_timeout", "backup", "down"];

/// Why an etcd entry was skipped. Values are quoted with `{:?}`, so a hostile value cannot
/// forge log lines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// The key is not UTF-8.
    #[error("the key is not UTF-8")]
    KeyNotUtf8,
    /// The value is not UTF-8.
    #[error("the value is not UTF-8")]
    ValueNotUtf8,
    /// A plain value that is not `host:port`.
    #[error("the value is not host:port: {0}")]
    Address(ValueError),
    /// A JSON value that does not parse.
    #[error("the value looks like JSON but does not parse: {0}")]
    Json(String),
    /// A JSON value that is not an object.
    #[error("the JSON value must be an object")]
    NotAnObject,
    /// `"address"` is present but not a string.
    #[error("\"address\" must be a string \"host:port\", found {0}")]
    AddressNotString(String),
    /// No `"address"` field, and the key's last segment is not `host:port` either.
    #[error("the value has no \"address\" and the key's last segment {segment:?} is not host:port: {error}")]
    KeyAddress {
        /// The key's last path segment.
        segment: String,
        /// Why it is not an address.
        error: ValueError,
    },
    /// A server attribute with a bad type or value.
    #[error("{0}")]
    Attribute(ValueError),
}

/// Parses the entry at `key` (which lies under `prefix`) with `value` into an endpoint.
///
/// Surrounding ASCII whitespace of the value is ignored (a value written from a file often
/// ends in a newline); whitespace inside it is not. A value starting with `{` is JSON; an
/// empty value means the upsync layout with no attributes. The endpoint's `origin` is the
/// key, with control characters and quotes escaped.
pub fn parse_entry(key: &str, prefix: &str, value: &[u8]) -> Result<Endpoint, EntryError> {
    let text = std::str::from_utf8(value).map_err(|_| EntryError::ValueNotUtf8)?;
    let text = text.trim_matches(|c: char| c.is_ascii_whitespace());
    let (address, attrs) = if text.is_empty() {
        (key_address(key, prefix)?, ServerAttrs::default())
    } else if text.starts_with('{') {
        parse_json(key, prefix, text)?
    } else {
        let address = text.parse::<Address>().map_err(EntryError::Address)?;
        (address, ServerAttrs::default())
    };
    Ok(Endpoint {
        address,
        attrs,
        registry: RegistryState::Passing,
        origin: key.escape_debug().to_string(),
    })
}

fn parse_json(key: &str, prefix: &str, text: &str) -> Result<(Address, ServerAttrs), EntryError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| EntryError::Json(e.to_string()))?;
    let serde_json::Value::Object(fields) = value else {
        return Err(EntryError::NotAnObject);
    };
    let address = match fields.get("address") {
        Some(serde_json::Value::String(s)) => s.parse::<Address>().map_err(EntryError::Address)?,
        Some(other) => return Err(EntryError::AddressNotString(other.to_string())),
        None => key_address(key, prefix)?,
    };
    let mut attrs = ServerAttrs::default();
    for name in ATTRIBUTES {
        match fields.get(name) {
            // An explicit null reads as "not given": nginx's default applies.
            None | Some(serde_json::Value::Null) => {}
            Some(v) => attrs.set(name, v).map_err(EntryError::Attribute)?,
        }
    }
    Ok((address, attrs))
}

/// The address in the key's last path segment below the prefix (the upsync layout).
fn key_address(key: &str, prefix: &str) -> Result<Address, EntryError> {
    let below = key.strip_prefix(prefix).unwrap_or(key);
    let segment = below.rsplit('/').next().unwrap_or(below);
    segment
        .parse::<Address>()
        .map_err(|error| EntryError::KeyAddress {
            segment: segment.to_owned(),
            error,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: &str = "/services/kotaemon/";

    fn ok(key: &str, value: &str) -> Endpoint {
        parse_entry(key, P, value.as_bytes()).unwrap_or_else(|e| panic!("{value:?}: {e}"))
    }

    fn err(key: &str, value: &[u8]) -> EntryError {
        match parse_entry(key, P, value) {
            Ok(ep) => panic!("{value:?} under {key:?} should be refused, got {ep:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_plain_value_is_an_address_without_attributes() {
        let ep = ok("/services/kotaemon/a", "10.0.0.1:7860");
        assert_eq!(ep.address.to_string(), "10.0.0.1:7860");
        assert_eq!(ep.attrs, ServerAttrs::default());
        assert_eq!(ep.registry, RegistryState::Passing);
        assert_eq!(ep.origin, "/services/kotaemon/a");
    }

    #[test]
    fn a_trailing_newline_from_a_file_is_ignored() {
        assert_eq!(
            ok("/services/kotaemon/a", "kotaemon-1.internal:7860\n")
                .address
                .to_string(),
            "kotaemon-1.internal:7860"
        );
        assert_eq!(
            ok("/services/kotaemon/a", " [::1]:80 ").address.to_string(),
            "[::1]:80"
        );
    }

    #[test]
    fn a_json_value_carries_address_and_attributes() {
        let ep = ok(
            "/services/kotaemon/i-1",
            r#"{"address": "10.0.0.2:7860", "weight": 3, "backup": false, "max_fails": 2, "fail_timeout": "10s", "down": false}"#,
        );
        assert_eq!(ep.address.to_string(), "10.0.0.2:7860");
        let want = ServerAttrs {
            weight: Some(3),
            max_fails: Some(2),
            fail_timeout: Some(10),
            backup: false,
            down: false,
        };
        assert_eq!(ep.attrs, want);
    }

    #[test]
    fn a_json_address_wins_over_the_key() {
        let ep = ok(
            "/services/kotaemon/10.9.9.9:1",
            r#"{"address":"10.0.0.2:7860"}"#,
        );
        assert_eq!(ep.address.to_string(), "10.0.0.2:7860");
    }

    #[test]
    fn unknown_json_fields_are_ignored_and_null_means_not_given() {
        let ep = ok(
            "/services/kotaemon/i-1",
            r#"{"address":"10.0.0.2:7860","zone":"eu-1","meta":{"v":[1,2]},"weight":null,"backup":true}"#,
        );
        assert_eq!(
            ep.attrs,
            ServerAttrs {
                backup: true,
                ..ServerAttrs::default()
            }
        );
    }

    #[test]
    fn the_upsync_layout_takes_the_address_from_the_key() {
        let ep = ok(
            "/services/kotaemon/10.0.0.3:7860",
            r#"{"weight":1, "max_fails":2, "fail_timeout":10, "down":0}"#,
        );
        assert_eq!(ep.address.to_string(), "10.0.0.3:7860");
        let want = ServerAttrs {
            weight: Some(1),
            max_fails: Some(2),
            fail_timeout: Some(10),
            backup: false,
            down: false,
        };
        assert_eq!(ep.attrs, want);
        let down = ok(
            "/services/kotaemon/10.0.0.3:7860",
            r#"{"down":1,"backup":1}"#,
        );
        assert!(down.attrs.down && down.attrs.backup);
    }

    #[test]
    fn an_empty_upsync_value_means_nginx_defaults() {
        let ep = ok("/services/kotaemon/[fe80::1]:7860", "");
        assert_eq!(ep.address.to_string(), "[fe80::1]:7860");
        assert_eq!(ep.attrs, ServerAttrs::default());
    }

    #[test]
    fn the_upsync_address_is_the_last_segment_below_the_prefix() {
        let ep = parse_entry(
            "/upstreams/kotaemon/10.0.0.4:80",
            "/upstreams/kotaemon",
            b"{}",
        )
        .unwrap();
        assert_eq!(ep.address.to_string(), "10.0.0.4:80");
        let ep = ok("/services/kotaemon/zone-a/10.0.0.5:80", "");
        assert_eq!(ep.address.to_string(), "10.0.0.5:80");
        assert!(matches!(
            err("/services/kotaemon/", b""),
            EntryError::KeyAddress { .. }
        ));
    }

    #[test]
    fn hostile_plain_values_are_refused() {
        for v in [
            "10.0.0.1:80 down",
            "10.0.0.1:80;\ninclude /etc/passwd",
            "10.0.0.1:80;",
            "10.0.0.1:80 # x",
            "\"10.0.0.1:80\"",
            "10.0.0.1:80\n10.0.0.2:80",
            "10.0.0.1:80}",
            "unix:/var/run/x.sock",
        ] {
            assert!(
                matches!(
                    err("/services/kotaemon/a", v.as_bytes()),
                    EntryError::Address(_)
                ),
                "{v:?}"
            );
        }
    }

    #[test]
    fn a_hostile_attribute_refuses_the_whole_entry() {
        let e = err(
            "/services/kotaemon/a",
            br#"{"address":"10.0.0.1:80","weight":"1; include x"}"#,
        );
        assert!(
            matches!(
                e,
                EntryError::Attribute(ValueError::OutOfRange {
                    field: "weight",
                    ..
                })
            ),
            "{e}"
        );
        for v in [
            r#"{"address":"10.0.0.1:80","down":"yes"}"#,
            r#"{"address":"10.0.0.1:80","fail_timeout":"10s; down"}"#,
            r#"{"address":"10.0.0.1:80","max_fails":-1}"#,
            r#"{"address":"10.0.0.1:80","weight":1.5}"#,
            r#"{"address":"10.0.0.1:80","backup":[true]}"#,
        ] {
            assert!(
                matches!(
                    err("/services/kotaemon/a", v.as_bytes()),
                    EntryError::Attribute(_)
                ),
                "{v:?}"
            );
        }
    }

    #[test]
    fn a_hostile_key_segment_is_refused() {
        let e = err(
            "/services/kotaemon/10.0.0.1:80 max_fails=0",
            br#"{"weight":1}"#,
        );
        assert!(matches!(e, EntryError::KeyAddress { .. }), "{e}");
        assert!(matches!(
            err("/services/kotaemon/10.0.0.1:80;", b""),
            EntryError::KeyAddress { .. }
        ));
    }

    #[test]
    fn bad_json_shapes_are_refused() {
        assert!(matches!(
            err("/services/kotaemon/a", br#"{"address":"10.0.0.1:80""#),
            EntryError::Json(_)
        ));
        assert!(matches!(
            err("/services/kotaemon/a", br#"{"address":80}"#),
            EntryError::AddressNotString(_)
        ));
        assert!(matches!(
            err("/services/kotaemon/a", br#"{"address":"10.0.0.1:80 down"}"#),
            EntryError::Address(_)
        ));
        assert!(matches!(
            err("/services/kotaemon/a", br#"["10.0.0.1:80"]"#),
            EntryError::Address(_)
        ));
        assert!(matches!(
            err("/services/kotaemon/a", br#"{"weight":2}"#),
            EntryError::KeyAddress { .. }
        ));
    }

    #[test]
    fn a_non_utf8_value_is_refused() {
        assert_eq!(
            err("/services/kotaemon/a", b"10.0.0.1:80\xff"),
            EntryError::ValueNotUtf8
        );
        assert_eq!(
            err("/services/kotaemon/a", b"\xc3\x28"),
            EntryError::ValueNotUtf8
        );
    }

    #[test]
    fn the_origin_cannot_carry_a_newline() {
        let ep = ok("/services/kotaemon/a\n#b\"", "10.0.0.1:80");
        assert!(
            !ep.origin.contains('\n') && !ep.origin.contains("#b\""),
            "{:?}",
            ep.origin
        );
    }

    /// Everything of an endpoint that a template can put into the file, as separate tokens.
    fn rendered_tokens(ep: &Endpoint) -> Vec<String> {
        let a = &ep.attrs;
        let mut t = vec![ep.address.to_string()];
        t.extend(a.weight.map(|w| format!("weight={w}")));
        t.extend(a.max_fails.map(|n| format!("max_fails={n}")));
        t.extend(a.fail_timeout.map(|s| format!("fail_timeout={s}s")));
        t.extend(a.backup.then(|| "backup".to_owned()));
        t.extend(a.down.then(|| "down".to_owned()));
        t
    }

    /// Text built from address-like pieces and every character nginx gives meaning to.
    fn hostile_text() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("10.0.0.1".to_owned()),
            Just(":80".to_owned()),
            Just("[::1]".to_owned()),
            Just("host.example".to_owned()),
            Just("1s".to_owned()),
            "[ ;{}#\"'\n\r\t\\\\$]",
            "[0-9]{1,6}",
            "\\PC{0,4}",
            any::<char>().prop_map(String::from),
        ];
        prop::collection::vec(piece, 0..8).prop_map(|v| v.concat())
    }

    /// A valid address, alone or with hostile text before or after it.
    fn near_address() -> impl Strategy<Value = String> {
        let valid = prop_oneof![
            Just("10.0.0.1:80".to_owned()),
            Just("[::1]:8080".to_owned()),
            Just("kotaemon-1.internal:7860".to_owned()),
        ];
        prop_oneof![
            3 => valid.clone(),
            2 => (valid.clone(), hostile_text()).prop_map(|(a, h)| a + &h),
            1 => (hostile_text(), valid).prop_map(|(h, a)| h + &a),
        ]
    }

    /// Attribute values: mostly plausible, some with hostile text attached.
    fn attribute_value() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            3 => (1u64..6).prop_map(serde_json::Value::from),
            1 => Just(serde_json::Value::from("10s")),
            1 => any::<bool>().prop_map(serde_json::Value::Bool),
            1 => (0u64..6, hostile_text()).prop_map(|(n, h)| serde_json::Value::from(format!("{n}{h}"))),
            1 => hostile_text().prop_map(serde_json::Value::String),
            1 => any::<i64>().prop_map(serde_json::Value::from),
            1 => any::<f64>().prop_map(serde_json::Value::from),
            1 => Just(serde_json::Value::Null),
        ]
    }

    fn hostile_json() -> impl Strategy<Value = String> {
        let field = prop_oneof![
            Just("weight".to_owned()),
            Just("max_fails".to_owned()),
            Just("fail_timeout".to_owned()),
            Just("backup".to_owned()),
            Just("down".to_owned()),
            hostile_text(),
        ];
        let address = prop::option::of(prop_oneof![
            4 => near_address().prop_map(serde_json::Value::String),
            1 => attribute_value(),
        ]);
        (
            address,
            prop::collection::btree_map(field, attribute_value(), 0..4),
        )
            .prop_map(|(a, m)| {
                let mut obj: serde_json::Map<String, serde_json::Value> = m.into_iter().collect();
                if let Some(a) = a {
                    obj.insert("address".into(), a);
                }
                serde_json::Value::Object(obj).to_string()
            })
    }

    fn hostile_value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            2 => near_address().prop_map(String::into_bytes),
            3 => hostile_json().prop_map(String::into_bytes),
            1 => Just(Vec::new()),
            1 => hostile_text().prop_map(String::into_bytes),
            1 => prop::collection::vec(any::<u8>(), 0..48),
        ]
    }

    fn hostile_segment() -> impl Strategy<Value = String> {
        prop_oneof![near_address(), hostile_text()]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn no_hostile_entry_renders_a_character_nginx_would_read(
            segment in hostile_segment(),
            value in hostile_value(),
        ) {
            let key = format!("{P}{segment}");
            if let Ok(ep) = parse_entry(&key, P, &value) {
                for token in rendered_tokens(&ep) {
                    prop_assert!(
                        !token.contains(|c: char| c.is_whitespace() || ";{}#\"'\\$".contains(c)),
                        "{token:?} from key {key:?} value {:?}", String::from_utf8_lossy(&value)
                    );
                }
                prop_assert_eq!(ep.address.to_string().parse::<Address>(), Ok(ep.address.clone()));
                prop_assert!(!ep.origin.contains(['\n', '\r']));
            }
        }
    }
}
