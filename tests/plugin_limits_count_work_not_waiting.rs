//! A hook call is bounded by the work the plugin does (fuel), which a busy node's scheduling
//! does not use up; the wall-clock deadline stays as a backstop that stops a call parked in a
//! host call, and the only bound when fuel metering is turned off.

use std::time::{Duration, Instant};

use crate::support::*;

fn route(name: &str, plugin: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"app\"\nplugins = [\"{plugin}\"]\n"
    )
}

/// Writes a small sample model `recs` into the test's directory; returns the `[scoring]` and
/// `[[models]]` tables that serve it on the CPU path with the given batch window, in which
/// each plugin's `rank` call waits.
fn recs_model(pki: &Pki, queue_delay_us: u64) -> String {
    let mut spec = gateway::scoring::SampleSpec::embedding(16, 4, 1);
    spec.n_users = 4;
    std::fs::write(
        pki.path().join("recs.safetensors"),
        gateway::scoring::sample_model(&spec),
    )
    .unwrap();
    format!(
        "\n[scoring]\nbackend = \"cpu\"\nmax_queue_delay_us = {queue_delay_us}\n\n[[models]]\nname = \"recs\"\npath = \"recs.safetensors\"\n"
    )
}

#[tokio::test]
async fn a_runaway_loop_burns_its_fuel_in_milliseconds_while_healthy_plugins_serve() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    // A wall-clock deadline far beyond the test: only fuel can stop the loop.
    let extra = format!(
        "{}{}{}",
        route("loop", "loop"),
        plugin_table(
            "loop",
            "hostile",
            "loop",
            "instances = 1\ndeadline_ms = 60000"
        ),
        plugin_table("hygiene", "hygiene", "", ""),
    );
    let toml = basic_config(&pki, &[up.addr], "", &extra).replacen(
        "[[routes]]",
        "[[routes]]\nname = \"shop\"\npath_prefix = \"/shop\"\nupstream = \"app\"\nplugins = [\"hygiene\"]\n\n[[routes]]",
        1,
    );
    let gw = TestGateway::start(&toml, pki.path()).await;
    let addr = gw.addr("https");

    // Healthy traffic runs beside the loop the whole time.
    let healthy = tokio::spawn({
        let ca = pki.ca_der.clone();
        async move {
            let mut statuses = Vec::new();
            for i in 0..60 {
                statuses.push(
                    fetch(addr, &ca, i % 2 == 0, get("localhost", "/shop/x"))
                        .await
                        .status,
                );
            }
            statuses
        }
    });
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let started = Instant::now();
        let r = fetch(addr, &pki.ca_der, false, get("localhost", "/loop")).await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(r.status, 500, "{}", r.text());
        assert!(
            r.text().contains("plugin loop failed (fuel)"),
            "{}",
            r.text()
        );
    }
    // 50,000,000 units take about 5 ms of CPU; a loaded CI machine gets generous room.
    assert!(slowest < Duration::from_secs(2), "the loop ran {slowest:?}");
    let statuses = healthy.await.unwrap();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    let count = |plugin: &str, outcome: &str| {
        gw.metric(
            "gateway_plugin_invocations_total",
            &[("plugin", plugin), ("outcome", outcome)],
        )
    };
    assert_eq!(count("loop", "fuel"), 10.0);
    assert_eq!(count("loop", "timeout"), 0.0);
    assert_eq!(count("hygiene", "ok"), 120.0, "60 requests, two hooks each");
    // What a healthy call burns is far below its budget, and exported so operators can see it.
    let burned = gw.metric("gateway_plugin_fuel_per_call_sum", &[("plugin", "hygiene")]);
    let calls = gw.metric(
        "gateway_plugin_fuel_per_call_count",
        &[("plugin", "hygiene")],
    );
    assert_eq!(calls, 120.0);
    assert!(
        burned / calls < gateway::config::DEFAULT_FUEL_PER_CALL as f64 / 100.0,
        "hygiene burned {} per call",
        burned / calls
    );
}

#[tokio::test]
async fn waiting_in_a_host_call_burns_no_fuel_and_the_wall_clock_backstop_stops_it() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    // Each `rank` waits for the model's batch window: 400 ms, while the plugin burns nothing.
    let scoring = recs_model(&pki, 400_000);
    let extra = format!(
        "{}{}{}{}{scoring}",
        route("patient", "patient"),
        route("hasty", "hasty"),
        plugin_table(
            "patient",
            "hostile",
            "wait",
            "deadline_ms = 5000\nfuel_per_call = 1000000"
        ),
        plugin_table("hasty", "hostile", "wait", "deadline_ms = 100"),
    );
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", &extra), pki.path()).await;
    let addr = gw.addr("https");

    let started = Instant::now();
    let r = fetch(addr, &pki.ca_der, false, get("localhost", "/patient")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        started.elapsed() >= Duration::from_millis(350),
        "the rank call waited for its batch"
    );
    assert_eq!(
        gw.metric(
            "gateway_plugin_invocations_total",
            &[
                ("plugin", "patient"),
                ("hook", "on_request"),
                ("outcome", "ok")
            ]
        ),
        1.0
    );

    let started = Instant::now();
    let r = fetch(addr, &pki.ca_der, false, get("localhost", "/hasty")).await;
    let took = started.elapsed();
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(
        r.text().contains("plugin hasty failed (timeout)"),
        "{}",
        r.text()
    );
    assert!(
        took < Duration::from_millis(350),
        "the backstop stopped the parked call after {took:?}"
    );
    assert_eq!(
        gw.metric(
            "gateway_plugin_invocations_total",
            &[("plugin", "hasty"), ("outcome", "timeout")]
        ),
        1.0
    );
    // The gateway still serves, and the stopped instance was replaced.
    let r = fetch(addr, &pki.ca_der, false, get("localhost", "/patient")).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn without_fuel_the_wall_clock_deadline_stops_a_loop() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let extra = format!(
        "{}{}\n[plugin_runtime]\nfuel = false\n",
        route("loop", "loop"),
        plugin_table("loop", "hostile", "loop", "instances = 1\ndeadline_ms = 50"),
    );
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", &extra), pki.path()).await;
    let r = fetch(
        gw.addr("https"),
        &pki.ca_der,
        false,
        get("localhost", "/loop"),
    )
    .await;
    assert_eq!(r.status, 500);
    assert!(
        r.text().contains("plugin loop failed (timeout)"),
        "{}",
        r.text()
    );
    assert_eq!(
        gw.metric(
            "gateway_plugin_invocations_total",
            &[("plugin", "loop"), ("outcome", "timeout")]
        ),
        1.0
    );
    // Unmetered calls record no fuel.
    assert_eq!(gw.metric("gateway_plugin_fuel_per_call_count", &[]), 0.0);
}

#[tokio::test]
async fn when_every_instance_slot_is_busy_a_call_waits_its_deadline_then_gets_503() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    // One instance slot for the whole engine; each call holds it 300 ms (parked in `rank`)
    // and may wait 500 ms for it.
    let scoring = recs_model(&pki, 300_000);
    let extra = format!(
        "{}{}\n[plugin_runtime]\nmax_instances = 1\n{scoring}",
        route("slot", "slot"),
        plugin_table(
            "slot",
            "hostile",
            "wait",
            "instances = 1\ndeadline_ms = 500"
        ),
    );
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", &extra), pki.path()).await;
    let addr = gw.addr("https");
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let ca = pki.ca_der.clone();
            tokio::spawn(async move { fetch(addr, &ca, false, get("localhost", "/slot")).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for c in calls {
        let r = c.await.unwrap();
        if r.status == 503 {
            assert_eq!(r.header("retry-after"), Some("1"));
            assert!(
                r.text().contains("plugin slot had no free instance"),
                "{}",
                r.text()
            );
        }
        statuses.push(r.status.as_u16());
    }
    statuses.sort();
    // The first is served at once, the second after waiting for the first, the third gives up
    // when its wait reaches the plugin's deadline: an overload answer, not a plugin failure.
    assert_eq!(statuses, [200, 200, 503]);
    let waits = |outcome: &str| {
        gw.metric(
            "gateway_plugin_instance_waits_total",
            &[("plugin", "slot"), ("outcome", outcome)],
        )
    };
    // Each request checks an instance out for both hooks, so more than one call may wait.
    assert!(waits("got") >= 1.0, "{}", waits("got"));
    assert_eq!(waits("gave_up"), 1.0);
    assert_eq!(
        gw.metric(
            "gateway_plugin_invocations_total",
            &[("plugin", "slot"), ("outcome", "unavailable")]
        ),
        1.0
    );
}
