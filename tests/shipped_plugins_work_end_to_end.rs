//! The first-party plugins from `plugins/`, built to wasm32-wasip2 and run by the real
//! gateway: hygiene, rate limiting, canary routing, the storefront post-processor, no-op.

use std::collections::HashSet;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::*;

fn req(path: &str) -> http::request::Builder {
    Request::get(format!("https://localhost{path}")).header("host", "localhost")
}

#[tokio::test]
async fn hygiene_strips_internal_headers_normalizes_paths_and_adds_security_headers() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let extra = format!(
        "plugins = [\"hygiene\"]\n{}",
        plugin_table("hygiene", "hygiene", "", "")
    );
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", &extra), pki.path()).await;
    let addr = gw.addr("https");

    let r = fetch(
        addr,
        &pki.ca_der,
        true,
        req("/shop//a/./b/../c?x=1")
            .header("x-internal-user", "42")
            .header("x-keep", "1")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.last();
    assert_eq!(seen.uri.path_and_query().unwrap().as_str(), "/shop/a/c?x=1");
    assert!(!seen.headers.contains_key("x-internal-user"));
    assert_eq!(seen.headers.get("x-keep").unwrap(), "1");
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert!(r.header("strict-transport-security").is_some());

    let hits = up.hits();
    let r = fetch(
        addr,
        &pki.ca_der,
        true,
        req("/a/../../etc/passwd")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        up.hits(),
        hits,
        "a path escaping the root never reaches the upstream"
    );
    assert!(r.header("x-request-id").is_some());
    assert_eq!(
        gw.metric(
            "gateway_plugin_invocations_total",
            &[
                ("plugin", "hygiene"),
                ("hook", "on_request"),
                ("outcome", "local_response")
            ]
        ),
        1.0
    );
}

#[tokio::test]
async fn ratelimit_answers_429_past_the_burst_and_403_to_blocked_agents() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let cfg = "requests_per_second = 0.5\nburst = 2";
    let extra = format!(
        "plugins = [\"ratelimit\"]\n{}",
        plugin_table("ratelimit", "ratelimit", cfg, "")
    );
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", &extra), pki.path()).await;
    let mut conn = tls_connect(gw.addr("https"), &pki.ca_der, ClientOpts::default())
        .await
        .unwrap();
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..4 {
        let r = conn
            .sender
            .send(
                req("/")
                    .header("x-api-key", "key-1")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        statuses.push(r.status.as_u16());
        last = Some(r);
    }
    assert_eq!(statuses, vec![200, 200, 429, 429]);
    let last = last.unwrap();
    let retry: u64 = last.header("retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1, "retry-after {retry}");
    // Another key has its own bucket.
    let r = conn
        .sender
        .send(
            req("/")
                .header("x-api-key", "key-2")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let r = conn
        .sender
        .send(
            req("/")
                .header("user-agent", "sqlmap/1.7")
                .header("x-api-key", "key-3")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(up.hits(), 3);
    assert_eq!(
        gw.metric(
            "gateway_plugin_ratelimit_limited_total",
            &[("plugin", "ratelimit")]
        ),
        2.0
    );
    // A new key per request does not escape the per-address limit (4 x burst = 8 by
    // default, 3 of them used above).
    let mut passed = 0;
    for i in 0..20 {
        let r = conn
            .sender
            .send(
                req("/")
                    .header("x-api-key", format!("minted-{i}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        if r.status == 200 {
            passed += 1;
        } else {
            assert_eq!(r.status, 429, "{}", r.text());
        }
    }
    // 5 left of the burst, and at most one more refilled (2/s) while the test runs.
    assert!(
        (5..=6).contains(&passed),
        "minted keys got {passed} of 20 through"
    );
}

#[tokio::test]
async fn canary_assignment_is_sticky_weighted_and_overridable() {
    let pki = Pki::new();
    pki.issue("server", &["localhost"]);
    let stable = Upstream::named("stable").await;
    let canary = Upstream::named("canary").await;
    let toml = format!(
        r#"
admin.bind = "127.0.0.1:0"
logging.access_log = false
[[tls.certificates]]
cert = "server.pem"
key = "server.key"
[[listeners]]
name = "https"
bind = "127.0.0.1:0"
[[upstreams]]
name = "stable"
backends = ["{}"]
[[upstreams]]
name = "canary"
backends = ["{}"]
[[routes]]
name = "shop"
upstream = "stable"
plugins = ["canary"]
variants = {{ stable = "stable", canary = "canary" }}
default_variant = "stable"
{}
"#,
        stable.addr,
        canary.addr,
        plugin_table(
            "canary",
            "canary",
            "variants = [{ name = \"stable\", weight = 50 }, { name = \"canary\", weight = 50 }]",
            ""
        )
    );
    let gw = TestGateway::start(&toml, pki.path()).await;
    let mut conn = tls_connect(gw.addr("https"), &pki.ca_der, ClientOpts::default())
        .await
        .unwrap();
    let mut seen = HashSet::new();
    for user in 0..40 {
        let mut bodies = HashSet::new();
        for _ in 0..3 {
            let r = conn
                .sender
                .send(
                    req("/")
                        .header("cookie", format!("shop_uid=user-{user}"))
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(
                r.header("x-variant"),
                Some(r.text().as_str()),
                "x-variant names the variant that served"
            );
            bodies.insert(r.text());
        }
        assert_eq!(bodies.len(), 1, "user-{user} always gets the same variant");
        seen.extend(bodies);
    }
    assert_eq!(
        seen.len(),
        2,
        "a 50/50 split over 40 users reaches both variants"
    );
    for (force, expect) in [("canary", "canary"), ("stable", "stable")] {
        let r = conn
            .sender
            .send(
                req("/")
                    .header("x-canary", force)
                    .header("cookie", "shop_uid=user-1")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.text(), expect);
    }
}

#[tokio::test]
async fn storefront_plugin_ranks_the_demo_search_results() {
    let pki = Pki::new();
    let store = gateway::demo::start_storefront("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let extra = format!(
        "plugins = [\"storefront\"]\nplugin_body_access = true\n{}",
        plugin_table("storefront", "storefront", "", "")
    );
    let gw = TestGateway::start(&basic_config(&pki, &[store], "", &extra), pki.path()).await;
    for h2 in [false, true] {
        let r = fetch(
            gw.addr("https"),
            &pki.ca_der,
            h2,
            get("localhost", "/api/search?q=boot"),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-storefront-plugin"), Some("1"));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["reranked_by"], "storefront-plugin");
        let ranks: Vec<u64> = v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["rank"].as_u64().unwrap())
            .collect();
        assert_eq!(ranks, (1..=ranks.len() as u64).collect::<Vec<_>>());
        if let Some(len) = r.header("content-length") {
            assert_eq!(len.parse::<usize>().unwrap(), r.body.len());
        }
    }
    // Other paths pass untouched.
    let r = fetch(
        gw.addr("https"),
        &pki.ca_der,
        false,
        get("localhost", "/api/products/1"),
    )
    .await;
    assert!(r.header("x-storefront-plugin").is_none());
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["id"],
        1
    );
}

#[tokio::test]
async fn a_chain_of_five_noop_plugins_passes_requests_through() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let mut extra = String::from("plugins = [\"n1\", \"n2\", \"n3\", \"n4\", \"n5\"]\n");
    for i in 1..=5 {
        extra.push_str(&plugin_table(&format!("n{i}"), "noop", "", "instances = 1"));
    }
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", &extra), pki.path()).await;
    let mut conn = tls_connect(gw.addr("https"), &pki.ca_der, ClientOpts::default())
        .await
        .unwrap();
    for _ in 0..10 {
        assert_eq!(conn.sender.get("localhost", "/").await.text(), "a");
    }
    for i in 1..=5 {
        let name = format!("n{i}");
        for hook in ["on_request", "on_response"] {
            assert_eq!(
                gw.metric(
                    "gateway_plugin_invocations_total",
                    &[("plugin", &name), ("hook", hook), ("outcome", "ok")]
                ),
                10.0
            );
        }
    }
}

#[tokio::test]
async fn plugins_see_request_bodies_within_the_limit_and_bodies_arrive_intact() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let extra = format!(
        "plugins = [\"ok\"]\nplugin_body_access = true\nplugin_max_body_bytes = 1000\n{}",
        plugin_table("ok", "hostile", "ok", "")
    );
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", &extra), pki.path()).await;
    for (size, h2) in [(5usize, false), (5, true), (3000, false), (3000, true)] {
        let body: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
        let req = Request::post("https://localhost/upload")
            .header("host", "localhost")
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap();
        let r = fetch(gw.addr("https"), &pki.ca_der, h2, req).await;
        assert_eq!(r.status, 200);
        let seen = up.last();
        assert_eq!(
            seen.body,
            Bytes::from(body),
            "the upstream gets the whole body (size {size}, h2 {h2})"
        );
        let shown = seen
            .headers
            .get("x-body-bytes")
            .map(|v| v.to_str().unwrap().to_string());
        if size <= 1000 {
            assert_eq!(shown.as_deref(), Some("5"), "the plugin saw the body");
        } else {
            assert_eq!(
                shown, None,
                "a body over the limit streams past the plugin unseen"
            );
        }
    }
}
