//! The AFL++ harness: `gateway-fuzz-afl TARGET`, built by `cargo afl build` with the `afl`
//! feature and run by `cargo afl fuzz` (README: Fuzzing). Persistent mode: one process runs
//! many inputs; a panic anywhere (any thread) aborts it, which AFL++ records as a crash.

use gateway_fuzz::{target, targets};

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
    // Fixtures (runtimes, servers, models) are made on the first input; this makes them
    // before AFL++'s fork server starts counting.
    (t.run)(b"");
    afl::fuzz!(|data: &[u8]| {
        (t.run)(data);
    });
}
