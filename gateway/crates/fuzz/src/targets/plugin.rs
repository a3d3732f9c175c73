//! Plugin files: bytes → wasmparser validation (the parser wasmtime itself runs, with every
//! proposal on, so nothing it would accept is skipped) → for a valid component no larger than
//! [`max_compile_bytes`], [`PluginRuntime::load_bytes`]: what a reload, an upload and
//! `gateway check` do (compile with cranelift, check the plugin world, link unknown imports
//! as traps, start one instance and run its `init` under the plugin's deadline). Small
//! invalid inputs also go through [`PluginRuntime::inspect`] (`gateway plugin inspect`),
//! which must refuse them.
//!
//! The cost of an input stays bounded: an invalid one costs a parse; only valid components
//! are compiled, and only up to the size cap; `init` runs under the deadline and memory cap.

use std::sync::{Arc, OnceLock};

use gateway_config::PluginSpec;
use gateway_plugin_host::{PluginError, PluginRuntime};
use wasmparser::{Validator, WasmFeatures};

use crate::fixtures;

/// Largest valid component the target compiles by default; larger ones are validated only.
/// `GATEWAY_FUZZ_COMPILE_BYTES` changes it (the built plugins are 60 to 310 KB).
pub const MAX_COMPILE_BYTES: usize = 128 * 1024;

/// [`MAX_COMPILE_BYTES`], or `GATEWAY_FUZZ_COMPILE_BYTES` when set.
pub fn max_compile_bytes() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var("GATEWAY_FUZZ_COMPILE_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(MAX_COMPILE_BYTES)
    })
}

/// Largest invalid input also handed to the host's `inspect`, which must refuse it.
const MAX_INSPECT_INVALID_BYTES: usize = 8 * 1024;

const FIXTURE: &str = r#"
[plugin_runtime]
max_instances = 8

[[listeners]]
name = "http"
bind = "127.0.0.1:0"
protocol = "http"

[[upstreams]]
name = "app"
backends = ["127.0.0.1:9"]

[[routes]]
name = "all"
upstream = "app"
plugins = ["fuzzed"]

[[plugins]]
name = "fuzzed"
path = "fuzzed.wasm"
config = "fuzz"
deadline_ms = 50
memory_limit_bytes = 4194304
instances = 1
"#;

struct Host {
    runtime: Arc<PluginRuntime>,
    spec: PluginSpec,
}

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        let config = fixtures::config(FIXTURE);
        let registry = prometheus::Registry::new();
        let runtime = PluginRuntime::new(&config.plugin_runtime, &registry)
            .expect("the plugin runtime starts");
        Host {
            runtime,
            spec: config.plugins[0].clone(),
        }
    })
}

/// Whether wasmparser, with every proposal it knows on, accepts `data` as a component.
pub fn is_valid_component(data: &[u8]) -> bool {
    wasmparser::Parser::is_component(data)
        && Validator::new_with_features(WasmFeatures::all())
            .validate_all(data)
            .is_ok()
}

/// The target (see the module docs).
pub fn run(data: &[u8]) {
    let host = host();
    if !is_valid_component(data) {
        if data.len() <= MAX_INSPECT_INVALID_BYTES {
            let inspection = host.runtime.inspect(data);
            assert!(
                inspection.verdict.is_err(),
                "the host accepts a component wasmparser refuses"
            );
        }
        return;
    }
    if data.len() > max_compile_bytes() {
        return;
    }
    let loaded = fixtures::runtime().block_on(host.runtime.load_bytes(&host.spec, data.to_vec()));
    match loaded {
        Ok(plugin) => {
            assert_eq!(plugin.name, host.spec.name);
            drop(plugin);
        }
        // The engine and its series were set up at start; a component cannot break them.
        Err(e @ (PluginError::Engine(_) | PluginError::Metrics(_))) => {
            panic!("loading a component broke the plugin engine: {e}")
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}
