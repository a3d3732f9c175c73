//! Attribution tokens: which route, variant and model version served a response, signed so
//! the storefront can hand it back with outcome events and the gateway can trust it.
//!
//! A token is url-safe base64 (no padding) of:
//!
//! ```text
//! version (1) | key id (1) | issued_at (8, big-endian unix seconds)
//! | route len (1) | route | variant len (1) | variant
//! | has model version (1: 0 or 1) [| model version len (1) | model version]
//! | HMAC-SHA256 of everything before it, first 16 bytes
//! ```
//!
//! Text fields are UTF-8 of at most [`MAX_FIELD_LEN`] bytes, so a token is at most
//! [`MAX_TOKEN_LEN`] characters.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const FORMAT_VERSION: u8 = 1;
const TAG_LEN: usize = 16;
/// The longest route, variant or model version a token carries, in bytes.
pub const MAX_FIELD_LEN: usize = 255;
/// The shortest secret a key may have, in bytes.
pub const MIN_SECRET_LEN: usize = 16;
/// How far ahead of the verifier's clock a token may be issued (seconds) before it is refused
/// as [`TokenError::FromTheFuture`]: generous for clock skew between gateway instances.
pub const MAX_FUTURE_SKEW_SECS: u64 = 300;
const MAX_PAYLOAD_LEN: usize = 1 + 1 + 8 + 3 * (1 + MAX_FIELD_LEN) + 1 + TAG_LEN;
/// The longest token [`Keyring::verify`] decodes, in characters; longer input is malformed.
pub const MAX_TOKEN_LEN: usize = (MAX_PAYLOAD_LEN * 4).div_ceil(3);

/// What a response was served by, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribution {
    /// The route (storefront endpoint) that served it.
    pub route: String,
    /// The rollout variant the shopper was in.
    pub variant: String,
    /// The model version that scored it, if one did.
    pub model_version: Option<String>,
    /// When the token was issued, unix seconds.
    pub issued_at: u64,
}

/// Why a keyring could not be built or a token signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The secret is shorter than [`MIN_SECRET_LEN`].
    #[error("key {id}: the secret is {len} bytes, at least {MIN_SECRET_LEN} are required")]
    ShortSecret {
        /// The key's id.
        id: u8,
        /// The secret's length in bytes.
        len: usize,
    },
    /// Two keys share an id.
    #[error("key id {0} is used twice")]
    DuplicateId(u8),
    /// A field is longer than [`MAX_FIELD_LEN`] bytes.
    #[error("the attribution's {0} is longer than {MAX_FIELD_LEN} bytes")]
    FieldTooLong(&'static str),
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token of this format: bad base64, wrong length, unknown version, bad fields.
    #[error("malformed attribution token")]
    Malformed,
    /// Signed with a key id this keyring does not hold (retired, or never ours).
    #[error("attribution token signed with an unknown key")]
    UnknownKey,
    /// The MAC does not match: tampered with, or signed by a different secret.
    #[error("attribution token has a bad MAC")]
    BadMac,
    /// Issued longer ago than the allowed age.
    #[error("attribution token expired")]
    Expired,
    /// Issued more than [`MAX_FUTURE_SKEW_SECS`] ahead of now.
    #[error("attribution token issued in the future")]
    FromTheFuture,
}

impl TokenError {
    /// A short, stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::UnknownKey => "unknown_key",
            TokenError::BadMac => "bad_mac",
            TokenError::Expired => "expired",
            TokenError::FromTheFuture => "from_the_future",
        }
    }
}

#[derive(Clone)]
struct Key {
    id: u8,
    mac: HmacSha256,
}

impl Key {
    fn new(id: u8, secret: &[u8]) -> Result<Self, KeyError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(KeyError::ShortSecret {
                id,
                len: secret.len(),
            });
        }
        let mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
        Ok(Key { id, mac })
    }
}

/// The signing key and the older keys still accepted while tokens signed with them age out.
#[derive(Clone)]
pub struct Keyring {
    current: Key,
    older: Vec<Key>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current.id)
            .field(
                "older",
                &self.older.iter().map(|k| k.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Keyring {
    /// A keyring that signs with `secret` (at least [`MIN_SECRET_LEN`] bytes) under `id`.
    pub fn new(id: u8, secret: &[u8]) -> Result<Self, KeyError> {
        Ok(Keyring {
            current: Key::new(id, secret)?,
            older: Vec::new(),
        })
    }

    /// Adds a verify-only key (a previous signing key).
    pub fn with_verify_key(mut self, id: u8, secret: &[u8]) -> Result<Self, KeyError> {
        if id == self.current.id || self.older.iter().any(|k| k.id == id) {
            return Err(KeyError::DuplicateId(id));
        }
        self.older.push(Key::new(id, secret)?);
        Ok(self)
    }

    /// The id tokens are signed under.
    pub fn current_id(&self) -> u8 {
        self.current.id
    }

    /// The token for `attribution`; fails only when a field is over [`MAX_FIELD_LEN`] bytes.
    pub fn sign(&self, attribution: &Attribution) -> Result<String, KeyError> {
        let mut out = Vec::with_capacity(64);
        out.extend([FORMAT_VERSION, self.current.id]);
        out.extend(attribution.issued_at.to_be_bytes());
        push_field(&mut out, "route", &attribution.route)?;
        push_field(&mut out, "variant", &attribution.variant)?;
        match &attribution.model_version {
            None => out.push(0),
            Some(version) => {
                out.push(1);
                push_field(&mut out, "model version", version)?;
            }
        }
        let mut mac = self.current.mac.clone();
        mac.update(&out);
        out.extend(&mac.finalize().into_bytes()[..TAG_LEN]);
        Ok(URL_SAFE_NO_PAD.encode(out))
    }

    /// The attribution in `token` if it is well formed, signed by a key of this ring, issued
    /// at most `max_age` seconds before `now` and at most [`MAX_FUTURE_SKEW_SECS`] after it
    /// (both unix seconds).
    pub fn verify(&self, token: &str, now: u64, max_age: u64) -> Result<Attribution, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| TokenError::Malformed)?;
        if bytes.len() < 2 + 8 + 3 + TAG_LEN || bytes[0] != FORMAT_VERSION {
            return Err(TokenError::Malformed);
        }
        let key = std::iter::once(&self.current)
            .chain(&self.older)
            .find(|k| k.id == bytes[1])
            .ok_or(TokenError::UnknownKey)?;
        let (body, tag) = bytes.split_at(bytes.len() - TAG_LEN);
        let mut mac = key.mac.clone();
        mac.update(body);
        mac.verify_truncated_left(tag)
            .map_err(|_| TokenError::BadMac)?;
        let attribution = parse(body).ok_or(TokenError::Malformed)?;
        if attribution.issued_at > now.saturating_add(MAX_FUTURE_SKEW_SECS) {
            return Err(TokenError::FromTheFuture);
        }
        if now.saturating_sub(attribution.issued_at) > max_age {
            return Err(TokenError::Expired);
        }
        Ok(attribution)
    }
}

fn push_field(out: &mut Vec<u8>, name: &'static str, value: &str) -> Result<(), KeyError> {
    let len = u8::try_from(value.len()).map_err(|_| KeyError::FieldTooLong(name))?;
    out.push(len);
    out.extend(value.as_bytes());
    Ok(())
}

fn parse(body: &[u8]) -> Option<Attribution> {
    let issued_at = u64::from_be_bytes(body.get(2..10)?.try_into().ok()?);
    let mut rest = &body[10..];
    let mut field = || -> Option<String> {
        let (&len, tail) = rest.split_first()?;
        let (value, tail) = tail.split_at_checked(usize::from(len))?;
        rest = tail;
        String::from_utf8(value.to_vec()).ok()
    };
    let route = field()?;
    let variant = field()?;
    let (&has_version, tail) = rest.split_first()?;
    rest = tail;
    let model_version = match has_version {
        0 => None,
        1 => {
            let (&len, tail) = rest.split_first()?;
            let (value, tail) = tail.split_at_checked(usize::from(len))?;
            rest = tail;
            Some(String::from_utf8(value.to_vec()).ok()?)
        }
        _ => return None,
    };
    rest.is_empty().then_some(Attribution {
        route,
        variant,
        model_version,
        issued_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_700_000_000;

    fn attribution() -> Attribution {
        Attribution {
            route: "/recommend".into(),
            variant: "canary".into(),
            model_version: Some("m-7f3a".into()),
            issued_at: NOW,
        }
    }

    #[test]
    fn round_trip() {
        let ring = Keyring::new(1, SECRET).unwrap();
        for a in [
            attribution(),
            Attribution {
                model_version: None,
                ..attribution()
            },
            Attribution {
                route: "r".repeat(255),
                variant: "é".repeat(127),
                model_version: Some(String::new()),
                issued_at: u64::MAX,
            },
        ] {
            let token = ring.sign(&a).unwrap();
            assert!(token.len() <= MAX_TOKEN_LEN);
            assert_eq!(ring.verify(&token, a.issued_at, 60), Ok(a));
        }
        assert_eq!(ring.sign(&attribution()).unwrap().len(), 70);
    }

    #[test]
    fn long_fields_are_refused_when_signing() {
        let ring = Keyring::new(1, SECRET).unwrap();
        let a = Attribution {
            variant: "v".repeat(256),
            ..attribution()
        };
        assert_eq!(ring.sign(&a), Err(KeyError::FieldTooLong("variant")));
    }

    #[test]
    fn short_secrets_and_duplicate_ids_are_refused() {
        assert_eq!(
            Keyring::new(1, b"short").unwrap_err(),
            KeyError::ShortSecret { id: 1, len: 5 }
        );
        let ring = Keyring::new(1, SECRET).unwrap();
        assert_eq!(
            ring.with_verify_key(1, SECRET).unwrap_err(),
            KeyError::DuplicateId(1)
        );
    }

    #[test]
    fn every_bit_flip_is_refused() {
        let ring = Keyring::new(1, SECRET).unwrap();
        let token = ring.sign(&attribution()).unwrap();
        for i in 0..token.len() {
            for bit in 0..8 {
                let mut chars = token.clone().into_bytes();
                chars[i] ^= 1 << bit;
                if let Ok(flipped) = String::from_utf8(chars) {
                    assert!(
                        ring.verify(&flipped, NOW, 60).is_err(),
                        "char {i} bit {bit}"
                    );
                }
            }
        }
        let bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut flipped = bytes.clone();
                flipped[i] ^= 1 << bit;
                let result = ring.verify(&URL_SAFE_NO_PAD.encode(flipped), NOW, 60);
                assert!(result.is_err(), "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn age_limits() {
        let ring = Keyring::new(1, SECRET).unwrap();
        let token = ring.sign(&attribution()).unwrap();
        assert!(ring.verify(&token, NOW + 60, 60).is_ok());
        assert_eq!(ring.verify(&token, NOW + 61, 60), Err(TokenError::Expired));
        assert!(ring.verify(&token, NOW - MAX_FUTURE_SKEW_SECS, 60).is_ok());
        assert_eq!(
            ring.verify(&token, NOW - MAX_FUTURE_SKEW_SECS - 1, 60),
            Err(TokenError::FromTheFuture)
        );
    }

    #[test]
    fn another_secret_under_the_same_id_is_refused() {
        let ours = Keyring::new(1, SECRET).unwrap();
        let theirs = Keyring::new(1, b"another secret of enough length").unwrap();
        let token = theirs.sign(&attribution()).unwrap();
        assert_eq!(ours.verify(&token, NOW, 60), Err(TokenError::BadMac));
    }

    #[test]
    fn rotation() {
        let old = Keyring::new(1, SECRET).unwrap();
        let old_token = old.sign(&attribution()).unwrap();
        let new_secret = b"the next secret, 32 bytes long..";
        let rotated = Keyring::new(2, new_secret)
            .unwrap()
            .with_verify_key(1, SECRET)
            .unwrap();
        assert_eq!(rotated.current_id(), 2);
        assert_eq!(rotated.verify(&old_token, NOW, 60), Ok(attribution()));
        let new_token = rotated.sign(&attribution()).unwrap();
        assert_eq!(old.verify(&new_token, NOW, 60), Err(TokenError::UnknownKey));
        let retired = Keyring::new(2, new_secret).unwrap();
        assert_eq!(
            retired.verify(&old_token, NOW, 60),
            Err(TokenError::UnknownKey)
        );
    }

    #[test]
    fn labels_are_distinct() {
        let errors = [
            TokenError::Malformed,
            TokenError::UnknownKey,
            TokenError::BadMac,
            TokenError::Expired,
            TokenError::FromTheFuture,
        ];
        let mut labels: Vec<_> = errors.iter().map(|e| e.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), errors.len());
    }

    #[test]
    fn garbage_is_refused_without_panics() {
        let ring = Keyring::new(1, SECRET).unwrap();
        assert_eq!(
            ring.verify(&"A".repeat(100_000), NOW, 60),
            Err(TokenError::Malformed)
        );
        assert_eq!(ring.verify("", NOW, 60), Err(TokenError::Malformed));
        let alphabet =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/ \xc3\xa9";
        let mut state = 0x5eed_u64;
        let mut next = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        for _ in 0..3000 {
            let len = (next() % 1200) as usize;
            let raw: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let text = String::from_utf8_lossy(&raw);
            assert!(ring.verify(&text, NOW, 60).is_err());
            let bytes: Vec<u8> = (0..len % 300).map(|_| next() as u8).collect();
            let mut framed = bytes;
            if framed.len() > 2 {
                framed[0] = FORMAT_VERSION;
                framed[1] = 1;
            }
            assert!(ring
                .verify(&URL_SAFE_NO_PAD.encode(framed), NOW, 60)
                .is_err());
        }
    }
}
