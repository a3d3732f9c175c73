//! `config/gateway.toml`, the sample the README points to, shows every field of the
//! configuration types (so it cannot drift from them); `gateway check` accepts it as shipped,
//! as the README runs it; and for a copy without its certificates and model,
//! `gateway sample-files` writes them, then `gateway check` accepts it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::plugin_wasm;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `pub struct Name { pub field: Type, ... }` of the raw configuration types, by name.
fn raw_structs() -> BTreeMap<String, Vec<(String, String)>> {
    let text = std::fs::read_to_string(repo().join("gateway/crates/config/src/raw.rs")).unwrap();
    let mut structs = BTreeMap::new();
    let mut current: Option<(String, Vec<(String, String)>)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("pub struct ") {
            current = Some((rest.trim_end_matches(" {").trim().to_string(), Vec::new()));
        } else if line == "}" {
            if let Some((name, fields)) = current.take() {
                structs.insert(name, fields);
            }
        } else if let (Some((_, fields)), Some(field)) =
            (current.as_mut(), line.trim().strip_prefix("pub "))
        {
            if let Some((name, ty)) = field.split_once(": ") {
                fields.push((name.to_string(), ty.trim_end_matches(',').to_string()));
            }
        }
    }
    structs
}

/// The keys the sample writes or shows commented out, by table (`"upstreams.passive"`).
fn sample_keys(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut keys: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut table = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') && t.ends_with(']') {
            table = t.trim_matches(|c| c == '[' || c == ']').to_string();
            continue;
        }
        let t = t.trim_start_matches('#').trim_start();
        if let Some((key, _)) = t.split_once('=') {
            let key = key.trim();
            if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                keys.entry(table.clone())
                    .or_default()
                    .insert(key.to_string());
            }
        }
    }
    keys
}

fn strip_wrappers(ty: &str) -> &str {
    let mut ty = ty.trim();
    for wrapper in ["Option<", "Vec<"] {
        if let Some(inner) = ty.strip_prefix(wrapper).and_then(|t| t.strip_suffix('>')) {
            ty = inner;
        }
    }
    ty
}

fn missing_fields(
    structs: &BTreeMap<String, Vec<(String, String)>>,
    keys: &BTreeMap<String, BTreeSet<String>>,
    table: &str,
    name: &str,
    out: &mut Vec<String>,
) {
    for (field, ty) in &structs[name] {
        let inner = strip_wrappers(strip_wrappers(ty));
        let path = if table.is_empty() {
            field.clone()
        } else {
            format!("{table}.{field}")
        };
        if structs.contains_key(inner) {
            missing_fields(structs, keys, &path, inner, out);
        } else if !keys.get(table).is_some_and(|k| k.contains(field)) {
            out.push(path);
        }
    }
}

#[test]
fn the_sample_shows_every_field_of_the_configuration() {
    let structs = raw_structs();
    assert!(
        structs.len() > 10,
        "parsed too few raw types: {:?}",
        structs.keys()
    );
    let sample = std::fs::read_to_string(repo().join("config/gateway.toml")).unwrap();
    let mut missing = Vec::new();
    missing_fields(
        &structs,
        &sample_keys(&sample),
        "",
        "RawConfig",
        &mut missing,
    );
    assert!(
        missing.is_empty(),
        "config/gateway.toml does not show these fields (add each, with its unit and \
         default, commented out if it must not be set): {missing:?}"
    );
}

#[test]
fn the_readme_check_command_accepts_the_sample_as_shipped() {
    for p in ["hygiene", "ratelimit", "canary"] {
        plugin_wasm(p);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .current_dir(repo())
        .args(["check", "--config", "config/gateway.toml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sample_files_then_check_accept_the_sample_on_a_fresh_checkout() {
    // A fresh checkout: config/ as committed, plugins/dist as scripts/setup.sh builds it.
    for p in ["hygiene", "ratelimit", "canary"] {
        plugin_wasm(p);
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    std::fs::copy(
        repo().join("config/gateway.toml"),
        dir.path().join("config/gateway.toml"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        repo().join("plugins/dist").canonicalize().unwrap(),
        dir.path().join("plugins/dist"),
    )
    .unwrap();
    let config = dir.path().join("config/gateway.toml");
    let gateway = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    let before = gateway(&["check"]);
    assert!(
        !before.status.success(),
        "the certificates are not there yet"
    );

    let wrote = gateway(&["sample-files"]);
    let text = String::from_utf8_lossy(&wrote.stdout);
    assert!(
        wrote.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&wrote.stderr)
    );
    for f in [
        "certs/storefront.pem",
        "certs/storefront.key",
        "certs/cdn.pem",
        "models/recs.safetensors",
    ] {
        assert!(dir.path().join("config").join(f).is_file(), "{f}: {text}");
    }

    let after = gateway(&["check"]);
    assert!(
        after.status.success(),
        "{}{}",
        String::from_utf8_lossy(&after.stdout),
        String::from_utf8_lossy(&after.stderr)
    );

    // Again: nothing is overwritten.
    let cert = std::fs::read(dir.path().join("config/certs/storefront.pem")).unwrap();
    let again = gateway(&["sample-files"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("kept"));
    assert_eq!(
        std::fs::read(dir.path().join("config/certs/storefront.pem")).unwrap(),
        cert
    );
}
