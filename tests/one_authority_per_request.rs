//! A request has one authority, decided once: the route, the `Host` sent upstream and the
//! forwarding headers all name it. An h2 `Host` that contradicts `:authority`, two `Host`
//! headers, none on HTTP/1.1, and user information get 400 and never reach an upstream.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::io::AsyncWriteExt;

use crate::support::*;

/// A gateway routing `localhost` to one upstream and `evil.test` to another.
async fn two_sites() -> (Pki, Upstream, Upstream, TestGateway) {
    let pki = Pki::new();
    pki.issue("server", &["localhost"]);
    let (local, evil) = (
        Upstream::named("local").await,
        Upstream::named("evil").await,
    );
    let toml = format!(
        r#"
admin.bind = "127.0.0.1:0"
[proxy]
forwarded = "both"
[[tls.certificates]]
cert = "server.pem"
key = "server.key"
default = true
[[listeners]]
name = "https"
bind = "127.0.0.1:0"
[[upstreams]]
name = "local"
backends = ["{}"]
[[upstreams]]
name = "evil"
backends = ["{}"]
[[routes]]
name = "local"
hosts = ["localhost"]
upstream = "local"
[[routes]]
name = "evil"
hosts = ["evil.test"]
upstream = "evil"
"#,
        local.addr, evil.addr
    );
    let gw = TestGateway::start(&toml, pki.path()).await;
    (pki, local, evil, gw)
}

/// Sends `head` on a raw TLS connection and returns what came back.
async fn raw_request(gw: &TestGateway, pki: &Pki, head: &str) -> String {
    let mut tls = raw_tls(gw.addr("https"), &pki.ca_der).await;
    tls.write_all(head.as_bytes()).await.unwrap();
    read_until_close(&mut tls, Duration::from_secs(3)).await.0
}

#[tokio::test]
async fn h2_authority_is_routed_on_and_sent_as_host() {
    let (pki, local, evil, gw) = two_sites().await;
    let req = Request::get("https://localhost/x")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = fetch(gw.addr("https"), &pki.ca_der, true, req).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "local"));
    let seen = local.last();
    assert_eq!(seen.headers.get("host").unwrap(), "localhost");
    assert_eq!(seen.headers.get("x-forwarded-host").unwrap(), "localhost");
    assert_eq!(evil.hits(), 0);
}

#[tokio::test]
async fn an_h2_host_header_contradicting_the_authority_gets_400() {
    let (pki, local, evil, gw) = two_sites().await;
    for host in ["evil.test", "localhost:8443"] {
        let req = Request::get("https://localhost/x")
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = fetch(gw.addr("https"), &pki.ca_der, true, req).await;
        assert_eq!(r.status, 400, "host {host}: {}", r.text());
        assert!(r.text().contains(":authority"), "{}", r.text());
    }
    // The same host spelled otherwise is no contradiction; upstream gets `:authority`.
    let req = Request::get("https://localhost/x")
        .header("host", "LOCALHOST:443")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = fetch(gw.addr("https"), &pki.ca_der, true, req).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "local"));
    assert_eq!(local.last().headers.get("host").unwrap(), "localhost");
    assert_eq!(local.hits(), 1);
    assert_eq!(evil.hits(), 0);
    assert_eq!(
        gw.metric(
            "gateway_rejected_requests_total",
            &[("reason", "bad_authority")]
        ),
        2.0
    );
}

#[tokio::test]
async fn an_absolute_form_target_wins_over_host_and_replaces_it() {
    let (pki, local, evil, gw) = two_sites().await;
    let text = raw_request(
        &gw,
        &pki,
        "GET http://evil.test/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("evil"), "{text}");
    let seen = evil.last();
    assert_eq!(seen.headers.get("host").unwrap(), "evil.test");
    assert_eq!(seen.headers.get("x-forwarded-host").unwrap(), "evil.test");
    assert!(
        seen.headers
            .get("forwarded")
            .unwrap()
            .to_str()
            .unwrap()
            .ends_with("host=\"evil.test\""),
        "{:?}",
        seen.headers.get("forwarded")
    );
    assert_eq!(local.hits(), 0);
}

#[tokio::test]
async fn two_host_headers_or_none_get_400() {
    let (pki, local, evil, gw) = two_sites().await;
    for head in [
        "GET /x HTTP/1.1\r\nHost: localhost\r\nHost: evil.test\r\nConnection: close\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        "GET /x HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n",
        "GET http://localhost/x HTTP/1.1\r\nConnection: close\r\n\r\n",
    ] {
        let text = raw_request(&gw, &pki, head).await;
        assert!(text.starts_with("HTTP/1.1 400"), "{head:?}: {text}");
    }
    assert_eq!(local.hits() + evil.hits(), 0);
}

#[tokio::test]
async fn user_information_in_the_authority_gets_400() {
    let (pki, local, evil, gw) = two_sites().await;
    let req = Request::get("https://user:secret@localhost/x")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = fetch(gw.addr("https"), &pki.ca_der, true, req).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let text = raw_request(
        &gw,
        &pki,
        "GET /x HTTP/1.1\r\nHost: user@localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert_eq!(local.hits() + evil.hits(), 0);
}

#[tokio::test]
async fn the_https_redirect_follows_the_same_authority_rules() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let extra = r#"
[[listeners]]
name = "redirect"
bind = "127.0.0.1:0"
protocol = "http"
http_mode = "redirect"
redirect_https_port = 8443
"#;
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", extra), pki.path()).await;
    let send = |head: &'static str| {
        let addr = gw.addr("redirect");
        async move {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.write_all(head.as_bytes()).await.unwrap();
            read_until_close(&mut tcp, Duration::from_secs(3)).await.0
        }
    };
    let text =
        send("GET /x HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    let text =
        send("GET http://a.test/x HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 308"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("location: https://a.test:8443/x"),
        "{text}"
    );
}

#[tokio::test]
async fn a_listener_with_reject_misdirected_answers_421_to_hosts_its_certificate_does_not_cover() {
    let pki = Pki::new();
    pki.issue("server", &["localhost"]);
    pki.issue("shop", &["shop.test", "*.shop.test"]);
    let up = Upstream::named("a").await;
    let toml = format!(
        r#"
admin.bind = "127.0.0.1:0"
[[tls.certificates]]
cert = "server.pem"
key = "server.key"
server_names = ["localhost"]
default = true
[[tls.certificates]]
cert = "shop.pem"
key = "shop.key"
server_names = ["shop.test", "*.shop.test"]
[[listeners]]
name = "https"
bind = "127.0.0.1:0"
[[listeners]]
name = "strict"
bind = "127.0.0.1:0"
reject_misdirected = true
[[upstreams]]
name = "app"
backends = ["{}"]
[[routes]]
name = "all"
upstream = "app"
"#,
        up.addr
    );
    let gw = TestGateway::start(&toml, pki.path()).await;
    // Every connection is made with SNI `localhost`, served the default certificate.
    for h2 in [false, true] {
        for (listener, host, status) in [
            ("https", "shop.test", 200),
            ("strict", "localhost", 200),
            ("strict", "shop.test", 421),
            ("strict", "www.shop.test", 421),
        ] {
            let r = fetch(gw.addr(listener), &pki.ca_der, h2, get(host, "/")).await;
            assert_eq!(r.status, status, "{listener} {host} h2={h2}: {}", r.text());
        }
    }
    assert_eq!(up.hits(), 4);
    assert_eq!(
        gw.metric(
            "gateway_rejected_requests_total",
            &[("reason", "misdirected")]
        ),
        4.0
    );
}

#[test]
fn reject_misdirected_on_a_cleartext_listener_is_a_config_error() {
    let pki = Pki::new();
    let up = "127.0.0.1:9".parse().unwrap();
    let extra = "[[listeners]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\nreject_misdirected = true\n";
    let toml = basic_config(&pki, &[up], "", extra);
    let err = gateway::Config::from_toml(&toml, "test.toml", pki.path())
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("reject_misdirected"), "{err}");
    assert!(err.contains("https"), "{err}");
}
