//! Compiled components on disk, so that a plugin is compiled once per content, not on every
//! load, reload and restart: an 18 MB componentize-py component takes about 20 s of CPU to
//! compile and a few milliseconds to map back in.
//!
//! A file is `<dir>/<content SHA-256>-<engine key>.cwasm`, where the engine key is a hash of
//! wasmtime's [`Engine::precompile_compatibility_hash`] (its version, target and every
//! setting that changes code): an engine never reads code compiled for another. Files are
//! written to a temporary name and renamed, so a crash leaves a whole file or none. The
//! directory keeps the [`MAX_FILES`] most recently used files.
//!
//! Trust: deserializing compiled code runs it without validation, so the directory must be
//! as private as the content store next to it (by default `<store dir>/compiled`): whoever can
//! write there can already replace the plugins themselves.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use wasmtime::component::Component;
use wasmtime::Engine;

/// Compiled files kept; older ones (by last use) are removed when a new one is written.
pub const MAX_FILES: usize = 32;

/// The on-disk cache of one engine.
pub(crate) struct DiskCache {
    dir: PathBuf,
    engine_key: String,
}

impl DiskCache {
    /// The cache in `dir` (created on first write) for components compiled by `engine`.
    pub fn new(dir: &Path, engine: &Engine) -> DiskCache {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        DiskCache {
            dir: dir.to_path_buf(),
            engine_key: format!("{:016x}", h.finish()),
        }
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{}.cwasm", self.engine_key))
    }

    /// The component with content `sha256` compiled by an earlier run, if there is one that
    /// this engine can use. A file that cannot be used is removed.
    pub fn load(&self, engine: &Engine, sha256: &str) -> Option<Component> {
        let path = self.path(sha256);
        if !path.is_file() {
            return None;
        }
        // SAFETY: files here are written only by `save` below, from wasmtime's own
        // serialization, under a name keyed by this engine's compatibility hash; wasmtime
        // still checks the header, version and settings and refuses a mismatch. The
        // directory is as trusted as the content store (see the module documentation).
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => {
                // Mark it used, for eviction by age.
                let _ = std::fs::File::options()
                    .append(true)
                    .open(&path)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                Some(component)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "compiled plugin in the cache cannot be used; compiling again");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Writes `component` (content `sha256`) to the cache and removes the least recently
    /// used files past [`MAX_FILES`].
    pub fn save(&self, component: &Component, sha256: &str) -> Result<(), String> {
        let bytes = component.serialize().map_err(|e| format!("{e:#}"))?;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("creating {}: {e}", self.dir.display()))?;
        let path = self.path(sha256);
        let tmp = self.dir.join(format!(
            ".{sha256}-{}.{}.tmp",
            self.engine_key,
            std::process::id()
        ));
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("writing {}: {e}", path.display()));
        }
        self.evict();
        Ok(())
    }

    fn evict(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if files.len() <= MAX_FILES {
            return;
        }
        files.sort();
        for (_, path) in &files[..files.len() - MAX_FILES] {
            let _ = std::fs::remove_file(path);
        }
    }
}
