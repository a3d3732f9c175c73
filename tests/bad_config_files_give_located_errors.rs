//! Configuration: the shipped sample loads; bad files give errors naming file, line and field;
//! `gateway check` exits non-zero with them.

use std::path::Path;
use std::process::Command;

use gateway::config::Config;

use crate::support::Pki;

fn sample_dir() -> (Pki, std::path::PathBuf) {
    let pki = Pki::new();
    std::fs::create_dir_all(pki.path().join("certs")).unwrap();
    pki.issue(
        "certs/storefront",
        &["shop.example.com", "www.shop.example.com"],
    );
    pki.issue("certs/cdn", &["*.cdn.shop.example.com"]);
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/gateway.toml");
    let text = std::fs::read_to_string(sample).unwrap();
    let dist = crate::support::plugin_wasm("noop")
        .parent()
        .unwrap()
        .to_path_buf();
    std::fs::create_dir_all(pki.path().join("models")).unwrap();
    let model = gateway::scoring::sample_model(&gateway::scoring::SampleSpec::embedding(32, 8, 1));
    std::fs::write(pki.path().join("models/recs.safetensors"), model).unwrap();
    std::fs::create_dir_all(pki.path().join("keys")).unwrap();
    std::fs::write(
        pki.path().join("keys/feedback.key"),
        "0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    let copy = pki.path().join("gateway.toml");
    std::fs::write(
        &copy,
        text.replace("../plugins/dist/", &format!("{}/", dist.display())),
    )
    .unwrap();
    (pki, copy)
}

#[test]
fn the_sample_config_is_valid_and_complete() {
    let (_pki, path) = sample_dir();
    let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.listeners.len(), 2);
    assert_eq!(c.certificates.len(), 2);
    assert_eq!(c.upstreams[0].backends.len(), 2);
    assert!(c.upstreams[0].health_check.is_some());
    assert_eq!(c.routes[0].path_prefix, "/api/search");
    assert_eq!(c.routes[1].plugins.len(), 3);
    assert_eq!(c.routes[1].variants.len(), 2);
    assert_eq!(c.plugins.len(), 3);
    assert_eq!(c.models.len(), 1);
    assert_eq!(c.experiments.len(), 1);
    assert_eq!(c.routes[0].experiment, Some(0));
    assert_eq!(c.feedback.keys.len(), 1);
}

fn errors_for(toml: &str) -> Vec<String> {
    let pki = Pki::new();
    pki.issue("server", &["localhost"]);
    let path = pki.path().join("bad.toml");
    std::fs::write(&path, toml).unwrap();
    match Config::load(&path) {
        Ok(_) => panic!("config should be rejected:\n{toml}"),
        Err(e) => e
            .issues()
            .iter()
            .map(|i| {
                i.to_string()
                    .replace(&format!("{}", path.display()), "bad.toml")
            })
            .collect(),
    }
}

const VALID: &str = r#"
[[tls.certificates]]
cert = "server.pem"
key = "server.key"

[[listeners]]
name = "https"
bind = "127.0.0.1:0"

[[upstreams]]
name = "app"
backends = ["127.0.0.1:3000"]

[[routes]]
name = "all"
upstream = "app"
"#;

#[test]
fn unknown_fields_and_syntax_errors_name_the_line() {
    let errs =
        errors_for(&VALID.replace("bind = \"127.0.0.1:0\"", "bind = \"127.0.0.1:0\"\nbnid = 1"));
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("bad.toml:9:"), "{errs:?}");
    assert!(errs[0].contains("unknown field `bnid`"), "{errs:?}");

    let errs = errors_for(&VALID.replace("name = \"app\"", "name = \"app"));
    assert!(errs[0].starts_with("bad.toml:11:"), "{errs:?}");
}

#[test]
fn semantic_errors_are_all_listed_with_field_and_line() {
    let bad = VALID
        .replace("upstream = \"app\"", "upstream = \"ap\"")
        .replace(
            "backends = [\"127.0.0.1:3000\"]",
            "backends = [\"127.0.0.1:3000\", \"no-port\"]\nbalance = \"random\"",
        )
        .replace("bind = \"127.0.0.1:0\"", "bind = \"localhost:99999\"");
    let errs = errors_for(&bad);
    let find = |needle: &str| {
        errs.iter()
            .find(|e| e.contains(needle))
            .unwrap_or_else(|| panic!("no error about {needle}: {errs:#?}"))
            .clone()
    };
    assert!(
        find("routes[0].upstream").starts_with("bad.toml:17:"),
        "{errs:#?}"
    );
    assert!(find("no upstream named \"ap\"").contains("defined: app"));
    assert!(find("upstreams[0].backends[1]").starts_with("bad.toml:12:"));
    assert!(find("upstreams[0].balance").contains("round_robin"));
    assert!(find("listeners[0].bind").starts_with("bad.toml:8:"));
    assert_eq!(errs.len(), 4, "{errs:#?}");
}

#[test]
fn offline_gate_errors_are_located() {
    // The model's path names a file that exists (only its presence is checked here).
    let model = "\n[[models]]\nname = \"recs\"\npath = \"server.pem\"\n";
    let errs = errors_for(&format!(
        "{VALID}{model}eval_data = \"missing.jsonl\"\neval_k = 0\nmax_regression = -0.1\n"
    ));
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert!(errs[0].starts_with("bad.toml:21:"), "{errs:#?}");
    assert!(
        errs[0].contains("models[0].eval_data") && errs[0].contains("cannot read missing.jsonl"),
        "{errs:#?}"
    );
    assert!(errs[1].starts_with("bad.toml:22:"), "{errs:#?}");
    assert!(errs[1].contains("models[0].eval_k") && errs[1].contains("between 1 and 1000"));
    assert!(errs[2].starts_with("bad.toml:23:"), "{errs:#?}");
    assert!(errs[2].contains("models[0].max_regression"), "{errs:#?}");
    let errs = errors_for(&format!("{VALID}{model}max_regression = 0.1\n"));
    assert!(
        errs[0].starts_with("bad.toml:21:") && errs[0].contains("without `eval_data`"),
        "{errs:#?}"
    );
}

#[test]
fn unreadable_or_mismatched_certificates_are_errors() {
    let errs = errors_for(&VALID.replace("server.pem", "missing.pem"));
    assert!(
        errs[0].contains("tls.certificates[0].cert") && errs[0].contains("missing.pem"),
        "{errs:?}"
    );
    let pki_key_mismatch = VALID.replace("key = \"server.key\"", "key = \"other.key\"");
    let pki = Pki::new();
    pki.issue("server", &["localhost"]);
    pki.issue("other", &["localhost"]);
    let path = pki.path().join("c.toml");
    std::fs::write(&path, pki_key_mismatch).unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("tls.certificates[0].key") && err.contains("does not match"),
        "{err}"
    );
}

#[test]
fn gateway_check_exits_nonzero_with_located_messages() {
    let (_pki, path) = sample_dir();
    let ok = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains(": ok"));

    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("max_retries = 2", "max_retries = 2\nmax_retires = 3");
    std::fs::write(&path, text).unwrap();
    let bad = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains(&format!("{}:", path.display())) && stderr.contains("max_retires"),
        "{stderr}"
    );
}

#[test]
fn experiment_errors_are_located_and_all_listed() {
    let bad = format!(
        "{VALID}{}",
        r#"
[[experiments]]
name = "exp"
routes = ["all", "nope"]
assign_by = "session:id"

[[experiments.variants]]
name = "a"
models = { recs = "recs-v2" }

[[experiments.variants]]
name = "a"
upstream = "missing"

[experiments.rollout]
steps = [50, 25, 100]
"#
    );
    let errs = errors_for(&bad);
    let find = |needle: &str| {
        errs.iter()
            .find(|e| e.contains(needle))
            .unwrap_or_else(|| panic!("no error about {needle}: {errs:#?}"))
            .clone()
    };
    assert!(find("feedback.key_file").contains("openssl rand -hex 32"));
    let route = find("experiments[0].routes[1]");
    assert!(route.starts_with("bad.toml:20:"), "{route}");
    assert!(find("experiments[0].assign_by").contains("cookie:NAME"));
    assert!(find("experiments[0].variants[0].models").contains("\"recs\" is not a [[models]] name"));
    assert!(find("experiments[0].variants[1].name").contains("already used"));
    assert!(find("experiments[0].variants[1].upstream").contains("no upstream named \"missing\""));
    assert!(find("experiments[0].rollout.steps").contains("must increase"));
    assert_eq!(errs.len(), 7, "{errs:#?}");

    // A route with `variants` of its own cannot also be split; a short key is refused.
    let pki = Pki::new();
    pki.issue("server", &["localhost"]);
    std::fs::write(pki.path().join("short.key"), "too short\n").unwrap();
    let text = format!(
        "{}{}",
        VALID.replace(
            "upstream = \"app\"\n",
            "upstream = \"app\"\nvariants = { a = \"app\" }\ndefault_variant = \"a\"\n"
        ),
        r#"
[feedback]
key_file = "short.key"

[[experiments]]
name = "exp"
routes = ["all"]
assign_by = "header:x-shopper"
[[experiments.variants]]
name = "a"
[[experiments.variants]]
name = "b"
"#
    );
    let path = pki.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("routes[0]: route \"all\" has `variants`"),
        "{err}"
    );
    assert!(err.contains("short.key holds 9 bytes"), "{err}");
}
