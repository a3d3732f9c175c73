// Shared by topk_scan.wgsl and topk_merge.wgsl (prepended on the host; this file has no entry
// point): a window of 1024 (score, item) entries in workgroup memory, sorted best first by a
// bitonic network run by 256 invocations.
//
// Order: higher score first; equal scores -> lower item index first; the sentinel item index
// 0xffffffff (padding) sorts after everything. The CPU path uses the same order.

struct Entry {
    score: f32,
    idx: u32,
}

const WG: u32 = 256u;
const WINDOW: u32 = 1024u;
const PER_THREAD: u32 = 4u;
const SENTINEL: u32 = 0xffffffffu;

var<workgroup> s_score: array<f32, 1024>;
var<workgroup> s_idx: array<u32, 1024>;

fn better(a_score: f32, a_idx: u32, b_score: f32, b_idx: u32) -> bool {
    if (a_idx == SENTINEL) {
        return false;
    }
    if (b_idx == SENTINEL) {
        return true;
    }
    return a_score > b_score || (a_score == b_score && a_idx < b_idx);
}

// Callers fill s_score/s_idx and then call this from uniform control flow.
fn sort_window(lid: u32) {
    workgroupBarrier();
    for (var size = 2u; size <= WINDOW; size = size << 1u) {
        for (var stride = size >> 1u; stride > 0u; stride = stride >> 1u) {
            for (var t = 0u; t < WINDOW / (2u * WG); t = t + 1u) {
                let p = lid + t * WG;
                let l = 2u * stride * (p / stride) + (p % stride);
                let r = l + stride;
                let sl = s_score[l];
                let il = s_idx[l];
                let sr = s_score[r];
                let ir = s_idx[r];
                let best_first = (l & size) == 0u;
                let swap = select(better(sl, il, sr, ir), better(sr, ir, sl, il), best_first);
                if (swap) {
                    s_score[l] = sr;
                    s_idx[l] = ir;
                    s_score[r] = sl;
                    s_idx[r] = il;
                }
            }
            workgroupBarrier();
        }
    }
}
