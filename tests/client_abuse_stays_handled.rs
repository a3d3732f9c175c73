//! Client abuse that the gateway handles today stays handled: h2 rapid reset, CONTINUATION
//! floods, HPACK bombs, SETTINGS and PING floods, thousands of idle TLS connections and
//! HTTP/1.1 request smuggling probes. (Slowloris is in `timeouts_and_limits`.) Each probe is
//! bounded in time and size, and each checks that a well-behaved client is still served and
//! what the upstream actually received.
//!
//! The h2 frames are built by hand (a few helpers below): no client library would send them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::support::*;

// ---- h2 frames, by hand -------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix, `first` holding the bits above the prefix.
fn hpack_int(n: u8, first: u8, mut v: usize, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A string literal, not Huffman-coded.
fn hpack_str(s: &[u8], out: &mut Vec<u8>) {
    hpack_int(7, 0, s.len(), out);
    out.extend_from_slice(s);
}

/// A literal header field without indexing, with a new name.
fn literal(name: &str, value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    hpack_str(name.as_bytes(), out);
    hpack_str(value, out);
}

/// `GET / https://localhost`: :method GET (static 2), :scheme https (7), :path / (4) and
/// :authority (static name 1) as a literal without indexing.
fn get_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x87, 0x84];
    hpack_int(4, 0x00, 1, &mut b);
    hpack_str(b"localhost", &mut b);
    b
}

fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
    let mut p = Vec::new();
    for (id, v) in pairs {
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&v.to_be_bytes());
    }
    frame(SETTINGS, 0, 0, &p)
}

/// A frame the gateway sent.
#[derive(Debug)]
struct Frame {
    kind: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    /// A GOAWAY's error code.
    fn goaway_code(&self) -> Option<u32> {
        (self.kind == GOAWAY && self.payload.len() >= 8)
            .then(|| u32::from_be_bytes(self.payload[4..8].try_into().unwrap()))
    }

    /// The `:status` of a response HEADERS frame, when it is the block's first field (it is
    /// on a fresh connection): an indexed static entry or a literal with name index 8, plain
    /// or Huffman-coded (digits only).
    fn status(&self) -> Option<u16> {
        if self.kind != HEADERS {
            return None;
        }
        let p = &self.payload;
        let first = *p.first()?;
        let statics = [200, 204, 206, 304, 400, 404, 500];
        if (0x88..=0x8e).contains(&first) {
            return Some(statics[(first - 0x88) as usize]);
        }
        if !matches!(first, 0x48 | 0x08 | 0x18) {
            return None;
        }
        let (huffman, len) = (p[1] & 0x80 != 0, (p[1] & 0x7f) as usize);
        let raw = p.get(2..2 + len)?;
        let text = if huffman {
            huffman_digits(raw)?
        } else {
            String::from_utf8(raw.to_vec()).ok()?
        };
        text.parse().ok()
    }
}

/// Decodes a Huffman-coded string of ASCII digits (RFC 7541 appendix B: `0`-`2` have 5-bit
/// codes 00000-00010, `3`-`9` 6-bit codes 011001-011111); the padding is all ones.
fn huffman_digits(raw: &[u8]) -> Option<String> {
    let bits: Vec<u8> = raw
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let value = |from: usize, n: usize| {
        bits[from..from + n]
            .iter()
            .fold(0u8, |acc, b| (acc << 1) | *b)
    };
    let (mut i, mut out) = (0, String::new());
    while i < bits.len() {
        if bits[i..].iter().all(|b| *b == 1) {
            break;
        }
        if i + 5 <= bits.len() && value(i, 5) <= 2 {
            out.push((b'0' + value(i, 5)) as char);
            i += 5;
        } else if i + 6 <= bits.len() && (0b011001..=0b011111).contains(&value(i, 6)) {
            out.push((b'3' + value(i, 6) - 0b011001) as char);
            i += 6;
        } else {
            return None;
        }
    }
    Some(out)
}

/// What a reader saw of the gateway's side of an h2 connection.
#[derive(Debug, Default)]
struct Reading {
    /// Frames other than PING and SETTINGS (those are only counted).
    frames: Vec<Frame>,
    pings: usize,
    settings: usize,
    /// When the gateway closed the connection, from the reader's start; None: still open.
    closed_after: Option<Duration>,
}

impl Reading {
    fn goaway(&self) -> Option<u32> {
        self.frames.iter().find_map(Frame::goaway_code)
    }
}

/// Reads frames until the peer closes the connection or `limit` passes.
async fn read_frames<R: AsyncRead + Unpin>(r: &mut R, limit: Duration) -> Reading {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + limit;
    let mut out = Reading::default();
    loop {
        let mut head = [0u8; 9];
        match tokio::time::timeout_at(deadline, r.read_exact(&mut head)).await {
            Err(_) => return out,
            Ok(Err(_)) => {
                out.closed_after = Some(started.elapsed());
                return out;
            }
            Ok(Ok(_)) => {}
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        match tokio::time::timeout_at(deadline, r.read_exact(&mut payload)).await {
            Err(_) => return out,
            Ok(Err(_)) => {
                out.closed_after = Some(started.elapsed());
                return out;
            }
            Ok(Ok(_)) => {}
        }
        let f = Frame {
            kind: head[3],
            stream: u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff,
            payload,
        };
        match f.kind {
            PING => out.pings += 1,
            SETTINGS => out.settings += 1,
            _ => out.frames.push(f),
        }
    }
}

/// A TLS connection that negotiated h2, with nothing sent yet.
async fn raw_h2(addr: SocketAddr, ca: &CertificateDer<'static>) -> TlsStream<TcpStream> {
    let cfg = client_config(
        ca,
        &ClientOpts {
            alpn: &[b"h2"],
            ..Default::default()
        },
    );
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls
}

/// Writes `frames` in writes of `per_write` frames until done, the peer closes, or one write
/// stalls for `stall` (the peer stopped reading). Returns how many frames were written.
async fn flood<W: AsyncWrite + Unpin>(
    w: &mut W,
    frames: impl Iterator<Item = Vec<u8>>,
    per_write: usize,
    stall: Duration,
) -> (usize, Flood) {
    let mut sent = 0;
    let mut batch = Vec::new();
    let mut in_batch;
    let mut frames = frames.peekable();
    while frames.peek().is_some() {
        batch.clear();
        in_batch = 0;
        for f in frames.by_ref().take(per_write) {
            batch.extend_from_slice(&f);
            in_batch += 1;
        }
        match tokio::time::timeout(stall, async {
            w.write_all(&batch).await?;
            w.flush().await
        })
        .await
        {
            Ok(Ok(())) => sent += in_batch,
            Ok(Err(_)) => return (sent, Flood::Closed),
            Err(_) => return (sent, Flood::Stalled),
        }
    }
    (sent, Flood::Done)
}

#[derive(Debug, PartialEq, Eq)]
enum Flood {
    /// Every frame was written.
    Done,
    /// The gateway closed the connection (a write failed).
    Closed,
    /// A write stalled: the gateway stopped reading.
    Stalled,
}

/// A normal h2 and HTTP/1.1 request both succeed within 5 s each.
async fn still_served(addr: SocketAddr, ca: &CertificateDer<'static>, when: &str) {
    for h2 in [true, false] {
        let started = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            fetch(addr, ca, h2, get("localhost", "/normal")),
        )
        .await
        .unwrap_or_else(|_| panic!("a normal request (h2: {h2}) {when} got no answer in 5 s"));
        assert_eq!(r.status, 200, "a normal request (h2: {h2}) {when}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}

fn upstream_paths(up: &Upstream) -> Vec<String> {
    up.seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.uri.path().to_string())
        .collect()
}

// ---- h2 ---------------------------------------------------------------------------------

/// CVE-2023-44487: streams opened and cancelled at once cost the server work and the client
/// nothing. The gateway answers with GOAWAY (ENHANCE_YOUR_CALM) and closes the connection;
/// the upstream sees only a small fraction of the streams; others are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_gets_goaway_and_spares_the_upstream() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", ""), pki.path()).await;
    let addr = gw.addr("https");

    const PAIRS: u32 = 5_000;
    let tls = raw_h2(addr, &pki.ca_der).await;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let reader = tokio::spawn(async move { read_frames(&mut rd, Duration::from_secs(10)).await });
    let mut start = PREFACE.to_vec();
    start.extend(settings(&[]));
    wr.write_all(&start).await.unwrap();
    let block = get_block();
    let pairs = (0..PAIRS).map(|i| {
        let id = 1 + 2 * i;
        let mut f = frame(HEADERS, END_HEADERS | END_STREAM, id, &block);
        f.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
        f
    });
    // A normal client, during the flood.
    let during = tokio::spawn({
        let ca = pki.ca_der.clone();
        async move { fetch(addr, &ca, true, get("localhost", "/normal")).await }
    });
    let started = Instant::now();
    let (sent, how) = flood(&mut wr, pairs, 100, Duration::from_secs(5)).await;
    let seen = reader.await.unwrap();
    assert_eq!(during.await.unwrap().status, 200);

    let hits = upstream_paths(&up).iter().filter(|p| *p == "/").count();
    eprintln!(
        "rapid reset: {sent} of {PAIRS} HEADERS+RST_STREAM pairs written ({how:?}), GOAWAY {:?}, \
         closed after {:?}, upstream saw {hits} of the streams, flood took {:?}",
        seen.goaway(),
        seen.closed_after,
        started.elapsed()
    );
    assert_eq!(
        seen.goaway(),
        Some(ENHANCE_YOUR_CALM),
        "GOAWAY(ENHANCE_YOUR_CALM) expected; frames: {:?}",
        seen.frames.iter().map(|f| f.kind).collect::<Vec<_>>()
    );
    assert!(
        seen.closed_after
            .is_some_and(|d| d < Duration::from_secs(5)),
        "the connection is closed within 5 s: {:?}",
        seen.closed_after
    );
    assert!(
        hits <= PAIRS as usize / 20,
        "the upstream saw {hits} of {PAIRS} reset streams"
    );
    still_served(addr, &pki.ca_der, "after a rapid reset flood").await;
}

/// CVE-2024-27316 family: a HEADERS frame without END_HEADERS followed by CONTINUATION frames
/// without end. The gateway stops it after a few frames (GOAWAY, ENHANCE_YOUR_CALM or
/// COMPRESSION_ERROR) instead of buffering the header block; nothing reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_continuation_flood_is_cut_off() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let limits = "[limits]\nmax_header_bytes = 16384";
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", limits), pki.path()).await;
    let addr = gw.addr("https");

    for (what, per_frame) in [("empty", 0usize), ("1 KB", 1024)] {
        const FRAMES: usize = 10_000;
        let tls = raw_h2(addr, &pki.ca_der).await;
        let (mut rd, mut wr) = tokio::io::split(tls);
        let reader =
            tokio::spawn(async move { read_frames(&mut rd, Duration::from_secs(10)).await });
        let mut start = PREFACE.to_vec();
        start.extend(settings(&[]));
        start.extend(frame(HEADERS, END_STREAM, 1, &get_block()));
        wr.write_all(&start).await.unwrap();
        let mut n = 0;
        let frames = std::iter::repeat_with(|| {
            n += 1;
            let mut block = Vec::new();
            if per_frame > 0 {
                literal(&format!("x-flood-{n}"), &vec![b'a'; per_frame], &mut block);
            }
            frame(CONTINUATION, 0, 1, &block)
        })
        .take(FRAMES);
        let started = Instant::now();
        let (sent, how) = flood(&mut wr, frames, 50, Duration::from_secs(5)).await;
        let seen = reader.await.unwrap();
        eprintln!(
            "CONTINUATION flood ({what} frames): {sent} of {FRAMES} written ({how:?}), GOAWAY {:?}, \
             closed after {:?} (flood took {:?})",
            seen.goaway(),
            seen.closed_after,
            started.elapsed()
        );
        let code = seen.goaway();
        assert!(
            matches!(code, Some(ENHANCE_YOUR_CALM) | Some(0x9)),
            "GOAWAY with ENHANCE_YOUR_CALM or COMPRESSION_ERROR expected, got {code:?}"
        );
        assert!(
            seen.closed_after
                .is_some_and(|d| d < Duration::from_secs(5)),
            "closed within 5 s: {:?}",
            seen.closed_after
        );
        assert!(
            seen.frames.iter().all(|f| f.kind != HEADERS),
            "no response: the request never completed"
        );
    }
    assert_eq!(
        up.hits(),
        0,
        "nothing of the flooded requests went upstream"
    );
    still_served(addr, &pki.ca_der, "after CONTINUATION floods").await;
}

/// An HPACK bomb: one 4 KB entry in the dynamic table, then a header block that references it
/// 16,000 times (16 KB on the wire, 64 MB decoded). Refused (431, a stream reset or GOAWAY),
/// never decoded into memory nor sent upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_hpack_bomb_is_refused() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let limits = "[limits]\nmax_header_bytes = 16384";
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", limits), pki.path()).await;
    let addr = gw.addr("https");

    // (what, references to the big entry): a few (over max_header_bytes: 431), and a bomb
    // (far over: GOAWAY).
    for (what, refs) in [("8 references", 8usize), ("bomb", 16_000)] {
        let tls = raw_h2(addr, &pki.ca_der).await;
        let (mut rd, mut wr) = tokio::io::split(tls);
        let reader =
            tokio::spawn(async move { read_frames(&mut rd, Duration::from_secs(2)).await });
        let mut out = PREFACE.to_vec();
        out.extend(settings(&[]));
        // Literal with incremental indexing, new name: dynamic table index 62, 4,033 bytes
        // by HPACK's count (the default table holds 4,096).
        let mut block = get_block();
        block.push(0x40);
        hpack_str(b"x-bomb", &mut block);
        hpack_str(&[b'b'; 3995], &mut block);
        block.extend(std::iter::repeat_n(0x80 | 62, refs));
        let mut chunks = block.chunks(16_000).peekable();
        let mut first = true;
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let kind = if first { HEADERS } else { CONTINUATION };
            let flags = if first { END_STREAM } else { 0 } | if last { END_HEADERS } else { 0 };
            out.extend(frame(kind, flags, 1, chunk));
            first = false;
        }
        let started = Instant::now();
        let _ = wr.write_all(&out).await;
        let seen = reader.await.unwrap();
        let status = seen
            .frames
            .iter()
            .find(|f| f.stream == 1)
            .and_then(Frame::status);
        let reset = seen
            .frames
            .iter()
            .any(|f| f.kind == RST_STREAM && f.stream == 1);
        eprintln!(
            "HPACK {what}: {} bytes of header block ({} MB decoded), status {status:?}, reset \
             {reset}, GOAWAY {:?}, closed after {:?}, answered in {:?}",
            block.len(),
            refs * 4033 / 1_000_000,
            seen.goaway(),
            seen.closed_after,
            started.elapsed()
        );
        assert!(
            status == Some(431) || reset || seen.goaway().is_some(),
            "refused: {:?}",
            seen.frames
        );
        assert_ne!(status, Some(200));
    }
    assert_eq!(up.hits(), 0, "no bomb went upstream");
    still_served(addr, &pki.ca_der, "after HPACK bombs").await;
}

/// Floods a SETTINGS and a PING connection without ever reading, each until a write stalls
/// for 2 s (the gateway stopped reading) or 4,000,000 frames (64 MB) are written; checks that
/// what the gateway took in is bounded and that normal requests are served during each flood.
/// Returns the flooding connections, still open.
async fn flood_settings_and_pings(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
) -> Vec<TlsStream<TcpStream>> {
    const FRAMES: usize = 4_000_000;
    let mut held = Vec::new();
    for (what, one) in [
        ("SETTINGS", settings(&[(0x4, 65_535)])),
        ("PING", frame(PING, 0, 0, &[7; 8])),
    ] {
        let mut tls = raw_h2(addr, ca).await;
        let mut start = PREFACE.to_vec();
        start.extend(settings(&[]));
        tls.write_all(&start).await.unwrap();
        let started = Instant::now();
        let (sent, how) = flood(
            &mut tls,
            std::iter::repeat_n(one.clone(), FRAMES),
            1_000,
            Duration::from_secs(2),
        )
        .await;
        let mb = sent * one.len() / 1_000_000;
        eprintln!(
            "{what} flood without reading: {sent} frames ({mb} MB) taken in before {how:?} \
             after {:?}",
            started.elapsed()
        );
        assert_ne!(
            how,
            Flood::Done,
            "the gateway took in all {FRAMES} {what} frames ({mb} MB) unread"
        );
        assert!(mb <= 32, "{what}: {mb} MB taken in");
        still_served(addr, ca, &format!("during a {what} flood")).await;
        held.push(tls);
    }
    held
}

/// SETTINGS and PING floods from clients that never read: the gateway acknowledges one frame
/// at a time and stops reading while the acknowledgement cannot be written, so what it takes
/// in is bounded by socket buffers; others are served meanwhile; when the flooders go away,
/// so do their connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_settings_and_ping_floods_are_bounded() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let limits = "[limits]\nidle_timeout_ms = 1000";
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", limits), pki.path()).await;
    let addr = gw.addr("https");

    let held = flood_settings_and_pings(addr, &pki.ca_der).await;
    drop(held);
    let closed = eventually(Duration::from_secs(5), || {
        gw.metric("gateway_active_connections", &[]) == 0.0
    })
    .await;
    assert!(closed, "the flooders' connections end when they close");
    assert_eq!(up.hits(), 4, "only the normal requests went upstream");
}

/// The same floods, but the flooders stay connected and never read again. The connection's
/// task is stuck writing acknowledgements (and then the GOAWAY of a graceful shutdown) to a
/// peer that does not read, so neither the idle timeout nor h2 keep-alive can end it; the
/// send timeout does (this was a defect before `send_timeout_ms`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_flooders_that_stop_reading_are_closed() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    // The gateway's acknowledgements pile up unread: the send timeout (not the idle timer,
    // which a connection blocked writing never reaches) closes it.
    let limits = "[limits]\nidle_timeout_ms = 1000\nsend_timeout_ms = 2000";
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", limits), pki.path()).await;
    let addr = gw.addr("https");
    let active = || gw.metric("gateway_active_connections", &[]);

    let held = flood_settings_and_pings(addr, &pki.ca_der).await;
    let started = Instant::now();
    let closed = eventually(Duration::from_secs(20), || active() == 0.0).await;
    eprintln!(
        "stuck flooding connections closed by the gateway after {:?} (closed: {closed})",
        started.elapsed()
    );
    assert!(
        closed,
        "{} connections still open 20 s after the floods",
        active()
    );
    drop(held);
}

// ---- many idle TLS connections ----------------------------------------------------------

/// The soft limit on open files, from /proc/self/limits.
fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        })
        .unwrap_or(1024)
}

/// 5,000 TLS connections, handshake done and no request (each costs the test two file
/// descriptors: scaled down when the soft limit is lower): a normal request is still served
/// promptly, and the header read timeout closes them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_idle_tls_connections_are_survived_and_closed() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let limits = "[limits]\nheader_read_timeout_ms = 20000\nidle_timeout_ms = 20000";
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", limits), pki.path()).await;
    let addr = gw.addr("https");
    let active = || gw.metric("gateway_active_connections", &[]);

    let n = 5_000.min(open_files_limit().saturating_sub(2_000) / 2);
    let cfg = client_config(&pki.ca_der, &ClientOpts::default());
    let started = Instant::now();
    let mut conns = Vec::with_capacity(n);
    let mut batch = tokio::task::JoinSet::new();
    for i in 0..n {
        let cfg = cfg.clone();
        batch.spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            tokio_rustls::TlsConnector::from(cfg)
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap()
        });
        if batch.len() == 64 || i == n - 1 {
            while let Some(c) = batch.join_next().await {
                conns.push(c.unwrap());
            }
        }
    }
    let opened = started.elapsed();
    let open_now = active();
    let t = Instant::now();
    still_served(addr, &pki.ca_der, &format!("with {n} idle TLS connections")).await;
    let served_in = t.elapsed();
    eprintln!(
        "{n} idle TLS connections (open files limit {}) opened in {opened:?}; gauge {open_now}; \
         normal requests served in {served_in:?}",
        open_files_limit()
    );
    assert!(
        open_now >= n as f64,
        "all {n} held open at once (gauge {open_now}; opening took {opened:?})"
    );
    assert!(served_in < Duration::from_secs(5));

    // The header read timeout (20 s from each handshake) closes them all.
    let t = Instant::now();
    let closed = eventually(Duration::from_secs(40), || active() == 0.0).await;
    eprintln!(
        "closed by the gateway {:?} later (all: {closed})",
        t.elapsed()
    );
    assert!(closed, "{} still open", active());
    // And the clients see it: each read ends.
    let mut seen_closed = 0;
    for c in conns.iter_mut().take(100) {
        let (_, c) = read_until_close(c, Duration::from_secs(1)).await;
        seen_closed += c as usize;
    }
    assert_eq!(seen_closed, 100);
    assert_eq!(up.hits(), 2, "only the two normal requests went upstream");
}

// ---- HTTP/1.1 request smuggling ---------------------------------------------------------

/// Request smuggling probes on HTTP/1.1 over TLS: ambiguous framing is refused with 400, or
/// normalised so that the upstream sees exactly one well-framed request (what it received is
/// checked), and a request hidden in a body stays body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_smuggling_probes_are_refused_or_normalised() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let limits = "[limits]\nidle_timeout_ms = 1000\nheader_read_timeout_ms = 1000";
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", limits), pki.path()).await;
    let addr = gw.addr("https");

    let hidden = "GET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let head = |path: &str, fields: &str| {
        format!("POST {path} HTTP/1.1\r\nHost: localhost\r\n{fields}\r\n")
    };
    // (name, bytes, what the upstream must receive if the gateway accepts the request:
    // its body).
    let probes: Vec<(&str, String, Option<&str>)> =
        vec![
        (
            "CL + TE: chunked",
            head("/cl-te", "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n")
                + "0\r\n\r\n"
                + hidden,
            Some(""),
        ),
        (
            "TE: chunked + CL",
            head("/te-cl", "Transfer-Encoding: chunked\r\nContent-Length: 48\r\n")
                + "0\r\n\r\n"
                + hidden,
            Some(""),
        ),
        (
            "two Content-Lengths",
            head("/cl-cl", "Content-Length: 0\r\nContent-Length: 44\r\n") + hidden,
            None,
        ),
        (
            "two Content-Lengths in one field",
            head("/cl-list", "Content-Length: 0, 44\r\n") + hidden,
            None,
        ),
        (
            "TE: xchunked",
            head("/xchunked", "Transfer-Encoding: xchunked\r\n") + "0\r\n\r\n" + hidden,
            None,
        ),
        (
            "TE: chunked, identity",
            head("/chunked-identity", "Transfer-Encoding: chunked, identity\r\n")
                + "0\r\n\r\n"
                + hidden,
            None,
        ),
        (
            "space before the colon",
            head("/te-space", "Content-Length: 5\r\nTransfer-Encoding : chunked\r\n")
                + "0\r\n\r\n"
                + hidden,
            None,
        ),
        (
            "TE folded onto the previous line",
            head("/te-fold", "Content-Length: 5\r\nX-A: a\r\n Transfer-Encoding: chunked\r\n")
                + "0\r\n\r\n"
                + hidden,
            None,
        ),
        (
            "TE: \\x0bchunked",
            head(
                "/te-vt",
                "Content-Length: 5\r\nTransfer-Encoding: \x0bchunked\r\n",
            ) + "0\r\n\r\n"
                + hidden,
            None,
        ),
        (
            "bare LF in the head",
            // RFC 9112 lets a recipient take a bare LF for a line end: then this is one
            // request with a 5-byte body, and that is what the upstream must get.
            "POST /bare-lf HTTP/1.1\r\nHost: localhost\r\nX-A: a\nContent-Length: 5\r\n\r\nhello"
                .to_string(),
            Some("hello"),
        ),
        (
            "bare CR in the head",
            "POST /bare-cr HTTP/1.1\r\nHost: localhost\r\nX-A: a\rContent-Length: 5\r\n\r\nhello"
                .to_string()
                + hidden,
            None,
        ),
        (
            "a request hidden in a body",
            head("/body", &format!("Content-Length: {}\r\n", hidden.len())) + hidden,
            Some(hidden),
        ),
    ];

    let mut report = Vec::new();
    for (name, bytes, accepted_body) in &probes {
        let before = up.hits();
        let mut tls = raw_tls(addr, &pki.ca_der).await;
        tls.write_all(bytes.as_bytes()).await.unwrap();
        let (text, closed) = read_until_close(&mut tls, Duration::from_secs(3)).await;
        let status_line = text.lines().next().unwrap_or("").to_string();
        let responses = text.matches("HTTP/1.1 ").count();
        let seen: Vec<Seen> = up.seen.lock().unwrap()[before..].to_vec();
        report.push(format!(
            "{name}: {status_line:?} ({responses} responses, closed: {closed}), upstream saw {:?}",
            seen.iter()
                .map(|s| format!("{} {} body {}B", s.method, s.uri.path(), s.body.len()))
                .collect::<Vec<_>>()
        ));
        assert!(
            seen.iter().all(|s| s.uri.path() != "/smuggled"),
            "{name}: the hidden request reached the upstream: {report:#?}"
        );
        assert!(
            seen.len() <= 1,
            "{name}: one request, at most one upstream request: {report:#?}"
        );
        if status_line.starts_with("HTTP/1.1 400") {
            assert!(seen.is_empty(), "{name}: refused, yet forwarded");
            continue;
        }
        let Some(body) = accepted_body else {
            panic!("{name}: ambiguous framing must be refused with 400: {report:#?}");
        };
        assert!(
            status_line.starts_with("HTTP/1.1 200"),
            "{name}: {report:#?}"
        );
        assert_eq!(seen.len(), 1, "{name}");
        let s = &seen[0];
        assert_eq!(s.method, http::Method::POST, "{name}");
        assert_eq!(s.body, body.as_bytes(), "{name}: the upstream's body");
        assert!(
            !(s.headers.contains_key("content-length")
                && s.headers.contains_key("transfer-encoding")),
            "{name}: forwarded with both framings: {:?}",
            s.headers
        );
    }
    eprintln!("{report:#?}");
    still_served(addr, &pki.ca_der, "after smuggling probes").await;
}
