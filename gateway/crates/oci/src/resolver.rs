//! What each registry source resolved to, kept in memory and in the store
//! (`<store>/oci/resolved.json`), and the step that points a configuration's registry
//! sources at their pulled blobs before it is built.
//!
//! The record on disk is what lets a node start while its registry is down: a reference whose
//! last resolved digest is still in the store is served from there (with a warning), as is a
//! tag whose new digest cannot be pulled or is refused. With nothing pulled before, a failure
//! is an error: the start (or reload) fails and says why.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gateway_config::{Config, OciSource};
use gateway_store::{Kind, Store};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::{Deserialize, Serialize};

use crate::client::{pull, read_credentials, resolve, Verify};
use crate::OciError;

/// The series of registry pulls, registered into the registry the gateway passes in.
#[derive(Clone)]
pub struct OciMetrics {
    /// `gateway_oci_pulls_total{artifact,outcome}`.
    pub pulls: IntCounterVec,
    /// `gateway_artifact_info{kind,name,reference,digest}`.
    pub info: IntGaugeVec,
}

impl OciMetrics {
    /// Creates and registers the series.
    pub fn new(registry: &Registry) -> Result<OciMetrics, prometheus::Error> {
        let pulls = IntCounterVec::new(
            Opts::new(
                "gateway_oci_pulls_total",
                "Registry resolutions and pulls of plugins and models by artifact (kind/name) \
                 and outcome: pulled (a new digest verified and stored), registry_error (the \
                 registry unreachable or answering an error), digest_mismatch (content that is \
                 not what the manifest names), bad_format (unexpected media types or layers), \
                 too_large, signature, credentials, store.",
            ),
            &["artifact", "outcome"],
        )?;
        let info = IntGaugeVec::new(
            Opts::new(
                "gateway_artifact_info",
                "1 for each plugin and model pulled from a registry: the reference configured \
                 and the manifest digest that serves.",
            ),
            &["kind", "name", "reference", "digest"],
        )?;
        registry.register(Box::new(pulls.clone()))?;
        registry.register(Box::new(info.clone()))?;
        Ok(OciMetrics { pulls, info })
    }
}

/// A registry source that could not be pulled, with nothing pulled before to fall back to.
#[derive(Debug, thiserror::Error)]
#[error("{artifact}: {source}")]
pub struct SourceError {
    /// `plugin/NAME` or `model/NAME` (`*` when no entry is at fault).
    pub artifact: String,
    /// What went wrong.
    pub source: OciError,
}

/// What a reference resolved to and where its content is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Known {
    /// The reference as configured.
    reference: String,
    /// Its manifest digest (`sha256:...`).
    digest: String,
    /// The content's SHA-256 (hex): the blob's name in the store.
    sha256: String,
}

/// Resolves registry sources, pulls them into the store and remembers what they resolved to.
pub struct Resolver {
    metrics: OciMetrics,
    /// What serves, by `kind/name` (committed by [`Resolver::commit`] once a configuration
    /// serves); the record on disk is read when an entry is missing here.
    serving: Mutex<HashMap<String, Known>>,
    /// Digests the background check pulled for a rebuild, not serving yet.
    pending: Mutex<HashMap<String, Known>>,
    /// Serializes writes of the record on disk.
    write: Arc<Mutex<()>>,
    /// One pull at a time: the background check and a reload can want the same digest, and
    /// the store's temp file for a blob is named by the process, not the writer.
    pulling: tokio::sync::Mutex<()>,
}

/// A registry source of a configuration: its kind, name and source.
struct Entry<'a> {
    kind: Kind,
    name: &'a str,
    source: &'a OciSource,
}

impl Entry<'_> {
    fn key(&self) -> String {
        artifact_label(self.kind, self.name)
    }
}

/// `plugin/NAME` or `model/NAME`: the `artifact` label and the record's key.
fn artifact_label(kind: Kind, name: &str) -> String {
    format!("{}/{name}", kind.collection().trim_end_matches('s'))
}

fn record_path(store_dir: &Path) -> PathBuf {
    store_dir.join("oci").join("resolved.json")
}

impl Resolver {
    /// A resolver counting into `registry`.
    pub fn new(registry: &Registry) -> Result<Resolver, prometheus::Error> {
        Ok(Resolver {
            metrics: OciMetrics::new(registry)?,
            serving: Mutex::default(),
            pending: Mutex::default(),
            write: Arc::default(),
            pulling: tokio::sync::Mutex::new(()),
        })
    }

    /// The series it counts into.
    pub fn metrics(&self) -> &OciMetrics {
        &self.metrics
    }

    /// Points every registry source of `config` at its pulled blob in the store and records
    /// the digest it serves (`OciSource::resolved`). Tags are resolved over the network when
    /// `refresh` is set (start and reload) or when nothing is known of them; otherwise (an
    /// upload, a rollback, the rebuild after a tag moved) the digest the background check
    /// pulled, else the one serving, is used.
    /// A resolution or pull that fails, or an artifact that is refused, falls back to the
    /// digest last resolved for the same reference when the store still holds it (logged
    /// and counted); without one it is an error naming the artifact.
    pub async fn prepare(&self, config: &mut Config, refresh: bool) -> Result<(), SourceError> {
        let entries: Vec<(Kind, usize)> = config
            .plugins
            .iter()
            .enumerate()
            .filter(|(_, p)| p.oci.is_some())
            .map(|(i, _)| (Kind::Plugin, i))
            .chain(
                config
                    .models
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| m.oci.is_some())
                    .map(|(i, _)| (Kind::Model, i)),
            )
            .collect();
        if entries.is_empty() {
            return Ok(());
        }
        let whole = |source: OciError| SourceError {
            artifact: "*".to_string(),
            source,
        };
        let Some(dir) = config.store_dir.clone() else {
            return Err(whole(OciError::Invalid(
                "registry sources need [store] dir".to_string(),
            )));
        };
        let store = blocking({
            let dir = dir.clone();
            move || Store::open(&dir)
        })
        .await
        .map_err(|e| whole(e.into()))?;
        let verify = Verify {
            max_bytes: config.admin.max_upload_bytes,
            trusted_keys: &config.trusted_keys,
            require_signatures: config.require_signatures,
        };
        let mut chosen = Vec::new();
        for &(kind, i) in &entries {
            let (name, source) = match kind {
                Kind::Plugin => (&config.plugins[i].name, &config.plugins[i].oci),
                Kind::Model => (&config.models[i].name, &config.models[i].oci),
            };
            let entry = Entry {
                kind,
                name,
                source: source.as_ref().expect("filtered on oci"),
            };
            let known = self
                .choose(&entry, &store, &dir, refresh, verify)
                .await
                .map_err(|source| SourceError {
                    artifact: entry.key(),
                    source,
                })?;
            chosen.push((kind, i, known));
        }
        for (kind, i, known) in chosen {
            let path = store.blob_path(kind, &known.sha256);
            let (spec_path, oci) = match kind {
                Kind::Plugin => {
                    let p = &mut config.plugins[i];
                    (&mut p.path, &mut p.oci)
                }
                Kind::Model => {
                    let m = &mut config.models[i];
                    (&mut m.path, &mut m.oci)
                }
            };
            *spec_path = path;
            if let Some(o) = oci {
                o.resolved = Some(known.digest);
            }
        }
        Ok(())
    }

    /// The digest one entry serves: resolved (or known), pulled when the store lacks it, or
    /// the fallback.
    async fn choose(
        &self,
        entry: &Entry<'_>,
        store: &Store,
        dir: &Path,
        refresh: bool,
        verify: Verify<'_>,
    ) -> Result<Known, OciError> {
        let reference = entry.source.reference.to_string();
        let serving = self.last_known(entry, dir, &reference).await;
        let pending = (!refresh)
            .then(|| {
                self.pending
                    .lock()
                    .expect("pending lock")
                    .get(&entry.key())
                    .cloned()
            })
            .flatten()
            .filter(|k| k.reference == reference);
        let held = |k: &Known| store.blob_path(entry.kind, &k.sha256).is_file();
        // Only what served (or was recorded serving before a restart) is a fallback: a
        // pulled version that failed to load is not.
        let fallback = serving.clone().filter(|k| held(k));
        let last = pending.or(serving);
        let pinned = entry.source.reference.digest.clone();
        // What the reference names now.
        let digest = match (&pinned, &last) {
            (Some(d), _) => d.clone(),
            (None, Some(k)) if !refresh && held(k) => return Ok(k.clone()),
            (None, _) => {
                let resolved = match read_credentials(entry.source.credentials_file.as_deref()) {
                    Ok(auth) => resolve(&entry.source.reference, &auth).await,
                    Err(e) => Err(e),
                };
                match resolved {
                    Ok(d) => d,
                    Err(e) => return self.fall_back(entry, e, fallback),
                }
            }
        };
        if let Some(k) = last.as_ref().filter(|k| k.digest == digest && held(k)) {
            return Ok(k.clone());
        }
        match self.fetch(entry, &digest, store, verify).await {
            Ok(k) => Ok(k),
            // A pinned reference never falls back to other content.
            Err(e) if pinned.is_some() => {
                self.count(entry, e.outcome());
                Err(e)
            }
            Err(e) => self.fall_back(entry, e, fallback),
        }
    }

    fn fall_back(
        &self,
        entry: &Entry<'_>,
        error: OciError,
        fallback: Option<Known>,
    ) -> Result<Known, OciError> {
        self.count(entry, error.outcome());
        match fallback {
            Some(k) => {
                tracing::warn!(
                    target: "oci",
                    artifact = %entry.key(),
                    reference = %k.reference,
                    serving = %k.digest,
                    error = %error,
                    "registry pull failed; serving the digest last pulled, from the store"
                );
                Ok(k)
            }
            None => Err(error),
        }
    }

    /// What serves for `entry` with the same reference: in memory, else on disk (what served
    /// before a restart).
    async fn last_known(&self, entry: &Entry<'_>, dir: &Path, reference: &str) -> Option<Known> {
        let key = entry.key();
        let in_memory = self
            .serving
            .lock()
            .expect("serving lock")
            .get(&key)
            .cloned();
        let known = match in_memory {
            Some(k) => Some(k),
            None => {
                let path = record_path(dir);
                blocking(move || read_record(&path)).await.remove(&key)
            }
        };
        known.filter(|k| k.reference == reference)
    }

    /// Pulls `digest` of `entry`, verifies it and keeps it in the store.
    async fn fetch(
        &self,
        entry: &Entry<'_>,
        digest: &str,
        store: &Store,
        verify: Verify<'_>,
    ) -> Result<Known, OciError> {
        let _one = self.pulling.lock().await;
        let auth = read_credentials(entry.source.credentials_file.as_deref())?;
        let pulled = pull(entry.kind, &entry.source.reference, digest, &auth, verify).await?;
        let (kind, store2) = (entry.kind, store.clone());
        let sha256 = blocking(move || store2.put(kind, &pulled.bytes)).await?.0;
        let known = Known {
            reference: entry.source.reference.to_string(),
            digest: pulled.manifest_digest,
            sha256,
        };
        self.count(entry, "pulled");
        tracing::info!(
            target: "oci",
            artifact = %entry.key(),
            reference = %known.reference,
            digest = %known.digest,
            "pulled and verified"
        );
        Ok(known)
    }

    /// Records what `config` (which now serves) runs from registries: in memory, in
    /// `gateway_artifact_info`, and on disk for the next start's fallback. Digests pulled for
    /// it stop being pending.
    pub async fn commit(&self, config: &Config) {
        let mut now = BTreeMap::new();
        self.metrics.info.reset();
        let entries = config
            .plugins
            .iter()
            .map(|p| (Kind::Plugin, &p.name, &p.oci, &p.path))
            .chain(
                config
                    .models
                    .iter()
                    .map(|m| (Kind::Model, &m.name, &m.oci, &m.path)),
            );
        for (kind, name, oci, path) in entries {
            let Some(OciSource {
                reference,
                resolved: Some(digest),
                ..
            }) = oci
            else {
                continue;
            };
            let label = kind.collection().trim_end_matches('s');
            self.metrics
                .info
                .with_label_values(&[label, name.as_str(), &reference.to_string(), digest])
                .set(1);
            let sha256 = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            now.insert(
                artifact_label(kind, name),
                Known {
                    reference: reference.to_string(),
                    digest: digest.clone(),
                    sha256,
                },
            );
        }
        {
            let mut pending = self.pending.lock().expect("pending lock");
            pending.retain(|key, k| now.get(key).is_none_or(|n| n.digest != k.digest));
        }
        let changed = {
            let mut serving = self.serving.lock().expect("serving lock");
            let changed = now.iter().any(|(k, v)| serving.get(k) != Some(v));
            *serving = now.clone().into_iter().collect();
            changed
        };
        let Some(dir) = config.store_dir.clone().filter(|_| changed) else {
            return;
        };
        let write = self.write.clone();
        // Blocking I/O off the async workers, one writer at a time (read, update, replace):
        // entries of names this configuration does not pull are kept for a later one.
        let written = blocking(move || {
            let _one = write.lock().expect("record write lock");
            let path = record_path(&dir);
            let mut record = read_record(&path);
            record.extend(now);
            write_record(&path, &record)
        })
        .await;
        if let Err(e) = written {
            tracing::warn!(target: "oci", error = %e, "could not record the registry digests that serve; a start with the registry down cannot fall back to them");
        }
    }

    /// Forgets a digest the background check pulled whose rebuild failed, so that later
    /// builds (uploads, rollbacks) keep what serves.
    pub fn drop_pending(&self, kind: Kind, name: &str) {
        self.pending
            .lock()
            .expect("pending lock")
            .remove(&artifact_label(kind, name));
    }

    fn count(&self, entry: &Entry<'_>, outcome: &str) {
        self.metrics
            .pulls
            .with_label_values(&[entry.key().as_str(), outcome])
            .inc();
    }

    /// The background check of one tag source of the serving configuration: resolves it and,
    /// when it names another digest than `serving`, pulls, verifies and stores it, so that a
    /// rebuild ([`Resolver::prepare`] without refresh) loads it. `Ok(None)`: unchanged.
    /// Failures are counted and logged here; what serves is untouched.
    pub async fn check_tag(
        &self,
        config: &Config,
        kind: Kind,
        name: &str,
    ) -> Result<Option<String>, OciError> {
        let source = match kind {
            Kind::Plugin => config
                .plugins
                .iter()
                .find(|p| p.name == name)
                .and_then(|p| p.oci.as_ref()),
            Kind::Model => config
                .models
                .iter()
                .find(|m| m.name == name)
                .and_then(|m| m.oci.as_ref()),
        };
        let (Some(source), Some(dir)) = (source, config.store_dir.as_deref()) else {
            return Ok(None);
        };
        let entry = Entry { kind, name, source };
        let result = async {
            let auth = read_credentials(source.credentials_file.as_deref())?;
            let digest = resolve(&source.reference, &auth).await?;
            if source.resolved.as_deref() == Some(digest.as_str()) {
                return Ok(None);
            }
            let store = {
                let dir = dir.to_path_buf();
                blocking(move || Store::open(&dir)).await?
            };
            let verify = Verify {
                max_bytes: config.admin.max_upload_bytes,
                trusted_keys: &config.trusted_keys,
                require_signatures: config.require_signatures,
            };
            let known = self.fetch(&entry, &digest, &store, verify).await?;
            let digest = known.digest.clone();
            self.pending
                .lock()
                .expect("pending lock")
                .insert(entry.key(), known);
            Ok::<_, OciError>(Some(digest))
        }
        .await;
        if let Err(e) = &result {
            self.count(&entry, e.outcome());
            tracing::warn!(
                target: "oci",
                artifact = %entry.key(),
                reference = %source.reference,
                serving = source.resolved.as_deref().unwrap_or("-"),
                error = %e,
                "re-resolving the tag failed; what serves is unchanged"
            );
        }
        result
    }
}

fn read_record(path: &Path) -> BTreeMap<String, Known> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            // A damaged record only costs the offline fallback: the next pull rewrites it.
            tracing::warn!(target: "oci", file = %path.display(), error = %e, "unreadable record of resolved registry sources; ignored");
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    }
}

/// Writes the record atomically and durably (temp file, fsync, rename, directory fsync), as
/// the store writes its manifest.
fn write_record(path: &Path, record: &BTreeMap<String, Known>) -> Result<(), OciError> {
    use std::io::Write;
    let dir = path.parent().expect("the record is in a directory");
    let io = |source: std::io::Error| {
        OciError::Store(gateway_store::StoreError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = dir.join(format!(".resolved.json.tmp-{}", std::process::id()));
    let bytes = serde_json::to_vec_pretty(record).expect("the record serializes");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

/// Runs blocking work (file I/O, hashing, fsync) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("a blocking task of the registry resolver panicked")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_round_trips_and_a_damaged_one_is_empty() {
        let dir = std::env::temp_dir().join(format!("oci-record-{}", std::process::id()));
        let path = record_path(&dir);
        let mut record = BTreeMap::new();
        record.insert(
            "plugin/p".to_string(),
            Known {
                reference: "oci://127.0.0.1:5000/p:v1".into(),
                digest: format!("sha256:{}", "a".repeat(64)),
                sha256: "b".repeat(64),
            },
        );
        write_record(&path, &record).unwrap();
        assert_eq!(read_record(&path), record);
        std::fs::write(&path, b"{not json").unwrap();
        assert!(read_record(&path).is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
