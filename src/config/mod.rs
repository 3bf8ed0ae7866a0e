//! The configuration (TOML, see the README for the reference): types here, parsing in `load`.
//!
//! Every value is validated while loading, and every problem is reported at once: a
//! `Config` that exists is a valid one.

mod load;
mod lua;
mod preflight;
mod reader;
mod sources;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::affinity::AffinityKey;
use crate::model::{Endpoint, UpstreamName};

pub use load::{load_file, parse, ConfigError, ConfigErrors, MAX_CONFIG_BYTES};
pub use lua::{ApplyMode, LuaConfig, LuaListen};
pub use preflight::{find_program, preflight, Preflight};

/// The whole configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// How to write the include file and reload nginx (`[nginx]`).
    pub nginx: NginxConfig,
    /// The admin HTTP server (`[admin]`).
    pub admin: AdminConfig,
    /// The upstreams, in file order (`[[upstream]]`, at least one, names unique).
    pub upstreams: Vec<UpstreamConfig>,
}

/// `[nginx]`: the include file upstreamd owns and how nginx is told about it.
#[derive(Debug, Clone, PartialEq)]
pub struct NginxConfig {
    /// `output`: the include file upstreamd owns (required).
    pub output: PathBuf,
    /// `pid_file`: the nginx master to signal; default `/run/nginx.pid`.
    pub pid_file: PathBuf,
    /// `test_command`: run after writing a changed file, before signalling; `[]` disables;
    /// default `["nginx", "-t", "-q"]`.
    pub test_command: Vec<String>,
    /// `reload_command`: run instead of sending SIGHUP when not empty; default `[]`.
    pub reload_command: Vec<String>,
    /// `template`: a custom minijinja template; the built-in one when absent.
    pub template: Option<PathBuf>,
    /// `settle`: after a change, wait this long for more before applying; default 250ms.
    pub settle: Duration,
    /// `min_reload_interval`: at most one reload per interval; default 2s.
    pub min_reload_interval: Duration,
    /// `confirm_timeout`: how long to wait for a new nginx worker generation after a
    /// reload before calling it unconfirmed and rolling back; default 5s.
    pub confirm_timeout: Duration,
    /// `state_dir`: where the last good snapshot of each source is kept, so that a restart
    /// during a registry outage starts from it; default: none kept.
    pub state_dir: Option<PathBuf>,
    /// `error_log`: nginx's error log, followed like `tail -F`; an upstream failure it
    /// reports for one of our endpoints brings that endpoint's next probe forward. Needs
    /// nginx's `error_log` at level `error` or more verbose. Default: not followed.
    pub error_log: Option<PathBuf>,
    /// `max_old_generations`: while more old nginx worker generations than this are still
    /// shutting down (open streams hold them), reloads that only add servers or change
    /// attributes wait; reloads that take a server out go at once. `0` (the default) sets no
    /// limit: a held change could otherwise wait as long as a browser tab stays open.
    /// `apply = "lua"` pushes leave no generations and never wait.
    pub max_old_generations: u32,
    /// `apply`: `"reload"` (default) or `"lua"`: how a membership change reaches nginx.
    pub apply: ApplyMode,
    /// The `lua_*` keys (defaults filled in); used only with `apply = "lua"`.
    pub lua: LuaConfig,
}

/// `[admin]`: the admin HTTP server.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// `listen`: address of `/`, `/healthz`, `/readyz`, `/status`, `/metrics`; off when absent.
    pub listen: Option<SocketAddr>,
    /// `max_connections`: admin connections open at once, 1–10000; one more is closed as soon
    /// as it is accepted; default 64 (lowered at start if the open-file limit is too low to
    /// leave the daemon its reserve).
    pub max_connections: usize,
    /// `header_read_timeout`: a connection that has not sent a whole request head by then is
    /// closed; default 5s.
    pub header_read_timeout: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: None,
            max_connections: default_admin_max_connections(),
            header_read_timeout: default_admin_header_read_timeout(),
        }
    }
}

/// The default `[admin] max_connections`: 64.
pub fn default_admin_max_connections() -> usize {
    64
}

/// The default `[admin] header_read_timeout`: 5s.
pub fn default_admin_header_read_timeout() -> Duration {
    Duration::from_secs(5)
}

/// How nginx picks a server (`balance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// nginx's default weighted round robin (the default).
    RoundRobin,
    /// `least_conn;`
    LeastConn,
    /// `ip_hash;`
    IpHash,
    /// `hash KEY consistent;` with `hash_key`.
    Hash,
    /// `random two least_conn;`
    Random,
    /// Affinity that names the replica: the affinity cookie carries the opaque id of the
    /// replica that served the client and routes straight to it while it is up; a missing,
    /// unknown or down id falls back to a consistent hash on the cookie (or the client
    /// address), and the response names the replica that answered.
    Sticky,
}

impl Balance {
    /// Whether nginx refuses `backup` servers with this method.
    pub fn forbids_backup(self) -> bool {
        matches!(
            self,
            Balance::IpHash | Balance::Hash | Balance::Random | Balance::Sticky
        )
    }
}

/// What to render when every registered endpoint of an upstream is unhealthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AllUnhealthy {
    /// Render them all as up, as nginx alone would (the default).
    FailOpen,
    /// Render them all `down`.
    FailClosed,
}

/// `[[upstream]]`: one nginx upstream block.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// `name`: the nginx upstream name, `[A-Za-z0-9_]+`, unique (required).
    pub name: UpstreamName,
    /// `balance`: default `round_robin`.
    pub balance: Balance,
    /// `hash_key`: with `balance = "hash"` (required there): an nginx variable expression
    /// made of `$`, letters, digits, `_`, `-`, `.` and `:`.
    pub hash_key: Option<String>,
    /// `affinity_cookie`: with `balance = "sticky"`: the cookie name, `[A-Za-z0-9_]+`;
    /// default `upstreamd_affinity`.
    pub affinity_cookie: String,
    /// The key of the replica ids in the affinity cookie, derived from the upstream name and
    /// `affinity_secret_file` (a file holding at least 16 bytes, read at load; ids are
    /// guessable from addresses without it). Used by `balance = "sticky"`.
    pub affinity_key: AffinityKey,
    /// `keepalive`: idle keep-alive connections to the upstream per worker; 0 = none; default 32.
    pub keepalive: u32,
    /// `on_all_unhealthy`: default `fail_open`.
    pub on_all_unhealthy: AllUnhealthy,
    /// `max_shrink`: the largest fraction (0–1) of an upstream's endpoints one source answer may
    /// drop before it is held for `shrink_hold`; default 0.5.
    pub max_shrink: f64,
    /// `shrink_hold`: how long a suspicious shrink is held before it is applied; default 30s.
    pub shrink_hold: Duration,
    /// `[upstream.health]`: active probing.
    pub health: HealthConfig,
    /// `[[upstream.source]]`: at least one.
    pub sources: Vec<SourceConfig>,
}

/// `[upstream.health]`: active HTTP probes of every endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// `enabled`: default true; false trusts the registry alone.
    pub enabled: bool,
    /// `path`: default `/health` (real Kotaemon serves `/queue/status`, not `/health`).
    pub path: String,
    /// `expect_status`: an inclusive range, `"200-399"` (default) or one code `"200"`.
    pub expect_status: (u16, u16),
    /// `expect_body`: a substring the body must contain; none by default.
    pub expect_body: Option<String>,
    /// `host`: the Host header to send; the endpoint's address by default.
    pub host: Option<String>,
    /// `interval`: time between probes of one endpoint while its verdict stands (±10%
    /// jitter); default 2s.
    pub interval: Duration,
    /// `fast_interval`: time between probes while the verdict is in doubt (a failure while
    /// up, a success while down), jittered only downwards; default 500ms, or `interval` when
    /// that is shorter. At most `interval`.
    pub fast_interval: Duration,
    /// `down_interval`: time between probes of a down endpoint that still fails (±10%
    /// jitter); default `interval`. At least `interval`.
    pub down_interval: Duration,
    /// `timeout`: per probe, connect to last body byte; default 1s.
    pub timeout: Duration,
    /// `rise`: consecutive successes that turn a down endpoint up; default 2.
    pub rise: u32,
    /// `fall`: consecutive failures that turn an up endpoint down; default 3.
    pub fall: u32,
}

/// A secret read from the environment or a file; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// `[[upstream.source]]`: where endpoints come from.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceConfig {
    /// `kind = "static"`.
    Static(StaticSource),
    /// `kind = "consul"`.
    Consul(ConsulSource),
    /// `kind = "etcd"`.
    Etcd(EtcdSource),
}

impl SourceConfig {
    /// The `kind` value.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Static(_) => "static",
            SourceConfig::Consul(_) => "consul",
            SourceConfig::Etcd(_) => "etcd",
        }
    }
}

/// `kind = "static"`: a fixed list.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticSource {
    /// `servers`: `"host:port"` strings or tables with `address` and server attributes; at
    /// least one, no address twice. Each endpoint's origin is its place, `servers[1]`.
    pub servers: Vec<Endpoint>,
}

/// `kind = "consul"`: a service followed with blocking queries on `/v1/health/service`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsulSource {
    /// `url`: an `http://` or `https://` base URL, stored without a trailing `/`; default
    /// `$CONSUL_HTTP_ADDR` (`http://` added when it has no scheme), then `http://127.0.0.1:8500`.
    pub url: String,
    /// `service`: the service name (required).
    pub service: String,
    /// `tags`: every one must be on an instance; default none.
    pub tags: Vec<String>,
    /// `datacenter`: default the agent's.
    pub datacenter: Option<String>,
    /// `wait`: the blocking-query wait, 1s to 10m (Consul's cap); default 60s.
    pub wait: Duration,
    /// The ACL token: `token_file`, else `$CONSUL_HTTP_TOKEN`; sent as `X-Consul-Token`.
    pub token: Option<Secret>,
    /// `ca_file`: a PEM CA bundle for an https Consul.
    pub ca_file: Option<PathBuf>,
}

/// `kind = "etcd"`: every key under a prefix, listed then watched.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdSource {
    /// `endpoints`: `http://` or `https://` URLs, at least one; default `["http://127.0.0.1:2379"]`.
    pub endpoints: Vec<String>,
    /// `prefix`: the key prefix (required, not empty).
    pub prefix: String,
    /// `username`: with `password_file`.
    pub username: Option<String>,
    /// The password read from `password_file`.
    pub password: Option<Secret>,
    /// `ca_file`: a PEM CA bundle for TLS.
    pub ca_file: Option<PathBuf>,
    /// `cert_file`: a client certificate (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// `key_file`: the client key (with `cert_file`).
    pub key_file: Option<PathBuf>,
    /// `connect_timeout`: default 5s.
    pub connect_timeout: Duration,
    /// `request_timeout`: default 5s.
    pub request_timeout: Duration,
}
