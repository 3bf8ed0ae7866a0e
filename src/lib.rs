//! upstreamd keeps an nginx `upstream` include file true to the world.
pub mod config;
pub mod decide;
pub mod health;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod render;
pub mod sources;
