//! Injection-proof rendering, as properties: no string a registry or a config file can hold —
//! through the etcd entry parser, the Consul answer parser, the static config parser or
//! `ServerAttrs::set` — adds a directive, a server, a brace or a line to the rendered file.
//!
//! Each property builds inputs from valid addresses spliced with nginx syntax (`;`, braces,
//! line breaks, quotes, `#`, `$`, look-alike Unicode), renders whatever survives parsing with
//! the built-in template under every balancing method, and checks the output against the
//! template's grammar (`tests/it/util/shape.rs`): every line one the template can produce,
//! every `server` line strict, braces balanced one deep, exactly one `server` line per
//! surviving endpoint and each of them naming one of those endpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv6Addr;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use serde_json::{json, Value as Json};
use upstreamd::config::{self, SourceConfig, UpstreamConfig};
use upstreamd::decide::{decide, merge};
use upstreamd::health::Health;
use upstreamd::model::{Address, Endpoint, ServerAttrs};
use upstreamd::render::Renderer;
use upstreamd::sources::consul::parse_answer;
use upstreamd::sources::etcd::parse_entry;

use crate::util::shape;

const CASES: u32 = 768;
const PREFIX: &str = "/services/kotaemon/";
const BALANCES: [&str; 6] = [
    "round_robin",
    "least_conn",
    "ip_hash",
    "hash",
    "random",
    "sticky",
];

/// nginx syntax and look-alikes a hostile registry entry would try.
fn hostile() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(";".to_owned()),
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just("\n".to_owned()),
        Just("\r\n".to_owned()),
        Just(" ".to_owned()),
        Just("\t".to_owned()),
        Just("#".to_owned()),
        Just("\"".to_owned()),
        Just("'".to_owned()),
        Just("\\".to_owned()),
        Just("$".to_owned()),
        Just("\0".to_owned()),
        Just(" down".to_owned()),
        Just(" weight=100".to_owned()),
        Just(";\nserver 6.6.6.6:80".to_owned()),
        Just("; include /etc/passwd".to_owned()),
        Just("}\nserver { listen 80; }\n".to_owned()),
        Just("\u{2028}".to_owned()),
        Just("\u{85}".to_owned()),
        Just("\u{17f}".to_owned()),  // ſ, upper-cases to S
        Just("\u{212a}".to_owned()), // Kelvin sign, lower-cases to k
        Just("\u{ff1b}".to_owned()), // fullwidth semicolon
        Just("%0a".to_owned()),
        "\\PC{0,6}",
        ".{0,6}",
    ]
}

fn address_like() -> impl Strategy<Value = String> {
    prop_oneof![
        (any::<[u8; 4]>(), 1u16..)
            .prop_map(|(ip, p)| format!("{}.{}.{}.{}:{p}", ip[0], ip[1], ip[2], ip[3])),
        (any::<[u16; 8]>(), 1u16..).prop_map(|(s, p)| format!("[{}]:{p}", Ipv6Addr::from(s))),
        (
            "[a-zA-Z]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?(\\.[a-z0-9]{1,6}){0,2}",
            1u16..
        )
            .prop_map(|(h, p)| format!("{h}:{p}")),
    ]
}

/// Splices `h` into `s` at a char boundary chosen by `at`.
fn splice(s: &str, at: Index, h: &str) -> String {
    let bounds: Vec<usize> = s.char_indices().map(|(i, _)| i).chain([s.len()]).collect();
    let i = bounds[at.index(bounds.len())];
    format!("{}{h}{}", &s[..i], &s[i..])
}

/// Mostly addresses, often with nginx syntax around or inside them, sometimes anything.
fn candidate() -> impl Strategy<Value = String> {
    prop_oneof![
        5 => address_like(),
        2 => (hostile(), address_like()).prop_map(|(h, a)| h + &a),
        2 => (address_like(), hostile()).prop_map(|(a, h)| a + &h),
        3 => (address_like(), any::<Index>(), hostile()).prop_map(|(a, i, h)| splice(&a, i, &h)),
        1 => any::<String>(),
    ]
}

/// A host without a port, as Consul's `Address` fields carry it.
fn host_like() -> impl Strategy<Value = String> {
    candidate().prop_map(|a| match a.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => {
            h.trim_start_matches('[').trim_end_matches(']').to_owned()
        }
        _ => a,
    })
}

/// Attribute values as JSON: good numbers, numbers with syntax attached, anything.
fn attr_value() -> impl Strategy<Value = Json> {
    let number = "[0-9]{1,4}";
    prop_oneof![
        8 => (0i64..1000).prop_map(Json::from),
        1 => (0i64..2000).prop_map(Json::from),
        1 => any::<i64>().prop_map(Json::from),
        1 => any::<f64>().prop_map(Json::from),
        1 => any::<bool>().prop_map(Json::from),
        1 => Just(Json::Null),
        1 => number.prop_map(Json::from),
        1 => (number, hostile()).prop_map(|(n, h)| Json::from(n + &h)),
        1 => (hostile(), number).prop_map(|(h, n)| Json::from(h + &n)),
        1 => "[0-9]{1,3}(s|ms|m|h|d|us)".prop_map(Json::from),
        1 => ("[0-9]{1,3}(s|m)", hostile()).prop_map(|(d, h)| Json::from(d + &h)),
        1 => prop_oneof![Just("true"), Just("false"), Just("0"), Just("1")].prop_map(Json::from),
        1 => any::<String>().prop_map(Json::from),
        1 => Just(json!([1, 2])),
        1 => Just(json!({"a": 1})),
    ]
}

fn attr_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["weight", "max_fails", "fail_timeout", "backup", "down"])
            .prop_map(str::to_owned),
        1 => prop_oneof![Just("zone".to_owned()), Just("resolve".to_owned()), any::<String>()],
    ]
}

fn attrs() -> impl Strategy<Value = Vec<(String, Json)>> {
    prop::collection::vec((attr_name(), attr_value()), 0..4)
}

/// An upstream config with `balance`, from the real loader (so its defaults are the real ones).
fn upstream(balance: &str, policy: &str) -> UpstreamConfig {
    let text = format!(
        "[nginx]\noutput = \"/tmp/x.conf\"\n[[upstream]]\nname = \"kotaemon\"\nbalance = \"{balance}\"\n\
         hash_key = \"$cookie_session\"\naffinity_cookie = \"kh_affinity\"\non_all_unhealthy = \"{policy}\"\n\
         [[upstream.source]]\nkind = \"static\"\nservers = [\"127.0.0.1:1\"]\n"
    );
    config::parse(&text, &|_| None).unwrap().upstreams.remove(0)
}

/// Some health for an address: varied per address and seed, so every verdict gets rendered.
fn health(seed: u8, a: &Address) -> Health {
    let h = a
        .to_string()
        .bytes()
        .fold(u32::from(seed), |h, b| h.wrapping_mul(31) ^ u32::from(b));
    [Health::Up, Health::Down, Health::Unknown][(h % 3) as usize]
}

/// Renders `upstreams` (config, the endpoints of each source) and checks the file's shape,
/// and that its server lines name exactly the surviving endpoints. Returns how many servers.
fn render_and_check(upstreams: &[(UpstreamConfig, Vec<Vec<Endpoint>>)], seed: u8) -> usize {
    let mut pairs = Vec::new();
    let mut expected = BTreeSet::new();
    let (mut servers, mut groups) = (0, 0);
    for (cfg, snapshots) in upstreams {
        let merged: BTreeMap<Address, Endpoint> = merge(snapshots.iter().map(Vec::as_slice));
        let d = decide(cfg, &merged, |a| health(seed, a));
        // A sticky upstream adds one group, with one server, a replica rendered up.
        groups += d.routes.len();
        servers += merged.len().max(1) + d.routes.len();
        expected.extend(merged.keys().map(ToString::to_string));
        pairs.push((d, cfg.on_all_unhealthy));
    }
    let text = Renderer::new(None).unwrap().render(&pairs).unwrap();
    let want = shape::Expected {
        upstreams: upstreams.len() + groups,
        servers,
    };
    shape::assert_renders(&text, want, &expected);
    expected.len()
}

fn balance_and_policy() -> impl Strategy<Value = (usize, bool, u8)> {
    (0..BALANCES.len(), any::<bool>(), any::<u8>())
}

fn policy(fail_closed: bool) -> &'static str {
    if fail_closed {
        "fail_closed"
    } else {
        "fail_open"
    }
}

/// Runs `strategy` through `test` for `CASES` cases; `test` returns how many endpoints
/// survived parsing, and the property must have rendered some (else it proved nothing).
fn run<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> usize)
where
    S::Value: std::fmt::Debug,
{
    let survived = AtomicUsize::new(0);
    let mut runner = TestRunner::new(RunnerConfig {
        cases: CASES,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    runner
        .run(&strategy, |input| {
            survived.fetch_add(test(input), Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
    let survived = survived.into_inner();
    eprintln!("figure: {name}: {CASES} cases, {survived} endpoints rendered");
    assert!(
        survived >= CASES as usize / 4,
        "{name}: too few inputs survived parsing ({survived}) for the property to mean much"
    );
}

#[derive(Debug, Clone)]
enum EtcdValue {
    Plain(String),
    Object(Option<Json>, Vec<(String, Json)>),
    Upsync(Vec<(String, Json)>),
    Bytes(Vec<u8>),
}

fn etcd_entry() -> impl Strategy<Value = (String, EtcdValue)> {
    let key = prop_oneof![
        2 => candidate(),
        1 => "[a-z0-9-]{1,8}".prop_map(String::from),
    ];
    let value = prop_oneof![
        3 => candidate().prop_map(EtcdValue::Plain),
        3 => (
            prop_oneof![
                4 => candidate().prop_map(|a| Some(Json::from(a))),
                1 => attr_value().prop_map(Some),
                1 => Just(None),
            ],
            attrs()
        )
            .prop_map(|(a, at)| EtcdValue::Object(a, at)),
        2 => attrs().prop_map(EtcdValue::Upsync),
        1 => prop::collection::vec(any::<u8>(), 0..32).prop_map(EtcdValue::Bytes),
    ];
    (key, value)
}

fn etcd_bytes(v: &EtcdValue) -> Vec<u8> {
    let object = |address: Option<&Json>, attrs: &[(String, Json)]| {
        let mut m = serde_json::Map::new();
        if let Some(a) = address {
            m.insert("address".into(), a.clone());
        }
        for (k, v) in attrs {
            m.insert(k.clone(), v.clone());
        }
        Json::Object(m).to_string().into_bytes()
    };
    match v {
        EtcdValue::Plain(s) => s.clone().into_bytes(),
        EtcdValue::Object(a, attrs) => object(a.as_ref(), attrs),
        EtcdValue::Upsync(attrs) if attrs.is_empty() => Vec::new(),
        EtcdValue::Upsync(attrs) => object(None, attrs),
        EtcdValue::Bytes(b) => b.clone(),
    }
}

#[test]
fn no_etcd_value_or_key_can_shape_the_file() {
    let strategy = (
        prop::collection::vec(etcd_entry(), 0..8),
        balance_and_policy(),
    );
    run(
        "etcd parse_entry",
        strategy,
        |(entries, (b, closed, seed))| {
            let endpoints: Vec<Endpoint> = entries
                .iter()
                .filter_map(|(key, v)| {
                    parse_entry(&format!("{PREFIX}{key}"), PREFIX, &etcd_bytes(v)).ok()
                })
                .collect();
            render_and_check(
                &[(upstream(BALANCES[b], policy(closed)), vec![endpoints])],
                seed,
            )
        },
    );
}

fn consul_entry() -> impl Strategy<Value = Json> {
    let port = prop_oneof![
        8 => (1i64..65536).prop_map(Json::from),
        1 => any::<i64>().prop_map(Json::from),
        1 => Just(Json::Null),
    ];
    let status = prop::sample::select(vec!["passing", "warning", "critical", "maintenance", ""]);
    let meta = prop::collection::btree_map(attr_name(), attr_value(), 0..4);
    (
        host_like(),
        prop_oneof![Just(String::new()), host_like()],
        port,
        meta,
        status,
        any::<String>(),
    )
        .prop_map(|(node_addr, svc_addr, port, meta, status, id)| {
            json!({
                "Node": {"Node": "n1", "Address": node_addr},
                "Service": {"ID": id, "Service": "kotaemon", "Tags": [], "Address": svc_addr,
                            "Port": port, "Meta": meta},
                "Checks": [{"CheckID": "serfHealth", "Name": "Serf", "Status": status,
                            "Output": "}; server 6.6.6.6:80;", "Notes": ""}],
            })
        })
}

#[test]
fn no_consul_answer_can_shape_the_file() {
    let strategy = (
        prop::collection::vec(consul_entry(), 0..8),
        balance_and_policy(),
    );
    run(
        "consul parse_answer",
        strategy,
        |(entries, (b, closed, seed))| {
            let body = Json::Array(entries).to_string();
            let (endpoints, _skipped) = parse_answer(body.as_bytes(), &[]).unwrap();
            render_and_check(
                &[(upstream(BALANCES[b], policy(closed)), vec![endpoints])],
                seed,
            )
        },
    );
}

#[derive(Debug, Clone)]
enum StaticServer {
    Plain(String),
    Table(String, Vec<(String, toml::Value)>),
}

fn toml_value(j: &Json) -> Option<toml::Value> {
    Some(match j {
        Json::Null => return None,
        Json::Bool(b) => toml::Value::Boolean(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64()?),
        },
        Json::String(s) => toml::Value::String(s.clone()),
        Json::Array(a) => toml::Value::Array(a.iter().filter_map(toml_value).collect()),
        Json::Object(o) => toml::Value::Table(
            o.iter()
                .filter_map(|(k, v)| Some((k.clone(), toml_value(v)?)))
                .collect(),
        ),
    })
}

fn config_word() -> impl Strategy<Value = String> {
    prop_oneof![
        24 => "[A-Za-z0-9_]{1,12}",
        2 => ("[A-Za-z0-9_]{1,6}", hostile(), "[A-Za-z0-9_]{0,6}").prop_map(|(a, h, b)| a + &h + &b),
        1 => any::<String>(),
    ]
}

fn hash_key() -> impl Strategy<Value = String> {
    prop_oneof![
        24 => "\\$[a-z_]{1,12}",
        2 => ("\\$[a-z_]{1,6}", hostile()).prop_map(|(a, h)| a + &h),
        1 => any::<String>(),
    ]
}

fn static_upstream() -> impl Strategy<Value = toml::Table> {
    // Every field must be valid for the file to load: hostile values are rarer here.
    let address = prop_oneof![8 => address_like(), 1 => candidate()];
    let server = prop_oneof![
        2 => address.clone().prop_map(StaticServer::Plain),
        1 => (address, prop::collection::vec((attr_name(), attr_value()), 0..2).prop_map(|a| a
            .into_iter()
            .filter_map(|(k, v)| Some((k, toml_value(&v)?)))
            .collect()))
            .prop_map(|(a, at)| StaticServer::Table(a, at)),
    ];
    (
        config_word(),
        0..BALANCES.len(),
        hash_key(),
        config_word(),
        prop_oneof![16 => 0i64..100, 1 => any::<i64>()],
        prop::collection::vec(server, 1..4),
    )
        .prop_map(|(name, b, key, cookie, keepalive, servers)| {
            let servers: Vec<toml::Value> = servers
                .into_iter()
                .map(|s| match s {
                    StaticServer::Plain(a) => toml::Value::String(a),
                    StaticServer::Table(a, attrs) => {
                        let mut t = toml::Table::new();
                        t.insert("address".into(), toml::Value::String(a));
                        t.extend(attrs);
                        toml::Value::Table(t)
                    }
                })
                .collect();
            let mut source = toml::Table::new();
            source.insert("kind".into(), "static".into());
            source.insert("servers".into(), toml::Value::Array(servers));
            let mut u = toml::Table::new();
            u.insert("name".into(), name.into());
            u.insert("balance".into(), BALANCES[b].into());
            u.insert("hash_key".into(), key.into());
            u.insert("affinity_cookie".into(), cookie.into());
            u.insert("keepalive".into(), keepalive.into());
            u.insert(
                "source".into(),
                toml::Value::Array(vec![toml::Value::Table(source)]),
            );
            u
        })
}

#[test]
fn no_static_config_value_can_shape_the_file() {
    let strategy = (prop::collection::vec(static_upstream(), 1..3), any::<u8>());
    run("static config parse", strategy, |(upstreams, seed)| {
        let mut nginx = toml::Table::new();
        nginx.insert("output".into(), "/tmp/x.conf".into());
        let mut root = toml::Table::new();
        root.insert("nginx".into(), toml::Value::Table(nginx));
        root.insert(
            "upstream".into(),
            toml::Value::Array(upstreams.into_iter().map(toml::Value::Table).collect()),
        );
        let text = toml::to_string(&root).unwrap();
        let Ok(cfg) = config::parse(&text, &|_| None) else {
            return 0;
        };
        let upstreams: Vec<(UpstreamConfig, Vec<Vec<Endpoint>>)> = cfg
            .upstreams
            .into_iter()
            .map(|u| {
                let snapshots = u
                    .sources
                    .iter()
                    .map(|s| match s {
                        SourceConfig::Static(s) => s.servers.clone(),
                        other => panic!("only static sources were written: {other:?}"),
                    })
                    .collect();
                (u, snapshots)
            })
            .collect();
        render_and_check(&upstreams, seed)
    });
}

#[test]
fn no_attribute_set_can_shape_the_file() {
    let strategy = (
        prop::collection::vec((address_like(), attrs()), 1..6),
        balance_and_policy(),
    );
    run(
        "ServerAttrs::set",
        strategy,
        |(servers, (b, closed, seed))| {
            let endpoints: Vec<Endpoint> = servers
                .iter()
                .map(|(a, attrs)| {
                    let mut set = ServerAttrs::default();
                    for (k, v) in attrs {
                        // A refused attribute leaves the others as they were: render what is left.
                        let _ = set.set(k, v);
                    }
                    Endpoint {
                        attrs: set,
                        ..Endpoint::plain(a.parse().unwrap(), "prop")
                    }
                })
                .collect();
            render_and_check(
                &[(upstream(BALANCES[b], policy(closed)), vec![endpoints])],
                seed,
            )
        },
    );
}

#[test]
fn the_shape_check_catches_what_it_is_for() {
    // The checker is the oracle of every property above: show it refuses injected lines.
    let good = "# Managed by upstreamd: changes here are overwritten. Source of truth: the registry.\n\
                \nupstream k {\n    zone k 65k;\n    server 10.0.0.1:80 weight=3;\n    keepalive 32;\n}\n";
    let one = shape::Expected {
        upstreams: 1,
        servers: 1,
    };
    shape::check(good, one).unwrap();
    for (from, to) in [
        ("10.0.0.1:80 weight=3;", "10.0.0.1:80; include /etc/passwd;"),
        (
            "10.0.0.1:80 weight=3;",
            "10.0.0.1:80;\n    server 6.6.6.6:80;",
        ),
        ("10.0.0.1:80 weight=3;", "10.0.0.1:80 weight=3;}"),
        ("10.0.0.1:80 weight=3;", "10.0.0.1:80 weight=3 down backup;"),
        ("10.0.0.1:80", "Evil.example:80"),
        (
            "    keepalive 32;\n",
            "    keepalive 32;\n    resolver 6.6.6.6;\n",
        ),
        ("}\n", "}\nupstream x {\n    server 10.0.0.2:80;\n}\n"),
        ("zone k 65k;", "zone k 65k; # }"),
    ] {
        let bad = good.replace(from, to);
        assert!(
            shape::check(&bad, one).is_err(),
            "accepted an injected file:\n{bad}"
        );
    }

    // Affinity routing: an id routes only to its own group, and only to a group that exists.
    let id = "0123456789abcdef";
    let sticky = format!(
        "map $cookie_c $k_affinity_route {{\n    default k;\n    {id} k__{id};\n}}\n\
         map $k_affinity_last $k_affinity_served {{\n    default \"\";\n    \"10.0.0.1:80\" {id};\n}}\n\
         upstream k {{\n    server 10.0.0.1:80;\n}}\nupstream k__{id} {{\n    server 10.0.0.1:80;\n}}\n"
    );
    let two = shape::Expected {
        upstreams: 2,
        servers: 2,
    };
    shape::check(&sticky, two).unwrap();
    for (from, to) in [
        (
            format!("    {id} k__{id};"),
            format!("    {id} k__fedcba9876543210;"),
        ),
        (
            format!("{id} k__{id};"),
            format!("{id} k__{id}; return 200;"),
        ),
        (
            format!("{id} k__{id};"),
            format!("{id} k__{id}\n    \"\" k;"),
        ),
        (format!("{id} k__{id};"), format!("{id} 6.6.6.6:80;")),
        (
            format!("\"10.0.0.1:80\" {id};"),
            format!("\"10.0.0.1:80\" {id} x;"),
        ),
    ] {
        let bad = sticky.replace(&from, &to);
        assert!(
            shape::check(&bad, two).is_err(),
            "accepted an injected routing map:\n{bad}"
        );
    }
    let dangling = sticky.replace(
        &format!("upstream k__{id} {{\n    server 10.0.0.1:80;\n}}\n"),
        "",
    );
    assert!(
        shape::check(&dangling, one).is_err(),
        "a route to no group:\n{dangling}"
    );
}
