//! Changing what serves: reloads (from the file, the admin API, SIGHUP, the watcher or
//! [`crate::Gateway::reload`]), uploads' activations, rollbacks and forgetting uploads. Each
//! runs under the one reload lock, builds through [`crate::loader::Loader`] and swaps only
//! once everything is built.

use std::sync::Arc;
use std::time::Instant;

use gateway_admin::{Activated, ArtifactError, ReloadReport, Target};

use crate::config::Config;
use crate::loader::{apply_record, blocking, read_record, with_record};
use crate::proxy::Snapshot;
use crate::server::{ServeCtx, StartError};
use crate::store::{Kind, Manifest, Store};

/// Why a reload from the config file did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The gateway was not started from a file.
    #[error("the gateway was not started from a config file; nothing to reload")]
    NoFile,
    /// The file is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Something in the new configuration could not be built.
    #[error(transparent)]
    Apply(#[from] StartError),
}

impl ReloadError {
    /// Metric label for the failure.
    pub fn kind(&self) -> &'static str {
        match self {
            ReloadError::NoFile => "no_file",
            ReloadError::Config(_) => "config",
            ReloadError::Apply(StartError::Tls(_)) => "tls",
            ReloadError::Apply(StartError::Plugin(_)) => "plugin",
            ReloadError::Apply(StartError::Model { .. }) => "model",
            ReloadError::Apply(StartError::Store(_)) => "store",
            ReloadError::Apply(StartError::Oci(_)) => "oci",
            ReloadError::Apply(_) => "other",
        }
    }
}

impl gateway_admin::Control for ServeCtx {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.state.load_full()
    }

    fn plugins(&self, snapshot: &Snapshot) -> Vec<gateway_admin::PluginStatus> {
        crate::plugin::chain::in_use(snapshot)
            .into_iter()
            .flatten()
            .map(|p| gateway_admin::PluginStatus {
                name: p.name.clone(),
                version: p.version.clone(),
                idle_instances: p.idle_instances(),
            })
            .collect()
    }

    fn last_reload(&self) -> Option<ReloadReport> {
        self.last_reload.lock().expect("reload report lock").clone()
    }

    fn recent_uploads(&self) -> &std::sync::Mutex<std::collections::VecDeque<Instant>> {
        &self.recent_uploads
    }

    async fn reload_from_file(&self, by: &str) -> Result<(), gateway_admin::ReloadRefused> {
        ServeCtx::reload_from_file(self, by)
            .await
            .map_err(|e| match e {
                ReloadError::NoFile => gateway_admin::ReloadRefused::NoFile(e.to_string()),
                e => gateway_admin::ReloadRefused::Failed(e.to_string()),
            })
    }

    async fn activate(
        &self,
        kind: Kind,
        name: &str,
        target: Target<'_>,
    ) -> Result<Activated, ArtifactError> {
        ServeCtx::activate(self, kind, name, target).await
    }

    async fn audit(&self, action: crate::store::audit::Action) {
        let dir = self.shared.state.load().config.store_dir.clone();
        self.audit.append(dir, action).await;
    }

    async fn audit_entries(&self) -> Result<Vec<crate::store::audit::Entry>, String> {
        let dir = self.shared.state.load().config.store_dir.clone();
        self.audit.entries(dir).await
    }

    async fn rollout_command(
        &self,
        name: &str,
        command: crate::proxy::experiment::Command,
    ) -> Result<gateway_rollout::Decision, gateway_admin::RolloutRefused> {
        crate::rollouts::command(self, name, command).await
    }

    async fn forget(
        &self,
        kind: Kind,
        name: &str,
        users: impl FnOnce(&Config) -> Vec<String> + Send,
    ) -> Result<(), ArtifactError> {
        ServeCtx::forget(self, kind, name, users).await
    }

    fn observed(&self) -> gateway_admin::Observations {
        self.observed.get()
    }
}

impl ServeCtx {
    /// Builds everything the new configuration needs, then swaps it in.
    pub(crate) async fn reload(&self, config: Config) -> Result<(), StartError> {
        let mut base = self.reload_lock.lock().await;
        self.apply_locked(&mut base, config).await
    }

    /// With the reload lock held: applies the store's record to `next` (the configuration as
    /// read), builds it and swaps it in; `base` becomes `next` once it serves.
    async fn apply_locked(&self, base: &mut Config, next: Config) -> Result<(), StartError> {
        let mut config = with_record(next.clone()).await?;
        // A reload resolves registry tags again (start and reload are when they are read).
        self.loader.oci.resolve(&mut config, true).await?;
        self.build_and_swap(config, None).await?;
        *base = next;
        Ok(())
    }

    /// With the reload lock held: builds `config`, writes `record` to the store when given
    /// (after everything loaded, before anything changes), then swaps. On error nothing
    /// changes.
    pub(crate) async fn build_and_swap(
        &self,
        config: Config,
        record: Option<(Store, Manifest)>,
    ) -> Result<(), StartError> {
        let current = self.shared.state.load_full();
        let built = self
            .loader
            .build(config, &self.shared.metrics, Some(&current), record)
            .await?;
        self.shared.state.store(Arc::new(built.snapshot));
        self.tls.store(built.tls);
        self.observed.note_versions(&self.shared.state.load());
        self.loader
            .oci
            .commit(&self.shared.state.load().config)
            .await;
        Ok(())
    }

    /// Reloads from the remembered file and records the outcome. The file and the store's
    /// record are read under the reload lock, so a reload never applies what an upload or
    /// another reload that finished before it replaced.
    pub(crate) async fn reload_from_file(&self, by: &str) -> Result<(), ReloadError> {
        let path = self.config_path.lock().expect("config path lock").clone();
        let path_shown = path
            .as_ref()
            .map_or_else(|| "-".to_string(), |p| p.display().to_string());
        let mut base = self.reload_lock.lock().await;
        let result = match path {
            None => Err(ReloadError::NoFile),
            Some(path) => match blocking(move || Config::load(&path)).await {
                Ok(next) => self
                    .apply_locked(&mut base, next)
                    .await
                    .map_err(ReloadError::from),
                Err(e) => Err(ReloadError::from(e)),
            },
        };
        match &result {
            Ok(()) => {
                self.reloads_ok.inc();
                tracing::info!("configuration reloaded");
            }
            Err(e) => {
                self.reloads.with_label_values(&[e.kind()]).inc();
                tracing::error!(error = %e, "reload failed; the previous configuration keeps serving");
            }
        }
        *self.last_reload.lock().expect("reload report lock") = Some(ReloadReport {
            at: std::time::SystemTime::now(),
            error: result.as_ref().err().map(|e| e.to_string()),
        });
        let dir = self.shared.state.load().config.store_dir.clone();
        self.audit
            .append(
                dir,
                crate::store::audit::Action {
                    actor: by.to_string(),
                    action: "reload".into(),
                    target: path_shown,
                    outcome: match &result {
                        Ok(()) => "ok".into(),
                        Err(e) => format!("refused: {e}"),
                    },
                },
            )
            .await;
        result
    }

    /// Makes `target` the active version of `name` in one serialized step: under the reload
    /// lock, reads the store's record, builds the configuration last read with the record
    /// as it will be, records it, and swaps. On error neither the record nor what serves
    /// changes. A model without uploads rolls back through the versions held in memory.
    pub(crate) async fn activate(
        &self,
        kind: Kind,
        name: &str,
        target: Target<'_>,
    ) -> Result<Activated, ArtifactError> {
        let base = self.reload_lock.lock().await;
        let configured = match kind {
            Kind::Plugin => base.plugins.iter().any(|p| p.name == name),
            Kind::Model => base.models.iter().any(|m| m.name == name),
        };
        if !configured {
            return Err(ArtifactError::NotConfigured(name.to_string()));
        }
        let source = match kind {
            Kind::Plugin => base
                .plugins
                .iter()
                .find(|p| p.name == name)
                .and_then(|p| p.oci.as_ref()),
            Kind::Model => base
                .models
                .iter()
                .find(|m| m.name == name)
                .and_then(|m| m.oci.as_ref()),
        };
        if let Some(source) = source {
            // Its registry source decides what it runs; an upload would be overridden by the
            // next resolution, so it is refused rather than silently not served.
            return Err(ArtifactError::Rejected(
                format!(
                    "{name:?} is pulled from {}; publish the new version to the registry \
                     (gateway {} publish) instead of uploading it",
                    source.reference,
                    kind.collection().trim_end_matches('s'),
                )
                .into(),
            ));
        }
        let stored = read_record(&base).await.map_err(ArtifactError::Store)?;
        let entry = stored
            .as_ref()
            .and_then(|(_, record)| record.entries(kind).get(name));
        let sha = match (target, entry) {
            (Target::Upload(sha), _) => sha,
            (Target::Rollback(version), Some(entry)) => entry
                .versions
                .iter()
                .find(|s| **s != entry.active && version.is_none_or(|v| s.starts_with(v)))
                .cloned()
                .ok_or_else(|| {
                    ArtifactError::NothingToRollBackTo(format!(
                        "{name:?} has no other version to roll back to"
                    ))
                })?,
            (Target::Rollback(version), None) if kind == Kind::Model => {
                let slot = self.shared.state.load().models.get(name).cloned();
                let slot = slot.ok_or_else(|| ArtifactError::NotConfigured(name.into()))?;
                let version = slot
                    .rollback(version)
                    .map_err(ArtifactError::NothingToRollBackTo)?;
                self.observed.note_versions(&self.shared.state.load());
                return Ok(Activated::Held { version, slot });
            }
            (Target::Rollback(_), None) if stored.is_none() => return Err(ArtifactError::NoStore),
            (Target::Rollback(_), None) => return Err(ArtifactError::NoUploads(name.to_string())),
        };
        let Some((store, mut record)) = stored else {
            return Err(ArtifactError::NoStore);
        };
        record.activate(kind, name, &sha);
        let mut config = base.clone();
        apply_record(&mut config, &store, &record);
        if let Err(e) = self.loader.oci.resolve(&mut config, false).await {
            return Err(ArtifactError::Rejected(Box::new(e)));
        }
        match self.build_and_swap(config, Some((store, record))).await {
            Ok(()) => Ok(Activated::Stored(sha)),
            Err(StartError::Store(e)) => Err(ArtifactError::Store(e)),
            Err(e) => Err(ArtifactError::Rejected(Box::new(e))),
        }
    }

    /// Forgets the uploads of `name` unless the serving configuration uses it (`users` lists
    /// what does), serialized with reloads, uploads and rollbacks.
    pub(crate) async fn forget(
        &self,
        kind: Kind,
        name: &str,
        users: impl FnOnce(&Config) -> Vec<String>,
    ) -> Result<(), ArtifactError> {
        let base = self.reload_lock.lock().await;
        let used = users(&self.shared.state.load().config);
        if !used.is_empty() {
            return Err(ArtifactError::InUse {
                name: name.to_string(),
                users: used.join(", "),
            });
        }
        let (store, _) = read_record(&base)
            .await
            .map_err(ArtifactError::Store)?
            .ok_or(ArtifactError::NoStore)?;
        let owned = name.to_string();
        match blocking(move || store.remove(kind, &owned)).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(ArtifactError::NoUploads(name.to_string())),
            Err(e) => Err(ArtifactError::Store(e)),
        }
    }
}
