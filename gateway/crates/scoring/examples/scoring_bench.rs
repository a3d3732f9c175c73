//! On-demand benchmark of the scoring engine (not part of CI): the GPU path against the CPU
//! path, in one invocation, on synthetic models built in memory.
//!
//! 1. Batched ranking: `--rank-requests` (64) requests x `--rank-candidates` (500) candidate
//!    ids each, dim `--rank-dim` (64), dot similarity, catalog `--rank-items` (100,000) rows.
//!    `Model::rank` on the device vs `Model::rank_cpu` on the same model.
//! 2. Full-catalog retrieval: `--items` (1,000,000) x `--dim` (128), top-`--k` (100), for each
//!    batch size in `--batches` (1,16). `Model::top_k` vs `Model::top_k_cpu`. The bandwidth
//!    column counts the item matrix once per query of the batch: in shaders/topk_scan.wgsl
//!    workgroup (group, query) scores its own query against its share of the catalog, so
//!    every query streams the whole matrix (the CPU path also loops queries outside items).
//!
//! Each timed call is one batch, end to end as a caller sees it: host validation, upload,
//! dispatch, readback (GPU) or the whole computation (CPU). Warm-up calls come first; each
//! measurement stops after `--iters` batches or `--max-seconds`, whichever comes first (at
//! least 3 batches), and prints how many it ran.
//!
//!   cargo run --release -p gateway-scoring --example scoring_bench -- --help
//!   bench/scoring.sh --backend gpu --peak-gbps 3350

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use gateway_scoring::sample::SplitMix64;
use gateway_scoring::{
    acquire_device, sample_model, BackendChoice, BatchLimits, ComputeDevice, ExecutionPath, Model,
    ModelKind, ModelLimits, Query, RankRequest, SampleSpec, ScoringConfig, Similarity,
    TableStorage,
};

#[derive(Parser, Debug)]
#[command(
    about = "Scoring engine benchmark: GPU path vs CPU path (rank and top-k retrieval)",
    args_override_self = true
)]
struct Args {
    /// auto (real GPU, else lavapipe, else CPU only), gpu, software-gpu or cpu.
    #[arg(long, default_value = "auto")]
    backend: BackendChoice,
    /// Timed batches per measurement (at most; see --max-seconds).
    #[arg(long, default_value_t = 200)]
    iters: usize,
    /// Untimed batches before each measurement.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Time budget of one measurement, in seconds (it still runs at least 3 batches).
    #[arg(long, default_value_t = 15.0)]
    max_seconds: f64,
    /// Retrieval catalog rows.
    #[arg(long, default_value_t = 1_000_000)]
    items: usize,
    /// Retrieval embedding width.
    #[arg(long, default_value_t = 128)]
    dim: usize,
    /// Retrieval k.
    #[arg(long, default_value_t = 100)]
    k: usize,
    /// Retrieval batch sizes (queries per top_k call), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    batches: Vec<usize>,
    /// Retrieval scan workgroups per query (BatchLimits::scan_groups; engine default 256).
    #[arg(long, default_value_t = BatchLimits::default().scan_groups)]
    scan_groups: usize,
    /// Ranking: requests per batch.
    #[arg(long, default_value_t = 64)]
    rank_requests: usize,
    /// Ranking: candidates per request.
    #[arg(long, default_value_t = 500)]
    rank_candidates: usize,
    /// Ranking: embedding width.
    #[arg(long, default_value_t = 64)]
    rank_dim: usize,
    /// Ranking: catalog rows candidates are drawn from.
    #[arg(long, default_value_t = 100_000)]
    rank_items: usize,
    /// Skip the ranking benchmark.
    #[arg(long)]
    skip_rank: bool,
    /// Skip the retrieval benchmark.
    #[arg(long)]
    skip_retrieval: bool,
    /// Skip the CPU path (e.g. to keep a big GPU run short).
    #[arg(long)]
    skip_cpu: bool,
    /// The device's peak memory bandwidth in GB/s (10^9 bytes/s), from its spec sheet; without
    /// it the fraction-of-peak column stays blank.
    #[arg(long)]
    peak_gbps: Option<f64>,
    /// Hold the item tables as f16 (`f16_storage`; needs SHADER_F16 on the GPU, else they stay
    /// f32 there). The GPU's GB/s then counts 2 bytes per value.
    #[arg(long)]
    f16: bool,
    /// Seed of the synthetic models and requests.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

/// Latencies of one measurement.
struct Stats {
    iters: usize,
    total: Duration,
    p50: Duration,
    p99: Duration,
}

impl Stats {
    fn mean_s(&self) -> f64 {
        self.total.as_secs_f64() / self.iters as f64
    }
    fn per_s(&self) -> f64 {
        self.iters as f64 / self.total.as_secs_f64()
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs `warmup` untimed calls, then timed calls until `iters` or the time budget.
fn measure(args: &Args, mut call: impl FnMut(usize)) -> Stats {
    for i in 0..args.warmup {
        call(i);
    }
    let budget = Duration::from_secs_f64(args.max_seconds);
    let mut samples = Vec::with_capacity(args.iters);
    let started = Instant::now();
    for i in 0..args.iters.max(1) {
        let t = Instant::now();
        call(i);
        samples.push(t.elapsed());
        if samples.len() >= 3 && started.elapsed() >= budget {
            break;
        }
    }
    let total = samples.iter().sum();
    samples.sort_unstable();
    Stats {
        iters: samples.len(),
        total,
        p50: percentile(&samples, 50.0),
        p99: percentile(&samples, 99.0),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn random_vec(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.next_f32()).collect()
}

/// Loads an in-memory sample embedding model on `device`, with limits raised to fit it.
fn build_model(
    args: &Args,
    n_items: usize,
    dim: usize,
    batch: BatchLimits,
    device: &ComputeDevice,
) -> Result<(Model, Duration), String> {
    let spec = SampleSpec {
        kind: ModelKind::Embedding,
        similarity: Similarity::Dot,
        n_users: 0,
        ..SampleSpec::embedding(n_items, dim, args.seed)
    };
    let bytes = sample_model(&spec);
    let d = ModelLimits::default();
    let params = (n_items * dim) as u64;
    let limits = ModelLimits {
        max_file_bytes: d.max_file_bytes.max(bytes.len() as u64),
        max_items: d.max_items.max(n_items as u64),
        max_dim: d.max_dim.max(dim as u64),
        max_parameters: d.max_parameters.max(params),
        ..d
    };
    let config = ScoringConfig {
        limits,
        batch,
        storage: if args.f16 {
            TableStorage::F16
        } else {
            TableStorage::F32
        },
        ..ScoringConfig::default()
    };
    let t = Instant::now();
    let model = Model::from_bytes(&bytes, &config, device).map_err(|e| e.to_string())?;
    Ok((model, t.elapsed()))
}

/// Query vectors and candidate lists of one ranking batch.
type RankBatch = (Vec<Vec<f32>>, Vec<Vec<u32>>);

struct RankRow {
    path: &'static str,
    stats: Stats,
}

fn bench_rank(args: &Args, device: Option<&ComputeDevice>) -> Result<(), String> {
    let (n_req, n_cand, dim, n_items) = (
        args.rank_requests,
        args.rank_candidates,
        args.rank_dim,
        args.rank_items,
    );
    println!();
    println!(
        "== Batched ranking: {n_req} requests x {n_cand} candidates, dim {dim}, dot, \
         catalog {n_items} items ({:.1} MB) ==",
        (n_items * dim * 4) as f64 / 1e6
    );
    let batch = BatchLimits {
        max_queries: BatchLimits::default().max_queries.max(n_req),
        max_candidates: BatchLimits::default().max_candidates.max(n_req * n_cand),
        ..BatchLimits::default()
    };
    let on = device.unwrap_or(&ComputeDevice::Cpu);
    let (model, load) = build_model(args, n_items, dim, batch, on)?;
    println!("model load: {:.0} ms on {}", ms(load), on.describe());

    // A few different batches, rotated, so consecutive calls do not replay the same ids.
    let mut rng = SplitMix64(args.seed ^ 0x5eed);
    let pool: Vec<RankBatch> = (0..8)
        .map(|_| {
            let q = (0..n_req).map(|_| random_vec(&mut rng, dim)).collect();
            let c = (0..n_req)
                .map(|_| {
                    (0..n_cand)
                        .map(|_| rng.below(n_items as u64) as u32)
                        .collect()
                })
                .collect();
            (q, c)
        })
        .collect();
    let batches: Vec<Vec<RankRequest<'_>>> = pool
        .iter()
        .map(|(q, c)| {
            q.iter()
                .zip(c)
                .map(|(q, c)| RankRequest {
                    query: Query::Vector(q),
                    candidates: c,
                })
                .collect()
        })
        .collect();

    let mut rows = Vec::new();
    if device.is_some() {
        // Agreement check, once.
        let gpu = model.rank(&batches[0]).map_err(|e| e.to_string())?;
        let cpu = model.rank_cpu(&batches[0]).map_err(|e| e.to_string())?;
        let max_diff = gpu
            .iter()
            .flatten()
            .zip(cpu.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        println!("check: GPU vs CPU max |score difference| = {max_diff:.2e}");
        let stats = measure(args, |i| {
            let out = model.rank(&batches[i % batches.len()]).expect("GPU rank");
            std::hint::black_box(out);
        });
        rows.push(RankRow { path: "gpu", stats });
    }
    if !args.skip_cpu {
        let stats = measure(args, |i| {
            let out = model
                .rank_cpu(&batches[i % batches.len()])
                .expect("CPU rank");
            std::hint::black_box(out);
        });
        rows.push(RankRow { path: "cpu", stats });
    }
    println!(
        "{:<5} {:>6} {:>11} {:>12} {:>9} {:>9} {:>9}",
        "path", "iters", "batches/s", "requests/s", "p50 ms", "p99 ms", "mean ms"
    );
    for r in &rows {
        let s = &r.stats;
        println!(
            "{:<5} {:>6} {:>11.1} {:>12.0} {:>9.3} {:>9.3} {:>9.3}",
            r.path,
            s.iters,
            s.per_s(),
            s.per_s() * n_req as f64,
            ms(s.p50),
            ms(s.p99),
            s.mean_s() * 1e3
        );
    }
    if let [g, c] = &rows[..] {
        println!(
            "GPU/CPU throughput ratio: {:.2}x",
            g.stats.per_s() / c.stats.per_s()
        );
    }
    Ok(())
}

fn bench_retrieval(args: &Args, device: Option<&ComputeDevice>) -> Result<(), String> {
    let (n_items, dim, k) = (args.items, args.dim, args.k);
    let matrix_bytes = (n_items * dim * 4) as f64;
    println!();
    println!(
        "== Full-catalog retrieval: {n_items} items x {dim} dims ({:.0} MB), top-{k}, \
         batches of {:?} queries ==",
        matrix_bytes / 1e6,
        args.batches
    );
    let max_batch = args.batches.iter().copied().max().unwrap_or(1).max(1);
    let batch = BatchLimits {
        max_queries: max_batch,
        max_k: k.max(1),
        scan_groups: args.scan_groups,
        ..BatchLimits::default()
    };
    let mut on = device.cloned().unwrap_or(ComputeDevice::Cpu);
    let (model, load) = match build_model(args, n_items, dim, batch.clone(), &on) {
        Ok(m) => m,
        Err(e) if device.is_some() => {
            println!("GPU load failed ({e}); GPU part skipped, CPU path only");
            on = ComputeDevice::Cpu;
            build_model(args, n_items, dim, batch, &on)?
        }
        Err(e) => return Err(e),
    };
    let gpu = matches!(on, ComputeDevice::Gpu(_));
    println!("model load: {:.0} ms on {}", ms(load), on.describe());
    if gpu {
        let groups = n_items.div_ceil(1024).min(args.scan_groups);
        println!(
            "scan: {groups} workgroups per query, {} rows each; every query re-reads the \
             matrix (transposed, coalesced loads): {:.0} MB per query",
            n_items.div_ceil(groups),
            matrix_bytes / 1e6
        );
    }

    let mut rng = SplitMix64(args.seed ^ 0x70b0);
    let vectors: Vec<Vec<f32>> = (0..max_batch * 4)
        .map(|_| random_vec(&mut rng, dim))
        .collect();

    // Checks print as they run; the table comes after the last measurement.
    let mut table = vec![format!(
        "{:<5} {:>5} {:>6} {:>11} {:>10} {:>10} {:>10} {:>9} {:>7}",
        "path", "batch", "iters", "queries/s", "p50 ms", "p99 ms", "mean ms", "GB/s", "%peak"
    )];
    let mut ratios = Vec::new();
    for &b in &args.batches {
        if b == 0 {
            continue;
        }
        // Four different query batches, rotated.
        let sets: Vec<Vec<Query<'_>>> = vectors
            .chunks_exact(b)
            .take(4)
            .map(|c| c.iter().map(|v| Query::Vector(v)).collect())
            .collect();
        let bytes = matrix_bytes * b as f64;
        let row = |path: &str, s: &Stats, peak: Option<f64>, value_bytes: f64| {
            let gbps = bytes * value_bytes / 4.0 / s.p50.as_secs_f64() / 1e9;
            let frac = peak.map_or(String::new(), |p| format!("{:.1}%", 100.0 * gbps / p));
            format!(
                "{:<5} {:>5} {:>6} {:>11.1} {:>10.3} {:>10.3} {:>10.3} {:>9.2} {:>7}",
                path,
                b,
                s.iters,
                s.per_s() * b as f64,
                ms(s.p50),
                ms(s.p99),
                s.mean_s() * 1e3,
                gbps,
                frac
            )
        };
        let mut g_rate = None;
        if gpu {
            let hits = model.top_k(&sets[0], k).map_err(|e| e.to_string())?;
            let want = model.top_k_cpu(&sets[0], k).map_err(|e| e.to_string())?;
            let same: usize = hits
                .iter()
                .zip(&want)
                .map(|(h, w)| {
                    let w: std::collections::HashSet<u32> = w.iter().map(|x| x.item).collect();
                    h.iter().filter(|x| w.contains(&x.item)).count()
                })
                .sum();
            let total: usize = want.iter().map(Vec::len).sum();
            println!("check (batch {b}): GPU top-{k} ids found in the CPU top-{k}: {same}/{total}");
            let s = measure(args, |i| {
                let out = model.top_k(&sets[i % sets.len()], k).expect("GPU top_k");
                std::hint::black_box(out);
            });
            let value_bytes = match model.execution_path() {
                ExecutionPath::Gpu {
                    f16_tables: true, ..
                } => 2.0,
                _ => 4.0,
            };
            table.push(row("gpu", &s, args.peak_gbps, value_bytes));
            g_rate = Some(s.per_s());
        }
        if !args.skip_cpu {
            let s = measure(args, |i| {
                let out = model
                    .top_k_cpu(&sets[i % sets.len()], k)
                    .expect("CPU top_k");
                std::hint::black_box(out);
            });
            // --peak-gbps is the GPU's figure: no fraction for the CPU row.
            table.push(row("cpu", &s, None, 4.0));
            if let Some(g) = g_rate {
                ratios.push((b, g / s.per_s()));
            }
        }
    }
    for line in table {
        println!("{line}");
    }
    for (b, r) in ratios {
        println!("GPU/CPU throughput ratio, batch {b}: {r:.2}x");
    }
    println!(
        "GB/s = {:.0} MB (f32 matrix{}) x batch / p50 batch time; %peak = GB/s / --peak-gbps{}",
        matrix_bytes / 1e6,
        if gpu && args.f16 {
            "; half that for the GPU's f16 tables"
        } else {
            ""
        },
        if args.peak_gbps.is_none() {
            " (not given: blank)"
        } else {
            ""
        }
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();

    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("scoring_bench: backend {}", args.backend);
    let device = match acquire_device(args.backend, true) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("no device for --backend {}: {e}", args.backend);
            return ExitCode::FAILURE;
        }
    };
    let gpu = match &device {
        ComputeDevice::Gpu(g) => {
            let info = g.info();
            let l = g.device().limits();
            println!(
                "GPU path: adapter \"{}\", backend {:?}, type {:?}{}, driver {} {}",
                info.name,
                info.backend,
                info.device_type,
                if g.is_software() { " (software)" } else { "" },
                info.driver,
                info.driver_info
            );
            println!(
                "          limits: max_buffer_size {} MB, max_storage_buffer_binding_size {} MB",
                l.max_buffer_size >> 20,
                l.max_storage_buffer_binding_size >> 20
            );
            Some(device.clone())
        }
        ComputeDevice::Cpu => {
            println!(
                "GPU path: none (backend {}): GPU part skipped",
                args.backend
            );
            None
        }
    };
    println!(
        "CPU path: nproc {nproc}; the CPU path runs on one core per call{}",
        if args.skip_cpu { ", skipped" } else { "" }
    );
    if gpu.is_none() && args.skip_cpu {
        println!("nothing to run: no GPU and --skip-cpu");
        return ExitCode::SUCCESS;
    }
    let mut ok = true;
    if !args.skip_rank {
        if let Err(e) = bench_rank(&args, gpu.as_ref()) {
            eprintln!("ranking benchmark failed: {e}");
            ok = false;
        }
    }
    if !args.skip_retrieval {
        if let Err(e) = bench_retrieval(&args, gpu.as_ref()) {
            eprintln!("retrieval benchmark failed: {e}");
            ok = false;
        }
    }
    if gpu.is_none() {
        println!();
        println!("GPU part skipped: no GPU device (CPU numbers only)");
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
