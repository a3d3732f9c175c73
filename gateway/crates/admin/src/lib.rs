//! The admin listener: `/metrics`, `/healthz` and `/readyz` for monitoring, the status page
//! (`/`, which renders `/status.json`; the `page` module), and the admin API under
//! `/admin/`, which needs the bearer token from `[admin]` (compared in constant time;
//! without a configured token it is disabled, and the listener may only bind to loopback).
//!
//! - `GET /admin/status`: routes, plugins and models with their versions, the last reload;
//! - `GET /admin/config`: the configuration file that serves, as written (JSON);
//! - `POST /admin/reload`, `GET /admin/reload`: reload the config file; the last outcome;
//! - `POST /admin/models/{name}/rollback[?version=V]`: make an earlier model version live.
//! - `GET /admin/plugins`, `GET /admin/models`: uploaded versions, which is active, who uses it;
//! - `PUT /admin/plugins/{name}`, `PUT /admin/models/{name}` (body: the file): validate,
//!   compile/load and warm it, store it durably, then activate it atomically — or answer 422
//!   and change nothing;
//! - `POST /admin/plugins/{name}/rollback[?version=SHA-PREFIX]`: activate an earlier upload;
//! - `DELETE /admin/plugins/{name}`, `DELETE /admin/models/{name}`: forget the uploads of a
//!   name no route or endpoint uses (the config file's path applies again).
//!
//! Every mutating call is logged with the token's id (a hash prefix, never the token).

//!
//! The handlers drive the gateway through the narrow [`Control`] trait, which the binary
//! implements; this crate depends on config, store, scoring and the proxy's types, never on
//! the binary.

// The checks of a call return the refusal itself (a ready response) as their error: refusals
// are rare and answered at once, so boxing them would buy nothing.
#![allow(clippy::result_large_err)]

// The crates below, under the names the handlers use.
use gateway_config as config;
use gateway_proxy as proxy;
use gateway_scoring as scoring;
use gateway_store as store;

pub mod api;
mod control;
mod hints;
mod page;
pub use control::{
    Activated, ArtifactError, Control, LiveSince, Observations, PluginStatus, ReloadRefused,
    ReloadReport, RolloutRefused, RouteSeries, Target,
};

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::proxy::http_util;
use crate::proxy::upstream::{full_body, ProxyBody};
use crate::store::{Kind, Store};

/// Accepts admin connections until `shutdown`.
pub async fn serve<C: Control>(
    listener: TcpListener,
    registry: Registry,
    ctx: Arc<C>,
    draining: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let builder = Arc::new({
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10));
        b
    });
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue; }
            },
            _ = shutdown.cancelled() => return,
        };
        let (registry, ctx, draining, builder, shutdown) = (
            registry.clone(),
            ctx.clone(),
            draining.clone(),
            builder.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let (registry, ctx, draining) = (registry.clone(), ctx.clone(), draining.clone());
                async move {
                    Ok::<_, Infallible>(respond(req, &registry, ctx.as_ref(), &draining).await)
                }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => { conn.as_mut().graceful_shutdown(); let _ = conn.await; }
            }
        });
    }
}

fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut r = Response::new(full_body(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<ProxyBody> {
    http_util::json_response(status, &value)
}

/// A 200 answer with one of the [`api`] types.
fn typed_response(answer: &impl serde::Serialize) -> Response<ProxyBody> {
    json_response(
        StatusCode::OK,
        serde_json::to_value(answer).expect("admin answers serialize"),
    )
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<ProxyBody> {
    let answer = api::ErrorAnswer {
        error: message.to_string(),
    };
    json_response(
        status,
        serde_json::to_value(answer).expect("admin answers serialize"),
    )
}

async fn respond(
    req: Request<Incoming>,
    registry: &Registry,
    ctx: &impl Control,
    draining: &AtomicBool,
) -> Response<ProxyBody> {
    let path = req.uri().path().to_string();
    if let Some(rest) = path.strip_prefix("/admin/") {
        return admin_api(req, rest, ctx, registry).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
    }
    match path.as_str() {
        "/metrics" => {
            let mut buf = String::new();
            if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut buf)
            {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding metrics failed: {e}\n"),
                );
            }
            let mut r = text(StatusCode::OK, buf);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/" | "/status" => page::page(),
        "/status.json" => page::overview_response(ctx, registry),
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            if draining.load(Ordering::SeqCst) {
                return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into());
            }
            let snapshot = ctx.snapshot();
            let mut body = String::from("ready\n");
            let mut models: Vec<_> = snapshot.models.values().collect();
            models.sort_by(|a, b| a.name.cmp(&b.name));
            for slot in models {
                let live = slot.live();
                body.push_str(&format!(
                    "model {}: version {} ({} tables) on {:?}\n",
                    slot.name,
                    live.version,
                    live.model.table_storage(),
                    live.model.execution_path()
                ));
            }
            for pool in &snapshot.pools {
                let (up, all) = pool.availability();
                body.push_str(&format!(
                    "upstream {}: {up}/{all} backends available\n",
                    pool.name()
                ));
            }
            text(StatusCode::OK, body)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "admin endpoints: / (status page) /status.json /metrics /healthz /readyz /admin/...\n"
                .into(),
        ),
    }
}

/// Checks the bearer token; returns the caller's token id.
fn authenticate(
    req: &Request<Incoming>,
    ctx: &impl Control,
) -> Result<String, Response<ProxyBody>> {
    let snapshot = ctx.snapshot();
    let Some(token) = &snapshot.config.admin.token else {
        return Err(error(
            StatusCode::FORBIDDEN,
            "the admin API is disabled: set token_file or token_env in [admin]",
        ));
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    if token.matches(presented) {
        Ok(token.id.clone())
    } else {
        let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        Err(r)
    }
}

/// Audit entries `GET /admin/audit` returns without `?limit=`: the newest this many.
const AUDIT_DEFAULT_LIMIT: usize = 1000;

/// What a management call is, for the audit trail: its action and target.
fn audited(method: &Method, segments: &[&str]) -> Option<(String, String)> {
    let one = |kind: &str| kind.trim_end_matches('s').to_string();
    match (method, segments) {
        (&Method::PUT, [kind @ ("plugins" | "models"), name]) => {
            Some(("upload".into(), format!("{}/{name}", one(kind))))
        }
        (&Method::POST, [kind @ ("plugins" | "models"), name, "rollback"]) => {
            Some(("rollback".into(), format!("{}/{name}", one(kind))))
        }
        (&Method::DELETE, [kind @ ("plugins" | "models"), name]) => {
            Some(("delete".into(), format!("{}/{name}", one(kind))))
        }
        (&Method::POST, ["rollouts", name, command]) => {
            Some((format!("rollout_{command}"), format!("experiment/{name}")))
        }
        _ => None,
    }
}

async fn admin_api(
    req: Request<Incoming>,
    rest: &str,
    ctx: &impl Control,
    registry: &Registry,
) -> Response<ProxyBody> {
    let who = match authenticate(&req, ctx) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let method = req.method().clone();
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let audit = audited(&method, &segments);
    let response = dispatch(req, ctx, registry, &who, &method, &segments).await;
    if let Some((action, target)) = audit {
        let status = response.status();
        ctx.audit(crate::store::audit::Action {
            actor: who,
            action,
            target,
            outcome: format!(
                "{} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            ),
        })
        .await;
    }
    response
}

async fn dispatch(
    req: Request<Incoming>,
    ctx: &impl Control,
    registry: &Registry,
    who: &str,
    method: &Method,
    segments: &[&str],
) -> Response<ProxyBody> {
    let who = who.to_string();
    let method = method.clone();
    match (method.clone(), segments) {
        (Method::GET, ["status"]) => typed_response(&status(ctx, registry)),
        (Method::GET, ["hints"]) => typed_response(&api::Hints {
            hints: hints::hints(registry, &ctx.snapshot()),
        }),
        (Method::GET, ["config"]) => {
            let snapshot = ctx.snapshot();
            let source = snapshot.config.source.as_deref();
            typed_response(&api::ConfigAnswer {
                file: source.map(|s| s.file.clone()),
                generation: snapshot.generation,
                toml: source.map(|s| s.text.clone()),
            })
        }
        (Method::GET, ["reload"]) => {
            typed_response(&api::LastReloadAnswer {
                last_reload: last_reload(ctx),
            })
        }
        (Method::POST, ["reload"]) => {
            tracing::info!(target: "admin", token = %who, "reload requested");
            match ctx.reload_from_file(&who).await {
                Ok(()) => typed_response(&api::Reloaded {
                    reloaded: true,
                    status: status(ctx, registry),
                }),
                Err(e @ ReloadRefused::NoFile(_)) => error(StatusCode::CONFLICT, e),
                Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
            }
        }
        (Method::POST, ["models", name, "rollback"]) => {
            let version = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("version=")));
            // A model deployed by upload rolls back through the store, so the rollback
            // survives a restart; otherwise through the versions held in memory.
            let version = version.map(str::to_string);
            rollback(ctx, Kind::Model, name, version.as_deref(), &who).await
        }
        (Method::GET, [kind @ ("plugins" | "models")]) => artifacts(ctx, kind_of(kind)),
        (Method::PUT, [kind @ ("plugins" | "models"), name]) => {
            upload(req, ctx, kind_of(kind), name, &who).await
        }
        (Method::POST, ["plugins", name, "rollback"]) => {
            let version = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("version=")))
                .map(str::to_string);
            rollback(ctx, Kind::Plugin, name, version.as_deref(), &who).await
        }
        (Method::DELETE, [kind @ ("plugins" | "models"), name]) => {
            forget(ctx, kind_of(kind), name, &who).await
        }
        (Method::GET, ["audit"]) => {
            let limit = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("limit=")))
                .map(str::parse::<usize>);
            let limit = match limit {
                None => AUDIT_DEFAULT_LIMIT,
                Some(Ok(n)) if n > 0 => n,
                Some(_) => {
                    return error(StatusCode::BAD_REQUEST, "limit must be a positive integer")
                }
            };
            match ctx.audit_entries().await {
                Ok(mut entries) => {
                    // The newest `limit`, oldest first.
                    let keep = entries.len().min(limit);
                    entries.drain(..entries.len() - keep);
                    typed_response(&api::Audit { entries })
                }
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
            }
        }
        (Method::GET, ["rollouts"]) => {
            let snapshot = ctx.snapshot();
            let now = crate::proxy::experiment::now_ms();
            typed_response(&api::Rollouts {
                experiments: snapshot
                    .experiments
                    .iter()
                    .map(|e| serde_json::to_value(e.status(now)).expect("status serializes"))
                    .collect(),
            })
        }
        (Method::POST, ["rollouts", name, action]) => {
            use crate::proxy::experiment::Command;
            let command = match *action {
                "pause" => Command::Pause,
                "resume" => Command::Resume,
                "promote" => Command::Promote,
                "abort" => Command::Abort,
                other => {
                    return error(
                        StatusCode::NOT_FOUND,
                        format!("unknown rollout command {other:?}; use pause, resume, promote or abort"),
                    )
                }
            };
            tracing::info!(target: "admin", token = %who, experiment = %name, command = %action, "rollout command");
            match ctx.rollout_command(name, command).await {
                Ok(decision) => typed_response(&api::RolloutCommanded {
                    experiment: name.to_string(),
                    decision: serde_json::to_value(decision).expect("decisions serialize"),
                }),
                Err(e @ RolloutRefused::NoExperiment(_)) => error(StatusCode::NOT_FOUND, e),
                Err(e) => error(StatusCode::CONFLICT, e),
            }
        }
        (_, ["rollouts" | "audit"]) | (_, ["rollouts", _, _]) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed here"),
        ),
        (_, ["status" | "config" | "reload" | "plugins" | "models" | "hints"])
        | (_, ["plugins" | "models", _])
        | (_, ["plugins" | "models", _, "rollback"]) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed here"),
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "admin API: GET status, GET config, GET|POST reload, GET plugins|models, PUT|DELETE plugins|models/{name}, POST plugins|models/{name}/rollback, GET rollouts, POST rollouts/{experiment}/pause|resume|promote|abort, GET audit, GET hints",
        ),
    }
}

fn last_reload(ctx: &impl Control) -> Option<api::LastReload> {
    ctx.last_reload().map(|r| api::LastReload {
        at_unix_ms: r
            .at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        ok: r.error.is_none(),
        error: r.error,
    })
}

fn status(ctx: &impl Control, registry: &Registry) -> api::Status {
    let snapshot = ctx.snapshot();
    let plugins = ctx.plugins(&snapshot);
    let mut models: Vec<_> = snapshot
        .models
        .values()
        .map(|slot| {
            let live = slot.live();
            api::ModelStatus {
                name: slot.name.clone(),
                version: live.version.clone(),
                kind: live.model.info().kind.to_string(),
                device: format!("{:?}", live.model.execution_path()),
                storage: live.model.table_storage().to_string(),
                held_bytes: live.model.held_bytes(),
                history: slot.history(),
            }
        })
        .collect();
    models.sort_by(|a, b| a.name.cmp(&b.name));
    let routes = snapshot
        .config
        .routes
        .iter()
        .map(|r| api::RouteStatus {
            name: r.name.clone(),
            upstream: snapshot.config.upstreams[r.upstream].name.clone(),
            plugins: r
                .plugins
                .iter()
                .map(|&i| snapshot.config.plugins[i].name.clone())
                .collect(),
        })
        .collect();
    let sources = sources(&snapshot.config);
    api::Status {
        hints: hints::hints(registry, &snapshot),
        routes,
        sources,
        plugins,
        models,
        last_reload: last_reload(ctx),
    }
}

fn kind_of(segment: &str) -> Kind {
    if segment == "plugins" {
        Kind::Plugin
    } else {
        Kind::Model
    }
}

/// Uploads, rollbacks and forgets are applied one at a time across the gateways of a process
/// (which may share a store); each takes this before its gateway's reload lock.
static UPLOADS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn open_store(ctx: &impl Control) -> Result<Store, Response<ProxyBody>> {
    let dir = ctx.snapshot().config.store_dir.clone();
    let Some(dir) = dir else {
        return Err(error(
            StatusCode::CONFLICT,
            "uploads need a [store] dir in the config",
        ));
    };
    Store::open(&dir).map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e))
}

/// Which routes (plugins) or whether the endpoint (models) uses a name.
fn users(config: &crate::config::Config, kind: Kind, name: &str) -> Vec<String> {
    match kind {
        Kind::Plugin => match config.plugins.iter().position(|p| p.name == name) {
            Some(i) => config
                .routes
                .iter()
                .filter(|r| r.plugins.contains(&i))
                .map(|r| r.name.clone())
                .collect(),
            None => Vec::new(),
        },
        Kind::Model => {
            if config.models.iter().any(|m| m.name == name) {
                vec![config.scoring.endpoint_prefix.clone()]
            } else {
                Vec::new()
            }
        }
    }
}

fn artifacts(ctx: &impl Control, kind: Kind) -> Response<ProxyBody> {
    let store = match open_store(ctx) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let manifest = match store.manifest() {
        Ok(m) => m,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let config = ctx.snapshot().config.clone();
    let list: Vec<_> = manifest
        .entries(kind)
        .iter()
        .map(|(name, e)| api::Artifact {
            name: name.clone(),
            active: e.active.clone(),
            versions: e.versions.clone(),
            used_by: users(&config, kind, name),
        })
        .collect();
    typed_response(&api::Artifacts { artifacts: list })
}

/// The answer to an upload, rollback or forget that changed nothing.
fn refused(e: ArtifactError) -> Response<ProxyBody> {
    let status = match &e {
        ArtifactError::NoStore
        | ArtifactError::NothingToRollBackTo(_)
        | ArtifactError::InUse { .. } => StatusCode::CONFLICT,
        ArtifactError::NotConfigured(_) | ArtifactError::NoUploads(_) => StatusCode::NOT_FOUND,
        ArtifactError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        ArtifactError::Rejected(_) => StatusCode::UNPROCESSABLE_ENTITY,
    };
    error(status, e)
}

/// The plugins and models the configuration pulls from an OCI registry, with what serves.
pub(crate) fn sources(config: &config::Config) -> Vec<api::SourceStatus> {
    config
        .plugins
        .iter()
        .map(|p| ("plugin", &p.name, &p.oci))
        .chain(config.models.iter().map(|m| ("model", &m.name, &m.oci)))
        .filter_map(|(kind, name, oci)| {
            let o = oci.as_ref()?;
            Some(api::SourceStatus {
                kind: kind.to_string(),
                name: name.clone(),
                reference: o.reference.to_string(),
                digest: o.resolved.clone(),
                resolve_interval_s: o.resolve_interval.as_secs(),
            })
        })
        .collect()
}

async fn upload(
    req: Request<Incoming>,
    ctx: &impl Control,
    kind: Kind,
    name: &str,
    who: &str,
) -> Response<ProxyBody> {
    use http_body_util::BodyExt;
    let store = match open_store(ctx) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let config = ctx.snapshot().config.clone();
    let configured = match kind {
        Kind::Plugin => config.plugins.iter().any(|p| p.name == name),
        Kind::Model => config.models.iter().any(|m| m.name == name),
    };
    if !configured {
        return error(
            StatusCode::NOT_FOUND,
            format!("{name:?} is not in the config; add its [[plugins]] or [[models]] entry first"),
        );
    }
    if let Err(r) = upload_allowed(ctx.recent_uploads(), config.admin.max_uploads_per_minute) {
        return r;
    }
    // The signature's form is checked before a byte of the body is read.
    let signature = match parse_signature(&config, req.headers().get("x-signature")) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let limit = config.admin.max_upload_bytes;
    // Streamed to the store while it is hashed and its signature checked, so an upload of
    // any size costs a few buffers of memory.
    let verifiers: Vec<_> = match &signature {
        Some(sig) => config
            .trusted_keys
            .iter()
            .filter_map(|k| k.verify_stream(sig).ok())
            .collect(),
        None => Vec::new(),
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let writer = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            let mut staged = store.stage(kind)?;
            let mut verifiers = verifiers;
            while let Some(chunk) = rx.blocking_recv() {
                staged.write(&chunk)?;
                for v in &mut verifiers {
                    v.update(&chunk);
                }
            }
            Ok::<_, store::StoreError>((staged, verifiers))
        })
    };
    let mut body = req.into_body();
    let mut received = 0u64;
    let read = loop {
        let Some(frame) = body.frame().await else {
            break Ok(());
        };
        let Ok(data) = frame.map(|f| f.into_data()) else {
            break Err(error(
                StatusCode::BAD_REQUEST,
                "the upload was cut off before its end",
            ));
        };
        let Ok(data) = data else { continue };
        received += data.len() as u64;
        if received > limit {
            break Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("uploads are limited to {limit} bytes"),
            ));
        }
        // A closed channel means the writer failed: its error is the answer.
        if tx.send(data).await.is_err() {
            break Ok(());
        }
    };
    drop(tx);
    // An early answer drops the staged file with the writer.
    let written = writer.await;
    if let Err(r) = read {
        return r;
    }
    let (staged, verifiers) = match written {
        Ok(Ok(w)) => w,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    if staged.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "the body must be the file to upload",
        );
    }
    // Integrity first: nothing is stored unless the content is the pinned one and carries a
    // valid signature when signatures are required.
    let pin = match kind {
        Kind::Plugin => config
            .plugins
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.sha256.clone()),
        Kind::Model => config
            .models
            .iter()
            .find(|m| m.name == name)
            .and_then(|m| m.sha256.clone()),
    };
    let found = staged.sha256();
    if let Some(expected) = pin.filter(|p| *p != found) {
        return error(
            StatusCode::CONFLICT,
            format!("{name:?} is pinned to SHA-256 {expected}; this upload is {found}"),
        );
    }
    if signature.is_some()
        && !verifiers
            .into_iter()
            .any(|v| v.finalize_and_verify().is_ok())
    {
        tracing::warn!(target: "admin", token = %who, name, "upload refused: signature");
        return error(
            StatusCode::FORBIDDEN,
            "x-signature does not verify with any trusted key",
        );
    }
    let _one_at_a_time = UPLOADS.lock().await;
    let size = staged.len();
    let put = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.commit(staged)).await
    };
    let (sha, created) = match put {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    // Load, validate and warm it in a full reload that records it active before it serves.
    if let Err(e) = ctx.activate(kind, name, Target::Upload(sha.clone())).await {
        tracing::warn!(target: "admin", token = %who, name, sha256 = %sha, error = %e, "upload rejected");
        // Leave the store as it was: a blob this upload created goes again.
        if created {
            let blob = store.blob_path(kind, &sha);
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(blob)).await;
        }
        return refused(e);
    }
    tracing::info!(target: "admin", token = %who, name, sha256 = %sha, bytes = size, "upload activated");
    typed_response(&api::Activated::new(name, &sha))
}

async fn rollback(
    ctx: &impl Control,
    kind: Kind,
    name: &str,
    version: Option<&str>,
    who: &str,
) -> Response<ProxyBody> {
    let _one_at_a_time = UPLOADS.lock().await;
    match ctx.activate(kind, name, Target::Rollback(version)).await {
        Ok(Activated::Stored(target)) => {
            tracing::info!(target: "admin", token = %who, name, sha256 = %target, "rolled back");
            typed_response(&api::Activated::new(name, &target))
        }
        Ok(Activated::Held { version, slot }) => {
            tracing::info!(target: "admin", token = %who, model = %name, version = %version, "model rolled back");
            typed_response(&api::ModelRolledBack {
                model: name.to_string(),
                version,
                history: slot.history(),
            })
        }
        Err(e) => refused(e),
    }
}

async fn forget(ctx: &impl Control, kind: Kind, name: &str, who: &str) -> Response<ProxyBody> {
    let _one_at_a_time = UPLOADS.lock().await;
    match ctx
        .forget(kind, name, |config| users(config, kind, name))
        .await
    {
        Ok(()) => {
            tracing::info!(target: "admin", token = %who, name, "uploads forgotten");
            typed_response(&api::Removed {
                removed: name.to_string(),
            })
        }
        Err(e) => refused(e),
    }
}

/// Accepts at most `per_minute` uploads in any sliding minute; `recent` holds the times of
/// this gateway's accepted uploads.
fn upload_allowed(
    recent: &std::sync::Mutex<std::collections::VecDeque<std::time::Instant>>,
    per_minute: u32,
) -> Result<(), Response<ProxyBody>> {
    let mut recent = recent.lock().unwrap_or_else(|e| e.into_inner());
    let now = std::time::Instant::now();
    while recent
        .front()
        .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
    {
        recent.pop_front();
    }
    if recent.len() >= per_minute as usize {
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            format!("at most {per_minute} uploads per minute"),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
        return Err(r);
    }
    recent.push_back(now);
    Ok(())
}

/// Reads `x-signature` (hex Ed25519 over the body): `None` when absent and not required.
/// Verification happens as the body streams in.
// A refusal is rare and answered at once: not worth boxing.
#[allow(clippy::result_large_err)]
fn parse_signature(
    config: &crate::config::Config,
    signature: Option<&HeaderValue>,
) -> Result<Option<ed25519_dalek::Signature>, Response<ProxyBody>> {
    let Some(sig) = signature else {
        if config.require_signatures {
            return Err(error(
                StatusCode::FORBIDDEN,
                "uploads must carry x-signature: an Ed25519 signature of the body, in hex",
            ));
        }
        return Ok(None);
    };
    std::str::from_utf8(sig.as_bytes())
        .ok()
        .and_then(crate::config::decode_hex)
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .map(|b| Some(ed25519_dalek::Signature::from_bytes(&b)))
        .ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "x-signature must be 128 hex digits",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_limited_per_sliding_minute() {
        let recent = std::sync::Mutex::new(std::collections::VecDeque::new());
        assert!(upload_allowed(&recent, 2).is_ok());
        assert!(upload_allowed(&recent, 2).is_ok());
        let refused = upload_allowed(&recent, 2).unwrap_err();
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.headers()[header::RETRY_AFTER], "60");
        // Uploads older than a minute no longer count.
        let old = std::time::Instant::now() - Duration::from_secs(61);
        recent.lock().unwrap().iter_mut().for_each(|t| *t = old);
        assert!(upload_allowed(&recent, 2).is_ok());
        assert_eq!(recent.lock().unwrap().len(), 1);
    }

    #[test]
    fn path_segments_name_the_artifact_kind() {
        assert_eq!(kind_of("plugins"), Kind::Plugin);
        assert_eq!(kind_of("models"), Kind::Model);
    }
}
