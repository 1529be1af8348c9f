//! [`Multipliers`]: the four scalars IBM's Granite (`model_type` `granite`) adds to a
//! Llama decoder (the Gemma families use two of them).

use crate::error::{Error, Result};

/// Granite's scalars (transformers' `GraniteConfig`), each 1 (or the usual attention
/// scale) in the other families, whose configs transformers reads without them but for
/// the Gemma families' embedding scale `√hidden_size` and Gemma 2's and 3's attention
/// scale `query_pre_attn_scalar^-½`:
///
/// - the embeddings are multiplied by `embedding_multiplier`;
/// - attention scores are `q · k` times `attention_multiplier` instead of `1 / √head_dim`;
/// - each residual branch (attention, MLP) is added times `residual_multiplier`;
/// - the logits are divided by `logits_scaling`.
///
/// ```
/// use lorakit::models::llama::{LlamaConfig, LlamaFamily, Multipliers};
/// # fn main() -> lorakit::Result<()> {
/// let config = LlamaConfig::from_json(r#"{"model_type": "granite", "vocab_size": 64,
///     "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
///     "num_attention_heads": 4, "embedding_multiplier": 12.0,
///     "attention_multiplier": 0.015625, "residual_multiplier": 0.22,
///     "logits_scaling": 8.0}"#)?;
/// assert_eq!(config.family, LlamaFamily::Granite);
/// assert_eq!(config.multipliers.logits_scaling, 8.0);
/// assert_eq!(config.multipliers.attention_scale(8), 0.015625);
/// // Another family reads none of them, as transformers does.
/// let llama = LlamaConfig::from_json(r#"{"model_type": "llama", "vocab_size": 64,
///     "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
///     "num_attention_heads": 4, "logits_scaling": 8.0}"#)?;
/// assert_eq!(llama.multipliers, Multipliers::default());
/// assert_eq!(llama.multipliers.attention_scale(8), 1.0 / 8f64.sqrt());
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Multipliers {
    /// What the token embeddings are multiplied by.
    pub embedding_multiplier: f64,
    /// The attention scores' scale; `None`: `1 / √head_dim`.
    pub attention_multiplier: Option<f64>,
    /// What each residual branch is multiplied by before it is added.
    pub residual_multiplier: f64,
    /// What the logits are divided by.
    pub logits_scaling: f64,
}

impl Default for Multipliers {
    /// The plain Llama decoder: 1, `1 / √head_dim`, 1, 1.
    fn default() -> Self {
        Self {
            embedding_multiplier: 1.0,
            attention_multiplier: None,
            residual_multiplier: 1.0,
            logits_scaling: 1.0,
        }
    }
}

impl Multipliers {
    /// The config's values, 1 for each one absent (transformers' `GraniteConfig`
    /// defaults; `attention_multiplier` too defaults to 1 there, not `1 / √head_dim`).
    pub(super) fn granite(
        embedding: Option<f64>,
        attention: Option<f64>,
        residual: Option<f64>,
        logits: Option<f64>,
    ) -> Self {
        Self {
            embedding_multiplier: embedding.unwrap_or(1.0),
            attention_multiplier: Some(attention.unwrap_or(1.0)),
            residual_multiplier: residual.unwrap_or(1.0),
            logits_scaling: logits.unwrap_or(1.0),
        }
    }

    /// Gemma's: the embeddings times `√hidden_size`, attention scores times
    /// `attention_multiplier` (Gemma 2 and 3: `query_pre_attn_scalar^-½`; Gemma: `None`,
    /// `1 / √head_dim`), no residual or logit scaling.
    pub(super) fn gemma(hidden_size: usize, attention_multiplier: Option<f64>) -> Self {
        Self {
            embedding_multiplier: (hidden_size as f64).sqrt(),
            attention_multiplier,
            residual_multiplier: 1.0,
            logits_scaling: 1.0,
        }
    }

    /// The attention scores' scale for heads of `head_dim`.
    pub fn attention_scale(&self, head_dim: usize) -> f64 {
        self.attention_multiplier
            .unwrap_or_else(|| 1.0 / (head_dim as f64).sqrt())
    }

    /// Checks that each is finite, and `logits_scaling` not 0; `invalid` names the field.
    pub(super) fn validate(&self, invalid: &dyn Fn(&'static str, String) -> Error) -> Result<()> {
        let values = [
            ("embedding_multiplier", self.embedding_multiplier),
            (
                "attention_multiplier",
                self.attention_multiplier.unwrap_or(1.0),
            ),
            ("residual_multiplier", self.residual_multiplier),
            ("logits_scaling", self.logits_scaling),
        ];
        for (field, value) in values {
            if !value.is_finite() {
                return Err(invalid(field, format!("must be finite, got {value}")));
            }
        }
        if self.logits_scaling == 0.0 {
            return Err(invalid(
                "logits_scaling",
                "must not be 0 (the logits are divided by it)".to_string(),
            ));
        }
        Ok(())
    }
}
