//! Prometheus series of the proxy, registered into a registry the caller owns.

use prometheus::{
    exponential_buckets, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// Every series the proxy exports. Cloning shares the underlying series.
#[derive(Clone)]
pub struct Metrics {
    /// `gateway_requests_total{route,status_class}`: downstream requests answered.
    pub requests: IntCounterVec,
    /// `gateway_request_duration_seconds{route}`: time to the response head.
    pub request_duration: HistogramVec,
    /// `gateway_upstream_request_duration_seconds{upstream}`: one upstream attempt, to its head.
    pub upstream_duration: HistogramVec,
    /// `gateway_upstream_errors_total{upstream,kind}`: failed upstream attempts by kind
    /// (`connect` (refused or timed out), `reset`, `timeout`, `no_backend`, `other`;
    /// `client_body` for those the client's body caused and `local` for the node's own
    /// resources running out, neither held against the backend).
    pub upstream_errors: IntCounterVec,
    /// `gateway_upstream_panic_total{upstream}`: requests balanced across every backend
    /// because fewer than the pool's panic threshold were healthy.
    pub upstream_panics: IntCounterVec,
    /// `gateway_upstream_ejections_total{upstream,outcome}`: passive ejections made
    /// (`ejected`) or skipped because the pool's `max_ejected_share` was reached
    /// (`over_max_share`).
    pub upstream_ejections: IntCounterVec,
    /// `gateway_upstream_retries_total{upstream,outcome}`: retries made (`outcome=attempted`)
    /// or refused by the budget (`outcome=budget_exhausted`).
    pub retries: IntCounterVec,
    /// `gateway_active_connections{listener}`: open downstream connections.
    pub active_connections: IntGaugeVec,
    /// `gateway_connections_total{listener}`: accepted downstream connections.
    pub connections: IntCounterVec,
    /// `gateway_tls_handshake_failures_total{listener}`.
    pub tls_handshake_failures: IntCounterVec,
    /// `gateway_backend_healthy{upstream,backend}`: 1 when the backend takes traffic.
    pub backend_healthy: IntGaugeVec,
    /// `gateway_rejected_requests_total{reason}`: requests refused by a limit or for their
    /// client's fault (`body_too_large`, `body_timeout`, `body_deadline`, `body_malformed`,
    /// `body_aborted`, `bad_authority`, `misdirected`), and responses cut off because the
    /// client took none of them for `send_timeout_ms` (`send_timeout`).
    pub rejected: IntCounterVec,
    /// `gateway_connections_closed_total{listener,reason}`: downstream connections the gateway
    /// closed on its own to protect itself: `send_timeout` (nothing could be written to the
    /// client for `send_timeout_ms`), `evicted` (idle, closed to make room for a new client
    /// at `max_connections`).
    pub connections_closed: IntCounterVec,
    /// `gateway_experiment_requests_total{experiment,variant,status_class}`: requests of
    /// shoppers assigned by an experiment's split (forced and anonymous ones are not counted).
    pub experiment_requests: IntCounterVec,
    /// `gateway_experiment_request_duration_seconds{experiment,variant}`.
    pub experiment_duration: HistogramVec,
    /// `gateway_experiment_events_total{experiment,variant,event}`: outcome events accepted
    /// (`impression`, `click`, `add_to_cart`, `purchase`).
    pub experiment_events: IntCounterVec,
    /// `gateway_experiment_weight{experiment,variant}`: the variant's weight now.
    pub experiment_weight: IntGaugeVec,
    /// `gateway_feedback_refused_total{reason}`: outcome events refused (`malformed`,
    /// `unknown_key`, `bad_mac`, `expired`, `from_the_future`, `unknown_experiment`,
    /// `unknown_variant`, `unknown_event`).
    pub feedback_refused: IntCounterVec,
    /// `gateway_rollout_decisions_total{experiment,action}`.
    pub rollout_decisions: IntCounterVec,
    /// `gateway_rollout_canary_percent{experiment}`: the canary's share now.
    pub rollout_percent: IntGaugeVec,
}

/// A metric could not be registered (a name clash in the registry).
#[derive(Debug, thiserror::Error)]
#[error("registering metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    /// Creates the series and registers them into `registry`.
    pub fn new(registry: &Registry) -> Result<Metrics, MetricsError> {
        let latency = exponential_buckets(0.0001, 2.0, 18).expect("static buckets");
        let m = Metrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "gateway_requests_total",
                    "Downstream requests answered, by route and status class.",
                ),
                &["route", "status_class"],
            )?,
            request_duration: HistogramVec::new(
                HistogramOpts::new(
                    "gateway_request_duration_seconds",
                    "Time from request to response head.",
                )
                .buckets(latency.clone()),
                &["route"],
            )?,
            upstream_duration: HistogramVec::new(
                HistogramOpts::new(
                    "gateway_upstream_request_duration_seconds",
                    "Time of one upstream attempt, to its response head.",
                )
                .buckets(latency),
                &["upstream"],
            )?,
            upstream_errors: IntCounterVec::new(
                Opts::new(
                    "gateway_upstream_errors_total",
                    "Failed upstream attempts, by kind.",
                ),
                &["upstream", "kind"],
            )?,
            retries: IntCounterVec::new(
                Opts::new(
                    "gateway_upstream_retries_total",
                    "Retries attempted or refused by the retry budget.",
                ),
                &["upstream", "outcome"],
            )?,
            active_connections: IntGaugeVec::new(
                Opts::new("gateway_active_connections", "Open downstream connections."),
                &["listener"],
            )?,
            connections: IntCounterVec::new(
                Opts::new(
                    "gateway_connections_total",
                    "Accepted downstream connections.",
                ),
                &["listener"],
            )?,
            tls_handshake_failures: IntCounterVec::new(
                Opts::new(
                    "gateway_tls_handshake_failures_total",
                    "Failed TLS handshakes.",
                ),
                &["listener"],
            )?,
            backend_healthy: IntGaugeVec::new(
                Opts::new(
                    "gateway_backend_healthy",
                    "1 when the backend takes traffic, 0 when it is ejected or failing checks.",
                ),
                &["upstream", "backend"],
            )?,
            rejected: IntCounterVec::new(
                Opts::new(
                    "gateway_rejected_requests_total",
                    "Requests refused by a limit, by reason.",
                ),
                &["reason"],
            )?,
            connections_closed: IntCounterVec::new(
                Opts::new(
                    "gateway_connections_closed_total",
                    "Downstream connections the gateway closed to protect itself, by reason (send_timeout, evicted).",
                ),
                &["listener", "reason"],
            )?,
            upstream_panics: IntCounterVec::new(
                Opts::new(
                    "gateway_upstream_panic_total",
                    "Requests balanced across every backend because too few were healthy (the panic threshold).",
                ),
                &["upstream"],
            )?,
            upstream_ejections: IntCounterVec::new(
                Opts::new(
                    "gateway_upstream_ejections_total",
                    "Passive ejections of a backend after consecutive failures: made (ejected) or skipped because max_ejected_share of the pool was already ejected (over_max_share).",
                ),
                &["upstream", "outcome"],
            )?,
            experiment_requests: IntCounterVec::new(
                Opts::new(
                    "gateway_experiment_requests_total",
                    "Requests of shoppers assigned by an experiment's split, by variant and status class.",
                ),
                &["experiment", "variant", "status_class"],
            )?,
            experiment_duration: HistogramVec::new(
                HistogramOpts::new(
                    "gateway_experiment_request_duration_seconds",
                    "Time from request to response head of an experiment's counted requests.",
                )
                .buckets(exponential_buckets(0.0001, 2.0, 18).expect("static buckets")),
                &["experiment", "variant"],
            )?,
            experiment_events: IntCounterVec::new(
                Opts::new(
                    "gateway_experiment_events_total",
                    "Outcome events accepted, by experiment, variant and event.",
                ),
                &["experiment", "variant", "event"],
            )?,
            experiment_weight: IntGaugeVec::new(
                Opts::new(
                    "gateway_experiment_weight",
                    "A variant's weight in its experiment's split now.",
                ),
                &["experiment", "variant"],
            )?,
            feedback_refused: IntCounterVec::new(
                Opts::new(
                    "gateway_feedback_refused_total",
                    "Outcome events refused, by reason.",
                ),
                &["reason"],
            )?,
            rollout_decisions: IntCounterVec::new(
                Opts::new(
                    "gateway_rollout_decisions_total",
                    "Rollout decisions, by experiment and action.",
                ),
                &["experiment", "action"],
            )?,
            rollout_percent: IntGaugeVec::new(
                Opts::new(
                    "gateway_rollout_canary_percent",
                    "The rolled-out canary's share of shoppers now, percent.",
                ),
                &["experiment"],
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.request_duration.clone()))?;
        registry.register(Box::new(m.upstream_duration.clone()))?;
        registry.register(Box::new(m.upstream_errors.clone()))?;
        registry.register(Box::new(m.retries.clone()))?;
        registry.register(Box::new(m.active_connections.clone()))?;
        registry.register(Box::new(m.connections.clone()))?;
        registry.register(Box::new(m.tls_handshake_failures.clone()))?;
        registry.register(Box::new(m.backend_healthy.clone()))?;
        registry.register(Box::new(m.rejected.clone()))?;
        registry.register(Box::new(m.connections_closed.clone()))?;
        registry.register(Box::new(m.upstream_panics.clone()))?;
        registry.register(Box::new(m.upstream_ejections.clone()))?;
        registry.register(Box::new(m.experiment_requests.clone()))?;
        registry.register(Box::new(m.experiment_duration.clone()))?;
        registry.register(Box::new(m.experiment_events.clone()))?;
        registry.register(Box::new(m.experiment_weight.clone()))?;
        registry.register(Box::new(m.feedback_refused.clone()))?;
        registry.register(Box::new(m.rollout_decisions.clone()))?;
        registry.register(Box::new(m.rollout_percent.clone()))?;
        Ok(m)
    }
}

/// `2xx`, `4xx`, … for a status code.
pub fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
