//! Shared by the fuzz targets: render whatever survived parsing with the built-in template
//! and check the file against the template's grammar (`tests/it/util/shape.rs`, the oracle
//! of the property tests too). Any violation panics, which libFuzzer reports as a crash.

#[path = "../../tests/it/util/shape.rs"]
pub mod shape;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use upstreamd::config::{self, SourceConfig, UpstreamConfig};
use upstreamd::decide::{decide, merge};
use upstreamd::health::Health;
use upstreamd::model::{Address, Endpoint};
use upstreamd::render::Renderer;

/// Every balancing method, by config name.
pub const BALANCES: [&str; 6] = [
    "round_robin",
    "least_conn",
    "ip_hash",
    "hash",
    "random",
    "sticky",
];

fn renderer() -> &'static Renderer {
    static R: OnceLock<Renderer> = OnceLock::new();
    R.get_or_init(|| Renderer::new(None).expect("the built-in template compiles"))
}

/// An upstream named `kotaemon` with balance `BALANCES[pick % 6]`, from the real loader
/// (loaded once per combination: parsing it on every input would dominate the run).
pub fn upstream(pick: u8, fail_closed: bool) -> UpstreamConfig {
    static LOADED: OnceLock<Vec<UpstreamConfig>> = OnceLock::new();
    let all = LOADED.get_or_init(|| {
        let mut all = Vec::new();
        for balance in BALANCES {
            for policy in ["fail_open", "fail_closed"] {
                let text = format!(
                    "[nginx]\noutput = \"/tmp/x.conf\"\n[[upstream]]\nname = \"kotaemon\"\nbalance = \"{balance}\"\n\
                     hash_key = \"$cookie_session\"\naffinity_cookie = \"kh_affinity\"\non_all_unhealthy = \"{policy}\"\n\
                     [[upstream.source]]\nkind = \"static\"\nservers = [\"127.0.0.1:1\"]\n"
                );
                let mut cfg = config::parse(&text, &|_| None).expect("the fixed config loads");
                all.push(cfg.upstreams.remove(0));
            }
        }
        all
    });
    all[(usize::from(pick) % BALANCES.len()) * 2 + usize::from(fail_closed)].clone()
}

/// The static servers of a loaded upstream (other sources contribute nothing here).
pub fn static_endpoints(u: &UpstreamConfig) -> Vec<Endpoint> {
    u.sources
        .iter()
        .filter_map(|s| match s {
            SourceConfig::Static(s) => Some(s.servers.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn health(seed: u8, a: &Address) -> Health {
    let h = a
        .to_string()
        .bytes()
        .fold(u32::from(seed), |h, b| h.wrapping_mul(31) ^ u32::from(b));
    [Health::Up, Health::Down, Health::Unknown][(h % 3) as usize]
}

/// Renders the upstreams with their endpoints and panics unless the file has the template's
/// shape, one `server` line per endpoint naming it, and every address prints and parses back
/// to itself.
pub fn render_and_check(upstreams: &[(UpstreamConfig, Vec<Endpoint>)], seed: u8) {
    let mut pairs = Vec::new();
    let mut expected = BTreeSet::new();
    let (mut servers, mut groups) = (0, 0);
    for (cfg, endpoints) in upstreams {
        for e in endpoints {
            let printed = e.address.to_string();
            assert_eq!(
                printed.parse::<Address>().as_ref(),
                Ok(&e.address),
                "{printed:?} does not parse back to the address it was printed from"
            );
        }
        let merged: BTreeMap<Address, Endpoint> = merge([endpoints.as_slice()]);
        let d = decide(cfg, &merged, |a| health(seed, a));
        // A sticky upstream adds one group, with one server, a replica rendered up.
        groups += d.routes.len();
        servers += merged.len().max(1) + d.routes.len();
        expected.extend(merged.keys().map(ToString::to_string));
        pairs.push((d, cfg.on_all_unhealthy));
    }
    let text = renderer()
        .render(&pairs)
        .expect("the built-in template renders");
    let want = shape::Expected {
        upstreams: upstreams.len() + groups,
        servers,
    };
    shape::assert_renders(&text, want, &expected);
}
