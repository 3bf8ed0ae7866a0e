//! upstreamd keeps an nginx `upstream` include file true to the world.
pub mod config;
pub mod health;
pub mod model;
