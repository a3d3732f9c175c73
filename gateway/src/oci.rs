//! Plugins and models pulled from OCI registries (`source = "oci://..."`), wired into the
//! gateway: the resolution step every build goes through ([`Sources::resolve`]), the record
//! of what serves ([`Sources::commit`]), and the background task that re-resolves tags and
//! rebuilds through the same serialized, all-or-nothing path as every other change
//! ([`run`]). The registry work itself is `gateway-oci`'s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::Registry;

use crate::config::Config;
use crate::loader::with_record;
use crate::server::{ServeCtx, StartError};
use crate::store::Kind;
use gateway_oci::Resolver;

/// The gateway's registry sources: the resolver, made on first use (only configurations that
/// pull from a registry register its series).
pub(crate) struct Sources {
    registry: Registry,
    resolver: Mutex<Option<Arc<Resolver>>>,
}

impl Sources {
    pub(crate) fn new(registry: Registry) -> Sources {
        Sources {
            registry,
            resolver: Mutex::new(None),
        }
    }

    fn resolver(&self) -> Result<Arc<Resolver>, StartError> {
        let mut r = self.resolver.lock().expect("resolver lock");
        if let Some(r) = r.as_ref() {
            return Ok(r.clone());
        }
        let made = Arc::new(
            Resolver::new(&self.registry)
                .map_err(|e| StartError::Metrics(crate::metrics::MetricsError::from(e)))?,
        );
        Ok(r.insert(made).clone())
    }

    fn existing(&self) -> Option<Arc<Resolver>> {
        self.resolver.lock().expect("resolver lock").clone()
    }

    /// Points `config`'s registry sources at their pulled blobs (see
    /// [`Resolver::prepare`]): tags resolved again when `refresh` (start, reload), else the
    /// digest pulled for a pending rebuild or the one serving.
    pub(crate) async fn resolve(
        &self,
        config: &mut Config,
        refresh: bool,
    ) -> Result<(), StartError> {
        if !has_sources(config) {
            return Ok(());
        }
        self.resolver()?
            .prepare(config, refresh)
            .await
            .map_err(StartError::Oci)
    }

    /// Records what `config`, now serving, runs from registries.
    pub(crate) async fn commit(&self, config: &Config) {
        if let Some(r) = self.existing() {
            r.commit(config).await;
        }
    }
}

fn has_sources(config: &Config) -> bool {
    config.plugins.iter().any(|p| p.oci.is_some()) || config.models.iter().any(|m| m.oci.is_some())
}

/// How often the background task looks for tags that are due: the finest interval it honours.
const TICK: Duration = Duration::from_millis(250);

/// Re-resolves the serving configuration's tag sources, each on its own
/// `oci_resolve_interval_s`; when one names a new digest that pulls and verifies, rebuilds the
/// configuration last loaded with it (under the reload lock, all or nothing). A failed pull
/// or rebuild is counted and logged and leaves what serves in place; a digest whose rebuild
/// failed is not tried again until the tag moves.
pub(crate) async fn run(ctx: Arc<ServeCtx>) {
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut refused: HashMap<String, String> = HashMap::new();
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        let Some(resolver) = ctx.loader.oci.existing() else {
            continue;
        };
        let config = ctx.shared.state.load().config.clone();
        let tags: Vec<(Kind, String, String, Duration)> = config
            .plugins
            .iter()
            .map(|p| (Kind::Plugin, &p.name, &p.oci))
            .chain(config.models.iter().map(|m| (Kind::Model, &m.name, &m.oci)))
            .filter_map(|(kind, name, oci)| {
                let o = oci.as_ref()?;
                (!o.reference.is_pinned() && !o.resolve_interval.is_zero()).then(|| {
                    (
                        kind,
                        name.clone(),
                        o.reference.to_string(),
                        o.resolve_interval,
                    )
                })
            })
            .collect();
        let now = Instant::now();
        due.retain(|key, _| tags.iter().any(|(k, n, r, _)| *key == key_of(*k, n, r)));
        for (kind, name, reference, interval) in tags {
            let key = key_of(kind, &name, &reference);
            let next = due.entry(key.clone()).or_insert(now + interval);
            if now < *next {
                continue;
            }
            *next = now + interval;
            let digest = match resolver.check_tag(&config, kind, &name).await {
                Ok(Some(d)) => d,
                Ok(None) | Err(_) => continue,
            };
            if refused.get(&key) == Some(&digest) {
                resolver.drop_pending(kind, &name);
                continue;
            }
            tracing::info!(target: "oci", artifact = %key, %digest, "tag moved; rebuilding with the new version");
            let outcome = match ctx.rebuild_with_sources().await {
                Ok(()) => {
                    refused.remove(&key);
                    "ok".to_string()
                }
                Err(e) => {
                    resolver.drop_pending(kind, &name);
                    ctx.reloads.with_label_values(&["oci"]).inc();
                    tracing::error!(target: "oci", artifact = %key, %digest, error = %e, "the new version of the tag did not load; the previous one keeps serving");
                    refused.insert(key, digest.clone());
                    format!("refused: {e}")
                }
            };
            // A change of what serves that no operator asked for: on the audit trail too.
            let dir = ctx.shared.state.load().config.store_dir.clone();
            ctx.audit
                .append(
                    dir,
                    crate::store::audit::Action {
                        actor: "oci".into(),
                        action: "tag_moved".into(),
                        target: format!(
                            "{}/{name} {reference}@{digest}",
                            kind.collection().trim_end_matches('s')
                        ),
                        outcome,
                    },
                )
                .await;
        }
    }
}

fn key_of(kind: Kind, name: &str, reference: &str) -> String {
    format!("{}/{name} {reference}", kind.collection())
}

impl ServeCtx {
    /// Rebuilds the configuration last loaded (with the store's record) so that registry
    /// sources take the digests the background check pulled; serialized with every other
    /// change and swapped only if everything builds.
    pub(crate) async fn rebuild_with_sources(&self) -> Result<(), StartError> {
        let base = self.reload_lock.lock().await;
        let mut config = with_record(base.clone()).await?;
        self.loader.oci.resolve(&mut config, false).await?;
        self.build_and_swap(config, None).await
    }
}

/// `gateway plugin publish` / `gateway model publish`: pushes `bytes` (already checked by the
/// caller) to `reference`, signed with the key in `sign_key` (hex seed) when given, and
/// returns the manifest digest.
pub async fn publish(
    kind: Kind,
    bytes: Vec<u8>,
    reference: &str,
    credentials_file: Option<&std::path::Path>,
    sign_key: Option<&std::path::Path>,
) -> anyhow::Result<String> {
    use anyhow::Context;
    let reference = crate::config::OciReference::parse(reference)
        .map_err(|e| anyhow::anyhow!("{reference}: {e}"))?;
    let auth = gateway_oci::read_credentials(credentials_file)?;
    let key = match sign_key {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let seed = crate::config::decode_hex(text.trim())
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .with_context(|| {
                    format!(
                        "{}: not a hex Ed25519 seed (gateway keys generate)",
                        path.display()
                    )
                })?;
            Some(ed25519_dalek::SigningKey::from_bytes(&seed))
        }
        None => None,
    };
    Ok(gateway_oci::publish(kind, bytes, &reference, &auth, key.as_ref()).await?)
}
