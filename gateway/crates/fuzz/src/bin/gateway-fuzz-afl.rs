//! The AFL++ harness: `gateway-fuzz-afl TARGET`, built by `cargo afl build` with the `afl`
//! feature and run by `cargo afl fuzz` (README: Fuzzing). Persistent mode: one process runs
//! many inputs; a panic anywhere (any thread) aborts it, which AFL++ records as a crash, and
//! so does an input that takes the heap past the runner's per-input limit.
//!
//! The fixtures (runtimes, the admin server, models, the plugin engine) are made on the first
//! input, after AFL++'s fork server has forked: threads started before the fork would not
//! exist in the process that runs the inputs.

use gateway_fuzz::{run, target, targets, watch};

#[global_allocator]
static ALLOC: watch::Counting = watch::Counting;

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some(t) = target(&name) else {
        let names: Vec<&str> = targets().iter().map(|t| t.name).collect();
        eprintln!(
            "usage: gateway-fuzz-afl TARGET   (one of {})",
            names.join(", ")
        );
        std::process::exit(2);
    };
    afl::fuzz!(|data: &[u8]| {
        run::one(t, data, "afl");
    });
}
