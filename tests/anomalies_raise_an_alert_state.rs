//! Anomaly alerts on the gateway's own series: a route whose upstream starts failing leaves
//! its error-ratio baseline, and `gateway_anomaly{route,signal="error_ratio"}` goes to 1,
//! while steady traffic before it raised nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;

use crate::support::*;

#[tokio::test]
async fn a_failing_upstream_raises_the_error_ratio_alert() {
    let pki = Pki::new();
    let failing = Arc::new(AtomicBool::new(false));
    let up = {
        let failing = failing.clone();
        Upstream::with(move |_| {
            let status = if failing.load(Ordering::Relaxed) {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::OK
            };
            Reply::Respond(status, vec![], Bytes::from_static(b"x"))
        })
        .await
    };
    let toml = basic_config(&pki, &[up.addr], "", "")
        .replace("[admin]", "[server]\nanomaly_interval_ms = 200\n\n[admin]");
    let gw = TestGateway::start(&toml, pki.path()).await;
    let mut conn = tls_connect(gw.addr("https"), &pki.ca_der, ClientOpts::default())
        .await
        .unwrap()
        .sender;
    let alert = |gw: &TestGateway| {
        gw.metric(
            "gateway_anomaly",
            &[("route", "all"), ("signal", "error_ratio")],
        )
    };
    // Six seconds (30 intervals) of steady, healthy traffic: the baseline learns (20 samples
    // of warm-up), nothing is raised.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        assert_eq!(conn.get("localhost", "/").await.status, 200);
    }
    assert_eq!(alert(&gw), 0.0);
    // The upstream fails: within a few intervals the error ratio is in alert.
    failing.store(true, Ordering::Relaxed);
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until && alert(&gw) == 0.0 {
        assert_eq!(conn.get("localhost", "/").await.status, 500);
    }
    assert_eq!(alert(&gw), 1.0, "the error ratio left its baseline");
}
