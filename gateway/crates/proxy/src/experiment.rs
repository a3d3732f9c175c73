//! Experiments on the request path: which variant serves a shopper, what each variant's
//! shoppers did, and the rollout that judges a canary from it.
//!
//! An [`Experiment`] lives in the [`crate::Snapshot`] and is carried over reloads while its
//! configuration is unchanged, so its counts and its rollout survive them. Assignment is a
//! weighted rendezvous hash of the shopper id keyed by the experiment's name
//! ([`gateway_rollout::Splitter`]): every node of a fleet puts a shopper in the same variant,
//! and raising a variant's weight only moves shoppers into it. The QA override header forces
//! a variant; forced requests and requests without a shopper id are served (by the override
//! or the baseline) but not counted.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use gateway_rollout::{
    Counts, Decision, Event, Rollout, ScoreBins, Splitter, State, Totals, TransitionError, Windowed,
};
use http::{HeaderMap, StatusCode, Uri};
use prometheus::{Histogram, IntCounter, IntGauge};
use serde::Serialize;

use crate::config::{ExperimentSpec, ShopperKey};
use crate::metrics::Metrics;

/// Milliseconds since the Unix epoch: the rollout's clock (it is persisted across restarts).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Which variant serves a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    /// Index into the experiment's variants.
    pub variant: usize,
    /// Whether the request counts in the variant's figures: it was assigned by the split,
    /// not forced by the override header or defaulted for want of a shopper id.
    pub counted: bool,
}

/// An outcome event the storefront reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The response's items were shown.
    Impression,
    /// The shopper clicked one.
    Click,
    /// The shopper put one in the cart.
    AddToCart,
    /// The shopper bought.
    Purchase,
}

impl Outcome {
    /// The event's name in feedback requests and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Impression => "impression",
            Outcome::Click => "click",
            Outcome::AddToCart => "add_to_cart",
            Outcome::Purchase => "purchase",
        }
    }

    /// Parses an event name.
    pub fn parse(name: &str) -> Option<Outcome> {
        [
            Outcome::Impression,
            Outcome::Click,
            Outcome::AddToCart,
            Outcome::Purchase,
        ]
        .into_iter()
        .find(|o| o.name() == name)
    }

    fn event(self) -> Event {
        match self {
            Outcome::Impression => Event::Impression,
            Outcome::Click => Event::Click,
            Outcome::AddToCart => Event::AddToCart,
            Outcome::Purchase => Event::Purchase,
        }
    }
}

/// An operator's command to a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Hold at the current step.
    Pause,
    /// Carry on from the current step.
    Resume,
    /// Give the canary all the traffic now.
    Promote,
    /// Give the canary no traffic and stop.
    Abort,
}

/// Why a rollout command did nothing.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The experiment has no `[experiments.rollout]`.
    #[error("experiment {0:?} has no rollout")]
    NoRollout(String),
    /// The command does not apply in the rollout's state.
    #[error(transparent)]
    Transition(#[from] TransitionError),
}

/// The sliding window of an arm's figures in the status: 30 buckets of 10 s.
const WINDOW_BUCKET_MS: u64 = 10_000;
const WINDOW_BUCKETS: usize = 30;

struct Arm {
    name: String,
    /// Since the rollout's current step began (or since start, without a rollout).
    step: Mutex<Counts>,
    /// The last five minutes.
    window: Mutex<Windowed>,
    by_class: [IntCounter; 5],
    duration: Histogram,
    events: [IntCounter; 4],
    weight: IntGauge,
}

struct Split {
    splitter: Splitter,
    weights: Box<[u32]>,
}

/// One experiment: its configuration and its live state.
pub struct Experiment {
    spec: ExperimentSpec,
    live: Arc<Live>,
}

/// What an experiment has learned and decided; shared by the experiment's successors in
/// later snapshots while they split the same variants under the same plan, so figures and
/// decisions made on an older snapshot are never lost.
struct Live {
    split: ArcSwap<Split>,
    arms: Box<[Arm]>,
    rollout: Mutex<Option<Rollout>>,
    decisions: [IntCounter; 7],
    percent: IntGauge,
}

const ACTIONS: [&str; 7] = [
    "advance",
    "promote",
    "roll_back",
    "pause",
    "resume",
    "abort",
    "manual_promote",
];

fn action_index(d: &Decision) -> usize {
    use gateway_rollout::Action;
    match d.action {
        Action::Advance { .. } => 0,
        Action::Promote => 1,
        Action::RollBack { .. } => 2,
        Action::Pause => 3,
        Action::Resume => 4,
        Action::Abort => 5,
        Action::ManualPromote => 6,
    }
}

impl Experiment {
    /// Starts an experiment from its configuration. With a rollout configured, `resumed` is
    /// the rollout as persisted before a restart, used when it judges the same two variants
    /// under the same plan; otherwise a new rollout starts at the plan's first step.
    pub fn new(spec: ExperimentSpec, metrics: &Metrics, resumed: Option<Rollout>) -> Experiment {
        let name = spec.name.as_str();
        let arms: Box<[Arm]> = spec
            .variants
            .iter()
            .map(|v| {
                let labels = [name, v.name.as_str()];
                let class = |c: &str| {
                    metrics
                        .experiment_requests
                        .with_label_values(&[name, v.name.as_str(), c])
                };
                let event = |e: Outcome| {
                    metrics
                        .experiment_events
                        .with_label_values(&[name, v.name.as_str(), e.name()])
                };
                Arm {
                    name: v.name.clone(),
                    step: Mutex::new(Counts::new(ScoreBins::default())),
                    window: Mutex::new(Windowed::new(
                        WINDOW_BUCKET_MS,
                        WINDOW_BUCKETS,
                        ScoreBins::default(),
                    )),
                    by_class: [
                        class("1xx"),
                        class("2xx"),
                        class("3xx"),
                        class("4xx"),
                        class("5xx"),
                    ],
                    duration: metrics.experiment_duration.with_label_values(&labels),
                    events: [
                        event(Outcome::Impression),
                        event(Outcome::Click),
                        event(Outcome::AddToCart),
                        event(Outcome::Purchase),
                    ],
                    weight: metrics.experiment_weight.with_label_values(&labels),
                }
            })
            .collect();
        let rollout = spec.rollout.as_ref().map(|r| {
            let (baseline, canary) = (&spec.variants[0].name, &spec.variants[1].name);
            match resumed {
                Some(old)
                    if old.plan() == &r.plan
                        && old.baseline() == baseline
                        && old.canary() == canary =>
                {
                    old
                }
                _ => Rollout::new(r.plan.clone(), baseline.clone(), canary.clone(), now_ms())
                    .expect("the plan was validated with the configuration"),
            }
        });
        let decisions = ACTIONS.map(|a| metrics.rollout_decisions.with_label_values(&[name, a]));
        let percent = metrics.rollout_percent.with_label_values(&[name]);
        let weights = weights_for(&spec, rollout.as_ref());
        let percent_now = rollout.as_ref().map(Rollout::canary_percent);
        let experiment = Experiment {
            live: Arc::new(Live {
                split: ArcSwap::from_pointee(split(&spec, weights)),
                arms,
                rollout: Mutex::new(rollout),
                decisions,
                percent,
            }),
            spec,
        };
        experiment.publish_weights(percent_now);
        experiment
    }

    /// `spec`, continuing `previous`'s figures, weights and rollout, when it splits the same
    /// variants (by name, in order) under the same rollout plan, or with the same weights
    /// without one; `None` otherwise.
    pub fn carry_over(spec: ExperimentSpec, previous: &Experiment) -> Option<Experiment> {
        let old = &previous.spec;
        let same_variants =
            old.name == spec.name
                && old.variants.len() == spec.variants.len()
                && old.variants.iter().zip(&spec.variants).all(|(a, b)| {
                    a.name == b.name && (spec.rollout.is_some() || a.weight == b.weight)
                });
        let same_plan = match (&old.rollout, &spec.rollout) {
            (None, None) => true,
            (Some(a), Some(b)) => a.plan == b.plan,
            _ => false,
        };
        (same_variants && same_plan).then(|| Experiment {
            spec,
            live: previous.live.clone(),
        })
    }

    /// The configuration it runs.
    pub fn spec(&self) -> &ExperimentSpec {
        &self.spec
    }

    /// Picks the variant for a request from its headers and target.
    pub fn assign(&self, headers: &HeaderMap, uri: &Uri) -> Assignment {
        if let Some(forced) = headers.get(&self.spec.override_header) {
            if let Some(i) = self
                .spec
                .variants
                .iter()
                .position(|v| v.name.as_bytes() == forced.as_bytes())
            {
                return Assignment {
                    variant: i,
                    counted: false,
                };
            }
        }
        match shopper_id(&self.spec.assign_by, headers, uri) {
            Some(id) => Assignment {
                variant: self.live.split.load().splitter.assign(id),
                counted: true,
            },
            None => Assignment {
                variant: 0,
                counted: false,
            },
        }
    }

    /// Counts a request's answer for its variant.
    pub fn record_request(&self, a: Assignment, status: StatusCode, elapsed: Duration) {
        if !a.counted {
            return;
        }
        let Some(arm) = self.live.arms.get(a.variant) else {
            return;
        };
        arm.by_class[class_index(status)].inc();
        arm.duration.observe(elapsed.as_secs_f64());
        let event = Event::Request {
            latency: elapsed,
            error: status.is_server_error(),
        };
        arm.step.lock().expect("arm lock").record(event);
        arm.window.lock().expect("arm lock").record(now_ms(), event);
    }

    /// Counts an outcome event for a variant, by name; `false` when it has no such variant.
    pub fn record_outcome(&self, variant: &str, outcome: Outcome) -> bool {
        let Some(arm) = self.live.arms.iter().find(|a| a.name == variant) else {
            return false;
        };
        arm.events[outcome as usize].inc();
        arm.step.lock().expect("arm lock").record(outcome.event());
        arm.window
            .lock()
            .expect("arm lock")
            .record(now_ms(), outcome.event());
        true
    }

    /// Counts a model score a variant served (for the score-drift guard).
    pub fn record_score(&self, variant: usize, score: f64) {
        if let Some(arm) = self.live.arms.get(variant) {
            arm.step
                .lock()
                .expect("arm lock")
                .record(Event::Score(score));
        }
    }

    /// The variant's name.
    pub fn variant_name(&self, variant: usize) -> &str {
        &self.spec.variants[variant].name
    }

    /// Judges the rollout, if any, on the figures since its step began; a decision changes
    /// the weights at once (and starts the next step's figures afresh).
    pub fn evaluate(&self, now_ms: u64) -> Option<Decision> {
        let mut guard = self.live.rollout.lock().expect("rollout lock");
        let rollout = guard.as_mut()?;
        let baseline = self.live.arms[0].step.lock().expect("arm lock").totals();
        let canary = self.live.arms[1].step.lock().expect("arm lock").totals();
        let decision = rollout.evaluate(now_ms, &baseline, &canary)?;
        self.applied(rollout, &decision);
        Some(decision)
    }

    /// Applies an operator's command to the rollout.
    pub fn command(&self, command: Command, now_ms: u64) -> Result<Decision, CommandError> {
        let mut guard = self.live.rollout.lock().expect("rollout lock");
        let rollout = guard
            .as_mut()
            .ok_or_else(|| CommandError::NoRollout(self.spec.name.clone()))?;
        let decision = match command {
            Command::Pause => rollout.pause(now_ms)?,
            Command::Resume => rollout.resume(now_ms)?,
            Command::Promote => rollout.promote(now_ms)?,
            Command::Abort => rollout.abort(now_ms)?,
        };
        self.applied(rollout, &decision);
        Ok(decision)
    }

    fn applied(&self, rollout: &Rollout, decision: &Decision) {
        self.live.decisions[action_index(decision)].inc();
        let weights = weights_for(&self.spec, Some(rollout));
        if *weights != *self.live.split.load().weights {
            self.live.split.store(Arc::new(split(&self.spec, weights)));
        }
        self.publish_weights(Some(rollout.canary_percent()));
        if matches!(decision.action, gateway_rollout::Action::Advance { .. }) {
            for arm in self.live.arms.iter() {
                arm.step.lock().expect("arm lock").reset();
            }
        }
    }

    fn publish_weights(&self, canary_percent: Option<u8>) {
        let split = self.live.split.load();
        for (arm, w) in self.live.arms.iter().zip(split.weights.iter()) {
            arm.weight.set(i64::from(*w));
        }
        if let Some(p) = canary_percent {
            self.live.percent.set(i64::from(p));
        }
    }

    /// A copy of the rollout, to persist or show.
    pub fn rollout(&self) -> Option<Rollout> {
        self.live.rollout.lock().expect("rollout lock").clone()
    }

    /// What the experiment looks like now.
    pub fn status(&self, now_ms: u64) -> ExperimentStatus {
        let split = self.live.split.load();
        let rollout = self.rollout();
        ExperimentStatus {
            name: self.spec.name.clone(),
            assign_by: self.spec.assign_by.to_string(),
            variants: self
                .live
                .arms
                .iter()
                .zip(split.weights.iter())
                .map(|(arm, w)| VariantStatus {
                    name: arm.name.clone(),
                    weight: *w,
                    step: arm.step.lock().expect("arm lock").totals().into(),
                    last_5_minutes: arm.window.lock().expect("arm lock").totals(now_ms).into(),
                })
                .collect(),
            rollout: rollout.map(|r| RolloutStatus {
                state: r.state(),
                canary_percent: r.canary_percent(),
                steps: r.plan().steps.clone(),
                step_started_ms: r.step_started_ms(),
                evidence: serde_json::to_value(r.evidence()).unwrap_or_default(),
                history: r
                    .history()
                    .map(|d| serde_json::to_value(d).unwrap_or_default())
                    .collect(),
            }),
        }
    }

    /// Whether a rollout still has decisions to make.
    pub fn rollout_running(&self) -> bool {
        matches!(
            self.live
                .rollout
                .lock()
                .expect("rollout lock")
                .as_ref()
                .map(Rollout::state),
            Some(State::Running)
        )
    }
}

/// The weights a split uses: the configured ones, or the rollout's share for baseline and
/// canary (the other variants get none while a rollout runs).
fn weights_for(spec: &ExperimentSpec, rollout: Option<&Rollout>) -> Box<[u32]> {
    match rollout {
        None => spec.variants.iter().map(|v| v.weight).collect(),
        Some(r) => {
            let p = u32::from(r.canary_percent());
            let mut w = vec![0; spec.variants.len()];
            w[0] = 100 - p;
            w[1] = p;
            w.into()
        }
    }
}

fn split(spec: &ExperimentSpec, weights: Box<[u32]>) -> Split {
    let named: Vec<(&str, u32)> = spec
        .variants
        .iter()
        .zip(weights.iter())
        .map(|(v, w)| (v.name.as_str(), *w))
        .collect();
    Split {
        splitter: Splitter::new(spec.name.as_bytes(), &named)
            .expect("variants validated with the configuration"),
        weights,
    }
}

fn class_index(status: StatusCode) -> usize {
    (status.as_u16() / 100).clamp(1, 5) as usize - 1
}

/// The shopper id of a request, where the experiment says it is; `None` when absent or
/// empty.
fn shopper_id<'a>(key: &ShopperKey, headers: &'a HeaderMap, uri: &'a Uri) -> Option<&'a [u8]> {
    let id = match key {
        ShopperKey::Header(name) => headers.get(name).map(|v| v.as_bytes()),
        ShopperKey::Cookie(name) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
            .find_map(|pair| {
                let pair = pair.trim_ascii();
                pair.strip_prefix(name.as_bytes())?.strip_prefix(b"=")
            }),
        ShopperKey::Query(name) => uri.query().and_then(|q| {
            q.split('&').find_map(|pair| {
                pair.strip_prefix(name.as_str())?
                    .strip_prefix('=')
                    .map(str::as_bytes)
            })
        }),
    }?;
    (!id.is_empty()).then_some(id)
}

/// `GET /admin/experiments`: one experiment.
#[derive(Debug, Clone, Serialize)]
pub struct ExperimentStatus {
    /// Name.
    pub name: String,
    /// Where the shopper id comes from.
    pub assign_by: String,
    /// Variants, the baseline first.
    pub variants: Vec<VariantStatus>,
    /// The rollout, if any.
    pub rollout: Option<RolloutStatus>,
}

/// One variant in [`ExperimentStatus`].
#[derive(Debug, Clone, Serialize)]
pub struct VariantStatus {
    /// Name.
    pub name: String,
    /// Weight in the split now.
    pub weight: u32,
    /// Figures since the rollout's step began (since the experiment started, without one).
    pub step: Figures,
    /// Figures of the last five minutes.
    pub last_5_minutes: Figures,
}

/// A variant's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    /// Counted requests.
    pub requests: u64,
    /// 5xx answers per request.
    pub error_rate: f64,
    /// Median latency, ms (estimated from a histogram).
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Impressions reported.
    pub impressions: u64,
    /// Clicks reported.
    pub clicks: u64,
    /// Purchases reported.
    pub purchases: u64,
    /// Clicks per impression.
    pub ctr: f64,
    /// Purchases per impression.
    pub cvr: f64,
}

impl From<Totals> for Figures {
    fn from(t: Totals) -> Figures {
        Figures {
            requests: t.requests,
            error_rate: t.error_rate,
            p50_ms: t.p50_ms,
            p99_ms: t.p99_ms,
            impressions: t.impressions,
            clicks: t.clicks,
            purchases: t.purchases,
            ctr: t.ctr,
            cvr: t.cvr,
        }
    }
}

/// A rollout in [`ExperimentStatus`].
#[derive(Debug, Clone, Serialize)]
pub struct RolloutStatus {
    /// `Running`, `Paused`, `Promoted`, `RolledBack` or `Aborted`.
    pub state: State,
    /// The canary's share now, percent.
    pub canary_percent: u8,
    /// The plan's steps, percent.
    pub steps: Vec<u8>,
    /// When the current step began, ms since the Unix epoch.
    pub step_started_ms: u64,
    /// The figures of the last evaluation.
    pub evidence: serde_json::Value,
    /// Decisions, oldest first, each with its figures.
    pub history: Vec<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(assign_by: ShopperKey) -> ExperimentSpec {
        ExperimentSpec {
            name: "exp".into(),
            routes: vec![0],
            assign_by,
            override_header: http::HeaderName::from_static("x-gateway-variant"),
            variants: ["a", "b"]
                .into_iter()
                .map(|n| crate::config::VariantSpec {
                    name: n.into(),
                    weight: 1,
                    upstream: None,
                    plugins: None,
                    models: vec![],
                })
                .collect(),
            rollout: None,
        }
    }

    #[test]
    fn the_shopper_id_comes_from_where_the_experiment_says() {
        let uri: Uri = "/x?a=1&shopper=42&b=2".parse().unwrap();
        let mut h = HeaderMap::new();
        h.append("cookie", "theme=dark; shopper=abc".parse().unwrap());
        h.append("cookie", "other=1".parse().unwrap());
        h.insert("x-shopper", "s-9".parse().unwrap());
        let id = |k| shopper_id(&k, &h, &uri).map(|b| String::from_utf8_lossy(b).into_owned());
        assert_eq!(
            id(ShopperKey::Cookie("shopper".into())).as_deref(),
            Some("abc")
        );
        assert_eq!(id(ShopperKey::Cookie("shop".into())), None);
        assert_eq!(
            id(ShopperKey::Query("shopper".into())).as_deref(),
            Some("42")
        );
        assert_eq!(
            id(ShopperKey::Header(http::HeaderName::from_static(
                "x-shopper"
            )))
            .as_deref(),
            Some("s-9")
        );
        let empty: Uri = "/x?shopper=".parse().unwrap();
        assert_eq!(
            shopper_id(&ShopperKey::Query("shopper".into()), &h, &empty),
            None
        );
    }

    #[test]
    fn the_override_forces_a_variant_and_such_requests_are_not_counted() {
        let registry = prometheus::Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        let e = Experiment::new(spec(ShopperKey::Query("u".into())), &metrics, None);
        let uri: Uri = "/?u=7".parse().unwrap();
        let mut h = HeaderMap::new();
        let assigned = e.assign(&h, &uri);
        assert!(assigned.counted);
        h.insert("x-gateway-variant", "b".parse().unwrap());
        assert_eq!(
            e.assign(&h, &uri),
            Assignment {
                variant: 1,
                counted: false
            }
        );
        h.insert("x-gateway-variant", "nope".parse().unwrap());
        assert_eq!(e.assign(&h, &uri), assigned, "an unknown name is ignored");
        let anonymous = e.assign(&HeaderMap::new(), &"/".parse().unwrap());
        assert_eq!(
            anonymous,
            Assignment {
                variant: 0,
                counted: false
            }
        );
        e.record_request(anonymous, StatusCode::OK, Duration::from_millis(1));
        e.record_request(assigned, StatusCode::BAD_GATEWAY, Duration::from_millis(1));
        let status = e.status(now_ms());
        let total: u64 = status.variants.iter().map(|v| v.step.requests).sum();
        assert_eq!(total, 1);
        assert_eq!(status.variants[assigned.variant].step.error_rate, 1.0);
    }
}
