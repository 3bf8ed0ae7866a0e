//! Every integration test, in one test binary (ripgrep's `tests/tests.rs` shape): one crate to
//! build and link, one harness (`util`) shared by all, and no helper dead in some binaries.
//!
//! Run one module or one test with a name filter: `cargo test --test it pipeline::`,
//! `cargo test --test it -- --exact pipeline::check_accepts_a_good_config`. The tests that
//! need a Docker engine are the `container_*` modules (`cargo test --test it container_`);
//! they skip when none answers, unless `UPSTREAMD_REQUIRE_DOCKER=1` (CI's host stage).
//!
//! To add tests: write `tests/it/<topic>.rs` with `use crate::util::*;` (and
//! `crate::util::{consul, etcd, …}` as needed), add `mod <topic>;` below, and put new shared
//! helpers in `util/` rather than in the module. A file dropped into `tests/` itself becomes a
//! separate test binary of its own; move it here instead.

mod util;

mod admin;
mod affinity;
mod consul_e2e;
mod consul_source;
mod container_compose;
mod container_deb;
mod container_systemd;
mod crash;
mod deploy;
mod etcd_e2e;
mod etcd_source;
mod feedback;
mod hardening;
mod injection;
mod kotaemon;
mod lua_apply;
mod lua_balancer;
mod lua_balancing;
mod metrics_contract;
mod never_stuck;
mod nginx_apply;
mod old_generations;
mod operator;
mod pipeline;
mod registries;
mod render_scale;
mod soak;
mod standin;
