//! Serving models: one slot per configured model, holding the live version behind `ArcSwap`
//! and the last few for rollback, and a dynamic batcher that coalesces concurrent requests
//! into one dispatch (like Triton's: a batch closes when it is full or when its first request
//! has waited the maximum queue delay).
//!
//! A batch reads the live version once, so every response of a batch comes from one version
//! and names it; a swap never touches a batch in flight, and the old version's buffers go when
//! its last batch does.
//!
//! Every caller gets the answer computed for its own request, whatever it was batched with:
//! - a request no batch could serve (wrong operation for the model, over a per-request
//!   limit) is refused alone when it is queued, and again if the version changed meanwhile;
//! - a batch is sorted into groups of one operation each, typed by operation, and each group
//!   is cut into dispatches within the model's batch limits, so merging never exceeds them;
//! - a dispatch answers one result per request in request order, checked before any is sent;
//!   a request the model refuses (an unknown id, say) is answered alone and the rest run again.
//!
//! Requests that alone take more than an eighth of a dispatch ([`is_heavy`]) queue in a second
//! lane with its own batcher thread, so a client sending 65,536 candidates does not make the
//! small requests wait behind it.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

use super::{
    ComputeDevice, CtrRow, Hit, Model, ModelError, ModelKind, Query, RankRequest, ScoringConfig,
    ScoringError,
};

/// Versions kept for rollback besides the live one.
pub(crate) const HISTORY: usize = 3;

/// A loaded model and the version it answers as.
pub struct ServedModel {
    /// The model.
    pub model: Model,
    /// First 12 hex digits of the file's SHA-256, `+f16` for f16 tables ([`served_version`]).
    pub version: String,
}

/// The query of a scoring request, owned.
#[derive(Debug, Clone)]
pub enum OwnedQuery {
    /// A user id (row of the model's `users` table).
    User(u32),
    /// A query vector.
    Vector(Vec<f32>),
}

impl OwnedQuery {
    fn as_query(&self) -> Query<'_> {
        match self {
            OwnedQuery::User(u) => Query::User(*u),
            OwnedQuery::Vector(v) => Query::Vector(v),
        }
    }
}

/// What a caller asks of a model.
#[derive(Debug, Clone)]
pub enum Ask {
    /// Score these candidates for the query.
    Rank {
        /// The query.
        query: OwnedQuery,
        /// Item ids.
        candidates: Vec<u32>,
    },
    /// The best `k` items of the whole catalog for the query.
    TopK {
        /// The query.
        query: OwnedQuery,
        /// How many.
        k: usize,
    },
    /// Click probabilities of (user, item, dense features) rows (MLP models).
    Predict {
        /// The rows.
        rows: Vec<(u32, u32, Vec<f32>)>,
    },
}

/// What the model answered, and which version answered.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The version that produced every number here.
    pub version: String,
    /// Items and scores, best first (for `Rank`, the candidates re-ordered). For `Predict`,
    /// one entry per row in request order, `item` being the row's item.
    pub hits: Vec<Hit>,
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The request itself is wrong (unknown id, wrong dimension, NaN, ...): a 4xx.
    #[error("{0}")]
    Bad(String),
    /// The model failed on a good request: a 5xx.
    #[error("model failed: {0}")]
    Failed(String),
    /// The batcher is gone (shutting down).
    #[error("model {0} is not serving")]
    Closed(String),
    /// The model's queue is full: a 503 the client may retry.
    #[error("model {0} is overloaded ({1} requests waiting); retry later")]
    Overloaded(String, usize),
}

type Reply = tokio::sync::oneshot::Sender<Result<Answer, ServeError>>;

struct Job {
    ask: Ask,
    queued: Instant,
    reply: Reply,
}

/// The operation of a request, as metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Rank,
    TopK,
    Predict,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Rank => "rank",
            Op::TopK => "topk",
            Op::Predict => "predict",
        }
    }
}

impl Ask {
    fn op(&self) -> Op {
        match self {
            Ask::Rank { .. } => Op::Rank,
            Ask::TopK { .. } => Op::TopK,
            Ask::Predict { .. } => Op::Predict,
        }
    }
}

/// Series of one model slot.
#[derive(Clone)]
pub(crate) struct ModelMetrics {
    requests: IntCounterVec,
    batch_size: Histogram,
    queue: Histogram,
    compute: Histogram,
    loaded: IntGaugeVec,
    cpu_fallbacks: prometheus::IntCounter,
    name: String,
}

/// The families behind [`ModelMetrics`], registered once.
#[derive(Clone)]
pub struct ModelFamilies {
    requests: IntCounterVec,
    batch_size: HistogramVec,
    queue: HistogramVec,
    compute: HistogramVec,
    loaded: IntGaugeVec,
    cpu_fallbacks: IntCounterVec,
    /// `gateway_scoring_device_info{backend,adapter}`: 1 for the device in use.
    pub device: IntGaugeVec,
}

impl ModelFamilies {
    /// Registers the model series into `registry`.
    pub fn new(registry: &Registry) -> Result<ModelFamilies, prometheus::Error> {
        let f = ModelFamilies {
            requests: IntCounterVec::new(
                Opts::new(
                    "gateway_model_requests_total",
                    "Scoring requests by model, version, operation and outcome.",
                ),
                &["model", "version", "op", "outcome"],
            )?,
            batch_size: HistogramVec::new(
                HistogramOpts::new("gateway_model_batch_size", "Requests per dispatched batch.")
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
                &["model"],
            )?,
            queue: HistogramVec::new(
                HistogramOpts::new(
                    "gateway_model_queue_seconds",
                    "Time a request waited for its batch.",
                )
                .buckets(
                    prometheus::exponential_buckets(0.000_01, 2.0, 16).expect("static buckets"),
                ),
                &["model"],
            )?,
            compute: HistogramVec::new(
                HistogramOpts::new(
                    "gateway_model_compute_seconds",
                    "Time of one batch on the device.",
                )
                .buckets(
                    prometheus::exponential_buckets(0.000_01, 2.0, 18).expect("static buckets"),
                ),
                &["model"],
            )?,
            loaded: IntGaugeVec::new(
                Opts::new(
                    "gateway_model_loaded_bytes",
                    "Parameter bytes of the live version (held on the device when it is a GPU).",
                ),
                &["model", "version", "backend"],
            )?,
            cpu_fallbacks: IntCounterVec::new(
                Opts::new("gateway_model_cpu_fallbacks_total", "Batches answered on the CPU path after the GPU failed."),
                &["model"],
            )?,
            device: IntGaugeVec::new(
                Opts::new("gateway_scoring_device_info", "The scoring device in use (value 1): backend gpu, software-gpu or cpu, and the adapter."),
                &["backend", "adapter"],
            )?,
        };
        registry.register(Box::new(f.cpu_fallbacks.clone()))?;
        registry.register(Box::new(f.device.clone()))?;
        registry.register(Box::new(f.requests.clone()))?;
        registry.register(Box::new(f.batch_size.clone()))?;
        registry.register(Box::new(f.queue.clone()))?;
        registry.register(Box::new(f.compute.clone()))?;
        registry.register(Box::new(f.loaded.clone()))?;
        Ok(f)
    }

    fn for_model(&self, name: &str) -> ModelMetrics {
        ModelMetrics {
            requests: self.requests.clone(),
            batch_size: self.batch_size.with_label_values(&[name]),
            queue: self.queue.with_label_values(&[name]),
            compute: self.compute.with_label_values(&[name]),
            loaded: self.loaded.clone(),
            cpu_fallbacks: self.cpu_fallbacks.with_label_values(&[name]),
            name: name.to_string(),
        }
    }
}

impl ModelMetrics {
    fn count(&self, version: &str, op: Op, outcome: &str, n: u64) {
        self.requests
            .with_label_values(&[self.name.as_str(), version, op.as_str(), outcome])
            .inc_by(n);
    }
}

/// One configured model: its live version, its history, and its batchers.
pub struct ModelSlot {
    /// Configured name.
    pub name: String,
    live: Arc<ArcSwap<ServedModel>>,
    history: Mutex<VecDeque<Arc<ServedModel>>>,
    /// The queue of ordinary requests.
    light: mpsc::SyncSender<Job>,
    /// The queue of requests that alone fill much of a dispatch ([`is_heavy`]).
    heavy: mpsc::SyncSender<Job>,
    max_queue: usize,
    metrics: ModelMetrics,
}

/// Batching settings.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    /// Requests per dispatch at most.
    pub max_batch: usize,
    /// How long the first request of a batch may wait for others.
    pub max_queue_delay: Duration,
    /// Requests waiting at most; more are refused (backpressure).
    pub max_queue: usize,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            max_batch: 64,
            max_queue_delay: Duration::from_micros(500),
            max_queue: 4096,
        }
    }
}

/// The version a model answers as: the first 12 hex digits of the file's SHA-256, with
/// `+f16` when its tables are f16-rounded (the same file then gives other scores, so it is
/// another version).
pub fn served_version(bytes: &[u8], storage: super::TableStorage) -> String {
    use sha2::Digest;
    // The same id as the content store's version of the file (12 hex digits of its SHA-256).
    let hash: String = sha2::Sha256::digest(bytes)
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    match storage {
        super::TableStorage::F32 => hash,
        super::TableStorage::F16 => format!("{hash}+f16"),
    }
}

/// Loads a model file and names its version by content ([`served_version`]).
pub fn load_served(
    path: &std::path::Path,
    cfg: &ScoringConfig,
    device: &ComputeDevice,
) -> Result<ServedModel, ModelError> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let version = served_version(&bytes, cfg.storage);
    let model = Model::from_bytes(&bytes, cfg, device)?;
    Ok(ServedModel { model, version })
}

impl ModelSlot {
    /// Starts serving `first` under `name` with its batcher threads (one per lane).
    pub fn start(
        name: &str,
        first: ServedModel,
        policy: BatchPolicy,
        families: &ModelFamilies,
    ) -> Arc<ModelSlot> {
        let metrics = families.for_model(name);
        let live = Arc::new(ArcSwap::from_pointee(first));
        let lane = |suffix: &str| {
            let (tx, rx) = mpsc::sync_channel(policy.max_queue);
            let (live, metrics) = (live.clone(), metrics.clone());
            std::thread::Builder::new()
                .name(format!("batcher-{name}{suffix}"))
                .spawn(move || batcher(rx, live, policy, metrics))
                .expect("spawning a batcher thread");
            tx
        };
        let light = lane("");
        let heavy = lane("-heavy");
        let slot = Arc::new(ModelSlot {
            name: name.to_string(),
            live: live.clone(),
            history: Mutex::new(VecDeque::new()),
            light,
            heavy,
            max_queue: policy.max_queue,
            metrics,
        });
        slot.note_loaded(&live.load());
        slot
    }

    fn note_loaded(&self, m: &ServedModel) {
        let backend = match m.model.execution_path() {
            super::ExecutionPath::Gpu {
                software: false, ..
            } => "gpu",
            super::ExecutionPath::Gpu { software: true, .. } => "software-gpu",
            super::ExecutionPath::Cpu | super::ExecutionPath::CpuFallback { .. } => "cpu",
        };
        // Only this model's earlier series go: the family holds every model's.
        use prometheus::core::Collector;
        for family in self.metrics.loaded.collect() {
            for metric in family.get_metric() {
                let label = |n: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == n)
                        .map_or("", |l| l.value())
                };
                if label("model") == self.name {
                    let _ = self.metrics.loaded.remove_label_values(&[
                        label("model"),
                        label("version"),
                        label("backend"),
                    ]);
                }
            }
        }
        self.metrics
            .loaded
            .with_label_values(&[self.name.as_str(), m.version.as_str(), backend])
            .set(m.model.held_bytes() as i64);
    }

    /// The live version.
    pub fn live(&self) -> Arc<ServedModel> {
        self.live.load_full()
    }

    /// Versions available for rollback, newest first.
    pub fn history(&self) -> Vec<String> {
        self.history
            .lock()
            .expect("history lock")
            .iter()
            .map(|m| m.version.clone())
            .collect()
    }

    /// Makes `next` the live version; the previous one joins the history.
    pub fn swap(&self, next: ServedModel) {
        let next = Arc::new(next);
        self.note_loaded(&next);
        let previous = self.live.swap(next);
        let mut history = self.history.lock().expect("history lock");
        history.retain(|m| m.version != previous.version);
        history.push_front(previous);
        history.truncate(HISTORY);
    }

    /// Makes the newest (or the named) version from the history live again.
    pub fn rollback(&self, version: Option<&str>) -> Result<String, String> {
        let mut history = self.history.lock().expect("history lock");
        let pos = match version {
            Some(v) => history
                .iter()
                .position(|m| m.version == v)
                .ok_or_else(|| format!("model {} has no version {v} to roll back to", self.name))?,
            None => {
                if history.is_empty() {
                    return Err(format!("model {} has no previous version", self.name));
                }
                0
            }
        };
        let target = history.remove(pos).expect("position is in range");
        self.note_loaded(&target);
        let previous = self.live.swap(target.clone());
        history.push_front(previous);
        history.truncate(HISTORY);
        Ok(target.version.clone())
    }

    /// Queues a request for the next batch of its lane and waits for its answer. A request
    /// that no batch could serve is refused here, alone ([`ServeError::Bad`]).
    pub async fn ask(&self, ask: Ask) -> Result<Answer, ServeError> {
        let heavy = {
            let live = self.live.load();
            if let Err(e) = check_alone(&ask, &live.model) {
                self.metrics
                    .count(&live.version, ask.op(), "bad_request", 1);
                return Err(e);
            }
            is_heavy(&ask, live.model.batch_limits())
        };
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job = Job {
            ask,
            queued: Instant::now(),
            reply,
        };
        let lane = if heavy { &self.heavy } else { &self.light };
        match lane.try_send(job) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(_)) => {
                return Err(ServeError::Overloaded(self.name.clone(), self.max_queue))
            }
            Err(mpsc::TrySendError::Disconnected(_)) => {
                return Err(ServeError::Closed(self.name.clone()))
            }
        }
        rx.await
            .unwrap_or_else(|_| Err(ServeError::Closed(self.name.clone())))
    }
}

/// The batcher of one lane: waits for a first job, gathers more until the batch is full or the
/// first job's delay is spent, then answers them against one version of the model.
fn batcher(
    rx: mpsc::Receiver<Job>,
    live: Arc<ArcSwap<ServedModel>>,
    policy: BatchPolicy,
    metrics: ModelMetrics,
) {
    while let Ok(first) = rx.recv() {
        let deadline = first.queued + policy.max_queue_delay;
        let mut batch = vec![first];
        while batch.len() < policy.max_batch {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match rx.recv_timeout(deadline - now) {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // Read the live version once: the whole batch is answered by it.
        let served = live.load_full();
        metrics.batch_size.observe(batch.len() as f64);
        let now = Instant::now();
        for job in &batch {
            metrics
                .queue
                .observe(now.duration_since(job.queued).as_secs_f64());
        }
        answer_batch(batch, &served, &metrics);
    }
}

/// A request of one operation waiting for its answer, with the channel that answer goes to.
struct Pending<T> {
    ask: T,
    reply: Reply,
}

struct RankAsk {
    query: OwnedQuery,
    candidates: Vec<u32>,
}

struct TopKAsk {
    query: OwnedQuery,
    k: usize,
}

struct PredictAsk {
    rows: Vec<(u32, u32, Vec<f32>)>,
}

/// Answers every job of a batch: a job the model refuses on its own is answered alone, the
/// rest are sorted by operation into groups that hold one type of request (so one dispatch
/// never mixes operations), and each group is cut into dispatches within the model's limits.
fn answer_batch(batch: Vec<Job>, served: &Arc<ServedModel>, metrics: &ModelMetrics) {
    let model = &served.model;
    let mut ranks = Vec::new();
    let mut topks = Vec::new();
    let mut predicts = Vec::new();
    for job in batch {
        let op = job.ask.op();
        // Checked at admission too, but the live version may have changed since.
        if let Err(e) = check_alone(&job.ask, model) {
            metrics.count(&served.version, op, "bad_request", 1);
            let _ = job.reply.send(Err(e));
            continue;
        }
        let reply = job.reply;
        match job.ask {
            Ask::Rank { query, candidates } => ranks.push(Pending {
                ask: RankAsk { query, candidates },
                reply,
            }),
            Ask::TopK { query, k } => topks.push(Pending {
                ask: TopKAsk { query, k },
                reply,
            }),
            Ask::Predict { rows } => predicts.push(Pending {
                ask: PredictAsk { rows },
                reply,
            }),
        }
    }
    let limits = model.batch_limits();
    for chunk in chunks(ranks, limits.max_queries, limits.max_candidates, |a| {
        a.candidates.len()
    }) {
        run(chunk, served, metrics, Op::Rank, dispatch_rank);
    }
    for chunk in chunks(topks, limits.max_queries, usize::MAX, |_| 0) {
        run(chunk, served, metrics, Op::TopK, dispatch_top_k);
    }
    for chunk in chunks(predicts, usize::MAX, limits.max_rows, |a| a.rows.len()) {
        run(chunk, served, metrics, Op::Predict, dispatch_predict);
    }
}

/// Cuts `jobs` into runs of at most `max_jobs` whose `cost` adds up to at most `max_cost`
/// (a single job is never over `max_cost`: [`check_alone`] refused it).
fn chunks<T>(
    jobs: Vec<Pending<T>>,
    max_jobs: usize,
    max_cost: usize,
    cost: impl Fn(&T) -> usize,
) -> Vec<Vec<Pending<T>>> {
    let mut out: Vec<Vec<Pending<T>>> = Vec::new();
    let mut current = Vec::new();
    let mut current_cost = 0usize;
    for job in jobs {
        let c = cost(&job.ask);
        if !current.is_empty() && (current.len() >= max_jobs || current_cost + c > max_cost) {
            out.push(std::mem::take(&mut current));
            current_cost = 0;
        }
        current_cost += c;
        current.push(job);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Refuses a request that no batch could serve, whatever else it is batched with: the wrong
/// operation for the model's kind, or over a per-request limit. Ids, dimensions and values
/// are checked when its batch is prepared, where a bad one is answered alone too.
fn check_alone(ask: &Ask, model: &Model) -> Result<(), ServeError> {
    let limits = model.batch_limits();
    let kind = model.kind();
    let wrong_kind = |op: &str, expected: ModelKind| {
        ServeError::Bad(format!(
            "{op} needs an {expected} model; this one is an {kind} model"
        ))
    };
    match ask {
        Ask::Rank { candidates, .. } => {
            if kind != ModelKind::Embedding {
                return Err(wrong_kind("rank", ModelKind::Embedding));
            }
            if candidates.len() > limits.max_candidates {
                return Err(ServeError::Bad(format!(
                    "rank has {} candidates; the limit is {} per request",
                    candidates.len(),
                    limits.max_candidates
                )));
            }
        }
        Ask::TopK { k, .. } => {
            if kind != ModelKind::Embedding {
                return Err(wrong_kind("topk", ModelKind::Embedding));
            }
            if *k == 0 {
                return Err(ServeError::Bad("k must be at least 1".into()));
            }
            let n_items = model.info().n_items;
            if (*k).min(n_items) > limits.max_k {
                return Err(ServeError::Bad(format!(
                    "k is {k}; the limit is {} per request (the catalog has {n_items} items)",
                    limits.max_k
                )));
            }
        }
        Ask::Predict { rows } => {
            if kind != ModelKind::Mlp {
                return Err(wrong_kind("predict", ModelKind::Mlp));
            }
            if rows.is_empty() {
                return Err(ServeError::Bad("predict needs at least one row".into()));
            }
            if rows.len() > limits.max_rows {
                return Err(ServeError::Bad(format!(
                    "predict has {} rows; the limit is {} per request",
                    rows.len(),
                    limits.max_rows
                )));
            }
        }
    }
    Ok(())
}

/// Whether a request alone takes more than an eighth of a dispatch's capacity: such requests
/// are batched in a lane of their own, so that they never hold up the small ones.
fn is_heavy(ask: &Ask, limits: &super::BatchLimits) -> bool {
    match ask {
        Ask::Rank { candidates, .. } => candidates.len() > limits.max_candidates / 8,
        Ask::Predict { rows } => rows.len() > limits.max_rows / 8,
        Ask::TopK { .. } => false,
    }
}

/// The dispatch of one operation: answers for `jobs`, one per job in job order.
type Dispatch<T> = fn(&[Pending<T>], &Model, bool) -> Result<Vec<Vec<Hit>>, ScoringError>;

/// Runs one dispatch of a single operation and answers each job with what was computed for
/// it. A request the model refuses is answered alone and the others run again without it; a
/// GPU failure is retried on the CPU path.
fn run<T>(
    mut jobs: Vec<Pending<T>>,
    served: &Arc<ServedModel>,
    metrics: &ModelMetrics,
    op: Op,
    dispatch: Dispatch<T>,
) {
    let version = served.version.as_str();
    loop {
        if jobs.is_empty() {
            return;
        }
        let started = Instant::now();
        let mut result = dispatch(&jobs, &served.model, false);
        if let Err(ScoringError::Gpu(e)) = &result {
            // A GPU failure (device lost, out of memory) must not fail requests: the CPU path
            // gives the same answers.
            tracing::error!(model = %metrics.name, version, error = %e, "GPU batch failed; answering on the CPU path");
            metrics.cpu_fallbacks.inc();
            result = dispatch(&jobs, &served.model, true);
        }
        metrics.compute.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(all) if all.len() == jobs.len() => {
                metrics.count(version, op, "ok", jobs.len() as u64);
                for (job, hits) in jobs.into_iter().zip(all) {
                    let _ = job.reply.send(Ok(Answer {
                        version: version.to_string(),
                        hits,
                    }));
                }
                return;
            }
            Ok(all) => {
                // Never hand out answers by position when the counts disagree.
                tracing::error!(model = %metrics.name, version, jobs = jobs.len(), answers = all.len(), "a dispatch answered a different number of requests; failing them");
                fail_all(
                    jobs,
                    metrics,
                    version,
                    op,
                    "the model answered the wrong number of requests".into(),
                    false,
                );
                return;
            }
            Err(e) => match e.request() {
                Some(i) if i < jobs.len() => {
                    metrics.count(version, op, "bad_request", 1);
                    let job = jobs.remove(i);
                    let _ = job.reply.send(Err(ServeError::Bad(e.to_string())));
                }
                _ => {
                    let bad = matches!(
                        e,
                        ScoringError::WrongKind { .. }
                            | ScoringError::ZeroK
                            | ScoringError::BatchTooLarge { .. }
                    );
                    tracing::warn!(model = %metrics.name, version, error = %e, "scoring batch failed");
                    fail_all(jobs, metrics, version, op, e.to_string(), bad);
                    return;
                }
            },
        }
    }
}

fn fail_all<T>(
    jobs: Vec<Pending<T>>,
    metrics: &ModelMetrics,
    version: &str,
    op: Op,
    msg: String,
    bad: bool,
) {
    metrics.count(
        version,
        op,
        if bad { "bad_request" } else { "failed" },
        jobs.len() as u64,
    );
    for job in jobs {
        let _ = job.reply.send(Err(if bad {
            ServeError::Bad(msg.clone())
        } else {
            ServeError::Failed(msg.clone())
        }));
    }
}

fn dispatch_rank(
    jobs: &[Pending<RankAsk>],
    model: &Model,
    cpu: bool,
) -> Result<Vec<Vec<Hit>>, ScoringError> {
    let requests: Vec<RankRequest<'_>> = jobs
        .iter()
        .map(|j| RankRequest {
            query: j.ask.query.as_query(),
            candidates: &j.ask.candidates,
        })
        .collect();
    let scores = if cpu {
        model.rank_cpu(&requests)?
    } else {
        model.rank(&requests)?
    };
    Ok(requests
        .iter()
        .zip(scores)
        .map(|(r, s)| {
            let mut hits: Vec<Hit> = r
                .candidates
                .iter()
                .zip(s)
                .map(|(&item, score)| Hit { item, score })
                .collect();
            hits.sort_by(super::hit_order);
            hits
        })
        .collect())
}

fn dispatch_top_k(
    jobs: &[Pending<TopKAsk>],
    model: &Model,
    cpu: bool,
) -> Result<Vec<Vec<Hit>>, ScoringError> {
    let queries: Vec<Query<'_>> = jobs.iter().map(|j| j.ask.query.as_query()).collect();
    // One dispatch for the largest k; each answer is cut to its own k.
    let k = jobs.iter().map(|j| j.ask.k).max().unwrap_or(1);
    let mut all = if cpu {
        model.top_k_cpu(&queries, k)?
    } else {
        model.top_k(&queries, k)?
    };
    for (hits, job) in all.iter_mut().zip(jobs) {
        hits.truncate(job.ask.k);
    }
    Ok(all)
}

fn dispatch_predict(
    jobs: &[Pending<PredictAsk>],
    model: &Model,
    cpu: bool,
) -> Result<Vec<Vec<Hit>>, ScoringError> {
    // Every job's rows go into one dispatch; the request index an error names is the job's,
    // so rows are mapped back to jobs.
    let mut rows = Vec::new();
    let mut owner = Vec::new();
    for (i, j) in jobs.iter().enumerate() {
        for (user, item, dense) in &j.ask.rows {
            rows.push(CtrRow {
                user: *user,
                item: *item,
                dense,
            });
            owner.push(i);
        }
    }
    let probs = match if cpu {
        model.predict_cpu(&rows)
    } else {
        model.predict(&rows)
    } {
        Ok(p) => p,
        Err(e) => return Err(remap_request(e, &owner)),
    };
    if probs.len() != rows.len() {
        return Ok(Vec::new());
    }
    let mut out: Vec<Vec<Hit>> = vec![Vec::new(); jobs.len()];
    for ((row, p), i) in rows.iter().zip(probs).zip(owner) {
        out[i].push(Hit {
            item: row.item,
            score: p,
        });
    }
    Ok(out)
}

/// Points an error about row `r` of a merged predict batch at the job that sent that row.
fn remap_request(e: ScoringError, owner: &[usize]) -> ScoringError {
    e.map_request(|r| owner.get(r).copied().unwrap_or(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(cost: usize) -> Pending<usize> {
        let (reply, _) = tokio::sync::oneshot::channel();
        Pending { ask: cost, reply }
    }

    fn costs(chunks: &[Vec<Pending<usize>>]) -> Vec<Vec<usize>> {
        chunks
            .iter()
            .map(|c| c.iter().map(|p| p.ask).collect())
            .collect()
    }

    #[test]
    fn chunks_keep_order_and_stay_within_both_limits() {
        let jobs: Vec<_> = [3, 3, 3, 1, 8, 2, 2, 2, 2]
            .into_iter()
            .map(pending)
            .collect();
        let out = chunks(jobs, 3, 8, |c| *c);
        assert_eq!(
            costs(&out),
            vec![vec![3, 3], vec![3, 1], vec![8], vec![2, 2, 2], vec![2]]
        );
        // A single job at the limit still gets a dispatch of its own.
        let out = chunks(vec![pending(8), pending(8)], 10, 8, |c| *c);
        assert_eq!(costs(&out), vec![vec![8], vec![8]]);
        assert!(chunks(Vec::<Pending<usize>>::new(), 3, 8, |c| *c).is_empty());
    }

    /// Found by the `scoring` fuzz target: `InputTooLarge` (dense features whose activations
    /// could overflow) named the row of the merged predict batch, not the job, because the
    /// remapping listed the variants by hand and missed it. A request whose third row was
    /// too large got a 500 ("model failed"); beside other requests, the row index could
    /// name an innocent job, which was refused in the culprit's place.
    #[test]
    fn a_refused_row_is_blamed_on_the_request_that_sent_it() {
        let model = Model::from_bytes(
            &super::super::sample_model(&super::super::SampleSpec::mlp(4, 4, 1)),
            &super::super::ScoringConfig::default(),
            &super::super::ComputeDevice::Cpu,
        )
        .unwrap();
        let n_dense = model.info().n_dense;
        let job = |rows: Vec<Vec<f32>>| {
            let (reply, _) = tokio::sync::oneshot::channel();
            Pending {
                ask: PredictAsk {
                    rows: rows.into_iter().map(|d| (0, 0, d)).collect(),
                },
                reply,
            }
        };
        let good = vec![0.5; n_dense];
        let huge = vec![3e38; n_dense];
        let jobs = vec![
            job(vec![good.clone()]),
            job(vec![good.clone()]),
            job(vec![good.clone(), good.clone(), huge]),
        ];
        // The huge row is row 4 of the merged batch and belongs to job 2.
        let err = dispatch_predict(&jobs, &model, true).unwrap_err();
        assert!(matches!(err, ScoringError::InputTooLarge { .. }), "{err}");
        assert_eq!(err.request(), Some(2));

        // End to end: the request alone gets a 4xx answer, not "model failed".
        let registry = prometheus::Registry::new();
        let families = ModelFamilies::new(&registry).unwrap();
        let served = ServedModel {
            model,
            version: "v".into(),
        };
        let slot = ModelSlot::start("ctr", served, BatchPolicy::default(), &families);
        let answer = pollster::block_on(slot.ask(Ask::Predict {
            rows: vec![
                (0, 0, good.clone()),
                (1, 1, good.clone()),
                (2, 2, vec![3e38; n_dense]),
            ],
        }));
        assert!(matches!(answer, Err(ServeError::Bad(_))), "{answer:?}");
        let answer = pollster::block_on(slot.ask(Ask::Predict {
            rows: vec![(0, 0, good)],
        }));
        assert!(answer.is_ok(), "{answer:?}");
    }

    #[test]
    fn large_requests_take_the_heavy_lane() {
        let limits = super::super::BatchLimits::default();
        let rank = |n: u32| Ask::Rank {
            query: OwnedQuery::User(0),
            candidates: (0..n).collect(),
        };
        assert!(!is_heavy(&rank(8), &limits));
        assert!(!is_heavy(
            &rank((limits.max_candidates / 8) as u32),
            &limits
        ));
        assert!(is_heavy(&rank(limits.max_candidates as u32), &limits));
        let predict = |n: usize| Ask::Predict {
            rows: vec![(0, 0, vec![]); n],
        };
        assert!(!is_heavy(&predict(1), &limits));
        assert!(is_heavy(&predict(limits.max_rows), &limits));
        let topk = Ask::TopK {
            query: OwnedQuery::User(0),
            k: 10_000,
        };
        assert!(!is_heavy(&topk, &limits));
    }
}
