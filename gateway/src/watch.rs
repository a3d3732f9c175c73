//! Reload on file changes: the config file, every file it names (certificates, keys,
//! plugins, models) and the store's record of active versions are watched through their
//! parent directories, so that editors' atomic saves (write a temp file, rename it over) and
//! Kubernetes ConfigMap updates (a `..data` symlink swapped to a new directory) are seen, not
//! just in-place writes.
//!
//! Events are debounced; after a quiet period the watched files are fingerprinted (their
//! content, following symlinks) and the gateway reloads only if the fingerprint changed. Only
//! files whose metadata changed since the last fingerprint are read and hashed again, so an
//! event does not re-read every model. A failed reload keeps the old state (see
//! [`crate::server::Gateway::reload_from_file`]).

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
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

/// What identifies a file's content without reading it: device, inode, length, and the
/// modification and status-change times (nanoseconds). A write changes the times, an atomic
/// save or a ConfigMap swap the inode.
type Stamp = (u64, u64, u64, i64, i64, i64, i64);

fn stamp(m: &std::fs::Metadata) -> Stamp {
    (
        m.dev(),
        m.ino(),
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    )
}

/// Fingerprints sets of files, re-reading only those whose [`Stamp`] changed since the last
/// time. Blocking file I/O: run it off the async workers.
#[derive(Default)]
pub struct Fingerprinter {
    known: HashMap<PathBuf, (Stamp, [u8; 32])>,
    /// Files read and hashed so far (for tests).
    reads: usize,
}

impl Fingerprinter {
    /// Hash of the content of `files` (missing files hash as absent).
    pub fn fingerprint(&mut self, files: &BTreeSet<PathBuf>) -> [u8; 32] {
        self.known.retain(|p, _| files.contains(p));
        let mut h = Sha256::new();
        for f in files {
            h.update(f.as_os_str().as_encoded_bytes());
            match self.digest(f) {
                Some(d) => {
                    h.update([1]);
                    h.update(d);
                }
                None => h.update([0]),
            }
        }
        h.finalize().into()
    }

    fn digest(&mut self, f: &Path) -> Option<[u8; 32]> {
        let Ok(meta) = std::fs::metadata(f) else {
            self.known.remove(f);
            return None;
        };
        let stamp = stamp(&meta);
        if let Some((known, digest)) = self.known.get(f) {
            if *known == stamp {
                return Some(*digest);
            }
        }
        let bytes = std::fs::read(f).ok()?;
        self.reads += 1;
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        self.known.insert(f.to_path_buf(), (stamp, digest));
        Some(digest)
    }
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
    let mut fingerprinter = Fingerprinter::default();
    let mut last = Some(fingerprinter.fingerprint(&files));
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
            let done = {
                let files = files.clone();
                let mut f = std::mem::take(&mut fingerprinter);
                tokio::task::spawn_blocking(move || {
                    let now = f.fingerprint(&files);
                    (f, now)
                })
                .await
            };
            let Ok((f, now)) = done else { continue };
            fingerprinter = f;
            if last == Some(now) {
                continue;
            }
            // Taken before the reload reads anything: a change while it runs is seen next time.
            last = Some(now);
            tracing::info!("watched files changed, reloading");
            if ctx.reload_from_file("watcher").await.is_ok() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_whose_metadata_changed_are_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.toml"), dir.path().join("model.bin"));
        std::fs::write(&a, "one").unwrap();
        std::fs::write(&b, vec![7u8; 1 << 20]).unwrap();
        let files = BTreeSet::from([a.clone(), b.clone()]);
        let mut f = Fingerprinter::default();
        let first = f.fingerprint(&files);
        assert_eq!(f.reads, 2);
        assert_eq!(f.fingerprint(&files), first);
        assert_eq!(f.reads, 2, "nothing changed, nothing is read");

        // An in-place write of the same length.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&a, "two").unwrap();
        let second = f.fingerprint(&files);
        assert_ne!(second, first);
        assert_eq!(f.reads, 3, "only the edited file is read");

        // An atomic save: a new file renamed over the old one, same content.
        let tmp = dir.path().join("a.toml.tmp");
        std::fs::write(&tmp, "two").unwrap();
        std::fs::rename(&tmp, &a).unwrap();
        assert_eq!(
            f.fingerprint(&files),
            second,
            "same content, same fingerprint"
        );
        assert_eq!(f.reads, 4);

        // A file that goes away and comes back.
        std::fs::remove_file(&a).unwrap();
        let gone = f.fingerprint(&files);
        assert_ne!(gone, second);
        std::fs::write(&a, "two").unwrap();
        assert_eq!(f.fingerprint(&files), second);
        assert_eq!(f.reads, 5);
    }
}
