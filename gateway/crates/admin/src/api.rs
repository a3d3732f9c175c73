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
}
