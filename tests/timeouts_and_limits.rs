//! Timeouts and limits: 504 for a slow upstream, 431 for oversized headers, 413 for oversized
//! bodies (declared or streamed), 408 for a stalled body (proxied or to the scoring endpoint),
//! slowloris heads cut off, and idle connections closed.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::io::AsyncWriteExt;

use crate::support::*;

#[tokio::test]
async fn slow_upstream_gives_504() {
    let pki = Pki::new();
    let slow =
        Upstream::with(|_| Reply::Delay(Duration::from_secs(3), Bytes::from_static(b"late"))).await;
    let gw = TestGateway::start(
        &basic_config(&pki, &[slow.addr], "request_timeout_ms = 200", ""),
        pki.path(),
    )
    .await;
    let started = Instant::now();
    let r = fetch(
        gw.addr("https"),
        &pki.ca_der,
        true,
        get("localhost", "/slow"),
    )
    .await;
    assert_eq!(r.status, 504);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        gw.metric("gateway_upstream_errors_total", &[("kind", "timeout")]),
        1.0
    );
}

#[tokio::test]
async fn oversized_headers_and_bodies_are_refused() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let limits = "[limits]\nmax_header_bytes = 16384\nmax_body_bytes = 1024";
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", limits), pki.path()).await;
    let addr = gw.addr("https");

    let big = "x".repeat(20_000);
    let req = Request::get("https://localhost/")
        .header("host", "localhost")
        .header("x-big", big.as_str())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let mut conn = tls_connect(addr, &pki.ca_der, ClientOpts::default())
        .await
        .unwrap();
    assert_eq!(conn.sender.send(req).await.unwrap().status, 431);

    // Declared too large: refused before anything is sent upstream.
    let body = Bytes::from(vec![b'a'; 2048]);
    for h2 in [false, true] {
        let req = Request::post("https://localhost/upload")
            .header("host", "localhost")
            .body(Full::new(body.clone()))
            .unwrap();
        let r = fetch(addr, &pki.ca_der, h2, req).await;
        assert_eq!(r.status, 413, "h2: {h2}");
    }
    // Within the limit: passes.
    let req = Request::post("https://localhost/upload")
        .header("host", "localhost")
        .body(Full::new(Bytes::from_static(b"small")))
        .unwrap();
    assert_eq!(fetch(addr, &pki.ca_der, false, req).await.status, 200);
    assert_eq!(up.last().body, Bytes::from_static(b"small"));
    let hits_before = up.hits();

    // Streamed without a length (chunked): cut off at the limit.
    let mut tls = raw_tls(addr, &pki.ca_der).await;
    tls.write_all(
        b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await
    .unwrap();
    for _ in 0..3 {
        tls.write_all(format!("400\r\n{}\r\n", "b".repeat(0x400)).as_bytes())
            .await
            .unwrap();
    }
    tls.write_all(b"0\r\n\r\n").await.unwrap();
    let (text, _) = read_until_close(&mut tls, Duration::from_secs(3)).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(up
        .seen
        .lock()
        .unwrap()
        .iter()
        .skip(hits_before)
        .all(|s| s.body.len() <= 1024));
    assert!(
        gw.metric(
            "gateway_rejected_requests_total",
            &[("reason", "body_too_large")]
        ) >= 3.0
    );
}

#[tokio::test]
async fn stalled_body_gives_408_and_slow_heads_are_cut_off() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let limits = "[limits]\nbody_read_timeout_ms = 300\nheader_read_timeout_ms = 400";
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", limits), pki.path()).await;
    let addr = gw.addr("https");

    let mut tls = raw_tls(addr, &pki.ca_der).await;
    tls.write_all(
        b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nonly ten b",
    )
    .await
    .unwrap();
    let (text, _) = read_until_close(&mut tls, Duration::from_secs(3)).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eq!(
        gw.metric(
            "gateway_rejected_requests_total",
            &[("reason", "body_timeout")]
        ),
        1.0
    );

    // Slowloris: a head trickled byte by byte never completes; the connection is closed once
    // the header read timeout passes.
    let mut tls = raw_tls(addr, &pki.ca_der).await;
    let started = Instant::now();
    let mut closed = false;
    for b in b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
        if tls.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if started.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    if !closed {
        let (_, c) = read_until_close(&mut tls, Duration::from_secs(2)).await;
        closed = c;
    }
    assert!(
        closed,
        "a head still incomplete after the timeout closes the connection"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        started.elapsed()
    );
    assert!(
        up.seen
            .lock()
            .unwrap()
            .iter()
            .all(|s| s.method != http::Method::GET),
        "the slow head never went upstream"
    );
}

#[tokio::test]
async fn a_stalled_body_to_the_scoring_endpoint_gives_408() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let model = pki.path().join("recs.safetensors");
    let mut spec = gateway::scoring::SampleSpec::embedding(50, 8, 1);
    spec.n_users = 5;
    std::fs::write(&model, gateway::scoring::sample_model(&spec)).unwrap();
    let extra = format!(
        "[limits]\nbody_read_timeout_ms = 300\n[[models]]\nname = \"recs\"\npath = \"{}\"\n",
        model.display()
    );
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", &extra), pki.path()).await;

    let mut tls = raw_tls(gw.addr("https"), &pki.ca_der).await;
    let started = Instant::now();
    tls.write_all(
        b"POST /_gateway/models/recs/rank HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{\"user\": 1,",
    )
    .await
    .unwrap();
    let (text, _) = read_until_close(&mut tls, Duration::from_secs(3)).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("not received in time"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered after {:?}",
        started.elapsed()
    );
}

/// On HTTP/1.1 the header read timeout also bounds the wait for the next head on a kept-alive
/// connection, but not a request that is in flight longer than it.
#[tokio::test]
async fn a_kept_alive_http1_connection_waits_for_the_next_head_only_for_the_header_read_timeout() {
    let pki = Pki::new();
    let up =
        Upstream::with(|_| Reply::Delay(Duration::from_millis(900), Bytes::from_static(b"late")))
            .await;
    let limits = "[limits]\nheader_read_timeout_ms = 400";
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", limits), pki.path()).await;
    let mut tls = raw_tls(gw.addr("https"), &pki.ca_der).await;
    tls.write_all(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let (text, closed) = read_until_close(&mut tls, Duration::from_secs(4)).await;
    let took = started.elapsed();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.ends_with("late"),
        "the slow answer arrived whole: {text}"
    );
    assert!(
        !text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert!(closed, "the idle connection was closed");
    assert!(
        took >= Duration::from_millis(1200) && took < Duration::from_secs(3),
        "closed {took:?} after the request: 900 ms upstream + 400 ms waiting for a head"
    );
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let limits = "[limits]\nidle_timeout_ms = 300";
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", limits), pki.path()).await;
    let addr = gw.addr("https");
    let mut conn = tls_connect(
        addr,
        &pki.ca_der,
        ClientOpts {
            alpn: &[b"h2"],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(conn.sender.get("localhost", "/").await.status, 200);
    assert!(
        eventually(Duration::from_secs(3), || gw
            .metric("gateway_active_connections", &[("listener", "https")])
            == 0.0)
        .await
    );
}

#[tokio::test]
async fn oversized_h2_header_lists_are_refused() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let gw = TestGateway::start(
        &basic_config(&pki, &[up.addr], "", "[limits]\nmax_header_bytes = 16384"),
        pki.path(),
    )
    .await;
    let big = "x".repeat(20_000);
    let req = http::Request::get("https://localhost/")
        .header("x-big", big.as_str())
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let mut conn = tls_connect(
        gw.addr("https"),
        &pki.ca_der,
        ClientOpts {
            alpn: &[b"h2"],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let outcome = conn.sender.send(req).await;
    match outcome {
        Ok(r) => assert_eq!(r.status, 431),
        Err(e) => panic!("expected a 431 answer, got {e}"),
    }
    assert_eq!(up.hits(), 0);
}
