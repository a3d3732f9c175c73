//! The admin API: bearer-token authentication (constant-time, disabled without a token, no
//! network bind without one), status, and reloading the config file — through the API and
//! through SIGHUP — where a bad file changes nothing and is reported.

use std::time::Duration;

use http::Method;

use crate::support::*;

const TOKEN: &str = "s3cret-admin-token";

fn with_token(pki: &Pki, toml: &str) -> String {
    std::fs::write(pki.path().join("admin.token"), format!("{TOKEN}\n")).unwrap();
    toml.replace(
        "[admin]\nbind = \"127.0.0.1:0\"",
        "[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"",
    )
}

#[tokio::test]
async fn the_admin_api_needs_the_token() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let gw = TestGateway::start(
        &with_token(&pki, &basic_config(&pki, &[up.addr], "", "")),
        pki.path(),
    )
    .await;
    let admin = gw.gateway.admin_addr();
    assert_eq!(
        admin_call(admin, Method::GET, "/admin/status", None)
            .await
            .status,
        401
    );
    let wrong = admin_call(
        admin,
        Method::GET,
        "/admin/status",
        Some("s3cret-admin-tokeX"),
    )
    .await;
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.header("www-authenticate"), Some("Bearer"));
    let ok = admin_call(admin, Method::GET, "/admin/status", Some(TOKEN)).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let v: serde_json::Value = serde_json::from_slice(&ok.body).unwrap();
    assert_eq!(v["routes"][0]["name"], "all");
    // Monitoring endpoints stay open.
    assert_eq!(
        admin_call(admin, Method::GET, "/metrics", None)
            .await
            .status,
        200
    );

    let open = TestGateway::start(&basic_config(&pki, &[up.addr], "", ""), pki.path()).await;
    let r = admin_call(
        open.gateway.admin_addr(),
        Method::GET,
        "/admin/status",
        Some(TOKEN),
    )
    .await;
    assert_eq!(r.status, 403, "no token configured: the API is off");

    let exposed = basic_config(&pki, &[up.addr], "", "").replace(
        "[admin]\nbind = \"127.0.0.1:0\"",
        "[admin]\nbind = \"0.0.0.0:0\"",
    );
    let err = gateway::Config::from_toml(&exposed, "t.toml", pki.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("admin.bind") && err.contains("not a loopback address"),
        "{err}"
    );
}

#[tokio::test]
async fn reload_through_the_api_applies_good_files_and_reports_bad_ones() {
    let pki = Pki::new();
    let (a, b) = (Upstream::named("a").await, Upstream::named("b").await);
    let file = pki.path().join("gateway.toml");
    let first = with_token(&pki, &basic_config(&pki, &[a.addr], "", ""));
    std::fs::write(&file, &first).unwrap();
    let gw = TestGateway::start(&first, pki.path()).await;
    gw.gateway.set_config_path(&file);
    let (addr, admin) = (gw.addr("https"), gw.gateway.admin_addr());

    let second = format!("{first}\n[[routes]]\nname = \"b\"\npath_prefix = \"/b\"\nupstream = \"b\"\n[[upstreams]]\nname = \"b\"\nbackends = [\"{}\"]\n", b.addr);
    std::fs::write(&file, &second).unwrap();
    let r = admin_call(admin, Method::POST, "/admin/reload", Some(TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        fetch(addr, &pki.ca_der, false, get("localhost", "/b/x"))
            .await
            .text(),
        "b"
    );

    std::fs::write(
        &file,
        second.replace("upstream = \"b\"", "upstream = \"missing\""),
    )
    .unwrap();
    let r = admin_call(admin, Method::POST, "/admin/reload", Some(TOKEN)).await;
    assert_eq!(r.status, 422);
    assert!(
        r.text().contains("no upstream named") && r.text().contains("gateway.toml:"),
        "{}",
        r.text()
    );
    assert_eq!(
        fetch(addr, &pki.ca_der, false, get("localhost", "/b/x"))
            .await
            .text(),
        "b",
        "the old config keeps serving"
    );
    // The configuration that serves, as written: the second file, not the refused third.
    let config = admin_call(admin, Method::GET, "/admin/config", Some(TOKEN)).await;
    assert_eq!(config.status, 200, "{}", config.text());
    assert_eq!(config.header("content-type"), Some("application/json"));
    let v: serde_json::Value = serde_json::from_slice(&config.body).unwrap();
    assert_eq!(v["toml"], second.as_str());
    assert_eq!(v["file"], file.display().to_string());
    assert_eq!(v["generation"], 2);
    let last = admin_call(admin, Method::GET, "/admin/reload", Some(TOKEN)).await;
    let v: serde_json::Value = serde_json::from_slice(&last.body).unwrap();
    assert_eq!(v["last_reload"]["ok"], false);
    assert_eq!(
        gw.metric("gateway_reload_failures_total", &[("kind", "config")]),
        1.0
    );
    assert_eq!(gw.metric("gateway_reloads_total", &[]), 1.0);
}

#[tokio::test]
async fn sighup_reloads_the_running_binary() {
    let pki = Pki::new();
    let (a, b) = (Upstream::named("a").await, Upstream::named("b").await);
    let file = pki.path().join("gateway.toml");
    let first = basic_config(&pki, &[a.addr], "", "");
    std::fs::write(&file, &first).unwrap();
    let (mut child, addr) = spawn_gateway_binary(&file).await;
    assert_eq!(
        fetch(addr, &pki.ca_der, false, get("localhost", "/b/x"))
            .await
            .text(),
        "a"
    );
    let second = format!("{first}\n[[routes]]\nname = \"b\"\npath_prefix = \"/b\"\nupstream = \"b\"\n[[upstreams]]\nname = \"b\"\nbackends = [\"{}\"]\n", b.addr);
    std::fs::write(&file, second).unwrap();
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let mut body = String::new();
    for _ in 0..50 {
        body = fetch(addr, &pki.ca_der, false, get("localhost", "/b/x"))
            .await
            .text();
        if body == "b" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(body, "b", "SIGHUP applied the new route");
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), Some(0));
}
