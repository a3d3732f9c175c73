//! Upstream resilience: retries of idempotent requests onto another backend, no retry of
//! non-idempotent ones, passive ejection, active health checks out and back, 502 when nothing
//! can answer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::*;

#[tokio::test]
async fn idempotent_requests_fail_over_and_posts_are_not_retried() {
    let pki = Pki::new();
    let dead = dead_port().await;
    let live = Upstream::named("live").await;
    // Passive ejection off, so the dead backend stays in rotation and every other request
    // first tries it.
    let gw = TestGateway::start(
        &basic_config(
            &pki,
            &[dead, live.addr],
            "[upstreams.passive]\nconsecutive_failures = 0",
            "",
        ),
        pki.path(),
    )
    .await;
    let addr = gw.addr("https");
    let mut conn = tls_connect(addr, &pki.ca_der, ClientOpts::default())
        .await
        .unwrap();
    for _ in 0..6 {
        let r = conn.sender.get("localhost", "/item").await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "live"));
    }
    assert_eq!(live.hits(), 6);
    assert!(
        live.seen.lock().unwrap().iter().all(|s| {
            s.headers.get("host").is_some_and(|h| h == "localhost")
                && s.headers.contains_key("x-request-id")
        }),
        "a retried request carries the same headers as a first attempt"
    );
    let retried = gw.metric(
        "gateway_upstream_retries_total",
        &[("upstream", "app"), ("outcome", "attempted")],
    );
    assert_eq!(
        retried, 3.0,
        "every request that hit the dead backend first was retried once"
    );
    assert_eq!(
        gw.metric(
            "gateway_upstream_errors_total",
            &[("upstream", "app"), ("kind", "connect")]
        ),
        3.0
    );

    // POSTs: the one that lands on the dead backend gets 502, never a second attempt.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let req = Request::post("https://localhost/order")
            .header("host", "localhost")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        statuses.push(conn.sender.send(req).await.unwrap().status.as_u16());
    }
    statuses.sort();
    assert_eq!(statuses, vec![200, 200, 502, 502]);
    assert_eq!(live.hits(), 8);
    assert_eq!(
        gw.metric(
            "gateway_upstream_retries_total",
            &[("upstream", "app"), ("outcome", "attempted")]
        ),
        3.0
    );
}

#[tokio::test]
async fn consecutive_failures_eject_a_backend() {
    let pki = Pki::new();
    let sick = Upstream::with(|_| {
        Reply::Respond(
            StatusCode::SERVICE_UNAVAILABLE,
            vec![],
            Bytes::from_static(b"sick"),
        )
    })
    .await;
    let fine = Upstream::named("fine").await;
    let gw = TestGateway::start(
        &basic_config(
            &pki,
            &[sick.addr, fine.addr],
            "[upstreams.passive]\nconsecutive_failures = 2\nejection_ms = 60000",
            "",
        ),
        pki.path(),
    )
    .await;
    let mut conn = tls_connect(gw.addr("https"), &pki.ca_der, ClientOpts::default())
        .await
        .unwrap();
    let mut ok = 0;
    for _ in 0..12 {
        if conn.sender.get("localhost", "/").await.status == 200 {
            ok += 1;
        }
    }
    assert_eq!(sick.hits(), 2, "ejected after two failures in a row");
    assert_eq!(ok, 10);
    let backend = sick.addr.to_string();
    assert_eq!(
        gw.metric("gateway_backend_healthy", &[("backend", &backend)]),
        0.0
    );
}

#[tokio::test]
async fn active_health_checks_take_a_backend_out_and_back() {
    let pki = Pki::new();
    let healthy = Arc::new(AtomicBool::new(true));
    let flag = healthy.clone();
    let flaky = Upstream::with(move |seen| {
        if seen.uri.path() == "/health" && !flag.load(Ordering::SeqCst) {
            Reply::Respond(StatusCode::SERVICE_UNAVAILABLE, vec![], Bytes::new())
        } else {
            Reply::Respond(StatusCode::OK, vec![], Bytes::from_static(b"flaky"))
        }
    })
    .await;
    let steady = Upstream::named("steady").await;
    let hc = "[upstreams.health_check]\npath = \"/health\"\ninterval_ms = 30\ntimeout_ms = 500\nhealthy_threshold = 2\nunhealthy_threshold = 2";
    let gw = TestGateway::start(
        &basic_config(&pki, &[flaky.addr, steady.addr], hc, ""),
        pki.path(),
    )
    .await;
    let backend = flaky.addr.to_string();
    let mut conn = tls_connect(gw.addr("https"), &pki.ca_der, ClientOpts::default())
        .await
        .unwrap();

    healthy.store(false, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(5), || gw
            .metric("gateway_backend_healthy", &[("backend", &backend)])
            == 0.0)
        .await
    );
    for _ in 0..6 {
        assert_eq!(conn.sender.get("localhost", "/").await.text(), "steady");
    }
    let admin = admin_get(gw.gateway.admin_addr(), "/readyz").await;
    assert!(
        admin
            .text()
            .contains("upstream app: 1/2 backends available"),
        "{}",
        admin.text()
    );

    healthy.store(true, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(5), || gw
            .metric("gateway_backend_healthy", &[("backend", &backend)])
            == 1.0)
        .await
    );
    let mut bodies = Vec::new();
    for _ in 0..4 {
        bodies.push(conn.sender.get("localhost", "/").await.text());
    }
    assert!(
        bodies.iter().any(|b| b == "flaky"),
        "restored backend takes traffic again: {bodies:?}"
    );
}

#[tokio::test]
async fn nothing_to_answer_gives_502_and_a_reset_is_retried() {
    let pki = Pki::new();
    let dead = dead_port().await;
    let gw = TestGateway::start(&basic_config(&pki, &[dead], "", ""), pki.path()).await;
    let r = fetch(gw.addr("https"), &pki.ca_der, false, get("localhost", "/")).await;
    assert_eq!(r.status, 502);
    assert!(r.text().starts_with("502 Bad Gateway"), "{}", r.text());
    assert!(r.header("x-request-id").is_some());

    // A backend that drops every connection mid-request: GET is retried (then 502), and the
    // error is classified as a reset.
    let dropper = Upstream::with(|_| Reply::Drop).await;
    let gw = TestGateway::start(
        &basic_config(&pki, &[dropper.addr], "max_retries = 1", ""),
        pki.path(),
    )
    .await;
    let r = fetch(gw.addr("https"), &pki.ca_der, false, get("localhost", "/")).await;
    assert_eq!(r.status, 502);
    assert_eq!(dropper.hits(), 2, "one attempt and one retry");
    assert_eq!(
        gw.metric("gateway_upstream_errors_total", &[("kind", "reset")]),
        2.0
    );
}

#[tokio::test]
async fn ejection_never_empties_a_pool_below_its_panic_threshold() {
    // The only backend answers 503 five times (ejected for a minute), then recovers.
    let pki = Pki::new();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let up = {
        let calls = calls.clone();
        Upstream::with(move |_| {
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let status = if n < 5 {
                http::StatusCode::SERVICE_UNAVAILABLE
            } else {
                http::StatusCode::OK
            };
            Reply::Respond(status, vec![], bytes::Bytes::from_static(b"up"))
        })
        .await
    };
    let passive = "[upstreams.passive]\nconsecutive_failures = 5\nejection_ms = 60000";
    // (upstream settings, passive settings, ejected, answer after the failures, panics)
    let cases = [
        // The default max_ejected_share (0.5) never ejects a pool's only backend.
        ("", "", false, 200, 0.0),
        // Allowed to eject it, the panic threshold still balances onto it.
        ("", "\nmax_ejected_share = 1.0", true, 200, 1.0),
        (
            "panic_threshold = 0\n",
            "\nmax_ejected_share = 1.0",
            true,
            502,
            0.0,
        ),
    ];
    for (upstream, more, is_ejected, expected, expected_panics) in cases {
        calls.store(0, std::sync::atomic::Ordering::Relaxed);
        let gw = TestGateway::start(
            &basic_config(&pki, &[up.addr], &format!("{upstream}{passive}{more}"), ""),
            pki.path(),
        )
        .await;
        let addr = gw.addr("https");
        for _ in 0..5 {
            let r = fetch(addr, &pki.ca_der, false, get("localhost", "/")).await;
            assert_eq!(r.status, 503);
        }
        let backend = up.addr.to_string();
        assert_eq!(
            gw.metric("gateway_backend_healthy", &[("backend", &backend)]),
            if is_ejected { 0.0 } else { 1.0 },
            "{upstream}{more}: ejected?"
        );
        assert_eq!(
            gw.metric(
                "gateway_upstream_ejections_total",
                &[("outcome", "over_max_share")]
            ),
            if is_ejected { 0.0 } else { 1.0 },
        );
        // Below the panic threshold (0 of 1 healthy < 0.5) the pool uses every backend:
        // the recovered backend serves instead of the pool answering 502 for a minute.
        let r = fetch(addr, &pki.ca_der, false, get("localhost", "/")).await;
        assert_eq!(r.status, expected, "{upstream}{more}: {}", r.text());
        let panics = gw.metric("gateway_upstream_panic_total", &[("upstream", "app")]);
        assert_eq!(panics, expected_panics, "{upstream}{more}");
    }
}

#[tokio::test]
async fn ejection_stops_at_the_max_share_of_the_pool() {
    // Three of four backends fail every request; half the pool at most is ejected, and the
    // healthy one keeps serving whatever the failing ones do.
    let pki = Pki::new();
    let mut ups = Vec::new();
    for i in 0..4 {
        let status = if i < 3 {
            http::StatusCode::SERVICE_UNAVAILABLE
        } else {
            http::StatusCode::OK
        };
        ups.push(
            Upstream::with(move |_| {
                Reply::Respond(status, vec![], bytes::Bytes::from_static(b"answer"))
            })
            .await,
        );
    }
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let gw = TestGateway::start(
        &basic_config(
            &pki,
            &addrs,
            "[upstreams.passive]\nconsecutive_failures = 2\nejection_ms = 60000",
            "",
        ),
        pki.path(),
    )
    .await;
    let addr = gw.addr("https");
    for _ in 0..40 {
        fetch(addr, &pki.ca_der, false, get("localhost", "/")).await;
    }
    let ejected = gw.metric(
        "gateway_upstream_ejections_total",
        &[("outcome", "ejected")],
    );
    let skipped = gw.metric(
        "gateway_upstream_ejections_total",
        &[("outcome", "over_max_share")],
    );
    assert_eq!(ejected, 2.0, "half of four backends");
    assert!(
        skipped >= 1.0,
        "the third failing backend was kept: {skipped}"
    );
    let out: f64 = addrs
        .iter()
        .map(|a| 1.0 - gw.metric("gateway_backend_healthy", &[("backend", &a.to_string())]))
        .sum();
    assert_eq!(out, 2.0);
    assert_eq!(
        gw.metric(
            "gateway_backend_healthy",
            &[("backend", &addrs[3].to_string())]
        ),
        1.0
    );
}
