//! consul-standin: a small Consul agent stand-in for tests, following Consul's documented
//! HTTP API for the endpoints upstreamd and its tests use.
//!
//! Modelled: `GET /v1/health/service/:service` (blocking on `index` with `wait`, default 5m,
//! capped at 10m, plus up to wait/16 of jitter; `tag` repeatable, `dc`, `passing`;
//! `X-Consul-Index`), `PUT /v1/agent/service/register` (Name, ID, Address, Port, Tags, Meta,
//! Check/Checks with TTL or Status), `PUT /v1/agent/service/deregister/:id`,
//! `PUT /v1/agent/service/maintenance/:id?enable=&reason=`, `PUT /v1/agent/maintenance`,
//! `PUT /v1/agent/check/{pass,warn,fail,update}/:id`, `GET /v1/status/leader`. One node, one
//! global modify index bumped on every change; blocked queries wake on change. With
//! `--token T`, `/v1/` requests need `X-Consul-Token: T` (or `Authorization: Bearer T`,
//! or `?token=T`): an unknown token gets 403 "ACL not found", none gets 403 "Permission
//! denied" (real Consul would answer reads with an ACL-filtered list instead).
//!
//! Not modelled: HTTP/TCP/script checks (they keep their initial status), TTL expiry,
//! several nodes, `filter`, consistency modes.
//!
//! Test-only controls (not in Consul): `POST /_standin/fault` with `none`, `error500` (every
//! `/v1/health/` request answers 500), `hang` (they are accepted and never answered),
//! `reset-index` (the index drops to 2 and blocked queries wake, as after a snapshot
//! restore); `GET /_standin/stats` (request counts per path, the last tokens and query seen).
//!
//! Prints `consul-standin listening on http://ADDR` once bound (use port 0 for a free one).

#[path = "consul-standin/catalog.rs"]
mod catalog;
#[path = "consul-standin/http.rs"]
mod http;

use std::net::SocketAddr;

use clap::Parser;

/// A Consul agent stand-in for upstreamd's tests.
#[derive(Debug, Parser)]
#[command(name = "consul-standin")]
struct Args {
    /// Where to listen, e.g. 127.0.0.1:0 for a free port.
    #[arg(long)]
    listen: SocketAddr,
    /// Require this ACL token on /v1/ requests.
    #[arg(long)]
    token: Option<String>,
    /// The node name (`Node.Node`).
    #[arg(long, default_value = "standin")]
    node_name: String,
    /// The node address (`Node.Address`), used for instances registered without one.
    #[arg(long, default_value = "127.0.0.1")]
    node_address: String,
    /// The datacenter; `dc=` for any other is refused.
    #[arg(long, default_value = "dc1")]
    datacenter: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let node = catalog::NodeInfo {
        name: args.node_name,
        address: args.node_address,
        datacenter: args.datacenter,
    };
    let shared = http::Shared::new(catalog::Catalog::new(node), args.token);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!(
        "consul-standin listening on http://{}",
        listener.local_addr()?
    );
    axum::serve(listener, http::router(shared)).await
}
