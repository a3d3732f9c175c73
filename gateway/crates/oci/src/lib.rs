//! Plugins and models pulled from an OCI registry into the content store, and published to one.
//!
//! A `[[plugins]]` or `[[models]]` entry may name `source = "oci://registry/repo:tag"` (or
//! `@sha256:...`) instead of a local `path`. Before every build of a configuration the
//! gateway calls [`Resolver::prepare`], which resolves each reference to a manifest digest,
//! pulls and verifies the artifact into the content store (by SHA-256, as uploads are kept),
//! and points the entry's `path` at the stored blob; loading then goes through the same
//! validation and all-or-nothing swap as a local file. [`Resolver::check_tag`] is the
//! background re-resolution of a tag.
//!
//! What a pull verifies, in order: the manifest is an OCI image manifest of the expected
//! artifact format ([`artifact`]: media types, one layer), its digest is the one resolved
//! (oci-client checks the body against the digest asked for), the layer's declared size is
//! within the limit before anything is downloaded and its bytes stay within it while they
//! arrive, the layer's bytes hash to its descriptor's digest (checked by oci-client while
//! streaming and again here over what was kept), and its signature follows the rules
//! uploads follow (`[store] trusted_keys`, `require_signatures`; the signature travels as a
//! manifest annotation, so the manifest digest covers it).
//!
//! The registry client is `oci-client` (the ORAS project's distribution client) over rustls
//! with the ring provider the rest of the gateway uses. Loopback registries are reached over
//! plain HTTP (as Docker treats them), every other one over HTTPS.

pub mod artifact;
mod client;
mod resolver;

use std::path::PathBuf;

pub use artifact::{ArtifactFormat, MODEL_ARTIFACT_TYPE, SIGNATURE_ANNOTATION};
pub use client::{publish, pull, read_credentials, resolve, Pulled, Verify};
pub use resolver::{OciMetrics, Resolver, SourceError};

/// Why a reference could not be resolved, pulled, verified or published.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The credentials file is unreadable or empty.
    #[error("registry credentials {path}: {reason}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The registry could not be reached, refused the request or answered an error (this
    /// includes a manifest whose body does not hash to the digest asked for).
    #[error("registry {reference}: {source}")]
    Registry {
        /// The reference asked for.
        reference: String,
        /// What the client reported.
        source: oci_client::errors::OciDistributionError,
    },
    /// The manifest is not the artifact format expected (media types, layer count).
    #[error("{reference}: {reason}")]
    Format {
        /// The reference.
        reference: String,
        /// What is wrong, and what was expected.
        reason: String,
    },
    /// The artifact is larger than the limit for plugins and models.
    #[error("{reference}: the artifact is {size} bytes, more than the limit of {limit} bytes ([admin] max_upload_bytes)")]
    TooLarge {
        /// The reference.
        reference: String,
        /// Its size (declared, or what arrived before the download was stopped).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The bytes that arrived are not the ones the manifest names.
    #[error(
        "{reference}: content digest {found} does not match the manifest's {expected}; refused"
    )]
    Digest {
        /// The reference.
        reference: String,
        /// The digest the manifest names.
        expected: String,
        /// What the bytes hash to.
        found: String,
    },
    /// The signature rules of `[store]` refuse it.
    #[error("{reference}: {reason}")]
    Signature {
        /// The reference.
        reference: String,
        /// Why.
        reason: String,
    },
    /// The content store could not keep it.
    #[error(transparent)]
    Store(#[from] gateway_store::StoreError),
    /// What was asked cannot be done (publishing to a digest, say).
    #[error("{0}")]
    Invalid(String),
}

impl OciError {
    /// The `outcome` label of `gateway_oci_pulls_total` for this failure.
    pub fn outcome(&self) -> &'static str {
        match self {
            OciError::Credentials { .. } => "credentials",
            OciError::Registry { source, .. } => match source {
                oci_client::errors::OciDistributionError::DigestError(_) => "digest_mismatch",
                _ => "registry_error",
            },
            OciError::Format { .. } => "bad_format",
            OciError::TooLarge { .. } => "too_large",
            OciError::Digest { .. } => "digest_mismatch",
            OciError::Signature { .. } => "signature",
            OciError::Store(_) => "store",
            OciError::Invalid(_) => "invalid",
        }
    }
}
