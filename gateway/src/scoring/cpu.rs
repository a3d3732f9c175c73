//! The CPU path: every operation of the kernels, with the same result order. It is the
//! production fallback when there is no usable GPU and the oracle the GPU path is tested
//! against.
//!
//! Vector math is plain slice code, no BLAS crate: the work is gathered dot products and small
//! matrix-vector products, which an eight-accumulator loop lets LLVM vectorise (SSE/AVX) on its
//! own, while ndarray + a BLAS backend would add a large build (and a C or Fortran library)
//! for no gain at these shapes. Summation order differs from the kernels', so scores agree
//! within float rounding (exactly for integer-valued weights).

use std::cmp::Ordering;

use super::format::Layer;
use super::model::Hit;

/// Dot product with eight independent accumulators (vectorisable).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// The result order of every operation: higher score first, equal scores by lower item id.
/// (`-0.0` and `0.0` are equal here, as in the kernels.)
pub fn hit_order(a: &Hit, b: &Hit) -> Ordering {
    if a.score > b.score {
        Ordering::Less
    } else if a.score < b.score {
        Ordering::Greater
    } else {
        a.item.cmp(&b.item)
    }
}

/// `scores[p] = dot(queries[pairs[p].0], items[pairs[p].1])`.
pub(crate) fn gather_score(
    items: &[f32],
    queries: &[f32],
    dim: usize,
    pairs: &[[u32; 2]],
) -> Vec<f32> {
    pairs
        .iter()
        .map(|&[q, i]| {
            let q = q as usize * dim;
            let i = i as usize * dim;
            dot(&queries[q..q + dim], &items[i..i + dim])
        })
        .collect()
}

/// The best `k` items (k <= catalog size) of each query, in [`hit_order`].
pub(crate) fn top_k(items: &[f32], queries: &[f32], dim: usize, k: usize) -> Vec<Vec<Hit>> {
    queries
        .chunks_exact(dim)
        .map(|q| {
            let mut hits: Vec<Hit> = items
                .chunks_exact(dim)
                .enumerate()
                .map(|(i, row)| Hit {
                    item: i as u32,
                    score: dot(q, row),
                })
                .collect();
            if k < hits.len() {
                hits.select_nth_unstable_by(k - 1, hit_order);
                hits.truncate(k);
            }
            hits.sort_unstable_by(hit_order);
            hits
        })
        .collect()
}

/// Click probability of each (user, item, dense) row.
pub(crate) struct MlpShape {
    pub user_dim: usize,
    pub item_dim: usize,
    pub n_dense: usize,
}

pub(crate) fn mlp_forward(
    users: &[f32],
    items: &[f32],
    layers: &[Layer],
    shape: &MlpShape,
    rows: &[[u32; 2]],
    dense: &[f32],
) -> Vec<f32> {
    let (ud, id, nd) = (shape.user_dim, shape.item_dim, shape.n_dense);
    let mut x = Vec::with_capacity(super::format::MAX_MLP_WIDTH);
    let mut y = Vec::with_capacity(super::format::MAX_MLP_WIDTH);
    rows.iter()
        .enumerate()
        .map(|(r, &[u, i])| {
            x.clear();
            x.extend_from_slice(&users[u as usize * ud..(u as usize + 1) * ud]);
            x.extend_from_slice(&items[i as usize * id..(i as usize + 1) * id]);
            x.extend_from_slice(&dense[r * nd..(r + 1) * nd]);
            for (l, layer) in layers.iter().enumerate() {
                let last = l + 1 == layers.len();
                y.clear();
                for (j, wrow) in layer.w.chunks_exact(layer.n_in).enumerate() {
                    let acc = layer.b[j] + dot(wrow, &x);
                    y.push(if last {
                        1.0 / (1.0 + (-acc).exp())
                    } else {
                        acc.max(0.0)
                    });
                }
                std::mem::swap(&mut x, &mut y);
            }
            x[0]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_the_naive_sum_for_every_remainder() {
        for n in 0..20 {
            let a: Vec<f32> = (0..n).map(|i| i as f32 - 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| (i % 5) as f32).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert_eq!(dot(&a, &b), naive, "n = {n}");
        }
    }

    #[test]
    fn ties_go_to_the_lower_item_and_signed_zeros_tie() {
        let h = |item, score| Hit { item, score };
        assert_eq!(hit_order(&h(1, 2.0), &h(0, 1.0)), Ordering::Less);
        assert_eq!(hit_order(&h(3, 1.0), &h(2, 1.0)), Ordering::Greater);
        assert_eq!(hit_order(&h(2, -0.0), &h(3, 0.0)), Ordering::Less);
        // Items 1 and 3 tie at 2.0, item 0 and 2 at 0.0; k = 3 keeps 1, 3, then 0.
        let items = [0.0, 2.0, 0.0, 2.0, -1.0];
        let got = top_k(&items, &[1.0], 1, 3);
        assert_eq!(got, vec![vec![h(1, 2.0), h(3, 2.0), h(0, 0.0)]]);
        // k = catalog size: everything, sorted.
        let ids: Vec<u32> = top_k(&items, &[1.0], 1, 5)[0]
            .iter()
            .map(|h| h.item)
            .collect();
        assert_eq!(ids, vec![1, 3, 0, 2, 4]);
    }

    #[test]
    fn mlp_forward_is_relu_then_sigmoid() {
        // x = [u, i, d] = [1, 2, 3]; layer 1: 2 outputs (one negative -> ReLU 0); layer 2: sum.
        let l1 = Layer {
            n_in: 3,
            n_out: 2,
            w: vec![1.0, 1.0, 1.0, -1.0, 0.0, 0.0],
            b: vec![0.0, 0.0],
        };
        let l2 = Layer {
            n_in: 2,
            n_out: 1,
            w: vec![1.0, 1.0],
            b: vec![-6.0],
        };
        let shape = MlpShape {
            user_dim: 1,
            item_dim: 1,
            n_dense: 1,
        };
        let p = mlp_forward(&[1.0], &[2.0], &[l1, l2], &shape, &[[0, 0]], &[3.0]);
        assert_eq!(p, vec![0.5]);
    }
}
