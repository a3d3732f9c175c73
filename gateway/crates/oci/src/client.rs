//! Talking to a registry through oci-client: resolving a reference to a manifest digest,
//! pulling and verifying an artifact, publishing one.

use std::collections::BTreeMap;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use gateway_config::OciReference;
use gateway_store::Kind;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{OciImageManifest, OCI_IMAGE_MEDIA_TYPE};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};

use crate::artifact::{check_signature, hex, ArtifactFormat, SIGNATURE_ANNOTATION};
use crate::OciError;

/// How long connecting to a registry and each read from it may take: a registry that is down
/// or unreachable fails a pull in bounded time, and the node keeps serving what it has.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Reads a credentials file: `username:password` on its first line, or a bearer token alone
/// (surrounding whitespace is ignored). `None`: anonymous.
pub fn read_credentials(path: Option<&Path>) -> Result<RegistryAuth, OciError> {
    let Some(path) = path else {
        return Ok(RegistryAuth::Anonymous);
    };
    let fail = |reason: String| OciError::Credentials {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        return Err(fail(
            "is empty; write `username:password` or a bearer token".into(),
        ));
    }
    Ok(match line.split_once(':') {
        Some((user, password)) => RegistryAuth::Basic(user.to_string(), password.to_string()),
        None => RegistryAuth::Bearer(line.to_string()),
    })
}

/// A client for `reference`'s registry: plain HTTP for a loopback registry, HTTPS otherwise.
fn client_for(reference: &OciReference) -> Client {
    // reqwest is built without a crypto provider of its own (no aws-lc build); it uses the
    // process default, which is the ring provider the rest of the gateway links. Installing
    // fails harmlessly when one is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let protocol = if reference.is_loopback() {
        ClientProtocol::HttpsExcept(vec![reference.registry.clone()])
    } else {
        ClientProtocol::Https
    };
    Client::new(ClientConfig {
        protocol,
        connect_timeout: Some(TIMEOUT),
        read_timeout: Some(TIMEOUT),
        // One layer per artifact; a monolithic push is one request per blob.
        use_monolithic_push: true,
        ..Default::default()
    })
}

fn registry_error(
    reference: &impl std::fmt::Display,
) -> impl FnOnce(oci_client::errors::OciDistributionError) -> OciError + '_ {
    move |source| OciError::Registry {
        reference: reference.to_string(),
        source,
    }
}

/// `reference` as oci-client's, at `digest` when given (a resolved tag), else as written.
fn client_reference(reference: &OciReference, digest: Option<&str>) -> Reference {
    let (registry, repository) = (reference.registry.clone(), reference.repository.clone());
    match (digest.or(reference.digest.as_deref()), &reference.tag) {
        (Some(d), _) => Reference::with_digest(registry, repository, d.to_string()),
        (None, Some(t)) => Reference::with_tag(registry, repository, t.clone()),
        (None, None) => unreachable!("a parsed reference names a tag or a digest"),
    }
}

/// The manifest digest `reference` names now: its own digest when pinned (no request), else
/// what the registry says its tag points at.
pub async fn resolve(reference: &OciReference, auth: &RegistryAuth) -> Result<String, OciError> {
    if let Some(d) = &reference.digest {
        return Ok(d.clone());
    }
    client_for(reference)
        .fetch_manifest_digest(&client_reference(reference, None), auth)
        .await
        .map_err(registry_error(reference))
}

/// What a pull must hold the artifact to.
#[derive(Debug, Clone, Copy)]
pub struct Verify<'a> {
    /// Largest artifact accepted, bytes (`[admin] max_upload_bytes`, the uploads' limit).
    pub max_bytes: u64,
    /// Keys whose signatures are accepted (`[store] trusted_keys`).
    pub trusted_keys: &'a [ed25519_dalek::VerifyingKey],
    /// A signature is required (`[store] require_signatures`).
    pub require_signatures: bool,
}

/// A verified artifact.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The manifest digest it was pulled at (`sha256:...`).
    pub manifest_digest: String,
    /// The content's SHA-256 (hex): its name in the content store.
    pub sha256: String,
    /// The content.
    pub bytes: Vec<u8>,
}

/// Pulls the `kind` artifact at manifest `digest` of `reference`'s repository and verifies
/// it (format, size, digest, signature). Nothing is stored: the caller keeps it.
pub async fn pull(
    kind: Kind,
    reference: &OciReference,
    digest: &str,
    auth: &RegistryAuth,
    verify: Verify<'_>,
) -> Result<Pulled, OciError> {
    let shown = format!("{reference} ({digest})");
    let client = client_for(reference);
    let at = client_reference(reference, Some(digest));
    // oci-client checks the manifest body against the digest asked for.
    let (raw, manifest_digest) = client
        .pull_manifest_raw(&at, auth, &[OCI_IMAGE_MEDIA_TYPE])
        .await
        .map_err(registry_error(&shown))?;
    let manifest: OciImageManifest =
        serde_json::from_slice(&raw).map_err(|e| OciError::Format {
            reference: shown.clone(),
            reason: format!("the manifest is not an OCI image manifest: {e}"),
        })?;
    let layer = ArtifactFormat::of(kind)
        .check(&manifest, &shown, verify.max_bytes)?
        .clone();
    let mut out = Limited {
        bytes: Vec::with_capacity(usize::try_from(layer.size).unwrap_or(0)),
        limit: verify.max_bytes,
        exceeded: false,
    };
    let pulled = client.pull_blob(&at, &layer, &mut out).await;
    if out.exceeded {
        return Err(OciError::TooLarge {
            reference: shown,
            size: out.bytes.len() as u64,
            limit: verify.max_bytes,
        });
    }
    pulled.map_err(registry_error(&shown))?;
    // oci-client hashed the stream against the layer's digest; hash what was kept too, since
    // that is what the store names and the loader reads.
    let sha256 = hex(&Sha256::digest(&out.bytes));
    let expected = layer.digest.trim_start_matches("sha256:");
    if sha256 != expected || out.bytes.len() as i64 != layer.size {
        return Err(OciError::Digest {
            reference: shown,
            expected: layer.digest.clone(),
            found: format!("sha256:{sha256} ({} bytes)", out.bytes.len()),
        });
    }
    let signature = manifest
        .annotations
        .as_ref()
        .and_then(|a| a.get(SIGNATURE_ANNOTATION))
        .map(String::as_str);
    check_signature(
        signature,
        &out.bytes,
        verify.trusted_keys,
        verify.require_signatures,
    )
    .map_err(|reason| OciError::Signature {
        reference: shown.clone(),
        reason,
    })?;
    Ok(Pulled {
        manifest_digest,
        sha256,
        bytes: out.bytes,
    })
}

/// Publishes `bytes` as a `kind` artifact at `reference` (a tag), signed with `sign_key` when
/// given, and returns the manifest digest the tag now names.
pub async fn publish(
    kind: Kind,
    bytes: Vec<u8>,
    reference: &OciReference,
    auth: &RegistryAuth,
    sign_key: Option<&ed25519_dalek::SigningKey>,
) -> Result<String, OciError> {
    use ed25519_dalek::Signer;
    if reference.is_pinned() || reference.tag.is_none() {
        return Err(OciError::Invalid(format!(
            "{reference}: publish to a tag (oci://registry/repository:tag); a digest is what \
             the registry gives back"
        )));
    }
    let format = ArtifactFormat::of(kind);
    let mut annotations = BTreeMap::new();
    if let Some(key) = sign_key {
        annotations.insert(
            SIGNATURE_ANNOTATION.to_string(),
            hex(&key.sign(&bytes).to_bytes()),
        );
    }
    let layer = ImageLayer::new(bytes, format.layer_media_type.to_string(), None);
    let config = Config::new(
        format.config_blob(&layer.sha256_digest()),
        format.config_media_type.to_string(),
        None,
    );
    let manifest = format.manifest(&config, &layer, annotations);
    let client = client_for(reference);
    let at = client_reference(reference, None);
    client
        .push(&at, &[layer], config, auth, Some(manifest))
        .await
        .map_err(registry_error(reference))?;
    client
        .fetch_manifest_digest(&at, auth)
        .await
        .map_err(registry_error(reference))
}

/// A download sink that refuses to grow past `limit` bytes, so a layer that lies about its
/// size cannot make the gateway hold more than the limit.
struct Limited {
    bytes: Vec<u8>,
    limit: u64,
    exceeded: bool,
}

impl tokio::io::AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if (self.bytes.len() + buf.len()) as u64 > self.limit {
            self.exceeded = true;
            return Poll::Ready(Err(std::io::Error::other("artifact larger than the limit")));
        }
        self.bytes.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_basic_or_bearer() {
        let dir = std::env::temp_dir().join(format!("oci-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c");
        std::fs::write(&f, "ci:s3cret\n").unwrap();
        assert!(
            matches!(read_credentials(Some(&f)).unwrap(), RegistryAuth::Basic(u, p) if u == "ci" && p == "s3cret")
        );
        std::fs::write(&f, "  tok3n \n").unwrap();
        assert!(
            matches!(read_credentials(Some(&f)).unwrap(), RegistryAuth::Bearer(t) if t == "tok3n")
        );
        std::fs::write(&f, "\n").unwrap();
        assert_eq!(
            read_credentials(Some(&f)).unwrap_err().outcome(),
            "credentials"
        );
        assert!(matches!(
            read_credentials(None).unwrap(),
            RegistryAuth::Anonymous
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
