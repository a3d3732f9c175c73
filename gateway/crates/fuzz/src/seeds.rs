//! Seeds that are made rather than written: small hand-made components for `plugin`, small
//! model files for `model` ([`generated`]; `gateway-fuzz seeds` writes them into the corpus,
//! and a test checks the committed files are what these functions make), the built plugins
//! (`plugins/dist/*.wasm`, when `plugins/build.sh` has run; too large to commit), and the
//! structure-aware mutation of safetensors files.

use std::path::Path;

use gateway_scoring::format::encode;
use gateway_scoring::{sample_model, ModelKind, SampleSpec, Similarity};
use wasm_encoder::{
    ComponentBuilder, ComponentExportKind, ComponentTypeRef, ExportKind, ExportSection, Function,
    FunctionSection, InstanceType, Instruction, MemorySection, MemoryType, Module, StartSection,
    TypeSection,
};

use crate::mutate::{Mutator, Rng};

/// A generated corpus entry: target, file name, content.
pub type Seed = (&'static str, &'static str, Vec<u8>);

/// Every generated corpus entry.
pub fn generated() -> Vec<Seed> {
    let mut all = Vec::new();
    all.extend(components());
    all.extend(models());
    all.extend(signed_uploads());
    all
}

/// Admin uploads signed by the key the admin fixture trusts (one for each answer of the
/// fake: accepted when the body's SHA-256 starts with an even digit).
fn signed_uploads() -> Vec<Seed> {
    use ed25519_dalek::Signer;
    let key = crate::targets::admin::signing_key();
    let upload = |name: &str, body: &[u8]| {
        let signature: String = key
            .sign(body)
            .to_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut text = format!(
            "PUT /admin/plugins/{name}\nauthorization: Bearer $TOKEN\nx-signature: {signature}\n\n"
        )
        .into_bytes();
        text.extend_from_slice(body);
        text
    };
    let body = |even: bool| {
        (0u32..)
            .map(|i| format!("signed upload {i}").into_bytes())
            .find(|b| {
                let first = gateway_store::sha256_hex(b).as_bytes()[0];
                let digit = (first as char).to_digit(16).unwrap_or(0);
                digit.is_multiple_of(2) == even
            })
            .unwrap_or_default()
    };
    vec![
        (
            "admin",
            "upload-signed-accepted.txt",
            upload("auth", &body(true)),
        ),
        (
            "admin",
            "upload-signed-refused.txt",
            upload("spare", &body(false)),
        ),
    ]
}

/// The built plugins, `plugins/dist/*.wasm`, when present.
pub fn built_plugins() -> Vec<(String, Vec<u8>)> {
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../plugins/dist");
    crate::run::read_dir_files(&dist)
        .into_iter()
        .filter(|(p, _)| p.extension().is_some_and(|e| e == "wasm"))
        .map(|(p, b)| (p.display().to_string(), b))
        .collect()
}

/// A core module with a memory, an exported `init` of type `[] -> []`, and optionally a
/// start function that loops forever.
fn core_module(looping_start: bool) -> Module {
    let mut module = Module::new();
    let mut types = TypeSection::new();
    types.ty().function([], []);
    module.section(&types);
    let mut funcs = FunctionSection::new();
    funcs.function(0);
    if looping_start {
        funcs.function(0);
    }
    module.section(&funcs);
    let mut memories = MemorySection::new();
    memories.memory(MemoryType {
        minimum: 1,
        maximum: Some(2),
        memory64: false,
        shared: false,
        page_size_log2: None,
    });
    module.section(&memories);
    let mut exports = ExportSection::new();
    exports.export("init", ExportKind::Func, 0);
    exports.export("memory", ExportKind::Memory, 0);
    module.section(&exports);
    if looping_start {
        module.section(&StartSection { function_index: 1 });
    }
    let mut code = wasm_encoder::CodeSection::new();
    let mut init = Function::new([]);
    init.instruction(&Instruction::End);
    code.function(&init);
    if looping_start {
        let mut spin = Function::new([]);
        spin.instruction(&Instruction::Loop(wasm_encoder::BlockType::Empty))
            .instruction(&Instruction::Br(0))
            .instruction(&Instruction::End)
            .instruction(&Instruction::End);
        code.function(&spin);
    }
    module.section(&code);
    module
}

/// Small components that are valid but not plugins, and a core module that is no component.
fn components() -> Vec<Seed> {
    let empty = ComponentBuilder::default().finish();

    let mut b = ComponentBuilder::default();
    b.core_module(Some("m"), &core_module(false));
    let with_module = b.finish();

    // `init: func()` lifted from the core module: a plugin export with the wrong type.
    let mut b = ComponentBuilder::default();
    let m = b.core_module(Some("m"), &core_module(false));
    let i = b.core_instantiate(Some("i"), m, []);
    let core_init = b.core_alias_export(Some("init"), i, "init", ExportKind::Func);
    let (ty, mut f) = b.type_function(Some("init-type"));
    f.params(std::iter::empty::<(&str, wasm_encoder::ComponentValType)>())
        .result(None);
    let init = b.lift_func(Some("init"), core_init, ty, []);
    b.export("init", ComponentExportKind::Func, init, None);
    let lifted = b.finish();

    // An import the host does not provide (it is linked as a trap), no exports.
    let mut b = ComponentBuilder::default();
    let mut instance = InstanceType::new();
    instance
        .ty()
        .function()
        .params(std::iter::empty::<(&str, wasm_encoder::ComponentValType)>())
        .result(None);
    instance.export("get-environment", ComponentTypeRef::Func(0));
    let it = b.type_instance(Some("environment"), &instance);
    b.import("wasi:cli/environment@0.2.0", ComponentTypeRef::Instance(it));
    let unknown_import = b.finish();

    // A core module whose start function never returns, instantiated inside the component.
    let mut b = ComponentBuilder::default();
    let m = b.core_module(Some("spin"), &core_module(true));
    b.core_instantiate(Some("i"), m, []);
    let spinning = b.finish();

    let core = core_module(false).finish();

    vec![
        ("plugin", "empty-component.wasm", empty),
        ("plugin", "component-with-core-module.wasm", with_module),
        ("plugin", "lifted-init-wrong-type.wasm", lifted),
        ("plugin", "unknown-import.wasm", unknown_import),
        ("plugin", "spinning-start.wasm", spinning),
        ("plugin", "core-module-not-component.wasm", core),
    ]
}

/// Small model files: both kinds, both similarities, several layer counts, and refused ones.
fn models() -> Vec<Seed> {
    let embedding = |n_items, dim, n_users, similarity| {
        sample_model(&SampleSpec {
            n_users,
            similarity,
            ..SampleSpec::embedding(n_items, dim, 3)
        })
    };
    let mlp = |user_dim, item_dim, n_dense, hidden: Vec<usize>| {
        sample_model(&SampleSpec {
            kind: ModelKind::Mlp,
            user_dim,
            item_dim,
            n_dense,
            hidden,
            ..SampleSpec::mlp(4, 6, 3)
        })
    };
    let nan_items = [0.5f32, f32::NAN, 1.0, 2.0];
    let not_finite = encode(
        &[
            ("kind", "embedding".into()),
            ("name", "nan".into()),
            ("version", "1".into()),
            ("n_items", "2".into()),
            ("dim", "2".into()),
            ("similarity", "dot".into()),
        ],
        &[("items", vec![2, 2], &nan_items)],
    );
    let mlp_no_dense = encode(
        &[
            ("kind", "mlp".into()),
            ("name", "tiny".into()),
            ("version", "1".into()),
            ("n_users", "1".into()),
            ("n_items", "1".into()),
            ("user_dim", "1".into()),
            ("item_dim", "1".into()),
            ("n_dense", "0".into()),
            ("layers", "1".into()),
        ],
        &[
            ("users", vec![1, 1], &[0.25]),
            ("items", vec![1, 1], &[0.5]),
            ("w1", vec![1, 2], &[1.0, -1.0]),
            ("b1", vec![1], &[0.0]),
        ],
    );
    vec![
        (
            "model",
            "embedding-dot-users.safetensors",
            embedding(12, 4, 3, Similarity::Dot),
        ),
        (
            "model",
            "embedding-cosine.safetensors",
            embedding(8, 3, 0, Similarity::Cosine),
        ),
        (
            "model",
            "embedding-dim1.safetensors",
            embedding(2, 1, 1, Similarity::Cosine),
        ),
        ("model", "mlp-one-hidden.safetensors", mlp(2, 2, 2, vec![3])),
        (
            "model",
            "mlp-two-hidden.safetensors",
            mlp(2, 3, 1, vec![4, 2]),
        ),
        ("model", "mlp-no-hidden-no-dense.safetensors", mlp_no_dense),
        ("model", "embedding-not-finite.safetensors", not_finite),
    ]
}

/// The header and data of a safetensors file: the 8-byte little-endian header length, the
/// JSON header, the tensor bytes.
fn split_safetensors(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let end = usize::try_from(n).ok()?.checked_add(8)?;
    Some((bytes.get(8..end)?, &bytes[end..]))
}

fn join_safetensors(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

/// Mutates a safetensors file's header or data and writes the header length to fit, so the
/// mutations reach the metadata and shape checks instead of dying on the length prefix;
/// one input in four (and anything that is not a safetensors file) is mutated as bytes.
pub fn mutate_safetensors(m: &Mutator, rng: &mut Rng, base: &[u8], other: &[u8]) -> Vec<u8> {
    let Some((header, data)) = split_safetensors(base).filter(|_| !rng.one_in(4)) else {
        return m.mutate(rng, base, other);
    };
    let other_header = split_safetensors(other).map_or(other, |(h, _)| h);
    let mut out = if rng.one_in(3) {
        join_safetensors(header, &m.mutate(rng, data, &[]))
    } else {
        join_safetensors(&m.mutate(rng, header, other_header), data)
    };
    out.truncate(m.max_len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hand_made_components_are_what_they_claim() {
        let by_name = |name: &str| {
            components()
                .into_iter()
                .find(|(_, n, _)| *n == name)
                .unwrap()
                .2
        };
        for (_, name, bytes) in components() {
            let valid = crate::targets::plugin::is_valid_component(&bytes);
            assert_eq!(valid, name != "core-module-not-component.wasm", "{name}");
        }
        assert!(by_name("empty-component.wasm").len() < 16);
    }

    #[test]
    fn safetensors_mutations_keep_the_length_prefix_true() {
        let m = Mutator {
            max_len: 1 << 16,
            dictionary: &[b"\"dim\":\""],
        };
        let (_, _, base) = models().remove(0);
        let mut rng = Rng::new(5);
        let mut framed = 0;
        for _ in 0..200 {
            let out = mutate_safetensors(&m, &mut rng, &base, &base);
            if split_safetensors(&out).is_some() {
                framed += 1;
            }
        }
        assert!(
            framed > 100,
            "{framed} of 200 mutations kept a true header length"
        );
    }
}
