//! What bounds a downstream connection against a slow or stuck client beyond the request
//! limits: the send timeout, and room made at `max_connections` by evicting idle connections.
//!
//! **Send timeout.** A response may wait for the client to take more of it for at most
//! `[limits] send_timeout_ms`. Two things are watched, because either can stall alone:
//! - the connection's writes ([`WatchedIo`]): a write or flush that stays pending means the
//!   client reads nothing at all (an HTTP/1.1 client that stopped reading, an h2 client that
//!   stopped reading the socket). The connection is closed, which drops the responses in
//!   flight and with them their upstream connections.
//! - each h2 response body ([`WatchedBody`]): one stream whose flow-control window stays shut
//!   never blocks the socket, but hyper stops polling its body. The stream is reset
//!   (RST_STREAM CANCEL) by dropping the task that answers it ([`StreamExecutor`]), which
//!   drops its body and the upstream side; the connection's other streams go on.
//!
//! Neither costs a timer per request: the connection's one watchdog samples both every
//! `send_timeout / SAMPLES`, and a stall is one that stayed unchanged for `SAMPLES` samples in
//! a row, so it fires between `send_timeout` and `send_timeout * (1 + 1 / SAMPLES)` after the
//! last progress, never earlier. On the hot path a connection stores a counter only when a
//! write blocks or unblocks; an h2 stream costs a small allocation, a lock to list it, and a
//! store each time hyper polls its body.
//!
//! **Eviction.** [`Connections`] lists every open downstream connection. When all
//! `max_connections` places are taken and a new client comes, the longest-idle connections
//! (no request in flight) are asked to close, a batch at a time as nginx drains its keep-alive
//! connections: an HTTP/1.1 connection that never finished a request is closed at once, the
//! others close gracefully (HTTP/1.1 after flushing what it wrote, h2 with GOAWAY) and are
//! closed outright after [`EVICTION_GRACE`] if they have still nothing in flight.

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use hyper::body::{Body, Frame, SizeHint};
use prometheus::IntCounter;

/// Samples a stall must outlast (see the module's documentation).
const SAMPLES: u32 = 4;

/// How long an evicted connection that closes gracefully may take before it is closed
/// outright (when it has nothing in flight by then).
pub(crate) const EVICTION_GRACE: Duration = Duration::from_secs(1);

/// Most connections asked to close by one eviction.
const EVICTION_BATCH: usize = 32;

/// One downstream connection's state, as its watchdog and the eviction scan see it.
pub(crate) struct Activity {
    id: u64,
    start: Instant,
    in_flight: AtomicUsize,
    /// When it last had nothing in flight, in milliseconds since `start`: the end of its TLS
    /// handshake or of its last request.
    idle_since_ms: AtomicU64,
    /// Whether a request has finished on it.
    served: AtomicBool,
    /// The writes to the client as [`WatchedIo`] last saw them: `(changes << 1) | blocked`.
    writes: AtomicU64,
    /// The h2 streams being answered, for their send timeout; finished ones are pruned.
    streams: Mutex<Vec<Arc<StreamWatch>>>,
    /// An h2 stream was opened: on a plain listener, the connection speaks h2c.
    spoke_h2: AtomicBool,
    /// When [`Connections::evict_idle`] picked it, in milliseconds since `start` (at least 1);
    /// 0 while it has not.
    evicted_at_ms: AtomicU64,
    /// The task waiting in [`Activity::evicted`] or the watchdog, woken on eviction.
    evict_waker: AtomicWaker,
}

impl Activity {
    /// Requests now in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether an h2 stream was opened on this connection.
    pub(crate) fn spoke_h2(&self) -> bool {
        self.spoke_h2.load(Ordering::Relaxed)
    }

    /// Whether a request has finished on this connection.
    pub(crate) fn served_any(&self) -> bool {
        self.served.load(Ordering::Relaxed)
    }

    /// Starts its idle clock now: the connection is ready for its first request.
    pub(crate) fn ready(&self) {
        self.idle_since_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// When the connection last had nothing in flight, from `start`.
    fn idle_since(&self) -> Instant {
        self.start + Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed))
    }

    /// Resolves once [`Connections::evict_idle`] picked this connection.
    pub(crate) fn evicted(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            self.evict_waker.register(cx.waker());
            if self.is_evicted() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    fn is_evicted(&self) -> bool {
        self.evicted_at_ms.load(Ordering::Acquire) > 0
    }

    /// A new h2 stream's watch, listed for the watchdog and handed to [`StreamExecutor`],
    /// which spawns the stream's task next (hyper calls the service, then spawns the task that
    /// answers it, in the same poll and on the same thread).
    pub(crate) fn open_stream(&self) -> Arc<StreamWatch> {
        let watch = Arc::new(StreamWatch::default());
        self.spoke_h2.store(true, Ordering::Relaxed);
        {
            let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
            if streams.len() == streams.capacity() {
                streams.retain(|s| Arc::strong_count(s) > 1);
            }
            streams.push(watch.clone());
        }
        NEXT_STREAM.with(|next| next.set(Some(watch.clone())));
        watch
    }

    /// Takes one sample of each h2 stream: resets those stalled for the send timeout (counting
    /// each in `reset`); `false` when one stalled whose task cannot be dropped, so the
    /// connection must close.
    fn sample_streams(&self, reset: &IntCounter) -> bool {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.retain(|s| Arc::strong_count(s) > 1);
        let mut ok = true;
        for s in streams.iter() {
            if s.stalled() {
                if s.kill() {
                    reset.inc();
                } else {
                    ok = false;
                }
            }
        }
        ok
    }
}

/// Counts a request in flight on its connection until dropped (held by the response body).
pub(crate) struct RequestActive(Arc<Activity>);

impl RequestActive {
    /// Counts one more request in flight on `a`.
    pub(crate) fn new(a: &Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        RequestActive(a.clone())
    }
}

impl Drop for RequestActive {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_ms
            .store(a.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        a.served.store(true, Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every open downstream connection, for eviction.
#[derive(Default)]
pub(crate) struct Connections {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Activity>>>,
}

/// A connection's place in [`Connections`], given up when dropped.
pub(crate) struct Registered {
    table: Arc<Connections>,
    /// The connection's state.
    pub(crate) activity: Arc<Activity>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.table.lock().remove(&self.activity.id);
    }
}

impl Connections {
    /// Lists a connection accepted now (idle, from this moment).
    pub(crate) fn open(self: &Arc<Self>) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity {
            id,
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            served: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            streams: Mutex::new(Vec::new()),
            spoke_h2: AtomicBool::new(false),
            evicted_at_ms: AtomicU64::new(0),
            evict_waker: AtomicWaker::new(),
        });
        self.lock().insert(id, activity.clone());
        Registered {
            table: self.clone(),
            activity,
        }
    }

    /// Asks the longest-idle connections to close: an eighth of the idle ones, at least one
    /// and at most [`EVICTION_BATCH`]. Asks none while an earlier batch is still closing
    /// (for up to twice [`EVICTION_GRACE`]). Returns how many it asked.
    pub(crate) fn evict_idle(&self) -> usize {
        let open = self.lock();
        let now = Instant::now();
        let mut idle = Vec::new();
        for a in open.values() {
            if a.in_flight() > 0 {
                continue;
            }
            let at = a.evicted_at_ms.load(Ordering::Relaxed);
            if at > 0 {
                let picked = a.start + Duration::from_millis(at);
                if now.saturating_duration_since(picked) < 2 * EVICTION_GRACE {
                    return 0;
                }
                continue;
            }
            idle.push((a.idle_since(), a));
        }
        let n = (idle.len() / 8).clamp(1, EVICTION_BATCH).min(idle.len());
        if n == 0 {
            return 0;
        }
        if n < idle.len() {
            idle.select_nth_unstable_by_key(n - 1, |(since, _)| *since);
        }
        for (_, a) in &idle[..n] {
            let ms = (now.saturating_duration_since(a.start).as_millis() as u64).max(1);
            a.evicted_at_ms.store(ms, Ordering::Release);
            a.evict_waker.wake();
        }
        n
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Activity>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The watchdog's view of something that can stall: its last sample and how many samples in a
/// row it stayed stalled at the same value.
struct Sample {
    seen: u64,
    stale: u32,
}

impl Sample {
    const fn new() -> Sample {
        Sample {
            seen: u64::MAX,
            stale: 0,
        }
    }

    /// Takes a sample of `(changes << 1) | waiting`; true once it has been waiting, unchanged,
    /// for [`SAMPLES`] samples.
    fn stalled(&mut self, v: u64) -> bool {
        self.stale = if v & 1 == 1 && v == self.seen {
            self.stale + 1
        } else {
            0
        };
        self.seen = v;
        self.stale >= SAMPLES
    }
}

/// The send side of one h2 stream: its body's progress, and the handle that drops its task.
#[derive(Default)]
pub(crate) struct StreamWatch {
    /// `(changes << 1) | waiting on the client`, as the stream's [`WatchedBody`] last saw it.
    sending: AtomicU64,
    /// The watchdog's [`Sample`] of `sending` (only the watchdog touches these).
    seen: AtomicU64,
    stale: AtomicU32,
    /// Whether [`StreamExecutor`] wrapped the stream's task, so [`StreamWatch::kill`] ends it.
    armed: AtomicBool,
    killed: AtomicBool,
    task: AtomicWaker,
}

impl StreamWatch {
    fn stalled(&self) -> bool {
        if self.killed.load(Ordering::Relaxed) {
            return false;
        }
        let mut s = Sample {
            seen: self.seen.load(Ordering::Relaxed),
            stale: self.stale.load(Ordering::Relaxed),
        };
        let stalled = s.stalled(self.sending.load(Ordering::Relaxed));
        self.seen.store(s.seen, Ordering::Relaxed);
        self.stale.store(s.stale, Ordering::Relaxed);
        stalled
    }

    /// Ends the stream's task (h2 then resets the stream); false when it cannot.
    fn kill(&self) -> bool {
        if !self.armed.load(Ordering::Acquire) {
            return false;
        }
        self.killed.store(true, Ordering::Release);
        self.task.wake();
        true
    }

    fn killed(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            self.task.register(cx.waker());
            if self.killed.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

thread_local! {
    /// The watch of the h2 stream whose task hyper spawns next on this thread.
    static NEXT_STREAM: Cell<Option<Arc<StreamWatch>>> = const { Cell::new(None) };
}

/// Spawns hyper's tasks on tokio; an h2 stream's task (announced by
/// [`Activity::open_stream`]) ends early when its [`StreamWatch`] is killed.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StreamExecutor;

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        match NEXT_STREAM.with(Cell::take) {
            None => {
                tokio::spawn(fut);
            }
            Some(watch) => {
                watch.armed.store(true, Ordering::Release);
                tokio::spawn(async move {
                    tokio::select! {
                        biased;
                        () = watch.killed() => {}
                        _ = fut => {}
                    }
                });
            }
        }
    }
}

/// A downstream connection's transport, noting when its writes block and unblock.
pub(crate) struct WatchedIo<I> {
    inner: I,
    activity: Arc<Activity>,
    changes: u64,
    blocked: bool,
}

impl<I> WatchedIo<I> {
    /// Wraps the transport of the connection `activity` describes.
    pub(crate) fn new(inner: I, activity: Arc<Activity>) -> Self {
        WatchedIo {
            inner,
            activity,
            changes: 0,
            blocked: false,
        }
    }

    fn note<T>(&mut self, r: Poll<T>) -> Poll<T> {
        let blocked = r.is_pending();
        if blocked != self.blocked {
            self.blocked = blocked;
            self.changes += 1;
            self.activity
                .writes
                .store((self.changes << 1) | u64::from(blocked), Ordering::Relaxed);
        }
        r
    }
}

impl<I: hyper::rt::Read + Unpin> hyper::rt::Read for WatchedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: hyper::rt::Write + Unpin> hyper::rt::Write for WatchedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.note(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(r)
    }
}

/// A response body on its way to the client: holds its request's place in
/// [`Activity::in_flight`] until it ends, and on h2 tells its [`StreamWatch`] whether it waits
/// on the client (it handed hyper a frame and was not polled since).
pub(crate) struct WatchedBody<B> {
    inner: B,
    active: Option<RequestActive>,
    stream: Option<Arc<StreamWatch>>,
    changes: u64,
}

impl<B> WatchedBody<B> {
    /// Wraps `inner`, the answer to the request `active` counts, on the h2 stream `stream`.
    pub(crate) fn new(inner: B, active: RequestActive, stream: Option<Arc<StreamWatch>>) -> Self {
        if let Some(s) = &stream {
            // Hyper polls the body once it can send: until then it waits on the client.
            s.sending.store((1 << 1) | 1, Ordering::Relaxed);
        }
        WatchedBody {
            inner,
            active: Some(active),
            stream,
            changes: 1,
        }
    }

    fn note(&mut self, waiting: bool) {
        if let Some(s) = &self.stream {
            self.changes += 1;
            s.sending
                .store((self.changes << 1) | u64::from(waiting), Ordering::Relaxed);
        }
    }
}

impl<B> Body for WatchedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let res = Pin::new(&mut self.inner).poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(_))) => self.note(true),
            Poll::Pending => self.note(false),
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                self.note(false);
                self.active.take();
            }
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a connection's watchdog watches for.
pub(crate) struct Watch {
    /// Close after this long with nothing in flight; `None` once the connection is closing.
    pub(crate) idle: Option<Duration>,
    /// `[limits] send_timeout_ms`.
    pub(crate) send_timeout: Duration,
    /// After an eviction: close outright from this moment when nothing is in flight.
    pub(crate) linger_until: Option<Instant>,
    /// `gateway_rejected_requests_total{reason="send_timeout"}`, for the h2 streams it resets.
    pub(crate) streams_reset: IntCounter,
}

/// Why a connection's watchdog ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// The gateway is shutting down.
    Shutdown,
    /// No request in flight for the connection's limit.
    Idle,
    /// Picked to make room at `max_connections`.
    Evicted,
    /// The client took nothing for the send timeout: close the connection now.
    SendTimeout,
    /// Evicted, and still open with nothing in flight after [`EVICTION_GRACE`].
    Lingered,
}

/// Resolves when the connection must end or start closing, as `watch` asks; meanwhile resets
/// the h2 streams that stall for the send timeout. Its one timer is re-armed only when it
/// fires: requests themselves touch no timer.
pub(crate) async fn watchdog(activity: Arc<Activity>, watch: Watch) -> Expiry {
    let tick =
        Duration::from_nanos((watch.send_timeout.as_nanos() as u64).div_ceil(u64::from(SAMPLES)));
    let tick = tick.max(Duration::from_millis(1));
    let mut next_sample = Instant::now() + tick;
    let mut io = Sample::new();
    let sleep = tokio::time::sleep_until(next_sample.into());
    tokio::pin!(sleep);
    loop {
        let mut due = next_sample;
        if let Some(limit) = watch.idle {
            // Busy now, it can be idle for `limit` no sooner than `limit` from now.
            let idle_at = if activity.in_flight() == 0 {
                activity.idle_since() + limit
            } else {
                Instant::now() + limit
            };
            due = due.min(idle_at);
        }
        if let Some(at) = watch.linger_until {
            due = due.min(at);
        }
        sleep.as_mut().reset(due.into());
        let evictable = watch.idle.is_some();
        let evicted = std::future::poll_fn(|cx| {
            if evictable {
                activity.evict_waker.register(cx.waker());
                if activity.is_evicted() {
                    return Poll::Ready(true);
                }
            }
            sleep.as_mut().poll(cx).map(|()| false)
        })
        .await;
        if evicted {
            return Expiry::Evicted;
        }
        let now = Instant::now();
        if now >= next_sample {
            next_sample = now + tick;
            if io.stalled(activity.writes.load(Ordering::Relaxed)) {
                return Expiry::SendTimeout;
            }
            if !activity.sample_streams(&watch.streams_reset) {
                return Expiry::SendTimeout;
            }
        }
        let idle = activity.in_flight() == 0;
        if let Some(limit) = watch.idle {
            if idle && now.saturating_duration_since(activity.idle_since()) >= limit {
                return Expiry::Idle;
            }
        }
        if watch.linger_until.is_some_and(|at| now >= at) && idle {
            return Expiry::Lingered;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_is_one_unchanged_and_waiting_for_every_sample() {
        let mut s = Sample::new();
        let blocked = (3 << 1) | 1;
        assert!(!s.stalled(blocked), "first seen");
        for _ in 1..SAMPLES {
            assert!(!s.stalled(blocked));
        }
        assert!(s.stalled(blocked), "unchanged for SAMPLES samples");

        let mut s = Sample::new();
        for i in 0..10u64 {
            assert!(!s.stalled((i << 1) | 1), "progress between samples");
        }
        let mut s = Sample::new();
        for _ in 0..10 {
            assert!(!s.stalled(4 << 1), "not waiting");
        }
    }

    #[test]
    fn eviction_picks_the_longest_idle_and_skips_busy_ones() {
        let table = Arc::new(Connections::default());
        let conns: Vec<_> = (0..20).map(|_| table.open()).collect();
        for (i, c) in conns.iter().enumerate() {
            // Idle since 1000 - i ms: the last one opened has been idle longest.
            c.activity
                .idle_since_ms
                .store(1000 - i as u64, Ordering::Relaxed);
        }
        let busy = RequestActive::new(&conns[19].activity);
        assert_eq!(table.evict_idle(), 2, "an eighth of the 19 idle ones");
        let picked: Vec<_> = (0..20)
            .filter(|&i| conns[i].activity.is_evicted())
            .collect();
        assert_eq!(picked, [17, 18], "the longest idle, not the busy one");
        assert_eq!(table.evict_idle(), 0, "none more while those close");
        drop(conns);
        drop(busy);
        assert!(table.lock().is_empty());
    }
}
