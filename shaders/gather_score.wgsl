// Batched gather-and-score: one invocation per (query, candidate item) pair.
//
// `pairs[p] = (query row, item row)`; `scores[p] = dot(queries[query row], items[item row])`.
// The item table is stored transposed, `[dim, n_items]` (value d of item i at
// `d * n_items + i`), so that the catalog scan's loads are coalesced; see topk_scan.wgsl.
// Here that costs locality (each value of a candidate is on its own cache line), which a
// batch of a few thousand pairs can afford; the scan is the kernel bound by bandwidth.
// Cosine models upload unit-length item rows and the host normalises each query, so the same
// dot product serves both similarities. Pair ids were checked against the catalog on the host
// before dispatch. The grid may be two-dimensional when there are more than 65535 workgroups:
// the flat workgroup index is `wg.y * groups_x + wg.x`.

// `Stored` is the element type of the embedding tables: f32, or f16 (with `enable f16;`) for
// f16 table storage; the host prepends the alias. Arithmetic is f32 either way.

struct Params {
    n_pairs: u32,
    dim: u32,
    groups_x: u32,
    n_items: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> items: array<Stored>;
@group(0) @binding(2) var<storage, read> queries: array<f32>;
@group(0) @binding(3) var<storage, read> pairs: array<vec2<u32>>;
@group(0) @binding(4) var<storage, read_write> scores: array<f32>;

const WG: u32 = 256u;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let p = (wg.y * params.groups_x + wg.x) * WG + lid;
    if (p >= params.n_pairs) {
        return;
    }
    let pair = pairs[p];
    let q = pair.x * params.dim;
    var acc = 0.0;
    for (var d = 0u; d < params.dim; d = d + 1u) {
        acc = acc + queries[q + d] * f32(items[d * params.n_items + pair.y]);
    }
    scores[p] = acc;
}
