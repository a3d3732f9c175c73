//! Plugins and models pulled from a real OCI registry on loopback (Debian's `docker-registry`,
//! the CNCF distribution registry, started here with its storage in a temp dir): published
//! with `gateway plugin publish` / `gateway model publish`, pulled by digest and by tag into
//! the content store, a moved tag converged on without a config change, a registry that goes
//! down leaves the node serving what it has (and a restart with it down serves from the
//! store), a corrupted blob and an artifact of the wrong media type are refused with a clear
//! error while the old version keeps serving, and what each node runs is reported in
//! `/admin/status` and `gateway_artifact_info`.
//!
//! `docker-registry` comes with the Debian package of that name (`scripts/setup.sh` installs
//! it); the tests fail, naming that script, where it is missing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::*;

/// The registry binary; a missing one fails the test (never a silent pass).
fn registry_binary() -> PathBuf {
    let path = PathBuf::from("/usr/bin/docker-registry");
    assert!(
        path.is_file(),
        "docker-registry is not installed: run scripts/setup.sh (it installs the Debian package \
         `docker-registry`, the distribution registry these tests pull from)"
    );
    path
}

/// A distribution registry on 127.0.0.1, storing in its own temp dir; killed when dropped.
struct Registry {
    child: Option<tokio::process::Child>,
    addr: std::net::SocketAddr,
    storage: tempfile::TempDir,
    _config: tempfile::TempDir,
}

impl Registry {
    async fn start() -> Registry {
        let storage = tempfile::tempdir().unwrap();
        let config = tempfile::tempdir().unwrap();
        // The registry cannot listen on port 0: take a free port and hand it over (another
        // process could take it in between; then the start is tried on another port).
        for _ in 0..5 {
            let addr = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap()
            };
            let yml = config.path().join("config.yml");
            std::fs::write(
                &yml,
                format!(
                    "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                    storage.path().display()
                ),
            )
            .unwrap();
            let mut child = tokio::process::Command::new(registry_binary())
                .arg("serve")
                .arg(&yml)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("starting docker-registry");
            if ready(addr).await {
                return Registry {
                    child: Some(child),
                    addr,
                    storage,
                    _config: config,
                };
            }
            let _ = child.kill().await;
        }
        panic!("docker-registry did not answer on any of 5 ports");
    }

    async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    fn reference(&self, repo_and_tag: &str) -> String {
        format!("oci://{}/{repo_and_tag}", self.addr)
    }

    /// The file holding a blob's bytes in the registry's storage.
    fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.storage
            .path()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

/// Waits (up to 10 s) until `GET /v2/` answers 200 at `addr`.
async fn ready(addr: std::net::SocketAddr) -> bool {
    for _ in 0..100 {
        let connected = tokio::time::timeout(Duration::from_secs(1), async {
            tokio::net::TcpStream::connect(addr).await
        })
        .await;
        if matches!(connected, Ok(Ok(_))) {
            let mut s = plain_connect(addr).await;
            let req = Request::get("/v2/")
                .header("host", addr.to_string())
                .body(Full::new(Bytes::new()))
                .unwrap();
            if s.send(req).await.is_ok_and(|got| got.status == 200) {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// `gateway plugin|model publish FILE REFERENCE`: the digest it prints, or its error output.
async fn publish(kind: &str, file: &Path, reference: &str) -> Result<String, String> {
    publish_with(kind, file, reference, &[]).await
}

/// [`publish`] with more arguments (`--sign-key KEY`).
async fn publish_with(
    kind: &str,
    file: &Path,
    reference: &str,
    args: &[&std::ffi::OsStr],
) -> Result<String, String> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args([kind, "publish"])
        .arg(file)
        .arg(reference)
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(format!("{stdout}{stderr}"));
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with(reference))
        .unwrap_or_else(|| panic!("publish printed no reference@digest line:\n{stdout}"));
    let digest = line.rsplit_once('@').unwrap().1.to_string();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{line}"
    );
    Ok(digest)
}

fn sha256(path: &Path) -> String {
    gateway::store::sha256_hex(&std::fs::read(path).unwrap())
}

/// The digest `/admin/status` reports for `name`'s registry source, and the serving plugin's
/// version (first 12 hex digits of its SHA-256).
async fn serving(gw: &TestGateway, name: &str) -> (Option<String>, Option<String>) {
    let v = status(gw).await;
    let digest = v["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["digest"].as_str())
        .map(str::to_string);
    let version = v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["version"].as_str())
        .map(str::to_string);
    (digest, version)
}

fn config(pki: &Pki, up: std::net::SocketAddr, plugin_source: &str, model_source: &str) -> String {
    config_with(pki, up, plugin_source, Some(model_source), "")
}

/// A node whose route runs plugin `p` from `plugin_source` (its tag re-resolved every
/// second), serving model `recs` from `model_source` when given, with `store` added to
/// `[store]`.
fn config_with(
    pki: &Pki,
    up: std::net::SocketAddr,
    plugin_source: &str,
    model_source: Option<&str>,
    store: &str,
) -> String {
    let model = model_source.map_or(String::new(), |m| {
        format!("[[models]]\nname = \"recs\"\nsource = \"{m}\"\n[scoring]\nbackend = \"cpu\"\n")
    });
    let extra = format!(
        "plugins = [\"p\"]\n\
         [[plugins]]\nname = \"p\"\nsource = \"{plugin_source}\"\noci_resolve_interval_s = 1\ninstances = 1\n\
         {model}\
         [store]\ndir = \"store\"\n{store}\n"
    );
    std::fs::write(pki.path().join("admin.token"), TOKEN).unwrap();
    basic_config(pki, &[up], "", &extra).replace(
        "[admin]\nbind = \"127.0.0.1:0\"",
        "[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"",
    )
}

const TOKEN: &str = "oci-token";

/// `GET /admin/status` as JSON.
async fn status(gw: &TestGateway) -> serde_json::Value {
    let got = admin_call(
        gw.gateway.admin_addr(),
        http::Method::GET,
        "/admin/status",
        Some(TOKEN),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    serde_json::from_slice(&got.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_are_published_pulled_converged_and_verified() {
    let mut registry = Registry::start().await;
    let (noop, hygiene, canary) = (
        plugin_wasm("noop"),
        plugin_wasm("hygiene"),
        plugin_wasm("hello"),
    );
    let pki = Pki::new();
    let model = sample_model_file(pki.path());

    // Published with the CLI: the plugin to a tag, the model to a tag pulled by its digest.
    let tag = registry.reference("plugins/p:stable");
    let d_noop = publish("plugin", &noop, &tag).await.unwrap();
    let model_ref = registry.reference("models/recs:v1");
    let d_model = publish("model", &model, &model_ref).await.unwrap();
    // What the CLI refuses to publish: a plugin that is not a component.
    let not_wasm = pki.path().join("bad.wasm");
    std::fs::write(&not_wasm, b"not a component").unwrap();
    assert!(
        publish("plugin", &not_wasm, &registry.reference("plugins/bad:v1"))
            .await
            .is_err()
    );

    let up = Upstream::named("a").await;
    let pinned_model = format!("oci://{}/models/recs@{d_model}", registry.addr);
    let toml = config(&pki, up.addr, &tag, &pinned_model);
    let gw = TestGateway::start(&toml, pki.path()).await;

    // Pulled by tag and by digest into the store, and reported.
    let (digest, version) = serving(&gw, "p").await;
    assert_eq!(digest.as_deref(), Some(d_noop.as_str()));
    assert_eq!(version.as_deref(), Some(&sha256(&noop)[..12]));
    assert!(pki
        .path()
        .join("store/plugins")
        .join(format!("{}.wasm", sha256(&noop)))
        .is_file());
    assert!(pki
        .path()
        .join("store/models")
        .join(format!("{}.safetensors", sha256(&model)))
        .is_file());
    let sources = status(&gw).await["sources"].to_string();
    assert!(
        sources.contains(&d_model),
        "the model's digest is reported: {sources}"
    );
    // The status page's document (no token) shows them too.
    let page = admin_get(gw.gateway.admin_addr(), "/status.json")
        .await
        .text();
    assert!(
        page.contains(&d_model),
        "the status page shows the digest: {page}"
    );
    assert_eq!(
        gw.metric(
            "gateway_artifact_info",
            &[("kind", "plugin"), ("name", "p"), ("digest", &d_noop)]
        ),
        1.0
    );
    assert_eq!(
        gw.metric(
            "gateway_artifact_info",
            &[("kind", "model"), ("name", "recs"), ("digest", &d_model)]
        ),
        1.0
    );
    assert!(internal_header_reaches_upstream(&gw, &pki, &up).await);

    // The tag moves: the node converges on the new version without a config change.
    let d_hygiene = publish("plugin", &hygiene, &tag).await.unwrap();
    assert_ne!(d_hygiene, d_noop);
    let moved = std::time::Instant::now();
    let mut converged = false;
    for _ in 0..150 {
        if serving(&gw, "p").await.0.as_deref() == Some(d_hygiene.as_str()) {
            converged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(converged, "the node did not converge on the moved tag");
    eprintln!(
        "converged on the moved tag {} ms after it moved (oci_resolve_interval_s = 1)",
        moved.elapsed().as_millis()
    );
    // The change is on the audit trail, by the gateway: appended just after the swap, so
    // it may land a moment after the new version serves.
    let audit_path = pki.path().join("store/audit.log");
    let audited = || {
        std::fs::read_to_string(&audit_path)
            .is_ok_and(|a| a.contains("\"tag_moved\"") && a.contains(&d_hygiene))
    };
    assert!(
        eventually(Duration::from_secs(5), audited).await,
        "{}",
        std::fs::read_to_string(&audit_path).unwrap_or_default()
    );
    assert_eq!(
        serving(&gw, "p").await.1.as_deref(),
        Some(&sha256(&hygiene)[..12])
    );
    assert!(!internal_header_reaches_upstream(&gw, &pki, &up).await);
    assert_eq!(
        gw.metric(
            "gateway_artifact_info",
            &[("name", "p"), ("digest", &d_noop)]
        ),
        0.0,
        "only the digest that serves is reported"
    );

    // An upload to a name pulled from a registry would be overridden by the next
    // resolution: it is refused, and what serves is untouched.
    let upload = admin_send(
        gw.gateway.admin_addr(),
        http::Method::PUT,
        "/admin/plugins/p",
        TOKEN,
        std::fs::read(&noop).unwrap(),
    )
    .await;
    assert_eq!(upload.status, 422, "{}", upload.text());
    assert!(
        upload
            .text()
            .contains("publish the new version to the registry"),
        "{}",
        upload.text()
    );
    assert_eq!(
        serving(&gw, "p").await.0.as_deref(),
        Some(d_hygiene.as_str())
    );

    // A corrupted blob: published under another tag, its data overwritten in the registry's
    // storage (same length, other bytes), then the watched tag moved to it. The pull is
    // refused and counted; the old version keeps serving.
    let staging = registry.reference("plugins/p:staging");
    let d_canary = publish("plugin", &canary, &staging).await.unwrap();
    let layer = format!("sha256:{}", sha256(&canary));
    let data = registry.blob_data(&layer);
    let mut bytes = std::fs::read(&data).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    bytes[n - 1] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();
    assert_eq!(publish("plugin", &canary, &tag).await.unwrap(), d_canary);
    let refused = eventually(Duration::from_secs(15), || {
        gw.metric(
            "gateway_oci_pulls_total",
            &[("artifact", "plugin/p"), ("outcome", "digest_mismatch")],
        ) >= 1.0
    })
    .await;
    assert!(refused, "the corrupted blob was not refused");
    assert_eq!(
        serving(&gw, "p").await.0.as_deref(),
        Some(d_hygiene.as_str())
    );
    assert!(!internal_header_reaches_upstream(&gw, &pki, &up).await);
    assert!(!pki
        .path()
        .join("store/plugins")
        .join(format!("{}.wasm", sha256(&canary)))
        .exists());

    // The registry goes down: failures are counted, the node keeps serving what it has.
    registry.stop().await;
    let before = gw.metric(
        "gateway_oci_pulls_total",
        &[("artifact", "plugin/p"), ("outcome", "registry_error")],
    );
    let counted = eventually(Duration::from_secs(15), || {
        gw.metric(
            "gateway_oci_pulls_total",
            &[("artifact", "plugin/p"), ("outcome", "registry_error")],
        ) > before
    })
    .await;
    assert!(counted, "an unreachable registry was not counted");
    assert_eq!(
        serving(&gw, "p").await.0.as_deref(),
        Some(d_hygiene.as_str())
    );
    assert!(!internal_header_reaches_upstream(&gw, &pki, &up).await);

    // A restart while the registry is down serves what the store holds from the last pull.
    gw.gateway.shutdown().await;
    let again = TestGateway::start(&toml, pki.path()).await;
    assert_eq!(
        serving(&again, "p").await.0.as_deref(),
        Some(d_hygiene.as_str())
    );
    assert!(!internal_header_reaches_upstream(&again, &pki, &up).await);
    again.gateway.shutdown().await;

    // A node with nothing pulled before cannot start without the registry, and says why.
    let fresh = Pki::new();
    let toml = config(&fresh, up.addr, &tag, &pinned_model);
    let config = gateway::Config::from_toml(&toml, "test.toml", fresh.path()).unwrap();
    let err = match gateway::Gateway::start(config, prometheus::Registry::new()).await {
        Ok(_) => panic!("started without the registry and nothing in the store"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("plugin/p") && err.contains(&tag), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_of_another_media_type_is_refused() {
    let registry = Registry::start().await;
    let pki = Pki::new();
    let model = sample_model_file(pki.path());
    // A model artifact named as a plugin's source, and a plugin artifact as a model's.
    let as_model = registry.reference("models/recs:v1");
    publish("model", &model, &as_model).await.unwrap();
    let as_plugin = registry.reference("plugins/noop:v1");
    publish("plugin", &plugin_wasm("noop"), &as_plugin)
        .await
        .unwrap();
    let up = Upstream::named("a").await;
    for (plugin, model, wrong) in [
        (&as_model, &as_model, "plugin/p"),
        (&as_plugin, &as_plugin, "model/recs"),
    ] {
        let toml = config(&pki, up.addr, plugin, model);
        let config = gateway::Config::from_toml(&toml, "test.toml", pki.path()).unwrap();
        let err = match gateway::Gateway::start(config, prometheus::Registry::new()).await {
            Ok(_) => panic!("an artifact of another media type started"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(wrong) && err.contains("not a") && err.contains("artifact"),
            "{err}"
        );
    }
}

#[test]
fn path_and_source_are_exclusive_and_located() {
    let pki = Pki::new();
    let both = basic_config(
        &pki,
        &["127.0.0.1:9".parse().unwrap()],
        "",
        "[[plugins]]\nname = \"p\"\npath = \"p.wasm\"\nsource = \"oci://127.0.0.1:5000/p:v1\"\n\
         [[models]]\nname = \"m\"\nsource = \"oci://127.0.0.1:5000/m\"\n\
         [[models]]\nname = \"n\"\nsource = \"oci://127.0.0.1:5000/n:v1\"\n\
         [[models]]\nname = \"o\"\npath = \"o.safetensors\"\noci_resolve_interval_s = 5\n\
         [[models]]\nname = \"q\"\n",
    );
    let err = gateway::Config::from_toml(&both, "test.toml", pki.path())
        .unwrap_err()
        .to_string();
    for expected in [
        "plugins[0].source: set either `path`",
        "models[0].source: names neither a tag",
        "models[1].source: pulling from a registry needs `[store] dir`",
        "models[2].oci_resolve_interval_s: has no effect without `source`",
        "models[3]: needs `path` (a local file) or `source`",
    ] {
        assert!(err.contains(expected), "{expected:?} not in:\n{err}");
    }
    // Each problem names its line.
    assert!(err.contains("test.toml:"), "{err}");
}

/// Starts a gateway from `toml`; its start error when it does not start.
async fn start_error(toml: &str, dir: &Path) -> Option<String> {
    let config = gateway::Config::from_toml(toml, "test.toml", dir).unwrap();
    match gateway::Gateway::start(config, prometheus::Registry::new()).await {
        Ok(gw) => {
            gw.shutdown().await;
            None
        }
        Err(e) => Some(e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_follow_the_upload_signature_rules_and_size_limit() {
    let registry = Registry::start().await;
    let pki = Pki::new();
    let key = pki.path().join("key.hex");
    let public = gateway::admin_client::generate_key(&key).unwrap();
    let other = pki.path().join("other.hex");
    gateway::admin_client::generate_key(&other).unwrap();
    let noop = plugin_wasm("noop");
    let unsigned = registry.reference("plugins/p:unsigned");
    publish("plugin", &noop, &unsigned).await.unwrap();
    let signed = registry.reference("plugins/p:signed");
    publish_with(
        "plugin",
        &noop,
        &signed,
        &["--sign-key".as_ref(), key.as_os_str()],
    )
    .await
    .unwrap();
    let foreign = registry.reference("plugins/p:foreign");
    publish_with(
        "plugin",
        &noop,
        &foreign,
        &["--sign-key".as_ref(), other.as_os_str()],
    )
    .await
    .unwrap();
    let up = Upstream::named("a").await;
    let rules = format!("trusted_keys = [\"{public}\"]\nrequire_signatures = true");
    let err = start_error(
        &config_with(&pki, up.addr, &unsigned, None, &rules),
        pki.path(),
    )
    .await
    .expect("an unsigned artifact started where signatures are required");
    assert!(
        err.contains("plugin/p") && err.contains("signatures are required"),
        "{err}"
    );
    let err = start_error(
        &config_with(&pki, up.addr, &foreign, None, &rules),
        pki.path(),
    )
    .await
    .expect("an artifact signed by an untrusted key started");
    assert!(
        err.contains("does not verify with any trusted key"),
        "{err}"
    );
    assert_eq!(
        start_error(
            &config_with(&pki, up.addr, &signed, None, &rules),
            pki.path()
        )
        .await,
        None,
        "a signed artifact is accepted"
    );
    // The uploads' size limit: an artifact larger than max_upload_bytes is refused before
    // it is downloaded.
    let small = config_with(&pki, up.addr, &unsigned, None, "").replace(
        "token_file = \"admin.token\"",
        "token_file = \"admin.token\"\nmax_upload_bytes = 1000",
    );
    let err = start_error(&small, pki.path())
        .await
        .expect("an artifact over the size limit started");
    assert!(err.contains("more than the limit of 1000 bytes"), "{err}");
}
