//! Fuzz targets for the gateway's inputs, on the stable toolchain.
//!
//! Five targets ([`targets`]), each a `fn(&[u8])` that must return for every input (an
//! error is an answer; a panic, a hang or a runaway allocation is a finding):
//!
//! | target | input | entry point |
//! | --- | --- | --- |
//! | `config` | TOML text | `Config::from_toml_with` (`gateway check`'s parse and validation, files faked), `Config::parse_raw`, then the router, experiments and TLS config of a valid one |
//! | `model` | a safetensors file | `gateway_scoring::inspect`, `Model::from_bytes` (f32, f16, tight limits), then CPU scoring of a model that loads |
//! | `plugin` | a component file | wasmparser validation, then `PluginRuntime::load_bytes` (compile, world check, `init`) for valid components up to 128 KiB; `PluginRuntime::inspect` for small invalid ones |
//! | `admin` | an HTTP request as text | the real admin listener (`gateway_admin::serve`) over loopback, in front of a fake `Control` |
//! | `scoring` | method, path and JSON body | `gateway_proxy::scoring_endpoint::handle` with two CPU models behind their batchers |
//!
//! Two ways to run them:
//!
//! - in-process and bounded ([`run::run`]): every file of `corpus/<target>/` is replayed, then
//!   mutated inputs from a deterministic mutator ([`mutate`]) run until a count or a time
//!   budget is spent. The crate's test does this for every target; `gateway-fuzz run` does
//!   it for longer;
//! - coverage-guided with AFL++ through `cargo afl` (the `gateway-fuzz-afl` binary, feature
//!   `afl`). The README's "Fuzzing" section has the commands.

#![warn(missing_docs)]

pub mod fixtures;
pub mod mutate;
pub mod run;
pub mod seeds;
pub mod targets;
pub mod watch;

use mutate::{Mutator, Rng};

/// A fuzz target and how to feed it.
pub struct Target {
    /// Its name: the corpus directory and the command-line argument.
    pub name: &'static str,
    /// What it exercises, in one line.
    pub about: &'static str,
    /// The target itself.
    pub run: fn(&[u8]),
    /// The mutator's size bound and dictionary.
    pub mutator: Mutator,
    /// Makes a new input from a corpus entry and another one (splicing).
    pub mutate: fn(&Mutator, &mut Rng, &[u8], &[u8]) -> Vec<u8>,
    /// Seeds from outside the committed corpus (e.g. the built plugins, when present).
    pub extra_seeds: fn() -> Vec<(String, Vec<u8>)>,
}

fn plain(m: &Mutator, rng: &mut Rng, base: &[u8], other: &[u8]) -> Vec<u8> {
    m.mutate(rng, base, other)
}

fn none() -> Vec<(String, Vec<u8>)> {
    Vec::new()
}

const CONFIG_DICT: &[&[u8]] = &[
    b"[server]\n",
    b"[limits]\n",
    b"[logging]\n",
    b"[proxy]\n",
    b"[admin]\n",
    b"[store]\n",
    b"[scoring]\n",
    b"[plugin_runtime]\n",
    b"[feedback]\n",
    b"[[listeners]]\n",
    b"[[upstreams]]\n",
    b"[upstreams.health_check]\n",
    b"[upstreams.passive]\n",
    b"[[routes]]\n",
    b"[[plugins]]\n",
    b"[[models]]\n",
    b"[[tls.certificates]]\n",
    b"[[experiments]]\n",
    b"[[experiments.variants]]\n",
    b"[experiments.rollout]\n",
    b"name = \"a\"\n",
    b"bind = \"127.0.0.1:0\"\n",
    b"protocol = \"http\"\n",
    b"backends = [\"127.0.0.1:1\"]\n",
    b"upstream = \"a\"\n",
    b"hosts = [\"*.a.test\", \"*\"]\n",
    b"path_prefix = \"/a\"\n",
    b"plugins = [\"a\"]\n",
    b"variants = { a = \"a\" }\n",
    b"default_variant = \"a\"\n",
    b"routes = [\"a\"]\n",
    b"assign_by = \"header:x\"\n",
    b"steps = [5, 100]\n",
    b"weight = 0\n",
    b"path = \"missing.wasm\"\n",
    b"key_file = \"k\"\n",
    b"token_env = \"T\"\n",
    b"trusted_keys = [\"00\"]\n",
    b"server_names = [\"*.a.test\"]\n",
    b"cert = \"c\"\nkey = \"k\"\n",
    b"eval_data = \"e\"\n",
    b"sha256 = \"",
    b"\"missing\"",
    b"\"empty\"",
    b"true",
    b"false",
    b" = ",
    b"\"\"\"",
    b"'''",
    b"\\u0000",
    b"\\U0010FFFF",
    b"1979-05-27T07:32:00Z",
    b"inf",
    b"nan",
    b"0x7fffffffffffffff",
];

const MODEL_DICT: &[&[u8]] = &[
    b"\"kind\":\"embedding\"",
    b"\"kind\":\"mlp\"",
    b"\"n_items\":\"",
    b"\"n_users\":\"",
    b"\"dim\":\"",
    b"\"user_dim\":\"",
    b"\"item_dim\":\"",
    b"\"n_dense\":\"",
    b"\"layers\":\"",
    b"\"similarity\":\"cosine\"",
    b"\"similarity\":\"dot\"",
    b"\"__metadata__\":{",
    b"\"dtype\":\"F32\"",
    b"\"dtype\":\"F16\"",
    b"\"dtype\":\"BF16\"",
    b"\"dtype\":\"U8\"",
    b"\"shape\":[",
    b"\"data_offsets\":[",
    b"\"items\"",
    b"\"users\"",
    b"\"w1\"",
    b"\"b1\"",
    b"\"w2\"",
    b"\"b2\"",
    b"18446744073709551615",
    b"4294967296",
    b",1",
    b",",
    b"]",
    b"}",
    // f32 NaN, infinity, largest and smallest normal, little endian.
    b"\x00\x00\xc0\x7f",
    b"\x00\x00\x80\x7f",
    b"\xff\xff\x7f\x7f",
    b"\x00\x00\x80\x00",
];

const PLUGIN_DICT: &[&[u8]] = &[
    b"\0asm",
    b"\x0d\x00\x01\x00",
    b"\x01\x00\x00\x00",
    b"storefront:gateway/plugin@0.1.0",
    b"storefront:gateway/http@0.1.0",
    b"init",
    b"on-request",
    b"on-response",
    b"wasi:cli/environment@0.2.0",
    b"memory",
    b"cabi_realloc",
    b"\x00\x61\x73\x6d",
    b"\x7f",
    b"\xff\xff\xff\xff\x0f",
];

const ADMIN_DICT: &[&[u8]] = &[
    b"GET ",
    b"PUT ",
    b"POST ",
    b"DELETE ",
    b"HEAD ",
    b"/admin/",
    b"status",
    b"config",
    b"reload",
    b"hints",
    b"audit",
    b"plugins",
    b"models",
    b"/auth",
    b"/hygiene",
    b"/spare",
    b"/recs",
    b"/ctr",
    b"/rollback",
    b"?version=",
    b"?limit=",
    b"&limit=",
    b"rollouts",
    b"/ranking",
    b"/pause",
    b"/resume",
    b"/promote",
    b"/abort",
    b"/metrics",
    b"/readyz",
    b"/healthz",
    b"authorization: Bearer $TOKEN\n",
    b"authorization: Bearer x\n",
    b"x-signature: ",
    b"\n\n",
    b"%2F",
    b"%00",
    b"/../",
    b"//",
    b"0",
    b"-1",
    b"18446744073709551616",
];

const SCORING_DICT: &[&[u8]] = &[
    b"POST ",
    b"GET ",
    b"recs/rank",
    b"recs/topk",
    b"recs/predict",
    b"ctr/predict",
    b"ctr/rank",
    b" *4096",
    b" *100000",
    b"{\"user\": 1",
    b"\"user\": ",
    b"\"vector\": [",
    b"\"candidates\": [",
    b"\"k\": ",
    b"\"rows\": [",
    b"{\"user\": 0, \"item\": 0, \"dense\": [0.5, 1, 2, 3]}",
    b"\"dense\": [",
    b"\"item\": ",
    b"1e39",
    b"-1e39",
    b"1e-45",
    b"4294967295",
    b"4294967296",
    b"18446744073709551615",
    b"null",
    b"true",
    b"[]",
    b"{}",
    b", ",
    b"]",
    b"}",
];

/// Every target, in the order the test runs them.
pub fn targets() -> &'static [Target] {
    static TARGETS: &[Target] = &[
        Target {
            name: "config",
            about: "TOML config text: parse, validate (files faked), build router/experiments/TLS",
            run: targets::config::run,
            mutator: Mutator {
                max_len: 16 * 1024,
                dictionary: CONFIG_DICT,
            },
            mutate: plain,
            extra_seeds: none,
        },
        Target {
            name: "model",
            about:
                "safetensors model files: inspect, load (f32/f16/tight limits), score on the CPU",
            run: targets::model::run,
            mutator: Mutator {
                max_len: 64 * 1024,
                dictionary: MODEL_DICT,
            },
            mutate: seeds::mutate_safetensors,
            extra_seeds: none,
        },
        Target {
            name: "plugin",
            about: "component files: validate, compile, check the world, run init",
            run: targets::plugin::run,
            mutator: Mutator {
                max_len: 512 * 1024,
                dictionary: PLUGIN_DICT,
            },
            mutate: plain,
            extra_seeds: seeds::built_plugins,
        },
        Target {
            name: "admin",
            about: "admin API requests through the real listener and router, fake Control",
            run: targets::admin::run,
            mutator: Mutator {
                max_len: 8 * 1024,
                dictionary: ADMIN_DICT,
            },
            mutate: plain,
            extra_seeds: none,
        },
        Target {
            name: "scoring",
            about: "scoring endpoint requests: JSON body, limits, batching, CPU scoring",
            run: targets::scoring::run,
            mutator: Mutator {
                max_len: 16 * 1024,
                dictionary: SCORING_DICT,
            },
            mutate: targets::scoring::mutate,
            extra_seeds: none,
        },
    ];
    TARGETS
}

/// The target named `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    targets().iter().find(|t| t.name == name)
}
