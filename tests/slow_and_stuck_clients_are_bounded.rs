//! Slow and stuck clients hold nothing for long, and normal clients are served meanwhile:
//! - HTTP/1.1 clients that read 1 KB of a large response and stop are closed after
//!   `send_timeout_ms`, and the upstream side is released; a slow reader that keeps reading
//!   gets its whole response.
//! - h2 streams whose flow-control window stays shut are reset after `send_timeout_ms` (the
//!   connection serves on), and an h2 client that stops reading its socket is closed.
//! - A body trickled just fast enough to never stall gets 408 after `body_deadline_ms` on a
//!   route whose plugins read bodies and on the scoring endpoint; the part of a body past
//!   what the gateway buffers is not held to it.
//! - At `max_connections`, the longest-idle connections make room for a new client, busy ones
//!   are left alone.
//!
//! Each test prints what it measured (`--nocapture`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// Size of the large response: more than the kernel buffers of a loopback connection hold, so
/// a client that stops reading blocks the gateway's writes.
const BIG: usize = 16 << 20;

/// An upstream answering `/big` with [`BIG`] bytes in 64 KiB chunks, `/slow` after 2 s,
/// `/empty` with no body and anything else with `small`; it counts its open connections that
/// were asked for `/big` (the upstream side a stuck client holds: the gateway closes an
/// upstream connection whose answer it dropped half-read).
struct BigUpstream {
    addr: SocketAddr,
    counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

/// Upstream connections asked for `/big`: open now, and ever.
#[derive(Default)]
struct Counts {
    held: AtomicUsize,
    ever: AtomicUsize,
}

/// Counts an upstream connection from its first `/big` request until it closes.
struct Held(Arc<Counts>, AtomicBool);

impl Held {
    fn mark(&self) {
        if !self.1.swap(true, Ordering::SeqCst) {
            self.0.held.fetch_add(1, Ordering::SeqCst);
            self.0.ever.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if *self.1.get_mut() {
            self.0.held.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for BigUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BigUpstream {
    async fn start() -> BigUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(Counts::default());
        let counter = counts.clone();
        let task = tokio::spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let builder = builder.clone();
                let conn = Arc::new(Held(counter.clone(), AtomicBool::new(false)));
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let conn = conn.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let _ = req.into_body().collect().await;
                            let body = match path.as_str() {
                                "/big" => {
                                    conn.mark();
                                    Chunks { left: BIG }.boxed()
                                }
                                "/slow" => {
                                    tokio::time::sleep(Duration::from_secs(2)).await;
                                    Full::new(Bytes::from_static(b"slow")).boxed()
                                }
                                "/empty" => Full::new(Bytes::new()).boxed(),
                                _ => Full::new(Bytes::from_static(b"small")).boxed(),
                            };
                            Ok::<_, std::convert::Infallible>(Response::new(body))
                        }
                    });
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        BigUpstream { addr, counts, task }
    }

    fn held(&self) -> usize {
        self.counts.held.load(Ordering::SeqCst)
    }

    fn ever(&self) -> usize {
        self.counts.ever.load(Ordering::SeqCst)
    }
}

/// `left` bytes in 64 KiB chunks.
struct Chunks {
    left: usize,
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        static CHUNK: [u8; 64 << 10] = [b'x'; 64 << 10];
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(CHUNK.len());
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&CHUNK[..n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
}

/// A gateway in front of `up` with `limits` as its `[limits]` table.
async fn gateway(pki: &Pki, up: &BigUpstream, limits: &str) -> TestGateway {
    TestGateway::start(
        &basic_config(
            pki,
            &[up.addr],
            "",
            &format!("[limits]\nmax_queue_time_ms = 0\n{limits}"),
        ),
        pki.path(),
    )
    .await
}

/// Normal clients, one after another on fresh connections (h1 and h2 in turn), until
/// `stop`: how many were answered 200 and the slowest answer.
fn normal_clients(
    addr: SocketAddr,
    pki: &Pki,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Duration)> {
    let ca = pki.ca_der.clone();
    tokio::spawn(async move {
        let (mut ok, mut slowest) = (0, Duration::ZERO);
        let mut h2 = false;
        while !stop.load(Ordering::SeqCst) {
            let started = Instant::now();
            let r = fetch(addr, &ca, h2, get("localhost", "/small")).await;
            assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "small"));
            ok += 1;
            slowest = slowest.max(started.elapsed());
            h2 = !h2;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (ok, slowest)
    })
}

/// Polls `cond` every 10 ms until it holds or `limit` passes; how long it took, if it did.
async fn within(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if cond() {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond().then(|| started.elapsed())
}

#[tokio::test]
async fn http1_clients_that_stop_reading_are_closed_and_release_the_upstream() {
    const STUCK: usize = 50;
    let pki = Pki::new();
    let up = BigUpstream::start().await;
    let gw = gateway(&pki, &up, "send_timeout_ms = 1000").await;
    let addr = gw.addr("https");
    let stop = Arc::new(AtomicBool::new(false));
    let normal = normal_clients(addr, &pki, stop.clone());

    let mut stuck = Vec::new();
    for _ in 0..STUCK {
        let mut tls = raw_tls(addr, &pki.ca_der).await;
        tls.write_all(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut first = vec![0u8; 1024];
        tls.read_exact(&mut first).await.unwrap();
        assert!(first.starts_with(b"HTTP/1.1 200"));
        stuck.push(tls);
    }
    // (On a loaded machine the first may already be closed when the last is stuck.)
    assert!(
        within(Duration::from_secs(5), || up.ever() == STUCK)
            .await
            .is_some(),
        "every stuck client held an upstream connection: {}",
        up.ever()
    );
    eprintln!(
        "h1: {} of {STUCK} stuck clients' upstream connections open once all were stuck",
        up.held()
    );
    // Meanwhile a slow reader that keeps taking bytes (1 MiB every 150 ms, so the gateway's
    // writes block again and again, for less than the send timeout) gets all of it.
    let ca = pki.ca_der.clone();
    let slow_reader = tokio::spawn(async move {
        let started = Instant::now();
        let mut tls = raw_tls(addr, &ca).await;
        tls.write_all(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut total = 0usize;
        let mut buf = vec![0u8; 64 << 10];
        let mut this_round = 0;
        while total < BIG {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after {total} bytes");
            total += n;
            this_round += n;
            if this_round >= 1 << 20 {
                this_round = 0;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }
        started.elapsed()
    });

    let released = within(Duration::from_secs(5), || up.held() <= 1).await;
    let closed = within(Duration::from_secs(2), || {
        gw.metric(
            "gateway_connections_closed_total",
            &[("reason", "send_timeout")],
        ) == STUCK as f64
    })
    .await;
    let slow_took = slow_reader.await.unwrap();
    stop.store(true, Ordering::SeqCst);
    let (served, slowest) = normal.await.unwrap();
    eprintln!(
        "h1 stuck readers: {STUCK} upstream answers released {released:?} after all were \
         stuck (send_timeout 1 s); slow reader took {slow_took:?}; {served} normal requests \
         meanwhile, slowest {slowest:?}"
    );
    assert!(released.is_some(), "still held: {}", up.held());
    assert!(closed.is_some(), "the stuck connections were closed");
    assert_eq!(
        gw.metric(
            "gateway_rejected_requests_total",
            &[("reason", "send_timeout")]
        ),
        STUCK as f64,
        "each cut-off answer is counted once"
    );
    assert!(
        slow_took > Duration::from_secs(1),
        "the slow reader took longer than the send timeout"
    );
    assert!(served > 10, "normal clients were served meanwhile");
    for mut tls in stuck {
        let (_, closed) = read_until_close(&mut tls, Duration::from_secs(5)).await;
        assert!(closed, "the stuck client sees its connection end");
    }
}

/// A TLS stream whose reads can be stopped: a client that stops reading its socket.
struct Pausable<S> {
    inner: S,
    paused: Arc<AtomicBool>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Pausable<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.paused.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Pausable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An h2 client connection with the given windows; `paused` stops its reads.
async fn h2_client(
    addr: SocketAddr,
    pki: &Pki,
    stream_window: u32,
    conn_window: u32,
    paused: Arc<AtomicBool>,
) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let opts = ClientOpts {
        alpn: &[b"h2"],
        ..Default::default()
    };
    let connector = tokio_rustls::TlsConnector::from(client_config(&pki.ca_der, &opts));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let io = TokioIo::new(Pausable { inner: tls, paused });
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(stream_window)
        .initial_connection_window_size(conn_window)
        .handshake(io)
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

#[tokio::test]
async fn h2_streams_with_a_shut_window_are_reset_and_the_connection_serves_on() {
    const STUCK: usize = 50;
    let pki = Pki::new();
    let up = BigUpstream::start().await;
    let gw = gateway(&pki, &up, "send_timeout_ms = 1000").await;
    let addr = gw.addr("https");
    let stop = Arc::new(AtomicBool::new(false));
    let normal = normal_clients(addr, &pki, stop.clone());

    let mut sender = h2_client(addr, &pki, 0, 16 << 20, Arc::default()).await;
    let mut bodies = Vec::new();
    for _ in 0..STUCK {
        sender.ready().await.unwrap();
        let r = sender.send_request(get("localhost", "/big")).await.unwrap();
        assert_eq!(r.status(), 200);
        bodies.push(r.into_body());
    }
    assert!(
        within(Duration::from_secs(5), || up.ever() == STUCK)
            .await
            .is_some(),
        "every stuck stream held an upstream connection: {}",
        up.ever()
    );
    let released = within(Duration::from_secs(5), || up.held() == 0).await;
    stop.store(true, Ordering::SeqCst);
    let (served, slowest) = normal.await.unwrap();
    eprintln!(
        "h2 zero window: {STUCK} streams' upstream answers released {released:?} after all \
         were stuck (send_timeout 1 s); {served} normal requests meanwhile, slowest {slowest:?}"
    );
    assert!(released.is_some(), "still held: {}", up.held());
    for mut b in bodies {
        let end = tokio::time::timeout(Duration::from_secs(2), b.frame())
            .await
            .expect("the stream ended");
        assert!(matches!(end, Some(Err(_))), "the stream was reset: {end:?}");
    }
    assert_eq!(
        gw.metric(
            "gateway_rejected_requests_total",
            &[("reason", "send_timeout")]
        ),
        STUCK as f64
    );
    assert_eq!(
        gw.metric("gateway_connections_closed_total", &[]),
        0.0,
        "no connection was closed"
    );
    // The connection itself serves on.
    sender.ready().await.unwrap();
    let r = sender
        .send_request(get("localhost", "/empty"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(served > 10, "normal clients were served meanwhile");
}

#[tokio::test]
async fn an_h2_client_that_stops_reading_its_socket_is_closed() {
    let pki = Pki::new();
    let up = BigUpstream::start().await;
    let gw = gateway(&pki, &up, "send_timeout_ms = 1000").await;
    let addr = gw.addr("https");
    let paused = Arc::new(AtomicBool::new(false));
    let mut sender = h2_client(addr, &pki, 16 << 20, 16 << 20, paused.clone()).await;
    sender.ready().await.unwrap();
    let r = sender.send_request(get("localhost", "/big")).await.unwrap();
    assert_eq!(r.status(), 200);
    paused.store(true, Ordering::SeqCst);
    // The stream may be reset first (hyper stops polling its body once h2's send buffer is
    // full), then the connection, whose writes stay blocked, is closed.
    let released = within(Duration::from_secs(5), || up.held() == 0).await;
    let closed = within(Duration::from_secs(5), || {
        gw.metric(
            "gateway_connections_closed_total",
            &[("reason", "send_timeout")],
        ) == 1.0
    })
    .await;
    eprintln!(
        "h2 client not reading its socket (send_timeout 1 s): upstream released after \
         {released:?}, connection closed {closed:?} later"
    );
    assert!(released.is_some());
    assert!(closed.is_some());
    assert_eq!(
        gw.metric(
            "gateway_rejected_requests_total",
            &[("reason", "send_timeout")]
        ),
        1.0,
        "the answer cut off is counted once"
    );
    assert!(within(Duration::from_secs(2), || gw
        .metric("gateway_active_connections", &[("listener", "https")])
        == 0.0)
    .await
    .is_some());
    drop(r);
}

/// Sends a request head with `Content-Length: len` and `first` of its body, then one byte
/// every 200 ms; what the gateway answered and when, or `None` if nothing came within `limit`.
async fn trickle(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    path: &str,
    len: usize,
    first: &[u8],
    limit: Duration,
) -> Option<(String, Duration)> {
    let mut tls = raw_tls(addr, ca).await;
    let started = Instant::now();
    tls.write_all(
        format!("POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    tls.write_all(first).await.unwrap();
    let mut sent = first.len();
    let mut buf = vec![0u8; 4096];
    while started.elapsed() < limit {
        if sent < len {
            if tls.write_all(b"1").await.is_err() {
                break;
            }
            sent += 1;
        }
        match tokio::time::timeout(Duration::from_millis(200), tls.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                return Some((
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                    started.elapsed(),
                ))
            }
            Ok(_) => break,
            Err(_) => {}
        }
    }
    None
}

#[tokio::test]
async fn a_trickled_body_gets_408_at_the_body_deadline() {
    const CLIENTS: usize = 20;
    let pki = Pki::new();
    let up = BigUpstream::start().await;
    let model = pki.path().join("recs.safetensors");
    let mut spec = gateway::scoring::SampleSpec::embedding(50, 8, 1);
    spec.n_users = 5;
    std::fs::write(&model, gateway::scoring::sample_model(&spec)).unwrap();
    // A route whose plugin reads bodies up to 1000 bytes, and the scoring endpoint.
    let extra = format!(
        "[[routes]]\nname = \"inspected\"\npath_prefix = \"/upload\"\nupstream = \"app\"\n\
         plugins = [\"ok\"]\nplugin_body_access = true\nplugin_max_body_bytes = 1000\n\
         [limits]\nbody_deadline_ms = 1000\nmax_queue_time_ms = 0\n\
         [[models]]\nname = \"recs\"\npath = \"{}\"\n{}",
        model.display(),
        plugin_table("ok", "hostile", "ok", "")
    );
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", &extra), pki.path()).await;
    let addr = gw.addr("https");
    let stop = Arc::new(AtomicBool::new(false));
    let normal = normal_clients(addr, &pki, stop.clone());

    let mut trickled = Vec::new();
    for i in 0..CLIENTS {
        let path = if i % 2 == 0 {
            "/upload"
        } else {
            "/_gateway/models/recs/rank"
        };
        let ca = pki.ca_der.clone();
        trickled.push(tokio::spawn(async move {
            let got = trickle(addr, &ca, path, 100, b"", Duration::from_secs(5)).await;
            (path, got)
        }));
    }
    let mut slowest = Duration::ZERO;
    for t in trickled {
        let (path, got) = t.await.unwrap();
        let (text, took) = got.unwrap_or_else(|| panic!("{path}: no answer within 5 s"));
        assert!(text.starts_with("HTTP/1.1 408"), "{path}: {text}");
        assert!(
            took >= Duration::from_millis(1000) && took < Duration::from_millis(2500),
            "{path}: answered after {took:?}"
        );
        slowest = slowest.max(took);
    }
    // A body larger than what the plugin reads: the deadline covers its first 1001 bytes; the
    // rest may trickle on (each pause under the stall timeout) and is forwarded.
    let long = trickle(
        addr,
        &pki.ca_der,
        "/upload",
        1001 + 15,
        &[b'a'; 1001],
        Duration::from_secs(5),
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let (served, normal_slowest) = normal.await.unwrap();
    eprintln!(
        "trickled bodies (1 byte / 200 ms, body_deadline 1 s): {CLIENTS} answered 408, \
         the last after {slowest:?}; {served} normal requests meanwhile, slowest \
         {normal_slowest:?}"
    );
    let (text, took) = long.expect("the longer body was answered");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(took > Duration::from_secs(2), "it trickled for {took:?}");
    assert_eq!(
        gw.metric(
            "gateway_rejected_requests_total",
            &[("reason", "body_deadline")]
        ),
        CLIENTS as f64
    );
    assert!(served > 10, "normal clients were served meanwhile");
}

fn sender_closed(s: &Sender) -> bool {
    match s {
        Sender::H1(s) => s.is_closed(),
        Sender::H2(s) => s.is_closed(),
    }
}

#[tokio::test]
async fn at_max_connections_the_longest_idle_connections_make_room() {
    let pki = Pki::new();
    let up = BigUpstream::start().await;
    let gw = gateway(&pki, &up, "max_connections = 8").await;
    let addr = gw.addr("https");
    let connect = |h2: bool| {
        let ca = pki.ca_der.clone();
        async move {
            let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
            tls_connect(
                addr,
                &ca,
                ClientOpts {
                    alpn,
                    ..Default::default()
                },
            )
            .await
            .unwrap()
        }
    };
    // Idle longest: a connection that never sent a request; then three HTTP/1.1 and three h2
    // connections, each idle after one request, in that order.
    let mut never = raw_tls(addr, &pki.ca_der).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut idle = Vec::new();
    for i in 0..6 {
        let mut c = connect(i >= 3).await;
        assert_eq!(c.sender.get("localhost", "/small").await.status, 200);
        idle.push(c);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // And one busy, with a request in flight for 2 s.
    let ca = pki.ca_der.clone();
    let busy =
        tokio::spawn(async move { fetch(addr, &ca, false, get("localhost", "/slow")).await });
    assert!(
        within(Duration::from_secs(2), || gw
            .metric("gateway_active_connections", &[("listener", "https")])
            == 8.0)
        .await
        .is_some(),
        "all places taken"
    );

    // Five new clients, each kept connected: each is served at once.
    let mut newcomers = Vec::new();
    let mut waits = Vec::new();
    for i in 0..5 {
        let started = Instant::now();
        let served = tokio::time::timeout(Duration::from_secs(15), async {
            let mut c = connect(i % 2 == 1).await;
            let r = c.sender.get("localhost", "/small").await;
            (c, r)
        })
        .await;
        waits.push(started.elapsed());
        let (c, r) = served.unwrap_or_else(|_| panic!("new client {i} waited 15 s: {waits:?}"));
        assert_eq!(r.status, 200);
        newcomers.push(c);
    }
    eprintln!("max_connections = 8, all taken: new clients waited {waits:?}");
    assert!(
        waits.iter().all(|w| *w < Duration::from_secs(1)),
        "{waits:?}"
    );

    let (_, closed) = read_until_close(&mut never, Duration::from_secs(2)).await;
    assert!(
        closed,
        "the connection that never sent a request went first"
    );
    let gone = within(Duration::from_secs(2), || {
        idle[..4].iter().all(|c| sender_closed(&c.sender))
    })
    .await;
    assert!(gone.is_some(), "the four longest idle after it went next");
    for c in &mut idle[4..] {
        assert!(!sender_closed(&c.sender));
        assert_eq!(
            c.sender.get("localhost", "/small").await.status,
            200,
            "the more recently used ones serve on"
        );
    }
    let r = busy.await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "slow"));
    assert_eq!(
        gw.metric("gateway_connections_closed_total", &[("reason", "evicted")]),
        5.0
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The gateway binary's memory: what a stuck HTTP/1.1 reader holds beyond an idle connection
/// is bounded (an upstream read buffer, hyper's write buffer, rustls' send buffer: about
/// 870 KiB each before the upstream read buffer was capped), and it is let go at the send
/// timeout.
#[tokio::test]
async fn stuck_readers_hold_a_bounded_amount_of_memory_until_the_send_timeout() {
    const CLIENTS: usize = 100;
    let pki = Pki::new();
    let up = BigUpstream::start().await;
    let path = pki.path().join("gw.toml");
    let limits = "[limits]\nmax_queue_time_ms = 0\nsend_timeout_ms = 3000\n";
    std::fs::write(&path, basic_config(&pki, &[up.addr], "", limits)).unwrap();
    let (child, addr) = spawn_gateway_binary(&path).await;
    let pid = child.id().unwrap();
    let settle = || tokio::time::sleep(Duration::from_millis(300));
    for h2 in [false, true, false, true] {
        fetch(addr, &pki.ca_der, h2, get("localhost", "/small")).await;
    }
    settle().await;
    let start = rss_kib(pid);
    let mut idle = Vec::new();
    for _ in 0..CLIENTS {
        let mut c = tls_connect(addr, &pki.ca_der, ClientOpts::default())
            .await
            .unwrap();
        c.sender.get("localhost", "/small").await;
        idle.push(c);
    }
    settle().await;
    let with_idle = rss_kib(pid);
    let mut stuck = Vec::new();
    for _ in 0..CLIENTS {
        let mut tls = raw_tls(addr, &pki.ca_der).await;
        tls.write_all(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut first = vec![0u8; 1024];
        tls.read_exact(&mut first).await.unwrap();
        stuck.push(tls);
    }
    settle().await;
    let with_stuck = rss_kib(pid);
    let held = up.held();
    let released = within(Duration::from_secs(10), || up.held() == 0).await;
    let idle_each = with_idle.saturating_sub(start) / CLIENTS as u64;
    let stuck_each = with_stuck.saturating_sub(with_idle) / CLIENTS as u64;
    eprintln!(
        "gateway RSS: {start} KiB, {with_idle} KiB with {CLIENTS} idle connections \
         ({idle_each} KiB each), {with_stuck} KiB with {CLIENTS} stuck readers more \
         ({stuck_each} KiB each, {held} upstream connections held); upstream released \
         {released:?} after (send_timeout 3 s), RSS then {} KiB",
        rss_kib(pid)
    );
    assert!(released.is_some(), "still held: {}", up.held());
    assert!(
        stuck_each < 600,
        "a stuck reader holds {stuck_each} KiB (an idle connection {idle_each} KiB)"
    );
}
