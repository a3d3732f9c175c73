//! Admission control: when the node is saturated, new requests are answered at once with 503
//! and `retry-after` instead of joining a queue that grows without bound.
//!
//! Two limits, both from `[limits]` and read per request from the live snapshot:
//! - `max_inflight_requests`: requests being answered at once (until their response head);
//! - `max_queue_time_ms`: the standing delay of the worker threads. A sampler task sleeps
//!   [`TICK`] and measures how late it wakes: that is how long any newly ready task (a request
//!   that just arrived) waits for a worker. One late wake-up is a blip (a long poll, a page
//!   fault); [`STANDING`] late ones in a row are a standing queue, as CoDel defines it, and new
//!   requests are shed until a sample is back under the limit.
//!
//! The same samples tell the upstream pools whether the node itself was saturated while a
//! request waited ([`Admission::saturation_mark`]), whatever the shedding limit: a timeout
//! then weighs less towards ejecting the backend (`[upstreams.passive] local_overload_weight`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::config::Limits;

/// How often the scheduling delay is sampled.
pub const TICK: Duration = Duration::from_millis(10);

/// Late samples in a row that make a standing queue.
pub const STANDING: usize = 3;

/// A scheduling delay this long, [`STANDING`] samples in a row, counts as a saturated node for
/// passive ejection (a full sampling tick of waiting for a CPU).
pub const SATURATED_DELAY: Duration = TICK;

/// Why a request was shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// `max_inflight_requests` requests were already being answered.
    Concurrency,
    /// The worker threads had a standing queue longer than `max_queue_time_ms`.
    QueueTime,
}

impl Shed {
    /// The `reason` label and the word in the 503's body.
    pub fn label(self) -> &'static str {
        match self {
            Shed::Concurrency => "concurrency",
            Shed::QueueTime => "queue_time",
        }
    }
}

/// The node-wide admission state, shared by every connection.
pub struct Admission {
    inflight: AtomicUsize,
    saturated: AtomicBool,
    /// Samples taken while the node had a standing queue of at least [`SATURATED_DELAY`].
    saturated_samples: AtomicU64,
    inflight_gauge: IntGauge,
    delay_gauge: Gauge,
    shed: [IntCounter; 2],
}

/// A request admitted; dropping it ends the request's share of `max_inflight_requests`.
pub struct Ticket<'a>(&'a Admission);

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
        self.0.inflight_gauge.dec();
    }
}

impl Admission {
    /// Creates the state and registers its series into `registry`.
    pub fn new(registry: &Registry) -> Result<Admission, prometheus::Error> {
        let shed = IntCounterVec::new(
            Opts::new(
                "gateway_shed_requests_total",
                "Requests answered 503 with retry-after by admission control, by reason \
                 (concurrency: max_inflight_requests reached; queue_time: the worker threads \
                 had a standing queue longer than max_queue_time_ms).",
            ),
            &["reason"],
        )?;
        let inflight_gauge = IntGauge::new(
            "gateway_inflight_requests",
            "Downstream requests being answered now (until their response head).",
        )?;
        let delay_gauge = Gauge::new(
            "gateway_scheduling_delay_seconds",
            "How late the gateway's worker threads ran a task that became ready, last sample \
             (every 10 ms): the time a new request waits for a CPU.",
        )?;
        registry.register(Box::new(shed.clone()))?;
        registry.register(Box::new(inflight_gauge.clone()))?;
        registry.register(Box::new(delay_gauge.clone()))?;
        Ok(Admission {
            inflight: AtomicUsize::new(0),
            saturated: AtomicBool::new(false),
            saturated_samples: AtomicU64::new(0),
            inflight_gauge,
            delay_gauge,
            shed: [Shed::Concurrency, Shed::QueueTime]
                .map(|s| shed.with_label_values(&[s.label()])),
        })
    }

    /// Admits a request under `limits`, or says why not (and counts it).
    pub fn admit(&self, limits: &Limits) -> Result<Ticket<'_>, Shed> {
        if !limits.max_queue_time.is_zero() && self.saturated.load(Ordering::Acquire) {
            self.shed[1].inc();
            return Err(Shed::QueueTime);
        }
        let before = self.inflight.fetch_add(1, Ordering::AcqRel);
        let ticket = Ticket(self);
        self.inflight_gauge.inc();
        if before >= limits.max_inflight_requests {
            drop(ticket);
            self.shed[0].inc();
            return Err(Shed::Concurrency);
        }
        Ok(ticket)
    }

    /// Requests being answered now.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// A mark that moves on while the node is saturated: two marks differ when the node had a
    /// standing queue of at least [`SATURATED_DELAY`] between them. One atomic load.
    pub fn saturation_mark(&self) -> u64 {
        self.saturated_samples.load(Ordering::Relaxed)
    }

    /// Takes one sample of the scheduling delay; `limit` is the live `max_queue_time`.
    fn observe(&self, streaks: &mut Streaks, delay: Duration, limit: Duration) {
        self.delay_gauge.set(delay.as_secs_f64());
        if delay < SATURATED_DELAY {
            streaks.saturated = 0;
        } else {
            streaks.saturated += 1;
            if streaks.saturated >= STANDING {
                self.saturated_samples.fetch_add(1, Ordering::Relaxed);
            }
        }
        let late = &mut streaks.late;
        if limit.is_zero() || delay < limit {
            *late = 0;
            self.saturated.store(false, Ordering::Release);
        } else {
            *late += 1;
            if *late >= STANDING {
                self.saturated.store(true, Ordering::Release);
            }
        }
    }
}

/// Late samples in a row: over the shedding limit, and over [`SATURATED_DELAY`].
#[derive(Default)]
struct Streaks {
    late: usize,
    saturated: usize,
}

/// Samples the scheduling delay every [`TICK`] until `shutdown` completes; `limit` reads the
/// live `max_queue_time`. Runs as a task on the runtime whose delay it measures.
pub async fn sample(
    admission: Arc<Admission>,
    limit: impl Fn() -> Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut streaks = Streaks::default();
    tokio::pin!(shutdown);
    loop {
        let asked = Instant::now();
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = &mut shutdown => return,
        }
        // The timer wheel itself rounds up to the millisecond.
        let delay = asked
            .elapsed()
            .saturating_sub(TICK + Duration::from_millis(1));
        admission.observe(&mut streaks, delay, limit());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_inflight_requests: usize, queue_ms: u64) -> Limits {
        Limits {
            max_connections: 1,
            max_header_bytes: 1,
            max_body_bytes: 1,
            header_read_timeout: Duration::ZERO,
            body_read_timeout: Duration::ZERO,
            body_deadline: Duration::ZERO,
            send_timeout: Duration::ZERO,
            idle_timeout: Duration::ZERO,
            h2_max_concurrent_streams: 1,
            max_inflight_requests,
            max_queue_time: Duration::from_millis(queue_ms),
        }
    }

    #[test]
    fn concurrency_is_bounded_and_tickets_give_their_place_back() {
        let a = Admission::new(&Registry::new()).unwrap();
        let l = limits(2, 50);
        let t1 = a.admit(&l).unwrap();
        let _t2 = a.admit(&l).unwrap();
        assert_eq!(a.admit(&l).err(), Some(Shed::Concurrency));
        assert_eq!(a.inflight(), 2, "a refused request holds no place");
        drop(t1);
        assert!(a.admit(&l).is_ok());
        assert_eq!(a.shed[0].get(), 1);
    }

    #[test]
    fn only_a_standing_queue_sheds_and_one_quick_sample_ends_it() {
        let a = Admission::new(&Registry::new()).unwrap();
        let l = limits(100, 50);
        let mut late = Streaks::default();
        let slow = Duration::from_millis(80);
        // A blip, then a quick sample: never saturated.
        for d in [slow, slow, Duration::ZERO, slow, slow, Duration::ZERO] {
            a.observe(&mut late, d, l.max_queue_time);
            assert!(a.admit(&l).is_ok());
        }
        for _ in 0..STANDING {
            a.observe(&mut late, slow, l.max_queue_time);
        }
        assert_eq!(a.admit(&l).err(), Some(Shed::QueueTime));
        assert_eq!(a.shed[1].get(), 1);
        // Off: a zero limit admits whatever the samples say.
        assert!(a.admit(&limits(100, 0)).is_ok());
        a.observe(&mut late, Duration::from_millis(1), l.max_queue_time);
        assert!(a.admit(&l).is_ok());
    }

    #[test]
    fn the_saturation_mark_moves_only_on_a_standing_queue_whatever_the_limit() {
        let a = Admission::new(&Registry::new()).unwrap();
        let mut streaks = Streaks::default();
        let slow = SATURATED_DELAY * 2;
        let mark = a.saturation_mark();
        for d in [slow, slow, Duration::ZERO, slow, Duration::from_millis(1)] {
            a.observe(&mut streaks, d, Duration::ZERO);
        }
        assert_eq!(a.saturation_mark(), mark, "blips are not saturation");
        for _ in 0..STANDING {
            a.observe(&mut streaks, slow, Duration::ZERO);
        }
        assert_eq!(
            a.saturation_mark(),
            mark + 1,
            "shedding off, saturation still seen"
        );
    }
}
