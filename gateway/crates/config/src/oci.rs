//! `source = "oci://..."` on a `[[plugins]]` or `[[models]]` entry: the artifact is pulled from
//! an OCI registry into the content store instead of read from a local `path`.
//!
//! This module only parses and checks what is written; pulling, verifying and re-resolving
//! tags is the `gateway-oci` crate's work.

use std::path::PathBuf;
use std::time::Duration;

/// The scheme that marks a registry reference in `source`.
pub const OCI_SCHEME: &str = "oci://";

/// How often a tag is resolved again unless `oci_resolve_interval_s` says otherwise, seconds.
pub const DEFAULT_OCI_RESOLVE_INTERVAL_S: u64 = 300;

/// A registry reference, parsed: `oci://REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciReference {
    /// `host` or `host:port`.
    pub registry: String,
    /// Repository path inside the registry, lower-case components separated by `/`.
    pub repository: String,
    /// The tag, when the reference names one.
    pub tag: Option<String>,
    /// `sha256:<64 hex>`, when the reference is pinned to a manifest digest.
    pub digest: Option<String>,
}

impl OciReference {
    /// Parses `oci://registry/repository:tag` or `oci://registry/repository@sha256:...`
    /// (a tag and a digest together pin the digest; the tag is then informative only).
    pub fn parse(s: &str) -> Result<OciReference, String> {
        let rest = s.strip_prefix(OCI_SCHEME).ok_or_else(|| {
            format!("must start with {OCI_SCHEME:?}, e.g. \"oci://registry.example:5000/plugins/hygiene:v3\"")
        })?;
        let (registry, path) = rest.split_once('/').ok_or_else(|| {
            "needs a registry and a repository, e.g. \"oci://registry.example:5000/plugins/hygiene:v3\"".to_string()
        })?;
        if registry.is_empty()
            || !registry
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        {
            return Err(format!("registry {registry:?} is not a host or host:port"));
        }
        let (name_and_tag, digest) = match path.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (path, None),
        };
        if let Some(d) = digest {
            let hex = d.strip_prefix("sha256:").ok_or_else(|| {
                format!("digest {d:?} must be \"sha256:\" followed by 64 hex digits")
            })?;
            if hex.len() != 64
                || !hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(format!(
                    "digest {d:?} must be \"sha256:\" followed by 64 lower-case hex digits"
                ));
            }
        }
        // A tag follows the last ':' after the last '/' (a registry port is before the path).
        let (repository, tag) = match name_and_tag.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t)),
            _ => (name_and_tag, None),
        };
        if repository.is_empty()
            || repository.split('/').any(|c| {
                c.is_empty()
                    || !c.bytes().all(|b| {
                        b.is_ascii_lowercase()
                            || b.is_ascii_digit()
                            || matches!(b, b'.' | b'_' | b'-')
                    })
            })
        {
            return Err(format!(
                "repository {repository:?} must be lower-case letters, digits, '.', '_' and '-' \
                 in '/'-separated components"
            ));
        }
        if let Some(t) = tag {
            if t.is_empty()
                || t.len() > 128
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            {
                return Err(format!(
                    "tag {t:?} must be 1-128 letters, digits, '.', '_' and '-'"
                ));
            }
        }
        if tag.is_none() && digest.is_none() {
            return Err("names neither a tag (\":v3\") nor a digest (\"@sha256:...\")".into());
        }
        Ok(OciReference {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag: tag.map(str::to_string),
            digest: digest.map(str::to_string),
        })
    }

    /// Whether the reference names a manifest digest: such a reference always means the same
    /// content and is never resolved again.
    pub fn is_pinned(&self) -> bool {
        self.digest.is_some()
    }

    /// Whether the registry is on the loopback interface (`127.x`, `localhost`, `[::1]`): the
    /// only registries reached over plain HTTP, as Docker also treats them.
    pub fn is_loopback(&self) -> bool {
        let host = match self.registry.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
            _ => self.registry.as_str(),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

impl std::fmt::Display for OciReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{OCI_SCHEME}{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Where a `[[plugins]]` or `[[models]]` entry with `source = "oci://..."` comes from,
/// validated. Its `path` points into the content store once the artifact is pulled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciSource {
    /// The reference, parsed.
    pub reference: OciReference,
    /// File with the registry credentials (`username:password` on one line, or a bearer
    /// token alone), read at every pull so a rotated file applies without a reload; `None`:
    /// anonymous.
    pub credentials_file: Option<PathBuf>,
    /// How often a tag is resolved again; zero: only at start and reload. Digest-pinned
    /// references are never resolved again.
    pub resolve_interval: Duration,
    /// The manifest digest (`sha256:...`) that serves, once pulled; `None` before.
    pub resolved: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_with_tags_digests_and_ports() {
        let r = OciReference::parse("oci://127.0.0.1:5000/plugins/hygiene:v3").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "plugins/hygiene");
        assert_eq!(r.tag.as_deref(), Some("v3"));
        assert!(!r.is_pinned() && r.is_loopback());
        assert_eq!(r.to_string(), "oci://127.0.0.1:5000/plugins/hygiene:v3");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = OciReference::parse(&format!("oci://registry.example/recs@{d}")).unwrap();
        assert_eq!((r.tag, r.digest.as_deref()), (None, Some(d.as_str())));
        assert!(!OciReference::parse("oci://registry.example/recs:1")
            .unwrap()
            .is_loopback());
        for bad in [
            "127.0.0.1:5000/plugins/hygiene:v3",
            "oci://127.0.0.1:5000",
            "oci://127.0.0.1:5000/plugins/hygiene",
            "oci://127.0.0.1:5000/Plugins:v1",
            "oci://127.0.0.1:5000/p@sha256:abc",
            "oci://127.0.0.1:5000/p:v 1",
            "oci:///p:v1",
        ] {
            assert!(OciReference::parse(bad).is_err(), "{bad} parsed");
        }
    }
}
