//! A route's plugin chain applied to one request and its response: request hooks in order,
//! response hooks in reverse for the plugins whose request hook ran, each failure handled by
//! the route's policy.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::bindings::storefront::gateway::http::{LocalResponse, RequestAction};
use super::host::{RequestState, ResponseState};
use super::{LoadedPlugin, Outcome};
use crate::config::{FailurePolicy, RouteSpec};
use crate::proxy::hooks::{BoundHooks, HookFuture, LocalAnswer, RequestOutcome, RouteHooks};

/// The plugins of one route, resolved to loaded versions.
pub(crate) struct RouteChain {
    /// In request order.
    pub plugins: Vec<Arc<LoadedPlugin>>,
    /// What a failure does.
    pub policy: FailurePolicy,
    /// Body access limit, when the route opts in.
    pub body_limit: Option<usize>,
    /// Variant names the route defines.
    pub variants: Arc<[String]>,
}

fn local_answer(local: LocalResponse) -> Option<LocalAnswer> {
    let status = StatusCode::from_u16(local.status).ok()?;
    let mut headers = HeaderMap::new();
    for (k, v) in local.headers {
        let name = HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).ok()?;
        if matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "connection"
        ) {
            continue;
        }
        headers.append(name, HeaderValue::from_str(&v).ok()?);
    }
    Some(LocalAnswer {
        status,
        headers,
        body: Bytes::from(local.body),
    })
}

/// What a fail-open route needs to undo a failed plugin's edits.
struct RequestCheckpoint {
    headers: HeaderMap,
    path: String,
    query: Option<String>,
    variant: Option<String>,
    target_changed: bool,
}

impl RequestCheckpoint {
    fn take(s: &RequestState) -> Self {
        RequestCheckpoint {
            headers: s.headers.clone(),
            path: s.path.clone(),
            query: s.query.clone(),
            variant: s.variant.clone(),
            target_changed: s.target_changed,
        }
    }

    fn restore(self, s: &mut RequestState) {
        s.headers = self.headers;
        s.path = self.path;
        s.query = self.query;
        s.variant = self.variant;
        s.target_changed = self.target_changed;
    }
}

impl RouteChain {
    /// Runs every request hook in order.
    pub async fn on_request(&self, mut state: RequestState) -> (RequestState, RequestOutcome) {
        for (i, plugin) in self.plugins.iter().enumerate() {
            let checkpoint =
                (self.policy == FailurePolicy::Open).then(|| RequestCheckpoint::take(&state));
            let (returned, result) = plugin.on_request(state).await;
            state = returned;
            match result {
                Ok(RequestAction::Continue) => {}
                Ok(RequestAction::Respond(local)) => match local_answer(local) {
                    Some(response) => {
                        return (
                            state,
                            RequestOutcome::Local {
                                response,
                                ran: i + 1,
                            },
                        )
                    }
                    None => {
                        if let Some(stop) =
                            self.fail(plugin, Outcome::BadOutput, i, checkpoint, &mut state)
                        {
                            return (state, stop);
                        }
                    }
                },
                Err(outcome) => {
                    if let Some(stop) = self.fail(plugin, outcome, i, checkpoint, &mut state) {
                        return (state, stop);
                    }
                }
            }
        }
        (
            state,
            RequestOutcome::Forward {
                ran: self.plugins.len(),
            },
        )
    }

    fn fail(
        &self,
        plugin: &LoadedPlugin,
        outcome: Outcome,
        index: usize,
        checkpoint: Option<RequestCheckpoint>,
        state: &mut RequestState,
    ) -> Option<RequestOutcome> {
        match (self.policy, checkpoint) {
            (FailurePolicy::Open, Some(cp)) => {
                cp.restore(state);
                None
            }
            _ => Some(RequestOutcome::Failed {
                plugin: plugin.name.clone(),
                reason: outcome.label(),
                ran: index,
            }),
        }
    }

    /// Runs the response hooks of the first `ran` plugins, last first. Returns the failed
    /// plugin's name and outcome when a fail-closed route must answer with an error instead.
    pub async fn on_response(
        &self,
        ran: usize,
        mut state: ResponseState,
    ) -> (ResponseState, Option<(String, Outcome)>) {
        for plugin in self.plugins[..ran.min(self.plugins.len())].iter().rev() {
            let checkpoint = (self.policy == FailurePolicy::Open).then(|| {
                (
                    state.status,
                    state.headers.clone(),
                    state.body.clone(),
                    state.body_changed,
                )
            });
            let (returned, result) = plugin.on_response(state).await;
            state = returned;
            if let Err(outcome) = result {
                match checkpoint {
                    Some((status, headers, body, changed)) => {
                        state.status = status;
                        state.headers = headers;
                        state.body = body;
                        state.body_changed = changed;
                    }
                    None => return (state, Some((plugin.name.clone(), outcome))),
                }
            }
        }
        (state, None)
    }
}

impl RouteHooks for RouteChain {
    fn body_limit(&self) -> Option<usize> {
        self.body_limit
    }

    fn variants(&self) -> Arc<[String]> {
        self.variants.clone()
    }

    fn on_request(&self, state: RequestState) -> HookFuture<'_, (RequestState, RequestOutcome)> {
        Box::pin(RouteChain::on_request(self, state))
    }

    fn on_response(
        &self,
        ran: usize,
        state: ResponseState,
    ) -> HookFuture<'_, (ResponseState, Option<(String, &'static str)>)> {
        Box::pin(async move {
            let (state, failed) = RouteChain::on_response(self, ran, state).await;
            (
                state,
                failed.map(|(plugin, outcome)| (plugin, outcome.label())),
            )
        })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Binds a route to its plugin chain over `plugins` (indexed like the config's plugins), with
/// the `name@version,...` list for `x-plugin-versions`; `None` for a route without plugins.
pub fn bind(plugins: &[Arc<LoadedPlugin>], spec: &RouteSpec) -> Option<BoundHooks> {
    if spec.plugins.is_empty() {
        return None;
    }
    let list: Vec<String> = spec
        .plugins
        .iter()
        .map(|&i| format!("{}@{}", plugins[i].name, plugins[i].version))
        .collect();
    let chain = RouteChain {
        plugins: spec.plugins.iter().map(|&i| plugins[i].clone()).collect(),
        policy: spec.plugin_failure,
        body_limit: spec.plugin_body_limit,
        variants: spec.variants.iter().map(|(n, _)| n.clone()).collect(),
    };
    Some(BoundHooks {
        hooks: Arc::new(chain),
        versions: HeaderValue::from_str(&list.join(",")).ok(),
    })
}

/// The loaded plugins a snapshot's routes use, by config index.
pub fn in_use(snapshot: &crate::proxy::Snapshot) -> Vec<Option<Arc<LoadedPlugin>>> {
    let mut out = vec![None; snapshot.config.plugins.len()];
    for route in snapshot.router.routes() {
        let chain = route
            .chain
            .as_ref()
            .and_then(|c| c.as_any().downcast_ref::<RouteChain>());
        if let Some(chain) = chain {
            for (&i, p) in route.spec.plugins.iter().zip(&chain.plugins) {
                out[i] = Some(p.clone());
            }
        }
        // The chains an experiment's variants run in place of the route's.
        let Some(experiment) = route.spec.experiment else {
            continue;
        };
        for (v, hooks) in route.variant_chains() {
            let spec = &snapshot.config.experiments[experiment].variants[v];
            let chain = hooks.as_any().downcast_ref::<RouteChain>();
            if let (Some(chain), Some(indices)) = (chain, &spec.plugins) {
                for (&i, p) in indices.iter().zip(&chain.plugins) {
                    out[i] = Some(p.clone());
                }
            }
        }
    }
    out
}
