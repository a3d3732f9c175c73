//! The feedback endpoint: outcome events the storefront sends back, each with the attribution
//! token of the response it is about.
//!
//! `POST <[feedback] path>` with
//! `{"events": [{"token": "<x-gateway-attribution>", "event": "click"}, ...]}`, where `event`
//! is `impression`, `click`, `add_to_cart` or `purchase`. The answer is
//! `{"accepted": n, "refused": m, "reasons": {"expired": m}}`: one bad event does not refuse
//! the others. The token names the route and variant that served the response; any node
//! holding the same `[feedback] key_file` accepts it, so feedback needs no memory of the
//! requests. Forged, tampered and expired tokens are refused and counted in
//! `gateway_feedback_refused_total{reason}`. A token is not single-use: one impression may
//! lead to several clicks.

use std::collections::BTreeMap;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::experiment::Outcome;
use crate::request::Snapshot;
use crate::upstream::ProxyBody;

/// Bodies of at least this many bytes are parsed and checked on a blocking thread.
const OFFLOAD_BYTES: usize = 16 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    events: Vec<RawEvent>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    token: String,
    event: String,
}

/// The answer to a feedback request.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FeedbackAnswer {
    /// Events counted.
    pub accepted: u64,
    /// Events refused.
    pub refused: u64,
    /// Refused events by reason (the `reason` label of `gateway_feedback_refused_total`).
    pub reasons: BTreeMap<String, u64>,
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<ProxyBody> {
    crate::http_util::json_error(status, message)
}

fn boxed_error(status: StatusCode, message: impl std::fmt::Display) -> Box<Response<ProxyBody>> {
    Box::new(error(status, message))
}

/// Answers a request to the feedback path.
pub async fn handle(
    snapshot: std::sync::Arc<Snapshot>,
    req: Request<ProxyBody>,
) -> Response<ProxyBody> {
    if req.method() != Method::POST {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST {\"events\": [{\"token\": ..., \"event\": ...}]}",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    let settings = &snapshot.config.feedback;
    // A token is at most ~1 KB; an event's JSON adds a few dozen bytes.
    let limit = (settings.max_events_per_request * 1200 + 1024).min(64 << 20);
    let bytes = match crate::http_util::read_to_limit(req.into_body(), limit).await {
        Ok(b) => b,
        Err(e) => {
            return crate::http_util::read_error_response(
                e,
                format!(
                    "send at most {} events (and {limit} bytes) per request",
                    settings.max_events_per_request
                ),
            )
        }
    };
    let offload = bytes.len() >= OFFLOAD_BYTES;
    let work = {
        let snapshot = snapshot.clone();
        move || record(&snapshot, &bytes)
    };
    let result = if offload {
        tokio::task::spawn_blocking(work)
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    } else {
        work()
    };
    match result {
        Ok(answer) => crate::http_util::json_response(
            StatusCode::OK,
            &serde_json::to_value(answer).expect("answers serialize"),
        ),
        Err(r) => *r,
    }
}

fn record(snapshot: &Snapshot, bytes: &[u8]) -> Result<FeedbackAnswer, Box<Response<ProxyBody>>> {
    let settings = &snapshot.config.feedback;
    let body: Body = serde_json::from_slice(bytes).map_err(|e| {
        boxed_error(
            StatusCode::BAD_REQUEST,
            format!("invalid JSON body: {e}; send {{\"events\": [{{\"token\": \"...\", \"event\": \"click\"}}]}}"),
        )
    })?;
    if body.events.len() > settings.max_events_per_request {
        return Err(boxed_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} events; send at most {} per request",
                body.events.len(),
                settings.max_events_per_request
            ),
        ));
    }
    let Some(keyring) = snapshot.keyring.as_deref() else {
        return Err(boxed_error(
            StatusCode::NOT_FOUND,
            "no experiments are configured",
        ));
    };
    let now = crate::experiment::now_ms() / 1000;
    let max_age = settings.token_max_age.as_secs();
    let mut answer = FeedbackAnswer::default();
    let metrics = &snapshot.metrics_for_feedback;
    for event in &body.events {
        let outcome = Outcome::parse(&event.event);
        let verdict = match outcome {
            None => Err("unknown_event"),
            Some(outcome) => match keyring.verify(&event.token, now, max_age) {
                Err(e) => Err(e.label()),
                Ok(attribution) => match snapshot.experiment_of_token(&attribution.route) {
                    None => Err("unknown_experiment"),
                    Some(experiment) => {
                        if experiment.record_outcome(&attribution.variant, outcome) {
                            Ok(())
                        } else {
                            Err("unknown_variant")
                        }
                    }
                },
            },
        };
        match verdict {
            Ok(()) => answer.accepted += 1,
            Err(reason) => {
                answer.refused += 1;
                *answer.reasons.entry(reason.to_string()).or_default() += 1;
                metrics.with_label_values(&[reason]).inc();
            }
        }
    }
    Ok(answer)
}
