//! The admin API's typed answers, shared by the handlers (which serialize them) and the
//! command-line client (which reads them). Field order is the JSON's.

use serde::{Deserialize, Serialize};

/// The answer to `PUT /admin/{plugins|models}/{name}` and to a rollback through the store:
/// the version now active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activated {
    /// The plugin's or model's name.
    pub name: String,
    /// The content's full SHA-256 (hex).
    pub sha256: String,
    /// The short version (the first 12 hex digits).
    pub version: String,
}

impl Activated {
    /// The answer for content `sha256` (full hex) now active as `name`.
    pub fn new(name: &str, sha256: &str) -> Activated {
        Activated {
            name: name.to_string(),
            sha256: sha256.to_string(),
            version: sha256[..12].to_string(),
        }
    }
}

/// The answer to `POST /admin/models/{name}/rollback` for a model without uploads: the
/// version held in memory that is live now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRolledBack {
    /// The model's name.
    pub model: String,
    /// The version now live.
    pub version: String,
    /// The versions kept for rollback, newest first.
    pub history: Vec<String>,
}

/// The answer to `DELETE /admin/{plugins|models}/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    /// The name whose uploads were forgotten.
    pub removed: String,
}

/// `GET /admin/status`: what serves. Fields are in alphabetical order, as the JSON has them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Tuning hints from the gateway's own series (see `GET /admin/hints`).
    #[serde(default)]
    pub hints: Vec<Hint>,
    /// The last reload from the file, if any.
    pub last_reload: Option<LastReload>,
    /// Served models, by name.
    pub models: Vec<ModelStatus>,
    /// Plugins the routes use.
    pub plugins: Vec<PluginStatus>,
    /// Routes, in config order.
    pub routes: Vec<RouteStatus>,
    /// Plugins and models pulled from OCI registries (`source = "oci://..."`): the reference
    /// each names and the digest it runs, so every node of a fleet reports its version.
    #[serde(default)]
    pub sources: Vec<SourceStatus>,
}

/// A plugin or model pulled from an OCI registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStatus {
    /// The manifest digest that serves (`sha256:...`).
    pub digest: Option<String>,
    /// `plugin` or `model`.
    pub kind: String,
    /// Its name in the config.
    pub name: String,
    /// The reference configured (`oci://registry/repository:tag` or `@sha256:...`).
    pub reference: String,
    /// How often its tag is resolved again, in seconds; 0: only at start and reload (and
    /// always 0 for a digest-pinned reference).
    pub resolve_interval_s: u64,
}

/// `GET /admin/rollouts`: every experiment, its variants' weights and figures, and its
/// rollout (state, step, the last evidence and the decisions with their figures).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollouts {
    /// Experiments in config order (the proxy's `ExperimentStatus` documents the fields).
    pub experiments: Vec<serde_json::Value>,
}

/// The answer to `POST /admin/rollouts/{experiment}/{command}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutCommanded {
    /// The experiment.
    pub experiment: String,
    /// The decision the command made, with its figures.
    pub decision: serde_json::Value,
}

/// `GET /admin/audit[?limit=N]`: the newest N entries of the audit trail (default 1000),
/// oldest first, the whole chain verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    /// Every management action: seq, time, actor (token id or the gateway), action, target,
    /// outcome and the chain hash.
    pub entries: Vec<crate::store::audit::Entry>,
}

/// A change the gateway suggests, with the numbers behind it. Fields are in alphabetical
/// order, as the JSON has them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hint {
    /// What to change, and why.
    pub advice: String,
    /// The figures it rests on.
    pub evidence: String,
    /// What it is about: `model recs`, `plugin ratelimit`, `upstream app`.
    pub subject: String,
}

/// `GET /admin/hints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hints {
    /// The hints, possibly none.
    pub hints: Vec<Hint>,
}

/// Every refusal of the admin API (4xx and 5xx): what went wrong and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorAnswer {
    /// The explanation.
    pub error: String,
}

/// `GET /admin/config`: the configuration that serves, as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigAnswer {
    /// The file it was read from (`null` when it was built in code).
    pub file: Option<String>,
    /// Configurations applied since start (1 for the first).
    pub generation: u64,
    /// The file's TOML text (`null` when it was built in code). Uploaded plugin and model
    /// versions the store records active replace the paths it names; `GET /admin/status`
    /// shows them.
    pub toml: Option<String>,
}

/// The outcome of the last reload from the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastReload {
    /// When it finished, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// Why it failed (`null` when it did not).
    pub error: Option<String>,
    /// Whether it applied.
    pub ok: bool,
}

/// A served model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelStatus {
    /// Where it runs (the engine's execution path).
    pub device: String,
    /// Bytes of weights held.
    pub held_bytes: u64,
    /// Versions kept for rollback, newest first.
    pub history: Vec<String>,
    /// `embedding` or `mlp`.
    pub kind: String,
    /// Its name in the config.
    pub name: String,
    /// How its tables are held (`f32`, `f16`).
    pub storage: String,
    /// The version live.
    pub version: String,
}

/// A loaded plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginStatus {
    /// Instances ready for a request.
    pub idle_instances: usize,
    /// Its name in the config.
    pub name: String,
    /// The version serving.
    pub version: String,
}

/// A route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteStatus {
    /// Its name.
    pub name: String,
    /// Its plugins, in order.
    pub plugins: Vec<String>,
    /// Its upstream's name.
    pub upstream: String,
}

/// `GET /admin/{plugins|models}`: the uploads of each name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifacts {
    /// One entry per name with uploads.
    pub artifacts: Vec<Artifact>,
}

/// The uploads of one name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// The active upload's SHA-256.
    pub active: String,
    /// The plugin's or model's name.
    pub name: String,
    /// The routes (plugins) or the endpoint (models) that use the name.
    pub used_by: Vec<String>,
    /// Uploaded versions, newest first.
    pub versions: Vec<String>,
}

/// `GET /admin/reload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastReloadAnswer {
    /// The last reload from the file, if any.
    pub last_reload: Option<LastReload>,
}

/// `POST /admin/reload` when it applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reloaded {
    /// Always `true`.
    pub reloaded: bool,
    /// What serves now.
    pub status: Status,
}

/// `GET /status.json` on the admin listener: everything the status page (`GET /`) shows, in
/// one read-only document. It needs no token, like `/metrics`, so it holds nothing the metrics
/// do not already tell: names, versions, counts and figures; never a token, a key, a file's
/// content or a reload's error text (`GET /admin/reload` has that). Fields are in
/// alphabetical order, as the JSON has them; times are milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Overview {
    /// Whether the admin API is enabled (a token is configured), so the page's actions work.
    pub admin_api: bool,
    /// Experiments in config order, with their variants' weights and figures and their
    /// rollouts.
    pub experiments: Vec<ExperimentOverview>,
    /// When the document was made.
    pub generated_unix_ms: u64,
    /// Configurations applied since start (1 for the first).
    pub generation: u64,
    /// Tuning hints from the gateway's own series (as `GET /admin/hints`).
    pub hints: Vec<Hint>,
    /// The last reload from the file, if any: when, and whether it applied.
    pub last_reload: Option<ReloadOutcome>,
    /// Served models, by name.
    pub models: Vec<ModelOverview>,
    /// Plugins the routes use, in config order.
    pub plugins: Vec<PluginOverview>,
    /// Routes, in config order, with their traffic.
    pub routes: Vec<RouteOverview>,
    /// Plugins and models pulled from an OCI registry, with the digest that serves.
    #[serde(default)]
    pub sources: Vec<SourceStatus>,
    /// How often each route's series are sampled (`[server] anomaly_interval_ms`).
    pub sample_interval_ms: u64,
    /// The scoring device in use (`gateway_scoring_device_info`), once a model is loaded.
    pub scoring_device: Option<ScoringDevice>,
    /// When the gateway started.
    pub started_unix_ms: u64,
    /// Upstream pools, in config order, with their backends' health.
    pub upstreams: Vec<UpstreamOverview>,
}

/// When the last reload from the file finished and whether it applied (the error text is in
/// `GET /admin/reload`, behind the token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadOutcome {
    /// When it finished.
    pub at_unix_ms: u64,
    /// Whether it applied.
    pub ok: bool,
}

/// A route in the [`Overview`]: what it matches, where it goes, and its traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteOverview {
    /// Answers by status class (`2xx`, `5xx`, ...) since start.
    pub by_class: std::collections::BTreeMap<String, u64>,
    /// 5xx answers since start.
    pub errors: u64,
    /// The experiment that splits it, if any (see [`Overview::experiments`]).
    pub experiment: Option<String>,
    /// The sampled series of the last minutes, oldest first (at most [`HISTORY_SAMPLES`]).
    pub history: Vec<Sample>,
    /// Host patterns (`*` for any).
    pub hosts: Vec<String>,
    /// Its name.
    pub name: String,
    /// Path prefix.
    pub path_prefix: String,
    /// Its plugins, in order.
    pub plugins: Vec<String>,
    /// Requests answered since start.
    pub requests: u64,
    /// The anomaly state of its signals (`gateway_anomaly{route,signal}`), once sampled.
    pub signals: Vec<SignalState>,
    /// Its upstream's name.
    pub upstream: String,
    /// Its canary variants (a plugin picks one), each with its upstream.
    pub variants: Vec<RouteVariant>,
}

/// The most samples a route's history holds; it also spans at most [`HISTORY_WINDOW_MS`].
pub const HISTORY_SAMPLES: usize = 180;

/// How far back a route's history reaches, ms (15 minutes).
pub const HISTORY_WINDOW_MS: u64 = 15 * 60 * 1000;

/// One sample of a route's series over one sampling interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// When it was taken (the end of its interval).
    pub at_unix_ms: u64,
    /// 5xx answers per request (`null` with fewer than 20 requests in the interval).
    pub error_ratio: Option<f64>,
    /// The interval's p99 latency, ms: the upper bound of the histogram bucket that holds it
    /// (`null` with fewer than 20 requests in the interval).
    pub p99_ms: Option<f64>,
    /// Requests per second.
    pub rate_per_s: f64,
}

/// One signal of a route as the anomaly detector judged its last sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalState {
    /// Whether it is in alert (`gateway_anomaly` is 1).
    pub alert: bool,
    /// The adaptive band's upper edge, in the signal's unit (`null` while warming up).
    pub high: Option<f64>,
    /// The band's lower edge.
    pub low: Option<f64>,
    /// `request_rate` (per second), `error_ratio` or `p99_latency` (ms).
    pub signal: String,
    /// The last sample, in the signal's unit.
    pub value: f64,
}

/// A canary variant of a route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteVariant {
    /// Its name.
    pub name: String,
    /// Its upstream's name.
    pub upstream: String,
}

/// An upstream pool in the [`Overview`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpstreamOverview {
    /// Backends that may take traffic now.
    pub available: usize,
    /// Its backends, in config order.
    pub backends: Vec<BackendOverview>,
    /// `round_robin` or `least_in_flight`.
    pub balance: String,
    /// Failed attempts since start, by kind (`gateway_upstream_errors_total`).
    pub errors: std::collections::BTreeMap<String, u64>,
    /// Whether active health checks run.
    pub health_checks: bool,
    /// Its name.
    pub name: String,
    /// Requests balanced across every backend because too few were healthy.
    pub panics: u64,
    /// `http1` or `h2`.
    pub protocol: String,
    /// Retries since start, by outcome (`gateway_upstream_retries_total`).
    pub retries: std::collections::BTreeMap<String, u64>,
}

/// A backend and its health (`gateway_backend_healthy`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendOverview {
    /// `host:port`.
    pub address: String,
    /// Whether it takes traffic (not ejected, passing its checks).
    pub healthy: bool,
}

/// A plugin in the [`Overview`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginOverview {
    /// Its deadline per hook call, ms.
    pub deadline_ms: u64,
    /// Each hook's calls and latency since start.
    pub hooks: Vec<HookFigures>,
    /// Instances ready for a request.
    pub idle_instances: usize,
    /// When its version became live; `null` when it has served since the gateway started.
    pub last_swap_unix_ms: Option<u64>,
    /// Its name in the config.
    pub name: String,
    /// The live version's hook calls since start, by outcome (`ok`, `local_response`,
    /// `trap`, `timeout`, ...).
    pub outcomes: std::collections::BTreeMap<String, u64>,
    /// The routes whose chain runs it.
    pub routes: Vec<String>,
    /// The version serving.
    pub version: String,
}

/// One plugin hook's figures (`gateway_plugin_hook_duration_seconds`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookFigures {
    /// Calls since start.
    pub calls: u64,
    /// `on_request` or `on_response`.
    pub hook: String,
    /// p99 call time, ms (a bucket's upper bound; `null` without calls).
    pub p99_ms: Option<f64>,
}

/// A model in the [`Overview`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelOverview {
    /// The GPU adapter it runs on, or whose memory it did not fit (`null` on the CPU path).
    pub adapter: Option<String>,
    /// Its batches and queueing since start.
    pub batching: BatchFigures,
    /// Batches answered on the CPU path after the GPU failed, since start.
    pub cpu_fallbacks: u64,
    /// `gpu`, `software-gpu` or `cpu`.
    pub device: String,
    /// Why it runs on the CPU path of a GPU device, when it does.
    pub fallback_reason: Option<String>,
    /// Bytes of weights held.
    pub held_bytes: u64,
    /// Versions kept for rollback, newest first.
    pub history: Vec<String>,
    /// `embedding` or `mlp`.
    pub kind: String,
    /// When its version became live; `null` when it has served since the gateway started.
    pub last_swap_unix_ms: Option<u64>,
    /// Its name in the config.
    pub name: String,
    /// The live version's scoring requests since start, by outcome.
    pub requests: std::collections::BTreeMap<String, u64>,
    /// How its tables are held (`f32`, `f16`).
    pub storage: String,
    /// The version live.
    pub version: String,
}

/// A model's batching since start (`gateway_model_batch_size`, `gateway_model_queue_seconds`,
/// `gateway_model_compute_seconds`), with the configured limits. Quantiles are the upper
/// bounds of histogram buckets; `null` before the first batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchFigures {
    /// Batches dispatched.
    pub batches: u64,
    /// p99 time of one batch on the device, ms.
    pub compute_p99_ms: Option<f64>,
    /// `[scoring] max_batch`.
    pub max_batch: usize,
    /// `[scoring] max_queue_delay_us`.
    pub max_queue_delay_us: u64,
    /// Requests per batch, on average.
    pub mean_size: Option<f64>,
    /// p99 requests per batch.
    pub p99_size: Option<f64>,
    /// Median time a request waited for its batch, ms.
    pub queue_p50_ms: Option<f64>,
    /// p99 time a request waited for its batch, ms.
    pub queue_p99_ms: Option<f64>,
}

/// The scoring device (`gateway_scoring_device_info`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScoringDevice {
    /// The GPU adapter's name (`null` on the CPU).
    pub adapter: Option<String>,
    /// `gpu`, `software-gpu` or `cpu`.
    pub backend: String,
}

/// An experiment in the [`Overview`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExperimentOverview {
    /// Where the shopper id comes from.
    pub assign_by: String,
    /// Its name.
    pub name: String,
    /// Its rollout, if it has one.
    pub rollout: Option<RolloutOverview>,
    /// The routes it splits.
    pub routes: Vec<String>,
    /// Variants, the baseline first, with their weights now.
    pub variants: Vec<VariantOverview>,
}

/// A variant of an experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantOverview {
    /// Figures of the last five minutes.
    pub last_5_minutes: VariantFigures,
    /// Its name.
    pub name: String,
    /// Figures since the rollout's step began (since the experiment started, without one).
    pub step: VariantFigures,
    /// Its weight in the split now.
    pub weight: u32,
}

/// A variant's figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VariantFigures {
    /// Clicks reported.
    pub clicks: u64,
    /// Clicks per impression.
    pub ctr: f64,
    /// Purchases per impression.
    pub cvr: f64,
    /// 5xx answers per request.
    pub error_rate: f64,
    /// Impressions reported.
    pub impressions: u64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// p99 latency, ms.
    pub p99_ms: f64,
    /// Purchases reported.
    pub purchases: u64,
    /// Counted requests.
    pub requests: u64,
}

/// An experiment's rollout: where it is and the decisions it made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutOverview {
    /// The baseline variant's name.
    pub baseline: String,
    /// The canary variant's name.
    pub canary: String,
    /// The canary's share now, percent.
    pub canary_percent: u8,
    /// Decisions, oldest first, each with its figures.
    pub decisions: Vec<gateway_rollout::Decision>,
    /// The figures of the last evaluation.
    pub evidence: gateway_rollout::Evidence,
    /// `Running`, `Paused`, `Promoted`, `RolledBack` or `Aborted`.
    pub state: gateway_rollout::State,
    /// When the current step began.
    pub step_started_ms: u64,
    /// The plan's steps, percent.
    pub steps: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_keep_their_json_shape() {
        let sha = "ab".repeat(32);
        let v = serde_json::to_value(Activated::new("p", &sha)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({ "name": "p", "sha256": sha, "version": &sha[..12] })
        );
        let back: Activated = serde_json::from_value(v).unwrap();
        assert_eq!(back.version, "abababababab");
        let v = serde_json::to_value(ModelRolledBack {
            model: "m".into(),
            version: "v1".into(),
            history: vec!["v2".into()],
        })
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({ "model": "m", "version": "v1", "history": ["v2"] })
        );
        let v = serde_json::to_value(Removed {
            removed: "p".into(),
        })
        .unwrap();
        assert_eq!(v, serde_json::json!({ "removed": "p" }));
    }

    #[test]
    fn the_status_document_serializes_as_its_json_value_does() {
        // The CLI prints a status it parsed; it must read as the node wrote it.
        let status = Status {
            hints: vec![Hint {
                subject: "model recs".into(),
                advice: "lower max_queue_delay_us".into(),
                evidence: "300 batches of 1.02 requests on average".into(),
            }],
            last_reload: Some(LastReload {
                at_unix_ms: 5,
                error: None,
                ok: true,
            }),
            models: vec![ModelStatus {
                device: "Cpu".into(),
                held_bytes: 10,
                history: vec![],
                kind: "embedding".into(),
                name: "m".into(),
                storage: "f32".into(),
                version: "v".into(),
            }],
            plugins: vec![PluginStatus {
                idle_instances: 2,
                name: "p".into(),
                version: "x".into(),
            }],
            routes: vec![RouteStatus {
                name: "r".into(),
                plugins: vec!["p".into()],
                upstream: "u".into(),
            }],
            sources: vec![SourceStatus {
                digest: Some("sha256:00".into()),
                kind: "plugin".into(),
                name: "p".into(),
                reference: "oci://127.0.0.1:5000/p:v1".into(),
                resolve_interval_s: 300,
            }],
        };
        let direct = serde_json::to_string(&status).unwrap();
        let via_value = serde_json::to_value(&status).unwrap().to_string();
        assert_eq!(direct, via_value);
        assert!(direct.contains(r#""error":null"#), "{direct}");
        let back: Status = serde_json::from_str(&direct).unwrap();
        assert_eq!(back, status);
    }
}
