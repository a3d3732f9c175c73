//! The corpora reach past the first check: the seeds meant to be valid are valid, so
//! mutations start from inputs that get deep into each parser. Files named `afl-*` (inputs
//! AFL++ found new coverage with, valid or not) and `finding-*` (inputs that found a bug,
//! kept as regression seeds) are not checked here.

use gateway_config::Config;
use gateway_fuzz::fixtures::{base_dir, FakeFiles};
use gateway_fuzz::run::{corpus_dir, read_dir_files};
use gateway_scoring::{ComputeDevice, Model, ScoringConfig};

#[test]
fn the_valid_config_seeds_validate() {
    let files = read_dir_files(&corpus_dir("config"));
    let mut valid = 0;
    for (path, bytes) in &files {
        let name = path.file_name().unwrap().to_string_lossy();
        if name.starts_with("afl-") || name.starts_with("finding-") {
            continue;
        }
        let text = String::from_utf8(bytes.clone()).unwrap();
        let result = Config::from_toml_with(&text, &name, base_dir(), &FakeFiles);
        let meant_valid = !name.starts_with("invalid") && !name.starts_with("syntax");
        match (meant_valid, result) {
            (true, Ok(_)) => valid += 1,
            (true, Err(e)) => panic!("{name} is meant to be valid: {e}"),
            (false, Ok(_)) => panic!("{name} is meant to be invalid"),
            (false, Err(_)) => {}
        }
    }
    assert!(valid >= 5, "{valid} valid config seeds");
}

#[test]
fn the_model_seeds_load_except_the_refused_one() {
    for (path, bytes) in read_dir_files(&corpus_dir("model")) {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("afl-") || name.starts_with("finding-") {
            continue;
        }
        let loaded = Model::from_bytes(&bytes, &ScoringConfig::default(), &ComputeDevice::Cpu);
        assert_eq!(
            loaded.is_ok(),
            !name.contains("not-finite"),
            "{name}: {:?}",
            loaded.err()
        );
    }
}

#[test]
fn the_admin_and_scoring_seeds_get_answers_of_every_kind() {
    use gateway_fuzz::targets::{admin, scoring};
    for (_, bytes) in read_dir_files(&corpus_dir("admin")) {
        admin::run(&bytes);
    }
    let a = admin::answers();
    assert!(a[2] >= 12 && a[4] >= 20, "admin answers by class: {a:?}");
    for (_, bytes) in read_dir_files(&corpus_dir("scoring")) {
        scoring::run(&bytes);
    }
    let s = scoring::answers();
    assert!(s[2] >= 5 && s[4] >= 8, "scoring answers by class: {s:?}");
}
