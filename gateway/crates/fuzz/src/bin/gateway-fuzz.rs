//! `gateway-fuzz`: the fuzz targets outside the test suite.
//!
//! - `gateway-fuzz list`: the targets;
//! - `gateway-fuzz run TARGET [--seconds N] [--seed S] [--mutations N]`: replay the corpus,
//!   then mutated inputs for N seconds (default 60);
//! - `gateway-fuzz replay TARGET FILE...`: run the target on each file (a finding saved by a
//!   run, or a crash from AFL++'s `out/default/crashes/`);
//! - `gateway-fuzz seeds`: write the generated seeds (hand-made components, small models)
//!   into the corpus.

use std::process::ExitCode;
use std::time::Duration;

use gateway_fuzz::run::{self, Budget};
use gateway_fuzz::{target, targets, watch};

#[global_allocator]
static ALLOC: watch::Counting = watch::Counting;

fn usage() -> ExitCode {
    eprintln!(
        "usage: gateway-fuzz list | run TARGET [--seconds N] [--seed S] [--mutations N] | replay TARGET FILE... | seeds"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("list") => {
            for t in targets() {
                println!("{:8} {}", t.name, t.about);
            }
            ExitCode::SUCCESS
        }
        Some("run") => {
            let Some(t) = args.get(1).and_then(|n| target(n)) else {
                return usage();
            };
            let mut budget = Budget {
                mutations: usize::MAX,
                time: Duration::from_secs(60),
                seed: 0x5eed,
            };
            let mut rest = args[2..].iter();
            while let Some(flag) = rest.next() {
                let Some(value) = rest.next().and_then(|v| v.parse::<u64>().ok()) else {
                    return usage();
                };
                match flag.as_str() {
                    "--seconds" => budget.time = Duration::from_secs(value),
                    "--seed" => budget.seed = value,
                    "--mutations" => budget.mutations = value as usize,
                    _ => return usage(),
                }
            }
            let seeds = run::seeds(t);
            let report = run::run(t, &seeds, &budget);
            println!("{report}");
            let answers = match t.name {
                "admin" => Some(gateway_fuzz::targets::admin::answers()),
                "scoring" => Some(gateway_fuzz::targets::scoring::answers()),
                _ => None,
            };
            if let Some(a) = answers {
                println!(
                    "answers: {} 2xx, {} 3xx, {} 4xx, {} 5xx",
                    a[2], a[3], a[4], a[5]
                );
            }
            ExitCode::SUCCESS
        }
        Some("replay") => {
            let Some(t) = args.get(1).and_then(|n| target(n)) else {
                return usage();
            };
            for file in &args[2..] {
                let input = match std::fs::read(file) {
                    Ok(b) => b,
                    Err(e) => {
                        eprintln!("{file}: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                let peak = run::one(t, &input, file);
                println!(
                    "{file}: ok ({} bytes, heap peak +{} KiB)",
                    input.len(),
                    peak >> 10
                );
            }
            ExitCode::SUCCESS
        }
        Some("seeds") => {
            for (target, name, bytes) in gateway_fuzz::seeds::generated() {
                let dir = run::corpus_dir(target);
                let path = dir.join(name);
                if let Err(e) =
                    std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, &bytes))
                {
                    eprintln!("{}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
                println!("{} ({} bytes)", path.display(), bytes.len());
            }
            ExitCode::SUCCESS
        }
        _ => usage(),
    }
}
