//! Gemma 3's image-and-text checkpoints (`model_type` `gemma3`,
//! `Gemma3ForConditionalGeneration`) read for their text decoder: the keys of the
//! config's `text_config`, and the checkpoint's tensor names
//! ([`crate::checkpoint::layout`]).

use std::path::{Path, PathBuf};

use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::family::LlamaFamily;
use crate::checkpoint::layout::{stored_name, STORED_TEXT_DECODER, TEXT_DECODER};
use crate::error::{Error, Result};

/// A `gemma3` `config.json`'s `text_config` read as `T`, and the top-level keys that apply
/// to its text decoder.
#[derive(Deserialize)]
pub(super) struct TextConfig<T> {
    text_config: Option<T>,
    /// The top-level one, which ties `lm_head` to the embedding in
    /// `Gemma3ForConditionalGeneration` (default true).
    pub(super) tie_word_embeddings: Option<bool>,
    pub(super) quantization_config: Option<Value>,
}

/// The `model_type` inside `text_config`.
#[derive(Deserialize)]
struct TypeOnly {
    model_type: Option<String>,
}

/// The text of the `gemma3` `config.json` `file`, read as transformers' `Gemma3Config` reads
/// it for its text decoder: `text_config` as `T` (a `gemma3_text` config, whose `model_type`
/// may be left out) and the top-level keys of [`TextConfig`]. A missing `text_config` or
/// another `model_type` in it is an error naming it.
pub(super) fn read_text_config<T: DeserializeOwned>(
    text: &str,
    file: &Path,
) -> Result<(T, TextConfig<T>)> {
    let text_type = LlamaFamily::Gemma3.model_type();
    let typed: TextConfig<TypeOnly> = crate::error::parse_json(text, file)?;
    match typed.text_config.map(|t| t.model_type) {
        None => {
            return Err(Error::file_config(
                file,
                "text_config",
                "missing (a gemma3 config keeps its text decoder's keys there)",
            ))
        }
        Some(None) => {}
        Some(Some(t)) if t == text_type => {}
        Some(Some(other)) => {
            return Err(Error::file_config(
                file,
                "text_config",
                format!("model_type {other}: {text_type} expected"),
            ))
        }
    }
    let mut outer: TextConfig<T> = crate::error::parse_json(text, file)?;
    let keys = outer
        .text_config
        .take()
        .ok_or_else(|| Error::file_config(file, "text_config", "missing"))?;
    Ok((keys, outer))
}

/// How errors about a `text_config` key name where it is.
pub(super) fn text_config_scope(file: &Path) -> PathBuf {
    PathBuf::from(format!("{} (text_config)", file.display()))
}

/// For a decoder under `model.language_model` (an image-and-text checkpoint's,
/// `LlamaConfig::decoder_prefix`; any other: `vb` as it is), `vb` read under transformers 5's
/// names (`model.language_model.…`, `lm_head.…`, what
/// the decoder's modules are called): a checkpoint stored with transformers 4.50's names
/// (`language_model.model.…`, `language_model.lm_head.…`, the Hub's) through a renaming,
/// any other as it is.
pub(super) fn decoder_view<'a>(decoder_prefix: &str, vb: VarBuilder<'a>) -> VarBuilder<'a> {
    if decoder_prefix != TEXT_DECODER {
        return vb;
    }
    let current = format!("{TEXT_DECODER}.embed_tokens.weight");
    let stored = format!("{STORED_TEXT_DECODER}.embed_tokens.weight");
    if vb.contains_tensor(&current) || !vb.contains_tensor(&stored) {
        return vb;
    }
    // The renaming sees full names: apply it at the root, under the builder's prefix, and
    // step back down to the prefix.
    let prefix = vb.prefix();
    if prefix.is_empty() {
        return vb.rename_f(|name: &str| stored_name(name));
    }
    let under = format!("{prefix}.");
    let renamed = vb
        .root()
        .rename_f(move |name: &str| match name.strip_prefix(&under) {
            Some(rest) => format!("{under}{}", stored_name(rest)),
            None => name.to_string(),
        });
    renamed.pp(prefix)
}
