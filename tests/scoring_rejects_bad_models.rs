//! Loading refuses a bad model file with a message that names what is wrong: the tensor, the
//! expected and found shape, the metadata key, the limit. (Host-side checks: the CPU device.)

use gateway::scoring::format::encode;
use gateway::scoring::{
    sample_model, ComputeDevice, Model, ModelError, SampleSpec, ScoringConfig, TableStorage,
};

fn load(bytes: &[u8]) -> Result<Model, ModelError> {
    Model::from_bytes(bytes, &ScoringConfig::default(), &ComputeDevice::Cpu)
}

fn load_err(bytes: &[u8]) -> String {
    load(bytes)
        .expect_err("the model should be refused")
        .to_string()
}

fn embedding_meta(n_items: usize, dim: usize) -> Vec<(&'static str, String)> {
    vec![
        ("kind", "embedding".into()),
        ("name", "t".into()),
        ("version", "1".into()),
        ("n_items", n_items.to_string()),
        ("dim", dim.to_string()),
        ("similarity", "dot".into()),
    ]
}

#[test]
fn good_samples_load() {
    let m = load(&sample_model(&SampleSpec::embedding(10, 4, 1))).unwrap();
    assert_eq!(
        (m.info().n_items, m.info().dim, m.info().n_users),
        (10, 4, 16)
    );
    let m = load(&sample_model(&SampleSpec::mlp(3, 10, 1))).unwrap();
    assert_eq!(m.info().layer_widths, vec![8 + 8 + 4, 16, 1]);
    assert_eq!(m.info().parameters, 3 * 8 + 10 * 8 + 20 * 16 + 16 + 16 + 1);
}

#[test]
fn wrong_shapes_are_named() {
    let items = vec![0.5f32; 12];
    let e = load_err(&encode(
        &embedding_meta(4, 4),
        &[("items", vec![3, 4], &items)],
    ));
    assert!(
        e.contains("`items`") && e.contains("[4, 4]") && e.contains("[3, 4]"),
        "{e}"
    );

    // An MLP whose second layer does not take the first layer's output.
    let spec = SampleSpec {
        hidden: vec![16],
        ..SampleSpec::mlp(3, 10, 1)
    };
    let good = sample_model(&spec);
    let st = safetensors::SafeTensors::deserialize(&good).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&good).unwrap();
    let mut meta: Vec<(&str, String)> = header
        .metadata()
        .as_ref()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let floats = |name: &str| -> Vec<f32> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let (users, items, b1, b2) = (floats("users"), floats("items"), floats("b1"), floats("b2"));
    let w1 = vec![0.1f32; 16 * 20];
    let w2_bad = vec![0.1f32; 15];
    let e = load_err(&encode(
        &meta,
        &[
            ("users", vec![3, 8], &users),
            ("items", vec![10, 8], &items),
            ("w1", vec![16, 20], &w1),
            ("b1", vec![16], &b1),
            ("w2", vec![1, 15], &w2_bad),
            ("b2", vec![1], &b2),
        ],
    ));
    assert!(
        e.contains("`w2`") && e.contains("[1, 16]") && e.contains("[1, 15]"),
        "{e}"
    );

    // Metadata that disagrees with itself: the last layer must be one logit.
    for (k, v) in meta.iter_mut() {
        if *k == "layers" {
            *v = "16,2".into();
        }
    }
    let e = load_err(&encode(&meta, &[]));
    assert!(e.contains("layers") && e.contains("width 1"), "{e}");
}

#[test]
fn non_finite_values_are_refused() {
    let mut items = vec![0.5f32; 8];
    items[5] = f32::NAN;
    let e = load_err(&encode(
        &embedding_meta(2, 4),
        &[("items", vec![2, 4], &items)],
    ));
    assert!(
        e.contains("`items`") && e.contains("NaN") && e.contains("element 5"),
        "{e}"
    );
    items[5] = f32::INFINITY;
    let e = load_err(&encode(
        &embedding_meta(2, 4),
        &[("items", vec![2, 4], &items)],
    ));
    assert!(e.contains("inf"), "{e}");
}

#[test]
fn unknown_kinds_and_bad_metadata_are_refused() {
    let items = vec![0.5f32; 8];
    let mut meta = embedding_meta(2, 4);
    meta[0].1 = "transformer".into();
    let e = load_err(&encode(&meta, &[("items", vec![2, 4], &items)]));
    assert!(
        e.contains("unknown model kind") && e.contains("transformer"),
        "{e}"
    );

    let mut meta = embedding_meta(2, 4);
    meta.retain(|(k, _)| *k != "kind");
    let e = load_err(&encode(&meta, &[("items", vec![2, 4], &items)]));
    assert!(e.contains("`kind`") && e.contains("missing"), "{e}");

    let mut meta = embedding_meta(2, 4);
    meta[5].1 = "euclid".into();
    let e = load_err(&encode(&meta, &[("items", vec![2, 4], &items)]));
    assert!(e.contains("similarity") && e.contains("euclid"), "{e}");

    let mut meta = embedding_meta(2, 4);
    meta[4].1 = "four".into();
    let e = load_err(&encode(&meta, &[("items", vec![2, 4], &items)]));
    assert!(e.contains("`dim`") && e.contains("four"), "{e}");

    assert!(load_err(b"definitely not safetensors").contains("not a valid safetensors file"));
}

#[test]
fn missing_unexpected_and_mistyped_tensors_are_refused() {
    let e = load_err(&encode(&embedding_meta(2, 4), &[]));
    assert!(e.contains("missing tensor `items`"), "{e}");

    let mut meta = embedding_meta(2, 4);
    meta.push(("n_users", "3".into()));
    let items = vec![0.5f32; 8];
    let e = load_err(&encode(&meta, &[("items", vec![2, 4], &items)]));
    assert!(e.contains("missing tensor `users`"), "{e}");

    let extra = vec![1.0f32; 2];
    let e = load_err(&encode(
        &embedding_meta(2, 4),
        &[("items", vec![2, 4], &items), ("bias", vec![2], &extra)],
    ));
    assert!(e.contains("unexpected tensor `bias`"), "{e}");

    // An F64 table.
    let data: Vec<u8> = (0..8).flat_map(|_| 0.5f64.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![2, 4], &data).unwrap();
    let meta: std::collections::HashMap<String, String> = embedding_meta(2, 4)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let bytes = safetensors::serialize([("items", view)], Some(meta)).unwrap();
    let e = load_err(&bytes);
    assert!(
        e.contains("`items`") && e.contains("F64") && e.contains("F32"),
        "{e}"
    );
}

#[test]
fn models_over_the_limits_are_refused() {
    let bytes = sample_model(&SampleSpec::embedding(100, 8, 1));
    let mut cfg = ScoringConfig::default();
    cfg.limits.max_items = 99;
    let e = Model::from_bytes(&bytes, &cfg, &ComputeDevice::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("n_items is 100") && e.contains("limit of 99"),
        "{e}"
    );

    let mut cfg = ScoringConfig::default();
    cfg.limits.max_file_bytes = 1000;
    let e = Model::from_bytes(&bytes, &cfg, &ComputeDevice::Cpu).unwrap_err();
    assert!(
        matches!(e, ModelError::FileTooLarge { limit: 1000, .. }),
        "{e}"
    );

    // Checked on the file's size, before reading it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let e = Model::load(&path, &cfg, &ComputeDevice::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("over the limit of 1000 bytes"), "{e}");

    let mut cfg = ScoringConfig::default();
    cfg.limits.max_parameters = 100;
    let e = Model::from_bytes(&bytes, &cfg, &ComputeDevice::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("parameter count"), "{e}");

    // The MLP kernel's width limit.
    let spec = SampleSpec {
        hidden: vec![1025],
        ..SampleSpec::mlp(2, 2, 1)
    };
    let e = load_err(&sample_model(&spec));
    assert!(e.contains("1025") && e.contains("1024"), "{e}");

    // Batch limits the GPU path cannot serve.
    let mut cfg = ScoringConfig::default();
    cfg.batch.max_k = 513;
    let e = Model::from_bytes(&bytes, &cfg, &ComputeDevice::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_k"), "{e}");

    let e = Model::load(
        std::path::Path::new("/nonexistent/model.safetensors"),
        &ScoringConfig::default(),
        &ComputeDevice::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("/nonexistent/model.safetensors"), "{e}");
}

#[test]
fn values_beyond_f16_are_refused_only_with_f16_storage() {
    let items = [1.0f32, -2.5, 70000.0, 0.0];
    let bytes = encode(&embedding_meta(2, 2), &[("items", vec![2, 2], &items)]);
    // f32 storage holds it.
    load(&bytes).unwrap();
    let cfg = ScoringConfig {
        storage: TableStorage::F16,
        ..ScoringConfig::default()
    };
    let e = Model::from_bytes(&bytes, &cfg, &ComputeDevice::Cpu)
        .expect_err("70000 does not fit f16")
        .to_string();
    assert!(
        e.contains("`items`") && e.contains("70000") && e.contains("element 2"),
        "{e}"
    );
    assert!(e.contains("f16"), "{e}");
}

#[test]
fn queries_that_could_overflow_the_scores_are_refused() {
    use gateway::scoring::{Query, RankRequest, ScoringError};
    let m = load(&sample_model(&SampleSpec::embedding(10, 4, 1))).unwrap();
    let huge = [1e38f32, -1e38, 1e38, 0.0];
    let e = m
        .rank(&[RankRequest {
            query: Query::Vector(&huge),
            candidates: &[1, 2],
        }])
        .unwrap_err();
    assert!(
        matches!(e, ScoringError::QueryTooLarge { request: 0, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("scale it down"), "{e}");
    let e = m.top_k(&[Query::Vector(&huge)], 3).unwrap_err();
    assert!(matches!(e, ScoringError::QueryTooLarge { .. }), "{e}");
    // Large but safe values are scored.
    let big = [1e10f32, -1e10, 0.5, 0.0];
    let scores = m
        .rank(&[RankRequest {
            query: Query::Vector(&big),
            candidates: &[1, 2],
        }])
        .unwrap();
    assert!(scores[0].iter().all(|s| s.is_finite()), "{scores:?}");
}

#[test]
fn click_rows_that_could_overflow_the_layers_are_refused() {
    use gateway::scoring::{CtrRow, ScoringError};
    let spec = SampleSpec::mlp(3, 10, 1);
    let n_dense = spec.n_dense;
    let m = load(&sample_model(&spec)).unwrap();
    let huge = vec![1e38f32; n_dense];
    let fine = vec![0.5f32; n_dense];
    let rows = [
        CtrRow {
            user: 1,
            item: 2,
            dense: &fine,
        },
        CtrRow {
            user: 1,
            item: 2,
            dense: &huge,
        },
    ];
    let e = m.predict(&rows).unwrap_err();
    assert!(
        matches!(e, ScoringError::InputTooLarge { request: 1, .. }),
        "{e}"
    );
    let p = m.predict(&rows[..1]).unwrap();
    assert!((0.0..=1.0).contains(&p[0]), "{p:?}");
}

#[test]
fn model_inspect_says_whether_f16_storage_fits() {
    let dir = tempfile::tempdir().unwrap();
    let run = |bytes: &[u8], file: &str| {
        let path = dir.path().join(file);
        std::fs::write(&path, bytes).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["model", "inspect"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let ok = run(
        &sample_model(&SampleSpec::embedding(10, 4, 1)),
        "ok.safetensors",
    );
    assert!(ok.contains("f16_storage can be used"), "{ok}");
    let items = [1.0f32, -2.5, 70000.0, 0.0];
    let big = encode(&embedding_meta(2, 2), &[("items", vec![2, 2], &items)]);
    let out = run(&big, "big.safetensors");
    assert!(
        out.contains("f16_storage cannot be used") && out.contains("70000"),
        "{out}"
    );
}

#[test]
fn model_inspect_piped_into_a_reader_that_stops_exits_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    std::fs::write(&path, sample_model(&SampleSpec::embedding(10, 4, 1))).unwrap();
    // `gateway model inspect FILE | head -0`: the reader is gone before the first line.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["model", "inspect"])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
