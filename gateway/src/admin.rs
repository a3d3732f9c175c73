//! The admin listener: `/metrics`, `/healthz` and `/readyz` for monitoring, and the admin API
//! under `/admin/`, which needs the bearer token from `[admin]` (compared in constant time;
//! without a configured token it is disabled, and the listener may only bind to loopback).
//!
//! - `GET /admin/status`: routes, plugins and models with their versions, the last reload;
//! - `GET /admin/config`: the effective configuration;
//! - `POST /admin/reload`, `GET /admin/reload`: reload the config file; the last outcome;
//! - `POST /admin/models/{name}/rollback[?version=V]`: make an earlier model version live.
//!
//! Every mutating call is logged with the token's id (a hash prefix, never the token).

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
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server::ServeCtx;
use crate::upstream::{full_body, ProxyBody};

/// Accepts admin connections until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    registry: Registry,
    ctx: Arc<ServeCtx>,
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
                async move { Ok::<_, Infallible>(respond(req, &registry, &ctx, &draining).await) }
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
    let mut r = Response::new(full_body(Bytes::from(format!("{value:#}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<ProxyBody> {
    json_response(status, json!({ "error": message.to_string() }))
}

async fn respond(
    req: Request<Incoming>,
    registry: &Registry,
    ctx: &ServeCtx,
    draining: &AtomicBool,
) -> Response<ProxyBody> {
    let path = req.uri().path().to_string();
    if let Some(rest) = path.strip_prefix("/admin/") {
        return admin_api(req, rest, ctx).await;
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
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            if draining.load(Ordering::SeqCst) {
                return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into());
            }
            let snapshot = ctx.shared.state.load();
            let mut body = String::from("ready\n");
            let mut models: Vec<_> = snapshot.models.values().collect();
            models.sort_by(|a, b| a.name.cmp(&b.name));
            for slot in models {
                let live = slot.live();
                body.push_str(&format!(
                    "model {}: version {} on {:?}\n",
                    slot.name,
                    live.version,
                    live.model.execution_path()
                ));
            }
            for pool in &snapshot.pools {
                let up = pool
                    .backends
                    .iter()
                    .filter(|b| pool.is_available(b))
                    .count();
                body.push_str(&format!(
                    "upstream {}: {up}/{} backends available\n",
                    pool.spec.name,
                    pool.backends.len()
                ));
            }
            text(StatusCode::OK, body)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "admin endpoints: /metrics /healthz /readyz /admin/...\n".into(),
        ),
    }
}

/// Checks the bearer token; returns the caller's token id.
fn authenticate(req: &Request<Incoming>, ctx: &ServeCtx) -> Result<String, Response<ProxyBody>> {
    let snapshot = ctx.shared.state.load();
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

async fn admin_api(req: Request<Incoming>, rest: &str, ctx: &ServeCtx) -> Response<ProxyBody> {
    let who = match authenticate(&req, ctx) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let method = req.method().clone();
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    match (method.clone(), segments.as_slice()) {
        (Method::GET, ["status"]) => json_response(StatusCode::OK, status(ctx)),
        (Method::GET, ["config"]) => text(
            StatusCode::OK,
            format!("{:#?}\n", ctx.shared.state.load().config),
        ),
        (Method::GET, ["reload"]) => {
            json_response(StatusCode::OK, json!({ "last_reload": last_reload(ctx) }))
        }
        (Method::POST, ["reload"]) => {
            tracing::info!(target: "admin", token = %who, "reload requested");
            match ctx.reload_from_file().await {
                Ok(()) => json_response(
                    StatusCode::OK,
                    json!({ "reloaded": true, "status": status(ctx) }),
                ),
                Err(e @ crate::server::ReloadError::NoFile) => error(StatusCode::CONFLICT, e),
                Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
            }
        }
        (Method::POST, ["models", name, "rollback"]) => {
            let version = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("version=")));
            let slot = ctx.shared.state.load().models.get(*name).cloned();
            let Some(slot) = slot else {
                return error(StatusCode::NOT_FOUND, format!("no model named {name:?}"));
            };
            match slot.rollback(version) {
                Ok(v) => {
                    tracing::info!(target: "admin", token = %who, model = %name, version = %v, "model rolled back");
                    json_response(
                        StatusCode::OK,
                        json!({ "model": name, "version": v, "history": slot.history() }),
                    )
                }
                Err(e) => error(StatusCode::CONFLICT, e),
            }
        }
        (_, ["status" | "config" | "reload"]) | (_, ["models", _, "rollback"]) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed here"),
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "admin API: GET status, GET config, GET|POST reload, POST models/{name}/rollback",
        ),
    }
}

fn last_reload(ctx: &ServeCtx) -> serde_json::Value {
    match ctx.last_reload.lock().expect("reload report lock").as_ref() {
        None => serde_json::Value::Null,
        Some(r) => json!({
            "at_unix_ms": r.at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            "ok": r.error.is_none(),
            "error": r.error,
        }),
    }
}

fn status(ctx: &ServeCtx) -> serde_json::Value {
    let snapshot = ctx.shared.state.load();
    let plugins: Vec<_> = snapshot
        .plugins()
        .into_iter()
        .flatten()
        .map(|p| json!({ "name": p.name, "version": p.version, "idle_instances": p.idle_instances() }))
        .collect();
    let mut models: Vec<_> = snapshot
        .models
        .values()
        .map(|slot| {
            let live = slot.live();
            json!({
                "name": slot.name,
                "version": live.version,
                "kind": live.model.info().kind.to_string(),
                "device": format!("{:?}", live.model.execution_path()),
                "history": slot.history(),
            })
        })
        .collect();
    models.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    let routes: Vec<_> = snapshot
        .config
        .routes
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "upstream": snapshot.config.upstreams[r.upstream].name,
                "plugins": r.plugins.iter().map(|&i| snapshot.config.plugins[i].name.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "routes": routes, "plugins": plugins, "models": models, "last_reload": last_reload(ctx) })
}
