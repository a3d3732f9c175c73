//! Per-variant statistics in memory fixed at construction, whatever the traffic.
//!
//! [`Counts`] accumulates counters and two fixed histograms (latency, model score); the
//! rollout keeps one per variant since the current step began and resets it on each step.
//! [`Windowed`] keeps a ring of [`Counts`], one per time bucket, for the recent past
//! (dashboards, alerts). Both summarise into [`Totals`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Latency bins per doubling: bin edges are `2^(i/4)` ms, so an estimate read from a bin is
/// within 9% of the true value.
const LATENCY_BINS_PER_OCTAVE: f64 = 4.0;
/// Bins of the latency histogram: under 1 ms, then up to 2^15 ms (about 33 s), then one for
/// everything slower.
pub const LATENCY_BINS: usize = 62;

/// One thing that happened to a variant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event {
    /// A request was served (or failed) after `latency`.
    Request {
        /// Time to response.
        latency: Duration,
        /// Whether it failed (an upstream error, a 5xx, a scoring failure).
        error: bool,
    },
    /// A result was shown to a shopper.
    Impression,
    /// A shopper clicked a result.
    Click,
    /// A shopper added an item to the cart.
    AddToCart,
    /// A shopper bought.
    Purchase,
    /// The model scored an item; the value goes to the score histogram.
    Score(f64),
}

/// Equal-width score bins over `[lo, hi)`; scores outside go to the first or last bin.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScoreBins {
    /// The low edge of the first bin.
    pub lo: f64,
    /// The high edge of the last bin.
    pub hi: f64,
    /// How many bins (at least 1).
    pub bins: u16,
}

impl Default for ScoreBins {
    /// 20 bins over [0, 1]: a probability-like score.
    fn default() -> Self {
        ScoreBins {
            lo: 0.0,
            hi: 1.0,
            bins: 20,
        }
    }
}

impl ScoreBins {
    fn count(self) -> usize {
        usize::from(self.bins.max(1))
    }

    fn index(self, score: f64) -> usize {
        let last = self.count() - 1;
        let position = (score - self.lo) / (self.hi - self.lo) * self.count() as f64;
        if position.is_nan() || position <= 0.0 {
            return 0;
        }
        (position as usize).min(last)
    }
}

/// Counters and histograms for one variant over some span of time.
#[derive(Debug, Clone, PartialEq)]
pub struct Counts {
    requests: u64,
    errors: u64,
    impressions: u64,
    clicks: u64,
    add_to_carts: u64,
    purchases: u64,
    latency: [u64; LATENCY_BINS],
    score_bins: ScoreBins,
    scores: Vec<u64>,
}

impl Default for Counts {
    fn default() -> Self {
        Counts::new(ScoreBins::default())
    }
}

impl Counts {
    /// Empty counts whose score histogram uses `score_bins`.
    pub fn new(score_bins: ScoreBins) -> Self {
        Counts {
            requests: 0,
            errors: 0,
            impressions: 0,
            clicks: 0,
            add_to_carts: 0,
            purchases: 0,
            latency: [0; LATENCY_BINS],
            score_bins,
            scores: vec![0; score_bins.count()],
        }
    }

    /// Counts one event.
    pub fn record(&mut self, event: Event) {
        match event {
            Event::Request { latency, error } => {
                self.requests += 1;
                self.errors += u64::from(error);
                self.latency[latency_bin(latency)] += 1;
            }
            Event::Impression => self.impressions += 1,
            Event::Click => self.clicks += 1,
            Event::AddToCart => self.add_to_carts += 1,
            Event::Purchase => self.purchases += 1,
            Event::Score(score) => self.scores[self.score_bins.index(score)] += 1,
        }
    }

    /// Back to zero, keeping the score bins (and the memory).
    pub fn reset(&mut self) {
        self.requests = 0;
        self.errors = 0;
        self.impressions = 0;
        self.clicks = 0;
        self.add_to_carts = 0;
        self.purchases = 0;
        self.latency.fill(0);
        self.scores.fill(0);
    }

    /// Adds `other`'s counts; a score histogram of other bins is ignored.
    pub fn merge(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.impressions += other.impressions;
        self.clicks += other.clicks;
        self.add_to_carts += other.add_to_carts;
        self.purchases += other.purchases;
        for (a, b) in self.latency.iter_mut().zip(&other.latency) {
            *a += b;
        }
        if self.score_bins == other.score_bins {
            for (a, b) in self.scores.iter_mut().zip(&other.scores) {
                *a += b;
            }
        }
    }

    /// The latency below which a fraction `q` (0..=1) of requests fell, in ms, read from the
    /// histogram (the geometric middle of the bin holding it); 0 with no requests.
    pub fn latency_quantile_ms(&self, q: f64) -> f64 {
        if self.requests == 0 {
            return 0.0;
        }
        let rank = (q.clamp(0.0, 1.0) * self.requests as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bin, count) in self.latency.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return bin_middle_ms(bin);
            }
        }
        bin_middle_ms(LATENCY_BINS - 1)
    }

    /// The summary of these counts.
    pub fn totals(&self) -> Totals {
        Totals {
            requests: self.requests,
            errors: self.errors,
            error_rate: ratio(self.errors, self.requests),
            p50_ms: self.latency_quantile_ms(0.50),
            p99_ms: self.latency_quantile_ms(0.99),
            impressions: self.impressions,
            clicks: self.clicks,
            add_to_carts: self.add_to_carts,
            purchases: self.purchases,
            ctr: ratio(self.clicks, self.impressions),
            cvr: ratio(self.purchases, self.impressions),
            scores: self.scores.clone(),
        }
    }

    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        self.scores.capacity() * std::mem::size_of::<u64>()
    }
}

/// A variant's numbers over some span: what the rollout's guards read.
///
/// Rates with a zero denominator are 0. CVR is purchases per impression, like CTR, so both
/// share a denominator fixed by the traffic split rather than by the variant's own behaviour
/// (purchases per click would reward a variant that loses its weaker clicks).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Requests served.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// errors / requests.
    pub error_rate: f64,
    /// Median latency estimate, ms.
    pub p50_ms: f64,
    /// 99th percentile latency estimate, ms.
    pub p99_ms: f64,
    /// Results shown.
    pub impressions: u64,
    /// Clicks.
    pub clicks: u64,
    /// Add-to-carts.
    pub add_to_carts: u64,
    /// Purchases.
    pub purchases: u64,
    /// clicks / impressions.
    pub ctr: f64,
    /// purchases / impressions.
    pub cvr: f64,
    /// The model score histogram, one count per bin.
    pub scores: Vec<u64>,
}

#[derive(Debug, Clone)]
struct Bucket {
    /// `now_ms / bucket_ms` of the time this bucket holds.
    epoch: u64,
    counts: Counts,
}

/// Counts over the last `bucket_ms × buckets` milliseconds, in a ring of time buckets.
#[derive(Debug, Clone)]
pub struct Windowed {
    bucket_ms: u64,
    ring: Vec<Bucket>,
}

impl Windowed {
    /// A window of `buckets` buckets (at least 1) of `bucket_ms` (at least 1) each, e.g.
    /// 60 × 1000 for the last minute at one-second resolution.
    pub fn new(bucket_ms: u64, buckets: usize, score_bins: ScoreBins) -> Self {
        let bucket = Bucket {
            epoch: 0,
            counts: Counts::new(score_bins),
        };
        Windowed {
            bucket_ms: bucket_ms.max(1),
            ring: vec![bucket; buckets.max(1)],
        }
    }

    /// Counts `event` at `now_ms` (the caller's clock); an event older than the window is
    /// dropped.
    pub fn record(&mut self, now_ms: u64, event: Event) {
        let epoch = now_ms / self.bucket_ms;
        let slot = (epoch % self.ring.len() as u64) as usize;
        let bucket = &mut self.ring[slot];
        if bucket.epoch < epoch {
            bucket.epoch = epoch;
            bucket.counts.reset();
        }
        if bucket.epoch == epoch {
            bucket.counts.record(event);
        }
    }

    /// The sum of the buckets still inside the window at `now_ms`.
    pub fn counts(&self, now_ms: u64) -> Counts {
        let epoch = now_ms / self.bucket_ms;
        let oldest = epoch.saturating_sub(self.ring.len() as u64 - 1);
        let mut sum = Counts::new(self.ring[0].counts.score_bins);
        for bucket in &self.ring {
            if (oldest..=epoch).contains(&bucket.epoch) {
                sum.merge(&bucket.counts);
            }
        }
        sum
    }

    /// The summary of the window at `now_ms`.
    pub fn totals(&self, now_ms: u64) -> Totals {
        self.counts(now_ms).totals()
    }

    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        self.ring.capacity() * std::mem::size_of::<Bucket>()
            + self
                .ring
                .iter()
                .map(|b| b.counts.heap_bytes())
                .sum::<usize>()
    }
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

fn latency_bin(latency: Duration) -> usize {
    let ms = latency.as_secs_f64() * 1000.0;
    if ms < 1.0 {
        return 0;
    }
    let bin = (ms.log2() * LATENCY_BINS_PER_OCTAVE).floor() as usize + 1;
    bin.min(LATENCY_BINS - 1)
}

/// Bin 0 is [0, 1) ms; bin i ≥ 1 is [2^((i-1)/4), 2^(i/4)) ms; the last bin is open-ended and
/// reports its low edge.
fn bin_middle_ms(bin: usize) -> f64 {
    match bin {
        0 => 0.5,
        b if b == LATENCY_BINS - 1 => 2f64.powf((b - 1) as f64 / LATENCY_BINS_PER_OCTAVE),
        b => 2f64.powf((b as f64 - 0.5) / LATENCY_BINS_PER_OCTAVE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(ms: u64, error: bool) -> Event {
        Event::Request {
            latency: Duration::from_millis(ms),
            error,
        }
    }

    #[test]
    fn counts_and_rates() {
        let mut c = Counts::default();
        for i in 0..100 {
            c.record(request(10, i < 5));
            c.record(Event::Impression);
        }
        for _ in 0..7 {
            c.record(Event::Click);
        }
        c.record(Event::AddToCart);
        c.record(Event::Purchase);
        c.record(Event::Purchase);
        let t = c.totals();
        assert_eq!((t.requests, t.errors, t.impressions), (100, 5, 100));
        assert_eq!((t.clicks, t.add_to_carts, t.purchases), (7, 1, 2));
        assert!((t.error_rate - 0.05).abs() < 1e-12);
        assert!((t.ctr - 0.07).abs() < 1e-12);
        assert!((t.cvr - 0.02).abs() < 1e-12);
        c.reset();
        assert_eq!(c, Counts::default());
        assert_eq!(Counts::default().totals().p99_ms, 0.0);
    }

    #[test]
    fn latency_quantiles_are_within_a_bin() {
        let mut c = Counts::default();
        for ms in 1..=1000u64 {
            c.record(request(ms, false));
        }
        let (p50, p99) = (c.latency_quantile_ms(0.5), c.latency_quantile_ms(0.99));
        assert!((p50 / 500.0 - 1.0).abs() < 0.1, "{p50}");
        assert!((p99 / 990.0 - 1.0).abs() < 0.1, "{p99}");
        let mut slow = Counts::default();
        slow.record(request(3_600_000, false));
        assert!(slow.latency_quantile_ms(0.99) > 30_000.0);
        let mut fast = Counts::default();
        fast.record(Event::Request {
            latency: Duration::from_micros(200),
            error: false,
        });
        assert_eq!(fast.latency_quantile_ms(0.5), 0.5);
    }

    #[test]
    fn score_histogram_bins() {
        let bins = ScoreBins {
            lo: -1.0,
            hi: 1.0,
            bins: 4,
        };
        let mut c = Counts::new(bins);
        for s in [
            -5.0,
            -1.0,
            -0.6,
            -0.4,
            0.0,
            0.49,
            0.5,
            0.99,
            1.0,
            7.0,
            f64::NAN,
        ] {
            c.record(Event::Score(s));
        }
        assert_eq!(c.totals().scores, vec![4, 1, 2, 4]);
    }

    #[test]
    fn window_expires_old_buckets() {
        let mut w = Windowed::new(1000, 10, ScoreBins::default());
        w.record(0, Event::Impression);
        w.record(9_999, Event::Impression);
        assert_eq!(w.totals(9_999).impressions, 2);
        assert_eq!(w.totals(10_000).impressions, 1);
        assert_eq!(w.totals(20_000).impressions, 0);
        w.record(25_500, Event::Click);
        w.record(15_000, Event::Click);
        assert_eq!(
            w.totals(25_999).clicks,
            1,
            "an event older than the window is dropped"
        );
        w.record(25_000, Event::Click);
        assert_eq!(w.totals(26_000).clicks, 2);
    }

    #[test]
    fn memory_does_not_grow_with_traffic() {
        let mut w = Windowed::new(100, 60, ScoreBins::default());
        let mut step = Counts::default();
        let before = (w.heap_bytes(), step.heap_bytes(), std::mem::size_of_val(&w));
        for i in 0..10_000_000u64 {
            let event = match i % 4 {
                0 => request(i % 5000, i % 97 == 0),
                1 => Event::Impression,
                2 => Event::Score((i % 1000) as f64 / 1000.0),
                _ => Event::Click,
            };
            w.record(i / 10, event);
            step.record(event);
        }
        assert_eq!(
            (w.heap_bytes(), step.heap_bytes(), std::mem::size_of_val(&w)),
            before
        );
        assert_eq!(step.totals().requests, 2_500_000);
        assert_eq!(w.totals(999_999).requests, 60 * 100 * 10 / 4);
    }
}
