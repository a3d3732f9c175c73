//! Everything a configuration needs from outside its own text: the files it names (admin token
//! files, certificates and keys, plugin and model files) and the environment (`token_env`).
//!
//! Validation asks a [`Files`] for them and does no I/O itself; [`Disk`] is the real one (the
//! filesystem, the process environment, PEM loading in [`crate::certs`]). Validation asks at
//! the point where it checks the field, so a problem with a file is reported at that field's
//! `file:line`, in the same order as every other problem.

use std::path::Path;

use rustls::sign::CertifiedKey;

use crate::certs::CertError;

/// Where validation reads the files and variables a configuration names.
pub trait Files {
    /// The text of a file (`[admin] token_file`).
    fn read_to_string(&self, path: &Path) -> std::io::Result<String>;
    /// Whether `path` is a regular file (following links); an error when it cannot be read.
    fn is_file(&self, path: &Path) -> std::io::Result<bool>;
    /// An environment variable; `None` when unset or not Unicode (`[admin] token_env`).
    fn var(&self, name: &str) -> Option<String>;
    /// A PEM chain and its key, checked to belong together (`[[tls.certificates]]`).
    fn certified_key(&self, cert: &Path, key: &Path) -> Result<CertifiedKey, CertError>;
}

/// The filesystem and the process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Disk;

impl Files for Disk {
    fn read_to_string(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn is_file(&self, path: &Path) -> std::io::Result<bool> {
        std::fs::metadata(path).map(|m| m.is_file())
    }

    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn certified_key(&self, cert: &Path, key: &Path) -> Result<CertifiedKey, CertError> {
        crate::certs::load_certified_key(cert, key)
    }
}
