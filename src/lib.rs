//! upstreamd keeps an nginx `upstream` include file true to the world: it gathers backend
//! endpoints from sources (a static list, Consul, etcd v3), probes each endpoint's HTTP health
//! path itself, decides the membership, renders the include file from a minijinja template,
//! validates it with `nginx -t`, and signals the nginx master only when the bytes changed,
//! confirming that a new worker generation started and rolling back when anything failed.
//!
//! Modules in data-flow order:
//! - [`config`]: the TOML config, validated whole, every error at once.
//! - [`model`]: typed values that may reach the file (names, addresses, attributes).
//! - [`sources`]: static, Consul and etcd sources sending full snapshots.
//! - [`health`]: the hysteresis state machine and the HTTP prober.
//! - [`decide`]: membership from registry state and probe verdicts (pure).
//! - [`affinity`]: the opaque replica ids of `balance = "sticky"` cookies (pure).
//! - [`render`]: the include file's bytes from the decided upstreams (pure).
//! - [`nginx`]: atomic write, `nginx -t`, pid checks, SIGHUP, confirmation, rollback; and
//!   (`nginx::lua`) the pushes of `apply = "lua"` to nginx's Lua balancer.
//! - [`feedback`]: nginx's error log followed; upstream failures it reports bring probes
//!   forward.
//! - [`controller`]: the one reconcile loop tying it together, and its status report.
//! - [`notify`]: systemd readiness, status and watchdog notifications.
//! - [`admin`]: the admin HTTP server and status page; [`metrics`]: typed Prometheus families;
//!   [`events`]: each thing that happens, its log line and its metrics written together.
//! - [`logging`]: text-log fields with every control character escaped.
#![warn(missing_docs)]

pub mod admin;
pub mod affinity;
pub mod config;
pub mod controller;
pub mod decide;
pub mod events;
pub mod feedback;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod nginx;
pub mod notify;
pub mod render;
pub mod sources;
