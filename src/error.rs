//! The crate's one error type.
//!
//! Every public function returns [`Result`]. Messages name the offending value and,
//! where there is one, the layer (its module path) so that a failure in a model with
//! hundreds of adapted layers points at the right one.

use std::path::PathBuf;

/// Errors returned by lorakit.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A rank of zero (or otherwise unusable) was requested.
    #[error("layer `{layer}`: rank must be at least 1, got {rank}")]
    InvalidRank { layer: String, rank: usize },

    /// The LoRA alpha is not a finite positive number.
    #[error("layer `{layer}`: lora_alpha must be finite and > 0, got {alpha}")]
    InvalidAlpha { layer: String, alpha: f64 },

    /// Dropout probability outside `[0, 1)`.
    #[error("layer `{layer}`: dropout must be in [0, 1), got {dropout}")]
    InvalidDropout { layer: String, dropout: f64 },

    /// Any other configuration value out of its domain.
    #[error("layer `{layer}`: invalid `{field}`: {reason}")]
    InvalidConfig {
        layer: String,
        field: &'static str,
        reason: String,
    },

    /// A tensor's shape does not fit where it is used.
    #[error("layer `{layer}`: shape mismatch for {what}: expected {expected}, got {got}")]
    ShapeMismatch {
        layer: String,
        what: String,
        expected: String,
        got: String,
    },

    /// A tensor's dtype differs from the layer's.
    #[error("layer `{layer}`: dtype mismatch for {what}: layer is {expected:?}, got {got:?}")]
    DTypeMismatch {
        layer: String,
        what: String,
        expected: candle_core::DType,
        got: candle_core::DType,
    },

    /// A tensor lives on another device than the layer.
    #[error("layer `{layer}`: device mismatch for {what}: layer is on {expected}, got {got}")]
    DeviceMismatch {
        layer: String,
        what: String,
        expected: String,
        got: String,
    },

    /// `merge` on a layer whose adapter is already merged.
    #[error("layer `{layer}`: adapter is already merged")]
    AlreadyMerged { layer: String },

    /// `unmerge` (or a training-only operation) on a layer that is not merged / is merged.
    #[error("layer `{layer}`: adapter is not merged")]
    NotMerged { layer: String },

    /// An operation that needs the unmerged layer was called while merged.
    #[error(
        "layer `{layer}`: {operation} is not allowed while the adapter is merged; unmerge first"
    )]
    MergedState { layer: String, operation: String },

    /// A safe merge found a non-finite value in the merged weight; nothing was changed.
    #[error("layer `{layer}`: merged weight has {count} non-finite value(s); the weight was left untouched")]
    NonFiniteMerge { layer: String, count: usize },

    /// A key expected in a file is missing.
    #[error("missing tensor `{key}` in {file}")]
    MissingKey { key: String, file: String },

    /// Keys in an adapter file that no layer consumed.
    #[error("{count} tensor(s) in {file} were not used by any layer, e.g. `{example}`")]
    UnusedKeys {
        count: usize,
        example: String,
        file: String,
    },

    /// An adapter type this crate cannot handle.
    #[error("unsupported {what}: `{got}` (supported: {supported})")]
    Unsupported {
        what: &'static str,
        got: String,
        supported: String,
    },

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Malformed JSON, with its position.
    #[error("{path}: invalid JSON at line {line}, column {column}: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },

    /// A safetensors file could not be parsed or written.
    #[error("{path}: safetensors error: {message}")]
    SafeTensors { path: PathBuf, message: String },

    /// An error from candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
