//! `[feedback]` and `[[experiments]]`, validated: how shoppers are split between variants of
//! a route, what each variant serves, how a canary is rolled out, and the keys that sign the
//! attribution tokens outcome events come back with.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;

/// `[feedback]`, validated.
#[derive(Debug, Clone)]
pub struct FeedbackSettings {
    /// Path outcome events are `POST`ed to.
    pub path: String,
    /// The signing key first, then the earlier keys still accepted. Empty without
    /// experiments.
    pub keys: Vec<FeedbackKey>,
    /// How long a token is accepted after it was issued.
    pub token_max_age: Duration,
    /// Events accepted in one request.
    pub max_events_per_request: usize,
}

impl FeedbackSettings {
    /// The default feedback path.
    pub const DEFAULT_PATH: &'static str = "/_gateway/feedback";
}

/// A secret that signs or verifies attribution tokens; its id (the first byte of its
/// SHA-256) is what tokens name and what logs show.
#[derive(Clone, PartialEq, Eq)]
pub struct FeedbackKey {
    /// The id tokens carry.
    pub id: u8,
    secret: Arc<[u8]>,
}

impl FeedbackKey {
    /// Wraps a secret.
    pub fn new(secret: &[u8]) -> FeedbackKey {
        use sha2::Digest;
        FeedbackKey {
            id: sha2::Sha256::digest(secret)[0],
            secret: secret.into(),
        }
    }

    /// The secret bytes.
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }
}

impl fmt::Debug for FeedbackKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FeedbackKey {{ id: {}, secret: <redacted> }}", self.id)
    }
}

/// Where a request's shopper id is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShopperKey {
    /// A cookie, by name.
    Cookie(String),
    /// A request header.
    Header(HeaderName),
    /// A query parameter, by name.
    Query(String),
}

impl fmt::Display for ShopperKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShopperKey::Cookie(n) => write!(f, "cookie:{n}"),
            ShopperKey::Header(n) => write!(f, "header:{n}"),
            ShopperKey::Query(n) => write!(f, "query:{n}"),
        }
    }
}

/// `[[experiments]]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ExperimentSpec {
    /// Unique name.
    pub name: String,
    /// Indices into [`crate::Config::routes`].
    pub routes: Vec<usize>,
    /// Where the shopper id is.
    pub assign_by: ShopperKey,
    /// Header that forces a variant by name.
    pub override_header: HeaderName,
    /// Variants, the baseline first; at least two.
    pub variants: Vec<VariantSpec>,
    /// The canary analysis between `variants[0]` and `variants[1]`, if any.
    pub rollout: Option<RolloutSpec>,
}

impl ExperimentSpec {
    /// The default override header.
    pub const DEFAULT_OVERRIDE_HEADER: &'static str = "x-gateway-variant";
}

/// `[[experiments.variants]]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariantSpec {
    /// Name, unique in the experiment.
    pub name: String,
    /// Relative share of shoppers, as configured (a rollout overrides it while it runs).
    pub weight: u32,
    /// Index into [`crate::Config::upstreams`]; `None` serves the route's upstream.
    pub upstream: Option<usize>,
    /// Plugin chain in place of the route's: indices into [`crate::Config::plugins`], in
    /// request order; `None` runs the route's chain.
    pub plugins: Option<Vec<usize>>,
    /// Served model name to an index into [`crate::Config::models`], in name order.
    pub models: Vec<(String, usize)>,
}

/// `[experiments.rollout]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutSpec {
    /// Steps, the least step time and samples, and guards.
    pub plan: gateway_rollout::Plan,
    /// How often the rollout is judged.
    pub evaluate_every: Duration,
}
