// Full-catalog scan, pass 1 of top-k. Workgroup (group, query) owns the catalog rows
// [group * span, (group + 1) * span): it scores the first 1024 against its query and sorts
// them in workgroup memory, then, while rows remain, keeps the best `k` in slots 0..k, scores
// the next 1024 - k rows into the other slots and sorts again (k <= 512, so each round covers
// at least 512 new rows). It writes its best `k` to `out[query * out_stride + group * k ..]`.
// Rows past the span or the catalog are sentinels. topk_merge.wgsl reduces the per-group
// lists. Needs topk_common.wgsl prepended.

// `Stored` is the element type of the embedding tables: f32, or f16 (with `enable f16;`) for
// f16 table storage; the host prepends the alias. Arithmetic is f32 either way.

struct ScanParams {
    n_items: u32,
    dim: u32,
    k: u32,
    out_stride: u32,
    span: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: ScanParams;
@group(0) @binding(1) var<storage, read> items: array<Stored>;
@group(0) @binding(2) var<storage, read> queries: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<Entry>;

// Fills slots first_slot..WINDOW with rows base.. (sentinels at and past `end`).
fn fill(lid: u32, qoff: u32, first_slot: u32, base: u32, end: u32) {
    for (var t = 0u; t < PER_THREAD; t = t + 1u) {
        let slot = lid + t * WG;
        if (slot >= first_slot) {
            let item = base + (slot - first_slot);
            var s = 0.0;
            var id = SENTINEL;
            if (item < end) {
                let row = item * params.dim;
                for (var d = 0u; d < params.dim; d = d + 1u) {
                    s = s + queries[qoff + d] * f32(items[row + d]);
                }
                id = item;
            }
            s_score[slot] = s;
            s_idx[slot] = id;
        }
    }
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = wg.x;
    let q = wg.y;
    let qoff = q * params.dim;
    let start = group * params.span;
    let end = min(start + params.span, params.n_items);
    fill(lid, qoff, 0u, start, end);
    sort_window(lid);
    // `pos` and `end` depend only on the workgroup id and uniforms: the loop (and the
    // barriers inside sort_window) are in uniform control flow.
    var pos = start + WINDOW;
    loop {
        if (pos >= end) {
            break;
        }
        workgroupBarrier();
        fill(lid, qoff, params.k, pos, end);
        sort_window(lid);
        pos = pos + (WINDOW - params.k);
    }
    let base = q * params.out_stride + group * params.k;
    for (var j = lid; j < params.k; j = j + WG) {
        out[base + j] = Entry(s_score[j], s_idx[j]);
    }
}
