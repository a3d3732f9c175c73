//! Serving models: one slot per configured model, holding the live version behind `ArcSwap`
//! and the last few for rollback, and a dynamic batcher that coalesces concurrent requests
//! into one dispatch (like Triton's: a batch closes when it is full or when its first request
//! has waited the maximum queue delay).
//!
//! A batch reads the live version once, so every response of a batch comes from one version
//! and names it; a swap never touches a batch in flight, and the old version's buffers go when
//! its last batch does.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

use super::{
    ComputeDevice, CtrRow, Hit, Model, ModelError, Query, RankRequest, ScoringConfig, ScoringError,
};

/// Versions kept for rollback besides the live one.
pub const HISTORY: usize = 3;

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
}

struct Job {
    ask: Ask,
    queued: Instant,
    reply: tokio::sync::oneshot::Sender<Result<Answer, ServeError>>,
}

/// Series of one model slot.
#[derive(Clone)]
pub struct ModelMetrics {
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

/// One configured model: its live version, its history, and its batcher.
pub struct ModelSlot {
    /// Configured name.
    pub name: String,
    live: Arc<ArcSwap<ServedModel>>,
    history: Mutex<VecDeque<Arc<ServedModel>>>,
    jobs: mpsc::SyncSender<Job>,
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
    let hash = crate::plugin::content_version(bytes);
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
    /// Starts serving `first` under `name` with its batcher thread.
    pub fn start(
        name: &str,
        first: ServedModel,
        policy: BatchPolicy,
        families: &ModelFamilies,
    ) -> Arc<ModelSlot> {
        let metrics = families.for_model(name);
        let live = Arc::new(ArcSwap::from_pointee(first));
        let (tx, rx) = mpsc::sync_channel(policy.max_queue);
        let slot = Arc::new(ModelSlot {
            name: name.to_string(),
            live: live.clone(),
            history: Mutex::new(VecDeque::new()),
            jobs: tx,
            metrics: metrics.clone(),
        });
        slot.note_loaded(&live.load());
        std::thread::Builder::new()
            .name(format!("batcher-{name}"))
            .spawn(move || batcher(rx, live, policy, metrics))
            .expect("spawning a batcher thread");
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
        self.metrics.loaded.reset();
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

    /// Queues a request for the next batch and waits for its answer.
    pub async fn ask(&self, ask: Ask) -> Result<Answer, ServeError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job = Job {
            ask,
            queued: Instant::now(),
            reply,
        };
        if self.jobs.try_send(job).is_err() {
            return Err(ServeError::Closed(self.name.clone()));
        }
        rx.await
            .unwrap_or_else(|_| Err(ServeError::Closed(self.name.clone())))
    }
}

/// The batcher: waits for a first job, gathers more until the batch is full or the first
/// job's delay is spent, then runs ranks and top-k lookups as one dispatch each.
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
        let model = live.load_full();
        metrics.batch_size.observe(batch.len() as f64);
        let now = Instant::now();
        for job in &batch {
            metrics
                .queue
                .observe(now.duration_since(job.queued).as_secs_f64());
        }
        let (ranks, topks): (Vec<Job>, Vec<Job>) = batch
            .into_iter()
            .partition(|j| matches!(j.ask, Ask::Rank { .. }));
        if !ranks.is_empty() {
            run(ranks, &model, &metrics, "rank");
        }
        if !topks.is_empty() {
            run(topks, &model, &metrics, "topk");
        }
    }
}

/// The index of the request an error names, if it names one.
fn offending(e: &ScoringError) -> Option<usize> {
    match e {
        ScoringError::UnknownItem { request, .. }
        | ScoringError::UnknownUser { request, .. }
        | ScoringError::QueryDim { request, .. }
        | ScoringError::NotFinite { request, .. }
        | ScoringError::QueryTooLarge { request, .. }
        | ScoringError::InputTooLarge { request, .. }
        | ScoringError::DenseLen { request, .. } => Some(*request),
        _ => None,
    }
}

fn run(mut jobs: Vec<Job>, served: &Arc<ServedModel>, metrics: &ModelMetrics, op: &str) {
    let count = |outcome: &str, n: u64| {
        metrics
            .requests
            .with_label_values(&[metrics.name.as_str(), served.version.as_str(), op, outcome])
            .inc_by(n);
    };
    // A bad request must not sink the others: answer it alone and run the rest again.
    loop {
        if jobs.is_empty() {
            return;
        }
        let started = Instant::now();
        let mut result = dispatch(&jobs, &served.model, false);
        if let Err(ScoringError::Gpu(e)) = &result {
            // A GPU failure (device lost, out of memory) must not fail requests: the CPU path
            // gives the same answers.
            tracing::error!(model = %metrics.name, version = %served.version, error = %e, "GPU batch failed; answering on the CPU path");
            metrics.cpu_fallbacks.inc();
            result = dispatch(&jobs, &served.model, true);
        }
        metrics.compute.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(all) => {
                count("ok", jobs.len() as u64);
                for (job, hits) in jobs.into_iter().zip(all) {
                    let _ = job.reply.send(Ok(Answer {
                        version: served.version.clone(),
                        hits,
                    }));
                }
                return;
            }
            Err(e) => match offending(&e) {
                Some(i) if i < jobs.len() => {
                    count("bad_request", 1);
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
                    count(
                        if bad { "bad_request" } else { "failed" },
                        jobs.len() as u64,
                    );
                    tracing::warn!(model = %metrics.name, version = %served.version, error = %e, "scoring batch failed");
                    for job in jobs {
                        let msg = e.to_string();
                        let _ = job.reply.send(Err(if bad {
                            ServeError::Bad(msg)
                        } else {
                            ServeError::Failed(msg)
                        }));
                    }
                    return;
                }
            },
        }
    }
}

fn dispatch(jobs: &[Job], model: &Model, cpu: bool) -> Result<Vec<Vec<Hit>>, ScoringError> {
    match &jobs[0].ask {
        Ask::Rank { .. } => {
            let requests: Vec<RankRequest<'_>> = jobs
                .iter()
                .map(|j| match &j.ask {
                    Ask::Rank { query, candidates } => RankRequest {
                        query: query.as_query(),
                        candidates,
                    },
                    _ => unreachable!("jobs are partitioned by kind"),
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
        Ask::TopK { .. } => {
            let mut queries = Vec::with_capacity(jobs.len());
            let mut ks = Vec::with_capacity(jobs.len());
            for j in jobs {
                if let Ask::TopK { query, k } = &j.ask {
                    queries.push(query.as_query());
                    ks.push(*k);
                }
            }
            // One dispatch for the largest k; each answer is cut to its own k.
            let k = ks.iter().copied().max().unwrap_or(1);
            let mut all = if cpu {
                model.top_k_cpu(&queries, k)?
            } else {
                model.top_k(&queries, k)?
            };
            for (hits, k) in all.iter_mut().zip(ks) {
                hits.truncate(k);
            }
            Ok(all)
        }
        Ask::Predict { .. } => {
            // Every job's rows go into one dispatch; the request index an error names is the
            // job's, so rows are mapped back to jobs.
            let mut rows = Vec::new();
            let mut owner = Vec::new();
            for (i, j) in jobs.iter().enumerate() {
                if let Ask::Predict { rows: r } = &j.ask {
                    for (user, item, dense) in r {
                        rows.push(CtrRow {
                            user: *user,
                            item: *item,
                            dense,
                        });
                        owner.push(i);
                    }
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
            let mut out: Vec<Vec<Hit>> = vec![Vec::new(); jobs.len()];
            for ((row, p), i) in rows.iter().zip(probs).zip(owner) {
                out[i].push(Hit {
                    item: row.item,
                    score: p,
                });
            }
            Ok(out)
        }
    }
}

/// Points an error about row `r` of a merged predict batch at the job that sent that row.
fn remap_request(e: ScoringError, owner: &[usize]) -> ScoringError {
    let fix = |r: usize| owner.get(r).copied().unwrap_or(r);
    match e {
        ScoringError::UnknownItem {
            request,
            item,
            n_items,
        } => ScoringError::UnknownItem {
            request: fix(request),
            item,
            n_items,
        },
        ScoringError::UnknownUser {
            request,
            user,
            n_users,
        } => ScoringError::UnknownUser {
            request: fix(request),
            user,
            n_users,
        },
        ScoringError::NotFinite { request, what } => ScoringError::NotFinite {
            request: fix(request),
            what,
        },
        ScoringError::DenseLen {
            request,
            found,
            expected,
        } => ScoringError::DenseLen {
            request: fix(request),
            found,
            expected,
        },
        other => other,
    }
}

/// The served models as the plugins' `ranking` import sees them.
pub struct ModelsRanker(pub std::collections::HashMap<String, Arc<ModelSlot>>);

impl crate::plugin::host::Ranker for ModelsRanker {
    fn rank<'a>(
        &'a self,
        model: &'a str,
        user: u32,
        candidates: Vec<u32>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(String, Vec<f32>), String>> + Send + 'a>,
    > {
        Box::pin(async move {
            let slot = self
                .0
                .get(model)
                .ok_or_else(|| format!("no model named {model:?}"))?;
            let order = candidates.clone();
            let answer = slot
                .ask(Ask::Rank {
                    query: OwnedQuery::User(user),
                    candidates,
                })
                .await
                .map_err(|e| e.to_string())?;
            // The answer is best first; give the scores back in the caller's order.
            let by_item: std::collections::HashMap<u32, f32> =
                answer.hits.iter().map(|h| (h.item, h.score)).collect();
            Ok((answer.version, order.iter().map(|i| by_item[i]).collect()))
        })
    }
}
