//! Models whose layers come in two types, sliding-window and full attention (Gemma 2 and 3,
//! OLMo 3): the default pattern of types, and the RoPE dicts given per type.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// One RoPE dict of a `config.json`.
pub(super) type RopeMap = Map<String, Value>;

/// `layers` layer types with every `pattern`-th layer full attention and the others
/// sliding (`pattern` ≥ 1: Gemma 2's 2, Gemma 3's `sliding_window_pattern`, OLMo 3's 4), as
/// the config classes' `__post_init__` make them when the config lists none.
pub(super) fn every_nth_full(layers: usize, pattern: usize) -> Vec<String> {
    (0..layers)
        .map(|i| {
            if (i + 1).is_multiple_of(pattern) {
                "full_attention".to_string()
            } else {
                "sliding_attention".to_string()
            }
        })
        .collect()
}

/// The RoPE dicts of the full-attention and the sliding layers of a `model_type` with
/// RoPE parameters per layer type, as transformers 5 finds them
/// (`convert_rope_params_to_dict` of `Gemma3TextConfig`, `Olmo3Config`): a
/// `rope_parameters` nested by layer type (`full_attention`, `sliding_attention`), or the
/// 4.x form, whose `rope_scaling` applies to the full-attention layers (the sliding ones:
/// an empty dict).
pub(super) fn rope_maps<'a>(
    model_type: &str,
    (rope_parameters, rope_scaling): (Option<&'a RopeMap>, Option<&'a RopeMap>),
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
                "{model_type} nests them by layer type (full_attention, sliding_attention); \
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
