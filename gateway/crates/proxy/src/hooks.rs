//! The proxy's hook contract: what a route's request and response hooks see and may change,
//! and the trait a hook chain implements ([`RouteHooks`]). The plugin host implements it over
//! its WebAssembly plugins; the proxy runs it around the upstream exchange and knows nothing
//! of plugins.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};

/// A boxed hook call.
pub type HookFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A route's hooks, run by the proxy: request hooks before the upstream exchange, response
/// hooks after it for the hooks whose request hook ran.
pub trait RouteHooks: Send + Sync {
    /// The body bytes hooks may read, when the route lets them (the body is buffered up to it).
    fn body_limit(&self) -> Option<usize>;
    /// The variant names the route defines, handed to the request hooks.
    fn variants(&self) -> Arc<[String]>;
    /// Runs the request hooks in order.
    fn on_request(&self, state: RequestState) -> HookFuture<'_, (RequestState, RequestOutcome)>;
    /// Runs the response hooks of the first `ran` hooks, last first. `Some((hook, reason))`
    /// when a failure must answer with an error instead (a fail-closed route).
    fn on_response(
        &self,
        ran: usize,
        state: ResponseState,
    ) -> HookFuture<'_, (ResponseState, Option<(String, &'static str)>)>;
    /// The implementation, for its owner to look into (the plugin host lists the plugins a
    /// snapshot's routes use).
    fn as_any(&self) -> &dyn std::any::Any;
}

/// A route's hooks as the router holds them, with the `x-plugin-versions` value naming them.
pub struct BoundHooks {
    /// The hooks.
    pub hooks: Arc<dyn RouteHooks>,
    /// `name@version,...`, when version headers are on.
    pub versions: Option<HeaderValue>,
}

/// Where the request stands after the request hooks.
pub enum RequestOutcome {
    /// Go upstream; `ran` plugins will see the response.
    Forward {
        /// Plugins whose request hook ran.
        ran: usize,
    },
    /// A plugin answered; `ran` plugins (it included) will see the response.
    Local {
        /// The answer.
        response: LocalAnswer,
        /// Plugins whose request hook ran.
        ran: usize,
    },
    /// A plugin failed on a fail-closed route.
    Failed {
        /// The plugin.
        plugin: String,
        /// How it failed (the plugin outcome's metric label); `unavailable` (no instance was
        /// free in time) is answered 503 with `retry-after`, the rest 500.
        reason: &'static str,
        /// Plugins before it, which will see the error response.
        ran: usize,
    },
}

/// A validated local response.
pub struct LocalAnswer {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

/// What the `ranking` import calls: the served models of the configuration in force.
pub trait Ranker: Send + Sync {
    /// Scores `candidates` for `user` with `model`: the version and one score per candidate,
    /// in order.
    fn rank<'a>(&'a self, model: &'a str, user: u32, candidates: Vec<u32>) -> RankFuture<'a>;
}

/// What [`Ranker::rank`] returns: the version and the scores, or why there are none.
pub type RankFuture<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = std::result::Result<(String, Vec<f32>), String>>
            + Send
            + 'a,
    >,
>;

/// The downstream request as a plugin sees and edits it.
pub struct RequestState {
    /// Method.
    pub method: Method,
    /// Path, without query.
    pub path: String,
    /// Query without `?`.
    pub query: Option<String>,
    /// Headers.
    pub headers: HeaderMap,
    /// Client address, shown as its pseudonym under `[privacy] pseudonymize_client_addresses`.
    pub client: crate::privacy::ClientAddr,
    /// Matched route.
    pub route: Arc<str>,
    /// Chosen variant.
    pub variant: Option<String>,
    /// Variants the route defines.
    pub variants: Arc<[String]>,
    /// The experiment whose split chose `variant`, on a route in one: hooks cannot change
    /// the variant there.
    pub experiment: Option<String>,
    /// Buffered body, when the route opts in.
    pub body: Option<Bytes>,
    /// A plugin changed path or query.
    pub target_changed: bool,
    /// Served models, for the `ranking` import during this call.
    pub ranker: Option<Arc<dyn Ranker>>,
}

/// The upstream (or local) response as a plugin sees and edits it.
pub struct ResponseState {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Method of the request answered.
    pub request_method: Method,
    /// Path of the request answered, as received.
    pub request_path: String,
    /// Query of the request answered.
    pub request_query: Option<String>,
    /// Matched route.
    pub route: Arc<str>,
    /// Variant that served it.
    pub variant: Option<String>,
    /// Buffered body, when the route opts in and it fit.
    pub body: Option<Bytes>,
    /// The route opts in to body access.
    pub body_access: bool,
    /// Largest body a plugin may set.
    pub body_limit: usize,
    /// A plugin replaced the body.
    pub body_changed: bool,
    /// Served models, for the `ranking` import during this call.
    pub ranker: Option<Arc<dyn Ranker>>,
}
