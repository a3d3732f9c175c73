//! Hostile plugins (plugins/testing/hostile, wrong-world) are contained: each failure is
//! answered by the route's policy, counted by kind, and the gateway keeps serving; bad files
//! and refusing inits never replace what is serving.

use std::time::{Duration, Instant};

use crate::support::*;

fn hostile_route(mode: &str) -> String {
    format!(
        "[[routes]]\nname = \"{mode}\"\npath_prefix = \"/{mode}\"\nupstream = \"app\"\nplugins = [\"{mode}\"]\nplugin_body_access = true\n{}",
        // The looping plugin is stopped by its fuel; a generous wall-clock deadline lets each
        // fail its own way even on a loaded machine.
        plugin_table(
            mode,
            "hostile",
            mode,
            "instances = 1\ndeadline_ms = 2000\nmemory_limit_bytes = 8388608",
        )
    )
}

#[tokio::test]
async fn each_misbehaviour_gets_a_500_and_its_own_outcome() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let cases = [
        ("loop", "on_request", "fuel"),
        ("grow", "on_request", "memory"),
        ("trap", "on_request", "trap"),
        ("panic", "on_request", "trap"),
        ("huge-header", "on_request", "bad_output"),
        ("huge-body", "on_response", "memory"),
    ];
    let mut extra = String::new();
    for (mode, _, _) in cases {
        extra.push_str(&hostile_route(mode));
    }
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", &extra), pki.path()).await;
    let addr = gw.addr("https");
    for (mode, hook, outcome) in cases {
        for attempt in 1..=2 {
            let started = Instant::now();
            let r = fetch(
                addr,
                &pki.ca_der,
                attempt == 2,
                get("localhost", &format!("/{mode}")),
            )
            .await;
            assert_eq!(r.status, 500, "{mode}: {}", r.text());
            assert!(
                r.text().contains(&format!("plugin {mode} failed")),
                "{}",
                r.text()
            );
            assert!(r.header("x-request-id").is_some());
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{mode} took {:?}",
                started.elapsed()
            );
            // The gateway still serves everything else.
            assert_eq!(
                fetch(addr, &pki.ca_der, false, get("localhost", "/"))
                    .await
                    .status,
                200
            );
        }
        let counted = gw.metric(
            "gateway_plugin_invocations_total",
            &[("plugin", mode), ("hook", hook), ("outcome", outcome)],
        );
        assert_eq!(counted, 2.0, "{mode} counted as {outcome} on {hook}");
    }
}

#[tokio::test]
async fn fail_open_routes_skip_a_failing_plugin() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let extra = format!(
        "plugins = [\"trap\"]\nplugin_failure = \"fail-open\"\n{}",
        plugin_table("trap", "hostile", "trap", "instances = 1")
    );
    let gw = TestGateway::start(&basic_config(&pki, &[up.addr], "", &extra), pki.path()).await;
    for _ in 0..3 {
        let r = fetch(gw.addr("https"), &pki.ca_der, false, get("localhost", "/")).await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "a"));
    }
    assert_eq!(
        gw.metric(
            "gateway_plugin_invocations_total",
            &[("plugin", "trap"), ("outcome", "trap")]
        ),
        3.0
    );
}

async fn start_error(extra: &str) -> String {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let toml = basic_config(&pki, &[up.addr], "", extra);
    let config = gateway::Config::from_toml(&toml, "t.toml", pki.path()).unwrap();
    match gateway::Gateway::start(config, prometheus::Registry::new()).await {
        Ok(_) => panic!("gateway started with a bad plugin"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn bad_plugin_files_and_refusing_inits_are_load_errors() {
    let err = start_error(&format!(
        "plugins = [\"p\"]\n{}",
        plugin_table("p", "hostile", "init-fail", "")
    ))
    .await;
    assert!(
        err.contains("init refused") && err.contains("hostile plugin refuses to start"),
        "{err}"
    );

    let err = start_error(&format!(
        "plugins = [\"p\"]\n{}",
        plugin_table("p", "wrong-world", "", "")
    ))
    .await;
    assert!(
        err.contains("does not implement storefront:gateway/plugin@0.1.0"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    for (file, bytes) in [
        ("garbage.wasm", b"not wasm at all".to_vec()),
        ("core.wasm", b"\0asm\x01\0\0\0".to_vec()),
    ] {
        let path = dir.path().join(file);
        std::fs::write(&path, bytes).unwrap();
        let table = format!(
            "plugins = [\"p\"]\n[[plugins]]\nname = \"p\"\npath = \"{}\"\n",
            path.display()
        );
        let err = start_error(&table).await;
        assert!(err.contains("not a WebAssembly component"), "{file}: {err}");
    }
}

#[tokio::test]
async fn a_failed_reload_keeps_the_serving_plugins() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let good = basic_config(
        &pki,
        &[up.addr],
        "",
        &format!("plugins = [\"p\"]\n{}", plugin_table("p", "noop", "", "")),
    );
    let gw = TestGateway::start(&good, pki.path()).await;
    let bad = basic_config(
        &pki,
        &[up.addr],
        "",
        &format!(
            "plugins = [\"p\"]\n{}",
            plugin_table("p", "hostile", "init-fail", "")
        ),
    );
    let err = gw
        .gateway
        .reload(gateway::Config::from_toml(&bad, "t.toml", pki.path()).unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("refuses to start"), "{err}");
    let r = fetch(gw.addr("https"), &pki.ca_der, false, get("localhost", "/")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        gw.metric(
            "gateway_plugin_invocations_total",
            &[("plugin", "p"), ("hook", "on_request"), ("outcome", "ok")]
        ),
        1.0
    );
}

#[test]
fn plugin_check_reports_the_world_and_refuses_strangers() {
    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["plugin", "check"])
        .arg(plugin_wasm("noop"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        out.contains("exports   on-request") && out.contains("init ok"),
        "{out}"
    );
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["plugin", "check"])
        .arg(plugin_wasm("wrong-world"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a plugin"));
}

/// A plugin has no stderr: the SDK sends a panic's message to the gateway's log, tagged with
/// the plugin's name, before the trap. Runs the real binary to read its log.
#[tokio::test]
async fn a_panicking_plugin_leaves_its_message_in_the_log() {
    use tokio::io::AsyncBufReadExt;
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let toml = basic_config(&pki, &[up.addr], "", &hostile_route("panic")).replace(
        "access_log = false",
        "access_log = false\nformat = \"json\"\nlevel = \"info\"",
    );
    let path = pki.path().join("gateway.toml");
    std::fs::write(&path, toml).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("run")
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut next_line = async || {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("a log line within 20 s")
            .unwrap()
            .expect("the gateway is still running");
        serde_json::from_str::<serde_json::Value>(&line).unwrap()
    };
    let addr = loop {
        let v = next_line().await;
        if v["fields"]["message"] == "listening" && v["fields"]["listener"] == "https" {
            break v["fields"]["addr"].as_str().unwrap().parse().unwrap();
        }
    };
    let r = fetch(addr, &pki.ca_der, false, get("localhost", "/panic")).await;
    assert_eq!(r.status, 500, "{}", r.text());
    let panic_line = loop {
        let v = next_line().await;
        if v["target"] == "plugin" {
            break v;
        }
    };
    assert_eq!(panic_line["level"], "ERROR", "{panic_line}");
    assert_eq!(panic_line["fields"]["plugin"], "panic", "{panic_line}");
    let message = panic_line["fields"]["message"].as_str().unwrap();
    assert!(
        message.contains("hostile plugin panics on purpose") && message.contains("src/lib.rs"),
        "{message}"
    );
}

/// Starts the real binary with one hostile route in `mode` and returns it, its address and
/// its log (JSON lines).
async fn binary_with_hostile(
    pki: &Pki,
    up: &Upstream,
    mode: &str,
) -> (
    tokio::process::Child,
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let toml = basic_config(pki, &[up.addr], "", &hostile_route(mode)).replace(
        "access_log = false",
        "access_log = false\nformat = \"json\"\nlevel = \"info\"",
    );
    let path = pki.path().join(format!("{mode}.toml"));
    std::fs::write(&path, toml).unwrap();
    let (child, addr, _admin, log) = spawn_gateway_binary_with_admin(&path).await;
    (child, addr, log)
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

/// WASI is linked without capabilities: clocks and random work, files, directories,
/// sockets and the environment are errors (not traps, not data), stdout and stderr are the
/// gateway's log under the plugin's name.
#[tokio::test]
async fn wasi_lends_clocks_and_random_and_nothing_outside() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let (_child, addr, mut log) = binary_with_hostile(&pki, &up, "wasi").await;
    let r = fetch(addr, &pki.ca_der, false, get("localhost", "/wasi")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    for expected in [
        "file: error",
        "dir: error",
        "env: 0 variables, 0 arguments",
        "tcp: error",
        "wall clock: ok",
        "monotonic clock: ok",
        "random: ok",
    ] {
        assert!(text.contains(expected), "{expected:?} in:\n{text}");
    }
    assert!(!text.contains("data"), "{text}");
    for (stream, level, line) in [
        ("stdout", "INFO", "hostile: hello on stdout"),
        ("stderr", "WARN", "hostile: hello on stderr"),
    ] {
        let v = log_line(&mut log, |v| v["fields"]["message"] == line).await;
        assert_eq!(v["target"], "plugin", "{v}");
        assert_eq!(v["level"], level, "{v}");
        assert_eq!(v["fields"]["plugin"], "wasi", "{v}");
        assert_eq!(v["fields"]["stream"], stream, "{v}");
    }
}

/// A failed call is logged with the trap's reason, the guest's backtrace (with function
/// names) and what it wrote to stderr before it failed.
#[tokio::test]
async fn a_failure_is_logged_with_its_reason_backtrace_and_stderr() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let (_child, addr, mut log) = binary_with_hostile(&pki, &up, "stderr-trap").await;
    let r = fetch(addr, &pki.ca_der, false, get("localhost", "/stderr-trap")).await;
    assert_eq!(r.status, 500, "{}", r.text());
    let v = log_line(&mut log, |v| {
        v["fields"]["message"] == "plugin call failed; instance discarded"
    })
    .await;
    let fields = &v["fields"];
    assert_eq!(fields["outcome"], "trap", "{v}");
    let error = fields["error"].as_str().unwrap();
    assert!(error.contains("unreachable"), "{error}");
    let backtrace = fields["backtrace"].as_str().unwrap();
    // Frames are named from the component's name section: here the export everything was
    // inlined into (a release build with LTO).
    assert!(
        backtrace.contains("0: hostile.wasm!") && backtrace.contains("on-request"),
        "{backtrace}"
    );
    let stderr = fields["stderr"].as_str().unwrap();
    assert!(
        stderr.contains("hostile: about to trap") && stderr.contains("the reason is a test"),
        "{stderr}"
    );
}

/// A load error says why in full: reason, backtrace, stderr; `plugin check` prints the same.
#[tokio::test]
async fn a_trapping_init_is_a_load_error_with_its_backtrace_and_stderr() {
    let err = start_error(&format!(
        "plugins = [\"p\"]\n{}",
        plugin_table("p", "hostile", "init-trap", "")
    ))
    .await;
    for expected in [
        "init failed",
        "unreachable",
        "wasm backtrace",
        "init",
        "hostile: init cannot go on",
    ] {
        assert!(err.contains(expected), "{expected:?} in:\n{err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["plugin", "check", "--config", "init-trap"])
        .arg(plugin_wasm("hostile"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unreachable")
            && stderr.contains("wasm backtrace")
            && stderr.contains("hostile: init cannot go on"),
        "{stderr}"
    );
}

/// A plugin is sized at load: its memory must start under its cap, its ready instances
/// must fit the engine's pool; the refusal names the setting to change.
#[tokio::test]
async fn a_plugin_that_does_not_fit_its_limits_is_refused_at_load() {
    let err = start_error(&format!(
        "plugins = [\"p\"]\n{}",
        plugin_table("p", "noop", "", "memory_limit_bytes = 65536")
    ))
    .await;
    assert!(
        err.contains("does not fit its limits")
            && err.contains("its memory starts at")
            && err.contains("set memory_limit_bytes to at least"),
        "{err}"
    );
    let err = start_error(&format!(
        "plugins = [\"p\"]\n{}\n[plugin_runtime]\nmax_instances = 4\n",
        plugin_table("p", "noop", "", "instances = 8")
    ))
    .await;
    assert!(
        err.contains("its 8 ready instances need 8 instances")
            && err.contains("raise plugin_runtime.max_instances"),
        "{err}"
    );
}

/// `plugin check` runs the plugin as `gateway run` would with default settings, calls each
/// hook once and reports what one instance takes and the memory and fuel it used.
#[test]
fn plugin_check_reports_size_memory_and_fuel() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args([
            "plugin", "check", "--config", "ok", "--path", "/x", "--calls", "3",
        ])
        .arg(plugin_wasm("hostile"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "core instances, 1 memories",
        "init      memory reached",
        "GET /x  on-request ok",
        "on-response ok",
        "memory    reached",
        "3 calls  on-request ",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in:\n{stdout}");
    }
    // A failing test call fails the check, with the failure in full.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["plugin", "check", "--config", "stderr-trap"])
        .arg(plugin_wasm("hostile"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the test call failed") && stderr.contains("the reason is a test"),
        "{stderr}"
    );
}
