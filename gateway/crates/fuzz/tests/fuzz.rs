//! The bounded fuzz run of the test suite: for each target, every committed corpus file (and
//! the built plugins, when present) is replayed, then mutated inputs from a fixed seed run
//! until [`MUTATIONS`] or [`SECONDS`] are spent. Runaway allocations are caught by the
//! counting allocator. A failing input is saved (the message says where and how to replay
//! it). `GATEWAY_FUZZ_SECONDS` and `GATEWAY_FUZZ_SEED` change the budget and the seed.

use std::time::Duration;

use gateway_fuzz::run::{self, Budget};
use gateway_fuzz::{target, watch};

#[global_allocator]
static ALLOC: watch::Counting = watch::Counting;

/// Mutated inputs per target at most.
const MUTATIONS: usize = 20_000;
/// Seconds of mutated inputs per target at most.
const SECONDS: u64 = 4;

fn budget() -> Budget {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    Budget {
        mutations: MUTATIONS,
        time: Duration::from_secs(env("GATEWAY_FUZZ_SECONDS").unwrap_or(SECONDS)),
        seed: env("GATEWAY_FUZZ_SEED").unwrap_or(0x6a7e_31a1),
    }
}

fn fuzz(name: &str) {
    let t = target(name).expect("a known target");
    let seeds = run::seeds(t);
    assert!(
        !run::read_dir_files(&run::corpus_dir(name)).is_empty(),
        "the {name} corpus is empty"
    );
    let report = run::run(t, &seeds, &budget());
    eprintln!("{report}");
    assert!(report.mutated > 0, "no mutated input ran: {report}");
}

#[test]
fn config_survives_its_corpus_and_mutations() {
    fuzz("config");
}

#[test]
fn model_survives_its_corpus_and_mutations() {
    fuzz("model");
}

#[test]
fn plugin_survives_its_corpus_and_mutations() {
    fuzz("plugin");
}

#[test]
fn admin_survives_its_corpus_and_mutations() {
    fuzz("admin");
}

#[test]
fn scoring_survives_its_corpus_and_mutations() {
    fuzz("scoring");
}

#[test]
fn the_generated_seeds_are_committed_as_made() {
    for (target, name, bytes) in gateway_fuzz::seeds::generated() {
        let path = run::corpus_dir(target).join(name);
        let committed = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run `gateway-fuzz seeds`", path.display()));
        assert!(
            committed == bytes,
            "{} differs from what it is made from; run `gateway-fuzz seeds`",
            path.display()
        );
    }
}
