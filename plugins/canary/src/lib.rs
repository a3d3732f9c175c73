//! `canary`: sticky, weighted canary routing.
//!
//! Each request is assigned one of the configured variants and the plugin calls
//! `set-variant` with it (the route must define variants of those names; on a route in a
//! gateway `[[experiments]]` the gateway's split decides and refuses `set-variant`, so use one
//! or the other). The assignment is sticky and monotone: weighted rendezvous hashing of a
//! sticky key, so the same user always lands on the same variant, and raising a variant's
//! weight only moves users into it, never between the others. The sticky key is, in order: the `cookie` cookie, the `user_header` header, the client
//! address. A request whose `override_header` names a variant (case-insensitive) gets that
//! variant, whatever its weight, which is how QA reaches a 0-weight variant. The response
//! gets `x-variant: <variant that served it>`.
//!
//! Config (TOML; `variants` is required, the other keys show their defaults):
//!
//! ```toml
//! variants = [{ name = "stable", weight = 90 }, { name = "canary", weight = 10 }]
//! cookie = "shop_uid"
//! user_header = "x-user-id"
//! override_header = "x-canary"
//! ```
//!
//! Weights are relative (they need not add up to 100) and at least one must be positive;
//! at most 16 variants. Metrics: counter `canary_assigned_<variant>` per decision (variant
//! name lower-cased, characters outside `[a-z0-9_]` as `_`), `canary_overridden` for
//! override-header decisions, `canary_errors` when the gateway refuses a variant.

use gateway_plugin_sdk::{config, hash, log, metrics, prelude::*};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    variants: Vec<VariantConfig>,
    #[serde(default = "default_cookie")]
    cookie: String,
    #[serde(default = "default_user_header")]
    user_header: String,
    #[serde(default = "default_override_header")]
    override_header: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VariantConfig {
    name: String,
    weight: u32,
}

fn default_cookie() -> String {
    "shop_uid".into()
}

fn default_user_header() -> String {
    "x-user-id".into()
}

fn default_override_header() -> String {
    "x-canary".into()
}

struct Variant {
    name: String,
    weight: u32,
    metric: String,
}

/// The plugin, holding its validated configuration.
pub struct Canary {
    variants: Vec<Variant>,
    cookie: String,
    user_header: String,
    override_header: String,
}

const MAX_VARIANTS: usize = 16;

impl Canary {
    fn from_config(text: &str) -> Result<Self, String> {
        let cfg: Config = config::from_toml(text)?;
        if cfg.variants.is_empty() || cfg.variants.len() > MAX_VARIANTS {
            return Err(format!(
                "invalid config: `variants` needs 1 to {MAX_VARIANTS} entries"
            ));
        }
        let mut variants: Vec<Variant> = Vec::new();
        let mut cumulative = 0u64;
        for v in cfg.variants {
            let name = v.name.trim().to_string();
            if name.is_empty() {
                return Err("invalid config: a variant has an empty name".into());
            }
            let metric = metrics::sanitize_name(&format!("canary_assigned_{name}"));
            if variants
                .iter()
                .any(|o| o.name.eq_ignore_ascii_case(&name) || o.metric == metric)
            {
                return Err(format!("invalid config: variant {name:?} is listed twice"));
            }
            cumulative += u64::from(v.weight);
            variants.push(Variant {
                name,
                weight: v.weight,
                metric,
            });
        }
        if cumulative == 0 {
            return Err("invalid config: all variant weights are 0".into());
        }
        Ok(Canary {
            variants,
            cookie: cfg.cookie.trim().to_string(),
            user_header: cfg.user_header.trim().to_ascii_lowercase(),
            override_header: cfg.override_header.trim().to_ascii_lowercase(),
        })
    }

    /// The variant a sticky key maps to, by weighted rendezvous hashing: each variant with a
    /// weight scores `-ln(u) / weight` for a uniform `u` drawn from its name and the key, and
    /// the lowest score wins. A variant is chosen in proportion to its weight, and the choice
    /// is monotone: raising one variant's weight only moves keys into it, lowering it only
    /// moves keys out of it, and no key moves between the other variants.
    fn pick(&self, sticky_key: &str) -> &Variant {
        let score = |v: &Variant| {
            let mut bytes = Vec::with_capacity(v.name.len() + 1 + sticky_key.len());
            bytes.extend_from_slice(v.name.as_bytes());
            bytes.push(0);
            bytes.extend_from_slice(sticky_key.as_bytes());
            let h = hash::fnv1a_64(&bytes);
            // FNV's low bits mix poorly for similar keys: finish with a 64-bit mixer, then
            // take 53 bits as a uniform in (0, 1).
            let h = mix64(h);
            let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            -u.ln() / f64::from(v.weight)
        };
        self.variants
            .iter()
            .filter(|v| v.weight > 0)
            .min_by(|a, b| score(a).total_cmp(&score(b)))
            .expect("at least one weight is positive")
    }

    fn by_name(&self, name: &str) -> Option<&Variant> {
        let name = name.trim();
        self.variants
            .iter()
            .find(|v| v.name.eq_ignore_ascii_case(name))
    }

    fn sticky_key(&self, req: &Request) -> String {
        let non_empty = |v: Option<String>| v.filter(|v| !v.is_empty());
        if !self.cookie.is_empty() {
            if let Some(uid) = non_empty(req.cookie(&self.cookie)) {
                return format!("c:{uid}");
            }
        }
        if !self.user_header.is_empty() {
            if let Some(uid) = non_empty(req.header(&self.user_header)) {
                return format!("u:{uid}");
            }
        }
        format!("a:{}", req.client_addr())
    }
}

/// SplitMix64's finaliser.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Plugin for Canary {
    fn init(config: &str) -> Result<Self, String> {
        Canary::from_config(config)
    }

    fn on_request(&mut self, req: &Request) -> Action {
        let forced = if self.override_header.is_empty() {
            None
        } else {
            req.header(&self.override_header)
                .and_then(|v| self.by_name(&v))
        };
        let variant = match forced {
            Some(v) => {
                metrics::counter_inc("canary_overridden");
                v
            }
            None => self.pick(&self.sticky_key(req)),
        };
        match req.set_variant(&variant.name) {
            Ok(()) => metrics::counter_inc(&variant.metric),
            Err(e) => {
                metrics::counter_inc("canary_errors");
                log::warn(&format!("cannot set variant {:?}: {e}", variant.name));
            }
        }
        Action::Continue
    }

    fn on_response(&mut self, resp: &Response) {
        if let Some(variant) = resp.variant() {
            if let Err(e) = resp.set_header("x-variant", &variant) {
                log::warn(&format!("cannot set x-variant: {e}"));
            }
        }
    }
}

export_plugin!(Canary);

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str =
        r#"variants = [{ name = "stable", weight = 90 }, { name = "Canary-EU", weight = 10 }]"#;

    #[test]
    fn config() {
        let c = Canary::from_config(CONFIG).unwrap();
        assert_eq!(c.variants[1].metric, "canary_assigned_canary_eu");
        assert_eq!(c.cookie, "shop_uid");
        assert_eq!(c.user_header, "x-user-id");
        assert_eq!(c.override_header, "x-canary");
        assert_eq!(c.by_name(" canary-eu ").unwrap().name, "Canary-EU");
        assert!(c.by_name("beta").is_none());

        assert!(Canary::from_config("").is_err());
        assert!(Canary::from_config("variants = []").is_err());
        assert!(Canary::from_config(r#"variants = [{ name = "a", weight = 0 }]"#).is_err());
        assert!(Canary::from_config(
            r#"variants = [{ name = "a", weight = 1 }, { name = "A", weight = 1 }]"#
        )
        .is_err());
    }

    #[test]
    fn sticky_and_weighted() {
        let c = Canary::from_config(CONFIG).unwrap();
        // Same key, same answer.
        for i in 0..100 {
            let key = format!("c:user-{i}");
            assert_eq!(c.pick(&key).name, c.pick(&key).name);
        }
        // Roughly 10% canary over many keys.
        let canary = (0..10_000)
            .filter(|i| c.pick(&format!("c:user-{i}")).name == "Canary-EU")
            .count();
        assert!((800..1200).contains(&canary), "{canary}");
        // A 0-weight variant is never picked by hash.
        let c = Canary::from_config(
            r#"variants = [{ name = "stable", weight = 1 }, { name = "dark", weight = 0 }]"#,
        )
        .unwrap();
        assert!((0..1000).all(|i| c.pick(&format!("k{i}")).name == "stable"));
    }

    #[test]
    fn raising_a_weight_only_moves_keys_into_that_variant() {
        let config = |a: u32, b: u32, c: u32| {
            Canary::from_config(&format!(
                r#"variants = [{{ name = "a", weight = {a} }}, {{ name = "b", weight = {b} }}, {{ name = "c", weight = {c} }}]"#
            ))
            .unwrap()
        };
        let keys: Vec<String> = (0..5000).map(|i| format!("c:user-{i}")).collect();
        for target in 0..3 {
            let weights = |w: u32| {
                let mut ws = [30, 5, 5];
                ws[target] = w;
                config(ws[0], ws[1], ws[2])
            };
            let name = ["a", "b", "c"][target];
            let mut before = weights(1);
            for w in [5, 10, 25, 50, 100] {
                let after = weights(w);
                for k in &keys {
                    let (was, now) = (&before.pick(k).name, &after.pick(k).name);
                    assert!(
                        was == now || now == name,
                        "raising {name}: {k} moved from {was} to {now}"
                    );
                }
                before = after;
            }
        }
    }
}
