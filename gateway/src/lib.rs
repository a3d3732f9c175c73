//! The storefront edge gateway: a TLS reverse proxy that routes by host and path to pooled,
//! health-checked upstreams.
//!
//! Start one with [`Gateway::start`] from a validated [`config::Config`]; the `gateway` binary
//! is a thin command line over this library.

#![recursion_limit = "256"]

pub mod admin_client;
mod audit;
mod conn_guard;
pub mod demo;
mod loader;
mod monitor;
pub mod oci;
mod process_metrics;
pub mod ranker;
mod reload;
mod rollouts;
pub mod scoring_settings;
pub mod server;
pub mod upgrade;
pub mod watch;

/// The admin listener and API over the `Control` trait (`gateway/crates/admin`).
pub use gateway_admin as admin;
/// Configuration: parse and validate (`gateway/crates/config`).
pub use gateway_config as config;
/// The WebAssembly plugin host (`gateway/crates/plugin-host`).
pub use gateway_plugin_host as plugin;
/// The proxy (`gateway/crates/proxy`): the request path and the hook contract, and its
/// building blocks under their old module names.
pub use gateway_proxy as proxy;
pub use gateway_proxy::{http_util, metrics, scoring_endpoint, tls, upstream};
/// The scoring engine lives in its own crate (`gateway/crates/scoring`); re-exported under
/// its old module name.
pub use gateway_scoring as scoring;
/// The artifact store and content hashes and pins (`gateway/crates/store`).
pub use gateway_store as store;

pub use config::{Config, ConfigError};
pub use server::{DrainOutcome, Gateway, StartError};
