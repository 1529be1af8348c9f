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

    /// Any other configuration value out of its domain. `scope` says what the value
    /// belongs to (a layer, a file, a group of settings); build it with
    /// [`Error::layer_config`], [`Error::file_config`] or [`Error::settings`].
    #[error("{scope}: invalid `{field}`: {reason}")]
    InvalidConfig {
        scope: Scope,
        field: &'static str,
        reason: String,
    },

    /// A call made out of order (e.g. a hook's `after_step` without its `before_step`), or
    /// on a layer of the wrong variant for the operation.
    #[error("{scope}: {reason}")]
    Usage { scope: Scope, reason: String },

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

    /// A model checkpoint (a `.safetensors` file, a folder, an index and its shards) that
    /// is malformed or inconsistent, or an output path that cannot receive one.
    #[error("{path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    /// A long operation stopped by its caller (a progress callback, a signal); nothing was
    /// written.
    #[error("{what} cancelled; nothing was written")]
    Cancelled { what: String },

    /// An error from candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The text of the file at `path`; a failed read is an [`Error::Io`] naming it.
pub(crate) fn read_text(path: impl AsRef<std::path::Path>) -> Result<String> {
    let path = path.as_ref();
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// `text`, the JSON file `path`, read into `T`; a value that does not fit is an error
/// naming its key ([`Error::Json`]).
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    text: &str,
    path: impl Into<PathBuf>,
) -> Result<T> {
    let path = path.into();
    let de = &mut serde_json::Deserializer::from_str(text);
    let value: T =
        serde_path_to_error::deserialize(&mut *de).map_err(|e| Error::json_at(path.clone(), e))?;
    de.end().map_err(|e| Error::json(path, &e))?;
    Ok(value)
}

/// `Some(value)` for a key present in the file (`Some(None)` when it is `null`); `None`
/// (the field's default) when absent: transformers treats the two differently for some
/// keys.
pub(crate) fn present<'de, D, T>(d: D) -> std::result::Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(d).map(Some)
}

/// `Result` with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// What an [`Error::InvalidConfig`] or [`Error::Usage`] is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// A layer, by its module path.
    Layer(String),
    /// A file (an adapter config, a model file, an output path).
    File(PathBuf),
    /// A group of settings that belongs to no single layer or file, e.g. "LoRA+ optimizer".
    Settings(String),
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Layer(name) => write!(f, "layer `{name}`"),
            Scope::File(path) => write!(f, "{}", path.display()),
            Scope::Settings(what) => write!(f, "{what}"),
        }
    }
}

impl Error {
    /// A layer's setting out of its domain.
    pub fn layer_config(
        layer: impl Into<String>,
        field: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        Error::InvalidConfig {
            scope: Scope::Layer(layer.into()),
            field,
            reason: reason.into(),
        }
    }

    /// A setting read from (or written to) a file, out of its domain.
    pub fn file_config(
        path: impl Into<PathBuf>,
        field: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        Error::InvalidConfig {
            scope: Scope::File(path.into()),
            field,
            reason: reason.into(),
        }
    }

    /// A setting of a group that belongs to no single layer (`what`, e.g. "LoRA+
    /// optimizer"), out of its domain.
    pub fn settings(
        what: impl Into<String>,
        field: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        Error::InvalidConfig {
            scope: Scope::Settings(what.into()),
            field,
            reason: reason.into(),
        }
    }

    /// An operation used out of order or on the wrong kind of layer.
    pub fn usage(scope: Scope, reason: impl Into<String>) -> Self {
        Error::Usage {
            scope,
            reason: reason.into(),
        }
    }

    /// Malformed JSON in the file at `path`.
    pub fn json(path: impl Into<PathBuf>, e: &serde_json::Error) -> Self {
        Error::Json {
            path: path.into(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        }
    }

    /// JSON in the file at `path` that does not fit the fields it is read into: the message
    /// names the key (`` `rope_scaling.factor`: invalid type: ... ``).
    fn json_at(path: PathBuf, e: serde_path_to_error::Error<serde_json::Error>) -> Self {
        let key = e.path().to_string();
        let mut error = Error::json(path, e.inner());
        if let Error::Json { message, .. } = &mut error {
            if key != "." {
                *message = format!("`{key}`: {message}");
            }
        }
        error
    }

    /// A checkpoint (model file or folder) that cannot be used as it is.
    pub fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
