//! Configuration text: TOML → [`Config::from_toml_with`] (what `gateway check`, `gateway run`
//! and every reload do, through [`FakeFiles`] instead of the disk) and
//! [`Config::parse_raw`] (`gateway sample-files`). A configuration that validates must then
//! build what serving builds from it without I/O: the router, the experiments (their rollout
//! plans), the TLS server configuration.

use gateway_config::{Config, ConfigError};
use gateway_proxy::experiment::Experiment;
use gateway_proxy::metrics::Metrics;
use gateway_proxy::Router;

use crate::fixtures::{base_dir, FakeFiles};

/// The target (see the module docs).
pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = Config::parse_raw(&text, "fuzz.toml") {
        check_error(&text, &e);
    }
    match Config::from_toml_with(&text, "fuzz.toml", base_dir(), &FakeFiles) {
        Ok(config) => build(&config),
        Err(e) => check_error(&text, &e),
    }
}

/// A refused configuration names at least one problem, each located inside the text.
fn check_error(text: &str, e: &ConfigError) {
    let issues = e.issues();
    assert!(!issues.is_empty(), "a refusal without a problem: {e}");
    let lines = text.split('\n').count();
    for issue in issues {
        if let Some(line) = issue.line {
            assert!(
                (1..=lines).contains(&line),
                "issue {issue} is on line {line} of a {lines}-line text"
            );
        }
    }
    let _ = e.to_string();
}

/// What a valid configuration must allow: every index in range, and the serving state
/// that needs no I/O built from it.
fn build(config: &Config) {
    for r in &config.routes {
        assert!(
            r.upstream < config.upstreams.len(),
            "route {} upstream",
            r.name
        );
        assert!(r.plugins.iter().all(|&p| p < config.plugins.len()));
        assert!(r.variants.iter().all(|(_, u)| *u < config.upstreams.len()));
        assert!(r.default_variant.is_none_or(|d| d < r.variants.len()));
        assert!(r.experiment.is_none_or(|e| e < config.experiments.len()));
    }
    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(&registry).expect("proxy metrics register");
    let _router = Router::new(&config.routes, &config.experiments, &metrics, &|_| None);
    for spec in &config.experiments {
        assert!(spec.routes.iter().all(|&r| r < config.routes.len()));
        let experiment = Experiment::new(spec.clone(), &metrics, None);
        let _ = experiment.status(gateway_proxy::experiment::now_ms());
    }
    if !config.certificates.is_empty() {
        gateway_proxy::tls::server_config(&config.certificates)
            .expect("a TLS configuration from validated certificates");
    }
}
