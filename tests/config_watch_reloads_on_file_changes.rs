//! Watching files: an atomic save (write + rename) of the config, a Kubernetes-style
//! ConfigMap update (the `..data` symlink swapped), and a new certificate are applied without
//! a restart; a broken save changes nothing.

use std::path::Path;
use std::time::Duration;

use crate::support::*;

async fn wait_for(
    addr: std::net::SocketAddr,
    ca: &rustls::pki_types::CertificateDer<'static>,
    path: &str,
    want: &str,
) -> String {
    let mut body = String::new();
    for _ in 0..60 {
        body = fetch(addr, ca, false, get("localhost", path)).await.text();
        if body == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    body
}

fn atomic_write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn with_route_b(base: &str, b: std::net::SocketAddr) -> String {
    format!("{base}\n[[routes]]\nname = \"b\"\npath_prefix = \"/b\"\nupstream = \"b\"\n[[upstreams]]\nname = \"b\"\nbackends = [\"{b}\"]\n")
}

#[tokio::test]
async fn atomic_saves_and_certificate_changes_are_applied() {
    let pki = Pki::new();
    let (a, b) = (Upstream::named("a").await, Upstream::named("b").await);
    let file = pki.path().join("gateway.toml");
    let first = basic_config(&pki, &[a.addr], "", "");
    std::fs::write(&file, &first).unwrap();
    let gw = TestGateway::start(&first, pki.path()).await;
    gw.gateway.set_config_path(&file);
    let _watch = gw.gateway.watch_config(Duration::from_millis(50)).unwrap();
    let addr = gw.addr("https");
    assert_eq!(
        fetch(addr, &pki.ca_der, false, get("localhost", "/b"))
            .await
            .text(),
        "a"
    );

    atomic_write(&file, &with_route_b(&first, b.addr));
    assert_eq!(wait_for(addr, &pki.ca_der, "/b", "b").await, "b");

    // A broken save is refused; the last good config keeps serving.
    atomic_write(&file, "this is not toml [");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        fetch(addr, &pki.ca_der, false, get("localhost", "/b"))
            .await
            .text(),
        "b"
    );
    assert!(gw.metric("gateway_reload_failures_total", &[("kind", "config")]) >= 1.0);

    // A renewed certificate is served to new connections.
    atomic_write(&file, &with_route_b(&first, b.addr));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = tls_connect(addr, &pki.ca_der, ClientOpts::default())
        .await
        .unwrap()
        .peer_cert;
    pki.issue("server", &["localhost"]);
    let mut renewed = before.clone();
    for _ in 0..60 {
        renewed = tls_connect(addr, &pki.ca_der, ClientOpts::default())
            .await
            .unwrap()
            .peer_cert;
        if renewed != before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(
        renewed, before,
        "the new certificate is served without a restart"
    );
}

#[cfg(unix)]
#[tokio::test]
async fn configmap_symlink_swaps_are_applied() {
    use std::os::unix::fs::symlink;
    let pki = Pki::new();
    let (a, b) = (Upstream::named("a").await, Upstream::named("b").await);
    // The kubelet's layout: gateway.toml -> ..data/gateway.toml, ..data -> ..<timestamp>/.
    let root = pki.path();
    let first = basic_config(&pki, &[a.addr], "", "")
        .replace("server.pem", &root.join("server.pem").display().to_string())
        .replace("server.key", &root.join("server.key").display().to_string());
    std::fs::create_dir(root.join("..v1")).unwrap();
    std::fs::write(root.join("..v1/gateway.toml"), &first).unwrap();
    symlink("..v1", root.join("..data")).unwrap();
    symlink("..data/gateway.toml", root.join("gateway.toml")).unwrap();
    let file = root.join("gateway.toml");
    let gw = TestGateway::start(&first, root).await;
    gw.gateway.set_config_path(&file);
    let _watch = gw.gateway.watch_config(Duration::from_millis(50)).unwrap();
    let addr = gw.addr("https");

    std::fs::create_dir(root.join("..v2")).unwrap();
    std::fs::write(root.join("..v2/gateway.toml"), with_route_b(&first, b.addr)).unwrap();
    symlink("..v2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    assert_eq!(wait_for(addr, &pki.ca_der, "/b", "b").await, "b");
}
