//! Header rules of a proxy: hop-by-hop stripping, forwarding headers, request ids, host names,
//! and the body wrappers that enforce request limits and hold guards while a body streams.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};

use crate::config::ForwardedMode;
use crate::upstream::BoxError;

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Where `TE` sits in [`hop_by_hop_names`].
const TE_INDEX: usize = 5;

/// The fixed hop-by-hop set (RFC 9110 §7.6.1 and the legacy ones proxies still see).
fn hop_by_hop_names() -> [&'static HeaderName; 9] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::PROXY_AUTHORIZATION,
        &header::PROXY_AUTHENTICATE,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ]
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): those named in `Connection` and the fixed
/// set. `TE: trailers` is kept, since it is end-to-end in meaning (gRPC needs it).
///
/// One pass over the names present decides; most messages have none of these, and then
/// nothing is hashed or removed.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let fixed = hop_by_hop_names();
    // Bit i: fixed[i] is present.
    let mut present = 0u16;
    // Whether a `Connection` value may name other headers to remove.
    let mut lists_names = false;
    for (name, value) in headers.iter() {
        if let Some(i) = fixed.iter().position(|f| *f == name) {
            present |= 1 << i;
            if i == 0 {
                // `close` names no header and `keep-alive` is in the fixed set: the usual
                // values need no parsing.
                let v = value.as_bytes();
                lists_names |=
                    !v.eq_ignore_ascii_case(b"keep-alive") && !v.eq_ignore_ascii_case(b"close");
            }
        }
    }
    if present == 0 {
        return;
    }
    if lists_names {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    let te_trailers = present & (1 << TE_INDEX) != 0
        && headers
            .get(header::TE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
    for (i, name) in fixed.into_iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether a client-supplied request id is safe to keep: 1 to 128 characters from a small
/// alphabet, so it can go into logs and headers verbatim.
pub(crate) fn valid_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b.iter().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':' | b'+' | b'/' | b'=')
        })
}

/// A fresh random request id (UUID v4).
pub(crate) fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let s = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(s).expect("uuid is a valid header value")
}

/// Adds forwarding headers for a request from `client`, received over `proto` for `host`.
pub(crate) fn add_forwarded(
    headers: &mut HeaderMap,
    mode: ForwardedMode,
    client: SocketAddr,
    proto: &'static str,
    host: Option<&str>,
) {
    let ip = client.ip().to_canonical();
    if matches!(mode, ForwardedMode::XForwarded | ForwardedMode::Both) {
        let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
        if let Some(h) = host.and_then(|h| HeaderValue::from_str(h).ok()) {
            headers.insert(X_FORWARDED_HOST.clone(), h);
        }
    }
    if matches!(mode, ForwardedMode::Forwarded | ForwardedMode::Both) {
        let node = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        let mut element = format!("for={node};proto={proto}");
        if let Some(h) = host.filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        }) {
            element.push_str(&format!(";host=\"{h}\""));
        }
        let value = match headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {element}"),
            None => element,
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(header::FORWARDED, v);
        }
    }
}

/// Appends `<version> <name>` to `Via`.
pub(crate) fn append_via(headers: &mut HeaderMap, version: http::Version, name: &HeaderValue) {
    let v = match version {
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "1.1",
    };
    let name = name.to_str().unwrap_or("gateway");
    let value = match headers.get(header::VIA).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {v} {name}"),
        None => format!("{v} {name}"),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(header::VIA, v);
    }
}

/// Why a request's authority was refused with 400 (RFC 9112 §3.2, RFC 9113 §8.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuthorityError {
    /// An HTTP/1.1 or h2 request named no host.
    #[error("the request names no host (a Host header is required)")]
    Missing,
    /// More than one `Host` header.
    #[error("the request has more than one Host header")]
    Duplicate,
    /// A `Host` or `:authority` that is not a valid host with an optional port.
    #[error("the Host header is not a valid host")]
    Invalid,
    /// An authority with user information (`user@host`).
    #[error("the authority must not carry user information")]
    UserInfo,
    /// On h2, a `Host` header naming another host or port than `:authority`.
    #[error("the Host header differs from the :authority")]
    Conflict,
}

/// The one authority of a request, decided by [`request_authority`]: routed on, reported in
/// the forwarding headers, and sent upstream as `Host`.
#[derive(Debug, Default)]
pub(crate) struct RequestAuthority {
    /// The host, lower case, without port or trailing dot; `None` on an HTTP/1.0 request
    /// without a `Host`.
    pub host: Option<String>,
    /// The `Host` to send upstream in place of the request's own, when the authority came
    /// from the target (`:authority`, absolute form) and differs from it.
    pub replace_host: Option<HeaderValue>,
}

/// Decides a request's authority. The target's authority (h2 `:authority`, HTTP/1.1 absolute
/// form) wins over `Host`; on h2 a `Host` naming another host or port is refused, as RFC 9113
/// §8.3.1 advises. An HTTP/1.1 or h2 request without one, more than one `Host` header, an
/// invalid value or user information (`user@host`) are refused too.
pub(crate) fn request_authority<B>(
    req: &http::Request<B>,
) -> Result<RequestAuthority, AuthorityError> {
    let mut host_headers = req.headers().get_all(header::HOST).iter();
    let host_header = host_headers.next();
    if host_headers.next().is_some() {
        return Err(AuthorityError::Duplicate);
    }
    let Some(target) = req.uri().authority() else {
        let Some(value) = host_header else {
            return match req.version() {
                http::Version::HTTP_09 | http::Version::HTTP_10 => Ok(RequestAuthority::default()),
                _ => Err(AuthorityError::Missing),
            };
        };
        let host = match plain_host(value.as_bytes()) {
            Some(host) => finish_host(host),
            None => finish_host(parse_host_header(value)?.host()),
        };
        return Ok(RequestAuthority {
            host: Some(host.ok_or(AuthorityError::Invalid)?),
            replace_host: None,
        });
    };
    if target.as_str().contains('@') {
        return Err(AuthorityError::UserInfo);
    }
    let host = finish_host(target.host()).ok_or(AuthorityError::Invalid)?;
    let replace_host = match host_header {
        Some(value) if value.as_bytes() == target.as_str().as_bytes() => None,
        Some(value) => {
            let named = parse_host_header(value)?;
            if req.version() == http::Version::HTTP_2 {
                let default_port = match req.uri().scheme_str() {
                    Some("http") => 80,
                    _ => 443,
                };
                let same = named
                    .host()
                    .trim_end_matches('.')
                    .eq_ignore_ascii_case(target.host().trim_end_matches('.'))
                    && named.port_u16().unwrap_or(default_port)
                        == target.port_u16().unwrap_or(default_port);
                if !same {
                    return Err(AuthorityError::Conflict);
                }
            }
            HeaderValue::from_str(target.as_str()).ok()
        }
        None if req.version() == http::Version::HTTP_11 => return Err(AuthorityError::Missing),
        None => HeaderValue::from_str(target.as_str()).ok(),
    };
    Ok(RequestAuthority {
        host: Some(host),
        replace_host,
    })
}

/// A `Host` value parsed as an authority without user information.
fn parse_host_header(value: &HeaderValue) -> Result<http::uri::Authority, AuthorityError> {
    let bytes = value.as_bytes();
    if bytes.contains(&b'@') {
        return Err(AuthorityError::UserInfo);
    }
    http::uri::Authority::try_from(bytes).map_err(|_| AuthorityError::Invalid)
}

/// The host of a `Host` value that is a lower-case DNS name with an optional port, the usual
/// case, without parsing it as an authority; `None` for anything else.
fn plain_host(value: &[u8]) -> Option<&str> {
    let (host, port) = match value.iter().position(|&b| b == b':') {
        Some(i) => (&value[..i], &value[i + 1..]),
        None => (value, &b""[..]),
    };
    let host_ok = !host.is_empty()
        && host
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-'));
    let port_ok = port.len() <= 5 && port.iter().all(u8::is_ascii_digit);
    (host_ok && port_ok).then(|| std::str::from_utf8(host).expect("checked ASCII"))
}

fn finish_host(host: &str) -> Option<String> {
    let host = host.trim_end_matches('.');
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// Why a request body could not be passed on. Each is the client's doing, never the backend's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyLimitError {
    /// More bytes than `limits.max_body_bytes`.
    #[error("request body larger than the limit")]
    TooLarge,
    /// The client paused longer than `limits.body_read_timeout_ms`, or was still sending when
    /// the upstream request timeout passed.
    #[error("request body stalled longer than the read timeout")]
    Timeout,
    /// The client took longer than `limits.body_deadline_ms` to send a body the gateway reads
    /// before answering.
    #[error("request body took longer than the body deadline")]
    Deadline,
    /// The body's framing was invalid (a bad chunk size, an h2 protocol error).
    #[error("request body framing is invalid")]
    Malformed,
    /// The client closed the connection or reset the stream before the body ended.
    #[error("request body ended before it was complete")]
    Aborted,
}

impl BodyLimitError {
    /// Its `reason` in `gateway_rejected_requests_total`.
    pub fn reason(self) -> &'static str {
        match self {
            BodyLimitError::TooLarge => "body_too_large",
            BodyLimitError::Timeout => "body_timeout",
            BodyLimitError::Deadline => "body_deadline",
            BodyLimitError::Malformed => "body_malformed",
            BodyLimitError::Aborted => "body_aborted",
        }
    }

    /// Sorts an error of the downstream body: an early end is an abort, anything else bad
    /// framing.
    fn of_downstream(err: &(dyn std::error::Error + 'static)) -> BodyLimitError {
        if connection_broke(err) {
            BodyLimitError::Aborted
        } else {
            BodyLimitError::Malformed
        }
    }
}

/// Whether an error, or one in its source chain, says the connection ended early: hyper's
/// incomplete, canceled or closed, or an I/O reset, abort, broken pipe or early EOF. The same
/// test sorts a client's abandoned body and an upstream's reset.
pub(crate) fn connection_broke(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                return true;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
            ) {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

/// Whether a connect error says the node itself ran out of something (file descriptors, local
/// ports, buffer memory) rather than anything about the backend.
pub(crate) fn is_local_resource_error(err: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    // Linux errno values with no stable ErrorKind: ENFILE, EMFILE, ENOBUFS.
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    const ENOBUFS: i32 = 105;
    matches!(err.kind(), AddrNotAvailable | OutOfMemory)
        || (cfg!(target_os = "linux")
            && matches!(err.raw_os_error(), Some(ENFILE | EMFILE | ENOBUFS)))
}

/// Finds a [`BodyLimitError`] in an error's source chain.
pub(crate) fn find_body_limit_error(
    err: &(dyn std::error::Error + 'static),
) -> Option<BodyLimitError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(b) = e.downcast_ref::<BodyLimitError>() {
            return Some(*b);
        }
        cur = e.source();
    }
    None
}

/// Where a request body streamed upstream stands, as its [`LimitedBody`] last saw it; shared
/// with the request's handler, which learns from it whose fault a failed exchange was.
#[derive(Debug, Default)]
pub(crate) struct BodyProgress(AtomicU8);

/// A state of a [`BodyProgress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyState {
    /// Not read yet, or the last read gave a frame: the body is waiting on the upstream.
    Reading,
    /// The last read found nothing: the body is waiting on the client.
    WaitingOnClient,
    /// Read to the end.
    Complete,
    /// Cut off or broken.
    Failed(BodyLimitError),
}

impl BodyProgress {
    /// The state last recorded.
    pub fn state(&self) -> BodyState {
        match self.0.load(Ordering::Acquire) {
            0 => BodyState::Reading,
            1 => BodyState::WaitingOnClient,
            2 => BodyState::Complete,
            3 => BodyState::Failed(BodyLimitError::TooLarge),
            4 => BodyState::Failed(BodyLimitError::Timeout),
            5 => BodyState::Failed(BodyLimitError::Malformed),
            6 => BodyState::Failed(BodyLimitError::Aborted),
            _ => BodyState::Failed(BodyLimitError::Deadline),
        }
    }

    fn set(&self, state: BodyState) {
        let v = match state {
            BodyState::Reading => 0,
            BodyState::WaitingOnClient => 1,
            BodyState::Complete => 2,
            BodyState::Failed(BodyLimitError::TooLarge) => 3,
            BodyState::Failed(BodyLimitError::Timeout) => 4,
            BodyState::Failed(BodyLimitError::Malformed) => 5,
            BodyState::Failed(BodyLimitError::Aborted) => 6,
            BodyState::Failed(BodyLimitError::Deadline) => 7,
        };
        self.0.store(v, Ordering::Release);
    }
}

pin_project_lite::pin_project! {
    /// A request body that fails with [`BodyLimitError`] when it grows past a size, stalls,
    /// misses its deadline or breaks, and records how far it got in an optional
    /// [`BodyProgress`].
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        remaining: u64,
        timeout: Duration,
        // The stall clock starts at the first read, not when the body is wrapped: the upstream
        // may take a while to be ready to read it.
        started: bool,
        progress: Option<Arc<BodyProgress>>,
        // The whole-body deadline and how many bytes it covers, until the first read.
        deadline: Option<(Duration, u64)>,
        // From the first read: when the covered bytes must have arrived, and how many remain.
        deadline_at: Option<(tokio::time::Instant, u64)>,
        // Fires at the stall deadline or the body deadline, whichever comes first.
        #[pin]
        sleep: tokio::time::Sleep,
    }
}

impl<B> LimitedBody<B> {
    /// Wraps `inner`, allowing `max_bytes` in total and `timeout` between frames.
    pub fn new(inner: B, max_bytes: u64, timeout: Duration) -> Self {
        LimitedBody {
            inner,
            remaining: max_bytes,
            timeout,
            started: false,
            progress: None,
            deadline: None,
            deadline_at: None,
            sleep: tokio::time::sleep(timeout),
        }
    }

    /// Fails with [`BodyLimitError::Deadline`] unless the first `covers` bytes (the part the
    /// gateway reads before answering) arrive within `deadline` of the first read; what comes
    /// after them is bounded by the stall timeout only.
    pub fn with_deadline(mut self, deadline: Duration, covers: u64) -> Self {
        self.deadline = Some((deadline, covers));
        self
    }

    /// Records the body's progress in `progress` as it is read.
    pub(crate) fn tracked(mut self, progress: Arc<BodyProgress>) -> Self {
        self.progress = Some(progress);
        self
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if !*this.started {
            *this.started = true;
            let now = tokio::time::Instant::now();
            *this.deadline_at = this.deadline.map(|(d, covers)| (now + d, covers));
            this.sleep
                .as_mut()
                .reset(first_due(now + *this.timeout, *this.deadline_at));
        }
        let (state, res) = match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                if len > *this.remaining {
                    let e = BodyLimitError::TooLarge;
                    (BodyState::Failed(e), Poll::Ready(Some(Err(e.into()))))
                } else {
                    *this.remaining -= len;
                    if let Some((_, covers)) = this.deadline_at {
                        if len >= *covers {
                            *this.deadline_at = None;
                        } else {
                            *covers -= len;
                        }
                    }
                    let stall = tokio::time::Instant::now() + *this.timeout;
                    this.sleep
                        .as_mut()
                        .reset(first_due(stall, *this.deadline_at));
                    // A reader may stop at the end without asking again.
                    let state = if this.inner.is_end_stream() {
                        BodyState::Complete
                    } else {
                        BodyState::Reading
                    };
                    (state, Poll::Ready(Some(Ok(frame))))
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let e: BoxError = e.into();
                let kind = BodyLimitError::of_downstream(e.as_ref());
                tracing::debug!(error = %e, kind = %kind, "request body broke off");
                (BodyState::Failed(kind), Poll::Ready(Some(Err(kind.into()))))
            }
            Poll::Ready(None) => (BodyState::Complete, Poll::Ready(None)),
            Poll::Pending => match std::future::Future::poll(this.sleep, cx) {
                Poll::Ready(()) => {
                    let missed = this
                        .deadline_at
                        .is_some_and(|(at, _)| tokio::time::Instant::now() >= at);
                    let e = if missed {
                        BodyLimitError::Deadline
                    } else {
                        BodyLimitError::Timeout
                    };
                    (BodyState::Failed(e), Poll::Ready(Some(Err(e.into()))))
                }
                Poll::Pending => (BodyState::WaitingOnClient, Poll::Pending),
            },
        };
        if let Some(p) = this.progress {
            p.set(state);
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

/// The earlier of a stall deadline and a body deadline, when there is one.
fn first_due(
    stall: tokio::time::Instant,
    deadline: Option<(tokio::time::Instant, u64)>,
) -> tokio::time::Instant {
    deadline.map_or(stall, |(at, _)| at.min(stall))
}

/// A JSON answer the gateway gives itself (scoring endpoint, admin API, demo storefront).
pub fn json_response(
    status: http::StatusCode,
    value: &serde_json::Value,
) -> http::Response<crate::upstream::ProxyBody> {
    let mut r = http::Response::new(crate::upstream::full_body(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// `{"error": message}` with `status`.
pub fn json_error(
    status: http::StatusCode,
    message: impl std::fmt::Display,
) -> http::Response<crate::upstream::ProxyBody> {
    json_response(status, &serde_json::json!({ "error": message.to_string() }))
}

/// The JSON answer to a body that could not be read whole: 413 with `too_large` (what the
/// limit is), 408 for a stalled client, 400 otherwise.
pub fn read_error_response(
    e: ReadError,
    too_large: impl std::fmt::Display,
) -> http::Response<crate::upstream::ProxyBody> {
    match e {
        ReadError::TooLarge => json_error(http::StatusCode::PAYLOAD_TOO_LARGE, too_large),
        ReadError::Stalled => json_error(
            http::StatusCode::REQUEST_TIMEOUT,
            "the request body was not received in time",
        ),
        ReadError::Failed => json_error(
            http::StatusCode::BAD_REQUEST,
            "the request body could not be read",
        ),
    }
}

/// Why a body could not be read into memory whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError {
    /// More bytes than the limit.
    TooLarge,
    /// The client stopped sending for longer than the body read timeout, or took longer than
    /// the body deadline.
    Stalled,
    /// The client went away or the stream broke.
    Failed,
}

/// Reads a whole body of at most `limit` bytes (a JSON request, an upload). Unlike
/// [`buffer_body`], which hands back a replayable body for the proxy to stream on, this answers
/// why it stopped, and trailers are ignored rather than ending the read.
pub async fn read_to_limit(
    body: crate::upstream::ProxyBody,
    limit: usize,
) -> Result<Bytes, ReadError> {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| match find_body_limit_error(&*e) {
            Some(BodyLimitError::TooLarge) => ReadError::TooLarge,
            Some(BodyLimitError::Timeout | BodyLimitError::Deadline) => ReadError::Stalled,
            Some(BodyLimitError::Malformed | BodyLimitError::Aborted) | None => ReadError::Failed,
        })?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(ReadError::TooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// A body read into memory up to a limit.
pub(crate) enum Buffered {
    /// The whole body.
    Whole(Bytes),
    /// Larger than the limit (or with trailers): what was read, followed by the rest.
    Partial(crate::upstream::ProxyBody),
}

/// Reads `body` into memory if it is at most `limit` bytes; otherwise gives back a body that
/// replays what was read and streams the rest.
pub(crate) async fn buffer_body(
    mut body: crate::upstream::ProxyBody,
    limit: usize,
) -> Result<Buffered, BoxError> {
    use http_body_util::BodyExt;
    let mut buf = bytes::BytesMut::new();
    loop {
        match body.frame().await {
            None => return Ok(Buffered::Whole(buf.freeze())),
            Some(Err(e)) => return Err(e),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    buf.extend_from_slice(&data);
                    if buf.len() > limit {
                        return Ok(Buffered::Partial(
                            Prefixed {
                                prefix: Some(buf.freeze()),
                                trailers: None,
                                rest: body,
                            }
                            .boxed_unsync(),
                        ));
                    }
                }
                Err(frame) => {
                    let trailers = frame.into_trailers().ok();
                    return Ok(Buffered::Partial(
                        Prefixed {
                            prefix: Some(buf.freeze()),
                            trailers,
                            rest: body,
                        }
                        .boxed_unsync(),
                    ));
                }
            },
        }
    }
}

/// Replays a prefix (and trailers already read), then the rest of a body.
struct Prefixed {
    prefix: Option<Bytes>,
    trailers: Option<HeaderMap>,
    rest: crate::upstream::ProxyBody,
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(p) = self.prefix.take() {
            if !p.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(p))));
            }
        }
        if let Some(t) = self.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nodes_own_resources_are_told_from_the_backends_refusal() {
        use std::io::{Error, ErrorKind};
        assert!(
            is_local_resource_error(&Error::from_raw_os_error(24)),
            "EMFILE"
        );
        assert!(is_local_resource_error(&Error::from(
            ErrorKind::AddrNotAvailable
        )));
        assert!(!is_local_resource_error(&Error::from(
            ErrorKind::ConnectionRefused
        )));
        assert!(
            !is_local_resource_error(&Error::from_raw_os_error(111)),
            "ECONNREFUSED"
        );
    }

    /// A body fed through a channel, for timing tests.
    struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

    impl Body for ChannelBody {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn body_stall_clock_starts_at_the_first_read() {
        use http_body_util::BodyExt;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut body = Box::pin(LimitedBody::new(
            ChannelBody(rx),
            1024,
            Duration::from_millis(100),
        ));
        // The upstream takes longer than the stall timeout before it starts reading.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let feeder = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send(Bytes::from_static(b"late but in time"))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            drop(tx);
        });
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(
            first.into_data().unwrap(),
            Bytes::from_static(b"late but in time")
        );
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(
            find_body_limit_error(err.as_ref()),
            Some(BodyLimitError::Timeout),
            "a real stall still times out"
        );
        feeder.abort();
    }

    /// Sends one byte every 100 ms, forever.
    fn trickle() -> (ChannelBody, tokio::task::JoinHandle<()>) {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let feeder = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if tx.send(Bytes::from_static(b"a")).await.is_err() {
                    return;
                }
            }
        });
        (ChannelBody(rx), feeder)
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_body_misses_its_deadline_but_not_past_what_it_covers() {
        use http_body_util::BodyExt;
        let stall = Duration::from_secs(1);
        let deadline = Duration::from_millis(450);

        let (rx, feeder) = trickle();
        let progress = Arc::new(BodyProgress::default());
        let mut body = Box::pin(
            LimitedBody::new(rx, 1024, stall)
                .with_deadline(deadline, 100)
                .tracked(progress.clone()),
        );
        let start = tokio::time::Instant::now();
        let err = loop {
            match body.frame().await.unwrap() {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(
            find_body_limit_error(err.as_ref()),
            Some(BodyLimitError::Deadline),
            "never stalled, yet too slow"
        );
        assert_eq!(start.elapsed(), deadline);
        assert_eq!(
            progress.state(),
            BodyState::Failed(BodyLimitError::Deadline)
        );
        feeder.abort();

        // Covering 3 bytes, it is met at 300 ms and the rest may trickle on.
        let (rx, feeder) = trickle();
        let mut body = Box::pin(LimitedBody::new(rx, 1024, stall).with_deadline(deadline, 3));
        let start = tokio::time::Instant::now();
        for _ in 0..10 {
            body.frame().await.unwrap().unwrap();
        }
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        feeder.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn body_progress_tells_waiting_on_the_client_from_complete() {
        use http_body_util::BodyExt;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let progress = Arc::new(BodyProgress::default());
        let mut body = Box::pin(
            LimitedBody::new(ChannelBody(rx), 1024, Duration::from_secs(10))
                .tracked(progress.clone()),
        );
        assert_eq!(progress.state(), BodyState::Reading, "not read yet");
        let waited = tokio::time::timeout(Duration::from_millis(50), body.frame()).await;
        assert!(waited.is_err());
        assert_eq!(progress.state(), BodyState::WaitingOnClient);
        tx.send(Bytes::from_static(b"part")).await.unwrap();
        body.frame().await.unwrap().unwrap();
        assert_eq!(
            progress.state(),
            BodyState::Reading,
            "a frame was handed on"
        );
        drop(tx);
        assert!(body.frame().await.is_none());
        assert_eq!(progress.state(), BodyState::Complete);

        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let progress = Arc::new(BodyProgress::default());
        let mut body = Box::pin(
            LimitedBody::new(ChannelBody(rx), 4, Duration::from_secs(10)).tracked(progress.clone()),
        );
        tx.send(Bytes::from_static(b"too long")).await.unwrap();
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(
            find_body_limit_error(err.as_ref()),
            Some(BodyLimitError::TooLarge)
        );
        assert_eq!(
            progress.state(),
            BodyState::Failed(BodyLimitError::TooLarge)
        );
    }

    #[test]
    fn strips_fixed_and_connection_listed_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn a_header_named_in_a_second_connection_header_is_stripped() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        h.append(header::CONNECTION, HeaderValue::from_static("x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-keep"]);
    }

    #[test]
    fn each_fixed_hop_by_hop_header_alone_is_stripped() {
        for name in hop_by_hop_names() {
            let mut h = HeaderMap::new();
            h.insert(name.clone(), HeaderValue::from_static("x"));
            h.insert("x-keep", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{name} was kept");
            assert!(h.contains_key("x-keep"));
        }
    }

    #[test]
    fn te_index_points_at_te() {
        assert_eq!(*hop_by_hop_names()[TE_INDEX], header::TE);
    }

    #[test]
    fn strips_a_lone_fixed_header_and_keeps_end_to_end_ones() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        h.append(header::ACCEPT, HeaderValue::from_static("a/b"));
        h.append(header::ACCEPT, HeaderValue::from_static("c/d"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before, "nothing hop-by-hop: nothing changes");
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("x"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }

    #[test]
    fn request_ids_are_checked() {
        assert!(valid_request_id(&HeaderValue::from_static("abc-123_x.y")));
        assert!(!valid_request_id(&HeaderValue::from_static("")));
        assert!(!valid_request_id(&HeaderValue::from_static("a b")));
        assert!(!valid_request_id(
            &HeaderValue::from_str(&"a".repeat(129)).unwrap()
        ));
        assert!(valid_request_id(&new_request_id()));
    }

    #[test]
    fn forwarded_headers_append_and_quote_v6() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        add_forwarded(
            &mut h,
            ForwardedMode::Both,
            "[::1]:5000".parse().unwrap(),
            "https",
            Some("shop.test"),
        );
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1, ::1");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=\"[::1]\";proto=https;host=\"shop.test\""
        );
    }

    fn authority_of(
        version: http::Version,
        uri: &str,
        hosts: &[&str],
    ) -> Result<(Option<String>, Option<String>), AuthorityError> {
        let mut b = http::Request::get(uri).version(version);
        for h in hosts {
            b = b.header("host", *h);
        }
        let a = request_authority(&b.body(()).unwrap())?;
        let replace = a.replace_host.map(|v| v.to_str().unwrap().to_string());
        Ok((a.host, replace))
    }

    #[test]
    fn one_authority_is_decided_per_request() {
        use http::Version as V;
        let ok = |h: &str, r: Option<&str>| Ok((Some(h.to_string()), r.map(str::to_string)));
        // HTTP/1.1 origin form: the Host header, kept as it is.
        assert_eq!(
            authority_of(V::HTTP_11, "/x", &["Shop.Test:8443"]),
            ok("shop.test", None)
        );
        assert_eq!(
            authority_of(V::HTTP_11, "/x", &["shop.test"]),
            ok("shop.test", None)
        );
        // Absolute form: the target wins and replaces Host (RFC 9112 §3.2.2).
        assert_eq!(
            authority_of(V::HTTP_11, "http://evil.test/x", &["localhost"]),
            ok("evil.test", Some("evil.test"))
        );
        // h2: :authority, sent as Host when Host is absent or spelled otherwise.
        assert_eq!(
            authority_of(V::HTTP_2, "https://localhost/x", &[]),
            ok("localhost", Some("localhost"))
        );
        assert_eq!(
            authority_of(V::HTTP_2, "https://localhost/x", &["localhost"]),
            ok("localhost", None)
        );
        assert_eq!(
            authority_of(V::HTTP_2, "https://localhost/x", &["LOCALHOST:443"]),
            ok("localhost", Some("localhost"))
        );
        assert_eq!(
            authority_of(V::HTTP_2, "/x", &["shop.test"]),
            ok("shop.test", None)
        );
        assert_eq!(authority_of(V::HTTP_10, "/x", &[]), Ok((None, None)));

        let e = |v, uri, hosts: &[&str]| authority_of(v, uri, hosts).unwrap_err();
        assert_eq!(
            e(V::HTTP_2, "https://localhost/x", &["evil.test"]),
            AuthorityError::Conflict
        );
        assert_eq!(
            e(V::HTTP_2, "https://localhost/x", &["localhost:8443"]),
            AuthorityError::Conflict
        );
        assert_eq!(
            e(V::HTTP_11, "/x", &["a.test", "b.test"]),
            AuthorityError::Duplicate
        );
        assert_eq!(
            e(V::HTTP_11, "/x", &["a.test", "a.test"]),
            AuthorityError::Duplicate
        );
        assert_eq!(e(V::HTTP_11, "/x", &[]), AuthorityError::Missing);
        assert_eq!(
            e(V::HTTP_11, "http://a.test/x", &[]),
            AuthorityError::Missing
        );
        assert_eq!(e(V::HTTP_2, "/x", &[]), AuthorityError::Missing);
        assert_eq!(e(V::HTTP_11, "/x", &[""]), AuthorityError::Invalid);
        assert_eq!(e(V::HTTP_11, "/x", &["."]), AuthorityError::Invalid);
        assert_eq!(e(V::HTTP_11, "/x", &["a b"]), AuthorityError::Invalid);
        assert_eq!(
            e(V::HTTP_11, "/x", &["user@a.test"]),
            AuthorityError::UserInfo
        );
        assert_eq!(
            e(V::HTTP_2, "https://user:pw@a.test/x", &[]),
            AuthorityError::UserInfo
        );
        assert_eq!(
            e(V::HTTP_11, "http://a.test/x", &["user@a.test"]),
            AuthorityError::UserInfo,
            "an invalid Host is refused even when the target wins"
        );
    }

    #[test]
    fn host_header_shortcut_agrees_with_authority_parsing() {
        let slow = |v: &str| {
            if v.contains('@') {
                return None;
            }
            let a = v.parse::<http::uri::Authority>().ok()?;
            finish_host(a.host())
        };
        for v in [
            "shop.test",
            "shop.test:8443",
            "shop.test.",
            "shop.test:",
            "a-b.c-d.test:1",
            "127.0.0.1:443",
            "Shop.Test",
            "[::1]:8443",
            "shop.test:99999999",
            "shop.test:99999",
            "shop.test:80:80",
            "sh op.test",
            "user@shop.test",
            ":8443",
            ".",
            "",
        ] {
            let r = http::Request::get("/x").header("host", v).body(()).unwrap();
            let fast = request_authority(&r).ok().and_then(|a| a.host);
            assert_eq!(fast, slow(v), "Host: {v:?}");
        }
    }
}
