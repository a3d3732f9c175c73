//! Keep-alive connections to one backend: a LIFO stack of idle HTTP/1.1 connections, or one
//! shared multiplexed h2 connection.
//!
//! A pooled HTTP/1.1 connection goes back on the stack when its response body has been read to
//! the end, without an extra task per request. A request that could not be written on a pooled
//! connection (the backend had closed it) is handed back by hyper and sent on a fresh
//! connection, whatever its method, since the backend never saw it.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::ProxyBody;

/// Why a request could not be exchanged with a backend.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No TCP connection could be established (refused, unreachable, unresolvable).
    #[error("connecting to {authority}: {source}")]
    Connect {
        /// The backend.
        authority: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Connecting took longer than the connect timeout.
    #[error("connecting to {authority}: timed out")]
    ConnectTimeout {
        /// The backend.
        authority: String,
    },
    /// The exchange failed after the connection was established.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// Most bytes an HTTP/1.1 upstream connection reads ahead of the client (hyper's default is
/// about 400 KiB): what a response whose client stopped reading holds on its upstream side
/// until the send timeout, and the largest response head an upstream may send.
const READ_BUFFER_BYTES: usize = 64 * 1024;

struct Idle {
    sender: http1::SendRequest<ProxyBody>,
    since: Instant,
}

/// Connections to one backend.
pub struct Conns {
    authority: http::uri::Authority,
    h2: bool,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    idle: Mutex<Vec<Idle>>,
    shared_h2: Mutex<Option<http2::SendRequest<ProxyBody>>>,
}

impl Conns {
    /// No connection is opened until the first request.
    pub fn new(
        authority: http::uri::Authority,
        h2: bool,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Arc<Conns> {
        Arc::new(Conns {
            authority,
            h2,
            connect_timeout,
            idle_timeout,
            max_idle,
            idle: Mutex::new(Vec::new()),
            shared_h2: Mutex::new(None),
        })
    }

    async fn connect_tcp(&self) -> Result<TcpStream, SendError> {
        let authority = || self.authority.to_string();
        let port = self.authority.port_u16().unwrap_or(80);
        let connect = async {
            let mut last = None;
            for addr in tokio::net::lookup_host((self.authority.host(), port)).await? {
                match TcpStream::connect(addr).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "host resolved to no address")
            }))
        };
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                return Err(SendError::Connect {
                    authority: authority(),
                    source,
                })
            }
            Err(_) => {
                return Err(SendError::ConnectTimeout {
                    authority: authority(),
                })
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    fn take_idle(&self) -> Option<http1::SendRequest<ProxyBody>> {
        let mut idle = self.idle.lock().expect("pool lock");
        while let Some(conn) = idle.pop() {
            if conn.since.elapsed() < self.idle_timeout && !conn.sender.is_closed() {
                return Some(conn.sender);
            }
        }
        None
    }

    fn put_idle(&self, sender: http1::SendRequest<ProxyBody>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().expect("pool lock");
        // The oldest connections sit at the bottom of the stack; drop the expired ones.
        let expired = idle
            .iter()
            .take_while(|c| now.saturating_duration_since(c.since) >= self.idle_timeout)
            .count();
        idle.drain(..expired);
        if idle.len() < self.max_idle {
            idle.push(Idle { sender, since: now });
        }
    }

    /// Sends a request (URI in origin form or absolute; `Host` as the caller set it) and
    /// returns the response, whose body returns the connection to the pool when read to the end.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, SendError> {
        if self.h2 {
            return Box::pin(self.send_h2(req)).await;
        }
        let mut req = req;
        while let Some(mut sender) = self.take_idle() {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.pooled(resp, sender)),
                Err(mut e) => match e.take_message() {
                    // Never written: the backend closed this connection; try another.
                    Some(r) => req = r,
                    None => return Err(SendError::Http(e.into_error())),
                },
            }
        }
        // A new connection is the rare path; boxing it keeps every request's future small.
        Box::pin(self.send_on_new_connection(req)).await
    }

    async fn send_on_new_connection(
        self: &Arc<Self>,
        req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, SendError> {
        let stream = self.connect_tcp().await?;
        let (mut sender, conn) = http1::Builder::new()
            .max_buf_size(READ_BUFFER_BYTES)
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let resp = sender.send_request(req).await?;
        Ok(self.pooled(resp, sender))
    }

    fn pooled(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        sender: http1::SendRequest<ProxyBody>,
    ) -> Response<ProxyBody> {
        use http_body_util::BodyExt;
        let body_done = resp.body().is_end_stream();
        if body_done {
            self.put_idle(sender);
            return resp.map(|b| b.map_err(Into::into).boxed_unsync());
        }
        let conns = self.clone();
        resp.map(move |b| {
            PooledBody {
                inner: b,
                give_back: Some((sender, conns)),
            }
            .boxed_unsync()
        })
    }

    async fn send_h2(&self, req: Request<ProxyBody>) -> Result<Response<ProxyBody>, SendError> {
        use http_body_util::BodyExt;
        let existing = {
            let guard = self.shared_h2.lock().expect("pool lock");
            guard.as_ref().filter(|s| !s.is_closed()).cloned()
        };
        let mut sender = match existing {
            Some(s) => s,
            None => {
                let stream = self.connect_tcp().await?;
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Duration::from_secs(20))
                    .handshake(TokioIo::new(stream))
                    .await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                *self.shared_h2.lock().expect("pool lock") = Some(sender.clone());
                sender
            }
        };
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        Ok(resp.map(|b| b.map_err(Into::into).boxed_unsync()))
    }
}

/// A response body that returns its HTTP/1.1 connection to the pool once read to the end.
struct PooledBody {
    inner: Incoming,
    give_back: Option<(http1::SendRequest<ProxyBody>, Arc<Conns>)>,
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let res = Pin::new(&mut self.inner).poll_frame(cx);
        match &res {
            Poll::Ready(None) => {
                if let Some((sender, conns)) = self.give_back.take() {
                    conns.put_idle(sender);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                self.give_back = None;
            }
            // Servers stop polling once a body says it has ended, so this may be the last call.
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => {
                if let Some((sender, conns)) = self.give_back.take() {
                    conns.put_idle(sender);
                }
            }
            _ => {}
        }
        res.map(|o| o.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
