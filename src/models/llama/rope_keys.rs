//! [`RopeKeys`]: one RoPE dict of a `config.json` (`rope_scaling`, `rope_parameters` or one
//! of Gemma 3's and OLMo 3's per-layer-type dicts), as the scalings' resolvers read it.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A RoPE dict, the file it came from (for errors) and the model's context length.
pub(super) struct RopeKeys<'a> {
    map: &'a Map<String, Value>,
    file: &'a Path,
    /// The config's `max_position_embeddings`.
    pub(super) max_position_embeddings: usize,
}

impl<'a> RopeKeys<'a> {
    pub(super) fn new(
        map: &'a Map<String, Value>,
        file: &'a Path,
        max_position_embeddings: usize,
    ) -> Self {
        Self {
            map,
            file,
            max_position_embeddings,
        }
    }

    /// The value at `key`, as written (`None` when absent).
    pub(super) fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    /// The number at `key`; `None` when absent or `null`, an error naming the key when it
    /// is not a number.
    pub(super) fn number(&self, key: &'static str) -> Result<Option<f64>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.invalid(key, format!("expected a number, got {v}"))),
        }
    }

    /// The error for `field` of this dict's file.
    pub(super) fn invalid(&self, field: &'static str, reason: impl Into<String>) -> Error {
        Error::file_config(self.file, field, reason)
    }

    /// The pretraining context length of a scaled RoPE (`llama3`, `yarn`, `longrope`), as
    /// transformers' `standardize_rope_params` resolves it: a top-level
    /// `original_max_position_embeddings` (`top_level`, Phi-3's place for it) wins over the
    /// one in the dict; without either it is `max_position_embeddings`.
    pub(super) fn original_max(&self, top_level: Option<usize>) -> Result<usize> {
        if let Some(n) = top_level {
            return Ok(n);
        }
        match self.number("original_max_position_embeddings")? {
            Some(n) if n >= 0.0 && n.fract() == 0.0 => Ok(n as usize),
            Some(n) => Err(self.invalid(
                "original_max_position_embeddings",
                format!("expected a whole number, got {n}"),
            )),
            None => Ok(self.max_position_embeddings),
        }
    }
}
