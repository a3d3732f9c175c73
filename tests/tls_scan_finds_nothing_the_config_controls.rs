//! testssl.sh (Debian's package, installed by scripts/setup.sh) scans the gateway's TLS
//! listener: no finding rated MEDIUM or worse that the gateway's configuration controls
//! (protocols, ciphers, key exchange, renegotiation, compression, known vulnerabilities, and
//! the security headers the shipped hygiene plugin adds).
//! Findings about the certificate itself (a test CA, no revocation URLs) belong to whoever
//! issues the certificate and are left out.

use std::time::Duration;

use crate::support::*;

/// Finding ids about the certificate's own content, not the gateway's TLS settings.
fn about_the_certificate(id: &str) -> bool {
    id.starts_with("cert") || id.starts_with("intermediate_cert") || id == "DNS_CAArecord"
}

#[tokio::test]
async fn testssl_finds_nothing_medium_or_worse_in_what_the_config_controls() {
    let testssl = ["testssl", "testssl.sh"]
        .into_iter()
        .find(|t| {
            std::process::Command::new(t)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("testssl.sh is missing: run scripts/setup.sh (Debian package testssl.sh)");
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    // As shipped (config/gateway.toml): the hygiene plugin adds the security headers (HSTS
    // among them) that testssl.sh rates.
    let extra = format!(
        "plugins = [\"hygiene\"]\n{}",
        plugin_table("hygiene", "hygiene", "", "")
    );
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", &extra), pki.path()).await;
    let addr = gw.addr("https");
    let report = pki.path().join("testssl.json");
    // --fast skips only the slowest cipher-by-cipher listings; protocols, cipher categories,
    // forward secrecy, server preferences and every vulnerability check still run.
    let run = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::process::Command::new(testssl)
            .args([
                "--quiet",
                "--color",
                "0",
                "--warnings",
                "off",
                "--fast",
                "--ip",
                "one",
            ])
            .arg("--jsonfile")
            .arg(&report)
            .arg(addr.to_string())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("testssl ran for 10 minutes")
    .unwrap();
    let text = std::fs::read_to_string(&report).unwrap_or_else(|e| {
        panic!(
            "no report ({e}); testssl said: {}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        )
    });
    let findings: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let find = |id: &str| {
        findings
            .iter()
            .find(|f| f["id"] == id)
            .map(|f| f["finding"].as_str().unwrap_or("").to_string())
            .unwrap_or_else(|| panic!("the scan did not report {id}: {text}"))
    };
    // The scan really reached the server and judged it.
    assert!(find("TLS1_3").starts_with("offered"), "{}", find("TLS1_3"));
    assert!(
        find("SSLv3").starts_with("not offered"),
        "{}",
        find("SSLv3")
    );
    assert!(find("TLS1").starts_with("not offered"), "{}", find("TLS1"));
    let bad: Vec<String> = findings
        .iter()
        .filter(|f| matches!(f["severity"].as_str(), Some("MEDIUM" | "HIGH" | "CRITICAL")))
        .filter(|f| !about_the_certificate(f["id"].as_str().unwrap_or("")))
        .map(|f| format!("{} {}: {}", f["severity"], f["id"], f["finding"]))
        .collect();
    assert!(bad.is_empty(), "testssl findings:\n{}", bad.join("\n"));
}
