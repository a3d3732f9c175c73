//! The configuration file exactly as written: serde structs that reject unknown fields.
//!
//! Nothing here is trusted; [`super::validate`] turns a [`RawConfig`] into a [`super::Config`].
//! Every field's unit and default is documented here and in `config/gateway.toml`.

use serde::Deserialize;

/// Top level of `gateway.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Process-wide settings.
    #[serde(default)]
    pub server: RawServer,
    /// Limits applied to every downstream connection and request.
    #[serde(default)]
    pub limits: RawLimits,
    /// Logging.
    #[serde(default)]
    pub logging: RawLogging,
    /// Headers the proxy adds on the way upstream.
    #[serde(default)]
    pub proxy: RawProxy,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`).
    #[serde(default)]
    pub admin: RawAdmin,
    /// Certificates served by HTTPS listeners.
    #[serde(default)]
    pub tls: RawTls,
    /// Downstream listeners. At least one.
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    /// Named upstream pools. At least one.
    #[serde(default)]
    pub upstreams: Vec<RawUpstream>,
    /// Routes from (host, path prefix) to an upstream pool. At least one.
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    /// Settings of the WebAssembly plugin engine.
    #[serde(default)]
    pub plugin_runtime: RawPluginRuntime,
    /// Plugins that routes can list in their chains.
    #[serde(default)]
    pub plugins: Vec<RawPlugin>,
    /// Settings of the model scoring engine.
    #[serde(default)]
    pub scoring: RawScoring,
    /// Models served by the scoring engine.
    #[serde(default)]
    pub models: Vec<RawModel>,
    /// Where uploaded artifacts are kept.
    #[serde(default)]
    pub store: RawStore,
    /// Outcome events (impressions, clicks, purchases) sent back by the storefront.
    #[serde(default)]
    pub feedback: RawFeedback,
    /// How shopper identifiers are kept out of logs and plugin state.
    #[serde(default)]
    pub privacy: RawPrivacy,
    /// A/B splits and canaries of routes, judged by shoppers' outcomes.
    #[serde(default)]
    pub experiments: Vec<RawExperiment>,
}

/// `[feedback]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFeedback {
    /// Path the storefront `POST`s outcome events to, on every listener.
    /// Default `/_gateway/feedback`.
    pub path: Option<String>,
    /// File holding the secret (at least 16 bytes; surrounding whitespace is ignored) that
    /// signs attribution tokens. Every node of a fleet needs the same one. Relative to the
    /// config file. Required with `[[experiments]]`.
    pub key_file: Option<String>,
    /// Earlier secrets, still accepted on tokens signed before a rotation. Default none.
    pub old_key_files: Option<Vec<String>>,
    /// How long a token is accepted after the response that carried it, in seconds.
    /// Default 86400 (a day).
    pub token_max_age_s: Option<u64>,
    /// Events accepted in one request; more get 413. Default 1000.
    pub max_events_per_request: Option<usize>,
}

/// `[privacy]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrivacy {
    /// File holding the secret key of the pseudonyms (at least 16 bytes; surrounding
    /// whitespace is ignored), relative to the config file. Nodes with the same key give a
    /// shopper the same pseudonym; a new key, applied by a reload, gives everyone new ones
    /// (rotate it to make old logs unlinkable to new ones). Default: a random key per process,
    /// so pseudonyms change at every restart and differ between nodes.
    pub key_file: Option<String>,
    /// Whether client addresses are replaced by their pseudonym in the logs and for plugins
    /// (`client-addr`, which the rate limiter keys its counters by). Default true.
    pub pseudonymize_client_addresses: Option<bool>,
}

/// `[[experiments]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExperiment {
    /// Unique name: the metrics label, the key of the shopper hash, and what tokens carry.
    pub name: String,
    /// Routes it splits, by name; a route is in at most one experiment. Empty only when a
    /// variant has `models` (then it splits the scoring endpoint's requests for them).
    #[serde(default)]
    pub routes: Vec<String>,
    /// Where a request's shopper id is: `cookie:NAME`, `header:NAME` or `query:NAME`. A
    /// request without one is served by the first variant and not counted.
    pub assign_by: String,
    /// Request header that forces a variant by name (for QA); it wins over the split and
    /// over plugins. Default `x-gateway-variant`.
    pub override_header: Option<String>,
    /// The variants, the first being the baseline. At least two.
    pub variants: Vec<RawVariant>,
    /// Automatic canary analysis between the first variant (baseline) and the second
    /// (canary); while it runs it sets their weights. Default none (weights as written).
    pub rollout: Option<RawRollout>,
}

/// `[[experiments.variants]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVariant {
    /// Name, unique in the experiment.
    pub name: String,
    /// Share of shoppers, relative to the other variants' weights. Default 1.
    pub weight: Option<u32>,
    /// Upstream pool serving this variant. Default: the route's.
    pub upstream: Option<String>,
    /// Plugin chain for this variant's requests, by plugin name, in place of the route's
    /// (`[]` for none). Default: the route's chain.
    pub plugins: Option<Vec<String>>,
    /// Models this variant serves in place of others: served name to a `[[models]]` name,
    /// for plugins' `ranking` calls on the experiment's routes and on the scoring endpoint,
    /// whose requests for a served name the experiment then splits too. Default none.
    pub models: Option<std::collections::BTreeMap<String, String>>,
}

/// `[experiments.rollout]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRollout {
    /// The canary's share at each step, percent: increasing, ending at 100 (promotion).
    /// Default `[5, 25, 50, 100]`.
    pub steps: Option<Vec<u8>>,
    /// Least time a step lasts, in seconds. Default 600.
    pub min_step_s: Option<u64>,
    /// Least impressions (with a CTR or CVR guard; requests otherwise) each variant sees in
    /// a step before it advances. Default 1000.
    pub min_samples: Option<u64>,
    /// How much higher (absolute, 0 to 1) the canary's error rate may be. Default 0.01.
    pub max_error_rate_delta: Option<f64>,
    /// How many times the baseline's p99 latency the canary's may be. Default 1.5.
    pub max_p99_ratio: Option<f64>,
    /// Level of the always-valid CTR test: the chance of rolling back a canary whose CTR is
    /// no worse. Default 0.05; 0 turns the guard off.
    pub ctr_alpha: Option<f64>,
    /// How much lower (absolute) the canary's CTR may be before it counts as worse.
    /// Default 0.
    pub ctr_margin: Option<f64>,
    /// Level of the always-valid CVR (purchases per impression) test. Default 0.05; 0 turns
    /// the guard off.
    pub cvr_alpha: Option<f64>,
    /// How much lower (absolute) the canary's CVR may be. Default 0.
    pub cvr_margin: Option<f64>,
    /// Largest population stability index of the canary's model scores against the
    /// baseline's. Default none (no drift guard).
    pub max_psi: Option<f64>,
    /// How often the rollout is judged, in milliseconds. Default 5000.
    pub evaluate_every_ms: Option<u64>,
}

/// `[scoring]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawScoring {
    /// `auto` (a real GPU, else the software Vulkan adapter if allowed, else the CPU path),
    /// `gpu`, `software-gpu` or `cpu`. Default `auto`.
    pub backend: Option<String>,
    /// With `auto` and no real GPU, use the software Vulkan adapter (lavapipe) instead of the
    /// CPU path. Default false: lavapipe is slower than the CPU path (bench/scoring.sh).
    pub allow_software_gpu: Option<bool>,
    /// Requests per dispatched batch at most. Default 64.
    pub max_batch: Option<usize>,
    /// How long the first request of a batch waits for others, in microseconds. Default 500.
    pub max_queue_delay_us: Option<u64>,
    /// Requests waiting per model at most; more get 503. Default 4096.
    pub max_queue: Option<usize>,
    /// Path prefix of the scoring JSON endpoint on the proxy listeners. Default
    /// `/_gateway/models`.
    pub endpoint_prefix: Option<String>,
}

/// `[[models]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// Unique name, used in the endpoint path and metrics.
    pub name: String,
    /// The model file (safetensors). Relative to the config file. Required unless `source`
    /// names a registry.
    pub path: Option<String>,
    /// Pull the model file from an OCI registry instead of reading `path`:
    /// `oci://REGISTRY/REPOSITORY:TAG` or `oci://REGISTRY/REPOSITORY@sha256:DIGEST`. Set
    /// exactly one of `path` and `source`; needs `[store] dir`, where pulled artifacts are
    /// kept by digest. A loopback registry (`127.0.0.1`, `localhost`, `[::1]`) is reached
    /// over plain HTTP, any other over HTTPS. Default: none.
    pub source: Option<String>,
    /// File with the registry's credentials for `source`: `username:password` on one line,
    /// or a bearer token alone. Relative to the config file; read at every pull. Default:
    /// anonymous.
    pub oci_credentials_file: Option<String>,
    /// How often a `source` tag is resolved again, in seconds; when it names another digest
    /// the new content is pulled, verified and loaded in an all-or-nothing reload. 0: only
    /// at start and reload. A digest-pinned `source` is never resolved again. Default 300.
    pub oci_resolve_interval_s: Option<u64>,
    /// Pin: the SHA-256 (hex) the file must have; a file or upload with another content is
    /// refused. Default: not pinned.
    pub sha256: Option<String>,
    /// Hold the embedding tables (`items`, and an MLP's `users`) as f16: values are rounded
    /// to half precision at load (on every path, so answers do not depend on the device) and
    /// take half the GPU memory and scan bandwidth where the adapter has `SHADER_F16`. A
    /// table value beyond ±65504 refuses the model. Default false (f32).
    pub f16_storage: Option<bool>,
    /// Held-out interactions (JSON lines) every new version is evaluated on before it
    /// becomes active; one worse than the active version by more than `max_regression` is
    /// refused. Relative to the config file. Default none (no offline gate).
    pub eval_data: Option<String>,
    /// Cutoff of the ranking metrics (NDCG@k, precision@k, recall@k), in items, 1..=1000;
    /// needs `eval_data`. Default 10.
    pub eval_k: Option<usize>,
    /// How far the primary metric (NDCG@k for embedding models, AUC for MLP models) of a new
    /// version may fall below the active version's, as an absolute difference, at least 0
    /// and below 1; needs `eval_data`. Default 0.01.
    pub max_regression: Option<f64>,
}

/// `[plugin_runtime]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPluginRuntime {
    /// Plugin instances that can exist at once across all plugins (the pooling allocator's
    /// slots; each reserves address space, not memory). Default 256.
    pub max_instances: Option<u32>,
    /// Deadline granularity, in milliseconds: deadlines are counted in ticks of this length.
    /// Default 1.
    pub epoch_tick_ms: Option<u64>,
    /// Meter fuel (wasm work units): each hook call is bounded by `fuel_per_call`, the work
    /// it does, which waiting for a CPU on a busy node does not use up. Turning it off leaves
    /// only the wall-clock `deadline_ms`, and busy nodes then fail healthy plugins. Default
    /// true.
    pub fuel: Option<bool>,
    /// Directory of compiled plugins (wasmtime's precompiled code, keyed by content and
    /// engine settings), so a restart or reload does not compile a plugin again: an 18 MB
    /// Python plugin then loads in milliseconds instead of about 20 s of CPU. Relative to the
    /// config file. Default: `compiled` in the `[store]` directory when there is one; none
    /// otherwise (every start compiles).
    pub compile_cache_dir: Option<String>,
}

/// `[[plugins]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlugin {
    /// Unique name that routes list in `plugins`.
    pub name: String,
    /// Pin: the SHA-256 (hex) the component must have; a file or upload with another content
    /// is refused. Default: not pinned.
    pub sha256: Option<String>,
    /// The plugin component (`.wasm`, built for the `plugin` world in `wit/`). Relative to the
    /// config file. Required unless `source` names a registry.
    pub path: Option<String>,
    /// Pull the component from an OCI registry instead of reading `path`:
    /// `oci://REGISTRY/REPOSITORY:TAG` or `oci://REGISTRY/REPOSITORY@sha256:DIGEST`. Set
    /// exactly one of `path` and `source`; needs `[store] dir`, where pulled artifacts are
    /// kept by digest. A loopback registry (`127.0.0.1`, `localhost`, `[::1]`) is reached
    /// over plain HTTP, any other over HTTPS. Default: none.
    pub source: Option<String>,
    /// File with the registry's credentials for `source`: `username:password` on one line,
    /// or a bearer token alone. Relative to the config file; read at every pull. Default:
    /// anonymous.
    pub oci_credentials_file: Option<String>,
    /// How often a `source` tag is resolved again, in seconds; when it names another digest
    /// the new content is pulled, verified and loaded in an all-or-nothing reload. 0: only
    /// at start and reload. A digest-pinned `source` is never resolved again. Default 300.
    pub oci_resolve_interval_s: Option<u64>,
    /// The plugin's own configuration: a string passed as is, or a table passed as TOML text.
    pub config: Option<toml::Value>,
    /// Wall-clock backstop of one hook call, in milliseconds: the call is aborted after it
    /// whatever it was doing (a loop when fuel is off, a wait in a host call). Fuel is the
    /// primary bound; keep this generous, since it also counts time spent waiting for a CPU.
    /// Default 500.
    pub deadline_ms: Option<u64>,
    /// Linear memory one instance may grow to, in bytes. Default 16777216 (16 MiB).
    pub memory_limit_bytes: Option<u64>,
    /// Fuel (roughly, wasm instructions) one hook call may burn before it is stopped with
    /// outcome `fuel`; `init` may burn 20 times as much. Needs `plugin_runtime.fuel = true`
    /// (the default). Default 50000000: a runaway loop burns it in about 5 ms of CPU, and the
    /// shipped plugins' calls burn at most about 500000.
    pub fuel_per_call: Option<u64>,
    /// Fuel added to a hook call for each byte of request or response body it is handed
    /// (routes with `plugin_body_access`), since rewriting a body is work in proportion to it.
    /// Default 2000.
    pub fuel_per_body_byte: Option<u64>,
    /// Bytes one hook call may add through headers, path, query and local responses.
    /// Default 262144.
    pub max_output_bytes: Option<u64>,
    /// Ready instances kept for this plugin; more are made under load. Default 4.
    pub instances: Option<u32>,
}

/// `[server]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Runtime worker threads. Default 0: one per CPU core.
    pub worker_threads: Option<usize>,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish, in milliseconds.
    /// Default 30000.
    pub drain_timeout_ms: Option<u64>,
    /// `gateway run` reloads when the config file or a file it names (certificates, plugins,
    /// models) changes, including atomic renames and ConfigMap symlink swaps. Default true.
    pub watch_files: Option<bool>,
    /// Quiet time after the last file event before reloading, in milliseconds. Default 250.
    pub watch_debounce_ms: Option<u64>,
    /// How often each route's request rate, error ratio and p99 latency are sampled for the
    /// anomaly alerts (`gateway_anomaly`), in milliseconds. Default 10000.
    pub anomaly_interval_ms: Option<u64>,
}

/// `[limits]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Open downstream connections across all listeners. When they are all open, a new client
    /// is accepted and the longest-idle connections (no request in flight) are closed to make
    /// room for it (`gateway_connections_closed_total{reason="evicted"}`); while none is idle,
    /// further clients wait in the accept backlog. Default 10000.
    pub max_connections: Option<usize>,
    /// Bytes of request line plus headers (HTTP/1.1) or of the header list (h2); larger requests
    /// get 431. Default 65536.
    pub max_header_bytes: Option<usize>,
    /// Bytes of request body; larger bodies get 413. Default 10485760 (10 MiB).
    pub max_body_bytes: Option<u64>,
    /// Time a client may take to send a complete request head, in milliseconds; the connection is
    /// closed when it runs out (slowloris protection). For HTTP/1.1 it also bounds the wait for
    /// the next request on a kept-alive connection. Default 10000.
    pub header_read_timeout_ms: Option<u64>,
    /// Time a client may leave a started request body without sending more of it, in
    /// milliseconds; the request gets 408. Default 30000.
    pub body_read_timeout_ms: Option<u64>,
    /// Time a client may take to send a whole request body that the gateway reads before it
    /// answers or forwards it (a route whose plugins read bodies, the scoring and feedback
    /// endpoints), in milliseconds, counted from the first read; the request then gets 408
    /// (`gateway_rejected_requests_total{reason="body_deadline"}`). It stops a body trickled
    /// just fast enough to never trip `body_read_timeout_ms`. Default 60000.
    pub body_deadline_ms: Option<u64>,
    /// Time a response may wait for the client to take more of it, in milliseconds: when no
    /// byte could be written to the connection, or an h2 stream's data could not be sent
    /// (flow-control window), for this long, the h2 stream is reset or the connection closed
    /// and the upstream side released (`gateway_rejected_requests_total{reason=
    /// "send_timeout"}`, `gateway_connections_closed_total{reason="send_timeout"}`). A slow
    /// reader that keeps taking bytes never hits it. Default 30000.
    pub send_timeout_ms: Option<u64>,
    /// A connection with no request in flight for this long is closed, in milliseconds.
    /// Default 60000.
    pub idle_timeout_ms: Option<u64>,
    /// Concurrent h2 streams per downstream connection. Default 256.
    pub h2_max_concurrent_streams: Option<u32>,
    /// Requests being answered at once across all listeners (until their response head);
    /// one more gets 503 with `retry-after` at once (`gateway_shed_requests_total{reason=
    /// "concurrency"}`). Default 4096.
    pub max_inflight_requests: Option<usize>,
    /// Load shedding on queue time, in milliseconds: when the gateway's worker threads have
    /// been at least this far behind for 3 samples in a row (a standing queue, not a blip:
    /// the node is saturated), new requests get 503 with `retry-after` until they catch up
    /// (`reason="queue_time"`), so the requests it does take keep a bounded latency. 0 turns
    /// it off. Default 50.
    pub max_queue_time_ms: Option<u64>,
}

/// `[logging]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogging {
    /// `tracing` filter directive, e.g. `info` or `gateway=debug`. Default `info`.
    /// The `RUST_LOG` environment variable overrides it.
    pub level: Option<String>,
    /// `text` or `json`. Default `text`.
    pub format: Option<String>,
    /// Emit one access log line per request (target `access`). Default true.
    pub access_log: Option<bool>,
}

/// `[proxy]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    /// Which forwarding headers to send upstream: `x-forwarded` (X-Forwarded-For/-Proto/-Host),
    /// `forwarded` (RFC 7239), `both` or `none`. Default `x-forwarded`.
    pub forwarded: Option<String>,
    /// Append `Via: <version> <via_name>` on requests and responses. Default false.
    pub via: Option<bool>,
    /// Pseudonym used in `Via`. Default `gateway`.
    pub via_name: Option<String>,
    /// Header carrying the request id, kept when a client sends a valid one. Default
    /// `x-request-id`.
    pub request_id_header: Option<String>,
    /// Add `x-gateway-generation` (the configuration generation that served the request)
    /// and `x-plugin-versions` (`name@version,...` of the route's chain) to responses; model
    /// answers always carry `x-model-version`. Default false.
    pub version_headers: Option<bool>,
}

/// `[admin]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// Address of the admin listener. Default `127.0.0.1:9901`. Without a token it must be a
    /// loopback address.
    pub bind: Option<String>,
    /// File holding the bearer token for `/admin/*` (whitespace trimmed). Relative to the
    /// config file. Default: none.
    pub token_file: Option<String>,
    /// Environment variable holding the bearer token, when `token_file` is not set.
    pub token_env: Option<String>,
    /// Largest plugin or model upload, in bytes. Default 268435456 (256 MiB).
    pub max_upload_bytes: Option<u64>,
    /// Uploads accepted per minute (all kinds together); more get 429. Default 30.
    pub max_uploads_per_minute: Option<u32>,
}

/// `[store]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// Directory of uploaded plugins and models (content-addressed, with a manifest of the
    /// active versions). Relative to the config file. Default: none (uploads disabled).
    pub dir: Option<String>,
    /// Ed25519 public keys (hex, 32 bytes) allowed to sign uploads. Default: none.
    pub trusted_keys: Option<Vec<String>>,
    /// Refuse uploads without a valid `x-signature` by a trusted key. Default: true when
    /// `trusted_keys` is set.
    pub require_signatures: Option<bool>,
}

/// `[tls]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// Certificates, chosen by SNI.
    #[serde(default)]
    pub certificates: Vec<RawCertificate>,
}

/// `[[tls.certificates]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    /// PEM file with the certificate chain, leaf first. Relative paths are relative to the
    /// config file.
    pub cert: String,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// SNI names this certificate answers: exact (`shop.example.com`) or one-level wildcard
    /// (`*.example.com`).
    #[serde(default)]
    pub server_names: Vec<String>,
    /// Serve this certificate when the client sends no SNI or an unknown name. Exactly one
    /// certificate is the default; with a single certificate it is implied.
    pub default: Option<bool>,
}

/// `[[listeners]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    /// Unique name, used in metrics labels.
    pub name: String,
    /// Socket address to bind, e.g. `0.0.0.0:443`. Port 0 picks a free port.
    pub bind: String,
    /// `https` (default) or `http`.
    pub protocol: Option<String>,
    /// For `http` listeners: `serve` (default) proxies as usual, `redirect` answers 308 to the
    /// same URL on HTTPS.
    pub http_mode: Option<String>,
    /// For `redirect`: the HTTPS port to name in the Location header. Default 443.
    pub redirect_https_port: Option<u16>,
    /// For `https` listeners: answer 421 Misdirected Request to a request whose host is not
    /// among the `server_names` of the certificate chosen by SNI (a connection reused for
    /// another site); a certificate without `server_names` covers every host. Default false.
    pub reject_misdirected: Option<bool>,
}

/// `[[upstreams]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// Unique name that routes refer to.
    pub name: String,
    /// Backend addresses, `host:port`. At least one.
    #[serde(default)]
    pub backends: Vec<String>,
    /// `round_robin` (default) or `least_in_flight`.
    pub balance: Option<String>,
    /// `http1` (default) or `h2` (prior knowledge, cleartext).
    pub protocol: Option<String>,
    /// Time to establish a TCP connection to a backend, in milliseconds. Default 1000.
    pub connect_timeout_ms: Option<u64>,
    /// Time from sending a request to receiving the response head, in milliseconds; 504 after.
    /// Default 15000.
    pub request_timeout_ms: Option<u64>,
    /// Longest wait for the next part of a response body once its head has arrived, in
    /// milliseconds; after it the response is cut off (HTTP/1.1: the connection closes; h2:
    /// the stream is reset), the upstream connection closed, and it is counted
    /// (`gateway_upstream_errors_total{kind="body_timeout"}`). Default 60000.
    pub body_timeout_ms: Option<u64>,
    /// How long an idle pooled connection is kept, in milliseconds. Default 90000.
    pub pool_idle_timeout_ms: Option<u64>,
    /// Idle pooled connections kept per backend. Default 128.
    pub pool_max_idle_per_backend: Option<usize>,
    /// Retries of an idempotent request after a connect failure or reset. Default 2.
    pub max_retries: Option<u32>,
    /// Retries may add at most this fraction of the pool's request rate. Default 0.2.
    pub retry_budget_ratio: Option<f64>,
    /// Retries allowed per second regardless of the ratio. Default 5.
    pub retry_budget_min_per_sec: Option<u32>,
    /// Panic threshold: when fewer than this fraction of the backends are healthy (passive
    /// ejection and active checks together), requests are balanced across all of them
    /// instead, so ejection never turns a moment of overload into an outage. 0 to 1; 0 turns
    /// it off (then a pool with no healthy backend answers 502). Default 0.5.
    pub panic_threshold: Option<f64>,
    /// Active health checks. Absent: none, backends are only ejected passively.
    pub health_check: Option<RawHealthCheck>,
    /// Passive ejection after consecutive failures.
    #[serde(default)]
    pub passive: RawPassive,
}

/// `[upstreams.health_check]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    /// Path requested with GET; a 2xx answer is healthy. Default `/healthz`.
    pub path: Option<String>,
    /// Time between checks of one backend, in milliseconds. Default 5000.
    pub interval_ms: Option<u64>,
    /// Time a check may take, in milliseconds. Default 2000.
    pub timeout_ms: Option<u64>,
    /// Consecutive successes that bring an unhealthy backend back. Default 2.
    pub healthy_threshold: Option<u32>,
    /// Consecutive failures that mark a backend unhealthy. Default 3.
    pub unhealthy_threshold: Option<u32>,
}

/// `[upstreams.passive]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPassive {
    /// Consecutive failed requests (connect error, reset, timeout, 502/503/504) that eject a
    /// backend. 0 disables. Default 5.
    pub consecutive_failures: Option<u32>,
    /// How long an ejected backend gets no traffic, in milliseconds. Default 10000.
    pub ejection_ms: Option<u64>,
    /// Most of the pool's backends that may be ejected at once, as a share: an ejection that
    /// would pass it is skipped and counted (`gateway_upstream_ejections_total{outcome=
    /// "over_max_share"}`), so ejection never empties a pool; with the default a pool of one
    /// backend is never ejected. 0 to 1; 1 lets every backend be ejected. Default 0.5.
    pub max_ejected_share: Option<f64>,
    /// What a timeout (connect or response) counts towards `consecutive_failures` when the
    /// gateway's own worker threads had a standing queue while the request waited: the node
    /// was saturated, so the backend may not be to blame. 0 to 1; 1 counts it in full.
    /// Errors of the node's own resources (out of file descriptors or local ports) never
    /// count. Default 0.25.
    pub local_overload_weight: Option<f64>,
}

/// `[[routes]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Unique name, used in metrics labels.
    pub name: String,
    /// Hosts matched: exact names, `*.suffix` wildcards, or `*` for any. Default `["*"]`.
    pub hosts: Option<Vec<String>>,
    /// Path prefix matched on segment boundaries (`/api` matches `/api` and `/api/x`, not
    /// `/apix`). Default `/`.
    pub path_prefix: Option<String>,
    /// Name of the upstream pool.
    pub upstream: String,
    /// Remove the matched prefix before forwarding. Default false.
    pub strip_prefix: Option<bool>,
    /// Plugin chain, by plugin name, in call order for requests (responses see them in
    /// reverse). Default none.
    pub plugins: Option<Vec<String>>,
    /// What a request gets when one of its plugins fails (trap, deadline, memory, bad
    /// output): `fail-closed` answers 500 with the request id, `fail-open` skips that plugin.
    /// Default `fail-closed`.
    pub plugin_failure: Option<String>,
    /// Let plugins read the request body and read/replace the response body, buffered up to
    /// `plugin_max_body_bytes`. Default false.
    pub plugin_body_access: Option<bool>,
    /// Largest body plugins see or set, in bytes; larger bodies stream past unseen.
    /// Default 1048576.
    pub plugin_max_body_bytes: Option<u64>,
    /// Variants for canary routing: variant name to upstream name. A plugin picks one with
    /// `set-variant`. Default none.
    pub variants: Option<std::collections::BTreeMap<String, String>>,
    /// Variant used when no plugin picks one; required with `variants`.
    pub default_variant: Option<String>,
}
