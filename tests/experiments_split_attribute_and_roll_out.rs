//! Experiments end to end: shoppers stay in their variant and the QA override wins; responses
//! carry a signed attribution token that the feedback endpoint accepts and forged, tampered
//! and expired ones it refuses; synthetic shoppers of known click rates drive a rollout that
//! promotes a better canary and rolls back a worse or failing one, by itself, with the
//! decisions recorded; a restarted gateway resumes the rollout from the store; operators
//! pause, resume and abort through the admin API and `gateway rollout`.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;

use crate::support::*;

const TOKEN: &str = "experiments-admin-token";

/// A gateway config whose route `all` is split between variants `a` (upstream `app`, the
/// baseline) and `b` (upstream `canary`) by the `shopper` cookie.
fn experiment_config(
    pki: &Pki,
    a: &Upstream,
    b: &Upstream,
    weights: (u32, u32),
    extra: &str,
) -> String {
    std::fs::write(
        pki.path().join("feedback.key"),
        "an-experiment-signing-secret\n",
    )
    .unwrap();
    std::fs::write(pki.path().join("admin.token"), format!("{TOKEN}\n")).unwrap();
    basic_config(
        pki,
        &[a.addr],
        &format!(
            "[[upstreams]]\nname = \"canary\"\nbackends = [\"{}\"]\n",
            b.addr
        ),
        &format!(
            r#"
[feedback]
key_file = "feedback.key"

[[experiments]]
name = "exp"
routes = ["all"]
assign_by = "cookie:shopper"

[[experiments.variants]]
name = "a"
weight = {}

[[experiments.variants]]
name = "b"
weight = {}
upstream = "canary"
{extra}
"#,
            weights.0, weights.1
        ),
    )
    .replace(
        "[admin]\nbind = \"127.0.0.1:0\"",
        "[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"",
    )
}

fn shopper_get(shopper: &str) -> Request<Full<Bytes>> {
    let mut r = get("localhost", "/p");
    if !shopper.is_empty() {
        r.headers_mut().insert(
            "cookie",
            format!("theme=x; shopper={shopper}").parse().unwrap(),
        );
    }
    r
}

/// One shopper's visit: the variant that served it, as the header says and as the upstream's
/// body proves, and the attribution token.
struct Visit {
    variant: String,
    token: Option<String>,
}

async fn visit(conn: &mut Sender, req: Request<Full<Bytes>>) -> Visit {
    let r = conn.send(req).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let variant = r
        .header("x-gateway-variant")
        .expect("variant header")
        .to_string();
    let served_by = if r.text() == "canary-body" { "b" } else { "a" };
    assert_eq!(variant, served_by, "the variant's upstream served it");
    Visit {
        variant,
        token: r.header("x-gateway-attribution").map(str::to_string),
    }
}

async fn post_feedback(addr: std::net::SocketAddr, pki: &Pki, events: &[(String, &str)]) -> Got {
    let body = serde_json::json!({
        "events": events
            .iter()
            .map(|(token, event)| serde_json::json!({"token": token, "event": event}))
            .collect::<Vec<_>>()
    });
    let req = Request::builder()
        .method(Method::POST)
        .uri("https://localhost/_gateway/feedback")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    fetch(addr, &pki.ca_der, true, req).await
}

async fn h2(addr: std::net::SocketAddr, pki: &Pki) -> Sender {
    tls_connect(
        addr,
        &pki.ca_der,
        ClientOpts {
            alpn: &[b"h2"],
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .sender
}

async fn canary_upstream() -> Upstream {
    Upstream::with(|_| Reply::Respond(StatusCode::OK, vec![], Bytes::from_static(b"canary-body")))
        .await
}

#[tokio::test]
async fn shoppers_stay_in_their_variant_and_the_override_wins() {
    let pki = Pki::new();
    let (a, b) = (Upstream::named("a").await, canary_upstream().await);
    let gw = TestGateway::start(&experiment_config(&pki, &a, &b, (50, 50), ""), pki.path()).await;
    let mut conn = h2(gw.addr("https"), &pki).await;
    let mut first = HashMap::new();
    for i in 0..300 {
        let v = visit(&mut conn, shopper_get(&format!("s{i}"))).await;
        assert!(v.token.is_some(), "an assigned request carries a token");
        first.insert(i, v.variant);
    }
    let in_b = first.values().filter(|v| *v == "b").count();
    assert!(
        (100..=200).contains(&in_b),
        "a 50/50 split put {in_b} of 300 in b"
    );
    for (i, variant) in &first {
        assert_eq!(
            &visit(&mut conn, shopper_get(&format!("s{i}")))
                .await
                .variant,
            variant
        );
    }
    // QA forces a variant; such requests, and those without a shopper id, are not counted
    // and carry no token.
    let mut forced = shopper_get("s1");
    let other = if first[&1] == "a" { "b" } else { "a" };
    forced
        .headers_mut()
        .insert("x-gateway-variant", other.parse().unwrap());
    let v = visit(&mut conn, forced).await;
    assert_eq!(v.variant, other);
    assert!(v.token.is_none());
    let anonymous = visit(&mut conn, shopper_get("")).await;
    assert_eq!(anonymous.variant, "a");
    assert!(anonymous.token.is_none());
    let counted: f64 = ["a", "b"]
        .iter()
        .map(|v| {
            gw.metric(
                "gateway_experiment_requests_total",
                &[("experiment", "exp"), ("variant", v)],
            )
        })
        .sum();
    assert_eq!(counted, 600.0);
    assert_eq!(
        gw.metric("gateway_experiment_weight", &[("variant", "b")]),
        50.0
    );
}

#[tokio::test]
async fn feedback_counts_genuine_tokens_and_refuses_forged_and_expired_ones() {
    let pki = Pki::new();
    let (a, b) = (Upstream::named("a").await, canary_upstream().await);
    let config = experiment_config(&pki, &a, &b, (1, 1), "");
    let gw = TestGateway::start(&config, pki.path()).await;
    let addr = gw.addr("https");
    let mut conn = h2(addr, &pki).await;
    let v = visit(&mut conn, shopper_get("alice")).await;
    let token = v.token.unwrap();

    let mut tampered = token.clone().into_bytes();
    let last = tampered.len() - 5;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    // The same route and variant, signed by a node with another secret.
    let other_dir = Pki::new();
    let other_config =
        experiment_config(&other_dir, &a, &b, (1, 1), "").replace("feedback.key", "other.key");
    std::fs::write(
        other_dir.path().join("other.key"),
        "a-different-secret-entirely\n",
    )
    .unwrap();
    let other = TestGateway::start(&other_config, other_dir.path()).await;
    let mut other_conn = h2(other.addr("https"), &other_dir).await;
    let foreign = visit(&mut other_conn, shopper_get("alice"))
        .await
        .token
        .unwrap();

    let r = post_feedback(
        addr,
        &pki,
        &[
            (token.clone(), "impression"),
            (token.clone(), "click"),
            (token.clone(), "purchase"),
            (tampered, "click"),
            (foreign, "click"),
            ("not a token".into(), "click"),
            (token.clone(), "teleport"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let answer: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(answer["accepted"], 3, "{answer}");
    assert_eq!(answer["refused"], 4, "{answer}");
    assert_eq!(answer["reasons"]["malformed"], 1, "{answer}");
    assert_eq!(answer["reasons"]["unknown_event"], 1, "{answer}");
    let forged = answer["reasons"]["bad_mac"].as_u64().unwrap_or(0)
        + answer["reasons"]["unknown_key"].as_u64().unwrap_or(0);
    assert_eq!(forged, 2, "tampered and foreign tokens: {answer}");
    let clicks = gw.metric(
        "gateway_experiment_events_total",
        &[("variant", v.variant.as_str()), ("event", "click")],
    );
    assert_eq!(clicks, 1.0);
    assert_eq!(
        gw.metric("gateway_feedback_refused_total", &[("reason", "malformed")]),
        1.0
    );

    // Bodies that are not events, and too many events, are refused whole.
    let bad = Request::post("https://localhost/_gateway/feedback")
        .header("host", "localhost")
        .body(Full::new(Bytes::from_static(b"{\"clicks\": 3}")))
        .unwrap();
    assert_eq!(fetch(addr, &pki.ca_der, true, bad).await.status, 400);
    let many: Vec<(String, &str)> = (0..1001).map(|_| (token.clone(), "click")).collect();
    assert_eq!(post_feedback(addr, &pki, &many).await.status, 413);

    // Tokens expire.
    drop(gw);
    let short = config.replace(
        "key_file = \"feedback.key\"",
        "key_file = \"feedback.key\"\ntoken_max_age_s = 1",
    );
    let gw = TestGateway::start(&short, pki.path()).await;
    let addr = gw.addr("https");
    let mut conn = h2(addr, &pki).await;
    let token = visit(&mut conn, shopper_get("bob")).await.token.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = post_feedback(addr, &pki, &[(token, "click")]).await;
    let answer: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(answer["reasons"]["expired"], 1, "{answer}");
}

/// A tiny deterministic generator (xorshift64*), so each run sees the same shoppers.
struct Rng(u64);
impl Rng {
    fn chance(&mut self, p: f64) -> bool {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((x >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// Shoppers with click-through rate `ctr[variant]` visit until the rollout leaves Running or
/// `max_rounds` rounds of 200 shoppers pass; returns the rollout's status.
async fn shop_until_decided(
    gw: &TestGateway,
    pki: &Pki,
    ctr: [f64; 2],
    seed: u64,
    max_rounds: usize,
) -> serde_json::Value {
    let addr = gw.addr("https");
    let mut conn = h2(addr, pki).await;
    let mut rng = Rng(seed);
    for round in 0..max_rounds {
        let mut events = Vec::new();
        for i in 0..200 {
            let v = visit(&mut conn, shopper_get(&format!("r{round}-{i}"))).await;
            let token = v.token.expect("assigned shoppers get a token");
            events.push((token.clone(), "impression"));
            if rng.chance(ctr[usize::from(v.variant == "b")]) {
                events.push((token, "click"));
            }
        }
        let r = post_feedback(addr, pki, &events).await;
        assert_eq!(r.status, 200, "{}", r.text());
        // Let the rollout judge the new figures (it evaluates every 100 ms).
        tokio::time::sleep(Duration::from_millis(250)).await;
        let status = rollout_status(gw).await;
        if status["rollout"]["state"] != "Running" {
            return status;
        }
    }
    rollout_status(gw).await
}

async fn rollout_status(gw: &TestGateway) -> serde_json::Value {
    let r = admin_call(
        gw.gateway.admin_addr(),
        Method::GET,
        "/admin/rollouts",
        Some(TOKEN),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    v["experiments"][0].clone()
}

const ROLLOUT: &str = r#"
[experiments.rollout]
steps = [10, 50, 100]
min_step_s = 0
min_samples = 150
max_error_rate_delta = 0.05
max_p99_ratio = 50.0
ctr_alpha = 0.05
cvr_alpha = 0
evaluate_every_ms = 100
"#;

#[tokio::test]
async fn a_better_canary_is_promoted_and_a_worse_one_rolled_back() {
    let pki = Pki::new();
    let (a, b) = (Upstream::named("a").await, canary_upstream().await);
    let config = experiment_config(&pki, &a, &b, (1, 1), ROLLOUT);

    let gw = TestGateway::start(&config, pki.path()).await;
    let status = shop_until_decided(&gw, &pki, [0.10, 0.30], 1, 60).await;
    assert_eq!(status["rollout"]["state"], "Promoted", "{status:#}");
    assert_eq!(status["variants"][1]["weight"], 100, "{status:#}");
    let history = status["rollout"]["history"].as_array().unwrap();
    assert!(
        history
            .iter()
            .any(|d| d["action"]["Advance"]["to_percent"] == 50)
            && history.iter().any(|d| d["action"] == "Promote"),
        "{history:#?}"
    );
    assert_eq!(
        gw.metric("gateway_rollout_decisions_total", &[("action", "promote")]),
        1.0
    );
    assert_eq!(gw.metric("gateway_rollout_canary_percent", &[]), 100.0);
    drop(gw);

    let gw = TestGateway::start(&config, pki.path()).await;
    let status = shop_until_decided(&gw, &pki, [0.30, 0.05], 2, 60).await;
    assert_eq!(status["rollout"]["state"], "RolledBack", "{status:#}");
    assert_eq!(status["variants"][1]["weight"], 0, "{status:#}");
    let last = status["rollout"]["history"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["action"]["RollBack"]["guard"], "ctr", "{last:#}");
    assert!(
        last["evidence"]["canary"]["ctr"].as_f64().unwrap()
            < last["evidence"]["baseline"]["ctr"].as_f64().unwrap(),
        "{last:#}"
    );
    // Rolled back: every shopper is served by the baseline now.
    let mut conn = h2(gw.addr("https"), &pki).await;
    for i in 0..50 {
        assert_eq!(
            visit(&mut conn, shopper_get(&format!("after{i}")))
                .await
                .variant,
            "a"
        );
    }
}

#[tokio::test]
async fn a_failing_canary_is_rolled_back_by_the_error_guard() {
    let pki = Pki::new();
    let a = Upstream::named("a").await;
    let b = Upstream::with(|s| {
        // One request in four fails.
        if s.uri.path().ends_with('p') && rand_fail(&s.headers) {
            Reply::Respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                vec![],
                Bytes::from_static(b"canary-body"),
            )
        } else {
            Reply::Respond(StatusCode::OK, vec![], Bytes::from_static(b"canary-body"))
        }
    })
    .await;
    let gw = TestGateway::start(
        &experiment_config(&pki, &a, &b, (1, 1), ROLLOUT),
        pki.path(),
    )
    .await;
    let mut conn = h2(gw.addr("https"), &pki).await;
    for i in 0..4000 {
        let r = conn.send(shopper_get(&format!("e{i}"))).await.unwrap();
        assert!(r.status == 200 || r.status == 500);
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            if rollout_status(&gw).await["rollout"]["state"] != "Running" {
                break;
            }
        }
    }
    let status = rollout_status(&gw).await;
    assert_eq!(status["rollout"]["state"], "RolledBack", "{status:#}");
    let last = status["rollout"]["history"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(
        last["action"]["RollBack"]["guard"], "error_rate",
        "{last:#}"
    );
}

/// Fails a quarter of requests, by the shopper cookie's hash.
fn rand_fail(headers: &http::HeaderMap) -> bool {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    headers.get("cookie").map(|c| c.as_bytes()).hash(&mut h);
    h.finish().is_multiple_of(4)
}

#[tokio::test]
async fn operators_steer_the_rollout_and_a_restart_resumes_it() {
    let pki = Pki::new();
    let (a, b) = (Upstream::named("a").await, canary_upstream().await);
    let config = experiment_config(&pki, &a, &b, (1, 1), ROLLOUT)
        .replace("[feedback]", "[store]\ndir = \"store\"\n\n[feedback]");
    let gw = TestGateway::start(&config, pki.path()).await;
    let admin = gw.gateway.admin_addr();
    let call = |path: &'static str| admin_call(admin, Method::POST, path, Some(TOKEN));
    assert_eq!(
        call("/admin/rollouts/exp/resume").await.status,
        409,
        "not paused"
    );
    assert_eq!(call("/admin/rollouts/nope/pause").await.status, 404);
    assert_eq!(call("/admin/rollouts/exp/jump").await.status, 404);
    let paused = call("/admin/rollouts/exp/pause").await;
    assert_eq!(paused.status, 200, "{}", paused.text());
    let v: serde_json::Value = serde_json::from_slice(&paused.body).unwrap();
    assert_eq!(v["decision"]["action"], "Pause", "{v}");
    // The command is in the audit trail, with the token's id.
    let audit = admin_call(admin, Method::GET, "/admin/audit", Some(TOKEN)).await;
    let audit: serde_json::Value = serde_json::from_slice(&audit.body).unwrap();
    let last = audit["entries"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["action"], "rollout_pause", "{audit}");
    assert_eq!(last["target"], "experiment/exp", "{audit}");

    // Restarted on the same store, the node resumes the paused rollout with its history.
    drop(gw);
    let gw = TestGateway::start(&config, pki.path()).await;
    let status = rollout_status(&gw).await;
    assert_eq!(status["rollout"]["state"], "Paused", "{status:#}");
    assert_eq!(status["rollout"]["history"].as_array().unwrap().len(), 1);
    assert_eq!(
        status["variants"][1]["weight"], 10,
        "still at the first step"
    );

    // The CLI speaks the same API.
    let admin = gw.gateway.admin_addr();
    // Run asynchronously: the gateway answering it shares this test's runtime thread.
    let token_file = pki.path().join("admin.token");
    let cli = |args: &'static [&'static str]| {
        let token_file = token_file.clone();
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
                .arg("rollout")
                .args(args)
                .args(["--admin", &format!("http://{admin}")])
                .arg("--token-file")
                .arg(token_file)
                .output()
                .await
                .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let (ok, out, err) = cli(&["status"]).await;
    assert!(ok && out.contains("\"Paused\""), "{out}{err}");
    let (ok, out, err) = cli(&["abort", "exp"]).await;
    assert!(ok && out.contains("Abort"), "{out}{err}");
    let (ok, _, err) = cli(&["resume", "exp"]).await;
    assert!(
        !ok && err.contains("409") && err.contains("Aborted"),
        "{err}"
    );
    let status = rollout_status(&gw).await;
    assert_eq!(status["rollout"]["state"], "Aborted");
    assert_eq!(status["variants"][1]["weight"], 0);
    let r = admin_call(
        admin,
        Method::POST,
        "/admin/rollouts/exp/promote",
        Some(TOKEN),
    )
    .await;
    assert_eq!(
        r.status,
        409,
        "an aborted rollout stays aborted: {}",
        r.text()
    );
}

#[tokio::test]
async fn an_experiment_splits_the_scoring_endpoint_between_model_versions() {
    let pki = Pki::new();
    let a = Upstream::named("a").await;
    for (file, seed) in [("recs.safetensors", 1), ("recs-v2.safetensors", 2)] {
        let mut spec = gateway::scoring::SampleSpec::embedding(64, 8, seed);
        spec.n_users = 16;
        std::fs::write(pki.path().join(file), gateway::scoring::sample_model(&spec)).unwrap();
    }
    std::fs::write(
        pki.path().join("feedback.key"),
        "an-experiment-signing-secret\n",
    )
    .unwrap();
    let config = basic_config(
        &pki,
        &[a.addr],
        "",
        r#"
[scoring]
backend = "cpu"

[[models]]
name = "recs"
path = "recs.safetensors"

[[models]]
name = "recs-v2"
path = "recs-v2.safetensors"

[feedback]
key_file = "feedback.key"

[[experiments]]
name = "ranking"
assign_by = "header:x-shopper"

[[experiments.variants]]
name = "current"

[[experiments.variants]]
name = "next"
models = { recs = "recs-v2" }
"#,
    );
    let gw = TestGateway::start(&config, pki.path()).await;
    let addr = gw.addr("https");
    let v2 = gw.gateway.model("recs-v2").unwrap().live().version.clone();
    // Each model keeps its own size series (loading one used to wipe the others').
    for model in ["recs", "recs-v2"] {
        assert!(
            gw.metric("gateway_model_loaded_bytes", &[("model", model)]) > 0.0,
            "{model}"
        );
    }
    let mut conn = h2(addr, &pki).await;
    let rank = |shopper: &str| {
        Request::post("https://localhost/_gateway/models/recs/rank")
            .header("host", "localhost")
            .header("x-shopper", shopper)
            .body(Full::new(Bytes::from_static(
                b"{\"user\": 3, \"candidates\": [1, 2, 3, 4]}",
            )))
            .unwrap()
    };
    let mut seen = HashMap::new();
    let mut token = None;
    for i in 0..40 {
        let r = conn.send(rank(&format!("shopper-{i}"))).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let variant = r.header("x-gateway-variant").unwrap().to_string();
        let answer: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        match variant.as_str() {
            "next" => {
                assert_eq!(answer["model"], "recs-v2", "{answer}");
                assert_eq!(r.header("x-model-version"), Some(v2.as_str()));
                assert_eq!(r.header("x-gateway-model-version"), Some(v2.as_str()));
                token = r.header("x-gateway-attribution").map(str::to_string);
            }
            _ => assert_eq!(answer["model"], "recs", "{answer}"),
        }
        *seen.entry(variant).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "both variants serve: {seen:?}");
    let r = post_feedback(addr, &pki, &[(token.expect("a next token"), "click")]).await;
    let answer: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(answer["accepted"], 1, "{answer}");
    assert_eq!(
        gw.metric(
            "gateway_experiment_events_total",
            &[
                ("experiment", "ranking"),
                ("variant", "next"),
                ("event", "click")
            ]
        ),
        1.0
    );
}

async fn flood(conn: &mut Sender, requests: Vec<Request<Full<Bytes>>>) {
    for req in requests {
        let r = conn.send(req).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn memory_stays_bounded_under_a_flood_of_feedback() {
    let pki = Pki::new();
    let (a, b) = (Upstream::named("a").await, canary_upstream().await);
    let file = pki.path().join("gateway.toml");
    std::fs::write(&file, experiment_config(&pki, &a, &b, (1, 1), ROLLOUT)).unwrap();
    let (child, addr) = spawn_gateway_binary(&file).await;
    let pid = child.id().unwrap();
    let mut conn = h2(addr, &pki).await;
    // 500 shoppers' tokens, then feedback for them in batches of 1,000 events.
    let mut tokens = Vec::new();
    for i in 0..500 {
        tokens.push(
            visit(&mut conn, shopper_get(&format!("f{i}")))
                .await
                .token
                .unwrap(),
        );
    }
    let events = ["impression", "click", "add_to_cart", "purchase"];
    let batch = |n: usize| {
        let list: Vec<serde_json::Value> = (0..1000)
            .map(|i| {
                serde_json::json!({
                    "token": tokens[(n * 1000 + i) % tokens.len()],
                    "event": events[i % events.len()],
                })
            })
            .collect();
        Request::post("https://localhost/_gateway/feedback")
            .header("host", "localhost")
            .body(Full::new(Bytes::from(
                serde_json::json!({ "events": list }).to_string(),
            )))
            .unwrap()
    };
    // Warm up (allocator arenas, the connection), then measure.
    flood(&mut conn, (0..10).map(batch).collect()).await;
    let before = rss_kib(pid);
    flood(&mut conn, (10..210).map(batch).collect()).await;
    let after = rss_kib(pid);
    println!("RSS before {before} KiB, after 200,000 more events {after} KiB");
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} KiB to {after} KiB over 200,000 feedback events"
    );
}

#[tokio::test]
async fn a_variant_runs_its_own_plugin_chain() {
    let pki = Pki::new();
    let (a, b) = (Upstream::named("a").await, canary_upstream().await);
    let canary = plugin_table(
        "canary",
        "canary",
        r#"variants = [{ name = "a", weight = 1 }, { name = "b", weight = 1 }]"#,
        "",
    );
    let config = experiment_config(&pki, &a, &b, (1, 1), "plugins = [\"canary\"]\n")
        .replace("[feedback]", &format!("{canary}\n[feedback]"));
    let gw = TestGateway::start(&config, pki.path()).await;
    let mut conn = h2(gw.addr("https"), &pki).await;
    let mut seen = HashMap::new();
    for i in 0..40 {
        let r = conn.send(shopper_get(&format!("p{i}"))).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let variant = r.header("x-gateway-variant").unwrap().to_string();
        // Only b's chain (the canary plugin, which stamps the variant that served) ran.
        let stamped = r.header("x-variant").map(str::to_string);
        match variant.as_str() {
            "b" => assert_eq!(stamped.as_deref(), Some("b")),
            _ => assert_eq!(stamped, None, "a runs the route's (empty) chain"),
        }
        *seen.entry(variant).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    // The plugin's own choice is refused on a route in an experiment, and counted by it.
    let refused = gw.metric(
        "gateway_plugin_canary_errors_total",
        &[("plugin", "canary")],
    );
    assert!(refused >= 1.0, "set-variant refused: {refused}");
}

#[tokio::test]
async fn a_reload_that_changes_an_experiment_keeps_its_rollout() {
    let pki = Pki::new();
    let (a, b) = (Upstream::named("a").await, canary_upstream().await);
    // No store: the running rollout itself is what a reload must carry over.
    let config = experiment_config(&pki, &a, &b, (1, 1), ROLLOUT);
    let gw = TestGateway::start(&config, pki.path()).await;
    let mut conn = h2(gw.addr("https"), &pki).await;
    for i in 0..10 {
        visit(&mut conn, shopper_get(&format!("k{i}"))).await;
    }
    let admin = gw.gateway.admin_addr();
    let r = admin_call(
        admin,
        Method::POST,
        "/admin/rollouts/exp/pause",
        Some(TOKEN),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let counted = |status: &serde_json::Value| -> u64 {
        status["variants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["step"]["requests"].as_u64().unwrap())
            .sum()
    };
    // Changed, but with the same variants and plan: the figures and the rollout go on.
    let changed = config.replace(
        "assign_by = \"cookie:shopper\"",
        "assign_by = \"cookie:shopper\"\noverride_header = \"x-qa-variant\"",
    );
    gw.gateway
        .reload(gateway::Config::from_toml(&changed, "test.toml", pki.path()).unwrap())
        .await
        .unwrap();
    let status = rollout_status(&gw).await;
    assert_eq!(status["rollout"]["state"], "Paused", "{status:#}");
    assert_eq!(status["rollout"]["history"].as_array().unwrap().len(), 1);
    assert_eq!(counted(&status), 10, "{status:#}");
    // A new plan starts a new rollout, with figures of its own.
    let replanned = changed.replace("steps = [10, 50, 100]", "steps = [20, 100]");
    gw.gateway
        .reload(gateway::Config::from_toml(&replanned, "test.toml", pki.path()).unwrap())
        .await
        .unwrap();
    let status = rollout_status(&gw).await;
    assert_eq!(status["rollout"]["state"], "Running", "{status:#}");
    assert_eq!(status["rollout"]["canary_percent"], 20, "{status:#}");
    assert_eq!(counted(&status), 0, "{status:#}");
}
