//! Sticky, monotone assignment of shoppers to variants by weighted rendezvous hashing.
//!
//! Each variant `v` draws `u_v`, uniform in (0, 1), from SHA-256 over the experiment salt, the
//! variant's name and the shopper id; its score is `-ln(u_v) / w_v` (an exponential variable of
//! rate `w_v`) and the lowest score wins, so variant `v` wins with probability `w_v / Σw`. Only
//! the winner's own score depends on its weight: raising a weight can only pull shoppers into
//! that variant, lowering it can only push its shoppers out, and shoppers outside it never
//! move between the others.

use sha2::{Digest, Sha256};

/// Why a [`Splitter`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    /// No variants were given.
    #[error("a split needs at least one variant")]
    NoVariants,
    /// A variant's name is empty.
    #[error("variant {index} has an empty name")]
    EmptyName {
        /// Its position in the list.
        index: usize,
    },
    /// Two variants share a name.
    #[error("variant name {0:?} appears more than once")]
    DuplicateName(String),
    /// Every weight is zero.
    #[error("the variants' weights sum to zero")]
    ZeroWeight,
}

#[derive(Clone)]
struct Variant {
    name: String,
    weight: u32,
    /// SHA-256 state after the salt and the name, cloned per shopper.
    keyed: Sha256,
}

/// Assigns shopper ids to weighted variants, the same id always to the same variant for a
/// given salt and weights.
#[derive(Clone)]
pub struct Splitter {
    variants: Vec<Variant>,
}

impl std::fmt::Debug for Splitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.variants.iter().map(|v| (&v.name, v.weight)))
            .finish()
    }
}

impl Splitter {
    /// A splitter for one experiment: `salt` is the experiment's key (changing it reshuffles
    /// everyone), `variants` are `(name, weight)` pairs; weights are relative (percentages
    /// work) and a weight of 0 receives nobody.
    pub fn new(salt: &[u8], variants: &[(&str, u32)]) -> Result<Self, SplitError> {
        if variants.is_empty() {
            return Err(SplitError::NoVariants);
        }
        for (index, (name, _)) in variants.iter().enumerate() {
            if name.is_empty() {
                return Err(SplitError::EmptyName { index });
            }
            if variants[..index].iter().any(|(other, _)| other == name) {
                return Err(SplitError::DuplicateName((*name).to_owned()));
            }
        }
        if variants.iter().all(|&(_, w)| w == 0) {
            return Err(SplitError::ZeroWeight);
        }
        let variants = variants
            .iter()
            .map(|&(name, weight)| {
                let mut keyed = Sha256::new();
                keyed.update((salt.len() as u64).to_be_bytes());
                keyed.update(salt);
                keyed.update((name.len() as u64).to_be_bytes());
                keyed.update(name.as_bytes());
                Variant {
                    name: name.to_owned(),
                    weight,
                    keyed,
                }
            })
            .collect();
        Ok(Splitter { variants })
    }

    /// The index (into the list given to [`Splitter::new`]) of the variant `shopper_id` is in.
    pub fn assign(&self, shopper_id: &[u8]) -> usize {
        let mut best = (f64::INFINITY, 0);
        for (index, v) in self.variants.iter().enumerate() {
            if v.weight == 0 {
                continue;
            }
            let score = -uniform(v.keyed.clone(), shopper_id).ln() / f64::from(v.weight);
            if score < best.0 {
                best = (score, index);
            }
        }
        best.1
    }

    /// The name of variant `index`, or `None` past the end.
    pub fn name(&self, index: usize) -> Option<&str> {
        self.variants.get(index).map(|v| v.name.as_str())
    }
}

/// A uniform draw in the open interval (0, 1) from the top 53 bits of the hash.
fn uniform(mut keyed: Sha256, shopper_id: &[u8]) -> f64 {
    keyed.update(shopper_id);
    let digest = keyed.finalize();
    let bits = u64::from_be_bytes(digest[..8].try_into().expect("SHA-256 is 32 bytes")) >> 11;
    (bits as f64 + 0.5) / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u32) -> impl Iterator<Item = [u8; 4]> {
        (0..n).map(u32::to_be_bytes)
    }

    #[test]
    fn rejects_bad_variant_lists() {
        assert_eq!(
            Splitter::new(b"s", &[]).unwrap_err(),
            SplitError::NoVariants
        );
        assert_eq!(
            Splitter::new(b"s", &[("a", 1), ("", 1)]).unwrap_err(),
            SplitError::EmptyName { index: 1 }
        );
        assert_eq!(
            Splitter::new(b"s", &[("a", 1), ("a", 2)]).unwrap_err(),
            SplitError::DuplicateName("a".into())
        );
        assert_eq!(
            Splitter::new(b"s", &[("a", 0), ("b", 0)]).unwrap_err(),
            SplitError::ZeroWeight
        );
    }

    #[test]
    fn proportions_follow_weights() {
        let s = Splitter::new(b"exp-1", &[("a", 10), ("b", 30), ("c", 60), ("off", 0)]).unwrap();
        let mut counts = [0u32; 4];
        for id in ids(100_000) {
            counts[s.assign(&id)] += 1;
        }
        assert_eq!(counts[3], 0, "a zero weight receives nobody");
        for (count, expected) in counts.iter().zip([0.1, 0.3, 0.6]) {
            let share = f64::from(*count) / 100_000.0;
            // The standard error is at most 0.0016 here; 0.01 is over six of them.
            assert!((share - expected).abs() < 0.01, "{counts:?}");
        }
    }

    #[test]
    fn salt_reshuffles() {
        let a = Splitter::new(b"exp-1", &[("a", 1), ("b", 1)]).unwrap();
        let b = Splitter::new(b"exp-2", &[("a", 1), ("b", 1)]).unwrap();
        let differ = ids(1000).filter(|id| a.assign(id) != b.assign(id)).count();
        assert!((400..600).contains(&differ), "{differ}");
    }

    #[test]
    fn two_variants_are_monotone() {
        let shoppers: Vec<_> = ids(2000).collect();
        let mut previous: Option<Vec<usize>> = None;
        for pct in 1..=100u32 {
            let s = Splitter::new(b"exp", &[("baseline", 100 - pct), ("canary", pct)]).unwrap();
            let now: Vec<usize> = shoppers.iter().map(|id| s.assign(id)).collect();
            if let Some(before) = &previous {
                for (b, n) in before.iter().zip(&now) {
                    assert!(!(*b == 1 && *n == 0), "a shopper left the canary at {pct}%");
                }
            }
            previous = Some(now);
        }
        assert!(previous.unwrap().iter().all(|&v| v == 1));
    }

    #[test]
    fn three_variants_are_monotone_both_ways() {
        let shoppers: Vec<_> = ids(1500).collect();
        // The canary takes pct% of 1000; the other two keep a 4:6 ratio of the rest.
        let split = |pct: u32| {
            let s = Splitter::new(
                b"exp3",
                &[
                    ("a", 4 * (100 - pct)),
                    ("b", 6 * (100 - pct)),
                    ("canary", 10 * pct),
                ],
            )
            .unwrap();
            shoppers.iter().map(|id| s.assign(id)).collect::<Vec<_>>()
        };
        let all: Vec<Vec<usize>> = (1..=100).map(split).collect();
        for pair in all.windows(2) {
            let (lo, hi) = (&pair[0], &pair[1]);
            for (l, h) in lo.iter().zip(hi) {
                // Rising: nobody leaves the canary; falling (read backwards): nobody enters it.
                assert!(!(*l == 2 && *h != 2));
                if *h != 2 {
                    assert_eq!(l, h, "a shopper outside the canary moved between a and b");
                }
            }
        }
    }

    #[test]
    fn lowering_one_weight_only_moves_its_own_shoppers() {
        let shoppers: Vec<_> = ids(3000).collect();
        let before = Splitter::new(b"e", &[("a", 30), ("b", 30), ("c", 40)]).unwrap();
        let after = Splitter::new(b"e", &[("a", 30), ("b", 5), ("c", 40)]).unwrap();
        for id in &shoppers {
            let (x, y) = (before.assign(id), after.assign(id));
            assert!(x == y || x == 1, "{x} -> {y}");
        }
        let moved = shoppers
            .iter()
            .filter(|id| before.assign(*id) != after.assign(*id))
            .count();
        assert!(moved > 0);
        assert!(shoppers
            .iter()
            .all(|id| after.assign(id) != 1 || before.assign(id) == 1));
    }
}
