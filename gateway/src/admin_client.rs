//! The command-line side of the admin API: `gateway plugin push`, `gateway model push` and
//! `gateway status` against a running node's admin URL, with a progress bar for uploads.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;

/// Why a call to a node failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The admin URL is not `http://host:port`.
    #[error("admin URL {0:?} must look like http://127.0.0.1:9901")]
    Url(String),
    /// Reading the file or token failed.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The node could not be reached or the exchange broke.
    #[error("talking to {url}: {reason}")]
    Transport {
        /// The admin URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The node answered with an error status.
    #[error("{status}: {body}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The node's explanation.
        body: String,
    },
}

/// How to reach a node's admin API.
pub struct Node {
    /// `http://host:port`.
    pub url: String,
    /// Bearer token.
    pub token: String,
}

impl Node {
    /// Reads the token from `token_file`, or from `$GATEWAY_ADMIN_TOKEN`.
    pub fn new(url: &str, token_file: Option<&Path>) -> Result<Node, ClientError> {
        let token = match token_file {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|source| ClientError::Read {
                    path: p.display().to_string(),
                    source,
                })?
                .trim()
                .to_string(),
            None => std::env::var("GATEWAY_ADMIN_TOKEN").unwrap_or_default(),
        };
        Ok(Node {
            url: url.trim_end_matches('/').to_string(),
            token,
        })
    }

    /// Sends a request; `body` is streamed in chunks, each reported to `progress`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        progress: Option<&indicatif::ProgressBar>,
    ) -> Result<(u16, String), ClientError> {
        let authority = self
            .url
            .strip_prefix("http://")
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| ClientError::Url(self.url.clone()))?;
        let transport = |reason: String| ClientError::Transport {
            url: self.url.clone(),
            reason,
        };
        let stream = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| transport(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport(e.to_string()))?;
        tokio::spawn(conn);
        let bytes = body.unwrap_or_default();
        let len = bytes.len();
        let chunks: Vec<Bytes> = (0..len)
            .step_by(64 * 1024)
            .map(|i| bytes.slice(i..(i + 64 * 1024).min(len)))
            .collect();
        let bar = progress.cloned();
        let frames = futures_util::stream::iter(chunks.into_iter().map(move |c| {
            if let Some(b) = &bar {
                b.inc(c.len() as u64);
            }
            Ok::<_, std::convert::Infallible>(Frame::data(c))
        }));
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", authority)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-length", len)
            .body(StreamBody::new(frames))
            .map_err(|e| transport(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let text = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| transport(e.to_string()))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&text).into_owned()))
    }

    /// Uploads a plugin or model file as `name`; returns the node's answer and the time from
    /// the first byte sent to the node confirming activation.
    pub async fn push(
        &self,
        kind: &str,
        name: &str,
        file: &Path,
    ) -> Result<(String, Duration), ClientError> {
        let bytes = std::fs::read(file).map_err(|source| ClientError::Read {
            path: file.display().to_string(),
            source,
        })?;
        let bar = indicatif::ProgressBar::new(bytes.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_message(format!("uploading {name}"));
        let started = Instant::now();
        let result = self
            .call(
                Method::PUT,
                &format!("/admin/{kind}/{name}"),
                Some(Bytes::from(bytes)),
                Some(&bar),
            )
            .await;
        bar.finish_and_clear();
        let (status, body) = result?;
        if status != 200 {
            return Err(ClientError::Refused { status, body });
        }
        Ok((body, started.elapsed()))
    }

    /// The node's status document.
    pub async fn status(&self) -> Result<String, ClientError> {
        let (status, body) = self.call(Method::GET, "/admin/status", None, None).await?;
        if status != 200 {
            return Err(ClientError::Refused { status, body });
        }
        Ok(body)
    }
}
