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
        /// The node's explanation (its [`crate::admin::api::ErrorAnswer`]'s message, or the
        /// body as sent when it is not one).
        body: String,
    },
}

impl ClientError {
    /// A refusal with `status`, explained by the node's answer `body`.
    fn refused(status: u16, body: String) -> ClientError {
        let body = serde_json::from_str::<crate::admin::api::ErrorAnswer>(&body)
            .map(|a| a.error)
            .unwrap_or(body);
        ClientError::Refused { status, body }
    }
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
        self.call_with(method, path, body, progress, None).await
    }

    async fn call_with(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        progress: Option<&indicatif::ProgressBar>,
        signature: Option<&str>,
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
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", authority)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-length", len);
        if let Some(sig) = signature {
            req = req.header("x-signature", sig);
        }
        let req = req
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

    /// Uploads a plugin or model file as `name`; returns the node's answer (the version now
    /// active) and the time from the first byte sent to the node confirming activation.
    pub async fn push(
        &self,
        kind: crate::store::Kind,
        name: &str,
        file: &Path,
        sign_key: Option<&Path>,
    ) -> Result<(crate::admin::api::Activated, Duration), ClientError> {
        let bytes = std::fs::read(file).map_err(|source| ClientError::Read {
            path: file.display().to_string(),
            source,
        })?;
        let signature = match sign_key {
            Some(k) => Some(sign(k, &bytes)?),
            None => None,
        };
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
            .call_with(
                Method::PUT,
                &format!("/admin/{}/{name}", kind.collection()),
                Some(Bytes::from(bytes)),
                Some(&bar),
                signature.as_deref(),
            )
            .await;
        bar.finish_and_clear();
        let (status, body) = result?;
        if status != 200 {
            return Err(ClientError::refused(status, body));
        }
        let answer = serde_json::from_str(&body).map_err(|e| ClientError::Transport {
            url: self.url.clone(),
            reason: format!("unexpected answer {body:?}: {e}"),
        })?;
        Ok((answer, started.elapsed()))
    }

    /// The node's experiments and rollouts (`GET /admin/rollouts`).
    pub async fn rollouts(&self) -> Result<crate::admin::api::Rollouts, ClientError> {
        let (status, body) = self
            .call(Method::GET, "/admin/rollouts", None, None)
            .await?;
        if status != 200 {
            return Err(ClientError::refused(status, body));
        }
        serde_json::from_str(&body).map_err(|e| ClientError::Transport {
            url: self.url.clone(),
            reason: format!("unexpected answer {body:?}: {e}"),
        })
    }

    /// Sends a rollout command (`pause`, `resume`, `promote` or `abort`) for `experiment`.
    pub async fn rollout_command(
        &self,
        experiment: &str,
        command: &str,
    ) -> Result<crate::admin::api::RolloutCommanded, ClientError> {
        let path = format!("/admin/rollouts/{experiment}/{command}");
        let (status, body) = self.call(Method::POST, &path, None, None).await?;
        if status != 200 {
            return Err(ClientError::refused(status, body));
        }
        serde_json::from_str(&body).map_err(|e| ClientError::Transport {
            url: self.url.clone(),
            reason: format!("unexpected answer {body:?}: {e}"),
        })
    }

    /// The node's status document.
    pub async fn status(&self) -> Result<crate::admin::api::Status, ClientError> {
        let (status, body) = self.call(Method::GET, "/admin/status", None, None).await?;
        if status != 200 {
            return Err(ClientError::refused(status, body));
        }
        serde_json::from_str(&body).map_err(|e| ClientError::Transport {
            url: self.url.clone(),
            reason: format!("unexpected answer {body:?}: {e}"),
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Signs `bytes` with the Ed25519 key whose 32-byte seed is in `key_file` (hex); returns the
/// signature in hex, as `x-signature` carries it.
pub fn sign(key_file: &Path, bytes: &[u8]) -> Result<String, ClientError> {
    use ed25519_dalek::Signer;
    let read = |source| ClientError::Read {
        path: key_file.display().to_string(),
        source,
    };
    let text = std::fs::read_to_string(key_file).map_err(read)?;
    let seed: [u8; 32] = crate::config::decode_hex(&text)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            read(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "expected a 32-byte Ed25519 seed in hex",
            ))
        })?;
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    Ok(hex(&key.sign(bytes).to_bytes()))
}

/// Writes a new Ed25519 seed (hex) to `out`, readable by its owner only, and returns the
/// public key in hex for `[store] trusted_keys`.
pub fn generate_key(out: &Path) -> Result<String, ClientError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| ClientError::Read {
        path: out.display().to_string(),
        source,
    };
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(io)?;
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(io)?;
    std::io::Write::write_all(&mut f, hex(&seed).as_bytes()).map_err(io)?;
    Ok(hex(key.verifying_key().as_bytes()))
}
