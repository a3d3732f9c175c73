//! The request path: route, forward with retries, answer errors; and the live state it reads.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus::{Histogram, IntCounter};

use crate::config::{Config, ExperimentSpec, HostPattern, RouteSpec};
use crate::deadline::TimerPool;
use crate::experiment::{Assignment, Experiment};
use crate::http_util::{
    self, BodyLimitError, BodyProgress, BodyState, LimitedBody, RequestAuthority,
};
use crate::metrics::Metrics;
use gateway_rollout::{Attribution, Keyring};
use std::collections::HashMap;

use crate::hooks::{BoundHooks, Ranker, RequestOutcome, RequestState, ResponseState, RouteHooks};
use crate::retry::{Failure, RetryPolicy};
use crate::scoring::serving::ModelSlot;
use crate::upstream::conn::SendError;
use crate::upstream::{empty_body, full_body, Blame, Pool, ProxyBody, UpstreamBody};

/// A variant's own chain (`None`: an empty one) with its `x-plugin-versions`.
type VariantChain = (Option<Arc<dyn RouteHooks>>, Option<HeaderValue>);

/// A route with its per-route series resolved once.
pub struct Route {
    /// Validated settings.
    pub spec: RouteSpec,
    /// The name, shared with plugin calls.
    pub name: Arc<str>,
    /// The hooks (the plugin chain), when the route has some.
    pub chain: Option<Arc<dyn RouteHooks>>,
    /// `name@version,...` of the chain, for `x-plugin-versions`.
    plugin_versions: Option<HeaderValue>,
    /// On a route in an experiment, the chains of the variants that have their own, by
    /// variant index (`None`: the route's chain), each with its `x-plugin-versions`.
    variant_chains: Box<[Option<VariantChain>]>,
    duration: Histogram,
    /// Counters for 1xx..5xx.
    by_class: [IntCounter; 5],
}

impl Route {
    /// The chain a request of `variant` runs: the variant's own, when it has one, else the
    /// route's; with its `x-plugin-versions`.
    pub fn chain_for(
        &self,
        variant: Option<usize>,
    ) -> (Option<&Arc<dyn RouteHooks>>, Option<&HeaderValue>) {
        match variant.and_then(|v| self.variant_chains.get(v)?.as_ref()) {
            Some((chain, versions)) => (chain.as_ref(), versions.as_ref()),
            None => (self.chain.as_ref(), self.plugin_versions.as_ref()),
        }
    }

    /// The variants' own chains, by variant index, for their owner to look into.
    pub fn variant_chains(&self) -> impl Iterator<Item = (usize, &Arc<dyn RouteHooks>)> {
        self.variant_chains
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((i, c.as_ref()?.0.as_ref()?)))
    }
}

/// Chooses a route by host (most specific pattern) then path prefix (longest).
pub struct Router {
    routes: Vec<Route>,
    unmatched: [IntCounter; 5],
    unmatched_duration: Histogram,
    /// The scoring endpoint's series (route label `_scoring`).
    scoring: [IntCounter; 5],
    scoring_duration: Histogram,
}

fn class_counters(metrics: &Metrics, route: &str) -> [IntCounter; 5] {
    ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|c| metrics.requests.with_label_values(&[route, c]))
}

fn class_index(status: StatusCode) -> usize {
    (status.as_u16() / 100).clamp(1, 5) as usize - 1
}

impl Router {
    /// Compiles routes, resolves their series, and binds each route's hooks with `bind`
    /// (the plugin host's chains; `None` for a route without).
    pub fn new(
        routes: &[RouteSpec],
        experiments: &[ExperimentSpec],
        metrics: &Metrics,
        bind: &dyn Fn(&RouteSpec) -> Option<BoundHooks>,
    ) -> Router {
        Router {
            routes: routes
                .iter()
                .map(|spec| {
                    let bound = bind(spec);
                    let variant_chains = spec
                        .experiment
                        .map(|e| {
                            experiments[e]
                                .variants
                                .iter()
                                .map(|v| {
                                    let plugins = v.plugins.clone()?;
                                    let bound = bind(&RouteSpec {
                                        plugins,
                                        ..spec.clone()
                                    });
                                    Some(match bound {
                                        Some(b) => (Some(b.hooks), b.versions),
                                        None => (None, None),
                                    })
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    Route {
                        variant_chains,
                        spec: spec.clone(),
                        name: spec.name.as_str().into(),
                        plugin_versions: bound.as_ref().and_then(|b| b.versions.clone()),
                        chain: bound.map(|b| b.hooks),
                        duration: metrics
                            .request_duration
                            .with_label_values(&[spec.name.as_str()]),
                        by_class: class_counters(metrics, &spec.name),
                    }
                })
                .collect(),
            unmatched: class_counters(metrics, "unmatched"),
            unmatched_duration: metrics.request_duration.with_label_values(&["unmatched"]),
            scoring: class_counters(metrics, "_scoring"),
            scoring_duration: metrics.request_duration.with_label_values(&["_scoring"]),
        }
    }

    /// The routes, in config order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The best route for a host (lower case, no port) and path.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        let mut best: Option<(&Route, usize, usize)> = None;
        for route in &self.routes {
            let prefix = route.spec.path_prefix.as_str();
            if !prefix_matches(prefix, path) {
                continue;
            }
            let host_rank = route
                .spec
                .hosts
                .iter()
                .filter(|p| match host {
                    Some(h) => p.matches(h),
                    None => **p == HostPattern::Any,
                })
                .map(HostPattern::specificity)
                .max();
            let Some(host_rank) = host_rank else { continue };
            let better = match best {
                None => true,
                Some((_, h, p)) => (host_rank, prefix.len()) > (h, p),
            };
            if better {
                best = Some((route, host_rank, prefix.len()));
            }
        }
        best.map(|(r, _, _)| r)
    }
}

/// `/api` matches `/api` and `/api/...`, never `/apix`; `/` matches everything.
pub(crate) fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || (path.starts_with(prefix)
            && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
}

/// Everything a request reads, swapped whole on reload.
pub struct Snapshot {
    /// The configuration this state was built from.
    pub config: Arc<Config>,
    /// Route table.
    pub router: Router,
    /// Pools, indexed like `config.upstreams`.
    pub pools: Vec<Arc<Pool>>,
    /// Served models by name.
    pub models: HashMap<String, Arc<ModelSlot>>,
    /// Counts configurations applied since start (1 for the first).
    pub generation: u64,
    /// The served models as plugins' `ranking` import sees them.
    pub ranker: Option<Arc<dyn Ranker>>,
    /// Experiments, indexed like `config.experiments`.
    pub experiments: Vec<Arc<Experiment>>,
    /// Signs and checks attribution tokens; `None` without `[feedback] key_file`.
    pub keyring: Option<Arc<Keyring>>,
    /// `gateway_feedback_refused_total`, for the feedback endpoint.
    pub(crate) metrics_for_feedback: prometheus::IntCounterVec,
    /// Pseudonyms of client addresses (`[privacy]`).
    pub privacy: Arc<crate::privacy::Pseudonymizer>,
}

impl Snapshot {
    /// The experiment an attribution token's route (`experiment:route`) names.
    pub fn experiment_of_token(&self, route: &str) -> Option<&Experiment> {
        let name = route.split_once(':')?.0;
        self.experiments
            .iter()
            .find(|e| e.spec().name == name)
            .map(|e| &**e)
    }

    /// The first experiment with a variant that serves another model in place of `model`.
    pub fn experiment_of_model(&self, model: &str) -> Option<&Experiment> {
        self.experiments
            .iter()
            .find(|e| {
                e.spec()
                    .variants
                    .iter()
                    .any(|v| v.models.iter().any(|(served, _)| served == model))
            })
            .map(|e| &**e)
    }

    /// Builds the router, binding each route's hooks with `bind`, the pools and the
    /// experiments. A pool whose settings did not change is carried over from `previous` with
    /// its connections and health state (new ones start their health checks); so is an
    /// experiment, with its figures and rollout, and a changed one continues them while it
    /// splits the same variants under the same plan ([`Experiment::carry_over`]). A new
    /// experiment with a rollout resumes the one `resumed` holds under its name, when it
    /// judges the same variants under the same plan.
    pub fn build(
        config: Arc<Config>,
        metrics: &Metrics,
        bind: &dyn Fn(&RouteSpec) -> Option<BoundHooks>,
        previous: Option<&Snapshot>,
        resumed: &HashMap<String, gateway_rollout::Rollout>,
    ) -> Snapshot {
        let pools = config
            .upstreams
            .iter()
            .map(|u| {
                previous
                    .and_then(|p| p.pools.iter().find(|old| old.spec == *u))
                    .cloned()
                    .unwrap_or_else(|| Pool::new(u.clone(), metrics))
            })
            .collect();
        let router = Router::new(&config.routes, &config.experiments, metrics, bind);
        let experiments = config
            .experiments
            .iter()
            .map(|e| {
                previous
                    .and_then(|p| p.experiments.iter().find(|old| old.spec() == e))
                    .cloned()
                    .unwrap_or_else(|| {
                        let old = previous.and_then(|p| {
                            p.experiments.iter().find(|old| old.spec().name == e.name)
                        });
                        let carried = old.and_then(|old| Experiment::carry_over(e.clone(), old));
                        Arc::new(carried.unwrap_or_else(|| {
                            Experiment::new(e.clone(), metrics, resumed.get(&e.name).cloned())
                        }))
                    })
            })
            .collect();
        let keyring = config.feedback.keys.split_first().map(|(first, rest)| {
            let ring = rest.iter().fold(
                Keyring::new(first.id, first.secret()).expect("key checked by the config"),
                |ring, k| {
                    ring.with_verify_key(k.id, k.secret())
                        .expect("keys checked by the config")
                },
            );
            Arc::new(ring)
        });
        let privacy = Arc::new(crate::privacy::Pseudonymizer::new(&config.privacy));
        if previous.is_none_or(|p| p.privacy.key_id() != privacy.key_id()) {
            // The key's id, never the key: which pseudonyms the logs from now on carry.
            tracing::info!(
                key = privacy.key_id(),
                client_addresses = config.privacy.pseudonymize_client_addresses,
                "pseudonyms of client addresses"
            );
        }
        Snapshot {
            config,
            router,
            pools,
            models: HashMap::new(),
            generation: previous.map_or(1, |p| p.generation + 1),
            ranker: None,
            experiments,
            keyring,
            metrics_for_feedback: metrics.feedback_refused.clone(),
            privacy,
        }
    }
}

/// State shared by every connection.
pub struct Shared {
    /// The live snapshot, read once per request.
    pub state: ArcSwap<Snapshot>,
    /// The proxy's series.
    pub metrics: Metrics,
    /// Node-wide admission control (`[limits] max_inflight_requests`, `max_queue_time_ms`).
    pub admission: Arc<crate::admission::Admission>,
}

/// What a request knows about the connection it came on.
pub struct ConnInfo {
    /// Client address.
    pub peer: SocketAddr,
    /// `https` or `http`.
    pub proto: &'static str,
    /// Timers for this connection's upstream request timeouts, reused across its requests.
    timers: TimerPool,
    /// On a listener with `reject_misdirected`, the names of the certificate the connection
    /// was served with: a request for another host gets 421.
    pub cert_names: Option<Box<[HostPattern]>>,
}

impl ConnInfo {
    /// A connection from `peer` speaking `proto` (`https` or `http`); `cert_names` as the
    /// field says.
    pub fn new(
        peer: SocketAddr,
        proto: &'static str,
        cert_names: Option<Box<[HostPattern]>>,
    ) -> ConnInfo {
        ConnInfo {
            peer,
            proto,
            timers: TimerPool::default(),
            cert_names,
        }
    }
}

/// Why a request is answered before routing.
enum Refusal {
    /// 400: no single valid authority.
    Authority(http_util::AuthorityError),
    /// 421: the host is not one the connection's certificate covers.
    Misdirected,
}

/// Answers one downstream request: 503 with `retry-after` at once when admission control
/// sheds it, else routed and answered.
pub async fn handle(
    shared: &Shared,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let snapshot = shared.state.load();
    match shared.admission.admit(&snapshot.config.limits) {
        Ok(_ticket) => handle_admitted(shared, snapshot, conn, req).await,
        Err(shed) => {
            let mut r = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "the gateway is overloaded ({}); retry shortly",
                    shed.label()
                ),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            let rid = &snapshot.config.proxy.request_id_header;
            let id = match req.headers().get(rid) {
                Some(v) if http_util::valid_request_id(v) => v.clone(),
                _ => http_util::new_request_id(),
            };
            r.headers_mut().insert(rid.clone(), id);
            r
        }
    }
}

async fn handle_admitted(
    shared: &Shared,
    snapshot: arc_swap::Guard<Arc<Snapshot>>,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let config = &snapshot.config;
    let rid_header = &config.proxy.request_id_header;
    let mut request_id = match req.headers().get(rid_header) {
        Some(v) if http_util::valid_request_id(v) => v.clone(),
        _ => http_util::new_request_id(),
    };
    // Unique per request: HPACK must not add it to its dynamic table, where every response
    // would evict a useful entry and lengthen the lookups of the next ones.
    request_id.set_sensitive(true);
    // One authority per request, for routing, `Host` upstream and the forwarding headers.
    let (authority, refused) = match http_util::request_authority(&req) {
        Ok(a) => (a, None),
        Err(e) => (RequestAuthority::default(), Some(Refusal::Authority(e))),
    };
    let host = authority.host.as_deref();
    let refused = refused.or_else(|| {
        let names = conn.cert_names.as_deref()?;
        (!crate::tls::names_cover(names, host?)).then_some(Refusal::Misdirected)
    });
    let method = req.method().clone();
    if !snapshot.models.is_empty() && refused.is_none() {
        if let Some(rest) = req
            .uri()
            .path()
            .strip_prefix(config.scoring.endpoint_prefix.as_str())
        {
            if rest.is_empty() || rest.starts_with('/') {
                let rest = rest.to_string();
                // The same stall and size limits as a proxied body, and the body deadline: the
                // whole body is read before the answer.
                let progress = Arc::new(BodyProgress::default());
                let req = req.map(|b| {
                    LimitedBody::new(
                        b,
                        config.limits.max_body_bytes,
                        config.limits.body_read_timeout,
                    )
                    .with_deadline(config.limits.body_deadline, u64::MAX)
                    .tracked(progress.clone())
                    .boxed_unsync()
                });
                // An experiment whose variants serve this model splits its requests.
                let assigned = crate::scoring_endpoint::model_of(&rest).and_then(|model| {
                    let e = snapshot.experiment_of_model(model)?;
                    let a = e.assign(req.headers(), req.uri());
                    let serve_as = e.spec().variants[a.variant]
                        .models
                        .iter()
                        .find(|(served, _)| served == model)
                        .map(|(_, idx)| config.models[*idx].name.as_str());
                    Some((e, a, model.to_string(), serve_as))
                });
                let observe = assigned.as_ref().map(|(e, a, ..)| {
                    let (e, variant) = (*e, a.variant);
                    move |scores: &[f32]| {
                        for s in scores {
                            e.record_score(variant, f64::from(*s));
                        }
                    }
                });
                let serving = crate::scoring_endpoint::Serving {
                    model: assigned.as_ref().and_then(|(.., serve_as)| *serve_as),
                    observe: observe
                        .as_ref()
                        .filter(|_| assigned.as_ref().is_some_and(|(_, a, ..)| a.counted))
                        .map(|f| f as &crate::scoring_endpoint::ScoreObserver<'_>),
                };
                // Boxed, like the plugin path: the proxy path's future stays small.
                let mut response = Box::pin(crate::scoring_endpoint::handle_as(
                    &snapshot.models,
                    &rest,
                    req,
                    serving,
                ))
                .await;
                count_body_fault(&shared.metrics, &progress);
                let status = response.status();
                if let Some((e, a, model, _)) = &assigned {
                    e.record_request(*a, status, started.elapsed());
                    let route = format!("_scoring/{model}");
                    attribute(&snapshot, &route, e, *a, response.headers_mut());
                }
                snapshot.router.scoring[class_index(status)].inc();
                snapshot
                    .router
                    .scoring_duration
                    .observe(started.elapsed().as_secs_f64());
                response
                    .headers_mut()
                    .insert(rid_header.clone(), request_id);
                return response;
            }
        }
    }
    if refused.is_none() && snapshot.keyring.is_some() && req.uri().path() == config.feedback.path {
        let progress = Arc::new(BodyProgress::default());
        let req = req.map(|b| {
            LimitedBody::new(
                b,
                config.limits.max_body_bytes,
                config.limits.body_read_timeout,
            )
            .with_deadline(config.limits.body_deadline, u64::MAX)
            .tracked(progress.clone())
            .boxed_unsync()
        });
        let mut response = Box::pin(crate::feedback::handle(shared.state.load_full(), req)).await;
        count_body_fault(&shared.metrics, &progress);
        response
            .headers_mut()
            .insert(rid_header.clone(), request_id);
        return response;
    }
    let route = match refused {
        None => snapshot.router.route(host, req.uri().path()),
        Some(_) => None,
    };
    // Kept for the access log only.
    let path = config
        .logging
        .access_log
        .then(|| req.uri().path().to_string());

    let mut variant = None;
    let mut assigned: Option<(&Experiment, Assignment)> = None;
    let (mut response, upstream_name, backend) = match route {
        None => match refused {
            Some(Refusal::Authority(e)) => {
                shared
                    .metrics
                    .rejected
                    .with_label_values(&["bad_authority"])
                    .inc();
                (
                    error_response(StatusCode::BAD_REQUEST, &e.to_string()),
                    None,
                    None,
                )
            }
            Some(Refusal::Misdirected) => {
                shared
                    .metrics
                    .rejected
                    .with_label_values(&["misdirected"])
                    .inc();
                (
                    error_response(
                        StatusCode::MISDIRECTED_REQUEST,
                        "this connection's certificate does not cover the requested host",
                    ),
                    None,
                    None,
                )
            }
            None => (
                error_response(StatusCode::NOT_FOUND, "no route matches this host and path"),
                None,
                None,
            ),
        },
        Some(route) => {
            let (parts, body) = req.into_parts();
            assigned = route.spec.experiment.map(|i| {
                let e = &*snapshot.experiments[i];
                (e, e.assign(&parts.headers, &parts.uri))
            });
            let chain = route.chain_for(assigned.map(|(_, a)| a.variant)).0;
            // A chain that reads bodies has the gateway buffer up to its limit (one byte more
            // tells a larger body): the body deadline covers that part.
            let buffered = chain.and_then(|c| c.body_limit()).map(|l| l as u64 + 1);
            match admit_body(shared, config, &parts, body, buffered) {
                Err(resp) => (resp, None, None),
                Ok((body, progress)) => match chain {
                    None => {
                        let upstream = assigned
                            .and_then(|(e, a)| e.spec().variants[a.variant].upstream)
                            .unwrap_or(route.spec.upstream);
                        variant = assigned.map(|(e, a)| e.variant_name(a.variant).to_string());
                        let pool = &snapshot.pools[upstream];
                        let (resp, backend) = forward(
                            shared,
                            conn,
                            &snapshot,
                            route,
                            pool,
                            &authority,
                            &request_id,
                            parts,
                            body,
                            progress.as_deref(),
                        )
                        .await;
                        let backend = backend.map(|i| &pool.backends[i].authority);
                        (resp, Some(pool.spec.name.as_str()), backend)
                    }
                    Some(chain) => {
                        // Boxed: the plugin path's state is large, and every request's
                        // future would otherwise carry (and move) it.
                        let out = Box::pin(with_plugins(
                            shared,
                            conn,
                            &snapshot,
                            route,
                            assigned,
                            chain.as_ref(),
                            &authority,
                            &request_id,
                            parts,
                            body,
                            progress.as_deref(),
                        ))
                        .await;
                        variant = out.variant;
                        (
                            out.response,
                            out.upstream.map(|i| snapshot.pools[i].spec.name.as_str()),
                            out.upstream
                                .zip(out.backend)
                                .map(|(u, b)| &snapshot.pools[u].backends[b].authority),
                        )
                    }
                },
            }
        }
    };

    let status = response.status();
    let elapsed = started.elapsed();
    match route {
        Some(r) => {
            r.by_class[class_index(status)].inc();
            r.duration.observe(elapsed.as_secs_f64());
        }
        None => {
            snapshot.router.unmatched[class_index(status)].inc();
            snapshot
                .router
                .unmatched_duration
                .observe(elapsed.as_secs_f64());
        }
    }
    let headers = response.headers_mut();
    headers.insert(rid_header.clone(), request_id.clone());
    if config.proxy.version_headers {
        headers.insert(
            "x-gateway-generation",
            HeaderValue::from(snapshot.generation),
        );
        let versions = route.and_then(|r| r.chain_for(assigned.map(|(_, a)| a.variant)).1);
        if let Some(v) = versions.cloned() {
            headers.insert("x-plugin-versions", v);
        }
    }
    if let Some(via) = &config.proxy.via_name {
        http_util::append_via(headers, http::Version::HTTP_11, via);
    }
    if let (Some((experiment, a)), Some(route)) = (assigned, route) {
        experiment.record_request(a, status, elapsed);
        attribute(&snapshot, &route.name, experiment, a, headers);
    }
    if config.logging.access_log {
        tracing::info!(
            target: "access",
            client = %snapshot.privacy.client(conn.peer.ip().to_canonical()),
            method = %method,
            host = host.unwrap_or("-"),
            path = path.as_deref().unwrap_or("-"),
            status = status.as_u16(),
            duration_us = elapsed.as_micros() as u64,
            route = route.map_or("-", |r| r.spec.name.as_str()),
            upstream = upstream_name.unwrap_or("-"),
            backend = backend.map_or("-", |a| a.as_str()),
            variant = variant.as_deref().unwrap_or("-"),
            request_id = request_id.to_str().unwrap_or("-"),
        );
    }
    response
}

fn classify(err: &SendError) -> Failure {
    let hyper_err = match err {
        SendError::Connect { source, .. } => {
            return if http_util::is_local_resource_error(source) {
                Failure::Local
            } else {
                Failure::Connect
            }
        }
        SendError::ConnectTimeout { .. } => return Failure::ConnectTimeout,
        SendError::Http(e) => e,
    };
    if let Some(b) = http_util::find_body_limit_error(hyper_err) {
        return Failure::Body(b);
    }
    if http_util::connection_broke(hyper_err) {
        return Failure::Reset;
    }
    Failure::Other
}

/// Sends a request to `pool` with retries. `progress` is the request body's, `None` when the
/// request has none.
#[allow(clippy::too_many_arguments)]
async fn forward(
    shared: &Shared,
    conn: &ConnInfo,
    snapshot: &Snapshot,
    route: &Route,
    pool: &Arc<Pool>,
    authority: &RequestAuthority,
    request_id: &HeaderValue,
    parts: http::request::Parts,
    body: ProxyBody,
    progress: Option<&BodyProgress>,
) -> (Response<ProxyBody>, Option<usize>) {
    let config = &snapshot.config;
    let metrics = &shared.metrics;
    let body_empty = progress.is_none();
    let mut headers = parts.headers;
    http_util::strip_hop_by_hop(&mut headers);
    http_util::add_forwarded(
        &mut headers,
        config.proxy.forwarded,
        conn.peer,
        conn.proto,
        authority.host.as_deref(),
    );
    if let Some(via) = &config.proxy.via_name {
        http_util::append_via(&mut headers, parts.version, via);
    }
    headers.insert(config.proxy.request_id_header.clone(), request_id.clone());
    if let Some(v) = &authority.replace_host {
        headers.insert(header::HOST, v.clone());
    }

    let path_and_query = upstream_path(&parts.uri, route);
    let policy = RetryPolicy::new(&parts.method, body_empty, pool.spec.max_retries);
    let replayable = policy.replayable();
    let mut body = Some(body);
    pool.budget.deposit();
    let upstream = pool.spec.name.as_str();
    // Attempts are bounded by max_retries (at most 10), so the tried list fits on the stack.
    let mut tried_buf = [usize::MAX; 11];
    let mut attempts = 0;
    let mut last_failure = None;
    loop {
        let tried = &tried_buf[..attempts];
        let picked = pool.pick(tried).or_else(|| {
            if tried.is_empty() {
                None
            } else {
                pool.pick(&[])
            }
        });
        let Some((index, in_flight)) = picked else {
            if last_failure.is_none() {
                metrics
                    .upstream_errors
                    .with_label_values(&[upstream, "no_backend"])
                    .inc();
            }
            return (
                error_response(
                    StatusCode::BAD_GATEWAY,
                    "no healthy backend could take the request",
                ),
                None,
            );
        };
        tried_buf[attempts] = index;
        attempts += 1;
        // Whether a failure of this attempt can be retried (the condition below); if not, the
        // headers move into it instead of being copied.
        let may_retry = policy.may_retry(attempts);
        let backend = &pool.backends[index];
        let request = pool.request_to(
            backend,
            parts.method.clone(),
            path_and_query.clone(),
            if may_retry {
                headers.clone()
            } else {
                std::mem::take(&mut headers)
            },
            if replayable {
                empty_body()
            } else {
                body.take().unwrap_or_else(empty_body)
            },
        );

        let attempt = Instant::now();
        let saturation = shared.admission.saturation_mark();
        let outcome = conn
            .timers
            .timeout_at(
                (attempt + pool.spec.request_timeout).into(),
                backend.conns.send(request),
            )
            .await;
        pool.attempt_duration
            .observe(attempt.elapsed().as_secs_f64());
        let failure = match outcome {
            Ok(Ok(resp)) => {
                if matches!(
                    resp.status(),
                    StatusCode::BAD_GATEWAY
                        | StatusCode::SERVICE_UNAVAILABLE
                        | StatusCode::GATEWAY_TIMEOUT
                ) {
                    pool.record_failure(index, Blame::Backend);
                } else {
                    pool.record_success(index);
                }
                let (mut parts, body) = resp.into_parts();
                http_util::strip_hop_by_hop(&mut parts.headers);
                let body =
                    UpstreamBody::new(body, in_flight, pool.spec.body_timeout).boxed_unsync();
                return (Response::from_parts(parts, body), Some(index));
            }
            Ok(Err(err)) => {
                // A body that broke on the client's side makes the exchange fail too, in ways
                // (an h2 reset, an early close) that look like the backend's fault.
                let failure = match progress.map(BodyProgress::state) {
                    Some(BodyState::Failed(b)) => Failure::Body(b),
                    _ => classify(&err),
                };
                tracing::debug!(upstream, backend = %backend.authority, error = %err, kind = failure.label(), "upstream attempt failed");
                failure
            }
            // Still waiting for the client to send the body: the client is the slow one.
            Err(_) => match progress.map(BodyProgress::state) {
                Some(BodyState::Failed(b)) => Failure::Body(b),
                Some(BodyState::WaitingOnClient) => Failure::Body(BodyLimitError::Timeout),
                _ => Failure::Timeout,
            },
        };
        metrics
            .upstream_errors
            .with_label_values(&[upstream, failure.label()])
            .inc();
        // A timeout while the node's own threads had a standing queue may be the node's fault.
        let blame = match failure {
            Failure::Local => Blame::Local,
            Failure::Timeout | Failure::ConnectTimeout
                if shared.admission.saturation_mark() != saturation =>
            {
                Blame::LocalOverload
            }
            _ => Blame::Backend,
        };
        match failure {
            // The client's fault: never held against the backend.
            Failure::Body(b) => return (body_fault_response(metrics, Some(b)), None),
            Failure::Timeout => {
                pool.record_failure(index, blame);
                return (
                    error_response(
                        StatusCode::GATEWAY_TIMEOUT,
                        "the upstream did not answer in time",
                    ),
                    None,
                );
            }
            _ => pool.record_failure(index, blame),
        }
        last_failure = Some(failure);
        if policy.retries(attempts, failure) {
            if pool.budget.try_withdraw() {
                metrics
                    .retries
                    .with_label_values(&[upstream, "attempted"])
                    .inc();
                continue;
            }
            metrics
                .retries
                .with_label_values(&[upstream, "budget_exhausted"])
                .inc();
        }
        return (
            error_response(
                StatusCode::BAD_GATEWAY,
                "the upstream could not be reached or closed the connection",
            ),
            None,
        );
    }
}

/// Refuses a declared-too-large body and wraps the rest in the size and stall limits, with the
/// progress it records (none for an empty body). `buffered`: how many bytes of it the gateway
/// reads before forwarding, which the body deadline covers.
// A refusal is rare and answered at once: not worth boxing.
#[allow(clippy::result_large_err)]
fn admit_body(
    shared: &Shared,
    config: &Config,
    parts: &http::request::Parts,
    body: Incoming,
    buffered: Option<u64>,
) -> Result<(ProxyBody, Option<Arc<BodyProgress>>), Response<ProxyBody>> {
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > config.limits.max_body_bytes) {
        shared
            .metrics
            .rejected
            .with_label_values(&["body_too_large"])
            .inc();
        return Err(error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body is larger than the gateway accepts",
        ));
    }
    if body.is_end_stream() {
        return Ok((empty_body(), None));
    }
    let progress = Arc::new(BodyProgress::default());
    let limited = LimitedBody::new(
        body,
        config.limits.max_body_bytes,
        config.limits.body_read_timeout,
    )
    .tracked(progress.clone());
    let limited = match buffered {
        Some(covers) => limited.with_deadline(config.limits.body_deadline, covers),
        None => limited,
    };
    Ok((limited.boxed_unsync(), Some(progress)))
}

/// Counts a body that an endpoint read whole and that failed on the client's side.
fn count_body_fault(metrics: &Metrics, progress: &BodyProgress) {
    if let BodyState::Failed(e) = progress.state() {
        metrics.rejected.with_label_values(&[e.reason()]).inc();
    }
}

/// The result of a request that went through a plugin chain.
struct PluginPass {
    response: Response<ProxyBody>,
    upstream: Option<usize>,
    backend: Option<usize>,
    variant: Option<String>,
}

/// The answer to a request whose body the client cut off, stalled or broke, counted in
/// `gateway_rejected_requests_total` by reason.
fn body_fault_response(metrics: &Metrics, fault: Option<BodyLimitError>) -> Response<ProxyBody> {
    let Some(fault) = fault else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "the request body could not be read",
        );
    };
    let (status, message) = match fault {
        BodyLimitError::TooLarge => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body is larger than the gateway accepts",
        ),
        BodyLimitError::Timeout => (
            StatusCode::REQUEST_TIMEOUT,
            "request body was not received in time",
        ),
        BodyLimitError::Deadline => (
            StatusCode::REQUEST_TIMEOUT,
            "request body was not received within the body deadline",
        ),
        BodyLimitError::Malformed => (StatusCode::BAD_REQUEST, "request body framing is invalid"),
        BodyLimitError::Aborted => (
            StatusCode::BAD_REQUEST,
            "request body ended before it was complete",
        ),
    };
    metrics.rejected.with_label_values(&[fault.reason()]).inc();
    error_response(status, message)
}

/// Runs the route's plugin chain around the upstream exchange.
#[allow(clippy::too_many_arguments)]
async fn with_plugins(
    shared: &Shared,
    conn: &ConnInfo,
    snapshot: &Snapshot,
    route: &Route,
    assigned: Option<(&Experiment, Assignment)>,
    chain: &dyn RouteHooks,
    authority: &RequestAuthority,
    request_id: &HeaderValue,
    mut parts: http::request::Parts,
    body: ProxyBody,
    progress: Option<&BodyProgress>,
) -> PluginPass {
    let body_empty = progress.is_none();
    // On a route in an experiment the split decides; plugins see its choice.
    let default_variant = match assigned {
        Some((e, a)) => Some(e.variant_name(a.variant).to_string()),
        None => route
            .spec
            .default_variant
            .map(|i| route.spec.variants[i].0.clone()),
    };
    let ranker = match assigned {
        Some((e, a)) if !e.spec().variants[a.variant].models.is_empty() => {
            snapshot.ranker.clone().map(|inner| {
                Arc::new(AliasRanker {
                    inner,
                    aliases: e.spec().variants[a.variant]
                        .models
                        .iter()
                        .map(|(served, idx)| {
                            (served.clone(), snapshot.config.models[*idx].name.clone())
                        })
                        .collect(),
                }) as Arc<dyn Ranker>
            })
        }
        _ => snapshot.ranker.clone(),
    };
    let fail = |response| PluginPass {
        response,
        upstream: None,
        backend: None,
        variant: None,
    };

    // The request body, buffered when the route lets plugins read it.
    let (body, seen_body) = match (chain.body_limit(), body_empty) {
        (Some(limit), false) => match http_util::buffer_body(body, limit).await {
            Ok(http_util::Buffered::Whole(bytes)) => (full_body(bytes.clone()), Some(bytes)),
            Ok(http_util::Buffered::Partial(rest)) => (rest, None),
            Err(e) => {
                return fail(body_fault_response(
                    &shared.metrics,
                    http_util::find_body_limit_error(e.as_ref()),
                ))
            }
        },
        (Some(_), true) => (body, Some(Bytes::new())),
        (None, _) => (body, None),
    };
    let original_path = parts.uri.path().to_string();
    let original_query = parts.uri.query().map(str::to_string);
    let method = parts.method.clone();
    let state = RequestState {
        method: parts.method.clone(),
        path: original_path.clone(),
        query: parts.uri.query().map(str::to_string),
        headers: std::mem::take(&mut parts.headers),
        client: crate::privacy::ClientAddr::new(
            conn.peer.ip().to_canonical(),
            snapshot.privacy.clone(),
        ),
        route: route.name.clone(),
        variant: default_variant,
        variants: chain.variants(),
        experiment: assigned.map(|(e, _)| e.spec().name.clone()),
        body: seen_body,
        target_changed: false,
        ranker: ranker.clone(),
    };
    let (state, outcome) = chain.on_request(state).await;
    parts.headers = state.headers;
    let variant = state.variant;
    if state.target_changed {
        let target = match &state.query {
            Some(q) => format!("{}?{q}", state.path),
            None => state.path.clone(),
        };
        match target.parse::<Uri>() {
            Ok(uri) => parts.uri = uri,
            Err(_) => {
                return fail(error_response(
                    StatusCode::BAD_REQUEST,
                    "a plugin rewrote the path into an invalid one",
                ))
            }
        }
    }

    let (mut response, ran, upstream, backend) = match outcome {
        RequestOutcome::Forward { ran } => {
            let upstream = match assigned {
                Some((e, a)) => e.spec().variants[a.variant]
                    .upstream
                    .unwrap_or(route.spec.upstream),
                None => variant
                    .as_ref()
                    .and_then(|v| route.spec.variants.iter().find(|(n, _)| n == v))
                    .map_or(route.spec.upstream, |(_, idx)| *idx),
            };
            let pool = &snapshot.pools[upstream];
            let (resp, backend) = forward(
                shared, conn, snapshot, route, pool, authority, request_id, parts, body, progress,
            )
            .await;
            (resp, ran, Some(upstream), backend)
        }
        RequestOutcome::Local { response, ran } => {
            let mut resp = Response::new(full_body(response.body));
            *resp.status_mut() = response.status;
            *resp.headers_mut() = response.headers;
            (resp, ran, None, None)
        }
        RequestOutcome::Failed {
            plugin,
            reason,
            ran,
        } => (plugin_failure_response(&plugin, reason), ran, None, None),
    };

    if ran > 0 {
        response = plugin_response(
            chain,
            ran,
            response,
            &method,
            original_path,
            original_query,
            route,
            variant.clone(),
            ranker,
        )
        .await;
    }
    PluginPass {
        response,
        upstream,
        backend,
        variant,
    }
}

/// The served models with some names standing for others: a variant's `models`.
struct AliasRanker {
    inner: Arc<dyn Ranker>,
    /// Served name, then the model that answers for it.
    aliases: Vec<(String, String)>,
}

impl Ranker for AliasRanker {
    fn rank<'a>(
        &'a self,
        model: &'a str,
        user: u32,
        candidates: Vec<u32>,
    ) -> crate::hooks::RankFuture<'a> {
        let model = self
            .aliases
            .iter()
            .find(|(served, _)| served == model)
            .map_or(model, |(_, real)| real.as_str());
        self.inner.rank(model, user, candidates)
    }
}

/// Tells the client which variant served it, and, for a request the split assigned, hands it
/// the attribution token its outcome events are to carry.
fn attribute(
    snapshot: &Snapshot,
    route: &str,
    experiment: &Experiment,
    a: Assignment,
    headers: &mut http::HeaderMap,
) {
    let name = experiment.variant_name(a.variant);
    if let Ok(v) = HeaderValue::from_str(name) {
        headers.insert("x-gateway-variant", v);
    }
    let variant = &experiment.spec().variants[a.variant];
    let model_version = variant.models.first().and_then(|(_, idx)| {
        let slot = snapshot.models.get(&snapshot.config.models[*idx].name)?;
        Some(slot.live().version.clone())
    });
    if let Some(v) = model_version
        .as_deref()
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        headers.insert("x-gateway-model-version", v);
    }
    let Some(keyring) = snapshot.keyring.as_deref().filter(|_| a.counted) else {
        return;
    };
    // The token's route is `experiment:route`, so feedback finds the experiment by name.
    let token = keyring.sign(&Attribution {
        route: format!("{}:{route}", experiment.spec().name),
        variant: name.to_string(),
        model_version,
        issued_at: crate::experiment::now_ms() / 1000,
    });
    if let Some(v) = token.ok().and_then(|t| HeaderValue::from_str(&t).ok()) {
        headers.insert("x-gateway-attribution", v);
    }
}

fn plugin_failure_response(plugin: &str, reason: &str) -> Response<ProxyBody> {
    // No instance was free in time: the node is overloaded, the plugin did nothing wrong.
    if reason == "unavailable" {
        let mut r = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "plugin {plugin} had no free instance (the gateway is overloaded); retry shortly"
            ),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        &format!("plugin {plugin} failed ({reason}) and this route fails closed"),
    )
}

/// Runs response hooks and rebuilds the response from what they left.
#[allow(clippy::too_many_arguments)]
async fn plugin_response(
    chain: &dyn RouteHooks,
    ran: usize,
    response: Response<ProxyBody>,
    method: &Method,
    request_path: String,
    request_query: Option<String>,
    route: &Route,
    variant: Option<String>,
    ranker: Option<Arc<dyn Ranker>>,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    let (body, seen_body) = match chain.body_limit() {
        Some(limit) => match http_util::buffer_body(body, limit).await {
            Ok(http_util::Buffered::Whole(bytes)) => (None, Some(bytes)),
            Ok(http_util::Buffered::Partial(rest)) => (Some(rest), None),
            Err(_) => {
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    "the upstream response body broke off",
                )
            }
        },
        None => (Some(body), None),
    };
    let state = ResponseState {
        status: parts.status,
        headers: std::mem::take(&mut parts.headers),
        request_method: method.clone(),
        request_path,
        request_query,
        route: route.name.clone(),
        variant,
        body: seen_body,
        body_access: chain.body_limit().is_some(),
        body_limit: chain.body_limit().unwrap_or(0),
        body_changed: false,
        ranker,
    };
    let (state, failed) = chain.on_response(ran, state).await;
    if let Some((plugin, reason)) = failed {
        return plugin_failure_response(&plugin, reason);
    }
    parts.status = state.status;
    parts.headers = state.headers;
    let body = match (body, state.body) {
        (Some(stream), _) => stream,
        (None, Some(bytes)) => {
            if state.body_changed {
                parts.headers.remove(header::CONTENT_LENGTH);
            }
            full_body(bytes)
        }
        (None, None) => empty_body(),
    };
    Response::from_parts(parts, body)
}

fn upstream_path(uri: &Uri, route: &Route) -> http::uri::PathAndQuery {
    let original = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    if !route.spec.strip_prefix || route.spec.path_prefix == "/" {
        return original;
    }
    let rest = &original.path()[route.spec.path_prefix.len().min(original.path().len())..];
    let path = if rest.is_empty() { "/" } else { rest };
    let rebuilt = match original.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    rebuilt.parse().unwrap_or(original)
}

/// A short plain-text error the gateway itself answers with.
pub(crate) fn error_response(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let text = format!(
        "{} {}: {message}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let mut resp = Response::new(full_body(Bytes::from(text)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Answers a cleartext request with 308 to the same URL on HTTPS.
pub fn redirect(req: &Request<Incoming>, https_port: u16) -> Response<ProxyBody> {
    let host = match http_util::request_authority(req) {
        Ok(RequestAuthority { host: Some(h), .. }) => h,
        Ok(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "a Host header is needed to redirect to HTTPS",
            )
        }
        Err(e) => return error_response(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    let authority = if https_port == 443 {
        host
    } else {
        format!("{host}:{https_port}")
    };
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{authority}{pq}");
    let mut resp = error_response(StatusCode::PERMANENT_REDIRECT, "use HTTPS");
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_host_pattern;

    #[test]
    fn request_future_stays_small() {
        // Every request's future is moved into its task; keep it small.
        fn size<F: std::future::Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
        // A minimal config: one certificate, listener, upstream and route.
        let dir = std::env::temp_dir().join(format!("gw-size-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = crate::tls::self_signed(&["localhost"]).unwrap();
        std::fs::write(dir.join("c.pem"), cert).unwrap();
        std::fs::write(dir.join("k.pem"), key).unwrap();
        let toml = r#"
[[tls.certificates]]
cert = "c.pem"
key = "k.pem"

[[listeners]]
name = "https"
bind = "127.0.0.1:0"

[[upstreams]]
name = "app"
backends = ["127.0.0.1:1"]

[[routes]]
name = "all"
upstream = "app"
"#;
        let config = Config::from_toml(toml, "size.toml", &dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let shared = Shared {
            state: ArcSwap::from_pointee(Snapshot::build(
                Arc::new(config),
                &metrics,
                &|_| None,
                None,
                &HashMap::new(),
            )),
            metrics,
            admission: Arc::new(
                crate::admission::Admission::new(&prometheus::Registry::new()).unwrap(),
            ),
        };
        let conn = ConnInfo {
            peer: "127.0.0.1:1".parse().unwrap(),
            proto: "https",
            timers: TimerPool::default(),
            cert_names: None,
        };
        let (parts, _) = Request::new(()).into_parts();
        let snapshot = shared.state.load();
        let route = snapshot.router.route(None, "/").unwrap();
        let pool = &snapshot.pools[0];
        let rid = HeaderValue::from_static("x");
        let authority = RequestAuthority::default();
        let fut = forward(
            &shared,
            &conn,
            &snapshot,
            route,
            pool,
            &authority,
            &rid,
            parts,
            empty_body(),
            None,
        );
        let n = size(&fut);
        eprintln!("forward future: {n} bytes");
        assert!(n < 2048, "forward future is {n} bytes");
    }

    fn spec(name: &str, hosts: &[&str], prefix: &str) -> RouteSpec {
        RouteSpec {
            name: name.into(),
            hosts: hosts
                .iter()
                .map(|h| parse_host_pattern(h, true).unwrap())
                .collect(),
            path_prefix: prefix.into(),
            upstream: 0,
            strip_prefix: true,
            plugins: vec![],
            plugin_failure: crate::config::FailurePolicy::Closed,
            plugin_body_limit: None,
            variants: vec![],
            default_variant: None,
            experiment: None,
        }
    }

    #[test]
    fn most_specific_host_then_longest_prefix_wins() {
        let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
        let router = Router::new(
            &[
                spec("any", &["*"], "/"),
                spec("any-api", &["*"], "/api"),
                spec("wild", &["*.shop.test"], "/"),
                spec("exact", &["www.shop.test"], "/"),
                spec("exact-api", &["www.shop.test"], "/api/v2"),
            ],
            &[],
            &metrics,
            &|_| None,
        );
        let name = |h: Option<&str>, p: &str| router.route(h, p).map(|r| r.spec.name.clone());
        assert_eq!(name(Some("other.test"), "/"), Some("any".into()));
        assert_eq!(name(Some("other.test"), "/api/x"), Some("any-api".into()));
        assert_eq!(name(Some("other.test"), "/apix"), Some("any".into()));
        assert_eq!(name(Some("m.shop.test"), "/api"), Some("wild".into()));
        assert_eq!(
            name(Some("www.shop.test"), "/api/v2/items"),
            Some("exact-api".into())
        );
        assert_eq!(name(Some("www.shop.test"), "/api/v1"), Some("exact".into()));
        assert_eq!(name(None, "/api"), Some("any-api".into()));
    }

    #[test]
    fn strip_prefix_keeps_query() {
        let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
        let router = Router::new(&[spec("r", &["*"], "/api")], &[], &metrics, &|_| None);
        let route = router.route(None, "/api/items").unwrap();
        assert_eq!(
            upstream_path(&"/api/items?q=1".parse().unwrap(), route),
            "/items?q=1"
        );
        assert_eq!(upstream_path(&"/api?q=1".parse().unwrap(), route), "/?q=1");
    }
}
