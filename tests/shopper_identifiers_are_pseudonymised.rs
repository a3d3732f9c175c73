//! Shopper privacy: the access log shows a client address only as a keyed-hash pseudonym, a
//! shopper id planted in the query and a cookie reaches neither the log nor `/metrics` nor
//! the store, nodes sharing a key agree on pseudonyms, and a new key (applied by a reload)
//! gives new ones. The real binary, so the log is the one an operator would collect.

use std::time::Duration;

use crate::support::*;

const USER: &str = "planted-user-8841";
const COOKIE: &str = "planted-cookie-5521";

/// The `client=` field of the access log lines among `lines`.
fn clients(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.contains("access"))
        .filter_map(|l| l.split("client=").nth(1)?.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

async fn planted_request(addr: std::net::SocketAddr, pki: &Pki) {
    let req = http::Request::get(format!("https://localhost/catalog?user={USER}&q=boots"))
        .header("host", "localhost")
        .header("cookie", format!("shopper={COOKIE}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(fetch(addr, &pki.ca_der, false, req).await.status, 200);
}

/// Log lines that arrive within `wait`.
async fn drain(
    log: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    wait: Duration,
) -> Vec<String> {
    let mut lines = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(line)) = tokio::time::timeout_at(deadline, log.recv()).await {
        lines.push(line);
    }
    lines
}

#[tokio::test]
async fn client_addresses_become_keyed_pseudonyms_that_rotate_with_the_key() {
    let pki = Pki::new();
    let up = Upstream::named("shop").await;
    std::fs::write(pki.path().join("privacy.key"), "first-secret-0123456789\n").unwrap();
    std::fs::write(pki.path().join("same.key"), "first-secret-0123456789").unwrap();
    let config = |key: &str| {
        basic_config(
            &pki,
            &[up.addr],
            "",
            &format!("[privacy]\nkey_file = \"{key}\"\n[store]\ndir = \"store\"\n"),
        )
        .replace("access_log = false", "access_log = true")
    };
    let file = pki.path().join("gateway.toml");
    std::fs::write(&file, config("privacy.key")).unwrap();
    let (child, addr, admin, mut log) = spawn_gateway_binary_with_admin(&file).await;
    for _ in 0..3 {
        planted_request(addr, &pki).await;
    }
    let lines = drain(&mut log, Duration::from_millis(500)).await;
    let seen = clients(&lines);
    assert_eq!(
        seen.len(),
        3,
        "three access log lines:\n{}",
        lines.join("\n")
    );
    let first = seen[0].clone();
    assert!(
        first.starts_with('~') && first.len() == 17,
        "a pseudonym, not an address: {first}"
    );
    assert!(seen.iter().all(|c| *c == first), "stable: {seen:?}");
    for line in &lines {
        assert!(
            !line.contains(USER) && !line.contains(COOKIE),
            "planted id logged: {line}"
        );
        assert!(!line.contains("client=127.0.0.1"), "address logged: {line}");
    }
    let metrics = admin_get(admin, "/metrics").await.text();
    assert!(!metrics.contains(USER) && !metrics.contains(COOKIE));
    for entry in files_under(&pki.path().join("store")) {
        let text = String::from_utf8_lossy(&std::fs::read(&entry).unwrap()).into_owned();
        assert!(
            !text.contains(USER) && !text.contains(COOKIE),
            "{}",
            entry.display()
        );
    }

    // Another node with the same key gives the same pseudonym.
    let other_file = pki.path().join("other.toml");
    std::fs::write(
        &other_file,
        config("same.key").replace("dir = \"store\"", "dir = \"store-2\""),
    )
    .unwrap();
    let (_other, other_addr, _, mut other_log) = spawn_gateway_binary_with_admin(&other_file).await;
    planted_request(other_addr, &pki).await;
    let other = clients(&drain(&mut other_log, Duration::from_millis(500)).await);
    assert_eq!(
        other,
        std::slice::from_ref(&first),
        "same key, same pseudonym"
    );

    // A new key, applied by SIGHUP: new pseudonyms from then on.
    std::fs::write(pki.path().join("privacy.key"), "second-secret-9876543210").unwrap();
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let mut rotated = None;
    for _ in 0..50 {
        planted_request(addr, &pki).await;
        let seen = clients(&drain(&mut log, Duration::from_millis(100)).await);
        if let Some(c) = seen.into_iter().find(|c| *c != first) {
            rotated = Some(c);
            break;
        }
    }
    let rotated = rotated.expect("the new key took effect");
    assert!(rotated.starts_with('~') && rotated.len() == 17, "{rotated}");
}
