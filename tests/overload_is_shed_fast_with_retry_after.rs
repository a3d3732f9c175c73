//! Admission control: past `max_inflight_requests`, or while the worker threads have a
//! standing queue longer than `max_queue_time_ms`, a new request is answered at once with 503
//! and `retry-after`, counted by reason, and the gateway serves normally again afterwards.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::support::*;

#[tokio::test]
async fn past_the_inflight_limit_a_request_gets_503_with_retry_after_at_once() {
    let pki = Pki::new();
    let up = Upstream::with(|seen: &Seen| {
        if seen.uri.path() == "/slow" {
            Reply::Delay(Duration::from_millis(800), Bytes::from_static(b"slow"))
        } else {
            Reply::Respond(http::StatusCode::OK, vec![], Bytes::from_static(b"fast"))
        }
    })
    .await;
    let toml = basic_config(&pki, &[up.addr], "", "").replace(
        "[logging]",
        "[limits]\nmax_inflight_requests = 2\n\n[logging]",
    );
    let gw = TestGateway::start(&toml, pki.path()).await;
    let addr = gw.addr("https");
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let ca = pki.ca_der.clone();
            tokio::spawn(async move { fetch(addr, &ca, true, get("localhost", "/slow")).await })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || up.hits() == 2).await,
        "both slow requests reached the upstream"
    );
    let started = Instant::now();
    let r = fetch(addr, &pki.ca_der, false, get("localhost", "/fast")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "answered at once"
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(
        r.text().contains("overloaded (concurrency)"),
        "{}",
        r.text()
    );
    assert!(r.header("x-request-id").is_some());
    assert_eq!(up.hits(), 2, "a shed request never reaches the upstream");
    for s in slow {
        assert_eq!(s.await.unwrap().status, 200);
    }
    let r = fetch(addr, &pki.ca_der, false, get("localhost", "/fast")).await;
    assert_eq!(r.status, 200, "the places were given back");
    assert_eq!(
        gw.metric("gateway_shed_requests_total", &[("reason", "concurrency")]),
        1.0
    );
    assert_eq!(gw.metric("gateway_inflight_requests", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standing_queue_on_the_workers_sheds_new_requests_until_it_drains() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let toml = basic_config(&pki, &[up.addr], "", "")
        .replace("[logging]", "[limits]\nmax_queue_time_ms = 30\n\n[logging]");
    let gw = TestGateway::start(&toml, pki.path()).await;
    let addr = gw.addr("https");
    assert_eq!(
        fetch(addr, &pki.ca_der, false, get("localhost", "/"))
            .await
            .status,
        200
    );

    // Saturate both workers with tasks that hold a worker 40 ms at a time, until requests
    // have been shed for a while (bounded: 20 s).
    let stop = Arc::new(AtomicBool::new(false));
    let hogs: Vec<_> = (0..6)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(40));
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let started = Instant::now();
    let mut shed = 0;
    let mut served = 0;
    while shed < 5 && started.elapsed() < Duration::from_secs(20) {
        let r = fetch(addr, &pki.ca_der, false, get("localhost", "/")).await;
        match r.status.as_u16() {
            503 => {
                assert_eq!(r.header("retry-after"), Some("1"));
                assert!(r.text().contains("overloaded (queue_time)"), "{}", r.text());
                shed += 1;
            }
            200 => served += 1,
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    stop.store(true, Ordering::Relaxed);
    for h in hogs {
        h.await.unwrap();
    }
    assert!(
        shed > 0,
        "a standing queue shed new requests ({served} served)"
    );
    assert_eq!(
        gw.metric("gateway_shed_requests_total", &[("reason", "queue_time")]),
        shed as f64
    );
    // Once the queue drains, everything is served again.
    assert!(
        eventually(Duration::from_secs(5), || gw
            .metric("gateway_scheduling_delay_seconds", &[])
            < 0.03)
        .await
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..5 {
        assert_eq!(
            fetch(addr, &pki.ca_der, false, get("localhost", "/"))
                .await
                .status,
            200
        );
    }
}
