//! The artifact formats in a registry, and the checks of a manifest and a signature (pure).
//!
//! - A plugin follows the CNCF Wasm OCI artifact layout that wasm-pkg-tools and Istio's
//!   WasmPlugin use: config media type [`WASM_CONFIG_MEDIA_TYPE`], one layer
//!   [`WASM_LAYER_MEDIA_TYPE`] holding the component.
//! - A model is an OCI 1.1 artifact: `artifactType` [`MODEL_ARTIFACT_TYPE`], the empty config,
//!   one layer [`MODEL_LAYER_MEDIA_TYPE`] holding the safetensors file. Registries that drop
//!   `artifactType` are covered by the ORAS fallback: a config media type equal to the
//!   artifact type is accepted too.
//!
//! Anything else (another media type, no layer or several) is refused with what was found
//! and what was expected, so a model named as a plugin (or an image) is never loaded.

use std::collections::BTreeMap;

use gateway_store::Kind;
use oci_client::manifest::{OciDescriptor, OciImageManifest, OCI_IMAGE_MEDIA_TYPE};

/// Config media type of a Wasm component artifact (CNCF Wasm OCI artifact layout).
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// Layer media type of a Wasm component.
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/wasm";
/// `artifactType` of a model artifact.
pub const MODEL_ARTIFACT_TYPE: &str = "application/vnd.storefront.gateway.model.v1";
/// Layer media type of a model file (safetensors).
pub const MODEL_LAYER_MEDIA_TYPE: &str = "application/vnd.storefront.gateway.model.v1.safetensors";
/// The OCI empty descriptor's media type (a model artifact's config: `{}`).
pub const EMPTY_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// Manifest annotation carrying the Ed25519 signature (128 hex digits) of the layer's bytes,
/// the same signature an upload carries in `x-signature`.
pub const SIGNATURE_ANNOTATION: &str = "dev.storefront-gateway.signature.ed25519";

/// What a kind of artifact looks like in a registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArtifactFormat {
    /// The content store's kind.
    pub kind: Kind,
    /// The manifest's `artifactType`, when the format sets one.
    pub artifact_type: Option<&'static str>,
    /// The config descriptor's media type.
    pub config_media_type: &'static str,
    /// The one layer's media type.
    pub layer_media_type: &'static str,
}

impl ArtifactFormat {
    /// The format of `kind`.
    pub fn of(kind: Kind) -> ArtifactFormat {
        match kind {
            Kind::Plugin => ArtifactFormat {
                kind,
                artifact_type: None,
                config_media_type: WASM_CONFIG_MEDIA_TYPE,
                layer_media_type: WASM_LAYER_MEDIA_TYPE,
            },
            Kind::Model => ArtifactFormat {
                kind,
                artifact_type: Some(MODEL_ARTIFACT_TYPE),
                config_media_type: EMPTY_CONFIG_MEDIA_TYPE,
                layer_media_type: MODEL_LAYER_MEDIA_TYPE,
            },
        }
    }

    /// The config blob published with an artifact whose layer has `layer_digest`: the Wasm
    /// config of the CNCF layout for plugins, `{}` for models.
    pub fn config_blob(&self, layer_digest: &str) -> Vec<u8> {
        match self.kind {
            Kind::Plugin => serde_json::to_vec(&serde_json::json!({
                "architecture": "wasm",
                "os": "wasip2",
                "layerDigests": [layer_digest],
            }))
            .expect("a JSON value serializes"),
            Kind::Model => b"{}".to_vec(),
        }
    }

    /// Checks that `manifest` is this format with one layer no larger than `max_bytes`, and
    /// returns that layer. `reference` only words the error.
    pub fn check<'m>(
        &self,
        manifest: &'m OciImageManifest,
        reference: &str,
        max_bytes: u64,
    ) -> Result<&'m OciDescriptor, crate::OciError> {
        let refuse = |reason: String| crate::OciError::Format {
            reference: reference.to_string(),
            reason,
        };
        let what = self.kind.collection().trim_end_matches('s');
        if let Some(mt) = manifest.media_type.as_deref() {
            if mt != OCI_IMAGE_MEDIA_TYPE {
                return Err(refuse(format!(
                    "manifest media type {mt:?} is not an OCI image manifest ({OCI_IMAGE_MEDIA_TYPE})"
                )));
            }
        }
        let artifact_type = manifest
            .artifact_type
            .as_deref()
            .unwrap_or(&manifest.config.media_type);
        let type_ok = match self.artifact_type {
            Some(t) => artifact_type == t,
            None => manifest.config.media_type == self.config_media_type,
        };
        if !type_ok {
            return Err(refuse(format!(
                "not a {what} artifact: artifact type {artifact_type:?} (config {:?}); a {what} \
                 has {}",
                manifest.config.media_type,
                self.describe(),
            )));
        }
        let [layer] = manifest.layers.as_slice() else {
            return Err(refuse(format!(
                "a {what} artifact has exactly one layer ({}); this one has {}",
                self.layer_media_type,
                manifest.layers.len()
            )));
        };
        if layer.media_type != self.layer_media_type {
            return Err(refuse(format!(
                "layer media type {:?} is not a {what}'s ({})",
                layer.media_type, self.layer_media_type
            )));
        }
        let size = u64::try_from(layer.size)
            .map_err(|_| refuse(format!("layer size {} is negative", layer.size)))?;
        if size > max_bytes {
            return Err(crate::OciError::TooLarge {
                reference: reference.to_string(),
                size,
                limit: max_bytes,
            });
        }
        if !layer
            .digest
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(refuse(format!(
                "layer digest {:?} is not sha256 (the content store keys artifacts by SHA-256)",
                layer.digest
            )));
        }
        Ok(layer)
    }

    fn describe(&self) -> String {
        match self.artifact_type {
            Some(t) => format!(
                "artifactType {t:?} and one {:?} layer",
                self.layer_media_type
            ),
            None => format!(
                "config {:?} and one {:?} layer",
                self.config_media_type, self.layer_media_type
            ),
        }
    }

    /// The manifest published for `layer` (its descriptor) with `config` (the config blob),
    /// carrying `annotations` (the signature, when signed).
    pub fn manifest(
        &self,
        config: &oci_client::client::Config,
        layer: &oci_client::client::ImageLayer,
        annotations: BTreeMap<String, String>,
    ) -> OciImageManifest {
        let mut m = OciImageManifest::build(
            std::slice::from_ref(layer),
            config,
            (!annotations.is_empty()).then_some(annotations),
        );
        m.media_type = Some(OCI_IMAGE_MEDIA_TYPE.to_string());
        m.artifact_type = self.artifact_type.map(str::to_string);
        m
    }
}

/// The signature rules uploads follow, applied to a pulled artifact: with
/// `require_signatures`, the manifest must carry a signature; a signature that is present must
/// be 128 hex digits and verify over `body` with one of `trusted_keys`.
pub fn check_signature(
    signature: Option<&str>,
    body: &[u8],
    trusted_keys: &[ed25519_dalek::VerifyingKey],
    require_signatures: bool,
) -> Result<(), String> {
    let Some(sig) = signature else {
        if require_signatures {
            return Err(format!(
                "signatures are required ([store] require_signatures) and the manifest carries \
                 no {SIGNATURE_ANNOTATION} annotation (publish with --sign-key)"
            ));
        }
        return Ok(());
    };
    let parsed = gateway_config::decode_hex(sig.trim())
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .map(|b| ed25519_dalek::Signature::from_bytes(&b));
    let Some(sig) = parsed else {
        return Err(format!("{SIGNATURE_ANNOTATION} must be 128 hex digits"));
    };
    if trusted_keys
        .iter()
        .any(|k| k.verify_strict(body, &sig).is_ok())
    {
        Ok(())
    } else {
        Err(format!(
            "the signature ({SIGNATURE_ANNOTATION}) does not verify with any trusted key"
        ))
    }
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_client::client::{Config, ImageLayer};

    fn published(kind: Kind, body: &[u8]) -> OciImageManifest {
        let f = ArtifactFormat::of(kind);
        let layer = ImageLayer::new(body.to_vec(), f.layer_media_type.into(), None);
        let config = Config::new(
            f.config_blob(&layer.sha256_digest()),
            f.config_media_type.into(),
            None,
        );
        f.manifest(&config, &layer, BTreeMap::new())
    }

    #[test]
    fn each_kind_accepts_its_own_format_and_refuses_the_other() {
        for (kind, other) in [(Kind::Plugin, Kind::Model), (Kind::Model, Kind::Plugin)] {
            let m = published(kind, b"abc");
            let layer = ArtifactFormat::of(kind).check(&m, "r", 10).unwrap();
            assert_eq!(layer.size, 3);
            let e = ArtifactFormat::of(other).check(&m, "r", 10).unwrap_err();
            assert_eq!(e.outcome(), "bad_format", "{e}");
            assert!(e.to_string().contains("not a"), "{e}");
        }
    }

    #[test]
    fn layer_count_media_type_and_size_are_checked() {
        let f = ArtifactFormat::of(Kind::Plugin);
        let mut two = published(Kind::Plugin, b"abc");
        two.layers.push(two.layers[0].clone());
        assert!(f
            .check(&two, "r", 10)
            .unwrap_err()
            .to_string()
            .contains("has 2"));
        let mut tar = published(Kind::Plugin, b"abc");
        tar.layers[0].media_type = "application/vnd.oci.image.layer.v1.tar".into();
        assert!(f
            .check(&tar, "r", 10)
            .unwrap_err()
            .to_string()
            .contains("layer media type"));
        let big = published(Kind::Plugin, b"abcdef");
        assert_eq!(f.check(&big, "r", 5).unwrap_err().outcome(), "too_large");
    }

    #[test]
    fn signatures_follow_the_upload_rules() {
        use ed25519_dalek::Signer;
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let other = ed25519_dalek::SigningKey::from_bytes(&[8; 32]);
        let trusted = [key.verifying_key()];
        let sig = hex(&key.sign(b"body").to_bytes());
        assert!(check_signature(None, b"body", &trusted, false).is_ok());
        assert!(check_signature(None, b"body", &trusted, true).is_err());
        assert!(check_signature(Some(&sig), b"body", &trusted, true).is_ok());
        assert!(check_signature(Some(&sig), b"tampered", &trusted, true).is_err());
        let foreign = hex(&other.sign(b"body").to_bytes());
        assert!(check_signature(Some(&foreign), b"body", &trusted, false).is_err());
        assert!(check_signature(Some("zz"), b"body", &trusted, false).is_err());
    }
}
