//! Reload on file changes: the config file, every file it names (certificates, keys,
//! plugins, models) and the store's record of active versions are watched through their
//! parent directories, so that editors' atomic saves (write a temp file, rename it over) and
//! Kubernetes ConfigMap updates (a `..data` symlink swapped to a new directory) are seen, not
//! just in-place writes.
//!
//! Events are debounced; after a quiet period the watched files are fingerprinted (their
//! content, following symlinks) and the gateway reloads only if the fingerprint changed. A
//! failed reload keeps the old state (see [`crate::server::Gateway::reload_from_file`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::server::ServeCtx;

/// Why watching could not start.
#[derive(Debug, thiserror::Error)]
#[error("watching config files: {0}")]
pub struct WatchError(#[from] notify::Error);

/// Keeps the watch alive; dropping it stops watching.
pub struct FileWatch {
    _task: tokio::task::JoinHandle<()>,
}

/// Every file a reload would read: the config, what it refers to, and the store's record of
/// active versions.
pub fn watched_files(config_path: &Path, config: Option<&Config>) -> BTreeSet<PathBuf> {
    let mut files = BTreeSet::from([config_path.to_path_buf()]);
    if let Some(c) = config {
        files.extend(c.store_dir.as_deref().map(crate::store::manifest_path));
        for cert in &c.certificates {
            files.insert(cert.cert_path.clone());
            files.insert(cert.key_path.clone());
        }
        files.extend(c.plugins.iter().map(|p| p.path.clone()));
        files.extend(c.models.iter().map(|m| m.path.clone()));
    }
    files
}

/// Hash of the content of `files` (missing files hash as absent).
pub fn fingerprint(files: &BTreeSet<PathBuf>) -> [u8; 32] {
    let mut h = Sha256::new();
    for f in files {
        h.update(f.as_os_str().as_encoded_bytes());
        match std::fs::read(f) {
            Ok(bytes) => {
                h.update([1]);
                h.update(Sha256::digest(&bytes));
            }
            Err(_) => h.update([0]),
        }
    }
    h.finalize().into()
}

fn directories(files: &BTreeSet<PathBuf>) -> BTreeSet<PathBuf> {
    files
        .iter()
        .filter_map(|f| {
            f.parent().map(|p| {
                if p.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    p.to_path_buf()
                }
            })
        })
        .collect()
}

/// Starts watching for `ctx`, reloading from `config_path` after `debounce` of quiet.
pub(crate) fn start(
    ctx: Arc<ServeCtx>,
    config_path: PathBuf,
    debounce: Duration,
) -> Result<FileWatch, WatchError> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
            let _ = tx.send(());
        }
    })?;
    let mut files = watched_files(&config_path, Some(&ctx.shared.state.load().config));
    let mut dirs = directories(&files);
    for d in &dirs {
        watcher.watch(d, RecursiveMode::NonRecursive)?;
    }
    let mut last = Some(fingerprint(&files));
    let task = tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Debounce: wait until no event has come for `debounce`.
            loop {
                match tokio::time::timeout(debounce, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let now = {
                let files = files.clone();
                tokio::task::spawn_blocking(move || fingerprint(&files)).await
            };
            let Ok(now) = now else { continue };
            if last == Some(now) {
                continue;
            }
            // Taken before the reload reads anything: a change while it runs is seen next time.
            last = Some(now);
            tracing::info!("watched files changed, reloading");
            if ctx.reload_from_file().await.is_ok() {
                // The new config may name other files; watch their directories too.
                let named = watched_files(&config_path, Some(&ctx.shared.state.load().config));
                if named != files {
                    // What the reload read of files not watched before is unknown: the next
                    // event reloads.
                    last = None;
                    files = named;
                }
                let wanted = directories(&files);
                for d in wanted.difference(&dirs) {
                    if let Err(e) = watcher.watch(d, RecursiveMode::NonRecursive) {
                        tracing::warn!(dir = %d.display(), error = %e, "cannot watch directory");
                    }
                }
                for d in dirs.difference(&wanted) {
                    let _ = watcher.unwatch(d);
                }
                dirs = wanted;
            }
        }
    });
    Ok(FileWatch { _task: task })
}
