//! Building what a configuration needs before it can serve: the TLS configuration, the
//! plugins (compiled, their instances started) and the models (loaded onto the scoring device),
//! then the proxy's [`Snapshot`]. Start and every reload go through [`Loader::build`], which
//! never touches what serves; the caller swaps the result in.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus::{IntCounterVec, Opts, Registry};

use crate::config::{Config, EvalSpec};
use crate::metrics::Metrics;
use crate::plugin::{LoadedPlugin, PluginError, PluginRuntime};
use crate::proxy::Snapshot;
use crate::scoring::eval::{evaluate, EvalError, HeldOut, Report};
use crate::scoring::serving::{ModelSlot, ServedModel};
use crate::scoring::Model;
use crate::server::StartError;
use crate::store::{Kind, Manifest, Store, StoreError};
use crate::tls;

/// Builds configurations into snapshots, keeping what outlives one configuration: the plugin
/// engine and the scoring device, each made on first use (only configurations with plugins
/// or models pay for them).
pub(crate) struct Loader {
    registry: Registry,
    plugin_runtime: tokio::sync::Mutex<Option<Arc<PluginRuntime>>>,
    scoring: tokio::sync::Mutex<ScoringState>,
    /// Plugins and models pulled from registries: resolved before each build.
    pub(crate) oci: crate::oci::Sources,
}

/// A configuration built and ready to swap in.
pub(crate) struct Built {
    /// The proxy's new state.
    pub(crate) snapshot: Snapshot,
    /// The listeners' new TLS configuration.
    pub(crate) tls: Arc<rustls::ServerConfig>,
}

impl Loader {
    pub(crate) fn new(registry: Registry) -> Loader {
        Loader {
            registry: registry.clone(),
            plugin_runtime: tokio::sync::Mutex::new(None),
            scoring: tokio::sync::Mutex::new(ScoringState::default()),
            oci: crate::oci::Sources::new(registry.clone()),
        }
    }

    /// Builds `config` (the store's record already applied). What `current` serves is reused
    /// where nothing changed: pools with their connections and health, plugins with their warm
    /// instances, model slots with their history. `record` is written to the store after
    /// everything loaded and before the snapshot is returned, so a failed build records
    /// nothing. Holds the scoring state while building: one build at a time.
    pub(crate) async fn build(
        &self,
        config: Config,
        metrics: &Metrics,
        current: Option<&Snapshot>,
        record: Option<(Store, Manifest)>,
    ) -> Result<Built, StartError> {
        let certificates = config.certificates.clone();
        let tls = blocking(move || tls::server_config(&certificates)).await?;
        let previous: Vec<Arc<LoadedPlugin>> = current
            .map(|c| {
                crate::plugin::chain::in_use(c)
                    .into_iter()
                    .flatten()
                    .collect()
            })
            .unwrap_or_default();
        let plugins = {
            let mut runtime = self.plugin_runtime.lock().await;
            load_plugins(&mut runtime, &config, &self.registry, &previous).await?
        };
        let no_models = HashMap::new();
        let current_models = current.map_or(&no_models, |c| &c.models);
        let mut scoring = self.scoring.lock().await;
        let loaded = load_models(&mut scoring, &config, &self.registry, current_models).await?;
        let resumed = crate::rollouts::persisted(&config).await;
        if let Some((store, record)) = record {
            blocking(move || store.save(&record)).await?;
        }
        // Everything new is loaded and recorded; from here on nothing can fail.
        let models = apply_models(&scoring, &config, loaded, current_models);
        let mut snapshot = Snapshot::build(
            Arc::new(config),
            metrics,
            &|route| crate::plugin::chain::bind(&plugins, route),
            current,
            &resumed,
        );
        snapshot.ranker = ranker_for(&models);
        snapshot.models = models;
        Ok(Built { snapshot, tls })
    }
}

/// The scoring device and series, made on first use, and the offline reports of the versions
/// that serve or were last loaded.
#[derive(Default)]
struct ScoringState {
    device: Option<crate::scoring::ComputeDevice>,
    families: Option<crate::scoring::serving::ModelFamilies>,
    /// `gateway_model_evaluations_total{model,outcome}`.
    evaluations: Option<IntCounterVec>,
    reports: HashMap<ReportKey, Report>,
}

/// A report is valid for one model version, held-out file content (SHA-256) and cutoff.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ReportKey {
    model: String,
    version: String,
    data: String,
    k: usize,
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
    if state.evaluations.is_none() {
        let evaluations = IntCounterVec::new(
            Opts::new(
                "gateway_model_evaluations_total",
                "Offline evaluations of new model versions by model and outcome: accepted, \
                 refused (worse than the active version by more than max_regression) or error \
                 (the version could not be evaluated on its held-out data, and was refused).",
            ),
            &["model", "outcome"],
        )
        .map_err(|e| fail("*", e.to_string()))?;
        registry
            .register(Box::new(evaluations.clone()))
            .map_err(|e| fail("*", e.to_string()))?;
        state.evaluations = Some(evaluations);
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
            refuse_by_head(&s.path, Artifact::Model)
                .map_err(|e| fail(&s.name, format!("{}: {e}", s.path.display())))?;
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
        let model = match &spec.eval {
            Some(eval) => {
                let live = current.get(&spec.name).map(|slot| slot.live());
                gate(state, &spec.name, eval, model, &version, live).await?
            }
            None => model,
        };
        out.push((spec.name.clone(), Err(ServedModel { model, version })));
    }
    let mut kept: Vec<(&str, String)> = current
        .iter()
        .map(|(name, slot)| (name.as_str(), slot.live().version.clone()))
        .collect();
    kept.extend(out.iter().map(|(name, entry)| {
        let version = match entry {
            Ok(slot) => slot.live().version.clone(),
            Err(served) => served.version.clone(),
        };
        (name.as_str(), version)
    }));
    state.reports.retain(|key, _| {
        kept.iter()
            .any(|(n, v)| key.model == *n && key.version == *v)
    });
    Ok(out)
}

/// The offline gate: evaluates `model` (version `version` of `name`) on the held-out data
/// and, when a version is live, the live one too (its report cached by version); refuses the
/// new one when its primary metric is below the live one's by more than `max_regression`.
/// With nothing live, or a live version the data cannot evaluate, it logs the figures and
/// accepts. A new version that cannot be evaluated is refused.
async fn gate(
    state: &mut ScoringState,
    name: &str,
    eval: &EvalSpec,
    model: Model,
    version: &str,
    live: Option<Arc<ServedModel>>,
) -> Result<Model, StartError> {
    let fail = |message: String| StartError::Model {
        name: name.to_string(),
        message,
    };
    let count = |outcome: &str| {
        if let Some(c) = &state.evaluations {
            c.with_label_values(&[name, outcome]).inc();
        }
    };
    let path = eval.data.clone();
    let shown = path.display().to_string();
    let read = blocking(move || {
        let bytes = std::fs::read(&path).map_err(|error| EvalError::Io {
            file: path.display().to_string(),
            error,
        })?;
        let digest = crate::store::sha256_hex(&bytes);
        let text = String::from_utf8_lossy(&bytes);
        HeldOut::parse(&text, &path.display().to_string()).map(|data| (digest, data))
    })
    .await;
    let (digest, data) = match read {
        Ok(read) => read,
        Err(e) => {
            count("error");
            return Err(fail(format!(
                "offline evaluation of version {version} failed: {e}"
            )));
        }
    };
    let key = |version: &str| ReportKey {
        model: name.to_string(),
        version: version.to_string(),
        data: digest.clone(),
        k: eval.k,
    };
    let cached = live
        .as_ref()
        .and_then(|l| state.reports.get(&key(&l.version)).cloned());
    let k = eval.k;
    let live_for_eval = live.clone();
    let (model, new, old) = blocking(move || {
        let new = evaluate(&model, &data, k);
        let old = match (live_for_eval, cached) {
            (Some(_), Some(report)) => Some(Ok(report)),
            (Some(l), None) => Some(evaluate(&l.model, &data, k)),
            (None, _) => None,
        };
        (model, new, old)
    })
    .await;
    let new = match new {
        Ok(report) => report,
        Err(e) => {
            count("error");
            return Err(fail(format!(
                "offline evaluation of version {version} failed: {e}"
            )));
        }
    };
    state.reports.insert(key(version), new.clone());
    let (live, old) = match (live, old) {
        (Some(live), Some(Ok(old))) => {
            state.reports.insert(key(&live.version), old.clone());
            (live, old)
        }
        (Some(live), Some(Err(e))) => {
            tracing::warn!(
                model = %name,
                %version,
                active = %live.version,
                data = %shown,
                report = %new,
                error = %e,
                "offline evaluation: the active version cannot be evaluated on the held-out \
                 data; the new version is judged on its own figures and accepted"
            );
            count("accepted");
            return Ok(model);
        }
        _ => {
            tracing::info!(model = %name, %version, data = %shown, report = %new, "offline evaluation");
            count("accepted");
            return Ok(model);
        }
    };
    let (n, o) = (new.primary(), old.primary());
    if n.value < o.value - eval.max_regression {
        count("refused");
        return Err(fail(format!(
            "offline evaluation refused version {version}: {} {:.4} vs the active version \
             {}'s {:.4} (worse by {:.4}, more than max_regression {}); new: {new}; active: \
             {old} (held-out data {shown})",
            n.name,
            n.value,
            live.version,
            o.value,
            o.value - n.value,
            eval.max_regression,
        )));
    }
    tracing::info!(
        model = %name,
        %version,
        active = %live.version,
        data = %shown,
        report = %new,
        active_report = %old,
        "offline evaluation accepted the version"
    );
    count("accepted");
    Ok(model)
}

fn ranker_for(
    models: &HashMap<String, Arc<ModelSlot>>,
) -> Option<Arc<dyn crate::proxy::hooks::Ranker>> {
    (!models.is_empty()).then(|| {
        Arc::new(crate::ranker::ModelsRanker(models.clone()))
            as Arc<dyn crate::proxy::hooks::Ranker>
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
            refuse_by_head(&s.path, Artifact::Plugin).map_err(|reason| {
                PluginError::NotAComponent {
                    name: s.name.clone(),
                    reason,
                }
            })?;
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

/// Runs blocking work (file I/O, hashing, fsync) off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
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
pub(crate) async fn read_record(config: &Config) -> Result<Option<(Store, Manifest)>, StoreError> {
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
pub(crate) fn apply_record(config: &mut Config, store: &Store, record: &Manifest) {
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
pub(crate) async fn with_record(mut config: Config) -> Result<Config, StoreError> {
    if let Some((store, record)) = read_record(&config).await? {
        apply_record(&mut config, &store, &record);
    }
    Ok(config)
}

/// Which kind of file [`refuse_by_head`] looks at.
#[derive(Clone, Copy)]
enum Artifact {
    Plugin,
    Model,
}

/// Refuses a file whose first bytes already show it is not a plugin or model, before the
/// whole of it (an upload may be hundreds of megabytes) is read into memory. What passes is
/// validated in full afterwards; an unreadable file is left to that step to report.
fn refuse_by_head(path: &std::path::Path, kind: Artifact) -> Result<(), String> {
    use std::io::Read;
    let Ok(mut f) = std::fs::File::open(path) else {
        return Ok(());
    };
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut head = [0u8; 9];
    let n = f.read(&mut head).unwrap_or(0);
    match kind {
        // Magic "\0asm", then the component layer's version (a core module has 1 0 0 0).
        Artifact::Plugin if n < 8 || head[..4] != *b"\0asm" => {
            Err("the file does not start with the WebAssembly magic bytes".into())
        }
        Artifact::Plugin if head[4..8] == [1, 0, 0, 0] => Err(
            "a core WebAssembly module; plugins are components (build for wasm32-wasip2)".into(),
        ),
        Artifact::Plugin => Ok(()),
        Artifact::Model => {
            // safetensors: a little-endian u64 header length, then the JSON header.
            let header = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
            if n < 9 || header < 2 || header > size.saturating_sub(8) || head[8] != b'{' {
                Err("not a safetensors model file (no valid header at its start)".into())
            } else {
                Ok(())
            }
        }
    }
}
