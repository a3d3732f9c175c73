//! The proxy: the request path ([`handle`]: route by host and path, forward with retries,
//! answer errors, over the live [`Snapshot`]), the hook contract a route's plugin chain
//! implements ([`hooks`]), upstream pools and connections ([`upstream`]: balancing,
//! health checks, ejection, the retry budget), the HTTP rules of a proxy ([`http_util`]:
//! hop-by-hop headers, forwarding headers, request ids, body limits), downstream TLS
//! ([`tls`]: SNI choice, the rustls server config), the proxy's Prometheus series
//! ([`metrics`]), reusable timers ([`deadline`]), admission control under overload
//! ([`admission`]) and the scoring JSON endpoint ([`scoring_endpoint`]).
//!
//! It depends on the leaves `gateway-config` and `gateway-scoring` only; the plugin host
//! depends on it (it implements [`hooks::RouteHooks`]), never the other way.

#![recursion_limit = "256"]

// The leaves under the names the modules use.
use gateway_config as config;
use gateway_scoring as scoring;

pub mod admission;
mod deadline;
pub mod experiment;
pub mod feedback;
pub mod hooks;
pub mod http_util;
pub mod metrics;
pub mod privacy;
pub mod scoring_endpoint;
pub mod tls;
pub mod upstream;

mod request;
mod retry;
pub use request::{handle, redirect, ConnInfo, Route, Router, Shared, Snapshot};
