//! A request that fails because of its client (bad chunked framing, an upload cut off, a body
//! sent slower than the upstream request timeout) gets 400 or 408 and is never held against
//! the backend: after more of them than passive ejection tolerates, the only backend still
//! serves everyone else. A backend that really times out is still ejected.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::io::AsyncWriteExt;

use crate::support::*;

/// More than the default `consecutive_failures` (5).
const FAULTS: usize = 6;

/// A fresh client's GET gets the backend's answer, and the backend is marked healthy.
async fn backend_still_serves(gw: &TestGateway, pki: &Pki, up: &Upstream) {
    let r = fetch(gw.addr("https"), &pki.ca_der, false, get("localhost", "/")).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "a"));
    let backend = up.addr.to_string();
    assert_eq!(
        gw.metric("gateway_backend_healthy", &[("backend", &backend)]),
        1.0
    );
    for kind in ["reset", "timeout", "other"] {
        assert_eq!(
            gw.metric("gateway_upstream_errors_total", &[("kind", kind)]),
            0.0,
            "no {kind} error was counted against the backend"
        );
    }
}

#[tokio::test]
async fn invalid_chunked_framing_gets_400_and_leaves_the_backend_in() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", ""), pki.path()).await;
    for _ in 0..FAULTS {
        let mut tls = raw_tls(gw.addr("https"), &pki.ca_der).await;
        tls.write_all(
            b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
        let (text, _) = read_until_close(&mut tls, Duration::from_secs(3)).await;
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    }
    assert_eq!(
        gw.metric(
            "gateway_rejected_requests_total",
            &[("reason", "body_malformed")]
        ),
        FAULTS as f64
    );
    backend_still_serves(&gw, &pki, &up).await;
}

#[tokio::test]
async fn uploads_cut_off_by_the_client_leave_the_backend_in() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", ""), pki.path()).await;
    for i in 0..FAULTS {
        let mut tls = raw_tls(gw.addr("https"), &pki.ca_der).await;
        tls.write_all(
            b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\nthe first part",
        )
        .await
        .unwrap();
        // The request head reaches the backend before the client goes away.
        tokio::time::sleep(Duration::from_millis(150)).await;
        drop(tls);
        assert!(
            eventually(Duration::from_secs(3), || up.hits() > i).await,
            "the backend saw the request"
        );
    }
    assert!(
        eventually(Duration::from_secs(3), || gw.metric(
            "gateway_rejected_requests_total",
            &[("reason", "body_aborted")]
        ) == FAULTS as f64)
        .await,
        "every cut-off upload was counted as aborted by its client"
    );
    backend_still_serves(&gw, &pki, &up).await;
}

#[tokio::test]
async fn a_body_still_arriving_at_the_upstream_timeout_gets_408_and_leaves_the_backend_in() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    // The client never pauses long enough for the stall timeout, but takes longer than the
    // upstream request timeout to send the whole body.
    let gw = TestGateway::start(
        &basic_config(
            &pki,
            &[up.addr],
            "request_timeout_ms = 300",
            "[limits]\nbody_read_timeout_ms = 2000",
        ),
        pki.path(),
    )
    .await;
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..FAULTS {
        let (addr, ca) = (gw.addr("https"), pki.ca_der.clone());
        clients.spawn(async move {
            let mut tls = raw_tls(addr, &ca).await;
            tls.write_all(
                b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n",
            )
            .await
            .unwrap();
            for _ in 0..8 {
                if tls.write_all(b"0123456789").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            read_until_close(&mut tls, Duration::from_millis(500))
                .await
                .0
        });
    }
    while let Some(text) = clients.join_next().await {
        let text = text.unwrap();
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    }
    assert_eq!(
        gw.metric(
            "gateway_rejected_requests_total",
            &[("reason", "body_timeout")]
        ),
        FAULTS as f64
    );
    backend_still_serves(&gw, &pki, &up).await;
}

#[tokio::test]
async fn a_backend_that_times_out_after_the_whole_body_is_still_ejected() {
    let pki = Pki::new();
    let slow =
        Upstream::with(|_| Reply::Delay(Duration::from_secs(3), Bytes::from_static(b"late"))).await;
    let gw = TestGateway::start(
        // Without the panic threshold, so the ejected only backend takes no traffic; allowed
        // to eject a pool's only backend, and each timeout counted in full even when the
        // machine running the suite is saturated.
        &basic_config(
            &pki,
            &[slow.addr],
            "request_timeout_ms = 300\npanic_threshold = 0\n[upstreams.passive]\n\
             max_ejected_share = 1.0\nlocal_overload_weight = 1.0",
            "",
        ),
        pki.path(),
    )
    .await;
    let addr = gw.addr("https");
    for _ in 0..5 {
        let req = Request::post("https://localhost/upload")
            .header("host", "localhost")
            .body(Full::new(Bytes::from_static(b"a complete body")))
            .unwrap();
        assert_eq!(fetch(addr, &pki.ca_der, false, req).await.status, 504);
    }
    assert_eq!(
        gw.metric("gateway_upstream_errors_total", &[("kind", "timeout")]),
        5.0
    );
    let backend = slow.addr.to_string();
    assert_eq!(
        gw.metric("gateway_backend_healthy", &[("backend", &backend)]),
        0.0
    );
    let r = fetch(addr, &pki.ca_der, false, get("localhost", "/")).await;
    assert_eq!(r.status, 502);
    assert!(r.text().contains("no healthy backend"), "{}", r.text());
}
