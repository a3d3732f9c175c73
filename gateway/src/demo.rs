//! `gateway demo`: a self-signed certificate, a small built-in storefront upstream, and the
//! embedded configuration (`config/demo.toml`) that puts the gateway in front of it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::config::{Config, ConfigError};
use crate::upstream::ProxyBody;

/// The embedded demo configuration; `@...@` placeholders are filled in by [`demo_config`].
pub const DEMO_TOML: &str = include_str!("../../config/demo.toml");

/// Why the demo could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Writing the generated certificate failed.
    #[error("writing demo certificate into {dir}: {source}")]
    Write {
        /// Target directory.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Generating the certificate failed.
    #[error("generating a self-signed certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// The embedded configuration did not validate (a bug).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The storefront could not bind.
    #[error("starting the demo storefront: {0}")]
    Storefront(std::io::Error),
}

/// Where the demo looks for built plugins: `$GATEWAY_PLUGINS_DIR`, else this checkout's
/// `plugins/dist` (filled by `plugins/build.sh`).
pub fn default_plugins_dir() -> PathBuf {
    std::env::var_os("GATEWAY_PLUGINS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist"))
}

/// The plugins the demo chains, in order.
pub const DEMO_PLUGINS: [&str; 3] = ["hygiene", "ratelimit", "storefront"];

/// Writes a self-signed certificate for `localhost` into `dir` and returns the demo config
/// that serves HTTPS on `https`, admin on `admin`, in front of the storefront at `upstream`.
/// When `plugins_dir` holds the [`DEMO_PLUGINS`], the route runs them.
pub fn demo_config(
    dir: &Path,
    https: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
    plugins_dir: Option<&Path>,
) -> Result<Config, DemoError> {
    let write_err = |source| DemoError::Write {
        dir: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(write_err)?;
    let (cert, key) = crate::tls::self_signed(&["localhost", "127.0.0.1"])?;
    let cert_path = dir.join("demo-cert.pem");
    let key_path = dir.join("demo-key.pem");
    std::fs::write(&cert_path, cert).map_err(write_err)?;
    std::fs::write(&key_path, key).map_err(write_err)?;
    let text = DEMO_TOML
        .replace("@CERT@", &cert_path.display().to_string())
        .replace("@KEY@", &key_path.display().to_string())
        .replace("@HTTPS@", &https.to_string())
        .replace("@ADMIN@", &admin.to_string())
        .replace("@UPSTREAM@", &upstream.to_string());
    // A small embedding model over the catalog's ids (1..=48; row 0 is unused) for the
    // scoring endpoint.
    let mut spec = crate::scoring::SampleSpec::embedding(49, 32, 42);
    spec.name = "demo-recs".into();
    spec.n_users = 100;
    let model_path = dir.join("demo-recs.safetensors");
    std::fs::write(&model_path, crate::scoring::sample_model(&spec)).map_err(write_err)?;
    let mut next = crate::scoring::SampleSpec::embedding(49, 32, 43);
    next.name = "demo-recs-next".into();
    next.n_users = 100;
    let next_path = dir.join("demo-recs-next.safetensors");
    std::fs::write(&next_path, crate::scoring::sample_model(&next)).map_err(write_err)?;
    // The key that signs the demo's attribution tokens: fresh each start.
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| write_err(std::io::Error::other(e.to_string())))?;
    let key_path = dir.join("demo-feedback.key");
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&key_path, hex).map_err(write_err)?;
    let text = text
        .replace("@MODEL@", &model_path.display().to_string())
        .replace("@MODEL_NEXT@", &next_path.display().to_string())
        .replace("@FEEDBACK_KEY@", &key_path.display().to_string());
    let plugins = plugins_dir.filter(|d| {
        DEMO_PLUGINS
            .iter()
            .all(|p| d.join(format!("{p}.wasm")).is_file())
    });
    let text = match plugins {
        Some(d) => {
            let mut tables = String::new();
            for p in DEMO_PLUGINS {
                tables.push_str(&format!(
                    "[[plugins]]\nname = \"{p}\"\npath = \"{}\"\n",
                    d.join(format!("{p}.wasm")).display()
                ));
                if p == "storefront" {
                    // Re-rank recommendations with the demo's model.
                    tables.push_str("config = { model = \"recs\" }\n");
                }
                if p == "ratelimit" {
                    tables.push_str("config = { requests_per_second = 50.0, burst = 100 }\n");
                }
            }
            text.replace(
                "@ROUTE_PLUGINS@",
                "plugins = [\"hygiene\", \"ratelimit\", \"storefront\"]\nplugin_body_access = true",
            )
            .replace("@PLUGINS@", &tables)
        }
        None => text.replace("@ROUTE_PLUGINS@", "").replace("@PLUGINS@", ""),
    };
    Ok(Config::from_toml(&text, "<embedded demo config>", dir)?)
}

/// Starts the sample storefront on `addr`; it serves until the runtime stops.
pub async fn start_storefront(addr: SocketAddr) -> Result<SocketAddr, DemoError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(DemoError::Storefront)?;
    let local = listener.local_addr().map_err(DemoError::Storefront)?;
    tokio::spawn(async move {
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let builder = builder.clone();
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(storefront(&req))
                });
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(local)
}

const ADJECTIVES: [&str; 8] = [
    "classic", "trail", "linen", "wool", "leather", "canvas", "merino", "suede",
];
const ITEMS: [(&str, &str); 6] = [
    ("sneaker", "shoes"),
    ("boot", "shoes"),
    ("shirt", "tops"),
    ("jacket", "outerwear"),
    ("backpack", "bags"),
    ("cap", "accessories"),
];

/// The sample catalog: 48 products, the same every run.
pub fn catalog() -> Vec<Value> {
    let mut products = Vec::new();
    for (i, adj) in ADJECTIVES.iter().enumerate() {
        for (j, (item, category)) in ITEMS.iter().enumerate() {
            let id = i * ITEMS.len() + j + 1;
            products.push(json!({
                "id": id,
                "name": format!("{adj} {item}"),
                "category": category,
                "price_cents": 1500 + (id * 737) % 9000,
                "tags": [adj, item, category],
            }));
        }
    }
    products
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

fn json_response(status: StatusCode, v: Value) -> Response<ProxyBody> {
    crate::http_util::json_response(status, &v)
}

/// The storefront's answer to one request.
pub fn storefront(req: &Request<Incoming>) -> Response<ProxyBody> {
    let path = req.uri().path();
    let query = req.uri().query();
    let limit = query_param(query, "limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(10)
        .min(48);
    match path {
        "/healthz" => json_response(StatusCode::OK, json!({"status": "ok"})),
        "/" => json_response(
            StatusCode::OK,
            json!({
                "shop": "demo storefront",
                "endpoints": ["/api/products", "/api/products/{id}", "/api/search?q=boot", "/api/recommendations?user=42"],
            }),
        ),
        "/api/products" => json_response(StatusCode::OK, json!({"products": catalog()})),
        "/api/search" => {
            let q = query_param(query, "q").unwrap_or("").to_ascii_lowercase();
            let terms: Vec<&str> = q.split(['+', ' ', ',']).filter(|t| !t.is_empty()).collect();
            let mut hits: Vec<(usize, Value)> = catalog()
                .into_iter()
                .filter_map(|p| {
                    let text = format!("{} {}", p["name"], p["category"]);
                    let score = terms.iter().filter(|t| text.contains(**t)).count();
                    (score > 0).then_some((score, p))
                })
                .collect();
            hits.sort_by_key(|h| std::cmp::Reverse(h.0));
            let results: Vec<Value> = hits
                .into_iter()
                .take(limit)
                .map(|(score, mut p)| {
                    p["score"] = json!(score as f64 / terms.len().max(1) as f64);
                    p
                })
                .collect();
            json_response(StatusCode::OK, json!({"query": q, "results": results}))
        }
        "/api/recommendations" => {
            let user = query_param(query, "user").unwrap_or("anonymous");
            let seed = fnv1a(user);
            let mut products = catalog();
            products.sort_by_key(|p| fnv1a(&format!("{seed}:{}", p["id"])));
            let recs: Vec<Value> = products
                .into_iter()
                .take(limit)
                .enumerate()
                .map(|(rank, mut p)| {
                    p["score"] = json!(1.0 - rank as f64 / 50.0);
                    p
                })
                .collect();
            json_response(
                StatusCode::OK,
                json!({"user": user, "recommendations": recs}),
            )
        }
        p if p.starts_with("/api/products/") => {
            let id = p["/api/products/".len()..].parse::<usize>().ok();
            match id.and_then(|id| catalog().into_iter().find(|p| p["id"] == json!(id))) {
                Some(product) => json_response(StatusCode::OK, product),
                None => json_response(StatusCode::NOT_FOUND, json!({"error": "no such product"})),
            }
        }
        _ => json_response(StatusCode::NOT_FOUND, json!({"error": "not found"})),
    }
}
