//! The decision core of rollouts that judge themselves.
//!
//! A storefront ships a new model, upstream or plugin version to a slice of its shoppers; the
//! gateway measures requests, errors, latency, clicks and purchases per variant and promotes
//! the new version or rolls it back on its own. The pieces, in the order a request meets them:
//!
//! - [`assign`]: a [`Splitter`] puts each shopper in a variant, stickily, by weighted
//!   rendezvous hashing; raising the canary's weight only ever moves shoppers into it.
//! - [`token`]: the [`Attribution`] of a response (route, variant, model version, time),
//!   signed by a [`Keyring`] into a compact token the storefront returns with its click and
//!   purchase events, so outcomes are credited to the variant that served them.
//! - [`window`]: per-variant [`Counts`] (requests, errors, latency and score histograms,
//!   impressions, clicks, add-to-carts, purchases) in bounded memory, both over a sliding
//!   window ([`Windowed`]) and since the current step began, summarised as [`Totals`].
//! - [`sequential`]: an always-valid test of two proportions (mSPRT), so the rollout may look
//!   at the numbers after every event without inflating its false-alarm rate, and [`psi`].
//! - [`plan`]: the [`Rollout`] state machine, which turns two variants' totals into advance,
//!   promote or roll-back [`Decision`]s under a [`Plan`]'s steps and guards.
//! - [`offline`]: ranking and classification metrics for judging a model before it ships.
//!
//! Everything here is pure computation over values the caller passes in, clocks included (as
//! milliseconds or seconds since the Unix epoch): no I/O, no threads, no async. The gateway
//! wires it into the request path, the feedback endpoint and the admin API, and persists a
//! [`Rollout`] (it is serde-serialisable) to resume it after a restart.

pub mod assign;
pub mod offline;
pub mod plan;
pub mod sequential;
pub mod token;
pub mod window;

pub use assign::{SplitError, Splitter};
pub use plan::{
    Action, ArmEvidence, Decision, Evidence, Guards, Plan, PlanError, Rollout, SeqGuard, State,
    TransitionError,
};
pub use sequential::{psi, Arm, Estimate, Sequential, Verdict};
pub use token::{Attribution, KeyError, Keyring, TokenError};
pub use window::{Counts, Event, ScoreBins, Totals, Windowed};
