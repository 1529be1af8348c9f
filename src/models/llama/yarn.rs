//! YaRN RoPE scaling (transformers' `rope_type: "yarn"`, its `_compute_yarn_parameters`):
//! the parameters as transformers resolves them from `config.json`, and the frequencies.

use serde_json::Value;

use super::rope_keys::RopeKeys;

use crate::error::{Error, Result};

/// YaRN ("Yet another RoPE extensioN", <https://arxiv.org/abs/2309.00071>), as
/// transformers computes it: the frequencies that turn fewer than `beta_slow` times over
/// `original_max_position_embeddings` positions are divided by `factor` (interpolated),
/// those that turn more than `beta_fast` times are kept (extrapolated), with a linear
/// ramp between; and the cos/sin tables are multiplied by `attention_factor`
/// (transformers' `attention_scaling`), which scales the attention logits by its square.
///
/// Read from `config.json` as transformers 5 reads it:
///
/// - `factor`: required; `null` takes `max_position_embeddings /
///   original_max_position_embeddings`;
/// - `original_max_position_embeddings`: a top-level one first, then the one in the RoPE
///   parameters, else `max_position_embeddings`;
/// - `beta_fast` / `beta_slow`: 32 / 1 when absent, null or 0;
/// - `truncate`: `true` when absent (the ramp's ends rounded outwards to whole dimensions);
/// - `attention_factor`: as given, else `0.1 · ln(factor) + 1`, or with both `mscale` and
///   `mscale_all_dim` set (non-zero) the ratio of that form with each
///   ([`YarnScaling::mscale`]).
///
/// ```
/// use lorakit::models::llama::{LlamaConfig, RopeScaling};
/// # fn main() -> lorakit::Result<()> {
/// // Qwen3's long-context setting, as its model cards give it.
/// let config = LlamaConfig::from_json(r#"{"model_type": "qwen3", "vocab_size": 64,
///     "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1,
///     "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16,
///     "max_position_embeddings": 131072,
///     "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
///                      "original_max_position_embeddings": 32768}}"#)?;
/// let RopeScaling::Yarn(yarn) = &config.rope_scaling else { panic!("not yarn") };
/// assert_eq!((yarn.factor, yarn.original_max_position_embeddings), (4.0, 32768));
/// assert!((yarn.attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
/// assert_eq!(config.rope_attention_factor(), yarn.attention_factor as f32);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct YarnScaling {
    /// The context extension: interpolated frequencies are divided by it.
    pub factor: f64,
    /// The context length of pretraining.
    pub original_max_position_embeddings: usize,
    /// Frequencies that turn more than this many times over the original context are kept.
    pub beta_fast: f64,
    /// Frequencies that turn fewer than this many times over it are divided by `factor`.
    pub beta_slow: f64,
    /// Whether the ramp's ends are rounded outwards to whole dimensions.
    pub truncate: bool,
    /// What the cos/sin tables are multiplied by (transformers' `attention_scaling`).
    pub attention_factor: f64,
}

impl YarnScaling {
    /// YaRN's `mscale` (the paper's eq. 21, transformers' `yarn_get_mscale`): `0.1 ·
    /// mscale · ln(factor) + 1`, or 1 for `factor ≤ 1`.
    ///
    /// ```
    /// use lorakit::models::llama::YarnScaling;
    /// assert_eq!(YarnScaling::mscale(1.0, 1.0), 1.0);
    /// assert!((YarnScaling::mscale(4.0, 1.0) - 1.138_629_436_111_989).abs() < 1e-15);
    /// ```
    pub fn mscale(factor: f64, mscale: f64) -> f64 {
        if factor <= 1.0 {
            1.0
        } else {
            0.1 * mscale * factor.ln() + 1.0
        }
    }

    /// The parameters of the RoPE dict `rope` (`rope_scaling` / `rope_parameters`) with
    /// the pretraining length `original` already resolved ([`YarnScaling`] says how).
    pub(super) fn resolve(rope: &RopeKeys, original: usize) -> Result<Self> {
        let number = |key| rope.number(key);
        let factor = match rope.get("factor") {
            None => {
                return Err(rope.invalid(
                    "factor",
                    "missing for rope_type `yarn` (null: max_position_embeddings / \
                     original_max_position_embeddings)",
                ))
            }
            Some(_) => match number("factor")? {
                Some(f) => f,
                None => rope.max_position_embeddings as f64 / original as f64,
            },
        };
        let attention_factor = match number("attention_factor")? {
            Some(a) => a,
            None => match (number("mscale")?, number("mscale_all_dim")?) {
                (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    Self::mscale(factor, m) / Self::mscale(factor, all)
                }
                _ => Self::mscale(factor, 1.0),
            },
        };
        let or_default = |v: Option<f64>, default: f64| v.filter(|&b| b != 0.0).unwrap_or(default);
        let truncate = match rope.get("truncate") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(rope.invalid("truncate", format!("expected a bool, got {v}"))),
        };
        Ok(Self {
            factor,
            original_max_position_embeddings: original,
            beta_fast: or_default(number("beta_fast")?, 32.0),
            beta_slow: or_default(number("beta_slow")?, 1.0),
            truncate,
            attention_factor,
        })
    }

    /// Checks the values a hand-written configuration could get wrong; `invalid` names
    /// the field.
    pub(super) fn validate(&self, invalid: &dyn Fn(&'static str, String) -> Error) -> Result<()> {
        let checks: [(&'static str, f64, bool); 4] = [
            ("factor", self.factor, self.factor > 0.0),
            ("beta_fast", self.beta_fast, self.beta_fast > 0.0),
            ("beta_slow", self.beta_slow, self.beta_slow > 0.0),
            (
                "attention_factor",
                self.attention_factor,
                self.attention_factor >= 0.0,
            ),
        ];
        for (field, value, ok) in checks {
            if !(value.is_finite() && ok) {
                return Err(invalid(
                    field,
                    format!("must be finite and > 0 (attention_factor ≥ 0), got {value}"),
                ));
            }
        }
        if self.original_max_position_embeddings == 0 {
            return Err(invalid(
                "original_max_position_embeddings",
                "must be at least 1, got 0".to_string(),
            ));
        }
        Ok(())
    }

    /// The dimension (of `dim`, in RoPE's pairs counted twice) whose frequency turns
    /// `rotations` times over the original context, for base `theta`.
    fn correction_dim(&self, rotations: f64, dim: f64, theta: f64) -> f64 {
        let len = self.original_max_position_embeddings as f64;
        dim * (len / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
    }

    /// The inverse frequencies for `rotary_dim` rotated dimensions and base `theta`, in f32 as
    /// transformers computes them from `powers`, the unscaled `θ^(2i/d)` (one per pair).
    pub(super) fn inv_freq(&self, powers: &[f32], rotary_dim: usize, theta: f64) -> Vec<f32> {
        let dim = rotary_dim as f64;
        let mut low = self.correction_dim(self.beta_fast, dim, theta);
        let mut high = self.correction_dim(self.beta_slow, dim, theta);
        if self.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
        if low == high {
            high += 0.001; // transformers' guard against a zero-width ramp
        }
        let (low_f32, width) = (low as f32, (high - low) as f32);
        let factor = self.factor as f32;
        powers
            .iter()
            .enumerate()
            .map(|(i, &power)| {
                let (extrapolated, interpolated) = (1.0 / power, 1.0 / (factor * power));
                let ramp = ((i as f32 - low_f32) / width).clamp(0.0, 1.0);
                let kept = 1.0 - ramp;
                interpolated * (1.0 - kept) + extrapolated * kept
            })
            .collect()
    }
}
