//! What a plugin instance's store holds, and the host side of the contract: log, clock,
//! metrics, key-value store, and the request/response handles.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};
use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{ResourceLimiter, Result};

use super::bindings::storefront::gateway::{host, http as wit_http, ranking};
// The data the proxy's hooks exchange, defined by the proxy crate (`gateway_proxy::hooks`).
pub use gateway_proxy::hooks::{Ranker, RequestState, ResponseState};

/// Headers plugins may not touch: the gateway owns framing and the connection.
const PROTECTED: [&str; 5] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
];

/// Store data of one plugin instance.
pub(crate) struct StoreState {
    /// Handles the guest holds (requests and responses lent for one call).
    pub table: ResourceTable,
    /// Memory cap.
    pub limiter: MemoryLimiter,
    /// What the instance's plugin shares with its other instances.
    pub plugin: Arc<PluginCtx>,
    /// Bytes the current call may still emit (headers set, local response).
    pub output_left: usize,
    /// Set when a call went over `output_left`; the call is aborted.
    pub output_exceeded: bool,
    /// The models the current call may rank with.
    pub ranker: Option<Arc<dyn Ranker>>,
    /// WASI, capability-less (`wasi.rs`).
    pub wasi: wasmtime_wasi::WasiCtx,
    /// `wasi:http`, whose outgoing requests are all refused.
    pub http: wasmtime_wasi_http::WasiHttpCtx,
    pub http_hooks: crate::wasi::NoOutgoingHttp,
    /// The instance's stdout and stderr, logged line by line.
    pub output: Arc<crate::wasi::GuestOutput>,
    /// The end of what the last call (or `init`) wrote to stderr.
    pub last_stderr: String,
    /// The request lent to the current `on-request` call, which the guest borrows as handle
    /// [`LENT`]; kept here rather than in `table` so a call costs no allocation.
    pub request: Option<RequestState>,
    /// The response lent to the current `on-response` call (handle [`LENT`]).
    pub response: Option<ResponseState>,
}

/// The state lent to the current call, if `rep` is the handle it was lent under.
fn lent<'a, T>(slot: &'a mut Option<T>, rep: u32, what: &str) -> Result<&'a mut T> {
    match slot {
        Some(state) if rep == LENT => Ok(state),
        _ => wasmtime::bail!("unknown {what} handle {rep}"),
    }
}

/// The resource handle a call's request or response is lent under. The guest only ever
/// holds it as a borrow for the one call; a host function called with any other handle, or
/// when nothing is lent, traps.
pub(crate) const LENT: u32 = 1;

impl StoreState {
    /// A fresh state for an instance of `plugin`.
    pub fn new(plugin: Arc<PluginCtx>, memory_limit: usize) -> StoreState {
        let output = crate::wasi::GuestOutput::new(&plugin.name, &plugin.version);
        StoreState {
            wasi: crate::wasi::context(&output),
            http: crate::wasi::http_context(),
            http_hooks: crate::wasi::NoOutgoingHttp,
            output,
            last_stderr: String::new(),
            request: None,
            response: None,
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                max: memory_limit,
                exceeded: false,
                peak: 0,
            },
            plugin,
            output_left: 0,
            output_exceeded: false,
            ranker: None,
        }
    }

    fn charge(&mut self, bytes: usize) -> Result<()> {
        if bytes > self.output_left {
            self.output_exceeded = true;
            wasmtime::bail!("plugin output limit exceeded");
        }
        self.output_left -= bytes;
        Ok(())
    }
}

/// Refuses linear memory growth past a cap and remembers that it did.
pub(crate) struct MemoryLimiter {
    max: usize,
    /// A growth was refused.
    pub exceeded: bool,
    /// The largest size a memory of this instance was allowed to grow to, bytes.
    pub peak: usize,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> Result<bool> {
        if desired > self.max {
            self.exceeded = true;
            wasmtime::bail!(
                "plugin memory limit of {} bytes exceeded (wanted {desired})",
                self.max
            );
        }
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> Result<bool> {
        Ok(desired <= crate::sizing::MAX_TABLE_ELEMENTS)
    }
}

/// Shared by every instance of one plugin version.
pub(crate) struct PluginCtx {
    /// Plugin name from config.
    pub name: String,
    /// Content hash prefix of the component.
    pub version: String,
    /// The plugin's key-value store (kept across versions).
    pub kv: Arc<KvStore>,
    /// The plugin's own metrics.
    pub metrics: PluginOwnMetrics,
}

fn process_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

impl host::Host for StoreState {
    fn log(&mut self, level: host::LogLevel, message: String) -> Result<()> {
        let mut message = message;
        if message.len() > 4096 {
            let mut cut = 4096;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let (plugin, version) = (&self.plugin.name, &self.plugin.version);
        match level {
            host::LogLevel::Trace => {
                tracing::trace!(target: "plugin", plugin, version, "{message}")
            }
            host::LogLevel::Debug => {
                tracing::debug!(target: "plugin", plugin, version, "{message}")
            }
            host::LogLevel::Info => tracing::info!(target: "plugin", plugin, version, "{message}"),
            host::LogLevel::Warn => tracing::warn!(target: "plugin", plugin, version, "{message}"),
            host::LogLevel::Error => {
                tracing::error!(target: "plugin", plugin, version, "{message}")
            }
        }
        Ok(())
    }

    fn monotonic_now_ns(&mut self) -> Result<u64> {
        Ok(process_start().elapsed().as_nanos() as u64)
    }

    fn counter_add(&mut self, name: String, delta: u64) -> Result<()> {
        if let Some(c) = self.plugin.metrics.counter(&name) {
            c.inc_by(delta);
        }
        Ok(())
    }

    fn gauge_set(&mut self, name: String, value: f64) -> Result<()> {
        if let Some(g) = self.plugin.metrics.gauge(&name) {
            g.set(value);
        }
        Ok(())
    }

    fn histogram_observe(&mut self, name: String, value: f64) -> Result<()> {
        if let Some(h) = self.plugin.metrics.histogram(&name) {
            h.observe(value);
        }
        Ok(())
    }

    fn kv_get(&mut self, key: String) -> Result<Option<Vec<u8>>> {
        Ok(self.plugin.kv.get(&key))
    }

    fn kv_set(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<Result<(), String>> {
        Ok(self
            .plugin
            .kv
            .set(key, value, ttl_ms.map(Duration::from_millis)))
    }

    fn kv_delete(&mut self, key: String) -> Result<()> {
        self.plugin.kv.delete(&key);
        Ok(())
    }

    fn kv_increment(
        &mut self,
        key: String,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> Result<Result<i64, String>> {
        Ok(self
            .plugin
            .kv
            .increment(key, delta, ttl_ms.map(Duration::from_millis)))
    }
}

fn header_edit(
    name: &str,
    value: Option<&str>,
) -> std::result::Result<(HeaderName, Option<HeaderValue>), String> {
    let lower = name.to_ascii_lowercase();
    if PROTECTED.contains(&lower.as_str()) {
        return Err(format!("header {lower:?} is managed by the gateway"));
    }
    let name = HeaderName::from_bytes(lower.as_bytes())
        .map_err(|_| format!("{name:?} is not a valid header name"))?;
    let value = match value {
        Some(v) => Some(
            HeaderValue::from_str(v)
                .map_err(|_| format!("value for {name} has characters headers cannot carry"))?,
        ),
        None => None,
    };
    Ok((name, value))
}

fn first_header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name.to_ascii_lowercase().as_str())
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn all_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

#[derive(Clone, Copy)]
enum HeaderOp {
    Set,
    Add,
    Remove,
}

fn apply_header(
    headers: &mut HeaderMap,
    op: HeaderOp,
    name: HeaderName,
    value: Option<HeaderValue>,
) {
    match (op, value) {
        (HeaderOp::Set, Some(v)) => {
            headers.insert(name, v);
        }
        (HeaderOp::Add, Some(v)) => {
            headers.append(name, v);
        }
        _ => {
            headers.remove(name);
        }
    }
}

impl StoreState {
    fn req(&mut self, r: &Resource<RequestState>) -> Result<&mut RequestState> {
        lent(&mut self.request, r.rep(), "request")
    }
    fn resp(&mut self, r: &Resource<ResponseState>) -> Result<&mut ResponseState> {
        lent(&mut self.response, r.rep(), "response")
    }

    /// Validates a header edit and charges what it adds to the output budget.
    fn prepare_header(
        &mut self,
        name: &str,
        value: Option<&str>,
    ) -> Result<std::result::Result<(HeaderName, Option<HeaderValue>), String>> {
        let (name, value) = match header_edit(name, value) {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        if let Some(v) = &value {
            self.charge(name.as_str().len() + v.len())?;
        }
        Ok(Ok((name, value)))
    }

    fn edit_request_header(
        &mut self,
        r: &Resource<RequestState>,
        op: HeaderOp,
        name: &str,
        value: Option<&str>,
    ) -> Result<std::result::Result<(), String>> {
        let (name, value) = match self.prepare_header(name, value)? {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        apply_header(&mut self.req(r)?.headers, op, name, value);
        Ok(Ok(()))
    }

    fn edit_response_header(
        &mut self,
        r: &Resource<ResponseState>,
        op: HeaderOp,
        name: &str,
        value: Option<&str>,
    ) -> Result<std::result::Result<(), String>> {
        let (name, value) = match self.prepare_header(name, value)? {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        apply_header(&mut self.resp(r)?.headers, op, name, value);
        Ok(Ok(()))
    }
}

impl wit_http::Host for StoreState {}

impl ranking::Host for StoreState {
    async fn rank(
        &mut self,
        model: String,
        user: u32,
        candidates: Vec<u32>,
    ) -> Result<std::result::Result<ranking::Scores, String>> {
        let Some(ranker) = self.ranker.clone() else {
            return Ok(Err("no models are served".to_string()));
        };
        Ok(ranker
            .rank(&model, user, candidates)
            .await
            .map(|(version, values)| ranking::Scores { version, values }))
    }
}

impl wit_http::HostRequest for StoreState {
    fn method(&mut self, r: Resource<RequestState>) -> Result<String> {
        Ok(self.req(&r)?.method.as_str().to_string())
    }
    fn path(&mut self, r: Resource<RequestState>) -> Result<String> {
        Ok(self.req(&r)?.path.clone())
    }
    fn query(&mut self, r: Resource<RequestState>) -> Result<Option<String>> {
        Ok(self.req(&r)?.query.clone())
    }
    fn header(&mut self, r: Resource<RequestState>, name: String) -> Result<Option<String>> {
        Ok(first_header(&self.req(&r)?.headers, &name))
    }
    fn headers(&mut self, r: Resource<RequestState>) -> Result<Vec<(String, String)>> {
        Ok(all_headers(&self.req(&r)?.headers))
    }
    fn client_addr(&mut self, r: Resource<RequestState>) -> Result<String> {
        Ok(self.req(&r)?.client.shown())
    }
    fn route(&mut self, r: Resource<RequestState>) -> Result<String> {
        Ok(self.req(&r)?.route.to_string())
    }
    fn variant(&mut self, r: Resource<RequestState>) -> Result<Option<String>> {
        Ok(self.req(&r)?.variant.clone())
    }
    fn body(&mut self, r: Resource<RequestState>) -> Result<Option<Vec<u8>>> {
        Ok(self.req(&r)?.body.as_ref().map(|b| b.to_vec()))
    }
    fn set_header(
        &mut self,
        r: Resource<RequestState>,
        name: String,
        value: String,
    ) -> Result<std::result::Result<(), String>> {
        self.edit_request_header(&r, HeaderOp::Set, &name, Some(&value))
    }
    fn add_header(
        &mut self,
        r: Resource<RequestState>,
        name: String,
        value: String,
    ) -> Result<std::result::Result<(), String>> {
        self.edit_request_header(&r, HeaderOp::Add, &name, Some(&value))
    }
    fn remove_header(
        &mut self,
        r: Resource<RequestState>,
        name: String,
    ) -> Result<std::result::Result<(), String>> {
        self.edit_request_header(&r, HeaderOp::Remove, &name, None)
    }
    fn set_path(
        &mut self,
        r: Resource<RequestState>,
        path: String,
    ) -> Result<std::result::Result<(), String>> {
        if !path.starts_with('/')
            || path.contains(['?', '#'])
            || path.parse::<http::uri::PathAndQuery>().is_err()
        {
            return Ok(Err(format!(
                "{path:?} is not an absolute path without query"
            )));
        }
        self.charge(path.len())?;
        let req = self.req(&r)?;
        req.path = path;
        req.target_changed = true;
        Ok(Ok(()))
    }
    fn set_query(
        &mut self,
        r: Resource<RequestState>,
        query: Option<String>,
    ) -> Result<std::result::Result<(), String>> {
        if let Some(q) = &query {
            if q.contains('#') || format!("/?{q}").parse::<http::uri::PathAndQuery>().is_err() {
                return Ok(Err(format!("{q:?} is not a valid query string")));
            }
            self.charge(q.len())?;
        }
        let req = self.req(&r)?;
        req.query = query;
        req.target_changed = true;
        Ok(Ok(()))
    }
    fn set_variant(
        &mut self,
        r: Resource<RequestState>,
        variant: String,
    ) -> Result<std::result::Result<(), String>> {
        let req = self.req(&r)?;
        if let Some(experiment) = &req.experiment {
            return Ok(Err(format!(
                "route {} is split by experiment {experiment:?}: its variant is the split's (or the override header's), not a plugin's",
                req.route
            )));
        }
        if !req.variants.contains(&variant) {
            return Ok(Err(format!(
                "route {} has no variant {variant:?}; it has: {}",
                req.route,
                req.variants.join(", ")
            )));
        }
        req.variant = Some(variant);
        Ok(Ok(()))
    }
    fn drop(&mut self, r: Resource<RequestState>) -> Result<()> {
        // Plugins only ever borrow requests; the gateway takes them back after the call.
        let _ = r;
        Ok(())
    }
}

impl wit_http::HostResponse for StoreState {
    fn status(&mut self, r: Resource<ResponseState>) -> Result<u16> {
        Ok(self.resp(&r)?.status.as_u16())
    }
    fn header(&mut self, r: Resource<ResponseState>, name: String) -> Result<Option<String>> {
        Ok(first_header(&self.resp(&r)?.headers, &name))
    }
    fn headers(&mut self, r: Resource<ResponseState>) -> Result<Vec<(String, String)>> {
        Ok(all_headers(&self.resp(&r)?.headers))
    }
    fn request_method(&mut self, r: Resource<ResponseState>) -> Result<String> {
        Ok(self.resp(&r)?.request_method.as_str().to_string())
    }
    fn request_path(&mut self, r: Resource<ResponseState>) -> Result<String> {
        Ok(self.resp(&r)?.request_path.clone())
    }
    fn request_query(&mut self, r: Resource<ResponseState>) -> Result<Option<String>> {
        Ok(self.resp(&r)?.request_query.clone())
    }
    fn route(&mut self, r: Resource<ResponseState>) -> Result<String> {
        Ok(self.resp(&r)?.route.to_string())
    }
    fn variant(&mut self, r: Resource<ResponseState>) -> Result<Option<String>> {
        Ok(self.resp(&r)?.variant.clone())
    }
    fn body(&mut self, r: Resource<ResponseState>) -> Result<Option<Vec<u8>>> {
        Ok(self.resp(&r)?.body.as_ref().map(|b| b.to_vec()))
    }
    fn set_header(
        &mut self,
        r: Resource<ResponseState>,
        name: String,
        value: String,
    ) -> Result<std::result::Result<(), String>> {
        self.edit_response_header(&r, HeaderOp::Set, &name, Some(&value))
    }
    fn add_header(
        &mut self,
        r: Resource<ResponseState>,
        name: String,
        value: String,
    ) -> Result<std::result::Result<(), String>> {
        self.edit_response_header(&r, HeaderOp::Add, &name, Some(&value))
    }
    fn remove_header(
        &mut self,
        r: Resource<ResponseState>,
        name: String,
    ) -> Result<std::result::Result<(), String>> {
        self.edit_response_header(&r, HeaderOp::Remove, &name, None)
    }
    fn set_status(
        &mut self,
        r: Resource<ResponseState>,
        status: u16,
    ) -> Result<std::result::Result<(), String>> {
        match StatusCode::from_u16(status) {
            Ok(s) if (100..=599).contains(&status) => {
                self.resp(&r)?.status = s;
                Ok(Ok(()))
            }
            _ => Ok(Err(format!(
                "{status} is not a status code between 100 and 599"
            ))),
        }
    }
    fn set_body(
        &mut self,
        r: Resource<ResponseState>,
        body: Vec<u8>,
    ) -> Result<std::result::Result<(), String>> {
        let resp = self.resp(&r)?;
        if !resp.body_access {
            return Ok(Err(format!(
                "route {} does not give plugins body access (plugin_body_access)",
                resp.route
            )));
        }
        if body.len() > resp.body_limit {
            let limit = resp.body_limit;
            self.output_exceeded = true;
            wasmtime::bail!(
                "plugin set a body of {} bytes; the route allows {limit}",
                body.len()
            );
        }
        resp.body = Some(Bytes::from(body));
        resp.body_changed = true;
        Ok(Ok(()))
    }
    fn drop(&mut self, r: Resource<ResponseState>) -> Result<()> {
        let _ = r;
        Ok(())
    }
}

/// A plugin's key-value store: bounded, with per-key expiry checked on access.
pub(crate) struct KvStore {
    /// By the keyed hash of each key ([`KvStore::slot`]), never the key itself.
    entries: Mutex<HashMap<u128, KvEntry>>,
    max_entries: usize,
    /// Two independently keyed SipHash functions (random keys per process) make a key's
    /// 128-bit slot: the store holds what plugins key by (client pseudonyms, API keys,
    /// user ids) only as keyed hashes, which a memory dump cannot reverse or match against
    /// guesses without the keys.
    hashers: [std::collections::hash_map::RandomState; 2],
}

struct KvEntry {
    value: Vec<u8>,
    expires: Option<Instant>,
}

impl KvEntry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|e| e > now)
    }
}

const MAX_KEY: usize = 256;
const MAX_VALUE: usize = 64 * 1024;

impl KvStore {
    /// An empty store holding at most `max_entries` keys.
    pub fn new(max_entries: usize) -> KvStore {
        KvStore {
            entries: Mutex::new(HashMap::new()),
            max_entries,
            hashers: Default::default(),
        }
    }

    /// Where `key` is kept.
    fn slot(&self, key: &str) -> u128 {
        use std::hash::BuildHasher;
        let [a, b] = &self.hashers;
        (u128::from(a.hash_one(key)) << 64) | u128::from(b.hash_one(key))
    }

    /// The live value of `key`.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let slot = self.slot(key);
        let entries = self.entries.lock().expect("kv lock");
        entries
            .get(&slot)
            .filter(|e| e.live(Instant::now()))
            .map(|e| e.value.clone())
    }

    fn make_room(&self, entries: &mut HashMap<u128, KvEntry>, slot: u128) -> Result<(), String> {
        if entries.contains_key(&slot) || entries.len() < self.max_entries {
            return Ok(());
        }
        let now = Instant::now();
        entries.retain(|_, e| e.live(now));
        if entries.len() >= self.max_entries {
            return Err(format!(
                "key-value store is full ({} keys)",
                self.max_entries
            ));
        }
        Ok(())
    }

    /// Stores `value` under `key`.
    pub fn set(&self, key: String, value: Vec<u8>, ttl: Option<Duration>) -> Result<(), String> {
        if key.len() > MAX_KEY {
            return Err(format!(
                "key of {} bytes is over the {MAX_KEY}-byte limit",
                key.len()
            ));
        }
        if value.len() > MAX_VALUE {
            return Err(format!(
                "value of {} bytes is over the {MAX_VALUE}-byte limit",
                value.len()
            ));
        }
        let slot = self.slot(&key);
        let mut entries = self.entries.lock().expect("kv lock");
        self.make_room(&mut entries, slot)?;
        entries.insert(
            slot,
            KvEntry {
                value,
                expires: ttl.map(|t| Instant::now() + t),
            },
        );
        Ok(())
    }

    /// Removes `key`.
    pub fn delete(&self, key: &str) {
        let slot = self.slot(key);
        self.entries.lock().expect("kv lock").remove(&slot);
    }

    /// Adds `delta` to the decimal counter at `key` (absent or expired is 0).
    pub fn increment(&self, key: String, delta: i64, ttl: Option<Duration>) -> Result<i64, String> {
        if key.len() > MAX_KEY {
            return Err(format!(
                "key of {} bytes is over the {MAX_KEY}-byte limit",
                key.len()
            ));
        }
        let now = Instant::now();
        let slot = self.slot(&key);
        let mut entries = self.entries.lock().expect("kv lock");
        if let Some(e) = entries.get_mut(&slot).filter(|e| e.live(now)) {
            let current: i64 = std::str::from_utf8(&e.value)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or("the value at this key is not a decimal counter")?;
            let next = current.checked_add(delta).ok_or("counter overflow")?;
            e.value = next.to_string().into_bytes();
            return Ok(next);
        }
        self.make_room(&mut entries, slot)?;
        entries.insert(
            slot,
            KvEntry {
                value: delta.to_string().into_bytes(),
                expires: ttl.map(|t| now + t),
            },
        );
        Ok(delta)
    }
}

/// The families that plugins' own metrics live in, shared by all plugins.
pub(crate) struct PluginMetricFamilies {
    registry: Registry,
    counters: Mutex<HashMap<String, IntCounterVec>>,
    gauges: Mutex<HashMap<String, prometheus::GaugeVec>>,
    histograms: Mutex<HashMap<String, HistogramVec>>,
}

impl PluginMetricFamilies {
    /// Families are registered into `registry` on first use.
    pub fn new(registry: Registry) -> Arc<PluginMetricFamilies> {
        Arc::new(PluginMetricFamilies {
            registry,
            counters: Mutex::new(HashMap::new()),
            gauges: Mutex::new(HashMap::new()),
            histograms: Mutex::new(HashMap::new()),
        })
    }
}

const MAX_OWN_METRICS: usize = 32;

fn valid_metric_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_lowercase()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// One plugin's handles into the shared families, resolved once per name.
pub(crate) struct PluginOwnMetrics {
    plugin: String,
    families: Arc<PluginMetricFamilies>,
    counters: Mutex<HashMap<String, Option<IntCounter>>>,
    gauges: Mutex<HashMap<String, Option<prometheus::Gauge>>>,
    histograms: Mutex<HashMap<String, Option<Histogram>>>,
}

impl PluginOwnMetrics {
    /// Handles for `plugin`.
    pub fn new(plugin: &str, families: Arc<PluginMetricFamilies>) -> PluginOwnMetrics {
        PluginOwnMetrics {
            plugin: plugin.to_string(),
            families,
            counters: Mutex::new(HashMap::new()),
            gauges: Mutex::new(HashMap::new()),
            histograms: Mutex::new(HashMap::new()),
        }
    }

    fn resolve<M: Clone, V: Clone + prometheus::core::Collector + 'static>(
        &self,
        cache: &Mutex<HashMap<String, Option<M>>>,
        families: &Mutex<HashMap<String, V>>,
        name: &str,
        full_name: String,
        make: impl FnOnce(&str) -> prometheus::Result<V>,
        child: impl Fn(&V, &str) -> M,
    ) -> Option<M> {
        let mut cache = cache.lock().expect("metrics lock");
        if let Some(m) = cache.get(name) {
            return m.clone();
        }
        if cache.len() >= MAX_OWN_METRICS || !valid_metric_name(name) {
            tracing::warn!(plugin = %self.plugin, metric = name, "plugin metric ignored: invalid name or more than {MAX_OWN_METRICS} names");
            if cache.len() < MAX_OWN_METRICS * 4 {
                cache.insert(name.to_string(), None);
            }
            return None;
        }
        let mut families = families.lock().expect("metrics lock");
        let family = match families.get(name) {
            Some(f) => Some(f.clone()),
            None => match make(&full_name).and_then(|f| {
                self.families
                    .registry
                    .register(Box::new(f.clone()))
                    .map(|_| f)
            }) {
                Ok(f) => {
                    families.insert(name.to_string(), f.clone());
                    Some(f)
                }
                Err(e) => {
                    tracing::warn!(plugin = %self.plugin, metric = %full_name, error = %e, "plugin metric could not be registered");
                    None
                }
            },
        };
        let m = family.map(|f| child(&f, &self.plugin));
        cache.insert(name.to_string(), m.clone());
        m
    }

    fn counter(&self, name: &str) -> Option<IntCounter> {
        self.resolve(
            &self.counters,
            &self.families.counters,
            name,
            format!("gateway_plugin_{name}_total"),
            |n| IntCounterVec::new(Opts::new(n, "Counter kept by a plugin."), &["plugin"]),
            |f, p| f.with_label_values(&[p]),
        )
    }

    fn gauge(&self, name: &str) -> Option<prometheus::Gauge> {
        self.resolve(
            &self.gauges,
            &self.families.gauges,
            name,
            format!("gateway_plugin_{name}"),
            |n| prometheus::GaugeVec::new(Opts::new(n, "Gauge kept by a plugin."), &["plugin"]),
            |f, p| f.with_label_values(&[p]),
        )
    }

    fn histogram(&self, name: &str) -> Option<Histogram> {
        self.resolve(
            &self.histograms,
            &self.families.histograms,
            name,
            format!("gateway_plugin_{name}"),
            |n| {
                HistogramVec::new(
                    HistogramOpts::new(n, "Histogram kept by a plugin."),
                    &["plugin"],
                )
            },
            |f, p| f.with_label_values(&[p]),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_expires_counts_and_bounds() {
        let kv = KvStore::new(2);
        kv.set("a".into(), b"1".to_vec(), Some(Duration::from_millis(0)))
            .unwrap();
        assert_eq!(kv.get("a"), None, "zero TTL is already expired");
        assert_eq!(kv.increment("n".into(), 2, None), Ok(2));
        assert_eq!(kv.increment("n".into(), 3, None), Ok(5));
        assert_eq!(kv.get("n"), Some(b"5".to_vec()));
        kv.set("b".into(), vec![], None).unwrap();
        assert!(kv
            .set("c".into(), vec![], None)
            .unwrap_err()
            .contains("full"));
        kv.set("x".into(), b"text".to_vec(), None).unwrap_err();
        kv.delete("b");
        kv.set("x".into(), b"text".to_vec(), None).unwrap();
        assert!(kv
            .increment("x".into(), 1, None)
            .unwrap_err()
            .contains("not a decimal"));
        assert!(kv.set("k".repeat(300), vec![], None).is_err());
    }

    #[test]
    fn protected_and_invalid_headers_are_refused() {
        assert!(header_edit("Content-Length", Some("1")).is_err());
        assert!(header_edit("bad name", Some("1")).is_err());
        assert!(header_edit("x-ok", Some("line\nbreak")).is_err());
        let (n, v) = header_edit("X-OK", Some("fine")).unwrap();
        assert_eq!((n.as_str(), v.unwrap().to_str().unwrap()), ("x-ok", "fine"));
    }

    #[test]
    fn own_metric_names_are_checked() {
        assert!(valid_metric_name("ratelimit_limited"));
        assert!(!valid_metric_name("Bad"));
        assert!(!valid_metric_name("9lives"));
        assert!(!valid_metric_name("a-b"));
    }
}
