//! A plugin's instances are made ahead and reused: a version used at its ready size makes no
//! new instance per call, and one discarded after a failure is replaced off the request path.

use crate::support::*;

fn created(registry: &prometheus::Registry, when: &str) -> f64 {
    metric_value(
        registry,
        "gateway_plugin_instances_created_total",
        &[("plugin", "noop"), ("when", when)],
    )
}

/// Built plugin `file` loaded as plugin "noop" with `config` and `instances` ready instances,
/// in an engine with default settings, and the registry its metrics are in.
async fn load(
    file: &str,
    config: &str,
    instances: u32,
) -> (
    prometheus::Registry,
    std::sync::Arc<gateway::plugin::LoadedPlugin>,
) {
    let registry = prometheus::Registry::new();
    let settings = gateway::config::PluginRuntimeSettings::default();
    let engine = gateway::plugin::PluginRuntime::new(&settings, &registry).unwrap();
    let mut spec =
        gateway::config::PluginSpec::with_defaults("noop", plugin_wasm(file), config.into());
    spec.instances = instances;
    (registry, engine.load(&spec).await.unwrap())
}

/// One ready instance, called 200 times in a row on a runtime whose workers run any refill:
/// the one instance made at load serves every call. (Refilling whenever the pool ran dry made
/// and `init`ed a new instance for about every call, then dropped the returning one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_used_at_its_ready_size_makes_no_new_instances() {
    let (registry, plugin) = load("noop", "", 1).await;
    assert_eq!(created(&registry, "ahead"), 1.0);
    for _ in 0..200 {
        let trial = plugin.trial("/").await;
        assert!(trial.failure.is_none(), "{trial:?}");
        // Give a refill, had one been spawned, the time to run.
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(created(&registry, "ahead"), 1.0);
    assert_eq!(created(&registry, "on_demand"), 0.0);
    assert_eq!(plugin.idle_instances(), 1);
}

/// Instances discarded after failed calls are replaced in the background: the ready pool
/// fills again without a request making one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_discarded_after_failures_are_replaced_ahead() {
    let (registry, plugin) = load("hostile", "trap", 2).await;
    for _ in 0..6 {
        let trial = plugin.trial("/").await;
        assert!(
            trial.failure.is_some(),
            "a trapping plugin fails: {trial:?}"
        );
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while plugin.idle_instances() == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(plugin.idle_instances() >= 1, "the pool refilled");
    assert!(
        created(&registry, "ahead") > 2.0,
        "replacements were made ahead"
    );
}
