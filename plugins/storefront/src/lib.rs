//! `storefront`: post-processes the demo storefront's search and recommendation JSON.
//!
//! For a response to one of `paths` (exact match on the request path, without query) whose
//! body is available (the route must opt in to body access), whose `content-type` is JSON
//! (`application/json` or `...+json`) and that is not content-encoded, the plugin parses the
//! body and, for each list field present at the top level (`results` for `/api/search`,
//! `recommendations` for `/api/recommendations`):
//!
//! - when `model` is set and the request names a user (`user_param`), re-ranks the items by
//!   that served model's scores through the gateway's `ranking` import (adding `model_score`);
//!   otherwise keeps the upstream order;
//! - adds `"rank": <1-based position>` to each item that is a JSON object;
//!
//! then adds `"reranked_by"` (`"<model>@<version>"`, or `"storefront-plugin"` when not
//! re-ranked) at the top level, replaces the body and
//! sets `x-storefront-plugin: 1`. Object keys come out sorted (serde_json's default map;
//! its `preserve_order` would need the WASI random import for `IndexMap`'s hasher). Anything else (other paths, no body, non-JSON, invalid JSON,
//! no list field) passes untouched.
//!
//! Config (TOML; every key optional, the defaults are shown):
//!
//! ```toml
//! paths = ["/api/search", "/api/recommendations"]
//! list_fields = ["results", "recommendations"]
//! model = "recs"        # optional: re-rank with this served model (the `ranking` import)
//! user_param = "user"   # query parameter with the shopper's user id
//! ```
//!
//! Metrics: counters `storefront_rewritten`, `storefront_skipped_no_body`,
//! `storefront_errors`; histogram `storefront_rewrite_seconds`.

use gateway_plugin_sdk::{clock, config, log, metrics, prelude::*, ranking};
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    paths: Vec<String>,
    list_fields: Vec<String>,
    /// A served model to re-rank with (`[[models]]` name in the gateway config).
    model: Option<String>,
    /// Query parameter holding the shopper's user id.
    user_param: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            paths: vec!["/api/search".into(), "/api/recommendations".into()],
            list_fields: vec!["results".into(), "recommendations".into()],
            model: None,
            user_param: "user".into(),
        }
    }
}

/// The plugin, holding its configuration.
pub struct Storefront {
    paths: Vec<String>,
    list_fields: Vec<String>,
    model: Option<String>,
    user_param: String,
}

/// Scores item ids with a model: the version and one score per id. The plugin passes the
/// gateway's ranking service; unit tests pass a table.
type Scorer<'a> = &'a dyn Fn(&[u32]) -> Result<(String, Vec<f32>), String>;

fn is_json(content_type: &str) -> bool {
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Orders `items` for the shopper with `score` (best first; items without an `id`, or when
/// scoring fails, keep the upstream order). Returns the model version used.
fn rerank(items: &mut [Value], score: Option<Scorer<'_>>) -> Option<String> {
    let score = score?;
    let ids: Vec<u32> = items
        .iter()
        .filter_map(|i| i.get("id")?.as_u64())
        .map(|id| id as u32)
        .collect();
    if ids.len() != items.len() || ids.is_empty() {
        return None;
    }
    match score(&ids) {
        Ok((version, scores)) if scores.len() == items.len() => {
            let mut order: Vec<usize> = (0..items.len()).collect();
            // Stable: equal scores keep the upstream order.
            order.sort_by(|&a, &b| {
                scores[b]
                    .partial_cmp(&scores[a])
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
            let sorted: Vec<Value> = order
                .iter()
                .map(|&i| {
                    let mut item = items[i].clone();
                    if let Value::Object(obj) = &mut item {
                        obj.insert("model_score".into(), Value::from(scores[i] as f64));
                    }
                    item
                })
                .collect();
            items.clone_from_slice(&sorted);
            Some(version)
        }
        Ok(_) => None,
        Err(e) => {
            log::warn(&format!("ranking failed, keeping the upstream order: {e}"));
            metrics::counter_inc("storefront_rank_errors");
            None
        }
    }
}

impl Storefront {
    fn from_config(text: &str) -> Result<Self, String> {
        let cfg: Config = config::from_toml(text)?;
        Ok(Storefront {
            paths: cfg.paths,
            list_fields: cfg.list_fields,
            model: cfg.model,
            user_param: cfg.user_param,
        })
    }

    /// Rewrites a JSON document; `None` when it is not one this plugin handles.
    fn rewrite(&self, body: &[u8], score: Option<Scorer<'_>>) -> Option<Vec<u8>> {
        let mut doc: Map<String, Value> = serde_json::from_slice(body).ok()?;
        let mut touched = false;
        let mut ranked_with = None;
        for field in &self.list_fields {
            if let Some(Value::Array(items)) = doc.get_mut(field) {
                if let Some(version) = rerank(items, score) {
                    ranked_with = Some(version);
                }
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
        let by = match (&self.model, ranked_with) {
            (Some(model), Some(version)) => format!("{model}@{version}"),
            _ => "storefront-plugin".to_string(),
        };
        doc.insert("reranked_by".into(), Value::from(by));
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
        let user = resp.request_query().and_then(|q| {
            q.split('&').find_map(|kv| {
                kv.strip_prefix(&format!("{}=", self.user_param))?
                    .parse::<u32>()
                    .ok()
            })
        });
        let ranker = |ids: &[u32]| {
            ranking::rank(
                self.model.as_deref().unwrap_or_default(),
                user.unwrap_or(0),
                ids,
            )
        };
        let score: Option<Scorer<'_>> = match (&self.model, user) {
            (Some(_), Some(_)) => Some(&ranker),
            _ => None,
        };
        let Some(new_body) = self.rewrite(&body, score) else {
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
    fn reranks_with_a_model_best_first() {
        let s = Storefront::from_config("model = \"recs\"").unwrap();
        let body = br#"{"recommendations":[{"id":1},{"id":2},{"id":3}]}"#;
        let table = |ids: &[u32]| {
            Ok((
                "v7".to_string(),
                ids.iter()
                    .map(|&i| [0.0, 0.1, 0.9, 0.5][i as usize])
                    .collect(),
            ))
        };
        let out: Value = serde_json::from_slice(&s.rewrite(body, Some(&table)).unwrap()).unwrap();
        let ids: Vec<u64> = out["recommendations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, vec![2, 3, 1]);
        assert_eq!(out["reranked_by"], "recs@v7");
        assert_eq!(out["recommendations"][0]["rank"], 1);
    }

    #[test]
    fn rewrites_search() {
        let s = Storefront::from_config("").unwrap();
        let body = br#"{"query":"boot","results":[{"id":3,"name":"Boot","score":1.0},{"id":7,"name":"Hiking boot","score":0.5}]}"#;
        let out: Value = serde_json::from_slice(&s.rewrite(body, None).unwrap()).unwrap();
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
        let out: Value = serde_json::from_slice(&s.rewrite(body, None).unwrap()).unwrap();
        assert_eq!(out["recommendations"][2]["rank"], 3);
    }

    #[test]
    fn leaves_others_alone() {
        let s = Storefront::from_config("").unwrap();
        assert!(s.rewrite(b"not json", None).is_none());
        assert!(s.rewrite(br#"[1,2]"#, None).is_none());
        assert!(s.rewrite(br#"{"error":"nope"}"#, None).is_none());
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
