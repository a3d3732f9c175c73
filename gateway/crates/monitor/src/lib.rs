//! Anomaly detection with adaptive thresholds, for the gateway's own series (latency, error
//! ratio, request rate, score distributions), sampled at a fixed interval.
//!
//! A [`Detector`] keeps a robust baseline of one series: an exponentially weighted mean and
//! an exponentially weighted mean absolute deviation (the band's scale, so a volatile series
//! gets a wide band and a quiet one a narrow band). A sample outside `mean ± k·scale` counts
//! as out; `persist` consecutive outs raise the alert, `clear` consecutive ins clear it.
//! Samples inside the band teach the baseline (the scale five times slower than the level, so
//! a slow drift leaves the band instead of widening it); samples outside it teach the level only a
//! quarter as fast (clipped to the band) and never widen the band, so an anomaly cannot
//! drag the baseline along and hide itself. A series that stays out for `relearn` samples
//! has a new normal: the detector learns it afresh (the alert clears). The first `warmup`
//! samples only learn.
//!
//! Pure computation over the values the caller passes in: no clock, no I/O.

/// How a [`Detector`] judges.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Weight of each new sample in the baseline (0 < alpha ≤ 1). Default 0.02: the baseline
    /// remembers about the last 50 samples, slow enough that a drift over ten minutes (at a
    /// sample every 10 s) leaves it behind.
    pub alpha: f64,
    /// Band half-width, in robust standard deviations (1.25 × the mean absolute deviation).
    /// Default 4.
    pub k: f64,
    /// Samples that only learn before the detector judges. Default 20.
    pub warmup: u32,
    /// Consecutive samples outside the band that raise the alert. Default 3.
    pub persist: u32,
    /// Consecutive samples inside the band that clear it. Default 5.
    pub clear: u32,
    /// The least scale, as a fraction of the baseline's level (a flat series still gets a
    /// band). Default 0.01.
    pub min_relative_scale: f64,
    /// The least scale, absolute (for series near zero, like an error ratio). Default 1e-3.
    pub min_scale: f64,
    /// Consecutive samples outside the band after which the level counts as the new normal
    /// and is learned afresh. Default 90 (15 minutes at one sample every 10 s).
    pub relearn: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            alpha: 0.02,
            k: 4.0,
            warmup: 20,
            persist: 3,
            clear: 5,
            min_relative_scale: 0.01,
            min_scale: 1e-3,
            relearn: 90,
        }
    }
}

/// What one sample showed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Judgement {
    /// The band the sample was judged against (`None` during warm-up).
    pub band: Option<(f64, f64)>,
    /// Whether the series is in alert after this sample.
    pub alert: bool,
    /// Whether this sample raised or cleared the alert.
    pub changed: bool,
}

/// The adaptive baseline of one series.
#[derive(Debug, Clone)]
pub struct Detector {
    settings: Settings,
    mean: f64,
    dev: f64,
    seen: u32,
    outside: u32,
    inside: u32,
    alert: bool,
}

impl Detector {
    /// A detector that has seen nothing.
    pub fn new(settings: Settings) -> Detector {
        Detector {
            settings,
            mean: 0.0,
            dev: 0.0,
            seen: 0,
            outside: 0,
            inside: 0,
            alert: false,
        }
    }

    /// Whether the series is in alert.
    pub fn alert(&self) -> bool {
        self.alert
    }

    /// The baseline's level.
    pub fn level(&self) -> f64 {
        self.mean
    }

    fn scale(&self) -> f64 {
        let s = &self.settings;
        (1.25 * self.dev)
            .max(s.min_relative_scale * self.mean.abs())
            .max(s.min_scale)
    }

    /// Judges a sample, then learns from it. A non-finite sample is ignored.
    pub fn observe(&mut self, x: f64) -> Judgement {
        let s = self.settings;
        if !x.is_finite() {
            return Judgement {
                band: None,
                alert: self.alert,
                changed: false,
            };
        }
        if self.seen == 0 {
            self.mean = x;
        }
        self.seen = self.seen.saturating_add(1);
        if self.seen <= s.warmup {
            // Learn fast while warming up: a plain running mean and deviation.
            let w = 1.0 / f64::from(self.seen);
            let d = (x - self.mean).abs();
            self.mean += w * (x - self.mean);
            self.dev += w * (d - self.dev);
            return Judgement {
                band: None,
                alert: false,
                changed: false,
            };
        }
        let half = s.k * self.scale();
        let (low, high) = (self.mean - half, self.mean + half);
        let out = x < low || x > high;
        let was = self.alert;
        if out {
            self.outside += 1;
            self.inside = 0;
            if self.outside >= s.persist {
                self.alert = true;
            }
        } else {
            self.inside += 1;
            self.outside = 0;
            if self.inside >= s.clear {
                self.alert = false;
            }
        }
        if out && self.outside >= s.relearn {
            // A new normal: learn it from this sample on.
            self.mean = x;
            self.dev = 0.0;
            self.seen = 1;
            self.outside = 0;
            self.alert = false;
        } else if out {
            self.mean += s.alpha / 4.0 * (x.clamp(low, high) - self.mean);
        } else {
            // The scale learns five times slower than the level, so a drift cannot widen
            // the band as fast as it moves away from it.
            let d = (x - self.mean).abs();
            self.mean += s.alpha * (x - self.mean);
            self.dev += s.alpha / 5.0 * (d - self.dev);
        }
        Judgement {
            band: Some((low, high)),
            alert: self.alert,
            changed: self.alert != was,
        }
    }
}

/// The same persistence rule over a fixed threshold (`x > threshold`), the classic alert the
/// adaptive one is measured against.
#[derive(Debug, Clone)]
pub struct FixedThreshold {
    /// The threshold.
    pub threshold: f64,
    /// Consecutive samples above it that raise the alert.
    pub persist: u32,
    /// Consecutive samples below it that clear it.
    pub clear: u32,
    outside: u32,
    inside: u32,
    alert: bool,
}

impl FixedThreshold {
    /// A fixed-threshold alert with the default persistence of [`Settings`].
    pub fn new(threshold: f64) -> FixedThreshold {
        let d = Settings::default();
        FixedThreshold {
            threshold,
            persist: d.persist,
            clear: d.clear,
            outside: 0,
            inside: 0,
            alert: false,
        }
    }

    /// Judges a sample; whether the series is in alert after it.
    pub fn observe(&mut self, x: f64) -> bool {
        if x > self.threshold {
            self.outside += 1;
            self.inside = 0;
            if self.outside >= self.persist {
                self.alert = true;
            }
        } else {
            self.inside += 1;
            self.outside = 0;
            if self.inside >= self.clear {
                self.alert = false;
            }
        }
        self.alert
    }
}

#[cfg(test)]
mod tests;
