//! The model file: safetensors with the model's description in the `__metadata__` map.
//!
//! Common metadata: `kind` (`embedding` or `mlp`), `name`, `version` (free text).
//!
//! **embedding** — metadata `n_items`, `dim`, `similarity` (`dot` or `cosine`), optional
//! `n_users`; tensors `items` `[n_items, dim]` and, when `n_users` > 0, `users`
//! `[n_users, dim]`. Row `i` of `items` is item id `i` (and row `u` of `users` user id `u`):
//! ids are dense row indices; mapping catalog SKUs to rows is the caller's business.
//!
//! **mlp** — metadata `n_users`, `n_items`, `user_dim`, `item_dim`, `n_dense`, `layers` (the
//! output width of each layer, comma separated, the last one 1, e.g. `"32,16,1"`); tensors
//! `users` `[n_users, user_dim]`, `items` `[n_items, item_dim]`, and for layer `l` = 1..n
//! `w{l}` `[out_l, in_l]` (torch.nn.Linear layout) and `b{l}` `[out_l]`. The input of layer 1
//! is `concat(users[user], items[item], dense)`, so `in_1 = user_dim + item_dim + n_dense`;
//! ReLU between layers, sigmoid after the last.
//!
//! Every tensor is F32 (little endian), every value finite; other tensors are refused.

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use super::config::ModelLimits;
use super::error::ModelError;

/// Widest layer (input included) the MLP kernel handles.
pub(crate) const MAX_MLP_WIDTH: usize = 1024;

/// The two model kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    Embedding,
    Mlp,
}

impl ModelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Embedding => "embedding",
            ModelKind::Mlp => "mlp",
        }
    }
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an embedding model compares a query with an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Similarity {
    Dot,
    /// Dot product of unit vectors; a zero vector scores 0 against everything.
    Cosine,
}

impl Similarity {
    pub fn as_str(self) -> &'static str {
        match self {
            Similarity::Dot => "dot",
            Similarity::Cosine => "cosine",
        }
    }
}

/// What a loaded model is, from its metadata and tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub kind: ModelKind,
    pub name: String,
    pub version: String,
    pub n_items: usize,
    /// 0 when an embedding model has no `users` table.
    pub n_users: usize,
    /// Embedding width (embedding models).
    pub dim: usize,
    pub similarity: Option<Similarity>,
    /// MLP models: widths of the user and item embeddings and the dense feature count.
    pub user_dim: usize,
    pub item_dim: usize,
    pub n_dense: usize,
    /// MLP models: `[in_1, out_1, out_2, ..., 1]`.
    pub layer_widths: Vec<usize>,
    /// f32 values in the file.
    pub parameters: u64,
    /// Size of the file.
    pub file_bytes: u64,
    /// Every metadata entry as written.
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub n_in: usize,
    pub n_out: usize,
    /// `[n_out, n_in]` row-major.
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

/// The host copy of a model's weights. Cosine models keep unit-length item rows (within f16
/// rounding after f16 storage rounded them).
#[derive(Debug, Clone)]
pub(crate) enum Weights {
    Embedding {
        items: Vec<f32>,
        users: Option<Vec<f32>>,
    },
    Mlp {
        users: Vec<f32>,
        items: Vec<f32>,
        layers: Vec<Layer>,
    },
}

impl Weights {
    /// Values in the tables that go to the device as embedding tables (f16 storage applies
    /// to these).
    pub(crate) fn table_len(&self) -> usize {
        match self {
            Weights::Embedding { items, .. } => items.len(),
            Weights::Mlp { users, items, .. } => users.len() + items.len(),
        }
    }
}

/// A tensor as listed by [`inspect`].
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSummary {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub elements: u64,
}

/// What a file holds, read from its header only (no validation beyond the safetensors format).
#[derive(Debug, Clone, PartialEq)]
pub struct Inspection {
    pub metadata: BTreeMap<String, String>,
    pub tensors: Vec<TensorSummary>,
    pub parameters: u64,
    pub file_bytes: u64,
}

/// Reads the header of a safetensors file.
pub fn inspect(bytes: &[u8]) -> Result<Inspection, ModelError> {
    let (_, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| ModelError::Format(e.to_string()))?;
    let mut tensors: Vec<TensorSummary> = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| TensorSummary {
            name,
            dtype: format!("{:?}", info.dtype),
            elements: info.shape.iter().map(|&d| d as u64).product(),
            shape: info.shape.clone(),
        })
        .collect();
    tensors.sort_by_key(|a| tensor_order(&a.name));
    Ok(Inspection {
        metadata: meta
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        parameters: tensors.iter().map(|t| t.elements).sum(),
        tensors,
        file_bytes: bytes.len() as u64,
    })
}

/// users, items, then w1, b1, w2, b2, ... (numerically), then the rest by name.
fn tensor_order(name: &str) -> (u8, usize, u8, String) {
    match name {
        "users" => return (0, 0, 0, String::new()),
        "items" => return (1, 0, 0, String::new()),
        _ => {}
    }
    for (p, rank) in [("w", 0u8), ("b", 1u8)] {
        if let Some(n) = name.strip_prefix(p).and_then(|n| n.parse::<usize>().ok()) {
            return (2, n, rank, String::new());
        }
    }
    (3, 0, 0, name.to_string())
}

struct Meta<'a>(&'a HashMap<String, String>);

impl Meta<'_> {
    fn str(&self, key: &str) -> Result<&str, ModelError> {
        self.0
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| ModelError::Metadata {
                key: key.to_string(),
                problem: "missing".to_string(),
            })
    }
    fn count(&self, key: &str) -> Result<usize, ModelError> {
        parse_count(key, self.str(key)?)
    }
    fn count_or_zero(&self, key: &str) -> Result<usize, ModelError> {
        match self.0.get(key) {
            Some(v) => parse_count(key, v),
            None => Ok(0),
        }
    }
}

fn parse_count(key: &str, v: &str) -> Result<usize, ModelError> {
    v.trim().parse::<usize>().map_err(|_| ModelError::Metadata {
        key: key.to_string(),
        problem: format!("{v:?} is not a non-negative integer"),
    })
}

fn limit(what: impl Into<String>, found: usize, max: u64) -> Result<(), ModelError> {
    if found as u64 > max {
        return Err(ModelError::Limit {
            what: what.into(),
            found: found as u64,
            limit: max,
        });
    }
    Ok(())
}

fn at_least_one(key: &str, v: usize) -> Result<(), ModelError> {
    if v == 0 {
        return Err(ModelError::Metadata {
            key: key.to_string(),
            problem: "must be at least 1".to_string(),
        });
    }
    Ok(())
}

/// Parses and validates a model file, returning its description and host weights.
pub(crate) fn parse(
    bytes: &[u8],
    limits: &ModelLimits,
) -> Result<(ModelInfo, Weights), ModelError> {
    if bytes.len() as u64 > limits.max_file_bytes {
        return Err(ModelError::FileTooLarge {
            size: bytes.len() as u64,
            limit: limits.max_file_bytes,
        });
    }
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| ModelError::Format(e.to_string()))?;
    let empty = HashMap::new();
    let meta_map = header.metadata().as_ref().unwrap_or(&empty);
    let meta = Meta(meta_map);
    let kind = match meta.str("kind")? {
        "embedding" => ModelKind::Embedding,
        "mlp" => ModelKind::Mlp,
        other => return Err(ModelError::UnknownKind(other.to_string())),
    };
    let name = meta.str("name")?.to_string();
    let version = meta.str("version")?.to_string();
    let mut info = ModelInfo {
        kind,
        name,
        version,
        n_items: 0,
        n_users: 0,
        dim: 0,
        similarity: None,
        user_dim: 0,
        item_dim: 0,
        n_dense: 0,
        layer_widths: Vec::new(),
        parameters: 0,
        file_bytes: bytes.len() as u64,
        metadata: meta_map.clone().into_iter().collect(),
    };

    // Expected tensors and shapes, from the metadata alone.
    let mut expected: Vec<(String, Vec<usize>)> = Vec::new();
    match kind {
        ModelKind::Embedding => {
            info.n_items = meta.count("n_items")?;
            info.dim = meta.count("dim")?;
            info.n_users = meta.count_or_zero("n_users")?;
            info.similarity = Some(match meta.str("similarity")? {
                "dot" => Similarity::Dot,
                "cosine" => Similarity::Cosine,
                other => {
                    return Err(ModelError::Metadata {
                        key: "similarity".into(),
                        problem: format!("{other:?}; expected dot or cosine"),
                    })
                }
            });
            at_least_one("n_items", info.n_items)?;
            at_least_one("dim", info.dim)?;
            limit("n_items", info.n_items, limits.max_items)?;
            limit("n_users", info.n_users, limits.max_users)?;
            limit("dim", info.dim, limits.max_dim)?;
            expected.push(("items".into(), vec![info.n_items, info.dim]));
            if info.n_users > 0 {
                expected.push(("users".into(), vec![info.n_users, info.dim]));
            }
        }
        ModelKind::Mlp => {
            info.n_users = meta.count("n_users")?;
            info.n_items = meta.count("n_items")?;
            info.user_dim = meta.count("user_dim")?;
            info.item_dim = meta.count("item_dim")?;
            info.n_dense = meta.count("n_dense")?;
            for (k, v) in [
                ("n_users", info.n_users),
                ("n_items", info.n_items),
                ("user_dim", info.user_dim),
                ("item_dim", info.item_dim),
            ] {
                at_least_one(k, v)?;
            }
            limit("n_items", info.n_items, limits.max_items)?;
            limit("n_users", info.n_users, limits.max_users)?;
            limit("user_dim", info.user_dim, limits.max_dim)?;
            limit("item_dim", info.item_dim, limits.max_dim)?;
            let layers = meta.str("layers")?;
            // `n_dense` has no limit of its own: the layer-width check below bounds it, so
            // the sum must not wrap before it (a wrapped width would let a file declaring
            // 2^64 - 1 dense features load).
            let input_width = info
                .user_dim
                .saturating_add(info.item_dim)
                .saturating_add(info.n_dense);
            let mut widths = vec![input_width];
            for part in layers.split(',') {
                let w = parse_count("layers", part)?;
                if w == 0 {
                    return Err(ModelError::Metadata {
                        key: "layers".into(),
                        problem: format!("{layers:?} has a layer of width 0"),
                    });
                }
                widths.push(w);
            }
            if widths.last() != Some(&1) {
                return Err(ModelError::Metadata {
                    key: "layers".into(),
                    problem: format!("{layers:?}: the last layer must have width 1 (one logit)"),
                });
            }
            if let Some(w) = widths.iter().find(|&&w| w > MAX_MLP_WIDTH) {
                return Err(ModelError::Limit {
                    what: "MLP layer width (input = user_dim + item_dim + n_dense included)".into(),
                    found: *w as u64,
                    limit: MAX_MLP_WIDTH as u64,
                });
            }
            expected.push(("users".into(), vec![info.n_users, info.user_dim]));
            expected.push(("items".into(), vec![info.n_items, info.item_dim]));
            for l in 1..widths.len() {
                expected.push((format!("w{l}"), vec![widths[l], widths[l - 1]]));
                expected.push((format!("b{l}"), vec![widths[l]]));
            }
            info.layer_widths = widths;
        }
    }

    let parameters: u64 = expected
        .iter()
        .map(|(_, s)| s.iter().map(|&d| d as u64).product::<u64>())
        .sum();
    if parameters > limits.max_parameters {
        return Err(ModelError::Limit {
            what: "parameter count".into(),
            found: parameters,
            limit: limits.max_parameters,
        });
    }
    info.parameters = parameters;

    // Header checks before touching any data: names, dtypes, shapes.
    let present = header.tensors();
    let expected_names: Vec<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut extra: Vec<&String> = present
        .keys()
        .filter(|n| !expected_names.contains(&n.as_str()))
        .collect();
    extra.sort();
    if let Some(name) = extra.first() {
        return Err(ModelError::UnexpectedTensor {
            name: name.to_string(),
            kind: kind.to_string(),
            expected: expected_names.join(", "),
        });
    }
    for (name, shape) in &expected {
        let t = present
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
        if t.dtype != Dtype::F32 {
            return Err(ModelError::Dtype {
                name: name.clone(),
                found: format!("{:?}", t.dtype),
            });
        }
        if &t.shape != shape {
            return Err(ModelError::Shape {
                name: name.clone(),
                expected: shape.clone(),
                found: t.shape.clone(),
            });
        }
    }

    let st = SafeTensors::deserialize(bytes).map_err(|e| ModelError::Format(e.to_string()))?;
    let read = |name: &str| -> Result<Vec<f32>, ModelError> {
        let view = st
            .tensor(name)
            .map_err(|_| ModelError::MissingTensor(name.to_string()))?;
        let mut out = Vec::with_capacity(view.data().len() / 4);
        for (index, c) in view.data().chunks_exact(4).enumerate() {
            let value = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            if !value.is_finite() {
                return Err(ModelError::NotFinite {
                    name: name.to_string(),
                    index,
                    value,
                });
            }
            out.push(value);
        }
        Ok(out)
    };
    let weights = match kind {
        ModelKind::Embedding => {
            let mut items = read("items")?;
            if info.similarity == Some(Similarity::Cosine) {
                for row in items.chunks_exact_mut(info.dim) {
                    normalize(row);
                }
            }
            let users = if info.n_users > 0 {
                Some(read("users")?)
            } else {
                None
            };
            Weights::Embedding { items, users }
        }
        ModelKind::Mlp => {
            let users = read("users")?;
            let items = read("items")?;
            let widths = &info.layer_widths;
            let mut layers = Vec::with_capacity(widths.len() - 1);
            for l in 1..widths.len() {
                layers.push(Layer {
                    n_in: widths[l - 1],
                    n_out: widths[l],
                    w: read(&format!("w{l}"))?,
                    b: read(&format!("b{l}"))?,
                });
            }
            Weights::Mlp {
                users,
                items,
                layers,
            }
        }
    };
    Ok((info, weights))
}

/// Scales `v` to unit length in place; a zero vector stays zero.
pub(crate) fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 && norm.is_finite() {
        for x in v.iter_mut() {
            *x /= norm;
        }
    }
}

/// A tensor to write: name, shape, values.
pub type TensorData<'a> = (&'a str, Vec<usize>, &'a [f32]);

/// Encodes F32 tensors and metadata as a safetensors file (the format the loader reads), tensors
/// in the given order and metadata keys sorted, so the same input always gives the same bytes
/// (`safetensors::serialize` takes the metadata as a `HashMap`, whose order varies per run).
/// No validation: the tests use it to write broken files on purpose.
pub fn encode(metadata: &[(&str, String)], tensors: &[TensorData<'_>]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let meta: BTreeMap<&str, &str> = metadata.iter().map(|(k, v)| (*k, v.as_str())).collect();
    header.insert("__metadata__".into(), serde_json::json!(meta));
    let mut offset = 0usize;
    for (name, shape, values) in tensors {
        let end = offset + values.len() * 4;
        header.insert(
            name.to_string(),
            serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut json =
        serde_json::to_vec(&serde_json::Value::Object(header)).expect("a JSON map serializes");
    // The data starts 8-byte aligned, as safetensors' own writer pads it.
    while !(json.len() + 8).is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (_, _, values) in tensors {
        out.extend(values.iter().flat_map(|x| x.to_le_bytes()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `model` fuzz target: an `n_dense` near `usize::MAX` overflowed the
    /// input width (a panic in debug builds; in release the width wrapped to a small number
    /// and a file with matching `w1` loaded with 2^64 - 1 dense features).
    #[test]
    fn a_huge_dense_count_is_refused_not_wrapped() {
        let v = [0.5f32; 4];
        // What 2 + 3 + (2^64 - 1) wraps to: the `w1` a wrapped width would expect.
        let wrapped = 2usize.wrapping_add(3).wrapping_add(usize::MAX);
        let bytes = encode(
            &[
                ("kind", "mlp".to_string()),
                ("name", "m".to_string()),
                ("version", "1".to_string()),
                ("n_users", "1".to_string()),
                ("n_items", "1".to_string()),
                ("user_dim", "2".to_string()),
                ("item_dim", "3".to_string()),
                ("n_dense", usize::MAX.to_string()),
                ("layers", "1".to_string()),
            ],
            &[
                ("users", vec![1, 2], &v[..2]),
                ("items", vec![1, 3], &v[..3]),
                ("w1", vec![1, wrapped], &v[..wrapped]),
                ("b1", vec![1], &v[..1]),
            ],
        );
        match parse(&bytes, &ModelLimits::default()) {
            Err(ModelError::Limit { what, found, .. }) => {
                assert!(what.contains("layer width"), "{what}");
                assert_eq!(found, u64::MAX);
            }
            other => panic!(
                "expected a width limit error, got {:?}",
                other.map(|(i, _)| i)
            ),
        }
    }

    #[test]
    fn normalize_keeps_zero_vectors() {
        let mut v = [3.0, 4.0];
        normalize(&mut v);
        assert_eq!(v, [0.6, 0.8]);
        let mut z = [0.0, 0.0];
        normalize(&mut z);
        assert_eq!(z, [0.0, 0.0]);
    }

    #[test]
    fn inspect_lists_tensors_in_layer_order() {
        let w = [0.0f32; 4];
        let bytes = encode(
            &[("kind", "mlp".to_string())],
            &[
                ("b10", vec![1], &w[..1]),
                ("w2", vec![2, 2], &w),
                ("items", vec![1], &w[..1]),
                ("b2", vec![2], &w[..2]),
                ("w10", vec![1], &w[..1]),
                ("users", vec![1], &w[..1]),
            ],
        );
        let i = inspect(&bytes).unwrap();
        let names: Vec<&str> = i.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["users", "items", "w2", "b2", "w10", "b10"]);
        assert_eq!(i.parameters, 10);
        assert_eq!(i.metadata["kind"], "mlp");
    }

    #[test]
    fn cosine_models_keep_unit_rows() {
        let items = [3.0f32, 4.0, 0.0, 0.0];
        let meta = [
            ("kind", "embedding".to_string()),
            ("name", "c".to_string()),
            ("version", "1".to_string()),
            ("n_items", "2".to_string()),
            ("dim", "2".to_string()),
            ("similarity", "cosine".to_string()),
        ];
        let (info, weights) = parse(
            &encode(&meta, &[("items", vec![2, 2], &items)]),
            &ModelLimits::default(),
        )
        .unwrap();
        assert_eq!(info.similarity, Some(Similarity::Cosine));
        assert_eq!(info.parameters, 4);
        match weights {
            Weights::Embedding { items, users } => {
                assert_eq!(items, vec![0.6, 0.8, 0.0, 0.0]);
                assert!(users.is_none());
            }
            Weights::Mlp { .. } => panic!("an embedding model"),
        }
    }
}
