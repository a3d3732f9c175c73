//! The proxy's building blocks: upstream pools and connections ([`upstream`]: balancing,
//! health checks, ejection, the retry budget), the HTTP rules of a proxy ([`http_util`]:
//! hop-by-hop headers, forwarding headers, request ids, body limits), downstream TLS
//! ([`tls`]: SNI choice, the rustls server config), the proxy's Prometheus series
//! ([`metrics`]), reusable timers ([`deadline`]) and the scoring JSON endpoint
//! ([`scoring_endpoint`]).
//!
//! It depends on the leaves `gateway-config` and `gateway-scoring` only. The request path
//! itself (router, forwarding with retries, the live snapshot: `gateway/src/proxy.rs`) still
//! lives in the gateway package because it calls the plugin chain directly; it moves here
//! once the plugin host implements a hook trait this crate declares (ARCHITECTURE.md).

#![recursion_limit = "256"]

// The leaves under the names the modules use.
use gateway_config as config;
use gateway_scoring as scoring;

pub mod deadline;
pub mod http_util;
pub mod metrics;
pub mod scoring_endpoint;
pub mod tls;
pub mod upstream;
