//! The admin API: a request → the real admin listener ([`gateway_admin::serve`], over
//! loopback TCP, one connection per input) in front of [`FakeControl`], a [`Control`] over a
//! real [`Snapshot`] (routes, plugins, two CPU models, an experiment with a rollout), a real
//! content store in a scratch directory, and an audit trail in memory. Everything the router
//! parses runs: the bearer token, the path segments, `?version=` and `?limit=`, rollout
//! commands, upload bodies with their size limit, pins and `x-signature`, and the answers'
//! JSON.
//!
//! Input, as text: a request line `METHOD TARGET`, header lines `name: value`, an empty line,
//! then the body. `$TOKEN` in a header value is replaced by the admin token, so inputs get
//! past authentication; `Content-Length`, `Transfer-Encoding`, `Connection` and `Host` are
//! dropped (the client frames the body itself: this target fuzzes the router, not HTTP/1.1
//! framing, which hyper owns). A request the `http` crate refuses to build (an invalid method,
//! URI or header) never reaches the router and is skipped.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway_admin::{
    Activated, ArtifactError, Control, PluginStatus, ReloadRefused, ReloadReport, RolloutRefused,
    Target,
};
use gateway_config::Config;
use gateway_proxy::experiment::{Command, CommandError};
use gateway_proxy::metrics::Metrics;
use gateway_proxy::Snapshot;
use gateway_rollout::Decision;
use gateway_store::audit::{Action, Entry};
use gateway_store::{Kind, Store};
use http::{HeaderName, HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::fixtures::{self, SECRET};

/// How long one request may take before the target calls it a hang.
const HANG: Duration = Duration::from_secs(20);

/// Largest upload the fixture accepts (the 413 path is reachable with small inputs).
pub const MAX_UPLOAD_BYTES: usize = 4096;

/// Audit entries kept in memory.
const AUDIT_KEPT: usize = 256;

/// Accepted uploads after which the scratch store is emptied, so long runs stay bounded.
const STORE_RESET_AFTER: u64 = 512;

/// The Ed25519 key whose public half the fixture trusts (a fixed seed: the corpus holds
/// uploads it signed).
pub fn signing_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[7u8; 32])
}

fn fixture(store_dir: &std::path::Path) -> String {
    let key: String = signing_key()
        .verifying_key()
        .to_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!(
        r#"
[admin]
token_env = "GATEWAY_FUZZ_ADMIN_TOKEN"
max_upload_bytes = {MAX_UPLOAD_BYTES}
max_uploads_per_minute = 4000000000

[store]
dir = {store_dir:?}
trusted_keys = ["{key}"]
require_signatures = false

[[listeners]]
name = "http"
bind = "127.0.0.1:0"
protocol = "http"

[[upstreams]]
name = "app"
backends = ["127.0.0.1:9"]

[[upstreams]]
name = "next"
backends = ["127.0.0.1:9"]

[[routes]]
name = "shop"
upstream = "app"
plugins = ["auth", "hygiene"]

[[routes]]
name = "search"
path_prefix = "/search"
upstream = "app"

[[plugins]]
name = "auth"
path = "auth.wasm"

[[plugins]]
name = "hygiene"
path = "hygiene.wasm"
sha256 = "{pin}"

[[plugins]]
name = "spare"
path = "spare.wasm"

[[models]]
name = "recs"
path = "recs.safetensors"

[[models]]
name = "ctr"
path = "ctr.safetensors"

[feedback]
key_file = "feedback.key"

[[experiments]]
name = "ranking"
routes = ["search"]
assign_by = "cookie:shopper"

[[experiments.variants]]
name = "current"

[[experiments.variants]]
name = "next"
upstream = "next"

[experiments.rollout]
steps = [5, 50, 100]
"#,
        pin = gateway_store::sha256_hex(b"pinned"),
    )
}

/// The [`Control`] the fuzzed admin listener drives: a fixed snapshot, a real store in a
/// scratch directory, an in-memory audit trail. Uploads are accepted when their SHA-256
/// starts with an even hex digit, refused otherwise, so both answers are reachable.
pub struct FakeControl {
    snapshot: Arc<Snapshot>,
    recent: Mutex<VecDeque<Instant>>,
    audit: Mutex<VecDeque<Entry>>,
    seq: AtomicU64,
    accepted: AtomicU64,
    store_dir: PathBuf,
}

impl FakeControl {
    fn store(&self) -> Result<Store, ArtifactError> {
        Store::open(&self.store_dir).map_err(ArtifactError::Store)
    }

    fn configured(&self, kind: Kind, name: &str) -> bool {
        let c = &self.snapshot.config;
        match kind {
            Kind::Plugin => c.plugins.iter().any(|p| p.name == name),
            Kind::Model => c.models.iter().any(|m| m.name == name),
        }
    }
}

fn rejected(message: &str) -> ArtifactError {
    ArtifactError::Rejected(message.to_string().into())
}

impl Control for FakeControl {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.clone()
    }

    fn observed(&self) -> gateway_admin::Observations {
        gateway_admin::Observations::default()
    }

    fn plugins(&self, snapshot: &Snapshot) -> Vec<PluginStatus> {
        snapshot
            .config
            .plugins
            .iter()
            .map(|p| PluginStatus {
                idle_instances: p.instances as usize,
                name: p.name.clone(),
                version: "0123456789ab".into(),
            })
            .collect()
    }

    fn last_reload(&self) -> Option<ReloadReport> {
        Some(ReloadReport {
            at: std::time::SystemTime::now(),
            error: None,
        })
    }

    fn recent_uploads(&self) -> &Mutex<VecDeque<Instant>> {
        &self.recent
    }

    async fn reload_from_file(&self, _by: &str) -> Result<(), ReloadRefused> {
        Err(ReloadRefused::NoFile(
            "the fuzzed gateway was not started from a file".into(),
        ))
    }

    async fn activate(
        &self,
        kind: Kind,
        name: &str,
        target: Target<'_>,
    ) -> Result<Activated, ArtifactError> {
        if !self.configured(kind, name) {
            return Err(ArtifactError::NotConfigured(name.to_string()));
        }
        let store = self.store()?;
        match target {
            Target::Upload(sha) => {
                let even = sha
                    .chars()
                    .next()
                    .and_then(|c| c.to_digit(16))
                    .is_some_and(|d| d.is_multiple_of(2));
                if !even {
                    return Err(rejected("the fake refuses this content"));
                }
                store
                    .activate(kind, name, &sha)
                    .map_err(ArtifactError::Store)?;
                if self.accepted.fetch_add(1, Ordering::Relaxed) + 1 >= STORE_RESET_AFTER {
                    self.accepted.store(0, Ordering::Relaxed);
                    let _ = std::fs::remove_dir_all(&self.store_dir);
                    let _ = std::fs::create_dir_all(&self.store_dir);
                }
                Ok(Activated::Stored(sha))
            }
            Target::Rollback(prefix) => {
                let manifest = store.manifest().map_err(ArtifactError::Store)?;
                let Some(entry) = manifest.entries(kind).get(name) else {
                    if kind == Kind::Model {
                        let slot = self
                            .snapshot
                            .models
                            .get(name)
                            .ok_or_else(|| ArtifactError::NoUploads(name.to_string()))?;
                        let version = slot
                            .rollback(prefix)
                            .map_err(ArtifactError::NothingToRollBackTo)?;
                        return Ok(Activated::Held {
                            version,
                            slot: slot.clone(),
                        });
                    }
                    return Err(ArtifactError::NoUploads(name.to_string()));
                };
                let to = entry
                    .versions
                    .iter()
                    .filter(|v| **v != entry.active)
                    .find(|v| prefix.is_none_or(|p| v.starts_with(p)))
                    .cloned()
                    .ok_or_else(|| {
                        ArtifactError::NothingToRollBackTo(format!("no version of {name:?} fits"))
                    })?;
                store
                    .activate(kind, name, &to)
                    .map_err(ArtifactError::Store)?;
                Ok(Activated::Stored(to))
            }
        }
    }

    async fn audit(&self, action: Action) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let mut audit = self.audit.lock().expect("audit lock");
        audit.push_back(Entry {
            seq,
            at_ms: gateway_proxy::experiment::now_ms(),
            action,
            hash: format!("{seq:064x}"),
        });
        while audit.len() > AUDIT_KEPT {
            audit.pop_front();
        }
    }

    async fn audit_entries(&self) -> Result<Vec<Entry>, String> {
        Ok(self
            .audit
            .lock()
            .expect("audit lock")
            .iter()
            .cloned()
            .collect())
    }

    async fn rollout_command(
        &self,
        name: &str,
        command: Command,
    ) -> Result<Decision, RolloutRefused> {
        let experiment = self
            .snapshot
            .experiments
            .iter()
            .find(|e| e.spec().name == name)
            .ok_or_else(|| RolloutRefused::NoExperiment(name.to_string()))?;
        experiment
            .command(command, gateway_proxy::experiment::now_ms())
            .map_err(|e| match e {
                CommandError::NoRollout(_) => RolloutRefused::NoRollout(e.to_string()),
                CommandError::Transition(_) => RolloutRefused::Conflict(e.to_string()),
            })
    }

    async fn forget(
        &self,
        kind: Kind,
        name: &str,
        users: impl FnOnce(&Config) -> Vec<String> + Send,
    ) -> Result<(), ArtifactError> {
        if !self.configured(kind, name) {
            return Err(ArtifactError::NotConfigured(name.to_string()));
        }
        let users = users(&self.snapshot.config);
        if !users.is_empty() {
            return Err(ArtifactError::InUse {
                name: name.to_string(),
                users: users.join(", "),
            });
        }
        match self.store()?.remove(kind, name) {
            Ok(true) => Ok(()),
            Ok(false) => Err(ArtifactError::NoUploads(name.to_string())),
            Err(e) => Err(ArtifactError::Store(e)),
        }
    }
}

/// The listener's address, the server started once per process.
fn server() -> std::net::SocketAddr {
    static ADDR: OnceLock<std::net::SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let rt = fixtures::runtime();
        let store_dir = fixtures::scratch_dir("admin-store");
        let config = fixtures::config(&fixture(&store_dir));
        let registry = prometheus::Registry::new();
        let metrics = Metrics::new(&registry).expect("proxy metrics register");
        let families =
            gateway_scoring::serving::ModelFamilies::new(&registry).expect("model series register");
        let _guard = rt.enter();
        let mut snapshot =
            Snapshot::build(Arc::new(config), &metrics, &|_| None, None, &HashMap::new());
        snapshot.models = fixtures::model_slots(&families);
        let control = Arc::new(FakeControl {
            snapshot: Arc::new(snapshot),
            recent: Mutex::new(VecDeque::new()),
            audit: Mutex::new(VecDeque::new()),
            seq: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            store_dir,
        });
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("binding the admin listener on loopback");
        let addr = listener.local_addr().expect("the listener's address");
        rt.spawn(gateway_admin::serve(
            listener,
            registry,
            control,
            Arc::new(AtomicBool::new(false)),
            CancellationToken::new(),
        ));
        addr
    })
}

/// Builds the request an input describes, or `None` when `http` refuses it.
pub fn request(data: &[u8]) -> Option<Request<Full<Bytes>>> {
    let split = data.windows(2).position(|w| w == b"\n\n");
    let (head, body) = match split {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let (method, target) = lines.next()?.split_once(' ')?;
    let mut builder = Request::builder()
        .method(method)
        .uri(target.trim())
        .header(http::header::HOST, "admin.fuzz");
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = HeaderName::from_bytes(name.trim().as_bytes()).ok()?;
        if matches!(
            name,
            http::header::CONTENT_LENGTH
                | http::header::TRANSFER_ENCODING
                | http::header::CONNECTION
                | http::header::HOST
        ) {
            continue;
        }
        let value = value.trim().replace("$TOKEN", SECRET);
        builder = builder.header(name, HeaderValue::from_str(&value).ok()?);
    }
    builder.body(Full::new(Bytes::copy_from_slice(body))).ok()
}

/// Answers by status class (index 1 to 5) since the process started: how deep the inputs
/// get (a harness whose inputs all end in 400 fuzzes nothing behind the first check).
static ANSWERS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

/// Counts of the admin listener's answers by status class: `[_, 1xx, 2xx, 3xx, 4xx, 5xx]`.
pub fn answers() -> [u64; 6] {
    std::array::from_fn(|i| ANSWERS[i].load(Ordering::Relaxed))
}

/// The target (see the module docs).
pub fn run(data: &[u8]) {
    let Some(req) = request(data) else {
        return;
    };
    // The client sends absolute paths only.
    if !req.uri().path().starts_with('/') || req.uri().authority().is_some() {
        return;
    }
    let addr = server();
    fixtures::runtime().block_on(async move {
        let exchange = async {
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .expect("connecting to the admin listener");
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("an HTTP/1.1 handshake");
            let driver = tokio::spawn(conn);
            let answer = sender.send_request(req).await.unwrap_or_else(|e| {
                panic!("the admin listener dropped the request (a handler panicked?): {e}")
            });
            let status = answer.status();
            let body = answer
                .into_body()
                .collect()
                .await
                .unwrap_or_else(|e| panic!("the admin answer was cut off: {e}"))
                .to_bytes();
            drop(sender);
            let _ = driver.await;
            (status, body)
        };
        let (status, body) = tokio::time::timeout(HANG, exchange)
            .await
            .unwrap_or_else(|_| panic!("the admin listener did not answer in {HANG:?}"));
        ANSWERS[usize::from(status.as_u16() / 100).min(5)].fetch_add(1, Ordering::Relaxed);
        assert!(
            !status.is_server_error(),
            "{status} from the admin API: {}",
            String::from_utf8_lossy(&body)
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_become_requests_with_the_token() {
        let req = request(
            b"PUT /admin/plugins/auth\nauthorization: Bearer $TOKEN\ncontent-length: 9\n\nbody",
        )
        .unwrap();
        assert_eq!(req.method(), http::Method::PUT);
        assert_eq!(req.uri().path(), "/admin/plugins/auth");
        assert_eq!(
            req.headers()[http::header::AUTHORIZATION],
            format!("Bearer {SECRET}").as_str()
        );
        assert!(req.headers().get(http::header::CONTENT_LENGTH).is_none());
        assert!(request(b"no request line").is_none());
        assert!(request(b"GET /x\nbad header\x01: v\n\n").is_none());
    }
}
