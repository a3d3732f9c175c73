//! Listeners and connections: accept loops, TLS handshakes inside each connection's task,
//! HTTP/1.1 and h2 serving, the admin listener, and graceful drain.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::task::AtomicWaker;
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::{IntCounter, IntGauge, Registry};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Limits, ListenerKind, ListenerSpec};
use crate::deadline::TimerPool;
use crate::http_util::GuardedBody;
use crate::metrics::{Metrics, MetricsError};
use crate::plugin::{LoadedPlugin, PluginError, PluginRuntime};
use crate::proxy::{self, ConnInfo, Shared, Snapshot};
use crate::scoring::serving::{ModelSlot, ServedModel};
use crate::store::{Kind, Manifest, Store, StoreError};
use crate::tls::{self, TlsError};
use gateway_admin::{Activated, ArtifactError, ReloadReport, Target};
use std::collections::HashMap;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener's address could not be bound.
    #[error("listener {name:?}: cannot bind {addr}: {source}")]
    Bind {
        /// Listener name (`admin` for the admin listener).
        name: String,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS configuration was refused.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Metrics could not be registered.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// A plugin could not be loaded.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The artifact store could not be read.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A model could not be loaded, or no device could be had for it.
    #[error("model {name:?}: {message}")]
    Model {
        /// Model name (`*` for the device).
        name: String,
        /// What went wrong.
        message: String,
    },
}

/// The scoring device and series, made on first use.
#[derive(Default)]
struct ScoringState {
    device: Option<crate::scoring::ComputeDevice>,
    families: Option<crate::scoring::serving::ModelFamilies>,
}

/// Loads the config's models without touching what serves: unchanged files keep their slot;
/// changed ones are loaded into new versions that [`apply_models`] swaps in once every load
/// has succeeded.
async fn load_models(
    state: &mut ScoringState,
    config: &Config,
    registry: &Registry,
    current: &HashMap<String, Arc<ModelSlot>>,
) -> Result<Vec<(String, Result<Arc<ModelSlot>, ServedModel>)>, StartError> {
    use crate::scoring::serving;
    if config.models.is_empty() {
        return Ok(Vec::new());
    }
    let fail = |name: &str, message: String| StartError::Model {
        name: name.to_string(),
        message,
    };
    let device = match &state.device {
        Some(d) => d.clone(),
        None => {
            let (backend, allow) = (
                crate::scoring_settings::backend_choice(config.scoring.backend),
                config.scoring.allow_software_gpu,
            );
            let d =
                tokio::task::spawn_blocking(move || crate::scoring::acquire_device(backend, allow))
                    .await
                    .map_err(|e| fail("*", e.to_string()))?
                    .map_err(|e| fail("*", e.to_string()))?;
            tracing::info!(device = ?d, "scoring device");
            state.device.insert(d).clone()
        }
    };
    if state.families.is_none() {
        let families =
            serving::ModelFamilies::new(registry).map_err(|e| fail("*", e.to_string()))?;
        let (backend, adapter) = match &device {
            crate::scoring::ComputeDevice::Gpu(g) if g.is_software() => {
                ("software-gpu", g.info().name.clone())
            }
            crate::scoring::ComputeDevice::Gpu(g) => ("gpu", g.info().name.clone()),
            crate::scoring::ComputeDevice::Cpu => ("cpu", String::from("-")),
        };
        families
            .device
            .with_label_values(&[backend, adapter.as_str()])
            .set(1);
        state.families = Some(families);
    }
    let mut cfg = crate::scoring::ScoringConfig {
        backend: crate::scoring_settings::backend_choice(config.scoring.backend),
        allow_software_gpu: config.scoring.allow_software_gpu,
        ..Default::default()
    };
    cfg.batch.max_queries = config.scoring.policy.max_batch.max(cfg.batch.max_queries);
    let mut out = Vec::new();
    for spec in &config.models {
        let s = spec.clone();
        let (bytes, version) = blocking(move || {
            let bytes = std::fs::read(&s.path)
                .map_err(|e| fail(&s.name, format!("cannot read {}: {e}", s.path.display())))?;
            crate::store::check_pin(&bytes, s.sha256.as_deref())
                .map_err(|m| fail(&s.name, m.to_string()))?;
            let storage = crate::scoring_settings::table_storage(&s);
            let version = crate::scoring::serving::served_version(&bytes, storage);
            Ok::<_, StartError>((bytes, version))
        })
        .await?;
        if let Some(slot) = current
            .get(&spec.name)
            .filter(|s| s.live().version == version)
        {
            out.push((spec.name.clone(), Ok(slot.clone())));
            continue;
        }
        let (mut cfg2, dev2) = (cfg.clone(), device.clone());
        cfg2.storage = crate::scoring_settings::table_storage(spec);
        let model = tokio::task::spawn_blocking(move || {
            crate::scoring::Model::from_bytes(&bytes, &cfg2, &dev2)
        })
        .await
        .map_err(|e| fail(&spec.name, e.to_string()))?
        .map_err(|e| fail(&spec.name, format!("{}: {e}", spec.path.display())))?;
        tracing::info!(model = %spec.name, %version, path = ?model.execution_path(), "model loaded");
        out.push((spec.name.clone(), Err(ServedModel { model, version })));
    }
    Ok(out)
}

fn ranker_for(
    models: &HashMap<String, Arc<ModelSlot>>,
) -> Option<Arc<dyn crate::plugin::host::Ranker>> {
    (!models.is_empty()).then(|| {
        Arc::new(crate::ranker::ModelsRanker(models.clone()))
            as Arc<dyn crate::plugin::host::Ranker>
    })
}

/// Swaps new versions into existing slots (keeping their history) and starts new slots.
fn apply_models(
    state: &ScoringState,
    config: &Config,
    loaded: Vec<(String, Result<Arc<ModelSlot>, ServedModel>)>,
    current: &HashMap<String, Arc<ModelSlot>>,
) -> HashMap<String, Arc<ModelSlot>> {
    let mut models = HashMap::new();
    for (name, entry) in loaded {
        let slot = match entry {
            Ok(slot) => slot,
            Err(served) => match current.get(&name) {
                Some(slot) => {
                    slot.swap(served);
                    slot.clone()
                }
                None => ModelSlot::start(
                    &name,
                    served,
                    crate::scoring_settings::batch_policy(&config.scoring.policy),
                    state
                        .families
                        .as_ref()
                        .expect("families exist once a model is loaded"),
                ),
            },
        };
        models.insert(name, slot);
    }
    models
}

/// How the drain at shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every connection finished within the deadline.
    Complete,
    /// The deadline passed with connections still open; they were dropped.
    DeadlineExceeded,
}

pub(crate) struct ServeCtx {
    pub(crate) shared: Arc<Shared>,
    /// Serializes every change of what serves: reloads (admin API, SIGHUP, file watcher,
    /// [`Gateway::reload`]), uploads and rollbacks. Each reads the configuration and the
    /// store's record of active versions only while holding it. It holds the configuration
    /// as last read (the file's, or the one given), before that record is applied.
    reload_lock: tokio::sync::Mutex<Config>,
    /// The file `reload_from_file` reads, when the gateway was started from one.
    config_path: std::sync::Mutex<Option<std::path::PathBuf>>,
    /// Outcome of the last reload.
    pub(crate) last_reload: std::sync::Mutex<Option<ReloadReport>>,
    /// When the admin API accepted its uploads of the last minute (its rate limit).
    pub(crate) recent_uploads: std::sync::Mutex<std::collections::VecDeque<Instant>>,
    reloads: prometheus::IntCounterVec,
    reloads_ok: prometheus::IntCounter,
    scoring: tokio::sync::Mutex<ScoringState>,
    /// Made on first use: only configurations with plugins pay for the engine.
    plugin_runtime: tokio::sync::Mutex<Option<Arc<PluginRuntime>>>,
    registry: Registry,
    tls: ArcSwap<rustls::ServerConfig>,
    limits: Limits,
    connections: Arc<Semaphore>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    auto: auto::Builder<TokioExecutor>,
    h1: auto::Builder<TokioExecutor>,
    h2: auto::Builder<TokioExecutor>,
}

/// A running gateway: its listeners are bound and serving.
pub struct Gateway {
    ctx: Arc<ServeCtx>,
    listeners: Vec<(String, SocketAddr)>,
    admin_addr: SocketAddr,
    admin_shutdown: CancellationToken,
    draining: Arc<AtomicBool>,
    drain_timeout: Duration,
}

impl Gateway {
    /// Binds every listener (nothing serves unless all bind), then starts serving.
    pub async fn start(config: Config, registry: Registry) -> Result<Gateway, StartError> {
        let base = config.clone();
        // Uploaded versions that were active before a restart are active again.
        let config = with_record(config).await?;
        let metrics = Metrics::new(&registry)?;
        let tls_config = tls::server_config(&config.certificates)?;
        let mut plugin_runtime = None;
        let plugins = load_plugins(&mut plugin_runtime, &config, &registry, &[]).await?;
        let mut scoring = ScoringState::default();
        let loaded = load_models(&mut scoring, &config, &registry, &HashMap::new()).await?;
        let models = apply_models(&scoring, &config, loaded, &HashMap::new());
        let mut bound = Vec::new();
        for spec in &config.listeners {
            let listener =
                TcpListener::bind(spec.bind)
                    .await
                    .map_err(|source| StartError::Bind {
                        name: spec.name.clone(),
                        addr: spec.bind,
                        source,
                    })?;
            bound.push((spec.clone(), listener));
        }
        let admin_listener = TcpListener::bind(config.admin.bind)
            .await
            .map_err(|source| StartError::Bind {
                name: "admin".into(),
                addr: config.admin.bind,
                source,
            })?;
        let admin_addr = admin_listener
            .local_addr()
            .expect("bound socket has an address");

        let limits = config.limits.clone();
        let drain_timeout = config.server.drain_timeout;
        let config = Arc::new(config);
        let shared = Arc::new(Shared {
            state: ArcSwap::from_pointee(Snapshot {
                ranker: ranker_for(&models),
                models,
                ..Snapshot::build(
                    config.clone(),
                    &metrics,
                    &|route| crate::plugin::chain::bind(&plugins, route),
                    None,
                )
            }),
            metrics,
        });
        let reloads = prometheus::IntCounterVec::new(
            prometheus::Opts::new("gateway_reload_failures_total", "Configuration reloads that failed and left the old state serving, by kind (config, tls, plugin, model, store)."),
            &["kind"],
        )
        .map_err(MetricsError::from)?;
        registry
            .register(Box::new(reloads.clone()))
            .map_err(MetricsError::from)?;
        let reloads_ok =
            prometheus::IntCounter::new("gateway_reloads_total", "Configuration reloads applied.")
                .map_err(MetricsError::from)?;
        registry
            .register(Box::new(reloads_ok.clone()))
            .map_err(MetricsError::from)?;
        let ctx = Arc::new(ServeCtx {
            shared,
            reload_lock: tokio::sync::Mutex::new(base),
            config_path: std::sync::Mutex::new(None),
            last_reload: std::sync::Mutex::new(None),
            recent_uploads: std::sync::Mutex::new(std::collections::VecDeque::new()),
            reloads,
            reloads_ok,
            scoring: tokio::sync::Mutex::new(scoring),
            plugin_runtime: tokio::sync::Mutex::new(plugin_runtime),
            registry: registry.clone(),
            tls: ArcSwap::new(tls_config),
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            auto: http_builder(&limits, true),
            h1: http_builder(&limits, false).http1_only(),
            h2: http_builder(&limits, false).http2_only(),
            limits,
        });

        let mut listeners = Vec::new();
        for (spec, listener) in bound {
            let addr = listener.local_addr().expect("bound socket has an address");
            tracing::info!(listener = %spec.name, %addr, kind = ?spec.kind, "listening");
            listeners.push((spec.name.clone(), addr));
            tokio::spawn(accept_loop(ctx.clone(), listener, spec));
        }
        let draining = Arc::new(AtomicBool::new(false));
        let admin_shutdown = CancellationToken::new();
        tracing::info!(addr = %admin_addr, "admin listening");
        tokio::spawn(crate::admin::serve(
            admin_listener,
            registry,
            ctx.clone(),
            draining.clone(),
            admin_shutdown.clone(),
        ));
        Ok(Gateway {
            ctx,
            listeners,
            admin_addr,
            admin_shutdown,
            draining,
            drain_timeout,
        })
    }

    /// The bound address of a listener, by name.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    /// Every listener's name and bound address.
    pub fn listeners(&self) -> &[(String, SocketAddr)] {
        &self.listeners
    }

    /// A served model's slot, by name (for swaps and rollbacks).
    pub fn model(&self, name: &str) -> Option<Arc<ModelSlot>> {
        self.ctx.shared.state.load().models.get(name).cloned()
    }

    /// The admin listener's bound address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The configuration being served.
    pub fn config(&self) -> Arc<Config> {
        self.ctx.shared.state.load().config.clone()
    }

    /// Replaces routes, upstreams, plugins and certificates with those of `config`; listeners
    /// and limits stay as started. As at start, a plugin or model with uploads serves the
    /// version the store records as active. Everything new is built (plugins compiled and
    /// their instances started) before anything is swapped; on error nothing changes.
    pub async fn reload(&self, config: Config) -> Result<(), StartError> {
        self.ctx.reload(config).await
    }

    /// Remembers the file the configuration came from, for [`Gateway::reload_from_file`],
    /// the admin API and SIGHUP.
    pub fn set_config_path(&self, path: &std::path::Path) {
        *self.ctx.config_path.lock().expect("config path lock") = Some(path.to_path_buf());
    }

    /// Watches the config file (set with [`Gateway::set_config_path`]) and the files it names,
    /// reloading after `debounce` of quiet whenever their content changes.
    pub fn watch_config(
        &self,
        debounce: Duration,
    ) -> Result<crate::watch::FileWatch, crate::watch::WatchError> {
        let path = self
            .ctx
            .config_path
            .lock()
            .expect("config path lock")
            .clone()
            .ok_or_else(|| {
                crate::watch::WatchError::from(notify::Error::generic("no config file to watch"))
            })?;
        crate::watch::start(self.ctx.clone(), path, debounce)
    }

    /// Reads the configuration file again and applies it; on any error the serving state is
    /// untouched, and the error is logged, counted and kept for the admin API.
    pub async fn reload_from_file(&self) -> Result<(), ReloadError> {
        self.ctx.reload_from_file().await
    }

    /// Stops accepting, lets in-flight requests finish until the drain deadline, then stops
    /// the admin listener. `/readyz` answers 503 from the first moment.
    pub async fn shutdown(self) -> DrainOutcome {
        self.draining.store(true, Ordering::SeqCst);
        tracing::info!(
            deadline_ms = self.drain_timeout.as_millis() as u64,
            "draining"
        );
        self.ctx.shutdown.cancel();
        self.ctx.tracker.close();
        let outcome = match tokio::time::timeout(self.drain_timeout, self.ctx.tracker.wait()).await
        {
            Ok(()) => DrainOutcome::Complete,
            Err(_) => {
                tracing::warn!(
                    open = self.ctx.tracker.len(),
                    "drain deadline passed with connections open"
                );
                DrainOutcome::DeadlineExceeded
            }
        };
        self.admin_shutdown.cancel();
        outcome
    }
}

/// Loads the config's plugins, reusing a loaded one from `previous` when its settings and
/// file content are unchanged (so its warm instances carry over).
async fn load_plugins(
    runtime: &mut Option<Arc<PluginRuntime>>,
    config: &Config,
    registry: &Registry,
    previous: &[Arc<LoadedPlugin>],
) -> Result<Vec<Arc<LoadedPlugin>>, PluginError> {
    if config.plugins.is_empty() {
        return Ok(Vec::new());
    }
    let rt = match runtime {
        Some(rt) => rt.clone(),
        None => runtime
            .insert(PluginRuntime::new(&config.plugin_runtime, registry)?)
            .clone(),
    };
    let mut loaded = Vec::with_capacity(config.plugins.len());
    for spec in &config.plugins {
        let s = spec.clone();
        let (bytes, version) = blocking(move || {
            let bytes = std::fs::read(&s.path).map_err(|source| PluginError::Read {
                name: s.name.clone(),
                path: s.path.display().to_string(),
                source,
            })?;
            crate::plugin::check_pin(&s, &bytes)?;
            let version = crate::store::content_version(&bytes);
            Ok::<_, PluginError>((bytes, version))
        })
        .await?;
        match previous
            .iter()
            .find(|p| p.spec == *spec && p.version == version)
        {
            Some(p) => loaded.push(p.clone()),
            None => loaded.push(rt.load_bytes(spec, bytes).await?),
        }
    }
    Ok(loaded)
}

/// Why a reload from the config file did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The gateway was not started from a file.
    #[error("the gateway was not started from a config file; nothing to reload")]
    NoFile,
    /// The file is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Something in the new configuration could not be built.
    #[error(transparent)]
    Apply(#[from] StartError),
}

impl ReloadError {
    /// Metric label for the failure.
    pub fn kind(&self) -> &'static str {
        match self {
            ReloadError::NoFile => "no_file",
            ReloadError::Config(_) => "config",
            ReloadError::Apply(StartError::Tls(_)) => "tls",
            ReloadError::Apply(StartError::Plugin(_)) => "plugin",
            ReloadError::Apply(StartError::Model { .. }) => "model",
            ReloadError::Apply(StartError::Store(_)) => "store",
            ReloadError::Apply(_) => "other",
        }
    }
}

/// Runs blocking work (file I/O, hashing, fsync) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("blocking task did not finish: {e}"),
        },
    }
}

/// Opens the store of `config` and reads its record of active versions (none without
/// `[store] dir`).
async fn read_record(config: &Config) -> Result<Option<(Store, Manifest)>, StoreError> {
    let Some(dir) = config.store_dir.clone() else {
        return Ok(None);
    };
    blocking(move || {
        let store = Store::open(&dir)?;
        let record = store.manifest()?;
        Ok(Some((store, record)))
    })
    .await
}

/// Points every plugin and model that has uploads at its active version in `record`.
fn apply_record(config: &mut Config, store: &Store, record: &Manifest) {
    for p in &mut config.plugins {
        if let Some(e) = record.plugins.get(&p.name) {
            p.path = store.blob_path(Kind::Plugin, &e.active);
        }
    }
    for m in &mut config.models {
        if let Some(e) = record.models.get(&m.name) {
            m.path = store.blob_path(Kind::Model, &e.active);
        }
    }
}

/// `config` with the store's current record of active versions applied.
async fn with_record(mut config: Config) -> Result<Config, StoreError> {
    if let Some((store, record)) = read_record(&config).await? {
        apply_record(&mut config, &store, &record);
    }
    Ok(config)
}

impl gateway_admin::Control for ServeCtx {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.state.load_full()
    }

    fn plugins(&self, snapshot: &Snapshot) -> Vec<gateway_admin::PluginStatus> {
        crate::plugin::chain::in_use(snapshot)
            .into_iter()
            .flatten()
            .map(|p| gateway_admin::PluginStatus {
                name: p.name.clone(),
                version: p.version.clone(),
                idle_instances: p.idle_instances(),
            })
            .collect()
    }

    fn last_reload(&self) -> Option<ReloadReport> {
        self.last_reload.lock().expect("reload report lock").clone()
    }

    fn recent_uploads(&self) -> &std::sync::Mutex<std::collections::VecDeque<Instant>> {
        &self.recent_uploads
    }

    async fn reload_from_file(&self) -> Result<(), gateway_admin::ReloadRefused> {
        ServeCtx::reload_from_file(self).await.map_err(|e| match e {
            ReloadError::NoFile => gateway_admin::ReloadRefused::NoFile(e.to_string()),
            e => gateway_admin::ReloadRefused::Failed(e.to_string()),
        })
    }

    async fn activate(
        &self,
        kind: Kind,
        name: &str,
        target: Target<'_>,
    ) -> Result<Activated, ArtifactError> {
        ServeCtx::activate(self, kind, name, target).await
    }

    async fn forget(
        &self,
        kind: Kind,
        name: &str,
        users: impl FnOnce(&Config) -> Vec<String> + Send,
    ) -> Result<(), ArtifactError> {
        ServeCtx::forget(self, kind, name, users).await
    }
}

impl ServeCtx {
    /// Builds everything the new configuration needs, then swaps it in.
    pub(crate) async fn reload(&self, config: Config) -> Result<(), StartError> {
        let mut base = self.reload_lock.lock().await;
        self.apply_locked(&mut base, config).await
    }

    /// With the reload lock held: applies the store's record to `next` (the configuration as
    /// read), builds it and swaps it in; `base` becomes `next` once it serves.
    async fn apply_locked(&self, base: &mut Config, next: Config) -> Result<(), StartError> {
        let config = with_record(next.clone()).await?;
        self.build_and_swap(config, None).await?;
        *base = next;
        Ok(())
    }

    /// With the reload lock held: builds `config`, writes `record` to the store when given
    /// (after everything loaded, before anything changes), then swaps. On error nothing
    /// changes.
    async fn build_and_swap(
        &self,
        config: Config,
        record: Option<(Store, Manifest)>,
    ) -> Result<(), StartError> {
        let certificates = config.certificates.clone();
        let tls_config = blocking(move || tls::server_config(&certificates)).await?;
        let current = self.shared.state.load_full();
        let previous: Vec<Arc<LoadedPlugin>> = crate::plugin::chain::in_use(&current)
            .into_iter()
            .flatten()
            .collect();
        let plugins = {
            let mut runtime = self.plugin_runtime.lock().await;
            load_plugins(&mut runtime, &config, &self.registry, &previous).await?
        };
        let mut scoring = self.scoring.lock().await;
        let loaded = load_models(&mut scoring, &config, &self.registry, &current.models).await?;
        if let Some((store, record)) = record {
            blocking(move || store.save(&record)).await?;
        }
        // Everything new is loaded and recorded; from here on nothing can fail.
        let models = apply_models(&scoring, &config, loaded, &current.models);
        let mut snapshot = Snapshot::build(
            Arc::new(config),
            &self.shared.metrics,
            &|route| crate::plugin::chain::bind(&plugins, route),
            Some(&current),
        );
        snapshot.ranker = ranker_for(&models);
        snapshot.models = models;
        snapshot.generation = current.generation + 1;
        self.shared.state.store(Arc::new(snapshot));
        self.tls.store(tls_config);
        Ok(())
    }

    /// Reloads from the remembered file and records the outcome. The file and the store's
    /// record are read under the reload lock, so a reload never applies what an upload or
    /// another reload that finished before it replaced.
    pub(crate) async fn reload_from_file(&self) -> Result<(), ReloadError> {
        let path = self.config_path.lock().expect("config path lock").clone();
        let mut base = self.reload_lock.lock().await;
        let result = match path {
            None => Err(ReloadError::NoFile),
            Some(path) => match blocking(move || Config::load(&path)).await {
                Ok(next) => self
                    .apply_locked(&mut base, next)
                    .await
                    .map_err(ReloadError::from),
                Err(e) => Err(ReloadError::from(e)),
            },
        };
        match &result {
            Ok(()) => {
                self.reloads_ok.inc();
                tracing::info!("configuration reloaded");
            }
            Err(e) => {
                self.reloads.with_label_values(&[e.kind()]).inc();
                tracing::error!(error = %e, "reload failed; the previous configuration keeps serving");
            }
        }
        *self.last_reload.lock().expect("reload report lock") = Some(ReloadReport {
            at: std::time::SystemTime::now(),
            error: result.as_ref().err().map(|e| e.to_string()),
        });
        result
    }

    /// Makes `target` the active version of `name` in one serialized step: under the reload
    /// lock, reads the store's record, builds the configuration last read with the record
    /// as it will be, records it, and swaps. On error neither the record nor what serves
    /// changes. A model without uploads rolls back through the versions held in memory.
    pub(crate) async fn activate(
        &self,
        kind: Kind,
        name: &str,
        target: Target<'_>,
    ) -> Result<Activated, ArtifactError> {
        let base = self.reload_lock.lock().await;
        let configured = match kind {
            Kind::Plugin => base.plugins.iter().any(|p| p.name == name),
            Kind::Model => base.models.iter().any(|m| m.name == name),
        };
        if !configured {
            return Err(ArtifactError::NotConfigured(name.to_string()));
        }
        let stored = read_record(&base).await.map_err(ArtifactError::Store)?;
        let entry = stored
            .as_ref()
            .and_then(|(_, record)| record.entries(kind).get(name));
        let sha = match (target, entry) {
            (Target::Upload(sha), _) => sha,
            (Target::Rollback(version), Some(entry)) => entry
                .versions
                .iter()
                .find(|s| **s != entry.active && version.is_none_or(|v| s.starts_with(v)))
                .cloned()
                .ok_or_else(|| {
                    ArtifactError::NothingToRollBackTo(format!(
                        "{name:?} has no other version to roll back to"
                    ))
                })?,
            (Target::Rollback(version), None) if kind == Kind::Model => {
                let slot = self.shared.state.load().models.get(name).cloned();
                let slot = slot.ok_or_else(|| ArtifactError::NotConfigured(name.into()))?;
                let version = slot
                    .rollback(version)
                    .map_err(ArtifactError::NothingToRollBackTo)?;
                return Ok(Activated::Held { version, slot });
            }
            (Target::Rollback(_), None) if stored.is_none() => return Err(ArtifactError::NoStore),
            (Target::Rollback(_), None) => return Err(ArtifactError::NoUploads(name.to_string())),
        };
        let Some((store, mut record)) = stored else {
            return Err(ArtifactError::NoStore);
        };
        record.activate(kind, name, &sha);
        let mut config = base.clone();
        apply_record(&mut config, &store, &record);
        match self.build_and_swap(config, Some((store, record))).await {
            Ok(()) => Ok(Activated::Stored(sha)),
            Err(StartError::Store(e)) => Err(ArtifactError::Store(e)),
            Err(e) => Err(ArtifactError::Rejected(Box::new(e))),
        }
    }

    /// Forgets the uploads of `name` unless the serving configuration uses it (`users` lists
    /// what does), serialized with reloads, uploads and rollbacks.
    pub(crate) async fn forget(
        &self,
        kind: Kind,
        name: &str,
        users: impl FnOnce(&Config) -> Vec<String>,
    ) -> Result<(), ArtifactError> {
        let base = self.reload_lock.lock().await;
        let used = users(&self.shared.state.load().config);
        if !used.is_empty() {
            return Err(ArtifactError::InUse {
                name: name.to_string(),
                users: used.join(", "),
            });
        }
        let (store, _) = read_record(&base)
            .await
            .map_err(ArtifactError::Store)?
            .ok_or(ArtifactError::NoStore)?;
        let owned = name.to_string();
        match blocking(move || store.remove(kind, &owned)).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(ArtifactError::NoUploads(name.to_string())),
            Err(e) => Err(ArtifactError::Store(e)),
        }
    }
}

/// `hyper_head_timer`: hyper enforces the HTTP/1.1 header read timeout. Without it the
/// connection's watchdog must (see [`Connection::serve_http`]); hyper's timer costs a timer
/// registration and removal per request, about 2% of a proxied request's instructions.
fn http_builder(limits: &Limits, hyper_head_timer: bool) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    if hyper_head_timer {
        b.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout);
    } else {
        b.http1().header_read_timeout(None);
    }
    b.http1()
        .max_buf_size(limits.max_header_bytes)
        // One flat buffer per write: behind TLS this makes one record instead of one per
        // slice, which measured faster than vectored writes.
        .writev(false)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes.min(u32::MAX as usize) as u32)
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

async fn accept_loop(ctx: Arc<ServeCtx>, listener: TcpListener, spec: ListenerSpec) {
    let (kind, reject_misdirected) = (spec.kind, spec.reject_misdirected);
    let name: Arc<str> = spec.name.into();
    let metrics = &ctx.shared.metrics;
    let active = metrics.active_connections.with_label_values(&[&*name]);
    let accepted = metrics.connections.with_label_values(&[&*name]);
    let handshake_failures = metrics.tls_handshake_failures.with_label_values(&[&*name]);
    loop {
        let permit = tokio::select! {
            p = ctx.connections.clone().acquire_owned() => p.expect("semaphore is never closed"),
            _ = ctx.shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = ctx.shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        accepted.inc();
        let conn = Connection {
            ctx: ctx.clone(),
            active: ActiveGuard::new(active.clone()),
            handshake_failures: handshake_failures.clone(),
            listener: name.clone(),
            reject_misdirected,
            _permit: permit,
        };
        ctx.tracker.spawn(conn.serve(stream, peer, kind));
    }
    tracing::info!(listener = %name, "stopped accepting");
}

struct ActiveGuard(IntGauge);

impl ActiveGuard {
    fn new(g: IntGauge) -> Self {
        g.inc();
        ActiveGuard(g)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What a connection speaks, as far as serving it differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Speaks {
    /// HTTP/1.1 (negotiated by ALPN, or by its absence).
    Http1,
    /// h2 (negotiated by ALPN).
    Http2,
    /// Plain HTTP: hyper tells HTTP/1.1 from h2c by the first bytes.
    Either,
}

struct Connection {
    ctx: Arc<ServeCtx>,
    active: ActiveGuard,
    handshake_failures: IntCounter,
    listener: Arc<str>,
    /// The listener's `reject_misdirected`.
    reject_misdirected: bool,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Requests in flight on one connection and when it last became idle, for its watchdog.
struct Activity {
    in_flight: AtomicUsize,
    idle_since_ms: AtomicU64,
    start: Instant,
}

/// Held by a response body while it streams.
struct RequestActive(Arc<Activity>);

impl RequestActive {
    fn new(a: &Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        RequestActive(a.clone())
    }
}

impl Drop for RequestActive {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_ms
            .store(a.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves once the connection has had no request in flight for `limit`. One timer per
/// connection, re-armed only when it fires: requests themselves touch no timer.
async fn idle_expired(activity: Arc<Activity>, limit: Duration) {
    let mut wait = limit;
    loop {
        tokio::time::sleep(wait).await;
        if activity.in_flight.load(Ordering::Relaxed) > 0 {
            wait = limit;
            continue;
        }
        let since = Duration::from_millis(activity.idle_since_ms.load(Ordering::Relaxed));
        let idle_for = activity.start.elapsed().saturating_sub(since);
        if idle_for >= limit {
            return;
        }
        wait = limit - idle_for;
    }
}

/// Why a connection's watchdog ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// The gateway is shutting down.
    Shutdown,
    /// No request in flight for the connection's limit.
    Idle,
}

/// Sets a flag and wakes the task that polls an [`OnWake`].
struct WakeFlag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Polls `F` on its first poll and then only after `F`'s own waker fired, instead of on
/// every wake-up of the task that owns it. A connection task wakes for every read and write
/// while its watchdog (a shutdown token and a timer, each polled under a lock or a timer check)
/// is woken about never; polling it each time cost about 1.5% of a proxied request.
struct OnWake<F> {
    fut: Pin<Box<F>>,
    flag: Arc<WakeFlag>,
    waker: Waker,
}

impl<F: Future> OnWake<F> {
    fn new(fut: F) -> Self {
        let flag = Arc::new(WakeFlag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        OnWake {
            fut: Box::pin(fut),
            waker: Waker::from(flag.clone()),
            flag,
        }
    }
}

impl<F: Future> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.fut
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

impl Connection {
    async fn serve(self, stream: TcpStream, peer: SocketAddr, kind: ListenerKind) {
        match kind {
            ListenerKind::Https => {
                let acceptor = tokio_rustls::TlsAcceptor::from(self.ctx.tls.load_full());
                let handshake = tokio::time::timeout(
                    self.ctx.limits.header_read_timeout,
                    acceptor.accept(stream),
                );
                let tls_stream = tokio::select! {
                    r = handshake => match r {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            self.handshake_failures.inc();
                            tracing::debug!(listener = %self.listener, %peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            self.handshake_failures.inc();
                            tracing::debug!(listener = %self.listener, %peer, "TLS handshake timed out");
                            return;
                        }
                    },
                    _ = self.ctx.shutdown.cancelled() => return,
                };
                let (builder, speaks) = if tls_stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                    (&self.ctx.h2, Speaks::Http2)
                } else {
                    (&self.ctx.h1, Speaks::Http1)
                };
                let cert_names = self.reject_misdirected.then(|| {
                    let sni = tls_stream.get_ref().1.server_name();
                    let state = self.ctx.shared.state.load();
                    crate::tls::chosen_names(&state.config.certificates, sni)
                        .map(Into::into)
                        .unwrap_or_default()
                });
                let info = ConnInfo {
                    peer,
                    proto: "https",
                    timers: TimerPool::default(),
                    cert_names,
                };
                self.serve_http(builder, TokioIo::new(tls_stream), info, None, speaks)
                    .await;
            }
            ListenerKind::HttpServe => {
                let info = ConnInfo {
                    peer,
                    proto: "http",
                    timers: TimerPool::default(),
                    cert_names: None,
                };
                self.serve_http(
                    &self.ctx.auto,
                    TokioIo::new(stream),
                    info,
                    None,
                    Speaks::Either,
                )
                .await;
            }
            ListenerKind::HttpRedirect { https_port } => {
                let info = ConnInfo {
                    peer,
                    proto: "http",
                    timers: TimerPool::default(),
                    cert_names: None,
                };
                self.serve_http(
                    &self.ctx.auto,
                    TokioIo::new(stream),
                    info,
                    Some(https_port),
                    Speaks::Either,
                )
                .await;
            }
        }
        drop(self.active);
    }

    /// Serves one connection. On h2 requests are answered by a boxed future, because hyper
    /// spawns a task per h2 stream and moves the request future into it and out of it
    /// (a pointer instead of ~3 KB; on HTTP/1.1 hyper already boxes it, so there it is not).
    ///
    /// A watchdog ends the connection after `idle_timeout` with no request in flight, and on
    /// shutdown. On `Speaks::Http1` it also enforces the header read timeout, which hyper's
    /// HTTP/1.1 server applies from the moment it waits for a head (the end of the previous
    /// response, or the connection's start) to the head's last byte: with no request in flight
    /// for the shorter of the two limits, the connection is closed.
    async fn serve_http<I>(
        &self,
        builder: &auto::Builder<TokioExecutor>,
        io: I,
        info: ConnInfo,
        redirect_port: Option<u16>,
        speaks: Speaks,
    ) where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            start: Instant::now(),
        });
        let shared = self.ctx.shared.clone();
        let peer = info.peer;
        let info = Arc::new(info);
        let service_activity = activity.clone();
        let answer = move |req: Request<Incoming>| {
            let guard = RequestActive::new(&service_activity);
            let shared = shared.clone();
            let info = info.clone();
            async move {
                let resp = match redirect_port {
                    Some(port) => proxy::redirect(&req, port),
                    None => proxy::handle(&shared, &info, req).await,
                };
                Ok::<_, Infallible>(resp.map(|b| GuardedBody::new(b, guard)))
            }
        };
        let limits = &self.ctx.limits;
        let limit = match speaks {
            Speaks::Http1 => limits.idle_timeout.min(limits.header_read_timeout),
            Speaks::Http2 | Speaks::Either => limits.idle_timeout,
        };
        let shutdown = self.ctx.shutdown.clone();
        let mut watchdog = OnWake::new(async move {
            tokio::select! {
                _ = shutdown.cancelled() => Expiry::Shutdown,
                _ = idle_expired(activity, limit) => Expiry::Idle,
            }
        });
        // The same loop over two connection types (the services differ in their future).
        macro_rules! drive {
            ($conn:expr) => {{
                let conn = $conn;
                tokio::pin!(conn);
                let mut closing = false;
                loop {
                    tokio::select! {
                        biased;
                        res = conn.as_mut() => {
                            if let Err(e) = res {
                                tracing::debug!(listener = %self.listener, %peer, error = %e, "connection ended with an error");
                            }
                            break;
                        }
                        why = &mut watchdog, if !closing => {
                            // An HTTP/1.1 connection with no request in flight is idle or has
                            // an incomplete head; hyper's graceful shutdown would leave a first
                            // request's partial head waiting, so close it outright.
                            if why == Expiry::Idle && speaks == Speaks::Http1 {
                                tracing::debug!(listener = %self.listener, %peer, "closing an idle HTTP/1.1 connection or one with a slow request head");
                                break;
                            }
                            closing = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            }};
        }
        if speaks == Speaks::Http2 {
            drive!(builder.serve_connection(io, service_fn(move |req| Box::pin(answer(req)))))
        } else {
            drive!(builder.serve_connection(io, service_fn(answer)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Pending until released; counts its polls and keeps the last waker it was given.
    struct Probe {
        polls: Arc<AtomicUsize>,
        waker: Arc<Mutex<Option<Waker>>>,
        ready: Arc<AtomicBool>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.ready.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    /// Counts wake-ups of the task that polls the `OnWake`.
    struct CountWakes(AtomicUsize);

    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn on_wake_polls_its_future_only_after_the_future_asked_for_it() {
        let polls = Arc::new(AtomicUsize::new(0));
        let inner_waker = Arc::new(Mutex::new(None));
        let ready = Arc::new(AtomicBool::new(false));
        let mut fut = OnWake::new(Probe {
            polls: polls.clone(),
            waker: inner_waker.clone(),
            ready: ready.clone(),
        });
        let outer = Arc::new(CountWakes(AtomicUsize::new(0)));
        let outer_waker = Waker::from(outer.clone());
        let mut cx = Context::from_waker(&outer_waker);

        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        assert_eq!(
            polls.load(Ordering::SeqCst),
            1,
            "the first poll reaches the future"
        );
        for _ in 0..5 {
            assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "other wake-ups do not");

        ready.store(true, Ordering::SeqCst);
        inner_waker.lock().unwrap().take().unwrap().wake();
        assert_eq!(
            outer.0.load(Ordering::SeqCst),
            1,
            "its own wake-up wakes the task"
        );
        assert!(Pin::new(&mut fut).poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }
}
