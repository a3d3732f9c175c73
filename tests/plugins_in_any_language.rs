//! Plugins in Python (componentize-py) and JavaScript (componentize-js), built by the suite
//! with the tools' default options (`plugins/build.sh --python`, `--js`), run through a real
//! gateway: headers both ways, local responses, metrics, the key-value store, the ranking
//! import, an exception logged with its message, and WASI that gives errors, not data.

use std::time::Duration;

use crate::support::*;

/// The compile cache the tests of one build share (under cargo's target directory), so an
/// interpreter plugin is compiled once per content, not once per gateway.
fn compile_cache() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-compile-cache")
}

/// The gateway settings plugins/README.md gives for interpreted plugins.
const INTERPRETED: &str = "memory_limit_bytes = 67108864\ninstances = 2";

/// A gateway binary with `plugin` (built from plugins/<lang>/hello) on the default route, a
/// sample model `recs`, and JSON logs.
async fn gateway_with(
    pki: &Pki,
    up: &Upstream,
    lang: &str,
) -> (
    tokio::process::Child,
    std::net::SocketAddr,
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let mut spec = gateway::scoring::SampleSpec::embedding(16, 4, 1);
    spec.n_users = 4;
    std::fs::write(
        pki.path().join("recs.safetensors"),
        gateway::scoring::sample_model(&spec),
    )
    .unwrap();
    let wasm = if lang == "rust" {
        plugin_wasm("hello")
    } else {
        lang_plugin(lang, "hello")
    };
    let extra = format!(
        "plugins = [\"hello\"]\n[[plugins]]\nname = \"hello\"\npath = \"{}\"\nconfig = \"howdy\"\n{INTERPRETED}\n\n[scoring]\nbackend = \"cpu\"\n\n[[models]]\nname = \"recs\"\npath = \"recs.safetensors\"\n\n[plugin_runtime]\ncompile_cache_dir = \"{}\"\n",
        wasm.display(),
        compile_cache().display()
    );
    let toml = basic_config(pki, &[up.addr], "", &extra).replace(
        "access_log = false",
        "access_log = false\nformat = \"json\"\nlevel = \"info\"",
    );
    let path = pki.path().join(format!("{lang}.toml"));
    std::fs::write(&path, toml).unwrap();
    spawn_gateway_binary_with_admin(&path).await
}

/// The next log line (JSON) that `pred` accepts, within 20 s.
async fn log_line(
    log: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    loop {
        let line = tokio::time::timeout(Duration::from_secs(20), log.recv())
            .await
            .expect("a log line within 20 s")
            .expect("the gateway is still running");
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if pred(&v) {
                return v;
            }
        }
    }
}

/// A sample's value in Prometheus text, 0 when absent.
fn sample(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn hello_works_end_to_end(lang: &str, language: &str) {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let (_child, addr, admin, mut log) = gateway_with(&pki, &up, lang).await;
    let ca = &pki.ca_der;

    // Local responses, with a count in the key-value store that every instance shares.
    for n in 1..=3 {
        let r = fetch(addr, ca, false, get("localhost", "/hello")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), format!("howdy from {language}\n"));
        assert_eq!(r.header("x-hello-count"), Some(n.to_string().as_str()));
        assert_eq!(r.header("x-hello-lang"), Some(language));
    }
    assert_eq!(up.hits(), 0, "answered by the plugin");

    // Headers both ways on a proxied request.
    let r = fetch(addr, ca, false, get("localhost", "/shop")).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "a"));
    assert_eq!(up.last().headers.get("x-hello").unwrap(), language);
    assert_eq!(r.header("x-hello-lang"), Some(language));

    // The ranking import.
    let r = fetch(
        addr,
        ca,
        false,
        get("localhost", "/hello/rank?model=recs&user=1&items=1,2,3"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
    assert_eq!(v["scores"].as_array().unwrap().len(), 3, "{v}");
    assert!(!v["version"].as_str().unwrap().is_empty(), "{v}");
    let r = fetch(
        addr,
        ca,
        false,
        get("localhost", "/hello/rank?model=nope&user=1&items=1"),
    )
    .await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("ranking failed"), "{}", r.text());

    // No file, no network: errors the plugin sees, not data.
    let probes: &[&str] = if lang != "js" {
        &["/hello/file", "/hello/socket"]
    } else {
        &["/hello/fetch"]
    };
    for probe in probes {
        let r = fetch(addr, ca, false, get("localhost", probe)).await;
        assert_eq!(r.status, 200, "{probe}: {}", r.text());
        assert!(r.text().starts_with("error: "), "{probe}: {}", r.text());
    }

    // An exception fails the call (500 on this fail-closed route), logged with its message.
    let r = fetch(addr, ca, false, get("localhost", "/hello/boom")).await;
    assert_eq!(r.status, 500, "{}", r.text());
    let message = format!("boom: the {language} plugin failed on purpose");
    if lang == "rust" {
        // The SDK logs a panic's message itself, before the trap.
        log_line(&mut log, |v| {
            v["target"] == "plugin"
                && v["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(&message))
        })
        .await;
    }
    let failure = log_line(&mut log, |v| {
        v["fields"]["message"] == "plugin call failed; instance discarded"
    })
    .await;
    if lang != "rust" {
        // An exception's traceback is the guest's stderr, logged with the failure.
        let stderr = failure["fields"]["stderr"].as_str().unwrap();
        assert!(stderr.contains(&message), "{failure}");
    }
    // The plugin serves on with a fresh instance.
    let r = fetch(addr, ca, false, get("localhost", "/hello")).await;
    assert_eq!(r.header("x-hello-count"), Some("4"));

    // Metrics: the plugin's own counter, and the hooks' fuel.
    let metrics = admin_get(admin, "/metrics").await.text();
    assert_eq!(
        sample(
            &metrics,
            "gateway_plugin_hello_served_total{plugin=\"hello\"}"
        ),
        4.0,
        "{metrics}"
    );
    for hook in ["on_request", "on_response"] {
        let labels = format!("{{hook=\"{hook}\",plugin=\"hello\"}}");
        let sum = sample(
            &metrics,
            &format!("gateway_plugin_fuel_per_call_sum{labels}"),
        );
        let count = sample(
            &metrics,
            &format!("gateway_plugin_fuel_per_call_count{labels}"),
        );
        assert!(count > 0.0, "{hook}: {metrics}");
        eprintln!("{language} {hook}: {} fuel per call", (sum / count).round());
    }
}

#[tokio::test]
async fn rust_plugin_works_end_to_end() {
    hello_works_end_to_end("rust", "rust").await;
}

#[tokio::test]
async fn python_plugin_works_end_to_end() {
    hello_works_end_to_end("python", "python").await;
}

#[tokio::test]
async fn javascript_plugin_works_end_to_end() {
    hello_works_end_to_end("js", "javascript").await;
}

/// Compiled once per content: a second engine (what a restart builds) maps in the code the
/// first one wrote to the compile cache, and the 18 MB Python plugin loads in well under a
/// second (compiling it takes tens of seconds).
#[tokio::test]
async fn a_restart_loads_a_python_plugin_from_the_compile_cache_in_under_a_second() {
    use gateway::plugin::PluginRuntime;
    let settings = gateway::config::PluginRuntimeSettings {
        compile_cache: Some(compile_cache()),
        ..Default::default()
    };
    let mut spec = gateway::config::PluginSpec::with_defaults(
        "py",
        lang_plugin("python", "hello"),
        "howdy".into(),
    );
    spec.instances = 1;
    let compiles = |registry: &prometheus::Registry, source: &str| {
        metric_value(
            registry,
            "gateway_plugin_compiles_total",
            &[("plugin", "py"), ("source", source)],
        )
    };
    // The first load compiles, unless another test of this run already did.
    let registry = prometheus::Registry::new();
    let first = PluginRuntime::new(&settings, &registry).unwrap();
    first.load(&spec).await.unwrap();
    assert_eq!(
        compiles(&registry, "compiled") + compiles(&registry, "disk"),
        1.0
    );
    let sha = gateway::store::sha256_hex(&std::fs::read(&spec.path).unwrap());
    let cached = std::fs::read_dir(compile_cache())
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with(&sha));
    assert!(cached, "a compiled file for {sha}");
    drop(first);

    let registry = prometheus::Registry::new();
    let second = PluginRuntime::new(&settings, &registry).unwrap();
    let started = std::time::Instant::now();
    let plugin = second.load(&spec).await.unwrap();
    let took = started.elapsed();
    assert_eq!(compiles(&registry, "disk"), 1.0);
    assert_eq!(compiles(&registry, "compiled"), 0.0);
    eprintln!("python-hello loaded from the compile cache in {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let trial = plugin.trial("/hello").await;
    assert_eq!(trial.local_status, Some(200), "{trial:?}");
}

/// `plugins/build.sh -p NAME` builds any cdylib member of the plugins' workspace (there is no
/// list to keep), and says why when it cannot.
#[test]
fn build_sh_builds_a_member_by_name_or_says_why_not() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let run = |package: &str| {
        std::process::Command::new("bash")
            .arg(root.join("plugins/build.sh"))
            .args(["-p", package])
            .current_dir(&root)
            .output()
            .unwrap()
    };
    let out = run("hello");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("dist/hello.wasm"), "{stdout}");
    assert!(root.join("plugins/dist/hello.wasm").is_file());

    let out = run("no-such-plugin");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("must be a member of plugins/Cargo.toml's workspace"),
        "{stderr}"
    );

    let out = run("gateway-plugin-sdk");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("crate-type = [\"cdylib\"]"), "{stderr}");
}
