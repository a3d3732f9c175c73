//! Upstream pools: h2 (prior knowledge) and HTTP/1.1 upstreams, least-in-flight balancing,
//! and the downstream connection limit.

use std::time::Duration;

use bytes::Bytes;

use crate::support::*;

#[tokio::test]
async fn h2_upstream_pool_speaks_http2_and_reuses_connections() {
    let pki = Pki::new();
    let up = Upstream::named("h2").await;
    let gw = TestGateway::start(
        &basic_config(&pki, &[up.addr], "protocol = \"h2\"", ""),
        pki.path(),
    )
    .await;
    let mut conn = tls_connect(gw.addr("https"), &pki.ca_der, ClientOpts::default())
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(conn.sender.get("localhost", "/").await.text(), "h2");
    }
    assert_eq!(up.last().version, http::Version::HTTP_2);
}

#[tokio::test]
async fn least_in_flight_avoids_the_busy_backend() {
    let pki = Pki::new();
    let busy =
        Upstream::with(|_| Reply::Delay(Duration::from_millis(1500), Bytes::from_static(b"busy")))
            .await;
    let idle = Upstream::named("idle").await;
    let gw = TestGateway::start(
        &basic_config(
            &pki,
            &[busy.addr, idle.addr],
            "balance = \"least_in_flight\"",
            "",
        ),
        pki.path(),
    )
    .await;
    let addr = gw.addr("https");
    let ca = pki.ca_der.clone();
    // The first request takes the first turn, which is the busy backend, and stays in flight.
    let first = tokio::spawn(async move { fetch(addr, &ca, false, get("localhost", "/")).await });
    assert!(eventually(Duration::from_secs(2), || busy.hits() == 1).await);
    let mut conn = tls_connect(addr, &pki.ca_der, ClientOpts::default())
        .await
        .unwrap();
    for _ in 0..6 {
        assert_eq!(conn.sender.get("localhost", "/").await.text(), "idle");
    }
    assert_eq!(busy.hits(), 1);
    assert_eq!(first.await.unwrap().text(), "busy");
}

/// At `max_connections` a new client waits while every connection is busy, and gets the place
/// of one that has gone idle (it is evicted to make room).
#[tokio::test]
async fn connection_limit_holds_new_clients_while_every_connection_is_busy() {
    let pki = Pki::new();
    let up =
        Upstream::with(|_| Reply::Delay(Duration::from_millis(800), Bytes::from_static(b"slow")))
            .await;
    let gw = TestGateway::start(
        &basic_config(&pki, &[up.addr], "", "[limits]\nmax_connections = 1"),
        pki.path(),
    )
    .await;
    let addr = gw.addr("https");
    let mut first = tls_connect(addr, &pki.ca_der, ClientOpts::default())
        .await
        .unwrap();
    let busy = tokio::spawn(async move {
        let r = first.sender.get("localhost", "/").await;
        (first, r)
    });
    assert!(eventually(Duration::from_secs(2), || up.hits() == 1).await);
    let ca = pki.ca_der.clone();
    let second = tokio::spawn(async move { tls_connect(addr, &ca, ClientOpts::default()).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "the second client waits while the first is busy in the only place"
    );
    assert_eq!(
        gw.metric("gateway_active_connections", &[("listener", "https")]),
        1.0
    );
    // The first connection stays open but goes idle once answered: it makes room.
    let (first, r) = busy.await.unwrap();
    assert_eq!(r.text(), "slow");
    let mut second = tokio::time::timeout(Duration::from_secs(3), second)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.sender.get("localhost", "/").await.status, 200);
    assert_eq!(
        gw.metric("gateway_connections_closed_total", &[("reason", "evicted")]),
        1.0
    );
    drop(first);
}
