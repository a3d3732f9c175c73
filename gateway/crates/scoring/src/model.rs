//! A loaded model: immutable weights (host copy) plus, on a GPU device, its uploaded buffers and
//! pipelines. Scoring validates the whole batch on the host first (ids, dimensions, finiteness,
//! batch limits), then runs it on the GPU or the CPU path.

use std::path::Path;

use super::config::{BatchLimits, ModelLimits, ScoringConfig, TableStorage};
use super::cpu;
use super::device::ComputeDevice;
use super::error::{GpuError, ModelError, ScoringError};
use super::format::{self, ModelInfo, ModelKind, Similarity, Weights};
use super::gpu::{Capacity, EmbeddingGpu, MlpGpu, Stored};

/// Largest `k` of a retrieval: the GPU reduction halves the candidate lists at least once per
/// pass only while `k` <= half a 1024-entry window.
pub const MAX_TOP_K: usize = 512;

/// One retrieved or ranked item.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub item: u32,
    pub score: f32,
}

/// The query side of an embedding-model request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Query<'a> {
    /// A query vector of the model's `dim`.
    Vector(&'a [f32]),
    /// Row of the model's `users` table.
    User(u32),
}

/// Score `candidates` (item ids) against `query`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RankRequest<'a> {
    pub query: Query<'a>,
    pub candidates: &'a [u32],
}

/// One row of a click-through batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CtrRow<'a> {
    pub user: u32,
    pub item: u32,
    /// `n_dense` values.
    pub dense: &'a [f32],
}

/// Which path a model's batches run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecutionPath {
    /// A GPU adapter; `software` for lavapipe; `f16_tables` when the embedding tables are
    /// held as f16 in device memory.
    Gpu {
        adapter: String,
        software: bool,
        f16_tables: bool,
    },
    Cpu,
    /// The CPU path on a GPU device, because the model's tables do not fit it (larger than
    /// one storage binding, or out of device memory); `reason` says which.
    CpuFallback {
        adapter: String,
        reason: String,
    },
}

enum GpuPart {
    None,
    Embedding(EmbeddingGpu),
    Mlp(MlpGpu),
}

/// A loaded, validated model. Immutable once loaded (the GPU scratch buffers are guarded
/// internally), `Send + Sync`: put it in an `Arc` behind an `ArcSwap` and swap in a new one to
/// update. Dropping the last reference frees its GPU buffers.
///
/// The host copy of the weights is kept on GPU devices too: it serves user-id lookups, the
/// `*_cpu` twins (the fallback if a GPU batch fails, e.g. on device loss) and costs host
/// memory equal to the file's tensors.
pub struct Model {
    info: ModelInfo,
    weights: Weights,
    gpu: GpuPart,
    path: ExecutionPath,
    batch: BatchLimits,
    storage: TableStorage,
    /// Embedding models: the longest item row (L2), which bounds every score of a query by
    /// |query| x this (Cauchy-Schwarz), partial sums included.
    max_item_norm: f64,
    /// MLP models: (Frobenius norm of W, L2 norm of b) per layer. |W x + b| <= |W|_F |x| + |b|
    /// and ReLU shrinks lengths, so these bound every activation from the input's length.
    layer_norms: Vec<(f64, f64)>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("info", &self.info)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Reads, validates and (on a GPU device) uploads a model file. The file size is checked
    /// against `config.limits` before reading.
    pub fn load(
        path: &Path,
        config: &ScoringConfig,
        device: &ComputeDevice,
    ) -> Result<Model, ModelError> {
        let io = |source| ModelError::Io {
            path: path.display().to_string(),
            source,
        };
        let size = std::fs::metadata(path).map_err(io)?.len();
        if size > config.limits.max_file_bytes {
            return Err(ModelError::FileTooLarge {
                size,
                limit: config.limits.max_file_bytes,
            });
        }
        let bytes = std::fs::read(path).map_err(io)?;
        Model::from_bytes(&bytes, config, device)
    }

    /// [`Model::load`] from bytes in memory.
    pub fn from_bytes(
        bytes: &[u8],
        config: &ScoringConfig,
        device: &ComputeDevice,
    ) -> Result<Model, ModelError> {
        let batch = checked_batch(&config.batch)?;
        let (info, mut weights) = format::parse(bytes, &config.limits)?;
        if config.storage == TableStorage::F16 {
            round_tables_to_f16(&mut weights)?;
        }
        let max_item_norm = match &weights {
            Weights::Embedding { items, .. } if info.dim > 0 => {
                items.chunks_exact(info.dim).map(norm).fold(0.0, f64::max)
            }
            _ => 0.0,
        };
        let layer_norms = match &weights {
            Weights::Mlp { layers, .. } => {
                layers.iter().map(|l| (norm(&l.w), norm(&l.b))).collect()
            }
            Weights::Embedding { .. } => Vec::new(),
        };
        let stored = match device {
            ComputeDevice::Gpu(dev) if config.storage == TableStorage::F16 => {
                if dev.has_f16() {
                    Stored::F16
                } else {
                    tracing::warn!(
                        target: "scoring",
                        adapter = %dev.describe(),
                        "f16 table storage asked for but the adapter lacks SHADER_F16: \
                         the f16-rounded tables are held as f32"
                    );
                    Stored::F32
                }
            }
            _ => Stored::F32,
        };
        let built = match device {
            ComputeDevice::Cpu => Ok(GpuPart::None),
            ComputeDevice::Gpu(dev) => {
                let cap = Capacity {
                    max_queries: batch.max_queries,
                    max_candidates: batch.max_candidates,
                    max_k: batch.max_k,
                    max_rows: batch.max_rows,
                    scan_groups: batch.scan_groups,
                };
                match &weights {
                    Weights::Embedding { items, .. } => {
                        EmbeddingGpu::new(dev, items, info.dim, cap, stored).map(GpuPart::Embedding)
                    }
                    Weights::Mlp {
                        users,
                        items,
                        layers,
                    } => MlpGpu::new(
                        dev,
                        users,
                        items,
                        layers,
                        info.user_dim,
                        info.item_dim,
                        info.n_dense,
                        cap.max_rows,
                        stored,
                    )
                    .map(GpuPart::Mlp),
                }
            }
        };
        // The CPU path gives the same answers: a catalog the device cannot hold is served
        // there (and said so) rather than refused. Other GPU errors are configuration
        // problems (batch limits beyond the device) or defects, and refuse the model.
        let (gpu, path) = match (built, device) {
            (Ok(g), ComputeDevice::Gpu(d)) => (
                g,
                ExecutionPath::Gpu {
                    adapter: d.describe(),
                    software: d.is_software(),
                    f16_tables: stored == Stored::F16,
                },
            ),
            (Ok(g), ComputeDevice::Cpu) => (g, ExecutionPath::Cpu),
            (Err(e @ (GpuError::TableTooLarge { .. } | GpuError::Allocation(_))), device) => {
                let adapter = device.describe();
                tracing::warn!(
                    target: "scoring",
                    %adapter,
                    error = %e,
                    "the model does not fit the GPU; it is served on the CPU path"
                );
                (
                    GpuPart::None,
                    ExecutionPath::CpuFallback {
                        adapter,
                        reason: e.to_string(),
                    },
                )
            }
            (Err(e), _) => return Err(e.into()),
        };
        Ok(Model {
            info,
            weights,
            gpu,
            path,
            batch,
            storage: config.storage,
            max_item_norm,
            layer_norms,
        })
    }

    /// The table storage the model was loaded with ([`TableStorage::F16`]: its tables hold
    /// f16-rounded values on every path).
    pub fn table_storage(&self) -> TableStorage {
        self.storage
    }

    /// Bytes of parameters held where the model runs: 4 per value, 2 per table value when
    /// the tables are f16 in device memory.
    pub fn held_bytes(&self) -> u64 {
        let all = self.info.parameters * 4;
        match self.path {
            ExecutionPath::Gpu {
                f16_tables: true, ..
            } => all - 2 * self.weights.table_len() as u64,
            _ => all,
        }
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn kind(&self) -> ModelKind {
        self.info.kind
    }

    /// Where [`rank`](Model::rank), [`top_k`](Model::top_k) and [`predict`](Model::predict) run.
    pub fn execution_path(&self) -> &ExecutionPath {
        &self.path
    }

    pub fn batch_limits(&self) -> &BatchLimits {
        &self.batch
    }

    /// Embedding models: the score of every candidate of every request, in request and
    /// candidate order. One dispatch and one readback for the whole batch.
    pub fn rank(&self, batch: &[RankRequest<'_>]) -> Result<Vec<Vec<f32>>, ScoringError> {
        let (queries, pairs, counts) = self.prepare_rank(batch)?;
        let flat = match &self.gpu {
            GpuPart::Embedding(g) if !pairs.is_empty() => g.gather_score(&queries, &pairs)?,
            _ => self.rank_flat_cpu(&queries, &pairs),
        };
        Ok(split(flat, &counts))
    }

    /// [`rank`](Model::rank) on the CPU path, whatever the device.
    pub fn rank_cpu(&self, batch: &[RankRequest<'_>]) -> Result<Vec<Vec<f32>>, ScoringError> {
        let (queries, pairs, counts) = self.prepare_rank(batch)?;
        Ok(split(self.rank_flat_cpu(&queries, &pairs), &counts))
    }

    /// Embedding models: the best `k` items of the whole catalog for each query, best first
    /// (ties: lower item id first). `k` larger than the catalog returns the whole catalog.
    /// On a GPU the selection runs there too; only `k` entries per query are read back.
    pub fn top_k(&self, queries: &[Query<'_>], k: usize) -> Result<Vec<Vec<Hit>>, ScoringError> {
        let (q, k) = self.prepare_top_k(queries, k)?;
        match &self.gpu {
            GpuPart::Embedding(g) if !queries.is_empty() => Ok(g.top_k(&q, k)?),
            _ => Ok(self.top_k_flat_cpu(&q, k)),
        }
    }

    /// [`top_k`](Model::top_k) on the CPU path.
    pub fn top_k_cpu(
        &self,
        queries: &[Query<'_>],
        k: usize,
    ) -> Result<Vec<Vec<Hit>>, ScoringError> {
        let (q, k) = self.prepare_top_k(queries, k)?;
        Ok(self.top_k_flat_cpu(&q, k))
    }

    /// [`top_k_cpu`](Model::top_k_cpu) without the batch limit on `k` (offline evaluation
    /// may look deeper than serving does); the limit on queries per call still holds.
    pub(crate) fn top_k_cpu_any_k(
        &self,
        queries: &[Query<'_>],
        k: usize,
    ) -> Result<Vec<Vec<Hit>>, ScoringError> {
        self.embedding("top_k")?;
        if k == 0 {
            return Err(ScoringError::ZeroK);
        }
        let q = self.query_matrix("top_k", queries)?;
        Ok(self.top_k_flat_cpu(&q, k.min(self.info.n_items)))
    }

    /// MLP models: the click probability of each row, in row order.
    pub fn predict(&self, rows: &[CtrRow<'_>]) -> Result<Vec<f32>, ScoringError> {
        let (ids, dense) = self.prepare_mlp(rows)?;
        match &self.gpu {
            GpuPart::Mlp(g) if !ids.is_empty() => Ok(g.forward(&ids, &dense)?),
            _ => Ok(self.predict_flat_cpu(&ids, &dense)),
        }
    }

    /// [`predict`](Model::predict) on the CPU path.
    pub fn predict_cpu(&self, rows: &[CtrRow<'_>]) -> Result<Vec<f32>, ScoringError> {
        let (ids, dense) = self.prepare_mlp(rows)?;
        Ok(self.predict_flat_cpu(&ids, &dense))
    }

    fn embedding(&self, op: &'static str) -> Result<(&[f32], Option<&[f32]>), ScoringError> {
        match &self.weights {
            Weights::Embedding { items, users } => Ok((items, users.as_deref())),
            Weights::Mlp { .. } => Err(ScoringError::WrongKind {
                op,
                expected: "embedding",
                found: "mlp",
            }),
        }
    }

    /// Query vectors as one `[n, dim]` matrix, unit length for cosine models.
    fn query_matrix(
        &self,
        op: &'static str,
        queries: &[Query<'_>],
    ) -> Result<Vec<f32>, ScoringError> {
        let (_, users) = self.embedding(op)?;
        let dim = self.info.dim;
        if queries.len() > self.batch.max_queries {
            return Err(ScoringError::BatchTooLarge {
                what: "queries",
                found: queries.len(),
                limit: self.batch.max_queries,
            });
        }
        let mut out = Vec::with_capacity(queries.len() * dim);
        for (request, q) in queries.iter().enumerate() {
            let start = out.len();
            match *q {
                Query::Vector(v) => {
                    if v.len() != dim {
                        return Err(ScoringError::QueryDim {
                            request,
                            expected: dim,
                            found: v.len(),
                        });
                    }
                    if v.iter().any(|x| !x.is_finite()) {
                        return Err(ScoringError::NotFinite {
                            request,
                            what: "query vector",
                        });
                    }
                    out.extend_from_slice(v);
                }
                Query::User(u) => {
                    let n_users = self.info.n_users;
                    match users {
                        Some(users) if (u as usize) < n_users => {
                            out.extend_from_slice(&users[u as usize * dim..(u as usize + 1) * dim])
                        }
                        _ => {
                            return Err(ScoringError::UnknownUser {
                                request,
                                user: u,
                                n_users,
                            })
                        }
                    }
                }
            }
            if self.info.similarity == Some(Similarity::Cosine) {
                format::normalize(&mut out[start..]);
            }
            // Keep every score and partial sum finite: a NaN or infinite score has no place
            // in a ranking.
            let q_norm = norm(&out[start..]);
            if q_norm * self.max_item_norm > SCORE_LIMIT {
                return Err(ScoringError::QueryTooLarge {
                    request,
                    norm: q_norm,
                    max_item_norm: self.max_item_norm,
                });
            }
        }
        Ok(out)
    }

    #[allow(clippy::type_complexity)]
    fn prepare_rank(
        &self,
        batch: &[RankRequest<'_>],
    ) -> Result<(Vec<f32>, Vec<[u32; 2]>, Vec<usize>), ScoringError> {
        self.embedding("rank")?;
        let queries: Vec<Query<'_>> = batch.iter().map(|r| r.query).collect();
        let matrix = self.query_matrix("rank", &queries)?;
        let total: usize = batch.iter().map(|r| r.candidates.len()).sum();
        if total > self.batch.max_candidates {
            return Err(ScoringError::BatchTooLarge {
                what: "candidates",
                found: total,
                limit: self.batch.max_candidates,
            });
        }
        let n_items = self.info.n_items;
        let mut pairs = Vec::with_capacity(total);
        for (request, r) in batch.iter().enumerate() {
            for &item in r.candidates {
                if item as usize >= n_items {
                    return Err(ScoringError::UnknownItem {
                        request,
                        item,
                        n_items,
                    });
                }
                pairs.push([request as u32, item]);
            }
        }
        Ok((
            matrix,
            pairs,
            batch.iter().map(|r| r.candidates.len()).collect(),
        ))
    }

    fn rank_flat_cpu(&self, queries: &[f32], pairs: &[[u32; 2]]) -> Vec<f32> {
        match &self.weights {
            Weights::Embedding { items, .. } => {
                cpu::gather_score(items, queries, self.info.dim, pairs)
            }
            Weights::Mlp { .. } => unreachable!("checked by prepare_rank"),
        }
    }

    fn prepare_top_k(
        &self,
        queries: &[Query<'_>],
        k: usize,
    ) -> Result<(Vec<f32>, usize), ScoringError> {
        self.embedding("top_k")?;
        if k == 0 {
            return Err(ScoringError::ZeroK);
        }
        let k = k.min(self.info.n_items);
        if k > self.batch.max_k {
            return Err(ScoringError::BatchTooLarge {
                what: "k",
                found: k,
                limit: self.batch.max_k,
            });
        }
        Ok((self.query_matrix("top_k", queries)?, k))
    }

    fn top_k_flat_cpu(&self, queries: &[f32], k: usize) -> Vec<Vec<Hit>> {
        match &self.weights {
            Weights::Embedding { items, .. } => cpu::top_k(items, queries, self.info.dim, k),
            Weights::Mlp { .. } => unreachable!("checked by prepare_top_k"),
        }
    }

    fn prepare_mlp(&self, rows: &[CtrRow<'_>]) -> Result<(Vec<[u32; 2]>, Vec<f32>), ScoringError> {
        if self.info.kind != ModelKind::Mlp {
            return Err(ScoringError::WrongKind {
                op: "predict",
                expected: "mlp",
                found: "embedding",
            });
        }
        if rows.len() > self.batch.max_rows {
            return Err(ScoringError::BatchTooLarge {
                what: "rows",
                found: rows.len(),
                limit: self.batch.max_rows,
            });
        }
        let (n_users, n_items, n_dense) = (self.info.n_users, self.info.n_items, self.info.n_dense);
        let mut ids = Vec::with_capacity(rows.len());
        let mut dense = Vec::with_capacity(rows.len() * n_dense);
        for (request, r) in rows.iter().enumerate() {
            if r.user as usize >= n_users {
                return Err(ScoringError::UnknownUser {
                    request,
                    user: r.user,
                    n_users,
                });
            }
            if r.item as usize >= n_items {
                return Err(ScoringError::UnknownItem {
                    request,
                    item: r.item,
                    n_items,
                });
            }
            if r.dense.len() != n_dense {
                return Err(ScoringError::DenseLen {
                    request,
                    expected: n_dense,
                    found: r.dense.len(),
                });
            }
            if r.dense.iter().any(|x| !x.is_finite()) {
                return Err(ScoringError::NotFinite {
                    request,
                    what: "dense features",
                });
            }
            self.check_mlp_range(request, r)?;
            ids.push([r.user, r.item]);
            dense.extend_from_slice(r.dense);
        }
        Ok((ids, dense))
    }

    /// Refuses a row whose activations could overflow f32 (a NaN probability otherwise).
    fn check_mlp_range(&self, request: usize, r: &CtrRow<'_>) -> Result<(), ScoringError> {
        let Weights::Mlp { users, items, .. } = &self.weights else {
            return Ok(());
        };
        let (ud, id) = (self.info.user_dim, self.info.item_dim);
        let (u, i) = (r.user as usize, r.item as usize);
        let x = (norm(&users[u * ud..(u + 1) * ud]).powi(2)
            + norm(&items[i * id..(i + 1) * id]).powi(2)
            + norm(r.dense).powi(2))
        .sqrt();
        let bound = self.layer_norms.iter().fold(x, |len, &(w, b)| w * len + b);
        if bound > SCORE_LIMIT {
            return Err(ScoringError::InputTooLarge { request, bound });
        }
        Ok(())
    }

    fn predict_flat_cpu(&self, ids: &[[u32; 2]], dense: &[f32]) -> Vec<f32> {
        match &self.weights {
            Weights::Mlp {
                users,
                items,
                layers,
            } => cpu::mlp_forward(
                users,
                items,
                layers,
                &cpu::MlpShape {
                    user_dim: self.info.user_dim,
                    item_dim: self.info.item_dim,
                    n_dense: self.info.n_dense,
                },
                ids,
                dense,
            ),
            Weights::Embedding { .. } => unreachable!("checked by prepare_mlp"),
        }
    }
}

/// Largest |score| a query may reach: well inside f32 (3.4e38), so sums stay finite.
const SCORE_LIMIT: f64 = 1e37;

/// L2 length, in f64 so that it does not overflow.
fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

/// Rounds every value of the tables that f16 storage applies to (the ones uploaded to the
/// device: embedding `items`, MLP `users` and `items`) to the nearest f16.
fn round_tables_to_f16(weights: &mut Weights) -> Result<(), ModelError> {
    let tables: Vec<(&str, &mut Vec<f32>)> = match weights {
        Weights::Embedding { items, .. } => vec![("items", items)],
        Weights::Mlp { users, items, .. } => vec![("users", users), ("items", items)],
    };
    for (name, values) in tables {
        for (index, v) in values.iter_mut().enumerate() {
            let h = half::f16::from_f32(*v);
            if h.is_infinite() {
                return Err(ModelError::Invalid(format!(
                    "tensor `{name}`: value {v} at element {index} is too large for f16 \
                     (largest finite value 65504); serve this model with f16 storage off"
                )));
            }
            *v = h.to_f32();
        }
    }
    Ok(())
}

fn checked_batch(b: &BatchLimits) -> Result<BatchLimits, ModelError> {
    if b.max_k == 0 || b.max_k > MAX_TOP_K {
        return Err(ModelError::Invalid(format!(
            "batch.max_k is {}; it must be 1..={MAX_TOP_K}",
            b.max_k
        )));
    }
    for (what, v) in [
        ("batch.max_queries", b.max_queries),
        ("batch.max_candidates", b.max_candidates),
        ("batch.max_rows", b.max_rows),
        ("batch.scan_groups", b.scan_groups),
    ] {
        if v == 0 || v > u32::MAX as usize / 8 {
            return Err(ModelError::Invalid(format!(
                "{what} is {v}; it must be 1..={}",
                u32::MAX / 8
            )));
        }
    }
    Ok(b.clone())
}

fn split<T>(flat: Vec<T>, counts: &[usize]) -> Vec<Vec<T>> {
    let mut it = flat.into_iter();
    counts
        .iter()
        .map(|&n| it.by_ref().take(n).collect())
        .collect()
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<Model>();
    let _ = ModelLimits::default();
}
