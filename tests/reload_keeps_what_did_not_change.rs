//! Reloading a configuration swaps routes atomically and carries over what did not change:
//! an upstream pool with the same settings keeps its health state and connections.

use bytes::Bytes;
use http::StatusCode;

use crate::support::*;

#[tokio::test]
async fn unchanged_pools_keep_their_health_state_across_a_reload() {
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
    let other = Upstream::named("other").await;
    let passive = "[upstreams.passive]\nconsecutive_failures = 1\nejection_ms = 60000";
    let before = basic_config(&pki, &[sick.addr, fine.addr], passive, "");
    let gw = TestGateway::start(&before, pki.path()).await;
    let addr = gw.addr("https");
    // The first request meets the sick backend and ejects it.
    for _ in 0..4 {
        fetch(addr, &pki.ca_der, false, get("localhost", "/")).await;
    }
    assert_eq!(sick.hits(), 1);

    // Add a route to another pool; the "app" pool is unchanged.
    let after = format!(
        "{before}\n[[routes]]\nname = \"other\"\npath_prefix = \"/other\"\nupstream = \"other\"\n[[upstreams]]\nname = \"other\"\nbackends = [\"{}\"]\n",
        other.addr
    );
    gw.gateway
        .reload(gateway::Config::from_toml(&after, "t.toml", pki.path()).unwrap())
        .await
        .unwrap();
    assert_eq!(
        fetch(addr, &pki.ca_der, true, get("localhost", "/other/x"))
            .await
            .text(),
        "other"
    );
    for _ in 0..4 {
        assert_eq!(
            fetch(addr, &pki.ca_der, false, get("localhost", "/"))
                .await
                .text(),
            "fine"
        );
    }
    assert_eq!(
        sick.hits(),
        1,
        "the ejected backend stays ejected: the pool was carried over"
    );

    // Changing the pool's settings makes a fresh pool (health state starts over).
    let changed = after.replace("ejection_ms = 60000", "ejection_ms = 50000");
    gw.gateway
        .reload(gateway::Config::from_toml(&changed, "t.toml", pki.path()).unwrap())
        .await
        .unwrap();
    for _ in 0..4 {
        fetch(addr, &pki.ca_der, false, get("localhost", "/")).await;
    }
    assert_eq!(sick.hits(), 2);
}
