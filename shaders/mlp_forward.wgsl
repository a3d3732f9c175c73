// MLP forward (click-through probability): one workgroup of 64 invocations per batch row.
//
// Input x = concat(users[user], items[item], dense[row]) (widths user_dim, item_dim, n_dense);
// layer l computes y_j = b_l[j] + sum_k W_l[j, k] * x_k with W_l stored row-major [out, in]
// (torch.nn.Linear layout); ReLU between layers, sigmoid after the last (width 1).
// Activations ping-pong between the two halves of a 2 x 1024 workgroup array, so every width
// (input included) is at most 1024; the loader enforces that. `layers[l]` = (in, out, weight
// offset, bias offset) into the flat `weights` buffer. Ids were checked on the host.

// `Stored` is the element type of the embedding tables: f32, or f16 (with `enable f16;`) for
// f16 table storage; the host prepends the alias. Arithmetic is f32 either way.

struct Params {
    n_rows: u32,
    n_layers: u32,
    user_dim: u32,
    item_dim: u32,
    n_dense: u32,
    groups_x: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> users: array<Stored>;
@group(0) @binding(2) var<storage, read> items: array<Stored>;
@group(0) @binding(3) var<storage, read> weights: array<f32>;
@group(0) @binding(4) var<storage, read> layers: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> rows: array<vec2<u32>>;
@group(0) @binding(6) var<storage, read> dense: array<f32>;
@group(0) @binding(7) var<storage, read_write> out: array<f32>;

const WG: u32 = 64u;
const MAX_WIDTH: u32 = 1024u;

var<workgroup> act: array<f32, 2048>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wg.y * params.groups_x + wg.x;
    // Uniform per workgroup: every invocation of a workgroup returns here or none does.
    if (row >= params.n_rows) {
        return;
    }
    let ids = rows[row];
    let ud = params.user_dim;
    let id = params.item_dim;
    let width0 = ud + id + params.n_dense;
    for (var i = lid; i < width0; i = i + WG) {
        var v = 0.0;
        if (i < ud) {
            v = f32(users[ids.x * ud + i]);
        } else if (i < ud + id) {
            v = f32(items[ids.y * id + (i - ud)]);
        } else {
            v = dense[row * params.n_dense + (i - ud - id)];
        }
        act[i] = v;
    }
    workgroupBarrier();
    var src = 0u;
    for (var l = 0u; l < params.n_layers; l = l + 1u) {
        let layer = layers[l];
        let n_in = layer.x;
        let n_out = layer.y;
        let dst = MAX_WIDTH - src;
        let last = l + 1u == params.n_layers;
        for (var j = lid; j < n_out; j = j + WG) {
            var acc = weights[layer.w + j];
            let wrow = layer.z + j * n_in;
            for (var k = 0u; k < n_in; k = k + 1u) {
                acc = acc + weights[wrow + k] * act[src + k];
            }
            if (last) {
                acc = 1.0 / (1.0 + exp(-acc));
            } else {
                acc = max(acc, 0.0);
            }
            act[dst + j] = acc;
        }
        workgroupBarrier();
        src = dst;
    }
    if (lid == 0u) {
        out[row] = act[src];
    }
}
