//! Zero-downtime upgrade: `gateway upgrade` starts a new process of the binary at the path the
//! running one was started from; it takes over the listening sockets, and the old one drains.
//! HTTP/1.1 and h2 clients over TLS, and HTTP/1.1 clients over plain HTTP, keep sending
//! through three upgrades in a row and every
//! request is answered; a new process that cannot start (a broken config, a binary that exits
//! at once or never gets ready) leaves the old one serving, and `gateway upgrade` says why.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::io::AsyncBufReadExt;

use crate::support::*;

/// Kills every gateway process the test saw when it ends, passed or failed: the processes an
/// upgrade starts are not the test's children, so `kill_on_drop` cannot reach them.
#[derive(Default)]
struct Reaper(Mutex<Vec<u32>>);

impl Reaper {
    fn add(&self, pid: u32) {
        self.0.lock().unwrap().push(pid);
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in self.0.lock().unwrap().iter() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn alive(pid: u32) -> bool {
    std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        // A process that exited but was not reaped yet is not serving either.
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
}

/// A gateway run from `dir/bin/gateway`, a symlink the test points at the binary under test
/// or at a stand-in, as an operator replaces the binary before `gateway upgrade`.
struct Node {
    dir: PathBuf,
    config: PathBuf,
    pid_file: PathBuf,
    first: tokio::process::Child,
    https: SocketAddr,
    /// The plain-HTTP listener, when the config has one named `plain`.
    plain: Option<SocketAddr>,
    admin: SocketAddr,
    reaper: Arc<Reaper>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    async fn start(dir: &Path, config_text: &str, extra_args: &[&str]) -> Node {
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let node = dir.to_path_buf();
        Node::point_binary_at(&node, Path::new(env!("CARGO_BIN_EXE_gateway")));
        let config = dir.join("gw.toml");
        std::fs::write(&config, config_text).unwrap();
        let pid_file = dir.join("gw.pid");
        let mut first = tokio::process::Command::new(bin.join("gateway"))
            .args(["run", "--config"])
            .arg(&config)
            .arg("--pid-file")
            .arg(&pid_file)
            .args(extra_args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let reaper = Arc::new(Reaper::default());
        reaper.add(first.id().unwrap());
        // Every process of the node writes to this one pipe: the new ones inherit it.
        let mut lines = tokio::io::BufReader::new(first.stderr.take().unwrap()).lines();
        let (mut https, mut admin, mut plain) = (None, None, None);
        let log = Arc::new(Mutex::new(Vec::new()));
        while https.is_none() || admin.is_none() {
            let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
                .await
                .expect("the gateway started within 60 s")
                .unwrap()
                .expect("gateway log line");
            let addr_after = |marker: &str| -> Option<SocketAddr> {
                let rest = line.split(marker).nth(1)?;
                rest.split_whitespace().next()?.parse().ok()
            };
            https = https.or_else(|| addr_after("listener=https addr="));
            plain = plain.or_else(|| addr_after("listener=plain addr="));
            if line.contains("admin listening") {
                admin = admin.or_else(|| addr_after("addr="));
            }
            log.lock().unwrap().push(line);
        }
        let sink = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        let node = Node {
            dir: node,
            config,
            pid_file,
            first,
            https: https.unwrap(),
            plain,
            admin: admin.unwrap(),
            reaper,
            log,
        };
        assert!(
            eventually(Duration::from_secs(10), || node.pid().is_some()).await,
            "the pid file was written"
        );
        node
    }

    /// Replaces `bin/gateway` (atomically, as `mv` over it would) by a link to `target`.
    fn point_binary_at(dir: &Path, target: &Path) {
        let link = dir.join("bin/gateway");
        let tmp = dir.join("bin/.gateway.new");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp).unwrap();
        std::fs::rename(&tmp, &link).unwrap();
    }

    /// Writes an executable script and points `bin/gateway` at it.
    fn replace_binary_with_script(&self, name: &str, script: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.join(name);
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        Node::point_binary_at(&self.dir, &path);
    }

    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Runs `gateway upgrade` (the binary under test, not the link): exit status, stdout and
    /// stderr.
    async fn upgrade(&self) -> (bool, String, String) {
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
                .arg("upgrade")
                .arg("--pid-file")
                .arg(&self.pid_file)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("gateway upgrade finished within 120 s")
        .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    async fn metric(&self, line_prefix: &str) -> f64 {
        let m = admin_get(self.admin, "/metrics").await;
        m.text()
            .lines()
            .filter(|l| l.starts_with(line_prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn log_tail(&self) -> String {
        let log = self.log.lock().unwrap();
        log[log.len().saturating_sub(40)..].join("\n")
    }
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    answered: AtomicU64,
    /// Connections opened, the first of each client's included.
    connections: AtomicU64,
    /// Requests the server never processed because the connection was closing: handed back
    /// unsent by the client library (it had seen the GOAWAY or the close), or refused by the
    /// GOAWAY ([`refused_by_goaway`]). They are sent again on a new connection, as a pooling
    /// client does. Not counted in `sent`.
    unsent: AtomicU64,
    /// Requests that failed or got an unexpected answer, connections refused or reset, and
    /// connections closed without the server saying so first.
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        let mut f = self.failures.lock().unwrap();
        if f.len() < 20 {
            f.push(what);
        } else if f.len() == 20 {
            f.push("...".into());
        }
    }

    fn failed(&self) -> usize {
        self.failures.lock().unwrap().len()
    }
}

/// What the clients ask for, in turn: the upstream answers `?slow` after a few milliseconds.
const PATHS: [&str; 2] = ["/item", "/item?slow"];

/// An HTTP/1.1 connection over TLS, or over plain TCP when `plain`.
async fn h1_connect(
    addr: SocketAddr,
    ca: &rustls::pki_types::CertificateDer<'static>,
    plain: bool,
) -> Result<hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>, String> {
    if !plain {
        return match tls_connect(addr, ca, ClientOpts::default()).await {
            Ok(TlsConn {
                sender: Sender::H1(s),
                ..
            }) => Ok(s),
            Ok(_) => panic!("asked for HTTP/1.1"),
            Err(e) => Err(e.to_string()),
        };
    }
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(s)
}

/// An HTTP/1.1 client over TLS (or plain TCP when `plain`) sending one request after another
/// until `stop`; it opens a new connection only after a response that says
/// `connection: close`.
async fn h1_client(
    addr: SocketAddr,
    ca: rustls::pki_types::CertificateDer<'static>,
    plain: bool,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let mut conn: Option<hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>> =
        None;
    while !stop.load(Ordering::Relaxed) {
        let sender = match conn.as_mut() {
            Some(s) => s,
            None => match h1_connect(addr, &ca, plain).await {
                Ok(s) => {
                    tally.connections.fetch_add(1, Ordering::Relaxed);
                    conn.insert(s)
                }
                Err(e) => {
                    tally.fail(format!("h1 connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        if sender.ready().await.is_err() {
            tally.fail(
                "h1: the server closed a keep-alive connection without `connection: close`".into(),
            );
            conn = None;
            continue;
        }
        let n = tally.sent.fetch_add(1, Ordering::Relaxed);
        let req = origin_form(get("localhost", PATHS[n as usize % 2]));
        match sender.try_send_request(req).await {
            Ok(resp) => {
                let close = resp
                    .headers()
                    .get("connection")
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                let status = resp.status();
                match resp.into_body().collect().await.map(|b| b.to_bytes()) {
                    Ok(body) if status == 200 && body == "app" => {
                        tally.answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => tally.fail(format!("h1: answered {status}")),
                    Err(e) => tally.fail(format!("h1: body cut off: {e}")),
                }
                if close {
                    conn = None;
                }
            }
            Err(e) if e.message().is_some() => {
                tally.sent.fetch_sub(1, Ordering::Relaxed);
                tally.unsent.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
            Err(e) => {
                tally.fail(format!("h1: request failed: {}", e.error()));
                conn = None;
            }
        }
    }
}

/// An h2 client over TLS keeping `streams` requests in flight on one connection until `stop`;
/// it opens a new connection once the server has closed the old one (after a GOAWAY).
async fn h2_client(
    addr: SocketAddr,
    ca: rustls::pki_types::CertificateDer<'static>,
    streams: usize,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    while !stop.load(Ordering::Relaxed) {
        let sender = match tls_connect(
            addr,
            &ca,
            ClientOpts {
                alpn: &[b"h2"],
                ..Default::default()
            },
        )
        .await
        {
            Ok(TlsConn {
                sender: Sender::H2(s),
                ..
            }) => s,
            Ok(_) => panic!("asked for h2"),
            Err(e) => {
                tally.fail(format!("h2 connect: {e}"));
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        tally.connections.fetch_add(1, Ordering::Relaxed);
        let mut workers = Vec::new();
        for _ in 0..streams {
            let (mut sender, stop, tally) = (sender.clone(), stop.clone(), tally.clone());
            workers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    // A connection the server said GOAWAY on takes no new streams: done with it.
                    if sender.ready().await.is_err() {
                        return;
                    }
                    let n = tally.sent.fetch_add(1, Ordering::Relaxed);
                    match sender
                        .try_send_request(get("localhost", PATHS[n as usize % 2]))
                        .await
                    {
                        Ok(resp) => {
                            let status = resp.status();
                            match resp.into_body().collect().await.map(|b| b.to_bytes()) {
                                Ok(body) if status == 200 && body == "app" => {
                                    tally.answered.fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(_) => tally.fail(format!("h2: answered {status}")),
                                Err(e) => tally.fail(format!("h2: body cut off: {e}")),
                            }
                        }
                        Err(e) if e.message().is_some() || refused_by_goaway(e.error()) => {
                            tally.sent.fetch_sub(1, Ordering::Relaxed);
                            tally.unsent.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Err(e) => {
                            tally.fail(format!("h2: request failed: {:?}", e.error()));
                            return;
                        }
                    }
                }
            }));
        }
        for w in workers {
            w.await.unwrap();
        }
    }
}

/// Whether an h2 request failed because the server's GOAWAY (reason NO_ERROR) came first: h2
/// then refuses a new stream locally, and a stream above the GOAWAY's last stream id was not
/// processed by the server (RFC 9113 §6.8), so it is safe to send again. A stream the server
/// took and then failed, reset or cut off ends with another error.
fn refused_by_goaway(e: &hyper::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<h2::Error>())
        .is_some_and(|h2| {
            h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR)
        })
}

/// Clients of both protocols against `addr` until [`Load::stop`].
struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `h1` HTTP/1.1 and `h2` h2 clients over TLS to `addr`, and `plain_h1` HTTP/1.1 clients
    /// to `plain`.
    fn start(
        addr: SocketAddr,
        ca: &rustls::pki_types::CertificateDer<'static>,
        h1: usize,
        h2: usize,
        (plain, plain_h1): (Option<SocketAddr>, usize),
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let mut tasks = Vec::new();
        for _ in 0..h1 {
            tasks.push(tokio::spawn(h1_client(
                addr,
                ca.clone(),
                false,
                stop.clone(),
                tally.clone(),
            )));
        }
        for _ in 0..plain_h1 {
            tasks.push(tokio::spawn(h1_client(
                plain.expect("a plain listener"),
                ca.clone(),
                true,
                stop.clone(),
                tally.clone(),
            )));
        }
        for _ in 0..h2 {
            tasks.push(tokio::spawn(h2_client(
                addr,
                ca.clone(),
                4,
                stop.clone(),
                tally.clone(),
            )));
        }
        Load { stop, tally, tasks }
    }

    fn answered(&self) -> u64 {
        self.tally.answered.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests were answered (the clients are making progress).
    async fn progress(&self, n: u64) {
        let from = self.answered();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.answered() < from + n {
            assert!(
                Instant::now() < deadline,
                "the clients made no progress for 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) -> Arc<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .expect("the clients stopped")
                .unwrap();
        }
        self.tally
    }
}

fn config(pki: &Pki, upstream: SocketAddr) -> String {
    basic_config(
        pki,
        &[upstream],
        "",
        "[server]\ndrain_timeout_ms = 10000\nwatch_files = false\n\
         [[listeners]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_upgrades_under_h1_and_h2_load_lose_no_request() {
    let pki = Pki::new();
    // Every other request takes a few milliseconds, so requests are in flight at every
    // hand-over; the others are answered at once, so HTTP/1.1 connections are often between
    // a response and the next request then, which is where closing a connection races the
    // client.
    let upstream = Upstream::with(|seen| {
        if seen.uri.query() == Some("slow") {
            Reply::Delay(Duration::from_millis(5), Bytes::from_static(b"app"))
        } else {
            Reply::Respond(http::StatusCode::OK, vec![], Bytes::from_static(b"app"))
        }
    })
    .await;
    let mut node = Node::start(pki.path(), &config(&pki, upstream.addr), &[]).await;
    let load = Load::start(node.https, &pki.ca_der, 6, 2, (node.plain, 2));
    load.progress(200).await;

    let mut pids = vec![node.pid().unwrap()];
    for round in 1..=3 {
        // The binary at the path it was started from is replaced before each upgrade.
        Node::point_binary_at(&node.dir, Path::new(env!("CARGO_BIN_EXE_gateway")));
        let old = *pids.last().unwrap();
        let (ok, out, err) = node.upgrade().await;
        assert!(
            ok,
            "upgrade {round} failed: {out}{err}\n{}",
            node.log_tail()
        );
        let new = node.pid().unwrap();
        node.reaper.add(new);
        assert_ne!(
            new, old,
            "upgrade {round}: the pid file names a new process"
        );
        assert!(
            out.contains(&format!("process {new} serves")),
            "upgrade {round} names the new process: {out}"
        );
        assert!(alive(new), "upgrade {round}: the new process runs");
        // The old process drains and exits by itself.
        assert!(
            eventually(Duration::from_secs(15), || !alive(old)).await,
            "upgrade {round}: the old process {old} exited after its drain\n{}",
            node.log_tail()
        );
        // The admin socket was handed over too: the new process answers it, and it served.
        assert_eq!(
            node.metric("gateway_upgrades_total{outcome=\"took_over\"}")
                .await,
            1.0,
            "upgrade {round}: the admin listener is the new process's"
        );
        load.progress(200).await;
        assert!(node.metric("gateway_requests_total").await > 0.0);
        pids.push(new);
    }
    let first = node.first.wait().await.unwrap();
    assert_eq!(
        first.code(),
        Some(0),
        "the first process drained and exited 0"
    );

    let tally = load.stop().await;
    let (sent, answered) = (
        tally.sent.load(Ordering::Relaxed),
        tally.answered.load(Ordering::Relaxed),
    );
    assert_eq!(
        tally.failed(),
        0,
        "failures: {:#?}\n{}",
        tally.failures.lock().unwrap(),
        node.log_tail()
    );
    assert_eq!(sent, answered, "every request sent was answered");
    // The upstream saw each answered request once, and none of those the client library
    // reported as not sent or refused by a GOAWAY.
    assert_eq!(
        upstream.hits() as u64,
        answered,
        "every request the upstream saw was answered, and no other"
    );
    assert!(
        tally.connections.load(Ordering::Relaxed) > 6,
        "the clients were moved to new connections by the hand-overs"
    );
    eprintln!(
        "3 upgrades (pids {pids:?}): {sent} requests sent, {answered} answered, {} connections, {} requests not sent (or refused by a GOAWAY) and sent again",
        tally.connections.load(Ordering::Relaxed),
        tally.unsent.load(Ordering::Relaxed)
    );

    // SIGTERM still drains and exits the last one, which removes its pid file.
    let last = *pids.last().unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &last.to_string()])
        .status()
        .unwrap();
    assert!(eventually(Duration::from_secs(15), || !alive(last)).await);
    assert!(
        !node.pid_file.exists(),
        "the last process removed its pid file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_process_that_cannot_serve_leaves_the_old_one_serving() {
    let pki = Pki::new();
    let upstream = Upstream::with(|_| {
        Reply::Respond(http::StatusCode::OK, vec![], Bytes::from_static(b"app"))
    })
    .await;
    let good_config = config(&pki, upstream.addr);
    let node = Node::start(pki.path(), &good_config, &["--upgrade-timeout-s", "3"]).await;
    let pid = node.pid().unwrap();
    let load = Load::start(node.https, &pki.ca_der, 2, 1, (None, 0));
    load.progress(50).await;

    // A configuration the new process refuses.
    std::fs::write(
        &node.config,
        "[[listeners]]\nname = \"https\"\nbind = \"nowhere\"\n",
    )
    .unwrap();
    let (ok, out, err) = node.upgrade().await;
    assert!(!ok, "an upgrade to a broken config must fail: {out}");
    assert!(
        err.contains("exited before it was ready")
            && err.contains(&format!("process {pid} serves on")),
        "the failure names the reason: {err}"
    );
    std::fs::write(&node.config, &good_config).unwrap();
    load.progress(50).await;

    // A binary that exits at once.
    node.replace_binary_with_script("exits.sh", "#!/bin/sh\nexit 3\n");
    let (ok, _, err) = node.upgrade().await;
    assert!(!ok);
    assert!(
        err.contains("exit status: 3"),
        "the failure says how it ended: {err}"
    );
    load.progress(50).await;

    // A binary that never gets ready: killed after --upgrade-timeout-s.
    node.replace_binary_with_script("hangs.sh", "#!/bin/sh\nexec sleep 60\n");
    let started = Instant::now();
    let (ok, _, err) = node.upgrade().await;
    assert!(!ok);
    assert!(err.contains("was not ready within 3s"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
    load.progress(50).await;

    assert_eq!(
        node.pid(),
        Some(pid),
        "the pid file still names the old process"
    );
    assert!(alive(pid));
    assert_eq!(
        node.metric("gateway_upgrades_total{outcome=\"failed\"}")
            .await,
        3.0
    );

    // The right binary again: the upgrade goes through.
    Node::point_binary_at(&node.dir, Path::new(env!("CARGO_BIN_EXE_gateway")));
    let (ok, out, err) = node.upgrade().await;
    assert!(ok, "{out}{err}\n{}", node.log_tail());
    let new = node.pid().unwrap();
    node.reaper.add(new);
    assert_ne!(new, pid);
    load.progress(50).await;

    let tally = load.stop().await;
    assert_eq!(
        tally.failed(),
        0,
        "failures: {:#?}\n{}",
        tally.failures.lock().unwrap(),
        node.log_tail()
    );
    assert_eq!(
        tally.sent.load(Ordering::Relaxed),
        tally.answered.load(Ordering::Relaxed)
    );
}
