//! The scoring JSON endpoint on the proxy listeners, for storefront backends:
//!
//! - `POST <prefix>/<model>/rank` with `{"user": 7, "candidates": [3, 1, 2]}` (or `"vector":
//!   [...]` instead of `"user"`): the candidates scored and ordered best first;
//! - `POST <prefix>/<model>/topk` with `{"user": 7, "k": 10}`: the best `k` of the catalog;
//! - `POST <prefix>/<model>/predict` with `{"rows": [{"user": 7, "item": 3, "dense": [0.5]}]}`:
//!   click probabilities from an MLP model, one per row in order;
//! - `GET <prefix>`: the models, their live versions and rollback history.
//!
//! Answers are `{"model", "version", "results": [{"item", "score"}, ...]}` with the version
//! also in `x-model-version`; every number of one answer comes from that version.
//!
//! It lives in the proxy crate, not in `gateway-scoring`: the engine has no HTTP.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::scoring::serving::{Ask, ModelSlot, OwnedQuery, ServeError};
use crate::upstream::ProxyBody;

/// Largest request body the endpoint reads.
pub(crate) const MAX_BODY: usize = 1 << 20;

/// Request bodies of at least this many bytes are parsed, and answers of at least
/// [`OFFLOAD_HITS`] results written, on a blocking thread: a 65,536-candidate rank takes
/// milliseconds of JSON work that would otherwise hold up an async worker and every small
/// request queued behind it.
const OFFLOAD_BYTES: usize = 16 * 1024;
/// See [`OFFLOAD_BYTES`].
const OFFLOAD_HITS: usize = 2048;

/// An answer as the endpoint writes it.
#[derive(Serialize)]
struct Answered {
    model: String,
    version: String,
    results: Vec<Scored>,
}

#[derive(Serialize)]
struct Scored {
    item: u32,
    /// As f64, like every score this endpoint has written.
    score: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    user: Option<u32>,
    vector: Option<Vec<f32>>,
    candidates: Option<Vec<u32>>,
    k: Option<usize>,
    rows: Option<Vec<Row>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    user: u32,
    item: u32,
    #[serde(default)]
    dense: Vec<f32>,
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<ProxyBody> {
    crate::http_util::json_response(status, &value)
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<ProxyBody> {
    crate::http_util::json_error(status, message)
}

/// Scores an answer's first hits are reported, at most (for an experiment's score-drift guard).
pub(crate) const OBSERVED_SCORES: usize = 16;

/// Told the first scores of an answer.
pub(crate) type ScoreObserver<'a> = dyn Fn(&[f32]) + Sync + 'a;

/// How an experiment's variant serves a scoring request.
#[derive(Default, Clone, Copy)]
pub(crate) struct Serving<'a> {
    /// The model that answers in place of the one the path names.
    pub(crate) model: Option<&'a str>,
    /// Told the first [`OBSERVED_SCORES`] scores of each answer.
    pub(crate) observe: Option<&'a ScoreObserver<'a>>,
}

/// Answers a request whose path is under the endpoint prefix; `rest` is the path after it.
pub async fn handle(
    models: &HashMap<String, Arc<ModelSlot>>,
    rest: &str,
    req: Request<ProxyBody>,
) -> Response<ProxyBody> {
    handle_as(models, rest, req, Serving::default()).await
}

/// The model a path under the endpoint prefix names, if any.
pub(crate) fn model_of(rest: &str) -> Option<&str> {
    rest.trim_start_matches('/')
        .split_once('/')
        .map(|(name, _)| name)
}

/// [`handle`], served as an experiment's variant says.
pub(crate) async fn handle_as(
    models: &HashMap<String, Arc<ModelSlot>>,
    rest: &str,
    req: Request<ProxyBody>,
    serving: Serving<'_>,
) -> Response<ProxyBody> {
    let rest = rest.trim_start_matches('/');
    if rest.is_empty() {
        if req.method() != Method::GET {
            return error(StatusCode::METHOD_NOT_ALLOWED, "use GET to list models");
        }
        let mut list: Vec<_> = models
            .values()
            .map(|slot| {
                let live = slot.live();
                json!({
                    "name": slot.name,
                    "version": live.version,
                    "kind": live.model.info().kind.to_string(),
                    "history": slot.history(),
                })
            })
            .collect();
        list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        return json_response(StatusCode::OK, json!({ "models": list }));
    }
    let Some((name, op)) = rest.split_once('/') else {
        return error(
            StatusCode::NOT_FOUND,
            "use <prefix>/<model>/rank or <prefix>/<model>/topk",
        );
    };
    let Some(slot) = models.get(serving.model.unwrap_or(name)) else {
        return error(StatusCode::NOT_FOUND, format!("no model named {name:?}"));
    };
    if req.method() != Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, "use POST with a JSON body");
    }
    let bytes = match crate::http_util::read_to_limit(req.into_body(), MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return crate::http_util::read_error_response(
                e,
                format!("the body must be JSON of at most {MAX_BODY} bytes"),
            )
        }
    };
    let parsed = if bytes.len() >= OFFLOAD_BYTES {
        tokio::task::spawn_blocking(move || serde_json::from_slice::<Body>(&bytes))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    } else {
        serde_json::from_slice::<Body>(&bytes)
    };
    let body = match parsed {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")),
    };
    let ask = if op == "predict" {
        match (body.rows, body.user, body.vector, body.candidates, body.k) {
            (Some(rows), None, None, None, None) if !rows.is_empty() => Ask::Predict {
                rows: rows
                    .into_iter()
                    .map(|r| (r.user, r.item, r.dense))
                    .collect(),
            },
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "predict takes only \"rows\": a non-empty list of {user, item, dense}",
                )
            }
        }
    } else {
        if body.rows.is_some() {
            return error(StatusCode::BAD_REQUEST, "\"rows\" belongs to predict");
        }
        let query = match (body.user, body.vector) {
            (Some(u), None) => OwnedQuery::User(u),
            (None, Some(v)) => OwnedQuery::Vector(v),
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "give exactly one of \"user\" and \"vector\"",
                )
            }
        };
        match (op, body.candidates, body.k) {
            ("rank", Some(candidates), None) => Ask::Rank { query, candidates },
            ("topk", None, Some(k)) if k > 0 => Ask::TopK { query, k },
            ("rank", _, _) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "rank takes \"candidates\" (a list of item ids) and no \"k\"",
                )
            }
            ("topk", _, _) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "topk takes \"k\" (at least 1) and no \"candidates\"",
                )
            }
            _ => {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("unknown operation {op:?}; use rank, topk or predict"),
                )
            }
        }
    };
    let answered = slot.ask(ask).await;
    let answer_len = answered.as_ref().map_or(0, |a| a.hits.len());
    match answered {
        Ok(answer) => {
            if let Some(observe) = serving.observe {
                let first: Vec<f32> = answer
                    .hits
                    .iter()
                    .take(OBSERVED_SCORES)
                    .map(|h| h.score)
                    .collect();
                observe(&first);
            }
            let header = HeaderValue::from_str(&answer.version).ok();
            let write = {
                let model = slot.name.clone();
                move || {
                    let out = Answered {
                        model,
                        version: answer.version,
                        results: answer
                            .hits
                            .iter()
                            .map(|h| Scored {
                                item: h.item,
                                score: f64::from(h.score),
                            })
                            .collect(),
                    };
                    serde_json::to_vec(&out).expect("an answer serializes")
                }
            };
            let bytes = if answer_len >= OFFLOAD_HITS {
                tokio::task::spawn_blocking(write)
                    .await
                    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
            } else {
                write()
            };
            let mut r = Response::new(crate::upstream::full_body(bytes::Bytes::from(bytes)));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Some(v) = header {
                r.headers_mut().insert("x-model-version", v);
            }
            r
        }
        Err(ServeError::Bad(m)) => error(StatusCode::BAD_REQUEST, m),
        Err(e @ ServeError::Closed(_)) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(e @ ServeError::Overloaded(..)) => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, e);
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        Err(e @ ServeError::Failed(_)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}
