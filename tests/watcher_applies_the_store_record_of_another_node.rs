//! The file watcher watches the store's record of active versions: a plugin uploaded through
//! one gateway is served by another that shares its store and watches its config.

use std::time::Duration;

use http::Method;

use crate::support::*;

const TOKEN: &str = "shared-store-token";

#[tokio::test]
async fn an_upload_through_one_node_reaches_another_sharing_its_store() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    std::fs::write(pki.path().join("admin.token"), TOKEN).unwrap();
    let extra = format!(
        "plugins = [\"p\"]\n{}[store]\ndir = \"store\"\n[proxy]\nversion_headers = true\n",
        plugin_table("p", "noop", "", "instances = 1")
    );
    let toml = basic_config(&pki, &[up.addr], "", &extra).replace(
        "[admin]\nbind = \"127.0.0.1:0\"",
        "[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"",
    );
    let file = pki.path().join("gateway.toml");
    std::fs::write(&file, &toml).unwrap();
    let uploader = TestGateway::start(&toml, pki.path()).await;
    let watcher = TestGateway::start(&toml, pki.path()).await;
    watcher.gateway.set_config_path(&file);
    let _watch = watcher
        .gateway
        .watch_config(Duration::from_millis(50))
        .unwrap();

    let served = || async {
        fetch(
            watcher.addr("https"),
            &pki.ca_der,
            false,
            get("localhost", "/x"),
        )
        .await
        .header("x-plugin-versions")
        .map(str::to_string)
    };
    let noop = std::fs::read(plugin_wasm("noop")).unwrap();
    let noop = format!("p@{}", gateway::plugin::content_version(&noop));
    assert_eq!(served().await.as_deref(), Some(noop.as_str()));

    let hygiene = std::fs::read(plugin_wasm("hygiene")).unwrap();
    let want = format!("p@{}", gateway::plugin::content_version(&hygiene));
    let r = admin_send(
        uploader.gateway.admin_addr(),
        Method::PUT,
        "/admin/plugins/p",
        TOKEN,
        hygiene,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut seen = None;
    for _ in 0..100 {
        seen = served().await;
        if seen.as_deref() == Some(want.as_str()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(
        seen.as_deref(),
        Some(want.as_str()),
        "the watching node applied the record the other node wrote"
    );
}
