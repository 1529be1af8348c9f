//! DistilBERT's `config.json` (transformers' `DistilBertConfig`: `dim`, `n_layers`,
//! `n_heads`, `hidden_dim`, `activation`, `dropout`, `attention_dropout`,
//! `seq_classif_dropout`) read into a [`BertConfig`] of [`BertFamily::DistilBert`].

use std::path::PathBuf;
use std::str::FromStr;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::models::classification::ClassifierConfig;

use super::config::{BertConfig, BertFamily, HiddenAct, PositionEmbeddingType};

/// `config.json` as written: every field optional (`DistilBertConfig`'s defaults fill the
/// gaps).
#[derive(Deserialize)]
struct RawDistilBertConfig {
    vocab_size: Option<usize>,
    dim: Option<usize>,
    n_layers: Option<usize>,
    n_heads: Option<usize>,
    hidden_dim: Option<usize>,
    activation: Option<String>,
    dropout: Option<f64>,
    attention_dropout: Option<f64>,
    seq_classif_dropout: Option<f64>,
    max_position_embeddings: Option<usize>,
}

/// The [`BertConfig`] of a DistilBERT `config.json` (`text`, read from `path`):
/// `DistilBertConfig`'s defaults (6 layers of 768, 12 heads, 3072 wide, dropout 0.1,
/// `seq_classif_dropout` 0.2), LayerNorm eps 1e-12 (transformers' DistilBERT hard-codes
/// it), one token type (DistilBERT has no table: ids must be 0). `sinusoidal_pos_embds`
/// needs nothing: the table is read from the checkpoint either way.
pub(super) fn from_json_str(text: &str, path: PathBuf) -> Result<BertConfig> {
    let raw: RawDistilBertConfig = crate::error::parse_json(text, path.clone())?;
    let labels = ClassifierConfig::from_json_str(text, path.clone())?;
    let hidden_act = match raw.activation.as_deref() {
        Some(name) => HiddenAct::from_str(name).map_err(|_| Error::Unsupported {
            what: "activation",
            got: name.to_string(),
            supported: "gelu, gelu_new, relu".to_string(),
        })?,
        None => HiddenAct::Gelu,
    };
    let config = BertConfig {
        family: BertFamily::DistilBert,
        vocab_size: raw.vocab_size.unwrap_or(30522),
        hidden_size: raw.dim.unwrap_or(768),
        embedding_size: raw.dim.unwrap_or(768),
        num_hidden_layers: raw.n_layers.unwrap_or(6),
        num_attention_heads: raw.n_heads.unwrap_or(12),
        intermediate_size: raw.hidden_dim.unwrap_or(3072),
        hidden_act,
        hidden_dropout_prob: raw.dropout.unwrap_or(0.1),
        attention_probs_dropout_prob: raw.attention_dropout.unwrap_or(0.1),
        classifier_dropout: Some(raw.seq_classif_dropout.unwrap_or(0.2)),
        max_position_embeddings: raw.max_position_embeddings.unwrap_or(512),
        type_vocab_size: 1,
        layer_norm_eps: 1e-12,
        pad_token_id: labels.pad_token_id.unwrap_or(0),
        position_embedding_type: PositionEmbeddingType::Absolute,
        num_labels: labels.num_labels,
        problem_type: labels.problem_type,
        initializer_range: labels.initializer_range,
        id2label: labels.id2label,
        ignore_mismatched_sizes: false,
    };
    config.check(|field, reason| {
        // The reason may name another field by BertConfig's name, too.
        let reason = ["num_attention_heads", "hidden_size", "intermediate_size"]
            .iter()
            .fold(reason, |r, name| r.replace(name, distilbert_name(name)));
        Error::file_config(path.clone(), distilbert_name(field), reason)
    })?;
    Ok(config)
}

/// The DistilBERT key for a [`BertConfig`] field an error names.
fn distilbert_name(field: &'static str) -> &'static str {
    match field {
        "hidden_size" => "dim",
        "num_attention_heads" => "n_heads",
        "intermediate_size" => "hidden_dim",
        "hidden_dropout_prob" => "dropout",
        "attention_probs_dropout_prob" => "attention_dropout",
        "classifier_dropout" => "seq_classif_dropout",
        other => other,
    }
}
