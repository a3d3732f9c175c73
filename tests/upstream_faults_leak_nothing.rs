//! Upstream faults: a backend that refuses connections, resets mid-body, is slow to send its
//! head, stalls in its body, answers garbage or never answers. Each gets its status in bounded
//! time, over HTTP/1.1 and h2, and afterwards the gateway (the real binary, so the counts are
//! its own) holds no more file descriptors or tasks than before and no upstream connection is
//! left open: checked, not assumed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// A backend misbehaving by request path, counting the connections it has open.
struct FaultyBackend {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultyBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl FaultyBackend {
    async fn start() -> FaultyBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let counter = open.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let open = Open(counter.clone());
                tokio::spawn(async move {
                    let _open = open;
                    let _ = serve(stream).await;
                });
            }
        });
        FaultyBackend { addr, open, task }
    }
}

/// Answers requests on one connection until a fault ends it or the gateway closes it.
async fn serve(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        match path.as_str() {
            "/reset-mid-body" => {
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n")
                    .await?;
                s.write_all(&[b'x'; 1000]).await?;
                s.flush().await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
                // Linger zero: closing sends RST instead of FIN.
                s.set_zero_linger()?;
                return Ok(());
            }
            "/slow-headers" => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nlate")
                    .await?;
            }
            "/slow-body" => {
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
                    .await?;
                s.write_all(&[b'x'; 100]).await?;
                // The rest never comes: hold the connection until the gateway lets go.
                while s.read(&mut chunk).await? > 0 {}
                return Ok(());
            }
            "/garbage" => {
                s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\x00\x01\x02 not http at all\r\n\r\n")
                    .await?;
                while s.read(&mut chunk).await? > 0 {}
                return Ok(());
            }
            // "/never" and anything else: read on, answer nothing.
            _ => {
                while s.read(&mut chunk).await? > 0 {}
                return Ok(());
            }
        }
    }
}

/// What a request got: its status, and whether its body arrived whole.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Status(u16),
    /// The head came (with this status) but the body broke off.
    BodyBroke(u16),
}

async fn request(
    addr: SocketAddr,
    ca: &rustls::pki_types::CertificateDer<'static>,
    h2: bool,
    path: &str,
) -> Outcome {
    use http_body_util::BodyExt;
    let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
    let conn = tls_connect(
        addr,
        ca,
        ClientOpts {
            alpn,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let resp = match conn.sender {
        Sender::H1(mut s) => {
            s.ready().await.unwrap();
            s.send_request(origin_form(get("localhost", path))).await
        }
        Sender::H2(mut s) => {
            s.ready().await.unwrap();
            s.send_request(get("localhost", path)).await
        }
    }
    .unwrap_or_else(|e| panic!("{path}: no response head: {e}"));
    let status = resp.status().as_u16();
    match resp.into_body().collect().await {
        Ok(_) => Outcome::Status(status),
        Err(_) => Outcome::BodyBroke(status),
    }
}

/// The value of an unlabelled series in a Prometheus text exposition.
fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

/// Waits (up to 10 s) until the gateway's tasks and descriptors are back at most at the
/// counts given, and the backend has no connection open; returns
/// the last (tasks, fds, open upstream connections).
async fn settled(
    admin: SocketAddr,
    pid: u32,
    upstream_open: &AtomicUsize,
    fds_at_start: Option<usize>,
    tasks_at_start: Option<f64>,
) -> (f64, usize, usize) {
    let mut last = (0.0, 0, 0);
    for _ in 0..100 {
        let text = admin_get(admin, "/metrics").await.text();
        let tasks = series(&text, "gateway_runtime_alive_tasks");
        let fds = open_fds(pid, admin.port());
        let upstream = upstream_open.load(Ordering::SeqCst);
        last = (tasks, fds, upstream);
        let fds_ok = fds_at_start.is_none_or(|f| fds <= f);
        let tasks_ok = tasks_at_start.is_none_or(|t| tasks <= t);
        // No fault leaves a connection fit to pool: every one must be closed.
        if fds_ok && tasks_ok && upstream == 0 {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

/// The gateway's TCP sockets (local, remote, state), for a failure's message.
fn sockets(pid: u32) -> String {
    let mut out = String::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if let [_, local, remote, state, ..] = cols[..] {
                let port = |a: &str| {
                    u16::from_str_radix(a.rsplit(':').next().unwrap_or("0"), 16).unwrap_or(0)
                };
                out += &format!("{} -> {} state {state}\n", port(local), port(remote));
            }
        }
    }
    out
}

/// The gateway's open descriptors, leaving out its admin listener's sockets: the test's own
/// scrapes open and close those, at their own pace.
fn open_fds(pid: u32, admin_port: u16) -> usize {
    let mut admin_inodes = std::collections::HashSet::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let port = cols
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if port == Some(admin_port) {
                if let Some(inode) = cols.get(9) {
                    admin_inodes.insert(format!("socket:[{inode}]"));
                }
            }
        }
    }
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path())
                .map(|t| !admin_inodes.contains(t.to_string_lossy().as_ref()))
                .unwrap_or(false)
        })
        .count()
}

#[tokio::test]
async fn each_fault_is_answered_in_bounded_time_and_leaves_nothing_open() {
    let pki = Pki::new();
    let faulty = FaultyBackend::start().await;
    let refused = dead_port().await;
    let toml = basic_config(
        &pki,
        &[faulty.addr],
        "connect_timeout_ms = 500\nrequest_timeout_ms = 500\nbody_timeout_ms = 500\n\
         [upstreams.passive]\nconsecutive_failures = 0",
        &format!(
            "[[routes]]\nname = \"refused\"\npath_prefix = \"/refused\"\nupstream = \"refused\"\n\
             [[upstreams]]\nname = \"refused\"\nbackends = [\"{refused}\"]\n"
        ),
    );
    let file = pki.path().join("gateway.toml");
    std::fs::write(&file, toml).unwrap();
    let (child, addr, admin, _log) = spawn_gateway_binary_with_admin(&file).await;
    let pid = child.id().unwrap();

    // (path, what every request gets, the longest any may take)
    let faults = [
        ("/refused", Outcome::Status(502), 3),
        ("/reset-mid-body", Outcome::BodyBroke(200), 3),
        ("/slow-headers", Outcome::Status(504), 3),
        ("/slow-body", Outcome::BodyBroke(200), 3),
        ("/garbage", Outcome::Status(502), 3),
        ("/never", Outcome::Status(504), 3),
    ];
    let round = |label: &'static str| {
        let ca = pki.ca_der.clone();
        let faults = &faults;
        async move {
            let mut runs = Vec::new();
            for (path, expected, limit) in faults {
                for h2 in [false, true] {
                    for _ in 0..8 {
                        let ca = ca.clone();
                        runs.push(async move {
                            let start = Instant::now();
                            let got = request(addr, &ca, h2, path).await;
                            let took = start.elapsed();
                            assert_eq!(&got, expected, "{label}: {path} over h2={h2}");
                            assert!(
                                took < Duration::from_secs(*limit),
                                "{label}: {path} over h2={h2} took {took:?}"
                            );
                        });
                    }
                }
            }
            futures_util::future::join_all(runs).await;
        }
    };
    round("warm-up").await;
    let (tasks_before, fds_before, upstream_before) =
        settled(admin, pid, &faulty.open, None, None).await;
    for i in 0..3 {
        round(["round 1", "round 2", "round 3"][i]).await;
    }
    let (tasks_after, fds_after, upstream_after) = settled(
        admin,
        pid,
        &faulty.open,
        Some(fds_before),
        Some(tasks_before),
    )
    .await;
    eprintln!(
        "tasks {tasks_before} -> {tasks_after}, fds {fds_before} -> {fds_after}, \
         upstream connections {upstream_before} -> {upstream_after}"
    );
    if fds_after > fds_before {
        eprintln!("{}", sockets(pid));
    }
    assert!(
        fds_after <= fds_before,
        "file descriptors: {fds_before} before, {fds_after} after three rounds of faults"
    );
    assert!(
        tasks_after <= tasks_before,
        "tasks: {tasks_before} before, {tasks_after} after three rounds of faults"
    );
    assert!(
        upstream_after == 0,
        "upstream connections left open: {upstream_before} before, {upstream_after} after"
    );

    // The faults were counted by kind, and the slow body by its own timer.
    let text = admin_get(admin, "/metrics").await.text();
    for kind in ["connect", "timeout", "body_timeout", "other"] {
        let line = format!("gateway_upstream_errors_total{{kind=\"{kind}\"");
        assert!(
            text.lines()
                .any(|l| l.starts_with(&line) && !l.ends_with(" 0")),
            "{kind} not counted:\n{}",
            text.lines()
                .filter(|l| l.starts_with("gateway_upstream_errors_total"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
