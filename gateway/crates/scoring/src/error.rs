//! The errors of the scoring module: loading a model, the GPU, scoring a batch.

use thiserror::Error;

/// Something went wrong with the GPU: no adapter, device creation, a kernel that does not
/// validate, a buffer the device cannot hold, a failed readback.
#[derive(Debug, Error)]
pub enum GpuError {
    #[error("no {wanted} adapter found (Vulkan adapters seen: {seen})")]
    NoAdapter { wanted: &'static str, seen: String },
    #[error("opening the device on {adapter}: {message}")]
    RequestDevice { adapter: String, message: String },
    #[error("kernel {kernel} does not validate: {message}")]
    Pipeline {
        kernel: &'static str,
        message: String,
    },
    #[error("{what} needs {bytes} bytes but the device allows at most {limit} per buffer")]
    TooLargeForDevice {
        what: String,
        bytes: u64,
        limit: u64,
    },
    #[error(
        "table `{table}` needs {bytes} bytes but the device allows at most {limit} per storage \
         binding"
    )]
    TableTooLarge {
        table: String,
        bytes: u64,
        limit: u64,
    },
    #[error("allocating GPU buffers: {0}")]
    Allocation(String),
    #[error("reading results back from the GPU: {0}")]
    Readback(String),
}

/// A model file that cannot be loaded. The message names the tensor or metadata key and says
/// what was expected and what was found.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the file is {size} bytes, over the limit of {limit} bytes")]
    FileTooLarge { size: u64, limit: u64 },
    #[error("not a valid safetensors file: {0}")]
    Format(String),
    #[error("metadata `{key}`: {problem}")]
    Metadata { key: String, problem: String },
    #[error("unknown model kind {0:?}; expected embedding or mlp")]
    UnknownKind(String),
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    #[error("unexpected tensor `{name}` in an {kind} model (expected: {expected})")]
    UnexpectedTensor {
        name: String,
        kind: String,
        expected: String,
    },
    #[error("tensor `{name}`: dtype {found}, expected F32")]
    Dtype { name: String, found: String },
    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{name}`: non-finite value {value} at element {index}")]
    NotFinite {
        name: String,
        index: usize,
        value: f32,
    },
    #[error("{what} is {found}, over the limit of {limit}")]
    Limit {
        what: String,
        found: u64,
        limit: u64,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("uploading the model to the GPU: {0}")]
    Gpu(#[from] GpuError),
}

/// A batch that cannot be scored. Every check runs on the host before anything is dispatched.
#[derive(Debug, Error)]
pub enum ScoringError {
    #[error("{op} needs an {expected} model; this one is an {found} model")]
    WrongKind {
        op: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    #[error("request {request}: unknown item id {item} (the catalog has {n_items} items)")]
    UnknownItem {
        request: usize,
        item: u32,
        n_items: usize,
    },
    #[error("request {request}: unknown user id {user} (the model has {n_users} users)")]
    UnknownUser {
        request: usize,
        user: u32,
        n_users: usize,
    },
    #[error("request {request}: query vector has {found} values, the model's dim is {expected}")]
    QueryDim {
        request: usize,
        expected: usize,
        found: usize,
    },
    #[error("request {request}: {what} is NaN or infinite")]
    NotFinite { request: usize, what: &'static str },
    #[error(
        "request {request}: the query vector's length {norm:e} could overflow f32 scores \
         against this catalog (its longest item row is {max_item_norm:e}); scale it down"
    )]
    QueryTooLarge {
        request: usize,
        norm: f64,
        max_item_norm: f64,
    },
    #[error(
        "request {request}: the dense features are so large that the model's activations \
         could overflow f32 (bound {bound:e}); scale them down"
    )]
    InputTooLarge { request: usize, bound: f64 },
    #[error("request {request}: {found} dense features, the model takes {expected}")]
    DenseLen {
        request: usize,
        expected: usize,
        found: usize,
    },
    #[error("k must be at least 1")]
    ZeroK,
    #[error("batch too large: {what} is {found}, the limit is {limit}")]
    BatchTooLarge {
        what: &'static str,
        found: usize,
        limit: usize,
    },
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

impl ScoringError {
    /// The index, within its batch, of the request this error is about, when it is about one
    /// request (an unknown id, a bad query, a request over a limit).
    pub fn request(&self) -> Option<usize> {
        match self {
            ScoringError::UnknownItem { request, .. }
            | ScoringError::UnknownUser { request, .. }
            | ScoringError::QueryDim { request, .. }
            | ScoringError::NotFinite { request, .. }
            | ScoringError::QueryTooLarge { request, .. }
            | ScoringError::InputTooLarge { request, .. }
            | ScoringError::DenseLen { request, .. } => Some(*request),
            _ => None,
        }
    }

    /// The same error about request `to(request)`: for a dispatch that merged several
    /// callers' requests, so the error names the caller's own. Covers every variant
    /// [`ScoringError::request`] reports, so the two cannot drift apart.
    pub fn map_request(mut self, to: impl FnOnce(usize) -> usize) -> ScoringError {
        match &mut self {
            ScoringError::UnknownItem { request, .. }
            | ScoringError::UnknownUser { request, .. }
            | ScoringError::QueryDim { request, .. }
            | ScoringError::NotFinite { request, .. }
            | ScoringError::QueryTooLarge { request, .. }
            | ScoringError::InputTooLarge { request, .. }
            | ScoringError::DenseLen { request, .. } => *request = to(*request),
            _ => {}
        }
        self
    }
}
