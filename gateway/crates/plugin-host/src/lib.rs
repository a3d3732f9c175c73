//! WebAssembly plugins: the wasmtime engine, loading a component for the `plugin` world, and
//! calling its hooks under a deadline, a memory cap and an output budget.
//!
//! A [`LoadedPlugin`] is one version of one plugin: compiled once, an `InstancePre` prepared
//! once, and a small pool of ready instances (each `init`ed) that requests borrow. An instance
//! whose call failed in any way is dropped, never reused; a replacement is made off the
//! request path.
//!
//! # What this crate owns
//!
//! The wasmtime host (engine, instance pools, limits, host services: `host`), the bindings of
//! the WIT contract (`bindings`, over the crate's own `wit` path, a link to the repository's
//! top-level `wit/`), and a route's chain (`chain`), which implements the proxy's
//! `gateway_proxy::hooks::RouteHooks`. Dependencies point down: config, store (content
//! versions and pins) and the proxy's hook contract; nothing here knows the binary.

// The crates below, under the names the modules use.
use gateway_config as config;
use gateway_proxy as proxy;
use gateway_store as store;

mod bindings;
mod cache;
pub mod chain;
mod host;
mod sizing;
mod wasi;

pub use sizing::{Footprint, Pool};

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};
use wasmtime::component::{Component, HasSelf, Linker, Resource, ResourceType};
use wasmtime::{Engine, InstanceAllocationStrategy, Store, Trap};

use crate::config::{PluginRuntimeSettings, PluginSpec};
use bindings::storefront::gateway::http::RequestAction;
use bindings::{Plugin, PluginPre};
use host::{
    KvStore, PluginCtx, PluginMetricFamilies, PluginOwnMetrics, RequestState, ResponseState,
    StoreState,
};

/// The world plugins must implement, as named in `wit/gateway.wit`.
pub const WORLD: &str = "storefront:gateway/plugin@0.1.0";

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The file could not be read.
    #[error("plugin {name:?}: cannot read {path}: {source}")]
    Read {
        /// Plugin name.
        name: String,
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The file's content is not the one the config pins.
    #[error("plugin {name:?}: content SHA-256 {found} does not match the pinned {expected}")]
    PinMismatch {
        /// Plugin name.
        name: String,
        /// The pin.
        expected: String,
        /// What the file hashes to.
        found: String,
    },
    /// The bytes are not a valid WebAssembly component.
    #[error("plugin {name:?}: not a WebAssembly component: {reason}")]
    NotAComponent {
        /// Plugin name.
        name: String,
        /// What the parser said.
        reason: String,
    },
    /// A component, but not one for the plugin world.
    #[error("plugin {name:?}: the component does not implement {WORLD}: {reason}")]
    WrongWorld {
        /// Plugin name.
        name: String,
        /// What is missing or mismatched.
        reason: String,
    },
    /// `init` returned an error.
    #[error("plugin {name:?}: init refused its configuration: {message}")]
    InitRefused {
        /// Plugin name.
        name: String,
        /// The plugin's message.
        message: String,
    },
    /// `init` or instantiation trapped, ran out of time or memory.
    #[error("plugin {name:?}: could not start an instance: {reason}")]
    Instantiate {
        /// Plugin name.
        name: String,
        /// What went wrong.
        reason: String,
    },
    /// Every instance slot of the engine is in use (`[plugin_runtime] max_instances`).
    #[error(
        "plugin {name:?}: every plugin instance slot is in use ([plugin_runtime] max_instances)"
    )]
    PoolFull {
        /// Plugin name.
        name: String,
    },
    /// The component does not fit the engine's pool or its own limits.
    #[error("plugin {name:?} does not fit its limits: {reason}")]
    Sizing {
        /// Plugin name.
        name: String,
        /// What does not fit, and the setting to change.
        reason: String,
    },
    /// The engine could not be configured.
    #[error("plugin engine: {0}")]
    Engine(String),
    /// Plugin metrics could not be registered.
    #[error("plugin metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// The hook a call is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// `on-request`.
    Request = 0,
    /// `on-response`.
    Response = 1,
}

impl Hook {
    /// The hook's name in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Hook::Request => "on_request",
            Hook::Response => "on_response",
        }
    }
}

/// How one hook call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Returned normally.
    Ok = 0,
    /// Answered the request itself.
    LocalResponse = 1,
    /// Trapped (including panics and `unreachable`).
    Trap = 2,
    /// Ran past its wall-clock backstop (`deadline_ms`).
    Timeout = 3,
    /// Tried to grow memory past its cap.
    Memory = 4,
    /// Produced output over its budget or malformed (bad local response).
    BadOutput = 5,
    /// No instance was free in time: every instance slot was busy for the whole wait (the
    /// node is overloaded; the request gets 503), or one could not be made.
    Unavailable = 6,
    /// Burned its fuel (`fuel_per_call`): the work bound, independent of how busy the node is.
    Fuel = 7,
}

const OUTCOMES: [Outcome; 8] = [
    Outcome::Ok,
    Outcome::LocalResponse,
    Outcome::Trap,
    Outcome::Timeout,
    Outcome::Memory,
    Outcome::BadOutput,
    Outcome::Unavailable,
    Outcome::Fuel,
];

impl Outcome {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::LocalResponse => "local_response",
            Outcome::Trap => "trap",
            Outcome::Timeout => "timeout",
            Outcome::Memory => "memory",
            Outcome::BadOutput => "bad_output",
            Outcome::Unavailable => "unavailable",
            Outcome::Fuel => "fuel",
        }
    }

    /// Whether the call failed.
    pub fn is_failure(self) -> bool {
        !matches!(self, Outcome::Ok | Outcome::LocalResponse)
    }
}

/// Series about plugin calls.
#[derive(Clone)]
struct HookSeries {
    invocations: IntCounterVec,
    duration: HistogramVec,
    fuel: HistogramVec,
    created: IntCounterVec,
    waits: IntCounterVec,
    compiles: IntCounterVec,
}

/// The engine shared by all plugins, with its deadline ticker.
pub struct PluginRuntime {
    engine: Engine,
    linker: Linker<StoreState>,
    settings: PluginRuntimeSettings,
    series: HookSeries,
    families: Arc<PluginMetricFamilies>,
    /// Key-value stores by plugin name, kept across versions and reloads.
    kv: Mutex<HashMap<String, Arc<KvStore>>>,
    /// Compiled components by content version, so a reload that brings back a version seen
    /// recently (a rollback, a flip between two files) does not compile it again.
    compiled: Mutex<Vec<(String, Compiled)>>,
    /// The pooling allocator's sizes.
    pool: Pool,
    /// Compiled components on disk, when configured.
    disk: Option<cache::DiskCache>,
    /// Signalled whenever an instance goes back to a pool or is dropped, freeing room for a
    /// call that found every slot in use.
    freed: Arc<SlotFreed>,
}

/// A compiled, checked component: what instances are made from, and what each takes.
#[derive(Clone)]
struct Compiled {
    pre: PluginPre<StoreState>,
    footprint: Footprint,
}

/// Tells calls waiting for an instance slot that one may be free. Signalling costs an atomic
/// load unless someone waits, so returning an instance stays cheap on the request path.
#[derive(Default)]
pub(crate) struct SlotFreed {
    notify: tokio::sync::Notify,
    waiting: std::sync::atomic::AtomicUsize,
}

impl SlotFreed {
    fn signal(&self) {
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.notify.notify_waiters();
        }
    }

    /// Waits for a signal or `until`, whichever comes first.
    async fn wait_until(&self, until: tokio::time::Instant) {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _ = tokio::time::timeout_at(until, self.notify.notified()).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Longest a call waiting for a slot goes without looking again (a slot freed just before it
/// began to wait sends no signal it can see).
const SLOT_RECHECK: std::time::Duration = std::time::Duration::from_millis(10);

/// Compiled components kept for reuse.
const COMPILED_CACHE: usize = 16;

impl PluginRuntime {
    /// Builds the engine (pooling allocator, epoch interruption) and starts the epoch ticker.
    /// Plugin series are registered into `registry`.
    pub fn new(
        settings: &PluginRuntimeSettings,
        registry: &Registry,
    ) -> Result<Arc<PluginRuntime>, PluginError> {
        let engine_err = |e: wasmtime::Error| PluginError::Engine(format!("{e:#}"));
        // Sized per instance for interpreters too (sizing.rs); every plugin is checked
        // against it at load.
        let pool = Pool::for_settings(settings);
        let mut cfg = wasmtime::Config::new();
        cfg.wasm_component_model(true)
            .epoch_interruption(true)
            .consume_fuel(settings.fuel)
            .max_wasm_stack(512 * 1024)
            .async_stack_size(2 << 20)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool.config()));
        if settings.perf_map {
            cfg.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&cfg).map_err(engine_err)?;
        let mut linker = Linker::new(&engine);
        Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(engine_err)?;
        // WASI without capabilities, so that components from any toolchain load (wasi.rs).
        wasi::add_to_linker(&mut linker).map_err(engine_err)?;
        // The world `use`s these types from `http`, so components also import them at the top
        // level; they are the same host types.
        let mut root = linker.root();
        root.resource("request", ResourceType::host::<RequestState>(), |_, _| {
            Ok(())
        })
        .map_err(engine_err)?;
        root.resource("response", ResourceType::host::<ResponseState>(), |_, _| {
            Ok(())
        })
        .map_err(engine_err)?;

        let tick = settings.epoch_tick;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(tick);
                }
            })
            .map_err(|e| PluginError::Engine(format!("starting the epoch thread: {e}")))?;

        let series = HookSeries {
            invocations: IntCounterVec::new(
                Opts::new(
                    "gateway_plugin_invocations_total",
                    "Plugin hook calls, by plugin, version, hook and outcome.",
                ),
                &["plugin", "version", "hook", "outcome"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "gateway_plugin_hook_duration_seconds",
                    "Time of one plugin hook call, instance checkout included.",
                )
                .buckets(
                    prometheus::exponential_buckets(0.000_001, 2.0, 22).expect("static buckets"),
                ),
                &["plugin", "hook"],
            )?,
            fuel: HistogramVec::new(
                HistogramOpts::new(
                    "gateway_plugin_fuel_per_call",
                    "Fuel (wasm work units) one completed plugin hook call burned; compare with \
                     the plugin's fuel_per_call.",
                )
                .buckets(prometheus::exponential_buckets(1000.0, 4.0, 12).expect("static buckets")),
                &["plugin", "hook"],
            )?,
            created: IntCounterVec::new(
                Opts::new(
                    "gateway_plugin_instances_created_total",
                    "Plugin instances made: `ahead` (at load, or refilling the ready pool off the \
                     request path) or `on_demand` (a request found every ready instance busy and \
                     waited for a new one).",
                ),
                &["plugin", "when"],
            )?,
            waits: IntCounterVec::new(
                Opts::new(
                    "gateway_plugin_instance_waits_total",
                    "Plugin calls that found every instance slot of the engine in use and \
                     waited for one to be freed (`outcome=\"got\"`), or gave up after the \
                     plugin's deadline_ms and failed with outcome unavailable (`outcome=\"gave_up\"`). \
                     The wait is not charged to the plugin's fuel or deadline.",
                ),
                &["plugin", "outcome"],
            )?,
            compiles: IntCounterVec::new(
                Opts::new(
                    "gateway_plugin_compiles_total",
                    "Plugin versions made ready to instantiate, by where the code came from: \
                     `compiled` (compiled now, off the serving threads), `disk` (the compile \
                     cache, compile_cache_dir) or `memory` (compiled earlier by this process).",
                ),
                &["plugin", "source"],
            )?,
        };
        registry.register(Box::new(series.invocations.clone()))?;
        registry.register(Box::new(series.duration.clone()))?;
        registry.register(Box::new(series.fuel.clone()))?;
        registry.register(Box::new(series.created.clone()))?;
        registry.register(Box::new(series.waits.clone()))?;
        registry.register(Box::new(series.compiles.clone()))?;
        Ok(Arc::new(PluginRuntime {
            linker,
            settings: settings.clone(),
            series,
            families: PluginMetricFamilies::new(registry.clone()),
            kv: Mutex::new(HashMap::new()),
            compiled: Mutex::new(Vec::new()),
            freed: Arc::new(SlotFreed::default()),
            pool,
            disk: settings
                .compile_cache
                .as_deref()
                .map(|dir| cache::DiskCache::new(dir, &engine)),
            engine,
        }))
    }

    /// Compiles and checks a component against the plugin world (no instance is made).
    pub(crate) fn compile(
        &self,
        name: &str,
        bytes: &[u8],
    ) -> Result<(Component, Compiled), PluginError> {
        let component =
            Component::new(&self.engine, bytes).map_err(|e| PluginError::NotAComponent {
                name: name.to_string(),
                reason: error_chain(&e),
            })?;
        self.link(name, component, bytes)
    }

    /// Compiles `bytes` (content `sha256`), or maps in the code an earlier run compiled
    /// (the disk cache), and checks it; returns where the code came from.
    fn compile_cached(
        &self,
        name: &str,
        bytes: &[u8],
        sha256: &str,
    ) -> Result<(Compiled, &'static str), PluginError> {
        if let Some(disk) = &self.disk {
            if let Some(component) = disk.load(&self.engine, sha256) {
                let (_, compiled) = self.link(name, component, bytes)?;
                return Ok((compiled, "disk"));
            }
        }
        let (component, compiled) = self.compile(name, bytes)?;
        if let Some(disk) = &self.disk {
            if let Err(e) = disk.save(&component, sha256) {
                tracing::warn!(plugin = %name, error = %e, "could not keep the compiled plugin in the compile cache");
            }
        }
        Ok((compiled, "compiled"))
    }

    /// Checks a compiled component against the plugin world.
    fn link(
        &self,
        name: &str,
        component: Component,
        bytes: &[u8],
    ) -> Result<(Component, Compiled), PluginError> {
        // The plugin world and capability-less WASI (wasi.rs) are all that is linked: a
        // component importing anything else is refused here, naming the import.
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::WrongWorld {
                name: name.to_string(),
                reason: error_chain(&e),
            })?;
        let pre = PluginPre::new(pre).map_err(|e| PluginError::WrongWorld {
            name: name.to_string(),
            reason: error_chain(&e),
        })?;
        let footprint = Footprint::of(&component, bytes);
        Ok((component, Compiled { pre, footprint }))
    }

    /// The pooling allocator's sizes, which every plugin is checked against at load.
    pub fn pool(&self) -> Pool {
        self.pool
    }

    /// Loads one plugin version from its file: compile, check, and start its ready instances
    /// (each runs `init`). Nothing is returned unless every step succeeded.
    pub async fn load(
        self: &Arc<Self>,
        spec: &PluginSpec,
    ) -> Result<Arc<LoadedPlugin>, PluginError> {
        let bytes = std::fs::read(&spec.path).map_err(|source| PluginError::Read {
            name: spec.name.clone(),
            path: spec.path.display().to_string(),
            source,
        })?;
        self.load_bytes(spec, bytes).await
    }

    /// As [`PluginRuntime::load`], from bytes already read.
    pub async fn load_bytes(
        self: &Arc<Self>,
        spec: &PluginSpec,
        bytes: Vec<u8>,
    ) -> Result<Arc<LoadedPlugin>, PluginError> {
        check_pin(spec, &bytes)?;
        let version = content_version(&bytes);
        let this = self.clone();
        let name = spec.name.clone();
        let cached = self
            .compiled
            .lock()
            .expect("compile cache lock")
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, p)| p.clone());
        let compiled = match cached {
            Some(c) => {
                self.series
                    .compiles
                    .with_label_values(&[spec.name.as_str(), "memory"])
                    .inc();
                c
            }
            None => {
                // Compiling takes milliseconds to tens of seconds (an interpreter), and
                // reading the disk cache is I/O: keep both off the async workers.
                let sha256 = crate::store::sha256_hex(&bytes);
                let started = Instant::now();
                let (compiled, source) = tokio::task::spawn_blocking(move || {
                    this.compile_cached(&name, &bytes, &sha256)
                })
                .await
                .map_err(|e| PluginError::Engine(format!("compile task: {e}")))??;
                self.series
                    .compiles
                    .with_label_values(&[spec.name.as_str(), source])
                    .inc();
                tracing::info!(plugin = %spec.name, version = %version, source, ms = started.elapsed().as_millis() as u64, "plugin code ready");
                let mut cache = self.compiled.lock().expect("compile cache lock");
                cache.insert(0, (version.clone(), compiled.clone()));
                cache.truncate(COMPILED_CACHE);
                compiled
            }
        };
        let Compiled { pre, footprint } = compiled;
        footprint
            .check(spec, &self.pool)
            .map_err(|reason| PluginError::Sizing {
                name: spec.name.clone(),
                reason,
            })?;
        let kv = self
            .kv
            .lock()
            .expect("kv map lock")
            .entry(spec.name.clone())
            .or_insert_with(|| Arc::new(KvStore::new(100_000)))
            .clone();
        let ctx = Arc::new(PluginCtx {
            name: spec.name.clone(),
            version: version.clone(),
            kv,
            metrics: PluginOwnMetrics::new(&spec.name, self.families.clone()),
        });
        let tick_ms = self.settings.epoch_tick.as_millis().max(1) as u64;
        let deadline_ticks = (spec.deadline.as_millis() as u64).div_ceil(tick_ms) + 1;
        // The async backstop for a call parked in a host call, where epochs cannot reach it:
        // a tick later than the epoch deadline, so a running guest is stopped by the epoch.
        let backstop = spec.deadline + self.settings.epoch_tick * 2;
        let series = |hook: Hook| {
            OUTCOMES.map(|o| {
                self.series.invocations.with_label_values(&[
                    spec.name.as_str(),
                    version.as_str(),
                    hook.label(),
                    o.label(),
                ])
            })
        };
        let plugin = Arc::new(LoadedPlugin {
            name: spec.name.clone(),
            version: version.clone(),
            spec: spec.clone(),
            engine: self.engine.clone(),
            pre,
            footprint,
            init_memory: AtomicUsize::new(0),
            memory_peak: AtomicUsize::new(0),
            ctx,
            idle: Mutex::new(Vec::new()),
            alive: Arc::new(AtomicUsize::new(0)),
            refilling: AtomicBool::new(false),
            deadline_ticks,
            backstop,
            outcomes: [series(Hook::Request), series(Hook::Response)],
            durations: [Hook::Request, Hook::Response].map(|h| {
                self.series
                    .duration
                    .with_label_values(&[spec.name.as_str(), h.label()])
            }),
            fuel_used: [Hook::Request, Hook::Response].map(|h| {
                self.series
                    .fuel
                    .with_label_values(&[spec.name.as_str(), h.label()])
            }),
            created_ahead: self
                .series
                .created
                .with_label_values(&[spec.name.as_str(), "ahead"]),
            created_on_demand: self
                .series
                .created
                .with_label_values(&[spec.name.as_str(), "on_demand"]),
            waits: ["got", "gave_up"].map(|o| {
                self.series
                    .waits
                    .with_label_values(&[spec.name.as_str(), o])
            }),
            freed: self.freed.clone(),
            last_failure: Mutex::new(None),
        });
        for _ in 0..spec.instances {
            let instance = plugin.new_instance().await?;
            plugin.created_ahead.inc();
            plugin.idle.lock().expect("pool lock").push(instance);
        }
        tracing::info!(plugin = %spec.name, version = %version, instances = spec.instances, "plugin loaded");
        Ok(plugin)
    }

    /// What a component file imports and exports, and whether it fits the plugin world.
    pub fn inspect(&self, bytes: &[u8]) -> Inspection {
        let component = match Component::new(&self.engine, bytes) {
            Ok(c) => c,
            Err(e) => {
                return Inspection {
                    imports: vec![],
                    exports: vec![],
                    verdict: Err(format!("not a WebAssembly component: {}", first_line(&e))),
                };
            }
        };
        let ty = component.component_type();
        let imports = ty
            .imports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        let exports = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        // Kept compiled, so that loading it next (`gateway plugin check`) compiles nothing.
        let verdict = match self.link("inspected", component, bytes) {
            Ok((_, compiled)) => {
                let mut cache = self.compiled.lock().expect("compile cache lock");
                cache.insert(0, (content_version(bytes), compiled));
                cache.truncate(COMPILED_CACHE);
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        };
        Inspection {
            imports,
            exports,
            verdict,
        }
    }
}

/// The result of [`PluginRuntime::inspect`].
#[derive(Debug)]
pub struct Inspection {
    /// Import names.
    pub imports: Vec<String>,
    /// Export names.
    pub exports: Vec<String>,
    /// `Ok` when the component implements the plugin world.
    pub verdict: Result<(), String>,
}

fn first_line(e: &wasmtime::Error) -> String {
    format!("{e:#}")
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Frames of a guest backtrace shown; deeper ones are counted.
const BACKTRACE_FRAMES: usize = 32;

/// What an error from wasmtime says, on one line: each cause in its chain, outermost first,
/// without the backtrace wasmtime attaches as context (see [`guest_backtrace`]).
fn error_chain(e: &wasmtime::Error) -> String {
    let backtrace = e
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .map(|bt| bt.to_string());
    let causes: Vec<String> = e
        .chain()
        .map(|c| c.to_string())
        .filter(|c| Some(c) != backtrace.as_ref())
        .map(|c| c.trim().replace('\n', " "))
        .filter(|c| !c.is_empty())
        .collect();
    if causes.is_empty() {
        first_line(e)
    } else {
        causes.join(": ")
    }
}

/// The guest's call stack when a call failed, innermost first, with function names where
/// the component has a name section (`0: hostile.wasm!hostile::trap`); empty when there is
/// none (a host-side failure).
fn guest_backtrace(e: &wasmtime::Error) -> String {
    let Some(bt) = e.downcast_ref::<wasmtime::WasmBacktrace>() else {
        return String::new();
    };
    let mut out = String::new();
    for (i, f) in bt.frames().iter().take(BACKTRACE_FRAMES).enumerate() {
        let module = f.module().name().unwrap_or("<module>");
        let func = match f.func_name() {
            Some(name) => name.to_string(),
            None => format!("<wasm function {}>", f.func_index()),
        };
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!("{i:>3}: {module}!{func}"));
    }
    if bt.frames().len() > BACKTRACE_FRAMES {
        out.push_str(&format!(
            "\n     ... {} more frames",
            bt.frames().len() - BACKTRACE_FRAMES
        ));
    }
    out
}

/// A failure in full, for messages that are read by a person (load errors, `plugin check`):
/// the reason, then the guest backtrace and the end of the guest's stderr when there are.
fn full_description(reason: &str, backtrace: &str, stderr: &str) -> String {
    let mut out = reason.to_string();
    if !backtrace.is_empty() {
        out.push_str("\n  wasm backtrace:\n");
        out.push_str(&indent(backtrace, "  "));
    }
    if !stderr.is_empty() {
        out.push_str("\n  the plugin's stderr before it failed:\n");
        out.push_str(&indent(stderr, "    "));
    }
    out
}

fn indent(text: &str, by: &str) -> String {
    text.lines()
        .map(|l| format!("{by}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Refuses content that is not what the spec pins ([`crate::store::check_pin`]).
pub fn check_pin(spec: &PluginSpec, bytes: &[u8]) -> Result<(), PluginError> {
    crate::store::check_pin(bytes, spec.sha256.as_deref()).map_err(|m| PluginError::PinMismatch {
        name: spec.name.clone(),
        expected: m.expected,
        found: m.found,
    })
}

/// A short, stable version id: the first 12 hex digits of the content's SHA-256. Defined by
/// the store; re-exported here, where plugin versions are reported.
pub use crate::store::content_version;

struct Instance {
    store: Store<StoreState>,
    plugin: Plugin,
    /// The fuel the current call was given.
    budget: u64,
    /// Told when this instance is dropped: its slot is free.
    freed: Arc<SlotFreed>,
    /// Its plugin version's count of live instances, which this one leaves when dropped.
    alive: Arc<AtomicUsize>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.alive.fetch_sub(1, Ordering::Relaxed);
        self.freed.signal();
    }
}

/// One loaded plugin version and its ready instances.
pub struct LoadedPlugin {
    /// Name from config.
    pub name: String,
    /// Content version.
    pub version: String,
    /// Limits and config it was loaded with.
    pub spec: PluginSpec,
    engine: Engine,
    pre: PluginPre<StoreState>,
    /// What one instance takes from the engine's pool.
    pub footprint: Footprint,
    /// The largest linear memory an instance reached by the end of `init`, bytes.
    init_memory: AtomicUsize,
    /// The largest linear memory an instance reached in any call so far, bytes.
    memory_peak: AtomicUsize,
    ctx: Arc<PluginCtx>,
    idle: Mutex<Vec<Instance>>,
    /// Instances of this version alive: ready, lent to a call, or being refilled.
    alive: Arc<AtomicUsize>,
    refilling: AtomicBool,
    deadline_ticks: u64,
    backstop: std::time::Duration,
    outcomes: [[IntCounter; 8]; 2],
    durations: [Histogram; 2],
    fuel_used: [Histogram; 2],
    created_ahead: IntCounter,
    created_on_demand: IntCounter,
    waits: [IntCounter; 2],
    freed: Arc<SlotFreed>,
    /// The full description of the last failed call (`trial` reports it).
    last_failure: Mutex<Option<String>>,
}

pin_project_lite::pin_project! {
    /// Runs `call`, which fails with `Err(())` once `deadline` passes. The timer is armed
    /// only when the call first has to wait (parked in an async host call such as `rank`),
    /// so a call that runs straight through, nearly every one, registers no timer; a call
    /// that never parks is bounded by its epoch deadline and fuel instead. (A struct rather
    /// than an `async fn`, which would hold the call's future twice.)
    struct Backstop<F> {
        #[pin]
        call: F,
        deadline: Instant,
        timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    }
}

fn backstop<F: std::future::Future>(call: F, deadline: Instant) -> Backstop<F> {
    Backstop {
        call,
        deadline,
        timer: None,
    }
}

impl<F: std::future::Future> std::future::Future for Backstop<F> {
    type Output = Result<F::Output, ()>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        if let std::task::Poll::Ready(out) = this.call.poll(cx) {
            return std::task::Poll::Ready(Ok(out));
        }
        let deadline = tokio::time::Instant::from_std(*this.deadline);
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        timer.as_mut().poll(cx).map(|()| Err(()))
    }
}

/// What [`LoadedPlugin::repeat`] measured.
#[derive(Debug, Clone, Copy)]
pub struct CallCost {
    /// Wall-clock time of all of them.
    pub wall: Duration,
    /// CPU time of all of them, by the caller's clock.
    pub cpu: Duration,
    /// Fuel all of them burned (`None` when fuel is off).
    pub fuel: Option<u64>,
}

/// The request `gateway plugin check` sends: `GET path` from 127.0.0.1 on a route with no
/// body access.
fn check_request(path: &str) -> RequestState {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::HOST,
        http::HeaderValue::from_static("localhost"),
    );
    headers.insert(
        http::header::USER_AGENT,
        http::HeaderValue::from_static("gateway-plugin-check"),
    );
    RequestState {
        method: http::Method::GET,
        path: path.to_string(),
        query: None,
        headers,
        client: proxy::privacy::ClientAddr::unpseudonymized(std::net::IpAddr::from([127, 0, 0, 1])),
        route: Arc::from("plugin-check"),
        variant: None,
        variants: Arc::from(Vec::<String>::new()),
        experiment: None,
        body: None,
        target_changed: false,
        ranker: None,
    }
}

/// The answer to [`check_request`] that `gateway plugin check` hands `on-response`.
fn check_response(path: &str, status: u16) -> ResponseState {
    ResponseState {
        status: http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK),
        headers: http::HeaderMap::new(),
        request_method: http::Method::GET,
        request_path: path.to_string(),
        request_query: None,
        route: Arc::from("plugin-check"),
        variant: None,
        body: None,
        body_access: false,
        body_limit: 0,
        body_changed: false,
        ranker: None,
    }
}

/// What a test call of each hook did (`gateway plugin check`).
#[derive(Debug)]
pub struct Trial {
    /// How `on-request` ended.
    pub on_request: Outcome,
    /// The status of the plugin's own answer, when it gave one.
    pub local_status: Option<u16>,
    /// How `on-response` ended; `None` when `on-request` failed.
    pub on_response: Option<Outcome>,
    /// Fuel each hook burned (`None` when fuel is off or the hook did not complete).
    pub fuel: [Option<u64>; 2],
    /// The first failure in full (reason, backtrace, stderr).
    pub failure: Option<String>,
}

impl LoadedPlugin {
    async fn new_instance(&self) -> Result<Instance, PluginError> {
        let fail = |reason: String| PluginError::Instantiate {
            name: self.name.clone(),
            reason,
        };
        let mut store = Store::new(
            &self.engine,
            StoreState::new(self.ctx.clone(), self.spec.memory_limit),
        );
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        // `init` parses configuration and builds tables: it gets INIT_FUEL_FACTOR times a
        // hook call's work and wall-clock time.
        let factor = crate::config::INIT_FUEL_FACTOR;
        store.set_epoch_deadline(self.deadline_ticks.saturating_mul(factor));
        if let Some(fuel) = self.spec.fuel_per_call {
            store
                .set_fuel(fuel.saturating_mul(factor))
                .map_err(|e| fail(first_line(&e)))?;
        } else if self.engine.get_consume_fuel() {
            store.set_fuel(u64::MAX).map_err(|e| fail(first_line(&e)))?;
        }
        store.data_mut().output_left = self.spec.max_output_bytes;
        store.data().output.start_call();
        let plugin = self.pre.instantiate_async(&mut store).await.map_err(|e| {
            let stderr = store.data().output.finish_call();
            store.data_mut().last_stderr = stderr;
            if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
                .is_some()
            {
                PluginError::PoolFull {
                    name: self.name.clone(),
                }
            } else {
                fail(self.describe_failure_in_full(store.data(), &e))
            }
        })?;
        let init = plugin.call_init(&mut store, &self.spec.config).await;
        let stderr = store.data().output.finish_call();
        store.data_mut().last_stderr = stderr;
        let reached = store.data().limiter.peak;
        self.init_memory.fetch_max(reached, Ordering::Relaxed);
        self.memory_peak.fetch_max(reached, Ordering::Relaxed);
        match init {
            Ok(Ok(())) => {
                self.alive.fetch_add(1, Ordering::Relaxed);
                Ok(Instance {
                    store,
                    plugin,
                    budget: 0,
                    freed: self.freed.clone(),
                    alive: self.alive.clone(),
                })
            }
            Ok(Err(message)) => Err(PluginError::InitRefused {
                name: self.name.clone(),
                message,
            }),
            Err(e) => Err(fail(format!(
                "init failed: {}",
                self.describe_failure_in_full(store.data(), &e)
            ))),
        }
    }

    fn take(self: &Arc<Self>) -> Option<Instance> {
        let (instance, remaining) = {
            let mut idle = self.idle.lock().expect("pool lock");
            let i = idle.pop();
            (i, idle.len())
        };
        // Only when the version has fewer instances than its ready size (one was discarded
        // after a failed call): instances lent to calls come back, and one made while they
        // are out would be dropped on their return, an instantiation and `init` for nothing
        // each time the pool runs dry at full use.
        if remaining == 0 && self.alive.load(Ordering::Relaxed) < self.spec.instances as usize {
            self.refill();
        }
        instance
    }

    /// Makes one instance in the background unless one is already being made.
    fn refill(self: &Arc<Self>) {
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            match this.new_instance().await {
                Ok(i) => {
                    this.created_ahead.inc();
                    this.put_back(i)
                }
                // Busy, not broken: requests make their own or wait.
                Err(PluginError::PoolFull { .. }) => {}
                Err(e) => {
                    tracing::warn!(plugin = %this.name, error = %e, "could not prepare a plugin instance")
                }
            }
            this.refilling.store(false, Ordering::Release);
        });
    }

    fn put_back(&self, instance: Instance) {
        self.memory_peak
            .fetch_max(instance.store.data().limiter.peak, Ordering::Relaxed);
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.len() < self.spec.instances as usize {
            idle.push(instance);
            self.freed.signal();
        }
        // Otherwise it is dropped here, which frees its slot and says so.
    }

    /// A ready instance, or a new one; when every slot of the engine is in use, waits up to
    /// the plugin's deadline for one to be freed (a bounded queue: the wait is counted, and
    /// not charged to the call's fuel or deadline).
    /// Also says whether the instance came at once from the ready pool (`false` when one
    /// had to be made or waited for: the call's own time starts later).
    async fn checkout(self: &Arc<Self>) -> Option<(Instance, bool)> {
        match self.take() {
            Some(i) => Some((i, true)),
            // Boxed: making an instance is a large future, which would otherwise be part of
            // (and moved with) every call's future.
            None => Box::pin(self.make_or_wait()).await.map(|i| (i, false)),
        }
    }

    /// [`Self::checkout`] when no instance is ready: makes one, or waits for a slot.
    async fn make_or_wait(self: &Arc<Self>) -> Option<Instance> {
        let give_up = tokio::time::Instant::now() + self.spec.deadline;
        let mut waited = false;
        loop {
            if let Some(i) = self.take() {
                if waited {
                    self.waits[0].inc();
                }
                return Some(i);
            }
            match self.new_instance().await {
                Ok(i) => {
                    self.created_on_demand.inc();
                    if waited {
                        self.waits[0].inc();
                    }
                    return Some(i);
                }
                Err(PluginError::PoolFull { .. }) => {
                    waited = true;
                    // A slot freed between the attempt and this wait is caught by the next
                    // look, at most SLOT_RECHECK later.
                    let now = tokio::time::Instant::now();
                    if now >= give_up {
                        self.waits[1].inc();
                        tracing::warn!(
                            plugin = %self.name,
                            waited_ms = self.spec.deadline.as_millis() as u64,
                            "no plugin instance slot was freed in time ([plugin_runtime] max_instances are all in use)"
                        );
                        return None;
                    }
                    self.freed.wait_until(give_up.min(now + SLOT_RECHECK)).await;
                }
                Err(e) => {
                    tracing::warn!(plugin = %self.name, error = %e, "no plugin instance available");
                    return None;
                }
            }
        }
    }

    fn prepare_call(&self, instance: &mut Instance, body_bytes: usize) {
        let data = instance.store.data_mut();
        data.output.start_call();
        data.output_left = self.spec.max_output_bytes;
        data.output_exceeded = false;
        data.limiter.exceeded = false;
        instance.store.set_epoch_deadline(self.deadline_ticks);
        if let Some(fuel) = self.spec.fuel_per_call {
            let per_byte = self.spec.fuel_per_body_byte;
            instance.budget = fuel.saturating_add(per_byte.saturating_mul(body_bytes as u64));
            let _ = instance.store.set_fuel(instance.budget);
        }
    }

    fn record(&self, hook: Hook, outcome: Outcome, started: Instant) {
        self.outcomes[hook as usize][outcome as usize].inc();
        self.durations[hook as usize].observe(started.elapsed().as_secs_f64());
    }

    /// Records the fuel a completed call burned.
    fn record_fuel(&self, hook: Hook, instance: &Instance) {
        if let (Some(_), Ok(left)) = (self.spec.fuel_per_call, instance.store.get_fuel()) {
            self.fuel_used[hook as usize].observe(instance.budget.saturating_sub(left) as f64);
        }
    }

    /// Says why a call failed, with the bound it met.
    fn describe_failure(&self, state: &StoreState, err: &wasmtime::Error) -> String {
        match classify(state, err) {
            Outcome::Timeout => format!(
                "ran past its wall-clock deadline of {} ms",
                self.spec.deadline.as_millis()
            ),
            Outcome::Fuel => format!(
                "burned all its fuel (fuel_per_call {} plus {} per body byte; raise them if \
                 the plugin is healthy and gateway_plugin_fuel_per_call shows it needs more)",
                self.spec.fuel_per_call.unwrap_or_default(),
                self.spec.fuel_per_body_byte
            ),
            _ => error_chain(err),
        }
    }

    /// [`Self::describe_failure`] with the guest backtrace and the end of its stderr.
    fn describe_failure_in_full(&self, state: &StoreState, err: &wasmtime::Error) -> String {
        full_description(
            &self.describe_failure(state, err),
            &guest_backtrace(err),
            &state.last_stderr,
        )
    }

    /// Prepares `instance` for a call (limits reset, ranking service lent).
    fn lend(
        &self,
        instance: &mut Instance,
        body_bytes: usize,
        ranker: Option<Arc<dyn host::Ranker>>,
    ) {
        self.prepare_call(instance, body_bytes);
        instance.store.data_mut().ranker = ranker;
    }

    /// Ends a call: takes the ranking service back, so a pooled instance holds no served
    /// model alive, and keeps the end of the call's stderr.
    fn take_back(&self, instance: &mut Instance) {
        let data = instance.store.data_mut();
        data.ranker = None;
        data.last_stderr = data.output.finish_call();
    }

    /// Classifies, logs and counts a failed call; the instance is dropped by the caller.
    fn failed(
        &self,
        hook: Hook,
        instance: &Instance,
        err: &wasmtime::Error,
        started: Instant,
    ) -> Outcome {
        let state = instance.store.data();
        let outcome = classify(state, err);
        *self.last_failure.lock().expect("failure lock") =
            Some(self.describe_failure_in_full(state, err));
        tracing::warn!(
            plugin = %self.name,
            version = %self.version,
            hook = hook.label(),
            outcome = outcome.label(),
            error = %self.describe_failure(state, err),
            backtrace = %guest_backtrace(err),
            stderr = %state.last_stderr,
            "plugin call failed; instance discarded"
        );
        self.record(hook, outcome, started);
        outcome
    }

    /// Logs and counts a call that was still waiting in a host call at its backstop; the
    /// instance is dropped by the caller.
    fn stuck(&self, hook: Hook, started: Instant) -> Outcome {
        tracing::warn!(
            plugin = %self.name,
            version = %self.version,
            hook = hook.label(),
            outcome = Outcome::Timeout.label(),
            error = %format!(
                "still waiting in a host call at its wall-clock deadline of {} ms",
                self.spec.deadline.as_millis()
            ),
            "plugin call failed; instance discarded"
        );
        self.record(hook, Outcome::Timeout, started);
        Outcome::Timeout
    }

    /// Runs `on-request`. The request state comes back whatever happened (edits included,
    /// even on failure: the caller decides what to keep).
    pub async fn on_request(
        self: &Arc<Self>,
        state: RequestState,
    ) -> (RequestState, Result<RequestAction, Outcome>) {
        let started = Instant::now();
        let Some((mut instance, at_once)) = self.checkout().await else {
            self.record(Hook::Request, Outcome::Unavailable, started);
            return (state, Err(Outcome::Unavailable));
        };
        let call_started = if at_once { started } else { Instant::now() };
        let ranker = state.ranker.clone();
        let body_bytes = state.body.as_ref().map_or(0, |b| b.len());
        self.lend(&mut instance, body_bytes, ranker);
        instance.store.data_mut().request = Some(state);
        let borrowed = Resource::<RequestState>::new_borrow(host::LENT);
        let result = backstop(
            instance
                .plugin
                .call_on_request(&mut instance.store, borrowed),
            call_started + self.backstop,
        )
        .await;
        self.take_back(&mut instance);
        let state = (instance.store.data_mut().request.take()).expect("the lent request is back");
        let action = match result {
            Ok(Ok(action)) => action,
            Ok(Err(e)) => {
                let outcome = self.failed(Hook::Request, &instance, &e, started);
                return (state, Err(outcome));
            }
            Err(_) => return (state, Err(self.stuck(Hook::Request, started))),
        };
        self.record_fuel(Hook::Request, &instance);
        let outcome = match &action {
            RequestAction::Continue => Outcome::Ok,
            RequestAction::Respond(local) => {
                let size: usize = local.body.len()
                    + local
                        .headers
                        .iter()
                        .map(|(k, v)| k.len() + v.len())
                        .sum::<usize>();
                if size > self.spec.max_output_bytes || !(100..=599).contains(&local.status) {
                    self.record(Hook::Request, Outcome::BadOutput, started);
                    return (state, Err(Outcome::BadOutput));
                }
                Outcome::LocalResponse
            }
        };
        self.put_back(instance);
        self.record(Hook::Request, outcome, started);
        (state, Ok(action))
    }

    /// Runs `on-response`; the response state comes back whatever happened.
    pub async fn on_response(
        self: &Arc<Self>,
        state: ResponseState,
    ) -> (ResponseState, Result<(), Outcome>) {
        let started = Instant::now();
        let Some((mut instance, at_once)) = self.checkout().await else {
            self.record(Hook::Response, Outcome::Unavailable, started);
            return (state, Err(Outcome::Unavailable));
        };
        let call_started = if at_once { started } else { Instant::now() };
        let ranker = state.ranker.clone();
        let body_bytes = state.body.as_ref().map_or(0, |b| b.len());
        self.lend(&mut instance, body_bytes, ranker);
        instance.store.data_mut().response = Some(state);
        let borrowed = Resource::<ResponseState>::new_borrow(host::LENT);
        let result = backstop(
            instance
                .plugin
                .call_on_response(&mut instance.store, borrowed),
            call_started + self.backstop,
        )
        .await;
        self.take_back(&mut instance);
        let state = (instance.store.data_mut().response.take()).expect("the lent response is back");
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let outcome = self.failed(Hook::Response, &instance, &e, started);
                return (state, Err(outcome));
            }
            Err(_) => return (state, Err(self.stuck(Hook::Response, started))),
        }
        self.record_fuel(Hook::Response, &instance);
        self.put_back(instance);
        self.record(Hook::Response, Outcome::Ok, started);
        (state, Ok(()))
    }

    /// The largest linear memory an instance had reached when its `init` returned, bytes.
    pub fn memory_after_init(&self) -> usize {
        self.init_memory.load(Ordering::Relaxed)
    }

    /// The largest linear memory an instance reached in `init` or any call that completed,
    /// bytes: what `memory_limit_bytes` must allow.
    pub fn memory_peak(&self) -> usize {
        self.memory_peak.load(Ordering::Relaxed)
    }

    /// Calls `on-request` with a `GET path` request (and `on-response` with a 200, or the
    /// plugin's own answer) as a route with no body access would: what `gateway plugin check`
    /// reports.
    pub async fn trial(self: &Arc<Self>, path: &str) -> Trial {
        let fuel_spent = |h: Hook| self.fuel_used[h as usize].get_sample_sum();
        let fuel_before = [fuel_spent(Hook::Request), fuel_spent(Hook::Response)];
        let req = check_request(path);
        let (_req, result) = self.on_request(req).await;
        let (on_request, local_status) = match &result {
            Ok(RequestAction::Continue) => (Outcome::Ok, None),
            Ok(RequestAction::Respond(local)) => (Outcome::LocalResponse, Some(local.status)),
            Err(o) => (*o, None),
        };
        let on_response = if on_request.is_failure() {
            None
        } else {
            let resp = check_response(path, local_status.unwrap_or(200));
            let (_resp, result) = self.on_response(resp).await;
            Some(result.err().unwrap_or(Outcome::Ok))
        };
        let completed = [
            !on_request.is_failure(),
            on_response.is_some_and(|o| !o.is_failure()),
        ];
        let fuel = [Hook::Request, Hook::Response].map(|h| {
            (self.spec.fuel_per_call.is_some() && completed[h as usize])
                .then(|| (fuel_spent(h) - fuel_before[h as usize]) as u64)
        });
        Trial {
            on_request,
            local_status,
            on_response,
            fuel,
            failure: self.last_failure.lock().expect("failure lock").take(),
        }
    }

    /// Calls one hook `calls` times in a row on the test request of [`Self::trial`] (or its
    /// answer), handing each call the state the last one returned, and measures the calls with
    /// `cpu` (a clock of the calling thread's CPU time, as the caller can read it): what one
    /// call costs the host and the plugin, with nothing else in the loop. An edited path or
    /// header set is put back before the next call, so the state does not grow.
    pub async fn repeat(
        self: &Arc<Self>,
        hook: Hook,
        path: &str,
        calls: u32,
        cpu: impl Fn() -> Duration,
    ) -> Result<CallCost, String> {
        let fuel_before = self.fuel_used[hook as usize].get_sample_sum();
        let failed = |o: Outcome| {
            let detail = self.last_failure.lock().expect("failure lock").take();
            format!(
                "{} failed ({}): {}",
                hook.label(),
                o.label(),
                detail.unwrap_or_default()
            )
        };
        let (wall, cpu_used) = match hook {
            Hook::Request => {
                let template = check_request(path);
                let mut req = check_request(path);
                let (started, cpu_before) = (Instant::now(), cpu());
                for _ in 0..calls {
                    let (mut back, result) = self.on_request(req).await;
                    if let Err(o) = result {
                        return Err(failed(o));
                    }
                    if back.headers.len() != template.headers.len() || back.path != template.path {
                        back.headers = template.headers.clone();
                        back.path.clone_from(&template.path);
                    }
                    req = back;
                }
                (started.elapsed(), cpu().saturating_sub(cpu_before))
            }
            Hook::Response => {
                let mut resp = check_response(path, 200);
                let (started, cpu_before) = (Instant::now(), cpu());
                for _ in 0..calls {
                    let (mut back, result) = self.on_response(resp).await;
                    if let Err(o) = result {
                        return Err(failed(o));
                    }
                    if !back.headers.is_empty() || back.status != http::StatusCode::OK {
                        back.headers.clear();
                        back.status = http::StatusCode::OK;
                    }
                    resp = back;
                }
                (started.elapsed(), cpu().saturating_sub(cpu_before))
            }
        };
        let fuel = self.fuel_used[hook as usize].get_sample_sum() - fuel_before;
        Ok(CallCost {
            wall,
            cpu: cpu_used,
            fuel: (self.spec.fuel_per_call.is_some()).then_some(fuel as u64),
        })
    }

    /// Ready instances now pooled.
    pub fn idle_instances(&self) -> usize {
        self.idle.lock().expect("pool lock").len()
    }
}

fn classify(state: &StoreState, err: &wasmtime::Error) -> Outcome {
    if state.limiter.exceeded {
        return Outcome::Memory;
    }
    if state.output_exceeded {
        return Outcome::BadOutput;
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Outcome::Timeout,
        Some(Trap::OutOfFuel) => Outcome::Fuel,
        _ => Outcome::Trap,
    }
}

/// Loads every configured plugin; the first failure stops the load and nothing is returned.
pub async fn load_all(
    runtime: &Arc<PluginRuntime>,
    specs: &[PluginSpec],
) -> Result<Vec<Arc<LoadedPlugin>>, PluginError> {
    let mut loaded = Vec::with_capacity(specs.len());
    for spec in specs {
        loaded.push(runtime.load(spec).await?);
    }
    Ok(loaded)
}

/// Whether a path looks like a component file by its header (for friendlier CLI messages).
pub fn looks_like_component(path: &Path) -> bool {
    std::fs::read(path)
        .map(|b| b.len() >= 8 && &b[..4] == b"\0asm" && b[4..8] == [0x0d, 0x00, 0x01, 0x00])
        .unwrap_or(false)
}
