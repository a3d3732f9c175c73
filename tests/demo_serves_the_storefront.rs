//! The embedded demo: its configuration validates, and the storefront answers through the
//! gateway over TLS with search and recommendation JSON, post-processed by the demo's plugin
//! chain.

use crate::support::*;

#[tokio::test]
async fn demo_config_serves_search_and_recommendations() {
    let dir = tempfile::tempdir().unwrap();
    let store = gateway::demo::start_storefront("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let config = gateway::demo::demo_config(
        dir.path(),
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        store,
        Some(plugin_wasm("hygiene").parent().unwrap()),
    )
    .unwrap();
    assert_eq!(
        config.plugins.len(),
        3,
        "the demo runs its plugin chain when the plugins are built"
    );
    let registry = prometheus::Registry::new();
    let gw = gateway::Gateway::start(config, registry.clone())
        .await
        .unwrap();
    let ca =
        rustls::pki_types::pem::PemObject::from_pem_file(dir.path().join("demo-cert.pem")).unwrap();
    let addr = gw.listener_addr("https").unwrap();

    let r = fetch(addr, &ca, true, get("localhost", "/api/search?q=boot")).await;
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let results = v["results"].as_array().unwrap();
    assert_eq!(v["reranked_by"], "storefront-plugin", "{v}");
    assert_eq!(results[0]["rank"], 1);
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert!(
        !results.is_empty()
            && results
                .iter()
                .all(|p| p["name"].as_str().unwrap().contains("boot")),
        "{v}"
    );

    let r = fetch(
        addr,
        &ca,
        false,
        get("localhost", "/api/recommendations?user=42&limit=5"),
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let recs = v["recommendations"].as_array().unwrap();
    assert_eq!(recs.len(), 5);
    // The storefront plugin re-ranked them with the served model, best first.
    assert!(
        v["reranked_by"].as_str().unwrap().starts_with("recs@"),
        "{v}"
    );
    let scores: Vec<f64> = recs
        .iter()
        .map(|r| r["model_score"].as_f64().unwrap())
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    assert_eq!(r.header("via"), Some("1.1 storefront-gateway"));

    let rank = http::Request::post("https://localhost/_gateway/models/recs/rank")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            br#"{"user": 42, "candidates": [2, 8, 14, 20]}"#,
        )))
        .unwrap();
    let r = fetch(addr, &ca, true, rank).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("x-model-version").is_some());

    let metrics = admin_get(gw.admin_addr(), "/metrics").await.text();
    assert!(
        metrics.contains("gateway_requests_total{route=\"storefront\",status_class=\"2xx\"} 2"),
        "{metrics}"
    );
    assert_eq!(admin_get(gw.admin_addr(), "/healthz").await.status, 200);
}

#[test]
fn demo_config_without_built_plugins_still_validates() {
    let dir = tempfile::tempdir().unwrap();
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let config = gateway::demo::demo_config(dir.path(), any, any, any, Some(dir.path())).unwrap();
    assert!(config.plugins.is_empty());
    assert!(config.routes[0].plugins.is_empty());
}

#[tokio::test]
async fn the_demo_command_serves_the_storefront_through_its_plugins() {
    use tokio::io::AsyncBufReadExt;
    plugin_wasm("storefront");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["demo", "--https", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        // As on a headless node: no desktop session, Mesa's device-select layer not told off.
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("NODEVICE_SELECT")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut port, mut cert) = (None, None);
    while port.is_none() || cert.is_none() {
        let line = tokio::time::timeout(std::time::Duration::from_secs(20), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("banner line");
        if let Some(rest) = line.trim().strip_prefix("gateway (HTTPS)") {
            port = rest
                .trim()
                .trim_start_matches("https://localhost:")
                .trim_end_matches('/')
                .parse::<u16>()
                .ok();
        }
        if let Some(rest) = line.trim().strip_prefix("certificate") {
            cert = rest.split_whitespace().next().map(std::path::PathBuf::from);
        }
    }
    let cert_path = cert.unwrap();
    let ca = rustls::pki_types::pem::PemObject::from_pem_file(&cert_path).unwrap();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port.unwrap()).into();
    let r = fetch(
        addr,
        &ca,
        false,
        get("localhost", "/api/recommendations?user=42&limit=3"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert!(
        v["reranked_by"].as_str().unwrap().starts_with("recs@"),
        "{v}"
    );
    // A shopper with a cookie is in the demo's experiment and gets a token.
    let mut with_cookie = get("localhost", "/api/recommendations?user=42&limit=3");
    with_cookie
        .headers_mut()
        .insert("cookie", "shopper=alice".parse().unwrap());
    let r = fetch(addr, &ca, false, with_cookie).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        matches!(r.header("x-gateway-variant"), Some("current" | "next")),
        "{:?}",
        r.headers
    );
    assert!(r.header("x-gateway-attribution").is_some());
    // Ctrl-C drains and exits 0, and the demo's certificate and model go with it.
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait())
        .await
        .expect("the demo stops after SIGINT")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        !cert_path.exists(),
        "{} outlived the demo",
        cert_path.display()
    );
    // A healthy start says nothing on stderr at warn level (Mesa's "XDG_RUNTIME_DIR is
    // invalid" included).
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr)
        .await
        .unwrap();
    assert!(
        !stderr.contains("XDG_RUNTIME_DIR") && !stderr.contains("error"),
        "{stderr}"
    );
}
