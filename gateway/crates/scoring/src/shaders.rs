//! The WGSL kernels, in one place. The files live in the repository's top-level `shaders/`;
//! this crate reaches them through its own `shaders` symlink (`gateway/crates/scoring/shaders`),
//! so the path is the crate's and `cargo package -p gateway-scoring` copies the files in.

/// Scores a candidate list per query (rank).
pub(crate) const GATHER_SCORE: &str = include_str!("../shaders/gather_score.wgsl");
/// Shared by the top-k scan and merge passes.
pub(crate) const TOPK_COMMON: &str = include_str!("../shaders/topk_common.wgsl");
/// Full-catalog scan: per-workgroup top-k of each query.
pub(crate) const TOPK_SCAN: &str = include_str!("../shaders/topk_scan.wgsl");
/// Merges the per-workgroup top-k lists.
pub(crate) const TOPK_MERGE: &str = include_str!("../shaders/topk_merge.wgsl");
/// One MLP layer forward (click-through models).
pub(crate) const MLP_FORWARD: &str = include_str!("../shaders/mlp_forward.wgsl");
