//! The narrow interface the admin API drives the gateway through ([`Control`]), and the
//! vocabulary it speaks: what a reload left ([`ReloadReport`]), what an upload or rollback
//! targets ([`Target`]) and made active ([`Activated`]), and why one changed nothing
//! ([`ArtifactError`]). The binary implements [`Control`] over its serving state.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub use crate::api::PluginStatus;
use crate::config::Config;
use crate::proxy::experiment::Command;
use crate::proxy::Snapshot;
use crate::scoring::serving::ModelSlot;
use crate::store::{Kind, StoreError};
use gateway_rollout::Decision;

/// What the admin API may ask of the gateway.
pub trait Control: Send + Sync + 'static {
    /// What serves now.
    fn snapshot(&self) -> Arc<Snapshot>;
    /// The plugins `snapshot`'s routes use.
    fn plugins(&self, snapshot: &Snapshot) -> Vec<PluginStatus>;
    /// The outcome of the last reload from the file, if any.
    fn last_reload(&self) -> Option<ReloadReport>;
    /// When this gateway's recent uploads were accepted (the upload rate limit).
    fn recent_uploads(&self) -> &Mutex<VecDeque<Instant>>;
    /// Reloads from the config file, as `by` (a token id) asked; on error nothing changes.
    fn reload_from_file(&self, by: &str) -> impl Future<Output = Result<(), ReloadRefused>> + Send;
    /// Makes `target` the active version of `name`, in one serialized step.
    fn activate(
        &self,
        kind: Kind,
        name: &str,
        target: Target<'_>,
    ) -> impl Future<Output = Result<Activated, ArtifactError>> + Send;
    /// Appends a management action to the audit trail (a failure to write it is logged).
    fn audit(&self, action: crate::store::audit::Action) -> impl Future<Output = ()> + Send;
    /// The audit trail, oldest first.
    fn audit_entries(
        &self,
    ) -> impl Future<Output = Result<Vec<crate::store::audit::Entry>, String>> + Send;
    /// Applies an operator's command to the rollout of experiment `name` and records it.
    fn rollout_command(
        &self,
        name: &str,
        command: Command,
    ) -> impl Future<Output = Result<Decision, RolloutRefused>> + Send;
    /// Forgets the uploads of `name` unless the serving configuration uses it (`users`
    /// lists what does).
    fn forget(
        &self,
        kind: Kind,
        name: &str,
        users: impl FnOnce(&Config) -> Vec<String> + Send,
    ) -> impl Future<Output = Result<(), ArtifactError>> + Send;
    /// What the gateway's sampler saw over the last minutes, and when versions went live:
    /// the status page's charts and "last swap".
    fn observed(&self) -> Observations;
}

/// What the gateway observed lately ([`Control::observed`]).
#[derive(Debug, Clone, Default)]
pub struct Observations {
    /// When the gateway started, ms since the Unix epoch.
    pub started_unix_ms: u64,
    /// Each route's sampled series, by route name.
    pub routes: HashMap<String, RouteSeries>,
    /// When each plugin's live version went live, by plugin name.
    pub plugins: HashMap<String, LiveSince>,
    /// When each model's live version went live, by model name.
    pub models: HashMap<String, LiveSince>,
}

/// A route's samples and the detector's view of its signals.
#[derive(Debug, Clone, Default)]
pub struct RouteSeries {
    /// Samples, oldest first: at most [`crate::api::HISTORY_SAMPLES`], none older than
    /// [`crate::api::HISTORY_WINDOW_MS`].
    pub samples: VecDeque<crate::api::Sample>,
    /// Each signal as its last sample was judged.
    pub signals: Vec<crate::api::SignalState>,
}

impl RouteSeries {
    /// Appends a sample, then drops the oldest beyond [`crate::api::HISTORY_SAMPLES`] or
    /// older than [`crate::api::HISTORY_WINDOW_MS`] before it.
    pub fn push(&mut self, sample: crate::api::Sample) {
        self.samples.push_back(sample);
        let oldest = sample
            .at_unix_ms
            .saturating_sub(crate::api::HISTORY_WINDOW_MS);
        while self.samples.len() > crate::api::HISTORY_SAMPLES
            || self.samples.front().is_some_and(|s| s.at_unix_ms < oldest)
        {
            self.samples.pop_front();
        }
    }
}

/// A plugin's or model's live version and when it went live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSince {
    /// The version.
    pub version: String,
    /// When it went live, ms since the Unix epoch; `None` when it has served since start.
    pub since_unix_ms: Option<u64>,
}

/// Why `POST /admin/reload` did not reload.
#[derive(Debug, thiserror::Error)]
pub enum ReloadRefused {
    /// The gateway was not started from a file (409).
    #[error("{0}")]
    NoFile(String),
    /// The file is unreadable or invalid, or its configuration could not be built (422).
    #[error("{0}")]
    Failed(String),
}

/// Why a rollout command did nothing.
#[derive(Debug, thiserror::Error)]
pub enum RolloutRefused {
    /// No experiment has the name (404).
    #[error("no experiment named {0:?}")]
    NoExperiment(String),
    /// The experiment has no rollout (409).
    #[error("{0}")]
    NoRollout(String),
    /// The command does not apply in the rollout's state (409).
    #[error("{0}")]
    Conflict(String),
}

/// What the last reload did.
#[derive(Debug, Clone)]
pub struct ReloadReport {
    /// When it finished.
    pub at: std::time::SystemTime,
    /// The error, when it failed.
    pub error: Option<String>,
}

/// Why an upload, a rollback or forgetting uploads changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The configuration has no `[store] dir`.
    #[error("uploads need a [store] dir in the config")]
    NoStore,
    /// The name has no `[[plugins]]` or `[[models]]` entry.
    #[error("{0:?} is not in the config; add its [[plugins]] or [[models]] entry first")]
    NotConfigured(String),
    /// A rollback of a name without uploads.
    #[error("no uploads of {0:?}")]
    NoUploads(String),
    /// A rollback with nothing (or not the version asked for) to go back to.
    #[error("{0}")]
    NothingToRollBackTo(String),
    /// Uploads the serving configuration uses cannot be forgotten.
    #[error("{name:?} is in use by {users}; remove it from the config first")]
    InUse {
        /// The name.
        name: String,
        /// What uses it, comma-separated.
        users: String,
    },
    /// The store could not be read or written.
    #[error(transparent)]
    Store(StoreError),
    /// The version did not load, validate or warm up (the gateway's start error).
    #[error(transparent)]
    Rejected(Box<dyn std::error::Error + Send + Sync>),
}

/// What an upload or a rollback is to make active.
pub enum Target<'a> {
    /// An upload already in the store, by its SHA-256.
    Upload(String),
    /// The previous upload, or the one whose SHA-256 starts with the prefix.
    Rollback(Option<&'a str>),
}

/// What an upload or a rollback made active.
pub enum Activated {
    /// An upload, recorded active in the store: its SHA-256.
    Stored(String),
    /// A model version held in memory (the model has no uploads).
    Held {
        /// The version now live.
        version: String,
        /// The model's slot, for its history.
        slot: Arc<ModelSlot>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Sample, HISTORY_SAMPLES, HISTORY_WINDOW_MS};

    fn at(ms: u64) -> Sample {
        Sample {
            at_unix_ms: ms,
            error_ratio: None,
            p99_ms: None,
            rate_per_s: 1.0,
        }
    }

    #[test]
    fn a_route_history_is_bounded_by_count_and_by_age() {
        let mut series = RouteSeries::default();
        for i in 0..(HISTORY_SAMPLES as u64 + 10) {
            series.push(at(1_000_000 + i));
        }
        assert_eq!(series.samples.len(), HISTORY_SAMPLES);
        assert_eq!(
            series.samples.back().unwrap().at_unix_ms,
            1_000_000 + HISTORY_SAMPLES as u64 + 9
        );
        // A sample a window later leaves only itself.
        series.push(at(1_000_000
            + HISTORY_SAMPLES as u64
            + 10
            + HISTORY_WINDOW_MS));
        assert_eq!(series.samples.len(), 1);
    }
}
