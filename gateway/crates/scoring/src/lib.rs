//! The scoring engine: embedding and click-through (MLP) models in safetensors files, scored
//! by WGSL compute kernels on a GPU (through wgpu's Vulkan backend) or by the CPU path.
//!
//! # Using it
//!
//! 1. **Device**, once per process: [`acquire_device`] with a [`BackendChoice`] (`auto`: a
//!    real GPU, else the software Vulkan adapter lavapipe if allowed, else the CPU path;
//!    or forced `gpu`, `software-gpu`, `cpu`). A caller with its own wgpu device wraps it
//!    in [`GpuDevice::new`]. A [`ComputeDevice`] is cheap to clone and shared by all models.
//! 2. **Load**: [`Model::load`] reads and validates the file ([`format`](mod@format) describes it),
//!    uploads the weights and creates every buffer, pipeline and bind group the model's
//!    batches need, sized by [`BatchLimits`]. Nothing is allocated per request. Tables the
//!    device cannot hold leave the model on the CPU path ([`ExecutionPath::CpuFallback`]).
//! 3. **Score a batch**: [`Model::rank`] (candidate lists per query, embedding models),
//!    [`Model::top_k`] (full-catalog retrieval, embedding models; top-k selected on the GPU,
//!    only k entries per query read back), [`Model::predict`] (MLP click probabilities).
//!    All ids, dimensions and values are checked on the host first; a bad request is a
//!    [`ScoringError`] naming the request, never a panic. Each batch is one submission
//!    (top-k: the scan and its merge passes in one compute pass) and one readback
//!    (`map_async` + one device poll). The calls block the thread until the result is back,
//!    so async callers run them on a blocking thread (`spawn_blocking` or a batcher thread).
//! 4. **Swap**: a [`Model`] is immutable and `Send + Sync`; keep `Arc<Model>` in an
//!    `ArcSwap` and store a freshly loaded one to update. Batches on the old model finish on
//!    it; its GPU memory is freed when the last `Arc` goes.
//!
//! 5. **Judge offline**: [`evaluate`] scores a model on held-out interactions ([`HeldOut`],
//!    JSON lines; [`eval`] describes them) on its CPU path and gives a [`Report`]: NDCG@k,
//!    precision@k and recall@k for embedding models, AUC and log-loss for MLP models.
//!
//! The `*_cpu` twins ([`Model::rank_cpu`], ...) run the CPU path on any model: the oracle in
//! tests and a fallback if a GPU batch fails. Results are identical in order (higher score
//! first; equal scores: lower item id first) and equal in value within float rounding.
//!
//! Precision: f32 arithmetic throughout. [`TableStorage::F16`] (per model) rounds the embedding
//! tables to half precision at load and, where the adapter has `SHADER_F16` (the device is
//! opened with it whenever the adapter offers it), stores them as f16 on the GPU: half the
//! memory and half the bytes a catalog scan reads. Every path uses the same rounded values.
//!
//! # What this crate owns, and what it does not
//!
//! Model formats, models, the CPU and GPU paths, the WGSL kernels (`src/shaders.rs`,
//! through the crate's own `shaders` path) and the serving slots with their dynamic batcher
//! ([`serving`]). It is a leaf of the workspace: no HTTP (the JSON endpoint is the proxy's),
//! no plugins (the plugin host's `Ranker` is implemented over [`serving::ModelSlot`] by the
//! gateway package), no configuration files (callers build a [`ScoringConfig`]).

mod config;
mod cpu;
mod device;
mod error;
pub mod eval;
pub mod format;
mod gpu;
mod model;
pub mod sample;
pub mod serving;
mod shaders;

pub use config::{BackendChoice, BatchLimits, ModelLimits, ScoringConfig, TableStorage};
pub use cpu::hit_order;
pub use device::{
    acquire_device, open_device, select_adapter, vulkan_adapters, ComputeDevice, GpuDevice,
};
pub use error::{GpuError, ModelError, ScoringError};
pub use eval::{evaluate, EvalError, Figure, HeldOut, Report};
pub use format::{inspect, Inspection, ModelInfo, ModelKind, Similarity, TensorSummary};
pub use model::{CtrRow, ExecutionPath, Hit, Model, Query, RankRequest, MAX_TOP_K};
pub use sample::{sample_model, SampleSpec};
