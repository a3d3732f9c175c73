//! End-to-end tests: the real gateway on 127.0.0.1:0, real upstream servers, real TLS clients.
//! Each module is named for what it proves.

// wgpu's types nest deeply; proving futures that hold a model Send takes more steps.
#![recursion_limit = "256"]

mod support;

mod admin_api_reloads_and_guards_the_node;
mod alert_rules_and_dashboard_check;
mod anomalies_raise_an_alert_state;
mod artifacts_pull_from_an_oci_registry;
mod bad_config_files_give_located_errors;
mod client_abuse_stays_handled;
mod client_faults_never_eject_a_backend;
mod config_watch_reloads_on_file_changes;
mod demo_serves_the_storefront;
mod deployment_files_validate;
mod experiments_split_attribute_and_roll_out;
mod graceful_drain_loses_no_request;
mod hop_by_hop_and_forwarding_headers;
mod hostile_plugins_are_contained;
mod large_uploads_stream_to_disk;
mod management_actions_are_audited;
mod models_are_gated_by_offline_evaluation;
mod one_authority_per_request;
mod overload_is_shed_fast_with_retry_after;
mod plugin_instances_are_reused;
mod plugin_limits_count_work_not_waiting;
mod plugins_in_any_language;
mod reload_keeps_what_did_not_change;
mod reloads_and_uploads_are_linearisable;
mod routing_by_host_and_prefix;
mod scoring_answers_each_request_alone;
mod scoring_kernels_match_the_cpu_path;
mod scoring_rejects_bad_models;
mod scoring_serves_and_swaps_without_mixing;
mod shipped_plugins_work_end_to_end;
mod shopper_identifiers_are_pseudonymised;
mod slow_and_stuck_clients_are_bounded;
mod status_page_renders_in_a_browser;
mod swaps_under_load_lose_no_request;
mod the_sample_config_is_complete_and_checks;
mod timeouts_and_limits;
mod tls_scan_finds_nothing_the_config_controls;
mod tls_sni_alpn_and_versions;
mod tuning_hints_name_what_to_change;
mod upgrade_hands_over_without_dropping;
mod uploads_are_validated_durable_and_reversible;
mod upstream_failover_health_and_retries;
mod upstream_faults_leak_nothing;
mod upstream_protocols_and_balancing;
mod watcher_applies_the_store_record_of_another_node;
