//! Gemma 3's own `config.json` keys (`model_type` `gemma3_text`, transformers'
//! `Gemma3TextConfig`): RoPE nested by layer type, the layer types from
//! `sliding_window_pattern`, the gate activation, and the options lorakit refuses (logit
//! soft-capping, bidirectional attention).

use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::activation::GateActivation;
use crate::error::{Error, Result};

/// One RoPE dict of a `config.json`.
type RopeMap = Map<String, Value>;

/// The keys only Gemma 3 reads (read with the others from `config.json`).
#[derive(Default, Deserialize)]
pub(super) struct GemmaKeys {
    pub(super) hidden_activation: Option<String>,
    pub(super) query_pre_attn_scalar: Option<f64>,
    pub(super) rope_local_base_freq: Option<f64>,
    pub(super) sliding_window_pattern: Option<usize>,
    pub(super) final_logit_softcapping: Option<f64>,
    pub(super) attn_logit_softcapping: Option<f64>,
    pub(super) use_bidirectional_attention: Option<bool>,
}

/// The RoPE dicts of the full-attention and the sliding layers, as transformers 5 finds them
/// (`Gemma3TextConfig.convert_rope_params_to_dict`): a `rope_parameters` nested by layer type
/// (`full_attention`, `sliding_attention`), or the 4.x form, whose `rope_scaling` applies to
/// the full-attention layers (the sliding ones: an empty dict).
pub(super) fn rope_maps<'a>(
    rope_parameters: Option<&'a RopeMap>,
    rope_scaling: Option<&'a RopeMap>,
    empty: &'a RopeMap,
    file: &Path,
) -> Result<(&'a RopeMap, &'a RopeMap)> {
    let invalid = |field: &'static str, reason: String| Error::file_config(file, field, reason);
    let Some(nested) = rope_parameters.filter(|m| !m.is_empty()) else {
        return Ok((rope_scaling.unwrap_or(empty), empty));
    };
    if let Some(key) = nested
        .keys()
        .find(|k| *k != "full_attention" && *k != "sliding_attention")
    {
        return Err(invalid(
            "rope_parameters",
            format!(
                "gemma3_text nests them by layer type (full_attention, sliding_attention); \
                 got key `{key}`"
            ),
        ));
    }
    let part = |key: &'static str| match nested.get(key) {
        None | Some(Value::Null) => Ok(empty),
        Some(Value::Object(map)) => Ok(map),
        Some(other) => Err(invalid(key, format!("expected an object, got {other}"))),
    };
    Ok((part("full_attention")?, part("sliding_attention")?))
}

impl GemmaKeys {
    /// The layer types' names when the config lists none: every `sliding_window_pattern`-th
    /// layer (default 6) full attention, the others sliding (`Gemma3TextConfig.__post_init__`).
    pub(super) fn layer_type_names(
        &self,
        layer_types: Option<&[String]>,
        layers: usize,
        file: &Path,
    ) -> Result<Vec<String>> {
        if let Some(names) = layer_types {
            return Ok(names.to_vec());
        }
        let pattern = self.sliding_window_pattern.unwrap_or(6);
        if pattern == 0 {
            return Err(Error::file_config(
                file,
                "sliding_window_pattern",
                "must be at least 1, got 0",
            ));
        }
        Ok((0..layers)
            .map(|i| {
                if (i + 1).is_multiple_of(pattern) {
                    "full_attention".to_string()
                } else {
                    "sliding_attention".to_string()
                }
            })
            .collect())
    }

    /// The MLP's gate activation, `hidden_activation` (default `gelu_pytorch_tanh`), after
    /// checking `query_pre_attn_scalar` and refusing the soft-capping and bidirectional
    /// options when set.
    pub(super) fn gate_activation(&self, file: &Path) -> Result<GateActivation> {
        for (what, cap) in [
            ("final_logit_softcapping", self.final_logit_softcapping),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
        ] {
            if let Some(cap) = cap {
                return Err(Error::Unsupported {
                    what,
                    got: cap.to_string(),
                    supported: "null (Gemma 3's default; Gemma 2's soft-capping is not \
                                implemented)"
                        .to_string(),
                });
            }
        }
        if let Some(s) = self
            .query_pre_attn_scalar
            .filter(|s| !(s.is_finite() && *s > 0.0))
        {
            return Err(Error::file_config(
                file,
                "query_pre_attn_scalar",
                format!("must be finite and > 0, got {s}"),
            ));
        }
        if self.use_bidirectional_attention == Some(true) {
            return Err(Error::Unsupported {
                what: "use_bidirectional_attention",
                got: "true".to_string(),
                supported: "false (causal attention)".to_string(),
            });
        }
        match self
            .hidden_activation
            .as_deref()
            .unwrap_or("gelu_pytorch_tanh")
        {
            "gelu_pytorch_tanh" | "gelu_new" => Ok(GateActivation::GeluTanh),
            other => Err(Error::Unsupported {
                what: "hidden_activation",
                got: other.to_string(),
                supported: "gelu_pytorch_tanh (gelu_new)".to_string(),
            }),
        }
    }
}
