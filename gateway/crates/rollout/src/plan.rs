//! The rollout state machine: a [`Plan`] of traffic steps and guards, and a [`Rollout`] that
//! turns the baseline's and the canary's [`Totals`] into [`Decision`]s.
//!
//! The canary starts at the plan's first step. At each step the caller keeps [`Counts`] per
//! variant since the step began and calls [`Rollout::evaluate`] as often as it likes:
//!
//! - a broken guard rolls the canary back at once (weight 0);
//! - once the step has lasted `min_step_ms` and each variant has `min_samples`, the canary
//!   advances to the next step, and the caller resets its step counts;
//! - finishing the step before the last promotes the canary: the last step is 100%, where no
//!   baseline is left to compare with.
//!
//! The sequential guards (error rate, CTR, CVR) restart with each step and are run at
//! `alpha / judged steps` each, so a plan's chance of rolling back a canary that is no
//! different is at most the sum of its guards' alphas, however often it is evaluated.
//!
//! [`Counts`]: crate::Counts

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::sequential::{psi, Arm, Sequential, Verdict, DEFAULT_MIN_TRIALS, DEFAULT_TAU};
use crate::window::Totals;

/// Decisions a [`Rollout`] keeps; older ones are dropped.
pub const HISTORY_CAP: usize = 100;
/// Level of the error-rate guard's sequential test (before the split over steps).
pub const ERROR_GUARD_ALPHA: f64 = 0.01;
/// Mixture scale of the error-rate guard: five points, since the failures worth a rollback
/// are large.
pub const ERROR_GUARD_TAU: f64 = 0.05;
/// Requests (for p99) or scores (for PSI) each variant needs in the step before those
/// guards look: a p99 of fewer rests on a handful of requests.
pub const MIN_GUARD_SAMPLES: u64 = 1000;
/// A p99 under this many ms counts as this much in the p99 guard, so sub-millisecond jitter
/// is not a "3× slower" canary.
pub const P99_FLOOR_MS: f64 = 5.0;

/// An always-valid guard on a rate (CTR, CVR).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SeqGuard {
    /// The chance, over the whole rollout, of rolling back a canary that is no worse
    /// (0 < alpha < 1; e.g. 0.05).
    pub alpha: f64,
    /// How much lower (absolute) the canary's rate may be before it counts as worse (≥ 0).
    pub margin: f64,
    /// The mixture scale of the test, an absolute rate difference ([`DEFAULT_TAU`]).
    #[serde(default = "default_tau")]
    pub tau: f64,
}

fn default_tau() -> f64 {
    DEFAULT_TAU
}

impl SeqGuard {
    /// A guard at level `alpha` with `margin` and the default τ.
    pub fn new(alpha: f64, margin: f64) -> Self {
        SeqGuard {
            alpha,
            margin,
            tau: DEFAULT_TAU,
        }
    }
}

/// What rolls a canary back.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Guards {
    /// How far the canary's error rate may exceed the baseline's (absolute, 0 to 1), tested
    /// sequentially at [`ERROR_GUARD_ALPHA`].
    pub max_error_rate_delta: f64,
    /// How many times the baseline's p99 latency the canary's may be (≥ 1).
    pub max_p99_ratio: f64,
    /// Click-through rate (clicks per impression).
    pub ctr: Option<SeqGuard>,
    /// Conversion rate (purchases per impression).
    pub cvr: Option<SeqGuard>,
    /// The largest population stability index of the canary's model scores against the
    /// baseline's (e.g. 0.25).
    pub max_psi: Option<f64>,
}

/// How a canary is rolled out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The canary's traffic share at each step, percent: increasing, 1 to 100, at least two,
    /// the last 100 (reaching it is promotion).
    pub steps: Vec<u8>,
    /// The least time a step lasts, ms.
    pub min_step_ms: u64,
    /// The least each variant sees in a step before it advances: impressions when a CTR or
    /// CVR guard is set, requests otherwise (≥ 1). A step also waits for
    /// [`DEFAULT_MIN_TRIALS`] requests (and impressions, with a CTR or CVR guard) per variant,
    /// the least the sequential guards judge on, so no step ends unjudged.
    pub min_samples: u64,
    /// What rolls the canary back.
    pub guards: Guards,
}

/// A plan field that is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rollout plan: {field} {problem}")]
pub struct PlanError {
    /// The field, as a path (`guards.ctr.alpha`).
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: &'static str,
}

fn check(ok: bool, field: &'static str, problem: &'static str) -> Result<(), PlanError> {
    if ok {
        Ok(())
    } else {
        Err(PlanError { field, problem })
    }
}

impl Plan {
    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), PlanError> {
        let steps = &self.steps;
        check(steps.len() >= 2, "steps", "needs at least two steps")?;
        check(
            steps.iter().all(|s| (1..=100).contains(s)),
            "steps",
            "must be percentages from 1 to 100",
        )?;
        check(
            steps.windows(2).all(|w| w[0] < w[1]),
            "steps",
            "must increase",
        )?;
        check(steps.last() == Some(&100), "steps", "must end at 100")?;
        check(self.min_samples >= 1, "min_samples", "must be at least 1")?;
        let g = &self.guards;
        check(
            (0.0..1.0).contains(&g.max_error_rate_delta),
            "guards.max_error_rate_delta",
            "must be at least 0 and below 1",
        )?;
        check(
            g.max_p99_ratio.is_finite() && g.max_p99_ratio >= 1.0,
            "guards.max_p99_ratio",
            "must be a finite number of at least 1",
        )?;
        for (guard, names) in [
            (
                g.ctr,
                ["guards.ctr.alpha", "guards.ctr.margin", "guards.ctr.tau"],
            ),
            (
                g.cvr,
                ["guards.cvr.alpha", "guards.cvr.margin", "guards.cvr.tau"],
            ),
        ] {
            if let Some(s) = guard {
                check(
                    s.alpha > 0.0 && s.alpha < 1.0,
                    names[0],
                    "must be between 0 and 1",
                )?;
                check(
                    (0.0..1.0).contains(&s.margin),
                    names[1],
                    "must be at least 0 and below 1",
                )?;
                check(
                    s.tau > 0.0 && s.tau < 1.0,
                    names[2],
                    "must be between 0 and 1",
                )?;
            }
        }
        if let Some(max) = g.max_psi {
            check(
                max.is_finite() && max > 0.0,
                "guards.max_psi",
                "must be a finite number above 0",
            )?;
        }
        Ok(())
    }

    fn judged_steps(&self) -> f64 {
        (self.steps.len() - 1) as f64
    }

    fn new_tests(&self) -> Tests {
        let per_step = self.judged_steps();
        let rate = |g: SeqGuard| Sequential::new(g.alpha / per_step, g.margin, g.tau);
        Tests {
            errors: Sequential::new(
                ERROR_GUARD_ALPHA / per_step,
                self.guards.max_error_rate_delta,
                ERROR_GUARD_TAU,
            ),
            ctr: self.guards.ctr.map(rate),
            cvr: self.guards.cvr.map(rate),
        }
    }

    fn samples(&self, t: &Totals) -> u64 {
        if self.guards.ctr.is_some() || self.guards.cvr.is_some() {
            t.impressions
        } else {
            t.requests
        }
    }
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    /// Stepping through the plan, judged at each evaluation.
    Running,
    /// Held at the current step by an operator; evaluations decide nothing.
    Paused,
    /// The canary has all the traffic.
    Promoted,
    /// A guard broke; the canary has no traffic.
    RolledBack,
    /// Stopped by an operator; the canary has no traffic.
    Aborted,
}

/// What a decision did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// The canary moved to the next step.
    Advance {
        /// Its new share, percent.
        to_percent: u8,
    },
    /// The canary passed its last judged step and now has all the traffic.
    Promote,
    /// A guard broke: `error_rate`, `p99_latency`, `ctr`, `cvr` or `psi`.
    RollBack {
        /// Which guard.
        guard: String,
    },
    /// An operator paused the rollout.
    Pause,
    /// An operator resumed it.
    Resume,
    /// An operator aborted it.
    Abort,
    /// An operator promoted the canary without waiting for the plan.
    ManualPromote,
}

/// One variant's figures behind a decision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ArmEvidence {
    /// Requests in the step.
    pub requests: u64,
    /// Impressions in the step.
    pub impressions: u64,
    /// Errors per request.
    pub error_rate: f64,
    /// p99 latency, ms.
    pub p99_ms: f64,
    /// Clicks per impression.
    pub ctr: f64,
    /// Purchases per impression.
    pub cvr: f64,
}

/// The figures behind a decision, as of the last evaluation in the step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// The canary's share when they were taken, percent.
    pub step_percent: u8,
    /// How long the step had run, ms.
    pub step_elapsed_ms: u64,
    /// The baseline's figures.
    pub baseline: ArmEvidence,
    /// The canary's figures.
    pub canary: ArmEvidence,
    /// Always-valid p-value that the canary's error rate is too high (1 = no evidence).
    pub p_error: f64,
    /// Always-valid p-values that the canary's CTR is worse and better, with a CTR guard.
    pub p_ctr: Option<(f64, f64)>,
    /// The same for CVR, with a CVR guard.
    pub p_cvr: Option<(f64, f64)>,
    /// The canary's score PSI against the baseline's, once both have enough scores.
    pub psi: Option<f64>,
}

/// A change of a rollout's state or step, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// When, ms since the epoch (the caller's clock).
    pub at_ms: u64,
    /// What was done.
    pub action: Action,
    /// The figures it was based on.
    pub evidence: Evidence,
}

/// An operator action that does not apply in the rollout's state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a rollout that is {from:?}")]
pub struct TransitionError {
    /// The state it is in.
    pub from: State,
    /// What was asked: `pause`, `resume`, `promote` or `abort`.
    pub action: &'static str,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Tests {
    errors: Sequential,
    ctr: Option<Sequential>,
    cvr: Option<Sequential>,
}

/// One canary's rollout against a baseline: serialisable, to persist and resume (a
/// persisted rollout is checked as it is read back, like a new one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Persisted")]
pub struct Rollout {
    plan: Plan,
    baseline: String,
    canary: String,
    step: usize,
    state: State,
    step_started_ms: u64,
    tests: Tests,
    evidence: Evidence,
    history: VecDeque<Decision>,
}

/// A [`Rollout`] as read back, before it is checked.
#[derive(Deserialize)]
struct Persisted {
    plan: Plan,
    baseline: String,
    canary: String,
    step: usize,
    state: State,
    step_started_ms: u64,
    tests: Tests,
    evidence: Evidence,
    history: VecDeque<Decision>,
}

impl TryFrom<Persisted> for Rollout {
    type Error = PlanError;

    fn try_from(p: Persisted) -> Result<Self, PlanError> {
        p.plan.validate()?;
        check(
            p.step + 1 < p.plan.steps.len(),
            "step",
            "is past the last judged step",
        )?;
        Ok(Rollout {
            plan: p.plan,
            baseline: p.baseline,
            canary: p.canary,
            step: p.step,
            state: p.state,
            step_started_ms: p.step_started_ms,
            tests: p.tests,
            evidence: p.evidence,
            history: p.history,
        })
    }
}

impl Rollout {
    /// A running rollout of `canary` against `baseline` (variant names), at the plan's first
    /// step from `now_ms`.
    pub fn new(
        plan: Plan,
        baseline: impl Into<String>,
        canary: impl Into<String>,
        now_ms: u64,
    ) -> Result<Self, PlanError> {
        plan.validate()?;
        let tests = plan.new_tests();
        Ok(Rollout {
            evidence: Evidence {
                step_percent: plan.steps[0],
                ..Evidence::default()
            },
            plan,
            baseline: baseline.into(),
            canary: canary.into(),
            step: 0,
            state: State::Running,
            step_started_ms: now_ms,
            tests,
            history: VecDeque::new(),
        })
    }

    /// The plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The baseline variant's name.
    pub fn baseline(&self) -> &str {
        &self.baseline
    }

    /// The canary variant's name.
    pub fn canary(&self) -> &str {
        &self.canary
    }

    /// Where the rollout is.
    pub fn state(&self) -> State {
        self.state
    }

    /// When the current step began, ms.
    pub fn step_started_ms(&self) -> u64 {
        self.step_started_ms
    }

    /// The canary's traffic share now, percent: the step's while running or paused, 100 once
    /// promoted, 0 once rolled back or aborted.
    pub fn canary_percent(&self) -> u8 {
        match self.state {
            State::Running | State::Paused => self.plan.steps[self.step],
            State::Promoted => 100,
            State::RolledBack | State::Aborted => 0,
        }
    }

    /// The figures of the last evaluation.
    pub fn evidence(&self) -> &Evidence {
        &self.evidence
    }

    /// The last [`HISTORY_CAP`] decisions, oldest first.
    pub fn history(&self) -> impl ExactSizeIterator<Item = &Decision> {
        self.history.iter()
    }

    /// Judges the step so far from each variant's totals since the step began; a decision
    /// when the rollout advances, promotes or rolls back. After an advance the caller resets
    /// its step counts. Decides nothing unless running.
    pub fn evaluate(
        &mut self,
        now_ms: u64,
        baseline: &Totals,
        canary: &Totals,
    ) -> Option<Decision> {
        if self.state != State::Running {
            return None;
        }
        let broken = self.judge(now_ms, baseline, canary);
        let action = if let Some(guard) = broken {
            self.state = State::RolledBack;
            Action::RollBack {
                guard: guard.to_owned(),
            }
        } else {
            let elapsed = now_ms.saturating_sub(self.step_started_ms);
            // A step never ends before its sequential guards could look: each needs
            // DEFAULT_MIN_TRIALS per arm, whatever `min_samples` says.
            let floor = DEFAULT_MIN_TRIALS;
            let enough = |t: &Totals| {
                self.plan.samples(t) >= self.plan.min_samples.max(floor) && t.requests >= floor
            };
            if elapsed < self.plan.min_step_ms || !enough(baseline) || !enough(canary) {
                return None;
            }
            if self.step + 2 >= self.plan.steps.len() {
                self.state = State::Promoted;
                Action::Promote
            } else {
                self.step += 1;
                self.step_started_ms = now_ms;
                self.tests = self.plan.new_tests();
                Action::Advance {
                    to_percent: self.plan.steps[self.step],
                }
            }
        };
        Some(self.decide(now_ms, action))
    }

    /// Runs every guard over the totals, records the evidence, and names the first broken.
    fn judge(&mut self, now_ms: u64, baseline: &Totals, canary: &Totals) -> Option<&'static str> {
        let guards = self.plan.guards;
        let successes = |t: &Totals| Arm::new(t.requests - t.errors.min(t.requests), t.requests);
        let error = self
            .tests
            .errors
            .update(successes(baseline), successes(canary));
        let ctr = self.tests.ctr.as_mut().map(|test| {
            test.update(
                Arm::new(baseline.clicks, baseline.impressions),
                Arm::new(canary.clicks, canary.impressions),
            )
        });
        let cvr = self.tests.cvr.as_mut().map(|test| {
            test.update(
                Arm::new(baseline.purchases, baseline.impressions),
                Arm::new(canary.purchases, canary.impressions),
            )
        });
        let scored = |t: &Totals| t.scores.iter().sum::<u64>() >= MIN_GUARD_SAMPLES;
        let psi = (guards.max_psi.is_some() && scored(baseline) && scored(canary))
            .then(|| psi(&baseline.scores, &canary.scores));
        self.evidence = Evidence {
            step_percent: self.plan.steps[self.step],
            step_elapsed_ms: now_ms.saturating_sub(self.step_started_ms),
            baseline: arm_evidence(baseline),
            canary: arm_evidence(canary),
            p_error: error.p_worse,
            p_ctr: ctr.map(|e| (e.p_worse, e.p_better)),
            p_cvr: cvr.map(|e| (e.p_worse, e.p_better)),
            psi,
        };

        let worse = |v: Verdict| matches!(v, Verdict::CanaryWorse { .. });
        let timed = baseline.requests >= MIN_GUARD_SAMPLES && canary.requests >= MIN_GUARD_SAMPLES;
        if worse(error.verdict) {
            Some("error_rate")
        } else if timed && canary.p99_ms > guards.max_p99_ratio * baseline.p99_ms.max(P99_FLOOR_MS)
        {
            Some("p99_latency")
        } else if ctr.is_some_and(|e| worse(e.verdict)) {
            Some("ctr")
        } else if cvr.is_some_and(|e| worse(e.verdict)) {
            Some("cvr")
        } else if psi.zip(guards.max_psi).is_some_and(|(psi, max)| psi > max) {
            Some("psi")
        } else {
            None
        }
    }

    fn decide(&mut self, now_ms: u64, action: Action) -> Decision {
        let decision = Decision {
            at_ms: now_ms,
            action,
            evidence: self.evidence.clone(),
        };
        if self.history.len() == HISTORY_CAP {
            self.history.pop_front();
        }
        self.history.push_back(decision.clone());
        decision
    }

    fn operator(
        &mut self,
        now_ms: u64,
        action: &'static str,
        from: &[State],
        to: State,
        recorded: Action,
    ) -> Result<Decision, TransitionError> {
        if !from.contains(&self.state) {
            return Err(TransitionError {
                from: self.state,
                action,
            });
        }
        self.state = to;
        Ok(self.decide(now_ms, recorded))
    }

    /// Holds the canary at its current share; only while running.
    pub fn pause(&mut self, now_ms: u64) -> Result<Decision, TransitionError> {
        self.operator(
            now_ms,
            "pause",
            &[State::Running],
            State::Paused,
            Action::Pause,
        )
    }

    /// Resumes a paused rollout; the step continues where it was (its clock and tests too).
    pub fn resume(&mut self, now_ms: u64) -> Result<Decision, TransitionError> {
        self.operator(
            now_ms,
            "resume",
            &[State::Paused],
            State::Running,
            Action::Resume,
        )
    }

    /// Gives the canary all the traffic now; while running or paused.
    pub fn promote(&mut self, now_ms: u64) -> Result<Decision, TransitionError> {
        let live = [State::Running, State::Paused];
        self.operator(
            now_ms,
            "promote",
            &live,
            State::Promoted,
            Action::ManualPromote,
        )
    }

    /// Takes all the canary's traffic away now; while running or paused.
    pub fn abort(&mut self, now_ms: u64) -> Result<Decision, TransitionError> {
        let live = [State::Running, State::Paused];
        self.operator(now_ms, "abort", &live, State::Aborted, Action::Abort)
    }
}

fn arm_evidence(t: &Totals) -> ArmEvidence {
    ArmEvidence {
        requests: t.requests,
        impressions: t.impressions,
        error_rate: t.error_rate,
        p99_ms: t.p99_ms,
        ctr: t.ctr,
        cvr: t.cvr,
    }
}

#[cfg(test)]
mod tests;
