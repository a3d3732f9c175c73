//! The scoring endpoint through the real gateway: dynamic batches answer rank and top-k
//! requests with the version that produced them, bad requests get a clear 4xx, and swapping
//! model versions 100 times under concurrent load fails no request and never mixes versions.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use gateway::scoring::{
    sample_model, ComputeDevice, Model, Query, RankRequest, SampleSpec, ScoringConfig,
};
use http::Request;
use http_body_util::Full;

use crate::support::*;

fn post(path: &str, body: serde_json::Value) -> Request<Full<Bytes>> {
    Request::post(format!("https://localhost{path}"))
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn sample(seed: u64) -> Vec<u8> {
    let mut spec = SampleSpec::embedding(300, 16, seed);
    spec.n_users = 50;
    sample_model(&spec)
}

fn config(pki: &Pki, upstream: std::net::SocketAddr, model: &std::path::Path) -> String {
    basic_config(
        pki,
        &[upstream],
        "",
        // lavapipe when it is installed (CI), so batches really run the kernels; else the CPU.
        &format!(
            "[scoring]\nallow_software_gpu = true\nmax_batch = 16\nmax_queue_delay_us = 300\n[[models]]\nname = \"recs\"\npath = \"{}\"\n",
            model.display()
        ),
    )
}

#[tokio::test]
async fn rank_and_topk_answer_with_their_version_and_reject_bad_requests() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let path = pki.path().join("recs.safetensors");
    std::fs::write(&path, sample(1)).unwrap();
    let gw = TestGateway::start(&config(&pki, up.addr, &path), pki.path()).await;
    let addr = gw.addr("https");
    let version = gateway::plugin::content_version(&std::fs::read(&path).unwrap());

    let r = fetch(
        addr,
        &pki.ca_der,
        true,
        post(
            "/_gateway/models/recs/rank",
            serde_json::json!({"user": 3, "candidates": [5, 1, 9, 250]}),
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-model-version"), Some(version.as_str()));
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let items: HashSet<u64> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["item"].as_u64().unwrap())
        .collect();
    assert_eq!(items, HashSet::from([5, 1, 9, 250]));
    let scores: Vec<f64> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["score"].as_f64().unwrap())
        .collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "best first: {scores:?}"
    );

    let r = fetch(
        addr,
        &pki.ca_der,
        false,
        post(
            "/_gateway/models/recs/topk",
            serde_json::json!({"user": 3, "k": 7}),
        ),
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["results"].as_array().unwrap().len(), 7);
    assert_eq!(v["version"], version.as_str());

    for (path, body, status) in [
        (
            "/_gateway/models/recs/rank",
            serde_json::json!({"user": 999, "candidates": [1]}),
            400,
        ),
        (
            "/_gateway/models/recs/rank",
            serde_json::json!({"user": 1, "candidates": [100000]}),
            400,
        ),
        (
            "/_gateway/models/recs/rank",
            serde_json::json!({"vector": [1.0], "candidates": [1]}),
            400,
        ),
        (
            "/_gateway/models/recs/rank",
            serde_json::json!({"user": 1}),
            400,
        ),
        (
            "/_gateway/models/recs/topk",
            serde_json::json!({"user": 1, "k": 0}),
            400,
        ),
        (
            "/_gateway/models/nope/rank",
            serde_json::json!({"user": 1, "candidates": [1]}),
            404,
        ),
    ] {
        let r = fetch(addr, &pki.ca_der, false, post(path, body.clone())).await;
        assert_eq!(r.status, status, "{body}: {}", r.text());
        assert!(r.text().contains("error"), "{}", r.text());
    }
    let list = fetch(
        addr,
        &pki.ca_der,
        false,
        get("localhost", "/_gateway/models"),
    )
    .await;
    assert!(list.text().contains(&version), "{}", list.text());
    // Other paths still go upstream.
    assert_eq!(
        fetch(addr, &pki.ca_der, false, get("localhost", "/shop"))
            .await
            .text(),
        "a"
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn a_hundred_swaps_under_load_fail_nothing_and_never_mix_versions() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let (a, b) = (sample(1), sample(2));
    let path = pki.path().join("recs.safetensors");
    std::fs::write(&path, &a).unwrap();
    let gw = TestGateway::start(&config(&pki, up.addr, &path), pki.path()).await;
    // Load version B through a reload, so A sits in the history for the rollbacks.
    std::fs::write(&path, &b).unwrap();
    let cfg =
        gateway::Config::from_toml(&config(&pki, up.addr, &path), "t.toml", pki.path()).unwrap();
    gw.gateway.reload(cfg).await.unwrap();
    let slot = gw.gateway.model("recs").unwrap();
    assert_eq!(slot.history().len(), 1);

    // What each version must answer, from the CPU path.
    let candidates: Vec<u32> = (0..40).map(|i| i * 7 % 300).collect();
    let mut expected: HashMap<String, HashMap<u32, Vec<(u32, f32)>>> = HashMap::new();
    for bytes in [&a, &b] {
        let m = Model::from_bytes(bytes, &ScoringConfig::default(), &ComputeDevice::Cpu).unwrap();
        let mut per_user = HashMap::new();
        for user in 0..8u32 {
            let scores = m
                .rank_cpu(&[RankRequest {
                    query: Query::User(user),
                    candidates: &candidates,
                }])
                .unwrap()
                .remove(0);
            per_user.insert(user, candidates.iter().copied().zip(scores).collect());
        }
        expected.insert(gateway::plugin::content_version(bytes), per_user);
    }

    let addr = gw.addr("https");
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..6u32 {
        let (ca, stop, served, candidates, expected) = (
            pki.ca_der.clone(),
            stop.clone(),
            served.clone(),
            candidates.clone(),
            expected.clone(),
        );
        clients.push(tokio::spawn(async move {
            let alpn: &[&[u8]] = if c % 2 == 0 { &[b"h2"] } else { &[b"http/1.1"] };
            let mut conn = tls_connect(
                addr,
                &ca,
                ClientOpts {
                    alpn,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            let mut versions = HashSet::new();
            let mut i = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let user = (c + i) % 8;
                i += 1;
                let r = conn
                    .sender
                    .send(post(
                        "/_gateway/models/recs/rank",
                        serde_json::json!({"user": user, "candidates": candidates}),
                    ))
                    .await
                    .unwrap();
                assert_eq!(r.status, 200, "{}", r.text());
                let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                let version = v["version"].as_str().unwrap().to_string();
                assert_eq!(r.header("x-model-version"), Some(version.as_str()));
                let want = &expected[&version][&user];
                for hit in v["results"].as_array().unwrap() {
                    let item = hit["item"].as_u64().unwrap() as u32;
                    let score = hit["score"].as_f64().unwrap() as f32;
                    let (_, exp) = want.iter().find(|(it, _)| *it == item).unwrap();
                    assert!(
                        (score - exp).abs() <= 1e-4 * exp.abs().max(1.0),
                        "item {item}: {score} vs {exp} from version {version}"
                    );
                }
                versions.insert(version);
                served.fetch_add(1, Ordering::SeqCst);
            }
            versions
        }));
    }
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        slot.rollback(None).unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    stop.store(true, Ordering::SeqCst);
    let mut seen = HashSet::new();
    for c in clients {
        seen.extend(c.await.unwrap());
    }
    assert_eq!(seen.len(), 2, "responses came from both versions");
    assert!(
        served.load(Ordering::SeqCst) >= 100,
        "served {}",
        served.load(Ordering::SeqCst)
    );
    assert_eq!(
        gw.metric(
            "gateway_model_requests_total",
            &[("model", "recs"), ("outcome", "failed")]
        ),
        0.0
    );
}

#[tokio::test]
async fn predict_serves_click_models_and_readyz_names_the_device() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let path = pki.path().join("ctr.safetensors");
    let spec = SampleSpec::mlp(20, 100, 7);
    let n_dense = spec.n_dense;
    std::fs::write(&path, sample_model(&spec)).unwrap();
    let toml = basic_config(
        &pki,
        &[up.addr],
        "",
        &format!(
            "[[models]]\nname = \"ctr\"\npath = \"{}\"\n",
            path.display()
        ),
    );
    let gw = TestGateway::start(&toml, pki.path()).await;
    let addr = gw.addr("https");
    let rows: Vec<_> = (0..5)
        .map(|i| serde_json::json!({"user": i, "item": i * 3, "dense": vec![0.5; n_dense]}))
        .collect();
    let r = fetch(
        addr,
        &pki.ca_der,
        true,
        post(
            "/_gateway/models/ctr/predict",
            serde_json::json!({ "rows": rows }),
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 5);
    for (i, hit) in results.iter().enumerate() {
        assert_eq!(
            hit["item"].as_u64().unwrap(),
            i as u64 * 3,
            "rows come back in request order"
        );
        let p = hit["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&p), "a probability: {p}");
    }
    let bad = fetch(
        addr,
        &pki.ca_der,
        false,
        post(
            "/_gateway/models/ctr/predict",
            serde_json::json!({"rows": [{"user": 1, "item": 1, "dense": [1.0]}]}),
        ),
    )
    .await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    let wrong_op = fetch(
        addr,
        &pki.ca_der,
        false,
        post(
            "/_gateway/models/ctr/rank",
            serde_json::json!({"user": 1, "candidates": [1]}),
        ),
    )
    .await;
    assert_eq!(wrong_op.status, 400, "{}", wrong_op.text());

    let ready = admin_get(gw.gateway.admin_addr(), "/readyz").await.text();
    assert!(ready.contains("model ctr: version"), "{ready}");
    let devices: f64 = ["gpu", "software-gpu", "cpu"]
        .iter()
        .map(|b| gw.metric("gateway_scoring_device_info", &[("backend", b)]))
        .sum();
    assert_eq!(devices, 1.0);
}

#[tokio::test]
async fn f16_storage_is_a_per_model_switch_that_a_reload_flips() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let path = pki.path().join("recs.safetensors");
    std::fs::write(&path, sample(4)).unwrap();
    let f32_toml = config(&pki, up.addr, &path);
    let f16_toml = f32_toml.replace(
        "[[models]]\nname = \"recs\"\n",
        "[[models]]\nname = \"recs\"\nf16_storage = true\n",
    );
    assert_ne!(f16_toml, f32_toml);
    let gw = TestGateway::start(&f16_toml, pki.path()).await;
    let addr = gw.addr("https");
    let admin = gw.gateway.admin_addr();
    let version = gateway::plugin::content_version(&std::fs::read(&path).unwrap());
    let ask = || {
        post(
            "/_gateway/models/recs/rank",
            serde_json::json!({"user": 3, "candidates": [5, 1, 9, 250]}),
        )
    };
    let scores = |r: &Got| -> Vec<(u64, f64)> {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let mut s: Vec<(u64, f64)> = v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| (h["item"].as_u64().unwrap(), h["score"].as_f64().unwrap()))
            .collect();
        s.sort_by_key(|p| p.0);
        s
    };
    let half = fetch(addr, &pki.ca_der, true, ask()).await;
    assert_eq!(half.status, 200, "{}", half.text());
    // Other scores from the same file: another version name.
    assert_eq!(
        half.header("x-model-version"),
        Some(format!("{version}+f16").as_str())
    );
    let ready = admin_get(admin, "/readyz").await.text();
    assert!(ready.contains("(f16 tables)"), "{ready}");

    // Same file, f16 off: the reload loads it again (not kept as unchanged) at f32.
    gw.gateway
        .reload(gateway::Config::from_toml(&f32_toml, "t.toml", pki.path()).unwrap())
        .await
        .unwrap();
    let ready = admin_get(admin, "/readyz").await.text();
    assert!(ready.contains("(f32 tables)"), "{ready}");
    let full = fetch(addr, &pki.ca_der, true, ask()).await;
    assert_eq!(full.header("x-model-version"), Some(version.as_str()));
    let (h, f) = (scores(&half), scores(&full));
    assert_eq!(h.len(), 4);
    let mut differ = false;
    for ((hi, hs), (fi, fs)) in h.iter().zip(&f) {
        assert_eq!(hi, fi);
        assert!(
            (hs - fs).abs() <= 4e-3 * (1.0 + fs.abs()),
            "f16 {hs} vs f32 {fs}"
        );
        differ |= hs != fs;
    }
    assert!(differ, "f16 rounding changed no score: {h:?}");
}
