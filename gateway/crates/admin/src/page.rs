//! The status page: `GET /` (also `GET /status`) on the admin listener serves one
//! self-contained HTML page (inline CSS, JavaScript and SVG; no external assets, so it works
//! offline), which renders `GET /status.json` (an [`api::Overview`]) and fetches it again
//! every two seconds.
//!
//! Reading needs no token, like `/metrics`: the document holds names, versions, counts and
//! figures, never a token, a key or a reload's error text. Acting does: the page's buttons
//! (rollout pause/resume/promote/abort, plugin and model rollback, reload) call the existing
//! `/admin/...` endpoints with a bearer token the operator pastes into the page, which keeps
//! it in the tab's `sessionStorage` only.
//!
//! The page's figures come from the gateway's own Prometheus registry and serving state,
//! computed here (the page never parses `/metrics`); the charts' history and the anomaly
//! bands from the binary's sampler, through [`Control::observed`].

use std::collections::BTreeMap;
use std::sync::LazyLock;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use prometheus::proto::{Histogram, Metric, MetricFamily, MetricType};
use prometheus::Registry;

use crate::api;
use crate::control::{Control, LiveSince};
use crate::proxy::upstream::{full_body, ProxyBody};
use crate::scoring::ExecutionPath;

const TEMPLATE: &str = include_str!("page.html");
const STYLE: &str = include_str!("page.css");
const SCRIPT: &str = include_str!("page.js");

/// The page, assembled once, and its Content-Security-Policy: only the inline style and
/// script with these exact hashes run, it may fetch only from its own origin, and no other
/// site may frame it (its buttons act with the operator's token).
static PAGE: LazyLock<(Bytes, HeaderValue)> = LazyLock::new(|| {
    let html = TEMPLATE
        .replacen("/*STYLE*/", STYLE, 1)
        .replacen("/*SCRIPT*/", SCRIPT, 1);
    let csp = format!(
        "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        csp_hash(SCRIPT),
        csp_hash(STYLE)
    );
    (
        Bytes::from(html),
        HeaderValue::from_str(&csp).expect("the policy is ASCII"),
    )
});

/// `sha256-<base64>`: a CSP source that allows exactly this inline text.
fn csp_hash(text: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    let digest = sha2::Sha256::digest(text.as_bytes());
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// The answer to `GET /`: the HTML page.
pub(crate) fn page() -> Response<ProxyBody> {
    let (html, csp) = &*PAGE;
    let mut r = Response::new(full_body(html.clone()));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CONTENT_SECURITY_POLICY, csp.clone());
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    r
}

/// The answer to `GET /status.json`.
pub(crate) fn overview_response(ctx: &impl Control, registry: &Registry) -> Response<ProxyBody> {
    let mut r = crate::typed_response(&overview(ctx, registry));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    *r.status_mut() = StatusCode::OK;
    r
}

/// The gathered registry, read by family name and labels.
struct Series {
    families: Vec<MetricFamily>,
}

impl Series {
    fn gather(registry: &Registry) -> Series {
        Series {
            families: registry.gather(),
        }
    }

    /// The metrics of family `name` whose labels include all of `want`.
    fn select(&self, name: &str, want: &[(&str, &str)]) -> Vec<(&MetricFamily, &Metric)> {
        self.families
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter().map(move |m| (f, m)))
            .filter(|(_, m)| {
                want.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                })
            })
            .collect()
    }

    /// The value of a counter or gauge.
    fn value(family: &MetricFamily, m: &Metric) -> f64 {
        match family.get_field_type() {
            MetricType::COUNTER => m.get_counter().get_value(),
            MetricType::GAUGE => m.get_gauge().get_value(),
            _ => 0.0,
        }
    }

    /// The sum of the counters of family `name` matching `want`.
    fn sum(&self, name: &str, want: &[(&str, &str)]) -> u64 {
        self.select(name, want)
            .into_iter()
            .map(|(f, m)| Self::value(f, m))
            .sum::<f64>() as u64
    }

    /// The counters of family `name` matching `want`, summed by the value of label `by`.
    fn by_label(&self, name: &str, want: &[(&str, &str)], by: &str) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (f, m) in self.select(name, want) {
            let key = label(m, by).to_string();
            *out.entry(key).or_insert(0) += Self::value(f, m) as u64;
        }
        out
    }

    /// The histogram of family `name` matching `want` (the first, when several do).
    fn histogram(&self, name: &str, want: &[(&str, &str)]) -> Option<&Histogram> {
        self.select(name, want)
            .first()
            .map(|(_, m)| m.get_histogram())
    }
}

fn label<'a>(m: &'a Metric, name: &str) -> &'a str {
    m.get_label()
        .iter()
        .find(|l| l.name() == name)
        .map_or("", |l| l.value())
}

/// The upper bound of the bucket that holds quantile `q` (`None` without observations, or
/// when it is beyond the last bound).
fn quantile(h: &Histogram, q: f64) -> Option<f64> {
    crate::hints::quantile(h, q).filter(|v| v.is_finite())
}

/// `RoundRobin` → `round_robin`: a config enum as the config file spells it.
fn snake(debug: impl std::fmt::Debug) -> String {
    let mut out = String::new();
    for (i, c) in format!("{debug:?}").chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The status page's document: what serves and how it does, from the registry and the
/// serving state.
pub(crate) fn overview(ctx: &impl Control, registry: &Registry) -> api::Overview {
    let snapshot = ctx.snapshot();
    let config = &snapshot.config;
    let series = Series::gather(registry);
    let observed = ctx.observed();
    let now_ms = crate::proxy::experiment::now_ms();

    let routes = config
        .routes
        .iter()
        .map(|r| {
            let name = r.name.as_str();
            let by_class =
                series.by_label("gateway_requests_total", &[("route", name)], "status_class");
            let seen = observed.routes.get(name);
            api::RouteOverview {
                requests: by_class.values().sum(),
                errors: by_class.get("5xx").copied().unwrap_or(0),
                by_class,
                experiment: r.experiment.map(|i| config.experiments[i].name.clone()),
                history: seen
                    .map(|s| s.samples.iter().copied().collect())
                    .unwrap_or_default(),
                hosts: r.hosts.iter().map(ToString::to_string).collect(),
                name: r.name.clone(),
                path_prefix: r.path_prefix.clone(),
                plugins: r
                    .plugins
                    .iter()
                    .map(|&i| config.plugins[i].name.clone())
                    .collect(),
                signals: seen.map(|s| s.signals.clone()).unwrap_or_default(),
                upstream: config.upstreams[r.upstream].name.clone(),
                variants: r
                    .variants
                    .iter()
                    .map(|(v, u)| api::RouteVariant {
                        name: v.clone(),
                        upstream: config.upstreams[*u].name.clone(),
                    })
                    .collect(),
            }
        })
        .collect();

    let upstreams = config
        .upstreams
        .iter()
        .zip(&snapshot.pools)
        .map(|(spec, pool)| {
            let name = spec.name.as_str();
            let (available, _) = pool.availability();
            api::UpstreamOverview {
                available,
                backends: spec
                    .backends
                    .iter()
                    .map(|b| {
                        let address = b.to_string();
                        let healthy = series
                            .select(
                                "gateway_backend_healthy",
                                &[("upstream", name), ("backend", &address)],
                            )
                            .into_iter()
                            .all(|(f, m)| Series::value(f, m) >= 1.0);
                        api::BackendOverview { address, healthy }
                    })
                    .collect(),
                balance: snake(spec.balance),
                errors: series.by_label(
                    "gateway_upstream_errors_total",
                    &[("upstream", name)],
                    "kind",
                ),
                health_checks: spec.health_check.is_some(),
                name: spec.name.clone(),
                panics: series.sum("gateway_upstream_panic_total", &[("upstream", name)]),
                protocol: snake(spec.protocol),
                retries: series.by_label(
                    "gateway_upstream_retries_total",
                    &[("upstream", name)],
                    "outcome",
                ),
            }
        })
        .collect();

    let live_plugins = ctx.plugins(&snapshot);
    let plugins = config
        .plugins
        .iter()
        .filter_map(|spec| {
            let live = live_plugins.iter().find(|p| p.name == spec.name)?;
            let name = spec.name.as_str();
            let hooks = ["on_request", "on_response"]
                .into_iter()
                .filter_map(|hook| {
                    let h = series.histogram(
                        "gateway_plugin_hook_duration_seconds",
                        &[("plugin", name), ("hook", hook)],
                    )?;
                    Some(api::HookFigures {
                        calls: h.get_sample_count(),
                        hook: hook.to_string(),
                        p99_ms: quantile(h, 0.99).map(|s| s * 1000.0),
                    })
                })
                .filter(|h| h.calls > 0)
                .collect();
            let index = config.plugins.iter().position(|p| p.name == spec.name);
            Some(api::PluginOverview {
                deadline_ms: spec.deadline.as_millis() as u64,
                hooks,
                idle_instances: live.idle_instances,
                last_swap_unix_ms: swapped(observed.plugins.get(name), &live.version),
                name: spec.name.clone(),
                outcomes: series.by_label(
                    "gateway_plugin_invocations_total",
                    &[("plugin", name), ("version", &live.version)],
                    "outcome",
                ),
                routes: config
                    .routes
                    .iter()
                    .filter(|r| index.is_some_and(|i| r.plugins.contains(&i)))
                    .map(|r| r.name.clone())
                    .collect(),
                version: live.version.clone(),
            })
        })
        .collect();

    let policy = &config.scoring.policy;
    let mut models: Vec<api::ModelOverview> = snapshot
        .models
        .values()
        .map(|slot| {
            let live = slot.live();
            let name = slot.name.as_str();
            let (device, adapter, fallback_reason) = match live.model.execution_path() {
                ExecutionPath::Gpu {
                    adapter, software, ..
                } => (
                    if *software { "software-gpu" } else { "gpu" },
                    Some(adapter),
                    None,
                ),
                ExecutionPath::Cpu => ("cpu", None, None),
                ExecutionPath::CpuFallback { adapter, reason } => {
                    ("cpu", Some(adapter), Some(reason))
                }
            };
            let batch = series.histogram("gateway_model_batch_size", &[("model", name)]);
            let queue = series.histogram("gateway_model_queue_seconds", &[("model", name)]);
            let compute = series.histogram("gateway_model_compute_seconds", &[("model", name)]);
            let batches = batch.map_or(0, Histogram::get_sample_count);
            let ms = |h: Option<&Histogram>, q| h.and_then(|h| quantile(h, q)).map(|s| s * 1000.0);
            api::ModelOverview {
                adapter: adapter.cloned(),
                batching: api::BatchFigures {
                    batches,
                    compute_p99_ms: ms(compute, 0.99),
                    max_batch: policy.max_batch,
                    max_queue_delay_us: policy.max_queue_delay.as_micros() as u64,
                    mean_size: batch
                        .filter(|_| batches > 0)
                        .map(|h| h.get_sample_sum() / batches as f64),
                    p99_size: batch.and_then(|h| quantile(h, 0.99)),
                    queue_p50_ms: ms(queue, 0.5),
                    queue_p99_ms: ms(queue, 0.99),
                },
                cpu_fallbacks: series.sum("gateway_model_cpu_fallbacks_total", &[("model", name)]),
                device: device.to_string(),
                fallback_reason: fallback_reason.cloned(),
                held_bytes: live.model.held_bytes(),
                history: slot.history(),
                kind: live.model.info().kind.to_string(),
                last_swap_unix_ms: swapped(observed.models.get(name), &live.version),
                name: slot.name.clone(),
                requests: series.by_label(
                    "gateway_model_requests_total",
                    &[("model", name), ("version", &live.version)],
                    "outcome",
                ),
                storage: live.model.table_storage().to_string(),
                version: live.version.clone(),
            }
        })
        .collect();
    models.sort_by(|a, b| a.name.cmp(&b.name));

    let scoring_device = series
        .select("gateway_scoring_device_info", &[])
        .into_iter()
        .find(|(f, m)| Series::value(f, m) >= 1.0)
        .map(|(_, m)| api::ScoringDevice {
            adapter: Some(label(m, "adapter"))
                .filter(|a| !a.is_empty() && *a != "-")
                .map(str::to_string),
            backend: label(m, "backend").to_string(),
        });

    let experiments = snapshot
        .experiments
        .iter()
        .map(|e| {
            let status = e.status(now_ms);
            let spec = e.spec();
            api::ExperimentOverview {
                assign_by: status.assign_by,
                name: status.name,
                rollout: e.rollout().map(|r| api::RolloutOverview {
                    baseline: r.baseline().to_string(),
                    canary: r.canary().to_string(),
                    canary_percent: r.canary_percent(),
                    decisions: r.history().cloned().collect(),
                    evidence: r.evidence().clone(),
                    state: r.state(),
                    step_started_ms: r.step_started_ms(),
                    steps: r.plan().steps.clone(),
                }),
                routes: spec
                    .routes
                    .iter()
                    .map(|&i| config.routes[i].name.clone())
                    .collect(),
                variants: status
                    .variants
                    .into_iter()
                    .map(|v| api::VariantOverview {
                        last_5_minutes: figures(&v.last_5_minutes),
                        name: v.name,
                        step: figures(&v.step),
                        weight: v.weight,
                    })
                    .collect(),
            }
        })
        .collect();

    api::Overview {
        admin_api: config.admin.token.is_some(),
        experiments,
        generated_unix_ms: now_ms,
        generation: snapshot.generation,
        hints: crate::hints::hints(registry, &snapshot),
        last_reload: ctx.last_reload().map(|r| api::ReloadOutcome {
            at_unix_ms: unix_ms(r.at),
            ok: r.error.is_none(),
        }),
        models,
        plugins,
        routes,
        sources: crate::sources(config),
        sample_interval_ms: config.server.anomaly_interval.as_millis() as u64,
        scoring_device,
        started_unix_ms: observed.started_unix_ms,
        upstreams,
    }
}

/// When `version` went live, if the sampler's record is of that version and it was a swap.
fn swapped(seen: Option<&LiveSince>, version: &str) -> Option<u64> {
    seen.filter(|s| s.version == version)
        .and_then(|s| s.since_unix_ms)
}

fn figures(f: &crate::proxy::experiment::Figures) -> api::VariantFigures {
    api::VariantFigures {
        clicks: f.clicks,
        ctr: f.ctr,
        cvr: f.cvr,
        error_rate: f.error_rate,
        impressions: f.impressions,
        p50_ms: f.p50_ms,
        p99_ms: f.p99_ms,
        purchases: f.purchases,
        requests: f.requests,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_enums_read_as_the_file_spells_them() {
        assert_eq!(
            snake(crate::config::Balance::LeastInFlight),
            "least_in_flight"
        );
        assert_eq!(snake(crate::config::Balance::RoundRobin), "round_robin");
        assert_eq!(snake(crate::config::UpstreamProtocol::H2), "h2");
        assert_eq!(snake(crate::config::UpstreamProtocol::Http1), "http1");
    }

    #[test]
    fn the_page_is_self_contained_and_its_policy_allows_exactly_its_inline_code() {
        let r = page();
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        let (html, _) = &*PAGE;
        let html = std::str::from_utf8(html).unwrap();
        // The one URL in it is the SVG namespace, an identifier that is never fetched.
        let without_ns = html.replace("\"http://www.w3.org/2000/svg\"", "");
        assert!(!html.contains("/*STYLE*/") && !html.contains("/*SCRIPT*/"));
        // No external assets: nothing loads from another origin.
        for needle in ["http://", "https://", "src=", "<link"] {
            assert!(!without_ns.contains(needle), "the page refers to {needle}");
        }
        // The inline script and style are the ones the policy's hashes allow.
        let inline = |open: &str, close: &str| {
            let start = html.find(open).unwrap() + open.len();
            let end = start + html[start..].find(close).unwrap();
            html[start..end].to_string()
        };
        assert!(
            csp.contains(&csp_hash(&inline("<script>", "</script>"))),
            "{csp}"
        );
        assert!(
            csp.contains(&csp_hash(&inline("<style>", "</style>"))),
            "{csp}"
        );
        assert!(csp.contains("frame-ancestors 'none'") && csp.contains("connect-src 'self'"));
    }

    #[test]
    fn a_swap_time_belongs_to_the_version_it_was_recorded_for() {
        let seen = LiveSince {
            version: "v2".into(),
            since_unix_ms: Some(7),
        };
        assert_eq!(swapped(Some(&seen), "v2"), Some(7));
        assert_eq!(swapped(Some(&seen), "v3"), None);
        let start = LiveSince {
            version: "v1".into(),
            since_unix_ms: None,
        };
        assert_eq!(swapped(Some(&start), "v1"), None);
        assert_eq!(swapped(None, "v1"), None);
    }
}
