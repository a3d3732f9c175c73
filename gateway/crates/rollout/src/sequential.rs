//! An always-valid test for the difference of two proportions, and the population stability
//! index.
//!
//! [`Sequential`] is a mixture sequential probability ratio test (mSPRT; Johari, Pekelis and
//! Walsh, "Always valid inference", 2017) under the normal approximation. With
//! `Δ̂ = p̂_canary − p̂_baseline` and its variance `V`, the likelihood ratio of "the difference
//! is θ, with θ drawn from N(0, τ²)" against "the difference is 0" is
//!
//! ```text
//! Λ = sqrt(V / (V + τ²)) · exp(τ² Δ̂² / (2 V (V + τ²)))
//! ```
//!
//! a martingale under the null, so by Ville's inequality the chance it *ever* reaches `1/α` is
//! at most α: the caller may look after every event and stop whenever it likes. The
//! always-valid p-value is `min(1, 1 / max Λ so far)`, never rising.
//!
//! The test runs in two directions. "Canary worse" tests `Δ ≥ −margin` (non-inferiority: the
//! statistic is `Δ̂ + margin`), "canary better" tests `Δ ≤ 0`. Whenever the worse direction
//! fires, `Δ̂ < −margin ≤ 0`, so `|Δ̂| ≥ |Δ̂ + margin|` and the plain two-sided statistic is at
//! least as large: under `Δ = 0` the chance of either verdict, ever, is still at most α.

use serde::{Deserialize, Serialize};

/// τ, the scale of differences the test is tuned for, as an absolute difference of rates:
/// one percentage point, which suits click-through rates of 1–10% and effects of 10–30%
/// relative. Smaller rates (conversion, errors) detect faster with a smaller τ.
pub const DEFAULT_TAU: f64 = 0.01;
/// Trials each arm needs before the test looks at all: below this the normal approximation
/// of a rate of a few percent is poor.
pub const DEFAULT_MIN_TRIALS: u64 = 200;

/// One arm's outcomes: `successes` out of `trials` (clicks out of impressions, ...).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Arm {
    /// Trials with the outcome.
    pub successes: u64,
    /// Trials.
    pub trials: u64,
}

impl Arm {
    /// `successes` of `trials` (successes beyond trials are capped at trials).
    pub fn new(successes: u64, trials: u64) -> Self {
        Arm {
            successes: successes.min(trials),
            trials,
        }
    }

    fn rate(self) -> f64 {
        self.successes as f64 / self.trials as f64
    }

    /// The variance of the rate, from a rate smoothed by one success and one failure so an
    /// arm with no successes (or no failures) yet still has some.
    fn variance(self) -> f64 {
        let p = (self.successes as f64 + 1.0) / (self.trials as f64 + 2.0);
        p * (1.0 - p) / self.trials as f64
    }
}

/// What the test says so far.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Verdict {
    /// Not enough evidence either way.
    Undecided,
    /// The canary's rate is lower than the baseline's by more than the margin.
    CanaryWorse {
        /// `p̂_canary − p̂_baseline` when the verdict was given.
        delta: f64,
        /// The always-valid p-value.
        p_value: f64,
    },
    /// The canary's rate is higher than the baseline's.
    CanaryBetter {
        /// `p̂_canary − p̂_baseline` when the verdict was given.
        delta: f64,
        /// The always-valid p-value.
        p_value: f64,
    },
}

/// The numbers of one look.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// `p̂_canary − p̂_baseline`.
    pub delta: f64,
    /// Half-width of the (1 − α) always-valid confidence interval around `delta`; infinite
    /// before both arms have enough trials.
    pub half_width: f64,
    /// The always-valid p-value that the canary is worse by more than the margin.
    pub p_worse: f64,
    /// The always-valid p-value that the canary is better.
    pub p_better: f64,
    /// The verdict, which once given is kept.
    pub verdict: Verdict,
}

/// The running state of one always-valid comparison of a canary's rate with a baseline's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sequential {
    alpha: f64,
    margin: f64,
    tau: f64,
    min_trials: u64,
    max_ln_lambda_worse: f64,
    max_ln_lambda_better: f64,
    verdict: Verdict,
}

impl Sequential {
    /// A test at level `alpha` (e.g. 0.05) that calls the canary worse only when its rate is
    /// lower by more than `margin` (an absolute difference, ≥ 0), with mixture scale `tau`
    /// ([`DEFAULT_TAU`]) and [`DEFAULT_MIN_TRIALS`] per arm.
    pub fn new(alpha: f64, margin: f64, tau: f64) -> Self {
        Sequential {
            alpha,
            margin,
            tau,
            min_trials: DEFAULT_MIN_TRIALS,
            max_ln_lambda_worse: 0.0,
            max_ln_lambda_better: 0.0,
            verdict: Verdict::Undecided,
        }
    }

    /// The same test with another minimum of trials per arm.
    pub fn with_min_trials(mut self, min_trials: u64) -> Self {
        self.min_trials = min_trials.max(1);
        self
    }

    /// Looks at the arms' outcomes so far (cumulative, since the test began).
    pub fn update(&mut self, baseline: Arm, canary: Arm) -> Estimate {
        let ready = baseline.trials >= self.min_trials && canary.trials >= self.min_trials;
        let delta = if ready {
            canary.rate() - baseline.rate()
        } else {
            0.0
        };
        let mut half_width = f64::INFINITY;
        if ready {
            let v = baseline.variance() + canary.variance();
            let tau2 = self.tau * self.tau;
            half_width = confidence_half_width(v, tau2, self.alpha);
            let worse = delta + self.margin;
            if worse < 0.0 {
                self.max_ln_lambda_worse = self.max_ln_lambda_worse.max(ln_lambda(worse, v, tau2));
            }
            if delta > 0.0 {
                self.max_ln_lambda_better =
                    self.max_ln_lambda_better.max(ln_lambda(delta, v, tau2));
            }
        }
        let (p_worse, p_better) = self.p_values();
        if self.verdict == Verdict::Undecided {
            if p_worse <= self.alpha {
                self.verdict = Verdict::CanaryWorse {
                    delta,
                    p_value: p_worse,
                };
            } else if p_better <= self.alpha {
                self.verdict = Verdict::CanaryBetter {
                    delta,
                    p_value: p_better,
                };
            }
        }
        Estimate {
            delta,
            half_width,
            p_worse,
            p_better,
            verdict: self.verdict,
        }
    }

    /// The verdict so far.
    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// The always-valid p-values so far: (canary worse by more than the margin, canary better).
    pub fn p_values(&self) -> (f64, f64) {
        (
            (-self.max_ln_lambda_worse).exp().min(1.0),
            (-self.max_ln_lambda_better).exp().min(1.0),
        )
    }

    /// Forgets everything seen, for a new comparison with the same settings.
    pub fn reset(&mut self) {
        *self = Sequential::new(self.alpha, self.margin, self.tau).with_min_trials(self.min_trials);
    }
}

/// `ln Λ` for an observed deviation `x` from the null, variance `v`, mixture variance `tau2`.
fn ln_lambda(x: f64, v: f64, tau2: f64) -> f64 {
    0.5 * (v / (v + tau2)).ln() + tau2 * x * x / (2.0 * v * (v + tau2))
}

/// The half-width of `{θ : Λ_θ < 1/α}`, the (1 − α) confidence sequence at this look, where
/// `Λ_θ` is the statistic for the deviation `Δ̂ − θ`. Solving `ln Λ_θ < ln(1/α)` for
/// `x = Δ̂ − θ`:
///
/// ```text
/// τ² x² / (2V(V+τ²)) < ln(1/α) + ½ ln((V+τ²)/V)
/// x² < (V+τ²)/τ² · V · (ln((V+τ²)/V) + 2 ln(1/α))
/// ```
fn confidence_half_width(v: f64, tau2: f64, alpha: f64) -> f64 {
    ((v + tau2) / tau2 * v * (((v + tau2) / v).ln() + 2.0 * (1.0 / alpha).ln())).sqrt()
}

/// Added to each bin's share in [`psi`] so an empty bin does not make it infinite.
pub const PSI_EPSILON: f64 = 1e-4;

/// The population stability index of `actual` against `expected` (histograms over the same
/// bins; a missing bin counts as empty): `Σ (a − e) · ln(a / e)` over the bins' shares. Rules
/// of thumb: under 0.1 stable, 0.1–0.25 a shift, over 0.25 a large shift. 0 when either
/// histogram is empty.
pub fn psi(expected: &[u64], actual: &[u64]) -> f64 {
    let (e_total, a_total) = (
        expected.iter().sum::<u64>() as f64,
        actual.iter().sum::<u64>() as f64,
    );
    if e_total == 0.0 || a_total == 0.0 {
        return 0.0;
    }
    (0..expected.len().max(actual.len()))
        .map(|i| {
            let e = *expected.get(i).unwrap_or(&0) as f64 / e_total + PSI_EPSILON;
            let a = *actual.get(i).unwrap_or(&0) as f64 / a_total + PSI_EPSILON;
            (a - e) * (a / e).ln()
        })
        .sum()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// splitmix64: a tiny seeded generator for the simulations.
    pub(crate) struct Rng(pub(crate) u64);

    impl Rng {
        pub(crate) fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        pub(crate) fn chance(&mut self, p: f64) -> bool {
            ((self.next_u64() >> 11) as f64) < p * (1u64 << 53) as f64
        }
    }

    #[test]
    fn half_width_is_where_lambda_crosses_one_over_alpha() {
        for (v, tau2, alpha) in [(1e-6, 1e-4, 0.05), (4e-5, 1e-4, 0.01), (1e-3, 2.5e-3, 0.1)] {
            let h = confidence_half_width(v, tau2, alpha);
            assert!((ln_lambda(h, v, tau2) - (1.0 / alpha).ln()).abs() < 1e-9);
            assert!(ln_lambda(h * 0.99, v, tau2) < (1.0 / alpha).ln());
            assert!(ln_lambda(h * 1.01, v, tau2) > (1.0 / alpha).ln());
        }
    }

    #[test]
    fn waits_for_minimum_trials_and_keeps_its_verdict() {
        let mut t = Sequential::new(0.05, 0.0, DEFAULT_TAU);
        let e = t.update(Arm::new(199, 199), Arm::new(0, 199));
        assert_eq!(e.verdict, Verdict::Undecided);
        assert!(e.half_width.is_infinite());
        let e = t.update(Arm::new(100, 1000), Arm::new(20, 1000));
        assert!(
            matches!(e.verdict, Verdict::CanaryWorse { delta, .. } if (delta + 0.08).abs() < 1e-12)
        );
        assert!(e.p_worse <= 0.05 && e.p_better == 1.0);
        assert!(e.half_width < 0.08);
        let e = t.update(Arm::new(100, 1000), Arm::new(100, 1000));
        assert!(
            matches!(e.verdict, Verdict::CanaryWorse { .. }),
            "verdicts stick"
        );
        t.reset();
        assert_eq!(t.verdict(), Verdict::Undecided);
        assert_eq!(t.p_values(), (1.0, 1.0));
    }

    #[test]
    fn margin_tolerates_small_losses() {
        let (b, c) = (Arm::new(5000, 100_000), Arm::new(4600, 100_000));
        let mut strict = Sequential::new(0.05, 0.0, DEFAULT_TAU);
        assert!(matches!(
            strict.update(b, c).verdict,
            Verdict::CanaryWorse { .. }
        ));
        let mut lenient = Sequential::new(0.05, 0.005, DEFAULT_TAU);
        assert_eq!(lenient.update(b, c).verdict, Verdict::Undecided);
    }

    #[test]
    fn psi_values() {
        assert_eq!(psi(&[10, 20, 30], &[1, 2, 3]), 0.0);
        assert_eq!(psi(&[], &[1]), 0.0);
        // Shares (0.5, 0.5) against (0.9, 0.1): 0.4 ln(0.9/0.5) − 0.4 ln(0.1/0.5), ± epsilon.
        let expected = 0.4 * (1.8f64).ln() - 0.4 * (0.2f64).ln();
        assert!((psi(&[50, 50], &[90, 10]) - expected).abs() < 1e-3);
        assert!(psi(&[100, 0], &[0, 100]) > 5.0);
        assert!(psi(&[1, 1], &[1, 1, 0]) < 1e-12);
    }

    /// Runs a test over arms with click rates `p_base` and `p_canary`, looking after every
    /// 50 impressions per arm up to 20,000; the verdict at the end (or at the first decision).
    fn simulate(seed: u64, p_base: f64, p_canary: f64) -> Verdict {
        let mut rng = Rng(seed);
        let mut test = Sequential::new(0.05, 0.0, DEFAULT_TAU);
        let (mut b, mut c) = (Arm::default(), Arm::default());
        while b.trials < 20_000 {
            for _ in 0..50 {
                b.trials += 1;
                b.successes += u64::from(rng.chance(p_base));
                c.trials += 1;
                c.successes += u64::from(rng.chance(p_canary));
            }
            let verdict = test.update(b, c).verdict;
            if verdict != Verdict::Undecided {
                return verdict;
            }
        }
        Verdict::Undecided
    }

    #[test]
    fn a_a_false_alarm_rate_is_at_most_alpha() {
        let runs = 400;
        let alarms = (0..runs)
            .filter(|&seed| simulate(seed, 0.05, 0.05) != Verdict::Undecided)
            .count();
        let rate = alarms as f64 / runs as f64;
        println!("A/A (5% vs 5%, 400 looks of 50 per arm): {alarms}/{runs} = {rate:.4} ever declared a difference");
        assert!(rate <= 0.05, "{rate}");
    }

    #[test]
    fn power_against_a_one_point_difference() {
        let runs = 200;
        let worse = (0..runs)
            .filter(|&seed| {
                matches!(
                    simulate(1000 + seed, 0.05, 0.04),
                    Verdict::CanaryWorse { .. }
                )
            })
            .count();
        let better = (0..runs)
            .filter(|&seed| {
                matches!(
                    simulate(5000 + seed, 0.05, 0.06),
                    Verdict::CanaryBetter { .. }
                )
            })
            .count();
        let (worse_rate, better_rate) = (worse as f64 / runs as f64, better as f64 / runs as f64);
        println!("power within 20k per arm: 4% vs 5% found worse {worse}/{runs} = {worse_rate:.3}; 6% vs 5% found better {better}/{runs} = {better_rate:.3}");
        assert!(worse_rate >= 0.8 && better_rate >= 0.8);
    }
}
