//! The detector measured on synthetic series: known anomalies (steps, spikes, slow drifts)
//! injected on Gaussian noise of three volatilities, against a fixed threshold tuned for the
//! middle one. `cargo test -p gateway-monitor -- --nocapture` prints the table the README
//! quotes.

use super::*;

/// splitmix64, and Box–Muller for normal noise: deterministic series.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.next(), self.next());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

const LEVEL: f64 = 100.0;
/// Samples per hour at one every 10 s.
const PER_HOUR: usize = 360;
const ONSET: usize = 240;
/// An anomaly counts as detected when the alert rises within this many samples (10 min).
const WINDOW: usize = 60;

#[derive(Clone, Copy, Debug)]
enum Anomaly {
    None,
    /// +6σ from the onset on.
    Step,
    /// +10σ for 6 samples (one minute).
    Spike,
    /// Rising linearly to +10σ over 60 samples, then staying.
    Drift,
}

fn series(seed: u64, sigma: f64, anomaly: Anomaly, len: usize) -> Vec<f64> {
    let mut rng = Rng(seed);
    (0..len)
        .map(|t| {
            let noise = LEVEL + sigma * rng.normal();
            let after = t.saturating_sub(ONSET) as f64;
            let extra = match anomaly {
                _ if t < ONSET => 0.0,
                Anomaly::None => 0.0,
                Anomaly::Step => 6.0 * sigma,
                Anomaly::Spike if after < 6.0 => 10.0 * sigma,
                Anomaly::Spike => 0.0,
                Anomaly::Drift => 10.0 * sigma * (after / 60.0).min(1.0),
            };
            noise + extra
        })
        .collect()
}

/// The sample index at which each judge first raised its alert at or after `from`.
fn first_alert(values: &[f64], from: usize, fixed: f64) -> (Option<usize>, Option<usize>) {
    let mut d = Detector::new(Settings::default());
    let mut f = FixedThreshold::new(fixed);
    let (mut adaptive, mut threshold) = (None, None);
    for (t, &x) in values.iter().enumerate() {
        let a = d.observe(x).alert;
        let b = f.observe(x);
        if t >= from {
            adaptive = adaptive.or(a.then_some(t));
            threshold = threshold.or(b.then_some(t));
        }
    }
    (adaptive, threshold)
}

/// Raised alerts (rising edges) after warm-up.
fn raises(values: &[f64], fixed: f64) -> (usize, usize) {
    let mut d = Detector::new(Settings::default());
    let mut f = FixedThreshold::new(fixed);
    let (mut a, mut b) = (0, 0);
    let (mut was_a, mut was_b) = (false, false);
    for (t, &x) in values.iter().enumerate() {
        let now_a = d.observe(x).alert;
        let now_b = f.observe(x);
        if t >= 60 {
            a += usize::from(now_a && !was_a);
            b += usize::from(now_b && !was_b);
        }
        (was_a, was_b) = (now_a, now_b);
    }
    (a, b)
}

struct Rates {
    detected: f64,
    median_delay_s: f64,
}

fn detection(sigma: f64, anomaly: Anomaly, fixed: f64, runs: u64) -> (Rates, Rates) {
    let mut delays = (Vec::new(), Vec::new());
    for seed in 0..runs {
        let values = series(seed * 7919 + 1, sigma, anomaly, ONSET + 2 * WINDOW);
        let (a, b) = first_alert(&values, ONSET, fixed);
        if let Some(t) = a.filter(|t| *t < ONSET + WINDOW) {
            delays.0.push((t - ONSET) as f64 * 10.0);
        }
        if let Some(t) = b.filter(|t| *t < ONSET + WINDOW) {
            delays.1.push((t - ONSET) as f64 * 10.0);
        }
    }
    let rates = |mut d: Vec<f64>| {
        d.sort_by(f64::total_cmp);
        Rates {
            detected: d.len() as f64 / runs as f64,
            median_delay_s: d.get(d.len() / 2).copied().unwrap_or(f64::NAN),
        }
    };
    (rates(delays.0), rates(delays.1))
}

fn false_alarms_per_hour(sigma: f64, fixed: f64, hours: usize, runs: u64) -> (f64, f64) {
    let (mut a, mut b) = (0, 0);
    for seed in 0..runs {
        let values = series(seed * 104_729 + 3, sigma, Anomaly::None, hours * PER_HOUR);
        let (x, y) = raises(&values, fixed);
        a += x;
        b += y;
    }
    let h = (hours as u64 * runs) as f64;
    (a as f64 / h, b as f64 / h)
}

#[test]
fn adaptive_bands_catch_what_a_fixed_threshold_misses_without_its_false_alarms() {
    // The fixed threshold a careful operator would set for the middle volatility: 3σ there.
    let fixed = LEVEL + 3.0 * 5.0;
    println!("series at level 100, a sample every 10 s; fixed threshold {fixed}");
    println!(
        "volatility  anomaly  adaptive: detected / median delay   fixed: detected / median delay"
    );
    // The least share of runs in which the adaptive alert rises within ten minutes.
    let least = |a: Anomaly| match a {
        Anomaly::Drift => 0.75,
        _ => 0.95,
    };
    for sigma in [1.0, 5.0, 20.0] {
        for anomaly in [Anomaly::Step, Anomaly::Spike, Anomaly::Drift] {
            let (a, f) = detection(sigma, anomaly, fixed, 200);
            println!(
                "σ = {sigma:>4}    {anomaly:<6?}   {:>5.2} / {:>4.0} s                    {:>5.2} / {:>4.0} s",
                a.detected, a.median_delay_s, f.detected, f.median_delay_s
            );
            assert!(
                a.detected >= least(anomaly),
                "{anomaly:?} at σ = {sigma}: caught in {} of runs",
                a.detected
            );
        }
    }
    let mut worst_false = 0.0f64;
    for sigma in [1.0, 5.0, 20.0] {
        let (a, f) = false_alarms_per_hour(sigma, fixed, 6, 20);
        println!("σ = {sigma:>4}    false alarms per hour on clean series: adaptive {a:.3}, fixed {f:.3}");
        worst_false = worst_false.max(a);
        if sigma == 20.0 {
            assert!(
                f > 1.0,
                "the fixed threshold drowns a volatile series in alarms: {f}"
            );
        }
    }
    assert!(
        worst_false <= 0.1,
        "at most one false alarm per 10 hours: {worst_false}"
    );
    // A 6σ step on the quiet series stays under the fixed threshold.
    let (_, f) = detection(1.0, Anomaly::Step, fixed, 50);
    assert_eq!(f.detected, 0.0);
}

#[test]
fn warm_up_learns_and_a_lasting_change_is_absorbed() {
    let mut d = Detector::new(Settings::default());
    for _ in 0..20 {
        assert_eq!(d.observe(10.0).band, None, "warm-up only learns");
    }
    assert!(!d.observe(10.0).alert);
    // Three samples far out raise the alert; it is a rising edge once.
    let raised: Vec<bool> = (0..3).map(|_| d.observe(50.0).changed).collect();
    assert_eq!(raised, [false, false, true]);
    assert!(d.alert());
    // A level that lasts `relearn` samples is the new normal: learned afresh, alert cleared.
    let cleared = (0..200).position(|_| !d.observe(50.0).alert);
    assert_eq!(cleared, Some(86), "3 + 87 samples out, then learned afresh");
    assert_eq!(d.level(), 50.0);
    for _ in 0..30 {
        assert!(!d.observe(50.0).alert);
    }
    assert!(
        !d.observe(f64::NAN).changed,
        "non-finite samples are ignored"
    );
}
