//! A small deterministic mutator: the same seed, corpus and dictionary always give the same
//! inputs, so a failure of the bounded run in the test suite reproduces exactly.
//!
//! It does what the classic byte-level fuzzers do (bit flips, interesting values, block
//! deletion, duplication and insertion, splicing two corpus entries, dictionary tokens), plus
//! one text-aware step: rewriting a run of ASCII digits as another number, which reaches the
//! range checks of TOML and JSON numbers and of safetensors metadata far more often than
//! random bytes do. It is not coverage-guided; the long runs use AFL++ (README: Fuzzing).

/// splitmix64: seedable and fast; good enough to pick mutations.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// True with probability 1/`n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

/// Numbers that sit on the edges of the checks a parser makes.
const INTERESTING_NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "7",
    "16",
    "255",
    "256",
    "1023",
    "1024",
    "1025",
    "4096",
    "65535",
    "65536",
    "2147483647",
    "2147483648",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "1e308",
    "1e309",
    "-0",
    "0.5",
    "nan",
    "inf",
];

const INTERESTING_BYTES: &[u8] = &[0, 1, 0x7f, 0x80, 0xff, b'\n', b'"', b'\\', b'{', b'['];

/// Mutates inputs within a size bound.
#[derive(Debug, Clone)]
pub struct Mutator {
    /// Largest input produced.
    pub max_len: usize,
    /// Tokens inserted or overwritten whole (keys, keywords, magic numbers of the format).
    pub dictionary: &'static [&'static [u8]],
}

impl Mutator {
    /// A new input from `base` (a corpus entry), with `other` available for splicing.
    /// Applies one to four mutations.
    pub fn mutate(&self, rng: &mut Rng, base: &[u8], other: &[u8]) -> Vec<u8> {
        let mut data = base.to_vec();
        let rounds = 1 + rng.below(4);
        for _ in 0..rounds {
            self.mutate_once(rng, &mut data, other);
        }
        data.truncate(self.max_len);
        data
    }

    fn mutate_once(&self, rng: &mut Rng, data: &mut Vec<u8>, other: &[u8]) {
        let len = data.len();
        match rng.below(12) {
            // Flip a bit.
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            // An interesting byte.
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = INTERESTING_BYTES[rng.below(INTERESTING_BYTES.len())];
            }
            // A random byte.
            2 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next_u64() as u8;
            }
            // Delete a block.
            3 if len > 0 => {
                let start = rng.below(len);
                let n = 1 + rng.below((len - start).min(64));
                data.drain(start..start + n);
            }
            // Duplicate a block in place.
            4 if len > 0 && len < self.max_len => {
                let start = rng.below(len);
                let n = 1 + rng.below((len - start).min(256));
                let block = data[start..start + n].to_vec();
                let at = rng.below(data.len() + 1);
                data.splice(at..at, block);
            }
            // Insert a dictionary token.
            5 | 6 if !self.dictionary.is_empty() => {
                let token = self.dictionary[rng.below(self.dictionary.len())];
                let at = rng.below(len + 1);
                data.splice(at..at, token.iter().copied());
            }
            // Overwrite with a dictionary token.
            7 if !self.dictionary.is_empty() && len > 0 => {
                let token = self.dictionary[rng.below(self.dictionary.len())];
                let at = rng.below(len);
                let end = (at + token.len()).min(len);
                data.splice(at..end, token.iter().copied());
            }
            // Rewrite a number.
            8 | 9 => {
                if let Some((start, end)) = find_number(data, rng) {
                    let replacement = if rng.one_in(3) {
                        (rng.next_u64() >> rng.below(64)).to_string()
                    } else {
                        INTERESTING_NUMBERS[rng.below(INTERESTING_NUMBERS.len())].to_string()
                    };
                    data.splice(start..end, replacement.bytes());
                } else if len > 0 {
                    let i = rng.below(len);
                    data[i] = b'0' + rng.below(10) as u8;
                }
            }
            // Splice: the head of this input, the tail of another.
            10 if !other.is_empty() => {
                let cut = rng.below(len + 1);
                let from = rng.below(other.len());
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            // Truncate.
            11 if len > 1 => {
                data.truncate(rng.below(len));
            }
            // The chosen mutation did not apply: insert a random byte.
            _ => {
                let at = rng.below(len + 1);
                data.insert(at, rng.next_u64() as u8);
            }
        }
    }
}

/// A run of ASCII digits (with a leading '-') at a random place, if there is one.
fn find_number(data: &[u8], rng: &mut Rng) -> Option<(usize, usize)> {
    if data.is_empty() {
        return None;
    }
    let from = rng.below(data.len());
    let start = (from..data.len())
        .chain(0..from)
        .find(|&i| data[i].is_ascii_digit())?;
    let mut s = start;
    while s > 0 && (data[s - 1].is_ascii_digit() || data[s - 1] == b'-') {
        s -= 1;
    }
    let mut e = start;
    while e < data.len() && (data[e].is_ascii_digit() || data[e] == b'.') {
        e += 1;
    }
    Some((s, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_inputs() {
        let m = Mutator {
            max_len: 64,
            dictionary: &[b"key", b"[table]"],
        };
        let run = |seed| {
            let mut rng = Rng::new(seed);
            (0..100)
                .map(|_| m.mutate(&mut rng, b"a = 12\nb = \"x\"\n", b"[c]\nd = 3\n"))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        assert!(run(7).iter().all(|i| i.len() <= 64));
    }

    #[test]
    fn numbers_are_found_whole() {
        let mut rng = Rng::new(1);
        assert_eq!(find_number(b"x = -123;", &mut rng), Some((4, 8)));
        assert_eq!(find_number(b"none", &mut rng), None);
    }
}
