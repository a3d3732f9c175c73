//! The WGSL kernels (on whatever Vulkan adapter is here: a GPU, or lavapipe in CI) return what
//! the CPU path returns, on model files written by the sample writer: random shapes including
//! sizes that are not multiples of the workgroup size, dimension 1, empty candidate lists,
//! k larger than the catalog, exact ties, several top-k merge passes. Without any Vulkan
//! adapter these tests print SKIP and pass, unless GATEWAY_REQUIRE_GPU_TESTS is set.

use std::path::Path;
use std::sync::OnceLock;

use gateway::scoring::sample::SplitMix64;
use gateway::scoring::{
    acquire_device, hit_order, sample_model, BackendChoice, ComputeDevice, CtrRow, ExecutionPath,
    GpuDevice, Hit, Model, ModelKind, Query, RankRequest, SampleSpec, ScoringConfig, ScoringError,
    Similarity, TableStorage,
};

/// The shared test device: any Vulkan adapter (real GPU preferred, lavapipe accepted).
fn gpu(test: &str) -> Option<GpuDevice> {
    static DEVICE: OnceLock<Result<GpuDevice, String>> = OnceLock::new();
    let dev = DEVICE.get_or_init(|| match acquire_device(BackendChoice::Auto, true) {
        Ok(ComputeDevice::Gpu(g)) => {
            eprintln!("scoring tests run on {}", g.describe());
            Ok(g)
        }
        Ok(ComputeDevice::Cpu) => Err("no Vulkan adapter found".to_string()),
        Err(e) => Err(e.to_string()),
    });
    match dev {
        Ok(g) => Some(g.clone()),
        Err(why) => {
            if std::env::var_os("GATEWAY_REQUIRE_GPU_TESTS").is_some() {
                panic!("{test}: GATEWAY_REQUIRE_GPU_TESTS is set but {why}");
            }
            eprintln!(
                "SKIP {test}: {why} (install mesa-vulkan-drivers for lavapipe; \
                 set GATEWAY_REQUIRE_GPU_TESTS to make this a failure)"
            );
            None
        }
    }
}

fn config(max_k: usize) -> ScoringConfig {
    let mut c = ScoringConfig::default();
    c.batch.max_k = max_k;
    c.batch.max_queries = 8;
    c.batch.max_candidates = 4096;
    c.batch.max_rows = 512;
    c
}

/// Writes the sample to a file and loads it twice: on the GPU and on the CPU path.
fn load_both(
    dir: &Path,
    spec: &SampleSpec,
    dev: &GpuDevice,
    cfg: &ScoringConfig,
) -> (Model, Model) {
    let path = dir.join(format!("{}-{}.safetensors", spec.name, spec.seed));
    std::fs::write(&path, sample_model(spec)).unwrap();
    let g = Model::load(&path, cfg, &ComputeDevice::Gpu(dev.clone())).unwrap();
    assert!(matches!(g.execution_path(), ExecutionPath::Gpu { .. }));
    let c = Model::load(&path, cfg, &ComputeDevice::Cpu).unwrap();
    assert_eq!(c.execution_path(), &ExecutionPath::Cpu);
    (g, c)
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-5 + 1e-4 * a.abs().max(b.abs())
}

fn random_vec(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.next_f32()).collect()
}

/// Same length; same ids in the same order except where scores are within rounding of each
/// other (random floats: the two paths sum in different orders).
fn assert_same_hits(gpu: &[Hit], cpu: &[Hit], what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert!(
            close(g.score, c.score),
            "{what}: position {i}: gpu {g:?} cpu {c:?}"
        );
        if g.item != c.item {
            let partner = cpu.iter().find(|h| h.item == g.item);
            assert!(
                partner.is_some_and(|p| close(p.score, c.score)),
                "{what}: position {i}: gpu {g:?} cpu {c:?} (not a near-tie)"
            );
        }
    }
    for w in gpu.windows(2) {
        assert_ne!(
            hit_order(&w[0], &w[1]),
            std::cmp::Ordering::Greater,
            "{what}: gpu order"
        );
    }
}

#[test]
fn ranking_matches_on_random_shapes() {
    let Some(dev) = gpu("ranking_matches_on_random_shapes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(64);
    // (items, dim, users, similarity)
    let shapes = [
        (1, 1, 1, Similarity::Dot),
        (7, 1, 0, Similarity::Cosine),
        (300, 3, 5, Similarity::Dot),
        (1030, 17, 4, Similarity::Cosine),
        (257, 64, 2, Similarity::Dot),
    ];
    for (seed, &(n_items, dim, n_users, similarity)) in shapes.iter().enumerate() {
        let spec = SampleSpec {
            n_users,
            similarity,
            ..SampleSpec::embedding(n_items, dim, seed as u64 + 10)
        };
        let (g, c) = load_both(dir.path(), &spec, &dev, &cfg);
        let mut rng = SplitMix64(seed as u64);
        // Candidate counts around the workgroup size of 256, and empty lists.
        let counts = [0usize, 1, 255, 257, 0, 600];
        let lists: Vec<Vec<u32>> = counts
            .iter()
            .map(|&n| (0..n).map(|_| rng.below(n_items as u64) as u32).collect())
            .collect();
        let vectors: Vec<Vec<f32>> = (0..counts.len())
            .map(|_| random_vec(&mut rng, dim))
            .collect();
        let batch: Vec<RankRequest<'_>> = lists
            .iter()
            .enumerate()
            .map(|(i, candidates)| RankRequest {
                query: if n_users > 0 && i % 2 == 1 {
                    Query::User(rng.below(n_users as u64) as u32)
                } else {
                    Query::Vector(&vectors[i])
                },
                candidates,
            })
            .collect();
        let got = g.rank(&batch).unwrap();
        let want = c.rank(&batch).unwrap();
        assert_eq!(got.len(), batch.len());
        for (r, (gs, cs)) in got.iter().zip(&want).enumerate() {
            assert_eq!(gs.len(), counts[r], "shape {seed} request {r}");
            for (j, (a, b)) in gs.iter().zip(cs).enumerate() {
                assert!(
                    close(*a, *b),
                    "shape {seed} request {r} candidate {j}: gpu {a} cpu {b}"
                );
            }
        }
        // The GPU model's own CPU twin agrees with the CPU-loaded model exactly.
        assert_eq!(g.rank_cpu(&batch).unwrap(), want);
    }
}

#[test]
fn top_k_matches_with_ties_large_k_and_several_merge_passes() {
    let Some(dev) = gpu("top_k_matches_with_ties_large_k_and_several_merge_passes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Integer weights: exact scores on both paths, hence exact ties, hence identical order.
    // (items, dim, max_k, scan groups, ks): 9000 items in 9 groups: k = 128 needs two merge
    // passes; k = 500 on 5000 items in 5 groups needs three; 10 items with k = 50 returns all
    // ten; 6000 items in 2 groups of 3000 stream 3 (k = 100) or 5 (k = 500) rounds per group.
    let cases: [(usize, usize, usize, usize, &[usize]); 6] = [
        (10, 1, 64, 256, &[1, 3, 10, 50]),
        (1500, 2, 128, 256, &[1, 7, 128]),
        (9000, 2, 128, 256, &[128, 33]),
        (5000, 1, 512, 256, &[500]),
        (6000, 3, 512, 2, &[1, 100, 500]),
        (3001, 2, 64, 1, &[64]),
    ];
    for (n_items, dim, max_k, scan_groups, ks) in cases {
        let spec = SampleSpec {
            integer_values: true,
            n_users: 3,
            ..SampleSpec::embedding(n_items, dim, n_items as u64)
        };
        let mut cfg = config(max_k);
        cfg.batch.scan_groups = scan_groups;
        let (g, c) = load_both(dir.path(), &spec, &dev, &cfg);
        let v1: Vec<f32> = (0..dim).map(|i| if i == 0 { 1.0 } else { -1.0 }).collect();
        let zero = vec![0.0; dim];
        let queries = [Query::Vector(&v1), Query::User(2), Query::Vector(&zero)];
        for &k in ks {
            let got = g.top_k(&queries, k).unwrap();
            let want = c.top_k(&queries, k).unwrap();
            assert_eq!(got, want, "items {n_items} dim {dim} k {k}");
            for list in &got {
                assert_eq!(list.len(), k.min(n_items));
            }
            // All-zero query: every score ties at 0, so the answer is items 0..k.
            let ids: Vec<u32> = got[2].iter().map(|h| h.item).collect();
            assert_eq!(ids, (0..k.min(n_items) as u32).collect::<Vec<_>>());
        }
    }
}

#[test]
fn top_k_matches_on_random_floats() {
    let Some(dev) = gpu("top_k_matches_on_random_floats") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (n_items, dim, similarity) in [(2049, 16, Similarity::Cosine), (700, 5, Similarity::Dot)] {
        let spec = SampleSpec {
            similarity,
            ..SampleSpec::embedding(n_items, dim, 99)
        };
        let (g, c) = load_both(dir.path(), &spec, &dev, &config(100));
        let mut rng = SplitMix64(7);
        let vs: Vec<Vec<f32>> = (0..5).map(|_| random_vec(&mut rng, dim)).collect();
        let queries: Vec<Query<'_>> = vs.iter().map(|v| Query::Vector(v)).collect();
        for k in [1, 10, 100] {
            let got = g.top_k(&queries, k).unwrap();
            let want = c.top_k(&queries, k).unwrap();
            for (q, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_same_hits(
                    a,
                    b,
                    &format!("{similarity:?} items {n_items} k {k} query {q}"),
                );
            }
        }
    }
}

#[test]
fn mlp_matches() {
    let Some(dev) = gpu("mlp_matches") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // (user_dim, item_dim, n_dense, hidden): a single layer, no dense features, widths that
    // are not multiples of the 64-invocation workgroup.
    let shapes: [(usize, usize, usize, &[usize]); 3] =
        [(1, 1, 0, &[]), (8, 8, 3, &[32, 16]), (5, 70, 2, &[100])];
    for (seed, (user_dim, item_dim, n_dense, hidden)) in shapes.into_iter().enumerate() {
        let spec = SampleSpec {
            user_dim,
            item_dim,
            n_dense,
            hidden: hidden.to_vec(),
            ..SampleSpec::mlp(13, 200, seed as u64)
        };
        let (g, c) = load_both(dir.path(), &spec, &dev, &config(64));
        assert_eq!(g.kind(), ModelKind::Mlp);
        let mut rng = SplitMix64(seed as u64 + 1);
        let n_rows = 300;
        let dense: Vec<f32> = random_vec(&mut rng, n_rows * n_dense);
        let rows: Vec<CtrRow<'_>> = (0..n_rows)
            .map(|r| CtrRow {
                user: rng.below(13) as u32,
                item: rng.below(200) as u32,
                dense: &dense[r * n_dense..(r + 1) * n_dense],
            })
            .collect();
        let got = g.predict(&rows).unwrap();
        let want = c.predict(&rows).unwrap();
        assert_eq!(got.len(), n_rows);
        for (r, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((0.0..=1.0).contains(a), "row {r}: {a} is not a probability");
            assert!(close(*a, *b), "shape {seed} row {r}: gpu {a} cpu {b}");
        }
    }
}

#[test]
fn bad_requests_are_errors_before_dispatch() {
    let Some(dev) = gpu("bad_requests_are_errors_before_dispatch") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(16);
    let (emb, _) = load_both(dir.path(), &SampleSpec::embedding(50, 4, 1), &dev, &cfg);
    let (mlp, _) = load_both(dir.path(), &SampleSpec::mlp(5, 50, 2), &dev, &cfg);
    let v = [0.5f32; 4];
    let nan = [0.5, f32::NAN, 0.0, 0.0];
    let short = [1.0f32; 3];
    let rank =
        |query, candidates: &[u32]| emb.rank(&[RankRequest { query, candidates }]).unwrap_err();
    assert!(matches!(
        rank(Query::Vector(&v), &[1, 50]),
        ScoringError::UnknownItem { item: 50, .. }
    ));
    assert!(matches!(
        rank(Query::User(16), &[1]),
        ScoringError::UnknownUser { user: 16, .. }
    ));
    assert!(matches!(
        rank(Query::Vector(&nan), &[1]),
        ScoringError::NotFinite { .. }
    ));
    assert!(matches!(
        rank(Query::Vector(&short), &[1]),
        ScoringError::QueryDim { found: 3, .. }
    ));
    let too_many = vec![0u32; 4097];
    assert!(matches!(
        rank(Query::Vector(&v), &too_many),
        ScoringError::BatchTooLarge { .. }
    ));
    let e = emb.top_k(&[Query::Vector(&v)], 17).unwrap_err();
    assert!(
        matches!(e, ScoringError::BatchTooLarge { what: "k", .. }),
        "{e}"
    );
    assert!(matches!(
        emb.top_k(&[Query::Vector(&v)], 0),
        Err(ScoringError::ZeroK)
    ));
    assert!(matches!(
        emb.predict(&[]),
        Err(ScoringError::WrongKind { .. })
    ));
    assert!(matches!(
        mlp.top_k(&[], 1),
        Err(ScoringError::WrongKind { .. })
    ));
    let dense = [0.0f32; 4];
    let row = |user, item, dense: &[f32]| mlp.predict(&[CtrRow { user, item, dense }]).unwrap_err();
    assert!(matches!(
        row(5, 0, &dense),
        ScoringError::UnknownUser { .. }
    ));
    assert!(matches!(
        row(0, 50, &dense),
        ScoringError::UnknownItem { .. }
    ));
    assert!(matches!(
        row(0, 0, &dense[..3]),
        ScoringError::DenseLen { .. }
    ));
    assert!(matches!(
        row(0, 0, &[0.0, 0.0, f32::INFINITY, 0.0]),
        ScoringError::NotFinite { .. }
    ));
    // The messages name the request and the problem.
    let msg = rank(Query::Vector(&v), &[1, 50]).to_string();
    assert!(msg.contains("request 0") && msg.contains("50"), "{msg}");
    // And the models still work afterwards.
    assert_eq!(
        emb.rank(&[RankRequest {
            query: Query::Vector(&v),
            candidates: &[3]
        }])
        .unwrap()[0]
            .len(),
        1
    );
}

#[test]
fn empty_batches_return_empty_results() {
    let Some(dev) = gpu("empty_batches_return_empty_results") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(16);
    let (emb, _) = load_both(dir.path(), &SampleSpec::embedding(20, 3, 1), &dev, &cfg);
    let (mlp, _) = load_both(dir.path(), &SampleSpec::mlp(5, 20, 2), &dev, &cfg);
    assert!(emb.rank(&[]).unwrap().is_empty());
    let v = [1.0f32; 3];
    let all_empty = [
        RankRequest {
            query: Query::Vector(&v),
            candidates: &[],
        },
        RankRequest {
            query: Query::User(0),
            candidates: &[],
        },
    ];
    assert_eq!(
        emb.rank(&all_empty).unwrap(),
        vec![Vec::<f32>::new(), Vec::new()]
    );
    assert!(emb.top_k(&[], 5).unwrap().is_empty());
    assert!(mlp.predict(&[]).unwrap().is_empty());
}

#[test]
fn device_choice_is_honoured() {
    assert!(matches!(
        acquire_device(BackendChoice::Cpu, true),
        Ok(ComputeDevice::Cpu)
    ));
    let Some(dev) = gpu("device_choice_is_honoured") else {
        return;
    };
    if dev.is_software() {
        // Only a software adapter here: auto without software is the CPU path, and a hardware
        // GPU cannot be had.
        assert!(matches!(
            acquire_device(BackendChoice::Auto, false),
            Ok(ComputeDevice::Cpu)
        ));
        let e = acquire_device(BackendChoice::Gpu, true).unwrap_err();
        assert!(e.to_string().contains("no hardware GPU adapter"), "{e}");
        let sw = acquire_device(BackendChoice::SoftwareGpu, false).unwrap();
        assert!(sw.gpu().is_some_and(|g| g.is_software()));
    } else {
        let auto = acquire_device(BackendChoice::Auto, true).unwrap();
        assert!(auto.gpu().is_some_and(|g| !g.is_software()));
    }
}

#[test]
fn batch_limits_beyond_the_device_are_refused_at_load() {
    let Some(dev) = gpu("batch_limits_beyond_the_device_are_refused_at_load") else {
        return;
    };
    let bytes = sample_model(&SampleSpec::embedding(10, 2, 1));
    let mut cfg = config(8);
    cfg.batch.max_queries = 100_000; // over the 65535 workgroups a grid dimension may have
    let e = Model::from_bytes(&bytes, &cfg, &ComputeDevice::Gpu(dev.clone())).unwrap_err();
    assert!(
        matches!(
            e,
            gateway::scoring::ModelError::Gpu(gateway::scoring::GpuError::TooLargeForDevice { .. })
        ),
        "{e}"
    );
    assert!(e.to_string().contains("100000 queries"), "{e}");
    // The same file on the CPU path has no such limit.
    Model::from_bytes(&bytes, &cfg, &ComputeDevice::Cpu).unwrap();
}

#[test]
fn f16_tables_match_the_cpu_path_and_take_half_the_memory() {
    let Some(dev) = gpu("f16_tables_match_the_cpu_path_and_take_half_the_memory") else {
        return;
    };
    if !dev.has_f16() {
        eprintln!("SKIP: {} has no SHADER_F16", dev.describe());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(100);
    cfg.storage = TableStorage::F16;
    let f32_cfg = config(100);
    let (n_items, dim) = (2049, 16);
    let spec = SampleSpec {
        similarity: Similarity::Cosine,
        ..SampleSpec::embedding(n_items, dim, 5)
    };
    let (g, c) = load_both(dir.path(), &spec, &dev, &cfg);
    let (g32, c32) = load_both(dir.path(), &spec, &dev, &f32_cfg);
    assert!(matches!(
        g.execution_path(),
        ExecutionPath::Gpu {
            f16_tables: true,
            ..
        }
    ));
    assert_eq!(g.table_storage(), TableStorage::F16);
    assert_eq!(
        g32.held_bytes() - g.held_bytes(),
        (n_items * dim * 2) as u64,
        "the item table is held at 2 bytes per value"
    );
    assert_eq!(c.held_bytes(), c32.held_bytes(), "the CPU path holds f32");

    let mut rng = SplitMix64(3);
    let vs: Vec<Vec<f32>> = (0..4).map(|_| random_vec(&mut rng, dim)).collect();
    let queries: Vec<Query<'_>> = vs.iter().map(|v| Query::Vector(v)).collect();
    let got = g.top_k(&queries, 100).unwrap();
    let want = c.top_k(&queries, 100).unwrap();
    for (q, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_same_hits(a, b, &format!("f16 top-k query {q}"));
    }
    let candidates: Vec<u32> = (0..600).map(|_| rng.below(n_items as u64) as u32).collect();
    let batch = [RankRequest {
        query: Query::Vector(&vs[0]),
        candidates: &candidates,
    }];
    let (gs, cs) = (g.rank(&batch).unwrap(), c.rank(&batch).unwrap());
    for (j, (a, b)) in gs[0].iter().zip(&cs[0]).enumerate() {
        assert!(close(*a, *b), "candidate {j}: gpu {a} cpu {b}");
    }
    // The rounding happened: f16 scores differ from f32 ones, by no more than f16's precision.
    let full = c32.rank(&batch).unwrap();
    let mut differ = 0;
    for (a, b) in cs[0].iter().zip(&full[0]) {
        assert!(
            (a - b).abs() <= 4e-3 * (1.0 + b.abs()),
            "f16 {a} vs f32 {b}"
        );
        differ += usize::from(a != b);
    }
    assert!(differ > 0, "no score changed: the tables were not rounded");

    // Integer values are exact in f16: identical answers, ties included.
    let ints = SampleSpec {
        integer_values: true,
        n_users: 3,
        ..SampleSpec::embedding(3000, 2, 77)
    };
    let (g, c) = load_both(dir.path(), &ints, &dev, &cfg);
    let v1 = [1.0f32, -1.0];
    let q = [Query::Vector(&v1), Query::User(1)];
    assert_eq!(g.top_k(&q, 100).unwrap(), c.top_k(&q, 100).unwrap());

    // MLP: user and item tables in f16.
    let spec = SampleSpec {
        n_dense: 3,
        ..SampleSpec::mlp(13, 201, 8)
    };
    let (g, c) = load_both(dir.path(), &spec, &dev, &cfg);
    let dense = random_vec(&mut rng, 50 * 3);
    let rows: Vec<CtrRow<'_>> = (0..50)
        .map(|r| CtrRow {
            user: (r % 13) as u32,
            item: (r * 4 % 201) as u32,
            dense: &dense[r * 3..r * 3 + 3],
        })
        .collect();
    let (a, b) = (g.predict(&rows).unwrap(), c.predict(&rows).unwrap());
    for (r, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(close(*x, *y), "row {r}: gpu {x} cpu {y}");
    }
}

#[test]
fn top_k_scan_holds_when_every_row_or_no_row_beats_the_running_threshold() {
    let Some(dev) = gpu("top_k_scan_holds_when_every_row_or_no_row_beats_the_running_threshold")
    else {
        return;
    };
    // One scan group over 5000 rows of dim 1 valued 0, 1, 2, ...: with query +1 every row
    // beats the k-th best so far (the window is re-sorted over and over); with -1 none does.
    let n = 5000usize;
    let items: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let meta = [
        ("kind", "embedding".to_string()),
        ("name", "ramp".into()),
        ("version", "1".into()),
        ("n_items", n.to_string()),
        ("dim", "1".into()),
        ("similarity", "dot".into()),
    ];
    let bytes = gateway::scoring::format::encode(&meta, &[("items", vec![n, 1], &items)]);
    let mut cfg = config(512);
    cfg.batch.scan_groups = 1;
    let g = Model::from_bytes(&bytes, &cfg, &ComputeDevice::Gpu(dev.clone())).unwrap();
    let (up, down) = ([1.0f32], [-1.0f32]);
    for k in [1, 100, 500] {
        let got = g
            .top_k(&[Query::Vector(&up), Query::Vector(&down)], k)
            .unwrap();
        let want_up: Vec<u32> = (0..k as u32).map(|i| n as u32 - 1 - i).collect();
        let want_down: Vec<u32> = (0..k as u32).collect();
        assert_eq!(
            got[0].iter().map(|h| h.item).collect::<Vec<_>>(),
            want_up,
            "k {k}"
        );
        assert_eq!(
            got[1].iter().map(|h| h.item).collect::<Vec<_>>(),
            want_down,
            "k {k}"
        );
    }
}

#[test]
fn a_catalog_larger_than_the_device_allows_is_served_on_the_cpu_path() {
    let Some(dev) = gpu("a_catalog_larger_than_the_device_allows_is_served_on_the_cpu_path") else {
        return;
    };
    // A device of our own on the same adapter, with storage bindings capped at 64 KiB.
    let adapter = gateway::scoring::select_adapter(BackendChoice::Auto, true)
        .unwrap()
        .expect("the shared test device came from an adapter");
    let limits = wgpu::Limits {
        max_storage_buffer_binding_size: 64 << 10,
        ..adapter.limits()
    };
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        required_features: adapter.features() & wgpu::Features::SHADER_F16,
        required_limits: limits,
        ..Default::default()
    }))
    .unwrap();
    let small = GpuDevice::new(device, queue, adapter.get_info());
    // 1000 x 32 f32 = 128000 bytes: over the cap; as f16, 64000 bytes: under it.
    let bytes = sample_model(&SampleSpec::embedding(1000, 32, 3));
    let cfg = config(100);
    let m = Model::from_bytes(&bytes, &cfg, &ComputeDevice::Gpu(small.clone())).unwrap();
    match m.execution_path() {
        ExecutionPath::CpuFallback { reason, .. } => {
            assert!(
                reason.contains("`items`") && reason.contains("128000"),
                "{reason}"
            );
        }
        other => panic!("expected the CPU fallback, got {other:?}"),
    }
    let cpu = Model::from_bytes(&bytes, &cfg, &ComputeDevice::Cpu).unwrap();
    let v: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).sin()).collect();
    let q = [Query::Vector(&v)];
    assert_eq!(m.top_k(&q, 10).unwrap(), cpu.top_k(&q, 10).unwrap());

    if small.has_f16() {
        let half = ScoringConfig {
            storage: TableStorage::F16,
            ..config(100)
        };
        let m = Model::from_bytes(&bytes, &half, &ComputeDevice::Gpu(small)).unwrap();
        assert!(
            matches!(
                m.execution_path(),
                ExecutionPath::Gpu {
                    f16_tables: true,
                    ..
                }
            ),
            "{:?}",
            m.execution_path()
        );
    }
    drop(dev);
}
