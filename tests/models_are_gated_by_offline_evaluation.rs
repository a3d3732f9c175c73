//! The offline gate: a model with `eval_data` has every new version evaluated on the held-out
//! file before it becomes active; a version worse than the active one by more than
//! `max_regression` is refused with the figures and what serves is untouched, a good one is
//! activated. `gateway model eval` prints the same figures.

use std::path::Path;
use std::process::Command;

use gateway::scoring::{sample_model, ComputeDevice, Model, Query, SampleSpec, ScoringConfig};
use http::Method;

use crate::support::*;

const TOKEN: &str = "gate-token";
const K: usize = 5;

/// An embedding model of 50 items and 16 users; `seed` draws its weights, `version` is only
/// metadata (a different file, the same answers).
fn model(seed: u64, version: &str) -> Vec<u8> {
    sample_model(&SampleSpec {
        version: version.into(),
        ..SampleSpec::embedding(50, 8, seed)
    })
}

/// Held-out lines that make `bytes` perfect: each user's relevant items are its own top K.
fn heldout_of(bytes: &[u8]) -> String {
    let m = Model::from_bytes(bytes, &ScoringConfig::default(), &ComputeDevice::Cpu).unwrap();
    let users: Vec<Query<'_>> = (0..16).map(Query::User).collect();
    let hits = m.top_k_cpu(&users, K).unwrap();
    hits.iter()
        .enumerate()
        .map(|(user, hits)| {
            let items: Vec<String> = hits.iter().map(|h| h.item.to_string()).collect();
            format!(
                "{{\"user\": {user}, \"relevant\": [{}]}}\n",
                items.join(", ")
            )
        })
        .collect()
}

fn config(pki: &Pki, up: std::net::SocketAddr, model: &Path) -> String {
    std::fs::write(pki.path().join("admin.token"), TOKEN).unwrap();
    let extra = format!(
        "[[models]]\nname = \"recs\"\npath = \"{}\"\neval_data = \"heldout.jsonl\"\neval_k = {K}\n\
         max_regression = 0.05\n[store]\ndir = \"store\"\n",
        model.display()
    );
    basic_config(pki, &[up], "", &extra).replace(
        "[admin]\nbind = \"127.0.0.1:0\"",
        "[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\nmax_upload_bytes = 1000000",
    )
}

#[tokio::test]
async fn a_worse_version_is_refused_with_its_figures_and_a_good_one_activated() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let good = model(1, "1");
    std::fs::write(pki.path().join("heldout.jsonl"), heldout_of(&good)).unwrap();
    let path = pki.path().join("recs.safetensors");
    std::fs::write(&path, &good).unwrap();
    let gw = TestGateway::start(&config(&pki, up.addr, &path), pki.path()).await;
    let admin = gw.gateway.admin_addr();
    let serving = gw.gateway.model("recs").unwrap().live().version.clone();
    let evaluations = |outcome: &str| {
        gw.metric(
            "gateway_model_evaluations_total",
            &[("model", "recs"), ("outcome", outcome)],
        )
    };
    assert_eq!(
        evaluations("accepted"),
        1.0,
        "evaluated at start, not refused"
    );

    let worse = model(2, "1");
    let r = admin_send(
        admin,
        Method::PUT,
        "/admin/models/recs",
        TOKEN,
        worse.clone(),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.text());
    let text = r.text();
    let refused = gateway::plugin::content_version(&worse);
    for needle in [
        format!("offline evaluation refused version {refused}"),
        format!("NDCG@{K} "),
        format!("vs the active version {serving}'s 1.0000"),
        "more than max_regression 0.05".to_string(),
        format!("precision@{K}"),
        "over 16 queries".to_string(),
    ] {
        assert!(text.contains(&needle), "{needle:?} not in {text}");
    }
    assert_eq!(
        gw.gateway.model("recs").unwrap().live().version,
        serving,
        "the active version keeps serving"
    );
    assert_eq!(evaluations("refused"), 1.0);

    // The same weights in another file: as good as the active version, so activated.
    let same = model(1, "2");
    let r = admin_send(
        admin,
        Method::PUT,
        "/admin/models/recs",
        TOKEN,
        same.clone(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let activated = gateway::plugin::content_version(&same);
    assert_ne!(activated, serving);
    assert_eq!(gw.gateway.model("recs").unwrap().live().version, activated);
    assert_eq!(evaluations("accepted"), 2.0);

    // Held-out data the new version cannot be evaluated on refuses it too.
    std::fs::write(
        pki.path().join("heldout.jsonl"),
        "{\"user\": 99, \"relevant\": [1]}\n",
    )
    .unwrap();
    let r = admin_send(
        admin,
        Method::PUT,
        "/admin/models/recs",
        TOKEN,
        good.clone(),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.text().contains("heldout.jsonl:1: unknown user id 99"),
        "{}",
        r.text()
    );
    assert_eq!(gw.gateway.model("recs").unwrap().live().version, activated);
    assert_eq!(evaluations("error"), 1.0);
}

#[test]
fn model_eval_prints_the_figures() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let good = model(1, "1");
    std::fs::write(dir.join("good.safetensors"), &good).unwrap();
    std::fs::write(dir.join("worse.safetensors"), model(2, "1")).unwrap();
    std::fs::write(dir.join("heldout.jsonl"), heldout_of(&good)).unwrap();
    let eval = |file: &str, data: &str| {
        Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["model", "eval", file, "--data", data, "--k", "5"])
            .current_dir(dir)
            .output()
            .unwrap()
    };
    let out = eval("good.safetensors", "heldout.jsonl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.trim(),
        "good.safetensors: NDCG@5 1.0000, precision@5 1.0000, recall@5 1.0000 over 16 queries"
    );
    let out = eval("worse.safetensors", "heldout.jsonl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(stdout.contains("NDCG@5 0."), "{stdout}");
    std::fs::write(
        dir.join("bad.jsonl"),
        "{\"user\": 1, \"relevant\": [1]}\n{\"user\"}\n",
    )
    .unwrap();
    let out = eval("good.safetensors", "bad.jsonl");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.jsonl:2: not JSON"), "{stderr}");
}
