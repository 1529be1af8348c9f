//! The Gemma families' own `config.json` keys (`model_type` `gemma`, `gemma2`,
//! `gemma3_text`; transformers' `GemmaConfig`, `Gemma2Config`, `Gemma3TextConfig`): Gemma
//! 3's RoPE nested by layer type, the layer types, the gate activation, the scalars and
//! soft-capping, and the option lorakit refuses (bidirectional attention).

use std::path::Path;

use serde::Deserialize;

use super::activation::GateActivation;
use super::family::LlamaFamily;
use super::layer_types::every_nth_full;
use super::multipliers::Multipliers;
use crate::error::{Error, Result};

/// The keys only the Gemma families read (from the same `config.json`, apart from the
/// others).
#[derive(Default, Deserialize)]
pub(super) struct GemmaKeys {
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    pub(super) rope_local_base_freq: Option<f64>,
    sliding_window_pattern: Option<usize>,
    #[serde(default, deserialize_with = "crate::error::present")]
    final_logit_softcapping: Option<Option<f64>>,
    #[serde(default, deserialize_with = "crate::error::present")]
    attn_logit_softcapping: Option<Option<f64>>,
    use_bidirectional_attention: Option<bool>,
}

/// What [`GemmaKeys::resolve`] makes of them.
pub(super) struct GemmaSettings {
    pub(super) hidden_act: GateActivation,
    pub(super) multipliers: Multipliers,
    /// `(attention scores, logits)` soft-capping.
    pub(super) softcaps: (Option<f64>, Option<f64>),
}

impl GemmaKeys {
    /// The layer types' names when the config lists none: Gemma's all full attention;
    /// Gemma 2's every other layer sliding, the first one first; Gemma 3's every
    /// `sliding_window_pattern`-th layer (default 6) full attention, the others sliding
    /// (the config classes' `__post_init__`).
    pub(super) fn layer_type_names(
        &self,
        family: LlamaFamily,
        layer_types: Option<&[String]>,
        layers: usize,
        file: &Path,
    ) -> Result<Vec<String>> {
        if let Some(names) = layer_types.filter(|_| family != LlamaFamily::Gemma) {
            return Ok(names.to_vec());
        }
        let pattern = match family {
            LlamaFamily::Gemma3 => self.sliding_window_pattern.unwrap_or(6),
            LlamaFamily::Gemma2 => 2,
            _ => 1,
        };
        if pattern == 0 {
            return Err(Error::file_config(
                file,
                "sliding_window_pattern",
                "must be at least 1, got 0",
            ));
        }
        Ok(every_nth_full(layers, pattern))
    }

    /// The gate activation (Gemma's `hidden_act`, Gemma 2's and 3's `hidden_activation`,
    /// default `gelu_pytorch_tanh`), the scalars and the soft-capping (Gemma 2's default
    /// 50 and 30 when absent, none when `null`; Gemma 3's none), refusing bidirectional
    /// attention.
    pub(super) fn resolve(
        &self,
        family: LlamaFamily,
        hidden_size: usize,
        hidden_act: Option<&str>,
        file: &Path,
    ) -> Result<GemmaSettings> {
        let invalid = |field: &'static str, reason: String| Error::file_config(file, field, reason);
        if self.use_bidirectional_attention == Some(true) {
            return Err(Error::Unsupported {
                what: "use_bidirectional_attention",
                got: "true".to_string(),
                supported: "false (causal attention)".to_string(),
            });
        }
        let (act_key, act) = match family {
            LlamaFamily::Gemma => ("hidden_act", hidden_act),
            _ => ("hidden_activation", self.hidden_activation.as_deref()),
        };
        let hidden_act = match act.unwrap_or("gelu_pytorch_tanh") {
            // `gelu` is Gemma's legacy name for the tanh approximation (GemmaConfig).
            "gelu" if family == LlamaFamily::Gemma => GateActivation::GeluTanh,
            "gelu_pytorch_tanh" | "gelu_new" => GateActivation::GeluTanh,
            other => {
                return Err(Error::Unsupported {
                    what: act_key,
                    got: other.to_string(),
                    supported: "gelu_pytorch_tanh (gelu_new)".to_string(),
                })
            }
        };
        let positive = |field: &'static str, v: Option<f64>| match v {
            Some(v) if !(v.is_finite() && v > 0.0) => {
                Err(invalid(field, format!("must be finite and > 0, got {v}")))
            }
            _ => Ok(v),
        };
        let attention_multiplier = match family {
            LlamaFamily::Gemma => None,
            _ => {
                let scalar = positive("query_pre_attn_scalar", self.query_pre_attn_scalar)?;
                Some(scalar.unwrap_or(256.0).powf(-0.5))
            }
        };
        let cap = |field: &'static str, value: Option<Option<f64>>, gemma2_default: f64| {
            let value = match (family, value) {
                (LlamaFamily::Gemma, _) => None,
                (_, Some(v)) => v,
                (LlamaFamily::Gemma2, None) => Some(gemma2_default),
                (_, None) => None,
            };
            positive(field, value)
        };
        Ok(GemmaSettings {
            hidden_act,
            multipliers: Multipliers::gemma(hidden_size, attention_multiplier),
            softcaps: (
                cap("attn_logit_softcapping", self.attn_logit_softcapping, 50.0)?,
                cap(
                    "final_logit_softcapping",
                    self.final_logit_softcapping,
                    30.0,
                )?,
            ),
        })
    }
}
