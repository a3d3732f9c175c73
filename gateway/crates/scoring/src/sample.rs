//! Small deterministic sample models (seeded PRNG, no network) for the demo and the tests.

use super::format::{encode, ModelKind, Similarity};

/// What [`sample_model`] writes.
#[derive(Debug, Clone)]
pub struct SampleSpec {
    pub kind: ModelKind,
    pub name: String,
    pub version: String,
    pub seed: u64,
    pub n_items: usize,
    pub n_users: usize,
    /// Embedding width of an embedding model.
    pub dim: usize,
    pub similarity: Similarity,
    /// MLP: embedding widths, dense feature count, hidden layer widths (the output layer of
    /// width 1 is added).
    pub user_dim: usize,
    pub item_dim: usize,
    pub n_dense: usize,
    pub hidden: Vec<usize>,
    /// Draw every value from the integers -2..=2 instead of a scaled uniform distribution:
    /// dot products are then exact in f32 whatever the summation order, so the GPU and the CPU
    /// agree bit for bit and equal scores (ties) are common. For tests.
    pub integer_values: bool,
}

impl SampleSpec {
    pub fn embedding(n_items: usize, dim: usize, seed: u64) -> SampleSpec {
        SampleSpec {
            kind: ModelKind::Embedding,
            name: "sample-embedding".into(),
            version: "1".into(),
            seed,
            n_items,
            n_users: 16,
            dim,
            similarity: Similarity::Dot,
            user_dim: 8,
            item_dim: 8,
            n_dense: 4,
            hidden: vec![16],
            integer_values: false,
        }
    }

    pub fn mlp(n_users: usize, n_items: usize, seed: u64) -> SampleSpec {
        SampleSpec {
            kind: ModelKind::Mlp,
            name: "sample-ctr".into(),
            n_users,
            n_items,
            ..SampleSpec::embedding(n_items, 8, seed)
        }
    }
}

/// splitmix64: tiny, seedable, good enough for sample weights.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn next_f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

fn values(rng: &mut SplitMix64, n: usize, scale: f32, integer: bool) -> Vec<f32> {
    (0..n)
        .map(|_| {
            if integer {
                rng.below(5) as f32 - 2.0
            } else {
                rng.next_f32() * scale
            }
        })
        .collect()
}

/// The bytes of a sample model file.
pub fn sample_model(spec: &SampleSpec) -> Vec<u8> {
    let mut rng = SplitMix64(spec.seed);
    let int = spec.integer_values;
    let mut meta = vec![
        ("kind", spec.kind.as_str().to_string()),
        ("name", spec.name.clone()),
        ("version", spec.version.clone()),
        ("n_items", spec.n_items.to_string()),
        ("n_users", spec.n_users.to_string()),
        (
            "generator",
            format!("gateway model sample --seed {}", spec.seed),
        ),
    ];
    match spec.kind {
        ModelKind::Embedding => {
            let scale = 1.0 / (spec.dim.max(1) as f32).sqrt();
            let items = values(&mut rng, spec.n_items * spec.dim, scale, int);
            let users = values(&mut rng, spec.n_users * spec.dim, scale, int);
            meta.push(("dim", spec.dim.to_string()));
            meta.push(("similarity", spec.similarity.as_str().to_string()));
            let mut tensors = vec![("items", vec![spec.n_items, spec.dim], &items[..])];
            if spec.n_users > 0 {
                tensors.push(("users", vec![spec.n_users, spec.dim], &users[..]));
            }
            encode(&meta, &tensors)
        }
        ModelKind::Mlp => {
            let users = values(&mut rng, spec.n_users * spec.user_dim, 0.5, int);
            let items = values(&mut rng, spec.n_items * spec.item_dim, 0.5, int);
            let mut widths = vec![spec.user_dim + spec.item_dim + spec.n_dense];
            widths.extend(&spec.hidden);
            widths.push(1);
            let mut layers = Vec::new();
            for l in 1..widths.len() {
                let scale = (2.0 / widths[l - 1] as f32).sqrt();
                let w = values(&mut rng, widths[l] * widths[l - 1], scale, int);
                let b = values(&mut rng, widths[l], 0.1, int);
                layers.push((format!("w{l}"), format!("b{l}"), w, b));
            }
            let layer_list: Vec<String> = widths[1..].iter().map(|w| w.to_string()).collect();
            meta.push(("user_dim", spec.user_dim.to_string()));
            meta.push(("item_dim", spec.item_dim.to_string()));
            meta.push(("n_dense", spec.n_dense.to_string()));
            meta.push(("layers", layer_list.join(",")));
            meta.push((
                "input_layout",
                format!(
                    "user_embedding[{}] item_embedding[{}] dense[{}]",
                    spec.user_dim, spec.item_dim, spec.n_dense
                ),
            ));
            let mut tensors = vec![
                ("users", vec![spec.n_users, spec.user_dim], &users[..]),
                ("items", vec![spec.n_items, spec.item_dim], &items[..]),
            ];
            for (l, (wn, bn, w, b)) in layers.iter().enumerate() {
                tensors.push((wn.as_str(), vec![widths[l + 1], widths[l]], &w[..]));
                tensors.push((bn.as_str(), vec![widths[l + 1]], &b[..]));
            }
            encode(&meta, &tensors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_deterministic_per_seed() {
        let a = sample_model(&SampleSpec::embedding(20, 4, 1));
        assert_eq!(a, sample_model(&SampleSpec::embedding(20, 4, 1)));
        assert_ne!(a, sample_model(&SampleSpec::embedding(20, 4, 2)));
        let m = sample_model(&SampleSpec::mlp(3, 5, 9));
        assert_eq!(m, sample_model(&SampleSpec::mlp(3, 5, 9)));
    }

    #[test]
    fn prng_stays_in_range() {
        let mut r = SplitMix64(0);
        for _ in 0..1000 {
            let x = r.next_f32();
            assert!((-1.0..1.0).contains(&x));
            assert!(r.below(5) < 5);
        }
    }
}
