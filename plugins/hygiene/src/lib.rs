//! `hygiene`: request and response hygiene.
//!
//! On request:
//! - removes internal headers: every header whose name is listed in `remove_headers`, or
//!   starts with one of `remove_prefixes`;
//! - normalizes the path (when `normalize_path`): collapses `//`, drops `.` segments and
//!   resolves `..` segments (percent-encoded dots such as `%2e%2E` count as dots, as in the
//!   URL standard); a `..` that would climb above the root is answered with a local `400`.
//!
//! On response, adds security headers the upstream did not set itself (an upstream value is
//! never overwritten).
//!
//! Config (TOML; every key optional, the defaults are shown):
//!
//! ```toml
//! remove_headers = []                           # exact names, case-insensitive
//! remove_prefixes = ["x-internal-", "x-debug-"] # name prefixes, case-insensitive
//! normalize_path = true
//!
//! # Merged over the defaults below; an empty value ("") drops that default.
//! [security_headers]
//! strict-transport-security = "max-age=31536000; includeSubDomains"
//! x-content-type-options = "nosniff"
//! x-frame-options = "DENY"
//! referrer-policy = "strict-origin-when-cross-origin"
//! ```

use gateway_plugin_sdk::{config, log, metrics, prelude::*};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    remove_headers: Vec<String>,
    remove_prefixes: Vec<String>,
    normalize_path: bool,
    security_headers: BTreeMap<String, String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            remove_headers: Vec::new(),
            remove_prefixes: vec!["x-internal-".into(), "x-debug-".into()],
            normalize_path: true,
            security_headers: BTreeMap::new(),
        }
    }
}

const DEFAULT_SECURITY_HEADERS: [(&str, &str); 4] = [
    (
        "strict-transport-security",
        "max-age=31536000; includeSubDomains",
    ),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "strict-origin-when-cross-origin"),
];

/// The plugin, holding its parsed configuration.
pub struct Hygiene {
    remove_headers: Vec<String>,
    remove_prefixes: Vec<String>,
    normalize_path: bool,
    security_headers: Vec<(String, String)>,
}

impl Hygiene {
    fn from_config(text: &str) -> Result<Self, String> {
        let cfg: Config = config::from_toml(text)?;
        let lower = |v: Vec<String>| -> Vec<String> {
            v.into_iter()
                .map(|s| s.trim().to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let mut security: BTreeMap<String, String> = DEFAULT_SECURITY_HEADERS
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        for (name, value) in cfg.security_headers {
            security.insert(name.trim().to_ascii_lowercase(), value);
        }
        Ok(Hygiene {
            remove_headers: lower(cfg.remove_headers),
            remove_prefixes: lower(cfg.remove_prefixes),
            normalize_path: cfg.normalize_path,
            security_headers: security
                .into_iter()
                .filter(|(_, v)| !v.is_empty())
                .collect(),
        })
    }

    fn is_internal(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        self.remove_headers.contains(&name)
            || self
                .remove_prefixes
                .iter()
                .any(|p| name.starts_with(p.as_str()))
    }
}

/// Why a path was refused.
#[derive(Debug, PartialEq)]
struct EscapesRoot;

fn is_dot(segment: &str) -> bool {
    segment == "." || segment.eq_ignore_ascii_case("%2e")
}

fn is_dot_dot(segment: &str) -> bool {
    matches!(
        segment.to_ascii_lowercase().as_str(),
        ".." | ".%2e" | "%2e." | "%2e%2e"
    )
}

/// Normalizes an absolute path: collapses empty segments (`//`), removes `.` segments and
/// resolves `..` segments. A trailing slash is kept (and added after a final `.` or `..`,
/// like the URL standard does).
fn normalize(path: &str) -> Result<String, EscapesRoot> {
    let mut out: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        if segment.is_empty() || is_dot(segment) {
            continue;
        }
        if is_dot_dot(segment) {
            out.pop().ok_or(EscapesRoot)?;
        } else {
            out.push(segment);
        }
    }
    let last = path.rsplit('/').next().unwrap_or("");
    let trailing_slash = last.is_empty() || is_dot(last) || is_dot_dot(last);
    let mut normalized = String::with_capacity(path.len() + 1);
    for segment in &out {
        normalized.push('/');
        normalized.push_str(segment);
    }
    if normalized.is_empty() || trailing_slash {
        normalized.push('/');
    }
    Ok(normalized)
}

impl Plugin for Hygiene {
    fn init(config: &str) -> Result<Self, String> {
        Hygiene::from_config(config)
    }

    fn on_request(&mut self, req: &Request) -> Action {
        let mut removed: Vec<String> = Vec::new();
        for (name, _) in req.headers() {
            if self.is_internal(&name) && !removed.contains(&name) {
                if let Err(e) = req.remove_header(&name) {
                    log::warn(&format!("cannot remove header {name}: {e}"));
                }
                removed.push(name);
            }
        }
        if !removed.is_empty() {
            metrics::counter_add("hygiene_headers_removed", removed.len() as u64);
        }

        if self.normalize_path {
            let path = req.path();
            match normalize(&path) {
                Ok(normalized) if normalized != path => {
                    if let Err(e) = req.set_path(&normalized) {
                        log::warn(&format!("cannot rewrite path {path:?}: {e}"));
                    } else {
                        metrics::counter_inc("hygiene_paths_normalized");
                    }
                }
                Ok(_) => {}
                Err(EscapesRoot) => {
                    metrics::counter_inc("hygiene_paths_refused");
                    return LocalResponse::new(400)
                        .text("bad request: path escapes the root\n")
                        .into();
                }
            }
        }
        Action::Continue
    }

    fn on_response(&mut self, resp: &Response) {
        for (name, value) in &self.security_headers {
            if resp.header(name).is_none() {
                if let Err(e) = resp.set_header(name, value) {
                    log::warn(&format!("cannot set header {name}: {e}"));
                }
            }
        }
    }
}

export_plugin!(Hygiene);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes() {
        let cases = [
            ("/", "/"),
            ("", "/"),
            ("/a/b", "/a/b"),
            ("//a///b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("/a/./b", "/a/b"),
            ("/a/.", "/a/"),
            ("/a/b/../c", "/a/c"),
            ("/a/b/..", "/a/"),
            ("/a/%2E/b/%2e%2E/c", "/a/c"),
            ("/api/search", "/api/search"),
            ("/a/..", "/"),
            ("/a..b/.c", "/a..b/.c"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn refuses_escapes() {
        for input in ["/..", "/../etc/passwd", "/a/../../b", "/%2e%2e/x", "//../"] {
            assert_eq!(normalize(input), Err(EscapesRoot), "{input}");
        }
    }

    #[test]
    fn config() {
        let h = Hygiene::from_config("").unwrap();
        assert!(h.is_internal("X-Internal-Token"));
        assert!(h.is_internal("x-debug-user"));
        assert!(!h.is_internal("x-request-id"));
        assert_eq!(h.security_headers.len(), 4);

        let h = Hygiene::from_config(
            "remove_headers = [\"X-Secret\"]\nremove_prefixes = []\n\
             [security_headers]\nx-frame-options = \"\"\npermissions-policy = \"camera=()\"\n",
        )
        .unwrap();
        assert!(h.is_internal("x-secret"));
        assert!(!h.is_internal("x-internal-a"));
        let names: Vec<&str> = h.security_headers.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"permissions-policy"));
        assert!(!names.contains(&"x-frame-options"));

        assert!(Hygiene::from_config("bogus = 1").is_err());
    }
}
