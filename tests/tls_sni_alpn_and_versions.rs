//! HTTPS: HTTP/1.1 and h2 by ALPN, the certificate chosen by SNI, TLS 1.2 and 1.3, failed
//! handshakes counted, and the cleartext listener's redirect.

use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::support::*;

#[tokio::test]
async fn h1_and_h2_through_tls_reach_the_upstream() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", ""), pki.path()).await;
    let addr = gw.addr("https");

    let r1 = fetch(addr, &pki.ca_der, false, get("localhost", "/p?q=1")).await;
    assert_eq!(
        (r1.status.as_u16(), r1.version, r1.text().as_str()),
        (200, http::Version::HTTP_11, "a")
    );
    let r2 = fetch(addr, &pki.ca_der, true, get("localhost", "/p?q=2")).await;
    assert_eq!(
        (r2.status.as_u16(), r2.version, r2.text().as_str()),
        (200, http::Version::HTTP_2, "a")
    );
    assert_eq!(up.hits(), 2);
    assert_eq!(up.last().uri.path_and_query().unwrap().as_str(), "/p?q=2");
    assert_eq!(
        up.last().version,
        http::Version::HTTP_11,
        "upstream pool speaks HTTP/1.1"
    );
    assert_eq!(
        gw.metric(
            "gateway_requests_total",
            &[("route", "all"), ("status_class", "2xx")]
        ),
        2.0
    );

    // Several requests over one kept-alive connection, both protocols.
    for h2 in [false, true] {
        let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
        let mut conn = tls_connect(
            addr,
            &pki.ca_der,
            ClientOpts {
                alpn,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(conn.alpn.as_deref(), Some(alpn[0]));
        for _ in 0..5 {
            assert_eq!(conn.sender.get("localhost", "/").await.status, 200);
        }
    }
    assert_eq!(
        gw.metric("gateway_connections_total", &[("listener", "https")]),
        4.0
    );
}

fn der_of(path: &std::path::Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path).unwrap()
}

#[tokio::test]
async fn sni_picks_exact_then_wildcard_then_default_certificate() {
    let pki = Pki::new();
    let (shop, _) = pki.issue("shop", &["shop.test"]);
    let (wild, _) = pki.issue("wild", &["*.cdn.test"]);
    let (dflt, _) = pki.issue("dflt", &["default.test", "unlisted.test"]);
    let up = Upstream::named("a").await;
    let toml = format!(
        r#"
admin.bind = "127.0.0.1:0"
[[tls.certificates]]
cert = "shop.pem"
key = "shop.key"
server_names = ["shop.test"]
[[tls.certificates]]
cert = "wild.pem"
key = "wild.key"
server_names = ["*.cdn.test"]
[[tls.certificates]]
cert = "dflt.pem"
key = "dflt.key"
server_names = ["default.test"]
default = true
[[listeners]]
name = "https"
bind = "127.0.0.1:0"
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
    let addr = gw.addr("https");
    for (sni, expect) in [
        ("shop.test", &shop),
        ("img.cdn.test", &wild),
        ("unlisted.test", &dflt),
    ] {
        let mut conn = tls_connect(
            addr,
            &pki.ca_der,
            ClientOpts {
                sni,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(conn.peer_cert, der_of(expect), "certificate for SNI {sni}");
        assert_eq!(conn.sender.get(sni, "/").await.status, 200);
    }
}

#[tokio::test]
async fn tls12_and_tls13_negotiate_and_bad_handshakes_are_counted() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", ""), pki.path()).await;
    let addr = gw.addr("https");
    for (version, expect) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let mut conn = tls_connect(
            addr,
            &pki.ca_der,
            ClientOpts {
                versions: &[version],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(conn.tls_version, expect);
        assert_eq!(conn.sender.get("localhost", "/").await.status, 200);
    }

    // Cleartext HTTP to the TLS port: the handshake fails, the connection closes, it is counted.
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let (_, closed) = read_until_close(&mut tcp, Duration::from_secs(5)).await;
    assert!(closed, "gateway closes a connection that is not TLS");
    assert!(
        eventually(Duration::from_secs(2), || gw.metric(
            "gateway_tls_handshake_failures_total",
            &[("listener", "https")]
        ) == 1.0)
        .await
    );
    // The listener keeps serving.
    assert_eq!(
        fetch(addr, &pki.ca_der, false, get("localhost", "/"))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn cleartext_listener_redirects_or_serves() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let extra = r#"
[[listeners]]
name = "redirect"
bind = "127.0.0.1:0"
protocol = "http"
http_mode = "redirect"
redirect_https_port = 8443

[[listeners]]
name = "plain"
bind = "127.0.0.1:0"
protocol = "http"
"#;
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", extra), pki.path()).await;
    let mut c = plain_connect(gw.addr("redirect")).await;
    let r = c.get("Shop.Test:80", "/cart?item=3").await;
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some("https://shop.test:8443/cart?item=3")
    );
    assert_eq!(up.hits(), 0);

    let mut c = plain_connect(gw.addr("plain")).await;
    let r = c.get("localhost", "/x").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "a"));
    assert_eq!(up.last().headers.get("x-forwarded-proto").unwrap(), "http");
}
