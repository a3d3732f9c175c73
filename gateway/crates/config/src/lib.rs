//! Configuration: TOML parsed into [`raw`] structs, then validated into [`Config`].
//!
//! Validation collects every problem it finds; each [`Issue`] names the file, the line and the
//! field, and says what to fix.
//!
//! This crate owns the configuration's types, their defaults and checks, and the field path to
//! line lookup for errors. It is a leaf of the workspace: the scoring section has its own types
//! ([`ScoringSettings`]), converted to the engine's by the gateway package.
//!
//! I/O is at the edges. [`Config::load`] reads the config file. Validation has two phases:
//! [`check`] applies defaults and checks every value without I/O, noting the files and
//! variables the config names; [`Checked::load_files`] then reads them through a
//! [`files::Files`] (the admin token, certificates through [`certs`], plugin and model files).
//! Each read keeps its place among the problems, so a bad file is reported at its field's
//! line, in the same order as before. [`files::Disk`] is the real one; tests pass their own.

pub mod certs;
mod experiment;
pub mod files;
pub mod oci;
pub mod raw;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use rustls::sign::CertifiedKey;

pub use experiment::{
    ExperimentSpec, FeedbackKey, FeedbackSettings, RolloutSpec, ShopperKey, VariantSpec,
};
pub use oci::{OciReference, OciSource};
pub use validate::{check, decode_hex, parse_host_pattern, validate, validate_with, Checked};

/// A validated configuration, ready to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Process-wide settings.
    pub server: ServerSettings,
    /// Downstream limits.
    pub limits: Limits,
    /// Logging.
    pub logging: LoggingSettings,
    /// Forwarding headers.
    pub proxy: ProxySettings,
    /// The admin listener.
    pub admin: AdminSettings,
    /// Certificates for HTTPS listeners; empty when there is none.
    pub certificates: Vec<CertificateSpec>,
    /// Downstream listeners.
    pub listeners: Vec<ListenerSpec>,
    /// Upstream pools, referred to by index from routes.
    pub upstreams: Vec<UpstreamSpec>,
    /// Routes, in file order.
    pub routes: Vec<RouteSpec>,
    /// Plugin engine settings.
    pub plugin_runtime: PluginRuntimeSettings,
    /// Plugins, referred to by index from routes.
    pub plugins: Vec<PluginSpec>,
    /// Scoring engine settings.
    pub scoring: ScoringSettings,
    /// Models to serve.
    pub models: Vec<ModelSpec>,
    /// Directory of uploaded artifacts, when uploads are enabled.
    pub store_dir: Option<PathBuf>,
    /// Keys whose signatures uploads may carry.
    pub trusted_keys: Vec<ed25519_dalek::VerifyingKey>,
    /// Uploads must be signed by one of `trusted_keys`.
    pub require_signatures: bool,
    /// Outcome events and the keys of attribution tokens.
    pub feedback: FeedbackSettings,
    /// Pseudonymisation of shopper identifiers.
    pub privacy: PrivacySettings,
    /// A/B splits and canaries of routes.
    pub experiments: Vec<ExperimentSpec>,
    /// The file and text this configuration was parsed from; `None` when it was built in
    /// code. `GET /admin/config` shows it.
    pub source: Option<Arc<Source>>,
}

/// Where a configuration came from, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The file's name as given (`file` of [`Config::from_toml`]).
    pub file: String,
    /// The TOML text.
    pub text: String,
}

/// `[scoring]`, validated. Configuration's own types, not the scoring engine's: the gateway
/// package converts them (`gateway::scoring_settings`), so config does not depend on scoring.
#[derive(Debug, Clone)]
pub struct ScoringSettings {
    /// Device choice.
    pub backend: ScoringBackend,
    /// Software Vulkan allowed under `auto`.
    pub allow_software_gpu: bool,
    /// Batching.
    pub policy: BatchSettings,
    /// Endpoint prefix, no trailing `/`.
    pub endpoint_prefix: String,
}

/// `[scoring] backend`: which compute path the scoring engine may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScoringBackend {
    /// A real GPU, else the software Vulkan adapter when `allow_software_gpu`, else the CPU.
    #[default]
    Auto,
    /// A real GPU only.
    Gpu,
    /// The software Vulkan adapter (lavapipe) only.
    SoftwareGpu,
    /// The CPU path only.
    Cpu,
}

impl std::str::FromStr for ScoringBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(ScoringBackend::Auto),
            "gpu" => Ok(ScoringBackend::Gpu),
            "software-gpu" => Ok(ScoringBackend::SoftwareGpu),
            "cpu" => Ok(ScoringBackend::Cpu),
            other => Err(format!(
                "unknown backend {other:?}; expected auto, gpu, software-gpu or cpu"
            )),
        }
    }
}

impl fmt::Display for ScoringBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScoringBackend::Auto => "auto",
            ScoringBackend::Gpu => "gpu",
            ScoringBackend::SoftwareGpu => "software-gpu",
            ScoringBackend::Cpu => "cpu",
        })
    }
}

/// `[scoring]` batching, per model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    /// Requests per dispatch at most.
    pub max_batch: usize,
    /// How long the first request of a batch may wait for others.
    pub max_queue_delay: Duration,
    /// Requests waiting at most; more are refused.
    pub max_queue: usize,
}

/// `[[models]]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Unique name.
    pub name: String,
    /// File. For a registry `source`, the pulled blob in the store once pulled (empty
    /// before).
    pub path: PathBuf,
    /// The registry it is pulled from (`source = "oci://..."`); `None` for a local file.
    pub oci: Option<OciSource>,
    /// Required SHA-256 (lower-case hex), when pinned.
    pub sha256: Option<String>,
    /// Embedding tables rounded to and held as f16 (`f16_storage`); f32 otherwise.
    pub f16_storage: bool,
    /// The offline gate (`eval_data`); none without it.
    pub eval: Option<EvalSpec>,
}

/// The offline gate of a `[[models]]` entry, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSpec {
    /// The held-out file (`eval_data`), resolved against the config file's directory.
    pub data: PathBuf,
    /// Cutoff of the ranking metrics, in items (`eval_k`, 1..=1000, default 10).
    pub k: usize,
    /// Largest allowed drop of the primary metric, absolute (`max_regression`, in [0, 1),
    /// default 0.01).
    pub max_regression: f64,
}

/// `[plugin_runtime]`, validated.
#[derive(Debug, Clone)]
pub struct PluginRuntimeSettings {
    /// Instances across all plugins.
    pub max_instances: u32,
    /// Deadline granularity.
    pub epoch_tick: Duration,
    /// Fuel metering on: hook calls are bounded by the work they do (`fuel_per_call`), not
    /// only by wall-clock time.
    pub fuel: bool,
    /// Where compiled plugins are kept across loads and restarts; `None`: compiled on every
    /// start.
    pub compile_cache: Option<PathBuf>,
    /// Write `/tmp/perf-<pid>.map` so `perf` names plugin functions (`gateway plugin check
    /// --perf-map`; not a config field). Default off.
    pub perf_map: bool,
}

/// The `[plugin_runtime]` defaults, used by validation for every field left out.
impl Default for PluginRuntimeSettings {
    fn default() -> Self {
        PluginRuntimeSettings {
            max_instances: 256,
            epoch_tick: Duration::from_millis(1),
            fuel: true,
            compile_cache: None,
            perf_map: false,
        }
    }
}

/// Fuel one hook call may burn unless `fuel_per_call` says otherwise. Measured on a 2-core
/// x86 node: a runaway loop burns it in 4–5 ms of CPU; the shipped plugins' calls burn at
/// most about 500,000 (storefront rewriting a 3 KB JSON body), most of them under 10,000.
pub const DEFAULT_FUEL_PER_CALL: u64 = 50_000_000;

/// Fuel added per byte of body a hook call is handed unless `fuel_per_body_byte` says
/// otherwise: about eight times what the shipped storefront plugin burns per byte of JSON it
/// rewrites (about 250).
pub const DEFAULT_FUEL_PER_BODY_BYTE: u64 = 2_000;

/// How many times a hook call's fuel `init` may burn (it parses config, builds tables).
pub const INIT_FUEL_FACTOR: u64 = 20;

/// Wall-clock backstop of one hook call unless `deadline_ms` says otherwise, milliseconds.
pub const DEFAULT_PLUGIN_DEADLINE_MS: u64 = 500;

/// Linear memory one plugin instance may grow to unless `memory_limit_bytes` says otherwise.
pub const DEFAULT_PLUGIN_MEMORY_LIMIT: usize = 16 << 20;

/// Bytes one hook call may add unless `max_output_bytes` says otherwise.
pub const DEFAULT_PLUGIN_MAX_OUTPUT_BYTES: usize = 256 * 1024;

/// Ready instances kept per plugin unless `instances` says otherwise.
pub const DEFAULT_PLUGIN_INSTANCES: u32 = 4;

/// `[[plugins]]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginSpec {
    /// Unique name.
    pub name: String,
    /// Required SHA-256 (lower-case hex), when pinned.
    pub sha256: Option<String>,
    /// Component file. For a registry `source`, the pulled blob in the store once pulled
    /// (empty before).
    pub path: PathBuf,
    /// The registry it is pulled from (`source = "oci://..."`); `None` for a local file.
    pub oci: Option<OciSource>,
    /// Configuration handed to `init`.
    pub config: String,
    /// Wall-clock backstop per hook call (stops a plugin blocked in a host call, or one on
    /// a runtime without fuel).
    pub deadline: Duration,
    /// Linear memory cap per instance, bytes.
    pub memory_limit: usize,
    /// Fuel (wasm work units) per hook call, when metered; `init` gets
    /// [`INIT_FUEL_FACTOR`] times as much.
    pub fuel_per_call: Option<u64>,
    /// Fuel added to a hook call for each byte of body it is handed (a plugin that rewrites
    /// a body does work in proportion to it).
    pub fuel_per_body_byte: u64,
    /// Bytes one call may add.
    pub max_output_bytes: usize,
    /// Ready instances kept.
    pub instances: u32,
}

impl PluginSpec {
    /// A plugin with every setting at its default, as a `[[plugins]]` table that names only
    /// `name`, `path` and `config` gets it (`gateway plugin check` checks with these).
    pub fn with_defaults(name: &str, path: PathBuf, config: String) -> PluginSpec {
        PluginSpec {
            name: name.to_string(),
            sha256: None,
            path,
            oci: None,
            config,
            deadline: Duration::from_millis(DEFAULT_PLUGIN_DEADLINE_MS),
            memory_limit: DEFAULT_PLUGIN_MEMORY_LIMIT,
            fuel_per_call: PluginRuntimeSettings::default()
                .fuel
                .then_some(DEFAULT_FUEL_PER_CALL),
            fuel_per_body_byte: DEFAULT_FUEL_PER_BODY_BYTE,
            max_output_bytes: DEFAULT_PLUGIN_MAX_OUTPUT_BYTES,
            instances: DEFAULT_PLUGIN_INSTANCES,
        }
    }
}

/// What a request gets when a plugin fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Answer 500 with the request id.
    Closed,
    /// Skip the failed plugin and carry on.
    Open,
}

/// `[server]`, validated.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Runtime worker threads; 0 means one per core.
    pub worker_threads: usize,
    /// Deadline for in-flight requests at shutdown.
    pub drain_timeout: Duration,
    /// Reload when watched files change.
    pub watch_files: bool,
    /// Quiet time before a watched change is applied.
    pub watch_debounce: Duration,
    /// How often routes' series are sampled for anomaly alerts.
    pub anomaly_interval: Duration,
}

/// `[limits]`, validated.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open downstream connections across all listeners.
    pub max_connections: usize,
    /// Bytes of request head (h1) or header list (h2).
    pub max_header_bytes: usize,
    /// Bytes of request body.
    pub max_body_bytes: u64,
    /// Time to receive a complete request head.
    pub header_read_timeout: Duration,
    /// Longest pause inside a request body.
    pub body_read_timeout: Duration,
    /// Longest time to receive a whole request body the gateway reads before answering.
    pub body_deadline: Duration,
    /// Longest time a response may wait for the client to take more of it.
    pub send_timeout: Duration,
    /// Connection closed after this long with no request in flight.
    pub idle_timeout: Duration,
    /// Concurrent h2 streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// Requests answered at once (to their response head); more get 503.
    pub max_inflight_requests: usize,
    /// Standing scheduling delay past which new requests get 503; zero: never.
    pub max_queue_time: Duration,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[logging]`, validated.
#[derive(Debug, Clone)]
pub struct LoggingSettings {
    /// `tracing` filter directive.
    pub level: String,
    /// Line format.
    pub format: LogFormat,
    /// One access log line per request.
    pub access_log: bool,
}

/// Which forwarding headers are sent upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardedMode {
    /// `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host`.
    XForwarded,
    /// RFC 7239 `Forwarded`.
    Forwarded,
    /// Both of the above.
    Both,
    /// Neither.
    None,
}

/// `[proxy]`, validated.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Forwarding headers.
    pub forwarded: ForwardedMode,
    /// Pseudonym appended in `Via`, when enabled.
    pub via_name: Option<HeaderValue>,
    /// Header carrying the request id.
    pub request_id_header: HeaderName,
    /// Expose the serving configuration generation and plugin versions in responses.
    pub version_headers: bool,
}

/// `[admin]`, validated.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// Address of the admin listener.
    pub bind: SocketAddr,
    /// Bearer token for `/admin/*`; without one those endpoints answer 403.
    pub token: Option<AdminToken>,
    /// Largest upload, bytes.
    pub max_upload_bytes: u64,
    /// Uploads per minute.
    pub max_uploads_per_minute: u32,
}

impl AdminSettings {
    /// Where the admin listener binds without `[admin] bind`: loopback only.
    pub const DEFAULT_BIND: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::LOCALHOST,
        9901,
    ));
}

/// A secret compared in constant time; its id (a hash prefix) is what logs show.
#[derive(Clone)]
pub struct AdminToken {
    secret: Vec<u8>,
    /// First 8 hex digits of the token's SHA-256.
    pub id: String,
}

impl AdminToken {
    /// Wraps a token.
    pub fn new(secret: &str) -> AdminToken {
        use sha2::Digest;
        let id = sha2::Sha256::digest(secret.as_bytes())
            .iter()
            .take(4)
            .map(|b| format!("{b:02x}"))
            .collect();
        AdminToken {
            secret: secret.as_bytes().to_vec(),
            id,
        }
    }

    /// Whether `presented` is the token, in time independent of where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.secret.len() == presented.len() && bool::from(self.secret.ct_eq(presented))
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AdminToken({})", self.id)
    }
}

/// A host name pattern, lower case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Any host.
    Any,
    /// Exactly this name.
    Exact(String),
    /// Any name ending in this suffix, which starts with a dot (`*.example.com` is `.example.com`).
    Suffix(String),
}

impl HostPattern {
    /// Whether `host` (lower case, no port) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(name) => name == host,
            HostPattern::Suffix(suffix) => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
        }
    }

    /// Higher is more specific: exact beats any wildcard, a longer suffix beats a shorter one.
    pub fn specificity(&self) -> usize {
        match self {
            HostPattern::Any => 0,
            HostPattern::Suffix(s) => 1 + s.len(),
            HostPattern::Exact(_) => usize::MAX,
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Exact(n) => f.write_str(n),
            HostPattern::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

/// A loaded certificate and the SNI names it answers.
#[derive(Clone)]
pub struct CertificateSpec {
    /// Names from config.
    pub server_names: Vec<HostPattern>,
    /// Served when no name matches.
    pub default: bool,
    /// Chain and signing key.
    pub key: Arc<CertifiedKey>,
    /// Where the chain was read from, for messages.
    pub cert_path: PathBuf,
    /// Where the key was read from.
    pub key_path: PathBuf,
}

impl fmt::Debug for CertificateSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateSpec")
            .field("server_names", &self.server_names)
            .field("default", &self.default)
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// TLS with ALPN `h2` and `http/1.1`.
    Https,
    /// Cleartext HTTP/1.1 (and h2 with prior knowledge), proxying as usual.
    HttpServe,
    /// Cleartext HTTP answering 308 to HTTPS on this port.
    HttpRedirect {
        /// Port named in `Location`.
        https_port: u16,
    },
}

/// `[[listeners]]`, validated.
#[derive(Debug, Clone)]
pub struct ListenerSpec {
    /// Unique name.
    pub name: String,
    /// Address to bind.
    pub bind: SocketAddr,
    /// Protocol.
    pub kind: ListenerKind,
    /// HTTPS only: 421 for a request whose host the SNI-chosen certificate does not cover.
    pub reject_misdirected: bool,
}

/// Load balancing policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Each backend in turn.
    RoundRobin,
    /// The backend with the fewest requests in flight (ties in turn).
    LeastInFlight,
}

/// Upstream wire protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive.
    Http1,
    /// Cleartext HTTP/2 with prior knowledge.
    H2,
}

/// `[upstreams.health_check]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckSpec {
    /// Path requested with GET.
    pub path: String,
    /// Time between checks.
    pub interval: Duration,
    /// Time a check may take.
    pub timeout: Duration,
    /// Successes that restore a backend.
    pub healthy_threshold: u32,
    /// Failures that mark a backend down.
    pub unhealthy_threshold: u32,
}

/// `[[upstreams]]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSpec {
    /// Unique name.
    pub name: String,
    /// Backend authorities (`host:port`).
    pub backends: Vec<http::uri::Authority>,
    /// Balancing policy.
    pub balance: Balance,
    /// Wire protocol.
    pub protocol: UpstreamProtocol,
    /// TCP connect deadline.
    pub connect_timeout: Duration,
    /// Deadline for the response head.
    pub request_timeout: Duration,
    /// Longest wait for the next part of a response body.
    pub body_timeout: Duration,
    /// Idle pooled connection lifetime.
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections per backend.
    pub pool_max_idle_per_backend: usize,
    /// Retries per request.
    pub max_retries: u32,
    /// Retries as a fraction of requests.
    pub retry_budget_ratio: f64,
    /// Retries per second always allowed.
    pub retry_budget_min_per_sec: u32,
    /// Below this fraction of healthy backends, balance across all of them (0: never).
    pub panic_threshold: f64,
    /// Active checks, if any.
    pub health_check: Option<HealthCheckSpec>,
    /// Failures that eject; 0 disables passive ejection.
    pub eject_after_failures: u32,
    /// Ejection length.
    pub ejection: Duration,
    /// Most backends ejected at once, as a share of the pool.
    pub max_ejected_share: f64,
    /// What a timeout counts towards ejection while the node itself is saturated (0 to 1).
    pub local_overload_weight: f64,
}

/// `[[routes]]`, validated.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    /// Unique name.
    pub name: String,
    /// Host patterns.
    pub hosts: Vec<HostPattern>,
    /// Path prefix, starting with `/`, without a trailing `/` unless it is `/`.
    pub path_prefix: String,
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    /// Remove the prefix before forwarding.
    pub strip_prefix: bool,
    /// Plugin chain: indices into [`Config::plugins`], in request order.
    pub plugins: Vec<usize>,
    /// What a plugin failure does to the request.
    pub plugin_failure: FailurePolicy,
    /// Largest body plugins see or set; `None` when plugins get no body access.
    pub plugin_body_limit: Option<usize>,
    /// Canary variants: name and upstream index, in name order.
    pub variants: Vec<(String, usize)>,
    /// Index into `variants` used when no plugin chooses.
    pub default_variant: Option<usize>,
    /// Index into [`Config::experiments`] of the experiment that splits this route.
    pub experiment: Option<usize>,
}

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// File name as given, or `<embedded>`.
    pub file: String,
    /// 1-based line, when the field exists in the file.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// Dotted field path, e.g. `routes[1].upstream`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read config file: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file was read but is wrong; every problem found is listed.
    #[error("{}", display_issues(.0))]
    Invalid(Vec<Issue>),
}

impl ConfigError {
    /// The problems found, empty for a read error.
    pub fn issues(&self) -> &[Issue] {
        match self {
            ConfigError::Invalid(issues) => issues,
            ConfigError::Read { .. } => &[],
        }
    }
}

fn display_issues(issues: &[Issue]) -> String {
    let mut out = format!(
        "invalid configuration ({} problem{}):",
        issues.len(),
        if issues.len() == 1 { "" } else { "s" }
    );
    for issue in issues {
        out.push_str("\n  ");
        out.push_str(&issue.to_string());
    }
    out
}

impl Config {
    /// Reads, parses and validates a config file. Relative paths inside it are resolved
    /// against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Config::from_toml(&text, &path.display().to_string(), &base)
    }

    /// Parses TOML text as written, without validating it: for tools that only read what a
    /// file names (`gateway sample-files`). A syntax or type error is located like
    /// [`Config::from_toml`]'s.
    pub fn parse_raw(text: &str, file: &str) -> Result<raw::RawConfig, ConfigError> {
        toml::from_str(text)
            .map_err(|err| ConfigError::Invalid(vec![parse_issue(text, file, &err)]))
    }

    /// Parses and validates TOML text; `file` names it in messages and `base_dir` anchors
    /// relative paths.
    pub fn from_toml(text: &str, file: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        Config::from_toml_with(text, file, base_dir, &files::Disk)
    }

    /// [`Config::from_toml`], reading the files and variables the text names through `files`
    /// instead of the filesystem and the environment: the same parsing, validation and
    /// located errors, for tools and fuzz targets that must not touch the disk.
    pub fn from_toml_with(
        text: &str,
        file: &str,
        base_dir: &Path,
        files: &dyn files::Files,
    ) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(err) => return Err(ConfigError::Invalid(vec![parse_issue(text, file, &err)])),
        };
        let mut config = validate_with(raw, base_dir, files).map_err(|problems| {
            let doc = toml_edit::Document::parse(text).ok();
            ConfigError::Invalid(
                problems
                    .into_iter()
                    .map(|p| {
                        let span = doc.as_ref().and_then(|d| validate::locate(d, &p.path));
                        let (line, column) = match span {
                            Some(offset) => {
                                let (l, c) = line_col(text, offset);
                                (Some(l), Some(c))
                            }
                            None => (None, None),
                        };
                        Issue {
                            file: file.to_string(),
                            line,
                            column,
                            field: validate::path_string(&p.path),
                            message: p.message,
                        }
                    })
                    .collect(),
            )
        })?;
        config.source = Some(Arc::new(Source {
            file: file.to_string(),
            text: text.to_string(),
        }));
        Ok(config)
    }
}

fn parse_issue(text: &str, file: &str, err: &toml::de::Error) -> Issue {
    let (line, column) = match err.span() {
        Some(span) => {
            let (l, c) = line_col(text, span.start);
            (Some(l), Some(c))
        }
        None => (None, None),
    };
    let message = err.message().trim().to_string();
    // serde names the unknown or missing field in the message; make the fix explicit.
    let message = if message.starts_with("unknown field") {
        format!("{message}; remove it or fix its spelling")
    } else {
        message
    };
    Issue {
        file: file.to_string(),
        line,
        column,
        field: String::new(),
        message,
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_decoded_or_refused() {
        assert_eq!(decode_hex(" 0aFF\n"), Some(vec![0x0a, 0xff]));
        assert_eq!(decode_hex(""), Some(vec![]));
        assert_eq!(decode_hex("0"), None, "odd length");
        assert_eq!(decode_hex("zz"), None);
        assert_eq!(decode_hex("aé1"), None, "a pair that splits a character");
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("a\nbc\n", 0), (1, 1));
        assert_eq!(line_col("a\nbc\n", 3), (2, 2));
    }

    #[test]
    fn host_patterns_match_and_rank() {
        let exact = HostPattern::Exact("shop.example.com".into());
        let wild = HostPattern::Suffix(".example.com".into());
        assert!(exact.matches("shop.example.com"));
        assert!(wild.matches("shop.example.com"));
        assert!(!wild.matches("example.com"));
        assert!(!wild.matches("shopexample.com"));
        assert!(HostPattern::Any.matches("anything"));
        assert!(exact.specificity() > wild.specificity());
        assert!(wild.specificity() > HostPattern::Any.specificity());
    }

    /// Files and variables served from memory; anything else is missing. Certificates are
    /// generated on the spot, or refused when `bad_key` is set.
    struct Fake {
        files: std::collections::HashMap<PathBuf, String>,
        vars: std::collections::HashMap<String, String>,
        bad_key: bool,
    }

    impl files::Files for Fake {
        fn read_to_string(&self, path: &Path) -> std::io::Result<String> {
            self.files
                .get(path)
                .cloned()
                .ok_or_else(|| std::io::ErrorKind::NotFound.into())
        }
        fn is_file(&self, path: &Path) -> std::io::Result<bool> {
            match self.files.contains_key(path) {
                true => Ok(true),
                false => Err(std::io::ErrorKind::NotFound.into()),
            }
        }
        fn var(&self, name: &str) -> Option<String> {
            self.vars.get(name).cloned()
        }
        fn certified_key(&self, _: &Path, key: &Path) -> Result<CertifiedKey, certs::CertError> {
            if self.bad_key {
                return Err(certs::CertError::Key {
                    path: key.to_path_buf(),
                    reason: "does not match the certificate's public key".into(),
                });
            }
            use rustls::pki_types::pem::PemObject;
            let made = rcgen::generate_simple_self_signed(vec!["x.test".to_string()]).unwrap();
            let chain =
                vec![
                    rustls::pki_types::CertificateDer::from_pem_slice(made.cert.pem().as_bytes())
                        .unwrap(),
                ];
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(
                made.signing_key.serialize_pem().as_bytes(),
            )
            .unwrap();
            Ok(certs::certified_key_from_der(chain, key).unwrap())
        }
    }

    const NAMES_FILES: &str = r#"
[admin]
bind = "0.0.0.0:9901"
token_file = "token"

[[tls.certificates]]
cert = "c.pem"
key = "k.pem"

[[listeners]]
name = "https"
bind = "127.0.0.1:0"

[[upstreams]]
name = "app"
backends = ["127.0.0.1:3000"]

[[routes]]
name = "all"
upstream = "app"

[[plugins]]
name = "p"
path = "p.wasm"
"#;

    #[test]
    fn validation_reads_only_through_its_files() {
        // A directory that does not exist: everything comes from the fake.
        let base = Path::new("/nonexistent-gateway-config-test");
        let raw = || toml::from_str::<raw::RawConfig>(NAMES_FILES).unwrap();
        let mut fake = Fake {
            files: [(base.join("token"), " s3cret\n".to_string())].into(),
            vars: Default::default(),
            bad_key: true,
        };
        let problems = validate_with(raw(), base, &fake).unwrap_err();
        let fields: Vec<String> = problems
            .iter()
            .map(|p| validate::path_string(&p.path))
            .collect();
        assert_eq!(fields, ["tls.certificates[0].key", "plugins[0].path"]);
        assert!(problems[0].message.contains("does not match"));

        // The file phase's problems keep their place among the others.
        let bad_bind = NAMES_FILES.replace("bind = \"127.0.0.1:0\"", "bind = \"nope\"");
        let checked = check(toml::from_str(&bad_bind).unwrap(), base);
        let problems = checked.load_files(&fake).unwrap_err();
        let fields: Vec<String> = problems
            .iter()
            .map(|p| validate::path_string(&p.path))
            .collect();
        assert_eq!(
            fields,
            [
                "tls.certificates[0].key",
                "listeners[0].bind",
                "plugins[0].path"
            ]
        );

        fake.bad_key = false;
        fake.files.insert(base.join("p.wasm"), String::new());
        let config = validate_with(raw(), base, &fake).unwrap();
        let token = config.admin.token.expect("read from the fake token file");
        assert!(token.matches(b"s3cret"));
        // The first 8 hex digits of SHA-256("s3cret").
        assert_eq!(token.id, "1ec1c26b");
        assert_eq!(config.plugins[0].path, base.join("p.wasm"));
        assert_eq!(config.certificates.len(), 1);
    }

    #[test]
    fn the_offline_gate_is_checked_and_its_data_read_in_the_file_phase() {
        let base = Path::new("/nonexistent-gateway-config-test");
        let fake = Fake {
            files: [
                (base.join("token"), "s3cret".to_string()),
                (base.join("p.wasm"), String::new()),
                (base.join("m.safetensors"), String::new()),
                (base.join("held.jsonl"), String::new()),
            ]
            .into(),
            vars: Default::default(),
            bad_key: false,
        };
        let with = |model: &str| {
            let text = format!(
                "{NAMES_FILES}\n[[models]]\nname = \"m\"\npath = \"m.safetensors\"\n{model}"
            );
            validate_with(toml::from_str(&text).unwrap(), base, &fake)
        };
        let problems = |model: &str| -> Vec<(String, String)> {
            with(model)
                .unwrap_err()
                .into_iter()
                .map(|p| (validate::path_string(&p.path), p.message))
                .collect()
        };

        let config = with("eval_data = \"held.jsonl\"\n").unwrap();
        assert_eq!(
            config.models[0].eval,
            Some(EvalSpec {
                data: base.join("held.jsonl"),
                k: 10,
                max_regression: 0.01
            })
        );
        let config =
            with("eval_data = \"held.jsonl\"\neval_k = 1000\nmax_regression = 0\n").unwrap();
        let eval = config.models[0].eval.clone().unwrap();
        assert_eq!((eval.k, eval.max_regression), (1000, 0.0));
        assert_eq!(with("").unwrap().models[0].eval, None);

        let p = problems("eval_data = \"held.jsonl\"\neval_k = 0\nmax_regression = 1.5\n");
        assert_eq!(p[0].0, "models[0].eval_k");
        assert!(p[0].1.contains("between 1 and 1000"), "{p:?}");
        assert_eq!(p[1].0, "models[0].max_regression");
        assert!(p[1].1.contains("below 1"), "{p:?}");
        let p = problems("eval_data = \"missing.jsonl\"\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, "models[0].eval_data");
        assert!(p[0].1.starts_with("cannot read missing.jsonl"), "{p:?}");
        let p = problems("eval_k = 5\n");
        assert_eq!(p[0].0, "models[0].eval_k");
        assert!(p[0].1.contains("without `eval_data`"), "{p:?}");
    }
}

/// `[privacy]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivacySettings {
    /// The pseudonyms' key; `None`: a random one per process.
    pub key: Option<PseudonymKey>,
    /// Client addresses become pseudonyms in the access log and for plugins.
    pub pseudonymize_client_addresses: bool,
}

/// The secret key of the pseudonyms; its id (the first two bytes of its SHA-256, hex) is what
/// logs show, never the key.
#[derive(Clone, PartialEq, Eq)]
pub struct PseudonymKey {
    /// Four hex digits naming the key.
    pub id: String,
    secret: Arc<[u8]>,
}

impl PseudonymKey {
    /// Wraps a secret.
    pub fn new(secret: &[u8]) -> PseudonymKey {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(secret);
        PseudonymKey {
            id: format!("{:02x}{:02x}", digest[0], digest[1]),
            secret: secret.into(),
        }
    }

    /// The secret bytes.
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }
}

impl std::fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PseudonymKey {{ id: {}, secret: <redacted> }}", self.id)
    }
}
