//! The Llama family's RMSNorm, and Gemma's, which multiplies by `1 + weight`.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use crate::error::Result;
use crate::models::fused;

use super::config::LlamaConfig;

/// RMSNorm as transformers computes it: `w ⊙ x / sqrt(mean(x²) + ε)`, in f32 for half
/// precision inputs. Gemma's checkpoints store `w − 1` (its RMSNorm multiplies by
/// `1 + weight`): with the config's `unit_offset_norms` the 1 is added at load. For the
/// families whose norms multiply in f32 ([`LlamaFamily::norms_in_f32`]: Gemma's, OLMo's)
/// the weight is kept in f32 (f64 in an f64 model), and a half-precision input is
/// normalized and multiplied in f32 and rounded once to its dtype, as transformers'
/// `Gemma3RMSNorm` and `Olmo2RMSNorm` / `Olmo3RMSNorm` do.
///
/// [`LlamaFamily::norms_in_f32`]: super::LlamaFamily::norms_in_f32
#[derive(Clone, Debug)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// Loads `weight` `(dim,)` at `vb`'s path, with the config's ε and weight offset.
    pub(crate) fn load(c: &LlamaConfig, dim: usize, vb: VarBuilder) -> Result<Self> {
        let stored = vb.get(dim, "weight")?;
        // f32 for a half-precision checkpoint where transformers multiplies in f32 (and
        // computes Gemma's `1 + weight` in f32).
        let weight = if c.family.norms_in_f32() {
            let dtype = match stored.dtype() {
                DType::F16 | DType::BF16 => DType::F32,
                other => other,
            };
            stored.to_dtype(dtype)?
        } else {
            stored
        };
        let weight = if c.unit_offset_norms {
            (weight + 1.0)?
        } else {
            weight
        };
        Ok(Self {
            weight,
            eps: c.rms_norm_eps as f32,
        })
    }

    /// Normalizes over the last dimension ([`crate::models::fused::rms_norm`]), in the
    /// weight's dtype (f32 for Gemma's) and returned in `x`'s.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype() == self.weight.dtype() {
            return fused::rms_norm(x, &self.weight, self.eps);
        }
        // Gemma's f32 weight on a half-precision input.
        let wide = x.to_dtype(self.weight.dtype())?;
        Ok(fused::rms_norm(&wide, &self.weight, self.eps)?.to_dtype(x.dtype())?)
    }
}
