//! Anomaly alerts over the gateway's own series: every `[server] anomaly_interval_ms`, each
//! route's request rate, error ratio (5xx per request) and p99 latency over the interval go
//! through an adaptive detector (`gateway_monitor::Detector`); `gateway_anomaly{route,signal}`
//! is 1 while one is in alert, and each change is logged. Each sample and the detector's
//! judgement of it are also kept for the last minutes ([`Observed`]), with the time each
//! plugin and model version went live: the status page's charts and "last swap".

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use gateway_admin::api::{Sample, SignalState};
use gateway_admin::{LiveSince, Observations};
use gateway_monitor::{Detector, Settings};
use prometheus::core::Metric;
use prometheus::IntGaugeVec;

use crate::proxy::Snapshot;
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

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `(name, live version)` of each plugin or model a snapshot serves.
type Versions = Vec<(String, String)>;

/// The plugins and models a snapshot serves, with their live versions.
fn versions(snapshot: &Snapshot) -> (Versions, Versions) {
    let plugins = crate::plugin::chain::in_use(snapshot)
        .into_iter()
        .flatten()
        .map(|p| (p.name.clone(), p.version.clone()))
        .collect();
    let models = snapshot
        .models
        .values()
        .map(|slot| (slot.name.clone(), slot.live().version.clone()))
        .collect();
    (plugins, models)
}

/// What the sampler saw over the last minutes, and when the live plugin and model versions
/// went live; the admin API reads a copy ([`gateway_admin::Control::observed`]).
pub(crate) struct Observed(Mutex<Observations>);

impl Observed {
    /// Starts the record with the versions `snapshot` serves, as served since start.
    pub(crate) fn new(snapshot: &Snapshot) -> Observed {
        let (plugins, models) = versions(snapshot);
        let since_start = |list: Versions| {
            list.into_iter()
                .map(|(name, version)| {
                    let live = LiveSince {
                        version,
                        since_unix_ms: None,
                    };
                    (name, live)
                })
                .collect()
        };
        Observed(Mutex::new(Observations {
            started_unix_ms: unix_ms(),
            routes: HashMap::new(),
            plugins: since_start(plugins),
            models: since_start(models),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Observations> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the record.
    pub(crate) fn get(&self) -> Observations {
        self.lock().clone()
    }

    /// Notes the versions `snapshot` serves (call it once they serve): a version that is not
    /// the one recorded went live now.
    pub(crate) fn note_versions(&self, snapshot: &Snapshot) {
        let (plugins, models) = versions(snapshot);
        let now = unix_ms();
        let note = |record: &mut HashMap<String, LiveSince>, list: Versions| {
            record.retain(|name, _| list.iter().any(|(n, _)| n == name));
            for (name, version) in list {
                if record.get(&name).is_none_or(|l| l.version != version) {
                    let live = LiveSince {
                        version,
                        since_unix_ms: Some(now),
                    };
                    record.insert(name, live);
                }
            }
        };
        let mut o = self.lock();
        note(&mut o.plugins, plugins);
        note(&mut o.models, models);
    }

    /// Appends a route's sample and the judgements of the signals it had figures for.
    fn record(&self, route: &str, sample: Sample, signals: Vec<SignalState>) {
        let mut o = self.lock();
        let series = o.routes.entry(route.to_string()).or_default();
        series.push(sample);
        for s in signals {
            match series.signals.iter_mut().find(|old| old.signal == s.signal) {
                Some(old) => *old = s,
                None => series.signals.push(s),
            }
        }
    }

    /// Forgets the routes `keep` says no longer exist.
    fn retain_routes(&self, keep: impl Fn(&str) -> bool) {
        self.lock().routes.retain(|name, _| keep(name));
    }
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
            let rate = requests as f64 / every.as_secs_f64();
            let samples = [
                Some(rate),
                (requests >= MIN_REQUESTS)
                    .then(|| errors.saturating_sub(state.errors) as f64 / requests as f64),
                p99(&state.buckets, &buckets),
            ];
            let mut judged_signals = Vec::with_capacity(SIGNALS.len());
            for ((detector, sample), signal) in state.detectors.iter_mut().zip(samples).zip(SIGNALS)
            {
                let Some(x) = sample.filter(|x| x.is_finite()) else {
                    continue;
                };
                let judged = detector.observe(x);
                // The page shows latency in milliseconds.
                let unit = if signal == "p99_latency" { 1000.0 } else { 1.0 };
                judged_signals.push(SignalState {
                    alert: judged.alert,
                    high: judged.band.map(|(_, high)| high * unit),
                    low: judged.band.map(|(low, _)| low * unit),
                    signal: signal.to_string(),
                    value: x * unit,
                });
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
            ctx.observed.record(
                name,
                Sample {
                    at_unix_ms: unix_ms(),
                    error_ratio: samples[1].filter(|x| x.is_finite()),
                    p99_ms: samples[2].filter(|x| x.is_finite()).map(|s| s * 1000.0),
                    rate_per_s: rate,
                },
                judged_signals,
            );
            (state.total, state.errors, state.buckets) = (total, errors, buckets);
        }
        let exists = |name: &str| snapshot.router.routes().iter().any(|r| &*r.name == name);
        routes.retain(|name, _| exists(name));
        ctx.observed.retain_routes(exists);
    }
}
