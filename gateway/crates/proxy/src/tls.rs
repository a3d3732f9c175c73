//! TLS for downstream listeners: choice by SNI and the rustls server configuration (TLS 1.2
//! and 1.3 only, ALPN `h2` and `http/1.1`). Certificates are loaded by the config crate
//! (`gateway_config::certs`) while a config is checked.

use std::fmt;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::config::{CertificateSpec, HostPattern};

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be used.
    #[error(transparent)]
    Certificate(#[from] CertError),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Certificate loading is configuration's (it happens while a config is checked); the
/// provider and the loaders are re-exported here for the TLS code and the tests.
pub use crate::config::certs::{certified_key_from_der, load_certified_key, provider, CertError};

/// Chooses a certificate by SNI: exact names first, then the longest matching wildcard, then
/// the default.
pub(crate) struct SniResolver {
    exact: std::collections::HashMap<String, Arc<CertifiedKey>>,
    wildcards: Vec<(String, Arc<CertifiedKey>)>,
    default: Option<Arc<CertifiedKey>>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver")
            .field("exact", &self.exact.keys().collect::<Vec<_>>())
            .field(
                "wildcards",
                &self.wildcards.iter().map(|(s, _)| s).collect::<Vec<_>>(),
            )
            .field("has_default", &self.default.is_some())
            .finish()
    }
}

impl SniResolver {
    /// Indexes validated certificates.
    pub fn new(certs: &[CertificateSpec]) -> SniResolver {
        let mut exact = std::collections::HashMap::new();
        let mut wildcards = Vec::new();
        let mut default = None;
        for spec in certs {
            for name in &spec.server_names {
                match name {
                    HostPattern::Exact(n) => {
                        exact.entry(n.clone()).or_insert_with(|| spec.key.clone());
                    }
                    HostPattern::Suffix(s) => wildcards.push((s.clone(), spec.key.clone())),
                    HostPattern::Any => {}
                }
            }
            if spec.default {
                default = Some(spec.key.clone());
            }
        }
        wildcards.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        SniResolver {
            exact,
            wildcards,
            default,
        }
    }

    /// The certificate for a server name (or none sent).
    pub(crate) fn choose(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = server_name {
            let name = name.to_ascii_lowercase();
            if let Some(k) = self.exact.get(&name) {
                return Some(k.clone());
            }
            // A wildcard covers exactly one label, as in RFC 6125.
            if let Some((_, k)) = self
                .wildcards
                .iter()
                .find(|(suffix, _)| one_label_under(&name, suffix))
            {
                return Some(k.clone());
            }
        }
        self.default.clone()
    }
}

/// The names of the certificate [`SniResolver`] chooses for `server_name`, by the same rules;
/// `None` when it would choose none.
pub fn chosen_names<'a>(
    certs: &'a [CertificateSpec],
    server_name: Option<&str>,
) -> Option<&'a [HostPattern]> {
    if let Some(name) = server_name {
        let name = name.to_ascii_lowercase();
        let exact = certs.iter().find(|spec| {
            spec.server_names
                .iter()
                .any(|p| matches!(p, HostPattern::Exact(n) if *n == name))
        });
        if let Some(spec) = exact {
            return Some(&spec.server_names);
        }
        let mut best: Option<(usize, &CertificateSpec)> = None;
        for spec in certs {
            for p in &spec.server_names {
                if let HostPattern::Suffix(suffix) = p {
                    if one_label_under(&name, suffix) && best.is_none_or(|(l, _)| suffix.len() > l)
                    {
                        best = Some((suffix.len(), spec));
                    }
                }
            }
        }
        if let Some((_, spec)) = best {
            return Some(&spec.server_names);
        }
    }
    certs
        .iter()
        .rev()
        .find(|spec| spec.default)
        .map(|spec| &spec.server_names[..])
}

/// Whether a certificate configured with `server_names` is valid for `host` (lower case, no
/// port): one of its exact names, or under one of its wildcards by exactly one label. A
/// certificate configured without names (a default one) is taken to cover every host.
pub(crate) fn names_cover(names: &[HostPattern], host: &str) -> bool {
    names.is_empty()
        || names.iter().any(|p| match p {
            HostPattern::Exact(n) => n == host,
            HostPattern::Suffix(suffix) => one_label_under(host, suffix),
            HostPattern::Any => true,
        })
}

/// `name` is one label followed by `suffix` (which starts with a dot), as in RFC 6125.
fn one_label_under(name: &str, suffix: &str) -> bool {
    name.len() > suffix.len()
        && name.ends_with(suffix)
        && !name[..name.len() - suffix.len()].contains('.')
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.choose(hello.server_name())
    }
}

/// The rustls configuration for HTTPS listeners. The cipher suite is the first of the
/// provider's list (strongest first) that the client offers, whatever the client's order.
pub fn server_config(certs: &[CertificateSpec]) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver::new(certs)));
    config.ignore_client_order = true;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A self-signed certificate for `names`, for the demo and tests.
pub fn self_signed(names: &[&str]) -> Result<(String, String), rcgen::Error> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let certified = rcgen::generate_simple_self_signed(names)?;
    Ok((certified.cert.pem(), certified.signing_key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    use super::*;

    fn spec(names: &[&str], default: bool) -> CertificateSpec {
        let (cert, key) = self_signed(&["x.test"]).unwrap();
        let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        CertificateSpec {
            server_names: names
                .iter()
                .map(|n| crate::config::parse_host_pattern(n, false).unwrap())
                .collect(),
            default,
            key: Arc::new(certified_key_from_der(chain, key).unwrap()),
            cert_path: PathBuf::new(),
            key_path: PathBuf::new(),
        }
    }

    #[test]
    fn sni_prefers_exact_then_one_label_wildcard_then_default() {
        let a = spec(&["shop.example.com"], false);
        let b = spec(&["*.example.com"], false);
        let d = spec(&[], true);
        let r = SniResolver::new(&[a.clone(), b.clone(), d.clone()]);
        assert!(Arc::ptr_eq(
            &r.choose(Some("SHOP.example.com")).unwrap(),
            &a.key
        ));
        assert!(Arc::ptr_eq(
            &r.choose(Some("cdn.example.com")).unwrap(),
            &b.key
        ));
        assert!(Arc::ptr_eq(
            &r.choose(Some("a.b.example.com")).unwrap(),
            &d.key
        ));
        assert!(Arc::ptr_eq(&r.choose(Some("other.test")).unwrap(), &d.key));
        assert!(Arc::ptr_eq(&r.choose(None).unwrap(), &d.key));
    }

    /// The suite a handshake settles on when the client offers `offered` in that order.
    fn negotiated_suite(
        version: &'static rustls::SupportedProtocolVersion,
        offered: &[rustls::SupportedCipherSuite],
    ) -> rustls::CipherSuite {
        let (cert, key) = self_signed(&["x.test"]).unwrap();
        let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let server_spec = CertificateSpec {
            server_names: vec![crate::config::parse_host_pattern("x.test", false).unwrap()],
            default: true,
            key: Arc::new(certified_key_from_der(vec![der.clone()], key).unwrap()),
            cert_path: PathBuf::new(),
            key_path: PathBuf::new(),
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client_provider = CryptoProvider {
            cipher_suites: offered.to_vec(),
            ..rustls::crypto::ring::default_provider()
        };
        let client_config = rustls::ClientConfig::builder_with_provider(Arc::new(client_provider))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut client = rustls::Connection::Client(
            rustls::ClientConnection::new(Arc::new(client_config), "x.test".try_into().unwrap())
                .unwrap(),
        );
        let mut server = rustls::Connection::Server(
            rustls::ServerConnection::new(server_config(&[server_spec]).unwrap()).unwrap(),
        );
        fn pass(from: &mut rustls::Connection, to: &mut rustls::Connection) {
            let mut buf = Vec::new();
            while from.wants_write() {
                from.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                to.read_tls(&mut rd).unwrap();
                to.process_new_packets().unwrap();
            }
        }
        for _ in 0..10 {
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
            pass(&mut client, &mut server);
            pass(&mut server, &mut client);
        }
        assert!(!server.is_handshaking(), "the handshake completed");
        server.negotiated_cipher_suite().unwrap().suite()
    }

    #[test]
    fn the_server_order_of_cipher_suites_wins_over_a_weak_first_client_order() {
        use rustls::crypto::ring::cipher_suite as cs;
        let tls13 = negotiated_suite(
            &rustls::version::TLS13,
            &[
                cs::TLS13_CHACHA20_POLY1305_SHA256,
                cs::TLS13_AES_128_GCM_SHA256,
                cs::TLS13_AES_256_GCM_SHA384,
            ],
        );
        assert_eq!(tls13, rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
        let tls12 = negotiated_suite(
            &rustls::version::TLS12,
            &[
                cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            ],
        );
        assert_eq!(
            tls12,
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        );
    }

    #[test]
    fn chosen_names_are_those_of_the_certificate_sni_picks() {
        let certs = [
            spec(&["shop.example.com"], false),
            spec(&["*.example.com", "example.com"], false),
            spec(&["*.cdn.example.com"], false),
            spec(&["fallback.test"], true),
        ];
        let r = SniResolver::new(&certs);
        for sni in [
            Some("shop.example.com"),
            Some("Img.Example.com"),
            Some("a.cdn.example.com"),
            Some("a.b.example.com"),
            Some("example.com"),
            Some("other.test"),
            None,
        ] {
            let key = r.choose(sni).unwrap();
            let picked = certs.iter().find(|c| Arc::ptr_eq(&c.key, &key)).unwrap();
            assert_eq!(
                chosen_names(&certs, sni),
                Some(&picked.server_names[..]),
                "{sni:?}"
            );
        }
        assert_eq!(chosen_names(&certs[..3], Some("other.test")), None);

        let wild = &certs[1].server_names;
        assert!(names_cover(wild, "img.example.com"));
        assert!(names_cover(wild, "example.com"));
        assert!(!names_cover(wild, "a.b.example.com"));
        assert!(!names_cover(wild, "shop.example.org"));
        assert!(names_cover(&[], "any.test"), "a certificate without names");
    }
}
