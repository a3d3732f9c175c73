//! `storefront`: post-processes the demo storefront's search and recommendation JSON.
//!
//! For a response to one of `paths` (exact match on the request path, without query) whose
//! body is available (the route must opt in to body access), whose `content-type` is JSON
//! (`application/json` or `...+json`) and that is not content-encoded, the plugin parses the
//! body and, for each list field present at the top level (`results` for `/api/search`,
//! `recommendations` for `/api/recommendations`):
//!
//! - re-ranks the items (for now: keeps the upstream order, see `rerank`);
//! - adds `"rank": <1-based position>` to each item that is a JSON object;
//!
//! then adds `"reranked_by": "storefront-plugin"` at the top level, replaces the body and
//! sets `x-storefront-plugin: 1`. Object keys come out sorted (serde_json's default map;
//! its `preserve_order` would need the WASI random import for `IndexMap`'s hasher). Anything else (other paths, no body, non-JSON, invalid JSON,
//! no list field) passes untouched.
//!
//! Config (TOML; every key optional, the defaults are shown):
//!
//! ```toml
//! paths = ["/api/search", "/api/recommendations"]
//! list_fields = ["results", "recommendations"]
//! ```
//!
//! Metrics: counters `storefront_rewritten`, `storefront_skipped_no_body`,
//! `storefront_errors`; histogram `storefront_rewrite_seconds`.

use gateway_plugin_sdk::{clock, config, log, metrics, prelude::*};
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    paths: Vec<String>,
    list_fields: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            paths: vec!["/api/search".into(), "/api/recommendations".into()],
            list_fields: vec!["results".into(), "recommendations".into()],
        }
    }
}

/// The plugin, holding its configuration.
pub struct Storefront {
    paths: Vec<String>,
    list_fields: Vec<String>,
}

fn is_json(content_type: &str) -> bool {
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// What the request asked for, for the ranking step.
#[allow(dead_code)] // read once `rerank` calls the ranking service
struct RankContext<'a> {
    path: &'a str,
    field: &'a str,
}

/// Orders `items` for the shopper.
///
/// RANKING HOOK: for now this keeps the upstream order. The scoring issue replaces this
/// body with a call to the ranking service (the `ranking` import of the next WIT package
/// version): send `ctx` and the items' ids/scores, get back an order (or new scores), and
/// reorder `items` accordingly. Everything after this call (ranks, `reranked_by`, the
/// header) already works on whatever order this function leaves.
fn rerank(items: &mut [Value], ctx: &RankContext<'_>) {
    let _ = (items, ctx);
}

impl Storefront {
    fn from_config(text: &str) -> Result<Self, String> {
        let cfg: Config = config::from_toml(text)?;
        Ok(Storefront {
            paths: cfg.paths,
            list_fields: cfg.list_fields,
        })
    }

    /// Rewrites a JSON document; `None` when it is not one this plugin handles.
    fn rewrite(&self, path: &str, body: &[u8]) -> Option<Vec<u8>> {
        let mut doc: Map<String, Value> = serde_json::from_slice(body).ok()?;
        let mut touched = false;
        for field in &self.list_fields {
            if let Some(Value::Array(items)) = doc.get_mut(field) {
                rerank(items, &RankContext { path, field });
                for (i, item) in items.iter_mut().enumerate() {
                    if let Value::Object(obj) = item {
                        obj.insert("rank".into(), Value::from(i as u64 + 1));
                    }
                }
                touched = true;
            }
        }
        if !touched {
            return None;
        }
        doc.insert("reranked_by".into(), Value::from("storefront-plugin"));
        serde_json::to_vec(&doc).ok()
    }
}

impl Plugin for Storefront {
    fn init(config: &str) -> Result<Self, String> {
        Storefront::from_config(config)
    }

    fn on_response(&mut self, resp: &Response) {
        let path = resp.request_path();
        let path = path.split('?').next().unwrap_or("");
        if !self.paths.iter().any(|p| p == path) {
            return;
        }
        if !resp.header("content-type").is_some_and(|ct| is_json(&ct)) {
            return;
        }
        if resp
            .header("content-encoding")
            .is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity"))
        {
            return;
        }
        let Some(body) = resp.body() else {
            metrics::counter_inc("storefront_skipped_no_body");
            return;
        };
        let start = clock::now_ns();
        let Some(new_body) = self.rewrite(path, &body) else {
            return;
        };
        match resp.set_body(&new_body) {
            Ok(()) => {
                if let Err(e) = resp.set_header("x-storefront-plugin", "1") {
                    log::warn(&format!("cannot set x-storefront-plugin: {e}"));
                }
                metrics::counter_inc("storefront_rewritten");
                metrics::histogram_observe(
                    "storefront_rewrite_seconds",
                    clock::elapsed_ns(start) as f64 / 1e9,
                );
            }
            Err(e) => {
                metrics::counter_inc("storefront_errors");
                log::warn(&format!("cannot replace the body of {path}: {e}"));
            }
        }
    }
}

export_plugin!(Storefront);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_search() {
        let s = Storefront::from_config("").unwrap();
        let body = br#"{"query":"boot","results":[{"id":3,"name":"Boot","score":1.0},{"id":7,"name":"Hiking boot","score":0.5}]}"#;
        let out: Value = serde_json::from_slice(&s.rewrite("/api/search", body).unwrap()).unwrap();
        assert_eq!(out["reranked_by"], "storefront-plugin");
        assert_eq!(out["results"][0]["rank"], 1);
        assert_eq!(out["results"][1]["rank"], 2);
        assert_eq!(out["results"][1]["id"], 7);
        assert_eq!(out["query"], "boot");
    }

    #[test]
    fn rewrites_recommendations() {
        let s = Storefront::from_config("").unwrap();
        let body = br#"{"user":"42","recommendations":[{"id":1},{"id":2},{"id":3}]}"#;
        let out: Value =
            serde_json::from_slice(&s.rewrite("/api/recommendations", body).unwrap()).unwrap();
        assert_eq!(out["recommendations"][2]["rank"], 3);
    }

    #[test]
    fn leaves_others_alone() {
        let s = Storefront::from_config("").unwrap();
        assert!(s.rewrite("/api/search", b"not json").is_none());
        assert!(s.rewrite("/api/search", br#"[1,2]"#).is_none());
        assert!(s.rewrite("/api/search", br#"{"error":"nope"}"#).is_none());
    }

    #[test]
    fn content_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_json("application/problem+json"));
        assert!(!is_json("text/html"));
        assert!(!is_json("application/jsonp"));
    }

    #[test]
    fn config() {
        let s = Storefront::from_config("paths = [\"/x\"]").unwrap();
        assert_eq!(s.paths, vec!["/x".to_string()]);
        assert_eq!(s.list_fields.len(), 2);
        assert!(Storefront::from_config("path = 1").is_err());
    }
}
