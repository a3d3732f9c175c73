//! What the targets share: a [`Files`] that never touches the disk, the Tokio runtime, a
//! certificate, a per-process scratch directory, and configurations built through the config
//! crate (so fields added there later get their defaults here too).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use gateway_config::certs::{certified_key_from_der, CertError};
use gateway_config::files::Files;
use gateway_config::Config;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

/// The secret [`FakeFiles::var`] answers for every environment variable it knows.
pub const SECRET: &str = "fuzz-secret-0123456789abcdef";

/// Answers every file and variable a configuration names without I/O, so a fuzzed config
/// cannot make validation read `/dev/zero` or a private file. A path or variable whose name
/// contains `missing` does not exist; one containing `empty` is empty; everything else
/// exists: files hold a secret derived from their path (so two key files differ), every
/// certificate is one self-signed certificate with its key.
#[derive(Debug, Clone, Copy, Default)]
pub struct FakeFiles;

fn absent(path: &Path) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{} does not exist (fake)", path.display()),
    )
}

impl Files for FakeFiles {
    fn read_to_string(&self, path: &Path) -> std::io::Result<String> {
        let shown = path.to_string_lossy();
        if shown.contains("missing") {
            return Err(absent(path));
        }
        if shown.contains("empty") {
            return Ok(String::new());
        }
        Ok(format!(
            "{SECRET}-{}\n",
            gateway_store::sha256_hex(shown.as_bytes())
        ))
    }

    fn is_file(&self, path: &Path) -> std::io::Result<bool> {
        let shown = path.to_string_lossy();
        if shown.contains("missing") {
            return Err(absent(path));
        }
        Ok(!shown.ends_with('/'))
    }

    fn var(&self, name: &str) -> Option<String> {
        if name.contains("missing") {
            None
        } else if name.contains("empty") {
            Some(String::new())
        } else {
            Some(SECRET.to_string())
        }
    }

    fn certified_key(&self, cert: &Path, key: &Path) -> Result<CertifiedKey, CertError> {
        if cert.to_string_lossy().contains("missing") {
            return Err(CertError::Cert {
                path: cert.to_path_buf(),
                reason: "does not exist (fake)".into(),
            });
        }
        if key.to_string_lossy().contains("missing") {
            return Err(CertError::Key {
                path: key.to_path_buf(),
                reason: "does not exist (fake)".into(),
            });
        }
        Ok(certified_key())
    }
}

/// One self-signed certificate (names `localhost` and `*.test`) and its key, made once.
pub fn certified_key() -> CertifiedKey {
    static KEY: OnceLock<CertifiedKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let made =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "*.test".to_string()])
                .expect("a self-signed certificate");
        let chain = vec![CertificateDer::from(made.cert.der().to_vec())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
        certified_key_from_der(chain, key).expect("the key fits its certificate")
    })
    .clone()
}

/// Where relative paths of a fuzzed configuration point: a directory that does not exist
/// (nothing is read there; [`FakeFiles`] answers instead).
pub fn base_dir() -> &'static Path {
    Path::new("/nonexistent/gateway-fuzz")
}

/// Parses and validates a fixture configuration through [`FakeFiles`]; panics when it is
/// invalid (a fixture is the harness's own text).
pub fn config(text: &str) -> Config {
    Config::from_toml_with(text, "fixture.toml", base_dir(), &FakeFiles)
        .unwrap_or_else(|e| panic!("a fuzz fixture configuration is invalid: {e}"))
}

/// A multi-threaded Tokio runtime with one worker, made once per process: the targets that
/// need async code `block_on` it from any thread.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(4)
            .thread_name("gateway-fuzz")
            .enable_all()
            .build()
            .expect("a Tokio runtime")
    })
}

/// A fresh scratch directory for this process, under the temporary directory. Scratch
/// directories that processes no longer running left behind are removed first (on Linux,
/// where `/proc` tells which are running), so repeated runs do not pile them up.
pub fn scratch_dir(what: &str) -> PathBuf {
    let prefix = format!("gateway-fuzz-{what}-");
    let tmp = std::env::temp_dir();
    if Path::new("/proc/self").exists() {
        for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(&prefix)
                .and_then(|rest| rest.split('-').next())
            else {
                continue;
            };
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = tmp.join(format!(
        "{prefix}{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir).expect("creating a scratch directory");
    dir
}

/// Two small CPU models, made once: `recs` (embedding, 64 items, 16 users, dim 8) and `ctr`
/// (MLP, 32 users, 64 items, 4 dense features), as the scoring endpoint serves them.
pub fn sample_models() -> &'static [(String, Vec<u8>)] {
    static MODELS: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    MODELS.get_or_init(|| {
        use gateway_scoring::{sample_model, SampleSpec};
        vec![
            (
                "recs".to_string(),
                sample_model(&SampleSpec::embedding(64, 8, 7)),
            ),
            ("ctr".to_string(), sample_model(&SampleSpec::mlp(32, 64, 7))),
        ]
    })
}

/// Serves each of [`sample_models`] on the CPU path under its name, with its batchers
/// (`families` registers their series).
pub fn model_slots(
    families: &gateway_scoring::serving::ModelFamilies,
) -> std::collections::HashMap<String, Arc<gateway_scoring::serving::ModelSlot>> {
    use gateway_scoring::serving::{BatchPolicy, ModelSlot, ServedModel};
    use gateway_scoring::{ComputeDevice, Model, ScoringConfig};
    sample_models()
        .iter()
        .map(|(name, bytes)| {
            let cfg = ScoringConfig::default();
            let model =
                Model::from_bytes(bytes, &cfg, &ComputeDevice::Cpu).expect("a sample model loads");
            let served = ServedModel {
                model,
                version: gateway_scoring::serving::served_version(bytes, cfg.storage),
            };
            let policy = BatchPolicy {
                max_batch: 8,
                max_queue_delay: std::time::Duration::from_micros(50),
                max_queue: 64,
            };
            (
                name.clone(),
                ModelSlot::start(name, served, policy, families),
            )
        })
        .collect()
}
