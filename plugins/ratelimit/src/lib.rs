//! `ratelimit`: per-client rate limiter and user-agent bot filter.
//!
//! Each request is charged to its client address, and also to its API key (the value of
//! `key_header`) when it has one. A key may send `burst` requests at once and
//! `requests_per_second` sustained; an address may send `address_burst` at once and
//! `address_requests_per_second` sustained, whatever keys it sends (a client cannot escape the
//! limit by minting a new key per request). Past either limit the plugin answers
//! `429 Too Many Requests` with `retry-after` (whole seconds) and a JSON body
//! `{"error":"rate_limited","retry_after":N}`. A request whose `user-agent` contains one of
//! `blocked_user_agents` (case-insensitive substring) is answered `403` with
//! `{"error":"forbidden"}` before it is counted.
//!
//! Config (TOML; every key optional, the defaults are shown):
//!
//! ```toml
//! requests_per_second = 10.0   # sustained rate per key; > 0, fractions allowed
//! burst = 20                   # requests a key may send at once; >= 1
//! key_header = "x-api-key"     # "" to key on the client address only
//! address_requests_per_second = 40.0  # default: 4 x requests_per_second (shared NATs)
//! address_burst = 80                  # default: 4 x burst
//! blocked_user_agents = ["sqlmap", "nikto", "nmap", "masscan", "zgrab"]
//! ```
//!
//! Metrics: counters `ratelimit_allowed`, `ratelimit_limited`, `ratelimit_blocked`
//! (user agent) and `ratelimit_errors` (key-value store failures).
//!
//! # Algorithm
//!
//! A sliding-window counter, which behaves like a token bucket of `burst` tokens refilled
//! at `requests_per_second`, built only on the store's atomic `kv-increment` so that every
//! instance of the plugin (they run concurrently) shares one exact count per key:
//!
//! - time is cut into windows of `W = burst / requests_per_second` seconds (the time to
//!   refill an empty bucket); each window has a counter key `rl:<key>:<window index>` that
//!   lives for `2W` (+1 s), long enough to be read as "previous window" by the next one;
//! - a request atomically increments the current window's counter, and reads the previous
//!   window's with an increment of 0; the estimate of requests in the last `W` is
//!   `previous * (1 - elapsed fraction of the current window) + current`;
//! - within `burst` the request passes; above it, the increment is given back (refused
//!   requests consume no quota) and the answer is 429, with `retry-after` the time the
//!   excess needs to drain at `requests_per_second`.
//!
//! Concurrent requests can only over-count (each sees the others' increments), never let
//! more than `burst` through per window estimate. The weighting assumes the previous
//! window's requests were spread evenly, the usual approximation of this scheme. When the
//! store fails (full, say), the request is let through and `ratelimit_errors` counts it:
//! the limiter fails open rather than taking the shop down.

use gateway_plugin_sdk::{clock, config, hash, kv, log, metrics, prelude::*};
use serde::Deserialize;
use std::time::Duration;

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    requests_per_second: f64,
    burst: u32,
    key_header: String,
    address_requests_per_second: Option<f64>,
    address_burst: Option<u32>,
    blocked_user_agents: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            requests_per_second: 10.0,
            burst: 20,
            key_header: "x-api-key".into(),
            address_requests_per_second: None,
            address_burst: None,
            blocked_user_agents: ["sqlmap", "nikto", "nmap", "masscan", "zgrab"]
                .map(String::from)
                .to_vec(),
        }
    }
}

/// One sliding-window limit: `burst` at once, `rate` per second sustained.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Limit {
    rate: f64,
    burst: i64,
    window_ns: u64,
}

impl Limit {
    fn new(rate: f64, burst: u32, what: &str) -> Result<Limit, String> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(format!(
                "invalid config: {what}requests_per_second must be > 0"
            ));
        }
        if burst == 0 {
            return Err(format!("invalid config: {what}burst must be >= 1"));
        }
        let window_s = f64::from(burst) / rate;
        // At least 1 ms, at most a day: keeps keys and TTLs sane for odd configs.
        let window_ns = (window_s * 1e9).clamp(1e6, 86_400e9) as u64;
        Ok(Limit {
            rate,
            burst: i64::from(burst),
            window_ns,
        })
    }
}

/// The plugin, holding its validated configuration.
pub struct RateLimit {
    per_key: Limit,
    per_address: Limit,
    key_header: Option<String>,
    blocked_user_agents: Vec<String>,
}

/// Outcome of charging one request to a key.
#[derive(Debug, PartialEq)]
enum Verdict {
    Allow,
    Limit { retry_after_s: u64 },
}

impl RateLimit {
    fn from_config(text: &str) -> Result<Self, String> {
        let cfg: Config = config::from_toml(text)?;
        let per_key = Limit::new(cfg.requests_per_second, cfg.burst, "")?;
        let per_address = Limit::new(
            cfg.address_requests_per_second
                .unwrap_or(4.0 * cfg.requests_per_second),
            cfg.address_burst
                .unwrap_or_else(|| cfg.burst.saturating_mul(4)),
            "address_",
        )?;
        let key_header = cfg.key_header.trim().to_ascii_lowercase();
        Ok(RateLimit {
            per_key,
            per_address,
            key_header: (!key_header.is_empty()).then_some(key_header),
            blocked_user_agents: cfg
                .blocked_user_agents
                .into_iter()
                .map(|s| s.to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect(),
        })
    }

    fn is_blocked_agent(&self, user_agent: &str) -> bool {
        let ua = user_agent.to_ascii_lowercase();
        self.blocked_user_agents
            .iter()
            .any(|b| ua.contains(b.as_str()))
    }

    /// The API key a request is charged to besides its address, if it has one.
    fn api_key(&self, req: &Request) -> Option<String> {
        let api_key = self
            .key_header
            .as_deref()
            .and_then(|h| req.header(h))
            .filter(|v| !v.is_empty())?;
        // Short printable keys are used as they are; others are hashed to fit the store's
        // 256-byte key limit.
        Some(
            if api_key.len() <= 128 && api_key.bytes().all(|b| b.is_ascii_graphic()) {
                format!("k:{api_key}")
            } else {
                format!("kh:{:016x}", hash::fnv1a_64(api_key.as_bytes()))
            },
        )
    }

    /// Charges one request to its address and then to its API key; a request refused by
    /// either consumes neither's quota.
    fn charge_request(&self, req: &Request, now_ns: u64) -> Result<Verdict, String> {
        let address = format!("ip:{}", req.client_addr());
        let verdict = charge(&self.per_address, &address, now_ns)?;
        if verdict != Verdict::Allow {
            return Ok(verdict);
        }
        let Some(key) = self.api_key(req) else {
            return Ok(verdict);
        };
        let verdict = charge(&self.per_key, &key, now_ns)?;
        if verdict != Verdict::Allow {
            refund(&self.per_address, &address, now_ns)?;
        }
        Ok(verdict)
    }
}

fn window_key(limit: &Limit, key: &str, now_ns: u64) -> (String, Option<Duration>) {
    let ttl = Some(Duration::from_nanos(2 * limit.window_ns) + Duration::from_secs(1));
    (format!("rl:{key}:{}", now_ns / limit.window_ns), ttl)
}

/// Gives back a request [`charge`] let through.
fn refund(limit: &Limit, key: &str, now_ns: u64) -> Result<(), String> {
    let (current_key, ttl) = window_key(limit, key, now_ns);
    kv::increment(&current_key, -1, ttl).map(drop)
}

/// Charges one request to `key` at `now_ns` under `limit`.
fn charge(limit: &Limit, key: &str, now_ns: u64) -> Result<Verdict, String> {
    let window = now_ns / limit.window_ns;
    let elapsed = (now_ns % limit.window_ns) as f64 / limit.window_ns as f64;
    let (current_key, ttl) = window_key(limit, key, now_ns);
    let current = kv::increment(&current_key, 1, ttl)?;
    let previous = if window == 0 {
        0
    } else {
        // Adding 0 reads the counter atomically; the TTL only matters if the key is
        // absent, in which case the 0 it creates expires like a real counter.
        kv::increment(&format!("rl:{key}:{}", window - 1), 0, ttl)?
    };
    let verdict = decide(limit.burst, limit.rate, previous, current, elapsed);
    if verdict != Verdict::Allow {
        // Refused requests do not consume quota.
        kv::increment(&current_key, -1, ttl)?;
    }
    Ok(verdict)
}

/// The sliding-window decision, given the window counters (`current` includes this request)
/// and how far into the current window we are (0..1).
fn decide(burst: i64, rate: f64, previous: i64, current: i64, elapsed: f64) -> Verdict {
    let estimate = previous.max(0) as f64 * (1.0 - elapsed) + current as f64;
    if estimate <= burst as f64 {
        Verdict::Allow
    } else {
        let excess = estimate - burst as f64;
        Verdict::Limit {
            retry_after_s: ((excess / rate).ceil() as u64).max(1),
        }
    }
}

impl Plugin for RateLimit {
    fn init(config: &str) -> Result<Self, String> {
        RateLimit::from_config(config)
    }

    fn on_request(&mut self, req: &Request) -> Action {
        if let Some(ua) = req.header("user-agent") {
            if self.is_blocked_agent(&ua) {
                metrics::counter_inc("ratelimit_blocked");
                return LocalResponse::new(403)
                    .json(r#"{"error":"forbidden"}"#)
                    .into();
            }
        }

        match self.charge_request(req, clock::now_ns()) {
            Ok(Verdict::Allow) => {
                metrics::counter_inc("ratelimit_allowed");
                Action::Continue
            }
            Ok(Verdict::Limit { retry_after_s }) => {
                metrics::counter_inc("ratelimit_limited");
                LocalResponse::new(429)
                    .header("retry-after", retry_after_s.to_string())
                    .json(format!(
                        r#"{{"error":"rate_limited","retry_after":{retry_after_s}}}"#
                    ))
                    .into()
            }
            Err(e) => {
                metrics::counter_inc("ratelimit_errors");
                log::warn(&format!(
                    "key-value store failed, letting request through: {e}"
                ));
                Action::Continue
            }
        }
    }
}

export_plugin!(RateLimit);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let r = RateLimit::from_config("").unwrap();
        assert_eq!(r.per_key.burst, 20);
        assert_eq!(r.per_key.window_ns, 2_000_000_000);
        assert_eq!(r.per_address.burst, 80);
        assert_eq!(r.per_address.window_ns, 2_000_000_000);
        assert_eq!(r.key_header.as_deref(), Some("x-api-key"));
        assert!(r.is_blocked_agent("Mozilla/5.0 sqlmap/1.7"));
        assert!(r.is_blocked_agent("NIKTO"));
        assert!(!r.is_blocked_agent("Mozilla/5.0 (X11; Linux x86_64)"));

        let r = RateLimit::from_config(
            "requests_per_second = 0.5\nburst = 1\nkey_header = \"\"\nblocked_user_agents = []",
        )
        .unwrap();
        assert_eq!(r.per_key.window_ns, 2_000_000_000);
        assert_eq!(r.key_header, None);
        assert!(!r.is_blocked_agent("sqlmap"));
        let r =
            RateLimit::from_config("address_burst = 5\naddress_requests_per_second = 1").unwrap();
        assert_eq!(r.per_address.burst, 5);
        assert_eq!(r.per_address.window_ns, 5_000_000_000);
        assert!(RateLimit::from_config("address_burst = 0").is_err());
        assert!(RateLimit::from_config("address_requests_per_second = -1").is_err());

        assert!(RateLimit::from_config("requests_per_second = 0").is_err());
        assert!(RateLimit::from_config("burst = 0").is_err());
        assert!(RateLimit::from_config("burst = -1").is_err());
        assert!(RateLimit::from_config("rps = 3").is_err());
    }

    #[test]
    fn sliding_window() {
        // Fresh key: the burst passes, the next one does not.
        assert_eq!(decide(20, 10.0, 0, 20, 0.0), Verdict::Allow);
        assert_eq!(
            decide(20, 10.0, 0, 21, 0.0),
            Verdict::Limit { retry_after_s: 1 }
        );
        // Full previous window, halfway through this one: 10 tokens came back.
        assert_eq!(decide(20, 10.0, 20, 10, 0.5), Verdict::Allow);
        assert_eq!(
            decide(20, 10.0, 20, 11, 0.5),
            Verdict::Limit { retry_after_s: 1 }
        );
        // Slow refill gives longer retry-after.
        assert_eq!(
            decide(1, 0.1, 1, 1, 0.0),
            Verdict::Limit { retry_after_s: 10 }
        );
    }
}
