//! Listeners and connections: accept loops, TLS handshakes inside each connection's task,
//! HTTP/1.1 and h2 serving, the admin listener, and graceful drain. What bounds a slow or
//! stuck client (the send timeout, eviction at `max_connections`) is in
//! [`crate::conn_guard`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::task::AtomicWaker;
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::{IntCounter, IntGauge, Registry};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Limits, ListenerKind, ListenerSpec};
use crate::conn_guard::{
    self, Connections, Expiry, Registered, RequestActive, StreamExecutor, Watch, WatchedBody,
    WatchedIo,
};
use crate::loader::{with_record, Loader};
use crate::metrics::{Metrics, MetricsError};
use crate::plugin::PluginError;
use crate::proxy::{self, ConnInfo, Shared};
pub use crate::reload::ReloadError;
use crate::scoring::serving::ModelSlot;
use crate::tls::TlsError;
use crate::upgrade::{HandOver, Inherited, UpgradeError};
use gateway_admin::ReloadReport;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener's address could not be bound.
    #[error("listener {name:?}: cannot bind {addr}: {source}")]
    Bind {
        /// Listener name (`admin` for the admin listener).
        name: String,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS configuration was refused.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Metrics could not be registered.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// A plugin could not be loaded.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The artifact store could not be read.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A plugin or model from a registry could not be pulled, with nothing pulled before.
    #[error(transparent)]
    Oci(#[from] gateway_oci::SourceError),
    /// A model could not be loaded, or no device could be had for it.
    #[error("model {name:?}: {message}")]
    Model {
        /// Model name (`*` for the device).
        name: String,
        /// What went wrong.
        message: String,
    },
}

/// How the drain at shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every connection finished within the deadline.
    Complete,
    /// The deadline passed with connections still open; they were dropped.
    DeadlineExceeded,
}

pub(crate) struct ServeCtx {
    pub(crate) shared: Arc<Shared>,
    /// Serializes every change of what serves: reloads (admin API, SIGHUP, file watcher,
    /// [`Gateway::reload`]), uploads and rollbacks. Each reads the configuration and the
    /// store's record of active versions only while holding it. It holds the configuration
    /// as last read (the file's, or the one given), before that record is applied.
    pub(crate) reload_lock: tokio::sync::Mutex<Config>,
    /// The file `reload_from_file` reads, when the gateway was started from one.
    pub(crate) config_path: std::sync::Mutex<Option<std::path::PathBuf>>,
    /// Outcome of the last reload.
    pub(crate) last_reload: std::sync::Mutex<Option<ReloadReport>>,
    /// When the admin API accepted its uploads of the last minute (its rate limit).
    pub(crate) recent_uploads: std::sync::Mutex<std::collections::VecDeque<Instant>>,
    pub(crate) reloads: prometheus::IntCounterVec,
    pub(crate) reloads_ok: prometheus::IntCounter,
    /// Builds each configuration (at start and on every change).
    pub(crate) loader: Loader,
    /// The audit trail of management actions.
    pub(crate) audit: crate::audit::Audit,
    /// The sampler's recent series and when versions went live (the status page).
    pub(crate) observed: crate::monitor::Observed,
    pub(crate) tls: ArcSwap<rustls::ServerConfig>,
    limits: Limits,
    connections: Arc<Semaphore>,
    /// Every open connection, for eviction when `connections` has no place left.
    open: Arc<Connections>,
    pub(crate) shutdown: CancellationToken,
    /// Set when the drain starts, before `shutdown` is cancelled: `/readyz` answers 503, and
    /// every HTTP/1.1 response from then on says `connection: close`.
    pub(crate) draining: Arc<AtomicBool>,
    tracker: TaskTracker,
    auto: auto::Builder<StreamExecutor>,
    h1: auto::Builder<StreamExecutor>,
    h2: auto::Builder<StreamExecutor>,
}

/// A running gateway: its listeners are bound and serving.
pub struct Gateway {
    ctx: Arc<ServeCtx>,
    listeners: Vec<(String, SocketAddr)>,
    admin_addr: SocketAddr,
    admin_shutdown: CancellationToken,
    drain_timeout: Duration,
    /// A duplicate of every listening socket, the admin listener's included, for an upgrade
    /// to hand over; closed when the drain starts, so that a stopped gateway refuses
    /// connections instead of leaving them queued.
    hand_over: Vec<HandOver>,
    /// Set while an upgrade runs, and for good once one succeeded.
    upgrading: AtomicBool,
    /// `gateway_upgrades_total{outcome}`.
    upgrades: prometheus::IntCounterVec,
}

impl Gateway {
    /// Binds every listener (nothing serves unless all bind), then starts serving.
    pub async fn start(config: Config, registry: Registry) -> Result<Gateway, StartError> {
        Gateway::start_inheriting(config, registry, &mut Inherited::none()).await
    }

    /// Like [`Gateway::start`], but a listener (or the admin listener) with a socket in
    /// `inherited` for its name and configured address serves that socket instead of binding
    /// one: the new process of an upgrade ([`crate::upgrade`]). Sockets left in `inherited`
    /// are not used; dropping it closes them.
    pub async fn start_inheriting(
        config: Config,
        registry: Registry,
        inherited: &mut Inherited,
    ) -> Result<Gateway, StartError> {
        let upgrades = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "gateway_upgrades_total",
                "Upgrades by listener hand-over: handed_over (this process started a new one that took over), failed (the new one did not get ready; this one serves on), took_over (this process took over from an old one).",
            ),
            &["outcome"],
        )
        .map_err(MetricsError::from)?;
        registry
            .register(Box::new(upgrades.clone()))
            .map_err(MetricsError::from)?;
        let base = config.clone();
        // Uploaded versions that were active before a restart are active again.
        let mut config = with_record(config).await?;
        let metrics = Metrics::new(&registry)?;
        let loader = Loader::new(registry.clone());
        loader.oci.resolve(&mut config, true).await?;
        let built = loader.build(config, &metrics, None, None).await?;
        loader.oci.commit(&built.snapshot.config).await;
        let config = built.snapshot.config.clone();
        let mut bound = Vec::new();
        let mut hand_over = Vec::new();
        for spec in &config.listeners {
            let listener = listen(inherited, &spec.name, spec.bind, &mut hand_over).await?;
            bound.push((spec.clone(), listener));
        }
        let admin_listener = listen(
            inherited,
            crate::upgrade::ADMIN_KEY,
            config.admin.bind,
            &mut hand_over,
        )
        .await?;
        let admin_addr = admin_listener
            .local_addr()
            .expect("bound socket has an address");

        let limits = config.limits.clone();
        let drain_timeout = config.server.drain_timeout;
        let admission = Arc::new(
            gateway_proxy::admission::Admission::new(&registry).map_err(MetricsError::from)?,
        );
        crate::process_metrics::register(&registry, tokio::runtime::Handle::current())
            .map_err(MetricsError::from)?;
        let observed = crate::monitor::Observed::new(&built.snapshot);
        let shared = Arc::new(Shared {
            state: ArcSwap::from_pointee(built.snapshot),
            metrics,
            admission,
        });
        let reloads = prometheus::IntCounterVec::new(
            prometheus::Opts::new("gateway_reload_failures_total", "Configuration reloads that failed and left the old state serving, by kind (config, tls, plugin, model, store)."),
            &["kind"],
        )
        .map_err(MetricsError::from)?;
        registry
            .register(Box::new(reloads.clone()))
            .map_err(MetricsError::from)?;
        let reloads_ok =
            prometheus::IntCounter::new("gateway_reloads_total", "Configuration reloads applied.")
                .map_err(MetricsError::from)?;
        registry
            .register(Box::new(reloads_ok.clone()))
            .map_err(MetricsError::from)?;
        let ctx = Arc::new(ServeCtx {
            shared,
            reload_lock: tokio::sync::Mutex::new(base),
            config_path: std::sync::Mutex::new(None),
            last_reload: std::sync::Mutex::new(None),
            recent_uploads: std::sync::Mutex::new(std::collections::VecDeque::new()),
            reloads,
            reloads_ok,
            loader,
            audit: crate::audit::Audit::default(),
            observed,
            tls: ArcSwap::new(built.tls),
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            open: Arc::default(),
            shutdown: CancellationToken::new(),
            draining: Arc::new(AtomicBool::new(false)),
            tracker: TaskTracker::new(),
            auto: http_builder(&limits, true),
            h1: http_builder(&limits, false).http1_only(),
            h2: http_builder(&limits, false).http2_only(),
            limits,
        });

        let mut listeners = Vec::new();
        for (spec, listener) in bound {
            let addr = listener.local_addr().expect("bound socket has an address");
            tracing::info!(listener = %spec.name, %addr, kind = ?spec.kind, "listening");
            listeners.push((spec.name.clone(), addr));
            tokio::spawn(accept_loop(ctx.clone(), listener, spec));
        }
        tokio::spawn(crate::rollouts::run(ctx.clone()));
        tokio::spawn(crate::oci::run(ctx.clone()));
        tokio::spawn({
            let shared = ctx.shared.clone();
            gateway_proxy::admission::sample(
                shared.admission.clone(),
                move || shared.state.load().config.limits.max_queue_time,
                ctx.shutdown.clone().cancelled_owned(),
            )
        });
        let anomaly = crate::monitor::gauge(&registry).map_err(MetricsError::from)?;
        tokio::spawn(crate::monitor::run(ctx.clone(), anomaly));
        let admin_shutdown = CancellationToken::new();
        tracing::info!(addr = %admin_addr, "admin listening");
        tokio::spawn(crate::admin::serve(
            admin_listener,
            registry,
            ctx.clone(),
            ctx.draining.clone(),
            admin_shutdown.clone(),
        ));
        if let Some(parent) = inherited.parent() {
            upgrades.with_label_values(&["took_over"]).inc();
            tracing::info!(
                from_pid = parent,
                "upgrade: serving on the sockets of the old process"
            );
        }
        Ok(Gateway {
            ctx,
            listeners,
            admin_addr,
            admin_shutdown,
            drain_timeout,
            hand_over,
            upgrading: AtomicBool::new(false),
            upgrades,
        })
    }

    /// The bound address of a listener, by name.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    /// Every listener's name and bound address.
    pub fn listeners(&self) -> &[(String, SocketAddr)] {
        &self.listeners
    }

    /// A served model's slot, by name (for swaps and rollbacks).
    pub fn model(&self, name: &str) -> Option<Arc<ModelSlot>> {
        self.ctx.shared.state.load().models.get(name).cloned()
    }

    /// The admin listener's bound address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The configuration being served.
    pub fn config(&self) -> Arc<Config> {
        self.ctx.shared.state.load().config.clone()
    }

    /// Replaces routes, upstreams, plugins and certificates with those of `config`; listeners
    /// and limits stay as started. As at start, a plugin or model with uploads serves the
    /// version the store records as active. Everything new is built (plugins compiled and
    /// their instances started) before anything is swapped; on error nothing changes.
    pub async fn reload(&self, config: Config) -> Result<(), StartError> {
        self.ctx.reload(config).await
    }

    /// Remembers the file the configuration came from, for [`Gateway::reload_from_file`],
    /// the admin API and SIGHUP.
    pub fn set_config_path(&self, path: &std::path::Path) {
        *self.ctx.config_path.lock().expect("config path lock") = Some(path.to_path_buf());
    }

    /// Watches the config file (set with [`Gateway::set_config_path`]) and the files it names,
    /// reloading after `debounce` of quiet whenever their content changes.
    pub fn watch_config(
        &self,
        debounce: Duration,
    ) -> Result<crate::watch::FileWatch, crate::watch::WatchError> {
        let path = self
            .ctx
            .config_path
            .lock()
            .expect("config path lock")
            .clone()
            .ok_or_else(|| {
                crate::watch::WatchError::from(notify::Error::generic("no config file to watch"))
            })?;
        crate::watch::start(self.ctx.clone(), path, debounce)
    }

    /// Reads the configuration file again and applies it (as asked by SIGHUP: the audit trail
    /// says so); on any error the serving state is untouched, and the error is logged,
    /// counted and kept for the admin API.
    pub async fn reload_from_file(&self) -> Result<(), ReloadError> {
        self.ctx.reload_from_file("sighup").await
    }

    /// Starts the binary `successor` names as this gateway's successor, handing it every
    /// listening socket, and waits until it serves (or fails to): the first half of an
    /// upgrade ([`crate::upgrade`]). On success, returns the new process's pid: this gateway
    /// must then [`Gateway::hand_over`]. On error the new process is gone and this gateway
    /// serves on as before.
    ///
    /// Holds the reload lock from before the new process reads the configuration and the
    /// store until this gateway exits (on success) or the upgrade fails: a reload, upload or
    /// rollback is either applied before the new process starts (so it starts with it) or
    /// waits; one that is still waiting when this gateway hands over is never applied here,
    /// and its admin connection closes without an answer when this process exits.
    pub async fn upgrade(
        &self,
        successor: &crate::upgrade::Successor,
    ) -> Result<u32, UpgradeError> {
        if self.upgrading.swap(true, Ordering::SeqCst) {
            return Err(UpgradeError::InProgress);
        }
        let lock = self.ctx.reload_lock.lock().await;
        match crate::upgrade::start_successor(&self.hand_over, successor).await {
            Ok(pid) => {
                // This process is leaving: nothing may change what it serves any more.
                std::mem::forget(lock);
                self.upgrades.with_label_values(&["handed_over"]).inc();
                Ok(pid)
            }
            Err(e) => {
                drop(lock);
                self.upgrading.store(false, Ordering::SeqCst);
                self.upgrades.with_label_values(&["failed"]).inc();
                Err(e)
            }
        }
    }

    /// Drains after a successful [`Gateway::upgrade`]: as [`Gateway::shutdown`], except that
    /// the admin listener stops accepting at once (the new process answers `/readyz` and the
    /// admin API on the same socket).
    pub async fn hand_over(self) -> DrainOutcome {
        self.admin_shutdown.cancel();
        self.shutdown().await
    }

    /// Stops accepting, lets in-flight requests finish until the drain deadline, then stops
    /// the admin listener. `/readyz` answers 503 from the first moment. HTTP/1.1 responses
    /// from then on carry `connection: close` and the connection closes after them; an
    /// HTTP/1.1 connection with nothing in flight for [`DRAIN_IDLE`] is closed; h2
    /// connections get a GOAWAY and finish their streams.
    pub async fn shutdown(mut self) -> DrainOutcome {
        // Before the accept loops stop: once they have, no descriptor may keep the sockets
        // open (connections would queue where nobody accepts them).
        self.hand_over.clear();
        self.ctx.draining.store(true, Ordering::SeqCst);
        tracing::info!(
            deadline_ms = self.drain_timeout.as_millis() as u64,
            "draining"
        );
        self.ctx.shutdown.cancel();
        self.ctx.tracker.close();
        let outcome = match tokio::time::timeout(self.drain_timeout, self.ctx.tracker.wait()).await
        {
            Ok(()) => DrainOutcome::Complete,
            Err(_) => {
                tracing::warn!(
                    open = self.ctx.tracker.len(),
                    "drain deadline passed with connections open"
                );
                DrainOutcome::DeadlineExceeded
            }
        };
        self.admin_shutdown.cancel();
        outcome
    }
}

/// While draining, how long an HTTP/1.1 connection may go with nothing in flight before it is
/// closed (or its idle limit, when shorter). Closing one at once would race the request its
/// client may be sending right then, which the client would see as a reset or an unanswered
/// request; waiting this long lets that request in, and it is answered with
/// `connection: close`. A client quiet for this long is not in the middle of anything.
pub const DRAIN_IDLE: Duration = Duration::from_secs(1);

/// Binds `bind` for listener `name`, or takes the socket `inherited` has for it, and keeps a
/// duplicate of it in `hand_over` for a later upgrade.
async fn listen(
    inherited: &mut Inherited,
    name: &str,
    bind: SocketAddr,
    hand_over: &mut Vec<HandOver>,
) -> Result<TcpListener, StartError> {
    let error = |source| StartError::Bind {
        name: name.trim_start_matches('@').to_string(),
        addr: bind,
        source,
    };
    let listener = match inherited.take(name, bind) {
        Some(socket) => TcpListener::from_std(socket).map_err(error)?,
        None => TcpListener::bind(bind).await.map_err(error)?,
    };
    let fd = std::os::fd::AsFd::as_fd(&listener)
        .try_clone_to_owned()
        .map_err(error)?;
    hand_over.push(HandOver {
        name: name.to_string(),
        bind,
        fd,
    });
    Ok(listener)
}

/// `hyper_head_timer`: hyper enforces the HTTP/1.1 header read timeout. Without it the
/// connection's watchdog must (see [`Connection::serve_http`]); hyper's timer costs a timer
/// registration and removal per request, about 2% of a proxied request's instructions.
fn http_builder(limits: &Limits, hyper_head_timer: bool) -> auto::Builder<StreamExecutor> {
    let mut b = auto::Builder::new(StreamExecutor);
    if hyper_head_timer {
        b.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout);
    } else {
        b.http1().header_read_timeout(None);
    }
    b.http1()
        .max_buf_size(limits.max_header_bytes)
        // One flat buffer per write: behind TLS this makes one record instead of one per
        // slice, which measured faster than vectored writes.
        .writev(false)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes.min(u32::MAX as usize) as u32)
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

async fn accept_loop(ctx: Arc<ServeCtx>, listener: TcpListener, spec: ListenerSpec) {
    let (kind, reject_misdirected) = (spec.kind, spec.reject_misdirected);
    let name: Arc<str> = spec.name.into();
    let metrics = &ctx.shared.metrics;
    let active = metrics.active_connections.with_label_values(&[&*name]);
    let accepted = metrics.connections.with_label_values(&[&*name]);
    let handshake_failures = metrics.tls_handshake_failures.with_label_values(&[&*name]);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = ctx.shutdown.cancelled() => break,
        };
        let permit = match ctx.connections.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => match make_room(&ctx).await {
                Some(p) => p,
                None => break,
            },
        };
        let _ = stream.set_nodelay(true);
        accepted.inc();
        let conn = Connection {
            ctx: ctx.clone(),
            active: ActiveGuard::new(active.clone()),
            handshake_failures: handshake_failures.clone(),
            listener: name.clone(),
            reject_misdirected,
            registered: ctx.open.open(),
            _permit: permit,
        };
        ctx.tracker.spawn(conn.serve(stream, peer, kind));
    }
    tracing::info!(listener = %name, "stopped accepting");
}

/// How often a client accepted at `max_connections` asks again for idle connections to close
/// while it waits for a place.
const EVICTION_RETRY: Duration = Duration::from_millis(100);

/// Waits for a place for a client accepted while every place is taken, asking the
/// longest-idle connections to close meanwhile; `None` on shutdown. While it waits, clients
/// behind it wait in the accept backlog.
async fn make_room(ctx: &ServeCtx) -> Option<tokio::sync::OwnedSemaphorePermit> {
    loop {
        let asked = ctx.open.evict_idle();
        if asked > 0 {
            tracing::debug!(
                asked,
                "max_connections reached: closing the longest-idle connections"
            );
        }
        tokio::select! {
            p = ctx.connections.clone().acquire_owned() => {
                return Some(p.expect("semaphore is never closed"));
            }
            _ = tokio::time::sleep(EVICTION_RETRY) => {}
            _ = ctx.shutdown.cancelled() => return None,
        }
    }
}

struct ActiveGuard(IntGauge);

impl ActiveGuard {
    fn new(g: IntGauge) -> Self {
        g.inc();
        ActiveGuard(g)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What a connection speaks, as far as serving it differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Speaks {
    /// HTTP/1.1 (negotiated by ALPN, or by its absence).
    Http1,
    /// h2 (negotiated by ALPN).
    Http2,
    /// Plain HTTP: hyper tells HTTP/1.1 from h2c by the first bytes.
    Either,
}

struct Connection {
    ctx: Arc<ServeCtx>,
    active: ActiveGuard,
    handshake_failures: IntCounter,
    listener: Arc<str>,
    /// The listener's `reject_misdirected`.
    reject_misdirected: bool,
    /// Its place in the list of open connections.
    registered: Registered,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Sets a flag and wakes the task that polls an [`OnWake`].
struct WakeFlag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Polls `F` on its first poll and then only after `F`'s own waker fired, instead of on
/// every wake-up of the task that owns it. A connection task wakes for every read and write
/// while its watchdog (a shutdown token and a timer, each polled under a lock or a timer check)
/// is woken about never; polling it each time cost about 1.5% of a proxied request.
struct OnWake<F> {
    fut: Pin<Box<F>>,
    flag: Arc<WakeFlag>,
    waker: Waker,
}

impl<F: Future> OnWake<F> {
    fn new(fut: F) -> Self {
        let flag = Arc::new(WakeFlag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        OnWake {
            fut: Box::pin(fut),
            waker: Waker::from(flag.clone()),
            flag,
        }
    }
}

impl<F: Future> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.fut
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

/// A client's address as logs show it: its pseudonym unless `[privacy]` keeps addresses.
/// Computed only when the log line is written.
struct Shown<'a>(&'a Shared, SocketAddr);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.0.state.load();
        f.write_str(&state.privacy.client(self.1.ip().to_canonical()))
    }
}

impl Connection {
    async fn serve(self, stream: TcpStream, peer: SocketAddr, kind: ListenerKind) {
        match kind {
            ListenerKind::Https => {
                let acceptor = tokio_rustls::TlsAcceptor::from(self.ctx.tls.load_full());
                let handshake = tokio::time::timeout(
                    self.ctx.limits.header_read_timeout,
                    acceptor.accept(stream),
                );
                // Not abandoned when a drain starts: a client whose connection was accepted
                // before it did nothing wrong, and closing it mid-handshake resets it. It is
                // served like any connection of the drain (`connection: close`, or a GOAWAY).
                // A handshake still unfinished DRAIN_IDLE after the drain started is closed,
                // as an idle HTTP/1.1 connection is: a silent client does not hold the drain.
                let drain_idle = async {
                    self.ctx.shutdown.cancelled().await;
                    tokio::time::sleep(DRAIN_IDLE).await;
                };
                let tls_stream = tokio::select! {
                    r = handshake => match r {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            self.handshake_failures.inc();
                            tracing::debug!(listener = %self.listener, peer = %Shown(&self.ctx.shared, peer), error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            self.handshake_failures.inc();
                            tracing::debug!(listener = %self.listener, peer = %Shown(&self.ctx.shared, peer), "TLS handshake timed out");
                            return;
                        }
                    },
                    () = drain_idle => return,
                    () = self.registered.activity.evicted() => {
                        self.closed("evicted").inc();
                        tracing::debug!(listener = %self.listener, peer = %Shown(&self.ctx.shared, peer), "closing a connection still in its TLS handshake to make room");
                        return;
                    }
                };
                let (builder, speaks) = if tls_stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                    (&self.ctx.h2, Speaks::Http2)
                } else {
                    (&self.ctx.h1, Speaks::Http1)
                };
                let cert_names = self.reject_misdirected.then(|| {
                    let sni = tls_stream.get_ref().1.server_name();
                    let state = self.ctx.shared.state.load();
                    crate::tls::chosen_names(&state.config.certificates, sni)
                        .map(Into::into)
                        .unwrap_or_default()
                });
                let info = ConnInfo::new(peer, "https", cert_names);
                self.serve_http(builder, TokioIo::new(tls_stream), info, None, speaks)
                    .await;
            }
            ListenerKind::HttpServe => {
                let info = ConnInfo::new(peer, "http", None);
                self.serve_http(
                    &self.ctx.auto,
                    TokioIo::new(stream),
                    info,
                    None,
                    Speaks::Either,
                )
                .await;
            }
            ListenerKind::HttpRedirect { https_port } => {
                let info = ConnInfo::new(peer, "http", None);
                self.serve_http(
                    &self.ctx.auto,
                    TokioIo::new(stream),
                    info,
                    Some(https_port),
                    Speaks::Either,
                )
                .await;
            }
        }
        drop(self.active);
    }

    /// `gateway_connections_closed_total` of this connection's listener, for `reason`.
    fn closed(&self, reason: &str) -> IntCounter {
        self.ctx
            .shared
            .metrics
            .connections_closed
            .with_label_values(&[&*self.listener, reason])
    }

    /// Serves one connection. On h2 requests are answered by a boxed future, because hyper
    /// spawns a task per h2 stream and moves the request future into it and out of it
    /// (a pointer instead of ~3 KB; on HTTP/1.1 hyper already boxes it, so there it is not).
    ///
    /// A watchdog ends the connection after `idle_timeout` with no request in flight, and on
    /// shutdown. On `Speaks::Http1` it also enforces the header read timeout, which hyper's
    /// HTTP/1.1 server applies from the moment it waits for a head (the end of the previous
    /// response, or the connection's start) to the head's last byte: with no request in flight
    /// for the shorter of the two limits, the connection is closed. It closes the connection
    /// when the client takes nothing for `send_timeout`, resets h2 streams whose window stays
    /// shut that long, and closes the connection when it is evicted ([`crate::conn_guard`]).
    async fn serve_http<I>(
        &self,
        builder: &auto::Builder<StreamExecutor>,
        io: I,
        info: ConnInfo,
        redirect_port: Option<u16>,
        speaks: Speaks,
    ) where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let activity = self.registered.activity.clone();
        activity.ready();
        let io = WatchedIo::new(io, activity.clone());
        let shared = self.ctx.shared.clone();
        let peer = info.peer;
        let info = Arc::new(info);
        let service_activity = activity.clone();
        let draining = self.ctx.draining.clone();
        let answer = move |req: Request<Incoming>| {
            let guard = RequestActive::new(&service_activity);
            let h2 = req.version() == http::Version::HTTP_2;
            let stream = h2.then(|| service_activity.open_stream());
            let shared = shared.clone();
            let info = info.clone();
            let draining = draining.clone();
            async move {
                let mut resp = match redirect_port {
                    Some(port) => proxy::redirect(&req, port),
                    None => proxy::handle(&shared, &info, req).await,
                };
                // Read when the head is ready, so a response to a request that was in flight
                // when the drain started says it too: hyper then closes the connection after
                // it, and the client opens its next one where someone accepts.
                if !h2 && draining.load(Ordering::Relaxed) {
                    resp.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, Infallible>(resp.map(|b| WatchedBody::new(b, guard, stream)))
            }
        };
        let limits = &self.ctx.limits;
        let limit = match speaks {
            Speaks::Http1 => limits.idle_timeout.min(limits.header_read_timeout),
            Speaks::Http2 | Speaks::Either => limits.idle_timeout,
        };
        let metrics = &self.ctx.shared.metrics;
        let send_timeouts = metrics.rejected.with_label_values(&["send_timeout"]);
        let watch = |idle: Option<Duration>, linger_until: Option<Instant>| Watch {
            idle,
            send_timeout: limits.send_timeout,
            linger_until,
            streams_reset: send_timeouts.clone(),
        };
        let mut watchdog = OnWake::new(guard(
            activity.clone(),
            watch(Some(limit), None),
            Some(self.ctx.shutdown.clone()),
        ));
        // The same loop over two connection types (the services differ in their future).
        macro_rules! drive {
            ($conn:expr) => {{
                let conn = $conn;
                tokio::pin!(conn);
                loop {
                    tokio::select! {
                        biased;
                        res = conn.as_mut() => {
                            if let Err(e) = res {
                                tracing::debug!(listener = %self.listener, peer = %Shown(&self.ctx.shared, peer), error = %e, "connection ended with an error");
                            }
                            break;
                        }
                        why = &mut watchdog => match why {
                            Expiry::SendTimeout => {
                                let cut = activity.in_flight();
                                tracing::debug!(listener = %self.listener, peer = %Shown(&self.ctx.shared, peer), responses = cut, "closing a connection whose client took nothing for the send timeout");
                                self.closed("send_timeout").inc();
                                send_timeouts.inc_by(cut as u64);
                                break;
                            }
                            Expiry::Lingered => break,
                            // An HTTP/1.1 connection with no request in flight is idle or has
                            // an incomplete head; hyper's graceful shutdown would leave a first
                            // request's partial head waiting, so close it outright.
                            Expiry::Idle if speaks == Speaks::Http1 => {
                                tracing::debug!(listener = %self.listener, peer = %Shown(&self.ctx.shared, peer), "closing an idle HTTP/1.1 connection or one with a slow request head");
                                break;
                            }
                            Expiry::Evicted => {
                                self.closed("evicted").inc();
                                tracing::debug!(listener = %self.listener, peer = %Shown(&self.ctx.shared, peer), "closing an idle connection to make room");
                                if speaks == Speaks::Http1
                                    && !activity.served_any()
                                    && activity.in_flight() == 0
                                {
                                    break;
                                }
                                conn.as_mut().graceful_shutdown();
                                let linger = Instant::now() + conn_guard::EVICTION_GRACE;
                                watchdog = OnWake::new(guard(activity.clone(), watch(None, Some(linger)), None));
                            }
                            // hyper's graceful shutdown closes an HTTP/1.1 connection at once when
                            // no request is in flight, racing the one its client may be sending,
                            // and ends one whose response head is already out without telling
                            // the client. So it serves on: its next response says
                            // `connection: close`, and it is closed after DRAIN_IDLE idle. A
                            // plain-HTTP connection is treated so until it opened an h2 stream.
                            Expiry::Shutdown
                                if speaks == Speaks::Http1
                                    || (speaks == Speaks::Either && !activity.spoke_h2()) =>
                            {
                                watchdog = OnWake::new(guard(activity.clone(), watch(Some(limit.min(DRAIN_IDLE)), None), None));
                            }
                            Expiry::Shutdown | Expiry::Idle => {
                                conn.as_mut().graceful_shutdown();
                                watchdog = OnWake::new(guard(activity.clone(), watch(None, None), None));
                            }
                        },
                    }
                }
            }};
        }
        if speaks == Speaks::Http2 {
            drive!(builder.serve_connection(io, service_fn(move |req| Box::pin(answer(req)))))
        } else {
            drive!(builder.serve_connection(io, service_fn(answer)))
        }
    }
}

/// A connection's watchdog ([`conn_guard::watchdog`]), which also ends it on shutdown while
/// `shutdown` is given (until the connection starts closing).
async fn guard(
    activity: Arc<conn_guard::Activity>,
    watch: Watch,
    shutdown: Option<CancellationToken>,
) -> Expiry {
    match shutdown {
        Some(token) => tokio::select! {
            _ = token.cancelled() => Expiry::Shutdown,
            e = conn_guard::watchdog(activity, watch) => e,
        },
        None => conn_guard::watchdog(activity, watch).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    /// Pending until released; counts its polls and keeps the last waker it was given.
    struct Probe {
        polls: Arc<AtomicUsize>,
        waker: Arc<Mutex<Option<Waker>>>,
        ready: Arc<AtomicBool>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.ready.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    /// Counts wake-ups of the task that polls the `OnWake`.
    struct CountWakes(AtomicUsize);

    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn on_wake_polls_its_future_only_after_the_future_asked_for_it() {
        let polls = Arc::new(AtomicUsize::new(0));
        let inner_waker = Arc::new(Mutex::new(None));
        let ready = Arc::new(AtomicBool::new(false));
        let mut fut = OnWake::new(Probe {
            polls: polls.clone(),
            waker: inner_waker.clone(),
            ready: ready.clone(),
        });
        let outer = Arc::new(CountWakes(AtomicUsize::new(0)));
        let outer_waker = Waker::from(outer.clone());
        let mut cx = Context::from_waker(&outer_waker);

        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        assert_eq!(
            polls.load(Ordering::SeqCst),
            1,
            "the first poll reaches the future"
        );
        for _ in 0..5 {
            assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "other wake-ups do not");

        ready.store(true, Ordering::SeqCst);
        inner_waker.lock().unwrap().take().unwrap().wake();
        assert_eq!(
            outer.0.load(Ordering::SeqCst),
            1,
            "its own wake-up wakes the task"
        );
        assert!(Pin::new(&mut fut).poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }
}
