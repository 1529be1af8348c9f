//! Reading a BERT-family `config.json` into a [`BertConfig`]: BERT's and the RoBERTa
//! family's keys here, DistilBERT's in [`super::distilbert_config`].

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::classification::ClassifierConfig;

use super::config::{BertConfig, BertFamily, HiddenAct, PositionEmbeddingType};

/// `config.json` as written: every field optional (transformers' defaults fill the gaps).
#[derive(Deserialize)]
struct RawBertConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    embedding_size: Option<usize>,
    /// `Some(Null)` when the file says `null` (`deserialize_present`), `None` when absent.
    #[serde(default, deserialize_with = "deserialize_present")]
    pad_token_id: Option<Value>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    intermediate_size: Option<usize>,
    hidden_act: Option<String>,
    hidden_dropout_prob: Option<f64>,
    attention_probs_dropout_prob: Option<f64>,
    classifier_dropout: Option<f64>,
    max_position_embeddings: Option<usize>,
    type_vocab_size: Option<usize>,
    layer_norm_eps: Option<f64>,
    position_embedding_type: Option<String>,
    is_decoder: Option<bool>,
}

impl BertConfig {
    /// Reads transformers' `config.json` at `path`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = crate::error::read_text(path)?;
        Self::from_json_str(&text, path)
    }

    /// Parses the text of a `config.json`; `path` names it in errors.
    pub fn from_json_str(text: &str, path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let raw: RawBertConfig = crate::error::parse_json(text, path.clone())?;
        let family = match raw.model_type.as_deref() {
            None => BertFamily::Bert,
            Some(t) => BertFamily::from_model_type(t).ok_or_else(|| Error::Unsupported {
                what: "model_type",
                got: t.to_string(),
                supported: BertFamily::ALL.map(BertFamily::model_type).join(", "),
            })?,
        };
        if family == BertFamily::DistilBert {
            return super::distilbert_config::from_json_str(text, path);
        }
        if raw.is_decoder == Some(true) {
            return Err(Error::Unsupported {
                what: "is_decoder",
                got: "true".to_string(),
                supported: "false (BERT as a bidirectional encoder)".to_string(),
            });
        }
        // transformers' `ElectraConfig` has smaller defaults than `BertConfig`'s.
        let d = match family {
            BertFamily::Electra => Self {
                hidden_size: 256,
                embedding_size: 128,
                num_attention_heads: 4,
                intermediate_size: 1024,
                ..Self::default()
            },
            _ => Self::default(),
        };
        if family.numbers_positions_past_padding() && raw.pad_token_id == Some(Value::Null) {
            return Err(Error::file_config(
                path,
                "pad_token_id",
                format!(
                    "null: {} numbers positions past the padding id, so it needs one \
                     (transformers cannot run this config either)",
                    family.model_type()
                ),
            ));
        }
        // The classification fields, parsed and checked as every classifier's.
        let labels = ClassifierConfig::from_json_str(text, path.clone())?;
        let config = Self {
            family,
            vocab_size: raw.vocab_size.unwrap_or(family.default_vocab_size()),
            hidden_size: raw.hidden_size.unwrap_or(d.hidden_size),
            // Read by ELECTRA only (`BertConfig::embedding_width`); the others': the width.
            embedding_size: match family {
                BertFamily::Electra => raw.embedding_size.unwrap_or(d.embedding_size),
                _ => raw.hidden_size.unwrap_or(d.hidden_size),
            },
            num_hidden_layers: raw.num_hidden_layers.unwrap_or(d.num_hidden_layers),
            num_attention_heads: raw.num_attention_heads.unwrap_or(d.num_attention_heads),
            intermediate_size: raw.intermediate_size.unwrap_or(d.intermediate_size),
            hidden_act: raw
                .hidden_act
                .as_deref()
                .map(HiddenAct::from_str)
                .transpose()?
                .unwrap_or(d.hidden_act),
            hidden_dropout_prob: raw.hidden_dropout_prob.unwrap_or(d.hidden_dropout_prob),
            attention_probs_dropout_prob: raw
                .attention_probs_dropout_prob
                .unwrap_or(d.attention_probs_dropout_prob),
            classifier_dropout: raw.classifier_dropout,
            max_position_embeddings: raw
                .max_position_embeddings
                .unwrap_or(d.max_position_embeddings),
            type_vocab_size: raw.type_vocab_size.unwrap_or(d.type_vocab_size),
            layer_norm_eps: raw.layer_norm_eps.unwrap_or(d.layer_norm_eps),
            // Absent: the family's default (null is refused above for the RoBERTa family).
            pad_token_id: labels.pad_token_id.unwrap_or(family.default_pad_token_id()),
            position_embedding_type: raw
                .position_embedding_type
                .as_deref()
                .map(PositionEmbeddingType::from_str)
                .transpose()?
                .unwrap_or(d.position_embedding_type),
            num_labels: labels.num_labels,
            problem_type: labels.problem_type,
            initializer_range: labels.initializer_range,
            id2label: labels.id2label,
            ignore_mismatched_sizes: false,
        };
        config.check(|field, reason| Error::file_config(path.clone(), field, reason))?;
        Ok(config)
    }
}

/// A field that is present, `null` included (serde reads a present `null` as `None`
/// otherwise).
fn deserialize_present<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}
