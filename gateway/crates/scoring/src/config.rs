//! What the engine is allowed to use: which compute path, how big a model file may be, and how
//! big one batch may be (the per-model GPU buffers are sized from [`BatchLimits`] at load).

use std::fmt;
use std::str::FromStr;

/// Which compute path to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// A real (hardware) GPU if there is one, else the software Vulkan adapter (lavapipe) when
    /// [`ScoringConfig::allow_software_gpu`] is set, else the CPU path.
    #[default]
    Auto,
    /// A real GPU; an error when there is none.
    Gpu,
    /// The software Vulkan adapter (`DeviceType::Cpu`, e.g. Mesa lavapipe); an error when
    /// there is none.
    SoftwareGpu,
    /// The CPU path, no Vulkan at all.
    Cpu,
}

impl FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "gpu" => Ok(BackendChoice::Gpu),
            "software-gpu" => Ok(BackendChoice::SoftwareGpu),
            "cpu" => Ok(BackendChoice::Cpu),
            other => Err(format!(
                "unknown backend {other:?}; expected auto, gpu, software-gpu or cpu"
            )),
        }
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Gpu => "gpu",
            BackendChoice::SoftwareGpu => "software-gpu",
            BackendChoice::Cpu => "cpu",
        })
    }
}

/// How a model's embedding tables (`items`, and the MLP's `users`) are held for scoring.
/// Dense layer weights and all arithmetic stay f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TableStorage {
    /// 4 bytes per value, as in the file.
    #[default]
    F32,
    /// Values rounded to IEEE half precision at load, 2 bytes per value on a GPU whose adapter
    /// has `SHADER_F16` (half the memory and the bandwidth of a catalog scan). The CPU path
    /// and adapters without `SHADER_F16` use the same rounded values held as f32, so every
    /// path gives the same answers. A value beyond ±65504 refuses the model.
    F16,
}

impl fmt::Display for TableStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TableStorage::F32 => "f32",
            TableStorage::F16 => "f16",
        })
    }
}

/// Limits a model file must stay within to be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelLimits {
    /// Size of the file in bytes (checked before it is read).
    pub max_file_bytes: u64,
    /// Rows of the `items` table.
    pub max_items: u64,
    /// Rows of the `users` table.
    pub max_users: u64,
    /// Embedding width (`dim`, `user_dim`, `item_dim`).
    pub max_dim: u64,
    /// All f32 values in the file together.
    pub max_parameters: u64,
}

impl Default for ModelLimits {
    fn default() -> Self {
        ModelLimits {
            max_file_bytes: 2 << 30,
            max_items: 10_000_000,
            max_users: 10_000_000,
            max_dim: 4096,
            max_parameters: 512 << 20,
        }
    }
}

/// The largest batch one call may score. GPU buffers for inputs, outputs and readback are
/// allocated once per model from these numbers; a bigger batch is refused with
/// [`ScoringError::BatchTooLarge`](super::ScoringError::BatchTooLarge) (split it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchLimits {
    /// Queries (rank requests or retrieval queries) in one batch.
    pub max_queries: usize,
    /// Candidate ids across all rank requests of one batch.
    pub max_candidates: usize,
    /// `k` of a retrieval (after clamping to the catalog size); at most
    /// [`MAX_TOP_K`](super::MAX_TOP_K).
    pub max_k: usize,
    /// Rows of one MLP batch.
    pub max_rows: usize,
    /// Retrieval: scan workgroups per query (at most; fewer for catalogs under
    /// `scan_groups * 1024` items). Each streams over its share of the catalog keeping a
    /// running top-k, so the retrieval scratch is `max_queries * scan_groups * max_k * 8`
    /// bytes twice, whatever the catalog size. More groups: more parallelism per query.
    pub scan_groups: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_queries: 64,
            max_candidates: 64 * 1024,
            max_k: 128,
            max_rows: 4096,
            scan_groups: 256,
        }
    }
}

/// Everything [`Model::load`](super::Model::load) and [`acquire_device`](super::acquire_device)
/// need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoringConfig {
    pub backend: BackendChoice,
    /// With [`BackendChoice::Auto`]: may the software Vulkan adapter be used when there is no
    /// real GPU (else the CPU path is)?
    pub allow_software_gpu: bool,
    pub limits: ModelLimits,
    pub batch: BatchLimits,
    /// How embedding tables are stored. Default [`TableStorage::F32`].
    pub storage: TableStorage,
}

impl Default for ScoringConfig {
    fn default() -> Self {
        ScoringConfig {
            backend: BackendChoice::Auto,
            allow_software_gpu: true,
            limits: ModelLimits::default(),
            batch: BatchLimits::default(),
            storage: TableStorage::F32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_choices_parse_and_print() {
        for s in ["auto", "gpu", "software-gpu", "cpu"] {
            assert_eq!(s.parse::<BackendChoice>().unwrap().to_string(), s);
        }
        assert!("cuda"
            .parse::<BackendChoice>()
            .unwrap_err()
            .contains("software-gpu"));
    }
}
