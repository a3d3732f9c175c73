//! The bounded, in-process run: replay every corpus entry, then run mutated inputs derived
//! from the corpus by [`crate::mutate`], until a count or a time budget is spent. A panic is
//! caught, the input saved under [`findings_dir`], and the run fails with the path.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::mutate::Rng;
use crate::{watch, Target};

/// How much a run may do.
#[derive(Debug, Clone)]
pub struct Budget {
    /// Mutated inputs at most (after the replay).
    pub mutations: usize,
    /// Time for the mutated inputs at most (the replay always runs whole).
    pub time: Duration,
    /// Seed of the mutator: the same seed gives the same inputs.
    pub seed: u64,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The target's name.
    pub target: &'static str,
    /// Corpus entries replayed.
    pub replayed: usize,
    /// Mutated inputs run.
    pub mutated: usize,
    /// Time of the replay.
    pub replay_time: Duration,
    /// Time of the mutated inputs.
    pub mutation_time: Duration,
    /// Largest rise of live heap bytes over one input (0 without [`watch::Counting`]).
    pub peak_bytes: usize,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let per_s = self.mutated as f64 / self.mutation_time.as_secs_f64().max(1e-9);
        write!(
            f,
            "{}: {} corpus entries in {:.2?}, {} mutated inputs in {:.2?} ({per_s:.0}/s), peak {} KiB over one input",
            self.target,
            self.replayed,
            self.replay_time,
            self.mutated,
            self.mutation_time,
            self.peak_bytes >> 10
        )
    }
}

/// Where failing inputs are written: `$GATEWAY_FUZZ_FINDINGS`, else
/// `<temp dir>/gateway-fuzz-findings`.
pub fn findings_dir() -> PathBuf {
    std::env::var_os("GATEWAY_FUZZ_FINDINGS")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("gateway-fuzz-findings"))
}

/// The committed corpus directory of a target.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

/// The files of a directory, sorted by name (none when it does not exist).
pub fn read_dir_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|p| std::fs::read(&p).ok().map(|bytes| (p, bytes)))
        .collect()
}

/// The inputs a run starts from: the committed corpus, then the target's extra seeds.
pub fn seeds(target: &Target) -> Vec<(String, Vec<u8>)> {
    let mut all: Vec<(String, Vec<u8>)> = read_dir_files(&corpus_dir(target.name))
        .into_iter()
        .map(|(p, b)| (p.display().to_string(), b))
        .collect();
    all.extend((target.extra_seeds)());
    all
}

/// Runs `target` on one input; a panic is saved and re-raised with the file's path, and an
/// input whose heap peak passed [`watch::PER_INPUT_LIMIT`] fails the same way. Returns the
/// input's heap peak.
pub fn one(target: &Target, input: &[u8], origin: &str) -> usize {
    let before = watch::reset_peak();
    watch::running(input);
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    watch::finished(input);
    let rise = watch::peak().saturating_sub(before);
    let problem = match outcome {
        Err(payload) => Some(panic_message(&*payload)),
        Ok(()) if rise > watch::PER_INPUT_LIMIT => Some(format!(
            "the input took the heap {} MiB past where it was (limit {} MiB)",
            rise >> 20,
            watch::PER_INPUT_LIMIT >> 20
        )),
        Ok(()) => None,
    };
    if let Some(problem) = problem {
        let saved = save(target.name, input);
        panic!(
            "fuzz target {} failed on an input from {origin} ({} bytes, saved as {}): {problem}\nreplay: cargo run -p gateway-fuzz -- replay {} {}",
            target.name,
            input.len(),
            saved.display(),
            target.name,
            saved.display()
        );
    }
    rise
}

/// Replays `seeds`, then runs mutated inputs within `budget`.
pub fn run(target: &Target, seeds: &[(String, Vec<u8>)], budget: &Budget) -> Report {
    let _armed = Armed(arm(target.name));
    let mut peak = 0;
    let started = Instant::now();
    for (origin, input) in seeds {
        peak = peak.max(one(target, input, origin));
    }
    let replay_time = started.elapsed();
    let mut rng = Rng::new(budget.seed ^ fnv(target.name.as_bytes()));
    let started = Instant::now();
    let mut mutated = 0;
    let empty = (String::new(), Vec::new());
    while mutated < budget.mutations && started.elapsed() < budget.time {
        let base = seeds.get(rng.below(seeds.len())).unwrap_or(&empty);
        let other = seeds.get(rng.below(seeds.len())).unwrap_or(&empty);
        let input = (target.mutate)(&target.mutator, &mut rng, &base.1, &other.1);
        let origin = format!(
            "mutation {mutated} of seed {:#x} (from {})",
            budget.seed, base.0
        );
        peak = peak.max(one(target, &input, &origin));
        mutated += 1;
    }
    let mutation_time = started.elapsed();
    Report {
        target: target.name,
        replayed: seeds.len(),
        mutated,
        replay_time,
        mutation_time,
        peak_bytes: peak,
    }
}

/// Closes and removes the abort file when a run ends, by a return or a finding's panic (an
/// abort never gets here, and leaves the file with the input).
struct Armed(Option<PathBuf>);

impl Drop for Armed {
    fn drop(&mut self) {
        watch::disarm();
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Opens the file an abort (hard memory limit, hang) writes the running input to.
fn arm(target: &str) -> Option<PathBuf> {
    let dir = findings_dir();
    std::fs::create_dir_all(&dir).ok()?;
    let path = dir.join(format!("{target}-aborted-{}", std::process::id()));
    watch::arm(&path).ok()?;
    Some(path)
}

/// Writes a failing input under [`findings_dir`], named by target and content hash.
pub fn save(target: &str, input: &[u8]) -> PathBuf {
    let dir = findings_dir();
    let path = dir.join(format!(
        "{target}-{}",
        &gateway_store::sha256_hex(input)[..16]
    ));
    if std::fs::create_dir_all(&dir).is_err() || std::fs::write(&path, input).is_err() {
        return PathBuf::from("<not saved>");
    }
    path
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// FNV-1a, to give each target its own mutation sequence from one seed.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
