// Full-catalog scan, pass 1 of top-k. Workgroup (group, query) owns the catalog rows
// [group * span, (group + 1) * span). It scores the first 1024 against its query and sorts
// them in workgroup memory: slots 0..k then hold the best `k` so far, and slot k - 1 is the
// threshold a later row must beat (same order as the sort) to matter at all. Then, 256 rows
// per round (one per invocation), only rows that beat the threshold are appended after slot
// k; when the next round might not fit, the window is sorted again (raising the threshold).
// Few rows beat the k-th best of thousands, so the sort runs rarely and the scan is bound by
// reading the items, not by sorting. It writes its best `k` to
// `out[query * out_stride + group * k ..]`; sentinels pad short spans. topk_merge.wgsl
// reduces the per-group lists. Needs topk_common.wgsl prepended.
//
// The item table is stored transposed, `[dim, n_items]`: neighbouring invocations score
// neighbouring rows, so each load of value d reads consecutive addresses (coalesced on a
// GPU, contiguous vector loads on lavapipe) instead of addresses `dim` values apart.

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

// Rows appended after slot k since the last sort.
var<workgroup> s_count: atomic<u32>;
// `s_count` as read by invocation 0, for a uniform load.
var<workgroup> s_seen: u32;

fn score(qoff: u32, item: u32) -> f32 {
    var s = 0.0;
    for (var d = 0u; d < params.dim; d = d + 1u) {
        s = s + queries[qoff + d] * f32(items[d * params.n_items + item]);
    }
    return s;
}

// Every slot from `first` on becomes a sentinel.
fn clear_from(lid: u32, first: u32) {
    for (var t = 0u; t < PER_THREAD; t = t + 1u) {
        let slot = lid + t * WG;
        if (slot >= first) {
            s_score[slot] = 0.0;
            s_idx[slot] = SENTINEL;
        }
    }
}

// The number of appended rows, the same value in every invocation (call from uniform flow).
fn appended(lid: u32) -> u32 {
    workgroupBarrier();
    if (lid == 0u) {
        s_seen = atomicLoad(&s_count);
    }
    return workgroupUniformLoad(&s_seen);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = wg.x;
    let q = wg.y;
    let qoff = q * params.dim;
    let k = params.k;
    let start = group * params.span;
    let end = min(start + params.span, params.n_items);
    for (var t = 0u; t < PER_THREAD; t = t + 1u) {
        let slot = lid + t * WG;
        let item = start + slot;
        if (item < end) {
            s_score[slot] = score(qoff, item);
            s_idx[slot] = item;
        } else {
            s_score[slot] = 0.0;
            s_idx[slot] = SENTINEL;
        }
    }
    if (lid == 0u) {
        atomicStore(&s_count, 0u);
    }
    sort_window(lid);
    // `pos`, `end` and the value of appended() are uniform: the loop, and the barriers in it
    // and in sort_window, are in uniform control flow.
    var pos = start + WINDOW;
    loop {
        if (pos >= end) {
            break;
        }
        let th_score = s_score[k - 1u];
        let th_idx = s_idx[k - 1u];
        let item = pos + lid;
        if (item < end) {
            let s = score(qoff, item);
            if (better(s, item, th_score, th_idx)) {
                let c = atomicAdd(&s_count, 1u);
                s_score[k + c] = s;
                s_idx[k + c] = item;
            }
        }
        pos = pos + WG;
        // Room after slot k is WINDOW - k >= 512: sort before a round could overflow it.
        let c = appended(lid);
        if (c + WG > WINDOW - k) {
            clear_from(lid, k + c);
            sort_window(lid);
            if (lid == 0u) {
                atomicStore(&s_count, 0u);
            }
            workgroupBarrier();
        }
    }
    let c = appended(lid);
    if (c > 0u) {
        clear_from(lid, k + c);
        sort_window(lid);
    }
    let base = q * params.out_stride + group * k;
    for (var j = lid; j < k; j = j + WG) {
        out[base + j] = Entry(s_score[j], s_idx[j]);
    }
}
