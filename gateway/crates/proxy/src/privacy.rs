//! Pseudonyms for shopper identifiers: a keyed hash (HMAC-SHA256, first 64 bits) of a client
//! address or a query parameter's value, so logs and plugins' state can tell shoppers apart
//! and count them without holding who they are. Without the key a pseudonym cannot be
//! reversed or recomputed from a guess; with the same key every node gives the same one.
//!
//! With `[privacy] pseudonymize_client_addresses` on (the default), the access log and the
//! connection logs show a client address as its pseudonym, and plugins get the pseudonym from
//! `client-addr` (what the rate limiter and the canary key by).

use std::net::IpAddr;
use std::sync::OnceLock;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::PrivacySettings;

/// Marks a pseudonym, so a reader of a log knows it is not the value itself.
const PREFIX: char = '~';

/// Makes pseudonyms under one key, per configuration snapshot.
#[derive(Clone)]
pub struct Pseudonymizer {
    /// The key, already absorbed: each pseudonym starts from a copy.
    mac: Hmac<Sha256>,
    /// The key's id for logs (`random` for the per-process key).
    key_id: String,
    client_addresses: bool,
}

impl std::fmt::Debug for Pseudonymizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pseudonymizer")
            .field("key_id", &self.key_id)
            .field("client_addresses", &self.client_addresses)
            .finish_non_exhaustive()
    }
}

/// The key used when the config names none: random, for this process's lifetime.
fn process_key() -> &'static [u8; 32] {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    KEY.get_or_init(|| {
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        key
    })
}

impl Pseudonymizer {
    /// The pseudonymizer of `settings`.
    pub fn new(settings: &PrivacySettings) -> Pseudonymizer {
        let (secret, key_id): (&[u8], String) = match &settings.key {
            Some(k) => (k.secret(), k.id.clone()),
            None => (process_key(), "random".to_string()),
        };
        Pseudonymizer {
            mac: Hmac::new_from_slice(secret).expect("HMAC takes a key of any length"),
            key_id,
            client_addresses: settings.pseudonymize_client_addresses,
        }
    }

    /// Which key makes the pseudonyms (its id, or `random`).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The pseudonym of `value`, of a `kind` of identifier (so a user id and an address
    /// that happen to be equal get different pseudonyms): `~` and 16 hex digits.
    pub fn pseudonym(&self, kind: &str, value: &[u8]) -> String {
        use std::fmt::Write;
        let mut mac = self.mac.clone();
        mac.update(kind.as_bytes());
        mac.update(&[0]);
        mac.update(value);
        let tag = mac.finalize().into_bytes();
        let mut out = String::with_capacity(17);
        out.push(PREFIX);
        for b in &tag[..8] {
            let _ = write!(out, "{b:02x}");
        }
        out
    }

    /// The client address as the access log and plugins see it.
    pub fn client(&self, addr: IpAddr) -> String {
        if self.client_addresses {
            self.pseudonym("client", addr.to_string().as_bytes())
        } else {
            addr.to_string()
        }
    }
}

/// A request's client address as plugins see it: the pseudonym is made only when a plugin
/// asks (`client-addr`), not for every request a plugin chain runs on.
#[derive(Debug, Clone)]
pub struct ClientAddr {
    addr: IpAddr,
    privacy: std::sync::Arc<Pseudonymizer>,
}

impl ClientAddr {
    /// `addr` under `privacy`.
    pub fn new(addr: IpAddr, privacy: std::sync::Arc<Pseudonymizer>) -> ClientAddr {
        ClientAddr { addr, privacy }
    }

    /// An address shown as it is (for `gateway plugin check`'s test request).
    pub fn unpseudonymized(addr: IpAddr) -> ClientAddr {
        let settings = PrivacySettings {
            key: None,
            pseudonymize_client_addresses: false,
        };
        ClientAddr::new(addr, std::sync::Arc::new(Pseudonymizer::new(&settings)))
    }

    /// The address, or its pseudonym.
    pub fn shown(&self) -> String {
        self.privacy.client(self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PseudonymKey;

    fn settings(key: Option<&str>) -> PrivacySettings {
        PrivacySettings {
            key: key.map(|k| PseudonymKey::new(k.as_bytes())),
            pseudonymize_client_addresses: true,
        }
    }

    #[test]
    fn pseudonyms_are_keyed_stable_and_typed() {
        let a = Pseudonymizer::new(&settings(Some("0123456789abcdef-one")));
        let b = Pseudonymizer::new(&settings(Some("0123456789abcdef-one")));
        let rotated = Pseudonymizer::new(&settings(Some("0123456789abcdef-two")));
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(a.client(ip), b.client(ip), "the same key on another node");
        assert_ne!(
            a.client(ip),
            rotated.client(ip),
            "a new key, new pseudonyms"
        );
        assert_ne!(a.pseudonym("user", b"42"), a.pseudonym("shopper", b"42"));
        assert!(a.client(ip).starts_with('~') && a.client(ip).len() == 17);
        assert!(!a.client(ip).contains("203.0.113.9"));
        let random = Pseudonymizer::new(&settings(None));
        assert_eq!(random.key_id(), "random");
        assert_eq!(
            random.client(ip),
            Pseudonymizer::new(&settings(None)).client(ip)
        );
    }

    #[test]
    fn addresses_can_be_kept_as_they_are() {
        let mut off = settings(None);
        off.pseudonymize_client_addresses = false;
        let ip: IpAddr = "::1".parse().unwrap();
        assert_eq!(Pseudonymizer::new(&off).client(ip), "::1");
    }
}
