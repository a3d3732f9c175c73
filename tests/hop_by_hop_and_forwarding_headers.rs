//! Proxy header correctness: hop-by-hop headers stripped both ways, forwarding headers added,
//! `Via`, and the request id kept when valid, generated otherwise, and returned.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::*;

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let pki = Pki::new();
    let up = Upstream::with(|_| {
        Reply::Respond(
            StatusCode::OK,
            vec![
                ("connection", "x-upstream-hop"),
                ("x-upstream-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("x-end-to-end", "1"),
            ],
            Bytes::from_static(b"ok"),
        )
    })
    .await;
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", ""), pki.path()).await;
    let req = Request::get("https://localhost/")
        .header("host", "localhost")
        .header("connection", "keep-alive, x-client-hop")
        .header("x-client-hop", "secret")
        .header("keep-alive", "timeout=10")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("te", "trailers")
        .header("x-end-to-end", "kept")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = fetch(gw.addr("https"), &pki.ca_der, false, req).await;
    assert_eq!(r.status, 200);
    let seen = up.last();
    for h in ["x-client-hop", "keep-alive", "proxy-authorization"] {
        assert!(
            !seen.headers.contains_key(h),
            "{h} must not reach the upstream"
        );
    }
    assert_eq!(seen.headers.get("te").unwrap(), "trailers");
    assert_eq!(seen.headers.get("x-end-to-end").unwrap(), "kept");
    assert!(
        !r.headers.contains_key("x-upstream-hop"),
        "connection-listed response header stripped"
    );
    assert!(!r.headers.contains_key("keep-alive"));
    assert_eq!(r.header("x-end-to-end"), Some("1"));
}

#[tokio::test]
async fn forwarding_headers_via_and_request_ids() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let proxy = "[proxy]\nforwarded = \"both\"\nvia = true\nvia_name = \"edge-1\"";
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", proxy), pki.path()).await;
    let addr = gw.addr("https");

    let r = fetch(addr, &pki.ca_der, false, get("localhost", "/")).await;
    let seen = up.last();
    assert_eq!(seen.headers.get("x-forwarded-for").unwrap(), "127.0.0.1");
    assert_eq!(seen.headers.get("x-forwarded-proto").unwrap(), "https");
    assert_eq!(seen.headers.get("x-forwarded-host").unwrap(), "localhost");
    assert_eq!(
        seen.headers.get("forwarded").unwrap(),
        "for=127.0.0.1;proto=https;host=\"localhost\""
    );
    assert_eq!(seen.headers.get("via").unwrap(), "1.1 edge-1");
    assert_eq!(r.header("via"), Some("1.1 edge-1"));
    let generated = r.header("x-request-id").unwrap().to_string();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");
    assert_eq!(
        seen.headers.get("x-request-id").unwrap(),
        generated.as_str()
    );

    // h2 downstream: Via names version 2, the client's XFF chain is extended, a valid id kept.
    let req = Request::get("https://localhost/")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-request-id", "checkout-42.a")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = fetch(addr, &pki.ca_der, true, req).await;
    let seen = up.last();
    assert_eq!(
        seen.headers.get("x-forwarded-for").unwrap(),
        "203.0.113.9, 127.0.0.1"
    );
    assert_eq!(seen.headers.get("via").unwrap(), "2 edge-1");
    assert_eq!(seen.headers.get("x-request-id").unwrap(), "checkout-42.a");
    assert_eq!(r.header("x-request-id"), Some("checkout-42.a"));
    assert_eq!(
        seen.headers.get("host").unwrap(),
        "localhost",
        "h2 authority becomes Host upstream"
    );

    // An id with characters unsafe for logs is replaced.
    let req = Request::get("https://localhost/")
        .header("host", "localhost")
        .header("x-request-id", "bad id\"")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = fetch(addr, &pki.ca_der, false, req).await;
    let id = r.header("x-request-id").unwrap();
    assert_ne!(id, "bad id\"");
    assert_eq!(up.last().headers.get("x-request-id").unwrap(), id);
}
