// Top-k reduction pass: each query owns `in_len` entries (per-chunk best lists, sentinels
// included) at `input[query * in_len ..]`; workgroup (window, query) sorts 1024 of them and
// writes the best `k` to `out[query * out_stride + window * k ..]`, with
// out_stride = ceil(in_len / 1024) * k. Repeated until one window remains, so k <= 512 halves
// the list at least. Needs topk_common.wgsl prepended.

struct MergeParams {
    in_len: u32,
    k: u32,
    out_stride: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: MergeParams;
@group(0) @binding(1) var<storage, read> input: array<Entry>;
@group(0) @binding(2) var<storage, read_write> out: array<Entry>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let window = wg.x;
    let q = wg.y;
    for (var t = 0u; t < PER_THREAD; t = t + 1u) {
        let slot = lid + t * WG;
        let pos = window * WINDOW + slot;
        var s = 0.0;
        var id = SENTINEL;
        if (pos < params.in_len) {
            let e = input[q * params.in_len + pos];
            s = e.score;
            id = e.idx;
        }
        s_score[slot] = s;
        s_idx[slot] = id;
    }
    sort_window(lid);
    let base = q * params.out_stride + window * params.k;
    for (var j = lid; j < params.k; j = j + WG) {
        out[base + j] = Entry(s_score[j], s_idx[j]);
    }
}
