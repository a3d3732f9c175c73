//! The audit trail: uploads, refused uploads, rollbacks, reloads (through the API and the
//! watcher or SIGHUP) and rollout commands are appended, with the token's id and the outcome,
//! to a hash-chained log in the store; `GET /admin/audit` lists it, and `gateway audit
//! verify` checks the chain and names the first entry that was edited.

use http::Method;

use crate::support::*;

const TOKEN: &str = "audit-admin-token";

#[tokio::test]
async fn management_actions_are_chained_into_the_audit_log() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    std::fs::write(pki.path().join("admin.token"), TOKEN).unwrap();
    let extra = format!(
        "plugins = [\"p\"]\n{}[store]\ndir = \"store\"\n",
        plugin_table("p", "noop", "", "instances = 1"),
    );
    let toml = basic_config(&pki, &[up.addr], "", &extra).replace(
        "[admin]\nbind = \"127.0.0.1:0\"",
        "[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"",
    );
    let file = pki.path().join("gateway.toml");
    std::fs::write(&file, &toml).unwrap();
    let gw = TestGateway::start(&toml, pki.path()).await;
    gw.gateway.set_config_path(&file);
    let admin = gw.gateway.admin_addr();

    let hygiene = std::fs::read(plugin_wasm("hygiene")).unwrap();
    let ok = admin_send(admin, Method::PUT, "/admin/plugins/p", TOKEN, hygiene).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let bad = admin_send(
        admin,
        Method::PUT,
        "/admin/plugins/p",
        TOKEN,
        b"not wasm".to_vec(),
    )
    .await;
    assert_eq!(bad.status, 422, "{}", bad.text());
    let back = admin_call(
        admin,
        Method::POST,
        "/admin/plugins/p/rollback",
        Some(TOKEN),
    )
    .await;
    assert_eq!(
        back.status,
        409,
        "one upload: nothing to roll back to: {}",
        back.text()
    );
    let reload = admin_call(admin, Method::POST, "/admin/reload", Some(TOKEN)).await;
    assert_eq!(reload.status, 200, "{}", reload.text());
    gw.gateway.reload_from_file().await.unwrap();
    // Reads are not audited.
    assert_eq!(
        admin_call(admin, Method::GET, "/admin/status", Some(TOKEN))
            .await
            .status,
        200
    );

    let r = admin_call(admin, Method::GET, "/admin/audit", Some(TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let entries = v["entries"].as_array().unwrap();
    let brief: Vec<(String, String, String, String)> = entries
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap().to_string();
            (s("actor"), s("action"), s("target"), s("outcome"))
        })
        .collect();
    let token_id = &brief[0].0;
    assert_eq!(
        token_id.len(),
        8,
        "the token's id, never the token: {brief:?}"
    );
    assert!(!r.text().contains(TOKEN));
    let shown = file.display().to_string();
    let expected = [
        ("upload", "plugin/p", "200 OK"),
        ("upload", "plugin/p", "422 Unprocessable Entity"),
        ("rollback", "plugin/p", "409 Conflict"),
        ("reload", shown.as_str(), "ok"),
        ("reload", shown.as_str(), "ok"),
    ];
    assert_eq!(brief.len(), expected.len(), "{brief:#?}");
    for (got, want) in brief.iter().zip(expected) {
        assert_eq!(
            (got.1.as_str(), got.2.as_str(), got.3.as_str()),
            want,
            "{brief:#?}"
        );
    }
    assert_eq!(brief[3].0, *token_id);
    assert_eq!(brief[4].0, "sighup");

    // `?limit=` keeps the newest entries; a bad limit is refused.
    let r = admin_call(admin, Method::GET, "/admin/audit?limit=2", Some(TOKEN)).await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let seqs: Vec<u64> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [4, 5]);
    let r = admin_call(admin, Method::GET, "/admin/audit?limit=0", Some(TOKEN)).await;
    assert_eq!(r.status, 400);

    // The chain verifies; an edited entry is named.
    let log = pki.path().join("store/audit.log");
    let verify = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["audit", "verify"])
            .arg(&log)
            .output()
            .unwrap()
    };
    let out = verify();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("5 entries, the chain is intact"));
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, text.replacen("422 Unprocessable Entity", "200 OK", 1)).unwrap();
    let out = verify();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(":2: audit entry 2:") && err.contains("edited"),
        "{err}"
    );
}
