//! Upstream pools: backends, load balancing, health (active checks and passive ejection),
//! pooled keep-alive connections ([`conn`]) and the retry budget.

pub(crate) mod conn;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use prometheus::{Histogram, IntGauge};

use crate::config::{Balance, UpstreamProtocol, UpstreamSpec};
use crate::metrics::Metrics;

/// Error type carried by proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of requests sent upstream and of responses sent downstream.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// One backend of a pool and its live health.
pub struct Backend {
    /// `host:port`.
    pub(crate) authority: http::uri::Authority,
    /// Keep-alive connections to it.
    pub(crate) conns: Arc<conn::Conns>,
    in_flight: AtomicUsize,
    /// Failures in a row, in hundredths: a failure the backend is blamed for adds
    /// [`FULL_BLAME`], one the node's own overload may explain adds less.
    consecutive_failures: AtomicU32,
    /// Milliseconds since the pool's start until which the backend is ejected; 0 when not.
    ejected_until_ms: AtomicU64,
    /// Result of active health checks (true when none are configured).
    check_healthy: AtomicBool,
    healthy_gauge: IntGauge,
    /// `gateway_upstream_errors_total{kind="body_timeout"}` for the pool.
    body_timeouts: prometheus::IntCounter,
}

impl Backend {
    /// Requests now in flight to this backend.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// How much of a failed exchange is held against the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Blame {
    /// The backend refused, reset, timed out or answered 502/503/504.
    Backend,
    /// A timeout while the node itself was saturated: counts `local_overload_weight`.
    LocalOverload,
    /// The node's own resources ran out (file descriptors, ports): not the backend's fault.
    Local,
}

/// What one failure the backend is blamed for adds to its count (hundredths).
const FULL_BLAME: u32 = 100;

/// Counts a request in flight to a backend until dropped.
pub struct InFlight(Arc<Backend>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// A response body from a backend: counts the request in flight until the body ends or
    /// is dropped, and fails it when the next part does not come within the pool's
    /// `body_timeout`. The timer is made only when a read has to wait, so a body that is
    /// already buffered costs none.
    pub struct UpstreamBody<B> {
        #[pin]
        inner: B,
        in_flight: Option<InFlight>,
        timeout: Duration,
        // Armed at the first read that waits; re-armed at a wait after progress.
        stall: Option<Pin<Box<tokio::time::Sleep>>>,
        progressed: bool,
    }
}

impl<B> UpstreamBody<B> {
    /// Wraps `inner`, the body of a response from the backend `in_flight` counts.
    pub(crate) fn new(inner: B, in_flight: InFlight, timeout: Duration) -> Self {
        UpstreamBody {
            inner,
            in_flight: Some(in_flight),
            timeout,
            stall: None,
            progressed: false,
        }
    }
}

/// The next part of a response body did not come within the pool's `body_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent no more of the response body for {0:?}")]
pub struct BodyStalled(Duration);

impl<B> http_body::Body for UpstreamBody<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *this.progressed = true;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(end) => {
                this.in_flight.take();
                Poll::Ready(end.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                let due = tokio::time::Instant::now() + *this.timeout;
                let stall = match this.stall {
                    Some(s) => {
                        if std::mem::take(this.progressed) {
                            s.as_mut().reset(due);
                        }
                        s
                    }
                    None => {
                        *this.progressed = false;
                        this.stall.insert(Box::pin(tokio::time::sleep_until(due)))
                    }
                };
                match stall.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        if let Some(f) = this.in_flight.take() {
                            f.0.body_timeouts.inc();
                            tracing::debug!(backend = %f.0.authority, "upstream response body stalled");
                        }
                        Poll::Ready(Some(Err(BodyStalled(*this.timeout).into())))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A named set of backends sharing a balancing policy and a retry budget.
pub struct Pool {
    /// The validated settings.
    pub(crate) spec: UpstreamSpec,
    /// Backends in config order.
    pub(crate) backends: Vec<Arc<Backend>>,
    /// Bounds retries relative to traffic.
    pub(crate) budget: RetryBudget,
    /// `gateway_upstream_request_duration_seconds` for this pool.
    pub(crate) attempt_duration: Histogram,
    /// `gateway_upstream_panic_total` for this pool.
    panics: prometheus::IntCounter,
    /// `gateway_upstream_ejections_total` for this pool: `[ejected, over_max_share]`.
    ejections: [prometheus::IntCounter; 2],
    /// Held while deciding an ejection, so two at once cannot both pass `max_ejected_share`.
    ejecting: std::sync::Mutex<()>,
    next: AtomicUsize,
    start: Instant,
}

impl Pool {
    /// Builds the pool and its health gauges; starts health checks if configured
    /// (requires a Tokio runtime).
    pub fn new(spec: UpstreamSpec, metrics: &Metrics) -> Arc<Pool> {
        let backends = spec
            .backends
            .iter()
            .map(|a| {
                let gauge = metrics
                    .backend_healthy
                    .with_label_values(&[spec.name.as_str(), a.as_str()]);
                gauge.set(1);
                let body_timeouts = metrics
                    .upstream_errors
                    .with_label_values(&[spec.name.as_str(), "body_timeout"]);
                Arc::new(Backend {
                    authority: a.clone(),
                    conns: conn::Conns::new(
                        a.clone(),
                        spec.protocol == UpstreamProtocol::H2,
                        spec.connect_timeout,
                        spec.pool_idle_timeout,
                        spec.pool_max_idle_per_backend,
                    ),
                    in_flight: AtomicUsize::new(0),
                    consecutive_failures: AtomicU32::new(0),
                    ejected_until_ms: AtomicU64::new(0),
                    check_healthy: AtomicBool::new(true),
                    healthy_gauge: gauge,
                    body_timeouts,
                })
            })
            .collect();
        let budget = RetryBudget::new(spec.retry_budget_ratio, spec.retry_budget_min_per_sec);
        let attempt_duration = metrics
            .upstream_duration
            .with_label_values(&[spec.name.as_str()]);
        let panics = metrics
            .upstream_panics
            .with_label_values(&[spec.name.as_str()]);
        let ejections = ["ejected", "over_max_share"].map(|outcome| {
            metrics
                .upstream_ejections
                .with_label_values(&[spec.name.as_str(), outcome])
        });
        let pool = Arc::new(Pool {
            spec,
            backends,
            budget,
            attempt_duration,
            panics,
            ejections,
            ejecting: std::sync::Mutex::new(()),
            next: AtomicUsize::new(0),
            start: Instant::now(),
        });
        if pool.spec.health_check.is_some() {
            for i in 0..pool.backends.len() {
                tokio::spawn(health_check_loop(Arc::downgrade(&pool), i));
            }
        }
        pool
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// How many backends may take traffic now, and how many there are.
    pub fn availability(&self) -> (usize, usize) {
        let up = self
            .backends
            .iter()
            .filter(|b| self.is_available(b))
            .count();
        (up, self.backends.len())
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Whether the backend may take traffic now.
    pub(crate) fn is_available(&self, backend: &Backend) -> bool {
        if !backend.check_healthy.load(Ordering::Relaxed) {
            return false;
        }
        let until = backend.ejected_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        if self.now_ms() >= until {
            // The ejection has run out: the first caller to notice restores the backend.
            if backend
                .ejected_until_ms
                .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                backend.healthy_gauge.set(1);
                tracing::info!(upstream = %self.spec.name, backend = %backend.authority, "ejection over, backend back in rotation");
            }
            return true;
        }
        false
    }

    /// Picks an available backend not in `tried` (indices), by the pool's policy, and counts
    /// the request in flight on it.
    pub(crate) fn pick(&self, tried: &[usize]) -> Option<(usize, InFlight)> {
        let n = self.backends.len();
        // A retry continues after the backend that failed instead of taking a fresh turn, so
        // retries do not skew the rotation.
        let start = match tried.last() {
            None => self.next.fetch_add(1, Ordering::Relaxed),
            Some(&last) => last + 1,
        };
        let candidates = (0..n)
            .map(|k| (start + k) % n)
            .filter(|i| !tried.contains(i));
        // Panic mode: with too few healthy backends, every backend takes traffic again.
        let healthy = self
            .backends
            .iter()
            .filter(|b| self.is_available(b))
            .count();
        let panic = (healthy as f64) < self.spec.panic_threshold * n as f64;
        let usable = |i: &usize| panic || self.is_available(&self.backends[*i]);
        let chosen = match self.spec.balance {
            Balance::RoundRobin => candidates.into_iter().find(usable),
            Balance::LeastInFlight => candidates
                .filter(usable)
                .min_by_key(|&i| self.backends[i].in_flight()),
        }?;
        if panic {
            self.panics.inc();
        }
        let backend = self.backends[chosen].clone();
        backend.in_flight.fetch_add(1, Ordering::Relaxed);
        Some((chosen, InFlight(backend)))
    }

    /// A request to `backend` in the form its protocol needs: origin-form with `Host` for
    /// HTTP/1.1 (a `Host` already in `headers` is kept), absolute for h2.
    pub(crate) fn request_to(
        &self,
        backend: &Backend,
        method: http::Method,
        path_and_query: http::uri::PathAndQuery,
        mut headers: http::HeaderMap,
        body: ProxyBody,
    ) -> http::Request<ProxyBody> {
        let mut req = http::Request::new(body);
        *req.method_mut() = method;
        match self.spec.protocol {
            UpstreamProtocol::Http1 => {
                if !headers.contains_key(http::header::HOST) {
                    if let Ok(v) = http::HeaderValue::from_str(backend.authority.as_str()) {
                        headers.insert(http::header::HOST, v);
                    }
                }
                *req.uri_mut() = http::Uri::from(path_and_query);
                *req.version_mut() = http::Version::HTTP_11;
            }
            UpstreamProtocol::H2 => {
                let mut parts = http::uri::Parts::default();
                parts.scheme = Some(http::uri::Scheme::HTTP);
                parts.authority = Some(backend.authority.clone());
                parts.path_and_query = Some(path_and_query);
                *req.uri_mut() =
                    http::Uri::from_parts(parts).expect("scheme, authority and path make a URI");
                *req.version_mut() = http::Version::HTTP_2;
            }
        }
        *req.headers_mut() = headers;
        req
    }

    /// Records a successful exchange with a backend.
    pub(crate) fn record_success(&self, index: usize) {
        self.backends[index]
            .consecutive_failures
            .store(0, Ordering::Relaxed);
    }

    /// Records a failed exchange; ejects the backend after too many in a row, weighted by
    /// `blame`, unless `max_ejected_share` of the pool is already ejected.
    pub(crate) fn record_failure(&self, index: usize, blame: Blame) {
        let threshold = self.spec.eject_after_failures;
        let weight = match blame {
            Blame::Backend => FULL_BLAME,
            Blame::LocalOverload => {
                (self.spec.local_overload_weight * f64::from(FULL_BLAME)).round() as u32
            }
            Blame::Local => 0,
        };
        if threshold == 0 || weight == 0 {
            return;
        }
        let backend = &self.backends[index];
        let count = backend
            .consecutive_failures
            .fetch_add(weight, Ordering::Relaxed)
            + weight;
        if count < threshold * FULL_BLAME {
            return;
        }
        let _deciding = self.ejecting.lock().unwrap_or_else(|e| e.into_inner());
        backend.consecutive_failures.store(0, Ordering::Relaxed);
        let now = self.now_ms();
        if backend.ejected_until_ms.load(Ordering::Relaxed) > now {
            return;
        }
        let ejected = self
            .backends
            .iter()
            .filter(|b| b.ejected_until_ms.load(Ordering::Relaxed) > now)
            .count();
        let allowed = (self.spec.max_ejected_share * self.backends.len() as f64 + 1e-9).floor();
        if (ejected + 1) as f64 > allowed {
            self.ejections[1].inc();
            tracing::warn!(
                upstream = %self.spec.name,
                backend = %backend.authority,
                ejected,
                backends = self.backends.len(),
                max_ejected_share = self.spec.max_ejected_share,
                "backend failing but not ejected: max_ejected_share of the pool is already out"
            );
            return;
        }
        let until = now + self.spec.ejection.as_millis() as u64;
        backend
            .ejected_until_ms
            .store(until.max(1), Ordering::Relaxed);
        backend.healthy_gauge.set(0);
        self.ejections[0].inc();
        tracing::warn!(
            upstream = %self.spec.name,
            backend = %backend.authority,
            failures = count / FULL_BLAME,
            ejection_ms = self.spec.ejection.as_millis() as u64,
            "backend ejected after consecutive failures"
        );
    }
}

async fn health_check_loop(pool: Weak<Pool>, index: usize) {
    let Some(spec) = pool.upgrade().and_then(|p| p.spec.health_check.clone()) else {
        return;
    };
    let (mut successes, mut failures) = (0u32, 0u32);
    loop {
        tokio::time::sleep(spec.interval).await;
        let Some(pool) = pool.upgrade() else { return };
        let backend = pool.backends[index].clone();
        let req = pool.request_to(
            &backend,
            http::Method::GET,
            spec.path.parse().expect("validated path"),
            http::HeaderMap::new(),
            empty_body(),
        );
        let ok = match tokio::time::timeout(spec.timeout, backend.conns.send(req)).await {
            Ok(Ok(resp)) => {
                use http_body_util::BodyExt;
                let ok = resp.status().is_success();
                // Read the answer so the connection can be reused.
                let _ = resp.into_body().collect().await;
                ok
            }
            _ => false,
        };
        let was_healthy = backend.check_healthy.load(Ordering::Relaxed);
        if ok {
            successes += 1;
            failures = 0;
            if !was_healthy && successes >= spec.healthy_threshold {
                backend.check_healthy.store(true, Ordering::Relaxed);
                tracing::info!(upstream = %pool.spec.name, backend = %backend.authority, "health check passing, backend back in rotation");
            }
        } else {
            failures += 1;
            successes = 0;
            if was_healthy && failures >= spec.unhealthy_threshold {
                backend.check_healthy.store(false, Ordering::Relaxed);
                tracing::warn!(upstream = %pool.spec.name, backend = %backend.authority, failures, "health check failing, backend out of rotation");
            }
        }
        let available = pool.is_available(&backend);
        backend.healthy_gauge.set(available as i64);
    }
}

/// An empty body of the proxy's body type.
pub fn empty_body() -> ProxyBody {
    use http_body_util::BodyExt;
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A full body of the proxy's body type.
pub fn full_body(bytes: impl Into<Bytes>) -> ProxyBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Limits retries to a fraction of requests plus a small steady allowance, so that retries
/// cannot multiply load on a struggling upstream (as in Finagle and linkerd).
pub struct RetryBudget {
    /// Thousandths of a token each request deposits.
    deposit_milli: i64,
    /// Tokens added per second.
    min_per_sec: i64,
    /// Thousandths of a token available.
    balance_milli: AtomicI64,
    /// Upper bound on the balance.
    cap_milli: i64,
    last_refill_sec: AtomicU64,
    start: Instant,
}

impl RetryBudget {
    /// `ratio` of requests may be retried, plus `min_per_sec` retries each second.
    pub fn new(ratio: f64, min_per_sec: u32) -> RetryBudget {
        let min_per_sec = i64::from(min_per_sec);
        let cap_milli = (min_per_sec * 10).max(100) * 1000;
        RetryBudget {
            deposit_milli: (ratio * 1000.0).round() as i64,
            min_per_sec,
            balance_milli: AtomicI64::new(min_per_sec * 1000),
            cap_milli,
            last_refill_sec: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    fn add(&self, milli: i64) {
        let _ = self
            .balance_milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((b + milli).min(self.cap_milli))
            });
    }

    /// Called once per original request.
    pub(crate) fn deposit(&self) {
        if self.deposit_milli > 0 {
            self.add(self.deposit_milli);
        }
    }

    /// Takes one retry from the budget; false when it is spent.
    pub(crate) fn try_withdraw(&self) -> bool {
        self.refill(self.start.elapsed());
        self.balance_milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= 1000).then_some(b - 1000)
            })
            .is_ok()
    }

    fn refill(&self, elapsed: Duration) {
        let now = elapsed.as_secs();
        let last = self.last_refill_sec.load(Ordering::Relaxed);
        if now > last
            && self
                .last_refill_sec
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.add((now - last) as i64 * self.min_per_sec * 1000);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(backends: usize, max_ejected_share: f64, failures: u32) -> Arc<Pool> {
        let spec = UpstreamSpec {
            name: "app".into(),
            backends: (0..backends)
                .map(|i| format!("127.0.0.1:{}", 1000 + i).parse().unwrap())
                .collect(),
            balance: Balance::RoundRobin,
            protocol: UpstreamProtocol::Http1,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
            pool_idle_timeout: Duration::from_secs(1),
            pool_max_idle_per_backend: 1,
            max_retries: 0,
            retry_budget_ratio: 0.0,
            retry_budget_min_per_sec: 0,
            panic_threshold: 0.0,
            health_check: None,
            eject_after_failures: failures,
            ejection: Duration::from_secs(60),
            max_ejected_share,
            local_overload_weight: 0.25,
        };
        Pool::new(spec, &Metrics::new(&prometheus::Registry::new()).unwrap())
    }

    fn ejected(pool: &Pool) -> Vec<bool> {
        pool.backends
            .iter()
            .map(|b| !pool.is_available(b))
            .collect()
    }

    #[test]
    fn ejection_stops_at_the_max_share_and_counts_what_it_skipped() {
        let p = pool(4, 0.5, 1);
        for i in 0..3 {
            p.record_failure(i, Blame::Backend);
        }
        assert_eq!(ejected(&p), [true, true, false, false]);
        assert_eq!(p.ejections[0].get(), 2);
        assert_eq!(p.ejections[1].get(), 1);
        // A failing backend left in is failed again later: still not ejected.
        p.record_failure(2, Blame::Backend);
        assert_eq!(ejected(&p), [true, true, false, false]);
    }

    #[test]
    fn a_pool_of_one_is_never_emptied_unless_the_share_allows_it() {
        let p = pool(1, 0.5, 1);
        p.record_failure(0, Blame::Backend);
        assert_eq!(ejected(&p), [false]);
        let p = pool(1, 1.0, 1);
        p.record_failure(0, Blame::Backend);
        assert_eq!(ejected(&p), [true]);
    }

    #[test]
    fn local_overload_weighs_less_and_local_errors_not_at_all() {
        let p = pool(2, 1.0, 2);
        for _ in 0..100 {
            p.record_failure(0, Blame::Local);
        }
        assert_eq!(ejected(&p), [false, false]);
        // Two full failures eject; at a weight of 0.25 it takes eight.
        for _ in 0..7 {
            p.record_failure(0, Blame::LocalOverload);
        }
        assert_eq!(ejected(&p), [false, false]);
        p.record_failure(0, Blame::LocalOverload);
        assert_eq!(ejected(&p), [true, false]);
        p.record_failure(1, Blame::Backend);
        p.record_failure(1, Blame::Backend);
        assert_eq!(ejected(&p), [true, true]);
        // A success in between starts the count again.
        let p = pool(1, 1.0, 2);
        p.record_failure(0, Blame::Backend);
        p.record_success(0);
        p.record_failure(0, Blame::Backend);
        assert_eq!(ejected(&p), [false]);
    }

    #[test]
    fn budget_allows_the_ratio_and_no_more() {
        let b = RetryBudget::new(0.2, 0);
        assert!(
            !b.try_withdraw(),
            "no requests yet, no minimum: nothing to spend"
        );
        for _ in 0..10 {
            b.deposit();
        }
        assert!(b.try_withdraw());
        assert!(b.try_withdraw());
        assert!(
            !b.try_withdraw(),
            "10 requests at 20% buy exactly 2 retries"
        );
    }

    #[test]
    fn budget_minimum_refills_each_second() {
        let b = RetryBudget::new(0.0, 3);
        for _ in 0..3 {
            assert!(b.try_withdraw());
        }
        assert!(!b.try_withdraw());
        b.refill(Duration::from_secs(1));
        assert!(b.try_withdraw());
    }
}
