//! The CPU path: every operation of the kernels, with the same result order. It is the
//! production fallback when there is no usable GPU and the oracle the GPU path is tested
//! against.
//!
//! Where the work is a matrix product it goes to `matrixmultiply`'s sgemm (pure Rust, blocked
//! and SIMD, the kernel under ndarray): retrieval for several queries at once (the catalog is
//! read once per block for the whole batch instead of once per query) and the MLP's layers
//! over a batch of rows. Gathered candidates and single-query scans are dot products with an
//! eight-accumulator loop that LLVM vectorises; a scan is bound by reading the catalog, which
//! sgemm's packing would only add to. Summation order differs from the kernels' (and between
//! the sgemm and dot paths), so scores agree within float rounding (exactly for
//! integer-valued weights).

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
/// (`-0.0` and `0.0` are equal here, as in the kernels.) A NaN score, which validated
/// requests do not produce, ranks as -infinity, so that this stays a total order.
pub fn hit_order(a: &Hit, b: &Hit) -> Ordering {
    let key = |s: f32| if s.is_nan() { f32::NEG_INFINITY } else { s };
    let (sa, sb) = (key(a.score), key(b.score));
    if sa > sb {
        Ordering::Less
    } else if sa < sb {
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

/// `c[m, n] = a[m, kd] · b[n, kd]ᵀ`, all row-major (`b` is read as its transpose).
fn gemm_abt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, kd: usize, n: usize) {
    assert!(a.len() >= m * kd && b.len() >= n * kd && c.len() >= m * n);
    // SAFETY: the asserts above keep every index sgemm forms (row < m, col < n, depth < kd,
    // with the strides given) inside the three slices; `c` does not alias `a` or `b`.
    unsafe {
        matrixmultiply::sgemm(
            m,
            kd,
            n,
            1.0,
            a.as_ptr(),
            kd as isize,
            1,
            b.as_ptr(),
            1,
            kd as isize,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// The best `k` of a stream of hits: appends past a threshold, cut back to `k` in
/// [`hit_order`] when the buffer holds `2k`.
struct Best {
    k: usize,
    hits: Vec<Hit>,
    /// The `k`-th best so far, once `k` are known.
    threshold: Option<Hit>,
}

impl Best {
    fn new(k: usize) -> Best {
        Best {
            k,
            hits: Vec::with_capacity(2 * k),
            threshold: None,
        }
    }

    fn push(&mut self, hit: Hit) {
        if self
            .threshold
            .is_some_and(|t| hit_order(&hit, &t) != Ordering::Less)
        {
            return;
        }
        self.hits.push(hit);
        if self.hits.len() >= 2 * self.k {
            self.cut();
        }
    }

    fn cut(&mut self) {
        if self.hits.len() > self.k {
            self.hits.select_nth_unstable_by(self.k - 1, hit_order);
            self.hits.truncate(self.k);
            self.threshold = Some(self.hits[self.k - 1]);
        }
    }

    fn finish(mut self) -> Vec<Hit> {
        self.cut();
        self.hits.sort_unstable_by(hit_order);
        self.hits
    }
}

/// Catalog rows per sgemm block of a batched retrieval (scores: queries x this, f32).
const SCAN_BLOCK: usize = 2048;

/// The best `k` items (1 <= k <= catalog size) of each query, in [`hit_order`].
pub(crate) fn top_k(items: &[f32], queries: &[f32], dim: usize, k: usize) -> Vec<Vec<Hit>> {
    let n_q = queries.len() / dim;
    let n_items = items.len() / dim;
    let mut best: Vec<Best> = (0..n_q).map(|_| Best::new(k)).collect();
    if n_q == 1 {
        for (i, row) in items.chunks_exact(dim).enumerate() {
            best[0].push(Hit {
                item: i as u32,
                score: dot(queries, row),
            });
        }
    } else if n_q > 1 {
        let mut scores = vec![0.0f32; n_q * SCAN_BLOCK.min(n_items)];
        for start in (0..n_items).step_by(SCAN_BLOCK) {
            let n = SCAN_BLOCK.min(n_items - start);
            gemm_abt(queries, &items[start * dim..], &mut scores, n_q, dim, n);
            for (b, row) in best.iter_mut().zip(scores.chunks_exact(n)) {
                for (j, &score) in row.iter().enumerate() {
                    b.push(Hit {
                        item: (start + j) as u32,
                        score,
                    });
                }
            }
        }
    }
    best.into_iter().map(Best::finish).collect()
}

/// Click probability of each (user, item, dense) row.
pub(crate) struct MlpShape {
    pub user_dim: usize,
    pub item_dim: usize,
    pub n_dense: usize,
}

/// Rows of one MLP block: the activations of a block are `MLP_BLOCK x width` f32.
const MLP_BLOCK: usize = 256;

/// Layer by layer over blocks of rows: each layer is one sgemm `X · Wᵀ`, then bias and
/// ReLU (sigmoid after the last).
pub(crate) fn mlp_forward(
    users: &[f32],
    items: &[f32],
    layers: &[Layer],
    shape: &MlpShape,
    rows: &[[u32; 2]],
    dense: &[f32],
) -> Vec<f32> {
    let (ud, id, nd) = (shape.user_dim, shape.item_dim, shape.n_dense);
    let width0 = ud + id + nd;
    let mut out = Vec::with_capacity(rows.len());
    let mut x = Vec::new();
    let mut y = Vec::new();
    for (b, block) in rows.chunks(MLP_BLOCK).enumerate() {
        let first = b * MLP_BLOCK;
        x.clear();
        for (r, &[u, i]) in block.iter().enumerate() {
            let r = first + r;
            x.extend_from_slice(&users[u as usize * ud..(u as usize + 1) * ud]);
            x.extend_from_slice(&items[i as usize * id..(i as usize + 1) * id]);
            x.extend_from_slice(&dense[r * nd..(r + 1) * nd]);
        }
        debug_assert_eq!(x.len(), block.len() * width0);
        for (l, layer) in layers.iter().enumerate() {
            let last = l + 1 == layers.len();
            y.clear();
            y.resize(block.len() * layer.n_out, 0.0);
            gemm_abt(&x, &layer.w, &mut y, block.len(), layer.n_in, layer.n_out);
            for row in y.chunks_exact_mut(layer.n_out) {
                for (v, bias) in row.iter_mut().zip(&layer.b) {
                    let acc = *v + bias;
                    *v = if last {
                        1.0 / (1.0 + (-acc).exp())
                    } else {
                        acc.max(0.0)
                    };
                }
            }
            std::mem::swap(&mut x, &mut y);
        }
        out.extend_from_slice(&x);
    }
    out
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
    fn nan_scores_rank_last_and_the_order_stays_total() {
        let h = |item, score| Hit { item, score };
        let mut hits = [
            h(0, f32::NAN),
            h(1, 1.0),
            h(2, f32::NEG_INFINITY),
            h(3, f32::NAN),
            h(4, -1.0),
        ];
        hits.sort_by(hit_order);
        let ids: Vec<u32> = hits.iter().map(|h| h.item).collect();
        assert_eq!(ids, vec![1, 4, 0, 2, 3]);
    }

    #[test]
    fn batched_retrieval_equals_one_query_at_a_time() {
        // Integer values: sgemm and dot give exact scores, so the lists must be identical,
        // ties (many: values in -2..=2) included, across several sgemm blocks.
        let (n, dim) = (2 * SCAN_BLOCK + 77, 3);
        let items: Vec<f32> = (0..n * dim)
            .map(|i| ((i * 7 + i / 5) % 5) as f32 - 2.0)
            .collect();
        let queries = [
            1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 2.0, 1.0, 1.0, -1.0, -1.0, -1.0,
        ];
        for k in [1, 10, 600, n] {
            let batched = top_k(&items, &queries, dim, k);
            assert_eq!(batched.len(), 4);
            for (q, got) in batched.iter().enumerate() {
                let one = top_k(&items, &queries[q * dim..(q + 1) * dim], dim, k);
                assert_eq!(got, &one[0], "k {k} query {q}");
                let mut all: Vec<Hit> = items
                    .chunks_exact(dim)
                    .enumerate()
                    .map(|(i, row)| Hit {
                        item: i as u32,
                        score: dot(&queries[q * dim..(q + 1) * dim], row),
                    })
                    .collect();
                all.sort_by(hit_order);
                all.truncate(k);
                assert_eq!(got, &all, "k {k} query {q}: full sort");
            }
        }
    }

    #[test]
    fn mlp_blocks_match_row_by_row() {
        // 600 rows: two full blocks and a partial one; two layers.
        let shape = MlpShape {
            user_dim: 2,
            item_dim: 3,
            n_dense: 1,
        };
        let l1 = Layer {
            n_in: 6,
            n_out: 4,
            w: (0..24).map(|i| ((i % 7) as f32 - 3.0) * 0.25).collect(),
            b: vec![0.5, -0.5, 0.0, 1.0],
        };
        let l2 = Layer {
            n_in: 4,
            n_out: 1,
            w: vec![0.5, -1.0, 0.25, 1.0],
            b: vec![-0.125],
        };
        let users: Vec<f32> = (0..10).map(|i| (i % 4) as f32 * 0.5).collect();
        let items: Vec<f32> = (0..21).map(|i| (i % 3) as f32 - 1.0).collect();
        let rows: Vec<[u32; 2]> = (0..600).map(|r| [(r % 5) as u32, (r % 7) as u32]).collect();
        let dense: Vec<f32> = (0..600).map(|r| (r % 11) as f32 * 0.125).collect();
        let layers = [l1, l2];
        let got = mlp_forward(&users, &items, &layers, &shape, &rows, &dense);
        assert_eq!(got.len(), 600);
        for (r, &[u, i]) in rows.iter().enumerate() {
            let mut x: Vec<f32> = users[u as usize * 2..u as usize * 2 + 2].to_vec();
            x.extend_from_slice(&items[i as usize * 3..i as usize * 3 + 3]);
            x.push(dense[r]);
            for (l, layer) in layers.iter().enumerate() {
                x = layer
                    .w
                    .chunks_exact(layer.n_in)
                    .zip(&layer.b)
                    .map(|(w, b)| {
                        let acc = b + w.iter().zip(&x).map(|(a, c)| a * c).sum::<f32>();
                        if l + 1 == layers.len() {
                            1.0 / (1.0 + (-acc).exp())
                        } else {
                            acc.max(0.0)
                        }
                    })
                    .collect();
            }
            assert_eq!(got[r], x[0], "row {r}");
        }
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
