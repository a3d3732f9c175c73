//! Tuning hints: what an operator could change, read from the gateway's own series since
//! start, each with the numbers behind it. Shown in `GET /admin/status` (and so by
//! `gateway status`) and `GET /admin/hints`.

use prometheus::proto::{Histogram, MetricFamily};
use prometheus::Registry;

use crate::api::Hint;
use crate::proxy::Snapshot;

/// Batches a model must have dispatched, or hook calls a plugin must have made, before a
/// hint speaks of them.
const MIN_EVENTS: u64 = 200;

fn histograms<'a>(
    families: &'a [MetricFamily],
    name: &str,
) -> impl Iterator<Item = (Vec<(&'a str, &'a str)>, &'a Histogram)> + 'a {
    let name = name.to_string();
    families
        .iter()
        .filter(move |f| f.name() == name)
        .flat_map(|f| f.get_metric())
        .map(|m| {
            let labels = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            (labels, m.get_histogram())
        })
}

fn label<'a>(labels: &[(&'a str, &'a str)], name: &str) -> &'a str {
    labels
        .iter()
        .find(|(n, _)| *n == name)
        .map_or("", |(_, v)| *v)
}

/// The smallest bucket bound below which at least `q` of the observations fall.
pub(crate) fn quantile(h: &Histogram, q: f64) -> Option<f64> {
    let total = h.get_sample_count();
    if total == 0 {
        return None;
    }
    let want = (total as f64 * q).ceil() as u64;
    h.get_bucket()
        .iter()
        .find(|b| b.cumulative_count() >= want)
        .map(|b| b.upper_bound())
}

/// Every hint the series support now.
pub(crate) fn hints(registry: &Registry, snapshot: &Snapshot) -> Vec<Hint> {
    let families = registry.gather();
    let scoring = &snapshot.config.scoring.policy;
    let mut out = Vec::new();
    for (labels, h) in histograms(&families, "gateway_model_batch_size") {
        let model = label(&labels, "model");
        let batches = h.get_sample_count();
        if batches < MIN_EVENTS {
            continue;
        }
        let mean = h.get_sample_sum() / batches as f64;
        let delay_us = scoring.max_queue_delay.as_micros();
        if mean < 1.5 && delay_us > 0 {
            out.push(Hint {
                subject: format!("model {model}"),
                advice: format!(
                    "batches hardly ever fill: lower [scoring] max_queue_delay_us (now {delay_us}) so a lone request does not wait for company that rarely comes"
                ),
                evidence: format!("{batches} batches of {mean:.2} requests on average"),
            });
        } else if mean >= 0.9 * scoring.max_batch as f64 {
            out.push(Hint {
                subject: format!("model {model}"),
                advice: format!(
                    "batches are nearly always full: raise [scoring] max_batch (now {}) so queued requests do not wait for the next batch",
                    scoring.max_batch
                ),
                evidence: format!("{batches} batches of {mean:.1} requests on average"),
            });
        }
    }
    for (labels, h) in histograms(&families, "gateway_plugin_hook_duration_seconds") {
        let (plugin, hook) = (label(&labels, "plugin"), label(&labels, "hook"));
        let calls = h.get_sample_count();
        let Some(spec) = snapshot.config.plugins.iter().find(|p| p.name == plugin) else {
            continue;
        };
        let deadline = spec.deadline.as_secs_f64();
        let Some(p99) = quantile(h, 0.99).filter(|_| calls >= MIN_EVENTS) else {
            continue;
        };
        if p99 >= 0.5 * deadline {
            out.push(Hint {
                subject: format!("plugin {plugin}"),
                advice: format!(
                    "its {hook} hook's p99 is near its deadline: raise deadline_ms (now {}) or make the plugin cheaper, before slow calls start failing",
                    spec.deadline.as_millis()
                ),
                evidence: format!(
                    "p99 ≤ {:.3} ms over {calls} calls, deadline {:.3} ms",
                    p99 * 1000.0,
                    deadline * 1000.0
                ),
            });
        }
    }
    for (labels, h) in histograms(&families, "gateway_plugin_fuel_per_call") {
        let (plugin, hook) = (label(&labels, "plugin"), label(&labels, "hook"));
        let calls = h.get_sample_count();
        let spec = snapshot.config.plugins.iter().find(|p| p.name == plugin);
        let Some(budget) = spec.and_then(|s| s.fuel_per_call) else {
            continue;
        };
        let Some(p99) = quantile(h, 0.99).filter(|_| calls >= MIN_EVENTS) else {
            continue;
        };
        // Bucket bounds grow by 4: a p99 bound at a quarter of the budget may be near it.
        if p99 >= 0.25 * budget as f64 {
            out.push(Hint {
                subject: format!("plugin {plugin}"),
                advice: format!(
                    "its {hook} hook's p99 fuel is near its budget: raise fuel_per_call (now {budget}) or fuel_per_body_byte, or make the plugin cheaper, before heavy calls start failing with outcome fuel"
                ),
                evidence: format!("p99 ≤ {p99:.0} fuel units over {calls} calls, budget {budget}"),
            });
        }
    }
    for family in families
        .iter()
        .filter(|f| f.name() == "gateway_upstream_retries_total")
    {
        for m in family.get_metric() {
            let labels: Vec<(&str, &str)> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            let refused = m.get_counter().get_value();
            if label(&labels, "outcome") == "budget_exhausted" && refused >= 1.0 {
                let upstream = label(&labels, "upstream");
                out.push(Hint {
                    subject: format!("upstream {upstream}"),
                    advice: "retries were refused by the retry budget: its backends fail often; look at gateway_upstream_errors_total, or raise retry_budget_ratio if the failures are brief".into(),
                    evidence: format!("{refused} retries refused"),
                });
            }
        }
    }
    out
}
