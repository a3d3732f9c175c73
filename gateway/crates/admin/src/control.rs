//! The narrow interface the admin API drives the gateway through ([`Control`]), and the
//! vocabulary it speaks: what a reload left ([`ReloadReport`]), what an upload or rollback
//! targets ([`Target`]) and made active ([`Activated`]), and why one changed nothing
//! ([`ArtifactError`]). The binary implements [`Control`] over its serving state.

use std::collections::VecDeque;
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
