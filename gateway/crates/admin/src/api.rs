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
        };
        let direct = serde_json::to_string(&status).unwrap();
        let via_value = serde_json::to_value(&status).unwrap().to_string();
        assert_eq!(direct, via_value);
        assert!(direct.contains(r#""error":null"#), "{direct}");
        let back: Status = serde_json::from_str(&direct).unwrap();
        assert_eq!(back, status);
    }
}
