//! The GPU path: per-model buffers, pipelines and bind groups, all created at load; a batch
//! writes its inputs into the preallocated buffers, records its dispatches in one command
//! buffer, submits once, maps the one readback buffer and polls the device once.
//!
//! A model's scratch buffers are used by one batch at a time (a mutex): dynamic batching in
//! front of the model is what makes a GPU worth it anyway.

use std::num::NonZeroU64;
use std::sync::Mutex;

use wgpu::util::DeviceExt;

use super::device::GpuDevice;
use super::error::GpuError;
use super::format::Layer;
use super::model::Hit;
use super::shaders::{GATHER_SCORE, MLP_FORWARD, TOPK_COMMON, TOPK_MERGE, TOPK_SCAN};

/// Items one top-k workgroup sorts (topk_common.wgsl `WINDOW`).
pub(crate) const WINDOW: usize = 1024;
/// Invocations per workgroup of gather_score.wgsl.
const GATHER_WG: usize = 256;
const SENTINEL: u32 = u32::MAX;
/// Bytes of one top-k entry (score f32, item u32).
const ENTRY: u64 = 8;

/// Element type of the embedding tables in device memory (the kernels' `Stored` alias).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored {
    F32,
    /// Needs a device with `SHADER_F16`.
    F16,
}

/// A kernel's full source: the `Stored` alias (and `enable f16;`), then `parts` in order.
fn kernel_source(stored: Stored, parts: &[&str]) -> String {
    let mut src = String::from(match stored {
        Stored::F32 => "alias Stored = f32;\n",
        Stored::F16 => "enable f16;\nalias Stored = f16;\n",
    });
    for part in parts {
        src.push_str(part);
        src.push('\n');
    }
    src
}

/// How a `[rows, cols]` row-major host table is laid out in device memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    RowMajor,
    /// `[cols, rows]`: value (r, c) at `c * rows + r`.
    Transposed,
}

/// Values per run handed to the writer (a transposed run is one column of this many rows).
const RUN: usize = 1024;

/// Calls `emit(offset, run)` with `values` (`[rows, cols]` row-major) cut into runs that are
/// contiguous in `layout`, `offset` counted in values. A transposed table is produced in
/// blocks of `RUN` rows, so the rows being read stay in cache while their columns go out.
fn table_runs(values: &[f32], cols: usize, layout: Layout, mut emit: impl FnMut(usize, &[f32])) {
    match layout {
        Layout::RowMajor => {
            for (i, run) in values.chunks(RUN).enumerate() {
                emit(i * RUN, run);
            }
        }
        Layout::Transposed => {
            let rows = values.len() / cols;
            let mut run = Vec::with_capacity(RUN);
            for r0 in (0..rows).step_by(RUN) {
                let r1 = (r0 + RUN).min(rows);
                for c in 0..cols {
                    run.clear();
                    run.extend((r0..r1).map(|r| values[r * cols + c]));
                    emit(c * rows + r0, &run);
                }
            }
        }
    }
}

/// Uploads an embedding table (`[values.len() / cols, cols]`) as `stored` (values already
/// rounded to f16 for `F16`) in `layout`. The size is checked against the device first, and
/// the values are written straight into the mapped buffer: no host copy of the table.
fn upload_table(
    dev: &GpuDevice,
    label: &str,
    values: &[f32],
    cols: usize,
    stored: Stored,
    layout: Layout,
) -> Result<wgpu::Buffer, GpuError> {
    let elem = match stored {
        Stored::F32 => 4,
        Stored::F16 => 2,
    };
    // Zero-sized bindings are invalid and sizes are multiples of 4 bytes.
    let bytes = ((values.len() * elem) as u64).max(4).next_multiple_of(4);
    fits(dev, label, bytes, true).map_err(|e| match e {
        GpuError::TooLargeForDevice { what, bytes, limit } => GpuError::TableTooLarge {
            table: what,
            bytes,
            limit,
        },
        other => other,
    })?;
    let buf = dev.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: true,
    });
    {
        let mut view = buf
            .slice(..)
            .get_mapped_range_mut()
            .map_err(|e| GpuError::Allocation(e.to_string()))?;
        let mut bytes = Vec::with_capacity(RUN * elem);
        table_runs(values, cols, layout, |offset, run| {
            bytes.clear();
            match stored {
                Stored::F32 => bytes.extend_from_slice(bytemuck::cast_slice(run)),
                Stored::F16 => {
                    for &v in run {
                        bytes.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
                    }
                }
            }
            let at = offset * elem;
            view.slice(at..at + bytes.len()).copy_from_slice(&bytes);
        });
    }
    buf.unmap();
    Ok(buf)
}

fn pipeline(
    dev: &GpuDevice,
    kernel: &'static str,
    source: &str,
) -> Result<wgpu::ComputePipeline, GpuError> {
    let device = dev.device();
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(kernel),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(kernel),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    match pollster::block_on(scope.pop()) {
        Some(e) => Err(GpuError::Pipeline {
            kernel,
            message: e.to_string(),
        }),
        None => Ok(pipeline),
    }
}

/// Checks one buffer against the device's limits before it is created.
fn fits(dev: &GpuDevice, what: &str, bytes: u64, storage: bool) -> Result<(), GpuError> {
    let l = dev.device().limits();
    let limit = if storage {
        l.max_buffer_size.min(l.max_storage_buffer_binding_size)
    } else {
        l.max_buffer_size
    };
    if bytes > limit {
        return Err(GpuError::TooLargeForDevice {
            what: what.to_string(),
            bytes,
            limit,
        });
    }
    Ok(())
}

/// Runs `build` inside out-of-memory and validation error scopes.
fn scoped<T>(dev: &GpuDevice, build: impl FnOnce() -> Result<T, GpuError>) -> Result<T, GpuError> {
    let validation = dev.device().push_error_scope(wgpu::ErrorFilter::Validation);
    let oom = dev
        .device()
        .push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let built = build();
    let oom = pollster::block_on(oom.pop());
    let validation = pollster::block_on(validation.pop());
    let built = built?;
    if let Some(e) = oom.or(validation) {
        return Err(GpuError::Allocation(e.to_string()));
    }
    Ok(built)
}

fn storage_init(dev: &GpuDevice, label: &str, data: &[u8]) -> Result<wgpu::Buffer, GpuError> {
    fits(dev, label, data.len() as u64, true)?;
    // Zero-sized bindings are invalid: a 4-byte placeholder stands in for an empty table.
    let placeholder = [0u8; 4];
    let contents = if data.is_empty() {
        &placeholder[..]
    } else {
        data
    };
    Ok(dev
        .device()
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents,
            usage: wgpu::BufferUsages::STORAGE,
        }))
}

fn buffer(
    dev: &GpuDevice,
    label: &str,
    bytes: u64,
    usage: wgpu::BufferUsages,
) -> Result<wgpu::Buffer, GpuError> {
    let bytes = bytes.max(16).next_multiple_of(4);
    fits(
        dev,
        label,
        bytes,
        usage.contains(wgpu::BufferUsages::STORAGE),
    )?;
    Ok(dev.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes,
        usage,
        mapped_at_creation: false,
    }))
}

const IO: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);
const UNIFORM: wgpu::BufferUsages = wgpu::BufferUsages::UNIFORM.union(wgpu::BufferUsages::COPY_DST);
const READBACK: wgpu::BufferUsages =
    wgpu::BufferUsages::MAP_READ.union(wgpu::BufferUsages::COPY_DST);

fn bind_group(
    dev: &GpuDevice,
    label: &str,
    pipeline: &wgpu::ComputePipeline,
    resources: &[wgpu::BindingResource<'_>],
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry<'_>> = resources
        .iter()
        .enumerate()
        .map(|(i, r)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource: r.clone(),
        })
        .collect();
    dev.device().create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(label),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    })
}

/// A 2-D grid covering `groups` workgroups within the per-dimension limit.
fn grid(dev: &GpuDevice, groups: usize) -> (u32, u32) {
    let max = dev.device().limits().max_compute_workgroups_per_dimension as usize;
    let x = groups.clamp(1, max);
    (x as u32, groups.div_ceil(x) as u32)
}

/// Submits `encoder` after copying `bytes` of `src` into `staging`, maps it, polls once and
/// returns the bytes.
fn submit_and_read(
    dev: &GpuDevice,
    mut encoder: wgpu::CommandEncoder,
    src: &wgpu::Buffer,
    staging: &wgpu::Buffer,
    bytes: u64,
) -> Result<Vec<u8>, GpuError> {
    encoder.copy_buffer_to_buffer(src, 0, staging, 0, bytes);
    dev.queue().submit([encoder.finish()]);
    let slice = staging.slice(0..bytes);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    let result = (|| {
        dev.device()
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        rx.recv()
            .map_err(|_| GpuError::Readback("the map callback never ran".into()))?
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        let view = slice
            .get_mapped_range()
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        Ok(view.to_vec())
    })();
    staging.unmap();
    result
}

fn words(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// Sizes the GPU buffers of a model are allocated for.
#[derive(Debug, Clone)]
pub(crate) struct Capacity {
    pub max_queries: usize,
    pub max_candidates: usize,
    pub max_k: usize,
    pub max_rows: usize,
    pub scan_groups: usize,
}

/// How many merge passes top-k needs for `n_lists` lists of `k` entries.
fn merge_passes(n_lists: usize, k: usize) -> usize {
    let mut windows = n_lists;
    let mut len = n_lists * k;
    let mut passes = 0;
    while windows > 1 {
        windows = len.div_ceil(WINDOW);
        len = windows * k;
        passes += 1;
    }
    passes
}

pub(crate) struct EmbeddingGpu {
    dev: GpuDevice,
    busy: Mutex<()>,
    dim: usize,
    n_items: usize,
    cap: Capacity,
    queries: wgpu::Buffer,
    staging: wgpu::Buffer,
    // ranking
    rank_pipeline: wgpu::ComputePipeline,
    rank_params: wgpu::Buffer,
    pairs: wgpu::Buffer,
    scores: wgpu::Buffer,
    rank_bg: wgpu::BindGroup,
    // retrieval
    scan_pipeline: wgpu::ComputePipeline,
    merge_pipeline: wgpu::ComputePipeline,
    topk_params: wgpu::Buffer,
    param_slot: u64,
    ping: wgpu::Buffer,
    pong: wgpu::Buffer,
    scan_bg: wgpu::BindGroup,
    /// Merge pass `i` reads ping (even i) or pong (odd i) and writes the other.
    merge_bgs: Vec<wgpu::BindGroup>,
    /// Scan workgroups per query, and the catalog rows each one owns.
    n_groups: usize,
    span: usize,
}

impl EmbeddingGpu {
    /// Uploads `items` (`[n_items, dim]`, already unit length for cosine) and builds all
    /// buffers for batches up to `cap`.
    pub fn new(
        dev: &GpuDevice,
        items: &[f32],
        dim: usize,
        cap: Capacity,
        stored: Stored,
    ) -> Result<EmbeddingGpu, GpuError> {
        let n_items = items.len() / dim;
        let n_groups = n_items.div_ceil(WINDOW).min(cap.scan_groups);
        let span = n_items.div_ceil(n_groups);
        let max_dim = dev.device().limits().max_compute_workgroups_per_dimension as usize;
        if cap.max_queries > max_dim {
            return Err(GpuError::TooLargeForDevice {
                what: format!("top-k grid of {} queries", cap.max_queries),
                bytes: cap.max_queries as u64,
                limit: max_dim as u64,
            });
        }
        let rank_pipeline = pipeline(dev, "gather_score", &kernel_source(stored, &[GATHER_SCORE]))?;
        let scan_pipeline = pipeline(
            dev,
            "topk_scan",
            &kernel_source(stored, &[TOPK_COMMON, TOPK_SCAN]),
        )?;
        let merge_pipeline = pipeline(
            dev,
            "topk_merge",
            &kernel_source(Stored::F32, &[TOPK_COMMON, TOPK_MERGE]),
        )?;
        let k = cap.max_k.min(n_items).max(1);
        let passes = merge_passes(n_groups, k);
        let align = dev.device().limits().min_uniform_buffer_offset_alignment as u64;
        let param_slot = 256u64.max(align);
        scoped(dev, || {
            // [dim, n_items]: coalesced loads in the scan (topk_scan.wgsl).
            let items_buf = upload_table(dev, "items", items, dim, stored, Layout::Transposed)?;
            let queries = buffer(dev, "queries", (cap.max_queries * dim * 4) as u64, IO)?;
            let pairs = buffer(dev, "pairs", (cap.max_candidates * 8) as u64, IO)?;
            let scores = buffer(dev, "scores", (cap.max_candidates * 4) as u64, IO)?;
            let topk_len = (cap.max_queries * n_groups * k) as u64 * ENTRY;
            let ping = buffer(dev, "topk ping", topk_len, IO)?;
            let pong = buffer(dev, "topk pong", topk_len, IO)?;
            let staging_len =
                ((cap.max_candidates * 4) as u64).max((cap.max_queries * k) as u64 * ENTRY);
            let staging = buffer(dev, "readback", staging_len, READBACK)?;
            let rank_params = buffer(dev, "rank params", 16, UNIFORM)?;
            let topk_params = buffer(
                dev,
                "topk params",
                param_slot * (passes as u64 + 1),
                UNIFORM,
            )?;
            // Slot 0: the scan's 32-byte parameters; slot i: merge pass i's 16 bytes.
            let slot = |i: u64| {
                wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &topk_params,
                    offset: i * param_slot,
                    size: NonZeroU64::new(if i == 0 { 32 } else { 16 }),
                })
            };
            let rank_bg = bind_group(
                dev,
                "gather_score",
                &rank_pipeline,
                &[
                    rank_params.as_entire_binding(),
                    items_buf.as_entire_binding(),
                    queries.as_entire_binding(),
                    pairs.as_entire_binding(),
                    scores.as_entire_binding(),
                ],
            );
            let scan_bg = bind_group(
                dev,
                "topk_scan",
                &scan_pipeline,
                &[
                    slot(0),
                    items_buf.as_entire_binding(),
                    queries.as_entire_binding(),
                    ping.as_entire_binding(),
                ],
            );
            let merge_bgs = (0..passes)
                .map(|i| {
                    let (src, dst) = if i % 2 == 0 {
                        (&ping, &pong)
                    } else {
                        (&pong, &ping)
                    };
                    bind_group(
                        dev,
                        "topk_merge",
                        &merge_pipeline,
                        &[
                            slot(i as u64 + 1),
                            src.as_entire_binding(),
                            dst.as_entire_binding(),
                        ],
                    )
                })
                .collect();
            Ok(EmbeddingGpu {
                dev: dev.clone(),
                busy: Mutex::new(()),
                dim,
                n_items,
                cap: cap.clone(),
                queries,
                staging,
                rank_pipeline,
                rank_params,
                pairs,
                scores,
                rank_bg,
                scan_pipeline,
                merge_pipeline,
                topk_params,
                param_slot,
                ping,
                pong,
                scan_bg,
                merge_bgs,
                n_groups,
                span,
            })
        })
    }

    /// Scores of each pair; `queries` is `[n, dim]`, pairs checked by the caller, not empty.
    pub fn gather_score(&self, queries: &[f32], pairs: &[[u32; 2]]) -> Result<Vec<f32>, GpuError> {
        debug_assert!(!pairs.is_empty() && pairs.len() <= self.cap.max_candidates);
        let _guard = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let q = self.dev.queue();
        let (gx, gy) = grid(&self.dev, pairs.len().div_ceil(GATHER_WG));
        let params = [pairs.len() as u32, self.dim as u32, gx, self.n_items as u32];
        q.write_buffer(&self.rank_params, 0, bytemuck::cast_slice(&params));
        q.write_buffer(&self.queries, 0, bytemuck::cast_slice(queries));
        q.write_buffer(&self.pairs, 0, bytemuck::cast_slice(pairs));
        let mut enc = self
            .dev
            .device()
            .create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&self.rank_pipeline);
            pass.set_bind_group(0, &self.rank_bg, &[]);
            pass.dispatch_workgroups(gx, gy, 1);
        }
        let bytes = (pairs.len() * 4) as u64;
        let out = submit_and_read(&self.dev, enc, &self.scores, &self.staging, bytes)?;
        Ok(words(&out).map(f32::from_bits).collect())
    }

    /// Best `k` (1..=min(max_k, n_items)) of each query in `queries` (`[n, dim]`, n >= 1).
    pub fn top_k(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<Hit>>, GpuError> {
        let n_q = queries.len() / self.dim;
        debug_assert!(n_q >= 1 && n_q <= self.cap.max_queries);
        debug_assert!(k >= 1 && k <= self.cap.max_k.min(self.n_items));
        let _guard = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let q = self.dev.queue();
        q.write_buffer(&self.queries, 0, bytemuck::cast_slice(queries));
        let passes = merge_passes(self.n_groups, k);
        let scan = [
            self.n_items as u32,
            self.dim as u32,
            k as u32,
            (self.n_groups * k) as u32,
            self.span as u32,
            0,
            0,
            0,
        ];
        q.write_buffer(&self.topk_params, 0, bytemuck::cast_slice(&scan));
        let mut windows = self.n_groups;
        let mut lens = Vec::with_capacity(passes);
        let mut len = self.n_groups * k;
        for i in 0..passes {
            windows = len.div_ceil(WINDOW);
            let out_len = windows * k;
            let merge = [len as u32, k as u32, out_len as u32, 0];
            let offset = (i as u64 + 1) * self.param_slot;
            q.write_buffer(&self.topk_params, offset, bytemuck::cast_slice(&merge));
            lens.push(windows);
            len = out_len;
        }
        debug_assert_eq!(windows, 1);
        let mut enc = self
            .dev
            .device()
            .create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&self.scan_pipeline);
            pass.set_bind_group(0, &self.scan_bg, &[]);
            pass.dispatch_workgroups(self.n_groups as u32, n_q as u32, 1);
            pass.set_pipeline(&self.merge_pipeline);
            for (i, &w) in lens.iter().enumerate() {
                pass.set_bind_group(0, &self.merge_bgs[i], &[]);
                pass.dispatch_workgroups(w as u32, n_q as u32, 1);
            }
        }
        let result = if passes.is_multiple_of(2) {
            &self.ping
        } else {
            &self.pong
        };
        let bytes = (n_q * k) as u64 * ENTRY;
        let out = submit_and_read(&self.dev, enc, result, &self.staging, bytes)?;
        let w: Vec<u32> = words(&out).collect();
        Ok(w.chunks_exact(2 * k)
            .map(|list| {
                list.chunks_exact(2)
                    .filter(|e| e[1] != SENTINEL)
                    .map(|e| Hit {
                        item: e[1],
                        score: f32::from_bits(e[0]),
                    })
                    .collect()
            })
            .collect())
    }
}

pub(crate) struct MlpGpu {
    dev: GpuDevice,
    busy: Mutex<()>,
    n_dense: usize,
    max_rows: usize,
    params: wgpu::Buffer,
    rows: wgpu::Buffer,
    dense: wgpu::Buffer,
    out: wgpu::Buffer,
    staging: wgpu::Buffer,
    pipeline: wgpu::ComputePipeline,
    bg: wgpu::BindGroup,
    static_params: [u32; 5],
}

impl MlpGpu {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dev: &GpuDevice,
        users: &[f32],
        items: &[f32],
        layers: &[Layer],
        user_dim: usize,
        item_dim: usize,
        n_dense: usize,
        max_rows: usize,
        stored: Stored,
    ) -> Result<MlpGpu, GpuError> {
        let pipeline = pipeline(dev, "mlp_forward", &kernel_source(stored, &[MLP_FORWARD]))?;
        let mut weights = Vec::new();
        let mut table: Vec<u32> = Vec::new();
        for layer in layers {
            let w_off = weights.len() as u32;
            weights.extend_from_slice(&layer.w);
            let b_off = weights.len() as u32;
            weights.extend_from_slice(&layer.b);
            table.extend([layer.n_in as u32, layer.n_out as u32, w_off, b_off]);
        }
        scoped(dev, || {
            let users_buf = upload_table(dev, "users", users, user_dim, stored, Layout::RowMajor)?;
            let items_buf = upload_table(dev, "items", items, item_dim, stored, Layout::RowMajor)?;
            let weights_buf = storage_init(dev, "mlp weights", bytemuck::cast_slice(&weights))?;
            let layers_buf = storage_init(dev, "mlp layers", bytemuck::cast_slice(&table))?;
            let params = buffer(dev, "mlp params", 32, UNIFORM)?;
            let rows = buffer(dev, "rows", (max_rows * 8) as u64, IO)?;
            let dense = buffer(dev, "dense", (max_rows * n_dense * 4) as u64, IO)?;
            let out = buffer(dev, "probabilities", (max_rows * 4) as u64, IO)?;
            let staging = buffer(dev, "readback", (max_rows * 4) as u64, READBACK)?;
            let bg = bind_group(
                dev,
                "mlp_forward",
                &pipeline,
                &[
                    params.as_entire_binding(),
                    users_buf.as_entire_binding(),
                    items_buf.as_entire_binding(),
                    weights_buf.as_entire_binding(),
                    layers_buf.as_entire_binding(),
                    rows.as_entire_binding(),
                    dense.as_entire_binding(),
                    out.as_entire_binding(),
                ],
            );
            Ok(MlpGpu {
                dev: dev.clone(),
                busy: Mutex::new(()),
                n_dense,
                max_rows,
                params,
                rows,
                dense,
                out,
                staging,
                pipeline: pipeline.clone(),
                bg,
                static_params: [
                    0,
                    layers.len() as u32,
                    user_dim as u32,
                    item_dim as u32,
                    n_dense as u32,
                ],
            })
        })
    }

    /// Probabilities of `rows` (ids checked by the caller, 1..=max_rows rows); `dense` is
    /// `[rows, n_dense]`.
    pub fn forward(&self, rows: &[[u32; 2]], dense: &[f32]) -> Result<Vec<f32>, GpuError> {
        debug_assert!(!rows.is_empty() && rows.len() <= self.max_rows);
        debug_assert_eq!(dense.len(), rows.len() * self.n_dense);
        let _guard = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let q = self.dev.queue();
        let (gx, gy) = grid(&self.dev, rows.len());
        let mut params = [0u32; 8];
        params[..5].copy_from_slice(&self.static_params);
        params[0] = rows.len() as u32;
        params[5] = gx;
        q.write_buffer(&self.params, 0, bytemuck::cast_slice(&params));
        q.write_buffer(&self.rows, 0, bytemuck::cast_slice(rows));
        if !dense.is_empty() {
            q.write_buffer(&self.dense, 0, bytemuck::cast_slice(dense));
        }
        let mut enc = self
            .dev
            .device()
            .create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&self.pipeline);
            pass.set_bind_group(0, &self.bg, &[]);
            pass.dispatch_workgroups(gx, gy, 1);
        }
        let bytes = (rows.len() * 4) as u64;
        let out = submit_and_read(&self.dev, enc, &self.out, &self.staging, bytes)?;
        Ok(words(&out).map(f32::from_bits).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_written_row_major_or_transposed() {
        let write = |m: &[f32], cols: usize, layout: Layout| {
            let mut t = vec![f32::NAN; m.len()];
            table_runs(m, cols, layout, |at, run| {
                t[at..at + run.len()].copy_from_slice(run)
            });
            t
        };
        let transpose = |m: &[f32], cols: usize| write(m, cols, Layout::Transposed);
        // 3 x 2 -> 2 x 3; and a shape spanning several blocks.
        assert_eq!(
            transpose(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2),
            vec![1.0, 3.0, 5.0, 2.0, 4.0, 6.0]
        );
        let long: Vec<f32> = (0..2500).map(|i| i as f32).collect();
        assert_eq!(write(&long, 5, Layout::RowMajor), long);
        let (rows, cols) = (2 * RUN + 130, 67);
        let m: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let t = transpose(&m, cols);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(t[c * rows + r], m[r * cols + c]);
            }
        }
    }

    #[test]
    fn merge_passes_shrink_to_one_window() {
        assert_eq!(merge_passes(1, 10), 0);
        assert_eq!(merge_passes(2, 10), 1);
        assert_eq!(merge_passes(9, 128), 2); // 1152 -> 2 windows -> 256 -> done
        assert_eq!(merge_passes(8, 128), 1);
        assert_eq!(merge_passes(5, 500), 3); // 2500 -> 3 windows -> 1500 -> 2 -> 1000 -> 1
        assert_eq!(merge_passes(65535, 512), 16);
    }

    #[test]
    fn every_kernel_validates_and_a_broken_one_is_a_clear_error() {
        let dev = match super::super::acquire_device(super::super::BackendChoice::Auto, true) {
            Ok(super::super::ComputeDevice::Gpu(d)) => d,
            _ => {
                assert!(
                    std::env::var_os("GATEWAY_REQUIRE_GPU_TESTS").is_none(),
                    "GATEWAY_REQUIRE_GPU_TESTS is set but there is no Vulkan adapter"
                );
                eprintln!("SKIP: no Vulkan adapter (install mesa-vulkan-drivers for lavapipe)");
                return;
            }
        };
        let mut storages = vec![Stored::F32];
        if dev.has_f16() {
            storages.push(Stored::F16);
        }
        for stored in storages {
            let src = |parts: &[&str]| kernel_source(stored, parts);
            pipeline(&dev, "gather_score", &src(&[GATHER_SCORE])).unwrap();
            pipeline(&dev, "topk_scan", &src(&[TOPK_COMMON, TOPK_SCAN])).unwrap();
            pipeline(&dev, "topk_merge", &src(&[TOPK_COMMON, TOPK_MERGE])).unwrap();
            pipeline(&dev, "mlp_forward", &src(&[MLP_FORWARD])).unwrap();
        }
        // topk_scan without the shared sort helpers does not compile.
        let err =
            pipeline(&dev, "topk_scan", &kernel_source(Stored::F32, &[TOPK_SCAN])).unwrap_err();
        assert!(
            matches!(
                &err,
                GpuError::Pipeline {
                    kernel: "topk_scan",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("topk_scan"), "{err}");
    }
}
