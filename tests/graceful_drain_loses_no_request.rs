//! Graceful shutdown: in-flight requests on HTTP/1.1 and h2 finish, new connections are
//! refused, `/readyz` says draining, and the drain deadline bounds the wait.

use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway::DrainOutcome;

use crate::support::*;

#[tokio::test]
async fn in_flight_requests_finish_during_drain() {
    let pki = Pki::new();
    let slow =
        Upstream::with(|_| Reply::Delay(Duration::from_millis(700), Bytes::from_static(b"done")))
            .await;
    let gw = TestGateway::start(
        &basic_config(&pki, &[slow.addr], "", "[server]\ndrain_timeout_ms = 5000"),
        pki.path(),
    )
    .await;
    let addr = gw.addr("https");
    let admin = gw.gateway.admin_addr();
    let ca = pki.ca_der.clone();

    let mut clients = Vec::new();
    for i in 0..12 {
        let ca = ca.clone();
        clients.push(tokio::spawn(async move {
            fetch(addr, &ca, i % 2 == 0, get("localhost", "/checkout")).await
        }));
    }
    assert!(
        eventually(Duration::from_secs(3), || slow.hits() == 12).await,
        "all requests in flight"
    );

    let started = Instant::now();
    let drain = tokio::spawn(gw.gateway.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ready = admin_get(admin, "/readyz").await;
    assert_eq!(ready.status, 503, "readyz reports draining");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed for new connections"
    );

    for c in clients {
        let r = c.await.unwrap();
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "done"));
    }
    assert_eq!(drain.await.unwrap(), DrainOutcome::Complete);
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// A gateway with `extra` config in front of an upstream answering 200 "ok".
async fn gateway_answering_ok(extra: &str) -> (Pki, Upstream, TestGateway) {
    let pki = Pki::new();
    let ok = Bytes::from_static(b"ok");
    let up =
        Upstream::with(move |_| Reply::Respond(http::StatusCode::OK, vec![], ok.clone())).await;
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", extra), pki.path()).await;
    (pki, up, gw)
}

/// A connection accepted before the drain but still in its TLS handshake is served, not
/// reset: its client finishes the handshake after the drain started and gets its answer, with
/// `connection: close`. (Such connections were closed at the drain's start, which a zero-downtime
/// upgrade showed as a client's "connection reset by peer".)
#[tokio::test]
async fn a_connection_still_in_its_tls_handshake_when_the_drain_starts_is_served() {
    let (pki, _up, gw) = gateway_answering_ok("[server]\ndrain_timeout_ms = 5000").await;
    let addr = gw.addr("https");
    // Accepted by the gateway, which now waits for the ClientHello.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let drain = tokio::spawn(gw.gateway.shutdown());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut conn = tls_connect_over(tcp, &pki.ca_der, ClientOpts::default())
        .await
        .expect("the handshake completes after the drain started");
    let r = conn.sender.send(get("localhost", "/late")).await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok"));
    assert_eq!(
        r.headers.get("connection").map(|v| v.to_str().unwrap()),
        Some("close"),
        "the answer says the connection ends"
    );
    assert_eq!(drain.await.unwrap(), DrainOutcome::Complete);
}

/// A client that connected but sends nothing does not hold the drain: its handshake is given
/// up a second after the drain started (DRAIN_IDLE), as an idle HTTP/1.1 connection is.
#[tokio::test]
async fn a_silent_handshake_does_not_hold_the_drain() {
    let (_pki, _up, gw) = gateway_answering_ok(
        "[server]\ndrain_timeout_ms = 20000\n[limits]\nheader_read_timeout_ms = 15000",
    )
    .await;
    let _silent = tokio::net::TcpStream::connect(gw.addr("https"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    assert_eq!(gw.gateway.shutdown().await, DrainOutcome::Complete);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "the drain took {took:?}"
    );
}

#[tokio::test]
async fn drain_deadline_bounds_the_wait() {
    let pki = Pki::new();
    let stuck = Upstream::with(|_| Reply::Delay(Duration::from_secs(30), Bytes::new())).await;
    let gw = TestGateway::start(
        &basic_config(
            &pki,
            &[stuck.addr],
            "request_timeout_ms = 60000",
            "[server]\ndrain_timeout_ms = 300",
        ),
        pki.path(),
    )
    .await;
    let addr = gw.addr("https");
    let ca = pki.ca_der.clone();
    let _client = tokio::spawn(async move { fetch(addr, &ca, false, get("localhost", "/")).await });
    assert!(eventually(Duration::from_secs(3), || stuck.hits() == 1).await);
    let started = Instant::now();
    assert_eq!(gw.gateway.shutdown().await, DrainOutcome::DeadlineExceeded);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn the_binary_drains_and_exits_zero_on_sigterm() {
    let pki = Pki::new();
    let slow =
        Upstream::with(|_| Reply::Delay(Duration::from_millis(600), Bytes::from_static(b"done")))
            .await;
    let path = pki.path().join("gw.toml");
    std::fs::write(&path, basic_config(&pki, &[slow.addr], "", "")).unwrap();
    let (mut child, addr) = spawn_gateway_binary(&path).await;
    let ca = pki.ca_der.clone();
    let in_flight =
        tokio::spawn(async move { fetch(addr, &ca, true, get("localhost", "/")).await });
    assert!(eventually(Duration::from_secs(3), || slow.hits() == 1).await);
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let r = in_flight.await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "done"));
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), Some(0));
}
