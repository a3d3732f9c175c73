//! Loading the certificates a configuration names: PEM chains and keys read from files and
//! checked to belong together. This is file I/O, kept out of validation proper; it runs while
//! a config is checked so that a bad file is an error located at its `cert`/`key` field.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The certificate file is unreadable or holds no certificate.
    #[error("certificate {path}: {reason}")]
    Cert {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key file is unreadable, holds no key, or the key does not fit the certificate.
    #[error("private key {path}: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The crypto provider used everywhere in the gateway.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM chain and key and checks that they belong together.
pub fn load_certified_key(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, CertError> {
    let cert_err = |reason: String| CertError::Cert {
        path: cert_path.to_path_buf(),
        reason,
    };
    let key_err = |reason: String| CertError::Key {
        path: key_path.to_path_buf(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| cert_err(pem_reason(&e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(pem_reason(&e)))?;
    if chain.is_empty() {
        return Err(cert_err(
            "no \"BEGIN CERTIFICATE\" block found; expected a PEM chain, leaf first".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| key_err(pem_reason(&e)))?;
    certified_key_from_der(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            key_err("does not match the certificate's public key".into())
        }
        other => key_err(format!("unusable key: {other}")),
    })
}

/// Builds a [`CertifiedKey`] from DER parts, checking that the key matches the leaf.
pub fn certified_key_from_der(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, rustls::Error> {
    CertifiedKey::from_der(chain, key, &provider())
}

fn pem_reason(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(io) => format!("cannot read: {io}"),
        Error::NoItemsFound => "no PEM block of the expected kind found".into(),
        other => format!("not valid PEM: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate and its key, PEM.
    fn self_signed(names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let certified = rcgen::generate_simple_self_signed(names).unwrap();
        (certified.cert.pem(), certified.signing_key.serialize_pem())
    }

    #[test]
    fn mismatched_key_is_rejected_with_its_path() {
        let dir = std::env::temp_dir().join(format!("gw-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, _) = self_signed(&["a.test"]);
        let (_, other_key) = self_signed(&["b.test"]);
        std::fs::write(dir.join("c.pem"), cert).unwrap();
        std::fs::write(dir.join("k.pem"), other_key).unwrap();
        let err = load_certified_key(&dir.join("c.pem"), &dir.join("k.pem")).unwrap_err();
        assert!(matches!(err, CertError::Key { .. }), "{err}");
        assert!(err.to_string().contains("does not match"), "{err}");
        std::fs::write(dir.join("empty.pem"), "").unwrap();
        let err = load_certified_key(&dir.join("empty.pem"), &dir.join("k.pem")).unwrap_err();
        assert!(matches!(err, CertError::Cert { .. }), "{err}");
    }
}
