//! The durable artifact store: uploaded plugins and models, addressed by their SHA-256, with a
//! small manifest of the versions of each name and which one is active.
//!
//! Every write is a temp file in the same directory, fsynced, renamed over the target, and the
//! directory fsynced; the manifest is written the same way and last. A crash at any point
//! leaves the previous manifest (the old version active) or the new one, never a half-written
//! file in use: a blob that no manifest names is merely unused.
//!
//! This crate also owns content identity, in one place: [`sha256_hex`] (a blob's name),
//! [`content_version`] (the short version plugins and models are reported by) and
//! [`check_pin`] (the one SHA-256 pin check that plugin loading, model loading and admin
//! uploads share), and the hash-chained audit trail of management actions ([`audit`]). It is
//! a leaf of the workspace: filesystem and hashing only.

pub mod audit;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What kind of artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A plugin component.
    Plugin,
    /// A model file.
    Model,
}

impl Kind {
    /// The plural name used for this kind's directory in the store and its collection in the
    /// admin API (`/admin/plugins/...`, `/admin/models/...`).
    pub fn collection(self) -> &'static str {
        match self {
            Kind::Plugin => "plugins",
            Kind::Model => "models",
        }
    }

    fn dir(self) -> &'static str {
        self.collection()
    }

    fn extension(self) -> &'static str {
        match self {
            Kind::Plugin => "wasm",
            Kind::Model => "safetensors",
        }
    }
}

/// Why the store could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("artifact store {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The manifest is not valid JSON of the expected shape.
    #[error("artifact store manifest {path} is corrupt: {reason}")]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The versions of one name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The active version's full SHA-256 (hex).
    pub active: String,
    /// Versions uploaded, newest first (the active one included).
    pub versions: Vec<String>,
}

/// What the store holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Plugins by name.
    #[serde(default)]
    pub plugins: BTreeMap<String, Entry>,
    /// Models by name.
    #[serde(default)]
    pub models: BTreeMap<String, Entry>,
}

impl Manifest {
    /// The entries of a kind.
    pub fn entries(&self, kind: Kind) -> &BTreeMap<String, Entry> {
        match kind {
            Kind::Plugin => &self.plugins,
            Kind::Model => &self.models,
        }
    }

    fn entries_mut(&mut self, kind: Kind) -> &mut BTreeMap<String, Entry> {
        match kind {
            Kind::Plugin => &mut self.plugins,
            Kind::Model => &mut self.models,
        }
    }

    /// Makes `sha` the active version of `name`, keeping the last [`KEEP`] (in memory only:
    /// [`Store::save`] records it).
    pub fn activate(&mut self, kind: Kind, name: &str, sha: &str) {
        let entry = self.entries_mut(kind).entry(name.to_string()).or_default();
        entry.versions.retain(|v| v != sha);
        entry.versions.insert(0, sha.to_string());
        entry.versions.truncate(KEEP);
        entry.active = sha.to_string();
    }
}

/// Versions kept per name.
pub const KEEP: usize = 5;

/// A content-addressed directory of artifacts.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically and durably.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

/// An upload being written into a [`Store`] by [`Store::stage`].
pub struct Staged {
    file: Option<std::io::BufWriter<std::fs::File>>,
    path: PathBuf,
    kind: Kind,
    hasher: Sha256,
    len: u64,
}

impl Staged {
    /// Appends `chunk` to the upload.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        let file = self
            .file
            .as_mut()
            .expect("a Staged holds its file until commit");
        file.write_all(chunk).map_err(io(&self.path))?;
        self.hasher.update(chunk);
        self.len += chunk.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Hex SHA-256 of what was written so far.
    pub fn sha256(&self) -> String {
        self.hasher
            .clone()
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The manifest of a store in `dir`: the record of the versions each name has and which is
/// active.
pub fn manifest_path(dir: &Path) -> PathBuf {
    dir.join("manifest.json")
}

/// Hex SHA-256 of `bytes`: the name a blob is stored under.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A short, stable version id: the first 12 hex digits of the content's SHA-256 (the prefix
/// of its [`sha256_hex`]). Plugins and models are reported and compared by it.
pub fn content_version(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Content that is not the one its pin names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("content SHA-256 {found} does not match the pinned {expected}")]
pub struct PinMismatch {
    /// The pin (hex SHA-256, as configured).
    pub expected: String,
    /// What the content hashes to.
    pub found: String,
}

/// The one SHA-256 pin check: `Ok` when there is no pin or the content hashes to it. Each
/// caller (plugin loading, model loading, admin uploads) words the refusal its own way.
pub fn check_pin(bytes: &[u8], pin: Option<&str>) -> Result<(), PinMismatch> {
    let Some(expected) = pin else {
        return Ok(());
    };
    let found = sha256_hex(bytes);
    if found == expected {
        Ok(())
    } else {
        Err(PinMismatch {
            expected: expected.to_string(),
            found,
        })
    }
}

impl Store {
    /// Opens (creating if needed) a store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        for kind in [Kind::Plugin, Kind::Model] {
            let d = dir.join(kind.dir());
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        Ok(Store {
            dir: dir.to_path_buf(),
        })
    }

    fn manifest_path(&self) -> PathBuf {
        manifest_path(&self.dir)
    }

    /// Saves a small named record (a rollout's state, JSON) as `state/<name>.json`, atomically
    /// and durably. `name` is a config name (letters, digits, `-`, `_`, `.`).
    pub fn save_record(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let dir = self.dir.join("state");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        write_atomic(&dir.join(format!("{name}.json")), bytes)
    }

    /// Every named record saved with [`Store::save_record`], by name.
    pub fn records(&self) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
        let dir = self.dir.join("state");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => {
                return Err(StoreError::Io {
                    path: dir,
                    source: e,
                })
            }
        };
        let mut out = BTreeMap::new();
        for entry in entries {
            let path = entry.map_err(io(&dir))?.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .filter(|n| !n.starts_with('.'))
            else {
                continue;
            };
            out.insert(name.to_string(), std::fs::read(&path).map_err(io(&path))?);
        }
        Ok(out)
    }

    /// The manifest (empty when none was written yet).
    pub fn manifest(&self) -> Result<Manifest, StoreError> {
        let path = self.manifest_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Manifest {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Manifest::default()),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    /// Where the blob of a version lives.
    pub fn blob_path(&self, kind: Kind, sha: &str) -> PathBuf {
        self.dir
            .join(kind.dir())
            .join(format!("{sha}.{}", kind.extension()))
    }

    /// Stores `bytes` (if not already there) and returns its SHA-256 and whether this call
    /// wrote it; the manifest is untouched, so nothing uses it yet.
    pub fn put(&self, kind: Kind, bytes: &[u8]) -> Result<(String, bool), StoreError> {
        let sha = sha256_hex(bytes);
        let path = self.blob_path(kind, &sha);
        if path.is_file() {
            return Ok((sha, false));
        }
        write_atomic(&path, bytes)?;
        Ok((sha, true))
    }

    /// Starts writing an upload of `kind` into the store, hashed as it is written, so that a
    /// large one never has to be held in memory. Nothing can see it until [`Store::commit`];
    /// a [`Staged`] dropped before that removes its file.
    pub fn stage(&self, kind: Kind) -> Result<Staged, StoreError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.dir.join(kind.dir()).join(format!(
            ".upload-{}-{n}.{}.part",
            std::process::id(),
            kind.extension()
        ));
        let file = std::fs::File::create(&path).map_err(io(&path))?;
        Ok(Staged {
            file: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
            path,
            kind,
            hasher: Sha256::new(),
            len: 0,
        })
    }

    /// Makes a staged upload a blob of the store (durably: synced, renamed, directory synced)
    /// and returns its SHA-256 and whether this call wrote it (false when the store already
    /// had that content); the manifest is untouched, so nothing uses it yet.
    pub fn commit(&self, mut staged: Staged) -> Result<(String, bool), StoreError> {
        let sha = staged.sha256();
        let path = self.blob_path(staged.kind, &sha);
        let file = staged
            .file
            .take()
            .expect("a Staged holds its file until commit");
        if path.is_file() {
            drop(file);
            let _ = std::fs::remove_file(&staged.path);
            return Ok((sha, false));
        }
        let file = file
            .into_inner()
            .map_err(|e| io(&staged.path)(e.into_error()))?;
        file.sync_all().map_err(io(&staged.path))?;
        drop(file);
        std::fs::rename(&staged.path, &path).map_err(io(&path))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
        Ok((sha, true))
    }

    /// Makes `sha` the active version of `name` and records it, keeping the last [`KEEP`].
    pub fn activate(&self, kind: Kind, name: &str, sha: &str) -> Result<Manifest, StoreError> {
        let mut manifest = self.manifest()?;
        manifest.activate(kind, name, sha);
        self.save(&manifest)?;
        Ok(manifest)
    }

    /// Forgets `name` (its blobs stay until overwritten by nothing: they are small and
    /// content-addressed).
    pub fn remove(&self, kind: Kind, name: &str) -> Result<bool, StoreError> {
        let mut manifest = self.manifest()?;
        let removed = manifest.entries_mut(kind).remove(name).is_some();
        if removed {
            self.save(&manifest)?;
        }
        Ok(removed)
    }

    /// Writes `manifest` atomically and durably: the record of what is active.
    pub fn save(&self, manifest: &Manifest) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(manifest).expect("manifest serializes");
        write_atomic(&self.manifest_path(), &bytes)
    }

    /// The active blob of each name of a kind.
    pub fn active(&self, kind: Kind) -> Result<BTreeMap<String, PathBuf>, StoreError> {
        Ok(self
            .manifest()?
            .entries(kind)
            .iter()
            .map(|(name, e)| (name.clone(), self.blob_path(kind, &e.active)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staged_upload_is_hashed_as_written_and_leaves_nothing_unless_committed() {
        let dir = tempfile_dir();
        let store = Store::open(&dir).unwrap();
        let parts = |s: &Store| {
            std::fs::read_dir(s.dir.join(Kind::Model.dir()))
                .unwrap()
                .count()
        };
        let mut staged = store.stage(Kind::Model).unwrap();
        staged.write(b"version ").unwrap();
        staged.write(b"a").unwrap();
        assert_eq!(staged.len(), 9);
        assert_eq!(staged.sha256(), sha256_hex(b"version a"));
        drop(staged);
        assert_eq!(parts(&store), 0, "an abandoned upload leaves no file");

        let mut staged = store.stage(Kind::Model).unwrap();
        staged.write(b"version a").unwrap();
        let (sha, created) = store.commit(staged).unwrap();
        assert!(created);
        assert_eq!(sha, sha256_hex(b"version a"));
        assert_eq!(
            std::fs::read(store.blob_path(Kind::Model, &sha)).unwrap(),
            b"version a"
        );
        let mut again = store.stage(Kind::Model).unwrap();
        again.write(b"version a").unwrap();
        assert_eq!(store.commit(again).unwrap(), (sha, false));
        assert_eq!(parts(&store), 1, "the same content is stored once");
    }

    #[test]
    fn put_activate_and_reopen() {
        let dir = tempfile_dir();
        let store = Store::open(&dir).unwrap();
        let (a, created) = store.put(Kind::Plugin, b"version a").unwrap();
        assert!(created);
        assert!(
            !store.put(Kind::Plugin, b"version a").unwrap().1,
            "content-addressed: stored once"
        );
        assert!(
            store.manifest().unwrap().plugins.is_empty(),
            "a put alone activates nothing"
        );
        store.activate(Kind::Plugin, "p", &a).unwrap();
        let (b, _) = store.put(Kind::Plugin, b"version b").unwrap();
        store.activate(Kind::Plugin, "p", &b).unwrap();
        let reopened = Store::open(&dir).unwrap();
        let m = reopened.manifest().unwrap();
        assert_eq!(m.plugins["p"].active, b);
        assert_eq!(m.plugins["p"].versions, vec![b.clone(), a.clone()]);
        assert_eq!(
            std::fs::read(reopened.blob_path(Kind::Plugin, &a)).unwrap(),
            b"version a"
        );
        assert!(reopened.remove(Kind::Plugin, "p").unwrap());
        assert!(reopened.manifest().unwrap().plugins.is_empty());
        std::fs::write(dir.join("manifest.json"), "{not json").unwrap();
        assert!(matches!(
            reopened.manifest(),
            Err(StoreError::Manifest { .. })
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn versions_are_prefixes_of_the_hash_and_pins_compare_it() {
        let hash = sha256_hex(b"abc");
        assert_eq!(
            hash,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(content_version(b"abc"), hash[..12]);
        assert_eq!(check_pin(b"abc", None), Ok(()));
        assert_eq!(check_pin(b"abc", Some(&hash)), Ok(()));
        let other = sha256_hex(b"abd");
        assert_eq!(
            check_pin(b"abc", Some(&other)),
            Err(PinMismatch {
                expected: other.clone(),
                found: hash.clone(),
            })
        );
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "gw-store-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn records_round_trip_and_replace_atomically() {
        let dir = tempfile_dir();
        let store = Store::open(&dir).unwrap();
        assert!(store.records().unwrap().is_empty());
        store.save_record("exp-a", b"{\"step\":1}").unwrap();
        store.save_record("exp-a", b"{\"step\":2}").unwrap();
        store.save_record("exp.b", b"{}").unwrap();
        let records = store.records().unwrap();
        assert_eq!(records.len(), 2, "{records:?}");
        assert_eq!(records["exp-a"], b"{\"step\":2}");
        assert!(std::fs::read_dir(dir.join("state")).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".tmp-")));
    }
}
