//! [`RawConfig`] to [`Config`]: defaults applied, every value checked, problems collected with
//! the path of the field they concern.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use super::files::{Disk, Files};
use super::raw::*;
use super::*;

mod experiments;

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    /// A table key.
    Key(&'static str),
    /// An array index.
    Index(usize),
}

/// A problem before it is located in the file.
#[derive(Debug)]
pub struct Problem {
    /// Where, as keys and indices from the top.
    pub path: Vec<Seg>,
    /// What to fix.
    pub message: String,
}

/// Renders `routes[1].upstream`.
pub fn path_string(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Byte offset of the deepest part of `path` present in the document.
pub fn locate(doc: &toml_edit::Document<&str>, path: &[Seg]) -> Option<usize> {
    use toml_edit::{Item, Value};
    let mut best = None;
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut i = 0;
    while let Some(Seg::Key(k)) = path.get(i) {
        let Some((key, item)) = table.get_key_value(k) else {
            break;
        };
        let last = i + 1 == path.len();
        best = if last {
            key.span()
        } else {
            item.span().or_else(|| key.span())
        }
        .or(best);
        i += 1;
        match (item, path.get(i)) {
            (Item::ArrayOfTables(tables), Some(Seg::Index(n))) => {
                let Some(t) = tables.get(*n) else { break };
                best = t.span().or(best);
                table = t;
                i += 1;
            }
            (Item::Value(Value::Array(values)), Some(Seg::Index(n))) => {
                let Some(v) = values.get(*n) else { break };
                best = v.span().or(best);
                i += 1;
                match v.as_inline_table() {
                    Some(t) => table = t,
                    None => break,
                }
            }
            (_, Some(Seg::Key(_))) => match item.as_table_like() {
                Some(t) => table = t,
                None => break,
            },
            _ => break,
        }
    }
    best.map(|s| s.start)
}

/// What the checks found, in order: problems, and the reads of the file phase at the place
/// where their field is checked (so a file's problem keeps its place in the list).
enum Entry {
    Problem(Problem),
    Read(Read),
}

/// A file or variable the configuration names, read by [`Checked::load_files`].
enum Read {
    /// `[admin] token_file`: `shown` as written, for the message.
    TokenFile { path: PathBuf, shown: String },
    /// `[admin] token_env`.
    TokenEnv(String),
    /// A `[[tls.certificates]]` entry; added to the config when it loads.
    Certificate {
        index: usize,
        server_names: Vec<HostPattern>,
        default: bool,
        cert_path: PathBuf,
        key_path: PathBuf,
    },
    /// A plugin's component file must be a readable file.
    PluginFile { index: usize, path: PathBuf },
    /// A model file must be a readable file.
    ModelFile { index: usize, path: PathBuf },
    /// A model's held-out file (`eval_data`) must be a readable file; `shown` as written.
    EvalData {
        index: usize,
        path: PathBuf,
        shown: String,
    },
    /// `[privacy] key_file`: a secret; `shown` as written.
    PrivacyKey { path: PathBuf, shown: String },
    /// `[feedback] key_file` or one of `old_key_files`: a secret; `shown` as written.
    FeedbackKey {
        field: Vec<Seg>,
        path: PathBuf,
        shown: String,
    },
}

struct Checker {
    entries: Vec<Entry>,
}

impl Checker {
    fn fail(&mut self, path: Vec<Seg>, message: impl Into<String>) {
        self.entries.push(Entry::Problem(Problem {
            path,
            message: message.into(),
        }));
    }

    fn read(&mut self, read: Read) {
        self.entries.push(Entry::Read(read));
    }
}

/// A configuration whose values are checked, before the files it names are read: the first
/// of validation's two phases ([`check`]), pure; [`Checked::load_files`] is the second.
pub struct Checked {
    config: Config,
    entries: Vec<Entry>,
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// Applies defaults and checks every field, then reads the files and variables the config
/// names from the filesystem and the environment ([`Disk`]); returns all problems found.
pub fn validate(raw: RawConfig, base_dir: &Path) -> Result<Config, Vec<Problem>> {
    validate_with(raw, base_dir, &Disk)
}

/// [`validate`], reading the files and variables the config names through `files`.
pub fn validate_with(
    raw: RawConfig,
    base_dir: &Path,
    files: &dyn Files,
) -> Result<Config, Vec<Problem>> {
    check(raw, base_dir).load_files(files)
}

/// The first phase of validation, without I/O: applies defaults and checks every value,
/// noting the files and variables the config names (`base_dir` anchors relative paths).
pub fn check(raw: RawConfig, base_dir: &Path) -> Checked {
    use Seg::{Index, Key};
    let mut c = Checker {
        entries: Vec::new(),
    };

    // [server]
    let drain = raw.server.drain_timeout_ms.unwrap_or(30_000);
    let server = ServerSettings {
        worker_threads: raw.server.worker_threads.unwrap_or(0),
        drain_timeout: ms(drain),
        watch_files: raw.server.watch_files.unwrap_or(true),
        watch_debounce: ms(raw.server.watch_debounce_ms.unwrap_or(250)),
        anomaly_interval: ms(raw.server.anomaly_interval_ms.unwrap_or(10_000)),
    };
    if !(100..=3_600_000).contains(&server.anomaly_interval.as_millis()) {
        c.fail(
            vec![Key("server"), Key("anomaly_interval_ms")],
            "must be between 100 and 3600000 milliseconds",
        );
    }
    if server.worker_threads > 1024 {
        c.fail(
            vec![Key("server"), Key("worker_threads")],
            "must be at most 1024 (0 means one per core)",
        );
    }

    // [limits]
    let l = &raw.limits;
    let limits = Limits {
        max_connections: l.max_connections.unwrap_or(10_000),
        max_header_bytes: l.max_header_bytes.unwrap_or(64 * 1024),
        max_body_bytes: l.max_body_bytes.unwrap_or(10 * 1024 * 1024),
        header_read_timeout: ms(l.header_read_timeout_ms.unwrap_or(10_000)),
        body_read_timeout: ms(l.body_read_timeout_ms.unwrap_or(30_000)),
        body_deadline: ms(l.body_deadline_ms.unwrap_or(60_000)),
        send_timeout: ms(l.send_timeout_ms.unwrap_or(30_000)),
        idle_timeout: ms(l.idle_timeout_ms.unwrap_or(60_000)),
        h2_max_concurrent_streams: l.h2_max_concurrent_streams.unwrap_or(256),
        max_inflight_requests: l.max_inflight_requests.unwrap_or(4096),
        max_queue_time: ms(l.max_queue_time_ms.unwrap_or(50)),
    };
    let lim = |f| vec![Key("limits"), Key(f)];
    if limits.max_connections == 0 {
        c.fail(lim("max_connections"), "must be at least 1");
    }
    if !(8192..=16 * 1024 * 1024).contains(&limits.max_header_bytes) {
        c.fail(
            lim("max_header_bytes"),
            "must be between 8192 and 16777216 bytes",
        );
    }
    for (field, d) in [
        ("header_read_timeout_ms", limits.header_read_timeout),
        ("body_read_timeout_ms", limits.body_read_timeout),
        ("body_deadline_ms", limits.body_deadline),
        ("send_timeout_ms", limits.send_timeout),
        ("idle_timeout_ms", limits.idle_timeout),
    ] {
        if d.is_zero() {
            c.fail(lim(field), "must be greater than 0 milliseconds");
        }
    }
    if limits.h2_max_concurrent_streams == 0 {
        c.fail(lim("h2_max_concurrent_streams"), "must be at least 1");
    }
    if limits.max_inflight_requests == 0 {
        c.fail(lim("max_inflight_requests"), "must be at least 1");
    }
    if limits.max_queue_time > Duration::from_secs(60) {
        c.fail(
            lim("max_queue_time_ms"),
            "must be at most 60000 milliseconds (0 turns queue-time shedding off)",
        );
    }

    // [logging]
    let format = match raw.logging.format.as_deref().unwrap_or("text") {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            c.fail(
                vec![Key("logging"), Key("format")],
                format!("unknown format {other:?}; use \"text\" or \"json\""),
            );
            LogFormat::Text
        }
    };
    let level = raw.logging.level.unwrap_or_else(|| "info".to_string());
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
        c.fail(
            vec![Key("logging"), Key("level")],
            format!("not a valid filter ({e}); try \"info\" or \"gateway=debug\""),
        );
    }
    let logging = LoggingSettings {
        level,
        format,
        access_log: raw.logging.access_log.unwrap_or(true),
    };

    // [proxy]
    let forwarded = match raw.proxy.forwarded.as_deref().unwrap_or("x-forwarded") {
        "x-forwarded" => ForwardedMode::XForwarded,
        "forwarded" => ForwardedMode::Forwarded,
        "both" => ForwardedMode::Both,
        "none" => ForwardedMode::None,
        other => {
            c.fail(
                vec![Key("proxy"), Key("forwarded")],
                format!("unknown mode {other:?}; use \"x-forwarded\", \"forwarded\", \"both\" or \"none\""),
            );
            ForwardedMode::None
        }
    };
    let via_name = raw.proxy.via_name.unwrap_or_else(|| "gateway".to_string());
    let via_ok =
        !via_name.is_empty() && via_name.bytes().all(|b| b.is_ascii_graphic() && b != b',');
    if !via_ok {
        c.fail(
            vec![Key("proxy"), Key("via_name")],
            "must be a non-empty token of visible ASCII without commas",
        );
    }
    let via_name = match (raw.proxy.via.unwrap_or(false), via_ok) {
        (true, true) => HeaderValue::from_str(&via_name).ok(),
        _ => None,
    };
    let request_id_header = match HeaderName::from_bytes(
        raw.proxy
            .request_id_header
            .as_deref()
            .unwrap_or("x-request-id")
            .as_bytes(),
    ) {
        Ok(h) => h,
        Err(_) => {
            c.fail(
                vec![Key("proxy"), Key("request_id_header")],
                "not a valid HTTP header name",
            );
            HeaderName::from_static("x-request-id")
        }
    };
    let proxy = ProxySettings {
        forwarded,
        via_name,
        request_id_header,
        version_headers: raw.proxy.version_headers.unwrap_or(false),
    };

    // [admin]
    let bind = match raw.admin.bind.as_deref() {
        Some(text) => parse_addr(&mut c, vec![Key("admin"), Key("bind")], text)
            .unwrap_or(AdminSettings::DEFAULT_BIND),
        None => AdminSettings::DEFAULT_BIND,
    };
    // The token itself is read in the file phase.
    match (&raw.admin.token_file, &raw.admin.token_env) {
        (Some(file), _) => c.read(Read::TokenFile {
            path: resolve(base_dir, file),
            shown: file.clone(),
        }),
        (None, Some(var)) => c.read(Read::TokenEnv(var.clone())),
        (None, None) => {}
    }
    let token = None;
    if !bind.ip().is_loopback() && raw.admin.token_file.is_none() && raw.admin.token_env.is_none() {
        c.fail(
            vec![Key("admin"), Key("bind")],
            format!("{bind} is not a loopback address; set token_file or token_env so the admin API is not open to the network"),
        );
    }
    let admin = AdminSettings {
        bind,
        token,
        max_upload_bytes: raw.admin.max_upload_bytes.unwrap_or(256 << 20),
        max_uploads_per_minute: raw.admin.max_uploads_per_minute.unwrap_or(30),
    };

    // [[tls.certificates]]
    let cert_count = raw.tls.certificates.len();
    let mut defaults = 0;
    for (i, rc) in raw.tls.certificates.into_iter().enumerate() {
        let at = |f: &'static str| vec![Key("tls"), Key("certificates"), Index(i), Key(f)];
        let mut names = Vec::new();
        for (j, name) in rc.server_names.iter().enumerate() {
            match parse_host_pattern(name, false) {
                Ok(p) => names.push(p),
                Err(e) => c.fail(
                    vec![
                        Key("tls"),
                        Key("certificates"),
                        Index(i),
                        Key("server_names"),
                        Index(j),
                    ],
                    e,
                ),
            }
        }
        let default = rc.default.unwrap_or(cert_count == 1);
        if default {
            defaults += 1;
        }
        if names.is_empty() && !default {
            c.fail(
                at("server_names"),
                "list the SNI names this certificate answers, or mark it `default = true`",
            );
        }
        // Loaded in the file phase, which adds it to the config.
        c.read(Read::Certificate {
            index: i,
            server_names: names,
            default,
            cert_path: resolve(base_dir, &rc.cert),
            key_path: resolve(base_dir, &rc.key),
        });
    }
    let certificates = Vec::new();
    if cert_count > 1 && defaults != 1 {
        c.fail(
            vec![Key("tls"), Key("certificates")],
            format!("exactly one certificate must have `default = true` (found {defaults})"),
        );
    }

    // [[listeners]]
    let mut listeners = Vec::new();
    let mut listener_names = HashMap::new();
    if raw.listeners.is_empty() {
        c.fail(
            vec![Key("listeners")],
            "add at least one [[listeners]] table with `name` and `bind`",
        );
    }
    let mut needs_tls = false;
    for (i, rl) in raw.listeners.into_iter().enumerate() {
        let at = |f: &'static str| vec![Key("listeners"), Index(i), Key(f)];
        check_name(
            &mut c,
            at("name"),
            &rl.name,
            &mut listener_names,
            i,
            "listener",
        );
        let bind = parse_addr(&mut c, at("bind"), &rl.bind);
        let kind = match (
            rl.protocol.as_deref().unwrap_or("https"),
            rl.http_mode.as_deref(),
        ) {
            ("https", None) => {
                needs_tls = true;
                ListenerKind::Https
            }
            ("https", Some(_)) => {
                c.fail(
                    at("http_mode"),
                    "only `protocol = \"http\"` listeners take http_mode; remove it",
                );
                ListenerKind::Https
            }
            ("http", None | Some("serve")) => ListenerKind::HttpServe,
            ("http", Some("redirect")) => ListenerKind::HttpRedirect {
                https_port: rl.redirect_https_port.unwrap_or(443),
            },
            ("http", Some(other)) => {
                c.fail(
                    at("http_mode"),
                    format!("unknown mode {other:?}; use \"serve\" or \"redirect\""),
                );
                ListenerKind::HttpServe
            }
            (other, _) => {
                c.fail(
                    at("protocol"),
                    format!("unknown protocol {other:?}; use \"https\" or \"http\""),
                );
                ListenerKind::Https
            }
        };
        if rl.redirect_https_port.is_some() && !matches!(kind, ListenerKind::HttpRedirect { .. }) {
            c.fail(
                at("redirect_https_port"),
                "only applies with `http_mode = \"redirect\"`; remove it",
            );
        }
        if rl.reject_misdirected.is_some() && kind != ListenerKind::Https {
            c.fail(
                at("reject_misdirected"),
                "only applies to `protocol = \"https\"` listeners; remove it",
            );
        }
        if let Some(bind) = bind {
            listeners.push(ListenerSpec {
                name: rl.name,
                bind,
                kind,
                reject_misdirected: rl.reject_misdirected.unwrap_or(false),
            });
        }
    }
    if needs_tls && cert_count == 0 {
        c.fail(
            vec![Key("tls"), Key("certificates")],
            "an https listener needs at least one [[tls.certificates]] entry",
        );
    }

    // [[upstreams]]
    let mut upstreams = Vec::new();
    let mut upstream_names = HashMap::new();
    if raw.upstreams.is_empty() {
        c.fail(
            vec![Key("upstreams")],
            "add at least one [[upstreams]] table with `name` and `backends`",
        );
    }
    for (i, ru) in raw.upstreams.into_iter().enumerate() {
        let at = |f: &'static str| vec![Key("upstreams"), Index(i), Key(f)];
        check_name(
            &mut c,
            at("name"),
            &ru.name,
            &mut upstream_names,
            i,
            "upstream",
        );
        if ru.backends.is_empty() {
            c.fail(at("backends"), "list at least one backend as \"host:port\"");
        }
        let mut backends = Vec::new();
        for (j, b) in ru.backends.iter().enumerate() {
            match b.parse::<http::uri::Authority>() {
                Ok(a) if a.port_u16().is_some() && !b.contains('@') => backends.push(a),
                _ => c.fail(
                    vec![Key("upstreams"), Index(i), Key("backends"), Index(j)],
                    format!("{b:?} is not \"host:port\" (e.g. \"127.0.0.1:8080\")"),
                ),
            }
        }
        let balance = match ru.balance.as_deref().unwrap_or("round_robin") {
            "round_robin" => Balance::RoundRobin,
            "least_in_flight" => Balance::LeastInFlight,
            other => {
                c.fail(
                    at("balance"),
                    format!("unknown policy {other:?}; use \"round_robin\" or \"least_in_flight\""),
                );
                Balance::RoundRobin
            }
        };
        let protocol = match ru.protocol.as_deref().unwrap_or("http1") {
            "http1" => UpstreamProtocol::Http1,
            "h2" => UpstreamProtocol::H2,
            other => {
                c.fail(
                    at("protocol"),
                    format!("unknown protocol {other:?}; use \"http1\" or \"h2\""),
                );
                UpstreamProtocol::Http1
            }
        };
        let positive = |c: &mut Checker, f: &'static str, v: u64| {
            if v == 0 {
                c.fail(at(f), "must be greater than 0 milliseconds");
            }
            ms(v)
        };
        let connect_timeout = positive(
            &mut c,
            "connect_timeout_ms",
            ru.connect_timeout_ms.unwrap_or(1000),
        );
        let request_timeout = positive(
            &mut c,
            "request_timeout_ms",
            ru.request_timeout_ms.unwrap_or(15_000),
        );
        let body_timeout = positive(
            &mut c,
            "body_timeout_ms",
            ru.body_timeout_ms.unwrap_or(60_000),
        );
        let pool_idle_timeout = positive(
            &mut c,
            "pool_idle_timeout_ms",
            ru.pool_idle_timeout_ms.unwrap_or(90_000),
        );
        let ratio = ru.retry_budget_ratio.unwrap_or(0.2);
        if !(0.0..=1.0).contains(&ratio) {
            c.fail(at("retry_budget_ratio"), "must be between 0.0 and 1.0");
        }
        let panic_threshold = ru.panic_threshold.unwrap_or(0.5);
        if !(0.0..=1.0).contains(&panic_threshold) {
            c.fail(at("panic_threshold"), "must be between 0.0 and 1.0");
        }
        let max_retries = ru.max_retries.unwrap_or(2);
        if max_retries > 10 {
            c.fail(at("max_retries"), "must be at most 10");
        }
        let health_check = ru.health_check.map(|h| {
            let hat =
                |f: &'static str| vec![Key("upstreams"), Index(i), Key("health_check"), Key(f)];
            let path = h.path.unwrap_or_else(|| "/healthz".to_string());
            if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
                c.fail(hat("path"), "must be an absolute path such as \"/healthz\"");
            }
            let spec = HealthCheckSpec {
                path,
                interval: ms(h.interval_ms.unwrap_or(5000)),
                timeout: ms(h.timeout_ms.unwrap_or(2000)),
                healthy_threshold: h.healthy_threshold.unwrap_or(2),
                unhealthy_threshold: h.unhealthy_threshold.unwrap_or(3),
            };
            if spec.interval.is_zero() {
                c.fail(hat("interval_ms"), "must be greater than 0 milliseconds");
            }
            if spec.timeout.is_zero() {
                c.fail(hat("timeout_ms"), "must be greater than 0 milliseconds");
            }
            if spec.healthy_threshold == 0 {
                c.fail(hat("healthy_threshold"), "must be at least 1");
            }
            if spec.unhealthy_threshold == 0 {
                c.fail(hat("unhealthy_threshold"), "must be at least 1");
            }
            spec
        });
        let ejection_ms = ru.passive.ejection_ms.unwrap_or(10_000);
        if ejection_ms == 0 {
            c.fail(
                vec![
                    Key("upstreams"),
                    Index(i),
                    Key("passive"),
                    Key("ejection_ms"),
                ],
                "must be greater than 0 milliseconds",
            );
        }
        let passive_at = |f: &'static str| vec![Key("upstreams"), Index(i), Key("passive"), Key(f)];
        let max_ejected_share = ru.passive.max_ejected_share.unwrap_or(0.5);
        if !(0.0..=1.0).contains(&max_ejected_share) {
            c.fail(
                passive_at("max_ejected_share"),
                "must be between 0.0 and 1.0",
            );
        }
        let local_overload_weight = ru.passive.local_overload_weight.unwrap_or(0.25);
        if !(0.0..=1.0).contains(&local_overload_weight) {
            c.fail(
                passive_at("local_overload_weight"),
                "must be between 0.0 and 1.0",
            );
        }
        upstreams.push(UpstreamSpec {
            name: ru.name,
            backends,
            balance,
            protocol,
            connect_timeout,
            request_timeout,
            body_timeout,
            pool_idle_timeout,
            pool_max_idle_per_backend: ru.pool_max_idle_per_backend.unwrap_or(128),
            max_retries,
            retry_budget_ratio: ratio,
            retry_budget_min_per_sec: ru.retry_budget_min_per_sec.unwrap_or(5),
            panic_threshold,
            health_check,
            eject_after_failures: ru.passive.consecutive_failures.unwrap_or(5),
            ejection: ms(ejection_ms),
            max_ejected_share,
            local_overload_weight,
        });
    }

    // [plugin_runtime]
    let pr = &raw.plugin_runtime;
    let defaults = PluginRuntimeSettings::default();
    let epoch_tick_ms = pr
        .epoch_tick_ms
        .unwrap_or(defaults.epoch_tick.as_millis() as u64);
    let plugin_runtime = PluginRuntimeSettings {
        max_instances: pr.max_instances.unwrap_or(defaults.max_instances),
        epoch_tick: ms(epoch_tick_ms),
        fuel: pr.fuel.unwrap_or(defaults.fuel),
        // Next to the content store unless the config says where.
        compile_cache: match (&pr.compile_cache_dir, &raw.store.dir) {
            (Some(d), _) => Some(resolve(base_dir, d)),
            (None, Some(store)) => Some(resolve(base_dir, store).join("compiled")),
            (None, None) => None,
        },
        perf_map: false,
    };
    if !(1..=100_000).contains(&plugin_runtime.max_instances) {
        c.fail(
            vec![Key("plugin_runtime"), Key("max_instances")],
            "must be between 1 and 100000",
        );
    }
    if !(1..=1000).contains(&epoch_tick_ms) {
        c.fail(
            vec![Key("plugin_runtime"), Key("epoch_tick_ms")],
            "must be between 1 and 1000 milliseconds",
        );
    }

    // [[plugins]]
    let mut plugins = Vec::new();
    let mut plugin_names = HashMap::new();
    for (i, rp) in raw.plugins.into_iter().enumerate() {
        let at = |f: &'static str| vec![Key("plugins"), Index(i), Key(f)];
        check_name(&mut c, at("name"), &rp.name, &mut plugin_names, i, "plugin");
        let (path, oci) = check_source(
            &mut c,
            base_dir,
            ("plugins", i),
            raw.store.dir.is_some(),
            SourceFields {
                path: rp.path,
                source: rp.source,
                credentials_file: rp.oci_credentials_file,
                resolve_interval_s: rp.oci_resolve_interval_s,
            },
        );
        if oci.is_none() {
            c.read(Read::PluginFile {
                index: i,
                path: path.clone(),
            });
        }
        let config = match rp.config {
            None => String::new(),
            Some(toml::Value::String(s)) => s,
            Some(toml::Value::Table(t)) => toml::to_string(&t).unwrap_or_default(),
            Some(_) => {
                c.fail(at("config"), "must be a string or a table");
                String::new()
            }
        };
        let deadline_ms = rp.deadline_ms.unwrap_or(crate::DEFAULT_PLUGIN_DEADLINE_MS);
        if !(1..=60_000).contains(&deadline_ms) {
            c.fail(
                at("deadline_ms"),
                "must be between 1 and 60000 milliseconds",
            );
        }
        let memory_limit = rp
            .memory_limit_bytes
            .unwrap_or(crate::DEFAULT_PLUGIN_MEMORY_LIMIT as u64);
        if !((1 << 16)..=(4u64 << 30)).contains(&memory_limit) {
            c.fail(
                at("memory_limit_bytes"),
                "must be between 65536 (one wasm page) and 4294967296",
            );
        }
        if rp.fuel_per_call.is_some() && !plugin_runtime.fuel {
            c.fail(
                at("fuel_per_call"),
                "needs `fuel = true` in [plugin_runtime]",
            );
        }
        if rp.fuel_per_body_byte > Some(1_000_000) {
            c.fail(at("fuel_per_body_byte"), "must be between 0 and 1000000");
        }
        if rp.fuel_per_call == Some(0) || rp.fuel_per_call > Some(900_000_000_000_000_000) {
            c.fail(
                at("fuel_per_call"),
                "must be between 1 and 900000000000000000",
            );
        }
        let fuel_per_call = plugin_runtime
            .fuel
            .then(|| rp.fuel_per_call.unwrap_or(crate::DEFAULT_FUEL_PER_CALL));
        let instances = rp.instances.unwrap_or(crate::DEFAULT_PLUGIN_INSTANCES);
        if !(1..=1024).contains(&instances) {
            c.fail(at("instances"), "must be between 1 and 1024");
        }
        let sha256 = check_pin(&mut c, at("sha256"), rp.sha256.as_deref());
        plugins.push(PluginSpec {
            sha256,
            name: rp.name,
            path,
            oci,
            config,
            deadline: ms(deadline_ms),
            memory_limit: memory_limit as usize,
            fuel_per_call,
            fuel_per_body_byte: rp
                .fuel_per_body_byte
                .unwrap_or(crate::DEFAULT_FUEL_PER_BODY_BYTE),
            max_output_bytes: rp
                .max_output_bytes
                .unwrap_or(crate::DEFAULT_PLUGIN_MAX_OUTPUT_BYTES as u64)
                as usize,
            instances,
        });
    }

    // [scoring] and [[models]]
    let rs = &raw.scoring;
    let backend = match rs
        .backend
        .as_deref()
        .unwrap_or("auto")
        .parse::<ScoringBackend>()
    {
        Ok(b) => b,
        Err(e) => {
            c.fail(vec![Key("scoring"), Key("backend")], e.to_string());
            ScoringBackend::Auto
        }
    };
    let mut endpoint_prefix = rs
        .endpoint_prefix
        .clone()
        .unwrap_or_else(|| "/_gateway/models".to_string());
    while endpoint_prefix.len() > 1 && endpoint_prefix.ends_with('/') {
        endpoint_prefix.pop();
    }
    if !endpoint_prefix.starts_with('/') || endpoint_prefix.len() < 2 {
        c.fail(
            vec![Key("scoring"), Key("endpoint_prefix")],
            "must be a path such as \"/_gateway/models\" (not \"/\")",
        );
    }
    let policy = BatchSettings {
        max_batch: rs.max_batch.unwrap_or(64),
        max_queue_delay: std::time::Duration::from_micros(rs.max_queue_delay_us.unwrap_or(500)),
        max_queue: rs.max_queue.unwrap_or(4096),
    };
    if !(1..=4096).contains(&policy.max_batch) {
        c.fail(
            vec![Key("scoring"), Key("max_batch")],
            "must be between 1 and 4096",
        );
    }
    if policy.max_queue == 0 {
        c.fail(vec![Key("scoring"), Key("max_queue")], "must be at least 1");
    }
    let scoring = ScoringSettings {
        backend,
        allow_software_gpu: rs.allow_software_gpu.unwrap_or(false),
        policy,
        endpoint_prefix,
    };
    let mut models = Vec::new();
    let mut model_names = HashMap::new();
    for (i, rm) in raw.models.into_iter().enumerate() {
        let at = |f: &'static str| vec![Key("models"), Index(i), Key(f)];
        check_name(&mut c, at("name"), &rm.name, &mut model_names, i, "model");
        let (path, oci) = check_source(
            &mut c,
            base_dir,
            ("models", i),
            raw.store.dir.is_some(),
            SourceFields {
                path: rm.path,
                source: rm.source,
                credentials_file: rm.oci_credentials_file,
                resolve_interval_s: rm.oci_resolve_interval_s,
            },
        );
        if oci.is_none() {
            c.read(Read::ModelFile {
                index: i,
                path: path.clone(),
            });
        }
        let sha256 = check_pin(&mut c, at("sha256"), rm.sha256.as_deref());
        let k = rm.eval_k.unwrap_or(10);
        let max_regression = rm.max_regression.unwrap_or(0.01);
        let eval = match rm.eval_data {
            Some(shown) => {
                let data = resolve(base_dir, &shown);
                c.read(Read::EvalData {
                    index: i,
                    path: data.clone(),
                    shown,
                });
                Some(EvalSpec {
                    data,
                    k,
                    max_regression,
                })
            }
            None => {
                for (field, set) in [
                    ("eval_k", rm.eval_k.is_some()),
                    ("max_regression", rm.max_regression.is_some()),
                ] {
                    if set {
                        c.fail(
                            at(field),
                            "has no effect without `eval_data`, the held-out file the offline \
                             gate evaluates on",
                        );
                    }
                }
                None
            }
        };
        if !(1..=1000).contains(&k) {
            c.fail(at("eval_k"), "must be between 1 and 1000 (items)");
        }
        if !(0.0..1.0).contains(&max_regression) {
            c.fail(
                at("max_regression"),
                "must be at least 0 and below 1 (an absolute drop of NDCG@k or AUC)",
            );
        }
        models.push(ModelSpec {
            name: rm.name,
            path,
            oci,
            sha256,
            f16_storage: rm.f16_storage.unwrap_or(false),
            eval,
        });
    }

    // [[routes]]
    let mut routes = Vec::new();
    let mut route_names = HashMap::new();
    let mut seen_matches: HashMap<(String, String), usize> = HashMap::new();
    if raw.routes.is_empty() {
        c.fail(
            vec![Key("routes")],
            "add at least one [[routes]] table with `name` and `upstream`",
        );
    }
    for (i, rr) in raw.routes.into_iter().enumerate() {
        let at = |f: &'static str| vec![Key("routes"), Index(i), Key(f)];
        check_name(&mut c, at("name"), &rr.name, &mut route_names, i, "route");
        let mut hosts = Vec::new();
        let raw_hosts = rr.hosts.unwrap_or_else(|| vec!["*".to_string()]);
        if raw_hosts.is_empty() {
            c.fail(at("hosts"), "list at least one host, or \"*\" for any");
        }
        for (j, h) in raw_hosts.iter().enumerate() {
            match parse_host_pattern(h, true) {
                Ok(p) => hosts.push(p),
                Err(e) => c.fail(vec![Key("routes"), Index(i), Key("hosts"), Index(j)], e),
            }
        }
        let mut prefix = rr.path_prefix.unwrap_or_else(|| "/".to_string());
        if !prefix.starts_with('/')
            || prefix.contains(['?', '#'])
            || prefix.parse::<http::uri::PathAndQuery>().is_err()
        {
            c.fail(
                at("path_prefix"),
                format!("{prefix:?} must be a path starting with \"/\" without query"),
            );
        }
        while prefix.len() > 1 && prefix.ends_with('/') {
            prefix.pop();
        }
        let upstream = match upstream_names.get(&rr.upstream) {
            Some(&idx) => idx,
            None => {
                let known: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
                c.fail(
                    at("upstream"),
                    format!(
                        "no upstream named {:?}; defined: {}",
                        rr.upstream,
                        known.join(", ")
                    ),
                );
                0
            }
        };
        for h in &hosts {
            if let Some(other) = seen_matches.insert((h.to_string(), prefix.clone()), i) {
                c.fail(
                    at("path_prefix"),
                    format!("host {h} with prefix {prefix:?} is already matched by routes[{other}]; one of them would never be used"),
                );
            }
        }
        let mut chain = Vec::new();
        for (j, name) in rr.plugins.iter().flatten().enumerate() {
            match plugin_names.get(name) {
                Some(&idx) if !chain.contains(&idx) => chain.push(idx),
                Some(_) => c.fail(
                    vec![Key("routes"), Index(i), Key("plugins"), Index(j)],
                    format!("plugin {name:?} is listed twice"),
                ),
                None => c.fail(
                    vec![Key("routes"), Index(i), Key("plugins"), Index(j)],
                    format!("no plugin named {name:?}; add a [[plugins]] table for it"),
                ),
            }
        }
        let plugin_failure = match rr.plugin_failure.as_deref().unwrap_or("fail-closed") {
            "fail-closed" => FailurePolicy::Closed,
            "fail-open" => FailurePolicy::Open,
            other => {
                c.fail(
                    at("plugin_failure"),
                    format!("unknown policy {other:?}; use \"fail-closed\" or \"fail-open\""),
                );
                FailurePolicy::Closed
            }
        };
        let body_limit = rr.plugin_max_body_bytes.unwrap_or(1 << 20);
        if body_limit > 64 << 20 {
            c.fail(
                at("plugin_max_body_bytes"),
                "must be at most 67108864 (64 MiB)",
            );
        }
        let mut variants = Vec::new();
        for (name, up) in rr.variants.iter().flatten() {
            match upstream_names.get(up) {
                Some(&idx) => variants.push((name.clone(), idx)),
                None => c.fail(
                    at("variants"),
                    format!("variant {name:?} names upstream {up:?}, which is not defined"),
                ),
            }
        }
        let default_variant = match (&rr.default_variant, variants.is_empty()) {
            (None, true) => None,
            (None, false) => {
                c.fail(
                    at("default_variant"),
                    "routes with `variants` need a `default_variant`",
                );
                None
            }
            (Some(d), _) => match variants.iter().position(|(n, _)| n == d) {
                Some(p) => Some(p),
                None => {
                    c.fail(
                        at("default_variant"),
                        format!("{d:?} is not one of this route's variants"),
                    );
                    None
                }
            },
        };
        routes.push(RouteSpec {
            name: rr.name,
            hosts,
            path_prefix: prefix,
            upstream,
            strip_prefix: rr.strip_prefix.unwrap_or(false),
            plugins: chain,
            plugin_failure,
            plugin_body_limit: rr
                .plugin_body_access
                .unwrap_or(false)
                .then_some(body_limit as usize),
            variants,
            default_variant,
            experiment: None,
        });
    }

    // [privacy]
    if let Some(file) = &raw.privacy.key_file {
        c.read(Read::PrivacyKey {
            path: resolve(base_dir, file),
            shown: file.clone(),
        });
    }
    // [feedback] and [[experiments]]
    let feedback =
        experiments::feedback(&mut c, raw.feedback, base_dir, !raw.experiments.is_empty());
    let experiments = experiments::experiments(
        &mut c,
        raw.experiments,
        &experiments::Names {
            routes: &route_names,
            upstreams: &upstream_names,
            models: &model_names,
            plugins: &plugin_names,
        },
        &mut routes,
    );

    let store_dir = raw.store.dir.as_deref().map(|d| resolve(base_dir, d));
    let mut trusted_keys = Vec::new();
    for (i, k) in raw.store.trusted_keys.iter().flatten().enumerate() {
        match decode_hex(k)
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .and_then(|b| ed25519_dalek::VerifyingKey::from_bytes(&b).ok())
        {
            // A small-order key would verify signatures nobody made; uploads are verified
            // as they stream in, which leaves this check of verify_strict to the config.
            Some(key) if key.is_weak() => c.fail(
                vec![Key("store"), Key("trusted_keys"), Index(i)],
                "a weak (small-order) Ed25519 key: it cannot authenticate anything",
            ),
            Some(key) => trusted_keys.push(key),
            None => c.fail(
                vec![Key("store"), Key("trusted_keys"), Index(i)],
                "not an Ed25519 public key in hex (64 hex digits)",
            ),
        }
    }
    let require_signatures = raw
        .store
        .require_signatures
        .unwrap_or(!trusted_keys.is_empty());
    if require_signatures && trusted_keys.is_empty() {
        c.fail(
            vec![Key("store"), Key("require_signatures")],
            "needs at least one key in trusted_keys",
        );
    }

    Checked {
        config: Config {
            server,
            limits,
            logging,
            proxy,
            admin,
            certificates,
            listeners,
            upstreams,
            routes,
            plugin_runtime,
            plugins,
            scoring,
            models,
            store_dir,
            trusted_keys,
            require_signatures,
            feedback,
            privacy: PrivacySettings {
                key: None,
                pseudonymize_client_addresses: raw
                    .privacy
                    .pseudonymize_client_addresses
                    .unwrap_or(true),
            },
            experiments,
            source: None,
        },
        entries: c.entries,
    }
}

impl Checked {
    /// The second phase of validation: reads the files and variables the config names
    /// through `files` (the admin token, certificates and keys; plugin and model files must be
    /// readable files). Returns the configuration, or every problem of both phases in the
    /// order their fields were checked.
    pub fn load_files(self, files: &dyn Files) -> Result<Config, Vec<Problem>> {
        use Seg::{Index, Key};
        let Checked {
            mut config,
            entries,
        } = self;
        let mut problems = Vec::new();
        let mut fail = |path: Vec<Seg>, message: String| problems.push(Problem { path, message });
        for entry in entries {
            let read = match entry {
                Entry::Problem(p) => {
                    fail(p.path, p.message);
                    continue;
                }
                Entry::Read(read) => read,
            };
            match read {
                Read::TokenFile { path, shown } => match files.read_to_string(&path) {
                    Ok(t) if !t.trim().is_empty() => {
                        config.admin.token = Some(AdminToken::new(t.trim()))
                    }
                    Ok(_) => fail(
                        vec![Key("admin"), Key("token_file")],
                        "the token file is empty".into(),
                    ),
                    Err(e) => fail(
                        vec![Key("admin"), Key("token_file")],
                        format!("cannot read {shown}: {e}"),
                    ),
                },
                Read::TokenEnv(var) => match files.var(&var) {
                    Some(t) if !t.trim().is_empty() => {
                        config.admin.token = Some(AdminToken::new(t.trim()))
                    }
                    _ => fail(
                        vec![Key("admin"), Key("token_env")],
                        format!("environment variable {var} is unset or empty"),
                    ),
                },
                Read::Certificate {
                    index,
                    server_names,
                    default,
                    cert_path,
                    key_path,
                } => match files.certified_key(&cert_path, &key_path) {
                    Ok(key) => config.certificates.push(CertificateSpec {
                        server_names,
                        default,
                        key: Arc::new(key),
                        cert_path,
                        key_path,
                    }),
                    Err(e) => {
                        let field = if matches!(e, crate::certs::CertError::Key { .. }) {
                            "key"
                        } else {
                            "cert"
                        };
                        fail(
                            vec![Key("tls"), Key("certificates"), Index(index), Key(field)],
                            e.to_string(),
                        );
                    }
                },
                Read::PluginFile { index, path } => {
                    let at = vec![Key("plugins"), Index(index), Key("path")];
                    match files.is_file(&path) {
                        Ok(true) => {}
                        Ok(_) => fail(at, format!("{} is not a file", path.display())),
                        Err(e) => fail(at, format!("cannot read {}: {e}", path.display())),
                    }
                }
                Read::ModelFile { index, path } => {
                    if !matches!(files.is_file(&path), Ok(true)) {
                        fail(
                            vec![Key("models"), Index(index), Key("path")],
                            format!("cannot read {}", path.display()),
                        );
                    }
                }
                Read::EvalData { index, path, shown } => {
                    let at = vec![Key("models"), Index(index), Key("eval_data")];
                    match files.is_file(&path) {
                        Ok(true) => {}
                        Ok(false) => fail(at, format!("{shown} is not a file")),
                        Err(e) => fail(at, format!("cannot read {shown}: {e}")),
                    }
                }
                Read::PrivacyKey { path, shown } => match files.read_to_string(&path) {
                    Ok(t) if t.trim().len() >= 16 => {
                        config.privacy.key = Some(PseudonymKey::new(t.trim().as_bytes()))
                    }
                    Ok(t) => fail(
                        vec![Key("privacy"), Key("key_file")],
                        format!(
                            "{shown} holds {} bytes; a key needs at least 16 (e.g. `openssl rand -hex 32`)",
                            t.trim().len()
                        ),
                    ),
                    Err(e) => fail(
                        vec![Key("privacy"), Key("key_file")],
                        format!("cannot read {shown}: {e}"),
                    ),
                },
                Read::FeedbackKey { field, path, shown } => match files.read_to_string(&path) {
                    Ok(t) if t.trim().len() >= 16 => {
                        let key = FeedbackKey::new(t.trim().as_bytes());
                        match config.feedback.keys.iter().find(|k| k.id == key.id) {
                            Some(k) if *k == key => {
                                fail(field, format!("{shown} holds a secret already listed"))
                            }
                            Some(_) => fail(
                                field,
                                format!("{shown}'s key id {} is another key's too; tokens could not tell them apart: use another secret", key.id),
                            ),
                            None => config.feedback.keys.push(key),
                        }
                    }
                    Ok(t) => fail(
                        field,
                        format!(
                            "{shown} holds {} bytes; a secret needs at least 16 (e.g. `openssl rand -hex 32`)",
                            t.trim().len()
                        ),
                    ),
                    Err(e) => fail(field, format!("cannot read {shown}: {e}")),
                },
            }
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }
}

/// Where a `[[plugins]]` or `[[models]]` entry's content comes from, as written.
struct SourceFields {
    path: Option<String>,
    source: Option<String>,
    credentials_file: Option<String>,
    resolve_interval_s: Option<u64>,
}

/// Checks an entry's `path` / `source` pair (exactly one; the `oci_*` fields only with a
/// `source`; a `source` needs `[store] dir`) and returns the file to read, or, for a registry
/// source, an empty path (set to the pulled blob in the store before loading) and the source.
fn check_source(
    c: &mut Checker,
    base_dir: &Path,
    (table, i): (&'static str, usize),
    has_store: bool,
    f: SourceFields,
) -> (PathBuf, Option<crate::oci::OciSource>) {
    use Seg::{Index, Key};
    let at = |field: &'static str| vec![Key(table), Index(i), Key(field)];
    match (f.path, f.source) {
        (Some(path), None) => {
            for (field, set) in [
                ("oci_credentials_file", f.credentials_file.is_some()),
                ("oci_resolve_interval_s", f.resolve_interval_s.is_some()),
            ] {
                if set {
                    c.fail(
                        at(field),
                        "has no effect without `source` (an oci:// reference)",
                    );
                }
            }
            (resolve(base_dir, &path), None)
        }
        (None, None) => {
            c.fail(
                vec![Key(table), Index(i)],
                "needs `path` (a local file) or `source` (an oci:// registry reference)",
            );
            (PathBuf::new(), None)
        }
        (Some(_), Some(_)) => {
            c.fail(
                at("source"),
                "set either `path` (a local file) or `source` (an oci:// reference), not both",
            );
            (PathBuf::new(), None)
        }
        (None, Some(source)) => {
            let reference = match crate::oci::OciReference::parse(&source) {
                Ok(r) => r,
                Err(e) => {
                    c.fail(at("source"), e);
                    return (PathBuf::new(), None);
                }
            };
            if !has_store {
                c.fail(
                    at("source"),
                    "pulling from a registry needs `[store] dir`: pulled artifacts are kept \
                     there by digest, and served from there when the registry is down",
                );
            }
            let interval = f
                .resolve_interval_s
                .unwrap_or(crate::oci::DEFAULT_OCI_RESOLVE_INTERVAL_S);
            if interval > 7 * 24 * 3600 {
                c.fail(
                    at("oci_resolve_interval_s"),
                    "must be between 0 (only at start and reload) and 604800 seconds (a week)",
                );
            }
            if reference.is_pinned() && f.resolve_interval_s.is_some_and(|s| s > 0) {
                c.fail(
                    at("oci_resolve_interval_s"),
                    "a digest-pinned source always means the same content and is never \
                     resolved again; remove the interval or name a tag",
                );
            }
            let credentials_file = f.credentials_file.map(|p| resolve(base_dir, &p));
            let resolve_interval = if reference.is_pinned() {
                Duration::ZERO
            } else {
                Duration::from_secs(interval)
            };
            (
                PathBuf::new(),
                Some(crate::oci::OciSource {
                    reference,
                    credentials_file,
                    resolve_interval,
                    resolved: None,
                }),
            )
        }
    }
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn parse_addr(c: &mut Checker, path: Vec<Seg>, s: &str) -> Option<SocketAddr> {
    match s.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            c.fail(
                path,
                format!(
                    "{s:?} is not an IP socket address such as \"127.0.0.1:8443\" or \"[::]:443\""
                ),
            );
            None
        }
    }
}

fn check_name(
    c: &mut Checker,
    path: Vec<Seg>,
    name: &str,
    seen: &mut HashMap<String, usize>,
    i: usize,
    what: &str,
) {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        c.fail(path, format!("{what} name {name:?} must be non-empty and use only letters, digits, '-', '_' and '.'"));
    } else if let Some(first) = seen.insert(name.to_string(), i) {
        c.fail(
            path,
            format!("{what} name {name:?} is already used by entry {first}; names must be unique"),
        );
    }
}

/// Parses `shop.example.com`, `*.example.com` or (when `allow_any`) `*`.
pub fn parse_host_pattern(s: &str, allow_any: bool) -> Result<HostPattern, String> {
    let lower = s.trim().to_ascii_lowercase();
    if lower == "*" {
        return if allow_any {
            Ok(HostPattern::Any)
        } else {
            Err("\"*\" is not allowed here; mark the certificate `default = true` instead".into())
        };
    }
    let (wild, name) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !valid {
        return Err(format!(
            "{s:?} is not a host name, \"*.suffix\" wildcard{}",
            if allow_any { " or \"*\"" } else { "" }
        ));
    }
    Ok(if wild {
        HostPattern::Suffix(format!(".{name}"))
    } else {
        HostPattern::Exact(name.to_string())
    })
}

/// Decodes lower- or upper-case hex (surrounding whitespace ignored); `None` if it is not hex.
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn check_pin(c: &mut Checker, path: Vec<Seg>, pin: Option<&str>) -> Option<String> {
    let pin = pin?.trim().to_ascii_lowercase();
    if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
        c.fail(path, "must be a SHA-256 in hex (64 hex digits)");
        return None;
    }
    Some(pin)
}
