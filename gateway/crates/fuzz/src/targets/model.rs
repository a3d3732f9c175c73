//! Model files: safetensors bytes → [`gateway_scoring::inspect`] (`gateway model inspect`)
//! and [`Model::from_bytes`] (what [`Model::load`], `gateway check`, reloads and uploads run)
//! on the CPU path, with f32 and f16 table storage and with tight limits. A model that loads
//! must then score: a few rank, top-k and predict calls with ids and vectors taken from the
//! input must answer or refuse, never panic.

use gateway_scoring::{
    ComputeDevice, CtrRow, Model, ModelKind, ModelLimits, Query, RankRequest, ScoringConfig,
    TableStorage,
};

/// The target (see the module docs).
pub fn run(data: &[u8]) {
    if let Ok(inspection) = gateway_scoring::inspect(data) {
        assert_eq!(inspection.file_bytes, data.len() as u64);
    }
    let tight = ModelLimits {
        max_file_bytes: 1 << 16,
        max_items: 256,
        max_users: 256,
        max_dim: 64,
        max_parameters: 8192,
    };
    for (storage, limits) in [
        (TableStorage::F32, ModelLimits::default()),
        (TableStorage::F16, ModelLimits::default()),
        (TableStorage::F32, tight),
    ] {
        let config = ScoringConfig {
            storage,
            limits,
            ..ScoringConfig::default()
        };
        match Model::from_bytes(data, &config, &ComputeDevice::Cpu) {
            Ok(model) => score(&model, data),
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
}

/// Scores a loaded model with requests derived from `data`.
fn score(model: &Model, data: &[u8]) {
    let info = model.info();
    assert!(info.n_items > 0, "a model without items loaded");
    let byte = |i: usize| u32::from(data.get(i % data.len().max(1)).copied().unwrap_or(0));
    // In range, out of range and edge ids.
    let n_items = info.n_items as u32;
    let ids: Vec<u32> = vec![0, n_items - 1, n_items, byte(0) % n_items, u32::MAX];
    let n_users = info.n_users.max(1) as u32;
    let users = [0, n_users - 1, n_users, u32::MAX];
    match info.kind {
        ModelKind::Embedding => {
            let dim = info.dim;
            let zero = vec![0.0f32; dim];
            let ones: Vec<f32> = (0..dim).map(|i| byte(i) as f32 - 128.0).collect();
            let big = vec![f32::MAX; dim];
            let short = vec![1.0f32; dim.saturating_sub(1)];
            let mut queries = vec![
                Query::Vector(&zero),
                Query::Vector(&ones),
                Query::Vector(&big),
                Query::Vector(&short),
            ];
            queries.extend(users.iter().map(|&u| Query::User(u)));
            for q in &queries {
                let good: Vec<u32> = ids.iter().copied().filter(|&i| i < n_items).collect();
                for candidates in [&good[..], &ids[..], &[]] {
                    let batch = [RankRequest {
                        query: *q,
                        candidates,
                    }];
                    if let Ok(scores) = model.rank_cpu(&batch) {
                        assert_eq!(scores.len(), 1);
                        assert_eq!(scores[0].len(), candidates.len());
                    }
                }
                for k in [1, info.n_items, info.n_items + 1, usize::MAX] {
                    if let Ok(hits) = model.top_k_cpu(std::slice::from_ref(q), k) {
                        assert!(hits[0].len() <= k.min(info.n_items));
                        assert!(hits[0].iter().all(|h| h.item < n_items));
                    }
                }
            }
            let _ = model.predict_cpu(&[CtrRow {
                user: 0,
                item: 0,
                dense: &[],
            }]);
        }
        ModelKind::Mlp => {
            let dense: Vec<f32> = (0..info.n_dense.min(4096))
                .map(|i| byte(i) as f32 / 16.0)
                .collect();
            let wrong = vec![0.5f32; info.n_dense.min(4096) + 1];
            let inf = vec![f32::INFINITY; info.n_dense.min(4096)];
            for &user in &users {
                for &item in &ids {
                    for d in [&dense, &wrong, &inf] {
                        if let Ok(p) = model.predict_cpu(&[CtrRow {
                            user,
                            item,
                            dense: d,
                        }]) {
                            assert_eq!(p.len(), 1);
                            assert!((0.0..=1.0).contains(&p[0]), "probability {}", p[0]);
                        }
                    }
                }
            }
            let _ = model.top_k_cpu(&[Query::User(0)], 1);
        }
    }
}
