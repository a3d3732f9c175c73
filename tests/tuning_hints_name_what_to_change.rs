//! Tuning hints: a model whose batches never fill gets the hint to lower
//! `max_queue_delay_us`, with its figures, in `GET /admin/hints` and the status document.

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;

use crate::support::*;

const TOKEN: &str = "hints-admin-token";

#[tokio::test]
async fn batches_that_never_fill_suggest_a_shorter_queue_delay() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let mut spec = gateway::scoring::SampleSpec::embedding(32, 8, 1);
    spec.n_users = 8;
    std::fs::write(
        pki.path().join("recs.safetensors"),
        gateway::scoring::sample_model(&spec),
    )
    .unwrap();
    std::fs::write(pki.path().join("admin.token"), TOKEN).unwrap();
    let toml = basic_config(
        &pki,
        &[up.addr],
        "",
        "[scoring]\nbackend = \"cpu\"\nmax_queue_delay_us = 200\n\n[[models]]\nname = \"recs\"\npath = \"recs.safetensors\"\n",
    )
    .replace(
        "[admin]\nbind = \"127.0.0.1:0\"",
        "[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"",
    );
    let gw = TestGateway::start(&toml, pki.path()).await;
    let admin = gw.gateway.admin_addr();
    let hints = || async {
        let r = admin_call(admin, Method::GET, "/admin/hints", Some(TOKEN)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["hints"].clone()
    };
    assert_eq!(hints().await, serde_json::json!([]), "no figures, no hints");
    // One request at a time: every batch holds one request.
    let mut conn = tls_connect(gw.addr("https"), &pki.ca_der, ClientOpts::default())
        .await
        .unwrap()
        .sender;
    for _ in 0..220 {
        let req = Request::post("https://localhost/_gateway/models/recs/rank")
            .header("host", "localhost")
            .body(Full::new(Bytes::from_static(
                b"{\"user\": 1, \"candidates\": [1, 2, 3]}",
            )))
            .unwrap();
        assert_eq!(conn.send(req).await.unwrap().status, 200);
    }
    let hints = hints().await;
    let hint = &hints[0];
    assert_eq!(hint["subject"], "model recs", "{hints}");
    assert!(
        hint["advice"]
            .as_str()
            .unwrap()
            .contains("lower [scoring] max_queue_delay_us (now 200)"),
        "{hints}"
    );
    assert!(
        hint["evidence"]
            .as_str()
            .unwrap()
            .contains("batches of 1.00 requests"),
        "{hints}"
    );
    let status = admin_call(admin, Method::GET, "/admin/status", Some(TOKEN)).await;
    let status: serde_json::Value = serde_json::from_slice(&status.body).unwrap();
    assert_eq!(status["hints"], hints, "gateway status shows them too");
}

#[tokio::test]
async fn a_plugin_near_its_fuel_budget_gets_the_hint_to_raise_it() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    std::fs::write(pki.path().join("admin.token"), TOKEN).unwrap();
    // hygiene's request hook burns about 6,000 units: a budget of 12,000 is too close.
    let extra = format!(
        "plugins = [\"hygiene\"]\n{}",
        plugin_table("hygiene", "hygiene", "", "fuel_per_call = 12000")
    );
    let toml = basic_config(&pki, &[up.addr], "", &extra).replace(
        "[admin]\nbind = \"127.0.0.1:0\"",
        "[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"",
    );
    let gw = TestGateway::start(&toml, pki.path()).await;
    let mut conn = tls_connect(gw.addr("https"), &pki.ca_der, ClientOpts::default())
        .await
        .unwrap()
        .sender;
    for _ in 0..210 {
        let req = Request::get("https://localhost/")
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(conn.send(req).await.unwrap().status, 200);
    }
    let r = admin_call(
        gw.gateway.admin_addr(),
        Method::GET,
        "/admin/hints",
        Some(TOKEN),
    )
    .await;
    let hints = serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["hints"].clone();
    let hint = hints
        .as_array()
        .unwrap()
        .iter()
        .find(|h| {
            h["subject"] == "plugin hygiene" && h["advice"].as_str().unwrap().contains("fuel")
        })
        .unwrap_or_else(|| panic!("no fuel hint in {hints}"));
    assert!(
        hint["advice"]
            .as_str()
            .unwrap()
            .contains("raise fuel_per_call (now 12000)"),
        "{hint}"
    );
    assert!(
        hint["evidence"]
            .as_str()
            .unwrap()
            .contains("over 210 calls"),
        "{hint}"
    );
}
