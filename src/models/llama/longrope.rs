//! LongRoPE scaling (transformers' `rope_type: "longrope"`, its
//! `_compute_longrope_parameters` and `dynamic_rope_update`): Phi-3's 128k-context models
//! and Phi-3.5, whose configs also write it as `su` or `yarn`.

use serde_json::Value;

use super::rope_keys::RopeKeys;

use crate::error::{Error, Result};

/// LongRoPE as transformers computes it: frequency `i` is `θ^(-2i/d) / short_factor[i]`
/// while a forward's positions stay within `original_max_position_embeddings`, and
/// `θ^(-2i/d) / long_factor[i]` for a forward whose last position lies past it (the
/// choice is made per forward call, as transformers' `longrope_frequency_update` makes it,
/// so keys a `KvCache` holds keep their rotation); the cos/sin tables are multiplied by
/// `attention_factor`. Generation re-runs the whole sequence without the cache when it
/// reaches `original_max_position_embeddings + 1` tokens, as transformers'
/// `Phi3ForCausalLM` drops its cache there; batched generation that would reach it is an
/// error (one set of frequencies serves the whole batch).
///
/// Read from `config.json` as transformers 5 reads it: `short_factor` and `long_factor`
/// (one number per rotated frequency, `rotary_dim / 2`: `head_dim / 2` unless a
/// `partial_rotary_factor` applies) required; `original_max_position_embeddings` as for
/// `llama3` and `yarn` (Phi-3's top-level one first, 4096 when its config has none);
/// `attention_factor` as given, else `√(1 + ln(factor) / ln(original))` with `factor` as
/// given or `max_position_embeddings / original` (1 for `factor ≤ 1`).
///
/// ```
/// use lorakit::models::llama::{LlamaConfig, RopeScaling};
/// # fn main() -> lorakit::Result<()> {
/// let config = LlamaConfig::from_json(r#"{"model_type": "phi3", "vocab_size": 64,
///     "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
///     "num_attention_heads": 4, "max_position_embeddings": 131072,
///     "original_max_position_embeddings": 4096,
///     "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.0, 1.5, 2.0],
///                      "long_factor": [1.0, 2.0, 4.0, 8.0]}}"#)?;
/// let RopeScaling::LongRope(long) = &config.rope_scaling else { panic!("not longrope") };
/// assert_eq!(long.original_max_position_embeddings, 4096);
/// let want = (1.0 + 32f64.ln() / 4096f64.ln()).sqrt();
/// assert!((long.attention_factor - want).abs() < 1e-12);
/// // Up to position 4095 the short factors; past it the long ones.
/// assert_ne!(config.inv_freq_for(4096), config.inv_freq_for(4097));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LongRopeScaling {
    /// Per-frequency divisors within the original context (`rotary_dim / 2`).
    pub short_factor: Vec<f32>,
    /// Per-frequency divisors past it (`rotary_dim / 2`).
    pub long_factor: Vec<f32>,
    /// The context length of pretraining.
    pub original_max_position_embeddings: usize,
    /// What the cos/sin tables are multiplied by.
    pub attention_factor: f64,
}

impl LongRopeScaling {
    /// The parameters of the RoPE dict `rope` with the pretraining length `original`
    /// resolved.
    pub(super) fn resolve(rope: &RopeKeys, original: usize) -> Result<Self> {
        let factors = |key: &'static str| -> Result<Vec<f32>> {
            let list = rope.get(key).and_then(Value::as_array).ok_or_else(|| {
                rope.invalid(key, "missing (a list of numbers) for rope_type `longrope`")
            })?;
            list.iter()
                .map(|v| {
                    v.as_f64()
                        .map(|f| f as f32)
                        .ok_or_else(|| rope.invalid(key, format!("expected numbers, got {v}")))
                })
                .collect()
        };
        let attention_factor = match rope.number("attention_factor")? {
            Some(a) => a,
            None => {
                let default = rope.max_position_embeddings as f64 / original as f64;
                let factor = rope.number("factor")?.unwrap_or(default);
                if factor <= 1.0 {
                    1.0
                } else {
                    (1.0 + factor.ln() / (original as f64).ln()).sqrt()
                }
            }
        };
        Ok(Self {
            short_factor: factors("short_factor")?,
            long_factor: factors("long_factor")?,
            original_max_position_embeddings: original,
            attention_factor,
        })
    }

    /// Checks the factors' count (`rotary_dim / 2` each, RoPE rotating `rotary_dim`
    /// dimensions of each head) and values; `invalid` names the field.
    pub(super) fn validate(
        &self,
        rotary_dim: usize,
        invalid: &dyn Fn(&'static str, String) -> Error,
    ) -> Result<()> {
        for (field, factors) in [
            ("short_factor", &self.short_factor),
            ("long_factor", &self.long_factor),
        ] {
            if factors.len() != rotary_dim / 2 {
                return Err(invalid(
                    field,
                    format!(
                        "{} of them for {rotary_dim} rotated dimensions per head: need {}",
                        factors.len(),
                        rotary_dim / 2
                    ),
                ));
            }
            if let Some(bad) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
                return Err(invalid(field, format!("must be finite and > 0, got {bad}")));
            }
        }
        if !(self.attention_factor.is_finite() && self.attention_factor >= 0.0) {
            return Err(invalid(
                "attention_factor",
                format!("must be finite and ≥ 0, got {}", self.attention_factor),
            ));
        }
        if self.original_max_position_embeddings == 0 {
            return Err(invalid(
                "original_max_position_embeddings",
                "must be at least 1, got 0".to_string(),
            ));
        }
        Ok(())
    }

    /// The inverse frequencies for a forward whose positions end at `seq_len` (its last
    /// position + 1), from `powers`, the unscaled `θ^(2i/d)`: `1 / (factor_i · power_i)` in
    /// f32, as transformers computes them.
    pub(super) fn inv_freq(&self, powers: &[f32], seq_len: usize) -> Vec<f32> {
        let factors = if seq_len > self.original_max_position_embeddings {
            &self.long_factor
        } else {
            &self.short_factor
        };
        powers
            .iter()
            .zip(factors)
            .map(|(p, f)| 1.0 / (f * p))
            .collect()
    }
}
