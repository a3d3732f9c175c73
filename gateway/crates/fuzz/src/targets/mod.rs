//! The fuzz targets, one module each. Every target is a `fn(&[u8])` that must return for any
//! input: errors are answers, a panic (an `assert!` of the target included), a hang or a
//! runaway allocation is a finding.

pub mod admin;
pub mod config;
pub mod model;
pub mod plugin;
pub mod scoring;
