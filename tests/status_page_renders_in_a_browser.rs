//! The status page in a real browser: headless Chromium, driven through chromedriver, loads
//! `/` from a running gateway with traffic, a plugin, a model and a rollout. The test checks
//! what the page's scripts rendered (routes, backend health, plugin and model versions, the
//! rollout, the tuning hint, charts), that a screenshot is not blank, that the page updates
//! itself when more traffic comes, and that acting needs the token: a rollout paused from
//! the page with the token pasted into it. Reading needs none, and the page's document
//! holds no secret.
//!
//! It needs Debian's `chromium` and `chromium-driver` (`scripts/setup.sh` installs them) and
//! fails without them. Every wait is bounded; chromedriver and Chromium are killed when the
//! test ends, whether it passes or not.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fantoccini::{Client, ClientBuilder, Locator};
use http::{Method, Request};
use http_body_util::Full;
use serde_json::{json, Value};

use crate::support::*;
use gateway::admin::api::Overview;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const TOKEN: &str = "status-page-admin-token";
const FEEDBACK_SECRET: &str = "a-status-page-feedback-secret";
/// The longest any one wait of this test may take.
const WAIT: Duration = Duration::from_secs(30);

/// chromedriver (and the Chromium it starts, in its process group) for one test, with a
/// fresh profile; the whole group is killed on drop.
struct Browser {
    driver: Child,
    client: Option<Client>,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        for (binary, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                Path::new(binary).is_file(),
                "the status page test drives headless Chromium, and {binary} is missing: run \
                 scripts/setup.sh (it installs the Debian packages chromium and chromium-driver; \
                 {package} provides {binary})"
            );
        }
        let profile = tempfile::tempdir().unwrap();
        // Its own process group, so that Chromium (its child) goes with it.
        let mut driver = {
            use std::os::unix::process::CommandExt;
            Command::new(CHROMEDRIVER)
                .arg("--port=0")
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .expect("starting chromedriver")
        };
        // chromedriver picks a free port and says which.
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = driver.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(port) = line
                    .split("started successfully on port ")
                    .nth(1)
                    .and_then(|p| p.trim_end_matches('.').trim().parse::<u16>().ok())
                {
                    let _ = tx.send(port);
                }
                // Keeps reading so that the pipe never fills.
            }
        });
        let mut browser = Browser {
            driver,
            client: None,
            _profile: profile,
        };
        let port = rx
            .recv_timeout(WAIT)
            .expect("chromedriver did not say which port it listens on");
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    "--hide-scrollbars", "--lang=en-US", "--window-size=1366,2600",
                    format!("--user-data-dir={}", browser._profile.path().display()),
                ],
            }),
        );
        caps.insert(
            "timeouts".into(),
            json!({ "pageLoad": 20_000, "script": 10_000, "implicit": 0 }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = tokio::time::timeout(
            WAIT,
            ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&format!("http://127.0.0.1:{port}")),
        )
        .await
        .expect("Chromium did not start in time")
        .expect("chromedriver could not start Chromium");
        browser.client = Some(client);
        browser
    }

    fn client(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    /// Runs `script` (a function body) in the page; its return value.
    async fn js(&self, script: &str) -> Value {
        tokio::time::timeout(WAIT, self.client().execute(script, vec![]))
            .await
            .expect("the page did not answer a script in time")
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Runs `script` until `done` holds for what it returns, at most [`WAIT`].
    async fn until(&self, what: &str, script: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.js(script).await;
            if done(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "waited {WAIT:?} for {what}; the page shows {v:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ends the session (Chromium quits) before the group is killed.
    async fn close(mut self) {
        if let Some(client) = self.client.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), client.close()).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a negative pid signals the process group chromedriver leads
        // (it was started with process_group(0), so its pgid is its pid); nothing else is in it.
        unsafe {
            libc::kill(-(self.driver.id() as i32), libc::SIGKILL);
        }
        let _ = self.driver.wait();
    }
}

/// Distinct colours, and the share of pixels that are not near-white, in a PNG.
fn colours(png_bytes: &[u8]) -> (usize, f64, (u32, u32)) {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().expect("the screenshot is a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("a bounded image")];
    let info = reader.next_frame(&mut buf).expect("the PNG decodes");
    let channels = info.color_type.samples();
    let pixels = &buf[..info.buffer_size()];
    let mut distinct = std::collections::HashSet::new();
    let mut inked = 0usize;
    let mut total = 0usize;
    for px in pixels.chunks_exact(channels) {
        let rgb = if channels >= 3 {
            [px[0], px[1], px[2]]
        } else {
            [px[0]; 3]
        };
        distinct.insert(rgb);
        total += 1;
        if rgb.iter().any(|&c| c < 200) {
            inked += 1;
        }
    }
    (
        distinct.len(),
        inked as f64 / total.max(1) as f64,
        (info.width, info.height),
    )
}

fn rank_request() -> Request<Full<Bytes>> {
    Request::post("https://localhost/_gateway/models/recs/rank")
        .header("host", "localhost")
        .body(Full::new(Bytes::from_static(
            b"{\"user\": 1, \"candidates\": [1, 2, 3]}",
        )))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_node_and_updates_itself() {
    // The plugins are built (once per run, maybe waiting for cargo's lock) before the clock
    // starts.
    let hygiene = plugin_table("hygiene", "hygiene", "", "deadline_ms = 2000");
    let noop = plugin_wasm("noop");
    tokio::time::timeout(Duration::from_secs(180), scenario(&hygiene, &noop))
        .await
        .expect("the status page test took longer than three minutes");
}

/// `hygiene`: the `[[plugins]]` table of the route's plugin; `noop`: another plugin, uploaded
/// as a new version of it.
async fn scenario(hygiene: &str, noop: &Path) {
    let pki = Pki::new();
    let (app, canary) = (Upstream::named("a").await, Upstream::named("b").await);
    // A backend that refuses connections: ejected after one failure, shown as down.
    let dead = dead_port().await;
    let mut spec = gateway::scoring::SampleSpec::embedding(32, 8, 1);
    spec.n_users = 8;
    std::fs::write(
        pki.path().join("recs.safetensors"),
        gateway::scoring::sample_model(&spec),
    )
    .unwrap();
    std::fs::write(pki.path().join("admin.token"), TOKEN).unwrap();
    std::fs::write(pki.path().join("feedback.key"), FEEDBACK_SECRET).unwrap();
    let extra = format!(
        r#"plugins = ["hygiene"]

{plugin}
[server]
anomaly_interval_ms = 250

[scoring]
backend = "cpu"
max_queue_delay_us = 200

[[models]]
name = "recs"
path = "recs.safetensors"

[[upstreams]]
name = "canary"
backends = ["{canary}"]

[feedback]
key_file = "feedback.key"

[store]
dir = "store"

[[experiments]]
name = "checkout"
routes = ["all"]
assign_by = "cookie:shopper"

[[experiments.variants]]
name = "current"
weight = 1

[[experiments.variants]]
name = "next"
weight = 1
upstream = "canary"

[experiments.rollout]
steps = [10, 50, 100]
min_step_s = 3600
min_samples = 100000
max_error_rate_delta = 0.5
max_p99_ratio = 1000.0
ctr_alpha = 0
cvr_alpha = 0
evaluate_every_ms = 1000
"#,
        plugin = hygiene,
        canary = canary.addr,
    );
    let toml = basic_config(
        &pki,
        &[app.addr, dead],
        "[upstreams.passive]\nconsecutive_failures = 1\nejection_ms = 600000\n",
        &extra,
    )
    .replace(
        "[admin]\nbind = \"127.0.0.1:0\"",
        "[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"",
    );
    let gw = TestGateway::start(&toml, pki.path()).await;
    let admin = gw.gateway.admin_addr();
    let mut conn = tls_connect(gw.addr("https"), &pki.ca_der, ClientOpts::default())
        .await
        .unwrap()
        .sender;
    for _ in 0..40 {
        assert_eq!(conn.get("localhost", "/").await.status, 200);
    }
    // One scoring request at a time: batches of one, which earns the queue-delay hint.
    for _ in 0..220 {
        assert_eq!(conn.send(rank_request()).await.unwrap().status, 200);
    }

    // Reading needs no token; the document holds no secret; the API still wants the token.
    let page = admin_get(admin, "/").await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let csp = page.header("content-security-policy").unwrap_or_default();
    assert!(
        csp.contains("frame-ancestors 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    // The document, once the sampler has a sample of the route.
    let deadline = Instant::now() + WAIT;
    let overview = loop {
        let doc = admin_get(admin, "/status.json").await;
        assert_eq!(doc.status, 200, "{}", doc.text());
        for secret in [TOKEN, FEEDBACK_SECRET] {
            assert!(
                !doc.text().contains(secret),
                "the public document leaks {secret}"
            );
        }
        let overview: Overview = serde_json::from_slice(&doc.body).unwrap();
        if !overview.routes[0].history.is_empty() {
            break overview;
        }
        assert!(Instant::now() < deadline, "no sample: {overview:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(overview.admin_api);
    let route = &overview.routes[0];
    assert_eq!(
        (route.name.as_str(), route.requests, route.errors),
        ("all", 40, 0)
    );
    assert_eq!(route.plugins, ["hygiene"]);
    assert_eq!(route.experiment.as_deref(), Some("checkout"));
    let health: Vec<(String, bool)> = overview.upstreams[0]
        .backends
        .iter()
        .map(|b| (b.address.clone(), b.healthy))
        .collect();
    assert_eq!(
        health,
        [(app.addr.to_string(), true), (dead.to_string(), false)]
    );
    assert_eq!(overview.upstreams[0].available, 1);
    let plugin = &overview.plugins[0];
    assert_eq!(
        plugin.outcomes.get("ok"),
        Some(&80),
        "two hooks per request"
    );
    assert_eq!(plugin.last_swap_unix_ms, None, "served since start");
    let model = &overview.models[0];
    assert_eq!(
        (model.device.as_str(), model.batching.batches),
        ("cpu", 220)
    );
    assert_eq!(model.batching.mean_size, Some(1.0));
    assert_eq!(model.requests.get("ok"), Some(&220));
    let rollout = overview.experiments[0].rollout.as_ref().unwrap();
    assert_eq!(
        (rollout.state, rollout.canary_percent),
        (gateway_rollout::State::Running, 10)
    );
    assert_eq!(overview.hints[0].subject, "model recs");
    let plugin_version = plugin.version.clone();
    let model_version = model.version.clone();
    assert_eq!(
        admin_call(admin, Method::GET, "/admin/status", None)
            .await
            .status,
        401
    );

    // Steady traffic while the page is first read, so that every chart has a line: at least
    // 20 requests in each 250 ms interval (the least that gives an error ratio and a p99).
    let steady = Arc::new(AtomicBool::new(true));
    let load = {
        let (steady, addr, ca) = (steady.clone(), gw.addr("https"), pki.ca_der.clone());
        tokio::spawn(async move {
            let mut conn = tls_connect(addr, &ca, ClientOpts::default())
                .await
                .unwrap()
                .sender;
            while steady.load(Ordering::Relaxed) {
                assert_eq!(conn.get("localhost", "/").await.status, 200);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };

    let browser = Browser::start().await;
    let url = format!("http://{admin}/");
    tokio::time::timeout(WAIT, browser.client().goto(&url))
        .await
        .expect("the page did not load in time")
        .expect("loading the page");

    // What the scripts rendered, once the charts have a few samples.
    let shown = browser
        .until(
            "the first render with charts",
            r#"
            const q = (s) => document.querySelector(s);
            const text = (s) => (q(s) ? q(s).textContent : null);
            return {
              refreshes: Number(document.body.dataset.refreshes || 0),
              scriptErrors: Number(document.body.dataset.scriptErrors || 0),
              route: text('[data-route="all"] h3'),
              routeFacts: text('[data-route="all"] .facts'),
              requests: Number(q('[data-route="all"] .requests')?.dataset.requests ?? -1),
              chartLines: document.querySelectorAll('[data-route="all"] svg path.line').length,
              upstream: text('[data-upstream="app"]'),
              plugin: text('[data-plugin="hygiene"]'),
              model: text('[data-model="recs"]'),
              experiment: text('[data-experiment="checkout"]'),
              hints: text('#hints'),
              summary: text('#summary'),
              header: text('#node'),
            };
            "#,
            |v| v["refreshes"].as_u64() >= Some(1) && v["chartLines"].as_u64() >= Some(3),
        )
        .await;
    assert_eq!(shown["scriptErrors"], 0, "{shown:#}");
    assert_eq!(shown["route"], "all", "{shown:#}");
    let facts = shown["routeFacts"].as_str().unwrap();
    assert!(
        facts.contains("upstream app") && facts.contains("hygiene") && facts.contains("checkout"),
        "{facts}"
    );
    assert!(shown["requests"].as_u64() > Some(40), "{shown:#}");
    let upstream = shown["upstream"].as_str().unwrap();
    assert!(
        upstream.contains(&format!("{}healthy", app.addr))
            && upstream.contains(&format!("{dead}down"))
            && upstream.contains("1 / 2"),
        "backend health: {upstream}"
    );
    let plugin = shown["plugin"].as_str().unwrap();
    assert!(plugin.contains(&plugin_version), "{plugin}");
    assert!(plugin.contains("ok"), "plugin outcomes: {plugin}");
    let model = shown["model"].as_str().unwrap();
    assert!(
        model.contains(&model_version) && model.contains("CPU") && model.contains("batches"),
        "{model}"
    );
    let experiment = shown["experiment"].as_str().unwrap();
    assert!(
        experiment.contains("Running") && experiment.contains("canary next at 10 %"),
        "{experiment}"
    );
    let hints = shown["hints"].as_str().unwrap();
    assert!(
        hints.contains("model recs") && hints.contains("lower [scoring] max_queue_delay_us"),
        "{hints}"
    );
    assert!(
        shown["header"]
            .as_str()
            .unwrap()
            .contains("Configuration generation 1"),
        "{shown:#}"
    );

    // A screenshot that is not blank: text, pills and charts in many colours.
    let shot = tokio::time::timeout(WAIT, browser.client().screenshot())
        .await
        .expect("no screenshot in time")
        .expect("taking a screenshot");
    if let Some(path) = std::env::var_os("GATEWAY_STATUS_PAGE_PNG") {
        std::fs::write(path, &shot).unwrap();
    }
    let (distinct, inked, (w, h)) = colours(&shot);
    assert!(w >= 800 && h >= 600, "a {w}×{h} screenshot");
    assert!(
        distinct >= 64,
        "only {distinct} colours: is the page blank?"
    );
    assert!(
        inked >= 0.02,
        "only {:.1} % of the pixels are not white",
        inked * 100.0
    );

    // It updates itself: more traffic shows up at the next refresh, without a reload.
    steady.store(false, Ordering::Relaxed);
    load.await.unwrap();
    let quiet = r#"return {
          requests: Number(document.querySelector('[data-route="all"] .requests').dataset.requests),
          refreshes: Number(document.body.dataset.refreshes),
        };"#;
    // Once the page has caught up with the steady traffic (two refreshes with the same count).
    let mut seen = browser.js(quiet).await;
    let settled = Instant::now() + WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let now = browser.js(quiet).await;
        if now["requests"] == seen["requests"] {
            break;
        }
        assert!(
            Instant::now() < settled,
            "the request count never settled: {now:#}"
        );
        seen = now;
    }
    let before = seen["requests"].as_u64().unwrap();
    let refreshes = seen["refreshes"].as_u64().unwrap();
    // A new connection: the first one idled past the listener's header read timeout.
    let mut conn = tls_connect(gw.addr("https"), &pki.ca_der, ClientOpts::default())
        .await
        .unwrap()
        .sender;
    for _ in 0..25 {
        assert_eq!(conn.get("localhost", "/").await.status, 200);
    }
    let after = browser
        .until("the new requests on the page", quiet, |v| {
            v["requests"].as_u64() >= Some(before + 25)
        })
        .await;
    assert!(
        after["refreshes"].as_u64() > Some(refreshes),
        "{after:#} after {refreshes} refreshes"
    );

    // Acting needs the token: without it the rollout's buttons are disabled; pasted into the
    // page, it pauses the rollout through the admin API.
    let pause = r#"[data-key="rollout-checkout-pause"]"#;
    let disabled = browser
        .js(&format!(
            "return document.querySelector('{pause}').disabled;"
        ))
        .await;
    assert_eq!(disabled, true, "a button acts without a token");
    let input = browser.client().find(Locator::Id("token")).await.unwrap();
    input.send_keys(TOKEN).await.unwrap();
    browser
        .client()
        .find(Locator::Css("#token-form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .until(
            "the pause button to be enabled by the token",
            &format!("return !document.querySelector('{pause}').disabled;"),
            |v| v == true,
        )
        .await;
    browser
        .client()
        .find(Locator::Css(pause))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let acted = browser
        .until(
            "the rollout to show as paused",
            r#"return {
              result: document.querySelector('#action-result').textContent,
              experiment: document.querySelector('[data-experiment="checkout"]').textContent,
              audit: document.querySelector('#audit').textContent,
              stored: sessionStorage.getItem('gateway-admin-token') !== null,
              scriptErrors: Number(document.body.dataset.scriptErrors || 0),
            };"#,
            |v| {
                v["experiment"]
                    .as_str()
                    .is_some_and(|t| t.contains("Paused") && t.contains("paused by an operator"))
                    && v["audit"]
                        .as_str()
                        .is_some_and(|t| t.contains("rollout_pause"))
            },
        )
        .await;
    assert!(
        acted["result"].as_str().unwrap().contains("done (200)"),
        "{acted:#}"
    );
    assert_eq!(acted["stored"], true);
    assert_eq!(acted["scriptErrors"], 0, "{acted:#}");
    let rollouts = admin_call(admin, Method::GET, "/admin/rollouts", Some(TOKEN)).await;
    let rollouts: Value = serde_json::from_slice(&rollouts.body).unwrap();
    assert_eq!(
        rollouts["experiments"][0]["rollout"]["state"], "Paused",
        "{rollouts:#}"
    );

    // A new plugin version goes live (an upload): the page shows it and when it swapped.
    let upload = admin_send(
        admin,
        Method::PUT,
        "/admin/plugins/hygiene",
        TOKEN,
        std::fs::read(noop).unwrap(),
    )
    .await;
    assert_eq!(upload.status, 200, "{}", upload.text());
    let uploaded: Value = serde_json::from_slice(&upload.body).unwrap();
    let new_version = uploaded["version"].as_str().unwrap().to_string();
    assert_ne!(new_version, plugin_version);
    let swapped = browser
        .until(
            "the new plugin version on the page",
            r#"const row = document.querySelector('[data-plugin="hygiene"]');
               return {
                 version: row.querySelector('.version').textContent,
                 swap: row.querySelector('time')?.getAttribute('datetime') ?? null,
               };"#,
            |v| v["version"] == new_version.as_str() && !v["swap"].is_null(),
        )
        .await;
    let doc: Overview =
        serde_json::from_slice(&admin_get(admin, "/status.json").await.body).unwrap();
    let at = doc.plugins[0].last_swap_unix_ms.expect("the swap's time");
    assert!(
        at >= overview.started_unix_ms && at <= doc.generated_unix_ms,
        "{swapped:#}"
    );
    browser.close().await;
}
