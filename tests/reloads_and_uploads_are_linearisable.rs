//! Reloads and uploads are linearisable: while the file watcher (atomic saves of the config),
//! SIGHUP and `POST /admin/reload` keep reloading the running binary, a sequence of plugin and
//! model uploads, rollbacks and refused uploads is applied. After every acknowledged step, and
//! for as long as the next one has not started, the node serves exactly the versions the last
//! answers named (`x-plugin-versions`, `x-model-version`, `GET /_gateway/models`) and the
//! store records them as active: no reload that overlapped an upload brings back what it
//! replaced.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use rustls::pki_types::CertificateDer;

use crate::support::*;

const TOKEN: &str = "linearisable-token";
const STEPS: usize = 200;
/// How long each acknowledged state is watched before the next step, at least.
const WATCH: Duration = Duration::from_millis(30);

/// xorshift64*: reproducible choices without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from + 1))
    }
}

fn config(pki: &Pki, up: SocketAddr, model: &Path) -> String {
    std::fs::write(pki.path().join("admin.token"), TOKEN).unwrap();
    let extra = format!(
        "plugins = [\"p\"]\n{}[[models]]\nname = \"recs\"\npath = \"{}\"\n[store]\ndir = \"store\"\n\
         [proxy]\nversion_headers = true\n[server]\nwatch_debounce_ms = 10\n",
        plugin_table("p", "noop", "", "instances = 1"),
        model.display()
    );
    basic_config(pki, &[up], "", &extra).replace(
        "[admin]\nbind = \"127.0.0.1:0\"",
        "[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n\
         max_upload_bytes = 1000000\nmax_uploads_per_minute = 100000",
    )
}

/// The versions a node serves or records.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Versions {
    plugin: String,
    model: String,
}

/// One TLS connection to the node, made again when it closes.
struct Client {
    addr: SocketAddr,
    ca: CertificateDer<'static>,
    conn: Option<Sender>,
}

impl Client {
    async fn send(&mut self, req: impl Fn() -> Request<Full<Bytes>>) -> Got {
        for _ in 0..3 {
            if self.conn.is_none() {
                let c = tls_connect(self.addr, &self.ca, ClientOpts::default()).await;
                self.conn = Some(c.unwrap().sender);
            }
            match self.conn.as_mut().unwrap().send(req()).await {
                Ok(got) => return got,
                Err(_) => self.conn = None,
            }
        }
        panic!("the node did not answer three times in a row");
    }

    /// What the proxy and the scoring endpoint serve, and what the model list names.
    async fn served(&mut self) -> (Versions, String) {
        let page = self.send(|| get("localhost", "/x")).await;
        assert_eq!(page.status, 200, "{}", page.text());
        let plugin = page
            .header("x-plugin-versions")
            .and_then(|v| v.strip_prefix("p@"))
            .unwrap_or_else(|| panic!("no plugin version in {:?}", page.headers))
            .to_string();
        let rank = self
            .send(|| {
                Request::post("https://localhost/_gateway/models/recs/rank")
                    .header("host", "localhost")
                    .body(Full::new(Bytes::from_static(
                        br#"{"user": 1, "candidates": [1, 2, 3]}"#,
                    )))
                    .unwrap()
            })
            .await;
        assert_eq!(rank.status, 200, "{}", rank.text());
        let model = rank.header("x-model-version").unwrap().to_string();
        let list = self.send(|| get("localhost", "/_gateway/models")).await;
        let v: serde_json::Value = serde_json::from_slice(&list.body).unwrap();
        let listed = v["models"][0]["version"].as_str().unwrap().to_string();
        (Versions { plugin, model }, listed)
    }
}

/// The versions the store records as active (first 12 hex digits, as answers name them).
async fn recorded(admin: SocketAddr) -> Versions {
    let mut out = Vec::new();
    for kind in ["plugins", "models"] {
        let r = admin_call(admin, Method::GET, &format!("/admin/{kind}"), Some(TOKEN)).await;
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let active = v["artifacts"]
            .as_array()
            .unwrap()
            .first()
            .map(|a| a["active"].as_str().unwrap()[..12].to_string());
        out.push(active.unwrap_or_default());
    }
    Versions {
        model: out.pop().unwrap(),
        plugin: out.pop().unwrap(),
    }
}

fn atomic_write(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Keeps reloading the node three ways until `stop`: atomic saves of the config file (the
/// same settings and a new comment) for the watcher, SIGHUP, and `POST /admin/reload`.
fn start_reloaders(
    file: PathBuf,
    text: String,
    pid: u32,
    admin: SocketAddr,
    stop: Arc<AtomicBool>,
    api_reloads: Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let saves = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut rng = Rng(0x5EED_0001);
            for n in 0.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (file, text) = (file.clone(), format!("{text}\n# save {n}\n"));
                tokio::task::spawn_blocking(move || atomic_write(&file, &text))
                    .await
                    .unwrap();
                tokio::time::sleep(rng.millis(5, 30)).await;
            }
        })
    };
    let hangups = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut rng = Rng(0x5EED_0002);
            while !stop.load(Ordering::SeqCst) {
                let sent = tokio::process::Command::new("kill")
                    .args(["-HUP", &pid.to_string()])
                    .status()
                    .await
                    .unwrap();
                assert!(sent.success());
                tokio::time::sleep(rng.millis(2, 25)).await;
            }
        })
    };
    let api = tokio::spawn(async move {
        let mut rng = Rng(0x5EED_0003);
        while !stop.load(Ordering::SeqCst) {
            let r = admin_call(admin, Method::POST, "/admin/reload", Some(TOKEN)).await;
            assert_eq!(r.status, 200, "{}", r.text());
            api_reloads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(rng.millis(0, 10)).await;
        }
    });
    vec![saves, hangups, api]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_never_undo_an_acknowledged_upload_or_rollback() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let sample = |seed| {
        gateway::scoring::sample_model(&gateway::scoring::SampleSpec::embedding(20, 4, seed))
    };
    let model_file = pki.path().join("recs.safetensors");
    std::fs::write(&model_file, sample(1)).unwrap();
    let text = config(&pki, up.addr, &model_file);
    let file = pki.path().join("gateway.toml");
    std::fs::write(&file, &text).unwrap();
    let (child, https, admin, mut log) = spawn_gateway_binary_with_admin(&file).await;

    let plugins = [
        std::fs::read(plugin_wasm("noop")).unwrap(),
        std::fs::read(plugin_wasm("hygiene")).unwrap(),
    ];
    let models: Vec<Vec<u8>> = (2..=4).map(sample).collect();
    let wrong_world = std::fs::read(plugin_wasm("wrong-world")).unwrap();
    let version = gateway::plugin::content_version;
    let mut want = Versions {
        plugin: version(&plugins[0]),
        model: version(&sample(1)),
    };
    let mut client = Client {
        addr: https,
        ca: pki.ca_der.clone(),
        conn: None,
    };
    assert_eq!(
        client.served().await.0,
        want,
        "the node starts as configured"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let api_reloads = Arc::new(AtomicUsize::new(0));
    let reloaders = start_reloaders(
        file.clone(),
        text.clone(),
        child.id().unwrap(),
        admin,
        stop.clone(),
        api_reloads.clone(),
    );

    let started = Instant::now();
    let mut rng = Rng(0x5EED_1234);
    let mut violations = Vec::new();
    let mut acknowledged = 0;
    for step in 0..STEPS {
        // One step: a PUT or a rollback, its answer, and what it activated when it succeeded.
        let (what, path, body, kind) = match rng.below(8) {
            0..=2 => {
                let next = plugins.iter().find(|p| version(p) != want.plugin).unwrap();
                ("upload plugin", "/admin/plugins/p", next.clone(), "plugin")
            }
            3 => (
                "roll back plugin",
                "/admin/plugins/p/rollback",
                vec![],
                "plugin",
            ),
            4 | 5 => {
                let candidates: Vec<_> =
                    models.iter().filter(|m| version(m) != want.model).collect();
                let next = candidates[rng.below(candidates.len() as u64) as usize];
                ("upload model", "/admin/models/recs", next.clone(), "model")
            }
            6 => (
                "roll back model",
                "/admin/models/recs/rollback",
                vec![],
                "model",
            ),
            _ => {
                let (path, body) = if rng.below(2) == 0 {
                    ("/admin/plugins/p", wrong_world.clone())
                } else {
                    ("/admin/models/recs", b"not a model".to_vec())
                };
                ("refused upload", path, body, "none")
            }
        };
        let method = if body.is_empty() {
            Method::POST
        } else {
            Method::PUT
        };
        let r = admin_send(admin, method, path, TOKEN, body).await;
        match (kind, r.status.as_u16()) {
            ("none", 422) => {}
            // A rollback with nothing to roll back to changes nothing.
            (_, 404 | 409) if what.starts_with("roll back") => {}
            ("plugin" | "model", 200) => {
                let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                let named = v["version"].as_str().unwrap().to_string();
                if kind == "plugin" {
                    want.plugin = named;
                } else {
                    want.model = named;
                }
                acknowledged += 1;
            }
            _ => panic!("step {step} ({what}) answered {}: {}", r.status, r.text()),
        }
        // Until the next step starts, the node serves and records what was acknowledged, while
        // reloads keep landing.
        let answered = Instant::now();
        let watch_until = answered + WATCH + rng.millis(0, 20);
        let mut probes = 0;
        while probes < 3 || Instant::now() < watch_until {
            let (served, listed) = client.served().await;
            if served != want || listed != want.model {
                violations.push(format!(
                    "step {step} ({what}): acknowledged {want:?}, served {served:?}, \
                     listed model {listed} ({:?} after the answer)",
                    answered.elapsed()
                ));
                break;
            }
            probes += 1;
        }
        // Nothing recorded yet means the config file's version serves.
        let record = recorded(admin).await;
        let differs = |recorded: &str, want: &str| !recorded.is_empty() && recorded != want;
        if differs(&record.plugin, &want.plugin) || differs(&record.model, &want.model) {
            violations.push(format!(
                "step {step} ({what}): acknowledged {want:?}, the store records {record:?}"
            ));
        }
        if violations.len() >= 5 {
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    for r in reloaders {
        r.await.unwrap();
    }
    let elapsed = started.elapsed();

    let mut hangups = 0;
    let mut watched = 0;
    while let Ok(line) = log.try_recv() {
        hangups += line.contains("SIGHUP received") as usize;
        watched += line.contains("watched files changed, reloading") as usize;
    }
    assert!(
        violations.is_empty(),
        "{} violations in {STEPS} steps:\n{}",
        violations.len(),
        violations.join("\n")
    );
    // The interleaving happened: every kind of reload ran many times among the steps.
    let api = api_reloads.load(Ordering::SeqCst);
    assert!(
        acknowledged >= STEPS / 2,
        "{acknowledged} steps acknowledged"
    );
    assert!(
        api >= STEPS && hangups >= STEPS / 4 && watched >= STEPS / 4,
        "too few reloads: {api} API, {hangups} SIGHUP, {watched} watcher in {elapsed:?}"
    );

    // Quiet again: one more reload, and the last acknowledged versions still serve.
    let r = admin_call(admin, Method::POST, "/admin/reload", Some(TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(client.served().await.0, want);
    eprintln!(
        "{STEPS} steps ({acknowledged} acknowledged) among {api} API, {hangups} SIGHUP and \
         {watched} watcher reloads in {elapsed:?}"
    );
}
