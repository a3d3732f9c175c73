//! End-to-end tests: the real gateway on 127.0.0.1:0, real upstream servers, real TLS clients.
//! Each module is named for what it proves.

mod support;

mod bad_config_files_give_located_errors;
mod demo_serves_the_storefront;
mod graceful_drain_loses_no_request;
mod hop_by_hop_and_forwarding_headers;
mod hostile_plugins_are_contained;
mod routing_by_host_and_prefix;
mod shipped_plugins_work_end_to_end;
mod timeouts_and_limits;
mod tls_sni_alpn_and_versions;
mod upstream_failover_health_and_retries;
mod upstream_protocols_and_balancing;
