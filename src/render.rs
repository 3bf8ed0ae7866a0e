//! Rendering: from decided upstreams to the bytes of the include file, with minijinja.
//!
//! Pure once the template is compiled. Templates see only typed values (validated names,
//! addresses printed from parsed types, numbers), so nothing a registry says can add a
//! directive. Equal membership gives equal bytes: no timestamps, sorted servers.

use std::path::Path;

use minijinja::{AutoEscape, Environment};
use serde::Serialize;

use crate::affinity::GROUP_SEPARATOR;
use crate::config::{AllUnhealthy, Balance};
use crate::decide::{Desired, Verdict};

pub mod lua;
mod trial;

/// The built-in template, `templates/upstream.conf.j2`.
pub const BUILTIN_TEMPLATE: &str = include_str!("../templates/upstream.conf.j2");

const TEMPLATE_NAME: &str = "upstream.conf";

/// The address of the built-in template's placeholder server (`down`, for an empty upstream).
const PLACEHOLDER: &str = "127.0.0.1:1";

/// Why a template could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The custom template file could not be read.
    #[error("failed to read template `{path}`: {source}")]
    Read {
        /// The template path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The template does not compile or failed while rendering.
    #[error("{}", describe(.0))]
    Template(#[from] minijinja::Error),
    /// The template compiles but fails on representative data (`check` and SIGHUP try it).
    #[error("{error} (rendering {case})", error = describe(.error))]
    Trial {
        /// Which representative data failed, e.g. `1 server, balance "sticky"`.
        case: String,
        /// minijinja's error, with the template name, line and source span.
        error: minijinja::Error,
    },
}

/// One line naming the template, the line, the failing expression and what went wrong:
/// ``template `/etc/upstreamd/t.j2` line 3: `u.nmae` is undefined``.
fn describe(e: &minijinja::Error) -> String {
    let at = match (e.name(), e.line()) {
        (Some(name), Some(line)) => format!("template `{name}` line {line}: "),
        (Some(name), None) => format!("template `{name}`: "),
        _ => "template: ".to_owned(),
    };
    let expr = e
        .template_source()
        .zip(e.range())
        .and_then(|(src, r)| src.get(r))
        .map(|x| x.trim().replace('\n', " "));
    let what = match (e.kind(), &expr) {
        (minijinja::ErrorKind::UndefinedError, Some(x)) => format!("`{x}` is undefined"),
        (_, Some(x)) => format!("{} in `{x}`", e.detail().unwrap_or(&e.kind().to_string())),
        (_, None) => e
            .detail()
            .map_or_else(|| e.kind().to_string(), str::to_owned),
    };
    format!("{at}{what}")
}

/// A compiled template.
#[derive(Debug)]
pub struct Renderer {
    env: Environment<'static>,
    name: String,
}

#[derive(Serialize)]
struct ServerCtx {
    address: String,
    weight: Option<u32>,
    max_fails: Option<u32>,
    fail_timeout: Option<u64>,
    backup: bool,
    down: bool,
    verdict: Verdict,
}

#[derive(Serialize)]
struct RouteCtx {
    id: String,
    address: String,
    group: String,
}

#[derive(Serialize)]
struct UpstreamCtx<'a> {
    name: &'a str,
    balance: Balance,
    hash_key: Option<&'a str>,
    affinity_cookie: &'a str,
    keepalive: u32,
    zone_size: String,
    placeholder: bool,
    all_unhealthy: bool,
    on_all_unhealthy: AllUnhealthy,
    servers: Vec<ServerCtx>,
    routes: Vec<RouteCtx>,
}

/// The shared-memory zone for servers with these addresses, in KiB: 64 KiB, plus 1 KiB and
/// the address's length a server.
///
/// Measured with nginx 1.22 `nginx -t`: a peer costs about 780 bytes (IPv4) to 840 bytes (long
/// IPv6), plus its name; 250 servers no longer fit the 64 KiB + 512 B a server this used to be
/// (`ngx_slab_alloc() failed: no memory in upstream zone`). A hostname that resolves to
/// several addresses becomes several peers; the margin covers a few of those, not hundreds.
pub fn zone_size<'a>(addresses: impl IntoIterator<Item = &'a str>) -> String {
    let bytes: usize = addresses.into_iter().map(|a| 1024 + a.len()).sum();
    format!("{}k", 64 + bytes.div_ceil(1024))
}

/// Routes (replica ids of sticky upstreams) above which the file sizes nginx's map hash.
const MAP_HASH_ROUTES: usize = 100;

/// `map_hash_max_size` for `routes` replica ids, or none below [`MAP_HASH_ROUTES`].
///
/// Measured with nginx 1.22 `nginx -t`: the default map hash (`map_hash_max_size 2048`,
/// `map_hash_bucket_size 64`) warns "could not build optimal map_hash" from about 200 ids;
/// a bucket of 128 and a max size of 8 a route (rounded up to a power of two) build without
/// a warning at 1,000 and 10,000.
pub fn map_hash_max_size(routes: usize) -> Option<usize> {
    (routes > MAP_HASH_ROUTES).then(|| (routes * 8).next_power_of_two().max(2048))
}

impl Renderer {
    /// Compiles the template at `path`, or the built-in one.
    pub fn new(path: Option<&Path>) -> Result<Self, RenderError> {
        match path {
            Some(p) => {
                let source = std::fs::read_to_string(p).map_err(|source| RenderError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                Self::named(p.display().to_string(), source)
            }
            None => Self::from_source(BUILTIN_TEMPLATE.to_owned()),
        }
    }

    /// Compiles the template at `path` (or the built-in one) and renders it once for each
    /// representative upstream (0, 1 and many servers; every balance; down, backup, every
    /// policy), so that a template reading an undefined field is refused before it is used.
    /// What `check` and a SIGHUP reload use.
    pub fn checked(path: Option<&Path>) -> Result<Self, RenderError> {
        let renderer = Self::new(path)?;
        trial::try_render(&renderer)?;
        Ok(renderer)
    }

    /// Compiles template text.
    pub fn from_source(source: String) -> Result<Self, RenderError> {
        Self::named(TEMPLATE_NAME.to_owned(), source)
    }

    /// Compiles template text under `name` (the file's path, shown in errors).
    fn named(name: String, source: String) -> Result<Self, RenderError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.add_template_owned(name.clone(), source)?;
        Ok(Self { env, name })
    }

    /// Renders the whole include file for these upstreams, given in config order.
    pub fn render(&self, upstreams: &[(Desired, AllUnhealthy)]) -> Result<String, RenderError> {
        let ctx: Vec<UpstreamCtx<'_>> = upstreams
            .iter()
            .map(|(d, policy)| {
                let servers: Vec<ServerCtx> = d
                    .servers
                    .iter()
                    .map(|s| ServerCtx {
                        address: s.address.to_string(),
                        weight: s.attrs.weight,
                        max_fails: s.attrs.max_fails,
                        fail_timeout: s.attrs.fail_timeout,
                        backup: s.attrs.backup,
                        down: s.down,
                        verdict: s.verdict,
                    })
                    .collect();
                let zone = if d.placeholder {
                    zone_size([PLACEHOLDER])
                } else {
                    zone_size(servers.iter().map(|s| s.address.as_str()))
                };
                UpstreamCtx {
                    name: d.name.as_str(),
                    balance: d.balance,
                    hash_key: d.hash_key.as_deref(),
                    affinity_cookie: &d.affinity_cookie,
                    keepalive: d.keepalive,
                    zone_size: zone,
                    placeholder: d.placeholder,
                    all_unhealthy: d.all_unhealthy,
                    on_all_unhealthy: *policy,
                    servers,
                    routes: d
                        .routes
                        .iter()
                        .map(|r| RouteCtx {
                            id: r.id.to_string(),
                            address: r.address.to_string(),
                            group: format!("{}{GROUP_SEPARATOR}{}", d.name, r.id),
                        })
                        .collect(),
                }
            })
            .collect();
        let routes: usize = upstreams.iter().map(|(d, _)| d.routes.len()).sum();
        let tmpl = self.env.get_template(&self.name)?;
        Ok(tmpl.render(minijinja::context! {
            upstreams => ctx,
            map_hash_max_size => map_hash_max_size(routes),
            version => env!("CARGO_PKG_VERSION"),
        })?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::tests::{ep, upstream};
    use crate::decide::{decide, merge};
    use crate::health::Health;

    fn render_one(balance: Balance, eps: &[crate::model::Endpoint], health: Health) -> String {
        let cfg = upstream("kotaemon", balance);
        let d = decide(&cfg, &merge([eps]), |_| health);
        Renderer::new(None)
            .unwrap()
            .render(&[(d, cfg.on_all_unhealthy)])
            .unwrap()
    }

    #[test]
    fn renders_servers_with_attributes_sorted_by_address() {
        let mut a = ep("127.0.0.3:7860");
        a.attrs.weight = Some(3);
        a.attrs.max_fails = Some(2);
        a.attrs.fail_timeout = Some(10);
        let mut b = ep("127.0.0.2:7860");
        b.attrs.backup = true;
        let text = render_one(Balance::LeastConn, &[a, b], Health::Up);
        let body: Vec<&str> = text.lines().filter(|l| l.starts_with("    ")).collect();
        assert_eq!(
            body,
            vec![
                "    zone kotaemon 67k;",
                "    least_conn;",
                "    server 127.0.0.2:7860 backup;",
                "    server 127.0.0.3:7860 weight=3 max_fails=2 fail_timeout=10s;",
                "    keepalive 32;",
            ]
        );
    }

    #[test]
    fn sticky_routes_each_up_replica_id_to_its_own_group_and_the_rest_to_the_hash() {
        let cfg = upstream("kotaemon", Balance::Sticky);
        let eps = [ep("127.0.0.2:7860"), ep("127.0.0.3:7860")];
        let d = decide(&cfg, &merge([&eps[..]]), |a| {
            if a.port == 7860 && a.to_string().starts_with("127.0.0.3") {
                Health::Down
            } else {
                Health::Up
            }
        });
        let text = Renderer::new(None)
            .unwrap()
            .render(&[(d, cfg.on_all_unhealthy)])
            .unwrap();
        let id = cfg.affinity_key.id(&"127.0.0.2:7860".parse().unwrap());
        let down = cfg.affinity_key.id(&"127.0.0.3:7860".parse().unwrap());
        for want in [
            format!("map $cookie_kh_affinity $kotaemon_affinity_route {{\n    default kotaemon;\n    {id} kotaemon__{id};\n}}\n"),
            "map $cookie_kh_affinity $kotaemon_affinity_key {\n    \"\"      $remote_addr;\n    default $cookie_kh_affinity;\n}\n".into(),
            "map $upstream_addr $kotaemon_affinity_last {\n    \"~([^ ]+)$\" $1;\n    default \"\";\n}\n".into(),
            format!("map $kotaemon_affinity_last $kotaemon_affinity_served {{\n    default \"\";\n    \"127.0.0.2:7860\" {id};\n}}\n"),
            "map \"$cookie_kh_affinity:$kotaemon_affinity_served\" $kotaemon_affinity_cookie {\n    \"~^:\"   \"kh_affinity=$request_id; Path=/; HttpOnly; SameSite=Lax\";\n    \"~:$\"   \"\";\n    \"~^([0-9a-f]+):\\1$\" \"\";\n    default \"kh_affinity=$kotaemon_affinity_served; Path=/; HttpOnly; SameSite=Lax\";\n}\n".into(),
            "    hash $kotaemon_affinity_key consistent;\n    server 127.0.0.2:7860;\n    server 127.0.0.3:7860 down;\n".into(),
            format!("upstream kotaemon__{id} {{\n    server 127.0.0.2:7860;\n    keepalive 32;\n}}\n"),
        ] {
            assert!(text.contains(&want), "missing:\n{want}\n---- in:\n{text}");
        }
        assert!(
            !text.contains(&down.to_string()),
            "a down replica's id routes nowhere\n{text}"
        );
    }

    #[test]
    fn an_empty_upstream_gets_a_down_placeholder() {
        let text = render_one(Balance::RoundRobin, &[], Health::Up);
        assert!(text.contains("    server 127.0.0.1:1 down;\n"), "{text}");
    }

    #[test]
    fn equal_membership_renders_equal_bytes_whatever_the_input_order() {
        let one = render_one(
            Balance::RoundRobin,
            &[ep("127.0.0.2:1"), ep("127.0.0.9:1")],
            Health::Up,
        );
        let two = render_one(
            Balance::RoundRobin,
            &[ep("127.0.0.9:1"), ep("127.0.0.2:1")],
            Health::Up,
        );
        assert_eq!(one, two);
    }

    #[test]
    fn unhealthy_servers_render_down() {
        let text = render_one(Balance::RoundRobin, &[ep("127.0.0.2:1")], Health::Down);
        // One endpoint, all unhealthy: fail_open renders it up, with a comment.
        assert!(
            text.contains("on_all_unhealthy = fail_open")
                && text.contains("    server 127.0.0.2:1;\n")
        );
    }

    #[test]
    fn a_broken_custom_template_is_an_error_not_a_panic() {
        assert!(Renderer::from_source("{% for %}".into()).is_err());
        let r = Renderer::from_source("{{ nosuchvar.x }}".into()).unwrap();
        assert!(r.render(&[]).is_err());
    }

    #[test]
    fn the_map_hash_is_sized_only_for_many_replica_ids() {
        assert_eq!(map_hash_max_size(100), None);
        assert_eq!(map_hash_max_size(101), Some(2048));
        assert_eq!(map_hash_max_size(1_000), Some(8192));
        assert_eq!(map_hash_max_size(10_000), Some(131_072));
    }

    #[test]
    fn zone_grows_with_the_server_count_and_address_length() {
        assert_eq!(zone_size(["127.0.0.1:1"]), "66k");
        let v4: Vec<String> = (0..10_000)
            .map(|i| format!("10.0.{}.{}:7860", i / 250, i % 250))
            .collect();
        // 10,000 peers measured at about 7.8 MiB.
        assert_eq!(zone_size(v4.iter().map(String::as_str)), "10214k");
    }
}
