//! A large upload is streamed to the content store while it is hashed, and refused content is
//! refused by its first bytes: a 200 MiB upload of invalid content barely moves the gateway's
//! peak memory (the real binary, so the figure is its own), and leaves no file behind.

use http::Method;

use crate::support::*;

const TOKEN: &str = "upload-token";
const MIB: usize = 1024 * 1024;

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} missing from /proc/{pid}/status"))
}

#[tokio::test]
async fn a_large_invalid_upload_is_streamed_and_refused_without_holding_it_in_memory() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let model = sample_model_file(pki.path());
    std::fs::write(pki.path().join("admin.token"), TOKEN).unwrap();
    let extra = format!(
        "[[models]]\nname = \"recs\"\npath = \"{}\"\n[store]\ndir = \"store\"\n",
        model.display()
    );
    let toml = basic_config(&pki, &[up.addr], "", &extra).replace(
        "[admin]\nbind = \"127.0.0.1:0\"",
        &format!(
            "[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\nmax_upload_bytes = {}",
            256 * MIB
        ),
    );
    let file = pki.path().join("gateway.toml");
    std::fs::write(&file, toml).unwrap();
    let (child, _, admin, _log) = spawn_gateway_binary_with_admin(&file).await;
    let pid = child.id().unwrap();

    // Start the peak from now (Linux: writing 5 to clear_refs resets VmHWM).
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let before = status_kib(pid, "VmHWM:");
    let junk: Vec<u8> = (0..200 * MIB).map(|i| (i % 251) as u8).collect();
    let r = admin_send(admin, Method::PUT, "/admin/models/recs", TOKEN, junk).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("safetensors"), "{}", r.text());
    let peak = status_kib(pid, "VmHWM:");
    let grew_mib = (peak.saturating_sub(before)) as f64 / 1024.0;
    eprintln!(
        "peak RSS {before} KiB before, {peak} KiB after a 200 MiB upload (+{grew_mib:.1} MiB)"
    );
    assert!(
        grew_mib < 48.0,
        "a 200 MiB upload raised the peak RSS by {grew_mib:.1} MiB"
    );

    // An upload the client cuts off halfway leaves no staged file either.
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
        let head = format!(
            "PUT /admin/models/recs HTTP/1.1\r\nhost: admin\r\nauthorization: Bearer {TOKEN}\r\n\
             content-length: {}\r\n\r\n",
            64 * MIB
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&vec![7u8; 8 * MIB]).await.unwrap();
        s.flush().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // Nothing of it stays in the store or its records.
    let store = pki.path().join("store");
    let big = || -> Vec<_> {
        files_under(&store)
            .into_iter()
            .filter(|p| {
                std::fs::metadata(p)
                    .map(|m| m.len() > MIB as u64)
                    .unwrap_or(false)
            })
            .collect()
    };
    // The gateway learns of the cut-off when it reads the close.
    assert!(
        eventually(std::time::Duration::from_secs(10), || big().is_empty()).await,
        "left in the store: {:?}",
        big()
    );
    let status = admin_send(admin, Method::GET, "/admin/models", TOKEN, Vec::new()).await;
    assert_eq!(status.status, 200, "{}", status.text());
    assert_eq!(status.text(), r#"{"artifacts":[]}"#);
}
