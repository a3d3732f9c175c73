//! The node's audit trail: management actions appended to the hash-chained log in the store
//! directory (`[store] dir`, `audit.log`; see `gateway_store::audit`). Without a store the
//! actions are only logged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::loader::blocking;
use crate::store::audit::{Action, AuditLog, Entry};

/// The open log of the store directory in use.
#[derive(Default)]
pub(crate) struct Audit {
    log: Mutex<Option<(PathBuf, Arc<AuditLog>)>>,
}

impl Audit {
    /// The log of `dir`, opened (and its chain verified) the first time it is used.
    fn log_for(&self, dir: &Path) -> Result<Arc<AuditLog>, String> {
        let mut log = self.log.lock().expect("audit lock");
        if let Some((_, open)) = log.as_ref().filter(|(d, _)| d == dir) {
            return Ok(open.clone());
        }
        let opened = Arc::new(AuditLog::open(dir).map_err(|e| e.to_string())?);
        *log = Some((dir.to_path_buf(), opened.clone()));
        Ok(opened)
    }

    /// Appends `action` to the trail of the store in `dir`.
    pub(crate) async fn append(&self, dir: Option<PathBuf>, action: Action) {
        tracing::info!(
            target: "audit",
            actor = %action.actor,
            action = %action.action,
            target_name = %action.target,
            outcome = %action.outcome,
            "management action"
        );
        let Some(dir) = dir else { return };
        let log = match self.log_for(&dir) {
            Ok(log) => log,
            Err(e) => {
                tracing::error!(error = %e, "cannot open the audit log; the action is only logged");
                return;
            }
        };
        let at = crate::proxy::experiment::now_ms();
        if let Err(e) = blocking(move || log.append(at, action)).await {
            tracing::error!(error = %e, "cannot append to the audit log; the action is only logged");
        }
    }

    /// The trail of the store in `dir`, oldest first.
    pub(crate) async fn entries(&self, dir: Option<PathBuf>) -> Result<Vec<Entry>, String> {
        let dir = dir.ok_or("the audit trail needs a [store] dir in the config")?;
        let log = self.log_for(&dir)?;
        blocking(move || log.entries())
            .await
            .map_err(|e| e.to_string())
    }
}
