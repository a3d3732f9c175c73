//! Anomaly alerts over the gateway's own series: every `[server] anomaly_interval_ms`, each
//! route's request rate, error ratio (5xx per request) and p99 latency over the interval go
//! through an adaptive detector (`gateway_monitor::Detector`); `gateway_anomaly{route,signal}`
//! is 1 while one is in alert, and each change is logged.

use std::collections::HashMap;
use std::sync::Arc;

use gateway_monitor::{Detector, Settings};
use prometheus::core::Metric;
use prometheus::IntGaugeVec;

use crate::server::ServeCtx;

/// An interval with fewer requests than this says nothing about error ratio or latency.
const MIN_REQUESTS: u64 = 20;

const SIGNALS: [&str; 3] = ["request_rate", "error_ratio", "p99_latency"];

/// One route's counters at the last sample, and its detectors.
struct RouteState {
    total: u64,
    errors: u64,
    buckets: Vec<(f64, u64)>,
    detectors: [Detector; 3],
}

/// The `gateway_anomaly` series, registered into `registry`.
pub(crate) fn gauge(registry: &prometheus::Registry) -> Result<IntGaugeVec, prometheus::Error> {
    let g = IntGaugeVec::new(
        prometheus::Opts::new(
            "gateway_anomaly",
            "1 while a route's signal (request_rate, error_ratio, p99_latency) is outside its adaptive baseline.",
        ),
        &["route", "signal"],
    )?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

/// The p99 of the requests between two readings of a cumulative histogram, as the upper
/// bound of the bucket that holds it.
fn p99(before: &[(f64, u64)], now: &[(f64, u64)]) -> Option<f64> {
    let delta: Vec<(f64, u64)> = now
        .iter()
        .map(|(le, n)| {
            let old = before.iter().find(|(b, _)| b == le).map_or(0, |(_, c)| *c);
            (*le, n.saturating_sub(old))
        })
        .collect();
    let total = delta.last().map(|(_, n)| *n)?;
    if total < MIN_REQUESTS {
        return None;
    }
    let want = (total as f64 * 0.99).ceil() as u64;
    delta.iter().find(|(_, n)| *n >= want).map(|(le, _)| *le)
}

/// Samples every route's series until shutdown.
pub(crate) async fn run(ctx: Arc<ServeCtx>, gauge: IntGaugeVec) {
    let mut routes: HashMap<String, RouteState> = HashMap::new();
    loop {
        let every = ctx.shared.state.load().config.server.anomaly_interval;
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let snapshot = ctx.shared.state.load_full();
        let metrics = &ctx.shared.metrics;
        for route in snapshot.router.routes() {
            let name = route.name.as_ref();
            let class = |c: &str| metrics.requests.with_label_values(&[name, c]).get();
            let total: u64 = ["1xx", "2xx", "3xx", "4xx", "5xx"]
                .iter()
                .map(|c| class(c))
                .sum();
            let errors = class("5xx");
            let histogram = metrics.request_duration.with_label_values(&[name]).metric();
            let mut buckets: Vec<(f64, u64)> = histogram
                .get_histogram()
                .get_bucket()
                .iter()
                .map(|b| (b.upper_bound(), b.cumulative_count()))
                .collect();
            buckets.push((f64::INFINITY, histogram.get_histogram().get_sample_count()));
            let Some(state) = routes.get_mut(name) else {
                routes.insert(
                    name.to_string(),
                    RouteState {
                        total,
                        errors,
                        buckets,
                        detectors: std::array::from_fn(|_| Detector::new(Settings::default())),
                    },
                );
                continue;
            };
            let requests = total.saturating_sub(state.total);
            let samples = [
                Some(requests as f64 / every.as_secs_f64()),
                (requests >= MIN_REQUESTS)
                    .then(|| errors.saturating_sub(state.errors) as f64 / requests as f64),
                p99(&state.buckets, &buckets),
            ];
            for ((detector, sample), signal) in state.detectors.iter_mut().zip(samples).zip(SIGNALS)
            {
                let Some(x) = sample.filter(|x| x.is_finite()) else {
                    continue;
                };
                let judged = detector.observe(x);
                if judged.changed {
                    gauge
                        .with_label_values(&[name, signal])
                        .set(i64::from(judged.alert));
                    let (low, high) = judged.band.unwrap_or((f64::NAN, f64::NAN));
                    if judged.alert {
                        tracing::warn!(target: "anomaly", route = name, signal, value = x, low, high, "left its baseline");
                    } else {
                        tracing::info!(target: "anomaly", route = name, signal, value = x, "back within its baseline");
                    }
                }
            }
            (state.total, state.errors, state.buckets) = (total, errors, buckets);
        }
        routes.retain(|name, _| snapshot.router.routes().iter().any(|r| &*r.name == name));
    }
}
