//! Shared pieces of the end-to-end tests: a test PKI, scriptable upstream servers, a TLS
//! client that speaks HTTP/1.1 or h2, and a gateway started on 127.0.0.1:0.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gateway::{Config, Gateway};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::Registry;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A CA and the leaf certificates it signed, written as PEM files in a temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
    ca_key: rcgen::KeyPair,
    ca_params: rcgen::CertificateParams,
    pub ca_der: CertificateDer<'static>,
}

impl Pki {
    pub fn new() -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "gateway test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        Pki {
            dir: tempfile::tempdir().unwrap(),
            ca_key,
            ca_der: ca_cert.der().clone(),
            ca_params,
        }
    }

    /// Issues a leaf for `names`, writes `<file>.pem` and `<file>.key`, returns their paths.
    pub fn issue(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0]);
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let cert_path = self.dir.path().join(format!("{file}.pem"));
        let key_path = self.dir.path().join(format!("{file}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A request as an upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: http::Method,
    pub uri: http::Uri,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// How a test upstream answers.
pub type Behavior = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// One scripted answer.
pub enum Reply {
    /// Status, extra headers, body.
    Respond(StatusCode, Vec<(&'static str, &'static str)>, Bytes),
    /// Sleep, then answer 200 with this body.
    Delay(Duration, Bytes),
    /// Close the connection without answering.
    Drop,
}

/// A real HTTP server on 127.0.0.1 answering with a scripted behavior, recording requests.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub hits: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Answers 200 with `name` as the body and `x-upstream: name`.
    pub async fn named(name: &'static str) -> Upstream {
        Upstream::start_on(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(move |_: &Seen| {
                Reply::Respond(
                    StatusCode::OK,
                    vec![("x-upstream", name)],
                    Bytes::from_static(name.as_bytes()),
                )
            }),
        )
        .await
    }

    pub async fn with(behavior: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Upstream {
        Upstream::start_on("127.0.0.1:0".parse().unwrap(), Arc::new(behavior)).await
    }

    pub async fn start_on(addr: SocketAddr, behavior: Behavior) -> Upstream {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let hits = Arc::new(AtomicUsize::new(0));
        let (seen2, hits2) = (seen.clone(), hits.clone());
        let task = tokio::spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (behavior, seen, hits, builder) = (
                    behavior.clone(),
                    seen2.clone(),
                    hits2.clone(),
                    builder.clone(),
                );
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (behavior, seen, hits) = (behavior.clone(), seen.clone(), hits.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let s = Seen {
                                method: parts.method,
                                uri: parts.uri,
                                version: parts.version,
                                headers: parts.headers,
                                body,
                            };
                            hits.fetch_add(1, Ordering::SeqCst);
                            let reply = behavior(&s);
                            seen.lock().unwrap().push(s);
                            match reply {
                                Reply::Respond(status, headers, body) => {
                                    let mut r = Response::new(Full::new(body));
                                    *r.status_mut() = status;
                                    for (k, v) in headers {
                                        r.headers_mut().append(k, v.parse().unwrap());
                                    }
                                    Ok(r)
                                }
                                Reply::Delay(d, body) => {
                                    tokio::time::sleep(d).await;
                                    Ok(Response::new(Full::new(body)))
                                }
                                Reply::Drop => {
                                    Err(std::io::Error::other("dropping the connection on purpose"))
                                }
                            }
                        }
                    });
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            seen,
            hits,
            task,
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("upstream saw a request")
    }

    /// Stops accepting; the port is free again afterwards.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A port that refuses connections: bound once, then released.
pub async fn dead_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// A gateway started from TOML text with relative paths resolved in `dir`.
pub struct TestGateway {
    pub gateway: Gateway,
    pub registry: Registry,
}

impl TestGateway {
    pub async fn start(toml: &str, dir: &Path) -> TestGateway {
        let mut config = Config::from_toml(toml, "test.toml", dir)
            .unwrap_or_else(|e| panic!("test config invalid: {e}"));
        // Queue-time shedding reads how late this runtime runs a task; when the whole suite
        // shares two cores, a test's thread can wait that long for the OS, and an unrelated
        // test would get 503. Tests of shedding set the field themselves.
        if !toml.contains("max_queue_time_ms") {
            config.limits.max_queue_time = std::time::Duration::ZERO;
        }
        let registry = Registry::new();
        let gateway = Gateway::start(config, registry.clone()).await.unwrap();
        TestGateway { gateway, registry }
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.gateway.listener_addr(listener).unwrap()
    }

    /// Value of a counter or gauge whose labels include all of `labels`; 0 when absent.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.registry, name, labels)
    }
}

pub fn metric_value(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for family in registry.gather() {
        // A histogram answers its sample count by its name and `_count`, its sum by `_sum`.
        let sum = name.strip_suffix("_sum") == Some(family.name());
        if family.name() != name && !sum && name.strip_suffix("_count") != Some(family.name()) {
            continue;
        }
        for m in family.get_metric() {
            let matches = labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            });
            if matches {
                total += match family.get_field_type() {
                    prometheus::proto::MetricType::COUNTER => m.get_counter().get_value(),
                    prometheus::proto::MetricType::GAUGE => m.get_gauge().get_value(),
                    _ if sum => m.get_histogram().get_sample_sum(),
                    _ => m.get_histogram().get_sample_count() as f64,
                };
            }
        }
    }
    total
}

/// A response as the client saw it.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// One client connection through TLS to the gateway.
pub struct TlsConn {
    pub sender: Sender,
    pub peer_cert: CertificateDer<'static>,
    pub alpn: Option<Vec<u8>>,
    pub tls_version: rustls::ProtocolVersion,
}

/// Client settings.
pub struct ClientOpts<'a> {
    pub sni: &'a str,
    pub alpn: &'a [&'a [u8]],
    pub versions: &'a [&'static rustls::SupportedProtocolVersion],
}

impl Default for ClientOpts<'_> {
    fn default() -> Self {
        static BOTH: [&rustls::SupportedProtocolVersion; 2] =
            [&rustls::version::TLS13, &rustls::version::TLS12];
        ClientOpts {
            sni: "localhost",
            alpn: &[b"http/1.1"],
            versions: &BOTH,
        }
    }
}

pub fn client_config(ca: &CertificateDer<'static>, opts: &ClientOpts) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(gateway::tls::provider())
        .with_protocol_versions(opts.versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = opts.alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

pub async fn tls_connect(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    opts: ClientOpts<'_>,
) -> std::io::Result<TlsConn> {
    tls_connect_over(TcpStream::connect(addr).await?, ca, opts).await
}

/// [`tls_connect`] over a TCP connection already made.
pub async fn tls_connect_over(
    tcp: TcpStream,
    ca: &CertificateDer<'static>,
    opts: ClientOpts<'_>,
) -> std::io::Result<TlsConn> {
    let connector = tokio_rustls::TlsConnector::from(client_config(ca, &opts));
    let name = ServerName::try_from(opts.sni.to_string()).unwrap();
    let tls = connector.connect(name, tcp).await?;
    let (_, session) = tls.get_ref();
    let peer_cert = session.peer_certificates().unwrap()[0].clone().into_owned();
    let alpn = session.alpn_protocol().map(|p| p.to_vec());
    let tls_version = session.protocol_version().unwrap();
    let h2 = alpn.as_deref() == Some(b"h2");
    let io = TokioIo::new(tls);
    let sender = if h2 {
        let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Sender::H2(s)
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Sender::H1(s)
    };
    Ok(TlsConn {
        sender,
        peer_cert,
        alpn,
        tls_version,
    })
}

/// Plain-HTTP/1.1 connection (for cleartext listeners).
pub async fn plain_connect(addr: SocketAddr) -> Sender {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    Sender::H1(s)
}

impl Sender {
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Got, hyper::Error> {
        let resp = match self {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(origin_form(req)).await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Got {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
        })
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Got {
        self.send(get(host, path)).await.unwrap()
    }
}

/// A GET with a Host header (h1) or authority (h2, filled in from the URI).
pub fn get(host: &str, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("https://{host}{path}"))
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Requests for h1 must be in origin form; hyper's h1 client sends the URI as given, so strip it.
pub fn origin_form(mut req: Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    *req.uri_mut() = pq.parse().unwrap();
    req
}

/// Connects over TLS and returns one response.
pub async fn fetch(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    h2: bool,
    req: Request<Full<Bytes>>,
) -> Got {
    let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
    let mut conn = tls_connect(
        addr,
        ca,
        ClientOpts {
            alpn,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    conn.sender.send(req).await.unwrap()
}

/// The smallest TOML for a gateway with one HTTPS listener in front of `backends`, using the
/// certificate `pki` issued as `server` for localhost.
pub fn basic_config(
    pki: &Pki,
    backends: &[SocketAddr],
    extra_upstream: &str,
    extra: &str,
) -> String {
    pki.issue("server", &["localhost"]);
    let list: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"
[admin]
bind = "127.0.0.1:0"

[logging]
access_log = false

[[tls.certificates]]
cert = "server.pem"
key = "server.key"
server_names = ["localhost"]

[[listeners]]
name = "https"
bind = "127.0.0.1:0"

[[upstreams]]
name = "app"
backends = [{}]
{extra_upstream}

[[routes]]
name = "all"
upstream = "app"

{extra}
"#,
        list.join(", ")
    )
}

/// A raw TLS stream to the gateway, for requests hyper's client will not send.
pub async fn raw_tls(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(client_config(ca, &ClientOpts::default()));
    let tcp = TcpStream::connect(addr).await.unwrap();
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// Reads until the peer closes or `limit` passes; returns what was read and whether it closed.
pub async fn read_until_close<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    limit: Duration,
) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, r.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&buf).into_owned(), true),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return (String::from_utf8_lossy(&buf).into_owned(), false),
        }
    }
}

/// GET on the admin listener over plain HTTP/1.1.
pub async fn admin_get(addr: SocketAddr, path: &str) -> Got {
    let mut s = plain_connect(addr).await;
    s.send(
        Request::get(path)
            .header("host", "admin")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
    .unwrap()
}

/// Polls `cond` every 20 ms until it holds or `limit` passes.
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// Path of a plugin component built from `plugins/` (built once per test run with
/// `plugins/build.sh`, which installs the wasm32-wasip2 target when missing).
pub fn plugin_wasm(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dist = BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = std::process::Command::new("bash")
            .arg(root.join("plugins/build.sh"))
            .current_dir(&root)
            .status()
            .expect("running plugins/build.sh");
        assert!(status.success(), "plugins/build.sh failed");
        root.join("plugins/dist")
    });
    let path = dist.join(format!("{name}.wasm"));
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// Path of a Python or JavaScript plugin component, `plugins/<lang>/<name>` built by
/// `plugins/build.sh --python` or `--js` (componentize-py, componentize-js, default options)
/// once per language and test run; the script rebuilds only what changed since its last run.
pub fn lang_plugin(lang: &str, name: &str) -> PathBuf {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    static JS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let (once, flag) = match lang {
        "python" => (&PYTHON, "--python"),
        "js" => (&JS, "--js"),
        other => panic!("no plugins in {other}"),
    };
    let dist = once.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = std::process::Command::new("bash")
            .arg(root.join("plugins/build.sh"))
            .arg(flag)
            .current_dir(&root)
            .status()
            .expect("running plugins/build.sh");
        assert!(status.success(), "plugins/build.sh {flag} failed");
        root.join("plugins/dist")
    });
    let path = dist.join(format!("{lang}-{name}.wasm"));
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// A `[[plugins]]` table for a built plugin.
pub fn plugin_table(name: &str, wasm: &str, config: &str, extra: &str) -> String {
    format!(
        "[[plugins]]\nname = \"{name}\"\npath = \"{}\"\nconfig = '''\n{config}\n'''\n{extra}\n",
        plugin_wasm(wasm).display()
    )
}

/// A request to the admin listener with an optional bearer token.
pub async fn admin_call(
    addr: SocketAddr,
    method: http::Method,
    path: &str,
    token: Option<&str>,
) -> Got {
    let mut s = plain_connect(addr).await;
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "admin");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    s.send(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap()
}

/// A request with a body to the admin listener.
pub async fn admin_send(
    addr: SocketAddr,
    method: http::Method,
    path: &str,
    token: &str,
    body: Vec<u8>,
) -> Got {
    let mut s = plain_connect(addr).await;
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "admin")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    s.send(req).await.unwrap()
}

/// Starts the `gateway` binary on a config file and returns it with the bound address of its
/// `https` listener (read from its log). Its log keeps being drained so it never blocks.
pub async fn spawn_gateway_binary(config: &Path) -> (tokio::process::Child, SocketAddr) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("gateway log line");
        if let Some(rest) = line.split("listener=https addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

/// Like [`spawn_gateway_binary`], also returning the admin listener's bound address and the
/// rest of the gateway's log, line by line.
pub async fn spawn_gateway_binary_with_admin(
    config: &Path,
) -> (
    tokio::process::Child,
    SocketAddr,
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut https, mut admin) = (None, None);
    while https.is_none() || admin.is_none() {
        // Generous: an interpreter plugin compiles for tens of seconds on a busy debug build.
        let line = tokio::time::timeout(Duration::from_secs(240), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("gateway log line");
        // Text lines (`listener=https addr=...`) or JSON ones (`format = "json"`).
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            let f = &v["fields"];
            let addr = f["addr"].as_str().and_then(|a| a.parse().ok());
            if f["message"] == "listening" && f["listener"] == "https" {
                https = https.or(addr);
            } else if f["message"] == "admin listening" {
                admin = admin.or(addr);
            }
            continue;
        }
        let addr_after = |marker: &str| -> Option<SocketAddr> {
            let rest = line.split(marker).nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        };
        https = https.or_else(|| addr_after("listener=https addr="));
        if line.contains("admin listening") {
            admin = admin.or_else(|| addr_after("addr="));
        }
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.send(line);
        }
    });
    (child, https.unwrap(), admin.unwrap(), rx)
}

/// Every file below `dir`, recursively (none when it does not exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Writes the small sample embedding model (20 users, 4 items, version 1) as
/// `dir/recs.safetensors` and returns its path.
pub fn sample_model_file(dir: &Path) -> PathBuf {
    let model = dir.join("recs.safetensors");
    std::fs::write(
        &model,
        gateway::scoring::sample_model(&gateway::scoring::SampleSpec::embedding(20, 4, 1)),
    )
    .unwrap();
    model
}

/// Sends a request carrying `x-internal-secret` and says whether it reached `up`: the `noop`
/// plugin lets it through, `hygiene` strips it, so this tells which of the two serves.
pub async fn internal_header_reaches_upstream(gw: &TestGateway, pki: &Pki, up: &Upstream) -> bool {
    let req = Request::get("https://localhost/x")
        .header("host", "localhost")
        .header("x-internal-secret", "1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(
        fetch(gw.addr("https"), &pki.ca_der, false, req)
            .await
            .status,
        200
    );
    up.last().headers.contains_key("x-internal-secret")
}
