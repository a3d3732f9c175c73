//! The one place where the configuration's `[scoring]` and `[[models]]` settings become the
//! scoring engine's types. Neither crate knows the other: config describes what was written,
//! scoring what the engine takes.

use crate::config::{BatchSettings, ModelSpec, ScoringBackend};
use crate::scoring::serving::BatchPolicy;
use crate::scoring::{BackendChoice, TableStorage};

/// The engine's device choice for `[scoring] backend`.
pub fn backend_choice(backend: ScoringBackend) -> BackendChoice {
    match backend {
        ScoringBackend::Auto => BackendChoice::Auto,
        ScoringBackend::Gpu => BackendChoice::Gpu,
        ScoringBackend::SoftwareGpu => BackendChoice::SoftwareGpu,
        ScoringBackend::Cpu => BackendChoice::Cpu,
    }
}

/// The model slots' batching for `[scoring]`.
pub fn batch_policy(batch: &BatchSettings) -> BatchPolicy {
    BatchPolicy {
        max_batch: batch.max_batch,
        max_queue_delay: batch.max_queue_delay,
        max_queue: batch.max_queue,
    }
}

/// How a `[[models]]` entry's tables are held.
pub fn table_storage(spec: &ModelSpec) -> TableStorage {
    if spec.f16_storage {
        TableStorage::F16
    } else {
        TableStorage::F32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_keep_their_names() {
        for name in ["auto", "gpu", "software-gpu", "cpu"] {
            let configured: ScoringBackend = name.parse().unwrap();
            let engine: BackendChoice = name.parse().unwrap();
            assert_eq!(backend_choice(configured), engine);
            assert_eq!(configured.to_string(), engine.to_string());
        }
        assert_eq!(
            "tpu".parse::<ScoringBackend>().unwrap_err(),
            "tpu".parse::<BackendChoice>().unwrap_err()
        );
    }

    #[test]
    fn batch_settings_carry_over() {
        let batch = BatchSettings {
            max_batch: 7,
            max_queue_delay: std::time::Duration::from_micros(250),
            max_queue: 9,
        };
        let policy = batch_policy(&batch);
        assert_eq!(
            (policy.max_batch, policy.max_queue_delay, policy.max_queue),
            (7, batch.max_queue_delay, 9)
        );
    }
}
